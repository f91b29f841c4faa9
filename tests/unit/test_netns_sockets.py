"""NetnsSockets: batched socket creation per netns, refill, drop.

Unit tests need no root, so the sockets are real but made without setns (`plain`); entering a netns
is `make_sockets`' one job, which the e2e tests exercise in the lab."""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent.datapath.errors import DatapathError
from agent.proxy.netns_sockets import NetnsSockets, connect, make_sockets


def plain(count: int) -> list[socket.socket]:
    out = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    for s in out:
        s.setblocking(False)
    return out


class Maker:
    """Counted calls; `fail` makes the next calls raise like a vanished netns."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.made: list[socket.socket] = []
        self.fail = False

    def __call__(self, path: str, count: int) -> list[socket.socket]:
        self.calls.append((path, count))
        if self.fail:
            raise DatapathError(f"netns {path}", "cannot open: No such file or directory")
        out = plain(count)
        self.made += out
        return out


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_one_batch_serves_many_takes_and_refills_below_low() -> None:
    make = Maker()
    pool = NetnsSockets(batch=8, low=3, make=make)
    socks = [await pool.take("/run/netns/a") for _ in range(5)]
    assert make.calls == [("/run/netns/a", 8)]  # one thread hop for five sockets
    assert len({s.fileno() for s in socks}) == 5
    socks.append(await pool.take("/run/netns/a"))  # leaves 2 < low: a refill of 6 starts
    await settle()
    assert make.calls == [("/run/netns/a", 8), ("/run/netns/a", 6)]
    assert pool.idle() == 8
    for s in socks:
        s.close()
    pool.close()
    assert pool.idle() == 0
    assert all(s.fileno() == -1 for s in make.made)  # every socket closed: taken ones by us, idle by close


async def test_concurrent_takes_share_one_refill() -> None:
    make = Maker()
    pool = NetnsSockets(batch=4, low=1, make=make)
    socks = await asyncio.gather(*(pool.take("/n") for _ in range(10)))
    assert len({s.fileno() for s in socks}) == 10
    assert all(count == 4 for _, count in make.calls[:2])
    assert len(make.calls) <= 4  # 10 sockets from batches of 4, not a hop each
    for s in socks:
        s.close()
    pool.close()


async def test_a_vanished_netns_raises_and_a_later_take_tries_again() -> None:
    make = Maker()
    make.fail = True
    pool = NetnsSockets(batch=4, low=1, make=make)
    with pytest.raises(DatapathError):
        await pool.take("/gone")
    make.fail = False
    sock = await pool.take("/gone")  # not stuck on the failed refill
    sock.close()
    pool.close()


async def test_drop_closes_idle_sockets_and_a_late_refill_closes_its_own() -> None:
    make = Maker()
    pool = NetnsSockets(batch=4, low=3, make=make)
    first = await pool.take("/pod")  # 3 idle left = low: no refill yet
    second = await pool.take("/pod")  # 2 idle < low: a refill starts in a thread
    pool.drop("/pod")  # the pod left before the refill came back
    await settle()
    assert pool.idle() == 0
    first.close()
    second.close()
    assert all(s.fileno() == -1 for s in make.made)  # the late batch was closed, not kept
    third = await pool.take("/pod")  # a new pod with the same netns path gets new sockets
    assert third not in make.made[:4]
    third.close()
    pool.close()


async def test_a_take_waiting_on_a_dropped_pod_fails() -> None:
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    made: list[socket.socket] = []

    def slow(path: str, count: int) -> list[socket.socket]:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)
        out = plain(count)
        made.extend(out)
        return out

    pool = NetnsSockets(batch=2, low=1, make=slow)
    waiting = asyncio.create_task(pool.take("/pod"))
    await asyncio.sleep(0.05)
    pool.drop("/pod")
    gate.set()
    with pytest.raises(ConnectionAbortedError):
        await asyncio.wait_for(waiting, 5)
    assert made and all(s.fileno() == -1 for s in made)


def test_low_must_be_below_batch() -> None:
    with pytest.raises(ValueError):
        NetnsSockets(batch=4, low=4)


def test_make_sockets_in_a_missing_netns_raises_and_leaks_nothing() -> None:
    with pytest.raises(DatapathError):
        make_sockets("/nonexistent/netns", 3)


async def test_connect_reaches_a_listener_and_reports_a_refusal() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    sock = plain(1)[0]
    await asyncio.wait_for(connect(sock, ("127.0.0.1", port)), 2)
    accepted, peer = listener.accept()
    assert peer == sock.getsockname()
    accepted.close()
    sock.close()
    listener.close()  # nothing listens on `port` now
    refused = plain(1)[0]
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(connect(refused, ("127.0.0.1", port)), 2)
    refused.close()
