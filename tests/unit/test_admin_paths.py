"""agent.admin.paths.remove_stale: a dead agent's socket goes, a live one stays."""

from __future__ import annotations

import socket
from pathlib import Path

from agent.admin.paths import admin_socket_path, node_sockets, remove_stale


def bound_socket(path: Path, listen: bool) -> socket.socket:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    if listen:
        s.listen()
    return s


def test_a_socket_nobody_answers_is_removed_with_its_empty_directory(tmp_path: Path) -> None:
    path = admin_socket_path("n1", tmp_path)
    bound_socket(path, listen=False).close()  # what a SIGKILLed agent leaves: the file, no listener
    assert node_sockets(tmp_path) == {"n1": path}
    assert remove_stale("n1", tmp_path)
    assert not path.parent.exists()
    assert node_sockets(tmp_path) == {}


def test_a_live_socket_is_left_alone(tmp_path: Path) -> None:
    path = admin_socket_path("n1", tmp_path)
    live = bound_socket(path, listen=True)
    try:
        assert not remove_stale("n1", tmp_path)
        assert path.is_socket()
    finally:
        live.close()


def test_nothing_there_and_a_directory_with_other_files_are_fine(tmp_path: Path) -> None:
    assert not remove_stale("absent", tmp_path)
    keep = admin_socket_path("n2", tmp_path).parent / "notes.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("not ours")
    assert not remove_stale("n2", tmp_path)
    assert keep.exists()
