"""Table-driven validation of the policy and Kubernetes models in `api.policy`."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from api.policy import UnknownKindError, parse_object

AP = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"}}
PA = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication", "metadata": {"name": "p"}}
HR = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "r"}}
SVC_REF = {"group": "", "kind": "Service", "name": "s", "port": 80}


def _with(base: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return {**base, "spec": spec}


GOOD = [
    _with(AP, {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["td/ns/a/sa/b"]}}]}]}),
    _with(
        AP, {"selector": {"matchLabels": {"app": "x"}}, "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}
    ),
    _with(AP, {"action": "CUSTOM", "provider": {"name": "ext"}}),
    _with(PA, {"mtls": {"mode": "STRICT"}}),
    _with(PA, {"selector": {"matchLabels": {"app": "x"}}, "portLevelMtls": {8080: {"mode": "DISABLE"}}}),
    _with(PA, {"selector": {"matchLabels": {"app": "x"}}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
    _with(AP, {"rules": [{"from": [{"source": {"principals": None, "namespaces": ["bar"]}}]}]}),
    _with(AP, {"rules": [{"to": [{"operation": {"ports": ["8080"], "methods": []}}]}]}),
    _with(HR, {"parentRefs": [SVC_REF], "rules": [{"backendRefs": [{**SVC_REF, "weight": 90}]}]}),
]

BAD = [
    (_with(AP, {"action": "DENYY"}), "spec.action", "Input should be"),
    (_with(AP, {"action": "CUSTOM"}), "spec", "requires a provider"),
    (_with(AP, {"action": "DENY", "provider": {"name": "x"}}), "spec", "cannot have a provider"),
    (_with(AP, {"rules": [{"from": [{"source": {}}]}]}), "spec.rules.0.from.0.source", "must not be empty"),
    # Istio's webhook compares len() == 0: a list written as [] is empty too
    (
        _with(AP, {"rules": [{"from": [{"source": {"principals": []}}]}]}),
        "spec.rules.0.from.0.source",
        "must not be empty",
    ),
    (_with(AP, {"rules": [{"to": [{"operation": {"ports": []}}]}]}), "to.0.operation", "not be empty"),
    (_with(AP, {"rules": [{"from": []}]}), "spec.rules.0", "`from` must not be empty"),
    (_with(AP, {"rules": [{"to": []}]}), "spec.rules.0", "`to` must not be empty"),
    # ports as the agent reads them: digits only (pydantic alone would take "+8080" or "8_080")
    (_with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"+8080": {"mode": "STRICT"}}}),
     "spec.portLevelMtls", "not a number"),
    (_with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"8_080": {"mode": "STRICT"}}}),
     "spec.portLevelMtls", "not a number"),
    (_with(PA, {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {}}), "portLevel", "at least one"),
    (_with(AP, {"rules": [{"to": [{"operation": {"ports": ["0"]}}]}]}), "spec.rules.0.to.0", "between 1"),
    (_with(AP, {"rules": [{"from": [{"source": {"principal": ["a"]}}]}]}), "principal", "Extra inputs"),
    (_with(AP, {"targetRef": {"kind": "Service", "name": "s"}}), "spec", "not supported"),
    (_with(PA, {"portLevelMtls": {80: {"mode": "STRICT"}}}), "spec", "requires selector"),
    (_with(PA, {"mtls": {"mode": "strict"}}), "spec.mtls.mode", "Input should be"),
    (
        _with(HR, {"rules": [{"backendRefs": [{"name": "s", "port": 80, "weight": 1_000_001}]}]}),
        "weight",
        "less",
    ),
    (_with(HR, {"rules": [{"backendRefs": [{"name": "s"}]}]}), "backendRefs", "Must have port"),
    (
        _with(HR, {"rules": [{"matches": [{"path": {"type": "Exact", "value": "a"}}]}]}),
        "path",
        "start with '/'",
    ),
    (
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "status": {"podIP": "1.2.3"}},
        "podIP",
        "IPv4",
    ),
]


@pytest.mark.parametrize("body", GOOD)
def test_good_objects_parse(body: dict[str, Any]) -> None:
    obj = parse_object(body)
    assert obj.kind == body["kind"]
    assert obj.metadata.name == body["metadata"]["name"]


@pytest.mark.parametrize(("body", "loc", "message"), BAD)
def test_bad_objects_are_rejected_with_field_and_reason(body: dict[str, Any], loc: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_object(body)
    rendered = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in info.value.errors()]
    assert any(loc in path and message in msg for path, msg in rendered), rendered


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(UnknownKindError, match="unknown kind 'Deployment'"):
        parse_object({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}})
