"""CertificateManager with a real CA, a fake clock and a sleep the test steps by hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.identity import CertificateManager
from api.spiffe import SpiffeId
from controller.ca.authority import CertificateAuthority

TD = "cluster.local"
ALICE = SpiffeId.for_workload(TD, "default", "alice")


@dataclass
class Steps:
    """Fake time: `sleep` parks the caller until the test calls `advance()`."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    parked: asyncio.Queue[tuple[float, asyncio.Future[None]]] = field(default_factory=asyncio.Queue)

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.parked.put((seconds, fut))
        await fut

    async def next_sleep(self) -> tuple[float, asyncio.Future[None]]:
        return await asyncio.wait_for(self.parked.get(), timeout=10)

    def wake(self, seconds: float, fut: asyncio.Future[None]) -> None:
        self.now += timedelta(seconds=seconds)
        fut.set_result(None)


@dataclass
class Signer:
    ca: CertificateAuthority
    fail: bool = False
    hang: bool = False  # the controller takes the call and never answers
    calls: int = 0
    ttls: list[int] = field(default_factory=list)

    async def __call__(self, csr_pem: bytes, ttl: int) -> list[bytes]:
        self.calls += 1
        self.ttls.append(ttl)
        if self.fail:
            raise ConnectionError("controller unreachable")
        if self.hang:
            await asyncio.Event().wait()
        return self.ca.sign(self.ca.validate_csr(csr_pem), timedelta(seconds=ttl)).chain_pem


async def inline(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[CertificateManager, Steps, Signer]]:
    steps = Steps()
    ca = CertificateAuthority.load_or_create(tmp_path, TD, clock=steps.clock)
    signer = Signer(ca)
    mgr = CertificateManager(
        signer, ca.trust_bundle_pem, TD, ttl=3600, clock=steps.clock, sleep=steps.sleep, run_blocking=inline
    )
    yield mgr, steps, signer
    await mgr.close()


async def test_issues_a_checked_certificate_and_schedules_renewal_at_half_life(
    env: tuple[CertificateManager, Steps, Signer],
) -> None:
    mgr, steps, signer = env
    mgr.ensure(ALICE)
    cert = await asyncio.wait_for(mgr.wait_ready(ALICE), 10)
    assert cert.spiffe_id == ALICE
    assert signer.ttls == [3600]
    got = mgr.get(ALICE)
    assert got is not None and got[0] == cert.chain_pem
    delay, _ = await steps.next_sleep()
    expected = (cert.not_before + (cert.not_after - cert.not_before) / 2 - steps.now).total_seconds()
    assert delay == pytest.approx(expected)


async def test_renews_at_half_life_with_a_new_key(env: tuple[CertificateManager, Steps, Signer]) -> None:
    mgr, steps, signer = env
    mgr.ensure(ALICE)
    first = await mgr.wait_ready(ALICE)
    delay, fut = await steps.next_sleep()
    steps.wake(delay, fut)
    await steps.next_sleep()  # the renewed certificate's own renewal wait
    second = mgr.certificate(ALICE)
    assert signer.calls == 2
    assert second is not None and second.chain_pem != first.chain_pem
    assert second.key is not first.key


async def test_backoff_doubles_to_the_cap_and_keeps_the_valid_cert(
    env: tuple[CertificateManager, Steps, Signer],
) -> None:
    mgr, steps, signer = env
    mgr.ensure(ALICE)
    first = await mgr.wait_ready(ALICE)
    renew_in, fut = await steps.next_sleep()
    signer.fail = True
    steps.wake(renew_in, fut)
    delays = []
    for _ in range(9):
        delay, fut = await steps.next_sleep()
        delays.append(delay)
        # a short outage: the still-valid certificate keeps being served
        if steps.now + timedelta(seconds=delay) < first.not_after:
            assert mgr.certificate(ALICE) == first
        fut.set_result(None)  # retry without moving time: only the backoff sequence is under test
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 150]
    assert mgr.status()[0]["failures"] == 9
    signer.fail = False
    delay, fut = await steps.next_sleep()
    steps.wake(delay, fut)
    await steps.next_sleep()
    renewed = mgr.certificate(ALICE)
    assert renewed is not None and renewed != first
    assert mgr.status()[0]["failures"] == 0


async def test_a_sign_call_that_never_answers_is_given_up_and_retried(
    env: tuple[CertificateManager, Steps, Signer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.identity.SIGN_TIMEOUT", 0.05)
    mgr, steps, signer = env
    mgr.ensure(ALICE)
    first = await mgr.wait_ready(ALICE)
    renew_in, fut = await steps.next_sleep()
    signer.hang = True
    steps.wake(renew_in, fut)
    retry, fut = await steps.next_sleep()  # not stuck in the call: the first backoff
    assert retry == 1
    status = mgr.status()[0]
    assert status["failures"] == 1 and "no answer to Sign within 0.05s" in str(status["last_error"])
    assert mgr.certificate(ALICE) == first  # still valid: still served
    signer.hang = False
    steps.wake(retry, fut)
    await steps.next_sleep()
    renewed = mgr.certificate(ALICE)
    assert signer.calls == 3 and renewed is not None and renewed != first


async def test_expired_certificate_is_not_served_while_the_controller_is_away(
    env: tuple[CertificateManager, Steps, Signer],
) -> None:
    mgr, steps, signer = env
    mgr.ensure(ALICE)
    cert = await mgr.wait_ready(ALICE)
    renew_in, fut = await steps.next_sleep()
    signer.fail = True
    steps.wake(renew_in, fut)
    _, fut = await steps.next_sleep()
    steps.wake((cert.not_after - steps.now).total_seconds() + 1, fut)
    await steps.next_sleep()
    assert mgr.get(ALICE) is None


async def test_reference_counted_by_pods_and_dropped_on_last_release(
    env: tuple[CertificateManager, Steps, Signer],
) -> None:
    mgr, _, signer = env
    mgr.ensure(ALICE)
    mgr.ensure(ALICE)
    await mgr.wait_ready(ALICE)
    assert signer.calls == 1
    mgr.release(ALICE)
    assert mgr.get(ALICE) is not None
    mgr.release(ALICE)
    assert mgr.get(ALICE) is None
    with pytest.raises(KeyError, match="not managed"):
        await mgr.wait_ready(ALICE)


async def test_foreign_trust_domain_is_refused(env: tuple[CertificateManager, Steps, Signer]) -> None:
    mgr, _, _ = env
    with pytest.raises(ValueError, match="trust domain"):
        mgr.ensure(SpiffeId.for_workload("other.domain", "a", "b"))


async def test_chain_for_another_identity_is_rejected(env: tuple[CertificateManager, Steps, Signer]) -> None:
    mgr, steps, signer = env
    bob = SpiffeId.for_workload(TD, "default", "bob")
    real_sign = signer.ca

    async def wrong(csr_pem: bytes, ttl: int) -> list[bytes]:
        from api.csr import new_workload_csr

        _, other_csr = new_workload_csr(bob)
        return real_sign.sign(real_sign.validate_csr(other_csr)).chain_pem

    mgr._sign = wrong
    mgr.ensure(ALICE)
    delay, fut = await steps.next_sleep()
    assert delay == 1
    assert mgr.get(ALICE) is None
    assert "IssuedChainError" in str(mgr.status()[0]["last_error"])
    fut.set_result(None)


async def test_key_generation_and_checks_run_in_a_worker_thread(tmp_path: Path) -> None:
    import threading

    steps = Steps()
    ca = CertificateAuthority.load_or_create(tmp_path, TD, clock=steps.clock)
    threads: set[str] = set()

    async def sign(csr_pem: bytes, ttl: int) -> list[bytes]:
        return ca.sign(ca.validate_csr(csr_pem), timedelta(seconds=ttl)).chain_pem

    async def recording(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def call() -> Any:
            threads.add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return await asyncio.to_thread(call)

    mgr = CertificateManager(
        sign, ca.trust_bundle_pem, TD, clock=steps.clock, sleep=steps.sleep, run_blocking=recording
    )
    mgr.ensure(ALICE)
    cert = await asyncio.wait_for(mgr.wait_ready(ALICE), 10)
    assert cert.spiffe_id == ALICE
    assert threads and threading.current_thread().name not in threads
    await mgr.close()
