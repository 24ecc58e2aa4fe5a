"""Search filtered by collections at scale (issue 23): the permission filter of a caller who
owns documents and may read `--readable` collections, on the embedded Qdrant engine, beside
the unfiltered search and the owner-only filter in the same run.

The corpus is `bench.vector_scale`'s (384-d vectors around 256 topics, BM25 sparse vectors,
documents of `--doc-passages` passages over `--owners` owners), with no Everyone collection;
each document is then put in 1 to `--max-per-document` of `--collections` collections drawn
at random. `--groups` groups each hold read grants on an equal share of the collections, and
each caller is a member of just enough groups to read `--readable` collections. The index
query is what is measured: the caller's readable set is computed in Python, as the knowledge
base holds it after its one SQL query; that query (`collection_access.readable_ids`, the
service's own) is timed apart on SQLite with the same users, groups and grants, and must
return the same set.

Three searches per query, each both legs (dense + a 4-term sparse leg, top 10 each) in one
engine batch, interleaved query by query:

  (a) unfiltered     the same batch with no filter (the engine's floor)
  (b) owner only     `VectorStore.search(SearchScope(owner_id))`: the caller's own documents
  (c) owner or collections
                     `VectorStore.search(SearchScope(owner_id, readable))`: `scope_filter`'s
                     should[owner_id, collections MatchAny(readable)], as the service asks it,
                     with `fields=("document_id", "generation")`

It checks that every hit of (b) and (c) is the caller's or in a readable collection (and fails
otherwise), counts the hits, and compares the dense legs of (b) and (c) with the exact numpy
top 10 over the rows each may see (recall@10). Target: (c) p50 <= 10 ms at 100k passages.

    python -m bench.collections_scale [--size 100000] [--collections 1000] [--groups 200]
        [--readable 50] [--queries 200] [--json]
"""

import argparse
import asyncio
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench.vector_scale import (
    COLLECTION,
    F32,
    SETTLE_SECONDS,
    TOPICS,
    WARMUP,
    Bools,
    Corpus,
    Queries,
    Timed,
    build_corpus,
    build_queries,
    busy_cpu_seconds,
    load,
    query_sparse,
    summary,
    time_paths,
    top,
    unit,
)
from services.auth.models import User
from services.auth.principal import Principal, Role
from services.db import Base, create_engine
from services.knowledge.collection_access import group_grantee, readable_ids
from services.knowledge.lexical import SparseVector
from services.knowledge.models import Collection, CollectionGrant
from services.knowledge.qdrant_edge_store import QdrantEdgeStore, _query_batch
from services.knowledge.vector_backends import connect_vector_store
from services.knowledge.vector_store import DENSE, SPARSE, SearchScope, StoredHit
from services.teams.models import Group, GroupMember

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "build" / "bench" / "collections_scale.json"
TARGET_P50_MS = 10.0
TARGET_SIZE = 100_000
FIELDS = ("document_id", "generation")  # what the knowledge base asks of a search's hits
PATHS = {
    "unfiltered": "(a) unfiltered",
    "owner_only": "(b) owner only",
    "owner_or_collections": "(c) owner or {readable} collections",
}
SQL_TABLES = ("users", "groups", "group_members", "collections", "collection_grants")


@dataclass
class Sharing:
    """Collections, groups and grants, and what each owner (a caller) may read."""

    collection_ids: list[uuid.UUID]
    group_ids: list[uuid.UUID]
    granted: list[list[int]]  # group g's read grants (collection numbers)
    member_of: list[list[int]]  # owner o's groups
    readable: list[tuple[uuid.UUID, ...]]  # owner o's readable collections
    memberships: int  # (document, collection) pairs
    document_owner: dict[str, int]  # document id -> owner number
    document_collections: dict[str, frozenset[str]]  # document id -> collection ids
    masks: dict[str, list[Bools]]  # rows owner o may see, per filtered path


def share(
    rng: np.random.Generator, corpus: Corpus, args: argparse.Namespace, owners: int
) -> Sharing:
    """Put each document in 1..max collections; grant each group a share of them; make each
    owner a member of enough groups to read `args.readable` collections."""
    collection_ids = [uuid.UUID(bytes=rng.bytes(16), version=4) for _ in range(args.collections)]
    group_ids = [uuid.UUID(bytes=rng.bytes(16), version=4) for _ in range(args.groups)]
    order = rng.permutation(args.collections)
    granted = [part.tolist() for part in np.array_split(order, args.groups)]
    per_group = args.collections // args.groups
    joins = min(args.groups, math.ceil(args.readable / max(1, per_group)))
    member_of = [
        sorted(rng.choice(args.groups, size=joins, replace=False).tolist()) for _ in range(owners)
    ]
    readable = [
        tuple(sorted({collection_ids[c] for g in groups for c in granted[g]}, key=str))
        for groups in member_of
    ]
    memberships, document_owner, document_collections = 0, {}, {}
    owner_number = {owner_id: o for o, owner_id in enumerate(corpus.owner_ids)}
    for document in corpus.documents:
        count = int(rng.integers(1, args.max_per_document + 1))
        chosen = rng.choice(args.collections, size=count, replace=False).tolist()
        ids = tuple(sorted(str(collection_ids[c]) for c in chosen))
        document.owner = dataclasses.replace(document.owner, collection_ids=ids)
        memberships += count
        key = str(document.owner.document_id)
        document_owner[key] = owner_number[document.owner.owner_id]
        document_collections[key] = frozenset(ids)
    masks: dict[str, list[Bools]] = {"owner_only": [], "owner_or_collections": []}
    for o, readable_ids_ in enumerate(readable):
        reads = {str(c) for c in readable_ids_}
        own = np.zeros(corpus.size, dtype=np.bool_)
        either = np.zeros(corpus.size, dtype=np.bool_)
        for document in corpus.documents:
            key = str(document.owner.document_id)
            if document_owner[key] == o:
                own[document.start : document.stop] = True
            if document_owner[key] == o or reads & document_collections[key]:
                either[document.start : document.stop] = True
        masks["owner_only"].append(own)
        masks["owner_or_collections"].append(either)
    return Sharing(
        collection_ids,
        group_ids,
        granted,
        member_of,
        readable,
        memberships,
        document_owner,
        document_collections,
        masks,
    )


def scopes(corpus: Corpus, sharing: Sharing, owner: int) -> dict[str, SearchScope]:
    owner_id = corpus.owner_ids[owner]
    return {
        "owner_only": SearchScope(owner_id=owner_id),
        "owner_or_collections": SearchScope(
            owner_id=owner_id, collection_ids=sharing.readable[owner]
        ),
    }


# -- the readable set, from the database --------------------------------------------------


def database_rows(corpus: Corpus, sharing: Sharing) -> list[list[Base]]:
    """The callers, a curator owning every collection, the groups, then the memberships and
    grants (in stages: the tables have foreign keys but the models no relationships)."""
    curator = User(id=uuid.uuid4(), email="curator@bench.invalid")
    users: list[Base] = [curator]
    users += [User(id=user_id, email=f"{user_id}@bench.invalid") for user_id in corpus.owner_ids]
    users += [
        Group(id=group_id, name=f"group {n}", name_key=f"group {n}")
        for n, group_id in enumerate(sharing.group_ids)
    ]
    collections: list[Base] = [
        Collection(id=collection_id, name=f"collection {n}", owner_user_id=curator.id)
        for n, collection_id in enumerate(sharing.collection_ids)
    ]
    links: list[Base] = [
        GroupMember(group_id=sharing.group_ids[g], user_id=corpus.owner_ids[o], role="member")
        for o, groups in enumerate(sharing.member_of)
        for g in groups
    ]
    links += [
        CollectionGrant(
            collection_id=sharing.collection_ids[c],
            grantee=group_grantee(group_id),
            group_id=group_id,
            access="read",
        )
        for group_id, granted in zip(sharing.group_ids, sharing.granted, strict=True)
        for c in granted
    ]
    return [users, collections, links]


async def time_readable_sql(
    directory: Path, corpus: Corpus, sharing: Sharing, queries: Queries
) -> dict[str, Any]:
    """The service's readable-set query (`readable_ids`, one session each) on SQLite holding
    the same users, groups and grants; it must return the benchmark's sets."""
    engine = create_engine(f"sqlite+aiosqlite:///{directory / 'access.db'}")
    try:
        tables = [Base.metadata.tables[name] for name in SQL_TABLES]
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all, tables=tables)
        sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        async with sessions.begin() as s:
            for stage in database_rows(corpus, sharing):
                s.add_all(stage)
                await s.flush()
        principals = [Principal(owner_id, Role.USER) for owner_id in corpus.owner_ids]
        samples, mismatches = [], 0
        for i in range(-WARMUP, len(queries.owners)):
            owner = queries.owners[max(0, i)]
            started = time.perf_counter()
            async with sessions() as s:
                got = await readable_ids(s, principals[owner])
            elapsed = time.perf_counter() - started
            mismatches += set(got) != set(sharing.readable[owner])
            if i >= 0:
                samples.append(elapsed)
    finally:
        await engine.dispose()
    if mismatches:
        raise RuntimeError(
            f"readable_ids disagreed with the benchmark's readable set in {mismatches} queries"
        )
    return {"queries": len(samples), "same_set_as_python": True, **summary(samples)}


# -- the index ----------------------------------------------------------------------------

Legs = tuple[list[StoredHit], list[StoredHit]]


def unfiltered_requests(dense: list[float], sparse: SparseVector, limit: int) -> list[Any]:
    """`QdrantEdgeStore.search`'s batch for both legs, without a filter."""
    payload = qe.PayloadSelector.Include(list(FIELDS))
    vector = qe.SparseVector(sparse.indices, sparse.values)
    return [
        qe.QueryRequest(limit, query=qe.Query.Nearest(dense, using=DENSE), with_payload=payload),
        qe.QueryRequest(limit, query=qe.Query.Nearest(vector, using=SPARSE), with_payload=payload),
    ]


async def measure(
    store: QdrantEdgeStore, corpus: Corpus, sharing: Sharing, queries: Queries, limit: int
) -> tuple[dict[str, list[float]], dict[str, dict[int, Legs]]]:
    """Time the three searches, interleaved query by query, keeping every answer."""
    shard = store._require()  # the unfiltered batch runs on the store's own engine shard
    dense = [q.tolist() for q in queries.dense]
    sparse = [query_sparse(terms) for terms in queries.terms]
    scoped = [scopes(corpus, sharing, owner) for owner in queries.owners]
    answers: dict[str, dict[int, Legs]] = {name: {} for name in PATHS}

    async def unfiltered(i: int) -> None:
        requests = unfiltered_requests(dense[i], sparse[i], limit)
        legs = await asyncio.to_thread(_query_batch, shard, requests)
        answers["unfiltered"][i] = (legs[0], legs[1])

    def filtered(name: str) -> Timed:
        async def search(i: int) -> None:
            answers[name][i] = await store.search(
                scoped[i][name], dense=dense[i], sparse=sparse[i], limit=limit, fields=FIELDS
            )

        return search

    paths: dict[str, Timed] = {
        "unfiltered": unfiltered,
        "owner_only": filtered("owner_only"),
        "owner_or_collections": filtered("owner_or_collections"),
    }
    return await time_paths(paths, len(queries.owners)), answers


def exact_dense(corpus: Corpus, query: F32, mask: Bools, limit: int) -> set[int]:
    scores = corpus.dense @ query
    scores[~mask] = -np.inf
    rows, best = top(scores, np.arange(corpus.size, dtype=np.int64), limit)
    return set(rows[np.isfinite(best)].tolist())


def check(
    corpus: Corpus,
    sharing: Sharing,
    queries: Queries,
    answers: dict[str, dict[int, Legs]],
    limit: int,
) -> dict[str, dict[str, Any]]:
    """Per path: hits a query, hits outside the caller's reach, hits reached only through a
    collection, and recall@10 of the dense leg against the exact top 10 of what it may see."""
    result = {}
    for name, by_query in answers.items():
        hits, outside, via_collection, recalls = 0, 0, 0, []
        for i, (dense_hits, sparse_hits) in by_query.items():
            owner = queries.owners[i]
            reads = (
                {str(c) for c in sharing.readable[owner]}
                if name == "owner_or_collections"
                else set()
            )
            for hit in dense_hits + sparse_hits:
                document = str(hit.payload["document_id"])
                mine = sharing.document_owner[document] == owner
                through = bool(reads & sharing.document_collections[document])
                outside += not (mine or through)
                via_collection += through and not mine
            hits += len(dense_hits) + len(sparse_hits)
            mask = (
                sharing.masks[name][owner]
                if name in sharing.masks
                else np.ones(corpus.size, dtype=np.bool_)
            )
            exact = exact_dense(corpus, queries.dense[i], mask, limit)
            got = {corpus.rows[hit.point_id] for hit in dense_hits}
            recalls.append(len(got & exact) / max(1, len(exact)))
        result[name] = {
            "hits_per_query": hits / len(by_query),
            "hits_through_a_collection_per_query": via_collection / len(by_query),
            "hits_outside_reach": outside if name in sharing.masks else None,
            "dense_recall_at_k": statistics.fmean(recalls),
        }
    return result


# -- the run ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    machine_before, own_before = busy_cpu_seconds()
    wall_before = time.perf_counter()
    rng = np.random.default_rng(args.seed + args.size)
    topics = unit(rng.standard_normal((TOPICS, args.dim), dtype=np.float32))
    corpus = build_corpus(rng, topics, args.size, args.owners, 0.0, args.doc_passages)
    queries = build_queries(rng, topics, args.queries, args.owners)
    sharing = share(rng, corpus, args, args.owners)
    print(f"corpus generated in {time.perf_counter() - wall_before:.1f} s", flush=True)
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="bench-collections-") as tmp:
        sql = await time_readable_sql(Path(tmp), corpus, sharing, queries)
        store = connect_vector_store(
            url=None, api_key=None, data_dir=Path(tmp), collection=COLLECTION
        )
        if not isinstance(store, QdrantEdgeStore):
            raise RuntimeError("the embedded store was expected without a URL")
        try:
            await store.ensure_collection(args.dim)
            loaded = await load(store, corpus, rng)
            print(f"loaded: {loaded['passages_per_s']:.0f} passages/s", flush=True)
            await asyncio.sleep(SETTLE_SECONDS)
            gc.collect()
            samples, answers = await measure(store, corpus, sharing, queries, args.limit)
        finally:
            await store.close()
    machine_after, own_after = busy_cpu_seconds()
    others = (machine_after - machine_before) - (own_after - own_before)
    checks = check(corpus, sharing, queries, answers, args.limit)
    paths = {name: summary(values) for name, values in samples.items()}
    floor = paths["unfiltered"]["p50_ms"]
    visible = {
        name: statistics.fmean(float(masks[o].sum()) for o in queries.owners)
        for name, masks in sharing.masks.items()
    }
    p50 = paths["owner_or_collections"]["p50_ms"]
    return {
        "benchmark": "collections_scale",
        "backend": "qdrant-edge (connect_vector_store(url=None))",
        "cpus": os.cpu_count(),
        "other_processes_cpu_share": max(0.0, others) / (time.perf_counter() - wall_before),
        "passages": corpus.size,
        "documents": len(corpus.documents),
        "doc_passages": args.doc_passages,
        "owners": args.owners,
        "collections": args.collections,
        "collections_per_document_max": args.max_per_document,
        "collection_memberships": sharing.memberships,
        "groups": args.groups,
        "groups_per_caller": len(sharing.member_of[0]),
        "readable_collections": statistics.fmean(len(r) for r in sharing.readable),
        "visible_passages_mean": {"unfiltered": float(corpus.size), **visible},
        "queries": args.queries,
        "limit": args.limit,
        "seed": args.seed,
        "upsert": loaded,
        "paths": paths,
        "p50_over_unfiltered": {name: row["p50_ms"] / floor for name, row in paths.items()},
        "checks": checks,
        "readable_set_sql_sqlite": sql,
        "target_p50_ms_at_100k": TARGET_P50_MS,
        "target_met": p50 <= TARGET_P50_MS if corpus.size >= TARGET_SIZE else None,
    }


def print_report(report: dict[str, Any]) -> None:
    readable = report["readable_collections"]
    print(
        f"\n== {report['passages']:,} passages in {report['documents']:,} documents of "
        f"{report['owners']} owners; {report['collections']:,} collections (1 to "
        f"{report['collections_per_document_max']} a document: "
        f"{report['collection_memberships']:,} memberships); {report['groups']} groups with "
        f"read grants; a caller is in {report['groups_per_caller']} groups and reads "
        f"{readable:.0f} collections, the set computed in Python as the service holds it after "
        f"its one SQL query; {report['queries']} queries, dense + sparse leg, top "
        f"{report['limit']} each"
    )
    print(
        f"{'path':<34} {'visible':>9} {'p50 ms':>8} {'p95 ms':>8} {'p50 ÷ (a)':>10} "
        f"{'hits/query':>11} {'via coll.':>10} {'recall@10':>10}"
    )
    for name, label in PATHS.items():
        row, checks = report["paths"][name], report["checks"][name]
        print(
            f"{label.format(readable=f'{readable:.0f}'):<34} "
            f"{report['visible_passages_mean'][name]:9,.0f} {row['p50_ms']:8.2f} "
            f"{row['p95_ms']:8.2f} {report['p50_over_unfiltered'][name]:10.2f} "
            f"{checks['hits_per_query']:11.1f} "
            f"{checks['hits_through_a_collection_per_query']:10.1f} "
            f"{checks['dense_recall_at_k']:10.3f}"
        )
    sql = report["readable_set_sql_sqlite"]
    print(
        f"readable set on SQLite (collection_access.readable_ids, a session each): p50 "
        f"{sql['p50_ms']:.2f} ms, p95 {sql['p95_ms']:.2f} ms; the same set as Python's: "
        f"{'yes' if sql['same_set_as_python'] else 'NO'}"
    )
    outside = {name: report["checks"][name]["hits_outside_reach"] for name in PATHS}
    print(
        f"hits outside the caller's reach (own or readable collections): "
        f"(b) {outside['owner_only']}, (c) {outside['owner_or_collections']}; "
        f"upserts {report['upsert']['passages_per_s']:,.0f}/s; other processes used "
        f"{report['other_processes_cpu_share']:.0%} of a core meanwhile"
    )
    p50 = report["paths"]["owner_or_collections"]["p50_ms"]
    if report["target_met"] is None:
        verdict = f"(the target is for {TARGET_SIZE:,} passages)"
    else:
        verdict = "ok" if report["target_met"] else "MISSED"
    print(
        f"verdict: (c) owner or {readable:.0f} collections p50 {p50:.2f} ms ≤ "
        f"{TARGET_P50_MS:.0f} ms at {report['passages']:,} passages: {verdict} "
        f"({p50 + sql['p50_ms']:.2f} ms with the readable-set query on SQLite)"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=TARGET_SIZE, help="passages")
    parser.add_argument("--collections", type=int, default=1000)
    parser.add_argument("--max-per-document", type=int, default=3, help="collections a document")
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--readable", type=int, default=50, help="collections a caller reads")
    parser.add_argument("--owners", type=int, default=20)
    parser.add_argument("--doc-passages", type=int, default=32, help="passages per document")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--limit", type=int, default=10, help="hits per leg")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--json", action="store_true", help="also print the report as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.readable <= args.collections or args.groups > args.collections:
        parser.error("need 0 < --readable <= --collections and --groups <= --collections")
    report = asyncio.run(run(args))
    print_report(report)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    print(f"\nreport: {args.report}")
    outside = [report["checks"][name]["hits_outside_reach"] for name in PATHS]
    if any(outside):
        raise SystemExit(f"a search returned passages outside the caller's reach: {outside}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
