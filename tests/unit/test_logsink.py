"""`agent.logsink`: records leave through a writer thread; a stream that blocks never blocks the logger."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest

from agent.logsink import LogSink

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
