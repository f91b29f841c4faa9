"""PeerAuthentication resolution: the effective mTLS mode of a (workload, port) and who decided it.

Reference: https://istio.io/latest/docs/reference/config/security/peer_authentication/ and istiod's
composition (`ComposePeerAuthentication`, ambient `convertedSelectorPeerAuthentications`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.authz import Level, MtlsMode, PeerAuthIndex, PolicyCompileError, PolicyRef
from api.authz.peerauth import compile_peer_authentication
from api.resources import PolicyObject, Workload

SERVER = Workload("foo/server", "server", "foo", "server", "node-1", ("10.0.0.2",), (("app", "server"),))
ROOT_WL = Workload(
    "istio-system/gw", "gw", "istio-system", "gw", "node-1", ("10.0.0.9",), (("app", "server"),)
)


def pa(
    name: str,
    ns: str = "foo",
    mode: str | None = None,
    selector: dict[str, str] | None = None,
    ports: dict[str, str] | None = None,
    created: str | None = None,
) -> PolicyObject:
    spec: dict[str, Any] = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    metadata: dict[str, Any] = {"name": name, "namespace": ns}
    if created is not None:
        metadata["creationTimestamp"] = created
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": metadata,
        "spec": spec,
    }
    return PolicyObject.of("PeerAuthentication", ns, name, body)


APP = {"app": "server"}
T1, T2, T3 = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"


@dataclass(frozen=True)
class Case:
    id: str
    rule: str
    policies: list[PolicyObject]
    mode: MtlsMode
    level: Level
    policy: str | None
    port: int = 8080
    workload: Workload = SERVER


CASES = [
    Case(
        "default_permissive",
        "Without any policy the mode is PERMISSIVE.",
        [],
        MtlsMode.PERMISSIVE,
        Level.DEFAULT,
        None,
    ),
    Case(
        "mesh_wide_strict",
        "A root-namespace policy without selector is mesh-wide.",
        [pa("default", "istio-system", "STRICT")],
        MtlsMode.STRICT,
        Level.MESH,
        "istio-system/default",
    ),
    Case(
        "namespace_overrides_mesh",
        "A namespace-wide policy overrides the mesh-wide one.",
        [pa("default", "istio-system", "STRICT"), pa("ns", mode="PERMISSIVE")],
        MtlsMode.PERMISSIVE,
        Level.NAMESPACE,
        "foo/ns",
    ),
    Case(
        "namespace_unset_inherits_mesh",
        "UNSET inherits from the parent level.",
        [pa("default", "istio-system", "STRICT"), pa("ns", mode="UNSET")],
        MtlsMode.STRICT,
        Level.MESH,
        "istio-system/default",
    ),
    Case(
        "namespace_without_mtls_inherits_mesh",
        "A policy without `mtls` is UNSET.",
        [pa("default", "istio-system", "DISABLE"), pa("ns")],
        MtlsMode.DISABLE,
        Level.MESH,
        "istio-system/default",
    ),
    Case(
        "other_namespace_ignored",
        "A namespace-wide policy only covers its own namespace.",
        [pa("ns", "bar", "STRICT")],
        MtlsMode.PERMISSIVE,
        Level.DEFAULT,
        None,
    ),
    Case(
        "workload_overrides_namespace",
        "A workload-selector policy overrides the namespace-wide one.",
        [pa("ns", mode="STRICT"), pa("wl", mode="PERMISSIVE", selector=APP)],
        MtlsMode.PERMISSIVE,
        Level.WORKLOAD,
        "foo/wl",
    ),
    Case(
        "workload_selector_not_matching",
        "The selector must match the workload's labels.",
        [pa("ns", mode="STRICT"), pa("wl", mode="PERMISSIVE", selector={"app": "db"})],
        MtlsMode.STRICT,
        Level.NAMESPACE,
        "foo/ns",
    ),
    Case(
        "workload_unset_inherits_namespace",
        "A workload policy with UNSET inherits the namespace mode.",
        [pa("ns", mode="STRICT"), pa("wl", mode="UNSET", selector=APP)],
        MtlsMode.STRICT,
        Level.NAMESPACE,
        "foo/ns",
    ),
    Case(
        "workload_unset_inherits_mesh_through_namespace",
        "UNSET inherits level by level up to the mesh.",
        [pa("default", "istio-system", "STRICT"), pa("wl", selector=APP)],
        MtlsMode.STRICT,
        Level.MESH,
        "istio-system/default",
    ),
    Case(
        "port_level_overrides_workload",
        "portLevelMtls overrides the workload mode for that port.",
        [pa("wl", mode="STRICT", selector=APP, ports={"8080": "PERMISSIVE"})],
        MtlsMode.PERMISSIVE,
        Level.WORKLOAD_PORT,
        "foo/wl",
    ),
    Case(
        "port_level_other_port_uses_workload_mode",
        "Other ports keep the workload mode.",
        [pa("wl", mode="STRICT", selector=APP, ports={"8080": "PERMISSIVE"})],
        MtlsMode.STRICT,
        Level.WORKLOAD,
        "foo/wl",
        port=9090,
    ),
    Case(
        "port_level_strict_under_permissive_namespace",
        "A STRICT port under a PERMISSIVE parent.",
        [pa("ns", mode="PERMISSIVE"), pa("wl", selector=APP, ports={"8080": "STRICT"})],
        MtlsMode.STRICT,
        Level.WORKLOAD_PORT,
        "foo/wl",
    ),
    Case(
        "port_level_unset_inherits_workload_then_namespace",
        "A port-level UNSET inherits the workload mode.",
        [pa("ns", mode="STRICT"), pa("wl", selector=APP, ports={"8080": "UNSET"})],
        MtlsMode.STRICT,
        Level.NAMESPACE,
        "foo/ns",
    ),
    Case(
        "oldest_workload_policy_wins",
        "Several selector policies: the oldest one applies.",
        [
            pa("b-new", mode="STRICT", selector=APP, created=T2),
            pa("a-old", mode="DISABLE", selector=APP, created=T1),
        ],
        MtlsMode.DISABLE,
        Level.WORKLOAD,
        "foo/a-old",
    ),
    Case(
        "oldest_namespace_policy_wins",
        "Several namespace-wide policies: the oldest one applies.",
        [pa("a", mode="STRICT", created=T3), pa("z", mode="PERMISSIVE", created=T1)],
        MtlsMode.PERMISSIVE,
        Level.NAMESPACE,
        "foo/z",
    ),
    Case(
        "oldest_mesh_policy_wins",
        "Several mesh-wide policies: the oldest one applies.",
        [pa("m1", "istio-system", "STRICT", created=T2), pa("m2", "istio-system", "DISABLE", created=T1)],
        MtlsMode.DISABLE,
        Level.MESH,
        "istio-system/m2",
    ),
    Case(
        "timestamped_beats_untimestamped",
        "Objects without a timestamp count as newest.",
        [pa("a", mode="STRICT"), pa("b", mode="PERMISSIVE", created=T3)],
        MtlsMode.PERMISSIVE,
        Level.NAMESPACE,
        "foo/b",
    ),
    Case(
        "name_breaks_ties",
        "Equal (or missing) timestamps: by name.",
        [pa("b", mode="STRICT"), pa("a", mode="DISABLE")],
        MtlsMode.DISABLE,
        Level.NAMESPACE,
        "foo/a",
    ),
    Case(
        "root_namespace_selector_policy_ignored",
        "istiod ignores selector policies in the root namespace.",
        [pa("sel", "istio-system", "STRICT", selector=APP)],
        MtlsMode.PERMISSIVE,
        Level.DEFAULT,
        None,
    ),
    Case(
        "root_namespace_workload_gets_mesh_policy",
        "Workloads of the root namespace see the mesh policy.",
        [pa("default", "istio-system", "STRICT"), pa("sel", "istio-system", "DISABLE", selector=APP)],
        MtlsMode.STRICT,
        Level.MESH,
        "istio-system/default",
        workload=ROOT_WL,
    ),
    Case(
        "empty_selector_is_namespace_wide",
        "An empty matchLabels selects like no selector.",
        [pa("ns", mode="STRICT", selector={})],
        MtlsMode.STRICT,
        Level.NAMESPACE,
        "foo/ns",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peer_authentication_resolution(case: Case) -> None:
    index = PeerAuthIndex.build(case.policies)
    decision = index.resolve(case.workload, case.port)
    assert (decision.mode, decision.level) == (case.mode, case.level), case.rule
    assert (str(decision.policy) if decision.policy else None) == case.policy, case.rule
    assert decision.explanation[-1].endswith(str(case.mode)) or case.level is Level.DEFAULT
    assert index.errors == ()


def test_explanation_walks_the_inheritance_chain() -> None:
    index = PeerAuthIndex.build(
        [
            pa("default", "istio-system", "STRICT"),
            pa("ns", mode="UNSET"),
            pa("wl", selector=APP, ports={"8080": "UNSET"}),
        ]
    )
    decision = index.resolve(SERVER, 8080)
    assert decision.explanation == (
        "workload-port port 8080 of foo/wl: UNSET, inherits",
        "workload foo/wl: UNSET, inherits",
        "namespace foo/ns: UNSET, inherits",
        "mesh istio-system/default: STRICT",
    )


def test_decision_json_form() -> None:
    decision = PeerAuthIndex.build([pa("wl", mode="STRICT", selector=APP)]).resolve(SERVER, 80)
    assert decision.to_dict() == {
        "mode": "STRICT",
        "level": "workload",
        "policy": "foo/wl",
        "explanation": ["workload foo/wl: STRICT"],
    }


def test_configurable_root_namespace() -> None:
    objs = [pa("default", "istio-system", "STRICT"), pa("default", "mesh-root", "DISABLE")]
    decision = PeerAuthIndex.build(objs, root_namespace="mesh-root").resolve(SERVER, 80)
    assert (decision.mode, decision.policy) == (MtlsMode.DISABLE, PolicyRef("mesh-root", "default"))


@pytest.mark.parametrize(("mode", "plaintext_ok"), [(m, m is not MtlsMode.STRICT) for m in MtlsMode])
def test_only_strict_refuses_plaintext(mode: MtlsMode, plaintext_ok: bool) -> None:
    assert mode.accepts_plaintext is plaintext_ok


def test_timestamps_with_offsets_and_datetimes_compare_in_utc() -> None:
    earlier_with_offset = pa("a", mode="STRICT", created="2026-01-01T05:00:00+06:00")  # 2025-12-31T23:00Z
    later_utc = pa("b", mode="DISABLE", created="2026-01-01T00:00:00Z")
    assert PeerAuthIndex.build([later_utc, earlier_with_offset]).resolve(SERVER, 1).policy == PolicyRef(
        "foo", "a"
    )
    as_datetime = pa("c", mode="PERMISSIVE")
    as_datetime.body["metadata"]["creationTimestamp"] = datetime(2020, 1, 1, tzinfo=UTC)
    assert compile_peer_authentication(as_datetime).created == datetime(2020, 1, 1)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (pa("x", mode="SOMETIMES"), "spec.mtls.mode"),
        (pa("x", mode="STRICT", ports={"8080": "STRICT"}), "spec.portLevelMtls"),  # needs a selector
        (pa("x", selector=APP, ports={"http": "STRICT"}), "spec.portLevelMtls[http]"),
        (pa("x", selector=APP, ports={"0": "STRICT"}), "spec.portLevelMtls[0]"),
        (pa("x", selector=APP, ports={"80": "LOOSE"}), "spec.portLevelMtls[80].mode"),
        (pa("x", selector=APP, ports={"+8080": "STRICT"}), "spec.portLevelMtls[+8080]"),
        (pa("x", selector=APP, ports={"000080": "LOOSE"}), "spec.portLevelMtls[000080].mode"),  # port 80
        # int() raises ValueError beyond 4,300 digits: that escaped PeerAuthIndex.build
        (pa("x", selector=APP, ports={"9" * 5000: "STRICT"}), ("spec.portLevelMtls[" + "9" * 5000)[:80]),
    ],
)
def test_bad_peer_authentication_names_the_field(obj: PolicyObject, field: str) -> None:
    with pytest.raises(PolicyCompileError) as info:
        compile_peer_authentication(obj)
    assert info.value.field_path == field


def test_index_reports_bad_objects_and_keeps_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="nodemesh.authz"):
        index = PeerAuthIndex.build([pa("bad", mode="SOMETIMES"), pa("good", mode="STRICT")])
    assert [e.name for e in index.errors] == ["bad"]
    assert index.resolve(SERVER, 1).policy == PolicyRef("foo", "good")
    assert any(
        "peerauth.policy_rejected policy=foo/bad field=spec.mtls.mode" in r.getMessage()
        for r in caplog.records
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(["STRICT", "80", "UNSET"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["mtls", "mode", "selector", "matchLabels", "portLevelMtls", "80", "x"]),
            children,
            max_size=3,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(spec=json_values, created=st.one_of(st.none(), st.text(max_size=25), st.integers()))
def test_resolver_never_raises_anything_but_policy_compile_error(spec: Any, created: Any) -> None:
    body = {"metadata": {"name": "fuzz", "creationTimestamp": created}, "spec": spec}
    obj = PolicyObject.of("PeerAuthentication", "foo", "fuzz", body)
    try:
        compiled = compile_peer_authentication(obj)
    except PolicyCompileError as exc:
        assert exc.name == "fuzz" and exc.field_path
        return
    decision = PeerAuthIndex([compiled]).resolve(SERVER, 80)
    assert decision.mode is not MtlsMode.UNSET


@pytest.mark.parametrize("created", ["", "yesterday"])
def test_an_unreadable_creation_timestamp_only_loses_the_policys_age(created: str) -> None:
    """The timestamp only orders policies of one level. A STRICT whose timestamp cannot be read was
    left out (plaintext then admitted); now it counts, ordered after the dated ones."""
    older = pa("older", mode="PERMISSIVE", selector=APP, created="2020-01-01T00:00:00Z")
    index = PeerAuthIndex.build([pa("undated", mode="STRICT", selector=APP, created=created), older])
    assert index.errors == ()
    assert index.resolve(SERVER, 5432).policy == PolicyRef("foo", "older")  # the dated one is older
    alone = PeerAuthIndex.build([pa("undated", mode="STRICT", selector=APP, created=created)])
    assert alone.resolve(SERVER, 5432).mode is MtlsMode.STRICT
