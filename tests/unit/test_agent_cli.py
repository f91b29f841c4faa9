"""`nodemesh agent run` argument checks that happen before anything is started."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.main import AgentOptions
from nodemesh.cli import app


def invoke(tmp_path: Path, *extra: str) -> tuple[int, str]:
    (tmp_path / "cg").mkdir(exist_ok=True)
    argv = ["agent", "run", "--node", "n1", "--controller", "127.0.0.1:15012",
            "--token", str(tmp_path / "tok"), "--ca", str(tmp_path / "ca.pem"),
            "--pod-cgroup", str(tmp_path / "cg"), "--event-loop", "asyncio", *extra]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    return result.exit_code, result.output


def test_connection_caps_default_to_10000_and_half_of_it(tmp_path: Path, seen: list[AgentOptions]) -> None:
    code, out = invoke(tmp_path)
    assert code == 0, out
    assert (seen[0].max_connections, seen[0].max_connections_per_source) == (10_000, None)


def test_connection_caps_are_passed_to_the_agent(tmp_path: Path, seen: list[AgentOptions]) -> None:
    code, out = invoke(tmp_path, "--max-connections", "400", "--max-connections-per-source", "400")
    assert code == 0, out
    assert (seen[0].max_connections, seen[0].max_connections_per_source) == (400, 400)


def test_the_hbone_receive_budget_defaults_to_1_gib_and_is_passed_on(
    tmp_path: Path, seen: list[AgentOptions]
) -> None:
    assert invoke(tmp_path)[0] == 0
    assert invoke(tmp_path, "--max-hbone-queued-mib", "64")[0] == 0
    assert [o.max_hbone_queued for o in seen] == [1024 * 1024 * 1024, 64 * 1024 * 1024]


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        (("--max-hbone-queued-mib", "15"), "--max-hbone-queued-mib"),
        (("--max-hbone-queued-mib", "lots"), "--max-hbone-queued-mib"),
        (("--max-connections", "0"), "--max-connections"),
        (("--max-connections", "-5"), "--max-connections"),
        (("--max-connections", "many"), "--max-connections"),
        (("--max-connections-per-source", "0"), "--max-connections-per-source"),
        (("--max-connections", "100", "--max-connections-per-source", "101"), "more than --max-connections"),
        (("--max-connections-per-source", "10001"), "more than --max-connections (10000)"),
    ],
)
def test_bad_connection_caps_are_refused_before_anything_starts(
    tmp_path: Path, seen: list[AgentOptions], extra: tuple[str, ...], complaint: str
) -> None:
    code, out = invoke(tmp_path, *extra)
    assert code == 2 and not seen
    said = " ".join(out.replace("│", " ").split())  # rich wraps it in a box
    assert "Invalid value for" in said and complaint in said, out
