"""Enter a network namespace on the current thread (Python 3.11 has no ``os.setns``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(OSError):
    """A network namespace could not be opened or entered; the message names the path."""


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace referred to by ``fd``."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns(fd={fd}) failed: {os.strerror(err)}")


@contextmanager
def in_netns(path: str) -> Iterator[None]:
    """Run the block in the netns at ``path`` on this thread only; always switch back.

    Never ``await`` inside the block: setns is per thread.
    """
    orig = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetnsError(exc.errno, f"netns {path}: cannot open: {exc.strerror}") from exc
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(orig)
    finally:
        os.close(orig)
