"""Tests of AuthorizationPolicy compilation and of the Connection input: errors, notes, string forms."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.authz import (
    Action,
    Connection,
    ConnectionInputError,
    PolicyCompileError,
    PolicyIndex,
    PolicyRef,
    compile_policy,
)
from api.authz.model import StringPatterns
from api.resources import PolicyObject, Workload

DRY_RUN = "istio.io/dry-run"
SERVER = Workload("foo/server", "server", "foo", "server", "node-1", ("10.0.0.2",), (("app", "server"),))


def ap(name: str, spec: Any, ns: str = "foo", annotations: dict[str, Any] | None = None) -> PolicyObject:
    metadata: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations is not None:
        metadata["annotations"] = annotations
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": spec,
    }
    return PolicyObject.of("AuthorizationPolicy", ns, name, body)


# --- string match forms (istio ambient `stringToMatch`, ztunnel `StringMatch`) -----------------------

STRING_CASES = [
    # (pattern, value, matches, rule)
    ("foo", "foo", True, "exact match"),
    ("foo", "foobar", False, "exact is whole-string"),
    ("foo", "", False, "exact never matches an empty value"),
    ("foo*", "foobar", True, "prefix match"),
    ("foo*", "xfoo", False, "prefix anchors at the start"),
    ("*foo", "barfoo", True, "suffix match"),
    ("*foo", "foobar", False, "suffix anchors at the end"),
    ("*", "anything", True, "presence matches any non-empty value"),
    ("*", "", False, "presence needs a value"),
    ("a.b*", "axb", False, "'.' is literal, not a regex"),
    ("[a]*", "[a]x", True, "brackets are literal, not a character class"),
    ("f*o", "f*o", True, "a '*' in the middle is literal"),
    ("f*o", "foo", False, "a '*' in the middle is not a wildcard"),
]


@pytest.mark.parametrize(
    ("pattern", "value", "expected", "rule"), STRING_CASES, ids=[c[3] for c in STRING_CASES]
)
def test_string_match_forms(pattern: str, value: str, expected: bool, rule: str) -> None:
    assert StringPatterns.parse([pattern]).matches(value) is expected, rule


def test_string_match_missing_value_never_matches() -> None:
    assert StringPatterns.parse(["*", "x", "x*", "*x"]).matches(None) is False


# --- policy-level errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"action": "LOG"}, "spec.action"),
        ("not-an-object", "spec"),
        ({"rules": {"from": []}}, "spec.rules"),
        ({"selector": ["app"]}, "spec.selector"),
        ({"selector": {"matchLabels": {"app": 1}}}, "spec.selector.matchLabels"),
    ],
)
def test_unusable_policy_raises_error_naming_the_field(spec: Any, field: str) -> None:
    with pytest.raises(PolicyCompileError) as info:
        compile_policy(ap("bad", spec))
    assert info.value.field_path == field
    assert (info.value.namespace, info.value.name) == ("foo", "bad")
    assert "foo/bad" in str(info.value)


def test_index_reports_rejected_and_skipped_policies_and_keeps_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    objs = [
        ap("bad-action", {"action": "LOG"}),
        ap(
            "waypoint", {"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}}
        ),
        ap("good", {"rules": [{}]}),
        PolicyObject.of("PeerAuthentication", "foo", "pa", {"spec": {}}),  # other kinds are ignored
    ]
    with caplog.at_level(logging.WARNING, logger="nodemesh.authz"):
        index = PolicyIndex.build(objs)
    assert [e.name for e in index.errors] == ["bad-action"]
    assert index.skipped == (PolicyRef("foo", "waypoint"),)
    assert [p.ref for p in index.policies()] == [PolicyRef("foo", "good")]
    messages = [r.getMessage() for r in caplog.records]
    assert any("authz.policy_rejected policy=foo/bad-action field=spec.action" in m for m in messages)
    assert any("authz.policy_not_applicable policy=foo/waypoint reason=targetRef" in m for m in messages)


def test_wrong_kind_is_an_error() -> None:
    with pytest.raises(PolicyCompileError):
        compile_policy(PolicyObject.of("HTTPRoute", "foo", "r", {"spec": {}}))


def test_default_action_is_allow_and_null_spec_is_empty() -> None:
    policy = compile_policy(ap("p", None))
    assert policy is not None
    assert (policy.action, policy.rules, policy.selector) == (Action.ALLOW, (), None)


@pytest.mark.parametrize(
    ("value", "dry_run"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("false", False),
        ("0", False),
        ("yes", False),
        ([], False),
    ],
)
def test_dry_run_annotation_follows_go_parse_bool(value: Any, dry_run: bool) -> None:
    policy = compile_policy(ap("p", {}, annotations={"istio.io/dry-run": value}))
    assert policy is not None and policy.dry_run is dry_run


def test_custom_policy_keeps_provider_name() -> None:
    policy = compile_policy(ap("ext", {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}))
    assert policy is not None and (policy.action, policy.provider) == (Action.CUSTOM, "opa")


# --- rule-level degradations: L7 attributes and invalid values -------------------------------------


@pytest.mark.parametrize(
    ("rule", "attribute"),
    [
        ({"to": [{"operation": {"methods": ["GET"]}}]}, "methods"),
        ({"to": [{"operation": {"notPaths": ["/x"]}}]}, "notPaths"),
        ({"to": [{"operation": {"hosts": ["a.example"]}}]}, "hosts"),
        ({"from": [{"source": {"requestPrincipals": ["*"]}}]}, "requestPrincipals"),
        # istio ambient `httpSources` / `l4WhenAttributes`: the remote IP comes from X-Forwarded-For
        ({"from": [{"source": {"remoteIpBlocks": ["10.1.2.0/24"]}}]}, "remoteIpBlocks"),
        ({"from": [{"source": {"notRemoteIpBlocks": ["10.1.2.0/24"]}}]}, "notRemoteIpBlocks"),
        ({"when": [{"key": "remote.ip", "values": ["10.1.2.3"]}]}, "when remote.ip"),
        ({"when": [{"key": "remote.ip", "notValues": ["10.1.2.3"]}]}, "when remote.ip"),
        ({"when": [{"key": "request.headers[x-token]", "values": ["a"]}]}, "when request.headers[x-token]"),
        ({"when": [{"key": "connection.sni", "values": ["a"]}]}, "when connection.sni"),
    ],
)
def test_l7_attribute_is_recorded_per_action(rule: dict[str, Any], attribute: str) -> None:
    allow = compile_policy(ap("a", {"rules": [rule]}))
    deny = compile_policy(ap("d", {"action": "DENY", "rules": [rule]}))
    assert allow is not None and deny is not None
    assert allow.rules[0].never_matches and attribute in allow.rules[0].l7_ignored
    assert not deny.rules[0].never_matches and attribute in deny.rules[0].l7_ignored
    assert "matches nothing" in allow.rules[0].notes[0]
    assert "ignored" in deny.rules[0].notes[0]


@pytest.mark.parametrize(
    "rule",
    [
        {"from": [{"source": {"ipBlocks": ["10.1.2.0/24"]}}]},
        {"from": [{"source": {"notIpBlocks": ["10.1.2.0/24"]}}]},
        {"when": [{"key": "source.ip", "values": ["10.1.2.3"]}]},
        {"when": [{"key": "source.ip", "notValues": ["10.1.2.3"]}]},
    ],
)
def test_peer_address_attributes_stay_l4(rule: dict[str, Any]) -> None:
    # ipBlocks and the `source.ip` when-key are the peer address (ambient `l4WhenAttributes`),
    # unlike remoteIpBlocks and `remote.ip`
    for spec in ({"rules": [rule]}, {"action": "DENY", "rules": [rule]}):
        policy = compile_policy(ap("p", spec))
        assert policy is not None
        compiled = policy.rules[0]
        assert (compiled.l7_ignored, compiled.notes) == ((), ())
        assert not compiled.never_matches and not compiled.always_matches


@pytest.mark.parametrize(
    ("rule", "where"),
    [
        ({"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}, "spec.rules[0].from[0].source.ipBlocks[0]"),
        (
            {"from": [{"source": {"notIpBlocks": ["host.example"]}}]},
            "spec.rules[0].from[0].source.notIpBlocks[0]",
        ),
        ({"to": [{"operation": {"ports": ["65536"]}}]}, "spec.rules[0].to[0].operation.ports[0]"),
        ({"to": [{"operation": {"notPorts": ["-1"]}}]}, "spec.rules[0].to[0].operation.notPorts[0]"),
        ({"from": [{"source": {}}]}, "spec.rules[0].from[0].source"),
        ({"to": [{}]}, "spec.rules[0].to[0].operation"),
        ({"from": [{"source": {"principal": ["x"]}}]}, "spec.rules[0].from[0].source.principal"),
        ({"from": [{"source": {"principals": "x"}}]}, "spec.rules[0].from[0].source.principals"),
        ({"when": [{"key": "source.ip"}]}, "spec.rules[0].when[0]"),
        ({"when": [{"values": ["1.2.3.4"]}]}, "spec.rules[0].when[0]"),
        ({"when": [{"key": "destination.port", "values": ["x"]}]}, "spec.rules[0].when[0].values[0]"),
        # HTTP attributes, never matched at L4, but their addresses are still read (Istio's webhook
        # refuses them too), so a typo fails closed as it does in ipBlocks
        (
            {"from": [{"source": {"remoteIpBlocks": ["10.0.0.0/33"]}}]},
            "spec.rules[0].from[0].source.remoteIpBlocks[0]",
        ),
        (
            {"from": [{"source": {"principals": ["x"], "notRemoteIpBlocks": ["1.2.3.4", "nope"]}}]},
            "spec.rules[0].from[0].source.notRemoteIpBlocks[1]",
        ),
        ({"when": [{"key": "remote.ip", "values": ["x"]}]}, "spec.rules[0].when[0].values[0]"),
        ({"when": [{"key": "remote.ip", "notValues": ["x"]}]}, "spec.rules[0].when[0].notValues[0]"),
        (
            {"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]},
            "spec.rules[0].from[0].source.serviceAccounts[0]",
        ),
        ({"form": []}, "spec.rules[0]"),
        # every field empty: Istio's webhook refuses it, and ztunnel skips an empty match, so such a
        # source is nobody (it used to hold for everyone: an ALLOW admitted every peer)
        ({"from": [{"source": {"principals": []}}]}, "spec.rules[0].from[0].source"),
        ({"from": [{"source": {"principals": [], "notNamespaces": None}}]}, "spec.rules[0].from[0].source"),
        ({"to": [{"operation": {"ports": []}}]}, "spec.rules[0].to[0].operation"),
        ({"to": [{"operation": {"methods": []}}]}, "spec.rules[0].to[0].operation"),
        # beyond 4,300 digits int() raises ValueError, which escaped compile_policy and PolicyIndex
        ({"to": [{"operation": {"ports": ["9" * 5000]}}]}, "spec.rules[0].to[0].operation.ports[0]"),
        ({"when": [{"key": "destination.port", "values": ["1" * 5000]}]}, "spec.rules[0].when[0]"),
    ],
)
def test_invalid_rule_fails_closed_and_says_where(rule: dict[str, Any], where: str) -> None:
    allow = compile_policy(ap("a", {"rules": [rule, {}]}))
    deny = compile_policy(ap("d", {"action": "DENY", "rules": [rule]}))
    assert allow is not None and deny is not None
    assert allow.rules[0].never_matches and where in allow.rules[0].notes[0]
    assert deny.rules[0].always_matches and where in deny.rules[0].notes[0]
    # The other rules of the policy are unaffected.
    assert not allow.rules[1].never_matches


def _first_match(rule: dict[str, Any], identity: str | None) -> int | None:
    policy = compile_policy(ap("a", {"rules": [rule]}))
    assert policy is not None
    conn = Connection(
        src_ip="10.1.2.3", src_identity=identity, dst_ip="10.0.0.2", dst_port=8080, dst_workload=SERVER
    )
    return policy.first_matching_rule(conn)


def test_empty_from_and_to_lists_constrain_nothing() -> None:
    # as in istiod's translation (no clause); the controller refuses them, as Istio's webhook does
    assert _first_match({"from": [], "to": []}, None) == 0


def test_empty_or_null_fields_next_to_a_set_one_are_unset() -> None:
    # Istio counts len() == 0 as unset (an HTTP field too: `methods: []` is no HTTP attribute), and
    # Kubernetes prunes null / protojson reads it as unset
    bar, other = "cluster.local/ns/bar/sa/client", "cluster.local/ns/other/sa/client"
    ports_and_no_methods = {"to": [{"operation": {"ports": ["8080"], "methods": []}}]}
    assert _first_match(ports_and_no_methods, bar) == 0
    null_principals = {"from": [{"source": {"principals": None, "namespaces": ["bar"]}}]}
    assert _first_match(null_principals, bar) == 0
    assert _first_match(null_principals, other) is None
    null_values = {"when": [{"key": "source.namespace", "values": None, "notValues": ["other"]}]}
    assert _first_match(null_values, bar) == 0
    assert _first_match(null_values, other) is None


def test_ip_block_with_host_bits_is_accepted_like_go_netip() -> None:
    policy = compile_policy(ap("a", {"rules": [{"from": [{"source": {"ipBlocks": ["10.1.2.3/16"]}}]}]}))
    assert policy is not None
    assert (
        policy.first_matching_rule(
            Connection(
                src_ip="10.1.200.1", src_identity=None, dst_ip="10.0.0.2", dst_port=1, dst_workload=SERVER
            )
        )
        == 0
    )


# --- Connection input ------------------------------------------------------------------------------


def test_connection_derives_identity_parts() -> None:
    conn = Connection(
        src_ip="10.1.2.3",
        src_identity="spiffe://td.example/ns/bar/sa/client",
        dst_ip="10.0.0.2",
        dst_port=80,
        dst_workload=SERVER,
    )
    assert (conn.principal, conn.src_namespace, conn.trust_domain, conn.service_account) == (
        "td.example/ns/bar/sa/client",
        "bar",
        "td.example",
        ("bar", "client"),
    )


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"src_identity": "td/ns/bar"}, "not of the form"),
        ({"src_identity": "td/namespace/bar/sa/x"}, "not of the form"),
        ({"src_identity": "td/ns//sa/x"}, "not of the form"),
        ({"src_identity": "td/ns/bar/sa/x", "src_namespace": "foo"}, "disagrees"),
        ({"src_identity": None, "src_namespace": "foo"}, "plaintext"),
        ({"src_ip": "10.1.2"}, "bad address"),
        ({"dst_port": 70000}, "bad destination port"),
    ],
)
def test_malformed_connection_is_rejected_with_reason(kwargs: dict[str, Any], text: str) -> None:
    args: dict[str, Any] = {
        "src_ip": "10.1.2.3",
        "src_identity": "td/ns/bar/sa/x",
        "dst_ip": "10.0.0.2",
        "dst_port": 80,
        "dst_workload": SERVER,
    }
    args.update(kwargs)
    with pytest.raises(ConnectionInputError, match=text):
        Connection(**args)


# --- robustness: arbitrary bodies never crash the compiler ------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
known_keys = st.sampled_from(
    [
        "action",
        "rules",
        "selector",
        "from",
        "to",
        "when",
        "source",
        "operation",
        "principals",
        "ipBlocks",
        "ports",
        "key",
        "values",
        "notValues",
        "matchLabels",
        "provider",
        "targetRef",
        "methods",
    ]
)
spec_like = st.recursive(
    st.none() | st.text(max_size=6) | st.sampled_from(["ALLOW", "DENY", "10.0.0.0/8", "80", "*"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(known_keys, children, max_size=4),
    max_leaves=20,
)


metadata_like = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"annotations": st.one_of(json_values, st.dictionaries(st.just(DRY_RUN), json_values))}
    ),
)


@settings(max_examples=300, deadline=None)
@given(spec=st.one_of(json_values, spec_like), metadata=metadata_like)
def test_compiler_never_raises_anything_but_policy_compile_error(spec: Any, metadata: Any) -> None:
    obj = PolicyObject.of("AuthorizationPolicy", "foo", "fuzz", {"metadata": metadata, "spec": spec})
    try:
        policy = compile_policy(obj)
    except PolicyCompileError as exc:
        assert exc.name == "fuzz" and exc.field_path
        return
    if policy is not None:  # whatever compiled can be evaluated
        conn = Connection(
            src_ip="10.1.2.3",
            src_identity="td/ns/bar/sa/x",
            dst_ip="10.0.0.2",
            dst_port=80,
            dst_workload=SERVER,
        )
        idx = policy.first_matching_rule(conn)
        assert idx is None or 0 <= idx < len(policy.rules)
