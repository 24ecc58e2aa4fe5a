"""Sliding-window-log rate limiting: the interface and the in-process implementation.

A call is admitted when fewer than `limit` calls were admitted in the `window_seconds`
that end now; refused calls are not recorded, so a client that keeps retrying while
refused does not push its own recovery further away.
"""

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Decision:
    """The outcome of one call: admitted or not, calls left, seconds until a slot frees;
    `decided` is False when the store could not be asked and the fail mode chose."""

    allowed: bool
    remaining: int
    retry_after: float
    decided: bool = True


Check = tuple[str, int]  # (key, limit)


class RateLimiter(Protocol):
    """Admits at most `limit` calls per key in any `window_seconds` interval."""

    failures: int  # decisions it could not make (its store unreachable), for the metrics

    async def hit(self, key: str, limit: int, window_seconds: float) -> Decision:
        """Record a call for `key` if the window has room, and say whether it had."""
        ...

    async def hit_all(
        self, checks: Sequence[Check], window_seconds: float, *, fail_open: bool | None = None
    ) -> tuple[int, Decision]:
        """Record a call under every key if all their windows have room (all or nothing).
        Returns the index of the first check that refused, or -1, with its decision
        (`remaining` is the smallest left over all keys when admitted). `fail_open`
        overrides the limiter's own mode for this call when its store is unreachable."""
        ...


def check_limit(limit: int, window_seconds: float) -> None:
    """Reject a limit that cannot admit anything (a configuration mistake, not a refusal)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not window_seconds > 0:
        raise ValueError(f"window_seconds must be positive, got {window_seconds}")


class _Log:
    """One key's admitted timestamps, oldest first, and when the newest one expires."""

    __slots__ = ("expires_at", "stamps")

    def __init__(self) -> None:
        self.stamps: deque[float] = deque()
        self.expires_at = 0.0


class InProcessRateLimiter:
    """A sliding-window log per key in this process's memory (the embedded mode).

    Not thread-safe: it belongs to one event loop, and `hit` never awaits, so concurrent
    tasks cannot interleave inside a decision.
    """

    def __init__(
        self, *, max_keys: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_keys is not None and max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.failures = 0  # memory cannot be unreachable
        self._max_keys = max_keys
        self._clock = clock
        # Ordered by last hit, least recent first: the LRU victim and the likeliest
        # expired key are both at the front.
        self._logs: OrderedDict[str, _Log] = OrderedDict()

    def __len__(self) -> int:
        """The number of keys currently tracked."""
        return len(self._logs)

    async def hit(self, key: str, limit: int, window_seconds: float) -> Decision:
        """Record a call for `key` if the window has room, and say whether it had."""
        return (await self.hit_all([(key, limit)], window_seconds))[1]

    async def hit_all(
        self, checks: Sequence[Check], window_seconds: float, *, fail_open: bool | None = None
    ) -> tuple[int, Decision]:
        """Record a call under every key if all their windows have room (all or nothing);
        memory is always reachable, so `fail_open` never applies."""
        for _, limit in checks:
            check_limit(limit, window_seconds)
        now = self._clock()
        self._drop_expired(now)
        horizon = now - window_seconds
        logs = [self._log_for(key) for key, _ in checks]
        for index, (log, (_, limit)) in enumerate(zip(logs, checks, strict=True)):
            stamps = log.stamps
            while stamps and stamps[0] <= horizon:
                stamps.popleft()
            if len(stamps) >= limit:
                # A lowered limit can leave more than `limit` stamps; the one that must
                # expire before another call fits is `limit` places from the newest.
                frees_at = stamps[len(stamps) - limit] + window_seconds
                return index, Decision(allowed=False, remaining=0, retry_after=frees_at - now)
        for log in logs:
            log.stamps.append(now)
            log.expires_at = now + window_seconds
        remaining = min(
            limit - len(log.stamps) for log, (_, limit) in zip(logs, checks, strict=True)
        )
        return -1, Decision(allowed=True, remaining=remaining, retry_after=0.0)

    def _log_for(self, key: str) -> _Log:
        log = self._logs.get(key)
        if log is not None:
            self._logs.move_to_end(key)
            return log
        if self._max_keys is not None and len(self._logs) >= self._max_keys:
            # Evicting forgets that key's calls (it starts afresh): the cap trades
            # exactness for bounded memory under a flood of distinct keys.
            self._logs.popitem(last=False)
        log = self._logs[key] = _Log()
        return log

    def _drop_expired(self, now: float) -> None:
        # Amortised O(1): only the least recently hit keys are looked at, so a key with a
        # long window can shelter younger expired keys until it expires itself.
        while self._logs:
            key, log = next(iter(self._logs.items()))
            if log.expires_at > now:
                return
            del self._logs[key]
