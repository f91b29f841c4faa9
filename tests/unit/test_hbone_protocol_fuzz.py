"""Both ends of an HBONE connection under arbitrary frame sequences from an authenticated peer.

Whatever a peer with a mesh certificate sends (well-formed CONNECTs or answers, broken header
blocks, DATA on any stream, resets, window updates, settings, pushes, raw garbage), cut into reads
anywhere, and whatever the other side does with its streams (pipes, refuses, fails, returns early,
waits for ever), the protocol of either end:
- never lets an exception out of `data_received` or `connection_lost` (the TLS transport would end
  the connection on one, but only a bug raises);
- writes only whole, well-formed HTTP/2 frames;
- ends every stream's user (the server's handlers, the client's callers) once the connection is gone;
- gives back every byte it counted in the process-wide receive budget (`tunnel.RECEIVE_BUDGET`), so
  a peer cannot leave the node's budget smaller than it found it.

The server side faces a source workload's proxy (15008); the client side faces a destination node,
which could be compromised. The transport is faked (I/O only); the protocols, h2 and the frame
buffer are the real ones.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import hpack
import hyperframe.frame
import pytest
from h2frames import frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proxy import hbone
from agent.proxy.hbone import ConnectTarget, Status, canonical_ip, connect_headers
from agent.proxy.tunnel import (
    RECEIVE_BUDGET,
    HboneClient,
    HboneServer,
    ServerStream,
    Stream,
    TunnelError,
    _ClientProtocol,
    _H2Protocol,
    _ServerProtocol,
    accepted,
)
from api.spiffe import SpiffeId

TD = "cluster.local"
PEER = SpiffeId.for_workload(TD, "default", "client")
SERVER = SpiffeId.for_workload(TD, "default", "server")
LOCAL_IP = "10.0.0.2"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"  # fixed: examples must replay


class FakeTransport(asyncio.Transport):
    """Records what the protocol writes; closing reports the connection lost on the next loop turn,
    as `tls_transport.TlsTransport` does."""

    def __init__(self, proto: _H2Protocol) -> None:
        super().__init__()
        self.proto = proto
        self.out = bytearray()
        self.closing = False
        self.lost = False
        self.errors: list[BaseException] = []  # raised by connection_lost (run by the loop, not the test)

    def write(self, data: Any) -> None:
        assert not self.lost, "written after connection_lost"
        if not self.closing:
            self.out += bytes(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self._lose)

    def abort(self) -> None:
        self.close()

    def _lose(self) -> None:
        self.lost = True
        try:
            self.proto.connection_lost(None)
        except Exception as exc:
            self.errors.append(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


# ---- what the peer sends -------------------------------------------------------------------------
stream_ids = st.sampled_from([1, 1, 1, 1, 1, 3, 3, 0, 2, 5, 2**31 - 1])  # mostly the streams opened


@st.composite
def header_blocks(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Mostly CONNECTs to this node (some valid), some with headers no CONNECT may have."""
    port = draw(st.sampled_from([80, 8080, 1, 65535]))
    ip = draw(st.sampled_from([LOCAL_IP, LOCAL_IP, "10.0.0.9", "::1"]))
    connect = connect_headers((ip, port), ("10.0.0.1", 40000), traceparent=TRACE)
    block = [(bytes(k), bytes(v)) for k, v in connect]
    if draw(st.booleans()):
        extra = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(
                        [
                            b":method",
                            b":path",
                            b":scheme",
                            b":authority",
                            b"forwarded",
                            b"content-length",
                            b"te",
                            b"connection",
                            b"x-y",
                            b"Upper",
                        ]
                    ),
                    st.binary(max_size=24),
                ),
                max_size=3,
            )
        )
        block = draw(st.permutations(block + extra))
    return block


@st.composite
def answer_blocks(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """What a destination node answers a CONNECT with: mostly a status, some no HBONE server sends."""
    block = [(b":status", draw(st.sampled_from([b"200", b"200", b"401", b"503", b"100", b"abc", b""])))]
    if draw(st.booleans()):
        names = st.sampled_from([b"x-y", b":path", b":status", b"content-length", b"connection"])
        block += draw(st.lists(st.tuples(names, st.binary(max_size=8)), max_size=2))
    return block


@st.composite
def frames(draw: st.DrawFn, encoder: hpack.Encoder, client: bool = False) -> bytes:
    """One frame the peer sends (`client`: to a client, so header blocks are mostly answers)."""
    kind = draw(
        st.sampled_from(
            [
                "headers",
                "headers",
                "data",
                "data",
                "data",
                "continuation",
                "rst",
                "window",
                "priority",
                "settings",
                "ping",
                "goaway",
                "unknown",
                "garbage",
                "push",
            ]
        )
    )
    sid = draw(stream_ids)
    if kind == "headers":
        if draw(st.integers(0, 4)):
            block = encoder.encode(draw(answer_blocks() if client else header_blocks()))
        else:
            block = draw(st.binary(max_size=40))
        # END_HEADERS, END_STREAM, PADDED, PRIORITY
        flags = draw(st.sampled_from([0x4, 0x4, 0x5, 0x0, 0x1, 0xC, 0x24]))
        if flags & 0x8:
            block = bytes([3]) + block + b"\0\0\0"
        if flags & 0x20:
            block = b"\0\0\0\0\x10" + block
        return frame(0x1, flags, sid, block)
    if kind == "continuation":
        return frame(0x9, draw(st.sampled_from([0, 0x4])), sid, draw(st.binary(max_size=40)))
    if kind == "data":
        size = draw(st.sampled_from([0, 1, 100, 5000, 70000]))
        payload = bytes(size)
        flags = draw(st.sampled_from([0, 0, 0x1, 0x1, 0x8, 0x9]))  # END_STREAM, PADDED
        if flags & 0x8:
            pad = draw(st.integers(0, 20))
            payload = bytes([pad]) + payload + bytes(pad)
        return frame(0x0, flags, sid, payload)
    if kind == "rst":
        return frame(0x3, 0, sid, struct.pack(">L", draw(st.sampled_from([0, 1, 2, 7, 8, 99]))))
    if kind == "window":
        increment = draw(st.sampled_from([0, 1, 65535, 2**20, 2**31 - 1]))
        return frame(0x8, 0, sid, struct.pack(">L", increment))
    if kind == "priority":
        return frame(0x2, 0, sid, struct.pack(">LB", draw(st.sampled_from([0, 1, 3])), 16))
    if kind == "settings":
        if draw(st.booleans()):
            return frame(0x4, 0x1, 0, b"")  # ACK
        pairs = draw(
            st.lists(
                st.tuples(
                    st.sampled_from([1, 2, 3, 4, 5, 6, 8, 99]),
                    st.sampled_from([0, 1, 100, 16384, 65535, 2**24 - 1, 2**31 - 1, 2**31, 2**32 - 1]),
                ),
                max_size=3,
            )
        )
        return frame(
            0x4,
            0,
            sid if draw(st.integers(0, 5)) == 0 else 0,
            b"".join(struct.pack(">HL", k, v) for k, v in pairs),
        )
    if kind == "ping":
        return frame(0x6, draw(st.sampled_from([0, 1])), 0, draw(st.sampled_from([bytes(8), bytes(7)])))
    if kind == "goaway":
        last, code = draw(st.sampled_from([0, 1, 9])), draw(st.sampled_from([0, 2]))
        return frame(0x7, 0, 0, struct.pack(">LL", last, code))
    if kind == "push":  # PUSH_PROMISE: HBONE has no server push (and a server cannot push at all)
        block = encoder.encode(draw(header_blocks()))
        return frame(0x5, 0x4, sid, struct.pack(">L", draw(st.sampled_from([2, 4]))) + block)
    if kind == "unknown":
        return frame(0x42, draw(st.integers(0, 255)), sid, draw(st.binary(max_size=16)))
    return draw(st.binary(min_size=1, max_size=30))


@st.composite
def sessions(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """The bytes a peer sends (preface and SETTINGS first, mostly) and where the reads end."""
    encoder = hpack.Encoder()
    settings_frame = frame(0x4, 0, 0, b"")
    head = draw(st.sampled_from([PREFACE + settings_frame, PREFACE + settings_frame, PREFACE, b""]))
    if head and draw(st.booleans()):  # half of them open a valid stream first, then anything goes
        connect = connect_headers((LOCAL_IP, 8080), ("10.0.0.1", 40000), traceparent=TRACE)
        head += frame(0x1, 0x4, 1, encoder.encode(connect))
    body = b"".join(draw(st.lists(frames(encoder), min_size=1, max_size=14)))
    data = head + body
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))))
    return data, cuts


# ---- what the handler does -----------------------------------------------------------------------
async def pipe_back(stream: ServerStream) -> int | None:
    stream.respond(Status.OK)
    while chunk := await stream.read():
        await stream.write(chunk[:100])
    return None


async def refuse(stream: ServerStream) -> int | None:
    return int(Status.UNAUTHORIZED)


async def fail(stream: ServerStream) -> int | None:
    raise RuntimeError("handler bug")


async def answer_then_return(stream: ServerStream) -> int | None:
    """Answers 200 and returns without reading what the peer sends (a handler that gave up)."""
    stream.respond(Status.OK)
    await asyncio.sleep(0)
    return None


async def read_some(stream: ServerStream) -> int | None:
    stream.respond(Status.OK)
    await stream.read(10)
    return None


async def wait_for_ever(stream: ServerStream) -> int | None:
    await asyncio.Event().wait()
    return None


HANDLERS = [pipe_back, refuse, fail, answer_then_return, read_some, wait_for_ever]


async def _run(data: bytes, cuts: list[int], handler_index: int) -> None:
    baseline = RECEIVE_BUDGET.used
    handler = HANDLERS[handler_index]

    async def on_stream(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
        assert peer == PEER
        assert target.ip == canonical_ip(LOCAL_IP)
        return await handler(stream)

    async def no_identity(ip: Any) -> None:
        return None

    server = HboneServer(no_identity, on_stream, TD)
    proto = _ServerProtocol(server, canonical_ip(LOCAL_IP))
    proto._check_peer = lambda ssl_object: PEER  # type: ignore[method-assign]  # the TLS layer's part
    transport = FakeTransport(proto)
    proto.connection_made(transport)
    await _feed_then_hang_up(proto, transport, data, cuts)
    if proto.tasks:
        _done, pending = await asyncio.wait(set(proto.tasks), timeout=2)
        assert not pending, f"handlers still running after the connection ended: {pending}"
    _check_given_back(proto, baseline)
    _check_frames(bytes(transport.out))


async def _feed_then_hang_up(
    proto: _H2Protocol, transport: FakeTransport, data: bytes, cuts: list[int]
) -> None:
    """Hand `proto` the peer's bytes, one read per cut, letting the other side run in between; then
    the peer goes away (if `proto` has not closed the connection already)."""
    start = 0
    for end in [*cuts, len(data)]:
        if transport.closing:  # a closing transport reads no more (tls_transport.TlsTransport)
            break
        proto.data_received(data[start:end])
        start = end
        for _ in range(3):
            await asyncio.sleep(0)
    transport.close()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert transport.lost and not transport.errors, transport.errors
    assert proto.closed.done()


def _check_given_back(proto: _H2Protocol, baseline: int) -> None:
    assert proto.held == 0, f"{proto.held} bytes still counted for a closed connection"
    assert RECEIVE_BUDGET.used == baseline, f"receive budget off by {RECEIVE_BUDGET.used - baseline}"
    assert proto not in RECEIVE_BUDGET._conns


@st.composite
def client_sessions(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """What a destination node sends a client that opened streams 1 and 3 (its SETTINGS first, mostly)."""
    encoder = hpack.Encoder()
    head = draw(st.sampled_from([frame(0x4, 0, 0, b""), frame(0x4, 0, 0, b""), b""]))
    if head and draw(st.booleans()):  # half of them answer stream 1 first, then anything goes
        head += frame(0x1, 0x4, 1, encoder.encode([(b":status", b"200")]))
    body = b"".join(draw(st.lists(frames(encoder, client=True), min_size=1, max_size=14)))
    data = head + body
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))))
    return data, cuts


async def read_all(stream: Stream) -> None:
    await accepted(stream)
    while await stream.read():
        pass


async def send_then_close(stream: Stream) -> None:
    await accepted(stream)
    await stream.write(bytes(100_000))
    stream.close()


async def answer_only(stream: Stream) -> None:
    await accepted(stream)


async def give_up_at_once(stream: Stream) -> None:
    stream.close()


USERS = [read_all, send_then_close, answer_only, give_up_at_once]


async def _run_client(data: bytes, cuts: list[int], user_index: int) -> None:
    baseline = RECEIVE_BUDGET.used
    proto = _ClientProtocol(SERVER, max_streams=100)
    proto._check_peer = lambda ssl_object: SERVER  # type: ignore[method-assign]  # the TLS layer's part
    transport = FakeTransport(proto)
    proto.connection_made(transport)
    client = HboneClient(proto, (LOCAL_IP, 15008))
    user = USERS[user_index]
    streams = [
        client.start_stream((LOCAL_IP, port), ("10.0.0.1", 40000), traceparent=TRACE) for port in (80, 81)
    ]
    users = [asyncio.ensure_future(user(stream)) for stream in streams]
    await asyncio.sleep(0)
    await _feed_then_hang_up(proto, transport, data, cuts)
    done, pending = await asyncio.wait(users, timeout=2)
    assert not pending, f"stream users still waiting after the connection ended: {pending}"
    for task in done:  # each ends normally or with the tunnel's own errors, never a bug's
        exc = task.exception()
        assert exc is None or isinstance(exc, TunnelError | hbone.HboneError), repr(exc)
    _check_given_back(proto, baseline)
    out = bytes(transport.out)
    assert out.startswith(PREFACE)
    _check_frames(out[len(PREFACE) :])


def _check_frames(out: bytes) -> None:
    """What one end wrote parses as whole HTTP/2 frames."""
    pos = 0
    while pos < len(out):
        assert len(out) - pos >= 9, "a partial frame header"
        parsed, length = hyperframe.frame.Frame.parse_frame_header(memoryview(out[pos : pos + 9]))
        assert pos + 9 + length <= len(out), "a partial frame"
        parsed.parse_body(memoryview(out[pos + 9 : pos + 9 + length]))
        pos += 9 + length


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(session=sessions(), handler_index=st.integers(0, len(HANDLERS) - 1))
def test_arbitrary_frames_never_escape_leak_or_leave_handlers(
    session: tuple[bytes, list[int]], handler_index: int
) -> None:
    data, cuts = session
    asyncio.run(_run(data, cuts, handler_index))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(session=client_sessions(), user_index=st.integers(0, len(USERS) - 1))
def test_a_client_under_arbitrary_frames_never_escapes_leaks_or_leaves_callers_waiting(
    session: tuple[bytes, list[int]], user_index: int
) -> None:
    data, cuts = session
    asyncio.run(_run_client(data, cuts, user_index))


def test_a_stream_that_cannot_be_answered_fails_for_its_handler() -> None:
    """The peer's GOAWAY with an error code ends h2's side of the connection before the handler
    answers. The answer cannot be sent; the handler, which goes on to read the stream (as a pipe to
    the app does), must see the stream fail rather than wait on it for ever."""
    encoder = hpack.Encoder()
    block = encoder.encode(connect_headers((LOCAL_IP, 8080), ("10.0.0.1", 40000), traceparent=TRACE))
    data = (
        PREFACE
        + frame(0x4, 0, 0, b"")
        + frame(0x1, 0x4, 1, block)
        + frame(0x7, 0, 0, struct.pack(">LL", 0, 2))  # GOAWAY INTERNAL_ERROR
    )
    asyncio.run(_run(data, [], HANDLERS.index(pipe_back)))


@pytest.mark.parametrize("handler_index", range(len(HANDLERS)))
def test_data_after_a_connect_is_given_back_whatever_the_handler_does(handler_index: int) -> None:
    """A CONNECT, DATA with END_STREAM, more DATA on a second stream: every handler kind."""
    encoder = hpack.Encoder()
    block = encoder.encode(connect_headers((LOCAL_IP, 8080), ("10.0.0.1", 40000), traceparent=TRACE))
    block3 = encoder.encode(connect_headers((LOCAL_IP, 8080), ("10.0.0.1", 40001), traceparent=TRACE))
    data = (
        PREFACE
        + frame(0x4, 0, 0, b"")
        + frame(0x1, 0x4, 1, block)
        + frame(0x0, 0, 1, bytes(5000))
        + frame(0x0, 0x1, 1, bytes(3000))
        + frame(0x1, 0x4, 3, block3)
        + frame(0x0, 0, 3, bytes(70000))
    )
    asyncio.run(_run(data, [len(data) - 70009], handler_index))


def test_the_frame_writer_check_catches_a_partial_frame() -> None:
    with pytest.raises(AssertionError):
        _check_frames(frame(0x6, 0, 0, bytes(8))[:-1])
    _check_frames(frame(0x6, 0, 0, bytes(8)) + frame(0x4, 1, 0, b""))
