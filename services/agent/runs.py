"""The runs this process executes. Each is a task owned here, not by the RPC that started it:
a dropped stream leaves it running, and its events go to the run log, where any stream of
its owner (on any replica) follows them. A run stops when it ends, when its owner cancels it
(here, or from another replica through the log, polled every CANCEL_POLL_SECONDS), or when
the process shuts down (its streams then end interrupted)."""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.agent.events import Event
from services.agent.run_log import (
    RUN_LEASE_SECONDS,
    RunCancelled,
    RunFailed,
    RunInterrupted,
    RunLog,
    RunNotFound,
    RunRecord,
    RunStopped,
)
from services.agent.run_slots import RunSlots
from services.errors import DomainError, QuotaViolation, ResourceExhausted
from services.outages import outage_of

logger = logging.getLogger("agentmesh.agent.runs")

# How often cancellations asked on other replicas are looked for (CancelRun acts within a
# second), and how often this process says its runs are alive (well within their lease).
CANCEL_POLL_SECONDS = 0.2
RENEW_SECONDS = RUN_LEASE_SECONDS / 5


@dataclass
class _Running:
    owner: uuid.UUID
    task: "asyncio.Task[None] | None" = None
    started: bool = False  # its task has begun (cancelling it earlier would skip its end)
    stopped_by: DomainError | None = None  # why it was stopped, when it was


class RunManager:
    """Starts runs as tasks of this process, cancels them, and counts each user's runs in
    flight against a cap (RunSlots: per process, or across replicas)."""

    def __init__(self, log: RunLog, slots: RunSlots) -> None:
        self._log = log
        self._slots = slots
        self._running: dict[str, _Running] = {}
        self._watcher: asyncio.Task[None] | None = None

    async def admit(self, user_id: uuid.UUID, run_id: str, limit: int) -> None:
        """Count a new run against the user's cap, or refuse it (RESOURCE_EXHAUSTED)."""
        if not await self._slots.acquire(user_id, run_id, limit):
            raise ResourceExhausted(
                f"at most {limit} agent runs at a time per user",
                retry_after=1.0,
                violations=[QuotaViolation(f"user:{user_id}", "concurrent agent runs")],
                reason="TOO_MANY_CONCURRENT_RUNS",
            )

    async def release(self, user_id: uuid.UUID, run_id: str) -> None:
        """Give back the slot of a run that was admitted but never launched."""
        await self._slots.release(user_id, run_id)

    async def open(self, run_id: str, owner: uuid.UUID) -> None:
        """Start the log of an admitted run, before its events can come."""
        await self._log.open(run_id, owner)
        self._running[run_id] = _Running(owner)

    def launch(self, run_id: str, events: AsyncIterator[Event]) -> None:
        """Run `events` (the run, opened with `open`) as a task of this process."""
        running = self._running[run_id]
        running.task = asyncio.create_task(self._drive(run_id, events), name=f"agent-run-{run_id}")
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="agent-run-watcher")

    async def _drive(self, run_id: str, events: AsyncIterator[Event]) -> None:
        """Append each event with its seq; then the run's end, however it came."""
        running = self._running[run_id]
        running.started = True
        seq, ended, stopped = 0, False, running.stopped_by  # stopped before it began?
        try:
            if stopped is None:
                async for event in events:
                    seq += 1
                    record = RunRecord(seq, event)
                    self._log.append(run_id, record)
                    ended = record.last
        except asyncio.CancelledError:
            # Handled: this task goes on to log the end (nothing else cancels it).
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            stopped = running.stopped_by or RunInterrupted("the run was stopped by its server")
        except DomainError as error:
            stopped = error
        except Exception as exc:
            if (outage := outage_of(exc)) is not None:  # the database or Redis went away
                logger.warning("agent run %s: %s: %r", run_id, outage.reason, exc)
                stopped = outage
            else:
                logger.exception("agent run %s failed", run_id)
                stopped = RunFailed()
        del self._running[run_id]
        if not ended:  # a run without its last record would keep its followers waiting
            self._log.append(run_id, RunRecord(seq + 1, RunStopped(stopped or RunFailed())))
        try:
            await self._log.close(run_id)
            await self._slots.release(running.owner, run_id)
        except Exception:  # Redis failing: the slot's lease and the log expire by themselves
            logger.warning("run %s: closing its log or slot failed", run_id, exc_info=True)

    def follow(self, run_id: str, owner: uuid.UUID, after_seq: int) -> AsyncIterator[RunRecord]:
        """The run's records after `after_seq`, then each new one until its last."""
        return self._log.follow(run_id, owner, after_seq)

    async def cancel(self, run_id: str, owner: uuid.UUID) -> None:
        """Stop `owner`'s run, here or on the replica that runs it; nothing when it ended."""
        if await self._log.owner(run_id) != owner:
            raise RunNotFound(f"no run {run_id} of yours is kept")
        if run_id in self._running:
            self.stop_run(run_id, RunCancelled("the run was cancelled by its owner"))
        else:
            await self._log.request_cancel(run_id)

    def stop_run(self, run_id: str, why: DomainError) -> None:
        """Cancel a run of this process; its streams end with `why`."""
        running = self._running.get(run_id)
        if running is not None and running.stopped_by is None:
            running.stopped_by = why
            if running.started and running.task is not None:
                running.task.cancel()

    async def _watch(self) -> None:
        """While runs are running: act on cancellations asked elsewhere, renew leases."""
        since_renewal = 0.0
        while True:
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            since_renewal += CANCEL_POLL_SECONDS
            running = dict(self._running)
            if not running:
                continue
            try:
                for run_id in await self._log.cancel_requests(list(running)):
                    self.stop_run(run_id, RunCancelled("the run was cancelled by its owner"))
                if since_renewal >= RENEW_SECONDS:
                    since_renewal = 0.0
                    await self._log.renew(list(running))
                    await self._slots.renew([(r.owner, run_id) for run_id, r in running.items()])
            except Exception:  # Redis failing: try again at the next tick
                logger.warning("watching the runs of this process failed", exc_info=True)

    async def stop(self) -> None:
        """Interrupt every run of this process (at shutdown) and wait until each has logged
        its end; then stop watching and release the log."""
        tasks = [r.task for r in self._running.values() if r.task is not None]
        for run_id in list(self._running):
            self.stop_run(run_id, RunInterrupted("the server shut down before the run ended"))
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._log.aclose()
