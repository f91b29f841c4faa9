"""The agent's garbage collector: startup objects frozen, a larger young generation, pauses measured.

CPython's cycle collector stops the event loop while it runs. With the defaults (a young-generation
collection every 700 net container allocations, a full one scanning every tracked object) the agent
under connection churn (bench_l4, ~1,000 new connections/s) collected the young generation ~20 times
a second and ran a full collection every few seconds that scanned the ~67,000 objects left from
startup (modules, bcc, grpc, pydantic models) and stopped the loop for 30-70 ms each time, while it
found almost no garbage: the proxy's per-connection objects are freed by reference counting.
`settle()` is called once startup is done: what exists then is frozen (`gc.freeze()`, never scanned
again; it is not garbage) and the young generation's threshold is raised, so transient allocation
bursts of a connection no longer trigger collections. `GcPauses` exports every collection's pause as
the `nodemesh_agent_gc_pause_seconds` histogram (by generation) so the effect stays visible.
Measured figures are in docs/agent.md "Garbage collector".
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import suppress
from itertools import accumulate
from typing import Any

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

GEN0_THRESHOLD = 10_000  # CPython's default is 700
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
GENERATIONS = 3


def settle(gen0_threshold: int = GEN0_THRESHOLD) -> int:
    """Freeze every object that exists now and raise the young generation's threshold.

    Call once, after startup (imports, datapath load, servers started). Returns how many objects are
    frozen. Frozen objects are still freed by reference counting; only a reference cycle among them
    would never be collected, which is why this runs once and not while traffic flows.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    return gc.get_freeze_count()


class GcPauses(Collector):
    """Every collection's pause, per generation, as a Prometheus histogram (a `gc.callbacks` hook).

    The hook only adds to lists (no lock: it runs under the GIL, inside whatever allocation
    triggered the collection, possibly while that thread holds a metrics lock); the histogram is
    built at scrape time.
    """

    def __init__(
        self, buckets: tuple[float, ...] = PAUSE_BUCKETS, clock: Callable[[], float] = time.perf_counter
    ):
        self._buckets = buckets
        self._clock = clock
        self._counts = [[0] * (len(buckets) + 1) for _ in range(GENERATIONS)]  # last: above every bucket
        self._seconds = [0.0] * GENERATIONS
        self._started = 0.0
        self._hook = self._on_gc  # one bound method, so uninstall removes what install added

    def install(self) -> None:
        if self._hook not in gc.callbacks:
            gc.callbacks.append(self._hook)

    def uninstall(self) -> None:
        with suppress(ValueError):
            gc.callbacks.remove(self._hook)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        pause = self._clock() - self._started
        generation = info["generation"]
        self._seconds[generation] += pause
        self._counts[generation][bisect_left(self._buckets, pause)] += 1

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "nodemesh_agent_gc_pause_seconds",
            "How long each garbage collection stopped the agent (CPython generation 0, 1 or 2)",
            labels=["generation"],
        )
        bounds = [*(repr(b) for b in self._buckets), "+Inf"]
        for generation in range(GENERATIONS):
            cumulative = accumulate(self._counts[generation])
            family.add_metric(
                [str(generation)],
                buckets=list(zip(bounds, cumulative, strict=True)),
                sum_value=self._seconds[generation],
            )
        yield family
