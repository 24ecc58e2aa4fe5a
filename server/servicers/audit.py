"""AuditService: the administrators' listing of the audit trail."""

from typing import Any

from agentmesh.audit.v1 import audit_pb2 as audit_pb
from agentmesh.audit.v1 import audit_service_pb2 as service_pb
from agentmesh.audit.v1 import audit_service_pb2_grpc as audit_grpc
from google.protobuf.struct_pb2 import Struct

from server.servicers.converters import optional_time, to_timestamp
from services.audit.listing import AuditFilter, AuditListing
from services.audit.models import AuditRecord
from services.audit.trail import Outcome
from services.errors import InvalidArgument

OUTCOME_FROM_PROTO = {
    audit_pb.AUDIT_OUTCOME_SUCCESS: Outcome.SUCCESS,
    audit_pb.AUDIT_OUTCOME_FAILURE: Outcome.FAILURE,
}
OUTCOME_TO_PROTO = {outcome.value: value for value, outcome in OUTCOME_FROM_PROTO.items()}


def _filter(request: service_pb.ListAuditEventsRequest) -> AuditFilter:
    if request.outcome and request.outcome not in OUTCOME_FROM_PROTO:
        raise InvalidArgument.of("outcome", "is not a known outcome")
    return AuditFilter(
        actions=list(request.actions),
        outcome=OUTCOME_FROM_PROTO.get(request.outcome),
        actor_id=request.actor_id,
        target_id=request.target_id,
        start=optional_time(request, "start_time"),
        end=optional_time(request, "end_time"),
    )


def event_to_proto(record: AuditRecord) -> audit_pb.AuditEvent:
    event = audit_pb.AuditEvent(
        id=record.id,
        time=to_timestamp(record.occurred_at),
        action=record.action,
        outcome=OUTCOME_TO_PROTO.get(record.outcome, audit_pb.AUDIT_OUTCOME_UNSPECIFIED),
        actor_id=str(record.actor_id or ""),
        actor_key_id=str(record.actor_key_id or ""),
        target_type=record.target_type or "",
        target_id=record.target_id or "",
        request_id=record.request_id or "",
        client_ip=record.client_ip or "",
    )
    if record.data:
        data = Struct()
        data.update(record.data)
        event.data.CopyFrom(data)
    return event


class AuditServicer(audit_grpc.AuditServiceServicer):
    def __init__(self, listing: AuditListing) -> None:
        self._listing = listing

    async def ListAuditEvents(
        self, request: service_pb.ListAuditEventsRequest, context: Any
    ) -> service_pb.ListAuditEventsResponse:
        page = await self._listing.list(request.page_size, request.page_token, _filter(request))
        return service_pb.ListAuditEventsResponse(
            events=[event_to_proto(r) for r in page.records],
            next_page_token=page.next_page_token,
        )
