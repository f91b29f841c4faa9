"""What the gRPC services need from the mesh state, as a Protocol (the registry adapter implements it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from api.resources import Resource


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """Admin/Apply's answer: human-readable errors (nothing applied), or warnings about what was."""

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


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

    def apply(self, filename: str, yaml_text: str) -> ApplyResult:
        """Write objects to the config source; no errors = accepted (warnings or not)."""
        ...
