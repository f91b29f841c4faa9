"""`nodemesh lab up|down|status|exec|demo`: the local multi-node lab."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nodemesh.lab.lab import DEFAULT_STATE_DIR, Lab
from nodemesh.lab.system import LabError
from nodemesh.lab.topology import TopologyError, load_topology

app = typer.Typer(help="A local multi-node mesh in network namespaces.", no_args_is_help=True)

StateOpt = Annotated[Path, typer.Option("--state-dir", help="Where the lab keeps its state")]


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@app.command("up")
def up(
    config: Annotated[
        Path | None, typer.Option("--config", help="Topology file (default examples/lab)")
    ] = None,
    no_agents: Annotated[bool, typer.Option("--no-agents", help="Build the network only; no agents")] = False,
    proxy_workers: Annotated[
        int, typer.Option("--proxy-workers", min=1, max=64, help="Processes per agent that carry traffic")
    ] = 1,
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Remove leftovers of an earlier lab, then build nodes, pods, the controller and the agents."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        topo = load_topology(config)
        Lab(state_dir).up(topo, agents=not no_agents, proxy_workers=proxy_workers)
    except (LabError, TopologyError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"lab is up: {len(topo.nodes)} nodes, {len(topo.pods)} pods; `nodemesh lab status`")


@app.command("down")
def down(state_dir: StateOpt = DEFAULT_STATE_DIR) -> None:
    """Remove every netns, veth, bridge, cgroup, bpffs pin, route and process the lab made."""
    try:
        removed = Lab(state_dir).down()
    except LabError as exc:
        raise _fail(exc) from exc
    typer.echo(f"lab is down ({len(removed)} items removed)")


@app.command("status")
def status(
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Nodes, pods, services and the controller of the running lab."""
    try:
        st = Lab(state_dir).status()
    except LabError as exc:
        raise _fail(exc) from exc
    if output == "json":
        typer.echo(json.dumps(st, indent=2))
        return
    console = Console() if sys.stdout.isatty() else Console(width=200)
    ctl = st["controller"]
    console.print(
        f"lab {st['phase']}  state={st['stateDir']}  controller={ctl['address']} "
        f"({'running' if ctl['running'] else 'NOT running'})"
    )
    nodes = Table("NODE", "UNDERLAY IP", "POD CIDR", "AGENT", "NETNS")
    for n in st["nodes"]:
        nodes.add_row(
            n["name"], n["underlayIP"], n["podCIDR"], "running" if n["agentRunning"] else "-", n["netns"]
        )
    console.print(nodes)
    pods = Table("POD", "NAMESPACE", "SERVICE ACCOUNT", "NODE", "IP", "ENROLLED", "LABELS")
    for p in st["pods"]:
        pods.add_row(
            p["name"],
            p["namespace"],
            p["serviceAccount"],
            p["node"],
            p["ip"],
            "yes" if p["enrolled"] else "no",
            ",".join(f"{k}={v}" for k, v in p["labels"].items()),
        )
    console.print(pods)
    svcs = Table("SERVICE", "NAMESPACE", "VIP", "PORTS")
    for s in st["services"]:
        svcs.add_row(
            s["name"],
            s["namespace"],
            s["vip"],
            ",".join(f"{p['port']}->{p['targetPort']}" for p in s["ports"]),
        )
    console.print(svcs)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    ctx: typer.Context,
    pod: Annotated[str, typer.Argument(help="Pod name or namespace/name")],
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Run a command in a pod: `nodemesh lab exec client -- curl -s http://10.96.0.10:8000/`."""
    try:
        proc = Lab(state_dir).exec(pod, list(ctx.args), capture=False)
    except LabError as exc:
        raise _fail(exc) from exc
    raise typer.Exit(proc.returncode)


@app.command("demo")
def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Leave the lab up afterwards")] = False,
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Bring the default lab up, send real traffic between pods on two nodes, show it, tear down."""
    from nodemesh.lab.demo import run_demo

    try:
        code = run_demo(Lab(state_dir), keep=keep, out=sys.stdout)
    except (LabError, TopologyError) as exc:
        raise _fail(exc) from exc
    raise typer.Exit(code)
