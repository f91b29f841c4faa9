"""Controller push latency: 100 agents on one stream each, 20 mesh changes, change → every agent's ACK.

Run as a script (`python tests/bench/bench_controller.py`) or via pytest on tests/bench. Writes
bench-results/controller.json. The change is made in the in-memory mesh model and announced with
`notify_changed()` (the YAML watcher's own latency is measured by the registry's tests).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from controller_fixtures import MemoryModel, assert_eventually, pod, policy

from agent.config_client import ConfigClient, ConfigUpdate
from controller.ca import CertificateAuthority
from controller.server.app import ControllerServer

AGENTS = 100
CHANGES = 20
RESULTS = Path(__file__).resolve().parents[2] / "bench-results" / "controller.json"


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


def report(result: dict[str, float]) -> None:
    print(f"{'agents':>8} {'changes':>8} {'p50 ms':>10} {'p99 ms':>10} {'max ms':>10}")
    print(
        f"{result['agents']:>8.0f} {result['changes']:>8.0f} {result['p50_ms']:>10.1f} "
        f"{result['p99_ms']:>10.1f} {result['max_ms']:>10.1f}"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


async def test_push_to_ack_p99_under_one_second() -> None:
    result = await run_bench()
    report(result)
    assert result["p99_ms"] < 1000


if __name__ == "__main__":
    report(asyncio.run(run_bench()))
