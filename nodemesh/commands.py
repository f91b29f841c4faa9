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
    from nodemesh.node_cli import (
        certs_command,
        conns_command,
        flows_command,
        metrics_command,
        policies_command,
        policy_app,
        services_command,
        status_command,
        workloads_command,
    )

    app.command("doctor")(doctor_command)
    app.add_typer(lab_app, name="lab")
    app.add_typer(controller_app, name="controller")
    app.command("apply")(apply_command)
    app.command("get")(get_command)
    app.add_typer(agent_app, name="agent")
    app.command("uninstall")(uninstall_command)
    app.command("status")(status_command)
    app.command("workloads")(workloads_command)
    app.command("services")(services_command)
    app.command("certs")(certs_command)
    app.command("policies")(policies_command)
    app.command("conns")(conns_command)
    app.command("flows")(flows_command)
    app.command("metrics")(metrics_command)
    app.add_typer(policy_app, name="policy")
