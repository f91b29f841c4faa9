"""The L4 authorization data model: the connection under decision, compiled policies, and decisions.

Everything here is an immutable value. `api.authz.compile` turns Istio AuthorizationPolicy objects
into `CompiledPolicy` values once; `api.authz.evaluate` matches a `Connection` against them on every
new connection and returns a `Decision`. The shape follows istio/ztunnel `src/rbac.rs`: a policy is a
list of rules, a rule is an AND of clauses (from / to / each `when`), a clause is an OR of matches,
and a match is an AND of fields whose values are OR-ed.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from api.resources import Workload

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SPIFFE_SCHEME = "spiffe://"


class AuthzError(Exception):
    """Base of the errors raised by `api.authz`."""


class ConnectionInputError(AuthzError):
    """The connection handed to the evaluator is malformed (a bug in the caller, not in a policy)."""


class PolicyCompileError(AuthzError):
    """A policy object cannot be compiled; carries the object and the field so an operator can fix it."""

    def __init__(self, kind: str, namespace: str, name: str, field_path: str, problem: str) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field_path = field_path
        self.problem = problem
        super().__init__(f"{kind} {namespace}/{name}: {field_path}: {problem}")


class PolicyRef(NamedTuple):
    """`(namespace, name)` of a policy object."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class Action(StrEnum):
    """`spec.action` of an AuthorizationPolicy."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


class Reason(StrEnum):
    """Why a connection was allowed or denied."""

    ALLOWED_NO_POLICY = "ALLOWED_NO_POLICY"  # no ALLOW policy selects the workload
    ALLOWED_BY_POLICY = "ALLOWED_BY_POLICY"  # an ALLOW rule matched
    DENIED_BY_POLICY = "DENIED_BY_POLICY"  # a DENY rule matched
    NOT_ALLOWED = "NOT_ALLOWED"  # ALLOW policies select the workload, none matched
    DENIED_CUSTOM_UNSUPPORTED = "DENIED_CUSTOM_UNSUPPORTED"  # a CUSTOM policy selects it; no provider


@functools.lru_cache(maxsize=8192)
def _ip_address(text: str) -> IpAddress:
    """`ipaddress.ip_address`, parsed once per distinct string (a proxy sees the same pod IPs again and
    again; the objects are immutable). ValueError as ip_address's."""
    return ipaddress.ip_address(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """A new TCP connection to a workload, as the inbound side of the node proxy sees it.

    `src_identity` is the peer's verified SPIFFE ID in Istio principal form `<td>/ns/<ns>/sa/<sa>`
    (a leading `spiffe://` is accepted and stripped), or None for plaintext. `src_namespace` is
    derived from it; passing a different one is an error. Keyword-only, so that a call site cannot
    mix up the two addresses.
    """

    src_ip: str
    src_identity: str | None
    dst_ip: str
    dst_port: int
    dst_workload: Workload
    src_namespace: str | None = None
    # Parsed forms, filled in by __post_init__ so that matching never re-parses.
    src_addr: IpAddress = field(init=False, repr=False, compare=False)
    dst_addr: IpAddress = field(init=False, repr=False, compare=False)
    src_ip_key: tuple[int, int] = field(init=False, repr=False, compare=False)  # (version, int)
    dst_ip_key: tuple[int, int] = field(init=False, repr=False, compare=False)
    principal: str | None = field(init=False, repr=False, compare=False)
    trust_domain: str | None = field(init=False, repr=False, compare=False)
    service_account: tuple[str, str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            src_addr = _ip_address(self.src_ip)
            dst_addr = _ip_address(self.dst_ip)
        except ValueError as exc:
            raise ConnectionInputError(f"connection has a bad address: {exc}") from exc
        if not 0 <= self.dst_port <= 65535:
            raise ConnectionInputError(f"connection has a bad destination port {self.dst_port}")
        object.__setattr__(self, "src_addr", src_addr)
        object.__setattr__(self, "dst_addr", dst_addr)
        object.__setattr__(self, "src_ip_key", (src_addr.version, int(src_addr)))
        object.__setattr__(self, "dst_ip_key", (dst_addr.version, int(dst_addr)))
        if self.src_identity is None:
            if self.src_namespace is not None:
                raise ConnectionInputError(
                    "a plaintext connection (no identity) cannot carry a src_namespace"
                )
            object.__setattr__(self, "principal", None)
            object.__setattr__(self, "trust_domain", None)
            object.__setattr__(self, "service_account", None)
            return
        principal = self.src_identity.removeprefix(SPIFFE_SCHEME)
        parts = principal.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
            raise ConnectionInputError(
                f"identity {self.src_identity!r} is not of the form <trust-domain>/ns/<ns>/sa/<sa>"
            )
        td, _, ns, _, sa = parts
        if self.src_namespace is not None and self.src_namespace != ns:
            raise ConnectionInputError(
                f"src_namespace {self.src_namespace!r} disagrees with identity {self.src_identity!r}"
            )
        object.__setattr__(self, "src_namespace", ns)
        object.__setattr__(self, "principal", principal)
        object.__setattr__(self, "trust_domain", td)
        object.__setattr__(self, "service_account", (ns, sa))


@dataclass(frozen=True, slots=True)
class StringPatterns:
    """Istio string match forms, OR-ed: exact, `prefix*`, `*suffix`, `*` (any non-empty value).

    Plain string comparison, never regexes. A missing value (plaintext: no principal) matches nothing.
    """

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    presence: bool = False

    @classmethod
    def parse(cls, values: tuple[str, ...] | list[str]) -> StringPatterns:
        # Same split as istio ambient `stringToMatch`: "*" presence, "*x" suffix, "x*" prefix, else exact.
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        presence = False
        for v in values:
            if v == "*":
                presence = True
            elif v.startswith("*"):
                suffixes.append(v[1:])
            elif v.endswith("*"):
                prefixes.append(v[:-1])
            else:
                exact.add(v)
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), presence)

    def matches(self, value: object) -> bool:
        if not isinstance(value, str) or not value:
            return False
        if self.presence or value in self.exact:
            return True
        for p in self.prefixes:
            if value.startswith(p):
                return True
        return any(value.endswith(suffix) for suffix in self.suffixes)


@dataclass(frozen=True, slots=True)
class IpBlocks:
    """CIDRs (a single IP is a /32 or /128), OR-ed; matched as integer ranges per IP version."""

    networks: tuple[IpNetwork, ...]
    _ranges: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ranges = tuple((n.version, int(n.network_address), int(n.broadcast_address)) for n in self.networks)
        object.__setattr__(self, "_ranges", ranges)

    def matches(self, value: object) -> bool:
        """`value` is an `ip_key`: `(version, int(address))`."""
        if not isinstance(value, tuple):
            return False
        version, number = value
        for v, first, last in self._ranges:  # noqa: SIM110 - a loop; any(genexpr) is slower on this path
            if v == version and first <= number <= last:
                return True
        return False


@dataclass(frozen=True, slots=True)
class Ports:
    """Destination ports, OR-ed."""

    ports: frozenset[int]

    def matches(self, value: object) -> bool:
        return value in self.ports


@dataclass(frozen=True, slots=True)
class ServiceAccounts:
    """`(namespace, service account)` pairs, exact, OR-ed; plaintext has none."""

    accounts: frozenset[tuple[str, str]]

    def matches(self, value: object) -> bool:
        return value is not None and value in self.accounts


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """One field of a source, operation or condition, e.g. `notPrincipals: [...]`.

    `attr` names the `Connection` attribute it reads. A positive field holds when any value matches;
    a `notX` field holds when none does (so `notPrincipals` holds for plaintext, as in ztunnel).
    """

    name: str  # as written, for explanations: "principals", "notPorts", "when source.ip"
    attr: str
    matcher: StringPatterns | IpBlocks | Ports | ServiceAccounts
    negated: bool
    values: tuple[str, ...]

    def holds(self, conn: Connection) -> bool:
        return self.matcher.matches(getattr(conn, self.attr)) != self.negated


@dataclass(frozen=True, slots=True)
class Match:
    """One `source`, `operation` or `when` entry: all its fields must hold. No fields: always holds."""

    fields: tuple[FieldMatch, ...]

    def holds(self, conn: Connection) -> bool:
        return all(f.holds(conn) for f in self.fields)


@dataclass(frozen=True, slots=True)
class Clause:
    """`from`, `to`, or one `when` condition: any of its matches must hold."""

    name: str  # "from", "to", "when[0]"
    matches: tuple[Match, ...]

    def holds(self, conn: Connection) -> bool:
        return any(m.holds(conn) for m in self.matches)


_FieldPlan = tuple[str, Callable[[object], bool], bool]  # (Connection attribute, matcher, negated)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One entry of `spec.rules`, ready to match.

    `never_matches` is set for an ALLOW/AUDIT rule that needs HTTP attributes or holds an invalid
    value; `always_matches` for a DENY rule with an invalid value (fail closed). `notes` says why.
    """

    index: int
    clauses: tuple[Clause, ...]
    never_matches: bool = False
    always_matches: bool = False
    l7_ignored: tuple[str, ...] = ()  # HTTP-only attributes this rule uses (ignored or fatal at L4)
    notes: tuple[str, ...] = ()
    # The clauses flattened to plain tuples and bound methods: this runs on every new connection,
    # and the nested loops below cost a fraction of walking the dataclasses.
    _plan: tuple[tuple[tuple[_FieldPlan, ...], ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plan = tuple(
            tuple(tuple((f.attr, f.matcher.matches, f.negated) for f in m.fields) for m in c.matches)
            for c in self.clauses
        )
        object.__setattr__(self, "_plan", plan)

    def explain(self, conn: Connection) -> str:
        """Why this rule does or does not match `conn`, naming the fields that failed."""
        head = f"rules[{self.index}]"
        if self.never_matches or self.always_matches:
            return f"{head} {'matches' if self.always_matches else 'does not match'}: {'; '.join(self.notes)}"
        failed: list[str] = []
        for clause in self.clauses:
            if clause.holds(conn):
                continue
            entries = [
                " + ".join(f"{f.name} {list(f.values)}" for f in m.fields if not f.holds(conn))
                for m in clause.matches
            ]
            failed.append(f"{clause.name} fails ({' | '.join(entries)})")
        if not failed:
            return f"{head} matches"
        return f"{head} does not match: {'; '.join(failed)}"

    def holds(self, conn: Connection) -> bool:
        # Same semantics as `all(c.holds(conn) for c in self.clauses)`, without the call overhead.
        if self.never_matches:
            return False
        if self.always_matches:
            return True
        for clause in self._plan:  # AND
            for fields in clause:  # OR
                for attr, matches, negated in fields:  # AND
                    if matches(getattr(conn, attr)) == negated:
                        break
                else:
                    break  # this match holds, so the clause does
            else:
                return False  # no match of the clause holds
        return True


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """An AuthorizationPolicy compiled for L4 enforcement."""

    ref: PolicyRef
    action: Action
    rules: tuple[CompiledRule, ...]
    selector: tuple[tuple[str, str], ...] | None  # None: no selector (whole namespace / mesh)
    dry_run: bool = False
    provider: str | None = None  # CUSTOM only

    def selects(self, workload: Workload) -> bool:
        if not self.selector:
            return True
        labels = workload.label_map()
        return all(labels.get(k) == v for k, v in self.selector)

    def first_matching_rule(self, conn: Connection) -> int | None:
        """Index (in `spec.rules`) of the first rule that matches, None if none does."""
        for rule in self.rules:
            if rule.holds(conn):
                return rule.index
        return None


@dataclass(frozen=True, slots=True)
class DryRunResult:
    """What a `istio.io/dry-run: "true"` policy would have done; it is never enforced."""

    policy: PolicyRef
    action: Action
    matched: bool
    rule_index: int | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict for one connection, with everything `nodemesh policy explain` shows.

    `dry_run_allowed` is the verdict if the dry-run policies that select the workload were enforced
    along with the others (None when there are none). `l7_ignored` lists, per policy rule, HTTP
    attributes that L4 enforcement could not check. `explanation` is filled only on request.
    """

    allowed: bool
    reason: Reason
    policy: PolicyRef | None = None
    rule_index: int | None = None
    audit: tuple[PolicyRef, ...] = ()
    dry_run_results: tuple[DryRunResult, ...] = ()
    dry_run_allowed: bool | None = None
    l7_ignored: tuple[str, ...] = ()
    explanation: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form (for `policy explain -o json` and the flow log)."""
        return {
            "allowed": self.allowed,
            "reason": str(self.reason),
            "policy": str(self.policy) if self.policy else None,
            "rule_index": self.rule_index,
            "audit": [str(p) for p in self.audit],
            "dry_run": [
                {
                    "policy": str(d.policy),
                    "action": str(d.action),
                    "matched": d.matched,
                    "rule_index": d.rule_index,
                }
                for d in self.dry_run_results
            ],
            "dry_run_allowed": self.dry_run_allowed,
            "l7_ignored": list(self.l7_ignored),
            "explanation": list(self.explanation),
        }
