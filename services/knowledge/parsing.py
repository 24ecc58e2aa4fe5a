"""Uploaded documents to plain text: the type is judged by content, and parsing is
bounded so that a hostile file can neither hang nor exhaust the server."""

import contextlib
import io
import json
import multiprocessing
import re
import resource
import signal
import time
import zipfile
from bisect import bisect_right
from dataclasses import dataclass
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from services.errors import InvalidArgument

if TYPE_CHECKING:
    from docx.table import Table
    from pypdf import PdfReader

ACCEPTED_TYPES = "PDF, DOCX, TXT or Markdown"
PAGE_SEPARATOR = "\n\n"

_PDF_MAGIC = b"%PDF-"
# A PDF starts with its header (`%PDF-1.7`); only whitespace, which some producers emit
# first, may precede it.
_PDF_HEADER = re.compile(rb"[ \t\r\n\f]{0,1000}%PDF-")
# Readers find the header anywhere in the first KiB: a file with one there, but not at its
# start, opens as a PDF in a reader and as something else here (a polyglot).
_PDF_MAGIC_WINDOW = 1024
# A local file header, or the end record of an empty archive.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# The parts every WordprocessingML package has (ECMA-376 part 2: the content types; part 1:
# the main document).
_DOCX_REQUIRED_PARTS = ("[Content_Types].xml", "word/document.xml")
_MARKDOWN_SUFFIXES = (".md", ".markdown")
# Small XML parts can compress extremely well; below this size a high ratio cannot hurt.
_RATIO_CHECK_MIN_BYTES = 1024**2
_REASON_MAX_CHARS = 160
_CHILD_EXIT_GRACE_SECONDS = 5.0
_MEMORY_EXCEEDED = "PDF parsing exceeded the memory limit"
# Built up front: a child that ran out of memory may be unable to build it then.
_MEMORY_EXCEEDED_REPLY = json.dumps({"error": _MEMORY_EXCEEDED}).encode()
_NO_PDF_TEXT = "no text could be extracted (a scanned PDF needs OCR, which agentmesh does not do)"


class DocumentFormat(StrEnum):
    PDF = "pdf"
    DOCX = "docx"
    TEXT = "text"
    MARKDOWN = "markdown"


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on the work one document may cause."""

    pdf_timeout_seconds: float = 30.0  # wall time of the child, from its start to its reply
    pdf_memory_bytes: int = 1024 * 1024**2  # the child's address space (RLIMIT_AS)
    pdf_max_pages: int = 2000
    docx_max_entries: int = 1000
    # As declared by the central directory; zipfile never inflates an entry past its declared
    # size, so a header that lies about it cannot make extraction expand further.
    docx_max_uncompressed_bytes: int = 100 * 1024**2
    docx_max_compression_ratio: float = 100.0  # per entry and overall, for entries over 1 MiB


@dataclass(frozen=True)
class ParsedText:
    """A document's text, pages joined by a blank line, and where each page starts."""

    text: str
    page_starts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.page_starts or self.page_starts[0] != 0:
            raise ValueError("page_starts must start with 0")

    @property
    def page_count(self) -> int:
        """How many pages the document has."""
        return len(self.page_starts)

    def page_at(self, offset: int) -> int:
        """The 1-based number of the page holding character `offset` of `text`."""
        if not 0 <= offset <= len(self.text):
            raise ValueError(f"offset {offset} is outside the text")
        return bisect_right(self.page_starts, offset)


class UnreadableDocument(Exception):
    """The document has an accepted type but no text could be read from it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def inspect_upload(content: bytes, filename: str, limits: ParseLimits) -> DocumentFormat:
    """The format of an upload, judged by its content; the filename only tells MD from TXT."""
    if not content:
        raise InvalidArgument.of("content", "the document is empty")
    if _PDF_HEADER.match(content):
        if _is_zip(content):
            raise InvalidArgument.of("content", _POLYGLOT_PDF_ZIP)
        return DocumentFormat.PDF
    misplaced = content.find(_PDF_MAGIC, 0, _PDF_MAGIC_WINDOW)
    if misplaced >= 0:
        raise InvalidArgument.of("content", _misplaced_pdf_header(misplaced))
    if content.startswith(_ZIP_MAGICS):
        problem = _docx_archive_problem(content, limits)
        if problem is not None:
            raise InvalidArgument.of("content", problem)
        return DocumentFormat.DOCX
    problem = _text_problem(content)
    if problem is not None:
        raise InvalidArgument.of("content", problem)
    if filename.lower().endswith(_MARKDOWN_SUFFIXES):
        return DocumentFormat.MARKDOWN
    return DocumentFormat.TEXT


def parse_document(content: bytes, fmt: DocumentFormat, limits: ParseLimits) -> ParsedText:
    """The text of a document of a known format; blocking, so callers run it in a thread."""
    match fmt:
        case DocumentFormat.PDF:
            return _parse_pdf(content, limits)
        case DocumentFormat.DOCX:
            return _parse_docx(content, limits)
        case DocumentFormat.TEXT | DocumentFormat.MARKDOWN:
            return _parse_text(content)


def _unsupported(what: str) -> str:
    return f"unsupported document type (accepted: {ACCEPTED_TYPES}): {what}"


_POLYGLOT_PDF_ZIP = _unsupported("the content is both a PDF and a ZIP archive")


def _misplaced_pdf_header(offset: int) -> str:
    return _unsupported(
        f"a PDF header appears at byte {offset}, not at the start: a PDF must begin with it"
    )


def _is_zip(content: bytes) -> bool:
    """Whether `content` ends like a ZIP archive (zipfile reads archives from their end)."""
    try:
        return zipfile.is_zipfile(io.BytesIO(content))
    except Exception:
        return False


def _text_problem(content: bytes) -> str | None:
    """Why `content` is not acceptable as a text document, or None."""
    if b"\x00" in content:
        return _unsupported("the content contains NUL bytes, so it is binary, not text")
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        return _unsupported("the content is not valid UTF-8 text")
    if not text.strip():
        return "the document is empty"
    return None


def _docx_archive_problem(content: bytes, limits: ParseLimits) -> str | None:
    """Why `content` is not an acceptable DOCX archive, judged from its central directory alone."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            entries = archive.infolist()
    except Exception:
        # zipfile reports a malformed directory through many exception types.
        return "the DOCX archive is corrupt"
    if len(entries) > limits.docx_max_entries:
        return f"the DOCX archive has more than {limits.docx_max_entries} entries"
    names = {entry.filename for entry in entries}
    missing = [part for part in _DOCX_REQUIRED_PARTS if part not in names]
    if missing:
        return _unsupported(
            f"the content is a ZIP archive but not a DOCX document (no {' or '.join(missing)})"
        )
    if any(_unsafe_entry(entry) for entry in entries):
        return "the DOCX archive holds a link or a path outside the archive"
    expanded = sum(entry.file_size for entry in entries)
    if expanded > limits.docx_max_uncompressed_bytes:
        limit_mib = limits.docx_max_uncompressed_bytes / 1024**2
        return f"the DOCX archive would expand to more than {limit_mib:g} MiB"
    sizes = [(entry.file_size, entry.compress_size) for entry in entries]
    sizes.append((expanded, sum(entry.compress_size for entry in entries)))
    if any(_ratio_too_high(size, packed, limits) for size, packed in sizes):
        return "the DOCX archive is compressed suspiciously well (a possible zip bomb)"
    return None


def _unsafe_entry(entry: zipfile.ZipInfo) -> bool:
    """A symbolic link, an absolute name or one climbing out with `..` (never in a DOCX)."""
    is_link = (entry.external_attr >> 16) & 0o170000 == 0o120000
    name = entry.filename.replace("\\", "/")
    return is_link or name.startswith("/") or ".." in name.split("/")


def _ratio_too_high(size: int, packed: int, limits: ParseLimits) -> bool:
    """Whether `size` bytes packed into `packed` exceed the allowed compression ratio."""
    return size >= _RATIO_CHECK_MIN_BYTES and size > limits.docx_max_compression_ratio * packed


def _parse_text(content: bytes) -> ParsedText:
    """A UTF-8 text or Markdown document as one page, with LF line ends."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableDocument("the document is not valid UTF-8 text") from exc
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise UnreadableDocument("the document is empty")
    return ParsedText(text, (0,))


def _parse_docx(content: bytes, limits: ParseLimits) -> ParsedText:
    """The paragraphs and tables of a DOCX body as one page."""
    # Checked again because the bytes may come from somewhere other than inspect_upload.
    problem = _docx_archive_problem(content, limits)
    if problem is not None:
        raise UnreadableDocument(problem)
    try:
        blocks = _docx_blocks(content)
    except Exception as exc:
        raise UnreadableDocument(f"unreadable DOCX: {_short_reason(exc)}") from exc
    text = PAGE_SEPARATOR.join(blocks)
    if not text.strip():
        raise UnreadableDocument("no text could be extracted from the DOCX")
    return ParsedText(text, (0,))


def _docx_blocks(content: bytes) -> list[str]:
    """The non-empty body paragraphs and tables, in document order."""
    # Imported here so that PDF child processes, which import this module, stay lean.
    import docx
    from docx.table import Table

    document = docx.Document(io.BytesIO(content))
    blocks = (
        _table_text(item) if isinstance(item, Table) else item.text.strip()
        for item in document.iter_inner_content()
    )
    return [block for block in blocks if block]


def _table_text(table: "Table") -> str:
    """A table as one line per row, cells joined by " | "."""
    lines = []
    for row in table.rows:
        cells = []
        previous = None
        for cell in row.cells:
            # A merged cell is listed once per grid column it spans; show it once.
            if cell._tc is not previous:
                cells.append(" ".join(cell.text.split()))
            previous = cell._tc
        if any(cells):
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def _short_reason(exc: BaseException) -> str:
    """A one-line, bounded description of an exception, fit for a user."""
    lines = str(exc).strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    if len(reason) > _REASON_MAX_CHARS:
        return reason[: _REASON_MAX_CHARS - 1] + "…"
    return reason


def _joined_pages(pages: list[str], empty_reason: str) -> ParsedText:
    """Pages joined by a blank line, remembering where each one starts."""
    if not any(page.strip() for page in pages):
        raise UnreadableDocument(empty_reason)
    starts = []
    position = 0
    for page in pages:
        starts.append(position)
        position += len(page) + len(PAGE_SEPARATOR)
    return ParsedText(PAGE_SEPARATOR.join(pages), tuple(starts))


def _parse_pdf(content: bytes, limits: ParseLimits) -> ParsedText:
    """A PDF's pages, read by pypdf in a child process bounded in time and memory."""
    return _joined_pages(_pdf_pages_in_child(content, limits), _NO_PDF_TEXT)


def _forkserver_context() -> ForkServerContext:
    """The context PDF children are started from."""
    context = multiprocessing.get_context("forkserver")
    # Takes effect only when the fork server starts (on first use): children are then forked
    # with pypdf imported rather than importing it each time.
    context.set_forkserver_preload([__name__, "pypdf"])
    return context


def _pdf_pages_in_child(content: bytes, limits: ParseLimits) -> list[str]:
    """Run one child process over the PDF and return its page texts, or raise why not."""
    context = _forkserver_context()
    parent_end, child_end = context.Pipe()
    process = context.Process(target=_pdf_child_main, args=(child_end, limits), daemon=True)
    try:
        with parent_end:
            process.start()
            # With only the child holding its end, the child's death reads as EOF here.
            child_end.close()
            reply = _exchange(parent_end, content, limits.pdf_timeout_seconds)
        process.join(_CHILD_EXIT_GRACE_SECONDS)
        exitcode = process.exitcode
    finally:
        child_end.close()
        _reap(process)
    if reply is None:
        if exitcode == -signal.SIGXCPU:
            raise UnreadableDocument(_took_too_long(limits.pdf_timeout_seconds))
        raise UnreadableDocument(_MEMORY_EXCEEDED)
    return _pages_from_reply(reply)


def _exchange(conn: Connection, content: bytes, timeout: float) -> bytes | None:
    """Send the PDF and await the child's reply: None when the child died without one."""
    deadline = time.monotonic() + timeout
    # A child that stopped reading (it died, or gave up) may still have left a reply.
    with contextlib.suppress(OSError):
        conn.send_bytes(content)
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise UnreadableDocument(_took_too_long(timeout))
    try:
        return conn.recv_bytes()
    except (EOFError, OSError):
        return None


def _reap(process: BaseProcess) -> None:
    """Kill the child if it still runs and release everything it holds."""
    if process.pid is not None:
        if process.is_alive():
            process.kill()
        process.join()
    process.close()


def _took_too_long(seconds: float) -> str:
    return f"PDF parsing took longer than {seconds:g} s"


def _pages_from_reply(reply: bytes) -> list[str]:
    """The page texts in a child's reply, or the UnreadableDocument it reported."""
    try:
        message = json.loads(reply)
    except ValueError:
        message = None
    if isinstance(message, dict):
        pages = message.get("pages")
        if isinstance(pages, list) and all(isinstance(page, str) for page in pages):
            return pages
        if isinstance(message.get("error"), str):
            raise UnreadableDocument(message["error"])
    raise UnreadableDocument("unreadable PDF")


def _pdf_child_main(conn: Connection, limits: ParseLimits) -> None:
    """Entry point of a PDF child: limit itself, parse the bytes it is sent, reply once."""
    try:
        _limit_own_resources(limits)
        reply = json.dumps(_pdf_reply(conn.recv_bytes(), limits.pdf_max_pages)).encode()
    except MemoryError:
        reply = _MEMORY_EXCEEDED_REPLY
    # JSON, not pickle: the parent must not unpickle what a process fed hostile input sends.
    conn.send_bytes(reply)
    conn.close()


def _limit_own_resources(limits: ParseLimits) -> None:
    """Cap this process's address space, and its CPU time as a backstop to the parent's timer."""
    _lower_limit(resource.RLIMIT_AS, limits.pdf_memory_bytes)
    _lower_limit(resource.RLIMIT_CPU, int(limits.pdf_timeout_seconds) + 1)


def _lower_limit(which: int, value: int) -> None:
    """Set both the soft and hard limit to `value`, never above the current hard limit."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _pdf_reply(content: bytes, max_pages: int) -> dict[str, object]:
    """The child's reply: the page texts, or the reason they cannot be read."""
    try:
        return {"pages": _pdf_pages(content, max_pages)}
    except UnreadableDocument as exc:
        return {"error": exc.reason}
    except MemoryError:
        raise
    except Exception as exc:
        # pypdf fails on malformed input with all kinds of exceptions.
        return {"error": f"unreadable PDF: {_short_reason(exc)}"}


def _pdf_pages(content: bytes, max_pages: int) -> list[str]:
    """The stripped text of each page of a PDF (runs in the child process)."""
    import logging

    from pypdf import PdfReader

    # pypdf logs a warning per damaged object; a hostile file would flood the logs.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    reader = PdfReader(io.BytesIO(content))
    if reader.is_encrypted and not _decrypt_without_password(reader):
        raise UnreadableDocument("the PDF is encrypted")
    if len(reader.pages) > max_pages:
        raise UnreadableDocument(f"the PDF has more than {max_pages} pages")
    return [_clean(page.extract_text()) for page in reader.pages]


def _decrypt_without_password(reader: "PdfReader") -> bool:
    """Whether an encrypted PDF opens with the empty password (only an owner password set)."""
    from pypdf import PasswordType

    try:
        return reader.decrypt("") != PasswordType.NOT_DECRYPTED
    except Exception:
        # Unsupported algorithms and missing crypto libraries fail here.
        return False


def _clean(text: str) -> str:
    """Page text fit for storage: stripped, without NULs or lone surrogates."""
    # Broken font maps can yield NULs (PostgreSQL rejects them) and lone surrogates (not UTF-8).
    text = text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return text.strip()
