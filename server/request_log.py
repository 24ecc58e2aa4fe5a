"""The request id and the one log line (and `rpc` usage event) of every admitted call.

A call's id comes from `x-request-id` when it is well-formed, or is new; it goes back to
the client, and into every log line written while the call is served (server/logs.py).

A stream's id goes out with the response headers only with its first message. Sending
headers earlier would commit the HTTP status: Envoy's transcoder answers a REST stream with
200 as soon as headers arrive, so a stream refused before its first event (a foreign
conversation, bad arguments, a quota) would reach REST clients as 200 with an error body
instead of 404/400/429. A unary call sends its id at once (its status comes with its
trailers either way). A call that fails carries the id in its trailers too
(`server.handlers.abort`), which become the headers of a trailers-only response.
"""

import logging
import re
import time
import uuid

from server.handlers import REQUEST_ID_HEADER, Context
from server.request_context import RequestInfo, current_request
from services.usage_events.recorder import EventKind, EventRecorder

# Method-name prefixes of the RPCs recorded as usage events (probes and grpcurl's
# reflection calls are not usage).
RECORDED_RPCS = "/agentmesh."
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestLog:
    """Begins a call's RequestInfo; ends it with its log line and usage event."""

    def __init__(self, logger: logging.Logger, events: EventRecorder) -> None:
        self._log = logger
        self._events = events

    @staticmethod
    def begin(context: Context, method: str, incoming: str | None) -> RequestInfo:
        """The call's RequestInfo, made current (`incoming`: its x-request-id header)."""
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        # The peer is read now: once a call is cancelled, asking its context for the peer
        # reaches into a released C call object (it crashed the process in a test).
        info = RequestInfo(request_id=request_id, rpc=method, peer=context.peer())
        remaining = context.time_remaining()
        if remaining is not None:
            info.deadline = time.monotonic() + remaining
        current_request.set(info)
        return info

    @staticmethod
    async def send_id(context: Context, info: RequestInfo) -> None:
        await context.send_initial_metadata(((REQUEST_ID_HEADER, info.request_id),))

    @staticmethod
    def id_in_trailers(context: Context, info: RequestInfo) -> None:
        """For a stream that ends without a message: it ends trailers-only."""
        context.set_trailing_metadata(((REQUEST_ID_HEADER, info.request_id),))

    def end(self, info: RequestInfo, code: str, seconds: float) -> None:
        latency_ms = round(seconds * 1000, 3)
        self._log.info(
            "rpc finished",
            extra={"rpc": info.rpc, "code": code, "latency_ms": latency_ms, "peer": info.peer},
        )
        if info.rpc.startswith(RECORDED_RPCS):
            principal = info.principal
            self._events.record(
                EventKind.RPC,
                user_id=principal.user_id if principal else None,
                rpc=info.rpc,
                code=code,
                latency_ms=latency_ms,
                success=code == "OK",
                # The API key that made the call (its id, never its secret).
                data={"key_id": str(principal.key_id)} if principal and principal.key_id else None,
            )
