"""The bcc implementation of :class:`~agent.datapath.interface.Datapath`.

Pins live under ``/sys/fs/bpf/nodemesh/<node>/``: ``maps/<map>``, ``progs/<prog>``,
``links/<prog>`` (cgroup attachments) and ``links/sk_lookup-<pod uid>`` (one per enrolled pod
netns). A pinned link keeps its attachment alive while the agent is away; a restarted agent
re-opens the pins instead of attaching again, so restarts never duplicate attachments.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Final

from agent.datapath import abi, bpfsys, source_ip
from agent.datapath.errors import DatapathError
from agent.datapath.interface import EnrolledPod, PodRef
from agent.datapath.netns import in_netns

log = logging.getLogger(__name__)

BPFFS_ROOT: Final = Path("/sys/fs/bpf/nodemesh")
BPF_SRC_DIR: Final = Path(__file__).resolve().parents[2] / "bpf"
# Concatenated into one bcc text: bcc only turns functions of the main text into programs.
BPF_SOURCES: Final = ("counters.c", "sock_addr.c", "sockops.c", "sk_lookup.c")
SO_NETNS_COOKIE: Final = 71
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # bpffs refuses "." in names (EPERM)

# program name -> (bcc prog type, expected attach type, cgroup attach type or None for netns)
_PROGS: Final[dict[str, tuple[int, int, int | None]]] = {
    "nm_connect4": (18, bpfsys.ATTACH_CGROUP_INET4_CONNECT, bpfsys.ATTACH_CGROUP_INET4_CONNECT),
    "nm_getpeername4": (18, bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME, bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME),
    "nm_sockops": (13, -1, bpfsys.ATTACH_CGROUP_SOCK_OPS),
    "nm_sk_lookup": (bpfsys.PROG_TYPE_SK_LOOKUP, bpfsys.ATTACH_SK_LOOKUP, None),
}
_BPFTOOL_MAP_TYPES: Final = {abi.MAP_HASH: "hash", abi.MAP_ARRAY: "array", abi.MAP_LRU_HASH: "lru_hash",
                             abi.MAP_SOCKHASH: "sockhash"}


def check_name(kind: str, value: str) -> str:
    """Node names and pod uids become bpffs path components: refuse anything else."""
    if not _NAME_RE.match(value):
        raise DatapathError(f"{kind} {value!r}", "must match [A-Za-z0-9][A-Za-z0-9_-]{0,62} (no dots: bpffs)")
    return value


def same_pod(held: EnrolledPod, pod: PodRef) -> EnrolledPod:
    """``held`` when it is the enrollment of ``pod``. Enroll is idempotent by key, so another ref
    under that key (a recreated sandbox: new netns or IP) must not get the old pod back as if
    enrolled: refused until the old ref is unenrolled."""
    if held.pod != pod:
        raise DatapathError(f"pod {pod.uid}", f"already enrolled with netns {held.pod.netns_path} ip "
                            f"{held.pod.ip}: unenroll that first")
    return held


def netns_cookie_of(sock: socket.socket) -> int:
    """SO_NETNS_COOKIE of the netns the socket was created in."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int(struct.unpack("=Q", raw)[0])


def _listener(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Lets a restarted agent listen while the old one drains, as ztunnel does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(1024)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class BccDatapath:
    """Loads ``bpf/`` with bcc, attaches it through pinned BPF links and manages enrolled pods."""

    def __init__(self, bpffs_root: Path = BPFFS_ROOT, *, preserve_source_ip: bool = True) -> None:
        self._root = bpffs_root
        self._preserve_source_ip = preserve_source_ip
        self._lock = threading.Lock()
        self._bpf: Any = None
        self._node: str | None = None
        self._prog_fds: dict[str, int] = {}
        self._map_fds: dict[str, int] = {}
        self._owned_fds: list[int] = []  # fds we opened ourselves (obj_get, link_create)
        self._pods: dict[str, EnrolledPod] = {}
        self._sk_links: dict[str, int] = {}

    # -- paths ------------------------------------------------------------------------------
    def node_dir(self, node: str) -> Path:
        """The pin directory of ``node``."""
        return self._root / check_name("node", node)

    def _dir(self) -> Path:
        if self._node is None:
            raise DatapathError("datapath", "not loaded: call load() first")
        return self.node_dir(self._node)

    # -- load -------------------------------------------------------------------------------
    def _pins_to_load(self, node: str) -> tuple[Path, dict[str, Path], dict[str, Path]]:
        """`node`'s pin directory and its map and program pins; refuses a second load (lock held)."""
        if self._node is not None:
            raise DatapathError(f"node {node}", f"datapath already loaded for node {self._node}")
        ndir = self.node_dir(node)
        return ndir, {m: ndir / "maps" / m for m in abi.MAP_SPECS}, {p: ndir / "progs" / p for p in _PROGS}

    def load(self, node: str, pod_cgroup: Path) -> None:
        """Load and attach every program (all or nothing); re-use complete pins of a previous run."""
        with self._lock:
            ndir, maps, progs = self._pins_to_load(node)
            present = [p.exists() for p in (*maps.values(), *progs.values())]
            try:
                cg_fd = os.open(pod_cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise DatapathError(f"pod cgroup {pod_cgroup}", f"cannot open: {exc.strerror}") from exc
            try:
                if all(present):
                    self._reuse(maps, progs)
                    mode = "reused"
                elif not any(present):
                    self._compile_and_pin(ndir, maps, progs)
                    mode = "loaded"
                else:
                    missing = [str(p) for p, ok in zip([*maps.values(), *progs.values()], present,
                                                       strict=True) if not ok]
                    raise DatapathError(f"pins under {ndir}",
                                        f"incomplete (missing {missing}); run uninstall for this node")
                self._node = node
                self._attach_cgroup(ndir, cg_fd, pod_cgroup)
                if self._preserve_source_ip:
                    source_ip.preload()  # here, not in the first enroll
            except BaseException:
                self._release()
                self._node = None
                raise
            finally:
                os.close(cg_fd)
            log.info("event=datapath_loaded node=%s mode=%s cgroup=%s", node, mode, pod_cgroup)

    def _reuse(self, maps: dict[str, Path], progs: dict[str, Path]) -> None:
        for name, path in maps.items():
            check_pinned_map(name, path)
            self._map_fds[name] = self._own(bpfsys.obj_get(str(path)))
        for name, path in progs.items():
            self._prog_fds[name] = self._own(bpfsys.obj_get(str(path)))

    def _compile_and_pin(self, ndir: Path, maps: dict[str, Path], progs: dict[str, Path]) -> None:
        from bcc import BPF  # imported lazily: unit tests of the fake never need bcc
        from bcc.libbcc import lib

        text = "".join((BPF_SRC_DIR / f).read_text() for f in BPF_SOURCES)
        try:
            self._bpf = BPF(text=text.encode(), cflags=[f"-I{BPF_SRC_DIR}"])
            for name, (ptype, atype, _) in _PROGS.items():
                self._prog_fds[name] = int(self._bpf.load_func(name.encode(), ptype, attach_type=atype).fd)
        except Exception as exc:
            raise DatapathError("bpf programs", f"compile/load failed: {exc}") from exc
        for name in abi.MAP_SPECS:
            fd = int(lib.bpf_table_fd(self._bpf.module, name.encode()))
            if fd < 0:
                raise DatapathError(f"map {name}", "not found in the compiled object")
            self._map_fds[name] = fd
        pinned: list[Path] = []
        try:
            for sub in ("maps", "progs", "links"):
                (ndir / sub).mkdir(parents=True, exist_ok=True)
            for name, path in maps.items():
                bpfsys.obj_pin(self._map_fds[name], str(path))
                pinned.append(path)
            for name, path in progs.items():
                bpfsys.obj_pin(self._prog_fds[name], str(path))
                pinned.append(path)
        except BaseException:
            for p in pinned:
                p.unlink(missing_ok=True)
            raise

    def _attach_cgroup(self, ndir: Path, cg_fd: int, pod_cgroup: Path) -> None:
        for name, (_, _, cg_type) in _PROGS.items():
            if cg_type is None:
                continue
            path = ndir / "links" / name
            if path.exists():
                self._own(bpfsys.obj_get(str(path)))
                continue
            fd = self._own(bpfsys.link_create(self._prog_fds[name], cg_fd, cg_type,
                                              f"attach {name} to {pod_cgroup}"))
            bpfsys.obj_pin(fd, str(path))

    def _own(self, fd: int) -> int:
        self._owned_fds.append(fd)
        return fd

    # -- pods -------------------------------------------------------------------------------
    def enroll(self, pod: PodRef) -> EnrolledPod:
        """Open the pod's listeners in its netns, record it in the maps, link sk_lookup there."""
        check_name("pod uid", pod.uid)
        try:
            ipaddress.IPv4Address(pod.ip)
        except ValueError as exc:
            raise DatapathError(f"pod {pod.uid}", f"ip {pod.ip!r} is not an IPv4 address") from exc
        with self._lock:
            ndir = self._dir()
            if pod.uid in self._pods:
                return same_pod(self._pods[pod.uid], pod)
            clash = [p.pod.uid for p in self._pods.values() if p.pod.ip == pod.ip]
            if clash:
                raise DatapathError(f"pod {pod.uid}",
                                    f"ip {pod.ip} already belongs to enrolled pod {clash[0]}")
            used = {p.pod_index for p in self._pods.values()}
            index = next(i for i in range(abi.MAX_PODS + 1) if i not in used)
            if index >= abi.MAX_PODS:
                raise DatapathError(f"pod {pod.uid}", f"node already has {abi.MAX_PODS} enrolled pods")
            link_path = ndir / "links" / f"sk_lookup-{pod.uid}"
            ep: EnrolledPod | None = None
            netns_fd = -1
            try:
                with in_netns(pod.netns_path):
                    ep = EnrolledPod(pod=pod, netns_cookie=0, pod_index=index)
                    # first: a listener is what tells others (the lab, a peer) that the pod is served
                    if self._preserve_source_ip:
                        ep.source_ip = _install_source_ip(pod)
                    else:  # an earlier run may have set it up: apps would still see the pod IP
                        with contextlib.suppress(OSError):
                            source_ip.remove()
                    ep.outbound = _listener("127.0.0.1", abi.PORT_OUTBOUND)
                    ep.inbound = _listener("0.0.0.0", abi.PORT_INBOUND)
                    ep.hbone = _listener("0.0.0.0", abi.PORT_HBONE)
                ep.netns_cookie = netns_cookie_of(ep.outbound)
                bpfsys.map_update(self._map_fds["inbound_listener"], abi.pack_ip4_key(pod.ip),
                                  abi.U32.pack(ep.inbound.fileno()), f"inbound_listener[{pod.ip}]")
                bpfsys.map_update(self._map_fds["pod_by_netns"], abi.U64.pack(ep.netns_cookie),
                                  abi.pack_pod_info(index), f"pod_by_netns[{pod.uid}]")
                if link_path.exists() and not _link_in_netns(link_path, pod.netns_path):
                    # A pin of an earlier enrollment of this key in another netns (a recreated
                    # sandbox, a lost record): re-using it would leave this netns without sk_lookup.
                    log.warning("event=stale_sk_lookup_link pod=%s netns=%s action=replace",
                                pod.uid, pod.netns_path)
                    link_path.unlink()
                if link_path.exists():
                    link_fd = bpfsys.obj_get(str(link_path))
                else:
                    netns_fd = os.open(pod.netns_path, os.O_RDONLY | os.O_CLOEXEC)
                    link_fd = bpfsys.link_create(self._prog_fds["nm_sk_lookup"], netns_fd,
                                                 bpfsys.ATTACH_SK_LOOKUP, f"sk_lookup link for pod {pod.uid}")
                    try:
                        bpfsys.obj_pin(link_fd, str(link_path))
                    except DatapathError:
                        os.close(link_fd)
                        raise
                self._sk_links[pod.uid] = link_fd
            except OSError as exc:
                self._rollback(pod, ep)
                raise DatapathError(f"pod {pod.uid}", f"enroll failed: {exc}") from exc
            except BaseException:
                self._rollback(pod, ep)
                raise
            finally:
                if netns_fd >= 0:
                    os.close(netns_fd)
            self._pods[pod.uid] = ep
            log.info("event=pod_enrolled pod=%s ip=%s netns_cookie=%d index=%d source_ip=%s",
                     pod.uid, pod.ip, ep.netns_cookie, index, "preserved" if ep.source_ip else "pod")
            return ep

    def _rollback(self, pod: PodRef, ep: EnrolledPod | None) -> None:
        if ep is not None and ep.source_ip:
            remove_source_ip(pod.netns_path)
        if ep is not None:
            if ep.netns_cookie:
                bpfsys.map_delete(self._map_fds["pod_by_netns"], abi.U64.pack(ep.netns_cookie))
            ep.close()
        bpfsys.map_delete(self._map_fds["inbound_listener"], abi.pack_ip4_key(pod.ip))

    def unenroll(self, pod: PodRef) -> None:
        """Remove the pod's link, listeners and map entries (idempotent)."""
        check_name("pod uid", pod.uid)
        with self._lock:
            ndir = self._dir()
            (ndir / "links" / f"sk_lookup-{pod.uid}").unlink(missing_ok=True)
            link_fd = self._sk_links.pop(pod.uid, None)
            if link_fd is not None:
                os.close(link_fd)
            ep = self._pods.pop(pod.uid, None)
            cookie = ep.netns_cookie if ep is not None else self._cookie_of_netns(pod.netns_path)
            if ep is not None:
                ep.close()
            removed = remove_source_ip(pod.netns_path)
            if ep is not None:
                # Only a pod this process holds: the kernel drops a sockhash entry when its socket
                # closes, so the entry at the IP of a pod held by no one (a previous run's leftover)
                # is gone or is the listener of another pod enrolled since with that IP.
                bpfsys.map_delete(self._map_fds["inbound_listener"], abi.pack_ip4_key(ep.pod.ip))
            stale = 0
            if cookie is not None:
                bpfsys.map_delete(self._map_fds["pod_by_netns"], abi.U64.pack(cookie))
                fd = self._map_fds["orig_dst_by_tuple"]
                for key in bpfsys.map_keys(fd, abi.TUPLE_KEY.size):
                    if abi.TUPLE_KEY.unpack(key)[0] == cookie and bpfsys.map_delete(fd, key):
                        stale += 1
            log.info("event=pod_unenrolled pod=%s netns_cookie=%s stale_entries=%d source_ip_removed=%s",
                     pod.uid, cookie, stale, removed)

    @staticmethod
    def _cookie_of_netns(path: str) -> int | None:
        try:
            with in_netns(path):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with s:
                return netns_cookie_of(s)
        except DatapathError:
            return None  # netns already gone: its sockets, and so its entries' users, are gone

    def enrolled(self) -> dict[str, EnrolledPod]:
        """Pods enrolled by this object, by uid."""
        with self._lock:
            return dict(self._pods)

    def original_destination(self, netns_cookie: int, peer: tuple[str, int]) -> tuple[str, int] | None:
        """Look up (listener netns cookie, peer port) in ``orig_dst_by_tuple``."""
        ip, port = peer
        # The 15001 listener is bound to 127.0.0.1 in the pod netns, so every peer is a socket of
        # that netns: from 127.0.0.1, or from the pod IP when the app bound it before connecting
        # (`curl --interface`, a client pinning its source address). The key is the port either way.
        if ip.count(".") != 3 or not 0 < port < 65536:
            return None
        raw = bpfsys.map_lookup(self._map_fds["orig_dst_by_tuple"], abi.pack_tuple_key(netns_cookie, port),
                                abi.ORIG_DST.size)
        return None if raw is None else abi.unpack_orig_dst(raw)

    def counters(self) -> dict[str, int]:
        """Read the ``counters`` array."""
        fd = self._map_fds["counters"]
        out: dict[str, int] = {}
        for name, idx in abi.COUNTERS.items():
            raw = bpfsys.map_lookup(fd, abi.U32.pack(idx), 8)
            out[name] = 0 if raw is None else int(struct.unpack("=Q", raw)[0])
        return out

    def map_entries(self, name: str) -> int:
        """Number of entries of a hash map (for leak checks and metrics)."""
        return len(bpfsys.map_keys(self._map_fds[name], abi.MAP_SPECS[name][1]))

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release this process's fds and listeners; pins (and so attachments) stay (agent exit)."""
        with self._lock:
            self._release()
            self._node = None

    def _release(self) -> None:
        for ep in self._pods.values():
            ep.close()
        self._pods.clear()
        for fd in (*self._sk_links.values(), *self._owned_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._sk_links.clear()
        self._owned_fds.clear()
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        self._prog_fds.clear()
        self._map_fds.clear()

    def uninstall(self, node: str) -> None:
        """Detach everything of ``node``: unpin links, programs and maps, remove the directory."""
        ndir = self.node_dir(node)
        with self._lock:
            if self._node == node:
                self._release()
                self._node = None
        # Links first: removing the last reference to a link detaches its program.
        for sub in ("links", "progs", "maps"):
            d = ndir / sub
            if d.is_dir():
                for p in d.iterdir():
                    p.unlink()
                d.rmdir()
        if ndir.is_dir():
            ndir.rmdir()
        log.info("event=datapath_uninstalled node=%s dir=%s", node, ndir)


def _install_source_ip(pod: PodRef) -> bool:
    """In the pod's netns (the caller entered it): set up source-IP preservation. A failure leaves
    the pod enrolled with its apps seeing the pod's own IP as the peer, and says so."""
    try:
        source_ip.install()
    except OSError as exc:
        log.warning("event=source_ip_setup_failed pod=%s error=%r action=apps_see_pod_ip", pod.uid, exc)
        with contextlib.suppress(OSError):
            source_ip.remove()
        return False
    return True


def _source_ip_installed(pod: PodRef) -> bool:
    """In the pod's netns (the caller entered it): whether the main process set up source-IP
    preservation there (a worker's connections to the apps then keep the caller's IP too)."""
    try:
        return source_ip.installed()
    except Exception as exc:  # pyroute2's NetlinkError is no OSError
        log.warning("event=source_ip_check_failed pod=%s error=%r action=apps_see_pod_ip", pod.uid, exc)
        return False


def remove_source_ip(netns_path: str) -> bool:
    """Undo source-IP preservation in a pod's netns; False when not set up there or the netns is
    gone (nothing left to undo). Never raises: unenrolling must go on."""
    if not netns_path:
        return False
    try:
        with in_netns(netns_path):
            return source_ip.remove()
    except DatapathError:
        return False  # netns gone, and with it the rule, the route and the sysctl
    except OSError as exc:
        log.warning("event=source_ip_remove_failed netns=%s error=%r", netns_path, exc)
        return False


def _link_in_netns(link_path: Path, netns_path: str) -> bool:
    """Whether the pinned sk_lookup link is attached to the netns at ``netns_path``: the link's
    ``netns_ino`` (0 once its netns is gone) is the nsfs inode of that netns."""
    info = bpfsys.bpftool_json("link", "show", "pinned", str(link_path))
    return isinstance(info, dict) and info.get("netns_ino") == os.stat(netns_path).st_ino


def check_pinned_map(name: str, path: Path) -> None:
    """bcc does not check a re-used map: compare type, key/value size and max entries."""
    mtype, ksize, vsize, max_entries = abi.MAP_SPECS[name]
    info = bpfsys.bpftool_json("map", "show", "pinned", str(path))
    want = {"type": _BPFTOOL_MAP_TYPES[mtype], "bytes_key": ksize, "bytes_value": vsize,
            "max_entries": max_entries}
    got = {k: info.get(k) for k in want}
    if got != want:
        raise DatapathError(f"pinned map {path}", f"layout {got} does not match {want}; "
                            "run uninstall for this node, then restart the agent")


class WorkerDatapath(BccDatapath):
    """The datapath of a proxy worker process (`agent/workers.py`): the main agent process owns
    the programs, maps, links and the pods' source-IP set-up; a worker only reads the pinned maps
    and opens its own listeners (SO_REUSEPORT, so they join the main process's) in the pods the
    main process has enrolled. Unenrolling closes them; uninstalling is the main process's job."""

    def __init__(self, bpffs_root: Path = BPFFS_ROOT, *, enrolled_wait: float = 5.0) -> None:
        super().__init__(bpffs_root, preserve_source_ip=False)
        self._enrolled_wait = enrolled_wait

    def load(self, node: str, pod_cgroup: Path) -> None:
        """Open the main process's pins (all of them, or fail); attach nothing."""
        with self._lock:
            _, maps, progs = self._pins_to_load(node)
            missing = [str(p) for p in (*maps.values(), *progs.values()) if not p.exists()]
            if missing:
                raise DatapathError(f"node {node}", "the main agent process has not loaded the datapath: "
                                    f"{len(missing)} pins missing, e.g. {missing[0]}")
            try:
                self._reuse(maps, progs)
            except BaseException:
                self._release()
                raise
            self._node = node
        source_ip.preload()
        log.info("event=datapath_opened node=%s mode=worker", node)

    def enroll(self, pod: PodRef) -> EnrolledPod:
        """Open listeners in the pod's netns once the main process has enrolled it (waits up to
        `enrolled_wait` seconds for its `pod_by_netns` entry, then fails: retried on the next pass)."""
        check_name("pod uid", pod.uid)
        with self._lock:
            self._dir()
            if pod.uid in self._pods:
                return same_pod(self._pods[pod.uid], pod)
        # The netns's cookie first, and listeners only once the main process serves the pod: a
        # listener in the reuseport group takes its share of new connections at once.
        index = self._wait_enrolled(pod, self._cookie_of_netns(pod.netns_path))
        ep = EnrolledPod(pod=pod, netns_cookie=0, pod_index=index)
        try:
            with in_netns(pod.netns_path):
                ep.outbound = _listener("127.0.0.1", abi.PORT_OUTBOUND)
                ep.inbound = _listener("0.0.0.0", abi.PORT_INBOUND)
                ep.hbone = _listener("0.0.0.0", abi.PORT_HBONE)
                ep.source_ip = _source_ip_installed(pod)
            ep.netns_cookie = netns_cookie_of(ep.outbound)
        except OSError as exc:
            ep.close()
            raise DatapathError(f"pod {pod.uid}", f"worker enroll failed: {exc}") from exc
        except BaseException:
            ep.close()
            raise
        with self._lock:
            if pod.uid in self._pods:  # raced with another enroll of the same pod
                ep.close()
                return same_pod(self._pods[pod.uid], pod)
            self._pods[pod.uid] = ep
        log.info("event=pod_enrolled pod=%s ip=%s netns_cookie=%d index=%d source_ip=%s mode=worker",
                 pod.uid, pod.ip, ep.netns_cookie, index, "preserved" if ep.source_ip else "pod")
        return ep

    def _wait_enrolled(self, pod: PodRef, cookie: int | None) -> int:
        if cookie is None:
            raise DatapathError(f"pod {pod.uid}", f"netns {pod.netns_path} is gone")
        deadline = time.monotonic() + self._enrolled_wait
        while True:
            raw = bpfsys.map_lookup(self._map_fds["pod_by_netns"], abi.U64.pack(cookie), abi.POD_INFO.size)
            if raw is not None:
                return int(abi.POD_INFO.unpack(raw)[0])
            if time.monotonic() >= deadline:
                raise DatapathError(f"pod {pod.uid}", "not enrolled by the main agent process yet")
            time.sleep(0.05)

    def unenroll(self, pod: PodRef) -> None:
        """Close this worker's listeners of the pod (the main process removes its map entries)."""
        with self._lock:
            ep = self._pods.pop(pod.uid, None)
        if ep is not None:
            ep.close()
            log.info("event=pod_unenrolled pod=%s mode=worker", pod.uid)

    def uninstall(self, node: str) -> None:
        raise DatapathError(f"node {node}", "a proxy worker never uninstalls: the main agent process does")
