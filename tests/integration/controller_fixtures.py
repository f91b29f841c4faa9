"""Shared pieces of the controller integration tests: an in-memory mesh model and a running server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from api.resources import PolicyObject, Resource, Workload, resource_key
from controller.server.model import ApplyResult


@dataclass
class MemoryModel:
    """A MeshModel over in-memory objects; node views = own workloads + all policies of their namespaces."""

    workloads: list[Workload]
    policies: list[PolicyObject]
    tokens: dict[str, str]
    td: str = "cluster.local"
    applied: list[tuple[str, str]] = field(default_factory=list)

    def trust_domain(self) -> str:
        return self.td

    def node_for_token(self, token: str) -> str | None:
        return self.tokens.get(token)

    def node_view(self, node: str) -> Mapping[str, Resource]:
        mine = [w for w in self.workloads if w.node == node]
        namespaces = {w.namespace for w in mine}
        view: dict[str, Resource] = {resource_key(w): w for w in mine}
        view.update({resource_key(p): p for p in self.policies if p.namespace in namespaces})
        return view

    def identity_on_node(self, node: str, namespace: str, service_account: str) -> bool:
        return any(
            w.node == node and w.namespace == namespace and w.service_account == service_account
            for w in self.workloads
        )

    def resources(self) -> Mapping[str, Resource]:
        items: list[Resource] = [*self.workloads, *self.policies]
        return {resource_key(r): r for r in items}

    def apply(self, filename: str, yaml_text: str) -> ApplyResult:
        self.applied.append((filename, yaml_text))
        return ApplyResult() if yaml_text.strip() else ApplyResult(errors=("empty document",))


def policy(ns: str, name: str, action: str = "ALLOW") -> PolicyObject:
    body = {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"action": action},
    }
    return PolicyObject.of("AuthorizationPolicy", ns, name, body)


def pod(name: str, ns: str, sa: str, node: str, ip: str) -> Workload:
    return Workload(f"{ns}/{name}", name, ns, sa, node, (ip,))


async def assert_eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll `check` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(0.01)
