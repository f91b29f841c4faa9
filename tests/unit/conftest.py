"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

import agent.cli as cli
from agent.main import AgentOptions


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[AgentOptions]:
    """`nodemesh agent run` parses its arguments but does not start: the options it would run with
    are appended here."""
    got: list[AgentOptions] = []

    async def fake_run(options: AgentOptions, stop: object = None) -> int:
        got.append(options)
        return 0

    monkeypatch.setattr(cli, "run", fake_run)
    monkeypatch.setattr(cli, "configure_logging", lambda *a: None)
    return got
