"""Source-IP preservation: the app sees the peer's address, not its own pod IP.

The inbound proxy connects to the app from inside the pod's netns. Without more, that connection
comes from the pod's own IP. With it, the proxy's socket is transparent (``IP_TRANSPARENT``), bound
to the peer's IP and marked (``SO_MARK = MARK``); the app's answers, addressed to that foreign IP,
must come back over ``lo`` to the proxy rather than leave through ``eth0``. Three things in the pod
netns make them do so, as ztunnel's in-pod mode does with iptables, here without iptables:

- ``net.ipv4.tcp_fwmark_accept = 1``: a socket the app accepts takes the mark of the SYN that
  opened it, so every packet it sends (the SYN-ACK included) carries ``MARK``;
- an ip rule ``fwmark MARK/MASK lookup TABLE`` (priority ``RULE_PRIORITY``);
- in ``TABLE`` the one route ``local 0.0.0.0/0 dev lo``: marked packets are delivered on this host;
- ``net.ipv4.fwmark_reflect = 1``: what the kernel answers without a socket (the RST of a closed
  port, an ICMP error) carries the mark of the packet it answers, so it too comes back over ``lo``.
  Without it the RST for the proxy's SYN to a closed app port went out through ``eth0`` to the real
  caller, and the proxy retried its SYN until its connect timeout (5 s, a slot held) instead of
  failing at once.

Unmarked traffic is untouched: packets from ``eth0`` carry no mark (it is cleared when a packet
crosses into another netns), and nothing else in the pod sets ``MARK``.

These functions act on the netns of the calling thread: run them inside
:func:`agent.datapath.netns.in_netns`, on a worker thread. ``install`` and ``remove`` are
idempotent. The rule is the record of ownership: where it is present, nodemesh set the sysctls,
and ``remove`` sets them back to 0.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pyroute2 import IPRoute

MARK: Final = 0x4E4D  # "NM"
MASK: Final = 0xFFFF
TABLE: Final = 20045  # = MARK
RULE_PRIORITY: Final = 100  # before "main" (32766); the mark is ours alone, so early is safe
FWMARK_ACCEPT: Final = Path("/proc/sys/net/ipv4/tcp_fwmark_accept")  # resolved per thread netns
FWMARK_REFLECT: Final = Path("/proc/sys/net/ipv4/fwmark_reflect")  # likewise
IP_TRANSPARENT: Final = getattr(socket, "IP_TRANSPARENT", 19)
IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_ROUTE: Final[dict[str, object]] = {
    "dst": "0.0.0.0/0",
    "type": "local",
    "scope": "host",
    "table": TABLE,
    "family": socket.AF_INET,
}
_RULE: Final[dict[str, object]] = {
    "family": socket.AF_INET,
    "table": TABLE,
    "fwmark": MARK,
    "fwmask": MASK,
    "priority": RULE_PRIORITY,
}


def install() -> None:
    """Set up the calling thread's netns for transparent connections to its apps."""
    with _iproute() as ipr:
        _tolerate(errno.EEXIST, lambda: ipr.route("add", oif=_lo(ipr), **_ROUTE))
        if not _has_rule(ipr):
            _tolerate(errno.EEXIST, lambda: ipr.rule("add", **_RULE))
    FWMARK_ACCEPT.write_text("1")
    FWMARK_REFLECT.write_text("1")


def remove() -> bool:
    """Undo `install` in the calling thread's netns; False when it was not installed there (the
    sysctl is then left alone; a route in our table, left by a half-done install, still goes)."""
    with _iproute() as ipr:
        owned = _has_rule(ipr)
        if owned:
            _tolerate(errno.ENOENT, lambda: ipr.rule("del", **_RULE))
        _tolerate(errno.ESRCH, lambda: ipr.route("del", oif=_lo(ipr), **_ROUTE))
    if owned:
        FWMARK_ACCEPT.write_text("0")
        FWMARK_REFLECT.write_text("0")
    return owned


def installed() -> bool:
    """Whether the rule, the route and the sysctl are all in place in the calling thread's netns."""
    with _iproute() as ipr:
        if not _has_rule(ipr):
            return False
        routes = ipr.get_routes(family=socket.AF_INET, table=TABLE)
    return bool(routes) and all(p.read_text().strip() == "1" for p in (FWMARK_ACCEPT, FWMARK_REFLECT))


def transparent(sock: socket.socket, source_ip: str) -> None:
    """Make an unconnected socket of a set-up pod netns connect from `source_ip` (any port).

    Bound to `lo` as well: the kernel then reports `lo` as the ingress device of the connection's
    packets to the app, which is how the pod's sk_lookup program tells the proxy's own connections
    from traffic arriving on `eth0` (without it, the connection would be steered to 15006 again).
    The port is chosen at `connect` (``IP_BIND_ADDRESS_NO_PORT``), as for an unbound socket, so a
    local port is shared by connections to different destinations and TIME_WAIT ones are reused;
    chosen at `bind`, each port was exclusive to one connection of that caller IP: past the port
    range's worth of connections within TIME_WAIT, binds failed (EADDRINUSE) after scanning the
    whole range in the kernel, on the loop's thread (measured: 7,184 of 70,000 failed, 89 s of
    system time, against none and 4 s).
    Not for `source_ip` equal to the pod's own IP (the app's answers then take the pod IP's local
    route, reported on `eth0`, and miss a socket bound to `lo`): that connection needs no help.
    Raises OSError (EPERM without CAP_NET_ADMIN in the socket's netns)."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source_ip, 0))


def exchange(pod_ip: str, caller_ip: str, timeout: float) -> str:
    """In the calling thread's netns: an app listening on `pod_ip`, a transparent connection to it
    from `caller_ip`, a few bytes back. The address the app saw as its peer; TimeoutError when the
    app's answers do not reach the connection (no set-up), OSError for what is refused. A self-check
    (`nodemesh doctor`, tests), not the proxy's path."""
    with socket.socket() as app, socket.socket() as proxy:
        app.bind((pod_ip, 0))
        app.listen()
        app.settimeout(timeout)
        transparent(proxy, caller_ip)
        proxy.settimeout(timeout)
        proxy.connect(app.getsockname())
        conn, peer = app.accept()
        with conn:
            conn.sendall(b"ok")
            if proxy.recv(2) != b"ok":
                raise OSError(errno.EIO, "no answer over the transparent connection")
        return str(peer[0])


def add_address(ip: str, prefixlen: int = 32, ifname: str = "lo") -> None:
    """Bring `ifname` up and add `ip/prefixlen` to it, in the calling thread's netns (the doctor's
    scratch netns)."""
    with _iproute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=index, state="up")
        _tolerate(errno.EEXIST, lambda: ipr.addr("add", index=index, address=ip, prefixlen=prefixlen))


def preload() -> None:
    """Import pyroute2 now (~0.2 s) rather than in the first `install`, which delays a pod's listeners."""
    _iproute().close()


def _iproute() -> IPRoute:
    """A netlink socket of the calling thread's netns (pyroute2 is imported here, not at module
    load: the proxy and the CLI import this module and never need it)."""
    from pyroute2 import IPRoute

    return IPRoute()


def _lo(ipr: IPRoute) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise OSError(errno.ENODEV, "no lo in this netns")
    return int(found[0])


def _has_rule(ipr: IPRoute) -> bool:
    for rule in ipr.get_rules(family=socket.AF_INET):
        if rule.get_attr("FRA_TABLE") == TABLE and rule.get_attr("FRA_FWMARK") == MARK:
            return True
    return False


def _tolerate(code: int, call: Callable[[], object]) -> None:
    """Run a netlink request; `code` (already there, already gone) is fine, others are OSError."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        call()
    except NetlinkError as exc:
        if exc.code != code:
            raise OSError(exc.code, f"netlink: {exc}") from exc
