"""Controller push latency: 100 agents on one stream each, 20 mesh changes, change → every agent's ACK.

Run as a script (`python tests/bench/bench_controller.py [--yaml]`) or via pytest on tests/bench.
Two modes:
- default: the change is made in the in-memory mesh model and announced with `notify_changed()`
  (the server's push path alone); writes bench-results/controller.json.
- `--yaml`: the real controller (`controller.main.run`) over a YAML directory; the change is an
  edit of a policy file, so the figure includes the watcher (watchfiles), parsing and the registry;
  writes bench-results/controller-yaml.json.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from controller_fixtures import MemoryModel, assert_eventually, pod, policy

from agent.config_client import ConfigClient, ConfigUpdate
from controller.ca import CertificateAuthority
from controller.main import RunOptions
from controller.main import run as run_controller
from controller.server.app import ControllerServer

AGENTS = 100
CHANGES = 20
RESULTS = Path(__file__).resolve().parents[2] / "bench-results" / "controller.json"
YAML_RESULTS = RESULTS.with_name("controller-yaml.json")


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run_bench(agents: int = AGENTS, changes: int = CHANGES) -> dict[str, float]:
    model = MemoryModel(
        workloads=[
            pod(f"p{i}", "shop", "web", f"node{i}", f"10.0.{i // 250}.{i % 250 + 1}") for i in range(agents)
        ],
        policies=[policy("shop", "allow", "ALLOW")],
        tokens={f"tok{i}": f"node{i}" for i in range(agents)},
    )
    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.load_or_create(Path(tmp), "cluster.local")
        server = ControllerServer(model, ca)
        addrs = await server.start("127.0.0.1:0")
        acked_at: dict[int, float] = {}
        generation = 0

        def handler(i: int) -> Callable[[ConfigUpdate], str | None]:
            def on_update(update: ConfigUpdate) -> str | None:
                if not update.snapshot:
                    acked_at[i] = time.monotonic()
                return None

            return on_update

        clients = [
            ConfigClient(f"127.0.0.1:{addrs.grpc_port}", f"tok{i}", ca.trust_bundle_pem(), handler(i))
            for i in range(agents)
        ]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            await assert_eventually(
                lambda: all(c.known_versions for c in clients), 60, "all agents connected"
            )
            latencies: list[float] = []
            for generation in range(changes):
                acked_at.clear()
                start = time.monotonic()
                model.policies = [policy("shop", "allow", f"AUDIT{generation}")]
                server.notify_changed()
                await assert_eventually(lambda: len(acked_at) == agents, 30, f"change {generation} acked")
                latencies.extend(t - start for t in acked_at.values())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in clients:
                await c.close()
            await server.stop(0)
    return {
        "agents": agents,
        "changes": changes,
        "p50_ms": _percentile(latencies, 50) * 1000,
        "p99_ms": _percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
    }


def _yaml_mesh(agents: int) -> str:
    docs = []
    for i in range(agents):
        docs.append(
            "apiVersion: v1\nkind: Secret\n"
            f"metadata: {{name: node{i}, namespace: nodemesh-system}}\n"
            "type: nodemesh.io/node-token\n"
            f"stringData: {{node: node{i}, token: bench-token-{i:04d}-0123456789}}\n"
        )
        docs.append(
            "apiVersion: v1\nkind: Pod\n"
            f"metadata: {{name: p{i}, namespace: shop, labels: {{app: web}}}}\n"
            f"spec: {{nodeName: node{i}, serviceAccountName: web}}\n"
            f"status: {{podIP: 10.0.{i // 250}.{i % 250 + 1}}}\n"
        )
    return "---\n".join(docs)


def _yaml_policy(generation: int) -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: allow, namespace: shop, annotations: {{bench/generation: '{generation}'}}}}\n"
        "spec: {action: ALLOW}\n"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_yaml_bench(agents: int = AGENTS, changes: int = CHANGES) -> dict[str, float]:
    """File edit → every agent's ACK, through the real controller and its directory watcher."""
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        config, state = Path(tmp) / "config", Path(tmp) / "state"
        config.mkdir()
        (config / "mesh.yaml").write_text(_yaml_mesh(agents))
        policy_file = config / "policy.yaml"
        policy_file.write_text(_yaml_policy(-1))
        port = _free_port()
        stop = asyncio.Event()
        options = RunOptions(config, state, f"127.0.0.1:{port}", metrics_listen=None)
        controller = asyncio.create_task(run_controller(options, stop))
        await assert_eventually(lambda: (state / "ca.pem").is_file(), 30, "controller started")
        bundle = (state / "ca.pem").read_bytes()
        acked_at: dict[int, float] = {}

        def handler(i: int) -> Callable[[ConfigUpdate], str | None]:
            def on_update(update: ConfigUpdate) -> str | None:
                if not update.snapshot:
                    acked_at[i] = time.monotonic()
                return None

            return on_update

        clients = [
            ConfigClient(f"127.0.0.1:{port}", f"bench-token-{i:04d}-0123456789", bundle, handler(i))
            for i in range(agents)
        ]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            await assert_eventually(
                lambda: all(c.known_versions for c in clients), 60, "all agents connected"
            )
            for generation in range(changes):
                acked_at.clear()
                start = time.monotonic()
                policy_file.write_text(_yaml_policy(generation))
                await assert_eventually(lambda: len(acked_at) == agents, 30, f"change {generation} acked")
                latencies.extend(t - start for t in acked_at.values())
                await asyncio.sleep(0.1)  # separate edits, as a person or a CD pipeline would
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in clients:
                await c.close()
            stop.set()
            await controller
    return {
        "agents": agents,
        "changes": changes,
        "p50_ms": _percentile(latencies, 50) * 1000,
        "p99_ms": _percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
    }


def report(result: dict[str, float], path: Path = RESULTS, mode: str = "in-memory") -> None:
    print(f"{'mode':>14} {'agents':>8} {'changes':>8} {'p50 ms':>10} {'p99 ms':>10} {'max ms':>10}")
    print(
        f"{mode:>14} {result['agents']:>8.0f} {result['changes']:>8.0f} "
        f"{result['p50_ms']:>10.1f} {result['p99_ms']:>10.1f} {result['max_ms']:>10.1f}"
    )
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


async def test_push_to_ack_p99_under_one_second() -> None:
    result = await run_bench()
    report(result)
    assert result["p99_ms"] < 1000


async def test_yaml_edit_to_ack_p99_under_one_second() -> None:
    result = await run_yaml_bench()
    report(result, YAML_RESULTS, "yaml-watcher")
    assert result["p99_ms"] < 1000


if __name__ == "__main__":
    if "--yaml" in sys.argv[1:]:
        report(asyncio.run(run_yaml_bench()), YAML_RESULTS, "yaml-watcher")
    else:
        report(asyncio.run(run_bench()))
