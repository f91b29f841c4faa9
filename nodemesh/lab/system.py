"""Small wrappers over the host facilities the lab uses: iproute2, cgroup v2, processes in a netns.

Links and namespaces are made with iproute2 in batch mode (one `ip -batch` per namespace), which is
what an operator would type and keeps a failed step's error message readable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")


class LabError(RuntimeError):
    """A lab step failed; the message says which step and what the system answered."""


def run(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise LabError(f"{args[0]} is not installed (run `make setup`)") from exc
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed (rc={proc.returncode}): {proc.stderr.strip()}")
    return proc


def ip_batch(commands: Sequence[str], netns: str | None = None) -> None:
    """Run iproute2 commands in one `ip -batch -` call (inside `netns` if given)."""
    args = ["ip", *(("-n", netns) if netns else ()), "-batch", "-"]
    proc = subprocess.run(args, input="\n".join(commands) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        where = f" in netns {netns}" if netns else ""
        raise LabError(f"iproute2{where} failed: {proc.stderr.strip()}")


def netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def list_netns() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir())


def sysctl_in(netns: str, key: str, value: str) -> None:
    """Set a per-netns sysctl by writing /proc/sys from inside the netns (no /sys remount)."""
    path = "/proc/sys/" + key.replace(".", "/")
    run("nsenter", f"--net={netns_path(netns)}", "--", "sh", "-c", f"echo {value} > {path}")


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted: `/sys/fs/cgroup` (unified) or `/sys/fs/cgroup/unified` (hybrid)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return Path(left.split()[4])
    raise LabError("cgroup v2 is not mounted (nodemesh needs it: see `nodemesh doctor`)")


def cgroup_procs(cgroup: Path) -> list[int]:
    try:
        return [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def kill_cgroup_tree(root: Path, grace: float = 3.0) -> None:
    """SIGTERM every process under `root`, wait up to `grace`, then SIGKILL the rest."""
    if not root.is_dir():
        return
    groups = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for cg in groups for pid in cgroup_procs(cg)]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not any(cgroup_procs(cg) for cg in groups):
                return
            time.sleep(0.05)


def remove_cgroup_tree(root: Path) -> None:
    if not root.is_dir():
        return
    kill_cgroup_tree(root)
    for cg in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            cg.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()
    if root.exists():
        raise LabError(f"cgroup {root} could not be removed (processes still in it: {cgroup_procs(root)})")


# Join the cgroup from a shell, then exec nsenter: no Python `preexec_fn`, which is unsafe after
# fork in a process with other threads (gRPC's, in the test runner) and was seen to crash children.
_JOIN = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


def _wrap(argv: Sequence[str], netns: str | None, cgroup: Path | None) -> list[str]:
    full = [*(("nsenter", f"--net={netns_path(netns)}", "--") if netns else ()), *argv]
    return ["sh", "-c", _JOIN, str(cgroup), *full] if cgroup is not None else full


def spawn(
    argv: Sequence[str],
    *,
    netns: str | None,
    cgroup: Path | None,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running process in `cgroup` (joined before exec) and `netns` (via nsenter).

    nsenter keeps the mount namespace, so /sys/fs/bpf and the cgroup tree stay visible inside.
    The process gets its own session, so a Ctrl-C at the terminal does not reach it.
    """
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            _wrap(argv, netns, cgroup),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            close_fds=True,
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def run_in(
    argv: Sequence[str],
    *,
    netns: str,
    cgroup: Path | None,
    timeout: float | None = None,
    capture: bool = True,
    input_bytes: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion in a pod or node (cgroup joined first, then the netns)."""
    return subprocess.run(
        _wrap(argv, netns, cgroup),
        input=input_bytes,
        capture_output=capture,
        timeout=timeout,
        check=False,
    )
