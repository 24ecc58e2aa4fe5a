"""Reading google.rpc.Status details out of a failed call."""

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    status: status_pb2.Status | None = rpc_status.from_call(error)
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    return status


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for detail in status_of(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo detail")


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, list[str]]:
    """Field path → descriptions, from the BadRequest detail."""
    for detail in status_of(error).details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            result: dict[str, list[str]] = {}
            for violation in bad_request.field_violations:
                result.setdefault(violation.field, []).append(violation.description)
            return result
    raise AssertionError("no BadRequest detail")


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """Seconds from the RetryInfo detail."""
    for detail in status_of(error).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo detail")


def quota_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """(subject, description) pairs from the QuotaFailure detail."""
    for detail in status_of(error).details:
        failure = error_details_pb2.QuotaFailure()
        if detail.Unpack(failure):
            return [(v.subject, v.description) for v in failure.violations]
    raise AssertionError("no QuotaFailure detail")
