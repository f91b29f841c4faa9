"""HTTP/2 frames as raw bytes for the unit tests, whatever their content (hyperframe refuses to build
some of the malformed ones the tests need)."""

from __future__ import annotations

import struct

_HEADER = struct.Struct(">HBBBL")  # RFC 9113 §4.1: 24-bit length, type, flags, stream id


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    n = len(payload)
    return _HEADER.pack(n >> 8, n & 0xFF, kind, flags, stream_id & 0x7FFFFFFF) + payload
