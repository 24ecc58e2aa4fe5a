"""Rate limiting: a sliding-window log in process memory or shared through Redis."""

from services.limits.redis_window import RedisRateLimiter
from services.limits.window import Decision, InProcessRateLimiter, RateLimiter

__all__ = ["Decision", "InProcessRateLimiter", "RateLimiter", "RedisRateLimiter"]
