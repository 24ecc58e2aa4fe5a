"""Splitting a parsed document into passages the embedding model reads whole.

Chunks are measured in the embedding model's own word pieces: all-MiniLM-L6-v2 reads at most
256 of them (254 besides [CLS]/[SEP]) and silently drops the rest, so a larger chunk would be
indexed by its first part only. Each chunk ends at the best boundary in its second half (a
paragraph or heading break, else a sentence end) and the next one starts `overlap` word
pieces earlier, so a passage cut by a boundary is still whole in one of the two.
"""

import itertools
from dataclasses import dataclass
from typing import Any

from services.knowledge.parsing import ParsedText

PARAGRAPH = 2
SENTENCE = 1
SENTENCE_ENDS = frozenset(".!?;:")


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    start: int  # character offsets into the document text, end exclusive
    end: int
    page: int
    tokens: int


@dataclass(frozen=True)
class ChunkingPolicy:
    max_tokens: int
    overlap_tokens: int
    max_chunks: int = 20_000  # per document; ~5 MB of prose, ~12 minutes of embedding on 2 cores

    def __post_init__(self) -> None:
        if not 0 <= self.overlap_tokens < self.max_tokens // 2:
            raise ValueError("chunk overlap must be below half the chunk size")


def chunk_document(parsed: ParsedText, tokenizer: Any, policy: ChunkingPolicy) -> list[Chunk]:
    """The document's chunks, in order, with character offsets and pages."""
    chunks: list[Chunk] = []
    bounds = [*parsed.page_starts, len(parsed.text)]
    for page, (first, last) in enumerate(itertools.pairwise(bounds), start=1):
        for start, end, tokens in _spans(parsed.text[first:last], tokenizer, policy):
            text = parsed.text[first + start : first + end]
            chunks.append(Chunk(len(chunks), text, first + start, first + end, page, tokens))
    return chunks


def _spans(text: str, tokenizer: Any, policy: ChunkingPolicy) -> list[tuple[int, int, int]]:
    """(start, end, word pieces) of each chunk of one page's `text`."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets: list[tuple[int, int]] = [tuple(pair) for pair in encoding["offset_mapping"]]
    pieces = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    spans = []
    start = 0
    while start < len(offsets):
        end = _chunk_end(text, offsets, start, policy.max_tokens)
        spans.append((offsets[start][0], offsets[end - 1][1], end - start))
        if end == len(offsets):
            break
        start = _next_start(pieces, start, end, policy.overlap_tokens)
    return spans


def _chunk_end(text: str, offsets: list[tuple[int, int]], start: int, size: int) -> int:
    """Exclusive token index ending the chunk that starts at `start`."""
    hard_end = min(start + size, len(offsets))
    if hard_end == len(offsets):
        return hard_end
    best, best_strength = hard_end, 0
    for candidate in range(hard_end, start + size // 2, -1):
        strength = _break_strength(text, offsets, candidate)
        if strength > best_strength:
            best, best_strength = candidate, strength
            if strength == PARAGRAPH:
                break
    return best


def _break_strength(text: str, offsets: list[tuple[int, int]], index: int) -> int:
    """How good a boundary lies before token `index`: paragraph, sentence or none (0)."""
    gap = text[offsets[index - 1][1] : offsets[index][0]]
    if "\n\n" in gap or ("\n" in gap and text.startswith("#", offsets[index][0])):
        return PARAGRAPH
    previous = text[offsets[index - 1][1] - 1 : offsets[index - 1][1]]
    if previous in SENTENCE_ENDS and gap:
        return SENTENCE
    return 0


def _next_start(pieces: list[str], start: int, end: int, overlap: int) -> int:
    """Start of the next chunk: `overlap` pieces back, moved forward to a whole word."""
    following = max(end - overlap, start + 1)
    while following < end and pieces[following].startswith("##"):
        following += 1
    return following
