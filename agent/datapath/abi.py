"""Python mirror of ``bpf/include/nodemesh.h``: constants, struct layouts and key packing.

``tests/unit/test_datapath_abi.py`` parses the header and checks that every value here agrees.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Final

PORT_OUTBOUND: Final = 15001
PORT_INBOUND: Final = 15006
PORT_HBONE: Final = 15008

MAX_PODS: Final = 1024
MAX_CONNS: Final = 65536
NUM_COUNTERS: Final = 16

# Counter index -> name, in the order of the NM_CTR_* defines.
COUNTERS: Final[dict[str, int]] = {
    "connect_redirected": 0,
    "connect_loopback": 1,
    "connect_save_failed": 2,
    "sockops_rekeyed": 3,
    "sockops_miss": 4,
    "getpeername_restored": 5,
    "sklookup_redirected": 6,
    "sklookup_passed": 7,
    "sklookup_fail_closed": 8,
    "conn_closed": 9,
}

# struct nm_pod_info { __u32 pod_index; __u32 flags; }
POD_INFO: Final = struct.Struct("=II")
# struct nm_orig_dst { __u32 ip4; __u16 port; __u16 pad; }  (ip4 and port in network order)
ORIG_DST: Final = struct.Struct("=4s2sH")
# struct nm_tuple_key { __u64 netns_cookie; __u32 local_port; __u32 pad; }  (port host order)
TUPLE_KEY: Final = struct.Struct("=QII")
# pod_by_netns key, orig_dst_by_cookie key: __u64
U64: Final = struct.Struct("=Q")
# inbound_listener key: pod IPv4 in network order; value: the socket fd (__u32)
IP4_KEY: Final = struct.Struct("=4s")
U32: Final = struct.Struct("=I")

# BPF map types (uapi/linux/bpf.h enum bpf_map_type) of each map, for the re-use check.
MAP_HASH: Final = 1
MAP_ARRAY: Final = 2
MAP_LRU_HASH: Final = 9
MAP_SOCKHASH: Final = 18

# name -> (map type, key size, value size, max entries)
MAP_SPECS: Final[dict[str, tuple[int, int, int, int]]] = {
    "pod_by_netns": (MAP_HASH, U64.size, POD_INFO.size, MAX_PODS),
    "orig_dst_by_cookie": (MAP_LRU_HASH, U64.size, ORIG_DST.size, MAX_CONNS),
    "orig_dst_by_tuple": (MAP_LRU_HASH, TUPLE_KEY.size, ORIG_DST.size, MAX_CONNS),
    "inbound_listener": (MAP_SOCKHASH, IP4_KEY.size, U32.size, MAX_PODS),
    "counters": (MAP_ARRAY, U32.size, 8, NUM_COUNTERS),
}


def pack_pod_info(pod_index: int, flags: int = 0) -> bytes:
    """Value of ``pod_by_netns``."""
    return POD_INFO.pack(pod_index, flags)


def pack_tuple_key(netns_cookie: int, local_port: int) -> bytes:
    """Key of ``orig_dst_by_tuple``: (netns cookie, app local port in host order)."""
    if not 0 < local_port < 65536:
        raise ValueError(f"local_port {local_port} out of range 1..65535")
    return TUPLE_KEY.pack(netns_cookie, local_port, 0)


def pack_orig_dst(ip: str, port: int) -> bytes:
    """Value of ``orig_dst_by_*`` for an IPv4 destination."""
    return ORIG_DST.pack(socket.inet_aton(str(ipaddress.IPv4Address(ip))), struct.pack("!H", port), 0)


def unpack_orig_dst(raw: bytes) -> tuple[str, int]:
    """Decode ``nm_orig_dst`` into (dotted IPv4, port)."""
    ip4, port, _ = ORIG_DST.unpack(raw)
    return socket.inet_ntoa(ip4), struct.unpack("!H", port)[0]


def pack_ip4_key(ip: str) -> bytes:
    """Key of ``inbound_listener``: the pod IPv4 in network order."""
    return IP4_KEY.pack(socket.inet_aton(str(ipaddress.IPv4Address(ip))))
