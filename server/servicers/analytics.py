"""AnalyticsService: the caller's usage and quotas; installation and user statistics."""

from typing import Any

from agentmesh.analytics.v1 import analytics_pb2
from agentmesh.analytics.v1 import analytics_service_pb2 as analytics_pb
from agentmesh.analytics.v1 import analytics_service_pb2_grpc as analytics_grpc

from server.request_context import current_principal
from server.servicers.converters import optional_time, to_timestamp
from services.analytics.stats import Bucket, StatsRequest, StatsService
from services.analytics.usage import UsageService, WindowUsage
from services.errors import InvalidArgument
from services.knowledge.storage_quota import StorageStatus
from services.periods import Window
from services.quotas.service import QuotaStatus

GRANULARITY = {
    Window.DAY: analytics_pb2.GRANULARITY_DAY,
    Window.WEEK: analytics_pb2.GRANULARITY_WEEK,
    Window.MONTH: analytics_pb2.GRANULARITY_MONTH,
}
WINDOW = {proto: window for window, proto in GRANULARITY.items()}
WINDOW[analytics_pb2.GRANULARITY_UNSPECIFIED] = Window.DAY
METRIC = {
    "queries": analytics_pb2.QUOTA_METRIC_AGENT_QUERIES,
    "tokens": analytics_pb2.QUOTA_METRIC_TOKENS,
}


def window_to_proto(usage: WindowUsage) -> analytics_pb2.UsageWindow:
    return analytics_pb2.UsageWindow(
        granularity=GRANULARITY[usage.window],
        start_time=to_timestamp(usage.start),
        end_time=to_timestamp(usage.end),
        queries=usage.queries,
        tokens_in=usage.tokens_in,
        tokens_out=usage.tokens_out,
        documents_uploaded=usage.documents_uploaded,
    )


def quota_to_proto(quota: QuotaStatus) -> analytics_pb2.QuotaStatus:
    return analytics_pb2.QuotaStatus(
        metric=METRIC[quota.metric],
        granularity=GRANULARITY[quota.period],
        limit=quota.limit,
        used=quota.used,
        remaining=quota.remaining,
        unlimited=quota.unlimited,
        resets_at=to_timestamp(quota.resets_at),
    )


def storage_to_proto(storage: StorageStatus) -> analytics_pb2.StorageUsage:
    return analytics_pb2.StorageUsage(
        limit_bytes=storage.limit,
        used_bytes=storage.used,
        remaining_bytes=storage.remaining,
        unlimited=storage.unlimited,
    )


def bucket_to_proto(bucket: Bucket) -> analytics_pb2.StatsBucket:
    return analytics_pb2.StatsBucket(
        start_time=to_timestamp(bucket.start),
        end_time=to_timestamp(bucket.end),
        active_users=bucket.active_users,
        queries=bucket.queries,
        failed_queries=bucket.failed_queries,
        tokens_in=bucket.tokens_in,
        tokens_out=bucket.tokens_out,
        latency_p50_ms=bucket.latency_p50_ms,
        latency_p95_ms=bucket.latency_p95_ms,
        tool_usage=[
            analytics_pb2.ToolUsage(tool=t.tool, calls=t.calls, failures=t.failures)
            for t in bucket.tool_usage
        ],
        error_rate=bucket.error_rate,
        errors=[analytics_pb2.ErrorCount(code=code, count=n) for code, n in bucket.errors],
        feedback_count=bucket.feedback_count,
        feedback_positive_ratio=bucket.feedback_positive_ratio,
        documents_uploaded=bucket.documents_uploaded,
        registrations=bucket.registrations,
        logins=bucket.logins,
        rate_limited=bucket.rate_limited,
        quota_refused=bucket.quota_refused,
    )


def stats_request(request: Any, user_id: str | None = None) -> StatsRequest:
    window = WINDOW.get(request.granularity)
    if window is None:
        raise InvalidArgument.of("granularity", "must be a day, week or month")
    return StatsRequest(
        window=window,
        start=optional_time(request, "start_time"),
        end=optional_time(request, "end_time"),
        user_id=user_id,
    )


class AnalyticsServicer(analytics_grpc.AnalyticsServiceServicer):
    def __init__(self, usage: UsageService, stats: StatsService) -> None:
        self._usage = usage
        self._stats = stats

    async def GetUsage(
        self, request: analytics_pb.GetUsageRequest, context: Any
    ) -> analytics_pb.GetUsageResponse:
        usage = await self._usage.usage(current_principal())
        day, week, month = (window_to_proto(w) for w in usage.windows)
        return analytics_pb.GetUsageResponse(
            today=day,
            this_week=week,
            this_month=month,
            quotas=[quota_to_proto(q) for q in usage.quotas],
            storage=storage_to_proto(usage.storage),
        )

    async def GetSystemStats(
        self, request: analytics_pb.GetSystemStatsRequest, context: Any
    ) -> analytics_pb.GetSystemStatsResponse:
        stats = await self._stats.stats(stats_request(request))
        return analytics_pb.GetSystemStatsResponse(
            buckets=[bucket_to_proto(b) for b in stats.buckets],
            totals=bucket_to_proto(stats.totals),
        )

    async def GetUserStats(
        self, request: analytics_pb.GetUserStatsRequest, context: Any
    ) -> analytics_pb.GetUserStatsResponse:
        stats = await self._stats.stats(stats_request(request, request.user_id))
        return analytics_pb.GetUserStatsResponse(
            user_id=str(stats.user_id),
            buckets=[bucket_to_proto(b) for b in stats.buckets],
            totals=bucket_to_proto(stats.totals),
        )
