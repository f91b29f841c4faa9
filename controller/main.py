"""`controller run`: load the CA and the config directory, serve gRPC + metrics until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from api import logsink
from controller.ca import CertificateAuthority
from controller.server.app import ControllerServer

if TYPE_CHECKING:
    from controller.registry import MeshState

log = logging.getLogger("nodemesh.controller")


@dataclass(frozen=True, slots=True)
class RunOptions:
    config_dir: Path
    state_dir: Path
    listen: str = "127.0.0.1:15012"
    trust_domain: str = "cluster.local"
    metrics_listen: str | None = "127.0.0.1:15014"
    admin_token_file: Path | None = None


LOG_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"


def configure_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Log records go to stderr (or `stream`) through `api.logsink` (a bounded buffer and a writer
    thread): the controller is the CA, and a write to a stalled log pipe must not stop signing or
    config pushes."""
    logsink.configure(LOG_FORMAT, level, stream)


def read_admin_token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"admin token file {path} is empty")
    return token


async def run(options: RunOptions, stop: asyncio.Event | None = None) -> int:
    """Serve until `stop` is set (or SIGTERM/SIGINT); returns the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        return await _serve(options, stop, loop)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def _serve(options: RunOptions, stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> int:
    # The registry is imported here so that the CLI loads even where only the server is needed.
    from controller.server.registry_model import RegistryModel
    from controller.sources.yamldir import YamlDirectorySource

    options.state_dir.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.load_or_create(options.state_dir, options.trust_domain)
    (options.state_dir / "ca.pem").write_bytes(ca.trust_bundle_pem())
    server: ControllerServer | None = None

    def changed(state: MeshState) -> None:
        def apply() -> None:
            model.update(state)
            if server is not None:
                server.metrics.config_errors.set(len(source.errors()))
                server.notify_changed()

        loop.call_soon_threadsafe(apply)

    source = YamlDirectorySource(options.config_dir, changed, trust_domain=options.trust_domain)
    model = RegistryModel(source, source.load())
    errors = source.errors()  # each already logged by the source as config.error
    server = ControllerServer(model, ca, admin_token=read_admin_token(options.admin_token_file))
    server.metrics.config_errors.set(len(errors))
    addrs = await server.start(options.listen, options.metrics_listen)
    server.ready = True
    log.info(
        "controller.serving grpc_port=%d metrics_port=%s config_dir=%s state_dir=%s",
        addrs.grpc_port,
        addrs.metrics_port,
        options.config_dir,
        options.state_dir,
    )
    watcher = asyncio.create_task(source.run())
    try:
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({watcher, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if watcher.done() and watcher.exception() is not None:
            log.error("controller.watcher_failed error=%r", watcher.exception())
            return 1
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)  # lets the watcher thread stop
        await server.stop()
    log.info("controller.stopped")
    return 0
