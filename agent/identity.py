"""The agent's workload certificate manager: one X.509-SVID per local identity, kept in memory, renewed.

For every identity that has a pod on this node (`ensure`/`release`, reference counted), it makes a key
and CSR (`api.csr`), has the controller sign it, checks the returned chain against the trust bundle
(`check_issued_chain`), and renews at half-life (not_before + TTL/2). When signing fails it keeps the
still-valid certificate and retries with capped exponential backoff (1 s doubling to 150 s), like
ztunnel's `src/identity/manager.rs`. Each Sign attempt has a deadline (`SIGN_TIMEOUT`): a controller
that takes the call and never answers is a failure like any other, retried with the same backoff.
The key never leaves memory; the last `release` drops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from cryptography import x509

from api.csr import WorkloadKey, check_issued_chain, new_workload_csr
from api.spiffe import SpiffeId

log = logging.getLogger(__name__)

DEFAULT_TTL = 24 * 3600
INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 150.0
# Per Sign attempt. Without one, a call that is never answered (a hung controller, a half-open TCP
# connection) would stop the renewal of that identity for good: the certificate runs out.
SIGN_TIMEOUT = 30.0

Signer = Callable[[bytes, int], Awaitable[list[bytes]]]
BundleProvider = Callable[[], bytes]
Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]
P = ParamSpec("P")
T = TypeVar("T")


async def _to_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    """A checked SVID and its key: `chain_pem` is leaf first, as `tls.server_context` takes it."""

    spiffe_id: SpiffeId
    chain_pem: list[bytes]
    key: WorkloadKey
    not_before: datetime
    not_after: datetime

    @property
    def renew_at(self) -> datetime:
        return self.not_before + (self.not_after - self.not_before) / 2

    def valid_at(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after


@dataclass(slots=True)
class _Entry:
    identity: SpiffeId
    refs: int = 0
    cert: WorkloadCertificate | None = None
    failures: int = 0
    last_error: str = ""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class CertificateManager:
    """Issues and renews the certificates of the identities whose pods run on this node."""

    def __init__(
        self,
        sign: Signer,
        bundle: BundleProvider,
        trust_domain: str,
        *,
        ttl: int = DEFAULT_TTL,
        clock: Clock = _utc_now,
        sleep: Sleep = asyncio.sleep,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        run_blocking: Callable[..., Awaitable[Any]] = _to_thread,
    ) -> None:
        self._sign = sign
        self._bundle = bundle
        self.trust_domain = trust_domain
        self._ttl = ttl
        self._clock = clock
        self._sleep = sleep
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._run_blocking = run_blocking
        self._entries: dict[SpiffeId, _Entry] = {}

    # -- reference counting by pods --
    def ensure(self, identity: SpiffeId) -> None:
        """One more local pod runs as `identity`: issue its certificate if it is the first."""
        if identity.trust_domain != self.trust_domain:
            raise ValueError(f"identity {identity} is not in trust domain {self.trust_domain!r}")
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry(identity)
            entry.task = asyncio.get_running_loop().create_task(self._run(entry), name=f"svid {identity}")
            log.info("event=identity_added identity=%s", identity)
        entry.refs += 1

    def release(self, identity: SpiffeId) -> None:
        """One pod of `identity` left; the last one drops the key and certificate."""
        entry = self._entries.get(identity)
        if entry is None:
            log.warning("event=identity_release_unknown identity=%s", identity)
            return
        entry.refs -= 1
        if entry.refs <= 0:
            del self._entries[identity]
            if entry.task is not None:
                entry.task.cancel()
            entry.cert = None
            log.info("event=identity_removed identity=%s", identity)

    # -- lookups --
    def certificate(self, identity: SpiffeId) -> WorkloadCertificate | None:
        """The current certificate, or None when there is none or it has expired."""
        entry = self._entries.get(identity)
        if entry is None or entry.cert is None or not entry.cert.valid_at(self._clock()):
            return None
        return entry.cert

    def get(self, identity: SpiffeId) -> tuple[list[bytes], WorkloadKey] | None:
        cert = self.certificate(identity)
        return None if cert is None else (cert.chain_pem, cert.key)

    async def wait_ready(self, identity: SpiffeId) -> WorkloadCertificate:
        """Wait until `identity` has a valid certificate (it must be `ensure`d)."""
        while True:
            entry = self._entries.get(identity)
            if entry is None:
                raise KeyError(f"identity {identity} is not managed on this node (ensure() it first)")
            cert = self.certificate(identity)
            if cert is not None:
                return cert
            entry.ready.clear()
            await entry.ready.wait()

    def status(self) -> list[dict[str, object]]:
        """One row per identity, for `nodemesh certs`."""
        rows: list[dict[str, object]] = []
        for identity, entry in sorted(self._entries.items(), key=lambda kv: str(kv[0])):
            cert = entry.cert
            rows.append(
                {
                    "identity": str(identity),
                    "pods": entry.refs,
                    "not_before": cert.not_before.isoformat() if cert else None,
                    "not_after": cert.not_after.isoformat() if cert else None,
                    "renew_at": cert.renew_at.isoformat() if cert else None,
                    "failures": entry.failures,
                    "last_error": entry.last_error,
                }
            )
        return rows

    async def close(self) -> None:
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        self._entries.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the per-identity loop --
    async def _issue(self, identity: SpiffeId) -> WorkloadCertificate:
        key, csr_pem = await self._run_blocking(new_workload_csr, identity)
        deadline = asyncio.timeout(SIGN_TIMEOUT)  # the module value at call time: tests shorten it
        try:
            async with deadline:
                chain = await self._sign(csr_pem, self._ttl)
        except TimeoutError:
            if not deadline.expired():  # the signer's own timeout: keep its message
                raise
            raise TimeoutError(f"no answer to Sign within {SIGN_TIMEOUT:g}s") from None
        leaf: x509.Certificate = await self._run_blocking(
            check_issued_chain, chain, key, identity, self._bundle(), now=self._clock
        )
        return WorkloadCertificate(
            spiffe_id=identity,
            chain_pem=list(chain),
            key=key,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    async def _run(self, entry: _Entry) -> None:
        backoff = self._initial_backoff
        while True:
            try:
                cert = await self._issue(entry.identity)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                entry.failures += 1
                entry.last_error = repr(exc)
                now = self._clock()
                if entry.cert is not None and not entry.cert.valid_at(now):
                    entry.cert = None
                log.warning(
                    "event=svid_issue_failed identity=%s failures=%d retry_in=%.1fs have_valid=%s error=%r",
                    entry.identity,
                    entry.failures,
                    backoff,
                    entry.cert is not None,
                    exc,
                )
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = self._initial_backoff
            entry.failures = 0
            entry.last_error = ""
            entry.cert = cert
            entry.ready.set()
            delay = (cert.renew_at - self._clock()).total_seconds()
            log.info(
                "event=svid_issued identity=%s not_after=%s renew_in=%.0fs",
                entry.identity,
                cert.not_after.isoformat(),
                delay,
            )
            await self._sleep(max(0.0, delay))
