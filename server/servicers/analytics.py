"""AnalyticsService: the caller's usage and quotas (system and user statistics: later)."""

from typing import Any

from agentmesh.analytics.v1 import analytics_pb2
from agentmesh.analytics.v1 import analytics_service_pb2 as analytics_pb
from agentmesh.analytics.v1 import analytics_service_pb2_grpc as analytics_grpc

from server.request_context import current_principal
from server.servicers.timestamps import to_timestamp
from services.analytics.usage import UsageService, WindowUsage
from services.periods import Window
from services.quotas.service import QuotaStatus

GRANULARITY = {
    Window.DAY: analytics_pb2.GRANULARITY_DAY,
    Window.WEEK: analytics_pb2.GRANULARITY_WEEK,
    Window.MONTH: analytics_pb2.GRANULARITY_MONTH,
}
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


class AnalyticsServicer(analytics_grpc.AnalyticsServiceServicer):
    """GetSystemStats and GetUserStats are still the generated UNIMPLEMENTED stubs."""

    def __init__(self, usage: UsageService) -> None:
        self._usage = usage

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
        )
