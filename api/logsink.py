"""Log output of the agent and the controller: the event loop only buffers a record; a thread of its
own writes them.

A write to stderr can block: a container runtime's log pipe that nobody drains is full at 64 KiB,
and a blocked write on the event loop would stop every connection the node proxy carries (the flow
log writes a line per connection event), or every signing and config push of the controller. So a
record is appended to a bounded buffer, and a writer thread formats what has gathered every
`FLUSH_INTERVAL` seconds and writes it with one `write(2)`.
When the buffer is full a record is dropped and counted (the loop never waits); the next record that
fits is preceded by a line that says how many were dropped (`event=log_records_dropped count=N`).
`stop()` (at exit) writes what is buffered, waiting at most `timeout` seconds. `configure()` puts a
sink behind the root logger of a process.

The writer wakes on its timer, not per record: a queue that woke it for every record (a thread switch
and two GIL hand-overs each) cost the proxy 15-25% of its new connections per second (bench_l4).
Records are formatted in the writer thread, so arguments are read then (log values, not objects
changed right after the call); lines reach stderr up to `FLUSH_INTERVAL` late.
"""

from __future__ import annotations

import atexit
import collections
import logging
import sys
import threading
from typing import TextIO

BUFFER_SIZE = 10_000  # records waiting for the writer, at most
FLUSH_INTERVAL = 0.05  # seconds between the writer's rounds
STOP_TIMEOUT = 2.0  # seconds stop() waits for the writer to write what is buffered

log = logging.getLogger("nodemesh.log")


def _dropped_record(count: int) -> logging.LogRecord:
    msg = "event=log_records_dropped count=%d (the log buffer was full)"
    return log.makeRecord(log.name, logging.WARNING, __file__, 0, msg, (count,), None)


class _BufferHandler(logging.Handler):
    """Appends records to the writer's buffer; drops (and counts) when it is full. `logging` holds
    the handler's lock around `emit`, so emit and `take` never interleave."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.records: collections.deque[logging.LogRecord] = collections.deque()
        self.dropped = 0  # since the last report line
        self.dropped_total = 0  # since start (the agent's nodemesh_agent_log_records_dropped)

    def emit(self, record: logging.LogRecord) -> None:
        records = self.records
        if self.dropped and len(records) < self.size:  # say so where it happened
            records.append(_dropped_record(self.dropped))
            self.dropped = 0
        if len(records) < self.size:
            records.append(record)
        else:
            self.dropped += 1
            self.dropped_total += 1

    def take(self, final: bool = False) -> list[logging.LogRecord]:
        """What gathered (and, `final`, a line for drops after the last record that fitted)."""
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            taken = list(self.records)
            self.records.clear()
            if final and self.dropped:
                taken.append(_dropped_record(self.dropped))
                self.dropped = 0
        return taken


class LogSink:
    """A started writer thread behind `handler` (attach it to a logger)."""

    def __init__(
        self, stream: TextIO, fmt: str, buffer_size: int = BUFFER_SIZE, interval: float = FLUSH_INTERVAL
    ) -> None:
        self.handler = _BufferHandler(buffer_size)
        self._stream = stream
        self._formatter = logging.Formatter(fmt)
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nodemesh-log-writer", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Records dropped and not yet reported."""
        return self.handler.dropped

    @property
    def dropped_total(self) -> int:
        """Records dropped since the sink started."""
        return self.handler.dropped_total

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self._write(self.handler.take())
        self._write(self.handler.take(final=True))

    def _write(self, records: list[logging.LogRecord]) -> None:
        if not records:
            return
        lines = []
        for record in records:
            try:
                lines.append(self._formatter.format(record))
            except Exception:  # a bad format string or argument: logging's own report, then go on
                self.handler.handleError(record)
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed or broken: nowhere left to say it
            pass

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Write what is buffered and end the thread; False when it did not finish within `timeout`
        (a stream that does not take writes: the process exits without the rest)."""
        self._stopping.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()


_sink: LogSink | None = None


def configure(fmt: str, level: int | str = logging.INFO, stream: TextIO | None = None) -> LogSink:
    """Make a `LogSink` on `stream` (stderr) the root logger's only handler; an earlier one writes
    what it holds and ends. The sink is stopped (what it buffers written) at exit."""
    global _sink
    old, _sink = _sink, LogSink(sys.stderr if stream is None else stream, fmt)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    root.addHandler(_sink.handler)
    root.setLevel(level)
    if old is None:
        atexit.register(_stop)
    else:
        old.stop()
    # Our formats use none of these: skip collecting them for every record (the flow log writes one
    # per connection event; getpid(2) and the caller's frame walk were most of a record's cost)
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the logging HOWTO's "Optimization" table
    return _sink


def _stop() -> None:
    if _sink is not None:
        _sink.stop()


def records_dropped() -> int:
    """Log records this process dropped since `configure` (0 when it was not called)."""
    return _sink.dropped_total if _sink is not None else 0
