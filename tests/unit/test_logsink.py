"""`api.logsink`: records leave through a writer thread; a stream that blocks never blocks the logger."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from api import logsink
from api.logsink import LogSink
from controller import main as controller_main

FMT = "level=%(levelname)s logger=%(name)s msg=%(message)s"


class GatedStream(io.StringIO):
    """A stream whose writes wait until `gate` is set (a log pipe nobody drains)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.blocked = threading.Event()  # a write is waiting at the gate

    def write(self, s: str) -> int:
        if not self.gate.is_set():
            self.blocked.set()
            self.gate.wait()
        return super().write(s)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    lg = logging.getLogger("test.logsink")
    lg.propagate = False
    lg.setLevel(logging.INFO)
    yield lg
    for h in lg.handlers[:]:
        lg.removeHandler(h)


def test_records_are_written_in_order_with_the_format(logger: logging.Logger) -> None:
    stream = io.StringIO()
    sink = LogSink(stream, FMT)
    logger.addHandler(sink.handler)
    for i in range(100):
        logger.info("event=n i=%d", i)
    logger.warning("last %s", "one")
    assert sink.stop()
    lines = stream.getvalue().splitlines()
    assert lines[:2] == [
        "level=INFO logger=test.logsink msg=event=n i=0",
        "level=INFO logger=test.logsink msg=event=n i=1",
    ]
    assert lines[-1] == "level=WARNING logger=test.logsink msg=last one"
    assert len(lines) == 101
    assert sink.stop()  # stopping twice is harmless


def test_a_blocked_stream_does_not_block_the_logger_and_drops_are_reported(logger: logging.Logger) -> None:
    stream = GatedStream()
    sink = LogSink(stream, FMT, buffer_size=10)
    logger.addHandler(sink.handler)
    logger.info("first")  # the writer takes it and blocks in write()
    assert stream.blocked.wait(5)

    def flood() -> None:
        for i in range(1000):
            logger.info("event=flood i=%d", i)

    t = threading.Thread(target=flood)
    t.start()
    t.join(5)
    assert not t.is_alive(), "logging waited for the blocked stream"
    assert sink.dropped == 1000 - 10  # ten buffered behind the blocked write, the rest dropped
    assert sink.dropped_total == 990
    stream.gate.set()
    for _ in range(500):  # until the writer wrote what was queued
        if "i=9" in stream.getvalue():
            break
        threading.Event().wait(0.01)
    logger.info("after")
    assert sink.stop()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "level=INFO logger=test.logsink msg=first"
    assert lines[1:11] == [f"level=INFO logger=test.logsink msg=event=flood i={i}" for i in range(10)]
    assert lines[11] == (  # where it happened: after what was queued before, before what came after
        "level=WARNING logger=nodemesh.log msg=event=log_records_dropped count=990 (the log buffer was full)"
    )
    assert lines[12:] == ["level=INFO logger=test.logsink msg=after"]
    assert sink.dropped == 0 and sink.dropped_total == 990  # reported, still counted


def test_drops_after_the_last_record_are_reported_at_stop(logger: logging.Logger) -> None:
    stream = GatedStream()
    sink = LogSink(stream, FMT, buffer_size=1)
    logger.addHandler(sink.handler)
    logger.info("a")
    assert stream.blocked.wait(5)
    for _ in range(3):
        logger.info("b")  # one buffered, two dropped
    stream.gate.set()
    assert sink.stop()
    assert stream.getvalue().splitlines() == [
        "level=INFO logger=test.logsink msg=a",
        "level=INFO logger=test.logsink msg=b",
        "level=WARNING logger=nodemesh.log msg=event=log_records_dropped count=2 (the log buffer was full)",
    ]


def test_stop_gives_up_on_a_stream_that_never_takes_writes(logger: logging.Logger) -> None:
    stream = GatedStream()
    sink = LogSink(stream, FMT, buffer_size=2)
    logger.addHandler(sink.handler)
    for i in range(5):
        logger.info("n=%d", i)
    assert stream.blocked.wait(5)
    assert not sink.stop(timeout=0.2)  # the process may exit; it does not hang on the log
    stream.gate.set()


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger and `logsink`'s process sink as they were, whatever `configure` did."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    flags = (logging.logProcesses, logging.logThreads, logging.logMultiprocessing, logging._srcfile)
    saved = logsink._sink
    yield
    if logsink._sink is not None and logsink._sink is not saved:
        logsink._sink.stop(0.5)
    logsink._sink = saved
    for h in root.handlers[:]:
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.logProcesses, logging.logThreads, logging.logMultiprocessing, logging._srcfile = flags


def test_the_controller_logs_through_a_sink_that_a_stalled_stream_cannot_block(root_logging: None) -> None:
    """`nodemesh controller run`'s logging: the root logger's only handler is a sink; with stderr not
    taking writes (a log pipe nobody drains), logging returns at once, and the lines come out later
    in the controller's format."""
    stream = GatedStream()
    controller_main.configure_logging(stream=stream)
    (handler,) = logging.getLogger().handlers
    assert handler is logsink._sink.handler  # type: ignore[union-attr]
    lg = logging.getLogger("controller.test")
    lg.info("event=first")
    assert stream.blocked.wait(2)  # the writer thread is stuck in write() ...
    t0 = time.monotonic()
    for i in range(1_000):
        lg.info("event=signed i=%d", i)  # ... and the logging thread is not
    assert time.monotonic() - t0 < 1.0
    assert logsink.records_dropped() == 0
    stream.gate.set()
    assert logsink._sink is not None and logsink._sink.stop(2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1_001
    assert lines[-1].endswith("level=INFO logger=controller.test msg=event=signed i=999")
    assert lines[0].startswith("ts=")  # controller.main.LOG_FORMAT
