"""The Python mirror agent/datapath/abi.py agrees with bpf/include/nodemesh.h."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.datapath import abi

HEADER = (Path(__file__).resolve().parents[2] / "bpf" / "include" / "nodemesh.h").read_text()
C_SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}


def defines() -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define (NM_\w+) (\d+)\b", HEADER, re.M)}


def c_struct_layout(name: str) -> list[tuple[str, int]]:
    body = re.search(r"struct " + name + r" \{(.*?)\};", HEADER, re.S)
    assert body is not None, f"struct {name} not found in header"
    return [(f[2], C_SIZES[f[1]]) for f in re.finditer(r"(__u\d+) (\w+);", body.group(1))]


def c_map(name: str) -> tuple[str, str, str]:
    """(map kind, key type, max entries macro) of a map declared in the header."""
    table = re.search(r'BPF_TABLE\("(\w+)", ([\w ]+?), [^,]+, ' + name + r", (\w+)\)", HEADER)
    if table is not None:
        return table[1], table[2], table[3]
    hashmap = re.search(r"BPF_HASH\(" + name + r", ([\w ]+?), [^,]+, (\w+)\)", HEADER)
    if hashmap is not None:
        return "hash", hashmap[1], hashmap[2]
    array = re.search(r"BPF_ARRAY\(" + name + r", [^,]+, (\w+)\)", HEADER)
    assert array is not None, f"map {name} not found in header"
    return "array", "__u32", array[1]


def test_constants_agree() -> None:
    d = defines()
    assert d["NM_PORT_OUTBOUND"] == abi.PORT_OUTBOUND
    assert d["NM_PORT_INBOUND"] == abi.PORT_INBOUND
    assert d["NM_PORT_HBONE"] == abi.PORT_HBONE
    assert d["NM_MAX_PODS"] == abi.MAX_PODS
    assert d["NM_MAX_CONNS"] == abi.MAX_CONNS
    assert d["NM_NUM_COUNTERS"] == abi.NUM_COUNTERS


def test_counter_indices_agree() -> None:
    c_counters = {k[len("NM_CTR_"):].lower(): v for k, v in defines().items() if k.startswith("NM_CTR_")}
    assert c_counters == abi.COUNTERS
    assert max(abi.COUNTERS.values()) < abi.NUM_COUNTERS


@pytest.mark.parametrize(("cname", "pystruct"), [
    ("nm_pod_info", abi.POD_INFO), ("nm_orig_dst", abi.ORIG_DST), ("nm_tuple_key", abi.TUPLE_KEY)])
def test_struct_sizes_agree(cname: str, pystruct: struct.Struct) -> None:
    layout = c_struct_layout(cname)
    offset = 0
    for _, size in layout:  # natural alignment, as clang lays it out for BPF
        offset = (offset + size - 1) // size * size + size
    assert offset == pystruct.size
    assert len(layout) == len(pystruct.unpack(bytes(pystruct.size)))


@pytest.mark.parametrize("name", sorted(abi.MAP_SPECS))
def test_map_specs_agree(name: str) -> None:
    kind, key_type, max_macro = c_map(name)
    mtype, ksize, _, max_entries = abi.MAP_SPECS[name]
    kinds = {"hash": abi.MAP_HASH, "array": abi.MAP_ARRAY, "lru_hash": abi.MAP_LRU_HASH,
             "sockhash": abi.MAP_SOCKHASH}
    assert kinds[kind] == mtype
    assert defines()[max_macro] == max_entries
    structs = {"struct nm_tuple_key": abi.TUPLE_KEY.size}
    assert (C_SIZES.get(key_type) or structs[key_type]) == ksize


@given(st.ip_addresses(v=4).map(str), st.integers(1, 65535))
def test_orig_dst_roundtrip_network_order(ip: str, port: int) -> None:
    raw = abi.pack_orig_dst(ip, port)
    assert len(raw) == abi.ORIG_DST.size
    assert abi.unpack_orig_dst(raw) == (ip, port)
    assert raw[4:6] == port.to_bytes(2, "big")  # the kernel's ctx->user_port is big endian


@given(st.integers(0, 2**64 - 1), st.integers(1, 65535))
def test_tuple_key_layout(cookie: int, port: int) -> None:
    raw = abi.pack_tuple_key(cookie, port)
    assert raw[:8] == cookie.to_bytes(8, "little")
    assert raw[8:12] == port.to_bytes(4, "little")  # host order, as skops->local_port
    assert raw[12:] == bytes(4)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_tuple_key_rejects_bad_port(port: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        abi.pack_tuple_key(1, port)


@pytest.mark.parametrize("ip", ["10.0.0.256", "::1", "", "pod"])
def test_ip_packing_rejects_non_ipv4(ip: str) -> None:
    with pytest.raises(ValueError):
        abi.pack_ip4_key(ip)
