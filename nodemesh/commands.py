"""Which sub-commands the `nodemesh` CLI has; each lives beside the code it drives."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from nodemesh.doctor import doctor_command
    from nodemesh.lab.cli import app as lab_app

    app.command("doctor")(doctor_command)
    app.add_typer(lab_app, name="lab")
