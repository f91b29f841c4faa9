"""tunnel._Signal: asyncio.Event's semantics on a known loop."""

from __future__ import annotations

import asyncio

from agent.proxy.tunnel import _Signal


async def test_wait_returns_at_once_when_set_and_blocks_when_clear() -> None:
    sig = _Signal(asyncio.get_running_loop(), True)
    await asyncio.wait_for(sig.wait(), 1)
    sig.clear()
    assert not sig.is_set()
    waiters = [asyncio.create_task(sig.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    sig.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)  # every waiter woke
    assert sig.is_set()


async def test_a_cancelled_wait_leaves_no_waiter_behind() -> None:
    sig = _Signal(asyncio.get_running_loop())
    waiter = asyncio.create_task(sig.wait())
    await asyncio.sleep(0)
    assert len(sig._waiters) == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert sig._waiters == []
    sig.set()  # nothing to wake, nothing raises
