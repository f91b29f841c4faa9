"""Table-driven validation of the policy and Kubernetes models in `api.policy`."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from api.policy import UnknownKindError, parse_object

AP = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"}}
PA = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication", "metadata": {"name": "p"}}
HR = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "r"}}
SVC_REF = {"group": "", "kind": "Service", "name": "s", "port": 80}


FULLWIDTH_80 = "\uff18\uff10"


def _with(base: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return {**base, "spec": spec}


def _source(**fields: list[str]) -> dict[str, Any]:
    return _with(AP, {"rules": [{"from": [{"source": fields}]}]})


GOOD = [
    _with(AP, {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["td/ns/a/sa/b"]}}]}]}),
    _with(
        AP, {"selector": {"matchLabels": {"app": "x"}}, "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}
    ),
    _with(AP, {"action": "CUSTOM", "provider": {"name": "ext"}}),
    _with(PA, {"mtls": {"mode": "STRICT"}}),
    _with(PA, {"selector": {"matchLabels": {"app": "x"}}, "portLevelMtls": {8080: {"mode": "DISABLE"}}}),
    _with(PA, {"selector": {"matchLabels": {"app": "x"}}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
    _with(AP, {"rules": [{"from": [{"source": {"principals": None, "namespaces": ["bar"]}}]}]}),
    _with(AP, {"rules": [{"to": [{"operation": {"ports": ["8080"], "methods": []}}]}]}),
    _with(AP, {"rules": [{"from": [{"source": {"ipBlocks": ["10.1.2.3/8", "10.1.2.3", "fd00::/8"]}}]}]}),
    _with(HR, {"parentRefs": [SVC_REF], "rules": [{"backendRefs": [{**SVC_REF, "weight": 90}]}]}),
]

BAD = [
    (_with(AP, {"action": "DENYY"}), "spec.action", "Input should be"),
    (_with(AP, {"action": "CUSTOM"}), "spec", "requires a provider"),
    (_with(AP, {"action": "DENY", "provider": {"name": "x"}}), "spec", "cannot have a provider"),
    (_with(AP, {"rules": [{"from": [{"source": {}}]}]}), "spec.rules.0.from.0.source", "must not be empty"),
    # Istio's webhook compares len() == 0: a list written as [] is empty too
    (
        _with(AP, {"rules": [{"from": [{"source": {"principals": []}}]}]}),
        "spec.rules.0.from.0.source",
        "must not be empty",
    ),
    (_with(AP, {"rules": [{"to": [{"operation": {"ports": []}}]}]}), "to.0.operation", "not be empty"),
    (_with(AP, {"rules": [{"from": []}]}), "spec.rules.0", "`from` must not be empty"),
    (_with(AP, {"rules": [{"to": []}]}), "spec.rules.0", "`to` must not be empty"),
    # ports as the agent reads them: digits only (pydantic alone would take "+8080" or "8_080")
    (_with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"+8080": {"mode": "STRICT"}}}),
     "spec.portLevelMtls", "not a number"),
    (_with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"8_080": {"mode": "STRICT"}}}),
     "spec.portLevelMtls", "not a number"),
    (_with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {}}), "portLevel", "at least one"),
    (_with(AP, {"rules": [{"to": [{"operation": {"ports": ["0"]}}]}]}), "spec.rules.0.to.0", "between 1"),
    # ports as Go's strconv.ParseUint reads them: ASCII digits (fullwidth "80" and "²" are str.isdigit())
    (_with(AP, {"rules": [{"to": [{"operation": {"ports": [FULLWIDTH_80]}}]}]}), "ports", "between 1"),
    (_with(AP, {"rules": [{"to": [{"operation": {"notPorts": ["\u00b2"]}}]}]}), "notPorts", "between 1"),
    # addresses as Go's netip.ParsePrefix reads them (Python's ip_network also takes these three)
    (_source(ipBlocks=["10.0.0.0/255.0.0.0"]), "source.ipBlocks", "prefix length must be 0-32"),
    (_source(notIpBlocks=["10.0.0.0/08"]), "source.notIpBlocks", "prefix length must be 0-32"),
    (_source(remoteIpBlocks=["fe80::1%eth0/64"]), "source.remoteIpBlocks", "IPv6 zone"),
    (_source(notRemoteIpBlocks=["10.0.0.0/33"]), "source.notRemoteIpBlocks", "prefix length must be 0-32"),
    (_with(AP, {"rules": [{"from": [{"source": {"principal": ["a"]}}]}]}), "principal", "Extra inputs"),
    (_with(AP, {"targetRef": {"kind": "Service", "name": "s"}}), "spec", "not supported"),
    (_with(PA, {"portLevelMtls": {80: {"mode": "STRICT"}}}), "spec", "requires selector"),
    (_with(PA, {"mtls": {"mode": "strict"}}), "spec.mtls.mode", "Input should be"),
    (
        _with(HR, {"rules": [{"backendRefs": [{"name": "s", "port": 80, "weight": 1_000_001}]}]}),
        "weight",
        "less",
    ),
    (_with(HR, {"rules": [{"backendRefs": [{"name": "s"}]}]}), "backendRefs", "Must have port"),
    (
        _with(HR, {"rules": [{"matches": [{"path": {"type": "Exact", "value": "a"}}]}]}),
        "path",
        "start with '/'",
    ),
    (
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "status": {"podIP": "1.2.3"}},
        "podIP",
        "IPv4",
    ),
]


SOURCE_IP = {"key": "source.ip", "values": ["10.0.0.1"]}


def _when(*conditions: dict[str, Any], action: str = "ALLOW") -> dict[str, Any]:
    spec: dict[str, Any] = {"action": action, "rules": [{"when": list(conditions)}]}
    if action == "CUSTOM":
        spec["provider"] = {"name": "ext"}
    return _with(AP, spec)


# `when` conditions Istio's webhook accepts (istio/istio pkg/config/security/security.go
# ValidateAttribute): none of them may be refused, whether or not nodemesh enforces them at L4.
WHEN_GOOD = [
    {"key": "source.ip", "values": ["10.1.2.3", "10.1.0.0/16", "10.1.2.3/8", "fd00::/8", "::ffff:10.1.2.3"]},
    {"key": "source.ip", "notValues": ["fe80::1%eth0", "0.0.0.0/0", "::/0"]},
    {"key": "remote.ip", "values": ["10.1.0.0/16"]},
    {"key": "destination.ip", "values": ["10.0.0.1"], "notValues": ["10.0.0.0/24"]},
    {"key": "destination.port", "values": ["8080", "0", "65535", "08080"]},
    {"key": "source.namespace", "values": ["shop", "prod-*"]},
    {"key": "source.principal", "notValues": ["cluster.local/ns/shop/sa/client"]},
    {"key": "source.serviceAccount", "values": ["client", "shop/client"]},
    {"key": "request.headers[x-user]", "values": ["alice"]},
    {"key": "request.experimental.inline.headers[x-user]", "values": ["alice"]},
    {"key": "request.auth.principal", "values": ["issuer/subject"]},
    {"key": "request.auth.audiences", "values": ["aud"]},
    {"key": "request.auth.presenter", "values": ["123.example.com"]},
    {"key": "request.auth.claims[iss]", "values": ["issuer.example.com"]},
    {"key": "request.auth.claims[realm_access][roles]", "values": ["admin"]},
    {"key": "connection.sni", "values": ["www.example.com"]},
    {"key": "experimental.envoy.filters.network.mysql_proxy[db.table]", "values": ["[update]"]},
    {"key": "source.ip", "values": None, "notValues": ["10.0.0.1"]},  # null is unset
]

# (condition, where the error is, what it says); each is refused by Istio's webhook too.
WHEN_BAD = [
    # values: security.ValidateIPs (Go netip.ParseAddr / ParsePrefix)
    ({"key": "source.ip", "values": ["10.0.0.0/33"]}, "when.0.values", "prefix length must be 0-32"),
    ({"key": "source.ip", "values": ["10.0.0.1", "nope"]}, "when.0.values", "'nope' is not an IP"),
    ({"key": "source.ip", "notValues": ["10.0.0.0/8 "]}, "when.0.notValues", "not a CIDR block"),
    ({"key": "destination.ip", "values": ["10.0.0.0/255.0.0.0"]}, "when.0.values", "prefix length"),
    ({"key": "destination.ip", "values": ["10.0.0.0/08"]}, "when.0.values", "prefix length"),
    ({"key": "destination.ip", "values": ["fe80::/129"]}, "when.0.values", "0-128 bits"),
    ({"key": "destination.ip", "values": ["fe80::1%eth0/64"]}, "when.0.values", "IPv6 zone"),
    ({"key": "remote.ip", "notValues": ["010.0.0.1"]}, "when.0.notValues", "not an IP address"),
    # values: security.ValidatePorts (strconv.ParseUint(v, 10, 32), at most 65535)
    ({"key": "destination.port", "values": ["65536"]}, "when.0.values", "between 0 and 65535"),
    ({"key": "destination.port", "values": ["http"]}, "when.0.values", "between 0 and 65535"),
    ({"key": "destination.port", "notValues": ["+80"]}, "when.0.notValues", "between 0 and 65535"),
    ({"key": "destination.port", "values": [FULLWIDTH_80]}, "when.0.values", "between 0 and 65535"),
    ({"key": "destination.port", "values": ["1" * 5000]}, "when.0.values", "between 0 and 65535"),
    # values: security.CheckEmptyValues, for every key
    ({"key": "source.namespace", "values": ["shop", ""]}, "when.0.values", "empty value not allowed"),
    ({"key": "request.headers[x]", "notValues": [""]}, "when.0.notValues", "empty value not allowed"),
    # values: security.CheckServiceAccount
    ({"key": "source.serviceAccount", "values": ["a/b/c"]}, "when.0.values", "namespace/serviceAccount"),
    ({"key": "source.serviceAccount", "values": ["/sa"]}, "when.0.values", "namespace/serviceAccount"),
    ({"key": "source.serviceAccount", "values": ["shop/*"]}, "when.0.values", "wildcard not allowed"),
    ({"key": "source.serviceAccount", "values": [f"s{i}" for i in range(17)]}, "when.0.values", "16 values"),
    ({"key": "source.serviceAccount", "values": ["s" * 321]}, "when.0.values", "320 characters"),
    # keys: security.validateMapKey (`a[b]`)
    ({"key": "request.headers", "values": ["a"]}, "when.0.key", "request.headers[name]"),
    ({"key": "request.headers[]", "values": ["a"]}, "when.0.key", "bad key"),
    ({"key": "request.headers[x-user", "values": ["a"]}, "when.0.key", "bad key"),
    ({"key": "request.auth.claims", "values": ["a"]}, "when.0.key", "request.auth.claims[name]"),
    ({"key": "experimental.envoy.filters.network.mysql_proxy", "values": ["a"]}, "when.0.key", "bad key"),
    # keys: unknown, or v1alpha1 attributes refused with their own reason
    ({"key": "source.ips", "values": ["10.0.0.1"]}, "when.0.key", "unknown attribute 'source.ips'"),
    ({"key": "request.method", "values": ["GET"]}, "when.0.key", "unknown attribute"),
    ({"key": "destination.namespace", "values": ["a"]}, "when.0.key", "replaced by the metadata.namespace"),
    ({"key": "destination.labels[app]", "values": ["a"]}, "when.0.key", "replaced by the workload selector"),
    ({"key": "destination.name", "values": ["a"]}, "when.0.key", "only supported in v1alpha1"),
    ({"key": "destination.user", "values": ["a"]}, "when.0.key", "only supported in v1alpha1"),
    ({"key": "", "values": ["a"]}, "when.0.key", "at least 1 character"),
    # values / notValues presence
    ({"key": "source.ip"}, "when.0", "at least one of values or notValues"),
    ({"key": "source.ip", "values": [], "notValues": None}, "when.0", "at least one of values or notValues"),
]


@pytest.mark.parametrize("condition", WHEN_GOOD)
def test_when_conditions_istio_accepts_parse(condition: dict[str, Any]) -> None:
    parse_object(_when(condition))


@pytest.mark.parametrize(("condition", "loc", "message"), WHEN_BAD)
def test_when_conditions_istio_refuses_are_rejected(
    condition: dict[str, Any], loc: str, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        parse_object(_when(SOURCE_IP, condition))
    rendered = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in info.value.errors()]
    # the condition is the second of the rule: the path must name it, not its neighbour
    want = "spec.rules.0." + loc.replace("when.0", "when.1")
    assert any(path == want and message in msg for path, msg in rendered), rendered


@pytest.mark.parametrize("key", ["source.namespace", "source.principal", "request.auth.claims[iss]"])
def test_custom_policies_refuse_the_when_keys_istio_refuses_with_custom(key: str) -> None:
    # ValidateAuthorizationPolicy: "<key> is currently not supported with CUSTOM action"
    with pytest.raises(ValidationError, match=r"rules\[0\]\.when\[1\]\.key: .* not supported with CUSTOM"):
        parse_object(_when(SOURCE_IP, {"key": key, "values": ["a"]}, action="CUSTOM"))
    for action in ("ALLOW", "DENY", "AUDIT"):
        parse_object(_when({"key": key, "values": ["a"]}, action=action))


def test_custom_policies_accept_the_other_when_keys() -> None:
    parse_object(_when(SOURCE_IP, action="CUSTOM"))
    parse_object(_when({"key": "request.headers[x-user]", "values": ["alice"]}, action="CUSTOM"))


@pytest.mark.parametrize("body", GOOD)
def test_good_objects_parse(body: dict[str, Any]) -> None:
    obj = parse_object(body)
    assert obj.kind == body["kind"]
    assert obj.metadata.name == body["metadata"]["name"]


@pytest.mark.parametrize(("body", "loc", "message"), BAD)
def test_bad_objects_are_rejected_with_field_and_reason(body: dict[str, Any], loc: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_object(body)
    rendered = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in info.value.errors()]
    assert any(loc in path and message in msg for path, msg in rendered), rendered


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(UnknownKindError, match="unknown kind 'Deployment'"):
        parse_object({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}})
