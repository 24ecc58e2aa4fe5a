"""DomainError → gRPC status with google.rpc.Status details (ErrorInfo always; BadRequest,
RetryInfo and QuotaFailure where they apply)."""

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services import errors

ERROR_DOMAIN = "agentmesh"
log = logging.getLogger("agentmesh.rpc")

STATUS_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code_of(error: errors.DomainError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(error: errors.DomainError) -> status_pb2.Status:
    """The google.rpc.Status a client receives for `error`."""
    code = status_code_of(error)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
            )
        )
    ]
    if isinstance(error, errors.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    if isinstance(error, errors.ResourceExhausted):
        if error.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(error.retry_after * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        if error.violations:
            details.append(
                _pack(
                    error_details_pb2.QuotaFailure(
                        violations=[
                            error_details_pb2.QuotaFailure.Violation(
                                subject=v.subject, description=v.description
                            )
                            for v in error.violations
                        ]
                    )
                )
            )
    return status_pb2.Status(code=code.value[0], message=error.message, details=details)


def domain_error_of(call: grpc.aio.AioRpcError, context: str) -> errors.DomainError:
    """The DomainError another agentmesh service answered with (the inverse of
    `rich_status`), its message prefixed with `context`: the reason, field violations and
    retry delay survive the hop. A status without a domain meaning (INTERNAL, a deadline,
    a dropped connection) becomes UNAVAILABLE: the callee could not answer."""
    message = f"{context}: {call.details() or call.code().name}"
    reason, violations, retry_after = None, [], None
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # a trailer that contradicts the call's status
        status = None
    for detail in status.details if status is not None else []:
        info, bad, retry = (
            error_details_pb2.ErrorInfo(),
            error_details_pb2.BadRequest(),
            error_details_pb2.RetryInfo(),
        )
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            violations = [
                errors.FieldViolation(v.field, v.description) for v in bad.field_violations
            ]
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    kind = next((k for k, code in STATUS_CODES.items() if code == call.code()), None)
    if kind is errors.InvalidArgument:
        return errors.InvalidArgument(violations or [errors.FieldViolation("", message)])
    if kind is errors.ResourceExhausted:
        return errors.ResourceExhausted(message, retry_after=retry_after, reason=reason)
    if kind is None or kind is errors.Unavailable:
        # Not the callee's own words but grpc's (addresses, errno): they stay in the log.
        log.warning("%s failed: %s %s", context, call.code().name, call.details())
        return errors.Unavailable(
            f"{context} is unavailable ({call.code().name})",
            reason=f"UPSTREAM_{call.code().name}",
        )
    return kind(message, reason=reason)


def plain_status(code: grpc.StatusCode, message: str, reason: str) -> status_pb2.Status:
    """A status for failures that are not DomainErrors (internal errors, unimplemented)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    return status_pb2.Status(code=code.value[0], message=message, details=[_pack(info)])


def to_grpc_status(status: status_pb2.Status) -> grpc.Status:
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


INTERNAL = plain_status(
    grpc.StatusCode.INTERNAL, "internal error; see the server log for this request id", "INTERNAL"
)
UNIMPLEMENTED = plain_status(
    grpc.StatusCode.UNIMPLEMENTED, "this method is not implemented yet", "UNIMPLEMENTED"
)
