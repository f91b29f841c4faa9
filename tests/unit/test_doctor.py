"""`nodemesh doctor` against fake hosts: every check's pass and fail path, exit code, json shape."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from dataclasses import replace

import pytest
import typer
from typer.testing import CliRunner

from nodemesh import doctor
from nodemesh.doctor import CheckResult, Host

RELEASE = "6.18.44-fc-v769"

# This machine's hybrid layout, trimmed: v1 controllers under a tmpfs, cgroup2 at .../unified.
HYBRID_MOUNTINFO = """\
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 23 0:39 / /sys/fs/bpf rw,relatime - bpf bpf rw
"""
PURE_V2_MOUNTINFO = """\
23 1 0:21 / /sys rw - sysfs sysfs rw
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
42 23 0:39 / /sys/fs/bpf rw,relatime shared:9 - bpf bpf rw,mode=700
"""
NET_CLS_LINE = "50 31 0:40 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio\n"
PROC_CGROUPS = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpu\t1\t1\t1
memory\t4\t26\t1
net_cls\t0\t1\t1
net_prio\t0\t1\t1
"""
PROC_CGROUPS_NET_BOUND = PROC_CGROUPS.replace("net_cls\t0", "net_cls\t9").replace(
    "net_prio\t0", "net_prio\t9"
)
KMSG_CLEAN = "6,6085,26715634401,-;cni0: port 1(nmp1) entered forwarding state\n"
KMSG_DISABLED = (
    "6,700,14057746,-;cgroup: disabling cgroup2 socket matching due to net_prio or net_cls activation\n"
)


def fake_host(
    *,
    euid: int = 0,
    release: str = RELEASE,
    files: dict[str, str] | None = None,
    paths: set[str] | None = None,
    load_prog: Callable[[int, int], None] | None = None,
    import_module: Callable[[str], object] | None = None,
    kernel_log: tuple[str, str] | None = ("/dev/kmsg", KMSG_CLEAN),
    probe_source_ip: Callable[[], str] | None = None,
) -> Host:
    """A host like this machine (every check passes) unless a keyword says otherwise."""
    texts = {"/proc/self/mountinfo": HYBRID_MOUNTINFO, "/proc/cgroups": PROC_CGROUPS} | (files or {})
    existing = (
        {"/sys/kernel/btf/vmlinux", f"/lib/modules/{release}/build/include"} if paths is None else paths
    )

    def read_text(path: str) -> str:
        if path not in texts:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return texts[path]

    def loads(prog_type: int, attach_type: int) -> None:
        return None

    return Host(
        euid=lambda: euid,
        kernel_release=lambda: release,
        read_text=read_text,
        exists=lambda p: p in existing,
        realpath=lambda p: "/usr/src/linux-headers-6.1.0-56-amd64" if p.endswith("/build") else p,
        load_prog=load_prog or loads,
        import_module=import_module or (lambda name: type("Module", (), {"__file__": f"/x/{name}.py"})()),
        kernel_log=lambda: kernel_log,
        probe_source_ip=probe_source_ip or (lambda: doctor.PROBE_CALLER_IP),
    )


def by_name(host: Host) -> dict[str, CheckResult]:
    return {r.name: r for r in doctor.run_checks(host)}


def refuse(err: int) -> Callable[[int, int], None]:
    def load(prog_type: int, attach_type: int) -> None:
        raise OSError(err, f"refused type {prog_type}")
    return load


def test_a_machine_like_this_one_passes_every_check() -> None:
    results = doctor.run_checks(fake_host())
    assert [r.name for r in results] == [
        "root", "kernel", "btf", "cgroup2", "bpffs", "sk_lookup", "connect4", "bcc", "headers",
        "cgroup2-sockets", "source-ip",
    ]
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    assert all(r.hint == "" for r in results)


# ---- each check: pass and fail ---------------------------------------------------------------------


def test_root_passes_as_euid_0_and_fails_otherwise() -> None:
    assert doctor.check_root(fake_host()).ok
    r = doctor.check_root(fake_host(euid=1000))
    assert (r.ok, r.detail) == (False, "running as euid 1000")
    assert "root" in r.hint


@pytest.mark.parametrize(
    ("release", "ok"),
    [("6.18.44-fc-v769", True), ("5.17.0", True), ("5.17", True), ("6.1.0-56-amd64", True),
     ("5.16.20-arch1", False), ("5.4.0-125-generic", False), ("4.19.0", False), ("garbage", False),
     ("", False)],
)
def test_kernel_needs_5_17(release: str, ok: bool) -> None:
    r = doctor.check_kernel(fake_host(release=release))
    assert r.ok is ok, r
    assert release in r.detail
    assert (r.hint == "") is ok
    if not ok:
        assert "5.17" in r.hint


def test_btf_is_required() -> None:
    assert doctor.check_btf(fake_host()).detail == "/sys/kernel/btf/vmlinux present"
    r = doctor.check_btf(fake_host(paths=set()))
    assert not r.ok and "missing" in r.detail and "CONFIG_DEBUG_INFO_BTF" in r.hint


@pytest.mark.parametrize(
    ("mountinfo", "where"),
    [(HYBRID_MOUNTINFO, "/sys/fs/cgroup/unified, hybrid"), (PURE_V2_MOUNTINFO, "/sys/fs/cgroup, unified")],
)
def test_cgroup2_accepts_pure_v2_and_hybrid_and_says_where(mountinfo: str, where: str) -> None:
    r = doctor.check_cgroup2(fake_host(files={"/proc/self/mountinfo": mountinfo}))
    assert r.ok and r.detail.startswith(f"mounted at {where}")


def test_cgroup2_fails_when_absent_or_only_elsewhere() -> None:
    v1_only = "".join(ln + "\n" for ln in HYBRID_MOUNTINFO.splitlines() if "cgroup2" not in ln)
    r = doctor.check_cgroup2(fake_host(files={"/proc/self/mountinfo": v1_only}))
    assert (r.ok, r.detail) == (False, "not mounted")
    assert "mount -t cgroup2" in r.hint
    elsewhere = v1_only + r"77 23 0:50 / /mnt/my\040cg rw - cgroup2 cgroup2 rw" + "\n"
    r = doctor.check_cgroup2(fake_host(files={"/proc/self/mountinfo": elsewhere}))
    assert (r.ok, r.detail) == (False, "mounted only at /mnt/my cg")


def test_bpffs_mounted_unmounted_and_stacked() -> None:
    r = doctor.check_bpffs(fake_host())
    assert (r.ok, r.detail) == (True, "mounted at /sys/fs/bpf")
    stacked = HYBRID_MOUNTINFO + "90 42 0:60 / /sys/fs/bpf rw - bpf bpf rw\n"
    assert doctor.check_bpffs(fake_host(files={"/proc/self/mountinfo": stacked})).detail == (
        "mounted at /sys/fs/bpf (2 stacked mounts)"
    )
    gone = HYBRID_MOUNTINFO.replace("- bpf bpf", "- tmpfs tmpfs")  # something else on the path
    r = doctor.check_bpffs(fake_host(files={"/proc/self/mountinfo": gone}))
    assert r == CheckResult("bpffs", False, "not mounted at /sys/fs/bpf", "mount -t bpf bpf /sys/fs/bpf")
    line = doctor.render_text([r])
    assert line == "FAIL bpffs  not mounted at /sys/fs/bpf — hint: mount -t bpf bpf /sys/fs/bpf"


def test_prog_checks_load_the_right_types() -> None:
    asked: list[tuple[int, int]] = []

    def record(prog_type: int, attach_type: int) -> None:
        asked.append((prog_type, attach_type))

    host = fake_host(load_prog=record)
    assert doctor.check_sk_lookup(host).ok and doctor.check_connect4(host).ok
    assert asked == [(30, 36), (18, 10)]


@pytest.mark.parametrize("check", [doctor.check_sk_lookup, doctor.check_connect4])
@pytest.mark.parametrize(
    ("err", "hint_has"), [(errno.EPERM, "run as root"), (errno.EINVAL, "does not accept")]
)
def test_prog_checks_fail_with_the_errno(
    check: Callable[[Host], CheckResult], err: int, hint_has: str
) -> None:
    r = check(fake_host(load_prog=refuse(err)))
    assert not r.ok and "refused type" in r.detail and hint_has in r.hint


def test_bcc_import_failure_is_reported() -> None:
    assert doctor.check_bcc(fake_host()).detail == "import bcc works (/x/bcc.py)"

    def no_bcc(name: str) -> object:
        raise ModuleNotFoundError(f"No module named {name!r}")

    r = doctor.check_bcc(fake_host(import_module=no_bcc))
    assert not r.ok and "No module named 'bcc'" in r.detail and "python3-bpfcc" in r.hint


def test_headers_are_looked_up_for_the_running_kernel() -> None:
    r = doctor.check_headers(fake_host())
    assert r.ok and r.detail == f"/lib/modules/{RELEASE}/build → /usr/src/linux-headers-6.1.0-56-amd64"
    r = doctor.check_headers(fake_host(paths={"/lib/modules/6.1.0-56-amd64/build/include"}))
    assert not r.ok and f"/lib/modules/{RELEASE}/build/include missing" in r.detail and "make setup" in r.hint


def test_socket_matching_passes_without_v1_net_controllers_and_says_what_it_read() -> None:
    r = doctor.check_socket_matching(fake_host())
    assert r.ok
    assert r.detail == (
        "net_cls/net_prio not on cgroup v1, no warning logged; "
        "checked mountinfo, /proc/cgroups, kernel log via /dev/kmsg"
    )


def test_socket_matching_fails_when_the_kernel_logged_the_switch() -> None:
    r = doctor.check_socket_matching(fake_host(kernel_log=("dmesg", KMSG_DISABLED)))
    assert not r.ok and "disabling cgroup2 socket matching" in r.detail and "reboot" in r.hint


def test_unreadable_kernel_log_is_not_a_failure_but_is_reported() -> None:
    r = doctor.check_socket_matching(fake_host(kernel_log=None))
    assert r.ok and "kernel log not readable, skipped" in r.detail


@pytest.mark.parametrize(
    "files",
    [{"/proc/self/mountinfo": HYBRID_MOUNTINFO + NET_CLS_LINE}, {"/proc/cgroups": PROC_CGROUPS_NET_BOUND}],
    ids=["mounted", "bound-in-proc-cgroups"],
)
def test_v1_net_controllers_fail_before_5_15_and_pass_after(files: dict[str, str]) -> None:
    # The minimum kernel (5.17) is above 5.15, so on a supported kernel v1 net_cls is reported, not failed.
    new = doctor.check_socket_matching(fake_host(files=files))
    assert new.ok and "net_cls" in new.detail and "harmless since Linux 5.15" in new.detail
    old = doctor.check_socket_matching(fake_host(files=files, release="5.10.0-32-amd64"))
    assert not old.ok and "net_cls" in old.detail and "cgroup_no_v1=net_cls,net_prio" in old.hint


def test_mounted_net_cls_names_the_mount_point() -> None:
    host = fake_host(files={"/proc/self/mountinfo": HYBRID_MOUNTINFO + NET_CLS_LINE})
    r = doctor.check_socket_matching(host)
    where = "/sys/fs/cgroup/net_cls,net_prio"
    assert r.detail.startswith(f"net_cls mounted at {where}, net_prio mounted at {where}")


def test_proc_cgroups_unreadable_is_tolerated() -> None:
    host = fake_host()
    texts = {"/proc/self/mountinfo": HYBRID_MOUNTINFO}

    def read_text(path: str) -> str:
        if path not in texts:
            raise PermissionError(errno.EACCES, "denied", path)
        return texts[path]

    r = doctor.check_socket_matching(replace(host, read_text=read_text))
    assert r.ok and "/proc/cgroups" not in r.detail


# ---- parsing ---------------------------------------------------------------------------------------


def test_source_ip_fails_when_the_probe_is_refused_or_sees_another_address() -> None:
    def refused() -> str:
        raise OSError(errno.EPERM, "Operation not permitted")

    r = by_name(fake_host(probe_source_ip=refused))["source-ip"]
    assert not r.ok and "Operation not permitted" in r.detail and "--no-preserve-source-ip" in r.hint
    r = by_name(fake_host(probe_source_ip=lambda: doctor.PROBE_POD_IP))["source-ip"]
    assert not r.ok and f"saw {doctor.PROBE_POD_IP}" in r.detail
    assert by_name(fake_host())["source-ip"].ok


def test_parse_mountinfo_reads_optional_fields_and_escapes() -> None:
    text = r"36 35 98:0 /mnt1 /mnt/a\040b rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue"
    assert doctor.parse_mountinfo(text + "\nbroken line\n") == [
        doctor.Mount("/mnt/a b", "ext3", ("rw", "errors=continue"))
    ]


def test_v1_bound_controllers_skips_header_unbound_and_disabled() -> None:
    text = PROC_CGROUPS_NET_BOUND + "pids\t8\t1\t0\n"
    assert doctor.v1_bound_controllers(text) == {"cpu", "memory", "net_cls", "net_prio"}


def test_trivial_program_is_r0_1_exit() -> None:
    assert doctor.TRIVIAL_PROG.hex() == "b700000001000000" + "9500000000000000"


# ---- running and output ----------------------------------------------------------------------------


def test_a_crashing_check_becomes_a_failure_line() -> None:
    def check_boom(host: Host) -> CheckResult:
        raise RuntimeError("boom")

    results = doctor.run_checks(fake_host(), [doctor.check_root, check_boom])
    assert results[1] == CheckResult("boom", False, "check crashed: RuntimeError: boom")


def test_text_output_is_one_aligned_line_per_check() -> None:
    results = [CheckResult("root", True, "running as root (euid 0)"),
               CheckResult("cgroup2-sockets", False, "bad", "fix it")]
    assert doctor.render_text(results).splitlines() == [
        "PASS root             running as root (euid 0)",
        "FAIL cgroup2-sockets  bad — hint: fix it",
    ]


def run_cli(monkeypatch: pytest.MonkeyPatch, host: Host, *args: str) -> tuple[int, str]:
    # Only the doctor command is mounted: the rest of the CLI's imports are not under test here.
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("doctor")(doctor.doctor_command)
    monkeypatch.setattr(doctor, "Host", lambda: host)
    result = CliRunner().invoke(app, ["doctor", *args])
    return result.exit_code, result.output


def test_cli_exits_0_when_all_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_cli(monkeypatch, fake_host())
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(doctor.CHECKS) and all(ln.startswith("PASS ") for ln in lines)


def test_cli_exits_1_on_any_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_cli(monkeypatch, fake_host(euid=1000))
    assert code == 1
    assert [ln for ln in out.splitlines() if ln.startswith("FAIL")] == [
        "FAIL root             running as euid 1000 — hint: run as root: sudo nodemesh doctor"
    ]


def test_cli_json_output_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_cli(monkeypatch, fake_host(load_prog=refuse(errno.EPERM)), "-o", "json")
    assert code == 1
    report = json.loads(out)
    assert set(report) == {"ok", "checks"} and report["ok"] is False
    assert all(set(c) == {"name", "ok", "detail", "hint"} for c in report["checks"])
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["sk_lookup", "connect4"]
    root = {"name": "root", "ok": True, "detail": "running as root (euid 0)", "hint": ""}
    assert report["checks"][0] == root


def test_cli_json_all_pass_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_cli(monkeypatch, fake_host(), "-o", "json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_cli_rejects_unknown_output(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_cli(monkeypatch, fake_host(), "-o", "yaml")
    assert code == 2 and "want text or json" in out
