"""The `agent` Typer app (`nodemesh agent run ...`) and the top-level `nodemesh uninstall`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from agent.datapath.errors import DatapathError
from agent.enrolled_store import DEFAULT_STATE_ROOT
from agent.main import (
    RESYNC_INTERVAL,
    AgentOptions,
    configure_logging,
    loop_factory,
    run,
    uninstall,
)
from agent.proxy.conns import DEFAULT_MAX_CONNECTIONS
from agent.proxy.tunnel import DEFAULT_RECEIVE_BUDGET

app = typer.Typer(help="The nodemesh node agent (eBPF datapath, pod enrollment, relay).",
                  no_args_is_help=True)

_LEVELS = ("debug", "info", "warning", "error")


def _level(value: str) -> int:
    if value.lower() not in _LEVELS:
        raise typer.BadParameter(f"expected one of {', '.join(_LEVELS)}", param_hint="--log-level")
    return int(getattr(logging, value.upper()))


@app.command("run")
def run_command(
    node: Annotated[str, typer.Option("--node", help="This node's name (pins: /sys/fs/bpf/nodemesh/NODE)")],
    controller: Annotated[str, typer.Option("--controller", help="Controller gRPC HOST:PORT")],
    token: Annotated[Path, typer.Option("--token", help="File holding this node's bearer token")],
    ca: Annotated[Path, typer.Option("--ca", help="Trust bundle (PEM) for the controller's certificate")],
    pod_cgroup: Annotated[Path, typer.Option("--pod-cgroup", help="cgroup v2 directory holding the pods")],
    log_level: Annotated[
        str, typer.Option("--log-level", envvar="NODEMESH_LOG_LEVEL", help="debug|info|warning|error")
    ] = "info",
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Runtime state root (enrolled pods)")]
    = DEFAULT_STATE_ROOT,
    server_name: Annotated[
        str | None, typer.Option("--server-name", help="Name to check in the controller's certificate")
    ] = None,
    resync_interval: Annotated[float, typer.Option("--resync-interval", help="Seconds between resyncs")]
    = RESYNC_INTERVAL,
    trust_domain: Annotated[str, typer.Option("--trust-domain", help="Until the first push says")]
    = "cluster.local",
    metrics_listen: Annotated[str, typer.Option("--metrics-listen", help="Prometheus HOST:PORT ('' = off)")]
    = "0.0.0.0:15020",
    admin_socket: Annotated[Path | None, typer.Option("--admin-socket", help="Admin API Unix socket")] = None,
    flow_ring_size: Annotated[int, typer.Option("--flow-ring-size", help="Flow records kept", min=1)]
    = 10_000,
    preserve_source_ip: Annotated[
        bool, typer.Option(
            "--preserve-source-ip/--no-preserve-source-ip",
            help="Apps see the peer's IP (policy routing in each pod netns); off: their own pod IP",
        )
    ] = True,
    proxy_workers: Annotated[
        int, typer.Option(
            "--proxy-workers", envvar="NODEMESH_PROXY_WORKERS", min=1, max=64,
            help="Processes that carry traffic, this one included (SO_REUSEPORT listeners)",
        )
    ] = 1,
    worker_index: Annotated[
        int, typer.Option("--worker-index", hidden=True, min=0, help="Set by the main process for a worker")
    ] = 0,
    max_connections: Annotated[
        int, typer.Option(
            "--max-connections", min=1,
            help="Connections and HBONE streams each proxy process admits (docs/proxy.md: Limits)",
        )
    ] = DEFAULT_MAX_CONNECTIONS,
    max_connections_per_source: Annotated[
        int | None, typer.Option(
            "--max-connections-per-source", min=1,
            help="Of those, what one source IP may hold (default: half of --max-connections)",
        )
    ] = None,
    max_hbone_queued_mib: Annotated[
        int, typer.Option(
            "--max-hbone-queued-mib", min=16, envvar="NODEMESH_MAX_HBONE_QUEUED_MIB",
            help="HBONE bytes received and not yet taken by slow apps, per proxy process, before the "
            "connection queueing most is cut off (docs/hbone.md: Abusive peers)",
        )
    ] = DEFAULT_RECEIVE_BUDGET // (1024 * 1024),
    event_loop: Annotated[
        str, typer.Option(
            "--event-loop",
            envvar="NODEMESH_EVENT_LOOP",
            help="auto (uvloop when installed) | uvloop | asyncio",
        )
    ] = "auto",
) -> None:
    """Load the datapath, follow the controller, enroll this node's pods; stop on SIGTERM/SIGINT."""
    configure_logging(_level(log_level), worker_index)
    try:
        factory = loop_factory(event_loop)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--event-loop") from exc
    if max_connections_per_source is not None and max_connections_per_source > max_connections:
        raise typer.BadParameter(
            f"{max_connections_per_source} is more than --max-connections ({max_connections})",
            param_hint="--max-connections-per-source",
        )
    if not pod_cgroup.is_dir():
        raise typer.BadParameter(f"{pod_cgroup} is not a directory", param_hint="--pod-cgroup")
    options = AgentOptions(
        node, controller, token, ca, pod_cgroup, state_dir, server_name, resync_interval,
        trust_domain=trust_domain, metrics_listen=metrics_listen or None, admin_socket=admin_socket,
        flow_ring_size=flow_ring_size, preserve_source_ip=preserve_source_ip,
        proxy_workers=proxy_workers, worker_index=worker_index, event_loop=event_loop, log_level=log_level,
        max_connections=max_connections, max_connections_per_source=max_connections_per_source,
        max_hbone_queued=max_hbone_queued_mib * 1024 * 1024,
    )  # fmt: skip
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            code = runner.run(run(options))
    except (OSError, ValueError, DatapathError) as exc:
        logging.getLogger("nodemesh.agent").error("event=agent_failed error=%r", str(exc))
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


def uninstall_command(
    node: Annotated[str, typer.Option("--node", help="Node whose datapath to remove")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Runtime state root of the agent")]
    = DEFAULT_STATE_ROOT,
) -> None:
    """Remove every eBPF program, link, cgroup attachment and pin of NODE (stop its agent first)."""
    configure_logging()
    try:
        uninstall(node, state_dir)
    except (OSError, DatapathError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"uninstalled node {node}")
