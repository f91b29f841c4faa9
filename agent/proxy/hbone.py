"""HBONE's CONNECT handling as a sans-IO core: request headers, their validation, responses, h2 settings.

HBONE (Istio ambient's tunnel) is an HTTP/2 ``CONNECT`` stream (RFC 9113 §8.5) inside mutual TLS 1.3 to
``<destination pod IP>:15008``. The client asks for ``:authority = <pod ip>:<port>`` and carries the
original client address in ``forwarded: for="<ip>:<port>"`` (RFC 7239 §6) and the W3C ``traceparent``.
The server answers 200, or 400 (bad request, or an authority whose IP is not the TLS connection's
destination IP), 401 (policy deny), 503 (upstream failed).

Nothing here touches a socket, ``ssl`` or ``asyncio``; the I/O layer is ``agent.proxy.tunnel``.
"""

from __future__ import annotations

import collections
import ipaddress
import re
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hpack
import hyperframe.exceptions
import hyperframe.frame

if TYPE_CHECKING:
    from h2._typing import Buffer  # the buffer-protocol type FrameBuffer.add_data is declared with
    from hpack.struct import HeaderWeaklyTyped

HBONE_PORT = 15008
ALPN_H2 = "h2"
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_STREAMS_PER_CONNECTION = 100
MAX_FRAME_SIZE = 1024 * 1024  # larger DATA frames: fewer frames (and Python calls) per byte on the hot path
MAX_HEADER_LIST_SIZE = 64 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE we advertise (h2's default)
# A header block (HEADERS or PUSH_PROMISE and its CONTINUATIONs, padding included) may be at most
# this long: HPACK never encodes a header list in more bytes than its RFC 9113 size counts (32 more
# per field), so beyond the advertised list size only padding (at most 256 bytes a frame), priority
# fields and table size updates fit in the 1 KiB on top.
MAX_HEADER_BLOCK = MAX_HEADER_LIST_SIZE + 1024

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Header = tuple[bytes, bytes]
HeaderInput = Iterable[tuple[bytes | str, bytes | str]]

_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")


class Status(IntEnum):
    """The response codes an HBONE server sends, as ztunnel does."""

    OK = 200
    BAD_REQUEST = 400
    UNAUTHORIZED = 401  # policy deny
    SERVICE_UNAVAILABLE = 503  # upstream connect failed


class HboneError(Exception):
    """A CONNECT that did not succeed, with the HTTP status the server sent (or will send) and why.

    `validate_connect` *returns* one (a decision as a value); the client layer raises one when the
    server answered something other than 200.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HBONE CONNECT failed: status={status} reason={reason}")
        self.status = status
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HboneError) and (self.status, self.reason) == (other.status, other.reason)

    def __hash__(self) -> int:
        return hash((self.status, self.reason))


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    """A validated CONNECT request: where to connect, who the original client was, the trace context."""

    ip: IpAddress
    port: int
    forwarded_for: tuple[IpAddress, int | None] | None
    traceparent: str
    baggage: str | None = None

    @property
    def authority(self) -> str:
        return format_hostport(self.ip, self.port)


# --- addresses ---------------------------------------------------------------------------------------


def canonical_ip(value: str | IpAddress) -> IpAddress:
    """Parse an IP; an IPv4-mapped IPv6 address (as a dual-stack socket reports it) becomes IPv4."""
    ip = value if not isinstance(value, str) else ipaddress.ip_address(value)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def format_hostport(ip: str | IpAddress, port: int) -> str:
    """`ip:port`, with IPv6 in brackets (RFC 3986 authority / RFC 7239 node syntax)."""
    addr = canonical_ip(ip)
    host = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"{host}:{port}"


def parse_hostport(text: str, *, port_required: bool = True) -> tuple[IpAddress, int | None]:
    """Parse `1.2.3.4:80` or `[::1]:80` (an IP literal only: HBONE never names hosts).

    Raises ValueError with the reason on anything else.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        ip = ipaddress.ip_address(host)
        if ip.version != 6:
            raise ValueError(f"brackets around a non-IPv6 address in {text!r}")
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"junk after ']' in {text!r}")
    else:
        host, sep, port_part = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        else:
            port_text = port_part
        if ":" in host:
            raise ValueError(f"IPv6 address without brackets in {text!r}")
        ip = ipaddress.IPv4Address(host)
    if port_text is None:
        if port_required:
            raise ValueError(f"no port in {text!r}")
        return canonical_ip(ip), None
    if not _PORT_RE.match(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {text!r}")
    return canonical_ip(ip), int(port_text)


# --- Forwarded (RFC 7239) ----------------------------------------------------------------------------


def format_forwarded_for(ip: str | IpAddress, port: int | None = None) -> str:
    """`for="<ip>:<port>"`: RFC 7239 §6 — a node with a port (or an IPv6) is not a token, so it is quoted."""
    addr = canonical_ip(ip)
    if port is None:
        node = f"[{addr}]" if addr.version == 6 else str(addr)
        return f'for="{node}"' if addr.version == 6 else f"for={node}"
    return f'for="{format_hostport(addr, port)}"'


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise ValueError(f"unterminated quoted-string in {text!r}")
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_forwarded_for(value: str) -> tuple[IpAddress, int | None] | None:
    """The first element's `for=` node of a Forwarded header (the original client), or None.

    Obfuscated identifiers (`_hidden`) and `unknown` give None; a malformed header raises ValueError.
    """
    for element in _split_outside_quotes(value, ","):
        for pair in _split_outside_quotes(element, ";"):
            name, eq, raw = pair.strip().partition("=")
            if not eq:
                if pair.strip():
                    raise ValueError(f"forwarded pair without '=': {pair.strip()!r}")
                continue
            if name.strip().lower() != "for":
                continue
            node = _unquote(raw.strip())
            if node == "unknown" or node.startswith("_"):
                return None
            return parse_hostport(node, port_required=False)
        # only the first element names the original client
        break
    return None


# --- traceparent (W3C Trace Context) -----------------------------------------------------------------


def new_traceparent() -> str:
    """A fresh, sampled W3C traceparent: `00-<32 hex trace id>-<16 hex parent id>-01`."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def is_valid_traceparent(value: str) -> bool:
    """Trace Context §3.2: version `ff` is invalid; all-zero trace or parent ids are invalid."""
    m = _TRACEPARENT_RE.match(value)
    if m is None:
        return False
    version, trace_id, parent_id, _flags = m.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return False
    return not (version == "00" and len(value) != 55)


# --- client side -------------------------------------------------------------------------------------


def connect_headers(
    dst: tuple[str | IpAddress, int],
    src: tuple[str | IpAddress, int] | None = None,
    *,
    traceparent: str | None = None,
    baggage: str | None = None,
) -> list[Header]:
    """The header block of an HBONE CONNECT (RFC 9113 §8.5: no :scheme, no :path).

    A missing or invalid traceparent starts a new trace.
    """
    ip, port = dst
    if not 0 < port < 65536:
        raise ValueError(f"bad destination port {port}")
    headers: list[Header] = [
        (b":method", b"CONNECT"),
        (b":authority", format_hostport(ip, port).encode("ascii")),
    ]
    # values unique to a connection go out never indexed: in HPACK's dynamic table they would only
    # evict the entries a next CONNECT could reuse (and adding them cost the encoder more than the rest)
    if src is not None:
        forwarded = format_forwarded_for(src[0], src[1]).encode("ascii")
        headers.append(hpack.NeverIndexedHeaderTuple(b"forwarded", forwarded))
    if traceparent is None or not is_valid_traceparent(traceparent):
        traceparent = new_traceparent()
    headers.append(hpack.NeverIndexedHeaderTuple(b"traceparent", traceparent.encode("ascii")))
    if baggage:
        headers.append((b"baggage", baggage.encode("ascii")))
    return headers


def response_status(headers: HeaderInput) -> int:
    """The `:status` of a response header block; ValueError when absent or not a number."""
    for name, value in headers:
        if _text(name) == ":status":
            text = _text(value)
            if not text.isdigit():
                raise ValueError(f"bad :status {text!r}")
            return int(text)
    raise ValueError("response without :status")


# --- server side -------------------------------------------------------------------------------------


def response_headers(status: int) -> list[Header]:
    return [(b":status", str(int(status)).encode("ascii"))]


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def validate_connect(headers: HeaderInput, tls_dst_ip: str | IpAddress) -> ConnectTarget | HboneError:
    """Check an inbound request header block against what HBONE allows (as ztunnel's inbound does).

    `tls_dst_ip` is the local address the TLS connection was accepted on: the authority must name that
    same IP, so a peer cannot use one pod's certificate to reach another pod. Returns the target or an
    `HboneError` carrying the status to answer (400 for anything malformed).
    """
    pseudo: dict[str, str] = {}
    regular: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name, value = _text(raw_name), _text(raw_value)
        if name.startswith(":"):
            if name in pseudo:
                return HboneError(Status.BAD_REQUEST, f"duplicate pseudo-header {name}")
            pseudo[name] = value
        elif name not in regular:  # first occurrence wins (forwarded's first element is the client)
            regular[name] = value
    method = pseudo.get(":method")
    if method != "CONNECT":
        return HboneError(Status.BAD_REQUEST, f"method {method!r} is not CONNECT")
    for forbidden in (":path", ":scheme", ":protocol"):
        if forbidden in pseudo:
            return HboneError(Status.BAD_REQUEST, f"{forbidden} not allowed on CONNECT")
    authority = pseudo.get(":authority")
    if not authority:
        return HboneError(Status.BAD_REQUEST, "CONNECT without :authority")
    try:
        ip, port = parse_hostport(authority)
    except ValueError as exc:
        return HboneError(Status.BAD_REQUEST, f"malformed authority {authority!r}: {exc}")
    assert port is not None
    try:
        local = canonical_ip(tls_dst_ip)
    except ValueError:
        return HboneError(Status.BAD_REQUEST, f"bad TLS destination {tls_dst_ip!r}")
    if ip != local:
        return HboneError(Status.BAD_REQUEST, f"authority {authority} is not the TLS destination {local}")
    forwarded_for = None
    if "forwarded" in regular:
        try:
            forwarded_for = parse_forwarded_for(regular["forwarded"])
        except ValueError as exc:
            return HboneError(Status.BAD_REQUEST, f"malformed forwarded header: {exc}")
    traceparent = regular.get("traceparent", "")
    if not is_valid_traceparent(traceparent):
        traceparent = new_traceparent()
    return ConnectTarget(
        ip=ip,
        port=port,
        forwarded_for=forwarded_for,
        traceparent=traceparent,
        baggage=regular.get("baggage"),
    )


# --- the HTTP/2 connection ---------------------------------------------------------------------------

_REPR_BYTES = 11  # hyperframe shows 10 bytes of a body in hex, then "..." when there are more


def _data_frame_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    """`DataFrame`'s body repr from its first bytes: the same text as hyperframe's, in O(1).

    h2's `_receive_frame` formats `repr(frame)` for its trace log before the (no-op) logger is called,
    and hyperframe's fallback repr serializes the whole body (a copy) and hex-encodes all of it, only
    to keep 20 hex digits: a quarter of the receiving proxy's CPU at bulk rates (py-spy, bench_l4).
    """
    head = (frame.serialize_padding_data() + bytes(frame.data[:_REPR_BYTES]) + b"\0" * frame.pad_length)[
        :_REPR_BYTES
    ]
    if not head:
        return "None"
    text = head.hex()
    return f"<hex:{text[:20]}...>" if len(text) > 20 else f"<hex:{text}>"


hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


_CLIENT_OPEN = h2.connection.ConnectionState.CLIENT_OPEN  # compared with `is`: Enum's hash is Python code
_SERVER_OPEN = h2.connection.ConnectionState.SERVER_OPEN
_CAN_SEND = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE})
_CAN_RECEIVE = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})
_INCOMPLETE = (0, -1)  # plain_data_head: wait for more bytes
_HEADER_BLOCK_FRAMES = frozenset(
    {hyperframe.frame.HeadersFrame, hyperframe.frame.PushPromiseFrame, hyperframe.frame.ContinuationFrame}
)
_FRAME_HEADER = struct.Struct(">HBBBL")  # RFC 9113 §4.1: 24-bit length, type, flags, stream id
BY_REFERENCE = 4096  # DATA payloads from this size on are queued as the caller's object


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer (same frames, same errors) that copies a payload at most once.

    h2 appends every received chunk to one bytearray, slices each frame out of it and copies the
    body to bytes: three copies per payload byte, a third of the receiving proxy's user-space copying
    at bulk rates (perf, bench_l4). Here received chunks are kept as they came: `bytes` for as long
    as needed, any other buffer (the TLS transport hands views of a decrypt buffer it reuses once
    nobody refers to it) only during `receive_data`, which copies what is left of it at the end
    (`settle`: at most the start of one frame). A frame inside one chunk is parsed from a view of it,
    a frame split across chunks is joined once, except a plain DATA payload (below).
    `HboneConnection.receive_data` takes a plain DATA payload of `BY_REFERENCE` bytes or more as
    that view, or as views of each chunk it spans (`take_payload`, an event per piece); the stream
    copies whatever it queues instead of handing on at once, so a queued payload never keeps a whole
    received chunk alive. Everything else is parsed by hyperframe as h2 does (which copies what it
    keeps).
    """

    def __init__(self, server: bool) -> None:
        super().__init__(server=server)
        self._parts: collections.deque[memoryview] = collections.deque()
        self._size = 0  # bytes in _parts

    def add_data(self, data: Buffer) -> None:
        """Buffer `data` by reference: bytes as they are; any other buffer only until `settle()`."""
        view = memoryview(data)
        if self._preamble_len:
            take = min(self._preamble_len, len(view))
            if self._preamble[:take] != view[:take]:
                raise h2.exceptions.ProtocolError("Invalid HTTP/2 preamble.")
            view = view[take:]
            self._preamble_len -= take
            self._preamble = self._preamble[take:]
        if view:
            self._parts.append(view)
            self._size += len(view)

    def settle(self) -> None:
        """Copy what is still buffered from chunks that are not `bytes` (their owner may reuse them once
        `receive_data` returned; what is left is at most the start of one frame)."""
        parts = self._parts
        if parts and any(type(p.obj) is not bytes for p in parts):  # usually empty: no generator
            self._parts = collections.deque(
                p if type(p.obj) is bytes else memoryview(p.tobytes()) for p in parts
            )

    def _take(self, n: int) -> memoryview:
        """The next `n` buffered bytes: a view when they lie in one chunk, else joined once."""
        first = self._parts[0]
        if len(first) >= n:
            if len(first) == n:
                self._parts.popleft()
            else:
                self._parts[0] = first[n:]
            self._size -= n
            return first[:n]
        return memoryview(b"".join(self._take_views(n)))

    def _take_views(self, n: int) -> list[memoryview]:
        """The next `n` buffered bytes as views of the chunks they lie in, in order."""
        views: list[memoryview] = []
        need = n
        while need:
            part = self._parts.popleft()
            if len(part) > need:
                self._parts.appendleft(part[need:])
                part = part[:need]
            views.append(part)
            need -= len(part)
        self._size -= n
        return views

    def _peek_header(self) -> memoryview:
        first = self._parts[0]
        if len(first) >= 9:
            return first[:9]
        head = bytearray()
        for part in self._parts:
            head += part[: 9 - len(head)]
            if len(head) == 9:
                break
        return memoryview(head)

    def plain_data_head(self) -> tuple[int, int] | None:
        """(stream id, length) when a whole DATA frame without flags is next (and no header block
        awaits its CONTINUATION); (0, -1) when the next frame (of any type, not over the size limit)
        has not fully arrived; None for anything else (h2's path)."""
        if self._size < 9:
            return _INCOMPLETE
        length_hi, length_lo, frame_type, flags, stream_id = _FRAME_HEADER.unpack(self._peek_header())
        length = (length_hi << 8) + length_lo
        if length > self.max_frame_size:
            return None  # h2's path raises FrameTooLargeError
        if self._size < 9 + length:
            return _INCOMPLETE
        if frame_type or flags or self._headers_buffer:  # inside a header block h2 refuses DATA
            return None
        return stream_id & 0x7FFFFFFF, length

    def take_payload(self, length: int) -> bytes | memoryview | list[bytes | memoryview]:
        """Consume the frame `plain_data_head` described; its payload: a view from BY_REFERENCE bytes,
        else bytes. A payload of BY_REFERENCE bytes or more split across received chunks comes as a
        list of pieces in order instead of being joined (a sender's 256 KiB frames rarely line up with
        the receiver's reads: joining them copied every byte once more), views of the chunks, with
        runs of pieces under BY_REFERENCE bytes joined."""
        first = self._parts[0]
        if len(first) >= 9 + length or length < BY_REFERENCE:
            body = self._take(9 + length)[9:]
            return body if length >= BY_REFERENCE else body.tobytes()
        self._take(9)
        pieces: list[bytes | memoryview] = []
        small: list[memoryview] = []
        for part in self._take_views(length):
            if len(part) >= BY_REFERENCE:
                if small:
                    pieces.append(b"".join(small))
                    small = []
                pieces.append(part)
            else:
                small.append(part)
        if small:
            pieces.append(b"".join(small))
        return pieces

    def _check_header_block(self, frame: hyperframe.frame.Frame, length: int) -> None:
        """Refuse a header block that grows past `MAX_HEADER_BLOCK`, at the frame that would take it
        there (before it is parsed and kept; what waits in the buffer is at most one frame, as for
        any frame). h2 keeps a block until END_HEADERS, up to 64 CONTINUATIONs of the frame size
        each: 64 MiB per connection at our 1 MiB frames, for as long as the peer likes (the
        CONTINUATION flood, CVE-2024-27316 and kin)."""
        block = length
        if type(frame) is hyperframe.frame.ContinuationFrame:
            block += sum(len(f.data) for f in self._headers_buffer)  # (h2 refuses one outside a block)
        if block > MAX_HEADER_BLOCK:
            raise h2.exceptions.DenialOfServiceError(
                f"header block of {block} bytes or more, over {MAX_HEADER_BLOCK}"
            )

    def __next__(self) -> hyperframe.frame.Frame:
        while True:
            if self._size < 9:
                raise StopIteration
            try:
                frame, length = hyperframe.frame.Frame.parse_frame_header(self._peek_header())
            except (hyperframe.exceptions.InvalidDataError, hyperframe.exceptions.InvalidFrameError) as err:
                raise h2.exceptions.ProtocolError(f"Received frame with invalid header: {err!s}") from err
            self._validate_frame_length(length)  # before buffering it: an overlong frame fails at once
            if type(frame) in _HEADER_BLOCK_FRAMES:
                self._check_header_block(frame, length)
            if self._size < 9 + length:
                raise StopIteration
            try:
                frame.parse_body(self._take(9 + length)[9:])
            except hyperframe.exceptions.InvalidDataError as err:
                raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from err
            except hyperframe.exceptions.InvalidFrameError as err:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from err
            new_frame = self._update_header_buffer(frame)
            if new_frame is not None:
                return new_frame


class DrainingH2Connection(h2.connection.H2Connection):
    """`H2Connection` that drains on a graceful GOAWAY (NO_ERROR) instead of stopping dead.

    RFC 9113 §6.8: the streams up to the GOAWAY's last stream ID may still complete; ztunnel and other
    Rust h2 peers shut down this way (GOAWAY, then the last bytes of the streams they keep). h2 4.4
    moves the connection to CLOSED on any received GOAWAY and drops what waits to be sent, so the next
    frame of such a stream would be answered with GOAWAY PROTOCOL_ERROR. Here a graceful GOAWAY only
    forbids new streams (`send_headers` on a new stream raises ProtocolError); which streams to fail
    is the caller's choice (`ConnectionTerminated.last_stream_id`, as h2 reports it). A GOAWAY with an
    error code is h2's. Kept apart from the fast path so tests/unit/test_hbone_fastpath.py can use it
    as its plain-h2 oracle."""

    # the last stream ID of the peer's graceful GOAWAY (None: none received); it may only go down
    peer_last_stream_id: int | None = None

    def _receive_goaway_frame(
        self, frame: hyperframe.frame.GoAwayFrame
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        state = self.state_machine.state
        if frame.error_code != h2.errors.ErrorCodes.NO_ERROR or (
            state is not _CLIENT_OPEN and state is not _SERVER_OPEN
        ):
            return super()._receive_goaway_frame(frame)
        last = frame.last_stream_id
        if self.peer_last_stream_id is not None:
            last = min(last, self.peer_last_stream_id)
        self.peer_last_stream_id = last
        event = h2.events.ConnectionTerminated()  # as h2 reports it, without the state change
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def send_headers(
        self,
        stream_id: int,
        headers: Iterable[HeaderWeaklyTyped],
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
    ) -> None:
        if self.peer_last_stream_id is not None and stream_id not in self.streams:
            raise h2.exceptions.ProtocolError("the peer sent GOAWAY: no new streams on this connection")
        super().send_headers(
            stream_id, headers, end_stream, priority_weight, priority_depends_on, priority_exclusive
        )


class HboneConnection(DrainingH2Connection):
    """`H2Connection` with a fast path for plain DATA frames, whose larger payloads leave it by
    reference.

    h2 copies a DATA payload three times before `data_to_send()` returns it (frame body, header +
    body, output buffer) and `data_to_send()` a fourth: at bulk rates those copies were a sixth of the
    sending proxy's CPU (py-spy, bench_l4). Here `send_data` queues a payload of `BY_REFERENCE` bytes
    or more as the object the caller passed, after its 9-byte frame header; `buffers_to_send()`
    returns the queue in wire order. Everything else (state, other frames) is h2's own.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._buffers: list[bytes] = []
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)

    # -- the DATA fast path ------------------------------------------------------------------------
    # A DATA frame on an open stream (no END_STREAM, no padding) changes nothing in h2's state machines
    # (those transitions keep the state and, for receiving, only check that headers came first); what
    # it changes is the flow-control windows. send_data, receive_data and acknowledge_received_data do
    # exactly that for such frames (and local_flow_control_window skips h2's stream lookup) and hand
    # everything else to h2: per frame, h2's generic path (state-machine lookups keyed by Enum, frame
    # objects, flag sets, logging calls) cost more than the rest of a proxy hop at 1,000 req/s.
    # tests/unit/test_hbone_fastpath.py drives this class and plain h2 through the same random
    # exchanges and compares bytes, events, exceptions and window bookkeeping after every step.

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: int | None = None,
    ) -> None:
        stream = self.streams.get(stream_id)
        size = len(data)
        if (
            stream is None
            or end_stream
            or pad_length is not None
            or not size
            or (self.state_machine.state is not _CLIENT_OPEN and self.state_machine.state is not _SERVER_OPEN)
            or stream.state_machine.state not in _CAN_SEND
            or size > self.outbound_flow_control_window
            or size > stream.outbound_flow_control_window
            or size > self.max_outbound_frame_size
        ):
            super().send_data(stream_id, data, end_stream, pad_length)  # h2 decides (and raises)
            return
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        header = _FRAME_HEADER.pack(size >> 8, size & 0xFF, 0, 0, stream_id)
        if size >= BY_REFERENCE:
            if self._data_to_send:
                self._buffers.append(bytes(self._data_to_send))
                self._data_to_send = bytearray()
            self._buffers.append(header)
            self._buffers.append(data)  # type: ignore[arg-type]  # a buffer, written as is
        else:
            self._data_to_send += header
            self._data_to_send += data

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or not stream.open or acknowledged_size < 0:
            super().acknowledge_received_data(acknowledged_size, stream_id)  # h2 decides (and raises)
            return
        # h2's: both windows take the bytes back; a WINDOW_UPDATE only once half a window is owed
        conn_increment = self._inbound_flow_control_window_manager.process_bytes(acknowledged_size)
        stream_increment = stream._inbound_window_manager.process_bytes(acknowledged_size)
        if conn_increment or stream_increment:
            frames: list[hyperframe.frame.Frame] = []
            if conn_increment:
                frames.append(hyperframe.frame.WindowUpdateFrame(0, window_increment=conn_increment))
            if stream_increment:
                frames.append(
                    hyperframe.frame.WindowUpdateFrame(stream_id, window_increment=stream_increment)
                )
            self._prepare_for_sending(frames)

    def local_flow_control_window(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        if stream is None:
            return super().local_flow_control_window(stream_id)  # raises as h2 does
        return min(self.outbound_flow_control_window, stream.outbound_flow_control_window)

    def receive_data(self, data: Buffer) -> list[h2.events.Event]:
        """h2's `receive_data`, with a lane for DATA frames that need no frame object (see above)."""
        buf = self.incoming_buffer
        assert isinstance(buf, _FrameBuffer)
        buf.add_data(data)
        buf.max_frame_size = self.max_inbound_frame_size
        events: list[h2.events.Event] = []
        try:
            while True:
                head = buf.plain_data_head()
                if head is _INCOMPLETE:
                    break
                if head is not None:
                    stream_id, size = head
                    stream = self.streams.get(stream_id)
                    if stream is not None and self._can_receive_plain(stream):
                        payload = buf.take_payload(size)
                        if type(payload) is list:
                            events.extend(self._received_plain_pieces(stream, stream_id, payload, size))
                        else:
                            events.append(self._received_plain(stream, stream_id, payload, size))  # type: ignore[arg-type]
                        continue
                frame = next(buf, None)
                if frame is None:
                    break
                events.extend(self._receive_frame(frame))
        except hyperframe.exceptions.InvalidPaddingError as exc:  # as h2's receive_data
            self._terminate_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            raise h2.exceptions.ProtocolError("Received frame with invalid padding.") from exc
        except h2.exceptions.ProtocolError as exc:
            self._terminate_connection(exc.error_code)
            raise
        buf.settle()
        return events

    def _can_receive_plain(self, stream: h2.stream.H2Stream) -> bool:
        state = self.state_machine.state
        return (
            (state is _CLIENT_OPEN or state is _SERVER_OPEN)
            and stream.state_machine.state in _CAN_RECEIVE
            and bool(stream.state_machine.headers_received)
            and stream._expected_content_length is None
        )

    def _received_plain(
        self, stream: h2.stream.H2Stream, stream_id: int, payload: bytes | memoryview, size: int
    ) -> h2.events.DataReceived:
        # h2's order: the connection window first, then the stream's (each raises FlowControlError,
        # a ProtocolError that receive_data turns into GOAWAY)
        self._inbound_flow_control_window_manager.window_consumed(size)
        stream._inbound_window_manager.window_consumed(size)
        event = h2.events.DataReceived(stream_id=stream_id)
        event.data = payload  # type: ignore[assignment]  # read as a buffer downstream
        event.flow_controlled_length = size
        return event

    def _received_plain_pieces(
        self, stream: h2.stream.H2Stream, stream_id: int, pieces: list[bytes | memoryview], size: int
    ) -> list[h2.events.DataReceived]:
        """One frame's payload in pieces: the windows take the frame once, an event per piece."""
        self._inbound_flow_control_window_manager.window_consumed(size)
        stream._inbound_window_manager.window_consumed(size)
        events = []
        for piece in pieces:
            event = h2.events.DataReceived(stream_id=stream_id)
            event.data = piece  # type: ignore[assignment]
            event.flow_controlled_length = len(piece)
            events.append(event)
        return events

    def buffers_to_send(self) -> list[bytes]:
        """What to write, in order (frame headers, payloads, runs of other frames); empties the queue."""
        if self._data_to_send:
            self._buffers.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        out, self._buffers = self._buffers, []
        return out

    def data_to_send(self, amount: int | None = None) -> bytes:
        if self._buffers:
            self._data_to_send = bytearray(b"".join(self.buffers_to_send()))
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        self._buffers.clear()
        super().clear_outbound_data_buffer()


def new_h2_connection(*, client_side: bool, max_streams: int = MAX_STREAMS_PER_CONNECTION) -> HboneConnection:
    """An `HboneConnection` with HBONE's settings: 4 MiB stream windows, a 16 MiB connection window.

    Call `start(conn)` to queue the preface, settings and the connection-level WINDOW_UPDATE.
    """
    config = h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        # every header block the proxy sends is built here (connect_headers, response_headers):
        # checking and normalising it again cost a tenth of sending a CONNECT; received blocks are
        # still validated
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = HboneConnection(config)
    apply_settings(conn, max_streams=max_streams)
    return conn


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: hpack's Huffman coder is pure Python, about a fifth of the cost
    of sending a CONNECT and of receiving it on the other node, to save ~40 bytes per header block."""

    def encode(
        self,
        headers: Iterable[
            hpack.HeaderTuple | tuple[bytes | str, bytes | str] | tuple[bytes | str, bytes | str, bool | None]
        ]
        | dict[bytes | str, bytes | str],
        huffman: bool = False,
    ) -> bytes:
        return super().encode(headers, huffman=huffman)


def apply_settings(
    conn: h2.connection.H2Connection, *, max_streams: int = MAX_STREAMS_PER_CONNECTION
) -> None:
    """HBONE's local settings and header encoding on a connection that has not started (plain h2 too:
    tests compare)."""
    conn.encoder = _PlainEncoder()
    conn.local_settings = h2.settings.Settings(
        client=conn.config.client_side,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        },
    )
    # replacing local_settings before the preface skips h2's ACK bookkeeping, so mirror the frame size
    conn.max_inbound_frame_size = MAX_FRAME_SIZE


def start(conn: h2.connection.H2Connection) -> None:
    """Queue the connection preface and raise the connection window to 16 MiB (RFC 9113 §6.9.2)."""
    conn.initiate_connection()
    increment = CONNECTION_WINDOW - conn.inbound_flow_control_window
    if increment > 0:
        conn.increment_flow_control_window(increment)


def header_list(headers: Sequence[tuple[bytes | str, bytes | str]]) -> list[Header]:
    """Normalise a header block to bytes pairs (h2 hands bytes with `header_encoding=None`)."""
    return [
        (
            n if isinstance(n, bytes) else n.encode("latin-1"),
            v if isinstance(v, bytes) else v.encode("latin-1"),
        )
        for n, v in headers
    ]
