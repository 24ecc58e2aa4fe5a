"""BM25 as a sparse vector: the lexical leg of hybrid retrieval.

A chunk's vector holds, per stemmed term, BM25's saturated term frequency
tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len)). The collection's sparse vector uses
Qdrant's IDF modifier, so Qdrant multiplies in each term's inverse document frequency at
query time from its own live statistics; a query's vector is simply 1 per distinct term.
The dot product of the two is then the document's BM25 score.
"""

import re
import threading
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import snowballstemmer  # type: ignore[import-untyped]

K1 = 1.2
B = 0.75
# Average chunk length in stemmed terms, after stop words; chunks hold up to 254 word pieces,
# typically ~130 terms. A fixed value keeps indexing independent of corpus statistics.
AVERAGE_LENGTH = 130.0

TOKEN = re.compile(r"[^\W_]+", re.UNICODE)

# NLTK's English stop words, minus contractions (TOKEN splits them at the apostrophe).
STOP_WORDS = frozenset(
    """a about above after again against ain all am an and any are aren as at be because been
   before being below between both but by can couldn d did didn do does doesn doing don
   down during each few for from further had hadn has hasn have haven having he her here
   hers herself him himself his how i if in into is isn it its itself just ll m ma me
   mightn more most mustn my myself needn no nor not now o of off on once only or other our
   ours ourselves out over own re s same shan she should shouldn so some such t than that
   the their theirs them themselves then there these they this those through to too under
   until up ve very was wasn we were weren what when where which while who whom why will
   with won wouldn y you your yours yourself yourselves""".split()  # noqa: SIM905 (a word list reads best as words)
)


@dataclass(frozen=True)
class SparseVector:
    indices: list[int]
    values: list[float]


class LexicalEncoder:
    """Terms → hashed indices (CRC-32, stable across processes and versions)."""

    def __init__(self) -> None:
        # A snowball stemmer keeps the word being stemmed in the object: one per thread.
        self._local = threading.local()

    def terms(self, text: str) -> list[str]:
        """Lower-cased, stop-word-free, stemmed terms of `text`."""
        words = [w for w in TOKEN.findall(text.lower()) if w not in STOP_WORDS]
        return list(self._stemmer().stemWords(words))

    def _stemmer(self) -> Any:
        stemmer = getattr(self._local, "stemmer", None)
        if stemmer is None:
            stemmer = self._local.stemmer = snowballstemmer.stemmer("english")
        return stemmer

    def encode_passage(self, text: str) -> SparseVector:
        counts = Counter(self.terms(text))
        length = sum(counts.values())
        norm = K1 * (1 - B + B * length / AVERAGE_LENGTH)
        weights: dict[int, float] = {}
        for term, tf in counts.items():
            index = _term_index(term)
            weights[index] = weights.get(index, 0.0) + tf * (K1 + 1) / (tf + norm)
        return _sparse(weights)

    def encode_query(self, text: str) -> SparseVector:
        return _sparse({_term_index(term): 1.0 for term in set(self.terms(text))})


def _term_index(term: str) -> int:
    return zlib.crc32(term.encode())


def _sparse(weights: dict[int, float]) -> SparseVector:
    indices = sorted(weights)
    return SparseVector(indices, [weights[i] for i in indices])
