"""Resolve the effective PeerAuthentication mTLS mode for a workload port (sans-IO).

Istio PeerAuthentication reference (https://istio.io/latest/docs/reference/config/security/
peer_authentication/) and istiod's composition (istio/istio `pilot/pkg/security/authn`
`ComposePeerAuthentication`; ambient: `convertedSelectorPeerAuthentications`):

- levels, most specific first: the workload-selector policy in the workload's namespace (with its
  `portLevelMtls` entry for the port), the namespace-wide policy (no selector), the mesh-wide policy
  (root namespace, no selector), then the default PERMISSIVE;
- at each level, when several policies qualify, the oldest (`metadata.creationTimestamp`) wins;
  objects without a timestamp (YAML mode) count as newer than any with one, ties go by name;
- `UNSET` (or no `mtls`) inherits from the next level; a port-level UNSET inherits the
  workload-level mode;
- a selector policy in the root namespace is not mesh-wide and is ignored, as istiod does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from api.authz.model import PolicyCompileError, PolicyRef
from api.resources import PolicyObject, Workload

log = logging.getLogger("nodemesh.authz")

KIND = "PeerAuthentication"
DEFAULT_ROOT_NAMESPACE = "istio-system"


class MtlsMode(StrEnum):
    """`spec.mtls.mode` / `spec.portLevelMtls[port].mode`."""

    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"

    @property
    def accepts_plaintext(self) -> bool:
        """Whether the inbound side may accept a connection without mTLS (only STRICT refuses)."""
        return self is not MtlsMode.STRICT


class Level(StrEnum):
    """Which level of the hierarchy decided the mode."""

    WORKLOAD_PORT = "workload-port"
    WORKLOAD = "workload"
    NAMESPACE = "namespace"
    MESH = "mesh"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class PeerAuthDecision:
    """The effective mode for one (workload, port), the policy that set it, and how it was reached."""

    mode: MtlsMode
    level: Level
    policy: PolicyRef | None
    explanation: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form (for `policy explain -o json`)."""
        return {
            "mode": str(self.mode),
            "level": str(self.level),
            "policy": str(self.policy) if self.policy else None,
            "explanation": list(self.explanation),
        }


@dataclass(frozen=True, slots=True)
class CompiledPeerAuthentication:
    """One PeerAuthentication object in the resolver's form."""

    ref: PolicyRef
    selector: tuple[tuple[str, str], ...] | None  # None or empty: namespace- or mesh-wide
    mode: MtlsMode
    port_modes: tuple[tuple[int, MtlsMode], ...]
    created: datetime | None

    @property
    def order_key(self) -> tuple[bool, datetime, str]:
        return (self.created is None, self.created or datetime.max, self.ref.name)

    def selects(self, workload: Workload) -> bool:
        labels = workload.label_map()
        return all(labels.get(k) == v for k, v in self.selector or ())

    def port_mode(self, port: int) -> MtlsMode | None:
        for p, mode in self.port_modes:
            if p == port:
                return mode
        return None


def _mode(raw: object, obj: PolicyObject, path: str) -> MtlsMode:
    if raw is None:
        return MtlsMode.UNSET
    if not isinstance(raw, dict):
        raise PolicyCompileError(KIND, obj.namespace, obj.name, path, "must be an object")
    mode = raw.get("mode", "UNSET")
    try:
        return MtlsMode(mode)
    except ValueError:
        raise PolicyCompileError(
            KIND,
            obj.namespace,
            obj.name,
            f"{path}.mode",
            f"{mode!r} is not UNSET, DISABLE, PERMISSIVE or STRICT",
        ) from None


def _created(body: dict[str, Any], obj: PolicyObject) -> datetime | None:
    metadata = body.get("metadata")
    raw = metadata.get("creationTimestamp") if isinstance(metadata, dict) else None
    if raw is None:
        return None
    if isinstance(raw, datetime):  # PyYAML already turns timestamps into datetimes
        parsed = raw
    else:
        try:
            parsed = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
        except ValueError:
            # Only the order among policies of one level depends on it: taken as unknown (ordered
            # after dated ones), not as a reason to leave the policy, and its STRICT, out.
            return None
    # Compare as naive UTC; a timestamp without an offset is taken as UTC, as Kubernetes writes them.
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def compile_peer_authentication(obj: PolicyObject) -> CompiledPeerAuthentication:
    """Parse one PeerAuthentication; raises PolicyCompileError naming the bad field."""
    if obj.kind != KIND:
        raise PolicyCompileError(obj.kind, obj.namespace, obj.name, "kind", f"expected {KIND}")
    spec = obj.body.get("spec") or {}
    if not isinstance(spec, dict):
        raise PolicyCompileError(KIND, obj.namespace, obj.name, "spec", "must be an object")
    selector: tuple[tuple[str, str], ...] | None = None
    raw_sel = spec.get("selector")
    if raw_sel is not None:
        labels = raw_sel.get("matchLabels") if isinstance(raw_sel, dict) else None
        labels = {} if labels is None else labels
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise PolicyCompileError(
                KIND, obj.namespace, obj.name, "spec.selector.matchLabels", "must map strings to strings"
            )
        selector = tuple(sorted(labels.items())) or None
    port_modes: list[tuple[int, MtlsMode]] = []
    raw_ports = spec.get("portLevelMtls") or {}
    if not isinstance(raw_ports, dict):
        raise PolicyCompileError(KIND, obj.namespace, obj.name, "spec.portLevelMtls", "must be an object")
    for key, value in raw_ports.items():
        path = f"spec.portLevelMtls[{key}]"
        port_str = str(key)
        digits = port_str.lstrip("0") or "0"
        # at most 5 digits reach int(), which raises ValueError beyond 4,300
        if not (port_str.isascii() and port_str.isdigit() and len(digits) <= 5 and 1 <= int(digits) <= 65535):
            raise PolicyCompileError(
                KIND, obj.namespace, obj.name, path[:80], f"{port_str[:20]!r} is not a port (1-65535)"
            )
        port_modes.append((int(digits), _mode(value, obj, path)))
    if port_modes and selector is None:
        # Istio validation: portLevelMtls requires a workload selector.
        raise PolicyCompileError(
            KIND, obj.namespace, obj.name, "spec.portLevelMtls", "requires spec.selector.matchLabels"
        )
    return CompiledPeerAuthentication(
        ref=PolicyRef(obj.namespace, obj.name),
        selector=selector,
        mode=_mode(spec.get("mtls"), obj, "spec.mtls"),
        port_modes=tuple(sorted(port_modes)),
        created=_created(obj.body, obj),
    )


class PeerAuthIndex:
    """The mesh's PeerAuthentication objects, ready to resolve (workload, port) to a mode."""

    def __init__(
        self,
        policies: Iterable[CompiledPeerAuthentication],
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        errors: Iterable[PolicyCompileError] = (),
    ) -> None:
        self.root_namespace = root_namespace
        self.errors: tuple[PolicyCompileError, ...] = tuple(errors)
        by_ns: dict[str, list[CompiledPeerAuthentication]] = {}
        for p in sorted(policies, key=lambda p: p.order_key):
            by_ns.setdefault(p.ref.namespace, []).append(p)
        self._by_namespace = {k: tuple(v) for k, v in by_ns.items()}

    @classmethod
    def build(
        cls, objects: Iterable[PolicyObject], root_namespace: str = DEFAULT_ROOT_NAMESPACE
    ) -> PeerAuthIndex:
        """Compile every PeerAuthentication among `objects`; unusable ones are reported in `errors`."""
        compiled: list[CompiledPeerAuthentication] = []
        errors: list[PolicyCompileError] = []
        for obj in objects:
            if obj.kind != KIND:
                continue
            try:
                compiled.append(compile_peer_authentication(obj))
            except PolicyCompileError as exc:
                log.error(
                    "peerauth.policy_rejected policy=%s/%s field=%s problem=%r",
                    exc.namespace,
                    exc.name,
                    exc.field_path,
                    exc.problem,
                )
                errors.append(exc)
        return cls(compiled, root_namespace, errors)

    def _oldest_wide(self, namespace: str) -> CompiledPeerAuthentication | None:
        return next((p for p in self._by_namespace.get(namespace, ()) if p.selector is None), None)

    def resolve(self, workload: Workload, port: int) -> PeerAuthDecision:
        """The effective mTLS mode for traffic to `port` of `workload`."""
        steps: list[str] = []
        levels: list[tuple[Level, CompiledPeerAuthentication, MtlsMode]] = []
        if workload.namespace != self.root_namespace:
            wl_policy = next(
                (
                    p
                    for p in self._by_namespace.get(workload.namespace, ())
                    if p.selector is not None and p.selects(workload)
                ),
                None,
            )
            if wl_policy is not None:
                port_mode = wl_policy.port_mode(port)
                if port_mode is not None:
                    levels.append((Level.WORKLOAD_PORT, wl_policy, port_mode))
                levels.append((Level.WORKLOAD, wl_policy, wl_policy.mode))
            ns_policy = self._oldest_wide(workload.namespace)
            if ns_policy is not None:
                levels.append((Level.NAMESPACE, ns_policy, ns_policy.mode))
        mesh_policy = self._oldest_wide(self.root_namespace)
        if mesh_policy is not None:
            levels.append((Level.MESH, mesh_policy, mesh_policy.mode))
        for level, policy, mode in levels:
            where = f"port {port} of " if level is Level.WORKLOAD_PORT else ""
            if mode is MtlsMode.UNSET:
                steps.append(f"{level} {where}{policy.ref}: UNSET, inherits")
                continue
            steps.append(f"{level} {where}{policy.ref}: {mode}")
            return PeerAuthDecision(mode, level, policy.ref, tuple(steps))
        steps.append("no policy sets a mode: default PERMISSIVE")
        return PeerAuthDecision(MtlsMode.PERMISSIVE, Level.DEFAULT, None, tuple(steps))
