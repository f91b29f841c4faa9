"""Gateway API `gateway.networking.k8s.io/v1` HTTPRoute model (standard channel, plus `retry`).

Used in the GAMMA mesh pattern: a route whose parentRef is a Service changes how clients reach it
(matches, weighted backendRefs, header filters, mirroring, timeouts). Field names and limits mirror
the upstream CRD (kubernetes-sigs/gateway-api `apis/v1/httproute_types.go`), including its CEL rules;
unknown fields are rejected. `retry` (GEP-1731) is experimental-channel upstream but accepted here.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from api.policy.istio import PolicyModel
from api.policy.kube import ObjectMeta

HTTPMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]

# Gateway API Duration: "1h", "30s", "500ms", "1m30s" (GEP-2257).
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
_PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")


def duration_ms(value: str) -> int:
    """The milliseconds in a Gateway API duration (already validated by the model)."""
    return sum(int(n) * _UNIT_MS[unit] for n, unit in _DURATION_PART.findall(value))


def _check_duration(value: str | None) -> str | None:
    if value is not None and not _DURATION.match(value):
        raise ValueError(f"{value!r} is not a Gateway API duration (e.g. '10s', '500ms', '1m30s')")
    return value


class ParentReference(PolicyModel):
    """`parentRefs[]`: in the mesh, a Service (group "", kind Service) whose traffic the route shapes."""

    group: str = Field(default="gateway.networking.k8s.io", max_length=253)
    kind: str = Field(default="Gateway", max_length=63)
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, max_length=63)
    port: int | None = Field(default=None, ge=1, le=65535)
    section_name: str | None = Field(default=None, max_length=253)


class HTTPPathMatch(PolicyModel):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = Field(default="/", max_length=1024)

    @model_validator(mode="after")
    def _check(self) -> HTTPPathMatch:
        if self.type == "RegularExpression":
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {self.value!r}: {exc}") from None
            return self
        v, kinds = self.value, "when type one of ['Exact', 'PathPrefix']"
        if not v.startswith("/"):
            raise ValueError(f"value must be an absolute path and start with '/' {kinds}")
        for bad in ("//", "/./", "/../", "%2f", "%2F", "#"):
            if bad in v:
                raise ValueError(f"must not contain {bad!r} {kinds}")
        for bad in ("/..", "/."):
            if v.endswith(bad):
                raise ValueError(f"must not end with {bad!r} {kinds}")
        if not _PATH_CHARS.match(v):
            raise ValueError(f"must only contain valid characters (RFC 3986 path) {kinds}")
        return self


class HTTPHeaderMatch(PolicyModel):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1, max_length=256)
    value: str = Field(max_length=4096)


class HTTPQueryParamMatch(PolicyModel):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1, max_length=256)
    value: str = Field(min_length=1, max_length=1024)


class HTTPRouteMatch(PolicyModel):
    path: HTTPPathMatch | None = None
    headers: tuple[HTTPHeaderMatch, ...] | None = Field(default=None, max_length=16)
    query_params: tuple[HTTPQueryParamMatch, ...] | None = Field(default=None, max_length=16)
    method: HTTPMethod | None = None


class HTTPHeader(PolicyModel):
    name: str = Field(min_length=1, max_length=256)
    value: str = Field(max_length=4096)


class HTTPHeaderFilter(PolicyModel):
    set: tuple[HTTPHeader, ...] | None = Field(default=None, max_length=16)
    add: tuple[HTTPHeader, ...] | None = Field(default=None, max_length=16)
    remove: tuple[str, ...] | None = Field(default=None, max_length=16)


class BackendObjectReference(PolicyModel):
    group: str = Field(default="", max_length=253)
    kind: str = Field(default="Service", max_length=63)
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, max_length=63)
    port: int | None = Field(default=None, ge=1, le=65535)

    @model_validator(mode="after")
    def _check(self) -> BackendObjectReference:
        if self.group == "" and self.kind == "Service" and self.port is None:
            raise ValueError("Must have port for Service reference")
        return self


class Fraction(PolicyModel):
    numerator: int = Field(ge=0)
    denominator: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Fraction:
        if self.numerator > self.denominator:
            raise ValueError("numerator must be less than or equal to denominator")
        return self


class HTTPRequestMirrorFilter(PolicyModel):
    backend_ref: BackendObjectReference
    percent: int | None = Field(default=None, ge=0, le=100)
    fraction: Fraction | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPRequestMirrorFilter:
        if self.percent is not None and self.fraction is not None:
            raise ValueError("Only one of percent or fraction may be specified in HTTPRequestMirrorFilter")
        return self


class HTTPPathModifier(PolicyModel):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = Field(default=None, max_length=1024)
    replace_prefix_match: str | None = Field(default=None, max_length=1024)

    @model_validator(mode="after")
    def _check(self) -> HTTPPathModifier:
        if (self.type == "ReplaceFullPath") != (self.replace_full_path is not None):
            raise ValueError("replaceFullPath must be set exactly when type is 'ReplaceFullPath'")
        if (self.type == "ReplacePrefixMatch") != (self.replace_prefix_match is not None):
            raise ValueError("replacePrefixMatch must be set exactly when type is 'ReplacePrefixMatch'")
        return self


class HTTPRequestRedirectFilter(PolicyModel):
    scheme: Literal["http", "https"] | None = None
    hostname: str | None = Field(default=None, max_length=253)
    path: HTTPPathModifier | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    status_code: Literal[301, 302, 303, 307, 308] = 302


class HTTPURLRewriteFilter(PolicyModel):
    hostname: str | None = Field(default=None, max_length=253)
    path: HTTPPathModifier | None = None


class LocalObjectReference(PolicyModel):
    group: str = Field(max_length=253)
    kind: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)


class HTTPCORSFilter(PolicyModel):
    allow_origins: tuple[str, ...] | None = Field(default=None, max_length=64)
    allow_methods: tuple[HTTPMethod | Literal["*"], ...] | None = Field(default=None, max_length=9)
    allow_headers: tuple[str, ...] | None = Field(default=None, max_length=64)
    expose_headers: tuple[str, ...] | None = Field(default=None, max_length=64)
    max_age: int = Field(default=5, ge=1)
    allow_credentials: bool | None = None


FilterType = Literal[
    "RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect", "URLRewrite",
    "ExtensionRef", "CORS",
]
_FILTER_FIELDS: dict[str, str] = {
    "RequestHeaderModifier": "request_header_modifier",
    "ResponseHeaderModifier": "response_header_modifier",
    "RequestMirror": "request_mirror",
    "RequestRedirect": "request_redirect",
    "URLRewrite": "url_rewrite",
    "ExtensionRef": "extension_ref",
    "CORS": "cors",
}


class HTTPRouteFilter(PolicyModel):
    """A filter; exactly the field named by `type` is set (CRD CEL rule)."""

    type: FilterType
    request_header_modifier: HTTPHeaderFilter | None = None
    response_header_modifier: HTTPHeaderFilter | None = None
    request_mirror: HTTPRequestMirrorFilter | None = None
    request_redirect: HTTPRequestRedirectFilter | None = None
    url_rewrite: HTTPURLRewriteFilter | None = None
    extension_ref: LocalObjectReference | None = None
    cors: HTTPCORSFilter | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPRouteFilter:
        for filter_type, name in _FILTER_FIELDS.items():
            alias = self.model_fields[name].alias or name
            if filter_type == self.type and getattr(self, name) is None:
                raise ValueError(f"filter.{alias} must be specified for {filter_type} filter.type")
            if filter_type != self.type and getattr(self, name) is not None:
                raise ValueError(f"filter.{alias} must be nil if the filter.type is not {filter_type}")
        return self


def _check_filters(filters: tuple[HTTPRouteFilter, ...] | None) -> tuple[HTTPRouteFilter, ...] | None:
    types = [f.type for f in filters or ()]
    if "RequestRedirect" in types and "URLRewrite" in types:
        raise ValueError("May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite")
    unique_types: tuple[FilterType, ...] = ("CORS", "RequestHeaderModifier", "ResponseHeaderModifier")
    unique_types += ("RequestRedirect", "URLRewrite")
    for unique in unique_types:
        if types.count(unique) > 1:
            raise ValueError(f"{unique} filter cannot be repeated")
    return filters


class HTTPBackendRef(PolicyModel):
    group: str = Field(default="", max_length=253)
    kind: str = Field(default="Service", max_length=63)
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, max_length=63)
    port: int | None = Field(default=None, ge=1, le=65535)
    weight: int = Field(default=1, ge=0, le=1_000_000)
    filters: tuple[HTTPRouteFilter, ...] | None = Field(default=None, max_length=16)

    _filters = field_validator("filters")(_check_filters)

    @model_validator(mode="after")
    def _check(self) -> HTTPBackendRef:
        if self.group == "" and self.kind == "Service" and self.port is None:
            raise ValueError("Must have port for Service reference")
        return self


class HTTPRouteTimeouts(PolicyModel):
    request: str | None = None
    backend_request: str | None = None

    _durations = field_validator("request", "backend_request")(_check_duration)

    @model_validator(mode="after")
    def _check(self) -> HTTPRouteTimeouts:
        if self.request is not None and self.backend_request is not None:
            request = duration_ms(self.request)
            if request != 0 and duration_ms(self.backend_request) > request:
                raise ValueError("backendRequest timeout cannot be longer than request timeout")
        return self


class HTTPRouteRetry(PolicyModel):
    """GEP-1731 retry (experimental channel upstream)."""

    codes: tuple[int, ...] | None = None
    attempts: int | None = Field(default=None, ge=0)
    backoff: str | None = None

    _backoff = field_validator("backoff")(_check_duration)

    @field_validator("codes")
    @classmethod
    def _check_codes(cls, codes: tuple[int, ...] | None) -> tuple[int, ...] | None:
        for code in codes or ():
            if not 400 <= code <= 599:
                raise ValueError(f"retry code {code} must be between 400 and 599")
        return codes


class HTTPRouteRule(PolicyModel):
    name: str | None = Field(default=None, max_length=253)
    matches: tuple[HTTPRouteMatch, ...] | None = Field(default=None, max_length=64)
    filters: tuple[HTTPRouteFilter, ...] | None = Field(default=None, max_length=16)
    backend_refs: tuple[HTTPBackendRef, ...] | None = Field(default=None, max_length=16)
    timeouts: HTTPRouteTimeouts | None = None
    retry: HTTPRouteRetry | None = None

    _filters = field_validator("filters")(_check_filters)

    @model_validator(mode="after")
    def _check(self) -> HTTPRouteRule:
        if self.backend_refs and any(f.type == "RequestRedirect" for f in self.filters or ()):
            raise ValueError("RequestRedirect filter must not be used together with backendRefs")
        return self


class HTTPRouteSpec(PolicyModel):
    parent_refs: tuple[ParentReference, ...] | None = Field(default=None, max_length=32)
    hostnames: tuple[str, ...] | None = Field(default=None, max_length=16)
    rules: tuple[HTTPRouteRule, ...] | None = Field(default=None, max_length=16)

    @field_validator("hostnames")
    @classmethod
    def _check_hostnames(cls, hostnames: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for host in hostnames or ():
            if not host or len(host) > 253:
                raise ValueError(f"hostname {host!r} must be 1..253 characters")
        return hostnames

    @model_validator(mode="after")
    def _check(self) -> HTTPRouteSpec:
        if sum(len(r.matches or ()) for r in self.rules or ()) >= 128:
            raise ValueError("the total number of matches across all rules in a route must be less than 128")
        seen: set[tuple[str, str, str, str | None, str | None]] = set()
        for ref in self.parent_refs or ():
            key = (ref.group, ref.kind, ref.name, ref.namespace or None, ref.section_name or None)
            if key in seen:
                raise ValueError(f"parentRefs: duplicate reference to {ref.kind} {ref.name}")
            seen.add(key)
        return self


class HTTPRoute(PolicyModel):
    """A Gateway API HTTPRoute; attached to a Service (GAMMA), it routes that Service's HTTP traffic."""

    api_version: Literal["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"]
    kind: Literal["HTTPRoute"]
    metadata: ObjectMeta
    spec: HTTPRouteSpec = HTTPRouteSpec()
    status: dict[str, object] | None = None
