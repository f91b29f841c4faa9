"""The controller's gRPC server over loopback TLS: config streams, signing, auth and restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from controller_fixtures import MemoryModel, assert_eventually, pod, policy

from agent.config_client import KEEPALIVE_TIME, ConfigClient, ConfigUpdate
from api.csr import new_workload_csr
from api.resources import PolicyObject
from api.spiffe import SpiffeId
from api.v1 import nodemesh_pb2 as pb
from api.v1 import nodemesh_pb2_grpc as pb_grpc
from controller.ca import CertificateAuthority
from controller.server.app import ControllerServer


@pytest.fixture
def model() -> MemoryModel:
    return MemoryModel(
        workloads=[
            pod("a", "shop", "web", "node1", "10.1.0.2"),
            pod("b", "bank", "api", "node2", "10.2.0.2"),
        ],
        policies=[policy("shop", "allow-web"), policy("bank", "deny-all", "DENY")],
        tokens={"tok1": "node1", "tok2": "node2"},
    )


@pytest.fixture
async def server(model: MemoryModel, tmp_path: Path) -> AsyncIterator[tuple[ControllerServer, str, bytes]]:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", "cluster.local")
    srv = ControllerServer(model, ca, admin_token="admintok")
    addrs = await srv.start("127.0.0.1:0")
    yield srv, f"127.0.0.1:{addrs.grpc_port}", ca.trust_bundle_pem()
    await srv.stop(0)


class Recorder:
    """An on_update handler that keeps the node's resources and can be told to reject."""

    def __init__(self) -> None:
        self.held: dict[str, object] = {}
        self.updates: list[ConfigUpdate] = []
        self.reject: str | None = None

    def __call__(self, update: ConfigUpdate) -> str | None:
        self.updates.append(update)
        if self.reject:
            return self.reject
        if update.snapshot:
            self.held.clear()
        self.held.update({k: r for k, _, r in update.upserts})
        for k in update.removals:
            self.held.pop(k, None)
        return None


async def start_client(
    address: str, token: str, bundle: bytes, rec: Recorder, known: dict[str, str] | None = None
) -> tuple[ConfigClient, asyncio.Task[None]]:
    client = ConfigClient(address, token, bundle, rec, known_versions=known)
    task = asyncio.create_task(client.run())
    await assert_eventually(lambda: bool(rec.updates), what=f"first push to {token}")
    return client, task


async def stop_client(client: ConfigClient, task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await client.close()


async def test_each_node_gets_only_its_view_and_changes_are_pushed(
    server: tuple[ControllerServer, str, bytes], model: MemoryModel
) -> None:
    srv, address, bundle = server
    r1, r2 = Recorder(), Recorder()
    c1, t1 = await start_client(address, "tok1", bundle, r1)
    c2, t2 = await start_client(address, "tok2", bundle, r2)
    try:
        assert set(r1.held) == {"Workload/shop/a", "AuthorizationPolicy/shop/allow-web"}
        assert set(r2.held) == {"Workload/bank/b", "AuthorizationPolicy/bank/deny-all"}
        assert r1.updates[0].snapshot and r1.updates[0].trust_domain == "cluster.local"
        model.policies = [policy("shop", "allow-web", "DENY"), policy("bank", "deny-all", "DENY")]
        srv.notify_changed()
        await assert_eventually(lambda: len(r1.updates) == 2, what="node1 push after change")
        assert [k for k, _, _ in r1.updates[1].upserts] == ["AuthorizationPolicy/shop/allow-web"]
        await assert_eventually(
            lambda: srv.metrics.pushes.labels(node="node1", result="ack")._value.get() == 2, what="ack"
        )
        assert len(r2.updates) == 1  # node2's view did not change: nothing sent
    finally:
        await stop_client(c1, t1)
        await stop_client(c2, t2)


async def test_nack_keeps_state_and_is_counted(
    server: tuple[ControllerServer, str, bytes], model: MemoryModel
) -> None:
    srv, address, bundle = server
    rec = Recorder()
    client, task = await start_client(address, "tok1", bundle, rec)
    try:
        before = dict(client.known_versions)
        rec.reject = "cannot compile policy"
        model.policies = [policy("shop", "allow-web", "DENY")]
        srv.notify_changed()
        nacks = srv.metrics.pushes.labels(node="node1", result="nack")
        await assert_eventually(lambda: nacks._value.get() == 1, what="nack recorded")
        assert client.known_versions == before
        srv.notify_changed()  # same target again: not resent
        await asyncio.sleep(0)
        await assert_eventually(lambda: client.updates_rejected == 1)
        rec.reject = None
        model.policies = [policy("shop", "allow-web", "AUDIT")]
        srv.notify_changed()
        await assert_eventually(lambda: client.updates_applied == 2, what="next push applied")
        assert len(rec.updates) == 3
    finally:
        await stop_client(client, task)


async def test_reconnect_with_known_versions_gets_only_the_difference(
    server: tuple[ControllerServer, str, bytes], model: MemoryModel
) -> None:
    _, address, bundle = server
    rec = Recorder()
    client, task = await start_client(address, "tok1", bundle, rec)
    known = dict(client.known_versions)
    await stop_client(client, task)
    model.workloads.append(pod("c", "shop", "web", "node1", "10.1.0.3"))
    rec2 = Recorder()
    client2, task2 = await start_client(address, "tok1", bundle, rec2, known)
    try:
        first = rec2.updates[0]
        assert not first.snapshot
        assert [k for k, _, _ in first.upserts] == ["Workload/shop/c"]
        assert first.removals == ()
    finally:
        await stop_client(client2, task2)


async def test_sign_only_identities_on_the_callers_node(server: tuple[ControllerServer, str, bytes]) -> None:
    srv, address, bundle = server
    client = ConfigClient(address, "tok1", bundle, Recorder())
    try:
        _, csr = new_workload_csr(SpiffeId.for_workload("cluster.local", "shop", "web"))
        chain = await client.sign(csr)
        assert chain and chain[0].startswith(b"-----BEGIN CERTIFICATE-----")
        _, other = new_workload_csr(SpiffeId.for_workload("cluster.local", "bank", "api"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.sign(other)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert srv.metrics.certificates_refused.labels(reason="not_on_node")._value.get() == 1
        assert srv.metrics.certificates_issued._value.get() == 1
    finally:
        await client.close()


class Freezer:
    """A TCP forwarder whose open connections can be frozen: bytes stop both ways and nothing is
    closed, as with a hung controller or a half-open connection. Later connections flow."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.connections = 0
        self._gates: list[asyncio.Event] = []
        self._writers: list[asyncio.StreamWriter] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            for w in self._writers:
                w.close()

    def freeze(self) -> None:
        for gate in self._gates:
            gate.clear()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        ur, uw = await asyncio.open_connection(*self.target)
        self._writers += [w, uw]
        gate = asyncio.Event()
        gate.set()
        self._gates.append(gate)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    await gate.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(r, uw), pump(ur, w))


async def test_a_sign_call_the_controller_never_answers_ends_at_its_deadline(
    server: tuple[ControllerServer, str, bytes],
) -> None:
    _, address, bundle = server
    freezer = Freezer(address)
    async with freezer.running() as via:
        client = ConfigClient(via, "tok1", bundle, Recorder(), keepalive=None, sign_timeout=0.5)
        try:
            _, csr = new_workload_csr(SpiffeId.for_workload("cluster.local", "shop", "web"))
            assert await client.sign(csr)
            freezer.freeze()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(client.sign(csr), 5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await client.close()


async def test_keepalive_notices_a_frozen_connection_and_the_stream_reconnects(
    server: tuple[ControllerServer, str, bytes],
) -> None:
    _, address, bundle = server
    freezer = Freezer(address)
    async with freezer.running() as via:
        rec = Recorder()
        # pings this frequent are for the test only: the controller strikes them on an idle stream
        client = ConfigClient(via, "tok1", bundle, rec, keepalive=(0.2, 0.3))
        task = asyncio.create_task(client.run())
        try:
            await assert_eventually(client.connected.is_set, what="first push")
            freezer.freeze()
            await assert_eventually(lambda: not client.connected.is_set(), what="frozen stream dropped")
            await assert_eventually(lambda: freezer.connections >= 2, what="reconnect")
        finally:
            await stop_client(client, task)


async def test_the_controller_refuses_frequent_pings_so_the_default_keepalive_is_slower(
    server: tuple[ControllerServer, str, bytes],
) -> None:
    # gRPC's default server ping policy: pings less than 5 minutes apart on an idle stream are
    # strikes, the third one ends the connection (GOAWAY too_many_pings)
    assert KEEPALIVE_TIME > 300
    _, address, bundle = server
    freezer = Freezer(address)
    async with freezer.running() as via:
        client = ConfigClient(via, "tok1", bundle, Recorder(), keepalive=(0.2, 5))
        task = asyncio.create_task(client.run())
        try:
            await assert_eventually(lambda: freezer.connections >= 2, 10, what="GOAWAY too_many_pings")
        finally:
            await stop_client(client, task)


async def test_bad_tokens_are_unauthenticated(server: tuple[ControllerServer, str, bytes]) -> None:
    _, address, bundle = server
    client = ConfigClient(address, "nope", bundle, Recorder())
    try:
        _, csr = new_workload_csr(SpiffeId.for_workload("cluster.local", "shop", "web"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.sign(csr)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await client.close()
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(bundle)) as channel:
        admin = pb_grpc.AdminStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.List(pb.ListRequest(), metadata=(("authorization", "Bearer tok1"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await admin.List(
            pb.ListRequest(kind="Workload"), metadata=(("authorization", "Bearer admintok"),)
        )
        assert sorted(r.key for r in listed.resources) == ["Workload/bank/b", "Workload/shop/a"]


async def test_restart_on_same_state_dir_keeps_the_root(model: MemoryModel, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = CertificateAuthority.load_or_create(state, "cluster.local")
    srv = ControllerServer(model, first)
    await srv.start("127.0.0.1:0")
    await srv.stop(0)
    second = CertificateAuthority.load_or_create(state, "cluster.local")
    assert second.trust_bundle_pem() == first.trust_bundle_pem()


async def test_bad_first_message_is_refused_and_server_keeps_serving(
    server: tuple[ControllerServer, str, bytes],
) -> None:
    _, address, bundle = server
    meta = (("authorization", "Bearer tok1"),)
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(bundle)) as channel:
        stub = pb_grpc.ConfigStub(channel)
        call = stub.Stream(iter([pb.ConfigRequest(ack=pb.Ack(nonce="x"))]), metadata=meta)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        done = asyncio.Event()

        async def requests() -> AsyncIterator[pb.ConfigRequest]:
            # keep the request side open, as an agent does: a half-close may end the stream early
            yield pb.ConfigRequest(initial=pb.InitialRequest())
            await done.wait()

        good = stub.Stream(requests(), metadata=meta)
        first = await anext(aiter(good))
        assert first.snapshot and len(first.upserts) == 2
        done.set()
        good.cancel()


async def test_a_disconnected_stream_leaves_no_task_behind(
    server: tuple[ControllerServer, str, bytes],
) -> None:
    """The stream waits for a change or a message in `asyncio.wait`; an agent that goes away cancels
    it there, and the wait's own task must go too (it stayed pending: one leaked per disconnect)."""
    srv, address, bundle = server

    def waiting() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "Event.wait"]

    client, task = await start_client(address, "tok1", bundle, Recorder())
    await assert_eventually(lambda: len(waiting()) == 1, what="the stream waiting for a change")
    await stop_client(client, task)
    await assert_eventually(lambda: srv.metrics.connected_agents._value.get() == 0, what="stream ended")
    await assert_eventually(lambda: waiting() == [], what="no waiter task left")


async def test_streams_and_nodes_are_counted_apart(server: tuple[ControllerServer, str, bytes]) -> None:
    """An agent with proxy workers opens a config stream per process: node1's two count as one node."""
    srv, address, bundle = server

    def counts() -> tuple[float, float]:
        return srv.metrics.connected_agents._value.get(), srv.metrics.connected_nodes._value.get()

    a, ta = await start_client(address, "tok1", bundle, Recorder())
    b, tb = await start_client(address, "tok1", bundle, Recorder())
    c, tc = await start_client(address, "tok2", bundle, Recorder())
    await assert_eventually(lambda: counts() == (3, 2), what="3 streams of 2 nodes")
    await stop_client(a, ta)
    await assert_eventually(lambda: counts() == (2, 2), what="node1 still has a stream")
    await stop_client(b, tb)
    await assert_eventually(lambda: counts() == (1, 1), what="node1 gone")
    await stop_client(c, tc)
    await assert_eventually(lambda: counts() == (0, 0), what="no stream left")


@pytest.mark.parametrize(
    "tokens", [{"tok2": "node2"}, {"tok1": "node2", "tok2": "node2"}], ids=["revoked", "reassigned"]
)
async def test_a_stream_whose_token_is_revoked_or_reassigned_ends_unauthenticated(
    server: tuple[ControllerServer, str, bytes], model: MemoryModel, tokens: dict[str, str]
) -> None:
    """The token is checked before each push, not only at stream start: the holder of a stolen or
    retired token must not keep receiving node1's view (nor node2's, once the token is node2's)."""
    srv, address, bundle = server
    outbox: asyncio.Queue[pb.ConfigRequest | None] = asyncio.Queue()
    outbox.put_nowait(pb.ConfigRequest(initial=pb.InitialRequest()))

    async def requests() -> AsyncIterator[pb.ConfigRequest]:
        while (request := await outbox.get()) is not None:
            yield request

    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(bundle)) as channel:
        call = pb_grpc.ConfigStub(channel).Stream(requests(), metadata=(("authorization", "Bearer tok1"),))
        responses = aiter(call)
        first = await anext(responses)
        assert first.snapshot
        outbox.put_nowait(pb.ConfigRequest(ack=pb.Ack(nonce=first.nonce)))  # as an agent: ready for more
        model.tokens = tokens
        model.policies = [*model.policies, policy("shop", "new-secret-policy", "DENY")]
        srv.notify_changed()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            leaked = await asyncio.wait_for(anext(responses), 5)
            pytest.fail(f"pushed after the token was {tokens}: {[u.key for u in leaked.upserts]}")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        outbox.put_nowait(None)
    await assert_eventually(lambda: srv.metrics.connected_agents._value.get() == 0, what="stream ended")


def big_policy(ns: str, name: str, generation: int) -> PolicyObject:
    body = {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns, "annotations": {"pad": "x" * 4000, "n": str(generation)}},
        "spec": {"action": "ALLOW"},
    }
    return PolicyObject.of("AuthorizationPolicy", ns, name, body)


async def test_an_agent_that_never_reads_does_not_hold_up_other_nodes(tmp_path: Path) -> None:
    """node1 opens its stream and never reads while ~1.2 MB pushes pile up for it: node2 still gets
    each change: one stream blocked on flow control must not stall the others."""
    model = MemoryModel(
        workloads=[
            pod("a", "shop", "web", "node1", "10.1.0.2"),
            pod("b", "shop", "api", "node2", "10.2.0.2"),
        ],
        policies=[big_policy("shop", f"p{i}", 0) for i in range(300)],
        tokens={"tok1": "node1", "tok2": "node2"},
    )
    ca = CertificateAuthority.load_or_create(tmp_path / "state", "cluster.local")
    srv = ControllerServer(model, ca)
    addrs = await srv.start("127.0.0.1:0")
    address, bundle = f"127.0.0.1:{addrs.grpc_port}", ca.trust_bundle_pem()
    channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=bundle))
    forever = asyncio.Event()

    async def requests() -> AsyncIterator[pb.ConfigRequest]:
        yield pb.ConfigRequest(initial=pb.InitialRequest())
        await forever.wait()

    stuck = pb_grpc.ConfigStub(channel).Stream(requests(), metadata=(("authorization", "Bearer tok1"),))
    rec = Recorder()
    client, task = await start_client(address, "tok2", bundle, rec)
    try:
        for generation in range(1, 6):
            model.policies = [big_policy("shop", f"p{i}", generation) for i in range(300)]
            srv.notify_changed()
            await assert_eventually(
                lambda g=generation: len(rec.updates) == g + 1, timeout=10, what=f"push {generation} to node2"
            )
    finally:
        await stop_client(client, task)
        stuck.cancel()
        await channel.close()
        await asyncio.wait_for(srv.stop(0), 10)
