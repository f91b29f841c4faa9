"""The controller's warnings for AuthorizationPolicies that L4 enforcement cannot honour as written."""

from __future__ import annotations

import dataclasses

import pytest

from controller.registry import ConfigObject
from controller.registry.authz_warnings import authz_warnings
from controller.sources.yamldir import parse_text

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: shop}}
spec:
  action: {action}
  rules:
  - to: [{{operation: {{methods: [GET], ports: ["8080"]}}}}]
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/web], remoteIpBlocks: [10.0.0.0/8]}}}}]
    when: [{{key: "request.headers[x-user]", values: [alice]}}]
"""
L4_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [shop], ipBlocks: [10.1.0.0/16]}}]
    to: [{operation: {ports: ["8080"]}}]
    when: [{key: source.principal, values: [cluster.local/ns/shop/sa/web]}]
"""
PREFIX = (
    "shop.yaml:1: AuthorizationPolicy shop/p: nodemesh enforces at L4 and does not support HTTP "
    "attributes (found: methods, remoteIpBlocks, when request.headers[x-user]). There is no waypoint "
    "proxy to enforce HTTP rules. "
)


def one(text: str) -> ConfigObject:
    parsed = parse_text(text, "shop.yaml")
    assert parsed.errors == ()
    [obj] = parsed.objects
    return obj


@pytest.mark.parametrize(
    ("action", "consequence"),
    [
        (
            "ALLOW",
            "Within an ALLOW policy, rules matching HTTP attributes are omitted (they match no "
            "connection). This will be more restrictive than requested.",
        ),
        (
            "DENY",
            "DENY policy with HTTP attributes is enforced without the HTTP rules. "
            "This will be more restrictive than requested.",
        ),
        (
            "AUDIT",
            "Within an AUDIT policy, rules matching HTTP attributes are omitted (they match no "
            "connection). Fewer connections will be audited than requested.",
        ),
    ],
)
def test_http_attributes_are_named_with_the_consequence_for_the_action(action: str, consequence: str) -> None:
    assert [str(w) for w in authz_warnings(one(POLICY.format(action=action)))] == [PREFIX + consequence]


def test_a_pure_l4_policy_has_no_warning() -> None:
    assert authz_warnings(one(L4_POLICY)) == []


def test_other_kinds_have_no_warning() -> None:
    peer_auth = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: d}\n"
    assert authz_warnings(one(peer_auth)) == []


def test_a_rule_that_fails_closed_on_a_value_the_agents_cannot_read_is_reported() -> None:
    """The controller's validation refuses such values; should one get past it, say so."""
    obj = one(L4_POLICY)
    body = {**obj.body, "spec": {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}}
    [warning] = authz_warnings(dataclasses.replace(obj, body=body))
    assert str(warning) == (
        "shop.yaml:1: AuthorizationPolicy shop/l4: rules[0] is invalid (spec.rules[0].from[0].source."
        "ipBlocks[0]: '10.0.0.0/33' is not an IP address or CIDR); an ALLOW rule that cannot be read "
        "matches nothing"
    )
