"""`nodemesh apply -f FILE` and `nodemesh get KIND`: the controller's Admin API from the command line.

Connection flags default to the lab state file (/run/nodemesh/lab/lab.json: keys `controller`,
`ca`, `admin_token_file`) when present.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import grpc
import typer

from api.convert import from_proto
from api.resources import PolicyObject
from api.v1 import nodemesh_pb2 as pb
from api.v1 import nodemesh_pb2_grpc as pb_grpc

LAB_STATE = Path("/run/nodemesh/lab/lab.json")
KINDS = ("Workload", "Service", "AuthorizationPolicy", "PeerAuthentication", "HTTPRoute")

app = typer.Typer(help="Talk to the controller's Admin API.")

ControllerOpt = Annotated[str | None, typer.Option("--controller", help="HOST:PORT of the controller")]
CaOpt = Annotated[Path | None, typer.Option("--ca", help="CA bundle (the controller's ca.pem)")]
TokenOpt = Annotated[Path | None, typer.Option("--token-file", help="File holding the admin token")]


@dataclass(frozen=True, slots=True)
class Connection:
    address: str
    ca_pem: bytes
    token: str


def resolve_connection(
    controller: str | None, ca: Path | None, token_file: Path | None, lab_state: Path = LAB_STATE
) -> Connection:
    """Flags first, then the lab state file; a clear error naming what is missing otherwise."""
    lab: dict[str, str] = {}
    if lab_state.is_file():
        try:
            lab = json.loads(lab_state.read_text())
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"{lab_state} is not valid JSON: {exc}") from exc
    address = controller or lab.get("controller")
    ca_path = ca or (Path(lab["ca"]) if "ca" in lab else None)
    token_path = token_file or (Path(lab["admin_token_file"]) if "admin_token_file" in lab else None)
    missing = [
        flag
        for flag, value in (("--controller", address), ("--ca", ca_path), ("--token-file", token_path))
        if value is None
    ]
    if missing or address is None or ca_path is None or token_path is None:
        raise typer.BadParameter(f"missing {', '.join(missing)} (and no lab state at {lab_state})")
    try:
        return Connection(address, ca_path.read_bytes(), token_path.read_text().strip())
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {exc.filename}: {exc.strerror}") from exc


def enter_lab_netns(controller: str | None, lab_state: Path = LAB_STATE) -> None:
    """In the lab the controller listens inside the underlay netns: re-run this command there.

    Only when the address comes from the lab state (no --controller flag) and this process is not
    in that netns yet. gRPC opens its sockets from its own threads, so the whole process must move;
    `nsenter --net` keeps the mount namespace, so files and paths stay the same.
    """
    if controller is not None or not lab_state.is_file():
        return
    try:
        netns = json.loads(lab_state.read_text()).get("controller_netns")
    except (OSError, json.JSONDecodeError):
        return
    if not netns:
        return
    try:
        if os.stat("/proc/self/ns/net").st_ino == os.stat(netns).st_ino:
            return
    except OSError as exc:
        raise typer.BadParameter(f"lab controller netns {netns}: {exc.strerror}; is the lab up?") from exc
    os.execvp(
        "nsenter", ["nsenter", f"--net={netns}", "--", sys.executable, "-m", "nodemesh.cli", *sys.argv[1:]]
    )


async def _call_apply(conn: Connection, filename: str, text: str) -> tuple[list[str], list[str]]:
    """Admin/Apply: (errors, warnings); no errors means the file was applied."""
    async with grpc.aio.secure_channel(conn.address, grpc.ssl_channel_credentials(conn.ca_pem)) as channel:
        response = await pb_grpc.AdminStub(channel).Apply(
            pb.ApplyRequest(filename=filename, yaml=text),
            metadata=(("authorization", f"Bearer {conn.token}"),),
        )
    return list(response.errors), list(response.warnings)


async def _call_list(conn: Connection, kind: str) -> list[pb.Resource]:
    async with grpc.aio.secure_channel(conn.address, grpc.ssl_channel_credentials(conn.ca_pem)) as channel:
        response = await pb_grpc.AdminStub(channel).List(
            pb.ListRequest(kind=kind), metadata=(("authorization", f"Bearer {conn.token}"),)
        )
    return list(response.resources)


def _rpc_error(exc: grpc.aio.AioRpcError) -> typer.Exit:
    typer.echo(f"error: controller said {exc.code().name}: {exc.details()}", err=True)
    return typer.Exit(1)


@app.command("apply")
def apply_command(
    file: Annotated[Path, typer.Option("-f", "--file", help="YAML file with one or more objects")],
    controller: ControllerOpt = None,
    ca: CaOpt = None,
    token_file: TokenOpt = None,
) -> None:
    """Send FILE to the controller; it is stored under the same file name in the config directory."""
    enter_lab_netns(controller)
    conn = resolve_connection(controller, ca, token_file)
    try:
        text = file.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {file}: {exc.strerror}", param_hint="-f") from exc
    try:
        errors, warnings = asyncio.run(_call_apply(conn, file.name, text))
    except grpc.aio.AioRpcError as exc:
        raise _rpc_error(exc) from exc
    for err in errors:
        typer.echo(f"error: {err}", err=True)
    for warning in warnings:  # applied all the same: the exit status stays 0
        typer.echo(f"warning: {warning}", err=True)
    if errors:
        raise typer.Exit(1)
    typer.echo(f"applied {file.name}")


@app.command("get")
def get_command(
    kind: Annotated[str, typer.Argument(help=f"One of {', '.join(KINDS)}")],
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
    controller: ControllerOpt = None,
    ca: CaOpt = None,
    token_file: TokenOpt = None,
) -> None:
    """List resources of KIND known to the controller."""
    if kind not in KINDS:
        raise typer.BadParameter(f"unknown kind {kind!r}; one of {', '.join(KINDS)}", param_hint="KIND")
    if output not in ("table", "json"):
        raise typer.BadParameter("want table or json", param_hint="-o")
    enter_lab_netns(controller)
    conn = resolve_connection(controller, ca, token_file)
    try:
        items = asyncio.run(_call_list(conn, kind))
    except grpc.aio.AioRpcError as exc:
        raise _rpc_error(exc) from exc
    if output == "json":
        rows = []
        for msg in items:
            key, version, res = from_proto(msg)
            body = (
                res.body if isinstance(res, PolicyObject) else json.loads(json.dumps(res, default=_jsonable))
            )
            rows.append({"key": key, "version": version, "object": body})
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    typer.echo(f"{'KEY':<60} VERSION")
    for msg in items:
        typer.echo(f"{msg.key:<60} {msg.version}")


def _jsonable(value: object) -> object:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return str(value)
