"""The `controller` Typer app: `nodemesh controller run ...`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from controller.main import RunOptions, configure_logging, run

app = typer.Typer(help="The nodemesh controller (CA, config stream, admin API).", no_args_is_help=True)


@app.command("run")
def run_command(
    config_dir: Annotated[Path, typer.Option("--config-dir", help="Directory of mesh YAML objects")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="CA keys and ca.pem live here")],
    listen: Annotated[str, typer.Option("--listen", help="gRPC HOST:PORT")] = "127.0.0.1:15012",
    trust_domain: Annotated[str, typer.Option("--trust-domain")] = "cluster.local",
    metrics_listen: Annotated[
        str, typer.Option("--metrics-listen", help="HTTP HOST:PORT")
    ] = "127.0.0.1:15014",
    admin_token_file: Annotated[Path | None, typer.Option("--admin-token-file")] = None,
) -> None:
    """Serve Certificates, Config and Admin over TLS until SIGTERM/SIGINT."""
    configure_logging()
    if not config_dir.is_dir():
        raise typer.BadParameter(f"{config_dir} is not a directory", param_hint="--config-dir")
    options = RunOptions(config_dir, state_dir, listen, trust_domain, metrics_listen, admin_token_file)
    try:
        code = asyncio.run(run(options))
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)
