"""The node CLI: `nodemesh status|workloads|services|certs|policies|conns|flows|metrics|policy explain`.

Each command asks the local agent's admin API (HTTP/1.1 over `/run/nodemesh/<node>/admin.sock`,
root-only) and prints a table for people or, with `-o json`, the API's JSON for scripts
(`flows -o json` prints one JSON object per line, as `hubble observe -o json` does).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlencode

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from agent.admin.client import error_message
from agent.admin.paths import admin_socket_path, node_sockets, run_dir

TIMEOUT = 10.0


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


NodeOpt = Annotated[
    str | None,
    typer.Option("--node", "-n", help="Node whose agent to ask (/run/nodemesh/NODE/admin.sock); "
                 "default: the only agent running here"),
]
SocketOpt = Annotated[
    Path | None,
    typer.Option("--socket", help="Admin socket path (overrides --node)", envvar="NODEMESH_ADMIN_SOCKET"),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table for people, json for scripts")]


class CliError(Exception):
    """A problem to report on stderr with exit status 1."""


# --- talking to the agent ------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """A blocking client of one agent's admin API (one request per connection)."""

    def __init__(self, node: str, path: Path, timeout: float | None = TIMEOUT) -> None:
        self.node = node
        self.path = path
        self.timeout = timeout

    def _open(self, target: str, timeout: float | None, stream: bool = False) -> http.client.HTTPResponse:
        conn = _UnixHTTPConnection(self.path, timeout)
        try:
            conn.request("GET", target, headers={"Connection": "close"})
            if stream and conn.sock is not None:
                conn.sock.settimeout(None)  # a follower may wait for hours between flows
            resp = conn.getresponse()
        except FileNotFoundError:
            conn.close()
            raise CliError(f"agent for node {self.node} is not running (no socket at {self.path})") from None
        except ConnectionRefusedError:
            conn.close()
            raise CliError(
                f"agent for node {self.node} is not running (socket at {self.path} refuses connections)"
            ) from None
        except PermissionError:
            conn.close()
            raise CliError(f"permission denied on {self.path}: the admin socket is root-only") from None
        except TimeoutError:
            conn.close()
            raise CliError(f"agent for node {self.node} did not answer within {timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise CliError(f"cannot talk to the agent at {self.path}: {exc}") from None
        if resp.status != 200:
            with contextlib.closing(conn), self._reading(timeout):
                body = resp.read()
            raise CliError(error_message(body, resp.reason))
        return resp

    @contextlib.contextmanager
    def _reading(self, timeout: float | None) -> Iterator[None]:
        """A body that stops coming (the agent stopped or hangs mid-answer) as a CliError: `_open`
        only covers the exchange up to the answer's head."""
        try:
            yield
        except TimeoutError:
            raise CliError(f"agent for node {self.node} stopped mid-answer (silent {timeout:g}s)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"the answer from node {self.node} broke off: {exc}") from None

    @staticmethod
    def _target(path: str, params: dict[str, object]) -> str:
        query = urlencode({k: v for k, v in params.items() if v is not None and v != ""})
        return f"{path}?{query}" if query else path

    def get_json(self, path: str, **params: object) -> Any:
        resp = self._open(self._target(path, params), self.timeout)
        with contextlib.closing(resp):
            with self._reading(self.timeout):
                body = resp.read()
            try:
                return json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise CliError(f"the agent sent invalid JSON for {path}: {exc}") from None

    def get_text(self, path: str) -> str:
        resp = self._open(path, self.timeout)
        with contextlib.closing(resp), self._reading(self.timeout):
            body = resp.read()
        try:
            return body.decode()
        except ValueError as exc:
            raise CliError(f"the agent sent text that is not UTF-8 for {path}: {exc}") from None

    def stream(self, path: str, **params: object) -> Iterator[dict[str, Any]]:
        """Newline-delimited JSON objects until the agent ends the stream."""
        resp = self._open(self._target(path, params), self.timeout, stream=True)
        with contextlib.closing(resp):
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise CliError(f"the stream from node {self.node} broke: {exc}") from None
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except (ValueError, RecursionError) as exc:  # an agent that stopped mid-line, or a bug
                    raise CliError(f"the stream from node {self.node} sent invalid JSON: {exc}") from None
                if not isinstance(item, dict):
                    raise CliError(f"the stream from node {self.node} sent {line[:80]!r}, not an object")
                yield item


def select_client(node: str | None, sock: Path | None) -> AdminClient:
    if sock is not None:
        return AdminClient(node or sock.parent.name, sock)
    if node is not None:
        try:
            return AdminClient(node, admin_socket_path(node))
        except ValueError as exc:
            raise CliError(str(exc)) from None
    found = node_sockets()
    if len(found) == 1:
        ((name, path),) = found.items()
        return AdminClient(name, path)
    if not found:
        raise CliError(f"no nodemesh agent is running here (no {run_dir()}/*/admin.sock); "
                       "start one, or name it with --node")
    raise CliError(f"several agents run here ({', '.join(found)}): choose one with --node")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _console() -> Console:
    # Tables piped to a file keep their full width instead of rich's 80-column default.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=200 if wide else None, highlight=False)


def _print_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, sort_keys=False))


# --- formatting ------------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    """`950ms`, `42s`, `3m12s`, `5h03m`, `2d4h`; negative: `-` prefix (overdue)."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return "-" + fmt_duration(-seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_since(value: str, now: float) -> float:
    """`30s`, `5m`, `2h`, `1d` (ago), or an ISO 8601 time → Unix time."""
    m = _DURATION.match(value.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a duration (30s, 5m, 2h) nor an ISO 8601 time",
                                 param_hint="--since") from None


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, no_wrap=True)
    return table


def _print_table(table: Table) -> None:
    """Cells are never folded (names, identities and addresses stay copyable): a table wider than
    the terminal is printed at its natural width and the terminal wraps the lines, as kubectl does."""
    console = _console()
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    if natural > console.width:
        console = Console(width=natural, highlight=False)
    console.print(table)


# --- commands --------------------------------------------------------------------------------------


def _run(node: str | None, sock: Path | None) -> AdminClient:
    try:
        return select_client(node, sock)
    except CliError as exc:
        _fail(str(exc))


def _get(client: AdminClient, path: str, **params: object) -> Any:
    try:
        return client.get_json(path, **params)
    except CliError as exc:
        _fail(str(exc))


def workers_line(workers: list[dict[str, Any]]) -> tuple[str, bool]:
    """`proxy workers: 2 of 2 up (pids 123, 456), 1 restart`, then what is wrong, if anything (a
    worker down and how it last ended, or up but not answering); and whether nothing is."""
    up = [w for w in workers if w["up"]]
    pids = ", ".join(str(w["pid"]) for w in up if w["pid"] is not None)
    restarts = sum(w["restarts"] for w in workers)
    parts = [f"proxy workers: {len(up)} of {len(workers)} up" + (f" (pids {pids})" if pids else "")
             + f", {restarts} restart{'' if restarts == 1 else 's'}"]
    for w in workers:
        if not w["up"]:
            how = f" (last exit: {w['last_exit']})" if w["last_exit"] else ""
            parts.append(f"worker {w['index']} down{how}")
        elif w["connections"] is None:
            parts.append(f"worker {w['index']} not answering")
    return "; ".join(parts), len(parts) == 1


def status_command(node: NodeOpt = None, sock: SocketOpt = None, output: OutputOpt = Output.TABLE) -> None:
    """Agent, proxy, datapath, controller link, certificates and flow log of this node."""
    doc = _get(_run(node, sock), "/v1/status")
    if output is Output.JSON:
        _print_json(doc)
        return
    proxy, dp, ctl = doc["proxy"], doc["datapath"], doc["controller"]
    certs, flows = doc["certificates"], doc["flows"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("Node", f"{doc['node']}  (agent {doc['version']}, up {fmt_duration(doc['uptime'])}, "
                         f"{doc['enrolled_pods']} pods enrolled)")
    in_use, slots = proxy.get("connection_slots_in_use"), proxy.get("connection_slots")
    proxy_line = (f"{proxy['state']}, {proxy['listeners']} listeners, "
                  f"{proxy['active_connections']} connections"
                  + (f" ({in_use:,} of {slots:,} slots in use)" if slots else "")
                  + f", callers' IPs kept in {proxy['source_ip_pods']}/{proxy['pods']} pods"
                  + (f" ({proxy['detail']})" if proxy["detail"] else ""))
    # yellow from 80% of max_connections on, where examples/monitoring's alert fires
    grid.add_row("Proxy", Text(proxy_line, style="yellow" if slots and in_use >= 0.8 * slots else ""))
    workers = doc.get("workers") or []
    if workers:
        line, healthy = workers_line(workers)
        grid.add_row("", Text(line, style="" if healthy else "yellow"))
    grid.add_row("Datapath", f"{dp['backend']}, {len(dp['programs'])} programs, {len(dp['maps'])} maps, "
                             f"same-node fast path {'on' if dp['fast_path'] else 'off'}"
                             + (f", pins {dp['pin_dir']}" if dp["pin_dir"] else ""))
    for prog in dp["programs"]:
        grid.add_row("", f"program {prog}")
    if dp["counters"]:
        grid.add_row("", "counters " + "  ".join(f"{k}={v}" for k, v in sorted(dp["counters"].items())))
    if ctl["connected"]:
        push = (f"last push {ctl['last_push_version'] or '-'} (nonce {ctl['last_push_nonce'] or '-'}) "
                f"{fmt_duration(ctl['since_last_push'])} ago" if ctl["since_last_push"] is not None
                else "no push yet")
        grid.add_row("Controller", f"connected to {ctl['address']}, {push}")
    else:
        error = f": {ctl['last_error']}" if ctl["last_error"] else ""
        grid.add_row("Controller", Text(f"DISCONNECTED from {ctl['address']}{error}", style="red"))
    grid.add_row("Certificates", f"{certs['count']} ({certs['valid']} valid, {certs['renewing']} renewing, "
                                 f"{certs['expired']} expired, {certs['pending']} pending), next renewal in "
                                 f"{fmt_duration(certs['next_renewal_in'])}")
    grid.add_row("Flows", f"{flows['stored']}/{flows['capacity']} stored, {flows['added']} seen, "
                          f"{flows['followers']} followers, {flows['follower_drops']} dropped by followers")
    _console().print(grid)


def workloads_command(node: NodeOpt = None, sock: SocketOpt = None, output: OutputOpt = Output.TABLE) -> None:
    """Workloads (pods) this agent knows from the controller."""
    rows = _get(_run(node, sock), "/v1/workloads")["workloads"]
    if output is Output.JSON:
        _print_json(rows)
        return
    table = _table("NAMESPACE", "NAME", "NODE", "IP", "SERVICE ACCOUNT", "PROTOCOL")
    for w in rows:
        table.add_row(w["namespace"], w["name"], w["node"], ",".join(w["ips"]) or "-",
                      w["service_account"], w["protocol"])
    _print_table(table)


def services_command(node: NodeOpt = None, sock: SocketOpt = None, output: OutputOpt = Output.TABLE) -> None:
    """Services with their VIP, ports and endpoints."""
    rows = _get(_run(node, sock), "/v1/services")["services"]
    if output is Output.JSON:
        _print_json(rows)
        return
    table = _table("NAMESPACE", "NAME", "VIP", "PORTS", "ENDPOINTS")
    for s in rows:
        ports = ",".join(f"{p['port']}→{p['target_port']}/{p['protocol']}" for p in s["ports"]) or "-"
        eps = ",".join(e["ip"] for e in s["endpoints"]) or "<none>"
        table.add_row(s["namespace"], s["name"], s["vip"] or "-", ports, eps)
    _print_table(table)


def policies_command(node: NodeOpt = None, sock: SocketOpt = None, output: OutputOpt = Output.TABLE) -> None:
    """Policy objects the agent holds, and whether the L4 evaluator accepted them."""
    rows = _get(_run(node, sock), "/v1/policies")["policies"]
    if output is Output.JSON:
        _print_json(rows)
        return
    table = _table("KIND", "NAMESPACE", "NAME", "APPLIES TO", "ACTION/MODE", "RULES", "STATE")
    for p in rows:
        selector = p["selector"]
        applies = ("mesh" if p["scope"] == "mesh" else "namespace") if not selector else ",".join(
            f"{k}={v}" for k, v in selector.items())
        if p["kind"] == "AuthorizationPolicy":
            what = p["action"] + (" (dry-run)" if p["dry_run"] else "")
            rules = str(p["rules"])
        elif p["kind"] == "PeerAuthentication":
            what = p["mode"] + "".join(f" {port}:{mode}" for port, mode in p["port_level"].items())
            rules = "-"
        else:
            what, rules = "-", "-"
            applies = ",".join(p.get("parents", [])) or applies
        state = Text(p["state"], style="" if p["state"] == "active" else "yellow")
        table.add_row(p["kind"], p["namespace"], p["name"], applies, what, rules, state)
    _print_table(table)


def certs_command(node: NodeOpt = None, sock: SocketOpt = None, output: OutputOpt = Output.TABLE) -> None:
    """Workload certificates (SVIDs): serial, issuer, expiry and renewal."""
    doc = _get(_run(node, sock), "/v1/certs")
    rows = doc["certs"]
    _warn_unreachable(doc, "certificates")
    if output is Output.JSON:
        _print_json(rows)
        return
    # proxy workers have certificates of their own: a WORKER column only when they are listed
    by_worker = any(c.get("worker", 0) > 0 for c in rows)
    columns = ["IDENTITY", "SERIAL", "NOT AFTER", "EXPIRES IN", "RENEWS IN", "PODS", "STATE", "ISSUER"]
    table = _table(*(["WORKER", *columns] if by_worker else columns))
    for c in rows:
        not_after = datetime.fromtimestamp(c["not_after"]).strftime("%Y-%m-%d %H:%M:%S")
        state = c["state"] + (f" ({c['last_error']})" if c["last_error"] else "")
        cells = [c["identity"], c["serial"][:16], not_after, fmt_duration(c["expires_in"]),
                 fmt_duration(c["renews_in"]), str(c["pods"]),
                 Text(state, style="" if c["state"] == "valid" else "yellow"), c["issuer"]]
        table.add_row(*([str(c.get("worker", 0)), *cells] if by_worker else cells))
    _print_table(table)


def _warn_unreachable(doc: dict[str, Any], what: str) -> None:
    for index in doc.get("workers_unreachable", []):
        typer.echo(f"warning: proxy worker {index} did not answer: its {what} are not listed", err=True)


def conns_command(node: NodeOpt = None, sock: SocketOpt = None, output: OutputOpt = Output.TABLE) -> None:
    """Live connections through this node's proxy."""
    doc = _get(_run(node, sock), "/v1/connections")
    rows = doc["connections"]
    _warn_unreachable(doc, "connections")
    if output is Output.JSON:
        _print_json(rows)
        return
    # a WORKER column only when proxy workers carry some of the connections
    by_worker = any(c.get("worker", 0) > 0 for c in rows)
    columns = ["SOURCE", "DESTINATION", "ADDRESS", "PATH", "SENT", "RECEIVED", "AGE", "IDENTITY"]
    table = _table(*(["WORKER", *columns] if by_worker else columns))
    for c in rows:
        dest = c["dst_service"] or c["dst_workload"] or "-"
        if c["dst_service"] and c["dst_workload"]:
            dest = f"{c['dst_service']} ({c['dst_workload']})"
        cells = [c["src_pod"] or c["src"], dest, c["dst"], c["path"], fmt_bytes(c["bytes_sent"]),
                 fmt_bytes(c["bytes_received"]), fmt_duration(c["age"]), c["src_identity"] or "-"]
        table.add_row(*([str(c.get("worker", 0)), *cells] if by_worker else cells))
    _print_table(table)


def flow_line(f: dict[str, Any]) -> Text:
    """One flow, `hubble observe` style: time, source -> destination, verdict and why."""
    src = f"{f['src_namespace']}/{f['src_pod']}" if f["src_pod"] else "-"
    dst = f"{f['dst_namespace']}/{f['dst_pod']}" if f["dst_pod"] else "-"
    svc = f" via {f['dst_service']}" if f["dst_service"] else ""
    who = f" [{f['src_identity']}]" if f["src_identity"] else " [plaintext]"
    why = f["reason"] or "-"
    if f["policy"]:
        why += f" {f['policy']}" + (f" rules[{f['rule']}]" if f["rule"] is not None else "")
    extra = ""
    if f["event"] == "close":
        extra = (f" sent {fmt_bytes(f['bytes_sent'])} received {fmt_bytes(f['bytes_received'])}"
                 f" in {fmt_duration(f['duration'])}")
    text = Text(f"{fmt_time(f['time'])} ")
    verdict_style = "green" if f["verdict"] == "allowed" else "bold red"
    text.append(f"{f['event'].upper():<5} ", style=verdict_style)
    text.append(f"{src} ({f['src_ip']}:{f['src_port']}){who} -> {dst} ({f['dst_ip']}:{f['dst_port']}){svc} ")
    text.append(f["verdict"].upper(), style=verdict_style)
    text.append(f" {why}{extra}")
    return text


class VerdictOpt(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"


def flows_command(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new flows")] = False,
    pod: Annotated[str | None, typer.Option("--pod", help="Flows from or to POD (name or ns/name)")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Flows from or to NAMESPACE")] = None,
    verdict: Annotated[VerdictOpt | None, typer.Option("--verdict", help="allowed or denied")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only newer flows: 30s, 5m, 2h or ISO time")]
    = None,
    last: Annotated[int, typer.Option("--last", min=0, help="At most the N newest stored flows")] = 100,
    all_stored: Annotated[bool, typer.Option("--all", help="Every stored flow (overrides --last)")] = False,
    node: NodeOpt = None,
    sock: SocketOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """The node's flow log (every connection with its verdict), like `hubble observe`."""
    client = _run(node, sock)
    params: dict[str, object] = {
        "pod": pod, "namespace": namespace, "verdict": verdict.value if verdict else None,
        "since": parse_since(since, time.time()) if since else None, "last": None if all_stored else last,
    }
    console = _console()

    def show(flow: dict[str, Any]) -> None:
        if output is Output.JSON:
            typer.echo(json.dumps(flow, separators=(",", ":")))
        else:
            console.print(flow_line(flow))

    if not follow:
        for flow in _get(client, "/v1/flows", **params)["flows"]:
            show(flow)
        return
    try:
        for item in client.stream("/v1/flows", follow=1, **params):
            if item["kind"] == "flow":
                show(item["flow"])
            elif item["kind"] == "dropped":
                message = {"dropped": item["count"], "total_dropped": item["total"]}
                typer.echo(json.dumps(message) if output is Output.JSON else
                           f"warning: {item['count']} flows lost (this follower was too slow; "
                           f"{item['total']} in total)", err=True)
            sys.stdout.flush()
    except CliError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        return
    _fail(f"agent for node {client.node} ended the stream (it stopped or restarted)")


def metrics_command(node: NodeOpt = None, sock: SocketOpt = None) -> None:
    """The agent's Prometheus metrics (the same text as :15020/metrics)."""
    client = _run(node, sock)
    try:
        typer.echo(client.get_text("/metrics"), nl=False)
    except CliError as exc:
        _fail(str(exc))


policy_app = typer.Typer(help="Ask how the node proxy's policy decides a connection.", no_args_is_help=True)


@policy_app.command("explain")
def explain_command(
    from_pod: Annotated[str, typer.Option("--from", help="Source pod: NAME, NAMESPACE/NAME or IP")],
    to: Annotated[str, typer.Option("--to", help="POD[:PORT] or SERVICE:PORT (NS/NAME, NAME.NS or IP)")],
    port: Annotated[int | None, typer.Option("--port", help="Destination port (when --to has none)")] = None,
    node: NodeOpt = None,
    sock: SocketOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Which AuthorizationPolicy rule and PeerAuthentication mode decide FROM -> TO, and why.

    Runs the proxy's own evaluator on the agent's current policies."""
    doc = _get(_run(node, sock), "/v1/policy/explain", **{"from": from_pod, "to": to, "port": port})
    if output is Output.JSON:
        _print_json(doc)
        return
    console = _console()
    src = doc["source"]
    console.print(f"[bold]from[/] {escape(src['pod'])} ({src['ip']}, node {src['node']}) as "
                  f"{escape(src['identity']) or 'plaintext (not in the mesh)'}")
    dest = doc["destination"] + (f" = {doc['service']}:{doc['service_port']}" if doc["service"] else "")
    console.print(f"[bold]to[/]   {escape(dest)}")
    for note in doc["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if not doc["endpoints"]:
        console.print("[yellow]no endpoint to evaluate[/]")
    for ep in doc["endpoints"]:
        style = "green" if ep["allowed"] else "bold red"
        console.print()
        console.print(Text(f"→ {ep['workload']} {ep['ip']}:{ep['port']} (node {ep['node']}, "
                           f"{ep['transport']}): ") + Text(ep["summary"], style=style))
        pa = ep["peer_authentication"]
        if pa:
            console.print(f"  PeerAuthentication: {pa['mode']} ({escape(' → '.join(pa['explanation']))})")
        dec = ep["decision"]
        if dec:
            for line in dec["explanation"]:
                console.print(f"  {escape(line)}")
    console.print()
    verdict = doc["verdict"]
    console.print(Text(f"verdict: {verdict.upper()}", style="green" if verdict == "allowed" else "bold red"))
