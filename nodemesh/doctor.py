"""`nodemesh doctor`: checks that this machine can run a nodemesh node (placeholder until built)."""

from __future__ import annotations

import typer


def doctor_command() -> None:
    """Check the requirements of a nodemesh node, one line each."""
    typer.echo("doctor: not implemented yet")
    raise typer.Exit(1)
