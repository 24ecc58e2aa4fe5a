"""Knowledge-base benchmark on the BEIR-format datasets in ../shared/datasets.

For each dataset, one real application (SQLite, embedded Qdrant, the packaged
all-MiniLM-L6-v2) is started in this process and everything goes through its gRPC port:

  quality      every corpus document is uploaded with UploadDocument (title + text as TXT);
               each test query is searched with SearchKnowledgeBase (top_k=100) in dense,
               sparse and hybrid mode; chunk hits become a document ranking (a document
               ranks where its best chunk does). Reports nDCG@10 and recall@100.
               The fusion sweep re-fuses the same dense and sparse RPC results with the
               server's own fusion functions for several dense weights and with RRF.
  ingestion    chunks/s from the first upload to the last READY document, divided by the
               chunks/s of a bare `model.encode` of the very same chunk texts (same model,
               batches of 32, torch on every core) in the same run. Target >= 0.80.
  latency      p50 of SearchKnowledgeBase over loopback divided by p50 of the same search
               function called in-process, alternating per query, query-embedding cache
               cleared before every call. Target <= 1.15.
  REST floor   p50 of POST /v1/kb/search (JSON, hybrid, top_k=10) through a real Envoy in
               front of the application, divided by the p50 of the floor: the query
               encoded by the application's own embedder (`encode_query`) plus a brute-force
               numpy scan (dot product, argpartition top 10) of every passage's dense
               vector, scrolled out of the store once before timing. Alternating per query,
               query-embedding cache cleared before every call. Target <= 2.0.

    python -m bench.retrieval [--datasets scifact cranfield] [--max-queries N] [--search-only]
                              [--data-dir DIR]

--data-dir keeps each dataset's application data (database, vector shard) in DIR/<dataset>;
a later run with the same DIR logs in as the account that uploaded it and skips ingestion,
so a change on the search path is measured in a minute instead of re-embedding the corpus.
"""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import numpy.typing as npt
import torch
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from agentmesh.knowledge.v1 import knowledge_service_pb2_grpc as kb_grpc
from pydantic import SecretStr

from bench.beir import Dataset, documents_in_order, load, ndcg_at, recall_at
from server import migrations
from server.config import Settings
from server.envoy import EnvoySidecar, envoy_config
from server.main import Application, build_application
from services.auth.principal import Principal, Role
from services.knowledge.chunking import ChunkingPolicy, chunk_document
from services.knowledge.parsing import DocumentFormat, ParseLimits, parse_document
from services.knowledge.qdrant_edge_store import QdrantEdgeStore
from services.knowledge.retrieval import fuse, rrf
from services.knowledge.service import SearchRequest
from services.knowledge.vector_store import StoredHit

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "build" / "bench" / "retrieval.json"
PASSWORD = "benchmark passphrase 42"
UPLOAD_CONCURRENCY = 8
DEPTH = 100
BARE_BATCH = 32  # sentence-transformers' default; it sorts by length, so padding is small
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MODES = {"dense": kb.SEARCH_MODE_DENSE, "sparse": kb.SEARCH_MODE_SPARSE}
TOP_K = 10
SCROLL_BATCH = 1024
TARGET_REST_FLOOR = 2.0
UNREACHABLE = 100_000_000  # rate limits out of reach: the limiter runs on every call, refuses none


async def start(data_dir: Path, dense_weight: float | None) -> Application:
    url = f"sqlite+aiosqlite:///{data_dir / 'bench.db'}"
    await asyncio.to_thread(migrations.upgrade, url)
    overrides: dict[str, Any] = {}
    if dense_weight is not None:
        overrides["hybrid_dense_weight"] = dense_weight
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        database_url=url,
        grpc_port=0,
        metrics_port=0,
        envoy_enabled=False,
        jwt_secret=SecretStr("bench-" + "k" * 40),
        ingest_queue_size=100_000,
        access_token_ttl_seconds=24 * 3600,  # a full run outlasts the default 15 minutes
        rate_limit_per_user=UNREACHABLE,  # one user uploads thousands of documents a minute
        rate_limit_per_ip=UNREACHABLE,
        log_level="WARNING",
        **overrides,
    )
    app = build_application(settings)
    await app.start()
    return app


async def account(
    channel: grpc.aio.Channel, email: str, *, register: bool
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Log in as `email`, registering it first unless an earlier run did."""
    auth = auth_grpc.AuthServiceStub(channel)
    if register:
        await auth.Register(auth_pb.RegisterRequest(email=email, password=PASSWORD, full_name="B"))
    login = await auth.Login(auth_pb.LoginRequest(email=email, password=PASSWORD))
    return login.user.user_id, (("authorization", f"Bearer {login.access_token}"),)


async def ingest(
    stub: kb_grpc.KnowledgeBaseServiceAsyncStub, auth: Any, dataset: Dataset
) -> dict[str, Any]:
    """Upload the corpus and wait for it; returns document id → corpus id and the timings."""
    gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)
    by_document: dict[str, str] = {}
    skipped = 0

    async def one(doc_id: str, text: str) -> None:
        nonlocal skipped
        async with gate:
            try:
                response = await stub.UploadDocument(
                    kb.UploadDocumentRequest(filename=f"{doc_id}.txt", content=text.encode()),
                    metadata=auth,
                )
            except grpc.aio.AioRpcError as error:  # empty documents are refused, as documented
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                skipped += 1
                return
            by_document[response.document.document_id] = doc_id

    started = time.perf_counter()
    await asyncio.gather(*(one(doc_id, text) for doc_id, text in dataset.corpus.items()))
    uploaded = time.perf_counter() - started
    processing = kb.ListDocumentsRequest(page_size=1, status=kb_pb.DOCUMENT_STATUS_PROCESSING)
    while (await stub.ListDocuments(processing, metadata=auth)).documents:  # noqa: ASYNC110 (polling the API is the point)
        await asyncio.sleep(0.25)
    elapsed = time.perf_counter() - started
    chunks, failed, token = 0, 0, ""
    while True:
        page = await stub.ListDocuments(
            kb.ListDocumentsRequest(page_size=200, page_token=token), metadata=auth
        )
        chunks += sum(d.chunk_count for d in page.documents)
        failed += sum(d.status == kb_pb.DOCUMENT_STATUS_FAILED for d in page.documents)
        token = page.next_page_token
        if not token:
            break
    return {
        "map": by_document,
        "documents": len(by_document),
        "skipped_empty": skipped,
        "failed": failed,
        "chunks": chunks,
        "upload_seconds": uploaded,
        "ingest_seconds": elapsed,
    }


def bare_encode(app: Application, dataset: Dataset) -> dict[str, float]:
    """The same chunks, built by the same functions, embedded by one plain encode call."""
    embedder = app.domain.knowledge.embedder
    policy = ChunkingPolicy(embedder.max_tokens, app.settings.chunk_overlap_tokens)
    texts: list[str] = []
    for text in dataset.corpus.values():
        if text.strip():
            parsed = parse_document(text.encode(), DocumentFormat.TEXT, ParseLimits())
            texts.extend(c.text for c in chunk_document(parsed, embedder.tokenizer, policy))
    # The baseline is a plain encode as one would write it: torch on every core (the server
    # runs one single-threaded encode per core instead).
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        started = time.perf_counter()
        embedder.encode_passages_sync(texts, batch_size=BARE_BATCH)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    return {"chunks": len(texts), "seconds": seconds}


async def rankings(
    stub: kb_grpc.KnowledgeBaseServiceAsyncStub,
    auth: Any,
    dataset: Dataset,
    mode: kb.SearchMode.ValueType,
    queries: list[str],
) -> dict[str, list[kb_pb.SearchResult]]:
    results = {}
    for query_id in queries:
        response = await stub.SearchKnowledgeBase(
            kb.SearchKnowledgeBaseRequest(query=dataset.queries[query_id], top_k=DEPTH, mode=mode),
            metadata=auth,
        )
        results[query_id] = list(response.results)
    return results


def score(
    dataset: Dataset, corpus_ids: dict[str, str], ranked: dict[str, list[str]]
) -> dict[str, float]:
    """Mean nDCG@10 and recall@100 of document-id rankings built from chunk hits."""
    ndcg, recall = [], []
    for query_id, documents in ranked.items():
        ranking = documents_in_order([corpus_ids[d] for d in documents])
        ndcg.append(ndcg_at(ranking, dataset.qrels[query_id]))
        recall.append(recall_at(ranking, dataset.qrels[query_id]))
    return {"ndcg@10": statistics.fmean(ndcg), "recall@100": statistics.fmean(recall)}


def hits(results: list[kb_pb.SearchResult]) -> list[StoredHit]:
    return [StoredHit(r.chunk_id, r.score, {"document_id": r.document_id}) for r in results]


def sweep(
    dataset: Dataset,
    corpus_ids: dict[str, str],
    dense: dict[str, list[kb_pb.SearchResult]],
    sparse: dict[str, list[kb_pb.SearchResult]],
) -> dict[str, dict[str, float]]:
    """The server's fusion functions applied to the same two RPC legs."""
    table = {}
    for weight in SWEEP:
        ranked = {
            q: [
                c.payload["document_id"]
                for c in fuse(hits(dense[q]), hits(sparse[q]), weight)[:DEPTH]
            ]
            for q in dense
        }
        table[f"convex w={weight}"] = score(dataset, corpus_ids, ranked)
    ranked = {
        q: [c.payload["document_id"] for c in rrf(hits(dense[q]), hits(sparse[q]))[:DEPTH]]
        for q in dense
    }
    table["rrf k=60"] = score(dataset, corpus_ids, ranked)
    return table


async def latency(
    app: Application,
    stub: kb_grpc.KnowledgeBaseServiceAsyncStub,
    auth: Any,
    user_id: str,
    texts: list[str],
) -> dict[str, float]:
    knowledge = app.domain.knowledge
    principal = Principal(uuid.UUID(user_id), Role.USER)
    direct, rpc = [], []
    for i, text in enumerate(texts):
        order = ("direct", "rpc") if i % 2 == 0 else ("rpc", "direct")
        for path in order:
            knowledge.embedder.clear_query_cache()
            started = time.perf_counter()
            if path == "direct":
                await knowledge.search(principal, SearchRequest(query=text, top_k=10))
                direct.append(time.perf_counter() - started)
            else:
                await stub.SearchKnowledgeBase(
                    kb.SearchKnowledgeBaseRequest(query=text, top_k=10), metadata=auth
                )
                rpc.append(time.perf_counter() - started)
    p50_direct, p50_rpc = statistics.median(direct), statistics.median(rpc)
    return {
        "p50_direct_ms": p50_direct * 1000,
        "p50_rpc_ms": p50_rpc * 1000,
        "ratio": p50_rpc / p50_direct,
    }


def envoy_in_front(app: Application, workdir: Path) -> EnvoySidecar:
    """The sidecar Envoy (envoy/envoy.yaml, as `agentmesh serve` runs it) on free ports."""
    loopback = "127.0.0.1"
    settings = app.settings.model_copy(
        update={
            "http_host": loopback,
            "http_port": 0,
            "envoy_admin_port": 0,
            "grpc_host": loopback,
            "metrics_host": loopback,
        }
    )
    config = envoy_config(settings, grpc_port=app.grpc_port, ops_port=app.ops.port)
    return EnvoySidecar(settings.resolved_envoy_binary, config, workdir)


async def dense_matrix(app: Application) -> npt.NDArray[np.float32]:
    """Every stored passage's dense vector, one row each, scrolled out of the store."""
    store = app.domain.knowledge.index
    if not isinstance(store, QdrantEdgeStore):  # start() configures no Qdrant server
        raise TypeError(f"expected the embedded Qdrant engine, got {type(store).__name__}")
    rows = [point.dense async for batch in store.scroll_points(SCROLL_BATCH) for point in batch]
    return np.asarray(rows, dtype=np.float32)


def brute_force_top(
    matrix: npt.NDArray[np.float32], query: list[float], k: int
) -> npt.NDArray[np.intp]:
    """Rows of the `k` best dot products with `query`, best first (an exact scan)."""
    scores = matrix @ np.asarray(query, dtype=np.float32)
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def quantiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    cuts = statistics.quantiles(samples, n=20, method="inclusive")
    return statistics.median(samples) * 1000, cuts[18] * 1000


async def rest_vs_floor(
    app: Application, auth: Any, texts: list[str], workdir: Path
) -> dict[str, Any]:
    """REST search through Envoy against encoding the query plus a brute-force scan."""
    embedder = app.domain.knowledge.embedder
    started = time.perf_counter()
    matrix = await dense_matrix(app)
    scroll_seconds = time.perf_counter() - started
    headers = {"authorization": dict(auth)["authorization"]}
    envoy = envoy_in_front(app, workdir)
    await envoy.start()
    rest, floor, returned = [], [], []
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{envoy.port}") as http:

            async def search_rest(text: str) -> bytes:
                body = {"query": text, "topK": TOP_K, "mode": "SEARCH_MODE_HYBRID"}
                async with http.post("/v1/kb/search", json=body, headers=headers) as response:
                    payload = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"REST search: HTTP {response.status} {payload!r}")
                    return payload

            async def search_floor(text: str) -> npt.NDArray[np.intp]:
                return brute_force_top(matrix, await embedder.encode_query(text), TOP_K)

            # One untimed call each: the connection to Envoy and Envoy's to the server.
            embedder.clear_query_cache()
            await search_rest(texts[0])
            embedder.clear_query_cache()
            await search_floor(texts[0])
            for i, text in enumerate(texts):
                order = ("rest", "floor") if i % 2 == 0 else ("floor", "rest")
                for path in order:
                    embedder.clear_query_cache()
                    started = time.perf_counter()
                    if path == "rest":
                        payload = await search_rest(text)
                        rest.append(time.perf_counter() - started)
                        returned.append(len(json.loads(payload).get("results", [])))
                    else:
                        await search_floor(text)
                        floor.append(time.perf_counter() - started)
    finally:
        await envoy.stop()
    p50_rest, p95_rest = quantiles(rest)
    p50_floor, p95_floor = quantiles(floor)
    return {
        "passages": int(matrix.shape[0]),
        "dimension": int(matrix.shape[1]),
        "vectors_from": "scroll_points of the embedded store (stored vectors, not re-encoded)",
        "scroll_seconds": scroll_seconds,
        "queries": len(texts),
        "mean_results": statistics.fmean(returned),
        "p50_rest_ms": p50_rest,
        "p95_rest_ms": p95_rest,
        "p50_floor_ms": p50_floor,
        "p95_floor_ms": p95_floor,
        "ratio": p50_rest / p50_floor,
        "target": TARGET_REST_FLOOR,
    }


async def run(
    dataset: Dataset,
    max_queries: int | None,
    dense_weight: float | None,
    weights: list[float],
    search_only: bool = False,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    with contextlib.ExitStack() as cleanup:
        if data_dir is None:
            tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        else:
            tmp = data_dir / dataset.name
            tmp.mkdir(parents=True, exist_ok=True)
        kept = tmp / "ingested.json"
        app = await start(tmp, dense_weight)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        report: dict[str, Any] = {"dataset": dataset.name}
        try:
            stub = kb_grpc.KnowledgeBaseServiceStub(channel)
            if kept.exists():
                earlier = json.loads(kept.read_text())
                user_id, auth = await account(channel, earlier["email"], register=False)
                ingested = earlier["ingested"]
                print(f"[{dataset.name}] reusing the corpus ingested in {tmp}", flush=True)
            else:
                email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
                user_id, auth = await account(channel, email, register=True)
                print(f"[{dataset.name}] ingesting {len(dataset.corpus)} documents", flush=True)
                ingested = await ingest(stub, auth, dataset)
                if data_dir is not None:
                    kept.write_text(json.dumps({"email": email, "ingested": ingested}))
            corpus_ids = ingested.pop("map")
            print(f"[{dataset.name}] {ingested}", flush=True)
            queries = sorted(dataset.queries)[:max_queries]
            report.update(queries=len(queries), dense_weight=app.settings.hybrid_dense_weight)
            if search_only:
                report["ingestion"] = ingested
            else:
                bare = await asyncio.to_thread(bare_encode, app, dataset)
                pipeline_rate = ingested["chunks"] / ingested["ingest_seconds"]
                bare_rate = bare["chunks"] / bare["seconds"]
                report["ingestion"] = {
                    **ingested,
                    "pipeline_chunks_per_s": pipeline_rate,
                    "bare_encode_chunks": bare["chunks"],
                    "bare_encode_chunks_per_s": bare_rate,
                    "ratio": pipeline_rate / bare_rate,
                }
                legs = {
                    name: await rankings(stub, auth, dataset, mode, queries)
                    for name, mode in MODES.items()
                }
                hybrid = await rankings(stub, auth, dataset, kb.SEARCH_MODE_HYBRID, queries)
                quality = {
                    name: score(
                        dataset,
                        corpus_ids,
                        {q: [r.document_id for r in rs] for q, rs in results.items()},
                    )
                    for name, results in {**legs, "hybrid": hybrid}.items()
                }
                report.update(
                    quality=quality,
                    hybrid_vs_dense=quality["hybrid"]["ndcg@10"] / quality["dense"]["ndcg@10"],
                    fusion_sweep=sweep(dataset, corpus_ids, legs["dense"], legs["sparse"]),
                )
            texts = [dataset.queries[q] for q in queries]
            report["latency"] = await latency(app, stub, auth, user_id, texts)
            print(f"[{dataset.name}] REST search vs floor over {len(texts)} queries", flush=True)
            report["rest_vs_floor"] = await rest_vs_floor(app, auth, texts, tmp / "envoy")
        finally:
            await channel.close()
            await app.stop(grace=0)
        if search_only:
            return report
        # The same index served again with other fusion weights: hybrid through the RPC.
        by_weight = {}
        for weight in weights:
            app = await start(tmp, weight)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
            try:
                stub = kb_grpc.KnowledgeBaseServiceStub(channel)
                results = await rankings(stub, auth, dataset, kb.SEARCH_MODE_HYBRID, queries)
                ranked = {q: [r.document_id for r in rs] for q, rs in results.items()}
                by_weight[f"hybrid w={weight}"] = score(dataset, corpus_ids, ranked)
            finally:
                await channel.close()
                await app.stop(grace=0)
        report["hybrid_rpc_by_weight"] = by_weight
        return report


def print_report(report: dict[str, Any]) -> None:
    name = report["dataset"]
    print(f"\n== {name}: {report['queries']} queries, dense weight {report['dense_weight']}")
    if "quality" in report:
        print(f"{'':>18} {'nDCG@10':>8} {'R@100':>8}")
        for leg, values in report["quality"].items():
            print(f"{leg:>18} {values['ndcg@10']:8.4f} {values['recall@100']:8.4f}")
        print(f"hybrid / dense nDCG@10: {report['hybrid_vs_dense']:.3f}")
        for label, values in report["hybrid_rpc_by_weight"].items():
            print(f"{label:>18} {values['ndcg@10']:8.4f} {values['recall@100']:8.4f}  (RPC)")
        print("fusion sweep (same RPC legs, fused by the server's functions):")
        for label, values in report["fusion_sweep"].items():
            print(f"{label:>18} {values['ndcg@10']:8.4f} {values['recall@100']:8.4f}")
    ingestion = report["ingestion"]
    if "ratio" in ingestion:
        print(
            f"ingestion: {ingestion['chunks']} chunks, "
            f"pipeline {ingestion['pipeline_chunks_per_s']:.1f}/s "
            f"vs bare encode {ingestion['bare_encode_chunks_per_s']:.1f}/s"
            f" -> ratio {ingestion['ratio']:.3f} (target >= 0.80)"
        )
    else:
        print(
            f"ingestion: {ingestion['documents']} documents, {ingestion['chunks']} chunks"
            f" in {ingestion['ingest_seconds']:.0f} s (no bare-encode baseline: --search-only)"
        )
    lat = report["latency"]
    print(
        f"search p50: rpc {lat['p50_rpc_ms']:.1f} ms / in-process {lat['p50_direct_ms']:.1f} ms"
        f" -> ratio {lat['ratio']:.3f} (target <= 1.15)"
    )
    floor = report["rest_vs_floor"]
    print(
        f"REST search vs floor ({floor['passages']} passages x {floor['dimension']}-d,"
        f" {floor['queries']} queries, top {TOP_K}):"
    )
    for label, key in (("REST hybrid via Envoy", "rest"), ("encode + numpy scan", "floor")):
        p50, p95 = floor[f"p50_{key}_ms"], floor[f"p95_{key}_ms"]
        print(f"  {label:<22} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms")
    print(f"  REST p50 / floor p50 -> ratio {floor['ratio']:.3f} (target <= {floor['target']:.1f})")


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["scifact", "cranfield"])
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--dense-weight", type=float, default=None)
    parser.add_argument(
        "--weights", type=float, nargs="*", default=[], help="also serve hybrid with these"
    )
    parser.add_argument(
        "--search-only",
        action="store_true",
        help="upload the corpus, then measure search latency only (no quality, fusion sweep,"
        " --weights or bare-encode baseline)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep each dataset's data in DIR/<dataset> and reuse a corpus ingested there",
    )
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    reports = []
    for name in args.datasets:
        report = await run(
            load(name),
            args.max_queries,
            args.dense_weight,
            args.weights,
            args.search_only,
            args.data_dir,
        )
        print_report(report)
        reports.append(report)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(reports, indent=2))
    print(f"\nreport: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
