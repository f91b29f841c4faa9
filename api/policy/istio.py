"""Istio `security.istio.io/v1` (and `v1beta1`) AuthorizationPolicy and PeerAuthentication models.

Field names and enums mirror the upstream CRDs (istio/api `security/v1beta1/authorization.proto`,
`peer_authentication.proto`); unknown fields are rejected so a typo (`principal:`) is an error, not a
silently ignored rule. Besides the OpenAPI schema we enforce the CRD's CEL rule on serviceAccounts
and the checks of Istio's validation webhook (istio/istio pkg/config/validation
`ValidateAuthorizationPolicy`, `ValidatePeerAuthentication`; pkg/config/security): empty
`source`/`operation` and empty strings in their lists, addresses, ports, service accounts and path
templates, `when` keys and values, provider vs action, what a CUSTOM policy may not match on, and
port-level mTLS without a selector. See docs/authorization.md, "Invalid values".
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from api.policy.kube import ObjectMeta

ISTIO_API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")

_MAX_RULES = 512


class PolicyModel(BaseModel):
    """Base of the policy CRD models: camelCase aliases, immutable, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, alias_generator=to_camel)


class WorkloadSelector(PolicyModel):
    """`selector`: the workloads (pods) in the policy's namespace whose labels include all of these."""

    match_labels: dict[str, str] = Field(default_factory=dict, max_length=4096)

    @field_validator("match_labels")
    @classmethod
    def _check_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not key:
                raise ValueError("key must not be empty")
            if "*" in key:
                raise ValueError(f"wildcard not allowed in label key match ({key!r})")
            if "*" in value:
                raise ValueError(f"wildcard not allowed in label value match ({key}={value!r})")
            if len(value) > 63:
                raise ValueError(f"label value for {key!r} is longer than 63 characters")
        return labels


class PolicyTargetReference(PolicyModel):
    group: str = Field(default="", max_length=253)
    kind: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)
    namespace: str = ""


class ExtensionProvider(PolicyModel):
    name: str = ""


# Go netip.ParsePrefix: the bits are ASCII decimal with no sign and no leading zero (three digits
# are enough for 128; the range is checked against the address family).
_PREFIX_BITS = re.compile(r"0|[1-9][0-9]{0,2}")


def _ip_or_cidr_problem(value: str) -> str | None:
    """Why `value` is not an address or CIDR as Istio's `security.ValidateIPs` reads it, or None.

    ValidateIPs parses with Go's `netip.ParseAddr` (no "/") or `netip.ParsePrefix`, stricter than
    Python's `ip_network`: the prefix length is a number of bits, never a netmask
    ("10.0.0.0/255.0.0.0") nor "08", and a prefix has no IPv6 zone. Host bits may be set.
    """
    addr_text, slash, bits = value.rpartition("/")
    try:
        addr = ipaddress.ip_address(addr_text if slash else value)
    except ValueError:
        return f"{value!r} is not an IP address or CIDR block"
    if not slash:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        return f"{value!r} is not a CIDR block: a prefix cannot have an IPv6 zone"
    if not _PREFIX_BITS.fullmatch(bits) or int(bits) > addr.max_prefixlen:
        return f"{value!r} is not a CIDR block: the prefix length must be 0-{addr.max_prefixlen} bits"
    return None


def _port_number(value: str) -> int | None:
    """`value` as a number 0-65535 as Go's `strconv.ParseUint(value, 10, 32)` reads it (ASCII
    digits, leading zeros allowed, no sign), else None."""
    if not value.isascii() or not value.isdigit():
        return None
    digits = value.lstrip("0") or "0"
    if len(digits) > 5:  # also keeps int() away from very long strings
        return None
    port = int(digits)
    return port if port <= 65535 else None


def _check_not_empty(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    # security.CheckEmptyValues, which ValidateAuthorizationPolicy runs on the lists of a source
    # (but trustDomains) and of an operation.
    for i, value in enumerate(values or ()):
        if not value:
            raise ValueError(f"empty value not allowed, found at index {i}")
    return values


_Values = tuple[str, ...] | None


def _check_each(problem: Callable[[str], str | None]) -> Callable[[_Values], _Values]:
    """A field validator refusing an empty value, or one for which `problem` says why."""

    def check(values: _Values) -> _Values:
        for value in _check_not_empty(values) or ():
            why = problem(value)
            if why:
                raise ValueError(why)
        return values

    return check


_check_blocks = _check_each(_ip_or_cidr_problem)


def _check_ports(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    for value in _check_not_empty(values) or ():
        if not _port_number(value):  # None, or 0: refused here although Istio's ValidatePorts takes it
            raise ValueError(f"port {value!r} must be a number between 1 and 65535")
    return values


def _service_account_problem(values: tuple[str, ...], where: str) -> str | None:
    """Why Istio's `security.CheckServiceAccount` refuses these `<sa>` / `<ns>/<sa>` values, or None.

    Used for `serviceAccounts`/`notServiceAccounts` and for the `source.serviceAccount` condition;
    `where` names the field or key in the message, as Istio does.
    """
    if len(values) > 16:  # "arbitrary limit to avoid unbounded configuration sizes"
        return "may not have more than 16 values"
    for value in values:
        if not value:
            return f"empty value not allowed, found in {where}"
        if "*" in value:
            return f"wildcard not allowed, found in {where}"
        parts = value.split("/")
        if len(parts) > 2 or not all(parts):
            return f"expected format 'serviceAccount' or 'namespace/serviceAccount', found {value!r}"
        if len(value) > 320:
            return f"value cannot exceed 320 characters, found {value!r}"
    return None


# Path templates as Istio's webhook reads them (security.CheckValidPathTemplate): a segment is `{*}`,
# `{**}` (only as the last operator) or, in a path that uses a template, an RFC 3986 pchar literal.
_MATCH_ONE_TEMPLATE = "{*}"
_MATCH_ANY_TEMPLATE = "{**}"
_PATH_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")  # security.validLiteral


def _path_template_problem(path: str) -> str | None:
    """Why Istio's `security.CheckValidPathTemplate` refuses `path`, or None.

    Any `{` or `}` outside a whole `{*}`/`{**}` segment is refused, template or not ("/{id}",
    "/a/{*}.txt"); once a path uses a template, its other segments must be plain literals
    (no `*`, `?` or empty segment).
    """
    has_template = _MATCH_ONE_TEMPLATE in path or _MATCH_ANY_TEMPLATE in path
    found_match_any = False
    invalid = f"invalid or unsupported path {path!r}"
    for segment in path.strip("/").split("/"):
        if segment in (_MATCH_ONE_TEMPLATE, _MATCH_ANY_TEMPLATE):
            if found_match_any:
                return f"{invalid}: {{**}} is not the last operator"
            found_match_any = segment == _MATCH_ANY_TEMPLATE
            continue
        if "{" in segment or "}" in segment:
            return f"{invalid}: contains '{{' or '}}' beyond a supported path template"
        if has_template and not _PATH_LITERAL.fullmatch(segment):
            return f"{invalid}: contains segment {segment!r} with invalid string literal"
    return None


_check_paths = _check_each(_path_template_problem)

# A source's identity fields: each list is checked for empty values (security.CheckEmptyValues),
# and a CUSTOM policy may set none of them (with the service accounts, `_SOURCE_FIELDS_NOT_WITH_CUSTOM`).
_SOURCE_IDENTITY_FIELDS = (
    "principals",
    "not_principals",
    "request_principals",
    "not_request_principals",
    "namespaces",
    "not_namespaces",
)


class Source(PolicyModel):
    """`from[].source`: who connects (identities, namespaces, addresses). Fields are AND-ed."""

    principals: tuple[str, ...] | None = None
    not_principals: tuple[str, ...] | None = None
    request_principals: tuple[str, ...] | None = None
    not_request_principals: tuple[str, ...] | None = None
    namespaces: tuple[str, ...] | None = None
    not_namespaces: tuple[str, ...] | None = None
    service_accounts: tuple[str, ...] | None = Field(default=None, max_length=16)
    not_service_accounts: tuple[str, ...] | None = Field(default=None, max_length=16)
    trust_domains: tuple[str, ...] | None = None
    not_trust_domains: tuple[str, ...] | None = None
    ip_blocks: tuple[str, ...] | None = None
    not_ip_blocks: tuple[str, ...] | None = None
    remote_ip_blocks: tuple[str, ...] | None = None
    not_remote_ip_blocks: tuple[str, ...] | None = None

    _blocks = field_validator("ip_blocks", "not_ip_blocks", "remote_ip_blocks", "not_remote_ip_blocks")(
        _check_blocks
    )
    _not_empty = field_validator(*_SOURCE_IDENTITY_FIELDS)(_check_not_empty)

    @field_validator("service_accounts", "not_service_accounts")
    @classmethod
    def _check_service_accounts(
        cls, values: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        problem = _service_account_problem(values, to_camel(info.field_name or "")) if values else None
        if problem:
            raise ValueError(problem)
        return values

    @model_validator(mode="after")
    def _check(self) -> Source:
        # CRD CEL rule on Source.
        identities = (self.principals, self.not_principals, self.namespaces, self.not_namespaces)
        has_sa = self.service_accounts is not None or self.not_service_accounts is not None
        if has_sa and any(v is not None for v in identities):
            raise ValueError("Cannot set serviceAccounts with namespaces or principals")
        # Istio webhook: "`from.source` must not be empty" (an empty source would match everyone);
        # it compares len() == 0, so a field written as [] is as empty as an absent one.
        if all(not getattr(self, name) for name in type(self).model_fields):
            raise ValueError("`from.source` must not be empty")
        return self


class From(PolicyModel):
    source: Source


class Operation(PolicyModel):
    """`to[].operation`: what is accessed (hosts, ports, and the HTTP-only methods and paths)."""

    hosts: tuple[str, ...] | None = None
    not_hosts: tuple[str, ...] | None = None
    ports: tuple[str, ...] | None = None
    not_ports: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    not_methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    not_paths: tuple[str, ...] | None = None

    _ports = field_validator("ports", "not_ports")(_check_ports)
    _paths = field_validator("paths", "not_paths")(_check_paths)
    _not_empty = field_validator("hosts", "not_hosts", "methods", "not_methods")(_check_not_empty)

    @model_validator(mode="after")
    def _check(self) -> Operation:
        # Istio webhook: "`to.operation` must not be empty" (len() == 0 for every field).
        if all(not getattr(self, name) for name in type(self).model_fields):
            raise ValueError("`to.operation` must not be empty")
        return self


class To(PolicyModel):
    operation: Operation


# `when` keys as Istio's webhook reads them: istio/istio pkg/config/security/security.go
# `ValidateAttribute`, called by pkg/config/validation `ValidateAuthorizationPolicy` on `values` and
# on `notValues`. Keys outside these are refused ("unknown attribute"), as are those below.
_WHEN_IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})  # security.ValidateIPs
_WHEN_PORT_KEYS = frozenset({"destination.port"})  # security.ValidatePorts
_WHEN_SERVICE_ACCOUNT_KEYS = frozenset({"source.serviceAccount"})  # security.CheckServiceAccount
_WHEN_PLAIN_KEYS = frozenset(
    {
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "connection.sni",
    }
)
# Keys that name a header, claim or metadata field: `<prefix>...[name]` (security.validateMapKey).
_WHEN_MAP_KEY_PREFIXES = (
    "request.headers",
    "request.experimental.inline.headers",
    "request.auth.claims",
    "experimental.envoy.filters.",
)
# Keys Istio refuses with a reason of their own (v1alpha1 attributes).
_WHEN_REPLACED_KEYS = {
    "destination.namespace": "is replaced by the metadata.namespace",
    "destination.name": "is deprecated: only supported in v1alpha1",
    "destination.user": "is deprecated: only supported in v1alpha1",
}
_WHEN_REPLACED_PREFIX = "destination.labels"  # "is replaced by the workload selector"
# Keys a CUSTOM policy may not use (ValidateAuthorizationPolicy: "<key> is currently not supported
# with CUSTOM action").
_WHEN_NOT_WITH_CUSTOM = frozenset({"source.namespace", "source.principal", "source.serviceAccount"})
_WHEN_NOT_WITH_CUSTOM_PREFIX = "request.auth."
# Source fields a CUSTOM policy may not set (ValidateAuthorizationPolicy: "From.Principals is currently
# not supported with CUSTOM action").
_SOURCE_FIELDS_NOT_WITH_CUSTOM = (*_SOURCE_IDENTITY_FIELDS, "service_accounts", "not_service_accounts")


def _when_key_problem(key: str) -> str | None:
    """Why Istio's `ValidateAttribute` refuses `key` whatever its values, or None."""
    for prefix in _WHEN_MAP_KEY_PREFIXES:
        if key.startswith(prefix):
            # security.validateMapKey: `a[b]`, with a non-empty a and b.
            open_at = key.find("[")
            if key.endswith("]") and 0 < open_at < len(key) - 2:
                return None
            return f"bad key {key!r}: should have the form {prefix.rstrip('.')}[name]"
    if key in _WHEN_IP_KEYS or key in _WHEN_PORT_KEYS or key in _WHEN_SERVICE_ACCOUNT_KEYS:
        return None
    if key in _WHEN_PLAIN_KEYS:
        return None
    if key in _WHEN_REPLACED_KEYS:
        return f"attribute {key!r} {_WHEN_REPLACED_KEYS[key]}"
    if key.startswith(_WHEN_REPLACED_PREFIX):
        return f"attribute {key!r} is replaced by the workload selector"
    return f"unknown attribute {key!r}"


def _when_value_problem(key: str, values: tuple[str, ...]) -> str | None:
    """Why Istio's `ValidateAttribute` refuses these values of a known `key`, or None."""
    if any(not value for value in values):
        return f"empty value not allowed, found in {key}"
    if key in _WHEN_IP_KEYS:
        return next(filter(None, map(_ip_or_cidr_problem, values)), None)
    if key in _WHEN_PORT_KEYS:
        for value in values:
            if _port_number(value) is None:  # ValidatePorts takes 0, as the agent's compiler does
                return f"port {value!r} must be a number between 0 and 65535"
    if key in _WHEN_SERVICE_ACCOUNT_KEYS:
        return _service_account_problem(values, key)
    return None


class Condition(PolicyModel):
    """`when[]`: an extra condition on a connection attribute (`source.ip`, `destination.port`...).

    Keys and values are checked as Istio's webhook does (`security.ValidateAttribute`), so a typo
    in a key or an unreadable address is refused on apply rather than compiled into a rule that
    fails closed in the agent.
    """

    key: str = Field(min_length=1)
    values: tuple[str, ...] | None = None
    not_values: tuple[str, ...] | None = None

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str) -> str:
        problem = _when_key_problem(key)
        if problem:
            raise ValueError(problem)
        return key

    @field_validator("values", "not_values")
    @classmethod
    def _check_values(cls, values: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        key = info.data.get("key")  # absent when the key itself was refused
        problem = _when_value_problem(key, values) if isinstance(key, str) and values else None
        if problem:
            raise ValueError(problem)
        return values

    @model_validator(mode="after")
    def _check(self) -> Condition:
        # Istio webhook: a condition with neither list would match nothing and is almost always a typo.
        if not self.values and not self.not_values:
            raise ValueError(f"condition {self.key!r}: at least one of values or notValues must be set")
        return self


class Rule(PolicyModel):
    from_: tuple[From, ...] | None = Field(default=None, alias="from", max_length=_MAX_RULES)
    to: tuple[To, ...] | None = None
    when: tuple[Condition, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> Rule:
        # Istio webhook: "`from` must not be empty" / "`to` must not be empty" for a list given as []
        if self.from_ is not None and not self.from_:
            raise ValueError("`from` must not be empty")
        if self.to is not None and not self.to:
            raise ValueError("`to` must not be empty")
        return self


class AuthorizationPolicySpec(PolicyModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] | None = Field(default=None, max_length=16)
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    provider: ExtensionProvider | None = None
    rules: tuple[Rule, ...] | None = Field(default=None, max_length=_MAX_RULES)

    @model_validator(mode="after")
    def _check(self) -> AuthorizationPolicySpec:
        if sum(x is not None for x in (self.selector, self.target_ref, self.target_refs)) > 1:
            raise ValueError("only one of targetRefs or selector can be set")
        if self.target_ref is not None or self.target_refs is not None:
            # Accepted by Istio for waypoints and gateways; nodemesh has neither, so refuse clearly
            # instead of silently enforcing nothing.
            raise ValueError("targetRef/targetRefs is not supported by nodemesh (no waypoints); use selector")
        if self.action == "CUSTOM" and self.provider is None:
            raise ValueError("CUSTOM action requires a provider")
        if self.action != "CUSTOM" and self.provider is not None:
            raise ValueError(f"{self.action} action cannot have a provider")
        # Istio webhook: a DENY or CUSTOM policy without rules is never triggered. It tests
        # `Rules == nil`, and its JSON decoder leaves `rules: []` nil too, so [] is refused like an
        # absent list.
        if self.action in ("DENY", "CUSTOM") and not self.rules:
            raise ValueError(
                f"{self.action} action without `rules` is meaningless as it will never be triggered, "
                "add an empty rule `{}` if you want it to be triggered for every connection"
            )
        if self.action == "CUSTOM":
            problem = self._custom_problem()
            if problem:
                raise ValueError(problem)
        return self

    def _custom_problem(self) -> str | None:
        """What ValidateAuthorizationPolicy refuses in a CUSTOM policy with rules, or None."""
        if self.provider is not None and not self.provider.name:
            return "`provider.name` must not be empty"
        for i, rule in enumerate(self.rules or ()):
            for j, from_ in enumerate(rule.from_ or ()):
                for name in _SOURCE_FIELDS_NOT_WITH_CUSTOM:
                    if getattr(from_.source, name):  # Istio: len() != 0
                        where = f"rules[{i}].from[{j}].source.{to_camel(name)}"
                        return f"{where} is currently not supported with CUSTOM action"
            for j, cond in enumerate(rule.when or ()):
                key = cond.key
                if key in _WHEN_NOT_WITH_CUSTOM or key.startswith(_WHEN_NOT_WITH_CUSTOM_PREFIX):
                    return f"rules[{i}].when[{j}].key: {key!r} is currently not supported with CUSTOM action"
        return None


class AuthorizationPolicy(PolicyModel):
    """An Istio AuthorizationPolicy: ALLOW/DENY/AUDIT/CUSTOM rules for the selected workloads."""

    api_version: Literal["security.istio.io/v1", "security.istio.io/v1beta1"]
    kind: Literal["AuthorizationPolicy"]
    metadata: ObjectMeta
    spec: AuthorizationPolicySpec = AuthorizationPolicySpec()
    status: dict[str, object] | None = None


MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class PeerAuthenticationMutualTLS(PolicyModel):
    mode: MtlsMode = "UNSET"


class PeerAuthenticationSpec(PolicyModel):
    selector: WorkloadSelector | None = None
    mtls: PeerAuthenticationMutualTLS | None = None
    port_level_mtls: dict[int, PeerAuthenticationMutualTLS] | None = None

    @field_validator("port_level_mtls", mode="before")
    @classmethod
    def _check_port_keys(cls, raw: object) -> object:
        # Ports as the agent reads them (api.authz.peerauth): an int, or ASCII digits only; pydantic's
        # lax int parsing would also take "+8080", " 8080" or "8_080", which the agent then refuses,
        # leaving the whole PeerAuthentication (and its STRICT) out.
        if isinstance(raw, dict):
            if not raw:
                raise ValueError("portLevelMtls, if defined, must have at least one element")
            for key in raw:
                if isinstance(key, bool) or not (
                    isinstance(key, int) or (isinstance(key, str) and key.isascii() and key.isdigit())
                ):
                    raise ValueError(f"port {key!r} is not a number (1-65535)")
        return raw

    @field_validator("port_level_mtls")
    @classmethod
    def _check_ports(
        cls, ports: dict[int, PeerAuthenticationMutualTLS] | None
    ) -> dict[int, PeerAuthenticationMutualTLS] | None:
        for port in ports or {}:
            if not 0 < port <= 65535:
                raise ValueError(f"port must be between 1-65535 (got {port})")
        return ports

    @model_validator(mode="after")
    def _check(self) -> PeerAuthenticationSpec:
        if self.port_level_mtls is not None and not (self.selector and self.selector.match_labels):
            raise ValueError("portLevelMtls requires selector")
        return self


class PeerAuthentication(PolicyModel):
    """An Istio PeerAuthentication: whether the selected workloads accept plaintext (mTLS mode)."""

    api_version: Literal["security.istio.io/v1", "security.istio.io/v1beta1"]
    kind: Literal["PeerAuthentication"]
    metadata: ObjectMeta
    spec: PeerAuthenticationSpec = PeerAuthenticationSpec()
    status: dict[str, object] | None = None
