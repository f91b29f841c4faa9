"""The in-memory datapath follows the rules of the real one (idempotence, fail closed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.datapath import Datapath, DatapathError, PodRef
from agent.datapath.fake import FakeDatapath

POD = PodRef(uid="pod-a", netns_path="/var/run/netns/a", ip="10.0.0.5")


@pytest.fixture
def dp() -> FakeDatapath:
    fake = FakeDatapath()
    fake.load("node-1", Path("/sys/fs/cgroup/pods"))
    return fake


def test_fake_satisfies_the_protocol(dp: FakeDatapath) -> None:
    as_protocol: Datapath = dp
    assert as_protocol.counters()["connect_redirected"] == 0


def test_enroll_is_idempotent(dp: FakeDatapath) -> None:
    first = dp.enroll(POD)
    assert dp.enroll(POD) is first
    assert len(dp.pods) == 1


@pytest.mark.parametrize("other", [PodRef(POD.uid, "/var/run/netns/a-2", POD.ip),
                                   PodRef(POD.uid, POD.netns_path, "10.0.0.6")])
def test_enrolled_key_refuses_another_ref(dp: FakeDatapath, other: PodRef) -> None:
    dp.enroll(POD)
    held = re.escape("already enrolled with netns /var/run/netns/a ip 10.0.0.5")
    with pytest.raises(DatapathError, match=held):
        dp.enroll(other)
    assert dp.pods[POD.uid].pod == POD
    dp.unenroll(POD)
    assert dp.enroll(other).pod == other


def test_unenroll_of_a_pod_not_held_keeps_the_listener_entry_at_its_ip(dp: FakeDatapath) -> None:
    dp.enroll(POD)
    dp.unenroll(PodRef("pod-gone", "/var/run/netns/gone", POD.ip))  # e.g. a restart leftover
    assert dp.inbound_listener == {POD.ip: POD.uid}
    dp.unenroll(POD)
    assert dp.inbound_listener == {}


def test_pods_get_distinct_cookies_and_reuse_freed_slots(dp: FakeDatapath) -> None:
    a = dp.enroll(POD)
    b = dp.enroll(PodRef("pod-b", "/var/run/netns/b", "10.0.0.6"))
    assert a.netns_cookie != b.netns_cookie
    assert {a.pod_index, b.pod_index} == {0, 1}
    dp.unenroll(POD)
    assert dp.enroll(PodRef("pod-c", "/var/run/netns/c", "10.0.0.7")).pod_index == a.pod_index


def test_captured_connection_has_original_destination(dp: FakeDatapath) -> None:
    ep = dp.enroll(POD)
    assert dp.capture("pod-a", 40000, ("10.96.0.10", 80))
    assert dp.original_destination(ep.netns_cookie, ("127.0.0.1", 40000)) == ("10.96.0.10", 80)


def test_an_app_that_bound_its_pod_ip_before_connecting_is_captured_too(dp: FakeDatapath) -> None:
    """The redirected socket keeps the source it bound: 15001 (on 127.0.0.1 in the pod netns) sees
    the pod IP as the peer, and the lookup is by port all the same (it failed closed before)."""
    ep = dp.enroll(POD)
    dp.capture("pod-a", 40000, ("10.96.0.10", 80))
    assert dp.original_destination(ep.netns_cookie, (POD.ip, 40000)) == ("10.96.0.10", 80)


@pytest.mark.parametrize("peer", [("127.0.0.1", 40001), ("bogus", 40000)])
def test_unknown_peer_fails_closed(dp: FakeDatapath, peer: tuple[str, int]) -> None:
    ep = dp.enroll(POD)
    dp.capture("pod-a", 40000, ("10.96.0.10", 80))
    assert dp.original_destination(ep.netns_cookie, peer) is None


def test_loopback_and_unenrolled_are_not_captured(dp: FakeDatapath) -> None:
    dp.enroll(POD)
    assert not dp.capture("pod-a", 40000, ("127.0.0.1", 8080))
    assert not dp.capture("pod-zz", 40000, ("10.96.0.10", 80))
    assert dp.counters()["connect_loopback"] == 1
    assert dp.counters()["connect_redirected"] == 0


def test_unenroll_drops_saved_destinations_and_is_idempotent(dp: FakeDatapath) -> None:
    ep = dp.enroll(POD)
    dp.capture("pod-a", 40000, ("10.96.0.10", 80))
    dp.unenroll(POD)
    dp.unenroll(POD)
    assert dp.original_destination(ep.netns_cookie, ("127.0.0.1", 40000)) is None
    assert dp.pods == {}


@pytest.mark.parametrize("bad", [
    PodRef("../etc", "/var/run/netns/a", "10.0.0.5"),
    PodRef("pod-a", "/var/run/netns/a", "10.0.0.300"),
    PodRef("", "/var/run/netns/a", "10.0.0.5")])
def test_bad_pod_gives_clear_error(dp: FakeDatapath, bad: PodRef) -> None:
    with pytest.raises(DatapathError) as info:
        dp.enroll(bad)
    assert info.value.what.startswith("pod")


def test_enroll_before_load_is_an_error() -> None:
    with pytest.raises(DatapathError, match="not loaded"):
        FakeDatapath().enroll(POD)


def test_uninstall_forgets_everything(dp: FakeDatapath) -> None:
    dp.enroll(POD)
    dp.uninstall("node-1")
    with pytest.raises(DatapathError, match="not loaded"):
        dp.enroll(POD)


def test_two_pods_with_one_ip_are_refused(dp: FakeDatapath) -> None:
    dp.enroll(POD)
    with pytest.raises(DatapathError, match="already belongs to enrolled pod pod-a"):
        dp.enroll(PodRef("pod-b", "/var/run/netns/b", POD.ip))
