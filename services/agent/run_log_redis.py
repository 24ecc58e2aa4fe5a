"""The run log shared by replicas: Redis Streams (needs Redis 5+).

Per run, under the key prefix: `run:<id>` (a hash: the owner, and `end`, the last seq once
the run ended), `run:<id>:events` (a stream whose entry ids are `0-<seq>`, so XREAD from
`0-<after_seq>` returns exactly the later events), `run:<id>:alive` (set by the process
running it, expiring RUN_LEASE_SECONDS after its last renewal) and `run:<id>:cancel`
(CancelRun on another replica). Everything expires `ttl_seconds` after the run's last
write or renewal.

The process running a run also keeps its records in memory: its own followers (StreamQuery
on the replica that started the run, the usual case) read them there without a round trip,
and the records go to Redis in order from a background writer, so the run never waits for
Redis. Followers elsewhere block in XREAD, so give the log its own client whose socket
timeout exceeds FOLLOW_BLOCK_SECONDS (not the rate limiter's, whose timeout is
milliseconds).
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Collection, Iterator
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.agent import run_codec
from services.agent.run_log import (
    RUN_LEASE_SECONDS,
    RunInterrupted,
    RunNotFound,
    RunRecord,
    RunStopped,
    RunTail,
)
from services.errors import FailedPrecondition, Unavailable

log = logging.getLogger("agentmesh.agent.runs")

# How long a follower's XREAD blocks before it checks that the run's process is alive.
FOLLOW_BLOCK_SECONDS = 1.0
# A client for this log needs a socket timeout above the blocking reads.
SOCKET_TIMEOUT_SECONDS = FOLLOW_BLOCK_SECONDS + 9.0
# Events kept per run at most (XADD MAXLEN ~): a guard on memory far above any real run.
MAX_EVENTS = 100_000
# Records one XREAD returns at most.
READ_BATCH = 500
# How long closing a run waits for its records to reach Redis, and the pause between the
# writer's attempts while Redis fails.
FLUSH_SECONDS = 10.0
RETRY_SECONDS = 0.5


class RunLogUnavailable(Unavailable):
    """Redis, where runs are kept, cannot be reached."""

    reason = "RUN_LOG_UNAVAILABLE"


@contextlib.contextmanager
def reaching_redis() -> Iterator[None]:
    """Redis failing becomes UNAVAILABLE for the caller (not an internal error)."""
    try:
        yield
    except (RedisError, OSError) as error:
        log.warning("the run log (Redis) failed: %s", error)  # addresses stay in the log
        raise RunLogUnavailable("the run log cannot be reached; try again") from error


class RunEventsExpired(FailedPrecondition):
    """Events a follower asked for are gone (trimmed past MAX_EVENTS, or expired)."""

    reason = "RUN_EVENTS_EXPIRED"


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class RedisRunLog:
    """Runs in Redis Streams, shared by every replica (see the module's docstring)."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        ttl_seconds: float,
        lease_seconds: float = RUN_LEASE_SECONDS,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._tails: dict[str, RunTail] = {}  # the runs this process runs
        self._queues: dict[str, asyncio.Queue[RunRecord]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}

    def _key(self, run_id: str, part: str = "") -> str:
        return f"{self._prefix}run:{run_id}{part}"

    async def open(self, run_id: str, owner: uuid.UUID) -> None:
        with reaching_redis():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._key(run_id), "owner", str(owner))
                pipe.pexpire(self._key(run_id), self._ttl_ms)
                pipe.set(self._key(run_id, ":alive"), 1, px=self._lease_ms)
                await pipe.execute()
        self._tails[run_id] = RunTail(owner)
        queue: asyncio.Queue[RunRecord] = asyncio.Queue()
        self._queues[run_id] = queue
        self._writers[run_id] = asyncio.create_task(
            self._write(run_id, queue), name=f"run-log-writer-{run_id}"
        )

    def append(self, run_id: str, record: RunRecord) -> None:
        self._tails[run_id].add(record)
        self._queues[run_id].put_nowait(record)

    async def close(self, run_id: str) -> None:
        writer = self._writers.pop(run_id)
        try:
            await asyncio.wait_for(asyncio.shield(writer), FLUSH_SECONDS)
        except TimeoutError:
            writer.cancel()
            log.error("run %s: its last events never reached Redis", run_id)
        finally:
            del self._queues[run_id]
            del self._tails[run_id]  # from now on its followers read Redis

    async def _write(self, run_id: str, queue: asyncio.Queue[RunRecord]) -> None:
        """Write the run's records in order, a batch per round trip, until its last one;
        after a failure, again from the first record Redis does not have."""
        while True:
            pending = [await queue.get()]
            while not queue.empty():
                pending.append(queue.get_nowait())
            ended = pending[-1].last
            while pending:
                try:
                    await self._flush(run_id, pending)
                    break
                except (RedisError, OSError) as error:
                    log.warning("run %s: writing events to Redis failed: %s", run_id, error)
                    await asyncio.sleep(RETRY_SECONDS)
                    with contextlib.suppress(RedisError, OSError):
                        written = await self._last_written(run_id)
                        pending = [r for r in pending if r.seq > written]
            if ended:
                return

    async def _flush(self, run_id: str, records: list[RunRecord]) -> None:
        events = self._key(run_id, ":events")
        async with self._redis.pipeline(transaction=True) as pipe:
            for record in records:
                pipe.xadd(
                    events,
                    {"r": run_codec.encode(record)},
                    id=f"0-{record.seq}",
                    maxlen=MAX_EVENTS,
                    approximate=True,
                )
            pipe.pexpire(events, self._ttl_ms)
            if records and records[-1].last:
                # The last record first, then the end mark, then no longer alive: a
                # follower that finds the run not alive and not ended knows it died.
                pipe.hset(self._key(run_id), "end", records[-1].seq)
                pipe.pexpire(self._key(run_id), self._ttl_ms)
                pipe.delete(self._key(run_id, ":alive"))
            await pipe.execute()

    async def _last_written(self, run_id: str) -> int:
        newest = await self._redis.xrevrange(self._key(run_id, ":events"), count=1)
        return int(str(_text(newest[0][0])).split("-")[1]) if newest else 0

    async def owner(self, run_id: str) -> uuid.UUID | None:
        if (tail := self._tails.get(run_id)) is not None:
            return tail.owner
        with reaching_redis():
            raw = _text(await self._redis.hget(self._key(run_id), "owner"))
        return uuid.UUID(raw) if raw else None

    async def follow(
        self, run_id: str, owner: uuid.UUID, after_seq: int
    ) -> AsyncIterator[RunRecord]:
        tail = self._tails.get(run_id)
        if tail is not None:
            if tail.owner != owner:
                raise RunNotFound(f"no run {run_id} of yours is kept")
            async for record in tail.follow(after_seq):
                yield record
            return
        with reaching_redis():
            async for record in self._follow_remote(run_id, owner, after_seq):
                yield record

    async def _follow_remote(
        self, run_id: str, owner: uuid.UUID, after_seq: int
    ) -> AsyncIterator[RunRecord]:
        """A run of another process (or one that ended): XREAD, blocking for new events;
        between them, check that the run ended or that its process is alive."""
        meta = {
            _text(k): _text(v) for k, v in (await self._redis.hgetall(self._key(run_id))).items()
        }
        if meta.get("owner") != str(owner):
            raise RunNotFound(f"no run {run_id} of yours is kept")
        last, end = after_seq, meta.get("end")
        events = self._key(run_id, ":events")
        block_ms = round(FOLLOW_BLOCK_SECONDS * 1000)
        while end is None or last < int(end):
            records = await self._read(events, last, block_ms)
            for record in records:
                if record.seq != last + 1:  # trimmed or expired under us: never a gap
                    raise RunEventsExpired(f"events of run {run_id} after {last} are gone")
                yield record
                last = record.seq
                if record.last:
                    return
            if records:
                continue
            end, alive = await self._state(run_id)
            if end is None and not alive and not await self._read(events, last, None):
                # Not ended, not alive, and its last record did not arrive meanwhile.
                stopped = RunStopped(RunInterrupted("the server running the run stopped"))
                yield RunRecord(last + 1, stopped)
                return

    async def _read(self, events: str, last: int, block_ms: int | None) -> list[RunRecord]:
        reply = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
            await self._redis.xread({events: f"0-{last}"}, count=READ_BATCH, block=block_ms),
        )
        return [run_codec.decode(fields[b"r"]) for _, entries in reply for _, fields in entries]

    async def _state(self, run_id: str) -> tuple[str | None, bool]:
        """The run's last seq once it ended, and whether its process is alive."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._key(run_id), "end")
            pipe.exists(self._key(run_id, ":alive"))
            end, alive = await pipe.execute()
        return _text(end), bool(alive)

    async def request_cancel(self, run_id: str) -> None:
        with reaching_redis():
            await self._redis.set(self._key(run_id, ":cancel"), 1, px=self._ttl_ms)

    async def cancel_requests(self, run_ids: Collection[str]) -> set[str]:
        ids = list(run_ids)
        async with self._redis.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.exists(self._key(run_id, ":cancel"))
            found = await pipe.execute()
        return {run_id for run_id, exists in zip(ids, found, strict=True) if exists}

    async def renew(self, run_ids: Collection[str]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.set(self._key(run_id, ":alive"), 1, px=self._lease_ms)
                pipe.pexpire(self._key(run_id), self._ttl_ms)
                pipe.pexpire(self._key(run_id, ":events"), self._ttl_ms)
            await pipe.execute()

    async def aclose(self) -> None:
        await self._redis.aclose()
