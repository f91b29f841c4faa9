"""`nodemesh doctor` on the real machine: it passes here, and it names bpffs when bpffs is gone.

bpffs is removed only inside a private mount namespace (`unshare --mount --propagation private`), so
the host's /sys/fs/bpf and the pins other tests rely on are never touched; each test checks that.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent.datapath import bpfsys, source_ip
from nodemesh import doctor

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: bpf() syscall, mount namespaces"),
]
DOCTOR = [sys.executable, "-m", "nodemesh.cli", "doctor"]
# Stacked bpffs mounts are possible (each `mount -t bpf` adds one): unmount until none is left.
UNMOUNT_ALL_BPFFS = "while umount /sys/fs/bpf 2>/dev/null; do :; done"


def host_bpffs_mounts() -> int:
    with open("/proc/self/mountinfo") as f:
        mounts = doctor.parse_mountinfo(f.read())
    return sum(1 for m in mounts if (m.mount_point, m.fstype) == ("/sys/fs/bpf", "bpf"))


def in_private_mount_ns(script: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("unshare"), "unshare (util-linux) is needed"
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def host_bpffs_untouched() -> Iterator[None]:
    before = host_bpffs_mounts()
    assert before >= 1, "the host has no bpffs at /sys/fs/bpf: run make setup"
    yield
    assert host_bpffs_mounts() == before, "the host's bpffs mounts changed"


def test_doctor_passes_on_this_machine() -> None:
    proc = subprocess.run(DOCTOR, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(doctor.CHECKS) and all(ln.startswith("PASS ") for ln in lines), proc.stdout


def test_the_source_ip_probe_leaves_the_hosts_netns_as_it_was() -> None:
    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    def host_state() -> tuple[str, str, str]:
        return ip("rule"), ip("-o", "addr", "show", "lo"), source_ip.FWMARK_ACCEPT.read_text()

    before = host_state()
    assert doctor.probe_source_ip() == doctor.PROBE_CALLER_IP  # ran in its own netns, as root
    assert host_state() == before
    assert doctor.PROBE_POD_IP not in before[1] and f"lookup {source_ip.TABLE}" not in before[0]


def test_doctor_json_passes_on_this_machine() -> None:
    proc = subprocess.run([*DOCTOR, "-o", "json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} >= {"bpffs", "sk_lookup", "connect4"}


def test_doctor_fails_with_a_bpffs_line_when_bpffs_is_unmounted(host_bpffs_untouched: None) -> None:
    cmd = shlex.join(DOCTOR)
    # A second bpffs is stacked first, so the unmount loop is exercised on more than one mount.
    proc = in_private_mount_ns(f"mount -t bpf bpf /sys/fs/bpf && {UNMOUNT_ALL_BPFFS}; exec {cmd}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(failed) == 1, proc.stdout
    assert failed[0].split()[:2] == ["FAIL", "bpffs"]
    assert failed[0].endswith("not mounted at /sys/fs/bpf — hint: mount -t bpf bpf /sys/fs/bpf")


def test_doctor_json_names_only_bpffs_when_bpffs_is_unmounted(host_bpffs_untouched: None) -> None:
    proc = in_private_mount_ns(f"{UNMOUNT_ALL_BPFFS}; exec {shlex.join([*DOCTOR, '-o', 'json'])}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert [(c["name"], c["hint"]) for c in report["checks"] if not c["ok"]] == [
        ("bpffs", "mount -t bpf bpf /sys/fs/bpf")
    ]


def test_doctor_reports_stacked_bpffs_mounts(host_bpffs_untouched: None) -> None:
    proc = in_private_mount_ns(f"mount -t bpf bpf /sys/fs/bpf && exec {shlex.join([*DOCTOR, '-o', 'json'])}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bpffs = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "bpffs")
    assert bpffs["ok"] and "stacked mounts" in bpffs["detail"]


def test_the_kernel_refuses_a_mismatched_attach_type() -> None:
    # The real loader's failure path: sk_lookup with connect4's attach type is EINVAL, not a crash.
    doctor.load_trivial_prog(bpfsys.PROG_TYPE_SK_LOOKUP, bpfsys.ATTACH_SK_LOOKUP)
    with pytest.raises(OSError) as exc:
        doctor.load_trivial_prog(bpfsys.PROG_TYPE_SK_LOOKUP, bpfsys.ATTACH_CGROUP_INET4_CONNECT)
    assert exc.value.errno == errno.EINVAL
