"""Compile Istio AuthorizationPolicy objects into the L4 matcher model, once per policy change.

Follows what istiod sends to ztunnel (istio/istio `pilot/pkg/serviceregistry/kube/controller/
ambient/authorization.go`, `convertAuthorizationPolicy` / `handleRule`) with these documented
choices (see docs/authorization.md, "Authorization semantics"):

- HTTP-only attributes (requestPrincipals, remoteIpBlocks, hosts, methods, paths, their `not`
  forms, and `when` keys other than the L4 ones, `remote.ip` included) make an ALLOW or AUDIT rule
  match nothing, and are dropped from a DENY rule, which then matches on what is left (fail closed,
  as the Istio reference promises). istiod's `httpSources` and `l4WhenAttributes` draw the same line.
- A rule holding an invalid value (bad CIDR, bad port, empty source) matches nothing in an ALLOW
  or AUDIT policy and everything in a DENY policy, and carries a note saying why.
- Policies with `targetRef`/`targetRefs` attach to waypoints and gateways, never to an L4
  enforcement point: they are skipped with a warning (ztunnel does the same).

`PolicyIndex` holds the compiled set, split by namespace and root namespace, and caches which
policies select a given workload so that evaluation per connection only runs the matchers.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from api.authz.model import (
    Action,
    Clause,
    CompiledPolicy,
    CompiledRule,
    FieldMatch,
    IpBlocks,
    IpNetwork,
    Match,
    PolicyCompileError,
    PolicyRef,
    Ports,
    ServiceAccounts,
    StringPatterns,
)
from api.resources import PolicyObject, Workload

log = logging.getLogger("nodemesh.authz")

KIND = "AuthorizationPolicy"
DEFAULT_ROOT_NAMESPACE = "istio-system"
DRY_RUN_ANNOTATION = "istio.io/dry-run"

# Value kinds of the L4 fields.
_STR, _IP, _PORT, _SA = "string", "ip", "port", "serviceaccount"

# source field -> (Connection attribute, value kind, negated)
_SOURCE_FIELDS: dict[str, tuple[str, str, bool]] = {
    "principals": ("principal", _STR, False),
    "notPrincipals": ("principal", _STR, True),
    "namespaces": ("src_namespace", _STR, False),
    "notNamespaces": ("src_namespace", _STR, True),
    "trustDomains": ("trust_domain", _STR, False),
    "notTrustDomains": ("trust_domain", _STR, True),
    "serviceAccounts": ("service_account", _SA, False),
    "notServiceAccounts": ("service_account", _SA, True),
    "ipBlocks": ("src_ip_key", _IP, False),
    "notIpBlocks": ("src_ip_key", _IP, True),
}
# istio ambient `httpSources`. The remote IP is the original client's address as an HTTP proxy
# learns it (X-Forwarded-For, PROXY protocol), which the L4 proxy never reads; standing the peer
# address in for it would let an ALLOW rule admit peers that ztunnel never admits.
_SOURCE_HTTP_FIELDS = frozenset(
    {"requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"}
)
# HTTP attributes whose values are still read as addresses, although never matched: Istio's webhook
# refuses a bad one (`ValidateIPs`), and a typo fails closed as the same typo in `ipBlocks` does.
_SOURCE_HTTP_IP_FIELDS = frozenset({"remoteIpBlocks", "notRemoteIpBlocks"})
_WHEN_HTTP_IP_KEYS = frozenset({"remote.ip"})

_OPERATION_FIELDS: dict[str, tuple[str, str, bool]] = {
    "ports": ("dst_port", _PORT, False),
    "notPorts": ("dst_port", _PORT, True),
}
_OPERATION_HTTP_FIELDS = frozenset({"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"})

# `when` keys enforceable at L4 (istio ambient `l4WhenAttributes`); `remote.ip` is HTTP, as above.
_WHEN_L4_KEYS: dict[str, tuple[str, str]] = {
    "source.ip": ("src_ip_key", _IP),
    "source.namespace": ("src_namespace", _STR),
    "source.principal": ("principal", _STR),
    "destination.ip": ("dst_ip_key", _IP),
    "destination.port": ("dst_port", _PORT),
}

_TRUE_STRINGS = frozenset({"1", "t", "T", "true", "TRUE", "True"})  # Go strconv.ParseBool
_FALSE_STRINGS = frozenset({"0", "f", "F", "false", "FALSE", "False"})


class _InvalidValue(Exception):
    """A value inside one rule is invalid; the rule, not the whole policy, is affected."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _string_list(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _InvalidValue(path, f"expected a list of strings, got {value!r}")
    return tuple(value)


def _parse_network(value: str, path: str) -> IpNetwork:
    try:
        # Host bits may be set ("10.0.0.1/8"), as Go's netip.ParsePrefix accepts.
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise _InvalidValue(path, f"{value!r} is not an IP address or CIDR") from exc


def _parse_networks(values: tuple[str, ...], path: str) -> tuple[IpNetwork, ...]:
    return tuple(_parse_network(v, f"{path}[{i}]") for i, v in enumerate(values))


def _parse_port(value: str, path: str) -> int:
    # leading zeros are allowed (Go's ParseUint); more than 5 digits after them are never a port,
    # and are not handed to int(), which raises ValueError beyond 4,300 digits
    digits = value.lstrip("0") or "0"
    if not value.isascii() or not value.isdigit() or len(digits) > 5 or int(digits) > 65535:
        raise _InvalidValue(path, f"{value[:20]!r} is not a port number (0-65535)")
    return int(digits)


def _field_match(
    name: str, attr: str, kind: str, negated: bool, values: tuple[str, ...], path: str, policy_ns: str
) -> FieldMatch:
    matcher: StringPatterns | IpBlocks | Ports | ServiceAccounts
    if kind == _STR:
        matcher = StringPatterns.parse(values)
    elif kind == _IP:
        matcher = IpBlocks(_parse_networks(values, path))
    elif kind == _PORT:
        matcher = Ports(frozenset(_parse_port(v, f"{path}[{i}]") for i, v in enumerate(values)))
    else:
        # "ns/sa", or "sa" in the policy's own namespace (istio `stringToServiceAccountMatch`).
        accounts: set[tuple[str, str]] = set()
        for i, v in enumerate(values):
            ns, sep, sa = v.partition("/")
            if not sep:
                ns, sa = policy_ns, v
            if not ns or not sa or "/" in sa:
                raise _InvalidValue(f"{path}[{i}]", f"{v!r} is not <namespace>/<serviceaccount>")
            accounts.add((ns, sa))
        matcher = ServiceAccounts(frozenset(accounts))
    return FieldMatch(name=name, attr=attr, matcher=matcher, negated=negated, values=values)


def _compile_entry(
    entry: object,
    key: str,
    l4_fields: Mapping[str, tuple[str, str, bool]],
    http_fields: frozenset[str],
    path: str,
    policy_ns: str,
    l7_found: list[str],
) -> Match:
    """One `from[i]` (key "source") or `to[i]` (key "operation") entry."""
    if not isinstance(entry, dict):
        raise _InvalidValue(path, f"expected an object, got {entry!r}")
    body = entry.get(key)
    if not isinstance(body, dict) or not body:
        # Istio validation: "`from.source` must not be empty" / "`to.operation` must not be empty".
        raise _InvalidValue(f"{path}.{key}", "must be a non-empty object")
    fields: list[FieldMatch] = []
    constrained = False
    for name, value in body.items():
        fpath = f"{path}.{key}.{name}"
        if name not in http_fields and name not in l4_fields:
            raise _InvalidValue(fpath, "unknown field")
        if value is None:  # as Kubernetes (pruned) and protojson (unset) read an explicit null
            continue
        values = _string_list(value, fpath)
        if not values:  # an empty list is unset too (Istio compares len() == 0)
            continue
        constrained = True
        if name in http_fields:
            if name in _SOURCE_HTTP_IP_FIELDS:
                _parse_networks(values, fpath)
            l7_found.append(name)
            continue
        attr, kind, negated = l4_fields[name]
        fields.append(_field_match(name, attr, kind, negated, values, fpath, policy_ns))
    if not constrained:
        # Istio's webhook refuses it ("`from.source` must not be empty"), and ztunnel skips an empty
        # match, so the clause holds for nobody: never "matches everyone".
        raise _InvalidValue(f"{path}.{key}", "must not be empty (every field in it is empty)")
    return Match(tuple(fields))


def _compile_condition(cond: object, path: str, l7_found: list[str]) -> Match | None:
    """One `when[i]` entry; None when its key is HTTP-only."""
    if not isinstance(cond, dict) or not isinstance(cond.get("key"), str) or not cond["key"]:
        raise _InvalidValue(path, "a condition needs a non-empty `key`")
    key: str = cond["key"]
    unknown = set(cond) - {"key", "values", "notValues"}
    if unknown:
        raise _InvalidValue(path, f"unknown field(s) {sorted(unknown)}")
    raw_values, raw_not = cond.get("values"), cond.get("notValues")  # null: unset, as an absent one
    values = () if raw_values is None else _string_list(raw_values, f"{path}.values")
    not_values = () if raw_not is None else _string_list(raw_not, f"{path}.notValues")
    if not values and not not_values:
        raise _InvalidValue(path, f"condition {key!r} needs `values` or `notValues`")
    spec = _WHEN_L4_KEYS.get(key)
    if spec is None:
        if key in _WHEN_HTTP_IP_KEYS:
            _parse_networks(values, f"{path}.values")
            _parse_networks(not_values, f"{path}.notValues")
        l7_found.append(f"when {key}")
        return None
    attr, kind = spec
    fields: list[FieldMatch] = []
    if values:
        fields.append(_field_match(f"when {key}", attr, kind, False, values, f"{path}.values", ""))
    if not_values:
        fields.append(
            _field_match(f"when {key} notValues", attr, kind, True, not_values, f"{path}.notValues", "")
        )
    return Match(tuple(fields))


def _compile_rule(rule: object, index: int, action: Action, policy_ns: str) -> CompiledRule:
    path = f"spec.rules[{index}]"
    enforce_without_l7 = action in (Action.DENY, Action.CUSTOM)
    l7_found: list[str] = []
    try:
        if not isinstance(rule, dict):
            raise _InvalidValue(path, f"expected an object, got {rule!r}")
        unknown = set(rule) - {"from", "to", "when"}
        if unknown:
            raise _InvalidValue(path, f"unknown field(s) {sorted(unknown)}")
        clauses: list[Clause] = []
        for key, entry_key, l4, http in (
            ("from", "source", _SOURCE_FIELDS, _SOURCE_HTTP_FIELDS),
            ("to", "operation", _OPERATION_FIELDS, _OPERATION_HTTP_FIELDS),
        ):
            entries = rule.get(key)
            if entries is None:
                continue
            if not isinstance(entries, list):
                raise _InvalidValue(f"{path}.{key}", f"expected a list, got {entries!r}")
            if not entries:
                continue  # an empty list constrains nothing, like an absent one
            matches = tuple(
                _compile_entry(e, entry_key, l4, http, f"{path}.{key}[{i}]", policy_ns, l7_found)
                for i, e in enumerate(entries)
            )
            clauses.append(Clause(key, matches))
        conditions = rule.get("when") or []
        if not isinstance(conditions, list):
            raise _InvalidValue(f"{path}.when", f"expected a list, got {conditions!r}")
        for i, cond in enumerate(conditions):
            m = _compile_condition(cond, f"{path}.when[{i}]", l7_found)
            if m is not None:
                clauses.append(Clause(f"when[{i}]", (m,)))
    except _InvalidValue as exc:
        if enforce_without_l7:
            note = (
                f"rules[{index}] is invalid ({exc}); a {action} rule that cannot be read matches everything"
            )
            return CompiledRule(index, (), always_matches=True, notes=(note,))
        note = f"rules[{index}] is invalid ({exc}); an {action} rule that cannot be read matches nothing"
        return CompiledRule(index, (), never_matches=True, notes=(note,))
    l7 = tuple(dict.fromkeys(l7_found))
    if l7 and not enforce_without_l7:
        note = (
            f"rules[{index}] uses HTTP attributes ({', '.join(l7)}) that L4 enforcement cannot see; "
            f"an {action} rule with them matches nothing"
        )
        return CompiledRule(index, tuple(clauses), never_matches=True, l7_ignored=l7, notes=(note,))
    if l7:
        note = (
            f"rules[{index}] uses HTTP attributes ({', '.join(l7)}) that L4 enforcement cannot see; "
            f"they are ignored and the {action} rule matches on its other fields (more restrictive)"
        )
        return CompiledRule(index, tuple(clauses), l7_ignored=l7, notes=(note,))
    return CompiledRule(index, tuple(clauses))


def _is_dry_run(obj: PolicyObject) -> bool:
    metadata = obj.body.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    if not isinstance(annotations, dict) or DRY_RUN_ANNOTATION not in annotations:
        return False
    raw = annotations[DRY_RUN_ANNOTATION]
    if isinstance(raw, str) and raw in _TRUE_STRINGS:
        return True
    if not isinstance(raw, str) or raw not in _FALSE_STRINGS:
        # Enforcing is the safe reading of a typo: the policy does what it says.
        log.warning(
            "authz.bad_dry_run_annotation policy=%s/%s value=%r enforced=true",
            obj.namespace,
            obj.name,
            raw,
        )
    return False


def _selector(spec: dict[str, Any], obj: PolicyObject) -> tuple[tuple[str, str], ...] | None:
    selector = spec.get("selector")
    if selector is None:
        return None
    if not isinstance(selector, dict):
        raise PolicyCompileError(KIND, obj.namespace, obj.name, "spec.selector", "must be an object")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise PolicyCompileError(
            KIND, obj.namespace, obj.name, "spec.selector.matchLabels", "must map strings to strings"
        )
    return tuple(sorted(labels.items()))


def compile_policy(obj: PolicyObject, *, log_notes: bool = True) -> CompiledPolicy | None:
    """Compile one AuthorizationPolicy; None when it does not apply at L4 (it has a targetRef).

    Raises PolicyCompileError when the object itself is unusable (wrong kind, bad action, bad
    selector); bad values inside a rule only affect that rule (see the module docstring).
    `log_notes=False` leaves the rules' notes to the caller (the controller reports them as
    warnings of its own instead of `authz.rule_degraded`).
    """
    if obj.kind != KIND:
        raise PolicyCompileError(obj.kind, obj.namespace, obj.name, "kind", f"expected {KIND}")
    spec = obj.body.get("spec", {})
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise PolicyCompileError(KIND, obj.namespace, obj.name, "spec", "must be an object")
    if spec.get("targetRef") or spec.get("targetRefs"):
        log.warning(
            "authz.policy_not_applicable policy=%s/%s reason=targetRef detail=%r",
            obj.namespace,
            obj.name,
            "policies with targetRef(s) apply at waypoints/gateways, not at the L4 node proxy",
        )
        return None
    raw_action = spec.get("action", "ALLOW")
    try:
        action = Action(raw_action)
    except ValueError:
        raise PolicyCompileError(
            KIND,
            obj.namespace,
            obj.name,
            "spec.action",
            f"{raw_action!r} is not ALLOW, DENY, AUDIT or CUSTOM",
        ) from None
    provider: str | None = None
    if action is Action.CUSTOM:
        prov = spec.get("provider")
        provider = prov.get("name") if isinstance(prov, dict) and isinstance(prov.get("name"), str) else ""
    rules = spec.get("rules") or []
    if not isinstance(rules, list):
        raise PolicyCompileError(KIND, obj.namespace, obj.name, "spec.rules", "must be a list")
    compiled = tuple(_compile_rule(r, i, action, obj.namespace) for i, r in enumerate(rules))
    for rule in compiled if log_notes else ():
        for note in rule.notes:
            log.warning("authz.rule_degraded policy=%s/%s note=%r", obj.namespace, obj.name, note)
    return CompiledPolicy(
        ref=PolicyRef(obj.namespace, obj.name),
        action=action,
        rules=compiled,
        selector=_selector(spec, obj),
        dry_run=_is_dry_run(obj),
        provider=provider,
    )


@dataclass(frozen=True, slots=True)
class SelectedPolicies:
    """The policies that select one workload, split by how the evaluator uses them."""

    custom: tuple[CompiledPolicy, ...]
    deny: tuple[CompiledPolicy, ...]
    allow: tuple[CompiledPolicy, ...]
    audit: tuple[CompiledPolicy, ...]
    dry_run: tuple[CompiledPolicy, ...]  # CUSTOM/DENY/ALLOW with the dry-run annotation
    allow_l7_notes: tuple[str, ...] = ()  # why some enforced ALLOW rules can never match at L4
    # (policy, rule) pairs in evaluation order, flattened once so the per-connection loop is flat.
    deny_rules: tuple[tuple[CompiledPolicy, CompiledRule], ...] = ()
    allow_rules: tuple[tuple[CompiledPolicy, CompiledRule], ...] = ()


_SELECTION_CACHE_MAX = 4096


def _flatten(policies: tuple[CompiledPolicy, ...]) -> tuple[tuple[CompiledPolicy, CompiledRule], ...]:
    return tuple((p, r) for p in policies for r in p.rules if not r.never_matches)


class PolicyIndex:
    """The compiled AuthorizationPolicies of the mesh, indexed for per-connection evaluation.

    Build a new index whenever the policy set changes; an index is never mutated apart from its
    selection cache (keyed by namespace and labels, bounded, safe to share between tasks).
    """

    def __init__(
        self,
        policies: Iterable[CompiledPolicy],
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        errors: Iterable[PolicyCompileError] = (),
        skipped: Iterable[PolicyRef] = (),
    ) -> None:
        self.root_namespace = root_namespace
        self.errors: tuple[PolicyCompileError, ...] = tuple(errors)
        self.skipped: tuple[PolicyRef, ...] = tuple(skipped)
        by_ns: dict[str, list[CompiledPolicy]] = {}
        for p in sorted(policies, key=lambda p: p.ref):
            by_ns.setdefault(p.ref.namespace, []).append(p)
        self._by_namespace: dict[str, tuple[CompiledPolicy, ...]] = {k: tuple(v) for k, v in by_ns.items()}
        self._cache: dict[tuple[str, tuple[tuple[str, str], ...]], SelectedPolicies] = {}

    @classmethod
    def build(
        cls, objects: Iterable[PolicyObject], root_namespace: str = DEFAULT_ROOT_NAMESPACE
    ) -> PolicyIndex:
        """Compile every AuthorizationPolicy among `objects` (other kinds are ignored).

        An object that cannot be compiled is left out and reported in `errors` (the controller
        validates objects against the CRD schema first, so this is a last line of defence).
        """
        compiled: list[CompiledPolicy] = []
        errors: list[PolicyCompileError] = []
        skipped: list[PolicyRef] = []
        for obj in objects:
            if obj.kind != KIND:
                continue
            try:
                policy = compile_policy(obj)
            except PolicyCompileError as exc:
                log.error(
                    "authz.policy_rejected policy=%s/%s field=%s problem=%r",
                    exc.namespace,
                    exc.name,
                    exc.field_path,
                    exc.problem,
                )
                errors.append(exc)
                continue
            if policy is None:
                skipped.append(PolicyRef(obj.namespace, obj.name))
            else:
                compiled.append(policy)
        return cls(compiled, root_namespace, errors, skipped)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_namespace.values())

    def policies(self) -> tuple[CompiledPolicy, ...]:
        return tuple(p for ns in sorted(self._by_namespace) for p in self._by_namespace[ns])

    def select(self, workload: Workload) -> SelectedPolicies:
        """The policies that apply to `workload`: root-namespace ones mesh-wide, then its namespace's."""
        key = (workload.namespace, workload.labels)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        candidates = self._by_namespace.get(self.root_namespace, ())
        if workload.namespace != self.root_namespace:
            candidates = candidates + self._by_namespace.get(workload.namespace, ())
        chosen = [p for p in candidates if p.selects(workload)]
        enforced = [p for p in chosen if not p.dry_run]
        allow = tuple(p for p in enforced if p.action is Action.ALLOW)
        deny = tuple(p for p in enforced if p.action is Action.DENY)
        selected = SelectedPolicies(
            custom=tuple(p for p in enforced if p.action is Action.CUSTOM),
            deny=deny,
            allow=allow,
            audit=tuple(p for p in chosen if p.action is Action.AUDIT),
            dry_run=tuple(p for p in chosen if p.dry_run and p.action is not Action.AUDIT),
            deny_rules=_flatten(deny),
            allow_rules=_flatten(allow),
            allow_l7_notes=tuple(
                f"{p.ref} {n}" for p in allow for r in p.rules if r.l7_ignored for n in r.notes
            ),
        )
        if len(self._cache) >= _SELECTION_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = selected
        return selected
