"""Typed, validated models of the objects users write: Istio security policies, Gateway API
HTTPRoute, and the few Kubernetes core objects the registry reads.

`parse_object(body)` picks the model from `apiVersion`/`kind`; it raises `UnknownKindError` for
kinds nodemesh does not read and `pydantic.ValidationError` for invalid objects.
"""

from __future__ import annotations

from typing import Any

from api.policy.gateway import HTTPRoute
from api.policy.istio import AuthorizationPolicy, PeerAuthentication
from api.policy.kube import Namespace, Pod, Secret, Service, ServiceAccount

KubeObject = (
    Pod | Service | ServiceAccount | Namespace | Secret | AuthorizationPolicy | PeerAuthentication | HTTPRoute
)

MODELS: dict[str, type[KubeObject]] = {
    "Pod": Pod,
    "Service": Service,
    "ServiceAccount": ServiceAccount,
    "Namespace": Namespace,
    "Secret": Secret,
    "AuthorizationPolicy": AuthorizationPolicy,
    "PeerAuthentication": PeerAuthentication,
    "HTTPRoute": HTTPRoute,
}
POLICY_KINDS = frozenset({"AuthorizationPolicy", "PeerAuthentication", "HTTPRoute"})


class UnknownKindError(ValueError):
    """The object's kind is not one nodemesh reads."""


def parse_object(body: Any) -> KubeObject:
    """Validate one Kubernetes-form object (a dict with apiVersion, kind, metadata...)."""
    if not isinstance(body, dict):
        raise UnknownKindError(f"expected a Kubernetes object (a mapping), got {type(body).__name__}")
    kind = body.get("kind")
    model = MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise UnknownKindError(f"unknown kind {kind!r} (expected one of {', '.join(sorted(MODELS))})")
    return model.model_validate(body)


__all__ = [
    "MODELS",
    "POLICY_KINDS",
    "AuthorizationPolicy",
    "HTTPRoute",
    "KubeObject",
    "Namespace",
    "PeerAuthentication",
    "Pod",
    "Secret",
    "Service",
    "ServiceAccount",
    "UnknownKindError",
    "parse_object",
]
