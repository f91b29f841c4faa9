"""`agent run`: load the datapath, follow the controller's config stream, enroll this node's pods.

``NodeAgent`` is the thin asyncio layer around :mod:`agent.node`: each push updates the node's
config view and wakes one reconcile task, which executes the plan (datapath calls on a worker
thread, relay listeners on the loop). Exit (SIGTERM/SIGINT) closes listeners and keeps pins, so a
restarted agent re-uses programs, maps and links; ``uninstall`` removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry

from agent.admin.flow_feed import WorkerFlowFeed
from agent.admin.flows import FlowRing
from agent.admin.paths import admin_socket_path
from agent.admin.peers import WorkerPeers
from agent.admin.server import AdminError, AdminServer
from agent.config_client import ConfigClient, ConfigUpdate
from agent.datapath.bcc_datapath import BPFFS_ROOT, BccDatapath, WorkerDatapath, remove_source_ip
from agent.datapath.errors import DatapathError
from agent.datapath.interface import Datapath, EnrolledPod, PodRef
from agent.enrolled_store import DEFAULT_STATE_ROOT, EnrolledStore
from agent.heap import GcPauses, settle
from agent.identity import CertificateManager
from agent.node import Addr, NodeConfig, Plan, Reconciler, Skipped, desired_pods, vip_map
from agent.proxy import conns, tunnel
from agent.proxy.metrics import ProxyMetrics
from agent.proxy.server import NodeProxy
from agent.relay import Relay
from agent.sources import AgentSources, LinkState
from agent.telemetry import METRICS_PORT, AgentCollector, MetricsServer, merged_registry
from agent.workers import WorkerSupervisor, die_with_parent, worker_id_prefix, worker_socket_path
from api import logsink
from api.resources import PolicyObject

log = logging.getLogger("nodemesh.agent")

RESYNC_INTERVAL = 5.0  # seconds between reconciles without a push (retries, vanished netns)
LOG_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(name: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop the agent runs on: `uvloop` (libuv; its socket transports are Cython, which cut the
    proxy's per-byte CPU; HBONE's TLS is `agent.proxy.tls_transport` on either loop), `asyncio` (the
    standard library's), or `auto`: uvloop when it is installed. None means asyncio's default.
    ValueError for an unknown name or a missing uvloop."""
    if name not in EVENT_LOOPS:
        raise ValueError(f"unknown event loop {name!r}; expected one of {', '.join(EVENT_LOOPS)}")
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if name == "uvloop":
            raise ValueError("--event-loop uvloop: uvloop is not installed") from exc
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def configure_logging(level: int | str = logging.INFO, worker: int = 0) -> None:
    """Log records go to stderr through `api.logsink` (a bounded buffer and a writer thread): a
    write to a stalled log pipe must not stop the event loop. A proxy worker's lines say which."""
    fmt = LOG_FORMAT.replace(" logger=", f" worker={worker} logger=") if worker else LOG_FORMAT
    logsink.configure(fmt, level)


def log_records_dropped() -> int:
    """Log records the agent dropped since logging was configured (0 when it was not)."""
    return logsink.records_dropped()


def set_relay_vips(relay: Relay, vips: Mapping[Addr, Addr]) -> None:
    """Replace the placeholder relay's VIP table in place (it has no setter; the proxy replaces it)."""
    relay._vips.clear()
    relay._vips.update(vips)


class Carrier(Protocol):
    """What carries an enrolled pod's connections: the node proxy (or the placeholder relay)."""

    async def serve(self, ep: EnrolledPod) -> None: ...

    async def stop(self, pod_uid: str | None = None) -> None: ...


ConfigHook = Callable[["NodeConfig", ConfigUpdate], None]


class NodeAgent:
    """Keeps the datapath's enrolled pods and the carrier (proxy) equal to the node's config view."""

    def __init__(self, node: str, datapath: Datapath, relay: Carrier, store: EnrolledStore | None = None,
                 *, resync_interval: float = RESYNC_INTERVAL, on_config: ConfigHook | None = None) -> None:
        self.node = node
        self.config = NodeConfig()
        self.reconciler = Reconciler()
        self.stats = {"reconciles": 0, "enrolled": 0, "unenrolled": 0, "enroll_errors": 0,
                      "unenroll_errors": 0, "reconcile_errors": 0}
        self._dp = datapath
        self._relay = relay
        self._store = store
        self._resync = resync_interval
        self._wake = asyncio.Event()
        self._skipped: list[Skipped] = []
        self._vips: dict[Addr, Addr] = {}
        self._on_config = on_config

    def restore(self, leftover: Mapping[str, PodRef]) -> None:
        """Pods a previous agent process enrolled: reconciled against the first snapshot."""
        self.reconciler.leftover = dict(leftover)
        if leftover:
            log.info("event=restart_leftover pods=%s", ",".join(sorted(leftover)))

    def on_update(self, update: ConfigUpdate) -> str | None:
        """ConfigClient handler: record the push and wake the reconciler (ACK; enroll errors are
        node-local, not config errors, so they are logged and retried instead of NACKed)."""
        self.config.apply(update.upserts, update.removals, update.snapshot, update.trust_domain)
        if self._on_config is not None:
            self._on_config(self.config, update)
        elif isinstance(self._relay, Relay):
            vips = vip_map(self.config.services())
            if vips != self._vips:
                self._vips = vips
                set_relay_vips(self._relay, vips)
                log.info("event=vips_updated count=%d", len(vips))
        self._wake.set()
        return None

    async def run(self) -> None:
        """Reconcile on every push, and every ``resync_interval`` seconds (retries, vanished netns)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._resync)
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception as exc:  # never let one bad pass stop the agent
                self.stats["reconcile_errors"] += 1
                log.exception("event=reconcile_error error=%r", exc)

    async def reconcile(self) -> Plan:
        """One level-triggered pass; before the first snapshot it does nothing."""
        if not self.config.synced:
            return Plan()
        desired, skipped = desired_pods(self.config.workloads(), self.node)
        if skipped != self._skipped:
            self._skipped = skipped
            for s in skipped:
                log.error("event=pod_skipped workload=%s reason=%r", s.workload_uid, s.reason)
        vanished = [k for k, ref in self.reconciler.enrolled.items() if not os.path.exists(ref.netns_path)]
        for key in vanished:
            log.error("event=pod_netns_vanished pod=%s netns=%s action=release_and_retry",
                      key, self.reconciler.enrolled[key].netns_path)
        plan = self.reconciler.plan(desired, vanished)
        self.stats["reconciles"] += 1
        if not plan:
            return plan
        # Write ahead: a crash mid-plan must leave every pod that may hold pins on record. The record
        # holds one ref per key: a changed pod keeps its old ref (whose netns holds the pins) until
        # that one is released, then the new ref takes its place before it is enrolled.
        incoming = {r.uid: r for r in plan.enroll}
        self._save({**incoming, **self.reconciler.known()})
        still_held: set[str] = set()
        for ref in plan.unenroll:
            if not await self._unenroll(ref):
                still_held.add(ref.uid)
            elif ref.uid in incoming:
                self._save({**incoming, **self.reconciler.known()})
        for ref in plan.enroll:
            if ref.uid in still_held:
                # The datapath enrolls by key: the old enrollment must go first. Retried next pass.
                log.warning("event=pod_enroll_deferred pod=%s netns=%s reason=old_enrollment_not_released",
                            ref.uid, ref.netns_path)
                continue
            await self._enroll(ref)
        self._save(self.reconciler.known())
        log.info("event=reconciled enrolled=%d unenroll=%d enroll=%d failed=%d",
                 len(self.reconciler.enrolled), len(plan.unenroll), len(plan.enroll),
                 len(self.reconciler.failures))
        return plan

    async def _enroll(self, ref: PodRef) -> None:
        in_datapath = False
        try:
            ep = await asyncio.to_thread(self._dp.enroll, ref)
            in_datapath = True
            await self._relay.serve(ep)
        except Exception as exc:
            self.stats["enroll_errors"] += 1
            if in_datapath:  # the datapath holds the pod: keep it known, or nothing ever releases it
                self.reconciler.serve_failed(ref, str(exc))
            else:
                self.reconciler.enroll_failed(ref, str(exc))
            log.error("event=pod_enroll_failed pod=%s netns=%s ip=%s error=%r action=retry_later",
                      ref.uid, ref.netns_path, ref.ip, str(exc))
            return
        self.stats["enrolled"] += 1
        self.reconciler.enroll_succeeded(ref)
        log.debug("event=pod_serving pod=%s netns=%s ip=%s netns_cookie=%d",
                 ref.uid, ref.netns_path, ref.ip, ep.netns_cookie)

    async def _unenroll(self, ref: PodRef) -> bool:
        """Stop serving ``ref`` and release it in the datapath; False when that failed."""
        try:
            await self._relay.stop(ref.uid)
            await asyncio.to_thread(self._dp.unenroll, ref)
        except Exception as exc:
            self.stats["unenroll_errors"] += 1
            self.reconciler.unenroll_failed(ref, str(exc))
            log.error("event=pod_unenroll_failed pod=%s netns=%s error=%r action=retry_later",
                      ref.uid, ref.netns_path, str(exc))
            return False
        self.stats["unenrolled"] += 1
        self.reconciler.unenroll_succeeded(ref)
        log.debug("event=pod_released pod=%s netns=%s", ref.uid, ref.netns_path)
        return True

    def _save(self, pods: Mapping[str, PodRef]) -> None:
        if self._store is None:
            return
        try:
            self._store.save(pods)
        except OSError as exc:
            log.error("event=state_write_failed path=%s error=%r", self._store.path, exc)

    async def close(self) -> None:
        """Stop accepting and cancel open relays; enrolled pods and pins stay for the next start."""
        await self._relay.stop()


def pinned_pod_keys(node: str, bpffs_root: Path = BPFFS_ROOT) -> set[str]:
    """Pods with a pinned sk_lookup link (``links/sk_lookup-<key>``): enrolled by some earlier run."""
    links = bpffs_root / node / "links"
    try:
        return {p.name.removeprefix("sk_lookup-") for p in links.iterdir() if p.name.startswith("sk_lookup-")}
    except OSError:
        return set()


def leftover_pods(node: str, store: EnrolledStore, bpffs_root: Path = BPFFS_ROOT) -> dict[str, PodRef]:
    """What a previous run left enrolled: the state file, plus pinned links it does not know
    (netns and IP unknown: unenroll then unpins the link, the rest is inert until uninstall)."""
    pods = store.load()
    for key in pinned_pod_keys(node, bpffs_root) - set(pods):
        pods[key] = PodRef(uid=key, netns_path="", ip="")
    return pods


@dataclass(frozen=True, slots=True)
class AgentOptions:
    node: str
    controller: str
    token_file: Path
    ca_file: Path
    pod_cgroup: Path
    state_root: Path = DEFAULT_STATE_ROOT
    server_name: str | None = None
    resync_interval: float = RESYNC_INTERVAL
    trust_domain: str = "cluster.local"
    metrics_listen: str | None = f"0.0.0.0:{METRICS_PORT}"
    admin_socket: Path | None = None  # default /run/nodemesh/<node>/admin.sock
    flow_ring_size: int = 10_000
    preserve_source_ip: bool = True
    proxy_workers: int = 1  # processes carrying traffic, the main one included (agent/workers.py)
    worker_index: int = 0  # 0: the main process; >= 1: a proxy worker started by it
    event_loop: str = "auto"  # handed on to the workers
    log_level: str = "info"  # handed on to the workers
    max_connections: int = conns.DEFAULT_MAX_CONNECTIONS  # per proxy process, as each worker's
    max_connections_per_source: int | None = None  # one source IP's share of it; None: half
    max_hbone_queued: int = tunnel.DEFAULT_RECEIVE_BUDGET  # bytes, per proxy process (tunnel.ReceiveBudget)


def worker_argv(options: AgentOptions, index: int) -> list[str]:
    """The command line of proxy worker `index`: the main process's options and `--worker-index`."""
    argv = [
        sys.executable, "-m", "nodemesh.cli", "agent", "run",
        "--node", options.node, "--controller", options.controller,
        "--token", str(options.token_file), "--ca", str(options.ca_file),
        "--pod-cgroup", str(options.pod_cgroup), "--state-dir", str(options.state_root),
        "--resync-interval", str(options.resync_interval), "--trust-domain", options.trust_domain,
        "--flow-ring-size", str(options.flow_ring_size), "--event-loop", options.event_loop,
        "--log-level", options.log_level, "--worker-index", str(index),
        "--max-connections", str(options.max_connections),
        "--max-hbone-queued-mib", str(options.max_hbone_queued // (1024 * 1024)),
    ]  # fmt: skip
    if options.max_connections_per_source is not None:
        argv += ["--max-connections-per-source", str(options.max_connections_per_source)]
    if options.server_name:
        argv += ["--server-name", options.server_name]
    if options.admin_socket is not None:
        argv += ["--admin-socket", str(options.admin_socket)]
    return argv


def read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def _policies(config: NodeConfig) -> list[PolicyObject]:
    return [r for r in config.resources.values() if isinstance(r, PolicyObject)]


async def run(options: AgentOptions, stop: asyncio.Event | None = None) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT); returns the exit code."""
    token = read_token(options.token_file)
    ca_pem = options.ca_file.read_bytes()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
            loop.add_signal_handler(sig, stop.set)
    worker = options.worker_index
    if worker:
        if not die_with_parent():
            log.error("event=proxy_worker_orphaned worker=%d action=exit", worker)
            return 1
        conns.set_id_prefix(worker_id_prefix(worker))
    dp = WorkerDatapath() if worker else BccDatapath(preserve_source_ip=options.preserve_source_ip)
    try:
        await asyncio.to_thread(dp.load, options.node, options.pod_cgroup)
    except DatapathError as exc:
        log.error("event=datapath_load_failed node=%s error=%r", options.node, str(exc))
        return 2
    # The main process records what it enrolled (pins to clean up); a worker holds listeners only.
    store = None if worker else EnrolledStore(options.state_root / options.node)

    client: ConfigClient | None = None

    async def sign(csr_pem: bytes, ttl: int) -> list[bytes]:
        if client is None:
            raise ConnectionError("the config client is not started yet")
        return await client.sign(csr_pem, timedelta(seconds=ttl))

    ring = FlowRing(options.flow_ring_size)
    registry = CollectorRegistry(auto_describe=True)
    certs = CertificateManager(sign, lambda: ca_pem, options.trust_domain)
    proxy = NodeProxy(dp, certs, options.trust_domain, node=options.node, bundle=lambda: ca_pem,
                      flow_ring=ring, metrics=ProxyMetrics(registry), max_connections=options.max_connections,
                      max_connections_per_source=options.max_connections_per_source,
                      max_hbone_queued=options.max_hbone_queued)
    link = LinkState(options.controller, connected=lambda: client is not None and client.connected.is_set())

    def on_config(config: NodeConfig, update: ConfigUpdate) -> None:
        if config.trust_domain and config.trust_domain != certs.trust_domain:
            certs.trust_domain = config.trust_domain
        proxy.update(config.workloads(), config.services(), _policies(config),
                     trust_domain=config.trust_domain or None)
        link.last_push_nonce = update.nonce
        link.last_push_version = update.nonce
        link.last_push_at = time.time()

    agent = NodeAgent(options.node, dp, proxy, store, resync_interval=options.resync_interval,
                      on_config=on_config)
    if store is not None:
        agent.restore(leftover_pods(options.node, store))
    client = ConfigClient(options.controller, token, ca_pem, agent.on_update, server_name=options.server_name)
    sources = AgentSources(options.node, agent.config, proxy, certs, link, dp.counters,
                           lambda: len(agent.reconciler.enrolled), str(dp.node_dir(options.node)))
    registry.register(AgentCollector(options.node, dp.counters, proxy.stats, log_records_dropped))
    gc_pauses = GcPauses()
    registry.register(gc_pauses)
    main_socket = options.admin_socket or admin_socket_path(options.node)
    supervisor = (WorkerSupervisor(main_socket, options.proxy_workers, lambda i: worker_argv(options, i))
                  if not worker and options.proxy_workers > 1 else None)
    feed: WorkerFlowFeed | None = None
    exposed = registry
    if supervisor is not None:
        # one admin API and one exposition for the node: the workers' connections, flows and
        # metrics are merged into the main process's (agent/admin/peers.py, flow_feed.py, telemetry.py)
        feed = WorkerFlowFeed(supervisor.workers, ring)
        registry.register(feed)
        exposed = merged_registry(registry, supervisor.workers)
        admin = AdminServer(sources, ring, main_socket, peers=WorkerPeers(supervisor.workers),
                            metrics=exposed)
    else:
        admin = AdminServer(sources, ring, worker_socket_path(main_socket, worker) if worker else main_socket,
                            worker_index=worker)
    metrics_server: MetricsServer | None = None
    try:
        await admin.start()
        if options.metrics_listen and not worker:
            metrics_server = MetricsServer(exposed, options.metrics_listen)
    except (AdminError, OSError) as exc:
        log.error("event=agent_start_failed node=%s error=%r", options.node, str(exc))
        await admin.close()
        dp.close()
        return 2
    gc_pauses.install()
    frozen = settle()  # startup is done: its objects are never scanned again (agent/heap.py)
    log.info("event=agent_started node=%s controller=%s pod_cgroup=%s pid=%d gc_frozen=%d proxy_workers=%d",
             options.node, options.controller, options.pod_cgroup, os.getpid(), frozen,
             1 if worker else options.proxy_workers)
    if supervisor is not None:
        await supervisor.start()
    if feed is not None:
        await feed.start()
    tasks = {asyncio.create_task(client.run(), name="config"),
             asyncio.create_task(agent.run(), name="reconcile")}
    stop_wait = asyncio.create_task(stop.wait())
    code = 0
    try:
        done, _ = await asyncio.wait({*tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        for t in done & tasks:
            log.error("event=task_failed task=%s error=%r", t.get_name(), t.exception())
            code = 1
    finally:
        stop_wait.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if feed is not None:
            await feed.close()  # before the workers stop: their ends of its streams go with them
        if supervisor is not None:
            await supervisor.close()
        await agent.close()
        await certs.close()
        await admin.close()
        if metrics_server is not None:
            metrics_server.close()
        await client.close()
        dp.close()
        gc_pauses.uninstall()
    log.info("event=agent_stopped node=%s enrolled=%d pins=kept",
             options.node, len(agent.reconciler.enrolled))
    return code


def uninstall(node: str, state_root: Path = DEFAULT_STATE_ROOT, bpffs_root: Path = BPFFS_ROOT) -> None:
    """Remove every pin of ``node`` (links first, which detaches programs), the source-IP set-up
    of the recorded pods whose netns still exist, and the agent's record."""
    BccDatapath(bpffs_root).uninstall(node)
    store = EnrolledStore(state_root / node)
    for ref in store.load().values():
        remove_source_ip(ref.netns_path)
    store.remove()
