"""The knowledge base: documents in, passages out, each caller seeing only their own
documents and those of the collections they may read (collections.py)."""

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit.trail import Actor, AuditAction, AuditTrail
from services.auth.principal import Principal
from services.db import parse_uuid, require_uuid
from services.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Violations,
)
from services.knowledge import queries
from services.knowledge.acl_sync import AclSync
from services.knowledge.collection_access import (
    Access,
    document_collections,
    readable_ids,
    visible_documents,
)
from services.knowledge.collections import (
    MAX_UPLOAD_COLLECTIONS,
    CollectionService,
    add_to,
    require_access,
)
from services.knowledge.embeddings import Embedder
from services.knowledge.ingestion import Job, JobQueue, PassageIndex, QueueStats
from services.knowledge.lexical import LexicalEncoder
from services.knowledge.models import EVERYONE_COLLECTION_ID, Document, DocumentStatus, Stage
from services.knowledge.parsing import DocumentFormat, ParseLimits, inspect_upload
from services.knowledge.reranking import RERANK_DEPTH, CrossEncoderReranker
from services.knowledge.retrieval import (
    Candidate,
    Leg,
    Rerank,
    SearchMode,
    fuse,
    mmr,
    single_leg,
)
from services.knowledge.storage_quota import check_storage
from services.knowledge.vector_store import ChunkOwner, SearchScope, VectorStore, point_id
from services.metrics import Metrics
from services.pagination import decode_cursor, page_size, split_page
from services.teams.groups import uuid_field
from services.usage_events.recorder import EventKind, EventRecorder

MAX_FILENAME = 255
MAX_TITLE = 300
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 1024
MAX_QUERY = 2000
DEFAULT_TOP_K = 5
MAX_TOP_K = 100
MAX_DOCUMENT_FILTER = 100  # document ids one search may be narrowed to
MAX_READ_PASSAGES = 50  # passages one read of a document returns
# The payload keys candidates are ranked and checked by; the rest of a passage's payload
# (its text above all) is read only for the passages served.
HIT_FIELDS = ("document_id", "generation")
TEXT = "text"  # a key of the whole payload only
SEARCH_ATTEMPTS = 2


@dataclass(frozen=True)
class KnowledgeSettings:
    max_upload_bytes: int = 20 * 1024 * 1024
    dense_weight: float = 0.5
    candidates: int = 100
    parse_limits: ParseLimits = field(default_factory=ParseLimits)
    storage_quota_bytes: int = 1024**3  # per user; 0: unlimited


@dataclass(frozen=True)
class Upload:
    filename: str
    content: bytes
    title: str = ""
    metadata: Mapping[str, str] | None = None
    document_id: str = ""
    shared: bool = False  # into the collection every user reads (administrators only)
    collection_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class UploadResult:
    document: Document
    deduplicated: bool


@dataclass(frozen=True)
class DocumentPage:
    documents: list[Document]
    next_page_token: str


@dataclass(frozen=True)
class SearchRequest:
    query: str
    top_k: int = 0
    document_ids: tuple[str, ...] = ()
    min_score: float = 0.0
    mode: SearchMode = SearchMode.HYBRID
    rerank: Rerank = Rerank.NONE
    collection_ids: tuple[str, ...] = ()  # empty: own documents + every readable collection


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk, with what an answer needs to cite it."""

    chunk_id: str
    document_id: uuid.UUID
    document_title: str
    text: str
    score: float
    page: int
    start: int
    end: int
    chunk_index: int
    legs: frozenset[Leg]


class KnowledgeService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        store: VectorStore,
        embedder: Embedder,
        lexical: LexicalEncoder,
        ingestion: JobQueue,
        executor: ThreadPoolExecutor,
        settings: KnowledgeSettings,
        events: EventRecorder,
        metrics: Metrics,
        reranker: CrossEncoderReranker | None = None,
        *,
        audit: AuditTrail | None = None,
    ) -> None:
        self._audit = audit  # records every deletion (only owners delete their documents)
        self._events = events
        self._metrics = metrics
        self._sessions = sessions
        self._store = store
        self._embedder = embedder
        self._lexical = lexical
        self._ingestion = ingestion
        self._executor = executor
        self._settings = settings
        self._reranker = reranker
        self._acl = AclSync(sessions, store)
        self.collections = CollectionService(sessions, self._acl)

    async def ping_store(self) -> None:
        """Raise unless the vector store answers (the dependency probe)."""
        await self._store.ping()

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    @property
    def index(self) -> PassageIndex:
        """The vector store's writes, for the internal indexing service of the process
        that owns the embedded store (ingestion workers elsewhere write through it)."""
        return self._store

    async def queue_stats(self) -> QueueStats:
        """How many ingestion jobs wait, run, wait for a retry or failed; the oldest's age."""
        return await self._ingestion.stats()

    async def start(self) -> None:
        """Create the collection if needed, then start the ingestion queue."""
        await self._store.ensure_collection(self._embedder.dimension)
        await self._ingestion.start()
        self._acl.start()  # documents whose collections changed while no one wrote them

    async def stop(self) -> None:
        """Stop ingesting (interrupted documents resume on the next start), release resources."""
        await self._ingestion.stop()
        await self._acl.stop()
        await self._store.close()
        self._embedder.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def upload(self, principal: Principal, upload: Upload) -> UploadResult:
        """Store the upload and queue its ingestion; identical content is not ingested twice."""
        replaces, targets = _validate_upload(upload, self._settings.max_upload_bytes)
        if upload.shared and not principal.is_admin:
            raise PermissionDenied(
                "only administrators can share documents", reason="SHARING_NOT_ALLOWED"
            )
        if upload.shared:
            targets = (*targets, EVERYONE_COLLECTION_ID)
        loop = asyncio.get_running_loop()
        fmt = await loop.run_in_executor(
            self._executor,
            inspect_upload,
            upload.content,
            upload.filename,
            self._settings.parse_limits,
        )
        digest = await loop.run_in_executor(self._executor, _sha256, upload.content)
        await self._ingestion.check_capacity()
        async with self._sessions.begin() as s:
            for target in targets:
                await require_access(s, principal, target, Access.WRITE)
            # One owner's uploads take turns (the dedup and the quota check below).
            document = None
            if replaces is not None:
                document = await self._replaceable(s, principal, replaces)
            owner_id = document.owner_id if document is not None else principal.user_id
            if self._settings.storage_quota_bytes:
                await queries.lock_owner(s, owner_id=owner_id)
            if replaces is None:
                document = await queries.find_same_content(s, owner_id=owner_id, sha256=digest)
            same = document is not None and (
                replaces is None or _same_live_content(document, digest)
            )
            if same:
                assert document is not None
                result = UploadResult(document, deduplicated=True)
            else:
                result = await self._store_upload(s, principal, upload, fmt, digest, document)
            for target in targets:
                await add_to(s, target, result.document.id)
        if targets:
            await self._acl.sync([result.document.id])
        if not result.deduplicated:
            assert result.document.pending_generation is not None
            await self._ingestion.submit(
                Job(result.document.id, result.document.pending_generation)
            )
        self._uploaded(principal, upload, fmt, deduplicated=result.deduplicated)
        return result

    async def _store_upload(
        self,
        s: AsyncSession,
        principal: Principal,
        upload: Upload,
        fmt: DocumentFormat,
        digest: str,
        document: Document | None,
    ) -> UploadResult:
        """Keep the new content of `document` (None: a new document of the caller)."""
        # A replacement's new content counts towards its owner's quota, whoever sends it.
        owner_id = document.owner_id if document is not None else principal.user_id
        if document is None:
            document = Document(owner_id=owner_id)
            s.add(document)
        generation = uuid.uuid4().hex
        document.filename = upload.filename
        # A replacement keeps its title unless the request names a new one.
        document.title = upload.title or document.title or _default_title(upload.filename)
        document.document_type = fmt.value
        document.size_bytes = len(upload.content)
        document.content_sha256 = digest
        document.extra = dict(upload.metadata or {})
        document.status = DocumentStatus.PROCESSING
        document.stage = Stage.QUEUED
        document.failure_reason = None
        document.pending_generation = generation
        await s.flush()
        await check_storage(
            s,
            owner_id=owner_id,
            limit=self._settings.storage_quota_bytes,
            upload_bytes=len(upload.content),
        )
        await queries.put_upload(
            s, document_id=document.id, generation=generation, content=upload.content
        )
        return UploadResult(document, deduplicated=False)

    async def _replaceable(
        self, s: AsyncSession, principal: Principal, document_id: uuid.UUID
    ) -> Document:
        """The document the caller replaces the content of, locked: their own, or one in a
        collection they may write; NOT_FOUND if they cannot see it, PERMISSION_DENIED if
        they can but may not change it."""
        document = await queries.get_visible(
            s, visible_documents(principal), document_id=document_id
        )
        if document is None:
            raise _not_found()
        if document.owner_id != principal.user_id:
            held = (await document_collections(s, [document.id]))[document.id]
            for held_by in held:
                try:
                    await require_access(s, principal, held_by, Access.WRITE)
                    break
                except (NotFound, PermissionDenied):
                    continue
            else:
                raise PermissionDenied(
                    "you may read this document but not replace it", reason="DOCUMENT_READ_ONLY"
                )
        locked = await queries.get_owned(
            s, owner_id=document.owner_id, document_id=document.id, lock=True
        )
        if locked is None:  # deleted meanwhile
            raise _not_found()
        return locked

    def _uploaded(
        self, principal: Principal, upload: Upload, fmt: DocumentFormat, *, deduplicated: bool
    ) -> None:
        self._events.record(
            EventKind.DOCUMENT_UPLOAD,
            user_id=principal.user_id,
            success=True,
            data={"format": fmt.value, "bytes": len(upload.content), "deduplicated": deduplicated},
        )

    async def get(self, principal: Principal, document_id: str) -> Document:
        """A document the caller owns or may read through a collection; NOT_FOUND otherwise."""
        parsed = _document_id(document_id)
        async with self._sessions.begin() as s:
            document = await queries.get_visible(
                s, visible_documents(principal), document_id=parsed
            )
        if document is None:
            raise _not_found()
        return document

    async def list_documents(
        self,
        principal: Principal,
        *,
        requested_page_size: int,
        page_token: str,
        status: DocumentStatus | None = None,
        collection: str = "",
    ) -> DocumentPage:
        """The caller's documents, or those of a `collection` they may read, newest first,
        one keyset page at a time."""
        size = page_size(requested_page_size)
        after = decode_cursor(page_token)
        violations = Violations()
        listed = uuid_field(collection, "collection_id", violations) if collection else None
        violations.raise_if_any()
        async with self._sessions.begin() as s:
            if listed is not None:
                await require_access(s, principal, listed, Access.READ)
                documents = await queries.list_in_collection(
                    s, collection_id=listed, status=status, after=after, limit=size + 1
                )
            else:
                documents = await queries.list_owned(
                    s, owner_id=principal.user_id, status=status, after=after, limit=size + 1
                )
        return DocumentPage(*split_page(documents, size))

    async def collections_of(
        self, principal: Principal, documents: list[Document]
    ) -> dict[uuid.UUID, list[uuid.UUID]]:
        """The collections holding each document that the caller may read."""
        async with self._sessions() as s:
            return await document_collections(s, [d.id for d in documents], readable_by=principal)

    async def delete(self, principal: Principal, document_id: str) -> None:
        """Delete the caller's document, its waiting upload and its passages."""
        parsed = _document_id(document_id)
        async with self._sessions.begin() as s:
            document = await queries.get_owned(
                s, owner_id=principal.user_id, document_id=parsed, lock=True
            )
            if document is None:
                raise _not_found()
            await s.delete(document)
        if self._audit is not None:
            await self._audit.record(
                AuditAction.DOCUMENT_DELETED,
                actor=Actor.of(principal),
                target_type="document",
                target_id=parsed,
                data={"owner_id": str(document.owner_id)},
            )
        # Searches drop hits of documents that no longer exist, so the rows going first
        # hides the passages at once even if removing the points fails.
        await self._store.delete_document(parsed)

    async def read_passages(
        self, principal: Principal, document_id: str, *, first: int = 0, limit: int = 20
    ) -> tuple[Document, list[Passage]]:
        """A document the caller may see (as `get`) and its passages `first`.. in document
        order, as indexed at its current generation (score 0: nothing was ranked)."""
        violations = Violations()
        if first < 0:
            violations.add("first", "must be 0 or more")
        if not 1 <= limit <= MAX_READ_PASSAGES:
            violations.add("limit", f"must be between 1 and {MAX_READ_PASSAGES}")
        violations.raise_if_any()
        document = await self.get(principal, document_id)
        if document.generation is None:  # nothing indexed yet
            return document, []
        # Point ids are derived from (document, generation, chunk index), so the current
        # generation's passages are read by id: no scan, and never an old generation's.
        owner = ChunkOwner(document.id, document.generation, document.owner_id)
        indexes = range(first, min(first + limit, document.chunk_count))
        ids = [point_id(owner, index) for index in indexes]
        payloads = await self._store.payloads(ids)
        candidates = [Candidate(i, payloads[i]) for i in ids if i in payloads]
        return document, [_passage(candidate, document) for candidate in candidates]

    async def indexed_chunks(self, document_id: uuid.UUID) -> int:
        """How many points the index holds for a document, over all its generations."""
        return await self._store.count(document_id)

    async def purge_owner(self, owner_id: uuid.UUID) -> None:
        """Remove every passage of a deleted account (its rows went by cascade)."""
        await self._store.delete_owner(owner_id)

    async def search(self, principal: Principal, request: SearchRequest) -> list[Passage]:
        """The best passages the caller may see for `request.query`."""
        top_k, document_ids, named = _validate_search(request)
        if request.rerank is Rerank.CROSS_ENCODER and self._reranker is None:
            raise FailedPrecondition(
                "no cross-encoder is configured (AGENTMESH_RERANKER_MODEL)",
                reason="RERANKER_NOT_CONFIGURED",
            )
        started = time.perf_counter()
        scope = await self._scope(principal, named, document_ids)
        passages = await self._search(principal, request, scope, top_k) if not scope.empty else []
        self._metrics.retrieval_seconds.observe(time.perf_counter() - started)
        self._metrics.retrieval_hits.observe(len(passages))
        return passages

    async def _scope(
        self,
        principal: Principal,
        named: tuple[uuid.UUID, ...],
        document_ids: tuple[uuid.UUID, ...],
    ) -> SearchScope:
        """What the caller may search now: the collections named (each checked), or their
        own documents plus every collection they may read, from the database (no cache, so
        a revoked grant or a removed member counts from this search on)."""
        async with self._sessions() as s:
            if named:
                for collection in named:
                    await require_access(s, principal, collection, Access.READ)
                return SearchScope(None, named, document_ids)
            return SearchScope(principal.user_id, await readable_ids(s, principal), document_ids)

    async def _search(
        self,
        principal: Principal,
        request: SearchRequest,
        scope: SearchScope,
        top_k: int,
    ) -> list[Passage]:
        # The legs return point ids; the passages' text is read afterwards. A point can go
        # in between (its generation swapped out, its document deleted): the search then
        # looks once more, at the index as it is now, rather than serve fewer passages. That
        # look reads every candidate's whole payload with the query itself, so nothing can
        # go in between again (only then: carrying every candidate's text slows the query).
        for attempt in range(SEARCH_ATTEMPTS):
            whole = attempt > 0
            passages, moved = await self._search_once(principal, request, scope, top_k, whole=whole)
            if not moved:
                break
        return passages

    async def _search_once(
        self,
        principal: Principal,
        request: SearchRequest,
        scope: SearchScope,
        top_k: int,
        *,
        whole: bool = False,
    ) -> tuple[list[Passage], bool]:
        """The passages, and whether a chosen point vanished before its text was read
        (never when `whole`: the legs then return every candidate's whole payload)."""
        ranked = await self._retrieve(request, scope, top_k, whole=whole)
        candidates, documents = await self._served(
            principal, scope, ranked, _pool(request, top_k, ranked)
        )
        text_first = request.rerank is Rerank.CROSS_ENCODER  # the cross-encoder reads it
        moved = False
        if text_first:
            candidates, moved = await self._with_payloads(candidates)
        candidates = (await self._rerank(request, candidates, top_k))[:top_k]
        if not text_first:
            candidates, moved = await self._with_payloads(candidates)
        passages = [_passage(c, documents[_document_of(c)]) for c in candidates]
        if request.min_score:
            passages = [p for p in passages if p.score >= request.min_score]
        return passages, moved

    async def _retrieve(
        self, request: SearchRequest, scope: SearchScope, top_k: int, *, whole: bool = False
    ) -> list[Candidate]:
        mode = request.mode
        dense = (
            await self._embedder.encode_query(request.query)
            if mode is not SearchMode.SPARSE
            else None
        )
        sparse = self._lexical.encode_query(request.query) if mode is not SearchMode.DENSE else None
        dense_hits, sparse_hits = await self._store.search(
            scope,
            dense=dense,
            sparse=sparse,
            limit=max(self._settings.candidates, top_k),
            fields=None if whole else HIT_FIELDS,
        )
        if mode is SearchMode.DENSE:
            return single_leg(dense_hits, Leg.DENSE)
        if mode is SearchMode.SPARSE:
            return single_leg(sparse_hits, Leg.SPARSE)
        return fuse(dense_hits, sparse_hits, self._settings.dense_weight)

    async def _rerank(
        self, request: SearchRequest, candidates: list[Candidate], top_k: int
    ) -> list[Candidate]:
        if request.rerank is Rerank.MMR:
            vectors = await self._store.dense_vectors([c.point_id for c in candidates])
            return mmr(candidates, vectors, limit=top_k)
        if request.rerank is Rerank.CROSS_ENCODER and self._reranker is not None:
            return await self._reranker.rerank(request.query, candidates)
        return candidates

    async def _served(
        self, principal: Principal, scope: SearchScope, ranked: list[Candidate], wanted: int
    ) -> tuple[list[Candidate], dict[uuid.UUID, Document]]:
        """The best `wanted` candidates whose document the caller sees at their generation.

        The vector filter already limits hits to the scope's documents; checking against
        the database as well hides a replaced generation the moment the new one is
        published (the atomic swap), the passages of a document deleted a moment ago, and
        those of a document that left a collection while its points' copy of its
        collections is not yet rewritten (acl_sync.py).
        Only the documents of the candidates that may be served are read: the first
        `wanted`, then twice as many more while stale ones leave the count short.
        """
        visible = visible_documents(principal, scope.collection_ids, own=scope.owner_id is not None)
        served: list[Candidate] = []
        documents: dict[uuid.UUID, Document] = {}
        checked: set[uuid.UUID] = set()
        start, batch = 0, wanted
        while len(served) < wanted and start < len(ranked):
            window = ranked[start : start + batch]
            start, batch = start + batch, batch * 2
            unchecked = {_document_of(c) for c in window} - checked
            if unchecked:
                async with self._sessions.begin() as s:
                    documents |= await queries.current_generations(
                        s, visible, document_ids=unchecked
                    )
                checked |= unchecked
            served += [c for c in window if _is_served(c, documents)]
        return served[:wanted], documents

    async def _with_payloads(self, candidates: list[Candidate]) -> tuple[list[Candidate], bool]:
        """`candidates` with their whole payloads, and whether any point had gone meanwhile."""
        if all(TEXT in c.payload for c in candidates):  # read with the query (or none)
            return candidates, False
        payloads = await self._store.payloads([c.point_id for c in candidates])
        present = [c for c in candidates if c.point_id in payloads]
        for candidate in present:
            candidate.payload = payloads[candidate.point_id]
        return present, len(present) < len(candidates)


def _pool(request: SearchRequest, top_k: int, ranked: list[Candidate]) -> int:
    """How many served candidates the reranking step chooses the `top_k` passages from."""
    if request.rerank is Rerank.MMR:  # diversity over every candidate the legs returned
        return len(ranked)
    if request.rerank is Rerank.CROSS_ENCODER:
        return RERANK_DEPTH
    return top_k


def _document_of(candidate: Candidate) -> uuid.UUID:
    return uuid.UUID(candidate.payload["document_id"])


def _is_served(candidate: Candidate, documents: dict[uuid.UUID, Document]) -> bool:
    document = documents.get(_document_of(candidate))
    return document is not None and document.generation == candidate.payload["generation"]


def _passage(candidate: Candidate, document: Document) -> Passage:
    payload = candidate.payload
    return Passage(
        chunk_id=candidate.point_id,
        document_id=document.id,
        document_title=document.title,
        text=payload["text"],
        score=candidate.score,
        page=int(payload["page"]),
        start=int(payload["start"]),
        end=int(payload["end"]),
        chunk_index=int(payload["chunk_index"]),
        legs=frozenset(candidate.legs),
    )


def _validate_upload(
    upload: Upload, max_bytes: int
) -> tuple[uuid.UUID | None, tuple[uuid.UUID, ...]]:
    """Check the request's fields; returns the id of the document to replace, if any, and
    the collections to put the document in."""
    if len(upload.content) > max_bytes:
        raise ResourceExhausted(
            f"the document is {len(upload.content)} bytes; the limit is {max_bytes} bytes",
            reason="DOCUMENT_TOO_LARGE",
        )
    violations = Violations()
    if not upload.filename.strip():
        violations.add("filename", "is required")
    elif len(upload.filename) > MAX_FILENAME or "/" in upload.filename or "\\" in upload.filename:
        violations.add("filename", f"must be a file name of at most {MAX_FILENAME} characters")
    if len(upload.title) > MAX_TITLE:
        violations.add("title", f"must be at most {MAX_TITLE} characters")
    metadata = upload.metadata or {}
    if len(metadata) > MAX_METADATA_ENTRIES:
        violations.add("metadata", f"must have at most {MAX_METADATA_ENTRIES} entries")
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY:
            violations.add("metadata", f"keys must be 1 to {MAX_METADATA_KEY} characters")
        if len(value) > MAX_METADATA_VALUE:
            violations.add(f"metadata[{key}]", f"must be at most {MAX_METADATA_VALUE} characters")
    replaces = None
    if upload.document_id:
        replaces = parse_uuid(upload.document_id)
        if replaces is None:
            violations.add("document_id", "must be a UUID")
    targets = _ids(upload.collection_ids, "collection_ids", MAX_UPLOAD_COLLECTIONS, violations)
    violations.raise_if_any()
    return replaces, targets


def _ids(
    raw: tuple[str, ...], field: str, most: int, violations: Violations
) -> tuple[uuid.UUID, ...]:
    """The distinct ids of a repeated id field, at most `most`, with its violations."""
    if len(raw) > most:
        violations.add(field, f"must name at most {most}")
    ids = [uuid_field(value, f"{field}[{i}]", violations) for i, value in enumerate(raw[:most])]
    return tuple(dict.fromkeys(ids))


def _validate_search(
    request: SearchRequest,
) -> tuple[int, tuple[uuid.UUID, ...], tuple[uuid.UUID, ...]]:
    violations = Violations()
    if not request.query.strip():
        violations.add("query", "is required")
    elif len(request.query) > MAX_QUERY:
        violations.add("query", f"must be at most {MAX_QUERY} characters")
    if not 0 <= request.top_k <= MAX_TOP_K:
        violations.add("top_k", f"must be between 1 and {MAX_TOP_K} (0 means {DEFAULT_TOP_K})")
    if not math.isfinite(request.min_score):
        violations.add("min_score", "must be a finite number")
    document_ids = []
    if len(request.document_ids) > MAX_DOCUMENT_FILTER:
        violations.add("document_ids", f"must name at most {MAX_DOCUMENT_FILTER} documents")
    for index, raw in enumerate(request.document_ids[:MAX_DOCUMENT_FILTER]):
        parsed = parse_uuid(raw)
        if parsed is None:
            violations.add(f"document_ids[{index}]", "must be a UUID")
        else:
            document_ids.append(parsed)
    collections = _ids(request.collection_ids, "collection_ids", MAX_DOCUMENT_FILTER, violations)
    violations.raise_if_any()
    return request.top_k or DEFAULT_TOP_K, tuple(document_ids), collections


def _document_id(raw: str) -> uuid.UUID:
    return require_uuid(raw, field="document_id")


def _same_live_content(document: Document, digest: str) -> bool:
    return document.content_sha256 == digest and document.status != DocumentStatus.FAILED


def _default_title(filename: str) -> str:
    stem = filename.rsplit(".", 1)[0] if "." in filename.strip(".") else filename
    return stem[:MAX_TITLE]


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _not_found() -> NotFound:
    return NotFound("document not found", reason="DOCUMENT_NOT_FOUND")
