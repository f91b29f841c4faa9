"""Round trips between api.resources and the nodemesh.v1 wire messages."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.convert import ConversionError, from_proto, to_proto
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

names = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=12)
ips = st.ip_addresses(v=4).map(str)
label_pairs = st.dictionaries(names, names, max_size=4).map(lambda d: tuple(sorted(d.items())))

workloads = st.builds(
    Workload,
    uid=names,
    name=names,
    namespace=names,
    service_account=names,
    node=names,
    ips=st.lists(ips, max_size=3).map(tuple),
    labels=label_pairs,
    protocol=st.sampled_from(list(TunnelProtocol)),
    netns=st.text(max_size=20),
    workload_name=st.just("") | names,
)
services = st.builds(
    Service,
    name=names,
    namespace=names,
    vip=ips,
    ports=st.lists(
        st.builds(
            ServicePort,
            port=st.integers(1, 65535),
            target_port=st.integers(1, 65535),
            name=names,
            protocol=st.sampled_from(["TCP", "UDP"]),
        ),
        max_size=3,
    ).map(tuple),
    endpoints=st.lists(st.builds(Endpoint, workload_uid=names, ip=ips), max_size=3).map(tuple),
    selector=label_pairs,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=8,
)
policies = st.builds(
    lambda kind, ns, name, spec: PolicyObject.of(
        kind, ns, name, {"kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": spec}
    ),
    st.sampled_from(["AuthorizationPolicy", "PeerAuthentication", "HTTPRoute"]),
    names,
    names,
    st.dictionaries(names, json_values, max_size=3),
)


@given(st.one_of(workloads, services, policies))
def test_round_trip_preserves_resource_key_and_version(resource: Resource) -> None:
    wire = pb.Resource.FromString(to_proto(resource).SerializeToString())
    key, version, back = from_proto(wire)
    assert back == resource
    assert key == resource_key(resource)
    assert version == resource_version(resource)
    assert resource_version(back) == version


def test_policy_body_survives_round_trip() -> None:
    body = {"kind": "AuthorizationPolicy", "spec": {"action": "DENY", "rules": [{"from": []}]}}
    policy = PolicyObject.of("AuthorizationPolicy", "default", "deny", body)
    _, _, back = from_proto(to_proto(policy))
    assert isinstance(back, PolicyObject)
    assert back.body == body


def test_explicit_key_and_version_are_kept() -> None:
    wl = Workload("default/a", "a", "default", "sa", "node1", ("10.0.0.1",))
    msg = to_proto(wl, key="k", version="v")
    assert (msg.key, msg.version) == ("k", "v")


def test_resource_without_kind_is_rejected() -> None:
    with pytest.raises(ConversionError, match="key=x"):
        from_proto(pb.Resource(key="x", version="1"))


def test_policy_with_invalid_json_is_rejected() -> None:
    msg = pb.Resource(key="p", policy=pb.Policy(kind="AuthorizationPolicy", json="{not json"))
    with pytest.raises(ConversionError, match="JSON invalid"):
        from_proto(msg)


def test_policy_json_must_be_an_object() -> None:
    msg = pb.Resource(key="p", policy=pb.Policy(kind="AuthorizationPolicy", json="[1]"))
    with pytest.raises(ConversionError, match="not an object"):
        from_proto(msg)


def test_unknown_workload_protocol_is_rejected() -> None:
    msg = pb.Resource(key="w", workload=pb.Workload(name="a", protocol="QUIC"))
    with pytest.raises(ConversionError, match="protocol"):
        from_proto(msg)
