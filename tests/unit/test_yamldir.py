"""The YAML directory source: parsing, per-file last-good, error locations, Apply writes, the watcher."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.registry import MeshState
from controller.sources.yamldir import YamlDirectorySource, parse_text

POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels: {{app: web}}
spec:
  nodeName: node1
  serviceAccountName: web
status:
  podIP: {ip}
"""

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: shop
spec:
  action: {action}
  rules: [{{}}]
"""


SECRET = """\
apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: nodemesh-system}}
type: nodemesh.io/node-token
stringData: {{node: {node}, token: sEcReTsEcReTsEcReT}}
"""
TWO_NODES_ONE_TOKEN = (
    SECRET.format(name="n1", node="node1") + "---\n" + SECRET.format(name="n2", node="node2")
)

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec: {{clusterIP: 10.96.0.10, selector: {{app: {name}}}, ports: [{{port: 80}}]}}
"""


def policy(name: str = "p", action: str = "ALLOW") -> str:
    return POLICY.format(name=name, action=action)


def pod(name: str = "web-1", ip: str = "10.1.0.2") -> str:
    return POD.format(name=name, ip=ip)


class Changes:
    """An on_change handler that records states."""

    def __init__(self) -> None:
        self.states: list[MeshState] = []

    def __call__(self, state: MeshState) -> None:
        self.states.append(state)


def source(tmp_path: Path, **files: str) -> tuple[YamlDirectorySource, Changes]:
    for name, text in files.items():
        (tmp_path / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name.replace("__", "/")).write_text(text)
    changes = Changes()
    return YamlDirectorySource(tmp_path, changes), changes


# --- parse_text ----------------------------------------------------------------------------------


def test_multi_document_files_with_empty_documents() -> None:
    parsed = parse_text(f"---\n{pod()}---\n---\n{policy()}", "a.yaml")
    assert parsed.errors == ()
    assert [(o.key, o.line) for o in parsed.objects] == [
        ("Pod/shop/web-1", 2),
        ("AuthorizationPolicy/shop/p", 15),
    ]


def test_error_points_at_the_field_line() -> None:
    text = pod() + "---\n" + policy(action="NOPE")
    parsed = parse_text(text, "shop.yaml")
    assert [str(e) for e in parsed.errors] == [
        "shop.yaml:19: AuthorizationPolicy shop/p: spec.action: "
        "Input should be 'ALLOW', 'DENY', 'AUDIT' or 'CUSTOM' (got 'NOPE')"
    ]


def test_a_pod_whose_identity_cannot_be_formed_is_an_error_at_its_line() -> None:
    parsed = parse_text(pod().replace("serviceAccountName: web", "serviceAccountName: web app"), "odd.yaml")
    assert parsed.objects == ()
    assert [str(e).split(" cannot")[0] for e in parsed.errors] == [
        "odd.yaml:9: Pod shop/web-1: spec.serviceAccountName: 'web app'"
    ]


def test_yaml_syntax_error_has_line_and_column() -> None:
    parsed = parse_text(pod() + "---\nkind: [unclosed\n", "bad.yaml")
    assert parsed.objects == ()
    [error] = parsed.errors
    assert error.file == "bad.yaml" and error.line == 14
    assert str(error).startswith("bad.yaml:14: YAML:")


def test_duplicate_keys_and_duplicate_objects_are_errors() -> None:
    dup_key = parse_text("apiVersion: v1\nkind: Pod\nkind: Pod\n", "k.yaml")
    assert "duplicate key 'kind'" in str(dup_key.errors[0])
    assert dup_key.errors[0].line == 3
    dup_obj = parse_text(policy() + "---\n" + policy(action="DENY"), "d.yaml")
    assert [str(e) for e in dup_obj.errors] == [
        "d.yaml:10: AuthorizationPolicy shop/p: duplicate object: already defined at line 1 of this file"
    ]


def test_timestamps_stay_strings_and_non_json_values_are_errors() -> None:
    text = policy().replace(
        "  namespace: shop\n", "  namespace: shop\n  creationTimestamp: 2024-01-01T00:00:00Z\n"
    )
    [obj] = parse_text(text, "t.yaml").objects
    assert obj.body["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"
    binary = parse_text(policy().replace("action: ALLOW", "action: !!binary aGVsbG8="), "b.yaml")
    assert "not representable as JSON" in str(binary.errors[0])


def test_non_mesh_kinds_are_errors_with_the_object_named() -> None:
    parsed = parse_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n", "x.yaml"
    )
    assert str(parsed.errors[0]).startswith("x.yaml:2: Deployment shop/web: kind: unknown kind 'Deployment'")


# --- the directory -------------------------------------------------------------------------------


def test_load_reads_yaml_files_recursively_and_ignores_the_rest(tmp_path: Path) -> None:
    src, changes = source(
        tmp_path,
        **{
            "a.yaml": pod(),
            "sub__b.yml": policy(),
            "notes.txt": "kind: nonsense",
            ".hidden.yaml": "kind: nonsense",
            "..data__c.yaml": "kind: nonsense",  # a ConfigMap mount's timestamped dir
        },
    )
    state = src.load()
    assert src.errors() == []
    assert set(state.workloads) == {"Workload/shop/web-1"}
    assert set(state.policies) == {"AuthorizationPolicy/shop/p"}
    assert changes.states == []  # load() does not call on_change


def test_a_broken_file_keeps_its_last_good_version_and_spares_the_others(tmp_path: Path) -> None:
    src, changes = source(tmp_path, **{"pods.yaml": pod(), "policy.yaml": policy()})
    src.load()
    (tmp_path / "policy.yaml").write_text(policy(action="DENY") + "---\nkind: [broken\n")
    (tmp_path / "pods.yaml").write_text(pod() + "---\n" + pod("web-2", "10.1.0.3"))
    src._refresh(notify=True)
    state = src.state
    assert set(state.workloads) == {"Workload/shop/web-1", "Workload/shop/web-2"}
    assert state.policies["AuthorizationPolicy/shop/p"].body["spec"]["action"] == "ALLOW"
    assert [e.file for e in src.errors()] == ["policy.yaml"]
    assert len(changes.states) == 1
    # Fixing the file puts the new version in force and clears the error.
    (tmp_path / "policy.yaml").write_text(policy(action="DENY"))
    src._refresh(notify=True)
    assert src.errors() == []
    assert src.state.policies["AuthorizationPolicy/shop/p"].body["spec"]["action"] == "DENY"


def test_a_file_invalid_from_the_start_contributes_nothing(tmp_path: Path) -> None:
    src, _ = source(tmp_path, **{"a.yaml": pod() + "---\n" + policy(action="NOPE")})
    state = src.load()
    assert state.workloads == {} and state.policies == {}
    assert [e.field for e in src.errors()] == ["spec.action"]


def test_the_same_object_in_two_files_keeps_the_first_file(tmp_path: Path) -> None:
    src, _ = source(
        tmp_path, **{"a.yaml": policy(action="ALLOW"), "b.yaml": policy(action="DENY") + "---\n" + pod()}
    )
    state = src.load()
    assert state.policies["AuthorizationPolicy/shop/p"].body["spec"]["action"] == "ALLOW"
    assert state.workloads == {}  # b.yaml is invalid as a whole (never had a good version)
    assert [str(e) for e in src.errors()] == [
        "b.yaml:1: AuthorizationPolicy shop/p: duplicate object: already defined by "
        "AuthorizationPolicy shop/p in a.yaml:1"
    ]


def test_the_same_node_token_twice_is_refused_without_printing_it(tmp_path: Path) -> None:
    secret = (
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: nodemesh-system}}\n"
        "type: nodemesh.io/node-token\nstringData: {{node: {node}, token: sEcReTsEcReTsEcReT}}\n"
    )
    src, _ = source(
        tmp_path,
        **{
            "a.yaml": secret.format(name="n1", node="node1"),
            "b.yaml": secret.format(name="n2", node="node2"),
        },
    )
    state = src.load()
    assert state.node_tokens == {"sEcReTsEcReTsEcReT": "node1"}
    [error] = src.errors()
    assert error.file == "b.yaml" and "node token" in error.message and "sEcReT" not in str(error)


def test_the_same_node_token_twice_in_one_file_makes_the_file_invalid(tmp_path: Path) -> None:
    """Dropping the second Secret silently would let node2's agent authenticate as node1."""
    src, _ = source(tmp_path, **{"nodes.yaml": SECRET.format(name="n1", node="node1")})
    assert src.load().node_tokens == {"sEcReTsEcReTsEcReT": "node1"}
    (tmp_path / "nodes.yaml").write_text(TWO_NODES_ONE_TOKEN)
    src._refresh(notify=True)
    assert src.state.node_tokens == {"sEcReTsEcReTsEcReT": "node1"}  # the last good version stays
    assert [str(e) for e in src.errors()] == [
        "nodes.yaml:7: Secret nodemesh-system/n2: duplicate node token (the same token value): "
        "already defined by Secret nodemesh-system/n1 at line 1 of this file"
    ]


def test_two_services_with_one_cluster_ip_are_a_duplicate_at_the_later_one(tmp_path: Path) -> None:
    """Kubernetes never admits it, and agents would disagree on which Service the VIP is."""
    src, _ = source(tmp_path, **{"a.yaml": SERVICE.format(name="cart"), "b.yaml": SERVICE.format(name="pay")})
    assert set(src.load().services) == {"Service/shop/cart"}
    assert [str(e) for e in src.errors()] == [
        "b.yaml:1: Service shop/pay: duplicate clusterIP 10.96.0.10: already defined by "
        "Service shop/cart in a.yaml:1"
    ]
    in_one_file = parse_text(SERVICE.format(name="cart") + "---\n" + SERVICE.format(name="pay"), "c.yaml")
    assert [(e.line, e.obj) for e in in_one_file.errors] == [(6, "Service shop/pay")]
    assert "duplicate clusterIP 10.96.0.10" in in_one_file.errors[0].message


def test_removed_files_remove_their_objects(tmp_path: Path) -> None:
    src, changes = source(tmp_path, **{"a.yaml": pod(), "b.yaml": policy()})
    src.load()
    (tmp_path / "b.yaml").unlink()
    src._refresh(notify=True)
    assert src.state.policies == {} and len(changes.states) == 1


def test_rescan_without_changes_does_not_notify(tmp_path: Path) -> None:
    src, changes = source(tmp_path, **{"a.yaml": pod()})
    src.load()
    (tmp_path / "a.yaml").write_text(pod())  # same content
    src._refresh(notify=True)
    assert changes.states == []


def test_a_missing_directory_keeps_the_state(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "a.yaml").write_text(pod())
    src = YamlDirectorySource(config, Changes())
    src.load()
    (config / "a.yaml").unlink()
    config.rmdir()
    src._refresh(notify=True)
    assert set(src.state.workloads) == {"Workload/shop/web-1"}
    assert "missing" in str(src.errors()[0])


def refuse_to_list(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """`os.scandir(directory)` fails as it does for a controller not running as root on a directory
    it may not list (EACCES), or for anyone on EIO: as root, chmod would not stop us."""
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path) == directory:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unlistable_config_directory_keeps_the_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = source(tmp_path, **{"a.yaml": pod()})
    src.load()
    refuse_to_list(monkeypatch, tmp_path)
    src._refresh(notify=True)
    assert set(src.state.workloads) == {"Workload/shop/web-1"}  # not an empty mesh
    assert [str(e) for e in src.errors()] == [
        f"{tmp_path}: cannot list the config directory: Permission denied"
    ]
    monkeypatch.undo()
    (tmp_path / "a.yaml").unlink()
    src._refresh(notify=True)
    assert (src.state.workloads, src.errors()) == ({}, [])


def test_an_unlistable_subdirectory_keeps_its_files_and_spares_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = source(tmp_path, **{"a.yaml": pod(), "team__b.yaml": pod("web-2", "10.1.0.3")})
    src.load()
    refuse_to_list(monkeypatch, tmp_path / "team")
    (tmp_path / "a.yaml").write_text(pod(ip="10.1.0.9"))
    src._refresh(notify=True)
    assert set(src.state.workloads) == {"Workload/shop/web-1", "Workload/shop/web-2"}
    assert src.state.workloads["Workload/shop/web-1"].ips == ("10.1.0.9",)  # other files still apply
    assert [str(e) for e in src.errors()] == ["team: cannot list: Permission denied"]
    monkeypatch.undo()
    (tmp_path / "team" / "b.yaml").unlink()  # once listable again, the directory counts as it is
    src._refresh(notify=True)
    assert (set(src.state.workloads), src.errors()) == ({"Workload/shop/web-1"}, [])


def test_unreadable_bytes_are_reported(tmp_path: Path) -> None:
    src, _ = source(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe kind")
    src.load()
    assert "not UTF-8" in str(src.errors()[0])


# --- write_objects (Admin/Apply) -----------------------------------------------------------------


def test_write_objects_writes_valid_files_and_notifies(tmp_path: Path) -> None:
    src, changes = source(tmp_path, **{"pods.yaml": pod()})
    src.load()
    assert src.write_objects("policy.yaml", policy()).errors == ()
    assert (tmp_path / "policy.yaml").read_text() == policy()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    assert set(changes.states[-1].policies) == {"AuthorizationPolicy/shop/p"}
    # Replacing a file with the same objects is allowed (no duplicate with itself).
    assert src.write_objects("policy.yaml", policy(action="DENY")).errors == ()
    assert src.state.policies["AuthorizationPolicy/shop/p"].body["spec"]["action"] == "DENY"


def test_write_objects_refuses_invalid_text_and_writes_nothing(tmp_path: Path) -> None:
    src, changes = source(tmp_path, **{"a.yaml": policy()})
    src.load()
    errors = src.write_objects("new.yaml", policy(name="q", action="NOPE")).errors
    assert [(e.file, e.obj, e.field) for e in errors] == [
        ("new.yaml", "AuthorizationPolicy shop/q", "spec.action")
    ]
    assert [str(e) for e in src.write_objects("dup.yaml", policy()).errors] == [
        "dup.yaml:1: AuthorizationPolicy shop/p: duplicate object: already defined by "
        "AuthorizationPolicy shop/p in a.yaml:1"
    ]
    assert "YAML" in str(src.write_objects("broken.yaml", "a: [").errors[0])
    for bad_name in ("../x.yaml", ".hidden.yaml", "x.json", ""):
        assert "NAME.yaml" in str(src.write_objects(bad_name, policy(name="z")).errors[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml"]
    assert changes.states == []


def test_write_objects_refuses_control_characters_in_the_file_name(tmp_path: Path) -> None:
    src, _ = source(tmp_path)
    src.load()
    for bad_name in ("a\x00.yaml", "a\n.yaml", "a\x7f.yaml"):  # a NUL used to raise ValueError
        assert "NAME.yaml" in str(src.write_objects(bad_name, policy()).errors[0])
    assert list(tmp_path.iterdir()) == []


def test_write_objects_refuses_the_same_node_token_twice_in_one_file(tmp_path: Path) -> None:
    src, _ = source(tmp_path)
    src.load()
    [error] = src.write_objects("nodes.yaml", TWO_NODES_ONE_TOKEN).errors
    assert error.line == 7 and "duplicate node token" in error.message and "sEcReT" not in str(error)
    assert list(tmp_path.iterdir()) == []


def test_write_objects_checks_duplicates_against_files_not_scanned_yet(tmp_path: Path) -> None:
    """b.yaml was written a moment ago (the watcher's debounce; or the 10 s resync where inotify
    sees nothing, NFS...): Apply must see it, not accept a.yaml and leave b.yaml's DENY in error."""
    src, changes = source(tmp_path)
    src.load()
    (tmp_path / "b.yaml").write_text(policy(action="DENY"))
    [error] = src.write_objects("a.yaml", policy(action="ALLOW")).errors
    assert str(error) == (
        "a.yaml:1: AuthorizationPolicy shop/p: duplicate object: already defined by "
        "AuthorizationPolicy shop/p in b.yaml:1"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yaml"]
    assert src.errors() == []
    # what the rescan found is in force, and on_change was told
    assert changes.states[-1].policies["AuthorizationPolicy/shop/p"].body["spec"]["action"] == "DENY"


# --- the watcher ---------------------------------------------------------------------------------


async def test_watcher_applies_a_file_change_within_a_second(tmp_path: Path) -> None:
    src, changes = source(tmp_path, **{"a.yaml": policy()})
    src.load()
    task = asyncio.create_task(src.run())
    try:
        await asyncio.sleep(0.2)  # let the watcher start (a change before that is found by its first scan)
        start = time.monotonic()
        (tmp_path / "a.yaml").write_text(policy(action="DENY"))
        while not any(
            s.policies["AuthorizationPolicy/shop/p"].body["spec"]["action"] == "DENY" for s in changes.states
        ):
            assert time.monotonic() - start < 1.0, "change not applied within 1 s"
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        stopped = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - stopped < 1.0  # cancelling stops the watcher thread promptly


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "controller"
    src = YamlDirectorySource(example, Changes())
    state = src.load()
    assert src.errors() == []
    assert set(state.node_tokens.values()) == {"node1", "node2"}
    assert state.workloads["Workload/shop/legacy"].protocol.value == "NONE"
    assert state.services["Service/shop/web"].endpoints[0].workload_uid == "shop/web-1"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abk:- \n[]{}'\"#&*!|>%@`,?0123456789.")), max_size=120))
def test_parse_text_never_raises_on_garbage(text: str) -> None:
    parsed = parse_text(text, "g.yaml")
    assert all(e.file == "g.yaml" for e in parsed.errors)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=12,
    )
)
def test_parse_text_never_raises_on_arbitrary_documents(doc: object) -> None:
    import yaml

    parse_text(yaml.safe_dump(doc) + "---\n" + yaml.safe_dump({"kind": "Pod", "metadata": doc}), "h.yaml")


def test_alias_bombs_and_deep_nesting_are_errors() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = parse_text("\n".join(lines) + "\n", "bomb.yaml")
    assert "aliases are expanded" in str(bomb.errors[0])
    deep = parse_text("[" * 5000 + "]" * 5000, "deep.yaml")
    assert deep.errors and deep.objects == ()


# --- warnings (AuthorizationPolicy with HTTP attributes) ----------------------------------------

HTTP_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  action: {action}
  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]
"""


def config_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("config.warning ")]


def test_write_objects_returns_the_warnings_of_what_it_wrote(tmp_path: Path) -> None:
    src, _ = source(tmp_path)
    src.load()
    result = src.write_objects("http.yaml", HTTP_POLICY.format(name="h", action="DENY") + "---\n" + policy())
    assert result.errors == ()
    assert [(w.file, w.obj) for w in result.warnings] == [("http.yaml", "AuthorizationPolicy shop/h")]
    assert "(found: methods)" in str(result.warnings[0])
    assert "DENY policy with HTTP attributes is enforced without the HTTP rules" in str(result.warnings[0])
    assert src.write_objects("l4.yaml", policy(name="l4")).warnings == ()


def test_a_policy_with_http_attributes_is_logged_once_per_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="nodemesh")
    src, _ = source(tmp_path, **{"a.yaml": HTTP_POLICY.format(name="h", action="ALLOW") + "---\n" + policy()})
    src.load()
    [line] = config_warnings(caplog)
    assert line.startswith("config.warning a.yaml:1: AuthorizationPolicy shop/h: nodemesh enforces at L4")
    assert "Within an ALLOW policy, rules matching HTTP attributes are omitted" in line
    # Rescans (another file changes; the same file rewritten; the other object of its file edited)
    # do not repeat it, nor does the agents' compile-time note appear in the controller's log.
    (tmp_path / "b.yaml").write_text(pod())
    src.load()
    (tmp_path / "a.yaml").write_text(HTTP_POLICY.format(name="h", action="ALLOW") + "---\n" + policy())
    src.load()
    (tmp_path / "a.yaml").write_text(
        HTTP_POLICY.format(name="h", action="ALLOW") + "---\n" + policy(action="DENY")
    )
    src.load()
    assert len(config_warnings(caplog)) == 1
    assert not [r for r in caplog.records if "authz.rule_degraded" in r.getMessage()]
    # A new version of the policy is warned about again.
    (tmp_path / "a.yaml").write_text(HTTP_POLICY.format(name="h", action="DENY"))
    src.load()
    assert len(config_warnings(caplog)) == 2
    assert "DENY policy with HTTP attributes" in config_warnings(caplog)[1]
