"""Where a node agent's admin socket lives: `/run/nodemesh/<node>/admin.sock` (directory 0700, socket 0600).

Shared by the server (agent) and the client (`nodemesh` node CLI), so both agree on one path.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

DEFAULT_RUN_DIR = Path("/run/nodemesh")
SOCKET_NAME = "admin.sock"
RUN_DIR_ENV = "NODEMESH_RUN_DIR"  # overrides DEFAULT_RUN_DIR (tests, non-standard installs)


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def check_node_name(node: str) -> str:
    if not node or "/" in node or node in (".", "..") or "\0" in node:
        raise ValueError(f"{node!r} is not a valid node name")
    return node


def admin_socket_path(node: str, root: Path | None = None) -> Path:
    return (root or run_dir()) / check_node_name(node) / SOCKET_NAME


def node_sockets(root: Path | None = None) -> dict[str, Path]:
    """Nodes with an admin socket under `root`: node name → socket path."""
    base = root or run_dir()
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return {}
    found: dict[str, Path] = {}
    for entry in entries:
        sock = entry / SOCKET_NAME
        try:
            if sock.is_socket():
                found[entry.name] = sock
        except OSError:  # a directory we may not read: not ours to list
            continue
    return found


def answers(sock_path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at `sock_path` (False: refused or
    gone, i.e. a stale socket file). Other errors (e.g. EACCES) raise OSError."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(sock_path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()
    return True


def remove_stale(node: str, root: Path | None = None) -> bool:
    """Remove a node's admin socket when nothing answers on it any more (its agent was killed), then
    the node's directory if that left it empty. A live socket is left alone. True if anything went."""
    sock = admin_socket_path(node, root)
    removed = False
    with contextlib.suppress(OSError):
        if sock.is_socket():
            if answers(sock):
                return False
            sock.unlink(missing_ok=True)
            removed = True
    with contextlib.suppress(OSError):  # not empty, or already gone
        sock.parent.rmdir()
        removed = True
    return removed
