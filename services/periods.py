"""UTC calendar periods (day, ISO week, month) that quotas reset on and usage is summed over."""

import enum
from collections.abc import Iterator
from datetime import datetime, timedelta


class Window(enum.StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


def window_bounds(window: Window, now: datetime) -> tuple[datetime, datetime]:
    """The UTC day, ISO week (from Monday) or calendar month holding `now`: [start, end)."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window is Window.DAY:
        return day, day + timedelta(days=1)
    if window is Window.WEEK:
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    return start, (start + timedelta(days=32)).replace(day=1)


def previous_start(window: Window, moment: datetime) -> datetime:
    """The start of the period just before the one that ends at (or holds) `moment`."""
    start, _ = window_bounds(window, moment - timedelta(microseconds=1))
    return start


def periods(window: Window, start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime]]:
    """[start, end) cut at the period boundaries of `window`, oldest first; the first and
    last pieces are partial when the range does not start or end on a boundary."""
    while start < end:
        _, period_end = window_bounds(window, start)
        yield start, min(period_end, end)
        start = period_end
