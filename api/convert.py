"""Conversions between the resource model (`api.resources`) and the `nodemesh.v1` protobuf messages.

Pure functions, no I/O: `to_proto(key, version, resource)` and `from_proto(message)` are inverse.
A malformed message raises `ConversionError` with the key and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from api.resources import (
    Endpoint,
    PolicyObject,
    Resource,
    Service,
    ServicePort,
    TunnelProtocol,
    Workload,
    resource_key,
    resource_version,
)
from api.v1 import nodemesh_pb2 as pb


class ConversionError(ValueError):
    """A protobuf Resource that does not map to a valid resource (unknown kind, bad JSON, ...)."""


def _labels(pairs: tuple[tuple[str, str], ...]) -> list[pb.Label]:
    return [pb.Label(key=k, value=v) for k, v in pairs]


def _pairs(labels: Iterable[pb.Label]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((lbl.key, lbl.value) for lbl in labels))


def to_proto(resource: Resource, key: str | None = None, version: str | None = None) -> pb.Resource:
    """The wire form of `resource`; key and version default to `resource_key`/`resource_version`."""
    msg = pb.Resource(
        key=key if key is not None else resource_key(resource),
        version=version if version is not None else resource_version(resource),
    )
    if isinstance(resource, Workload):
        msg.workload.CopyFrom(
            pb.Workload(
                uid=resource.uid,
                name=resource.name,
                namespace=resource.namespace,
                service_account=resource.service_account,
                node=resource.node,
                ips=list(resource.ips),
                labels=_labels(resource.labels),
                protocol=resource.protocol.value,
                netns=resource.netns,
                workload_name=resource.workload_name,
            )
        )
    elif isinstance(resource, Service):
        msg.service.CopyFrom(
            pb.Service(
                name=resource.name,
                namespace=resource.namespace,
                vip=resource.vip,
                ports=[
                    pb.ServicePort(port=p.port, target_port=p.target_port, name=p.name, protocol=p.protocol)
                    for p in resource.ports
                ],
                endpoints=[pb.Endpoint(workload_uid=e.workload_uid, ip=e.ip) for e in resource.endpoints],
                selector=_labels(resource.selector),
            )
        )
    else:
        msg.policy.CopyFrom(
            pb.Policy(
                kind=resource.kind,
                namespace=resource.namespace,
                name=resource.name,
                json=resource.body_json or json.dumps(resource.body, sort_keys=True, separators=(",", ":")),
            )
        )
    return msg


def from_proto(msg: pb.Resource) -> tuple[str, str, Resource]:
    """`(key, version, resource)` of a wire Resource; raises ConversionError on malformed input."""
    which = msg.WhichOneof("kind")
    resource: Resource
    if which == "workload":
        w = msg.workload
        try:
            protocol = TunnelProtocol(w.protocol or TunnelProtocol.HBONE.value)
        except ValueError as exc:
            raise ConversionError(f"key={msg.key} bad workload protocol {w.protocol!r}") from exc
        resource = Workload(
            uid=w.uid,
            name=w.name,
            namespace=w.namespace,
            service_account=w.service_account,
            node=w.node,
            ips=tuple(w.ips),
            labels=_pairs(w.labels),
            protocol=protocol,
            netns=w.netns,
            workload_name=w.workload_name,  # empty from a controller without the field: the pod's name
        )
    elif which == "service":
        s = msg.service
        resource = Service(
            name=s.name,
            namespace=s.namespace,
            vip=s.vip,
            ports=tuple(
                ServicePort(port=p.port, target_port=p.target_port, name=p.name, protocol=p.protocol or "TCP")
                for p in s.ports
            ),
            endpoints=tuple(Endpoint(workload_uid=e.workload_uid, ip=e.ip) for e in s.endpoints),
            selector=_pairs(s.selector),
        )
    elif which == "policy":
        p = msg.policy
        try:
            body = json.loads(p.json)
        except json.JSONDecodeError as exc:
            raise ConversionError(f"key={msg.key} policy JSON invalid: {exc}") from exc
        if not isinstance(body, dict):
            raise ConversionError(f"key={msg.key} policy JSON is not an object")
        resource = PolicyObject.of(p.kind, p.namespace, p.name, body)
    else:
        raise ConversionError(f"key={msg.key} resource has no kind set")
    return msg.key, msg.version, resource
