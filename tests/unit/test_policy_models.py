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
    _with(AP, {"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{}]}),
    _with(AP, {"action": "DENY", "rules": [{}]}),
    _with(AP, {"action": "ALLOW"}),
    _with(AP, {"action": "AUDIT"}),
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
    (_with(AP, {"action": "CUSTOM", "rules": [{}]}), "spec", "requires a provider"),
    # ValidateAuthorizationPolicy: a CUSTOM policy needs rules (`rules: []` decodes to nil there too)
    # and, once it has some, a provider name. Istio refuses these; this case was a GOOD one before.
    (_with(AP, {"action": "CUSTOM", "provider": {"name": "ext"}}), "spec", "CUSTOM action without `rules`"),
    (_with(AP, {"action": "CUSTOM", "provider": {"name": "ext"}, "rules": []}), "spec", "without `rules`"),
    # likewise a DENY policy ("meaningless as it will never be triggered"); ALLOW without rules denies all
    (_with(AP, {"action": "DENY"}), "spec", "DENY action without `rules`"),
    (_with(AP, {"action": "DENY", "rules": []}), "spec", "DENY action without `rules`"),
    (_with(AP, {"action": "DENY", "rules": None}), "spec", "DENY action without `rules`"),
    (
        _with(AP, {"action": "CUSTOM", "provider": {"name": ""}, "rules": [{}]}),
        "spec",
        "`provider.name` must",
    ),
    (_with(AP, {"action": "CUSTOM", "provider": {}, "rules": [{}]}), "spec", "`provider.name` must not be"),
    (_with(AP, {"provider": {"name": ""}}), "spec", "ALLOW action cannot have a provider"),
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
    (
        _with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"+8080": {"mode": "STRICT"}}}),
        "spec.portLevelMtls",
        "not a number",
    ),
    (
        _with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"8_080": {"mode": "STRICT"}}}),
        "spec.portLevelMtls",
        "not a number",
    ),
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
    # ValidatePeerAuthentication: "mesh/namespace peer authentication cannot have port level mTLS"
    # (a selector without labels is namespace-wide), ports 1-65535, the selector's label rules
    (_with(PA, {"selector": {}, "portLevelMtls": {80: {"mode": "STRICT"}}}), "spec", "requires selector"),
    (
        _with(PA, {"selector": {"matchLabels": {}}, "portLevelMtls": {80: {"mode": "STRICT"}}}),
        "spec",
        "requires selector",
    ),
    (
        _with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {0: {}}}),
        "portLevelMtls",
        "1-65535",
    ),
    (
        _with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"65536": {}}}),
        "portLevel",
        "1-65535",
    ),
    (
        _with(PA, {"selector": {"matchLabels": {"": "b"}}}),
        "spec.selector.matchLabels",
        "key must not be empty",
    ),
    (
        _with(PA, {"selector": {"matchLabels": {"a*": "b"}}}),
        "spec.selector.matchLabels",
        "wildcard not allowed",
    ),
    (
        _with(PA, {"selector": {"matchLabels": {"a": "b*"}}}),
        "spec.selector.matchLabels",
        "wildcard not allowed",
    ),
    (_with(PA, {"mtls": {"mode": "MUTUAL"}}), "spec.mtls.mode", "Input should be"),
    (
        _with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {80: {"mode": "ISTIO_MUTUAL"}}}),
        "spec.portLevelMtls.80.mode",
        "Input should be",
    ),
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


@pytest.mark.parametrize(
    "key", ["source.namespace", "source.principal", "source.serviceAccount", "request.auth.claims[iss]"]
)
def test_custom_policies_refuse_the_when_keys_istio_refuses_with_custom(key: str) -> None:
    # ValidateAuthorizationPolicy: "<key> is currently not supported with CUSTOM action"
    with pytest.raises(ValidationError, match=r"rules\[0\]\.when\[1\]\.key: .* not supported with CUSTOM"):
        parse_object(_when(SOURCE_IP, {"key": key, "values": ["a"]}, action="CUSTOM"))
    for action in ("ALLOW", "DENY", "AUDIT"):
        parse_object(_when({"key": key, "values": ["a"]}, action=action))


def test_custom_policies_accept_the_other_when_keys() -> None:
    parse_object(_when(SOURCE_IP, action="CUSTOM"))
    parse_object(_when({"key": "request.headers[x-user]", "values": ["alice"]}, action="CUSTOM"))


# One valid value per list field of a source / an operation.
SOURCE_VALUES = {
    "principals": "cluster.local/ns/shop/sa/client",
    "notPrincipals": "cluster.local/ns/shop/sa/client",
    "requestPrincipals": "issuer/subject",
    "notRequestPrincipals": "issuer/subject",
    "namespaces": "shop",
    "notNamespaces": "shop",
    "serviceAccounts": "shop/client",
    "notServiceAccounts": "client",
    "ipBlocks": "10.0.0.0/8",
    "notIpBlocks": "10.0.0.1",
    "remoteIpBlocks": "10.0.0.0/8",
    "notRemoteIpBlocks": "fd00::/8",
}
OPERATION_VALUES = {
    "hosts": "example.com",
    "notHosts": "*.example.com",
    "ports": "8080",
    "notPorts": "9090",
    "methods": "GET",
    "notMethods": "POST",
    "paths": "/api/*",
    "notPaths": "/{*}/admin",
}


def _rule(*, field: str, values: list[str], action: str = "ALLOW") -> dict[str, Any]:
    """A policy whose rule has one source or operation field set to `values`."""
    if field in SOURCE_VALUES:
        rule: dict[str, Any] = {"from": [{"source": {field: values}}]}
    else:
        rule = {"to": [{"operation": {field: values}}]}
    spec: dict[str, Any] = {"action": action, "rules": [rule]}
    if action == "CUSTOM":
        spec["provider"] = {"name": "ext"}
    return _with(AP, spec)


def _errors(body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        parse_object(body)
    return [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in info.value.errors()]


@pytest.mark.parametrize("field", [*SOURCE_VALUES, *OPERATION_VALUES])
def test_an_empty_string_in_a_source_or_operation_list_is_refused(field: str) -> None:
    # ValidateAuthorizationPolicy: security.CheckEmptyValues on every list of a source and an
    # operation ("empty value not allowed"), CheckServiceAccount on serviceAccounts
    valid = SOURCE_VALUES.get(field) or OPERATION_VALUES[field]
    parse_object(_rule(field=field, values=[valid]))
    where = "from.0.source" if field in SOURCE_VALUES else "to.0.operation"
    rendered = _errors(_rule(field=field, values=[valid, ""]))
    assert any(
        path == f"spec.rules.0.{where}.{field}" and "empty value not allowed" in msg for path, msg in rendered
    ), rendered


# security.CheckServiceAccount, which the webhook runs on serviceAccounts and notServiceAccounts as on
# the source.serviceAccount condition.
SERVICE_ACCOUNTS_BAD = [
    (["a/b/c"], "namespace/serviceAccount"),
    (["/client"], "namespace/serviceAccount"),
    (["shop/"], "namespace/serviceAccount"),
    (["*"], "wildcard not allowed, found in"),
    (["shop/*"], "wildcard not allowed, found in"),
    (["s" * 321], "320 characters"),
]


@pytest.mark.parametrize("field", ["serviceAccounts", "notServiceAccounts"])
@pytest.mark.parametrize(("values", "message"), SERVICE_ACCOUNTS_BAD)
def test_service_accounts_istio_refuses_are_refused(field: str, values: list[str], message: str) -> None:
    rendered = _errors(_rule(field=field, values=values))
    assert any(path == f"spec.rules.0.from.0.source.{field}" and message in msg for path, msg in rendered), (
        rendered
    )


@pytest.mark.parametrize("field", ["serviceAccounts", "notServiceAccounts"])
def test_service_accounts_istio_accepts_parse(field: str) -> None:
    parse_object(_rule(field=field, values=["client", "shop/client", "s" * 320, "a.b-c/d_e"]))


# istio/istio pkg/config/security/security_test.go TestCheckValidPathTemplate, plus paths without a
# template (Envoy's prefix, suffix and presence matches) that must stay valid.
PATHS_GOOD = [
    "/{*}/foo",
    "/{*}/foo/",
    "/foo/{**}/bar",
    "/foo/bar/{**}",
    "/{*}",
    "/{**}",
    "{*}/bar/{**}",
    "/{*}/-._~%20!$&'()+,;:@=/a=c",
    "/foo/bar/*",
    "*/bar",
    "*",
    "/foo?bar",  # no template: the literal check does not apply
    "/a//b",
]
PATHS_BAD = [
    ("/foo/{**}buzz/bar", "beyond a supported path template"),
    ("/{*}/foo/{}/bar", "beyond a supported path template"),
    ("/foo/{*}/bar/*", "with invalid string literal"),
    ("/foo/{*}/bar/**/buzz", "with invalid string literal"),
    ("/foo/{buzz}/bar", "beyond a supported path template"),
    ("/{buzz}", "beyond a supported path template"),
    ("/foo/{buzz}/bar/{**}", "beyond a supported path template"),
    ("/foo/{buzz=*}/bar/{**}", "beyond a supported path template"),
    ("/{*}/foo/{buzz=**}/bar", "beyond a supported path template"),
    ("/{*}/foo/{**}bar", "beyond a supported path template"),
    ("/{*}/foo/{*}.txt", "beyond a supported path template"),
    ("/{*}/foo/{temp", "beyond a supported path template"),
    ("/{*}/foo/temp}/bar", "beyond a supported path template"),
    ("/{*}/foo/temp}/*", "beyond a supported path template"),
    ("/{**}/foo/temp/{*}/bar", "{**} is not the last operator"),
    ("/{**}/{**}", "{**} is not the last operator"),
    ("/{**}/foo/temp/{**}/bar", "{**} is not the last operator"),
    ("/{*}/foo/?abc", "with invalid string literal"),
    ("/{*}//foo", "segment '' with invalid string literal"),
    ("/{*}/caf\u00e9", "with invalid string literal"),  # the literal is ASCII, as in Go's regexp
]


@pytest.mark.parametrize("field", ["paths", "notPaths"])
def test_paths_istio_accepts_parse(field: str) -> None:
    parse_object(_rule(field=field, values=PATHS_GOOD))


@pytest.mark.parametrize("field", ["paths", "notPaths"])
@pytest.mark.parametrize(("path", "message"), PATHS_BAD)
def test_path_templates_istio_refuses_are_refused(field: str, path: str, message: str) -> None:
    # ValidateAuthorizationPolicy: security.CheckValidPathTemplate on paths and notPaths
    rendered = _errors(_rule(field=field, values=["/ok", path]))
    assert any(
        path_ == f"spec.rules.0.to.0.operation.{field}"
        and "invalid or unsupported path" in msg
        and message in msg
        for path_, msg in rendered
    ), rendered


CUSTOM_REFUSED_SOURCE_FIELDS = [
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
]


@pytest.mark.parametrize("field", CUSTOM_REFUSED_SOURCE_FIELDS)
def test_custom_policies_refuse_the_source_fields_istio_refuses_with_custom(field: str) -> None:
    # ValidateAuthorizationPolicy: "From.<Field> is currently not supported with CUSTOM action"
    body = _rule(field=field, values=[SOURCE_VALUES[field]], action="CUSTOM")
    body["spec"]["rules"] = [
        {"when": [SOURCE_IP]},
        {"from": [{"source": {"ipBlocks": ["10.0.0.1"]}}, *body["spec"]["rules"][0]["from"]]},
    ]
    with pytest.raises(
        ValidationError,
        match=rf"rules\[1\]\.from\[1\]\.source\.{field} is currently not supported with CUSTOM",
    ):
        parse_object(body)
    for action in ("ALLOW", "DENY", "AUDIT"):
        parse_object(_rule(field=field, values=[SOURCE_VALUES[field]], action=action))


def test_custom_policies_accept_the_other_source_and_operation_fields() -> None:
    for field in (*SOURCE_VALUES, *OPERATION_VALUES):
        if field not in CUSTOM_REFUSED_SOURCE_FIELDS:
            parse_object(
                _rule(
                    field=field, values=[SOURCE_VALUES.get(field) or OPERATION_VALUES[field]], action="CUSTOM"
                )
            )
    # Istio counts len() != 0: an unset identity list next to a set field is fine
    parse_object(
        _with(
            AP,
            {
                "action": "CUSTOM",
                "provider": {"name": "ext"},
                "rules": [
                    {"from": [{"source": {"principals": [], "namespaces": None, "ipBlocks": ["10.0.0.1"]}}]}
                ],
            },
        )
    )


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
