"""UTC calendar periods (day, ISO week, month) that quotas reset on and usage is summed over."""

import enum
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
