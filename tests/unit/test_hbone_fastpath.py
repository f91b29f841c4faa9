"""`hbone.HboneConnection` (DATA fast path, by-reference payloads, its frame buffer) against plain h2.

Two worlds run the same random exchange: a client and a server that are `HboneConnection`s, and a
client and a server that are h2's own `H2Connection` with the same settings. After every step both
worlds must have put the same bytes on the wire, raised the same exceptions and produced the same
events (payloads compared as bytes, whether they came as bytes or as views).

One deliberate difference from h2 is not the fast path's: a graceful GOAWAY received leaves the
connection draining, not closed (`hbone.DrainingH2Connection`, tested against plain h2 at the end
of this file). The plain world has that rule too (h2's generic path plus only that override), so
the random exchanges can include a peer's GOAWAY and still compare the fast path with h2's path.
A second one is a limit only `HboneConnection` has: a header block longer than
`hbone.MAX_HEADER_BLOCK` ends the connection (the header-block tests before the GOAWAY ones); the
random exchanges stay far below it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
import hyperframe.frame
import pytest
from h2frames import frame
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import hbone

Conn = h2.connection.H2Connection
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _make(fast: bool, client_side: bool) -> Conn:
    if fast:
        conn: Conn = hbone.new_h2_connection(client_side=client_side)
    else:  # h2's own paths, with only the deliberate GOAWAY difference (see the module docstring)
        conn = hbone.DrainingH2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        )
        assert not isinstance(conn, hbone.HboneConnection)
        hbone.apply_settings(conn)
    hbone.start(conn)
    return conn


def _norm(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, h2.events.Event):
        return type(value).__name__
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return repr(value)


def _fields(event: h2.events.Event) -> dict[str, Any]:
    if dataclasses.is_dataclass(event):
        return {f.name: _norm(getattr(event, f.name)) for f in dataclasses.fields(event)}
    return {k: _norm(v) for k, v in vars(event).items()}


def _events(events: list[h2.events.Event]) -> list[tuple[str, dict[str, Any]]]:
    """Events as comparable values; consecutive DataReceived of one stream count as one (the fast
    lane hands a frame split across received chunks on in pieces, an event each: a byte stream)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for e in events:
        name, fields = type(e).__name__, _fields(e)
        if name == "DataReceived" and out and out[-1][0] == name:
            last = out[-1][1]
            if last["stream_id"] == fields["stream_id"] and last["stream_ended"] == repr(None):
                last["data"] += fields["data"]
                last["flow_controlled_length"] = repr(
                    int(last["flow_controlled_length"]) + int(fields["flow_controlled_length"])
                )
                continue
        out.append((name, fields))
    return out


def _wire(conn: Conn) -> bytes:
    return bytes(conn.data_to_send())


class World:
    """A client and a server, the bytes each has sent and not yet delivered, what each received."""

    def __init__(self, fast: bool) -> None:
        self.ends = {"c": _make(fast, True), "s": _make(fast, False)}
        self.in_flight = {"c": b"", "s": b""}  # bytes sent by that end, not yet delivered
        self.unacked = {"c": {}, "s": {}}  # type: dict[str, dict[int, int]]

    def collect(self) -> None:
        for name, conn in self.ends.items():
            self.in_flight[name] += _wire(conn)

    def deliver(self, sender: str, cut: int) -> list[tuple[str, dict[str, Any]]]:
        """Deliver the first `cut` in-flight bytes of `sender` to the other end."""
        receiver = "s" if sender == "c" else "c"
        data, self.in_flight[sender] = self.in_flight[sender][:cut], self.in_flight[sender][cut:]
        if not data:
            return []
        conn = self.ends[receiver]
        if isinstance(conn, hbone.HboneConnection):
            # as the TLS transport does: a view of a buffer that is overwritten once the events were
            # handled, so whatever the connection keeps of it past receive_data must be a copy
            chunk = bytearray(data)
            events = conn.receive_data(memoryview(chunk))
            seen = _events(events)
            chunk[:] = b"\xee" * len(chunk)
        else:
            events = conn.receive_data(data)
            seen = _events(events)
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                acks = self.unacked[receiver]
                acks[e.stream_id] = acks.get(e.stream_id, 0) + e.flow_controlled_length
        self.collect()
        return seen


def _state(world: World) -> dict[str, Any]:
    """Windows and stream states of both ends (what a DATA frame changes)."""
    out: dict[str, Any] = {}
    for name, conn in world.ends.items():
        out[name] = (
            conn.state_machine.state,
            conn.outbound_flow_control_window,
            conn.inbound_flow_control_window,
            conn._inbound_flow_control_window_manager.current_window_size,
            conn._inbound_flow_control_window_manager._bytes_processed,
            sorted(
                (
                    sid,
                    stream.state_machine.state,
                    stream.outbound_flow_control_window,
                    stream.inbound_flow_control_window,
                    stream._inbound_window_manager.current_window_size,
                    stream._inbound_window_manager._bytes_processed,
                )
                for sid, stream in conn.streams.items()
            ),
        )
    return out


def _step(world: World, op: tuple[Any, ...]) -> tuple[Any, ...]:
    """Run one operation; returns what it observably did (events, or the exception type)."""
    kind = op[0]
    try:
        if kind == "open":
            client = world.ends["c"]
            sid = client.get_next_available_stream_id()
            client.send_headers(
                sid, hbone.connect_headers(("10.1.0.5", 8080), ("10.2.0.9", 40000), traceparent=TRACE)
            )
            world.collect()
            return ("opened", sid)
        if kind == "respond":
            server = world.ends["s"]
            sids = sorted(sid for sid, st_ in server.streams.items() if st_.open)
            if not sids:
                return ("none",)
            sid = sids[op[1] % len(sids)]
            server.send_headers(sid, hbone.response_headers(200))
            world.collect()
            return ("responded", sid)
        if kind == "send":
            _, side, pick, size, end = op
            conn = world.ends[side]
            sids = sorted(conn.streams)
            if not sids:
                return ("none",)
            sid = sids[pick % len(sids)]
            payload = bytes((sid + i) % 251 for i in range(size))
            window = conn.local_flow_control_window(sid)
            conn.send_data(
                sid, payload[: max(0, min(size, window, conn.max_outbound_frame_size))], end_stream=end
            )
            world.collect()
            return ("sent", sid)
        if kind == "deliver":
            _, side, cut = op
            return ("delivered", world.deliver(side, cut))
        if kind == "ack":
            _, side, pick = op
            acks = world.unacked[side]
            if not acks:
                return ("none",)
            sid = sorted(acks)[pick % len(acks)]
            world.ends[side].acknowledge_received_data(acks.pop(sid), sid)
            world.collect()
            return ("acked", sid)
        if kind in ("end", "reset"):
            _, side, pick = op
            conn = world.ends[side]
            sids = sorted(conn.streams)
            if not sids:
                return ("none",)
            close = conn.end_stream if kind == "end" else conn.reset_stream
            close(sids[pick % len(sids)])
            world.collect()
            return (kind,)
        if kind == "ping":
            world.ends[op[1]].ping(b"12345678")
            world.collect()
            return ("pinged",)
        if kind == "goaway":
            # as a draining Rust h2 peer sends it: the frame only, the sender keeps going
            _, side, code, last = op
            world.collect()
            world.in_flight[side] += hyperframe.frame.GoAwayFrame(
                0, last_stream_id=last, error_code=code
            ).serialize()
            return ("goaway",)
    except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError, ValueError, KeyError) as exc:
        world.collect()
        return ("raised", type(exc).__name__)
    raise AssertionError(op)


sides = st.sampled_from(["c", "s"])
ops = st.one_of(
    st.just(("open",)),
    st.tuples(st.just("respond"), st.integers(0, 7)),
    st.tuples(
        st.just("send"),
        sides,
        st.integers(0, 7),
        st.one_of(st.integers(0, 200), st.integers(4000, 70_000)),
        st.booleans(),
    ),
    st.tuples(st.just("deliver"), sides, st.one_of(st.integers(0, 140_000), st.just(10**7))),
    st.tuples(st.just("ack"), sides, st.integers(0, 7)),
    st.tuples(st.just("end"), sides, st.integers(0, 7)),
    st.tuples(st.just("reset"), sides, st.integers(0, 7)),
    st.tuples(st.just("ping"), sides),
    st.tuples(
        st.just("goaway"),
        sides,
        st.sampled_from([h2.errors.ErrorCodes.NO_ERROR, h2.errors.ErrorCodes.PROTOCOL_ERROR]),
        st.sampled_from([0, 1, 3, 2**31 - 1]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, min_size=5, max_size=60))
def test_fast_connection_behaves_like_h2(steps: list[tuple[Any, ...]]) -> None:
    fast, plain = World(True), World(False)
    assert fast.in_flight == plain.in_flight == {"c": b"", "s": b""}
    fast.collect()
    plain.collect()
    # settings both ways, then two streams answered 200: the random steps start mid-conversation
    prologue: list[tuple[Any, ...]] = [
        ("deliver", "c", 10**6),
        ("deliver", "s", 10**6),
        ("deliver", "c", 10**6),
    ]
    prologue += [("open",), ("open",), ("deliver", "c", 10**7), ("respond", 0), ("respond", 1)]
    prologue += [("deliver", "s", 10**7)]
    for op in [*prologue, *steps]:
        assert _step(fast, op) == _step(plain, op), op
        assert fast.in_flight == plain.in_flight, op
        assert _state(fast) == _state(plain), op
    for side in ("c", "s", "c", "s"):  # drain what is left
        assert _step(fast, ("deliver", side, 10**7)) == _step(plain, ("deliver", side, 10**7))


def _open_pair() -> tuple[hbone.HboneConnection, hbone.HboneConnection, int]:
    client = hbone.new_h2_connection(client_side=True)
    server = hbone.new_h2_connection(client_side=False)
    hbone.start(client)
    hbone.start(server)
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, hbone.connect_headers(("10.1.0.5", 8080)))
    server.receive_data(client.data_to_send())
    server.send_headers(sid, hbone.response_headers(200))
    client.receive_data(server.data_to_send())
    return client, server, sid


def test_large_payload_leaves_by_reference_and_arrives_as_a_view() -> None:
    client, server, sid = _open_pair()
    payload = bytes(range(256)) * 64  # 16 KiB >= BY_REFERENCE
    client.send_data(sid, payload)
    buffers = client.buffers_to_send()
    assert buffers[-1] is payload  # not copied on the way out
    assert bytes(buffers[-2]) == b"\x00\x40\x00\x00\x00" + sid.to_bytes(4, "big")
    wire = b"".join(bytes(b) for b in buffers)
    (event,) = server.receive_data(wire)
    assert isinstance(event, h2.events.DataReceived)
    assert isinstance(event.data, memoryview) and event.data == payload
    assert event.flow_controlled_length == len(payload)
    assert server.remote_flow_control_window(sid) == hbone.STREAM_WINDOW - len(payload)


def test_small_payload_arrives_as_bytes_and_small_pieces_are_joined() -> None:
    client, server, sid = _open_pair()
    client.send_data(sid, b"x" * 100)
    client.send_data(sid, b"y" * 9000)
    wire = client.data_to_send()
    events: list[h2.events.Event] = []
    for i in range(0, len(wire), 7):  # 7-byte pieces: every header and payload is split
        events += server.receive_data(wire[i : i + 7])
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert [type(e.data) for e in data] == [bytes, bytes]
    assert bytes(data[0].data) == b"x" * 100 and bytes(data[1].data) == b"y" * 9000
    assert [e.flow_controlled_length for e in data] == [100, 9000]


def test_large_frame_split_across_reads_arrives_in_pieces_without_a_join() -> None:
    client, server, sid = _open_pair()
    payload = os.urandom(200_000)
    client.send_data(sid, payload)
    wire = b"".join(bytes(b) for b in client.buffers_to_send())
    cuts = [0, 70_000, 70_010, 150_000, len(wire)]  # a 10-byte piece between two large ones
    events: list[h2.events.Event] = []
    for a, b in itertools.pairwise(cuts):
        events += server.receive_data(wire[a:b])
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    # 69,991 bytes (70,000 less the header), 10 (a small piece: bytes), 79,990 and 50,009
    assert [type(e.data) for e in data] == [memoryview, bytes, memoryview, memoryview]
    assert [len(e.data) for e in data] == [69_991, 10, 79_990, 50_009]
    assert b"".join(bytes(e.data) for e in data) == payload
    assert [e.flow_controlled_length for e in data] == [len(e.data) for e in data]
    assert server.remote_flow_control_window(sid) == hbone.STREAM_WINDOW - len(payload)


def test_overlong_frame_is_refused_before_it_is_buffered() -> None:
    _, server, sid = _open_pair()
    header = (hbone.MAX_FRAME_SIZE + 1).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big")
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        server.receive_data(header)  # no payload sent: refused on the header alone
    out = server.data_to_send()
    assert out[3] == 0x07  # GOAWAY
    assert int.from_bytes(out[13:17], "big") == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


def test_data_beyond_the_window_is_a_flow_control_error() -> None:
    _, server, sid = _open_pair()
    size = 1 << 20
    frame = size.to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big") + b"z" * size
    with pytest.raises(h2.exceptions.FlowControlError):
        for _ in range(5):  # a 4 MiB stream window: the fifth MiB overflows it
            server.receive_data(frame)


@pytest.mark.parametrize("fast", [True, False])
def test_data_inside_a_header_block_is_a_protocol_error(fast: bool) -> None:
    """HEADERS without END_HEADERS must be followed by CONTINUATION (RFC 9113 §6.10), even when the
    next frame is DATA for an open stream, the fast path's kind."""
    client, server = _make(fast, True), _make(fast, False)
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    client.send_headers(1, hbone.connect_headers(("10.1.0.5", 8080), traceparent=TRACE))
    server.receive_data(client.data_to_send())  # stream 1 is open
    headers = hpack.Encoder().encode(hbone.connect_headers(("10.1.0.5", 8081), traceparent=TRACE))
    open_block = len(headers).to_bytes(3, "big") + b"\x01\x00" + (3).to_bytes(4, "big") + headers
    data = (5000).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big") + b"d" * 5000
    assert server.receive_data(open_block) == []  # stream 3's block is not complete yet
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(data)  # a separate read: the fast path sees this DATA first



# -- header blocks: CONTINUATION flood (CVE-2024-27316 and kin) ------------------------------------


def _settled() -> Conn:
    """A server `HboneConnection` past the preface and settings exchange."""
    client, server = _make(True, True), _make(True, False)
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    return server


def _goaway_code(wire: bytes) -> int | None:
    """The error code of the GOAWAY in `wire` (frames as a server wrote them), if any."""
    while len(wire) >= 9:
        length, kind = int.from_bytes(wire[:3], "big"), wire[3]
        if kind == 0x7:
            return int.from_bytes(wire[9 + 4 : 9 + 8], "big")
        wire = wire[9 + length :]
    return None


def test_a_header_block_longer_than_the_header_list_size_ends_the_connection() -> None:
    """h2 keeps a header block until END_HEADERS, up to 64 CONTINUATION frames of the frame size each:
    64 MiB per connection at HBONE's 1 MiB frames, held for as long as the peer likes. A block is
    refused as soon as it is longer than the header list size the connection advertises (with room
    for padding): GOAWAY ENHANCE_YOUR_CALM, at the frame that would take it past that."""
    server = _settled()
    headers = hpack.Encoder().encode(hbone.connect_headers(("10.1.0.5", 8080), traceparent=TRACE))
    assert server.receive_data(frame(0x1, 0x0, 1, headers)) == []  # HEADERS, no END_HEADERS
    server.data_to_send()
    junk = frame(0x9, 0x0, 1, b"\x00" * 16384)  # CONTINUATION, no END_HEADERS
    block = len(headers)
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        for _ in range(64):
            server.receive_data(junk)
            block += 16384
    assert block <= hbone.MAX_HEADER_BLOCK  # refused at the frame that would have passed the limit
    assert _goaway_code(server.data_to_send()) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_one_header_frame_over_the_limit_is_refused() -> None:
    """One HEADERS frame longer than the limit (the frame size allows up to 1 MiB) is refused whole,
    with or without END_HEADERS: it is not kept as the start of a block, nor HPACK-decoded."""
    for flags in (0x0, 0x4):
        server = _settled()
        with pytest.raises(h2.exceptions.DenialOfServiceError):
            server.receive_data(frame(0x1, flags, 1, b"\x00" * (hbone.MAX_HEADER_BLOCK + 1)))
        assert _goaway_code(server.data_to_send()) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_a_header_block_in_continuations_within_the_limit_still_opens_its_stream() -> None:
    server = _settled()
    headers = hpack.Encoder().encode(hbone.connect_headers(("10.1.0.5", 8080), traceparent=TRACE))
    wire = frame(0x1, 0x0, 1, headers[:10]) + frame(0x9, 0x0, 1, headers[10:20])
    events = server.receive_data(wire + frame(0x9, 0x4, 1, headers[20:]))
    assert [type(e).__name__ for e in events] == ["RequestReceived"]


# -- the deliberate difference: a graceful GOAWAY received drains (RFC 9113 §6.8) -------------------


def _goaway(code: int, last: int) -> bytes:
    return hyperframe.frame.GoAwayFrame(0, last_stream_id=last, error_code=code).serialize()


def _data(sid: int, payload: bytes, end: bool = False) -> bytes:
    return hyperframe.frame.DataFrame(sid, data=payload, flags=["END_STREAM"] if end else []).serialize()


def _open_stream_1(client: Conn, server: Conn) -> None:
    """Settle the settings, then open stream 1 and answer it 200."""
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    client.send_headers(1, hbone.connect_headers(("10.1.0.5", 8080)))
    server.receive_data(client.data_to_send())
    server.send_headers(1, hbone.response_headers(200))
    client.receive_data(server.data_to_send())


def _opened(fast: bool) -> tuple[Conn, Conn, int]:
    """A client and a server of that world with stream 1 open and answered."""
    client, server = _make(fast, True), _make(fast, False)
    _open_stream_1(client, server)
    return client, server, 1


def _plain_h2_client() -> tuple[Conn, int]:
    """The same exchange with h2's own H2Connection (no drain rule): the reference."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    hbone.apply_settings(client)
    hbone.start(client)
    _open_stream_1(client, _make(False, False))
    return client, 1


@pytest.mark.parametrize("fast", [True, False])
def test_a_graceful_goaway_leaves_the_streams_it_spares_going(fast: bool) -> None:
    client, _, sid = _opened(fast)
    reference, _ = _plain_h2_client()
    client.send_data(sid, b"queued before the GOAWAY arrived")
    reference.send_data(sid, b"queued before the GOAWAY arrived")
    (event,) = client.receive_data(_goaway(h2.errors.ErrorCodes.NO_ERROR, sid))
    (h2_event,) = reference.receive_data(_goaway(h2.errors.ErrorCodes.NO_ERROR, sid))
    assert _events([event]) == _events([h2_event])  # reported as h2 does
    # h2 stops dead: closed, what was queued dropped, the next DATA a connection error
    assert reference.state_machine.state is h2.connection.ConnectionState.CLOSED
    assert reference.data_to_send() == b""
    with pytest.raises(h2.exceptions.ProtocolError):
        reference.receive_data(_data(sid, b"last bytes", end=True))
    # draining: still open, what was queued is sent, the spared stream gets its bytes and its end
    assert client.state_machine.state is h2.connection.ConnectionState.CLIENT_OPEN
    assert b"queued before the GOAWAY arrived" in client.data_to_send()
    events = client.receive_data(_data(sid, b"last bytes", end=True))
    assert [type(e).__name__ for e in events] == ["DataReceived", "StreamEnded"]
    client.send_data(sid, b"ours", end_stream=True)
    assert client.data_to_send().endswith(b"ours")
    # but no new stream, and a later GOAWAY cannot raise the last stream ID again
    with pytest.raises(h2.exceptions.ProtocolError):
        client.send_headers(client.get_next_available_stream_id(), hbone.connect_headers(("10.1.0.5", 1)))
    assert isinstance(client, hbone.DrainingH2Connection) and client.peer_last_stream_id == sid
    client.receive_data(_goaway(h2.errors.ErrorCodes.NO_ERROR, 2**31 - 1))
    assert client.peer_last_stream_id == sid


@pytest.mark.parametrize("fast", [True, False])
def test_a_goaway_with_an_error_code_is_h2s(fast: bool) -> None:
    client, _, sid = _opened(fast)
    reference, _ = _plain_h2_client()
    for conn in (client, reference):
        conn.send_data(sid, b"dropped")
    seen = [
        _events(conn.receive_data(_goaway(h2.errors.ErrorCodes.INTERNAL_ERROR, sid)))
        for conn in (client, reference)
    ]
    assert seen[0] == seen[1]
    for conn in (client, reference):
        assert conn.state_machine.state is h2.connection.ConnectionState.CLOSED
        assert conn.data_to_send() == b""
        with pytest.raises(h2.exceptions.ProtocolError):
            conn.receive_data(_data(sid, b"late"))


@pytest.mark.parametrize("fast", [True, False])
def test_an_error_goaway_after_a_graceful_one_closes_as_h2(fast: bool) -> None:
    client, _, sid = _opened(fast)
    client.receive_data(_goaway(h2.errors.ErrorCodes.NO_ERROR, sid))
    client.receive_data(_goaway(h2.errors.ErrorCodes.PROTOCOL_ERROR, sid))
    assert client.state_machine.state is h2.connection.ConnectionState.CLOSED
