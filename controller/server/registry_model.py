"""The MeshModel over the registry: the current `MeshState` from a YAML directory source."""

from __future__ import annotations

from collections.abc import Mapping

from api.resources import Resource
from controller.registry import MeshState, identity_on_node, node_view
from controller.server.model import ApplyResult
from controller.sources.yamldir import YamlDirectorySource


class RegistryModel:
    """Holds the latest MeshState; `update()` swaps it (the server then calls notify_changed)."""

    def __init__(self, source: YamlDirectorySource, state: MeshState) -> None:
        self._source = source
        self.state = state

    def update(self, state: MeshState) -> None:
        self.state = state

    def trust_domain(self) -> str:
        return self.state.trust_domain

    def node_for_token(self, token: str) -> str | None:
        return self.state.node_tokens.get(token)

    def node_view(self, node: str) -> Mapping[str, Resource]:
        return node_view(self.state, node)

    def identity_on_node(self, node: str, namespace: str, service_account: str) -> bool:
        return identity_on_node(self.state, node, namespace, service_account)

    def resources(self) -> Mapping[str, Resource]:
        return {**self.state.workloads, **self.state.services, **self.state.policies}

    def apply(self, filename: str, yaml_text: str) -> ApplyResult:
        result = self._source.write_objects(filename, yaml_text)
        return ApplyResult(tuple(map(str, result.errors)), tuple(map(str, result.warnings)))
