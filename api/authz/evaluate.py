"""Decide one connection against the compiled AuthorizationPolicies (sans-IO, per new connection).

Istio AuthorizationPolicy reference (https://istio.io/latest/docs/reference/config/security/
authorization-policy/), in the order ztunnel's `assert_rbac` (istio/ztunnel `src/state.rs`) applies it:

1. CUSTOM: nodemesh has no external authorizer at L4, so a CUSTOM policy selecting the workload
   denies every connection (Istio does the same for an unusable provider: the
   `default-deny-all-due-to-bad-CUSTOM-action` policy of `pilot/pkg/security/authz/builder`).
2. DENY: "If there are any DENY policies that match the request, deny the request."
3. ALLOW: "If there are no ALLOW policies for the workload, allow the request. If any of the ALLOW
   policies match the request, allow the request. Deny the request."
AUDIT policies never change the verdict; the matching ones are reported. Policies annotated
`istio.io/dry-run: "true"` are evaluated and reported, never enforced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from api.authz.compile import PolicyIndex, SelectedPolicies
from api.authz.model import (
    Action,
    CompiledPolicy,
    CompiledRule,
    Connection,
    Decision,
    DryRunResult,
    PolicyRef,
    Reason,
)

__all__ = ["evaluate"]


def _first_match(
    rules: Iterable[tuple[CompiledPolicy, CompiledRule]], conn: Connection
) -> tuple[CompiledPolicy, int] | None:
    for policy, rule in rules:
        if rule.holds(conn):
            return policy, rule.index
    return None


def _rules(policies: Iterable[CompiledPolicy]) -> tuple[tuple[CompiledPolicy, CompiledRule], ...]:
    return tuple((p, r) for p in policies for r in p.rules)


def _verdict(
    custom: tuple[CompiledPolicy, ...],
    deny_rules: tuple[tuple[CompiledPolicy, CompiledRule], ...],
    allow: tuple[CompiledPolicy, ...],
    allow_rules: tuple[tuple[CompiledPolicy, CompiledRule], ...],
    conn: Connection,
) -> tuple[bool, Reason, PolicyRef | None, int | None]:
    if custom:
        return False, Reason.DENIED_CUSTOM_UNSUPPORTED, custom[0].ref, None
    hit = _first_match(deny_rules, conn)
    if hit is not None:
        return False, Reason.DENIED_BY_POLICY, hit[0].ref, hit[1]
    if not allow:
        return True, Reason.ALLOWED_NO_POLICY, None, None
    hit = _first_match(allow_rules, conn)
    if hit is not None:
        return True, Reason.ALLOWED_BY_POLICY, hit[0].ref, hit[1]
    return False, Reason.NOT_ALLOWED, None, None


def _l7_notes(
    selected: SelectedPolicies, reason: Reason, policy: PolicyRef | None, rule_index: int | None
) -> tuple[str, ...]:
    """HTTP attributes that shaped the verdict: the deciding DENY rule's, or why no ALLOW rule matched."""
    notes: list[str] = []
    if reason is Reason.DENIED_BY_POLICY:
        for p in selected.deny:
            if p.ref == policy:
                notes += (
                    f"{p.ref} {n}" for r in p.rules if r.index == rule_index and r.l7_ignored for n in r.notes
                )
    elif reason is Reason.NOT_ALLOWED:
        return selected.allow_l7_notes
    return tuple(notes)


def _explain(
    selected: SelectedPolicies,
    conn: Connection,
    decision: Decision,
    index: PolicyIndex,
) -> tuple[str, ...]:
    wl = conn.dst_workload
    src = conn.principal or "plaintext (no identity)"
    lines = [
        f"connection {conn.src_ip} ({src}) -> {wl.namespace}/{wl.name} {conn.dst_ip}:{conn.dst_port}",
        f"root namespace {index.root_namespace}; selecting policies: "
        + (
            ", ".join(
                f"{p.ref} {p.action}{' dry-run' if p.dry_run else ''}"
                for p in (
                    *selected.custom,
                    *selected.deny,
                    *selected.allow,
                    *selected.audit,
                    *selected.dry_run,
                )
            )
            or "none"
        ),
    ]
    for p in selected.custom:
        lines.append(
            f"CUSTOM {p.ref} (provider {p.provider!r}) selects the workload; nodemesh has no external "
            "authorizer at L4, so every connection is denied"
        )
    for p in selected.deny:
        lines.append(f"DENY {p.ref}:" + ("" if p.rules else " has no rules, matches nothing"))
        lines += (f"  {r.explain(conn)}" for r in p.rules)
        lines += (f"  note: {n}" for r in p.rules if r.l7_ignored for n in r.notes)
    if not selected.allow:
        lines.append("no ALLOW policy selects the workload: allowed unless denied")
    for p in selected.allow:
        lines.append(
            f"ALLOW {p.ref}:"
            + ("" if p.rules else " has no rules, matches nothing (an empty ALLOW denies all)")
        )
        lines += (f"  {r.explain(conn)}" for r in p.rules)
    for ref in decision.audit:
        lines.append(f"AUDIT {ref}: matches (reported, never enforced)")
    for d in decision.dry_run_results:
        state = f"rules[{d.rule_index}] matches" if d.matched else "does not match"
        lines.append(f"dry-run {d.action} {d.policy}: {state} (not enforced)")
    if decision.dry_run_allowed is not None:
        lines.append(
            "if the dry-run policies were enforced: " + ("allowed" if decision.dry_run_allowed else "denied")
        )
    where = f" by {decision.policy}" if decision.policy else ""
    rule = f" rules[{decision.rule_index}]" if decision.rule_index is not None else ""
    lines.append(f"verdict: {'ALLOW' if decision.allowed else 'DENY'} ({decision.reason}{where}{rule})")
    return tuple(lines)


def evaluate(index: PolicyIndex, conn: Connection, *, explain: bool = False) -> Decision:
    """Decide whether `conn` may reach its destination workload.

    Cheap enough for every new connection: policy selection is cached per workload labels and
    only the matchers run. `explain=True` adds the human explanation (for `policy explain`).
    """
    selected = index.select(conn.dst_workload)
    allowed, reason, policy, rule_index = _verdict(
        selected.custom, selected.deny_rules, selected.allow, selected.allow_rules, conn
    )
    audit = tuple(p.ref for p in selected.audit if p.first_matching_rule(conn) is not None)
    dry_run_results: tuple[DryRunResult, ...] = ()
    dry_run_allowed: bool | None = None
    if selected.dry_run:
        results: list[DryRunResult] = []
        for p in selected.dry_run:
            idx = None if p.action is Action.CUSTOM else p.first_matching_rule(conn)
            results.append(DryRunResult(p.ref, p.action, p.action is Action.CUSTOM or idx is not None, idx))
        dry_run_results = tuple(results)
        allow = selected.allow + tuple(p for p in selected.dry_run if p.action is Action.ALLOW)
        dry_run_allowed = _verdict(
            selected.custom + tuple(p for p in selected.dry_run if p.action is Action.CUSTOM),
            _rules(selected.deny + tuple(p for p in selected.dry_run if p.action is Action.DENY)),
            allow,
            _rules(allow),
            conn,
        )[0]
    decision = Decision(
        allowed=allowed,
        reason=reason,
        policy=policy,
        rule_index=rule_index,
        audit=audit,
        dry_run_results=dry_run_results,
        dry_run_allowed=dry_run_allowed,
        l7_ignored=_l7_notes(selected, reason, policy, rule_index),
    )
    if not explain:
        return decision
    return dataclasses.replace(decision, explanation=_explain(selected, conn, decision, index))
