"""ctypes bindings to the libbpf functions exported by ``libbcc.so.0`` that bcc's Python lacks.

Every call raises :class:`DatapathError` with the errno text on failure.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import subprocess
from typing import Any

from agent.datapath.errors import DatapathError


@functools.cache
def _libbcc() -> ctypes.CDLL:
    """libbcc.so.0 with argtypes declared; loaded on first use so importing needs no bcc."""
    try:
        _lib = ctypes.CDLL("libbcc.so.0", use_errno=True)
    except OSError as exc:
        raise DatapathError("libbcc.so.0", f"cannot load ({exc}); install bpfcc (python3-bpfcc)") from exc
    _lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    _lib.bpf_obj_pin.restype = ctypes.c_int
    _lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    _lib.bpf_obj_get.restype = ctypes.c_int
    _lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    _lib.bpf_link_create.restype = ctypes.c_int
    _lib.bpf_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong]
    _lib.bpf_update_elem.restype = ctypes.c_int
    _lib.bpf_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    _lib.bpf_lookup_elem.restype = ctypes.c_int
    _lib.bpf_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _lib.bpf_delete_elem.restype = ctypes.c_int
    _lib.bpf_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    _lib.bpf_get_next_key.restype = ctypes.c_int
    return _lib


# enum bpf_attach_type values used by the datapath.
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET4_GETPEERNAME = 29
ATTACH_SK_LOOKUP = 36
PROG_TYPE_SK_LOOKUP = 30


def _fail(what: str, call: str) -> DatapathError:
    err = ctypes.get_errno()
    return DatapathError(what, f"{call} failed: {os.strerror(err)} (errno {err})")


def obj_pin(fd: int, path: str) -> None:
    """Pin a program, map or link fd at ``path`` in bpffs."""
    if _libbcc().bpf_obj_pin(fd, path.encode()) != 0:
        raise _fail(path, "bpf_obj_pin")


def obj_get(path: str) -> int:
    """Open a pinned object; the caller owns the returned fd."""
    fd = int(_libbcc().bpf_obj_get(path.encode()))
    if fd < 0:
        raise _fail(path, "bpf_obj_get")
    return fd


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    """Create a BPF link (cgroup or netns target); the caller owns the returned fd."""
    fd = int(_libbcc().bpf_link_create(prog_fd, target_fd, attach_type, None))
    if fd < 0:
        raise _fail(what, "bpf_link_create")
    return fd


def map_update(fd: int, key: bytes, value: bytes, what: str) -> None:
    """BPF_ANY update of one element."""
    if _libbcc().bpf_update_elem(fd, key, value, 0) != 0:
        raise _fail(what, "bpf_update_elem")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value at ``key`` or None when absent."""
    buf = ctypes.create_string_buffer(value_size)
    if _libbcc().bpf_lookup_elem(fd, key, buf) != 0:
        return None
    return buf.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False when it was absent."""
    return int(_libbcc().bpf_delete_elem(fd, key)) == 0


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """All keys of a hash map (a snapshot; concurrent writers may add or remove some)."""
    keys: list[bytes] = []
    prev: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while _libbcc().bpf_get_next_key(fd, prev, nxt) == 0:
        keys.append(nxt.raw)
        prev = nxt.raw
        if len(keys) > 1_000_000:
            raise DatapathError(f"map fd {fd}", "key iteration did not terminate")
    return keys


def bpftool_json(*args: str) -> Any:
    """Run ``bpftool -j`` and parse its output (introspection only, not on hot paths)."""
    try:
        out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DatapathError(f"bpftool {' '.join(args)}", str(exc)) from exc
    return json.loads(out.stdout.strip() or "null")
