"""Minimal Kubernetes core `v1` models (Pod, Service, ServiceAccount, Secret, Namespace).

Only the fields nodemesh reads are modelled; Kubernetes objects carry many more, so these models
ignore unknown fields (`extra="ignore"`), unlike the policy CRD models which reject typos. Field
names follow the upstream API reference (snake_case in Python, the upstream camelCase as alias).
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

NODE_TOKEN_SECRET_TYPE = "nodemesh.io/node-token"


class KubeModel(BaseModel):
    """Base of the Kubernetes core models: camelCase aliases, immutable, unknown fields ignored."""

    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, frozen=True, alias_generator=to_camel
    )


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IPv4 address") from None


class ObjectMeta(KubeModel):
    """`metadata`: the object's name, namespace and labels. A missing namespace means `default`."""

    name: str = Field(min_length=1, max_length=253)
    namespace: str = Field(default="default", min_length=1, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str = ""


class OwnerReference(KubeModel):
    """One of `metadata.ownerReferences`: the registry reads the controller's kind and name only
    (to name the pod's workload), so nothing here is required."""

    api_version: str = ""
    kind: str = ""
    name: str = ""
    uid: str = ""
    controller: bool | None = None


class PodMeta(ObjectMeta):
    """A Pod's `metadata`: also how its name was generated and who owns it (its workload)."""

    generate_name: str = ""
    owner_references: tuple[OwnerReference, ...] = ()


class ContainerPort(KubeModel):
    container_port: int = Field(ge=1, le=65535)
    name: str = ""
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"


class Container(KubeModel):
    name: str
    image: str = ""
    ports: tuple[ContainerPort, ...] = ()


class PodSpec(KubeModel):
    node_name: str = ""
    service_account_name: str = "default"
    containers: tuple[Container, ...] = ()


class PodIP(KubeModel):
    ip: str

    _check_ip = field_validator("ip")(_ipv4)


class PodStatus(KubeModel):
    pod_ip: str = Field(default="", alias="podIP")
    pod_ips: tuple[PodIP, ...] = Field(default=(), alias="podIPs")

    @field_validator("pod_ip")
    @classmethod
    def _check_pod_ip(cls, value: str) -> str:
        return _ipv4(value) if value else value


class Pod(KubeModel):
    """A `v1` Pod: becomes a mesh workload once it is scheduled (nodeName) and has an IP."""

    api_version: Literal["v1"]
    kind: Literal["Pod"]
    metadata: PodMeta
    spec: PodSpec = PodSpec()
    status: PodStatus = PodStatus()

    def ips(self) -> tuple[str, ...]:
        """The pod's addresses: `status.podIPs`, else `status.podIP`, without duplicates."""
        ordered = [p.ip for p in self.status.pod_ips] or ([self.status.pod_ip] if self.status.pod_ip else [])
        return tuple(dict.fromkeys(ordered))


class ServicePort(KubeModel):
    port: int = Field(ge=1, le=65535)
    # Kubernetes also allows a named target port; the YAML mode resolves only numbers (see docs/policy.md).
    target_port: int | None = Field(default=None, ge=1, le=65535)
    name: str = ""
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"


class ServiceSpec(KubeModel):
    cluster_ip: str = Field(alias="clusterIP")
    selector: dict[str, str] | None = None
    ports: tuple[ServicePort, ...] = Field(default=(), max_length=1024)

    _check_vip = field_validator("cluster_ip")(_ipv4)


class Service(KubeModel):
    """A `v1` Service with a virtual IP (headless Services are not supported in YAML mode)."""

    api_version: Literal["v1"]
    kind: Literal["Service"]
    metadata: ObjectMeta
    spec: ServiceSpec


class ServiceAccount(KubeModel):
    """A `v1` ServiceAccount: the workload identity (`<td>/ns/<ns>/sa/<name>`)."""

    api_version: Literal["v1"]
    kind: Literal["ServiceAccount"]
    metadata: ObjectMeta


class NamespaceMeta(KubeModel):
    name: str = Field(min_length=1, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str = ""


class Namespace(KubeModel):
    """A `v1` Namespace (cluster-scoped: no `metadata.namespace`)."""

    api_version: Literal["v1"]
    kind: Literal["Namespace"]
    metadata: NamespaceMeta


class Secret(KubeModel):
    """A `v1` Secret; nodemesh reads only `type: nodemesh.io/node-token` (node bootstrap tokens)."""

    api_version: Literal["v1"]
    kind: Literal["Secret"]
    metadata: ObjectMeta
    type: str = "Opaque"
    string_data: dict[str, str] = Field(default_factory=dict)
    data: dict[str, str] = Field(default_factory=dict)  # base64, as in Kubernetes
