"""Per-RPC state shared by the interceptors, the servicers and the log formatter."""

import contextvars
from dataclasses import dataclass

from services.audit.trail import Origin
from services.auth.principal import Principal
from services.errors import Unauthenticated


@dataclass
class RequestInfo:
    """What is known about the RPC being served; filled in as interceptors learn it."""

    request_id: str
    rpc: str
    peer: str = ""
    principal: Principal | None = None
    # What a call to another agentmesh service made for this one carries along (see
    # server/remote_knowledge.py): the caller's own bearer credential, the client address
    # the rate limits counted, and the call's deadline on the time.monotonic() clock.
    credential: str | None = None
    client_ip: str = ""
    deadline: float | None = None


current_request: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar(
    "agentmesh_request", default=None
)


def current_principal() -> Principal:
    """The authenticated caller of the current RPC (set by the auth interceptor)."""
    info = current_request.get()
    if info is None or info.principal is None:
        raise Unauthenticated("authentication required", reason="UNAUTHENTICATED")
    return info.principal


def request_origin() -> Origin:
    """Where the current RPC came from, for the audit trail (empty outside an RPC)."""
    info = current_request.get()
    if info is None:
        return Origin()
    return Origin(request_id=info.request_id, client_ip=info.client_ip or None)
