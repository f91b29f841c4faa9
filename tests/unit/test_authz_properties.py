"""Property tests of the L4 authorization evaluator (hypothesis).

Random policy sets over a small vocabulary (so that matches actually happen) are checked against the
invariants of the Istio AuthorizationPolicy reference, and against a deliberately naive reference
interpreter written straight from that reference (no compilation, no index, no caching).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from api.authz import Connection, Decision, PolicyIndex, Reason, evaluate
from api.resources import PolicyObject, Workload

TD = "cluster.local"
NAMESPACES = ["foo", "bar", "baz"]
ACCOUNTS = ["client", "other"]
PORTS = [80, 8080, 9090]
SRC_IPS = ["10.1.2.3", "10.1.9.9", "172.16.0.5"]
SERVER = Workload("foo/server", "server", "foo", "server", "node-1", ("10.0.0.2",), (("app", "server"),))

principals = st.sampled_from(
    [f"{TD}/ns/{ns}/sa/{sa}" for ns in NAMESPACES for sa in ACCOUNTS] + [f"{TD}/ns/bar/*", "*/sa/client", "*"]
)
namespace_patterns = st.sampled_from([*NAMESPACES, "ba*", "*z", "*"])
ip_blocks = st.sampled_from(["10.1.0.0/16", "10.1.2.3", "172.16.0.0/12", "0.0.0.0/0", "10.1.9.9/32"])
ports = st.sampled_from([str(p) for p in PORTS])


def _values(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(strategy, min_size=1, max_size=3)


sources = st.fixed_dictionaries(
    {},
    optional={
        "principals": _values(principals),
        "notPrincipals": _values(principals),
        "namespaces": _values(namespace_patterns),
        "notNamespaces": _values(namespace_patterns),
        "ipBlocks": _values(ip_blocks),
        "notIpBlocks": _values(ip_blocks),
        "requestPrincipals": _values(st.just("*")),  # HTTP-only
        "remoteIpBlocks": _values(ip_blocks),  # HTTP-only (X-Forwarded-For), though an address
        "notRemoteIpBlocks": _values(ip_blocks),  # HTTP-only
    },
).filter(bool)
operations = st.fixed_dictionaries(
    {},
    optional={
        "ports": _values(ports),
        "notPorts": _values(ports),
        "methods": _values(st.sampled_from(["GET", "POST"])),  # HTTP-only
    },
).filter(bool)
conditions = st.one_of(
    st.builds(lambda v: {"key": "source.ip", "values": v}, _values(ip_blocks)),
    st.builds(lambda v: {"key": "source.namespace", "notValues": v}, _values(namespace_patterns)),
    st.builds(lambda v: {"key": "destination.port", "values": v}, _values(ports)),
    st.builds(lambda v: {"key": "request.headers[x-user]", "values": v}, _values(st.just("alice"))),
    st.builds(lambda v: {"key": "remote.ip", "values": v}, _values(ip_blocks)),  # HTTP-only
)
rules = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(st.builds(lambda s: {"source": s}, sources), min_size=1, max_size=2),
        "to": st.lists(st.builds(lambda o: {"operation": o}, operations), min_size=1, max_size=2),
        "when": st.lists(conditions, min_size=1, max_size=2),
    },
)


@st.composite
def policies(draw: st.DrawFn, actions: tuple[str, ...] = ("ALLOW", "DENY", "AUDIT")) -> PolicyObject:
    name = draw(st.from_regex(r"[a-z]{1,6}", fullmatch=True))
    ns = draw(st.sampled_from(["foo", "foo", "istio-system", "bar"]))
    spec: dict[str, Any] = {"action": draw(st.sampled_from(actions))}
    if draw(st.booleans()):
        spec["rules"] = draw(st.lists(rules, max_size=3))
    if draw(st.integers(0, 3)) == 0:
        spec["selector"] = {"matchLabels": {"app": draw(st.sampled_from(["server", "other"]))}}
    metadata: dict[str, Any] = {"name": name, "namespace": ns}
    if draw(st.integers(0, 5)) == 0:
        metadata["annotations"] = {"istio.io/dry-run": "true"}
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": spec,
    }
    return PolicyObject.of("AuthorizationPolicy", ns, name, body)


def _unique(objs: list[PolicyObject]) -> list[PolicyObject]:
    return list({(o.namespace, o.name): o for o in objs}.values())


policy_sets = st.lists(policies(), max_size=6).map(_unique)
connections = st.builds(
    lambda ident, ip, port: Connection(
        src_ip=ip, src_identity=ident, dst_ip="10.0.0.2", dst_port=port, dst_workload=SERVER
    ),
    st.one_of(st.none(), st.sampled_from([f"{TD}/ns/{ns}/sa/{sa}" for ns in NAMESPACES for sa in ACCOUNTS])),
    st.sampled_from(SRC_IPS),
    st.sampled_from(PORTS),
)


def decide(objs: list[PolicyObject], conn: Connection) -> Decision:
    return evaluate(PolicyIndex.build(objs), conn)


def verdict(d: Decision) -> tuple[bool, Reason, Any, Any]:
    return d.allowed, d.reason, d.policy, d.rule_index


def named(obj: PolicyObject, name: str, ns: str = "foo") -> PolicyObject:
    body = {**obj.body, "metadata": {**obj.body["metadata"], "name": name, "namespace": ns}}
    return PolicyObject.of(obj.kind, ns, name, body)


# --- the reference interpreter ---------------------------------------------------------------------

HTTP_FIELDS = {"requestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks", "methods"}
L4_WHEN_KEYS = {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}


def ref_string(pattern: str, value: str | None) -> bool:
    if not value:
        return False
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def ref_ip(block: str, value: str) -> bool:
    return ipaddress.ip_address(value) in ipaddress.ip_network(block, strict=False)


def ref_field(name: str, values: list[str], conn: Connection) -> bool:
    negated = name.startswith("not")
    base = name[3].lower() + name[4:] if negated else name
    ident = conn.src_identity
    ns = ident.split("/")[2] if ident else None
    tests = {
        "principals": lambda v: ref_string(v, ident),
        "namespaces": lambda v: ref_string(v, ns),
        "ipBlocks": lambda v: ref_ip(v, conn.src_ip),
        "ports": lambda v: int(v) == conn.dst_port,
    }
    hit = any(tests[base](v) for v in values)
    return not hit if negated else hit


def ref_rule(rule: dict[str, Any], action: str, conn: Connection) -> bool:
    entries = [("source", e["source"]) for e in rule.get("from", [])] + [
        ("operation", e["operation"]) for e in rule.get("to", [])
    ]
    has_l7 = any(k in HTTP_FIELDS for _, body in entries for k in body) or any(
        c["key"] not in L4_WHEN_KEYS for c in rule.get("when", [])
    )
    if has_l7 and action != "DENY":
        return False  # ALLOW/AUDIT rules with HTTP attributes are omitted at L4
    for key in ("from", "to"):
        group = [e["source" if key == "from" else "operation"] for e in rule.get(key, [])]
        if group and not any(
            all(ref_field(k, v, conn) for k, v in body.items() if k not in HTTP_FIELDS) for body in group
        ):
            return False
    for cond in rule.get("when", []):
        key = cond["key"]
        if key not in L4_WHEN_KEYS:
            continue  # ignored in a DENY rule
        field = {"source.ip": "ipBlocks", "source.namespace": "namespaces", "destination.port": "ports"}[key]
        if "values" in cond and not ref_field(field, cond["values"], conn):
            return False
        if "notValues" in cond and not ref_field(
            "not" + field[0].upper() + field[1:], cond["notValues"], conn
        ):
            return False
    return True


def ref_decide(objs: list[PolicyObject], conn: Connection) -> tuple[bool, Reason]:
    wl = conn.dst_workload
    selected = []
    for o in objs:
        spec = o.body["spec"]
        applies = o.namespace in ("istio-system", wl.namespace)
        labels = spec.get("selector", {}).get("matchLabels", {})
        dry_run = o.body["metadata"].get("annotations", {}).get("istio.io/dry-run") == "true"
        if applies and not dry_run and all(wl.label_map().get(k) == v for k, v in labels.items()):
            selected.append(spec)

    def any_match(action: str) -> bool:
        return any(
            ref_rule(r, action, conn) for s in selected if s["action"] == action for r in s.get("rules", [])
        )

    if any(s["action"] == "CUSTOM" for s in selected):
        return False, Reason.DENIED_CUSTOM_UNSUPPORTED
    if any_match("DENY"):
        return False, Reason.DENIED_BY_POLICY
    if not any(s["action"] == "ALLOW" for s in selected):
        return True, Reason.ALLOWED_NO_POLICY
    if any_match("ALLOW"):
        return True, Reason.ALLOWED_BY_POLICY
    return False, Reason.NOT_ALLOWED


# --- properties ------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    objs=st.lists(policies(("ALLOW", "ALLOW", "DENY", "DENY", "AUDIT", "CUSTOM")), max_size=6).map(_unique),
    conn=connections,
)
def test_evaluator_agrees_with_reference_interpreter(objs: list[PolicyObject], conn: Connection) -> None:
    d = decide(objs, conn)
    event(f"reason={d.reason}")
    assert (d.allowed, d.reason) == ref_decide(objs, conn)


@settings(max_examples=200, deadline=None)
@given(objs=policy_sets, audit=policies(("AUDIT",)), conn=connections)
def test_adding_an_audit_policy_never_changes_the_decision(
    objs: list[PolicyObject], audit: PolicyObject, conn: Connection
) -> None:
    before = decide(objs, conn)
    after = decide([*objs, named(audit, "zz-audit")], conn)
    assert verdict(after) == verdict(before)


@settings(max_examples=200, deadline=None)
@given(objs=policy_sets, extra=st.lists(policies(("ALLOW",)), min_size=1, max_size=3), conn=connections)
def test_adding_allow_policies_never_lifts_a_deny(
    objs: list[PolicyObject], extra: list[PolicyObject], conn: Connection
) -> None:
    before = decide(objs, conn)
    after = decide(objs + [named(p, f"zz-allow-{i}") for i, p in enumerate(extra)], conn)
    if before.reason in (Reason.DENIED_BY_POLICY, Reason.DENIED_CUSTOM_UNSUPPORTED):
        assert verdict(after) == verdict(before)


@settings(max_examples=200, deadline=None)
@given(objs=policy_sets, conn=connections)
def test_allow_all_rule_admits_anything_not_denied(objs: list[PolicyObject], conn: Connection) -> None:
    allow_all = PolicyObject.of(
        "AuthorizationPolicy",
        "foo",
        "zz-allow-all",
        {"kind": "AuthorizationPolicy", "metadata": {"name": "zz-allow-all"}, "spec": {"rules": [{}]}},
    )
    before = decide(objs, conn)
    after = decide([*objs, allow_all], conn)
    denied_by_policy = before.reason in (Reason.DENIED_BY_POLICY, Reason.DENIED_CUSTOM_UNSUPPORTED)
    assert after.allowed is not denied_by_policy
    if before.allowed:
        assert after.allowed


@settings(max_examples=200, deadline=None)
@given(objs=policy_sets, shadow=policies(), conn=connections)
def test_a_dry_run_policy_never_changes_the_enforced_decision(
    objs: list[PolicyObject], shadow: PolicyObject, conn: Connection
) -> None:
    metadata = {**shadow.body["metadata"], "name": "zz-dry", "annotations": {"istio.io/dry-run": "true"}}
    dry = PolicyObject.of("AuthorizationPolicy", "foo", "zz-dry", {**shadow.body, "metadata": metadata})
    before = decide(objs, conn)
    after = decide([*objs, dry], conn)
    assert verdict(after) == verdict(before)
    # `dry_run_allowed` is the verdict with every selecting dry-run policy enforced: compare it with
    # the decision over the same objects with the annotation removed.
    enforced = decide([*map(undry, objs), undry(named(shadow, "zz-dry"))], conn)
    if after.dry_run_results:
        assert after.dry_run_allowed == enforced.allowed
    else:  # no dry-run policy selects the workload (or only AUDIT ones)
        assert after.dry_run_allowed is None
        assert enforced.allowed == after.allowed


def undry(obj: PolicyObject) -> PolicyObject:
    metadata = {k: v for k, v in obj.body["metadata"].items() if k != "annotations"}
    return PolicyObject.of(obj.kind, obj.namespace, obj.name, {**obj.body, "metadata": metadata})


@settings(max_examples=100, deadline=None)
@given(objs=policy_sets, conn=connections, seed=st.randoms())
def test_decision_does_not_depend_on_object_order(
    objs: list[PolicyObject], conn: Connection, seed: Any
) -> None:
    shuffled = list(objs)
    seed.shuffle(shuffled)
    assert decide(shuffled, conn) == decide(objs, conn)
