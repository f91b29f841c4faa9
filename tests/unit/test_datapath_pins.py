"""A re-used pinned map is checked against the ABI before the agent trusts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.datapath import DatapathError, abi, bpfsys
from agent.datapath.bcc_datapath import check_name, check_pinned_map

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
