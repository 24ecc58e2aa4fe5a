"""`agentmesh kb import`: upload files and folders to the knowledge base, wait for their
ingestion and summarize, through the public gRPC API alone (the generated stubs).

Backpressure is not failure: RESOURCE_EXHAUSTED with a RetryInfo detail (the ingestion queue
is full, a rate limit) pauses every upload for the delay the server asks, capped and with a
little jitter, and the file is sent again. Any other error fails that file and the import
goes on; a refused identity (UNAUTHENTICATED, PERMISSION_DENIED) stops it.
"""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import asyncio
import hashlib
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import grpc
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from agentmesh.knowledge.v1 import knowledge_service_pb2_grpc as kb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.channels import connect

# The server judges a file by its content and only uses the name to tell Markdown from
# text; the client picks candidates by name, so a folder's other files are never sent.
ACCEPTED_SUFFIXES = (".pdf", ".docx", ".txt", ".md", ".markdown")
# This identity cannot import at all: stop rather than fail every file the same way.
FATAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# Paused uploads resume up to this fraction of the delay apart, not all in the same instant.
JITTER = 0.2
LIST_PAGE_SIZE = 200  # ListDocuments' maximum
MIN_RETRY_DELAY = 0.1  # a server asking for no delay still gets no tight loop of uploads
PAUSE_NOTE_SECONDS = 30.0  # without bars, pauses are noted at most this often
MAX_POLL_ERRORS = 10  # consecutive failed polls before the import gives up

Request = TypeVar("Request")
Response = TypeVar("Response")


class Outcome(StrEnum):
    READY = "ready"  # a new document, ingested
    FAILED = "failed"  # refused at upload, or ingestion ended FAILED
    DEDUPLICATED = "deduplicated"  # the same content was already a READY document
    SKIPPED = "skipped"  # not a knowledge-base format, or not a regular file


@dataclass
class FileResult:
    """One file of the import and what became of it (`outcome` None: not finished)."""

    path: Path
    outcome: Outcome | None = None
    reason: str = ""
    document_id: str = ""
    deduplicated: bool = False

    def finish(self, document: kb_pb.Document) -> None:
        if document.status == kb_pb.DOCUMENT_STATUS_READY:
            self.outcome = Outcome.DEDUPLICATED if self.deduplicated else Outcome.READY
        else:
            self.outcome = Outcome.FAILED
            self.reason = document.failure_reason or "ingestion failed"

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "outcome": self.outcome.value if self.outcome else "unfinished",
            "reason": self.reason,
            "document_id": self.document_id,
            "deduplicated": self.deduplicated,
        }


@dataclass(frozen=True)
class Credentials:
    """An access token, or an email and password to log in with (the token is then renewed)."""

    token: str = ""
    email: str = ""
    password: str = ""


@dataclass(frozen=True)
class ImportOptions:
    shared: bool = False
    concurrency: int = 4
    max_retry_delay: float = 60.0  # the longest pause, whatever delay the server asks
    poll_interval: float = 1.0
    timeout: float = 120.0  # of each RPC


@dataclass
class Summary:
    files: list[FileResult]
    backpressure_waits: int = 0
    token_renewals: int = 0
    stopped: str = ""

    def count(self, outcome: Outcome | None) -> int:
        return sum(1 for f in self.files if f.outcome == outcome)

    @property
    def exit_code(self) -> int:
        """2 when the import stopped, 1 when a file failed, else 0."""
        if self.stopped:
            return 2
        return 1 if self.count(Outcome.FAILED) else 0

    def as_json(self) -> dict[str, Any]:
        counts = {outcome.value: self.count(outcome) for outcome in Outcome}
        return {
            **counts,
            "unfinished": self.count(None),
            "backpressure_waits": self.backpressure_waits,
            "token_renewals": self.token_renewals,
            "stopped": self.stopped or None,
            "files": [f.as_json() for f in self.files],
        }

    def as_text(self) -> str:
        lines = [
            f"{self.count(Outcome.READY)} READY, {self.count(Outcome.FAILED)} FAILED, "
            f"{self.count(Outcome.DEDUPLICATED)} deduplicated, "
            f"{self.count(Outcome.SKIPPED)} skipped; "
            f"{self.backpressure_waits} backpressure waits."
        ]
        for outcome, title in ((Outcome.FAILED, "FAILED"), (Outcome.SKIPPED, "Skipped")):
            listed = [f for f in self.files if f.outcome == outcome]
            if listed:
                lines += [f"{title}:", *(f"  {f.path}: {f.reason}" for f in listed)]
        if self.stopped:
            lines.append(f"Stopped, {self.count(None)} files not finished: {self.stopped}")
        return "\n".join(lines)


def collect(paths: Sequence[Path]) -> list[FileResult]:
    """Every file named or under a named folder (hidden entries left out), once each; files
    of other formats are settled as skipped and missing paths as failed."""
    results: list[FileResult] = []
    seen: set[Path] = set()
    for path in paths:
        for file in _walk(path) if path.is_dir() else iter([path]):
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                results.append(_classified(file))
    return results


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (Path(root, name) for name in sorted(files) if not name.startswith("."))


def _classified(path: Path) -> FileResult:
    if not path.exists():
        return FileResult(path, Outcome.FAILED, "no such file or directory")
    if not path.is_file():
        return FileResult(path, Outcome.SKIPPED, "not a regular file")
    if path.suffix.lower() not in ACCEPTED_SUFFIXES:
        kind = f"'{path.suffix}'" if path.suffix else "no extension"
        accepted = " ".join(ACCEPTED_SUFFIXES)
        return FileResult(
            path, Outcome.SKIPPED, f"not a knowledge-base format ({kind}; {accepted})"
        )
    return FileResult(path)


def _read(path: Path) -> tuple[bytes, str]:
    content = path.read_bytes()
    return content, hashlib.sha256(content).hexdigest()


def backpressure(error: grpc.aio.AioRpcError) -> tuple[float, str] | None:
    """(delay, reason) when `error` asks to retry later: RESOURCE_EXHAUSTED with RetryInfo."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a trailer that contradicts the call's status
        return None
    delay, reason = None, "RESOURCE_EXHAUSTED"
    for detail in status.details if status is not None else []:
        retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
        if detail.Unpack(retry):
            delay = retry.retry_delay.ToTimedelta().total_seconds()
        elif detail.Unpack(info):
            reason = info.reason
    return None if delay is None else (delay, reason)


def describe(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"


class Session:
    """The stubs and the caller's access token, renewed with the refresh token of a login."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self.auth: auth_grpc.AuthServiceAsyncStub = auth_grpc.AuthServiceStub(channel)
        self.kb: kb_grpc.KnowledgeBaseServiceAsyncStub = kb_grpc.KnowledgeBaseServiceStub(channel)
        self._timeout = timeout
        self._access = ""
        self._refresh = ""
        self._renewing = asyncio.Lock()
        self.renewals = 0

    async def sign_in(self, credentials: Credentials) -> None:
        """Log in (or take the token) and check it with one cheap call, failing fast."""
        if credentials.token:
            self._access = credentials.token
        else:
            request = auth_pb.LoginRequest(email=credentials.email, password=credentials.password)
            response = await self.auth.Login(request, timeout=self._timeout)
            self._access, self._refresh = response.access_token, response.refresh_token
        await self.kb.ListDocuments(
            kb.ListDocumentsRequest(page_size=1), metadata=self._metadata(), timeout=self._timeout
        )

    async def call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        """`method(request)` as the caller; an expired access token is renewed once."""
        token = self._access
        try:
            return await self._send(method, request)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED or not await self._renew(token):
                raise
        return await self._send(method, request)

    async def _send(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        # wait_for_ready: a server restarting mid-import delays calls instead of failing files.
        return await method(
            request, metadata=self._metadata(), timeout=self._timeout, wait_for_ready=True
        )

    async def _renew(self, expired: str) -> bool:
        """A fresh access token, unless there is no refresh token; one refresh at a time,
        because the server rotates refresh tokens."""
        if not self._refresh:
            return False
        async with self._renewing:
            if self._access != expired:  # another call renewed it meanwhile
                return True
            response = await self.auth.RefreshToken(
                auth_pb.RefreshTokenRequest(refresh_token=self._refresh), timeout=self._timeout
            )
            self._access, self._refresh = response.access_token, response.refresh_token
            self.renewals += 1
        return True

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._access}"),)


class Pause:
    """Where uploads wait while the server pushes back: one refusal pauses every worker."""

    def __init__(self) -> None:
        self._until = 0.0
        self._span = 0.0

    def hold(self, seconds: float) -> bool:
        """Pause `seconds` from now; True when this starts a pause (not extends one)."""
        now = time.monotonic()
        starts = self._until <= now
        self._until, self._span = max(self._until, now + seconds), seconds
        return starts

    async def wait(self) -> None:
        while True:  # the pause may be extended while this worker sleeps
            left = self._until - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left + random.uniform(0, JITTER * self._span))


class Display:
    """Two progress bars (upload, ingestion) and notes above them on the terminal; without
    the bars, notes are plain lines on stderr, so logs stay readable."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._progress = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._upload = self._progress.add_task("upload", total=0, status="")
        self._ingest = self._progress.add_task("ingestion", total=0, status="")
        self._accepted = 0
        self._paused_noted: float | None = None

    def __enter__(self) -> Display:
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()

    def note(self, text: str) -> None:
        if self._enabled:
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def start(self, uploads: int) -> None:
        self._progress.update(self._upload, total=uploads)

    def paused(self, reason: str, seconds: float, waits: int) -> None:
        status = f"server busy ({reason}): waiting {seconds:.1f}s"
        self._progress.update(self._upload, status=status)
        now = time.monotonic()
        if self._enabled:
            return
        if self._paused_noted is not None and now - self._paused_noted < PAUSE_NOTE_SECONDS:
            return
        self._paused_noted = now
        self.note(f"{status}, then uploads resume (waits so far: {waits})")

    def uploaded(self) -> None:
        self._accepted += 1
        self._progress.update(self._upload, advance=1, status="")
        self._progress.update(self._ingest, total=self._accepted)

    def finished(self, result: FileResult, *, ingested: bool) -> None:
        self._progress.update(self._ingest if ingested else self._upload, advance=1)
        if result.outcome == Outcome.FAILED:
            self.settled(result)

    def settled(self, result: FileResult) -> None:
        label = "FAILED" if result.outcome == Outcome.FAILED else "skipped"
        self.note(f"{label} {result.path}: {result.reason}")


class Importer:
    """Uploads files with a few workers while one poller waits for their ingestion."""

    def __init__(self, session: Session, options: ImportOptions, display: Display) -> None:
        self._session = session
        self._options = options
        self._display = display
        self._pause = Pause()
        self._pending: dict[str, list[FileResult]] = {}  # document id → its files
        self._twins: dict[str, asyncio.Lock] = {}  # content digest → held while it uploads
        self._uploading = 0
        self.waits = 0

    async def run(self, uploads: list[FileResult]) -> None:
        """Raises the AioRpcError that stopped the import, if one did."""
        todo = iter(uploads)
        self._uploading = min(self._options.concurrency, len(uploads))
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self._uploading):
                    group.create_task(self._upload_all(todo))
                group.create_task(self._poll())
        except* grpc.aio.AioRpcError as stopped:
            raise stopped.exceptions[0] from None

    async def _upload_all(self, todo: Iterator[FileResult]) -> None:
        try:
            for result in todo:
                await self._upload(result)
        finally:
            self._uploading -= 1

    async def _upload(self, result: FileResult) -> None:
        try:
            content, digest = await asyncio.to_thread(_read, result.path)
        except OSError as error:
            self._fail(result, f"cannot read the file: {error.strerror}")
            return
        request = kb.UploadDocumentRequest(
            filename=result.path.name, content=content, shared=self._options.shared
        )
        # The server deduplicates against what it has stored: twins in flight together
        # could both be stored, so a file waits while one with its content uploads.
        async with self._twins.setdefault(digest, asyncio.Lock()):
            try:
                response = await self._send(request)
            except grpc.aio.AioRpcError as error:
                if error.code() in FATAL_CODES:
                    raise
                self._fail(result, describe(error))
                return
        result.document_id = response.document.document_id
        result.deduplicated = response.deduplicated
        self._display.uploaded()
        if response.document.status == kb_pb.DOCUMENT_STATUS_PROCESSING:
            self._pending.setdefault(result.document_id, []).append(result)
        else:
            self._finish(result, response.document)

    async def _send(self, request: kb.UploadDocumentRequest) -> kb.UploadDocumentResponse:
        """Upload, waiting out every RESOURCE_EXHAUSTED that says when to retry."""
        while True:
            await self._pause.wait()
            try:
                return await self._session.call(self._session.kb.UploadDocument, request)
            except grpc.aio.AioRpcError as error:
                retry = backpressure(error)
                if retry is None:
                    raise
            self.waits += 1
            delay = max(MIN_RETRY_DELAY, min(retry[0], self._options.max_retry_delay))
            reason = retry[1]
            if self._pause.hold(delay):
                self._display.paused(reason, delay, self.waits)

    def _fail(self, result: FileResult, reason: str, *, ingested: bool = False) -> None:
        result.outcome, result.reason = Outcome.FAILED, reason
        self._display.finished(result, ingested=ingested)

    def _finish(self, result: FileResult, document: kb_pb.Document) -> None:
        result.finish(document)
        self._display.finished(result, ingested=True)

    async def _poll(self) -> None:
        """Settle pending documents as their ingestion ends, until nothing is left to do."""
        errors = 0
        while self._uploading or self._pending:
            await asyncio.sleep(self._options.poll_interval)
            if not self._pending:
                continue
            try:
                await self._poll_once()
                errors = 0
            except grpc.aio.AioRpcError as error:
                errors += 1
                if error.code() in FATAL_CODES or errors >= MAX_POLL_ERRORS:
                    raise

    async def _poll_once(self) -> None:
        """One ListDocuments pass names what still processes; the rest are fetched once."""
        processing = await self._processing()
        for document_id in [d for d in self._pending if d not in processing]:
            try:
                response = await self._session.call(
                    self._session.kb.GetDocument, kb.GetDocumentRequest(document_id=document_id)
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                for result in self._pending.pop(document_id):
                    self._fail(result, "the document was deleted meanwhile", ingested=True)
                continue
            if response.document.status != kb_pb.DOCUMENT_STATUS_PROCESSING:
                for result in self._pending.pop(document_id):
                    self._finish(result, response.document)

    async def _processing(self) -> set[str]:
        ids: set[str] = set()
        request = kb.ListDocumentsRequest(
            page_size=LIST_PAGE_SIZE, status=kb_pb.DOCUMENT_STATUS_PROCESSING
        )
        while True:
            page = await self._session.call(self._session.kb.ListDocuments, request)
            ids.update(d.document_id for d in page.documents)
            if not page.next_page_token:
                return ids
            request.page_token = page.next_page_token


def stop_reason(error: grpc.aio.AioRpcError, target: str, credentials: Credentials) -> str:
    code = error.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        advice = "; pass a fresh one, or log in with --email" if credentials.token else ""
        return f"the server at {target} refused the credentials ({error.details()}){advice}"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"the server at {target} refused the import ({error.details()})"
    return f"cannot go on with the server at {target}: {describe(error)}"


async def import_paths(
    target: str,
    credentials: Credentials,
    paths: Sequence[Path],
    options: ImportOptions,
    display: Display,
) -> Summary:
    """Import every accepted file under `paths`; the summary says what became of each."""
    files = await asyncio.to_thread(collect, paths)
    summary = Summary(files)
    for result in files:
        if result.outcome is not None:
            display.settled(result)
    async with connect(target) as channel:
        session = Session(channel, options.timeout)
        importer = Importer(session, options, display)
        uploads = [f for f in files if f.outcome is None]
        try:
            await session.sign_in(credentials)
            display.start(len(uploads))
            await importer.run(uploads)
        except grpc.aio.AioRpcError as error:
            summary.stopped = stop_reason(error, target, credentials)
        summary.backpressure_waits, summary.token_renewals = importer.waits, session.renewals
    return summary
