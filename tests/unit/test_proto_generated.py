"""The committed `api/v1` stubs are what `python -m api.generate` produces from the .proto."""

from __future__ import annotations

from pathlib import Path

from api.generate import REPO_ROOT, generate


def test_regenerated_stubs_match_committed_files(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert len(generated) == 4
    for path in generated:
        committed = REPO_ROOT / "api" / "v1" / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run python -m api.generate"
