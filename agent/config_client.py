"""The agent's client of the controller: the Config delta stream (with reconnect) and CSR signing.

`ConfigClient.run()` keeps a stream open, sends the versions it holds, hands each push to
`on_update` and ACKs it (or NACKs when `on_update` returns an error string or raises). After a
disconnect it reconnects with capped exponential backoff (10 ms → 15 s) and resends its versions,
so the controller sends only the difference. Sign calls have a deadline and the channel sends
HTTP/2 keepalive pings, so a hung controller or a half-open connection ends in an error (and a
retry) instead of a wait without end. No datapath imports here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

import grpc

from api.convert import from_proto
from api.resources import Resource
from api.v1 import nodemesh_pb2 as pb
from api.v1 import nodemesh_pb2_grpc as pb_grpc

log = logging.getLogger("nodemesh.agent.config")

BACKOFF_MIN = 0.01
BACKOFF_MAX = 15.0
# The gRPC deadline of one Sign call; below agent.identity.SIGN_TIMEOUT so that the call is cancelled
# on both ends (DEADLINE_EXCEEDED) before the certificate manager gives up on it.
SIGN_TIMEOUT = 20.0
# Keepalive pings notice a dead connection (a half-open TCP connection would hold the Config stream
# for hours). The controller's gRPC server keeps gRPC's default ping policy: a ping less than 5
# minutes after the previous one while no data flows is a strike, and the third strike closes the
# connection (GOAWAY too_many_pings). So ping less often than that, and only while a call is open
# (the Config stream always is; pings without calls would be strikes too).
KEEPALIVE_TIME = 330.0
KEEPALIVE_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    """One push from the controller, already converted to the resource model."""

    upserts: tuple[tuple[str, str, Resource], ...]
    removals: tuple[str, ...]
    snapshot: bool
    trust_domain: str
    nonce: str


UpdateHandler = Callable[[ConfigUpdate], str | None]


class ConfigClient:
    """Config stream + Sign client for one node (identified by its bearer token)."""

    def __init__(
        self,
        address: str,
        token: str,
        ca_bundle_pem: bytes,
        on_update: UpdateHandler,
        *,
        known_versions: dict[str, str] | None = None,
        server_name: str | None = None,
        keepalive: tuple[float, float] | None = (KEEPALIVE_TIME, KEEPALIVE_TIMEOUT),
        sign_timeout: float = SIGN_TIMEOUT,
    ) -> None:
        """`keepalive`: (seconds between pings, seconds to wait for the answer), None for none."""
        self.address = address
        self.known_versions: dict[str, str] = dict(known_versions or {})
        self.connected = asyncio.Event()
        self._token = token
        self._on_update = on_update
        self._sign_timeout = sign_timeout
        options: list[tuple[str, str | int]] = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if keepalive is not None:
            interval, timeout = keepalive
            options += [
                ("grpc.keepalive_time_ms", int(interval * 1000)),
                ("grpc.keepalive_timeout_ms", int(timeout * 1000)),
                # what gRPC core (1.85) actually waits for a ping's answer: 1 minute unless set
                ("grpc.http2.ping_timeout_ms", int(timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 0),
                # by default a client stops pinging after 2 pings without data: an idle stream
                # (no config change for hours) would lose its dead-connection detection
                ("grpc.http2.max_pings_without_data", 0),
            ]
        self._channel = grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=ca_bundle_pem), options=options
        )
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.updates_applied = 0
        self.updates_rejected = 0

    async def close(self) -> None:
        await self._channel.close(None)

    async def sign(self, csr_pem: bytes, ttl: timedelta | None = None) -> list[bytes]:
        """The certificate chain (leaf first) for `csr_pem`; raises grpc.aio.AioRpcError on refusal."""
        stub = pb_grpc.CertificatesStub(self._channel)
        ttl_seconds = int(ttl.total_seconds()) if ttl else 0
        response = await stub.Sign(
            pb.SignRequest(csr_pem=csr_pem.decode(), ttl_seconds=ttl_seconds),
            metadata=self._metadata,
            timeout=self._sign_timeout,
        )
        return [c.encode() for c in response.cert_chain_pem]

    async def run(self) -> None:
        """Stream forever (until cancelled), reconnecting with capped exponential backoff."""
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._stream_once()
                backoff = BACKOFF_MIN
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "config.stream_error address=%s code=%s detail=%s retry_in=%.2fs",
                    self.address,
                    exc.code().name,
                    exc.details(),
                    backoff,
                )
                if self.connected.is_set():
                    backoff = BACKOFF_MIN
            finally:
                self.connected.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _stream_once(self) -> None:
        stub = pb_grpc.ConfigStub(self._channel)
        outbox: asyncio.Queue[pb.ConfigRequest] = asyncio.Queue()
        outbox.put_nowait(pb.ConfigRequest(initial=pb.InitialRequest(known_versions=self.known_versions)))

        async def requests() -> AsyncIterator[pb.ConfigRequest]:
            while True:
                yield await outbox.get()

        call = stub.Stream(requests(), metadata=self._metadata)
        async for response in call:
            self.connected.set()
            error = self._apply(response)
            outbox.put_nowait(pb.ConfigRequest(ack=pb.Ack(nonce=response.nonce, error_detail=error or "")))

    def _apply(self, response: pb.ConfigResponse) -> str | None:
        try:
            upserts = tuple(from_proto(r) for r in response.upserts)
            update = ConfigUpdate(
                upserts, tuple(response.removals), response.snapshot, response.trust_domain, response.nonce
            )
            error = self._on_update(update)
        except Exception as exc:  # the handler is foreign code: never let it kill us
            error = f"{type(exc).__name__}: {exc}"
        if error:
            self.updates_rejected += 1
            log.warning("config.nack nonce=%s error=%r", response.nonce, error)
            return error
        if update.snapshot:
            self.known_versions.clear()
        for key, version, _ in update.upserts:
            self.known_versions[key] = version
        for key in update.removals:
            self.known_versions.pop(key, None)
        self.updates_applied += 1
        log.info(
            "config.applied nonce=%s upserts=%d removals=%d snapshot=%s",
            response.nonce,
            len(update.upserts),
            len(update.removals),
            update.snapshot,
        )
        return None
