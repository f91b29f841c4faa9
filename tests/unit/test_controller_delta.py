"""The sans-IO stream core: diff and the ACK/NACK/in-flight state machine."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from api.resources import PolicyObject, Resource, resource_key, resource_version
from controller.server.delta import StreamState, diff


def pol(name: str, action: str = "ALLOW") -> PolicyObject:
    return PolicyObject.of("AuthorizationPolicy", "ns", name, {"spec": {"action": action}})


def view(*objs: PolicyObject) -> dict[str, Resource]:
    return {resource_key(o): o for o in objs}


views = st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from(["ALLOW", "DENY"])), max_size=6).map(
    lambda items: view(*(pol(n, a) for n, a in dict(items).items()))
)


@given(views, views)
def test_applying_the_diff_reaches_the_desired_versions(
    old: dict[str, Resource], new: dict[str, Resource]
) -> None:
    known = {k: resource_version(r) for k, r in old.items()}
    delta = diff(known, new)
    for key, version, _ in delta.upserts:
        known[key] = version
    for key in delta.removals:
        del known[key]
    assert known == {k: resource_version(r) for k, r in new.items()}
    assert not diff(known, new)


def test_first_push_is_a_snapshot_and_ack_records_versions() -> None:
    state = StreamState(acked={})
    push = state.next_push(view(pol("a")))
    assert push is not None and push.snapshot
    assert state.next_push(view(pol("a"), pol("b"))) is None  # one push in flight at a time
    assert state.on_ack(push.nonce)
    assert state.acked == {resource_key(pol("a")): resource_version(pol("a"))}
    latest = state.next_push(view(pol("a"), pol("b")))
    assert latest is not None and not latest.snapshot
    assert [k for k, _, _ in latest.delta.upserts] == [resource_key(pol("b"))]


def test_nack_keeps_acked_and_does_not_resend_same_target() -> None:
    state = StreamState(acked={})
    first = state.next_push(view(pol("a")))
    assert first is not None and state.on_ack(first.nonce)
    before = dict(state.acked)
    bad = state.next_push(view(pol("a", "DENY")))
    assert bad is not None and state.on_nack(bad.nonce)
    assert state.acked == before
    assert state.next_push(view(pol("a", "DENY"))) is None
    retry = state.next_push(view(pol("a", "AUDIT")))
    assert retry is not None


def test_stale_or_unknown_nonces_are_ignored() -> None:
    state = StreamState(acked={})
    push = state.next_push(view(pol("a")))
    assert push is not None
    assert not state.on_ack("bogus")
    assert not state.on_nack("bogus")
    assert state.on_ack(push.nonce)
    assert not state.on_ack(push.nonce)


def test_reconnect_with_everything_known_sends_an_empty_first_push() -> None:
    v = view(pol("a"))
    state = StreamState(acked={k: resource_version(r) for k, r in v.items()})
    push = state.next_push(v)
    assert push is not None and not push.snapshot and not push.delta
