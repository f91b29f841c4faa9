"""The mesh's resource model shared by controller and agent: workloads, services and policies.

These frozen dataclasses are what the controller's registry computes from its config sources
(a YAML directory, later Kubernetes) and what the agent holds after the config stream delivered
them. The gRPC layer converts them to and from `api/v1` messages; nothing here does I/O.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class TunnelProtocol(StrEnum):
    """How a workload is reached: through the mesh (HBONE on 15008) or directly (not enrolled)."""

    HBONE = "HBONE"
    NONE = "NONE"


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod known to the mesh (from a v1 Pod object)."""

    uid: str  # "<namespace>/<name>" in YAML mode; the Pod's metadata.uid in Kubernetes
    name: str
    namespace: str
    service_account: str
    node: str
    ips: tuple[str, ...]
    labels: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs
    protocol: TunnelProtocol = TunnelProtocol.HBONE
    netns: str = ""  # netns path hint (lab: annotation nodemesh.io/netns); empty when unknown
    # The name of the pod's workload (Istio's `source_workload`/`destination_workload`): its
    # controller (a Deployment, CronJob...) or its own `service.istio.io/workload-name` label, as the
    # controller's registry derives it; empty when that is the pod's own name. Its own field, not a
    # label: `labels` are exactly the pod's, since selectors match those only.
    workload_name: str = ""

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def principal(self, trust_domain: str) -> str:
        """The SPIFFE ID without scheme, as Istio principals are written: `<td>/ns/<ns>/sa/<sa>`."""
        return f"{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Endpoint:
    workload_uid: str
    ip: str


@dataclass(frozen=True, slots=True)
class Service:
    """A v1 Service: a virtual IP with ports, over the endpoints its selector (or explicit list) picks."""

    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...] = ()
    selector: tuple[tuple[str, str], ...] = ()

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True, slots=True)
class PolicyObject:
    """A validated policy object (AuthorizationPolicy, PeerAuthentication, HTTPRoute) in Kubernetes form.

    `body` is the object as the user wrote it (apiVersion, kind, metadata, spec), already checked
    against its schema; consumers parse it with the models in `api.policy`.
    """

    kind: str
    namespace: str
    name: str
    body: dict[str, Any] = field(hash=False, compare=False)
    body_json: str = ""  # canonical JSON of body; equality and versions use it

    @classmethod
    def of(cls, kind: str, namespace: str, name: str, body: dict[str, Any]) -> PolicyObject:
        return cls(kind, namespace, name, body, json.dumps(body, sort_keys=True, separators=(",", ":")))

    @property
    def uid(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


Resource = Workload | Service | PolicyObject


def resource_key(res: Resource) -> str:
    """The stream key of a resource: `<type>/<namespace>/<name>`, unique across kinds."""
    if isinstance(res, Workload):
        return f"Workload/{res.namespace}/{res.name}"
    if isinstance(res, Service):
        return f"Service/{res.namespace}/{res.name}"
    return res.uid


@functools.lru_cache(maxsize=1 << 16)
def resource_version(res: Resource) -> str:
    """A content hash: the same object always has the same version, on every controller replica.

    Cached: resources are frozen and compare by content, and the controller asks for the version of
    every resource in every node's view on each change (100 nodes x 100 resources per push).
    """
    if isinstance(res, PolicyObject):
        payload = res.body_json
    else:
        payload = json.dumps(asdict(res), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
