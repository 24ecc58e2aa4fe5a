"""Logging setup: one JSON object per line, each carrying the current RPC's request id,
method and user id (from the request context), so log lines join with traces and metrics.

A record is stamped with the request context where it is logged and queued; a writer
thread wakes every `WRITE_INTERVAL`, formats what has queued and writes it in one go.
Formatting a line on the event loop cost ~30 µs of every call; handing each record to a
thread that wakes for it cost more (measured with bench/hot_path.py: the thread and the
loop passed the GIL back and forth for every line). Waking 20 times a second, the thread
takes the GIL a few dozen times a second whatever the load. A line is written at most
`WRITE_INTERVAL` after it is logged; records still queued when the process exits normally
are written at exit; a process killed outright loses at most one interval's lines.
"""

import atexit
import logging
import queue
import sys
import threading
from logging.handlers import QueueHandler
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

from server.request_context import current_request

WRITE_INTERVAL = 0.05


class RequestContextFilter(logging.Filter):
    """Adds request_id, rpc and user_id to records logged while an RPC is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = current_request.get()
        if info is not None:
            record.request_id = info.request_id
            record.rpc = getattr(record, "rpc", info.rpc)
            record.user_id = str(info.principal.user_id) if info.principal else None
        return True


class ContextQueueHandler(QueueHandler):
    """Queues a record as it is, with its arguments merged into its message (an argument
    may change after the call returns); the writer's formatter does the rest, exceptions
    included. The context is read here, in the thread that logs (ContextVars do not cross
    threads)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        return record


class BatchWriter(threading.Thread):
    """Formats and writes the queued records every `interval` seconds, in one write."""

    def __init__(
        self,
        records: "queue.SimpleQueue[logging.LogRecord]",
        formatter: logging.Formatter,
        stream: TextIO,
        interval: float = WRITE_INTERVAL,
    ) -> None:
        super().__init__(name="log-writer", daemon=True)
        self._records = records
        self._formatter = formatter
        self._stream = stream
        self._interval = interval
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self._interval):
            self.write_queued()
        self.write_queued()

    def stop(self) -> None:
        self._stopping.set()
        self.join()

    def write_queued(self) -> None:
        lines = []
        while True:
            try:
                record = self._records.get_nowait()
            except queue.Empty:
                break
            try:
                lines.append(self._formatter.format(record))
            except Exception:  # one bad record must not cost the others
                lines.append(f"unformattable log record from {record.name}: {record.msg!r}")
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # stderr closed: nowhere left to write
                pass


class _Writer:
    """The one writer thread of the process (logging is configured once per process, but
    tests and tools may call `configure_logging` again)."""

    running: BatchWriter | None = None


def configure_logging(level: str, fmt: str) -> None:
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            timestamp=False,
        )
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = ContextQueueHandler(records)
    handler.addFilter(RequestContextFilter())
    if _Writer.running is not None:
        _Writer.running.stop()
    else:
        atexit.register(_stop)
    _Writer.running = BatchWriter(records, formatter, sys.stderr)
    _Writer.running.start()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _stop() -> None:
    if _Writer.running is not None:
        _Writer.running.stop()
        _Writer.running = None
