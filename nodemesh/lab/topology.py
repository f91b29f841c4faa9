"""The lab's topology file (`examples/lab/topology.yaml`): nodes, pods and services, validated.

Addresses are derived when not given: node *i* (from 1) gets underlay IP `10.99.0.<i>` and pod CIDR
`10.100.<i>.0/24`; a node's pods get `.10`, `.11`, ... of its CIDR in file order. Documented in
`docs/lab.md`.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "examples" / "lab" / "topology.yaml"
UNDERLAY = ipaddress.ip_network("10.99.0.0/24")
CONTROLLER_IP = "10.99.0.254"
Port = Annotated[int, Field(ge=1, le=65535)]
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")


class TopologyError(ValueError):
    """The topology file is unreadable or invalid; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _dns_label(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{value!r} is not a DNS label (lowercase letters, digits, '-', ≤ 32 chars)")
    return value


class NodeSpec(_Model):
    name: str
    pod_cidr: str | None = Field(default=None, alias="podCIDR")
    underlay_ip: str | None = Field(default=None, alias="underlayIP")

    _check_name = field_validator("name")(_dns_label)


class PortSpec(_Model):
    port: int = Field(ge=1, le=65535)
    target_port: int | None = Field(default=None, alias="targetPort", ge=1, le=65535)
    name: str = ""


class PodSpec(_Model):
    name: str
    namespace: str = "default"
    service_account: str = Field(default="default", alias="serviceAccount")
    labels: dict[str, str] = Field(default_factory=dict)
    node: str
    ip: str | None = None
    enrolled: bool = True
    serve: list[Port] = Field(default_factory=list, description="ports the echo server listens on")

    _check_name = field_validator("name", "namespace")(_dns_label)


class ServiceSpec(_Model):
    name: str
    namespace: str = "default"
    vip: str
    ports: list[PortSpec]
    selector: dict[str, str]

    _check_name = field_validator("name", "namespace")(_dns_label)


class Topology(_Model):
    trust_domain: str = Field(default="cluster.local", alias="trustDomain")
    nodes: list[NodeSpec] = Field(min_length=1, max_length=200)
    pods: list[PodSpec] = Field(default_factory=list)
    services: list[ServiceSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Topology:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")
        seen: set[tuple[str, str]] = set()
        for pod in self.pods:
            if pod.node not in names:
                raise ValueError(f"pod {pod.name}: node {pod.node!r} is not one of {names}")
            if (pod.namespace, pod.name) in seen:
                raise ValueError(f"pod {pod.namespace}/{pod.name} is defined twice")
            seen.add((pod.namespace, pod.name))
        return self


def load_topology(path: Path | None = None) -> Topology:
    """Read and validate a topology file; errors name the file and the offending field."""
    path = path or DEFAULT_TOPOLOGY
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise TopologyError(f"{path}: expected a mapping with nodes, pods and services")
    try:
        return Topology.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()]
        raise TopologyError(f"{path}: " + "; ".join(lines)) from exc
