"""Enter a network namespace on the current thread for a synchronous, scoped block."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from agent.datapath.errors import DatapathError

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise DatapathError(what, f"setns failed: {os.strerror(err)}")


@contextmanager
def in_netns(path: str) -> Iterator[None]:
    """Run the block in the netns at ``path`` (this thread only); always switch back.

    Never ``await`` inside: setns is per thread and the event loop may run other tasks.
    """
    orig = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DatapathError(f"netns {path}", f"cannot open: {exc.strerror}") from exc
        try:
            _setns(target, f"netns {path}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(orig, "original netns (thread is now in the wrong netns)")
    finally:
        os.close(orig)
