"""`nodemesh apply`: what it prints for the controller's Apply answer, and its exit status."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from nodemesh import client_cli
from nodemesh.cli import app

WARNING = (
    "http.yaml:1: AuthorizationPolicy shop/p: nodemesh enforces at L4 and does not support HTTP "
    "attributes (found: methods). ..."
)


def run_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errors: list[str], warnings: list[str]
) -> tuple[int, str, str]:
    async def fake_apply(
        conn: client_cli.Connection, filename: str, text: str
    ) -> tuple[list[str], list[str]]:
        assert (conn.address, conn.token, filename) == ("127.0.0.1:1", "tok", "http.yaml")
        return errors, warnings

    monkeypatch.setattr(client_cli, "_call_apply", fake_apply)
    (tmp_path / "ca.pem").write_text("ca")
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "http.yaml").write_text("kind: AuthorizationPolicy\n")
    args = ["apply", "-f", str(tmp_path / "http.yaml"), "--controller", "127.0.0.1:1"]
    args += ["--ca", str(tmp_path / "ca.pem"), "--token-file", str(tmp_path / "token")]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def test_apply_prints_warnings_on_stderr_and_still_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_apply(tmp_path, monkeypatch, [], [WARNING])
    assert (code, out, err) == (0, "applied http.yaml\n", f"warning: {WARNING}\n")


def test_apply_without_warnings_prints_nothing_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_apply(tmp_path, monkeypatch, [], []) == (0, "applied http.yaml\n", "")


def test_apply_with_errors_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_apply(tmp_path, monkeypatch, ["http.yaml:1: bad"], [])
    assert (code, out, err) == (1, "", "error: http.yaml:1: bad\n")
