"""HBONE's CONNECT handling as a sans-IO core: request headers, their validation, responses, h2 settings.

HBONE (Istio ambient's tunnel) is an HTTP/2 ``CONNECT`` stream (RFC 9113 §8.5) inside mutual TLS 1.3 to
``<destination pod IP>:15008``. The client asks for ``:authority = <pod ip>:<port>`` and carries the
original client address in ``forwarded: for="<ip>:<port>"`` (RFC 7239 §6) and the W3C ``traceparent``.
The server answers 200, or 400 (bad request, or an authority whose IP is not the TLS connection's
destination IP), 401 (policy deny), 503 (upstream failed).

Nothing here touches a socket, ``ssl`` or ``asyncio``; the I/O layer is ``agent.proxy.tunnel``.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import h2.config
import h2.connection
import h2.settings
import hyperframe.frame

HBONE_PORT = 15008
ALPN_H2 = "h2"
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_STREAMS_PER_CONNECTION = 100
MAX_FRAME_SIZE = 1024 * 1024  # larger DATA frames: fewer frames (and Python calls) per byte on the hot path

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
    if src is not None:
        headers.append((b"forwarded", format_forwarded_for(src[0], src[1]).encode("ascii")))
    if traceparent is None or not is_valid_traceparent(traceparent):
        traceparent = new_traceparent()
    headers.append((b"traceparent", traceparent.encode("ascii")))
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


def new_h2_connection(
    *, client_side: bool, max_streams: int = MAX_STREAMS_PER_CONNECTION
) -> h2.connection.H2Connection:
    """An `H2Connection` with HBONE's settings: 4 MiB stream windows, a 16 MiB connection window.

    Call `start(conn)` to queue the preface, settings and the connection-level WINDOW_UPDATE.
    """
    config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    conn = h2.connection.H2Connection(config=config)
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: conn.DEFAULT_MAX_HEADER_LIST_SIZE,
        },
    )
    # replacing local_settings before the preface skips h2's ACK bookkeeping, so mirror the frame size
    conn.max_inbound_frame_size = MAX_FRAME_SIZE
    return conn


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
