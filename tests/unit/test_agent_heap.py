"""`agent.heap`: the frozen startup heap, the young generation's threshold, the GC pause histogram."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.heap import GEN0_THRESHOLD, GcPauses, settle

HIST = "nodemesh_agent_gc_pause_seconds"


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sample(registry: CollectorRegistry, suffix: str, generation: str, **labels: str) -> float | None:
    return registry.get_sample_value(HIST + suffix, {"generation": generation, **labels})


def test_a_pause_lands_in_the_buckets_at_or_above_it_and_in_the_sum() -> None:
    clock = Clock()
    pauses = GcPauses(clock=clock)
    registry = CollectorRegistry()
    registry.register(pauses)
    for generation, pause in ((0, 0.003), (0, 0.0002), (2, 0.2)):
        pauses._on_gc("start", {"generation": generation})
        clock.now += pause
        pauses._on_gc("stop", {"generation": generation, "collected": 0, "uncollectable": 0})
    assert _sample(registry, "_bucket", "0", le="0.0005") == 1
    assert _sample(registry, "_bucket", "0", le="0.0025") == 1
    assert _sample(registry, "_bucket", "0", le="0.005") == 2
    assert _sample(registry, "_bucket", "0", le="+Inf") == 2
    assert _sample(registry, "_count", "0") == 2
    assert _sample(registry, "_sum", "0") == pytest.approx(0.0032)
    assert _sample(registry, "_count", "1") == 0
    assert _sample(registry, "_bucket", "2", le="0.1") == 0  # longer than every bucket: +Inf only
    assert _sample(registry, "_bucket", "2", le="+Inf") == 1
    assert f"# TYPE {HIST} histogram" in generate_latest(registry).decode()


def test_installed_it_counts_real_collections_until_uninstalled() -> None:
    pauses = GcPauses()
    registry = CollectorRegistry()
    registry.register(pauses)
    pauses.install()
    pauses.install()  # twice is once
    gc.disable()  # only the collections below, none triggered by allocations in between
    try:
        gc.collect(0)
        gc.collect(2)
        assert _sample(registry, "_count", "0") == 1
        assert _sample(registry, "_count", "2") == 1
        assert (_sample(registry, "_sum", "2") or 0) > 0
    finally:
        pauses.uninstall()
        gc.enable()
    gc.collect(2)
    assert _sample(registry, "_count", "2") == 1
    pauses.uninstall()  # again: no error


@pytest.mark.usefixtures("restore_gc")
def test_settle_freezes_what_exists_and_raises_the_young_threshold() -> None:
    gen1, gen2 = gc.get_threshold()[1:]
    before = [object() for _ in range(10)]  # plain objects are not tracked; the list is
    frozen = settle()
    assert frozen == gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GEN0_THRESHOLD, gen1, gen2)
    # a collection after settle does not scan what was frozen: the list is in no generation
    assert not any(o is before for o in gc.get_objects())
    after: list[object] = []
    assert any(o is after for o in gc.get_objects())
