"""Which sub-commands the `nodemesh` CLI has; each lives beside the code it drives."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from agent.cli import app as agent_app
    from agent.cli import uninstall_command
    from controller.cli import app as controller_app
    from nodemesh.client_cli import apply_command, get_command
    from nodemesh.doctor import doctor_command
    from nodemesh.lab.cli import app as lab_app

    app.command("doctor")(doctor_command)
    app.add_typer(lab_app, name="lab")
    app.add_typer(controller_app, name="controller")
    app.command("apply")(apply_command)
    app.command("get")(get_command)
    app.add_typer(agent_app, name="agent")
    app.command("uninstall")(uninstall_command)
