"""What the gRPC services need from the mesh state, as a Protocol (the registry adapter implements it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from api.resources import Resource


class MeshModel(Protocol):
    """Read access to the current mesh state plus Admin writes; all methods are fast and non-blocking."""

    def trust_domain(self) -> str: ...

    def node_for_token(self, token: str) -> str | None:
        """The node a bearer token belongs to, or None for unknown tokens."""
        ...

    def node_view(self, node: str) -> Mapping[str, Resource]:
        """Everything `node` needs, keyed by `api.resources.resource_key`."""
        ...

    def identity_on_node(self, node: str, namespace: str, service_account: str) -> bool: ...

    def resources(self) -> Mapping[str, Resource]:
        """The whole mesh (for Admin List)."""
        ...

    def apply(self, filename: str, yaml_text: str) -> list[str]:
        """Write objects to the config source; returns human-readable errors (empty = accepted)."""
        ...
