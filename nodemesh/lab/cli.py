"""`nodemesh lab ...`: the local multi-node lab (placeholder until built)."""

from __future__ import annotations

import typer

app = typer.Typer(help="A local multi-node mesh in network namespaces.", no_args_is_help=True)


@app.command("status")
def status() -> None:
    """Show the lab."""
    typer.echo("no lab")
