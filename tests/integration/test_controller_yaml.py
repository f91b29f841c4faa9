"""The real controller (`controller.main.run`) over a YAML directory, with gRPC clients as two nodes.

The stream/ACK mechanics are covered with an in-memory model in test_controller_server.py; here
the state comes from files: views computed by the registry, file edits reaching connected agents,
Admin/Apply writing into the directory, and signing decided by where pods run per the YAML.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from controller_fixtures import assert_eventually
from test_controller_server import Recorder, start_client, stop_client
from typer.testing import CliRunner

from agent.config_client import ConfigClient
from api.csr import new_workload_csr
from api.spiffe import SpiffeId
from controller.main import RunOptions, run
from nodemesh.client_cli import Connection, _call_apply, _call_list

TOK1 = "node1-token-0123456789abcdef"
TOK2 = "node2-token-0123456789abcdef"

NODES = f"""\
apiVersion: v1
kind: Secret
metadata: {{name: node1, namespace: nodemesh-system}}
type: nodemesh.io/node-token
stringData: {{node: node1, token: {TOK1}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: node2, namespace: nodemesh-system}}
type: nodemesh.io/node-token
stringData: {{node: node2, token: {TOK2}}}
"""


def pod_yaml(name: str, ns: str, sa: str, node: str, ip: str) -> str:
    return f"""\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}}}
status: {{podIP: {ip}}}
"""


def policy_yaml(ns: str, name: str, action: str) -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec: {{action: {action}, rules: [{{}}]}}
"""


PODS = (
    pod_yaml("a", "shop", "web", "node1", "10.1.0.2")
    + "---\n"
    + pod_yaml("b", "bank", "api", "node2", "10.2.0.2")
)
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: a}
  ports: [{port: 80, targetPort: 8080}]
"""

COMMON = {"Workload/shop/a", "Workload/bank/b", "Service/shop/a"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Controller:
    config: Path
    state: Path
    address: str
    metrics_port: int
    admin_token_file: Path
    stop: asyncio.Event
    task: asyncio.Task[int]

    @property
    def bundle(self) -> bytes:
        return (self.state / "ca.pem").read_bytes()

    def write(self, name: str, text: str) -> None:
        (self.config / name).write_text(text)

    async def metric(self, name: str) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.metrics_port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
        found = re.search(rf"^{re.escape(name)} (\S+)$", body, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


async def start_controller(config: Path, state: Path) -> Controller:
    token_file = state.parent / "admin.token"
    token_file.write_text("admin-token\n")
    port, metrics_port = free_port(), free_port()
    options = RunOptions(
        config, state, f"127.0.0.1:{port}", "cluster.local", f"127.0.0.1:{metrics_port}", token_file
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run(options, stop))
    ctl = Controller(config, state, f"127.0.0.1:{port}", metrics_port, token_file, stop, task)

    async def serving() -> bool:
        try:
            await ctl.metric("nodemesh_controller_connected_agents")
        except OSError:
            return False
        return True

    deadline = time.monotonic() + 10
    while not await serving():
        assert not task.done(), f"controller exited: {task.result()}"
        assert time.monotonic() < deadline, "controller did not start"
        await asyncio.sleep(0.02)
    return ctl


async def stop_controller(ctl: Controller) -> int:
    ctl.stop.set()
    return await asyncio.wait_for(ctl.task, 10)


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    config = tmp_path / "config"
    config.mkdir()
    (config / "nodes.yaml").write_text(NODES)
    (config / "pods.yaml").write_text(PODS + "---\n" + SERVICE)
    (config / "policies.yaml").write_text(
        policy_yaml("shop", "shop-policy", "ALLOW") + "---\n" + policy_yaml("bank", "bank-policy", "DENY")
    )
    ctl = await start_controller(config, tmp_path / "state")
    yield ctl
    assert await stop_controller(ctl) == 0


async def test_each_node_gets_its_view_and_file_edits_reach_agents_within_a_second(
    controller: Controller,
) -> None:
    r1, r2 = Recorder(), Recorder()
    c1, t1 = await start_client(controller.address, TOK1, controller.bundle, r1)
    c2, t2 = await start_client(controller.address, TOK2, controller.bundle, r2)
    try:
        assert set(r1.held) == COMMON | {"AuthorizationPolicy/shop/shop-policy"}
        assert set(r2.held) == COMMON | {"AuthorizationPolicy/bank/bank-policy"}
        start = time.monotonic()
        controller.write(
            "policies.yaml",
            policy_yaml("shop", "shop-policy", "DENY") + "---\n" + policy_yaml("bank", "bank-policy", "DENY"),
        )
        await assert_eventually(lambda: len(r1.updates) == 2, 1.0, "node1 gets the edited policy")
        assert time.monotonic() - start < 1.0
        assert [k for k, _, _ in r1.updates[1].upserts] == ["AuthorizationPolicy/shop/shop-policy"]
        # A new file: a pod on node2 in a new namespace, with that namespace's policy.
        controller.write(
            "extra.yaml",
            pod_yaml("c", "ops", "tool", "node2", "10.2.0.3")
            + "---\n"
            + policy_yaml("ops", "ops-policy", "ALLOW"),
        )
        await assert_eventually(lambda: "AuthorizationPolicy/ops/ops-policy" in r2.held, 1.0, "node2 update")
        await assert_eventually(lambda: "Workload/ops/c" in r1.held, 1.0, "node1 sees the new peer")
        assert "AuthorizationPolicy/ops/ops-policy" not in r1.held
        assert len(r2.updates) == 2  # the shop edit did not concern node2: nothing was sent to it
    finally:
        await stop_client(c1, t1)
        await stop_client(c2, t2)


async def test_broken_edit_keeps_the_last_good_file_and_counts_the_error(controller: Controller) -> None:
    rec = Recorder()
    client, task = await start_client(controller.address, TOK1, controller.bundle, rec)
    try:
        controller.write("policies.yaml", policy_yaml("shop", "shop-policy", "NOPE"))
        deadline = time.monotonic() + 2
        while await controller.metric("nodemesh_controller_config_errors") != 1.0:
            assert time.monotonic() < deadline, "config error not counted"
            await asyncio.sleep(0.02)
        assert len(rec.updates) == 1 and "AuthorizationPolicy/shop/shop-policy" in rec.held
    finally:
        await stop_client(client, task)


async def test_nack_is_recorded_and_the_agent_keeps_its_state(controller: Controller) -> None:
    rec = Recorder()
    client, task = await start_client(controller.address, TOK1, controller.bundle, rec)
    try:
        before = dict(client.known_versions)
        rec.reject = "cannot compile policy"
        controller.write("policies.yaml", policy_yaml("shop", "shop-policy", "AUDIT"))
        await assert_eventually(lambda: client.updates_rejected == 1, 2.0, "push rejected")
        deadline = time.monotonic() + 2
        metric = 'nodemesh_controller_pushes_total{node="node1",result="nack"}'
        while await controller.metric(metric) != 1.0:
            assert time.monotonic() < deadline, "nack not recorded"
            await asyncio.sleep(0.02)
        assert client.known_versions == before
    finally:
        await stop_client(client, task)


async def test_reconnect_with_versions_gets_only_the_difference(controller: Controller) -> None:
    rec = Recorder()
    client, task = await start_client(controller.address, TOK1, controller.bundle, rec)
    known = dict(client.known_versions)
    await stop_client(client, task)
    controller.write("late.yaml", pod_yaml("c", "shop", "web", "node1", "10.1.0.3"))
    await asyncio.sleep(0.5)  # the watcher applies it while the agent is away
    rec2 = Recorder()
    client2, task2 = await start_client(controller.address, TOK1, controller.bundle, rec2, known)
    try:
        first = rec2.updates[0]
        assert not first.snapshot
        assert [k for k, _, _ in first.upserts] == ["Workload/shop/c"]
        assert first.removals == ()
    finally:
        await stop_client(client2, task2)


async def test_signing_follows_where_the_yaml_puts_pods(controller: Controller) -> None:
    c1 = ConfigClient(controller.address, TOK1, controller.bundle, Recorder())
    c2 = ConfigClient(controller.address, TOK2, controller.bundle, Recorder())
    try:
        _, web = new_workload_csr(SpiffeId.for_workload("cluster.local", "shop", "web"))
        assert (await c1.sign(web))[0].startswith(b"-----BEGIN CERTIFICATE-----")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c2.sign(web)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Move the pod to node2 in the YAML: node2 may now sign for it, node1 no longer.
        controller.write(
            "pods.yaml",
            pod_yaml("a", "shop", "web", "node2", "10.2.0.9")
            + "---\n"
            + pod_yaml("b", "bank", "api", "node2", "10.2.0.2"),
        )
        deadline = time.monotonic() + 2
        while True:
            try:
                await c2.sign(web)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                assert time.monotonic() < deadline, "move not applied"
                await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c1.sign(web)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await c1.close()
        await c2.close()


async def test_admin_apply_warns_about_http_attributes_and_applies_all_the_same(
    controller: Controller,
) -> None:
    conn = Connection(controller.address, controller.bundle, "admin-token")
    http = policy_yaml("shop", "by-method", "DENY").replace(
        "rules: [{}]", "rules: [{to: [{operation: {methods: [POST], ports: ['8080']}}]}]"
    )
    errors, warnings = await _call_apply(
        conn, "http.yaml", http + "---\n" + policy_yaml("shop", "l4", "ALLOW")
    )
    assert errors == []
    assert warnings == [
        "http.yaml:1: AuthorizationPolicy shop/by-method: nodemesh enforces at L4 and does not support "
        "HTTP attributes (found: methods). There is no waypoint proxy to enforce HTTP rules. DENY policy "
        "with HTTP attributes is enforced without the HTTP rules. This will be more restrictive than "
        "requested."
    ]
    assert (controller.config / "http.yaml").is_file()
    listed = {r.key for r in await _call_list(conn, "AuthorizationPolicy")}
    assert {"AuthorizationPolicy/shop/by-method", "AuthorizationPolicy/shop/l4"} <= listed
    assert await _call_apply(conn, "l4.yaml", policy_yaml("shop", "l4-only", "ALLOW")) == ([], [])


async def test_admin_apply_writes_the_file_and_reaches_agents(controller: Controller) -> None:
    rec = Recorder()
    client, task = await start_client(controller.address, TOK1, controller.bundle, rec)
    conn = Connection(controller.address, controller.bundle, "admin-token")
    try:
        errors, warnings = await _call_apply(conn, "applied.yaml", policy_yaml("shop", "applied", "NOPE"))
        assert errors == [
            "applied.yaml:4: AuthorizationPolicy shop/applied: spec.action: "
            "Input should be 'ALLOW', 'DENY', 'AUDIT' or 'CUSTOM' (got 'NOPE')"
        ]
        assert warnings == []
        assert not (controller.config / "applied.yaml").exists()
        assert await _call_apply(conn, "applied.yaml", policy_yaml("shop", "applied", "ALLOW")) == ([], [])
        assert (controller.config / "applied.yaml").is_file()
        await assert_eventually(lambda: "AuthorizationPolicy/shop/applied" in rec.held, 1.0, "applied policy")
        listed = await _call_list(conn, "AuthorizationPolicy")
        assert [r.key for r in listed] == [
            "AuthorizationPolicy/bank/bank-policy",
            "AuthorizationPolicy/shop/applied",
            "AuthorizationPolicy/shop/shop-policy",
        ]
    finally:
        await stop_client(client, task)


async def test_restart_keeps_the_root_and_agents_reconnect(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "nodes.yaml").write_text(NODES)
    (config / "pods.yaml").write_text(PODS)
    first = await start_controller(config, tmp_path / "state")
    bundle = first.bundle
    assert await stop_controller(first) == 0
    second = await start_controller(config, tmp_path / "state")
    try:
        assert second.bundle == bundle
        rec = Recorder()
        client, task = await start_client(second.address, TOK1, bundle, rec)
        await stop_client(client, task)
        assert set(rec.held) == {"Workload/shop/a", "Workload/bank/b"}
    finally:
        assert await stop_controller(second) == 0


def test_controller_run_help() -> None:
    from nodemesh.cli import app

    result = CliRunner().invoke(app, ["controller", "run", "--help"])
    assert result.exit_code == 0, result.output
    assert "--config-dir" in result.output and "--state-dir" in result.output
