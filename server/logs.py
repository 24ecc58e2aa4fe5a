"""Logging setup: one JSON object per line, each carrying the current RPC's request id,
method and user id (from the request context), so log lines join with traces and metrics."""

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from server.request_context import current_request


class RequestContextFilter(logging.Filter):
    """Adds request_id, rpc and user_id to records logged while an RPC is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = current_request.get()
        if info is not None:
            record.request_id = info.request_id
            record.rpc = getattr(record, "rpc", info.rpc)
            record.user_id = str(info.principal.user_id) if info.principal else None
        return True


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
