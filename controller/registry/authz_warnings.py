"""Warnings for valid AuthorizationPolicies that L4 enforcement cannot honour as written.

istiod accepts an AuthorizationPolicy with HTTP attributes in ambient mode but writes a warning into
its status (istio/istio `pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`,
`convertAuthorizationPolicy`: "ztunnel does not support HTTP attributes (found: ...)"). nodemesh's
controller says the same on Admin/Apply and in its log, from what the agents' own compiler
(`api.authz.compile.compile_policy`) notes per rule, so the two never disagree on what is HTTP.
Pure code: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.authz.compile import KIND, compile_policy
from api.authz.model import Action, PolicyCompileError
from api.resources import PolicyObject
from controller.registry import ConfigObject
from controller.registry.errors import describe

_MORE_RESTRICTIVE = "This will be more restrictive than requested."


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """An accepted object that will not do all it says; `str()` reads like a `ConfigError`'s."""

    message: str
    file: str = ""
    line: int | None = None
    obj: str = ""

    def __str__(self) -> str:
        return describe(self.message, file=self.file, line=self.line, obj=self.obj)


def authz_warnings(obj: ConfigObject) -> list[ConfigWarning]:
    """What the node agents will enforce differently from `obj` as written; [] for other kinds.

    One warning naming every HTTP attribute the policy uses (istiod's wording, with the ALLOW or
    DENY consequence), then one per rule that fails closed on a value the agents cannot read.
    """
    if obj.kind != KIND:
        return []

    def warning(message: str) -> ConfigWarning:
        return ConfigWarning(message, file=obj.file, line=obj.line, obj=obj.label)

    try:
        policy = compile_policy(PolicyObject.of(obj.kind, obj.namespace, obj.name, obj.body), log_notes=False)
    except PolicyCompileError as exc:
        problem = f"{exc.field_path}: {exc.problem}"
        return [warning(f"the node agents cannot compile it and leave it out: {problem}")]
    if policy is None:  # targetRef(s): refused by validation before this point
        return []
    warnings: list[ConfigWarning] = []
    found = tuple(dict.fromkeys(attr for rule in policy.rules for attr in rule.l7_ignored))
    if found:
        if policy.action is Action.ALLOW:
            consequence = (
                "Within an ALLOW policy, rules matching HTTP attributes are omitted (they match no "
                f"connection). {_MORE_RESTRICTIVE}"
            )
        elif policy.action is Action.AUDIT:  # an audit never refuses: it only logs less
            consequence = (
                "Within an AUDIT policy, rules matching HTTP attributes are omitted (they match no "
                "connection). Fewer connections will be audited than requested."
            )
        else:
            consequence = (
                f"{policy.action} policy with HTTP attributes is enforced without the HTTP rules. "
                f"{_MORE_RESTRICTIVE}"
            )
        warnings.append(
            warning(
                f"nodemesh enforces at L4 and does not support HTTP attributes (found: {', '.join(found)}). "
                f"There is no waypoint proxy to enforce HTTP rules. {consequence}"
            )
        )
    warnings.extend(warning(note) for rule in policy.rules if not rule.l7_ignored for note in rule.notes)
    return warnings
