"""The `nodemesh` command line: one Typer app that mounts each component's sub-commands."""

from __future__ import annotations

import typer

from nodemesh.commands import register

app = typer.Typer(
    name="nodemesh",
    help="nodemesh: a sidecarless service mesh with eBPF redirection and HBONE mTLS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
