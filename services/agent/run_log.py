"""Where a run's events go as the run produces them, numbered by `seq`, so that its owner can
follow it from any point, from any replica, however often the connection drops: the RunLog
interface, the records it keeps, the errors a followed run ends with, and the in-process log
(one process; the Redis Streams log shared by replicas is in `run_log_redis.py`)."""

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from services.agent.events import Event, RunCompleted
from services.errors import Aborted, Cancelled, DomainError, InvalidArgument, NotFound

# Finished runs the in-process log keeps at most (the oldest go first), besides the TTL.
MAX_FINISHED_RUNS = 1000
# How long a shared log's mark that a run's process is alive (and the run's slot of the
# concurrent-run cap) lasts without renewal: how soon the runs of a process that died are
# known to be interrupted and stop counting.
RUN_LEASE_SECONDS = 5.0


class RunNotFound(NotFound):
    """No such run is kept, or it is another user's (their runs are not disclosed)."""

    reason = "RUN_NOT_FOUND"


class RunCancelled(Cancelled):
    """Its owner cancelled the run."""

    reason = "RUN_CANCELLED"


class RunInterrupted(Aborted):
    """The process running the run stopped (died, or shut down) before the run ended."""

    reason = "RUN_INTERRUPTED"


class RunFailed(DomainError):
    """The run failed unexpectedly (the traceback is in the log of the process that ran
    it); not a mapped DomainError, so its streams end INTERNAL."""

    reason = "INTERNAL"

    def __init__(self) -> None:
        super().__init__("internal error; see the server log for this run id")


@dataclass(frozen=True)
class RunStopped:
    """The last record of a run that did not complete: the error its streams end with."""

    error: DomainError


@dataclass(frozen=True)
class RunRecord:
    """One event of a run at its place in the run: seq 1, 2, 3, ... without gaps."""

    seq: int
    event: Event | RunStopped

    @property
    def last(self) -> bool:
        """Whether the run ends with this record (completed, or stopped)."""
        return isinstance(self.event, RunCompleted | RunStopped)


def run_id_of(text: str) -> str:
    """A run id from a request (32 lowercase hexadecimal digits), or INVALID_ARGUMENT."""
    if not text:
        raise InvalidArgument.of("run_id", "is required")
    if len(text) != 32 or text.strip("0123456789abcdef"):
        raise InvalidArgument.of("run_id", "must be a run id (32 hexadecimal digits)")
    return text


class RunLog(Protocol):
    """A log per run: its owner, its records in order, whether the process running it is
    alive, and cancellation requests for it."""

    async def open(self, run_id: str, owner: uuid.UUID) -> None:
        """Start the log of a new run of `owner`, which this process runs."""
        ...

    def append(self, run_id: str, record: RunRecord) -> None:
        """Add the next record of a run this process runs (never blocks the run: shared
        logs are written in the background, in order)."""
        ...

    async def close(self, run_id: str) -> None:
        """The run's task ended, its last record appended: write what is pending and let
        the log expire in its time."""
        ...

    async def owner(self, run_id: str) -> uuid.UUID | None:
        """The user whose run it is; None when no such run is kept."""
        ...

    def follow(self, run_id: str, owner: uuid.UUID, after_seq: int) -> AsyncIterator[RunRecord]:
        """The run's records after `after_seq`, then each new one as it comes, until the
        last; RunNotFound unless the run is kept and `owner`'s. A run whose process died
        ends with a RunStopped(RunInterrupted) record."""
        ...

    async def request_cancel(self, run_id: str) -> None:
        """Ask the process running `run_id` (elsewhere) to cancel it."""
        ...

    async def cancel_requests(self, run_ids: Collection[str]) -> set[str]:
        """Which of the runs this process runs were asked to cancel from elsewhere."""
        ...

    async def renew(self, run_ids: Collection[str]) -> None:
        """Say that the runs this process runs are alive (every second or so)."""
        ...

    async def aclose(self) -> None:
        """Release the log's connections (at shutdown)."""
        ...


@dataclass
class RunTail:
    """The records of one run in this process's memory, and its followers' wake-up."""

    owner: uuid.UUID
    records: list[RunRecord] = field(default_factory=list)
    ended: bool = False
    _grown: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, record: RunRecord) -> None:
        self.records.append(record)
        self.ended = self.ended or record.last
        self._grown.set()  # wakes every follower waiting on this event
        self._grown = asyncio.Event()

    async def follow(self, after_seq: int) -> AsyncIterator[RunRecord]:
        """Records after `after_seq` (records[i] has seq i + 1), waiting for new ones."""
        index = after_seq
        while True:
            grown = self._grown  # taken before reading: an append meanwhile sets it
            while index < len(self.records):
                record = self.records[index]
                index += 1
                yield record
                if record.last:
                    return
            if self.ended:  # `after_seq` was at or past the last record
                return
            await grown.wait()


class InProcessRunLog:
    """Runs in this process's memory (one process: the embedded mode). Every run is local,
    so cancelling never goes through the log; a run is kept `ttl_seconds` after it ends,
    at most MAX_FINISHED_RUNS of them."""

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._runs: dict[str, RunTail] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()  # run id → when it ended

    def _prune(self) -> None:
        now = self._clock()
        while self._finished:
            run_id, ended = next(iter(self._finished.items()))
            if ended + self._ttl > now and len(self._finished) <= MAX_FINISHED_RUNS:
                break
            del self._finished[run_id]
            self._runs.pop(run_id, None)

    async def open(self, run_id: str, owner: uuid.UUID) -> None:
        self._prune()
        self._runs[run_id] = RunTail(owner)

    def append(self, run_id: str, record: RunRecord) -> None:
        self._runs[run_id].add(record)

    async def close(self, run_id: str) -> None:
        self._finished[run_id] = self._clock()
        self._prune()

    async def owner(self, run_id: str) -> uuid.UUID | None:
        self._prune()
        tail = self._runs.get(run_id)
        return tail.owner if tail is not None else None

    async def follow(
        self, run_id: str, owner: uuid.UUID, after_seq: int
    ) -> AsyncIterator[RunRecord]:
        self._prune()
        tail = self._runs.get(run_id)
        if tail is None or tail.owner != owner:
            raise RunNotFound(f"no run {run_id} of yours is kept")
        async for record in tail.follow(after_seq):
            yield record

    async def request_cancel(self, run_id: str) -> None:
        return None  # every run is this process's: RunManager cancels it directly

    async def cancel_requests(self, run_ids: Collection[str]) -> set[str]:
        return set()

    async def renew(self, run_ids: Collection[str]) -> None:
        return None

    async def aclose(self) -> None:
        return None
