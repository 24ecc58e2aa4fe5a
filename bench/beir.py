"""BEIR-format datasets (corpus, queries, test qrels) and the two metrics reported on them."""

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@dataclass(frozen=True)
class Dataset:
    name: str
    corpus: dict[str, str]  # doc id -> title + blank line + text
    queries: dict[str, str]  # test query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> graded relevance (> 0)


def load(name: str, root: Path = DATASETS) -> Dataset:
    folder = root / name
    corpus_path = folder / "corpus.jsonl"
    opener = gzip.open if not corpus_path.exists() else open
    if not corpus_path.exists():
        corpus_path = folder / "corpus.jsonl.gz"
    corpus: dict[str, str] = {}
    with opener(corpus_path, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            corpus[doc["_id"]] = "\n\n".join(p for p in (doc.get("title"), doc.get("text")) if p)
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, score = line.split("\t")
        if int(score) > 0:
            qrels.setdefault(query_id, {})[doc_id] = int(score)
    queries = {}
    for line in (folder / "queries.jsonl").read_text().splitlines():
        query = json.loads(line)
        if query["_id"] in qrels:
            queries[query["_id"]] = query["text"]
    return Dataset(name, corpus, queries, qrels)


def ndcg_at(ranking: list[str], relevant: dict[str, int], k: int = 10) -> float:
    """trec_eval's ndcg_cut: gain = graded relevance, log2 discount."""
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranking[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(gain / math.log2(i + 2) for i, gain in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranking: list[str], relevant: dict[str, int], k: int = 100) -> float:
    return len(set(ranking[:k]) & relevant.keys()) / len(relevant) if relevant else 0.0


def documents_in_order(chunk_documents: list[str]) -> list[str]:
    """Chunk hits → document ranking: a document ranks where its best chunk does."""
    return list(dict.fromkeys(chunk_documents))
