"""gRPC servicers: Certificates.Sign, Config.Stream (per-node delta push), Admin.Apply/List."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta

import grpc

from api.convert import to_proto
from api.resources import Resource
from api.v1 import nodemesh_pb2 as pb
from api.v1 import nodemesh_pb2_grpc as pb_grpc
from controller.ca import CaError, CertificateAuthority, CsrRejected
from controller.server.delta import StreamState
from controller.server.metrics import ControllerMetrics
from controller.server.model import MeshModel

log = logging.getLogger("nodemesh.controller.server")

MAX_REQUESTED_TTL = 100 * 365 * 24 * 3600  # seconds: a Sign request's ttl_seconds is clamped to it


def bearer_token(context: grpc.aio.ServicerContext[object, object]) -> str | None:
    """The token of `authorization: Bearer <token>` metadata, or None."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


async def authenticate_node(
    model: MeshModel, context: grpc.aio.ServicerContext[object, object]
) -> tuple[str, str]:
    """The calling node and the token it proved itself with; aborts UNAUTHENTICATED if none."""
    token = bearer_token(context)
    node = model.node_for_token(token) if token else None
    if node is None:
        log.warning("auth.refused peer=%s reason=%s", context.peer(), "missing" if not token else "unknown")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown node token")
        raise AssertionError("unreachable")  # abort raises
    assert token is not None  # a node was found for it
    return node, token


class CertificatesService(pb_grpc.CertificatesServicer):
    """Signs workload CSRs for identities that run on the calling node."""

    def __init__(self, model: MeshModel, ca: CertificateAuthority, metrics: ControllerMetrics) -> None:
        self._model, self._ca, self._metrics = model, ca, metrics

    async def Sign(
        self, request: pb.SignRequest, context: grpc.aio.ServicerContext[pb.SignRequest, pb.SignResponse]
    ) -> pb.SignResponse:
        node, _ = await authenticate_node(self._model, context)  # type: ignore[arg-type]
        try:
            validated = self._ca.validate_csr(request.csr_pem.encode())
        except CsrRejected as exc:
            self._metrics.certificates_refused.labels(reason="invalid_csr").inc()
            log.warning("sign.refused node=%s reason=invalid_csr detail=%s", node, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"CSR rejected: {exc}")
        ns, sa = validated.spiffe_id.namespace, validated.spiffe_id.service_account
        if ns is None or sa is None or not self._model.identity_on_node(node, ns, sa):
            self._metrics.certificates_refused.labels(reason="not_on_node").inc()
            log.warning("sign.refused node=%s identity=%s reason=not_on_node", node, validated.spiffe_id)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity {validated.spiffe_id} has no workload on node {node}",
            )
        if request.ttl_seconds < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ttl_seconds must be >= 0")
        # an int64 can be more than a timedelta holds; the CA caps the TTL to its max_ttl anyway
        ttl = timedelta(seconds=min(request.ttl_seconds, MAX_REQUESTED_TTL)) if request.ttl_seconds else None
        try:
            issued = self._ca.sign(validated, ttl)
        except CaError as exc:  # the CA cannot sign at all (its certificate expired): say so, no traceback
            self._metrics.certificates_refused.labels(reason="ca_error").inc()
            log.error("sign.failed node=%s identity=%s error=%s", node, validated.spiffe_id, exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"the CA cannot sign: {exc}")
        self._metrics.certificates_issued.inc()
        log.info("sign.issued node=%s identity=%s serial=%x", node, validated.spiffe_id, issued.serial)
        return pb.SignResponse(
            cert_chain_pem=[c.decode() for c in issued.chain_pem],
            trust_bundle_pem=self._ca.trust_bundle_pem().decode(),
        )


class _Stream:
    """One connected node: wakes on mesh changes and ACKs, sends the latest difference."""

    def __init__(self, node: str, token: str, known: Mapping[str, str]) -> None:
        self.node = node
        self.token = token  # checked again before each push: it may be revoked or reassigned
        self.state = StreamState(acked=dict(known))
        self.wake = asyncio.Event()
        self.sent_at = 0.0


class ConfigService(pb_grpc.ConfigServicer):
    """Delta config streams; `notify_changed()` is called on every mesh state change."""

    def __init__(self, model: MeshModel, metrics: ControllerMetrics) -> None:
        self._model, self._metrics = model, metrics
        self._streams: set[_Stream] = set()
        self._version = 0

    def notify_changed(self) -> None:
        self._version += 1
        for stream in self._streams:
            stream.wake.set()

    async def Stream(
        self,
        request_iterator: AsyncIterator[pb.ConfigRequest],
        context: grpc.aio.ServicerContext[pb.ConfigRequest, pb.ConfigResponse],
    ) -> AsyncIterator[pb.ConfigResponse]:
        node, token = await authenticate_node(self._model, context)  # type: ignore[arg-type]
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "initial":
            log.warning("stream.bad_first_message node=%s", node)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be `initial`")
        stream = _Stream(node, token, first.initial.known_versions)
        self._streams.add(stream)
        self._metrics.connected_agents.inc()
        self._count_nodes()
        log.info("stream.connected node=%s known=%d", node, len(stream.state.acked))
        reader = asyncio.create_task(self._read(stream, request_iterator))
        waiter: asyncio.Task[bool] | None = None
        stream.wake.set()
        try:
            while not reader.done():
                waiter = asyncio.create_task(stream.wake.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if reader.done():
                    break
                stream.wake.clear()
                if self._model.node_for_token(stream.token) != stream.node:
                    # Revoked (a stolen token, a retired node) or now another node's: the stream
                    # must not go on receiving what only `node` may see.
                    log.warning("stream.refused node=%s reason=token_revoked_or_reassigned", node)
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "node token revoked or reassigned")
                response = self._next_response(stream)
                if response is not None:
                    yield response
        finally:
            reader.cancel()
            if waiter is not None:  # the RPC was cancelled inside asyncio.wait: no task left pending
                waiter.cancel()
            self._streams.discard(stream)
            self._metrics.connected_agents.dec()
            self._count_nodes()
            log.info("stream.disconnected node=%s", node)

    def _count_nodes(self) -> None:
        self._metrics.connected_nodes.set(len({s.node for s in self._streams}))

    def _next_response(self, stream: _Stream) -> pb.ConfigResponse | None:
        try:
            view = self._model.node_view(stream.node)
        except Exception:
            log.exception("stream.view_failed node=%s", stream.node)
            return None
        push = stream.state.next_push(view)
        if push is None:
            return None
        stream.sent_at = time.monotonic()
        log.info(
            "stream.push node=%s nonce=%s upserts=%d removals=%d snapshot=%s",
            stream.node,
            push.nonce,
            len(push.delta.upserts),
            len(push.delta.removals),
            push.snapshot,
        )
        return pb.ConfigResponse(
            nonce=push.nonce,
            system_version_info=str(self._version),
            upserts=[to_proto(res, key, version) for key, version, res in push.delta.upserts],
            removals=list(push.delta.removals),
            snapshot=push.snapshot,
            trust_domain=self._model.trust_domain(),
        )

    async def _read(self, stream: _Stream, requests: AsyncIterator[pb.ConfigRequest]) -> None:
        async for request in requests:
            if request.WhichOneof("kind") != "ack":
                log.warning(
                    "stream.unexpected_message node=%s kind=%s", stream.node, request.WhichOneof("kind")
                )
                continue
            ack = request.ack
            elapsed = time.monotonic() - stream.sent_at
            if ack.error_detail:
                if stream.state.on_nack(ack.nonce):
                    self._metrics.pushes.labels(node=stream.node, result="nack").inc()
                    self._metrics.push_ack_seconds.observe(elapsed)
                    log.warning(
                        "stream.nack node=%s nonce=%s error=%r", stream.node, ack.nonce, ack.error_detail
                    )
            elif stream.state.on_ack(ack.nonce):
                self._metrics.pushes.labels(node=stream.node, result="ack").inc()
                self._metrics.push_ack_seconds.observe(elapsed)
            else:
                log.warning("stream.stale_ack node=%s nonce=%s", stream.node, ack.nonce)
            stream.wake.set()


class AdminService(pb_grpc.AdminServicer):
    """Apply YAML and list resources; only callers with the admin token."""

    def __init__(self, model: MeshModel, admin_token: str | None) -> None:
        self._model, self._token = model, admin_token

    async def _check(self, context: grpc.aio.ServicerContext[object, object]) -> None:
        token = bearer_token(context)
        if not self._token or token is None or not hmac.compare_digest(token.encode(), self._token.encode()):
            log.warning("admin.refused peer=%s", context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token required")

    async def Apply(
        self, request: pb.ApplyRequest, context: grpc.aio.ServicerContext[pb.ApplyRequest, pb.ApplyResponse]
    ) -> pb.ApplyResponse:
        await self._check(context)  # type: ignore[arg-type]
        name = request.filename
        if (
            not name
            or "/" in name
            or name.startswith(".")
            or not name.endswith((".yaml", ".yml"))
            or not name.isprintable()  # a NUL or other control character: no file name of ours
        ):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad filename {name!r}: want NAME.yaml")
        result = self._model.apply(name, request.yaml)
        log.info(
            "admin.apply filename=%s errors=%d warnings=%d", name, len(result.errors), len(result.warnings)
        )
        return pb.ApplyResponse(errors=result.errors, warnings=result.warnings)

    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext[pb.ListRequest, pb.ListResponse]
    ) -> pb.ListResponse:
        await self._check(context)  # type: ignore[arg-type]
        items: list[tuple[str, Resource]] = sorted(self._model.resources().items())
        wanted = request.kind
        return pb.ListResponse(
            resources=[
                to_proto(res, key) for key, res in items if not wanted or key.split("/", 1)[0] == wanted
            ]
        )
