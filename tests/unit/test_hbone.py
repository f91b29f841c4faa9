"""The sans-IO HBONE core: CONNECT headers, validation, Forwarded/traceparent, h2 ends driven in memory."""

from __future__ import annotations

import ipaddress

import h2.connection
import h2.events
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proxy import hbone
from agent.proxy.hbone import ConnectTarget, HboneError, Status

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def exchange(
    client: h2.connection.H2Connection, server: h2.connection.H2Connection
) -> tuple[list[h2.events.Event], list[h2.events.Event]]:
    """Move bytes both ways until both sides are quiet; return (client events, server events)."""
    c_events: list[h2.events.Event] = []
    s_events: list[h2.events.Event] = []
    for _ in range(20):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            break
        if to_server:
            s_events += server.receive_data(to_server)
        if to_client:
            c_events += client.receive_data(to_client)
    return c_events, s_events


def pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = hbone.new_h2_connection(client_side=True)
    server = hbone.new_h2_connection(client_side=False)
    hbone.start(client)
    hbone.start(server)
    exchange(client, server)
    return client, server


def test_h2_ends_agree_on_hbone_windows() -> None:
    client, server = pair()
    assert client.remote_settings.initial_window_size == hbone.STREAM_WINDOW
    assert server.remote_settings.initial_window_size == hbone.STREAM_WINDOW
    assert client.outbound_flow_control_window == hbone.CONNECTION_WINDOW
    assert server.outbound_flow_control_window == hbone.CONNECTION_WINDOW
    assert server.remote_settings.max_concurrent_streams == hbone.MAX_STREAMS_PER_CONNECTION


def test_connect_round_trip_in_memory() -> None:
    client, server = pair()
    sid = client.get_next_available_stream_id()
    client.send_headers(
        sid, hbone.connect_headers(("10.1.0.5", 8080), ("10.2.0.9", 40000), traceparent=TRACE)
    )
    _, s_events = exchange(client, server)
    req = next(e for e in s_events if isinstance(e, h2.events.RequestReceived))
    decision = hbone.validate_connect(req.headers, "10.1.0.5")
    assert decision == ConnectTarget(
        ip=ipaddress.IPv4Address("10.1.0.5"),
        port=8080,
        forwarded_for=(ipaddress.IPv4Address("10.2.0.9"), 40000),
        traceparent=TRACE,
    )
    server.send_headers(sid, hbone.response_headers(Status.OK))
    server.send_data(sid, b"x" * 100_000)
    c_events, _ = exchange(client, server)
    resp = next(e for e in c_events if isinstance(e, h2.events.ResponseReceived))
    assert hbone.response_status(resp.headers) == 200
    got = sum(len(e.data) for e in c_events if isinstance(e, h2.events.DataReceived))
    assert got == 100_000


def test_large_frames_are_accepted_by_the_receiver() -> None:
    client, server = pair()
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, hbone.connect_headers(("10.1.0.5", 80)))
    exchange(client, server)
    assert client.max_outbound_frame_size == hbone.MAX_FRAME_SIZE
    client.send_data(sid, b"y" * hbone.MAX_FRAME_SIZE)
    _, s_events = exchange(client, server)
    assert [len(e.data) for e in s_events if isinstance(e, h2.events.DataReceived)] == [hbone.MAX_FRAME_SIZE]


def test_authority_mismatch_over_the_wire_is_400() -> None:
    client, server = pair()
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, hbone.connect_headers(("10.1.0.6", 8080)))
    _, s_events = exchange(client, server)
    req = next(e for e in s_events if isinstance(e, h2.events.RequestReceived))
    decision = hbone.validate_connect(req.headers, "10.1.0.5")
    assert isinstance(decision, HboneError)
    assert decision.status == Status.BAD_REQUEST


def headers(**extra: str) -> list[tuple[bytes, bytes]]:
    base = {":method": "CONNECT", ":authority": "10.0.0.1:80"}
    base.update({k.replace("_", "-") if not k.startswith("p_") else ":" + k[2:]: v for k, v in extra.items()})
    return [(k.encode(), v.encode()) for k, v in base.items()]


@pytest.mark.parametrize(
    ("block", "reason_part"),
    [
        (headers(p_method="GET"), "not CONNECT"),
        (headers(p_authority="10.0.0.1"), "no port"),
        (headers(p_authority="10.0.0.1:0"), "bad port"),
        (headers(p_authority="10.0.0.1:65536"), "bad port"),
        (headers(p_authority="example.com:80"), "malformed authority"),
        (headers(p_authority="::1:80"), "IPv6 address without brackets"),
        (headers(p_authority=""), "without :authority"),
        (headers(p_path="/"), ":path not allowed"),
        (headers(p_scheme="https"), ":scheme not allowed"),
        (headers(p_authority="10.0.0.2:80"), "not the TLS destination"),
        (headers(forwarded='for="10.0.0.9:1'), "malformed forwarded"),
    ],
)
def test_bad_requests_get_400(block: list[tuple[bytes, bytes]], reason_part: str) -> None:
    decision = hbone.validate_connect(block, "10.0.0.1")
    assert isinstance(decision, HboneError)
    assert decision.status == Status.BAD_REQUEST
    assert reason_part in decision.reason


def test_duplicate_pseudo_header_is_400() -> None:
    block = [*headers(), (b":authority", b"10.0.0.1:81")]
    decision = hbone.validate_connect(block, "10.0.0.1")
    assert isinstance(decision, HboneError) and "duplicate" in decision.reason


def test_ipv6_and_v4_mapped_destinations() -> None:
    target = hbone.validate_connect(headers(p_authority="[fd00::5]:443"), "fd00::5")
    assert isinstance(target, ConnectTarget) and target.authority == "[fd00::5]:443"
    mapped = hbone.validate_connect(headers(), "::ffff:10.0.0.1")
    assert isinstance(mapped, ConnectTarget) and str(mapped.ip) == "10.0.0.1"


def test_invalid_or_missing_traceparent_starts_a_new_trace() -> None:
    for block in (headers(), headers(traceparent="00-" + "0" * 32 + "-00f067aa0ba902b7-01")):
        target = hbone.validate_connect(block, "10.0.0.1")
        assert isinstance(target, ConnectTarget)
        assert hbone.is_valid_traceparent(target.traceparent)
        assert "0" * 32 not in target.traceparent


def test_client_keeps_a_valid_traceparent_and_baggage() -> None:
    block = dict(hbone.connect_headers(("10.0.0.1", 80), traceparent=TRACE, baggage="k=v"))
    assert block[b"traceparent"] == TRACE.encode()
    assert block[b"baggage"] == b"k=v"
    assert b":path" not in block and b":scheme" not in block


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('for="10.0.0.1:8080"', ("10.0.0.1", 8080)),
        ("for=10.0.0.1", ("10.0.0.1", None)),
        ('for="[2001:db8:cafe::17]:4711"', ("2001:db8:cafe::17", 4711)),
        ('For="10.0.0.1:1";proto=http;by=203.0.113.43', ("10.0.0.1", 1)),
        ('for="10.0.0.1:1", for=10.0.0.2', ("10.0.0.1", 1)),
        ("for=unknown", None),
        ("for=_hidden", None),
        ("proto=https", None),
    ],
)
def test_forwarded_for_parsing(value: str, expected: tuple[str, int | None] | None) -> None:
    got = hbone.parse_forwarded_for(value)
    if expected is None:
        assert got is None
    else:
        assert got == (ipaddress.ip_address(expected[0]), expected[1])


def test_forwarded_formatting_quotes_per_rfc7239() -> None:
    assert hbone.format_forwarded_for("10.0.0.1", 80) == 'for="10.0.0.1:80"'
    assert hbone.format_forwarded_for("2001:db8::1", 80) == 'for="[2001:db8::1]:80"'
    assert hbone.format_forwarded_for("10.0.0.1") == "for=10.0.0.1"


def test_response_status_errors() -> None:
    with pytest.raises(ValueError, match="without :status"):
        hbone.response_status([(b"x", b"y")])
    with pytest.raises(ValueError, match="bad :status"):
        hbone.response_status([(b":status", b"2xx")])


def _not_v4_mapped(addr: ipaddress.IPv6Address) -> bool:
    return addr.ipv4_mapped is None


ips = st.one_of(
    st.ip_addresses(v=4), st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)).filter(_not_v4_mapped)
)
ports = st.integers(min_value=1, max_value=65535)


@given(dst=ips, dport=ports, src=ips, sport=ports)
def test_built_headers_always_validate_against_their_own_destination(
    dst: hbone.IpAddress, dport: int, src: hbone.IpAddress, sport: int
) -> None:
    block = hbone.connect_headers((dst, dport), (src, sport))
    target = hbone.validate_connect(block, dst)
    assert isinstance(target, ConnectTarget)
    assert (target.ip, target.port) == (dst, dport)
    assert target.forwarded_for == (src, sport)


@given(st.text(max_size=60))
def test_validate_connect_never_raises_on_arbitrary_authority(authority: str) -> None:
    decision = hbone.validate_connect([(":method", "CONNECT"), (":authority", authority)], "10.0.0.1")
    assert isinstance(decision, ConnectTarget | HboneError)
    if isinstance(decision, HboneError):
        assert decision.status == Status.BAD_REQUEST


@given(st.text(max_size=60))
def test_arbitrary_forwarded_header_gives_a_target_or_400(value: str) -> None:
    decision = hbone.validate_connect([*headers(), (b"forwarded", value.encode())], "10.0.0.1")
    assert isinstance(decision, ConnectTarget) or decision.status == Status.BAD_REQUEST


# --- DATA frame repr (h2 formats it for every received frame) -----------------------------------------


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 12, 64, 1 << 20])
@pytest.mark.parametrize("pad", [None, 0, 1, 5, 40])
def test_data_frame_repr_is_hyperframes_text_from_the_first_bytes_only(size: int, pad: int | None) -> None:
    import hyperframe.frame

    flags = ["PADDED"] if pad is not None else []
    frame = hyperframe.frame.DataFrame(1, bytes(range(256)) * (size // 256) + bytes(size % 256),
                                       flags=flags, pad_length=pad or 0)  # fmt: skip
    # what hyperframe's own fallback (serialize the whole body, hex-encode it) says
    assert hbone._data_frame_body_repr(frame) == hyperframe.frame.Frame._body_repr(frame)
    assert hyperframe.frame.DataFrame._body_repr is hbone._data_frame_body_repr
    assert repr(frame).endswith(hyperframe.frame.Frame._body_repr(frame))
