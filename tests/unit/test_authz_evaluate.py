"""Table-driven tests of the L4 AuthorizationPolicy evaluator; each case names the Istio rule it checks.

Reference: https://istio.io/latest/docs/reference/config/security/authorization-policy/ and
istio/ztunnel `src/rbac.rs`. Deliberate differences from ztunnel are marked "nodemesh:".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from api.authz import Connection, Decision, PolicyIndex, PolicyRef, Reason, evaluate
from api.resources import PolicyObject, Workload

TD = "cluster.local"
CLIENT = f"{TD}/ns/bar/sa/client"  # the usual mTLS caller
OTHER = f"{TD}/ns/foo/sa/other"
PLAINTEXT = None

SERVER = Workload(
    uid="foo/server",
    name="server",
    namespace="foo",
    service_account="server",
    node="node-1",
    ips=("10.0.0.2",),
    labels=(("app", "server"), ("version", "v1")),
)


def ap(
    name: str,
    spec: dict[str, Any],
    ns: str = "foo",
    annotations: dict[str, str] | None = None,
) -> PolicyObject:
    """An AuthorizationPolicy object as a user writes it."""
    metadata: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations:
        metadata["annotations"] = annotations
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": spec,
    }
    return PolicyObject.of("AuthorizationPolicy", ns, name, body)


def src(**source: list[str]) -> dict[str, Any]:
    """A rule with one `from` entry."""
    return {"from": [{"source": source}]}


def op(**operation: list[str]) -> dict[str, Any]:
    """A rule with one `to` entry."""
    return {"to": [{"operation": operation}]}


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    return {"when": [cond]}


@dataclass(frozen=True)
class Case:
    id: str
    istio_rule: str  # the sentence of the Istio reference (or ztunnel behaviour) this case checks
    policies: list[PolicyObject]
    expect_allowed: bool
    expect_reason: Reason
    expect_policy: str | None = None  # "ns/name"
    expect_rule: int | None = None
    identity: str | None = CLIENT
    src_ip: str = "10.1.2.3"
    dst_port: int = 8080
    workload: Workload = SERVER
    root_namespace: str = "istio-system"
    expect_l7: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


ALLOW_ALL: dict[str, Any] = {"rules": [{}]}
DENY_ALL: dict[str, Any] = {"action": "DENY", "rules": [{}]}

CASES: list[Case] = [
    # --- selection and defaults -------------------------------------------------------------
    Case(
        "no_policy_allows",
        "If there are no ALLOW policies for the workload, allow the request.",
        [],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    Case(
        "policy_in_other_namespace_does_not_select",
        "A policy without selector applies to all workloads in its own namespace only.",
        [ap("deny-bar", {}, ns="bar")],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    Case(
        "empty_allow_spec_denies_all",
        "spec: {} (ALLOW with no rules) matches nothing, so the workload denies everything.",
        [ap("allow-nothing", {})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "empty_allow_spec_denies_plaintext_too",
        "spec: {} denies all, identity or not.",
        [ap("allow-nothing", {})],
        False,
        Reason.NOT_ALLOWED,
        identity=PLAINTEXT,
    ),
    Case(
        "allow_with_one_empty_rule_allows_all",
        "rules: [{}] — an empty rule is always matched.",
        [ap("allow-all", ALLOW_ALL)],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/allow-all",
        0,
    ),
    Case(
        "deny_without_rules_matches_nothing",
        "A DENY policy with no rules never matches.",
        [ap("deny-nothing", {"action": "DENY"})],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    Case(
        "deny_with_empty_rule_denies_all",
        "A DENY policy with rules: [{}] matches every request.",
        [ap("deny-all", DENY_ALL)],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/deny-all",
        0,
    ),
    Case(
        "deny_is_evaluated_before_allow",
        "If there are any DENY policies that match the request, deny the request (before ALLOW).",
        [ap("allow-all", ALLOW_ALL), ap("deny-all", DENY_ALL)],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/deny-all",
        0,
    ),
    Case(
        "root_namespace_policy_is_mesh_wide",
        "A policy in the root namespace applies to all workloads in the mesh.",
        [ap("allow-nothing", {}, ns="istio-system")],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "root_namespace_selector_narrows_across_namespaces",
        "A root-namespace policy with a selector applies to matching workloads in every namespace.",
        [ap("deny-server", {**DENY_ALL, "selector": {"matchLabels": {"app": "server"}}}, ns="istio-system")],
        False,
        Reason.DENIED_BY_POLICY,
        "istio-system/deny-server",
        0,
    ),
    Case(
        "root_namespace_selector_not_matching",
        "A root-namespace policy's selector still has to match the workload's labels.",
        [ap("deny-db", {**DENY_ALL, "selector": {"matchLabels": {"app": "db"}}}, ns="istio-system")],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    Case(
        "configurable_root_namespace",
        "The root namespace is configurable; istio-system is then an ordinary namespace.",
        [ap("deny-all", DENY_ALL, ns="istio-system"), ap("allow-nothing", {}, ns="mesh-root")],
        False,
        Reason.NOT_ALLOWED,
        root_namespace="mesh-root",
    ),
    Case(
        "selector_subset_of_labels_selects",
        "selector.matchLabels selects workloads whose labels include all of them.",
        [ap("deny", {**DENY_ALL, "selector": {"matchLabels": {"app": "server"}}})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/deny",
        0,
    ),
    Case(
        "selector_with_missing_label_does_not_select",
        "A workload lacking one matchLabels entry is not selected.",
        [ap("deny", {**DENY_ALL, "selector": {"matchLabels": {"app": "server", "tier": "db"}}})],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    Case(
        "selector_with_other_value_does_not_select",
        "matchLabels values compare exactly.",
        [ap("deny", {**DENY_ALL, "selector": {"matchLabels": {"version": "v2"}}})],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    Case(
        "target_ref_policy_not_applied_at_l4",
        "ztunnel ignores targetRef(s) policies: they bind to waypoints/gateways, not to workloads.",
        [ap("waypoint-only", {"targetRefs": [{"kind": "Service", "group": "", "name": "server"}]})],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    # --- CUSTOM, AUDIT, dry-run ------------------------------------------------------------------
    Case(
        "custom_without_provider_denies_all",
        "CUSTOM is evaluated first; an unusable provider yields Istio's deny-all policy.",
        [
            ap("ext", {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [op(ports=["1"])]}),
            ap("allow-all", ALLOW_ALL),
        ],
        False,
        Reason.DENIED_CUSTOM_UNSUPPORTED,
        "foo/ext",
    ),
    Case(
        "custom_in_other_namespace_has_no_effect",
        "CUSTOM policies are scoped like the others.",
        [ap("ext", {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}, ns="bar")],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    Case(
        "audit_never_changes_the_decision",
        "AUDIT policies do not affect whether a request is allowed.",
        [ap("audit-all", {"action": "AUDIT", "rules": [{}]})],
        True,
        Reason.ALLOWED_NO_POLICY,
        extra={"audit": [PolicyRef("foo", "audit-all")]},
    ),
    Case(
        "audit_with_allow_present",
        "An AUDIT policy does not count as an ALLOW policy.",
        [ap("audit-all", {"action": "AUDIT", "rules": [{}]}), ap("allow-nothing", {})],
        False,
        Reason.NOT_ALLOWED,
        extra={"audit": [PolicyRef("foo", "audit-all")]},
    ),
    Case(
        "audit_not_matching_is_not_reported",
        "Only AUDIT policies whose rules match are reported.",
        [ap("audit-9", {"action": "AUDIT", "rules": [op(ports=["9"])]})],
        True,
        Reason.ALLOWED_NO_POLICY,
        extra={"audit": []},
    ),
    Case(
        "dry_run_deny_is_not_enforced",
        'istio.io/dry-run: "true" — evaluate and report, never enforce.',
        [ap("deny-all", DENY_ALL, annotations={"istio.io/dry-run": "true"})],
        True,
        Reason.ALLOWED_NO_POLICY,
        extra={"dry_run_allowed": False, "dry_run_matched": [("foo/deny-all", True, 0)]},
    ),
    Case(
        "dry_run_allow_does_not_count_as_allow_policy",
        "A dry-run ALLOW policy does not turn on default-deny for the workload.",
        [ap("allow-nothing", {}, annotations={"istio.io/dry-run": "true"})],
        True,
        Reason.ALLOWED_NO_POLICY,
        extra={"dry_run_allowed": False, "dry_run_matched": [("foo/allow-nothing", False, None)]},
    ),
    Case(
        "dry_run_false_is_enforced",
        'istio.io/dry-run: "false" is an ordinary policy.',
        [ap("deny-all", DENY_ALL, annotations={"istio.io/dry-run": "false"})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/deny-all",
        0,
        extra={"dry_run_allowed": None},
    ),
    # --- source fields -----------------------------------------------------------------------------
    Case(
        "principal_exact",
        "principals: exact match of <td>/ns/<ns>/sa/<sa>.",
        [ap("a", {"rules": [src(principals=[CLIENT])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "principal_exact_other_identity",
        "principals: a different identity does not match.",
        [ap("a", {"rules": [src(principals=[CLIENT])]})],
        False,
        Reason.NOT_ALLOWED,
        identity=OTHER,
    ),
    Case(
        "principal_spiffe_scheme_is_not_written",
        "Principals are written without spiffe://.",
        [ap("a", {"rules": [src(principals=[f"spiffe://{CLIENT}"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "principal_prefix",
        "principals: 'prefix*' match.",
        [ap("a", {"rules": [src(principals=[f"{TD}/ns/bar/*"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "principal_suffix",
        "principals: '*suffix' match.",
        [ap("a", {"rules": [src(principals=["*/sa/client"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "principal_presence_requires_identity",
        "principals: ['*'] matches any authenticated peer.",
        [ap("a", {"rules": [src(principals=["*"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "principal_cannot_match_plaintext",
        "principals require mTLS: a plaintext peer never matches.",
        [ap("a", {"rules": [src(principals=["*"])]})],
        False,
        Reason.NOT_ALLOWED,
        identity=PLAINTEXT,
    ),
    Case(
        "principal_glob_in_middle_is_literal",
        "Only leading/trailing '*' are wildcards (no regex).",
        [ap("a", {"rules": [src(principals=[f"{TD}/ns/*/sa/client"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "not_principals_excludes",
        "notPrincipals: a listed identity is excluded.",
        [ap("a", {"rules": [src(notPrincipals=[CLIENT])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "not_principals_holds_for_plaintext_in_allow",
        "ztunnel rbac.rs: a plaintext peer has no principal, so notPrincipals holds (Envoy alike).",
        [ap("a", {"rules": [src(notPrincipals=[CLIENT])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
        identity=PLAINTEXT,
    ),
    Case(
        "deny_not_principals_star_requires_mtls",
        "DENY with notPrincipals: ['*'] denies every plaintext peer (Istio's require-mTLS recipe).",
        [ap("require-mtls", {"action": "DENY", "rules": [src(notPrincipals=["*"])]})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/require-mtls",
        0,
        identity=PLAINTEXT,
    ),
    Case(
        "deny_not_principals_star_lets_mtls_through",
        "The same DENY does not match an mTLS peer.",
        [ap("require-mtls", {"action": "DENY", "rules": [src(notPrincipals=["*"])]})],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    Case(
        "namespaces_match_identity_namespace",
        "namespaces: the peer's namespace from its identity.",
        [ap("a", {"rules": [src(namespaces=["bar"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "namespaces_cannot_match_plaintext",
        "namespaces require mTLS.",
        [ap("a", {"rules": [src(namespaces=["*"])]})],
        False,
        Reason.NOT_ALLOWED,
        identity=PLAINTEXT,
    ),
    Case(
        "not_namespaces_excludes",
        "notNamespaces excludes the listed namespaces.",
        [ap("a", {"rules": [src(notNamespaces=["bar"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "not_namespaces_holds_for_plaintext",
        "ztunnel rbac.rs not_namespaces: plaintext => true.",
        [ap("a", {"rules": [src(notNamespaces=["bar"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
        identity=PLAINTEXT,
    ),
    Case(
        "service_accounts_ns_slash_sa",
        "serviceAccounts: '<ns>/<sa>' of the peer identity.",
        [ap("a", {"rules": [src(serviceAccounts=["bar/client"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "service_accounts_bare_name_is_policy_namespace",
        "serviceAccounts: a bare name means that account in the policy's namespace.",
        [ap("a", {"rules": [src(serviceAccounts=["client"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "service_accounts_bare_name_same_namespace",
        "... which matches a peer of the policy's namespace.",
        [ap("a", {"rules": [src(serviceAccounts=["other"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
        identity=OTHER,
    ),
    Case(
        "trust_domains",
        "trustDomains: the peer identity's trust domain.",
        [ap("a", {"rules": [src(trustDomains=["other.domain"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "not_trust_domains",
        "notTrustDomains excludes the listed trust domains.",
        [ap("a", {"rules": [src(notTrustDomains=["other.domain"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "ip_blocks_cidr",
        "ipBlocks: CIDR match against the source IP.",
        [ap("a", {"rules": [src(ipBlocks=["10.1.0.0/16"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "ip_blocks_single_ip",
        "ipBlocks: a single IP is a /32.",
        [ap("a", {"rules": [src(ipBlocks=["10.1.2.4"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "ip_blocks_apply_to_plaintext",
        "ipBlocks need no identity.",
        [ap("a", {"rules": [src(ipBlocks=["10.1.2.3"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
        identity=PLAINTEXT,
    ),
    Case(
        "ip_blocks_ipv6",
        "ipBlocks: IPv6 CIDRs.",
        [ap("a", {"rules": [src(ipBlocks=["fd00::/64"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
        src_ip="fd00::7",
    ),
    Case(
        "ip_blocks_v4_cidr_never_matches_v6",
        "An IPv4 block does not contain an IPv6 peer.",
        [ap("a", {"rules": [src(ipBlocks=["0.0.0.0/0"])]})],
        False,
        Reason.NOT_ALLOWED,
        src_ip="fd00::7",
    ),
    Case(
        "not_ip_blocks",
        "notIpBlocks excludes the listed ranges.",
        [ap("a", {"rules": [src(notIpBlocks=["10.1.0.0/16"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    # --- operation fields ---------------------------------------------------------------------------
    Case(
        "ports",
        "ports: the destination port.",
        [ap("a", {"rules": [op(ports=["8080"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "ports_other",
        "ports: another destination port does not match.",
        [ap("a", {"rules": [op(ports=["8080"])]})],
        False,
        Reason.NOT_ALLOWED,
        dst_port=9090,
    ),
    Case(
        "not_ports",
        "notPorts excludes the listed ports.",
        [ap("a", {"rules": [op(notPorts=["8080"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    # --- combination rules ---------------------------------------------------------------------------
    Case(
        "from_and_to_are_anded",
        "Within a rule, from, to and when must all match.",
        [ap("a", {"rules": [{**src(namespaces=["bar"]), **op(ports=["9090"])}]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "from_and_to_both_match",
        "Within a rule, from, to and when must all match (all do).",
        [ap("a", {"rules": [{**src(namespaces=["bar"]), **op(ports=["8080"])}]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "from_entries_are_ored",
        "Entries of `from` are OR-ed.",
        [
            ap(
                "a",
                {
                    "rules": [
                        {"from": [{"source": {"namespaces": ["x"]}}, {"source": {"namespaces": ["bar"]}}]}
                    ]
                },
            )
        ],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "to_entries_are_ored",
        "Entries of `to` are OR-ed.",
        [ap("a", {"rules": [{"to": [{"operation": {"ports": ["1"]}}, {"operation": {"ports": ["8080"]}}]}]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "fields_of_one_source_are_anded",
        "Fields of one source are AND-ed.",
        [ap("a", {"rules": [src(namespaces=["bar"], ipBlocks=["192.168.0.0/16"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "positive_and_negative_field_anded",
        "A field and its notX form are AND-ed.",
        [ap("a", {"rules": [src(namespaces=["*"], notNamespaces=["bar"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "values_of_a_field_are_ored",
        "Values in one field are OR-ed.",
        [ap("a", {"rules": [src(namespaces=["x", "bar"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "rules_are_ored_and_first_matching_is_reported",
        "A policy matches when any rule matches.",
        [ap("a", {"rules": [op(ports=["1"]), src(namespaces=["bar"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        1,
    ),
    Case(
        "any_allow_policy_may_allow",
        "If any of the ALLOW policies match the request, allow.",
        [ap("a1", {"rules": [op(ports=["1"])]}), ap("a2", {"rules": [op(ports=["8080"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a2",
        0,
    ),
    Case(
        "root_and_namespace_allow_policies_combine",
        "ALLOW policies from root and namespace are OR-ed.",
        [
            ap("a1", {"rules": [op(ports=["1"])]}),
            ap("a2", {"rules": [op(ports=["8080"])]}, ns="istio-system"),
        ],
        True,
        Reason.ALLOWED_BY_POLICY,
        "istio-system/a2",
        0,
    ),
    # --- when conditions -------------------------------------------------------------------------
    Case(
        "when_source_ip",
        "when source.ip: CIDR of the peer.",
        [ap("a", {"rules": [when("source.ip", ["10.1.0.0/16"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "when_source_ip_not_values",
        "when notValues exclude.",
        [ap("a", {"rules": [when("source.ip", not_values=["10.1.0.0/16"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "when_source_ip_is_l4_in_deny",
        "source.ip is one of ambient's l4WhenAttributes: a DENY rule still checks it.",
        [ap("d", {"action": "DENY", "rules": [when("source.ip", ["192.168.0.0/16"])]})],
        True,
        Reason.ALLOWED_NO_POLICY,
    ),
    Case(
        "when_source_ip_is_l4_in_deny_matching_peer",
        "... and denies a peer inside the block.",
        [ap("d", {"action": "DENY", "rules": [when("source.ip", ["10.1.0.0/16"])]})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
    ),
    Case(
        "when_source_namespace",
        "when source.namespace (needs mTLS).",
        [ap("a", {"rules": [when("source.namespace", ["bar"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "when_source_namespace_plaintext",
        "source.namespace cannot match a plaintext peer.",
        [ap("a", {"rules": [when("source.namespace", ["*"])]})],
        False,
        Reason.NOT_ALLOWED,
        identity=PLAINTEXT,
    ),
    Case(
        "when_source_principal",
        "when source.principal.",
        [ap("a", {"rules": [when("source.principal", [f"{TD}/ns/bar/*"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "when_destination_ip",
        "when destination.ip.",
        [ap("a", {"rules": [when("destination.ip", ["10.0.0.0/24"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        0,
    ),
    Case(
        "when_destination_port",
        "when destination.port.",
        [ap("a", {"rules": [when("destination.port", ["9090"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "when_values_and_not_values_anded",
        "values and notValues of one condition are AND-ed.",
        [ap("a", {"rules": [when("destination.port", ["8080"], ["8080"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "when_anded_with_from",
        "when is AND-ed with from.",
        [ap("a", {"rules": [{**src(namespaces=["bar"]), **when("destination.port", ["9090"])}]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    # --- L7 attributes at an L4 enforcement point ------------------------------------------------------
    Case(
        "allow_rule_with_methods_matches_nothing",
        "ztunnel: within an ALLOW policy, rules matching HTTP attributes are omitted.",
        [ap("a", {"rules": [op(methods=["GET"], ports=["8080"])]})],
        False,
        Reason.NOT_ALLOWED,
        expect_l7=True,
    ),
    Case(
        "allow_rule_with_request_principals_matches_nothing",
        "requestPrincipals need HTTP (JWT).",
        [ap("a", {"rules": [src(requestPrincipals=["*"])]})],
        False,
        Reason.NOT_ALLOWED,
        expect_l7=True,
    ),
    Case(
        "allow_rule_with_http_when_matches_nothing",
        "when keys other than the L4 ones need HTTP.",
        [ap("a", {"rules": [when("request.headers[x-user]", ["alice"])]})],
        False,
        Reason.NOT_ALLOWED,
        expect_l7=True,
    ),
    Case(
        "allow_rule_with_remote_ip_blocks_matches_nothing",
        "ambient httpSources: remoteIpBlocks is HTTP (X-Forwarded-For); omitted even for a peer inside it.",
        [ap("a", {"rules": [src(remoteIpBlocks=["10.1.2.0/24"])]})],
        False,
        Reason.NOT_ALLOWED,
        expect_l7=True,
    ),
    Case(
        "allow_rule_with_not_remote_ip_blocks_matches_nothing",
        "ambient httpSources: notRemoteIpBlocks is HTTP; omitted even for a peer outside it.",
        [ap("a", {"rules": [src(notRemoteIpBlocks=["192.168.0.0/16"])]})],
        False,
        Reason.NOT_ALLOWED,
        expect_l7=True,
    ),
    Case(
        "allow_rule_with_remote_ip_blocks_and_principals_matches_nothing",
        "The L4 fields next to remoteIpBlocks do not rescue an ALLOW rule.",
        [ap("a", {"rules": [src(principals=[CLIENT], remoteIpBlocks=["10.1.2.0/24"])]})],
        False,
        Reason.NOT_ALLOWED,
        expect_l7=True,
    ),
    Case(
        "allow_rule_with_remote_ip_when_matches_nothing",
        "remote.ip is not one of ambient's l4WhenAttributes: HTTP, even for the peer's own address.",
        [ap("a", {"rules": [when("remote.ip", ["10.1.2.3"])]})],
        False,
        Reason.NOT_ALLOWED,
        expect_l7=True,
    ),
    Case(
        "allow_l4_rule_next_to_l7_rule_still_allows",
        "Only the rule with HTTP attributes is omitted.",
        [ap("a", {"rules": [op(paths=["/admin"]), op(ports=["8080"])]})],
        True,
        Reason.ALLOWED_BY_POLICY,
        "foo/a",
        1,
    ),
    Case(
        "deny_rule_with_methods_enforced_on_remaining_fields",
        "DENY policy with HTTP attributes is enforced without the HTTP rules (more restrictive).",
        [ap("d", {"action": "DENY", "rules": [op(methods=["POST"], ports=["8080"])]})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
        expect_l7=True,
    ),
    Case(
        "deny_rule_with_methods_other_port_allowed",
        "... and its L4 fields still have to match.",
        [ap("d", {"action": "DENY", "rules": [op(methods=["POST"], ports=["8080"])]})],
        True,
        Reason.ALLOWED_NO_POLICY,
        dst_port=9090,
    ),
    Case(
        "deny_rule_with_only_l7_denies_everything",
        "nodemesh (fail closed): an L7-only DENY denies all; ztunnel makes it a no-op (istio#61126).",
        [ap("d", {"action": "DENY", "rules": [src(notRequestPrincipals=["*"])]})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
        expect_l7=True,
    ),
    Case(
        "deny_rule_with_remote_ip_blocks_denies_principal_from_any_address",
        "DENY with remoteIpBlocks is enforced without it: the principal is denied from any address.",
        [
            ap(
                "d",
                {"action": "DENY", "rules": [src(principals=[CLIENT], remoteIpBlocks=["192.168.0.0/16"])]},
            )
        ],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
        expect_l7=True,
    ),
    Case(
        "deny_rule_with_remote_ip_blocks_other_principal_allowed",
        "... and its principals still have to match.",
        [
            ap(
                "d",
                {"action": "DENY", "rules": [src(principals=[CLIENT], remoteIpBlocks=["10.1.2.0/24"])]},
            )
        ],
        True,
        Reason.ALLOWED_NO_POLICY,
        identity=OTHER,
    ),
    Case(
        "deny_rule_with_only_remote_ip_blocks_denies_everyone",
        "nodemesh (fail closed): a DENY made only of remoteIpBlocks denies all, whatever the address.",
        [ap("d", {"action": "DENY", "rules": [src(remoteIpBlocks=["192.168.0.0/16"])]})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
        identity=PLAINTEXT,
        expect_l7=True,
    ),
    Case(
        "deny_rule_with_only_not_remote_ip_blocks_denies_everyone",
        "nodemesh (fail closed): the same for notRemoteIpBlocks, even for a peer inside the block.",
        [ap("d", {"action": "DENY", "rules": [src(notRemoteIpBlocks=["10.1.2.0/24"])]})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
        expect_l7=True,
    ),
    Case(
        "deny_with_remote_ip_when_ignores_condition",
        "A remote.ip `when` in a DENY rule is ignored like any HTTP condition.",
        [
            ap(
                "d",
                {
                    "action": "DENY",
                    "rules": [{**src(namespaces=["bar"]), **when("remote.ip", ["192.168.0.1"])}],
                },
            )
        ],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
        expect_l7=True,
    ),
    Case(
        "deny_with_only_remote_ip_when_denies_everyone",
        "nodemesh (fail closed): a DENY whose only condition is remote.ip denies all.",
        [ap("d", {"action": "DENY", "rules": [when("remote.ip", not_values=["10.1.2.3"])]})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
        expect_l7=True,
    ),
    Case(
        "deny_with_http_when_ignores_condition",
        "An HTTP `when` in a DENY rule is ignored.",
        [
            ap(
                "d",
                {
                    "action": "DENY",
                    "rules": [{**src(namespaces=["bar"]), **when("request.auth.claims[iss]", ["x"])}],
                },
            )
        ],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
        expect_l7=True,
    ),
    # --- invalid values (fail closed) ---------------------------------------------------------------
    Case(
        "deny_rule_with_bad_remote_ip_block_matches_everything",
        "nodemesh: a remoteIpBlocks value is still read; an unreadable one fails closed, as in ipBlocks.",
        [
            ap(
                "d",
                {"action": "DENY", "rules": [src(principals=[OTHER], remoteIpBlocks=["10.1.0.0/99"])]},
            )
        ],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
    ),
    Case(
        "allow_rule_with_bad_cidr_matches_nothing",
        "nodemesh: an unreadable ALLOW rule matches nothing.",
        [ap("a", {"rules": [src(ipBlocks=["10.1.0.0/99"])]})],
        False,
        Reason.NOT_ALLOWED,
    ),
    Case(
        "deny_rule_with_bad_port_matches_everything",
        "nodemesh: an unreadable DENY rule matches everything.",
        [ap("d", {"action": "DENY", "rules": [op(ports=["http"])]})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
    ),
    Case(
        "deny_rule_with_empty_source_matches_everything",
        "Istio validation: `from.source` must not be empty.",
        [ap("d", {"action": "DENY", "rules": [{"from": [{"source": {}}]}]})],
        False,
        Reason.DENIED_BY_POLICY,
        "foo/d",
        0,
    ),
]


def _decide(case: Case, explain: bool = False) -> Decision:
    index = PolicyIndex.build(case.policies, root_namespace=case.root_namespace)
    conn = Connection(
        src_ip=case.src_ip,
        src_identity=case.identity,
        dst_ip="10.0.0.2",
        dst_port=case.dst_port,
        dst_workload=case.workload,
    )
    return evaluate(index, conn, explain=explain)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_authorization_semantics(case: Case) -> None:
    decision = _decide(case)
    assert (decision.allowed, decision.reason) == (case.expect_allowed, case.expect_reason), case.istio_rule
    assert (str(decision.policy) if decision.policy else None) == case.expect_policy, case.istio_rule
    assert decision.rule_index == case.expect_rule, case.istio_rule
    assert bool(decision.l7_ignored) == case.expect_l7, decision.l7_ignored
    if "audit" in case.extra:
        assert list(decision.audit) == case.extra["audit"]
    if "dry_run_allowed" in case.extra:
        assert decision.dry_run_allowed == case.extra["dry_run_allowed"]
    if "dry_run_matched" in case.extra:
        got = [(str(r.policy), r.matched, r.rule_index) for r in decision.dry_run_results]
        assert got == case.extra["dry_run_matched"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_explanation_ends_with_the_verdict(case: Case) -> None:
    plain = _decide(case)
    explained = _decide(case, explain=True)
    assert plain.explanation == ()
    # Explaining does not change the verdict, and the last line states it.
    assert (explained.allowed, explained.reason, explained.policy) == (
        plain.allowed,
        plain.reason,
        plain.policy,
    )
    verdict = explained.explanation[-1]
    assert verdict.startswith("verdict: " + ("ALLOW" if plain.allowed else "DENY"))
    assert str(plain.reason) in verdict


CRDS = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "security.istio.io_crds.yaml"


def test_every_table_policy_is_valid_against_the_upstream_crd() -> None:
    """The table speaks upstream field names: every policy passes the v1 CRD's openAPIV3Schema."""
    if not CRDS.exists():
        pytest.skip(f"upstream CRDs not found at {CRDS}")
    docs = list(yaml.safe_load_all(CRDS.read_text()))
    crd = next(d for d in docs if d and d["spec"]["names"]["kind"] == "AuthorizationPolicy")
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft7Validator(schema)
    checked = 0
    for case in CASES:
        for obj in case.policies:
            errors = [e.message for e in validator.iter_errors(obj.body)]
            assert errors == [], f"{case.id}: {obj.uid}: {errors}"
            checked += 1
    assert checked >= len(CASES)


def test_explanation_names_every_selecting_policy_and_l7_note() -> None:
    policies = [
        ap("deny-post", {"action": "DENY", "rules": [op(methods=["POST"], ports=["9"])]}),
        ap("allow-bar", {"rules": [src(namespaces=["bar"])]}),
        ap("mesh-audit", {"action": "AUDIT", "rules": [{}]}, ns="istio-system"),
    ]
    index = PolicyIndex.build(policies)
    decision = evaluate(
        index,
        Connection(
            src_ip="10.1.2.3", src_identity=CLIENT, dst_ip="10.0.0.2", dst_port=8080, dst_workload=SERVER
        ),
        explain=True,
    )
    text = "\n".join(decision.explanation)
    for name in ("foo/deny-post", "foo/allow-bar", "istio-system/mesh-audit"):
        assert name in text
    assert "methods" in text  # the ignored HTTP attribute of the DENY rule is called out
    assert "ALLOW foo/allow-bar:\n  rules[0] matches" in text


def test_remote_ip_attributes_are_reported_like_other_http_attributes() -> None:
    """`policy explain` and `Decision.l7_ignored` name remoteIpBlocks and remote.ip as HTTP attributes."""
    conn = Connection(
        src_ip="10.1.2.3", src_identity=CLIENT, dst_ip="10.0.0.2", dst_port=8080, dst_workload=SERVER
    )
    allow = ap("allow", {"rules": [src(remoteIpBlocks=["10.1.2.0/24"]), when("remote.ip", ["10.1.2.3"])]})
    decision = evaluate(PolicyIndex.build([allow]), conn, explain=True)
    assert decision.reason is Reason.NOT_ALLOWED
    assert any("(remoteIpBlocks)" in n and "matches nothing" in n for n in decision.l7_ignored)
    assert any("(when remote.ip)" in n and "matches nothing" in n for n in decision.l7_ignored)
    text = "\n".join(decision.explanation)
    assert "rules[0] does not match: rules[0] uses HTTP attributes (remoteIpBlocks)" in text
    assert "rules[1] does not match: rules[1] uses HTTP attributes (when remote.ip)" in text

    deny = ap(
        "deny",
        {"action": "DENY", "rules": [src(principals=[CLIENT], notRemoteIpBlocks=["10.1.2.0/24"])]},
    )
    decision = evaluate(PolicyIndex.build([deny]), conn, explain=True)
    assert (decision.reason, str(decision.policy)) == (Reason.DENIED_BY_POLICY, "foo/deny")
    assert len(decision.l7_ignored) == 1 and "(notRemoteIpBlocks)" in decision.l7_ignored[0]
    assert "ignored" in decision.l7_ignored[0]
    assert any(line.startswith("  note: ") and "notRemoteIpBlocks" in line for line in decision.explanation)


def test_explanation_names_the_fields_that_failed() -> None:
    rules = [
        src(namespaces=["bar"], ipBlocks=["192.168.0.0/16"]),
        {**src(namespaces=["x"]), **op(ports=["1"])},
    ]
    index = PolicyIndex.build([ap("allow", {"rules": rules})])
    conn = Connection(
        src_ip="10.1.2.3", src_identity=CLIENT, dst_ip="10.0.0.2", dst_port=8080, dst_workload=SERVER
    )
    decision = evaluate(index, conn, explain=True)
    assert decision.reason is Reason.NOT_ALLOWED
    assert "  rules[0] does not match: from fails (ipBlocks ['192.168.0.0/16'])" in decision.explanation
    assert (
        "  rules[1] does not match: from fails (namespaces ['x']); to fails (ports ['1'])"
        in decision.explanation
    )


def test_decision_json_form_round_trips_through_json() -> None:
    policies = [
        ap("deny-9", {"action": "DENY", "rules": [op(ports=["9"])]}),
        ap("shadow", DENY_ALL, annotations={"istio.io/dry-run": "true"}),
        ap("audit", {"action": "AUDIT", "rules": [{}]}),
    ]
    decision = evaluate(
        PolicyIndex.build(policies),
        Connection(
            src_ip="10.1.2.3", src_identity=CLIENT, dst_ip="10.0.0.2", dst_port=9, dst_workload=SERVER
        ),
    )
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["allowed"] is False
    assert (data["reason"], data["policy"], data["rule_index"]) == ("DENIED_BY_POLICY", "foo/deny-9", 0)
    assert data["audit"] == ["foo/audit"]
    assert data["dry_run"] == [{"policy": "foo/shadow", "action": "DENY", "matched": True, "rule_index": 0}]
    assert data["dry_run_allowed"] is False


def test_selection_is_cached_per_labels_and_reused() -> None:
    index = PolicyIndex.build([ap("allow-all", ALLOW_ALL)])
    first = index.select(SERVER)
    again = index.select(
        Workload("foo/server-2", "server-2", "foo", "server", "n", ("10.0.0.3",), SERVER.labels)
    )
    assert first is again
    assert [p.ref for p in first.allow] == [PolicyRef("foo", "allow-all")]


def test_evaluation_throughput_100_policies() -> None:
    """Measure evaluations/s with 100 policies (printed, not asserted on time)."""
    policies: list[PolicyObject] = []
    for i in range(40):  # namespace policies that do not match the caller
        policies.append(
            ap(f"allow-{i}", {"rules": [src(principals=[f"{TD}/ns/ns{i}/sa/x"]), op(ports=[str(10000 + i)])]})
        )
    for i in range(40):
        policies.append(ap(f"deny-{i}", {"action": "DENY", "rules": [src(ipBlocks=[f"172.16.{i}.0/24"])]}))
    for i in range(19):  # mesh-wide policies for other apps
        spec = {"selector": {"matchLabels": {"app": f"app{i}"}}, "action": "DENY", "rules": [{}]}
        policies.append(ap(f"mesh-{i}", spec, ns="istio-system"))
    policies.append(ap("allow-bar", {"rules": [src(namespaces=["bar"]), op(ports=["8080"])]}))
    assert len(policies) == 100
    index = PolicyIndex.build(policies)
    conn = Connection(
        src_ip="10.1.2.3", src_identity=CLIENT, dst_ip="10.0.0.2", dst_port=8080, dst_workload=SERVER
    )
    expected = evaluate(index, conn)
    assert (expected.allowed, expected.policy) == (True, PolicyRef("foo", "allow-bar"))
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        decision = evaluate(index, conn)
    elapsed = time.perf_counter() - start
    assert decision == expected
    print(
        f"\nauthz: {n / elapsed:,.0f} evaluations/s with {len(index)} policies (40 DENY + 41 ALLOW checked)"
    )
