"""The controller's registry: Kubernetes-form objects in, the mesh state and each node's view out.

Pure code (no I/O): a config source (the YAML directory, later the Kubernetes API) turns what it
reads into `ConfigObject`s with `parse_config_object`, and calls `build_state` with the valid ones.
`MeshState` is immutable; `node_view` is what one node's agent is sent and `identity_on_node` is the
rule the CA applies before signing. The mapping is documented in docs/controller.md ("YAML format").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from api.authz.compile import DEFAULT_ROOT_NAMESPACE
from api.policy import POLICY_KINDS, KubeObject, Pod, Secret, UnknownKindError, parse_object
from api.policy import Service as ServiceObject
from api.policy.kube import NODE_TOKEN_SECRET_TYPE
from api.resources import (
    Endpoint,
    PolicyObject,
    Resource,
    Service,
    ServicePort,
    TunnelProtocol,
    Workload,
    resource_key,
)
from api.spiffe import SpiffeId, SpiffeIdError
from controller.registry.errors import ConfigError, PathPart

log = logging.getLogger("nodemesh.controller.registry")

NETNS_ANNOTATION = "nodemesh.io/netns"
# Pod label; "none" opts the pod out of the mesh (like Istio ambient's istio.io/dataplane-mode: none)
DATAPLANE_MODE_LABEL = "nodemesh.io/dataplane-mode"
ENDPOINTS_ANNOTATION = "nodemesh.io/endpoints"  # on a Service: explicit endpoint IPs, comma-separated
ROOT_NAMESPACE = DEFAULT_ROOT_NAMESPACE  # Istio's root namespace: its policies apply mesh-wide
# Kinds every node needs whatever runs on it: clients route to any Service (HTTPRoute is applied on
# the client side), whereas AuthorizationPolicy and PeerAuthentication are enforced on the inbound side.
_INBOUND_POLICY_KINDS = frozenset({"AuthorizationPolicy", "PeerAuthentication"})
_CLUSTER_SCOPED = frozenset({"Namespace"})
_MIN_TOKEN_LENGTH = 16
# Pods that stopped for good. Kubernetes keeps their status.podIP while the node gives the address
# to a new pod: as workloads they would claim the new pod's IP (istiod skips them as well).
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
SERVICE_IP_CLAIM = "service-ip:"  # ConfigObject.claims() of a Service: its clusterIP
_MAX_NAME_LENGTH = 253  # a Kubernetes object name (DNS subdomain)

__all__ = [
    "DATAPLANE_MODE_LABEL",
    "ENDPOINTS_ANNOTATION",
    "NETNS_ANNOTATION",
    "ROOT_NAMESPACE",
    "SERVICE_IP_CLAIM",
    "WORKLOAD_NAME_LABEL",
    "ConfigError",
    "ConfigObject",
    "MeshState",
    "build_state",
    "identity_on_node",
    "node_view",
    "parse_config_object",
    "workload_name",
]


def object_label(kind: str, namespace: str, name: str) -> str:
    """How errors and logs name an object: `Pod shop/web-1`, `Namespace shop`."""
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


@dataclass(frozen=True, slots=True)
class ConfigObject:
    """One valid object as a source read it: the typed model plus the body as written (JSON-compatible)."""

    kind: str
    namespace: str  # "" for cluster-scoped kinds
    name: str
    model: KubeObject = field(compare=False)
    body: dict[str, Any] = field(compare=False, hash=False)
    file: str = ""
    line: int | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def label(self) -> str:
        return object_label(self.kind, self.namespace, self.name)

    def claims(self) -> tuple[str, ...]:
        """What only one object in the whole config may define: its key, a node token's value, and
        a Service's clusterIP (Kubernetes never admits two Services with one: agents would disagree
        on which Service the VIP is, the datapath and the proxy picking differently)."""
        if isinstance(self.model, ServiceObject):
            return (self.key, f"{SERVICE_IP_CLAIM}{self.model.spec.cluster_ip}")
        token = node_token(self.model)
        if token is None:
            return (self.key,)
        digest = hashlib.sha256(token[1].encode()).hexdigest()  # never put the token itself in errors/logs
        return (self.key, f"node-token:{digest}")


def parse_config_object(
    body: Any, *, file: str = "", line: int | None = None
) -> tuple[ConfigObject | None, list[ConfigError]]:
    """Validate one Kubernetes-form object (already JSON-compatible); errors name object and field."""
    label = _raw_label(body)

    def err(message: str, path: tuple[PathPart, ...] = ()) -> ConfigError:
        return ConfigError(message, file=file, line=line, obj=label, path=path)

    try:
        model = parse_object(body)
    except UnknownKindError as exc:
        return None, [err(str(exc), ("kind",) if isinstance(body, dict) else ())]
    except pydantic.ValidationError as exc:
        return None, [err(_message(e), tuple(e["loc"])) for e in exc.errors()]
    kind = model.kind
    namespace = "" if kind in _CLUSTER_SCOPED else str(getattr(model.metadata, "namespace", "default"))
    name = model.metadata.name
    label = object_label(kind, namespace, name)
    errors: list[ConfigError] = []
    if isinstance(model, Secret) and model.type == NODE_TOKEN_SECRET_TYPE:
        errors.extend(err(message, path) for path, message in _node_token_problems(model))
    if isinstance(model, Pod):
        errors.extend(err(message, path) for path, message in _pod_identity_problems(model))
    if isinstance(model, ServiceObject) and ENDPOINTS_ANNOTATION in model.metadata.annotations:
        try:
            _explicit_endpoint_ips(model)
        except ValueError as exc:
            errors.append(err(str(exc), ("metadata", "annotations", ENDPOINTS_ANNOTATION)))
    if errors:
        return None, errors
    if kind in POLICY_KINDS:
        # Keep the body as written (annotations, creationTimestamp... are read by the policy
        # compilers), with the namespace made explicit since consumers see only the body.
        metadata = dict(body.get("metadata") or {})
        metadata["namespace"] = namespace
        body = {**body, "metadata": metadata}
    return ConfigObject(kind, namespace, name, model, body, file, line), []


def _raw_label(body: Any) -> str:
    """The object's name as well as it can be told from an invalid body."""
    if not isinstance(body, dict):
        return ""
    kind = body.get("kind")
    metadata = body.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    name, namespace = metadata.get("name"), metadata.get("namespace", "default")
    kind = kind if isinstance(kind, str) else "?"
    return object_label(
        kind,
        "" if kind in _CLUSTER_SCOPED or not isinstance(namespace, str) else namespace,
        name if isinstance(name, str) else "?",
    )


def _message(error: Any) -> str:
    """A pydantic error as one line, with the offending value when the message does not show it."""
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    value = error.get("input")
    if error.get("type") != "missing" and isinstance(value, str | int | float | bool):
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if shown not in message:
            message = f"{message} (got {shown})"
    return message


# --- node tokens -------------------------------------------------------------------------------


def _secret_field(secret: Secret, key: str) -> str | None:
    """`stringData[key]`, else base64-decoded `data[key]` (Kubernetes merges stringData over data)."""
    if key in secret.string_data:
        return secret.string_data[key]
    if key in secret.data:
        try:
            return base64.b64decode(secret.data[key], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("is not base64 of UTF-8 text") from None
    return None


def _node_token_problems(secret: Secret) -> list[tuple[tuple[PathPart, ...], str]]:
    problems: list[tuple[tuple[PathPart, ...], str]] = []
    for key in ("node", "token"):
        try:
            value = _secret_field(secret, key)
        except ValueError as exc:
            problems.append((("data", key), str(exc)))
            continue
        if not value or value != value.strip() or any(c.isspace() for c in value):
            what = "missing" if not value else "must not contain whitespace"
            problems.append(
                (("stringData", key), f"{what} (a {NODE_TOKEN_SECRET_TYPE} Secret needs `node` and `token`)")
            )
    return problems


def node_token(model: KubeObject) -> tuple[str, str] | None:
    """`(node, token)` of a valid node-token Secret, None for any other object."""
    if not isinstance(model, Secret) or model.type != NODE_TOKEN_SECRET_TYPE:
        return None
    try:
        node, token = _secret_field(model, "node"), _secret_field(model, "token")
    except ValueError:
        return None
    return (node, token) if node and token else None


# --- services ------------------------------------------------------------------------------------


def _explicit_endpoint_ips(service: ServiceObject) -> tuple[str, ...]:
    raw = service.metadata.annotations.get(ENDPOINTS_ANNOTATION, "")
    ips: list[str] = []
    for item in raw.replace(",", " ").split():
        try:
            ips.append(str(ipaddress.IPv4Address(item)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IPv4 address (want a comma-separated list)") from None
    return tuple(dict.fromkeys(ips))


def _service(service: ServiceObject, workloads: Iterable[Workload], by_ip: Mapping[str, str]) -> Service:
    namespace = service.metadata.namespace
    ports = tuple(
        ServicePort(p.port, p.target_port if p.target_port is not None else p.port, p.name, p.protocol)
        for p in service.spec.ports
    )
    selector = tuple(sorted((service.spec.selector or {}).items()))
    if ENDPOINTS_ANNOTATION in service.metadata.annotations:
        # Explicit endpoints win over the selector (a Service without selector plus a hand-written
        # EndpointSlice, in Kubernetes terms); an IP that is no known workload is outside the mesh.
        endpoints = tuple(Endpoint(by_ip.get(ip, ""), ip) for ip in _explicit_endpoint_ips(service))
    elif selector:
        # An empty selector selects nothing (as for a Kubernetes Service without selector).
        wanted = set(selector)
        endpoints = tuple(
            sorted(
                (
                    Endpoint(w.uid, w.ips[0])
                    for w in workloads
                    if w.namespace == namespace and wanted <= set(w.labels)
                ),
                key=lambda e: e.workload_uid,
            )
        )
    else:
        endpoints = ()
    return Service(service.metadata.name, namespace, service.spec.cluster_ip, ports, endpoints, selector)


# --- pods ----------------------------------------------------------------------------------------


def _pod_identity_problems(pod: Pod) -> list[tuple[tuple[PathPart, ...], str]]:
    """A pod runs as spiffe://<trust domain>/ns/<namespace>/sa/<service account>: each must be one
    valid SPIFFE path segment. Kubernetes never admits other names; the YAML mode must refuse them
    too, or every agent would meet an identity it cannot form (docs/controller.md)."""
    problems: list[tuple[tuple[PathPart, ...], str]] = []
    fields: tuple[tuple[tuple[PathPart, ...], str], ...] = (
        (("metadata", "namespace"), pod.metadata.namespace),
        (("spec", "serviceAccountName"), pod.spec.service_account_name or "default"),
    )
    for path, value in fields:
        problem = _segment_problem(value)
        if problem is None and len(value) > _MAX_NAME_LENGTH:
            problem = f"is longer than {_MAX_NAME_LENGTH} characters"
        if problem is not None:
            problems.append((path, f"{value!r} cannot be part of the pod's SPIFFE ID: {problem}"))
    return problems


def _segment_problem(value: str) -> str | None:
    """Why `value` is not one valid SPIFFE ID path segment (None when it is one)."""
    if "/" in value:
        return "contains '/'"
    try:
        SpiffeId("example.org", f"/{value}")  # the trust domain plays no part in the path rules
    except SpiffeIdError as exc:
        return str(exc)
    return None


# Istio's pod label naming the pod's workload (the metrics' source_workload/destination_workload).
# Only read: the name derived from it or from the pod's controller travels as
# `Workload.workload_name`, never as a label the pod does not have (selectors match real labels).
WORKLOAD_NAME_LABEL = "service.istio.io/workload-name"
# A CronJob's Jobs are named `<cronjob>-<scheduled time in minutes>` (Istio: 8 to 10 digits)
_CRONJOB_JOB_NAME = re.compile(r"(.+)-[0-9]{8,10}")


def workload_name(pod: Pod) -> str:
    """The name of the pod's workload, as Istio derives it (pkg/kube `GetWorkloadMetaFromPod`): the
    `service.istio.io/workload-name` label; else, for a pod with a generated name, its controller:
    the Deployment of a ReplicaSet named `<deployment>-<pod-template-hash>` (an Argo Rollout's
    likewise with `rollouts-pod-template-hash`), the DeploymentConfig of an OpenShift
    ReplicationController, the CronJob of a Job named `<cronjob>-<8 to 10 digits>`, else the
    controller itself (StatefulSet, DaemonSet, Job...); else the pod's own name."""
    meta = pod.metadata
    if meta.labels.get(WORKLOAD_NAME_LABEL):
        return meta.labels[WORKLOAD_NAME_LABEL]
    if not meta.generate_name:  # named by hand (the lab's pods): its own workload, as in Istio
        return meta.name
    owner = next((ref for ref in meta.owner_references if ref.controller), None)
    if owner is None or not owner.name:
        return meta.name
    if owner.kind == "ReplicaSet":
        for hash_label in ("pod-template-hash", "rollouts-pod-template-hash"):
            template_hash = meta.labels.get(hash_label, "")
            if template_hash and owner.name.endswith(template_hash):
                return owner.name.removesuffix(f"-{template_hash}") or meta.name
    elif owner.kind == "ReplicationController" and meta.labels.get("deploymentconfig"):
        return meta.labels["deploymentconfig"]
    elif owner.kind == "Job" and (cronjob := _CRONJOB_JOB_NAME.fullmatch(owner.name)):
        return cronjob.group(1)
    return owner.name


def _workload(pod: Pod) -> Workload | None:
    meta = pod.metadata
    uid = f"{meta.namespace}/{meta.name}"
    if not pod.spec.node_name:
        log.info("registry.pod_skipped pod=%s reason=unscheduled detail=%r", uid, "no spec.nodeName")
        return None
    ips = pod.ips()
    if not ips:
        log.info("registry.pod_skipped pod=%s reason=no_ip detail=%r", uid, "no status.podIP(s)")
        return None
    opted_out = meta.labels.get(DATAPLANE_MODE_LABEL) == "none"
    # The Workload's name stays the pod's (flows, `nodemesh conns`, logs name pods) and its labels
    # stay exactly the pod's: a selector on `service.istio.io/workload-name` matches only pods that
    # carry it, as in Istio. The workload name the metrics report has its own field, empty when it
    # is the pod's name (a pod without owner, as the lab's).
    derived = workload_name(pod)
    return Workload(
        uid=uid,
        name=meta.name,
        namespace=meta.namespace,
        service_account=pod.spec.service_account_name or "default",
        node=pod.spec.node_name,
        ips=ips,
        labels=tuple(sorted(meta.labels.items())),
        protocol=TunnelProtocol.NONE if opted_out else TunnelProtocol.HBONE,
        netns=meta.annotations.get(NETNS_ANNOTATION, ""),
        workload_name="" if derived == meta.name else derived,
    )


# --- the state -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ViewIndex:
    shared: Mapping[str, Resource]  # what every node gets
    inbound_policies: Mapping[str, Mapping[str, PolicyObject]]  # namespace -> key -> policy
    node_namespaces: Mapping[str, frozenset[str]]  # node -> namespaces of its workloads


@dataclass(frozen=True)
class MeshState:
    """The whole mesh at one instant; dictionaries are keyed by `api.resources.resource_key`."""

    trust_domain: str
    workloads: Mapping[str, Workload] = field(default_factory=dict)
    services: Mapping[str, Service] = field(default_factory=dict)
    policies: Mapping[str, PolicyObject] = field(default_factory=dict)
    node_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)  # token -> node (secret)
    # (node, namespace, serviceAccount) of every scheduled Pod, with or without an IP yet
    identities: frozenset[tuple[str, str, str]] = frozenset()
    _index: _ViewIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shared: dict[str, Resource] = {**self.workloads, **self.services}
        inbound: dict[str, dict[str, PolicyObject]] = {}
        for key, policy in self.policies.items():
            if policy.kind in _INBOUND_POLICY_KINDS and policy.namespace != ROOT_NAMESPACE:
                inbound.setdefault(policy.namespace, {})[key] = policy
            else:
                shared[key] = policy
        namespaces: dict[str, set[str]] = {}
        for workload in self.workloads.values():
            namespaces.setdefault(workload.node, set()).add(workload.namespace)
        index = _ViewIndex(shared, inbound, {n: frozenset(s) for n, s in namespaces.items()})
        object.__setattr__(self, "_index", index)

    def summary(self) -> str:
        return (
            f"workloads={len(self.workloads)} services={len(self.services)} "
            f"policies={len(self.policies)} nodes_with_tokens={len(set(self.node_tokens.values()))}"
        )


def build_state(objects: Iterable[ConfigObject], trust_domain: str) -> MeshState:
    """Map valid objects to the mesh state (the mapping rules are in docs/controller.md).

    Objects are expected unique (sources report duplicates as ConfigErrors); should one repeat,
    the first wins and the repeat is logged.
    """
    seen: dict[str, ConfigObject] = {}
    for obj in objects:
        if obj.key in seen:
            log.warning(
                "registry.duplicate object=%s kept=%s:%s", obj.key, seen[obj.key].file, seen[obj.key].line
            )
            continue
        seen[obj.key] = obj
    workloads: dict[str, Workload] = {}
    identities: set[tuple[str, str, str]] = set()
    tokens: dict[str, str] = {}
    policies: dict[str, PolicyObject] = {}
    services: list[ServiceObject] = []
    for obj in seen.values():
        model = obj.model
        if isinstance(model, Pod):
            phase = _pod_phase(obj.body)
            if phase in _TERMINAL_PHASES:  # no workload, and no identity to sign for either
                log.info(
                    "registry.pod_skipped pod=%s/%s reason=terminated detail=%r",
                    obj.namespace,
                    obj.name,
                    f"status.phase {phase}",
                )
                continue
            if model.spec.node_name:
                identities.add(
                    (model.spec.node_name, obj.namespace, model.spec.service_account_name or "default")
                )
            workload = _workload(model)
            if workload is not None:
                workloads[resource_key(workload)] = workload
        elif isinstance(model, ServiceObject):
            services.append(model)
        elif obj.kind in POLICY_KINDS:
            policy = PolicyObject.of(obj.kind, obj.namespace, obj.name, obj.body)
            policies[resource_key(policy)] = policy
        elif (token := node_token(model)) is not None:
            node, secret = token
            if secret in tokens:
                log.warning("registry.duplicate_token secret=%s kept_node=%s", obj.label, tokens[secret])
                continue
            if len(secret) < _MIN_TOKEN_LENGTH:
                log.warning("registry.short_token secret=%s node=%s length=%d", obj.label, node, len(secret))
            tokens[secret] = node
    by_ip: dict[str, str] = {}
    for workload in sorted(workloads.values(), key=lambda w: w.uid):
        for ip in workload.ips:
            if ip in by_ip:
                log.warning("registry.duplicate_ip ip=%s pods=%s,%s", ip, by_ip[ip], workload.uid)
            by_ip.setdefault(ip, workload.uid)
    ordered = sorted(workloads.values(), key=lambda w: w.uid)
    service_map = {}
    vips: dict[str, str] = {}  # clusterIP -> the Service that has it
    for svc in services:
        # One VIP, one Service (as Kubernetes admits them): agents must agree which Service a VIP
        # is. Sources report a repeat as a ConfigError; should one reach us, the first wins.
        vip, label = svc.spec.cluster_ip, object_label("Service", svc.metadata.namespace, svc.metadata.name)
        if vip in vips:
            log.warning("registry.duplicate_vip service=%s vip=%s kept=%s", label, vip, vips[vip])
            continue
        vips[vip] = label
        mapped = _service(svc, ordered, by_ip)
        service_map[resource_key(mapped)] = mapped
    return MeshState(
        trust_domain=trust_domain,
        workloads=workloads,
        services=service_map,
        policies=policies,
        node_tokens=tokens,
        identities=frozenset(identities),
    )


def _pod_phase(body: Mapping[str, Any]) -> str:
    """`status.phase` as written ("" when absent): read from the body, as the Pod model omits it."""
    status = body.get("status")
    phase = status.get("phase") if isinstance(status, dict) else None
    return phase if isinstance(phase, str) else ""


def node_view(state: MeshState, node: str) -> dict[str, Resource]:
    """What `node`'s agent needs, keyed by resource key.

    Every workload and Service (any local client may connect to any pod or Service, and the client
    side needs the destination's identity, addresses and enrollment for HBONE), every HTTPRoute
    (applied by the client side), and the AuthorizationPolicy/PeerAuthentication objects of the
    namespaces that have a workload on the node plus those of the root namespace (`istio-system`),
    since those are enforced on the inbound side only.
    """
    index = state._index
    view = dict(index.shared)
    for namespace in index.node_namespaces.get(node, ()):
        view.update(index.inbound_policies.get(namespace, {}))
    return view


def identity_on_node(state: MeshState, node: str, namespace: str, service_account: str) -> bool:
    """True when a Pod with this serviceAccount in this namespace is scheduled on `node` right now."""
    return (node, namespace, service_account) in state.identities
