"""`nodemesh doctor`: checks that this machine can run a nodemesh node, one line per requirement.

Each check is a function of a :class:`Host` (the files, syscalls and imports it reads, injectable so
unit tests pass fake text instead of the real /proc) returning a :class:`CheckResult`.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import platform
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated

import typer

from agent.datapath import source_ip

# One source of truth for the BPF type numbers the datapath uses (constants only: no libbcc load).
from agent.datapath.bpfsys import ATTACH_CGROUP_INET4_CONNECT, ATTACH_SK_LOOKUP, PROG_TYPE_SK_LOOKUP

MIN_KERNEL = (5, 17)  # sk_lookup `ingress_ifindex` (docs/datapath.md); the other helpers are older
# Linux 5.15 (commit 8520e224f547 "bpf, cgroups: Fix cgroup v2 fallback on v1/v2 mixed mode") gave
# each socket separate v1 (classid, prioidx) and v2 (cgroup) fields. Before it, the first write of a
# net_cls classid or net_prio priomap switched every socket to the v1 layout for good, and cgroup2
# socket programs then saw every socket as the root cgroup's: pods were no longer told apart.
V1_SOCK_DATA_SPLIT = (5, 15)
SOCKET_MATCHING_DISABLED = "disabling cgroup2 socket matching"

MOUNTINFO = "/proc/self/mountinfo"
PROC_CGROUPS = "/proc/cgroups"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
BPFFS = "/sys/fs/bpf"
CGROUP2_PLACES = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")  # pure v2, hybrid

PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_LOAD = 5
_SYS_BPF = {"x86_64": 321, "aarch64": 280}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one requirement: `detail` says what was seen, `hint` how to fix a failure."""

    name: str
    ok: bool
    detail: str
    hint: str = ""


# ---- reading the host ----------------------------------------------------------------------------


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _kernel_log() -> tuple[str, str] | None:
    """The kernel log and where it came from, or None when neither /dev/kmsg nor dmesg is readable."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        pass
    else:
        records: list[bytes] = []
        try:
            # One record per read; EAGAIN at the end of the ring; EPIPE when a record was overwritten
            # while reading (skip it). The cap only guards against a log that is written faster than read.
            while len(records) < 1_000_000:
                try:
                    records.append(os.read(fd, 16384))
                except BlockingIOError:
                    break
                except BrokenPipeError:
                    continue
        except OSError:
            records = []
        finally:
            os.close(fd)
        if records:
            return "/dev/kmsg", b"".join(records).decode(errors="replace")
    try:
        proc = subprocess.run(["dmesg"], capture_output=True, text=True, errors="replace", timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return ("dmesg", proc.stdout) if proc.returncode == 0 else None


class _ProgLoadAttr(ctypes.Structure):
    """The BPF_PROG_LOAD part of `union bpf_attr` (linux/bpf.h) up to `expected_attach_type`."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


# `r0 = 1; exit`: BPF_ALU64|BPF_MOV|BPF_K (0xb7) into r0, then BPF_JMP|BPF_EXIT (0x95). 1 is SK_PASS
# for sk_lookup and "allow" for connect4, the only return ranges the verifier checks here.
TRIVIAL_PROG = struct.pack("<BBhi", 0xB7, 0x00, 0, 1) + struct.pack("<BBhi", 0x95, 0x00, 0, 0)


def load_trivial_prog(prog_type: int, attach_type: int) -> None:
    """Load `r0 = 1; exit` as `prog_type` through the bpf() syscall and close it; OSError on refusal.

    A raw syscall rather than bcc, so this check says whether the kernel accepts the program type
    independently of whether bcc and its compiler work (they have their own checks).
    """
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf() syscall number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
    insns = ctypes.create_string_buffer(TRIVIAL_PROG, len(TRIVIAL_PROG))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(TRIVIAL_PROG) // 8,
        insns=ctypes.addressof(insns),
        license=ctypes.addressof(license_),
        log_level=1,
        log_size=len(log),
        log_buf=ctypes.addressof(log),
        prog_name=b"nodemesh_doctor",
        expected_attach_type=attach_type,
    )
    fd = int(libc.syscall(nr, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        verifier = log.value.decode(errors="replace").strip().splitlines()
        why = os.strerror(err) + (f" (verifier: {verifier[-1]})" if verifier else "")
        raise OSError(err, why)
    os.close(fd)


CLONE_NEWNET = 0x40000000
PROBE_POD_IP, PROBE_CALLER_IP = "10.255.77.1", "10.255.78.1"  # inside a throwaway netns only


def probe_source_ip(timeout: float = 10.0) -> str:
    """Source-IP preservation end to end, in a network namespace of its own that goes when the probe
    thread ends: the agent's set-up (`source_ip.install`), an app on an address of `lo`, and a
    transparent connection to it from another address. The address the app saw; OSError if any
    step is refused."""
    outcome: list[str | BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:  # this thread only
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            source_ip.add_address(PROBE_POD_IP)
            source_ip.install()
            outcome.append(source_ip.exchange(PROBE_POD_IP, PROBE_CALLER_IP, timeout / 2))
        except BaseException as exc:  # reported by the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=body, name="doctor-source-ip", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise OSError(errno.ETIMEDOUT, f"no result after {timeout:.0f} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


@dataclass(frozen=True)
class Host:
    """What the checks read from the machine; unit tests replace these with fakes."""

    euid: Callable[[], int] = os.geteuid
    kernel_release: Callable[[], str] = field(default=lambda: os.uname().release)
    read_text: Callable[[str], str] = _read_text  # raises OSError when missing or unreadable
    exists: Callable[[str], bool] = os.path.exists
    realpath: Callable[[str], str] = os.path.realpath
    load_prog: Callable[[int, int], None] = load_trivial_prog  # raises OSError when refused
    import_module: Callable[[str], object] = importlib.import_module
    kernel_log: Callable[[], tuple[str, str] | None] = _kernel_log
    probe_source_ip: Callable[[], str] = probe_source_ip  # raises OSError when refused


# ---- pure parsing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo (proc(5)): where, what type, and the super options."""

    mount_point: str
    fstype: str
    super_options: tuple[str, ...]


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if not sep or len(lf) < 5 or not rf:
            continue
        opts = tuple(rf[2].split(",")) if len(rf) > 2 else ()
        mounts.append(Mount(_unescape(lf[4]), rf[0], opts))
    return mounts


def parse_kernel_version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a `uname -r` string such as `6.18.44-fc-v769`; None when unparsable."""
    parts = release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def v1_bound_controllers(proc_cgroups: str) -> set[str]:
    """Controllers of /proc/cgroups attached to a cgroup v1 hierarchy (hierarchy id ≠ 0)."""
    bound = set()
    for line in proc_cgroups.splitlines():
        cols = line.split()
        if len(cols) >= 4 and not line.startswith("#") and cols[1] != "0" and cols[3] == "1":
            bound.add(cols[0])
    return bound


# ---- the checks ----------------------------------------------------------------------------------


def check_root(host: Host) -> CheckResult:
    euid = host.euid()
    if euid == 0:
        return CheckResult("root", True, "running as root (euid 0)")
    return CheckResult("root", False, f"running as euid {euid}", "run as root: sudo nodemesh doctor")


def check_kernel(host: Host) -> CheckResult:
    release = host.kernel_release()
    version = parse_kernel_version(release)
    want = ".".join(map(str, MIN_KERNEL))
    hint = f"boot a kernel ≥ {want} (sk_lookup needs it)"
    if version is None:
        return CheckResult("kernel", False, f"cannot parse kernel release {release!r}", hint)
    if version >= MIN_KERNEL:
        return CheckResult("kernel", True, f"Linux {release} (≥ {want})")
    return CheckResult("kernel", False, f"Linux {release} is older than {want}", hint)


def check_btf(host: Host) -> CheckResult:
    if host.exists(BTF_VMLINUX):
        return CheckResult("btf", True, f"{BTF_VMLINUX} present")
    hint = "use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    return CheckResult("btf", False, f"{BTF_VMLINUX} missing", hint)


def _mounts(host: Host) -> list[Mount]:
    return parse_mountinfo(host.read_text(MOUNTINFO))


def check_cgroup2(host: Host) -> CheckResult:
    places = [m.mount_point for m in _mounts(host) if m.fstype == "cgroup2"]
    for where, kind in zip(CGROUP2_PLACES, ("unified (pure v2)", "hybrid (v1 + v2)"), strict=True):
        if where in places:
            return CheckResult("cgroup2", True, f"mounted at {where}, {kind}")
    detail = f"mounted only at {', '.join(places)}" if places else "not mounted"
    hint = f"mount -t cgroup2 none {CGROUP2_PLACES[0]} (or boot with systemd's unified hierarchy)"
    return CheckResult("cgroup2", False, detail, hint)


def check_bpffs(host: Host) -> CheckResult:
    stacked = sum(1 for m in _mounts(host) if m.mount_point == BPFFS and m.fstype == "bpf")
    if stacked:
        more = f" ({stacked} stacked mounts)" if stacked > 1 else ""
        return CheckResult("bpffs", True, f"mounted at {BPFFS}{more}")
    return CheckResult("bpffs", False, f"not mounted at {BPFFS}", f"mount -t bpf bpf {BPFFS}")


def _check_prog(host: Host, name: str, what: str, prog_type: int, attach_type: int) -> CheckResult:
    try:
        host.load_prog(prog_type, attach_type)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            hint = "run as root (loading needs CAP_BPF and CAP_NET_ADMIN)"
        else:
            hint = f"this kernel does not accept {what} programs: boot a kernel ≥ 5.17 with BPF enabled"
        return CheckResult(name, False, f"{what} program refused: {exc.strerror}", hint)
    return CheckResult(name, True, f"{what} program loads (prog type {prog_type}, attach type {attach_type})")


def check_sk_lookup(host: Host) -> CheckResult:
    return _check_prog(host, "sk_lookup", "sk_lookup", PROG_TYPE_SK_LOOKUP, ATTACH_SK_LOOKUP)


def check_connect4(host: Host) -> CheckResult:
    return _check_prog(
        host, "connect4", "cgroup/connect4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET4_CONNECT
    )


def check_bcc(host: Host) -> CheckResult:
    try:
        module = host.import_module("bcc")
    except Exception as exc:  # bcc can fail with OSError (libbcc.so) as well as ImportError
        hint = "apt install python3-bpfcc, then make setup (links it into .venv)"
        return CheckResult("bcc", False, f"import bcc failed: {exc}", hint)
    return CheckResult("bcc", True, f"import bcc works ({getattr(module, '__file__', None) or 'bcc'})")


def check_headers(host: Host) -> CheckResult:
    build = f"/lib/modules/{host.kernel_release()}/build"
    if host.exists(f"{build}/include"):
        return CheckResult("headers", True, f"{build} → {host.realpath(build)}")
    hint = "make setup (links the installed linux-headers there)"
    return CheckResult("headers", False, f"{build}/include missing (bcc compiles against it)", hint)


def check_socket_matching(host: Host) -> CheckResult:
    """cgroup v1 net_cls/net_prio must not have switched cgroup2 socket matching off (V1_SOCK_DATA_SPLIT)."""
    name = "cgroup2-sockets"
    net_v1 = ("net_cls", "net_prio")
    v1 = {
        f"{opt} mounted at {m.mount_point}"
        for m in _mounts(host)
        if m.fstype == "cgroup"
        for opt in m.super_options
        if opt in net_v1
    }
    checked = ["mountinfo"]
    try:
        bound = v1_bound_controllers(host.read_text(PROC_CGROUPS))
    except OSError:
        bound = set()
    else:
        checked.append("/proc/cgroups")
    if not v1:  # a bound controller is normally also mounted; name it once
        v1 = {f"{c} on a v1 hierarchy" for c in bound if c in net_v1}
    log = host.kernel_log()
    if log is not None:
        checked.append(f"kernel log via {log[0]}")
        if SOCKET_MATCHING_DISABLED in log[1]:
            detail = (
                f"kernel log says '{SOCKET_MATCHING_DISABLED}': cgroup2 socket programs see every "
                "socket as the root cgroup's"
            )
            hint = "a process wrote net_cls.classid or net_prio.ifpriomap: stop it, then reboot"
            return CheckResult(name, False, detail, hint)
    seen = f"checked {', '.join(checked)}" + ("" if log is not None else "; kernel log not readable, skipped")
    version = parse_kernel_version(host.kernel_release())
    if v1 and (version is None or version < V1_SOCK_DATA_SPLIT):
        detail = (
            f"{', '.join(sorted(v1))} on a kernel before 5.15, where the first classid/priomap write "
            f"disables cgroup2 socket matching; {seen}"
        )
        hint = "unmount the net_cls/net_prio hierarchies or boot with cgroup_no_v1=net_cls,net_prio"
        return CheckResult(name, False, detail, hint)
    if v1:
        return CheckResult(name, True, f"{', '.join(sorted(v1))}, harmless since Linux 5.15; {seen}")
    return CheckResult(name, True, f"net_cls/net_prio not on cgroup v1, no warning logged; {seen}")


def check_source_ip(host: Host) -> CheckResult:
    """What source-IP preservation needs (policy routing, tcp_fwmark_accept, IP_TRANSPARENT), tried."""
    name = "source-ip"
    try:
        seen = host.probe_source_ip()
    except (OSError, ImportError) as exc:
        hint = ("run as root, on a kernel with policy routing (CONFIG_IP_MULTIPLE_TABLES); "
                "or run the agent with --no-preserve-source-ip (apps then see their own pod IP)")  # fmt: skip
        return CheckResult(name, False, f"transparent connection in a scratch netns failed: {exc}", hint)
    if seen != PROBE_CALLER_IP:
        hint = "apps would see a wrong peer address; run the agent with --no-preserve-source-ip"
        return CheckResult(name, False, f"the app saw {seen}, not the caller {PROBE_CALLER_IP}", hint)
    return CheckResult(name, True, "a transparent connection keeps the caller's IP (scratch netns)")


CHECKS: tuple[Callable[[Host], CheckResult], ...] = (
    check_root,
    check_kernel,
    check_btf,
    check_cgroup2,
    check_bpffs,
    check_sk_lookup,
    check_connect4,
    check_bcc,
    check_headers,
    check_socket_matching,
    check_source_ip,
)


def run_checks(host: Host, checks: Sequence[Callable[[Host], CheckResult]] = CHECKS) -> list[CheckResult]:
    """Every check, in order; a check that raises is reported as a failure of that check, not a crash."""
    results = []
    for check in checks:
        try:
            results.append(check(host))
        except Exception as exc:  # one broken check must not hide the others' lines
            name = check.__name__.removeprefix("check_").replace("_", "-")
            results.append(CheckResult(name, False, f"check crashed: {type(exc).__name__}: {exc}"))
    return results


# ---- output --------------------------------------------------------------------------------------


def render_text(results: Sequence[CheckResult], color: bool = False) -> str:
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for r in results:
        mark = "PASS" if r.ok else "FAIL"
        if color:
            mark = typer.style(mark, fg="green" if r.ok else "red", bold=True)
        hint = f" — hint: {r.hint}" if not r.ok and r.hint else ""
        lines.append(f"{mark} {r.name:<{width}}  {r.detail}{hint}")
    return "\n".join(lines)


def render_json(results: Sequence[CheckResult]) -> str:
    report = {"ok": all(r.ok for r in results), "checks": [asdict(r) for r in results]}
    return json.dumps(report, indent=2, ensure_ascii=False)


def doctor_command(
    output: Annotated[str, typer.Option("-o", "--output", help="text or json")] = "text",
) -> None:
    """Check the requirements of a nodemesh node, one line each; exit 1 if any fails."""
    if output not in ("text", "json"):
        raise typer.BadParameter("want text or json", param_hint="-o")
    results = run_checks(Host())
    if output == "json":
        typer.echo(render_json(results))
    else:
        typer.echo(render_text(results, color=os.isatty(1)))
    if not all(r.ok for r in results):
        raise typer.Exit(1)
