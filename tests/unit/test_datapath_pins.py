"""BccDatapath without a kernel: re-used pins are checked before the agent trusts them, and pod
bookkeeping that needs no netns (bpfsys calls replaced by dicts, bpftool by canned JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.datapath import DatapathError, abi, bpfsys
from agent.datapath.bcc_datapath import BccDatapath, _link_in_netns, check_name, check_pinned_map
from agent.datapath.interface import EnrolledPod, PodRef

TYPE_NAMES = {abi.MAP_HASH: "hash", abi.MAP_ARRAY: "array", abi.MAP_LRU_HASH: "lru_hash",
              abi.MAP_SOCKHASH: "sockhash"}


def fake_bpftool(info: dict[str, Any]) -> Any:
    def run(*args: str) -> Any:
        assert args[:3] == ("map", "show", "pinned")
        return info
    return run


def spec_info(name: str) -> dict[str, Any]:
    mtype, ksize, vsize, max_entries = abi.MAP_SPECS[name]
    return {"id": 7, "type": TYPE_NAMES[mtype], "bytes_key": ksize, "bytes_value": vsize,
            "max_entries": max_entries, "name": name[:15]}


@pytest.mark.parametrize("name", sorted(abi.MAP_SPECS))
def test_matching_pinned_map_is_accepted(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(bpfsys, "bpftool_json", fake_bpftool(spec_info(name)))
    check_pinned_map(name, Path("/sys/fs/bpf/nodemesh/n/maps") / name)


@pytest.mark.parametrize(("field", "value"), [
    ("type", "percpu_hash"), ("bytes_key", 4), ("bytes_value", 99), ("max_entries", 1)])
def test_mismatching_pinned_map_is_refused(monkeypatch: pytest.MonkeyPatch, field: str, value: Any) -> None:
    info = spec_info("orig_dst_by_tuple") | {field: value}
    monkeypatch.setattr(bpfsys, "bpftool_json", fake_bpftool(info))
    with pytest.raises(DatapathError, match="run uninstall") as err:
        check_pinned_map("orig_dst_by_tuple", Path("/sys/fs/bpf/nodemesh/n/maps/orig_dst_by_tuple"))
    assert "orig_dst_by_tuple" in err.value.what


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 64, "sp ace", "default.client"])
def test_path_components_are_validated(bad: str) -> None:
    with pytest.raises(DatapathError, match="must match"):
        check_name("node", bad)


Maps = dict[int, dict[bytes, bytes]]
LISTENER, POD_BY_NETNS, ORIG_DST = 1, 2, 3


@pytest.fixture
def maps(monkeypatch: pytest.MonkeyPatch) -> Maps:
    """The datapath's maps as dicts, by fd."""
    maps: Maps = {LISTENER: {}, POD_BY_NETNS: {}, ORIG_DST: {}}
    monkeypatch.setattr(bpfsys, "map_delete", lambda fd, key: maps[fd].pop(key, None) is not None)
    monkeypatch.setattr(bpfsys, "map_keys", lambda fd, size: list(maps[fd]))
    return maps


def loaded(tmp_path: Path, *pods: EnrolledPod) -> BccDatapath:
    """A BccDatapath as after load() (no programs), holding ``pods``."""
    dp = BccDatapath(tmp_path / "bpffs")
    dp._node = "node-a"
    (tmp_path / "bpffs" / "node-a" / "links").mkdir(parents=True)
    dp._map_fds = {"inbound_listener": LISTENER, "pod_by_netns": POD_BY_NETNS, "orig_dst_by_tuple": ORIG_DST}
    for ep in pods:
        dp._pods[ep.pod.uid] = ep
    return dp


def test_unenrolling_a_leftover_keeps_the_listener_of_the_enrolled_pod_with_its_ip(
        tmp_path: Path, maps: Maps) -> None:
    # A previous run's pod (its netns gone, so no setns) had the IP this process's shop_b has now:
    # deleting inbound_listener[ip] would make sk_lookup in shop_b's netns drop every inbound SYN.
    b = PodRef("shop_b", str(tmp_path / "netns-b"), "10.1.0.2")
    dp = loaded(tmp_path, EnrolledPod(pod=b, netns_cookie=77, pod_index=0))
    maps[LISTENER][abi.pack_ip4_key("10.1.0.2")] = abi.U32.pack(42)
    maps[POD_BY_NETNS][abi.U64.pack(77)] = abi.pack_pod_info(0)

    dp.unenroll(PodRef("shop_a", str(tmp_path / "netns-a-gone"), "10.1.0.2"))
    assert abi.pack_ip4_key("10.1.0.2") in maps[LISTENER]
    assert abi.U64.pack(77) in maps[POD_BY_NETNS]

    dp.unenroll(b)  # the pod this process holds: its entries go
    assert maps == {LISTENER: {}, POD_BY_NETNS: {}, ORIG_DST: {}}


def test_enroll_refuses_another_ref_of_an_enrolled_key(tmp_path: Path, maps: Maps) -> None:
    held = EnrolledPod(PodRef("shop_a", str(tmp_path / "netns-1"), "10.1.0.2"), netns_cookie=77, pod_index=0)
    dp = loaded(tmp_path, held)
    assert dp.enroll(held.pod) is held
    with pytest.raises(DatapathError, match="already enrolled with netns"):
        dp.enroll(PodRef("shop_a", str(tmp_path / "netns-2"), "10.1.0.2"))
    assert dp.enrolled() == {"shop_a": held}


@pytest.mark.parametrize(("info", "same"), [
    ({"type": "netns", "netns_ino": "INO", "attach_type": "sk_lookup"}, True),
    ({"type": "netns", "netns_ino": 1, "attach_type": "sk_lookup"}, False),
    ({"type": "netns", "netns_ino": 0, "attach_type": "sk_lookup"}, False),  # its netns is gone
    (None, False)])
def test_pinned_sk_lookup_link_is_reused_only_in_its_own_netns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, info: dict[str, Any] | None, same: bool) -> None:
    netns = tmp_path / "netns"
    netns.touch()
    if info is not None and info["netns_ino"] == "INO":
        info = info | {"netns_ino": netns.stat().st_ino}

    def bpftool(*args: str) -> Any:
        assert args == ("link", "show", "pinned", "/sys/fs/bpf/nodemesh/n/links/sk_lookup-shop_a")
        return info
    monkeypatch.setattr(bpfsys, "bpftool_json", bpftool)
    assert _link_in_netns(Path("/sys/fs/bpf/nodemesh/n/links/sk_lookup-shop_a"), str(netns)) is same
