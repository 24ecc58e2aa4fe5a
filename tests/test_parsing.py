"""Document type detection and text extraction, on real PDF, DOCX and text files."""

import io
import multiprocessing
import os
import random
import zipfile
import zlib
from collections.abc import Iterator

import docx
import pytest
from pypdf import PdfReader, PdfWriter

from services.errors import InvalidArgument
from services.knowledge.parsing import (
    DocumentFormat,
    ParsedText,
    ParseLimits,
    UnreadableDocument,
    inspect_upload,
    parse_document,
)
from tests.documents import (
    make_docx,
    make_docx_like_zip_without_document,
    make_pdf,
    make_zip_bomb,
)

LIMITS = ParseLimits()
PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06"


@pytest.fixture(autouse=True)
def no_child_left_behind() -> Iterator[None]:
    """Every test must leave no PDF child process running."""
    yield
    assert multiprocessing.active_children() == []


@pytest.fixture(scope="module")
def long_pdf() -> bytes:
    """A PDF long enough that parsing it takes a noticeable fraction of a second."""
    return make_pdf([f"Page {n}. " + "Lorem ipsum dolor sit amet. " * 20 for n in range(80)])


def content_violation(error: pytest.ExceptionInfo[InvalidArgument]) -> str:
    """The description of the single violation, which must be on `content`."""
    [violation] = error.value.violations
    assert violation.field == "content"
    return violation.description


def rejected(content: bytes, filename: str, limits: ParseLimits = LIMITS) -> str:
    """The description of the violation `inspect_upload` raises for this upload."""
    with pytest.raises(InvalidArgument) as error:
        inspect_upload(content, filename, limits)
    return content_violation(error)


def unreadable(content: bytes, fmt: DocumentFormat, limits: ParseLimits = LIMITS) -> str:
    """The reason `parse_document` gives for failing on this document."""
    with pytest.raises(UnreadableDocument) as error:
        parse_document(content, fmt, limits)
    return error.value.reason


def pdf_with_stream(decompressed_bytes: int) -> bytes:
    """A one-page PDF whose content stream inflates to `decompressed_bytes` bytes."""
    stream = zlib.compress(b" " * decompressed_bytes, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        # Without a font pypdf knows the page has no text and never reads the stream.
        b" /Resources << /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >>"
        b" >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def encrypted_pdf(user_password: str) -> bytes:
    """A text PDF encrypted with RC4 (which pypdf decrypts without extra libraries)."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(["Secret plans"]))))
    writer.encrypt(user_password, owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


class TestInspectUpload:
    def test_pdf_is_detected_by_content_whatever_its_name(self) -> None:
        assert inspect_upload(make_pdf(["Hello"]), "notes.txt", LIMITS) is DocumentFormat.PDF

    def test_pdf_header_after_leading_junk(self) -> None:
        content = b"\r\n" * 100 + make_pdf(["Hello"])
        assert inspect_upload(content, "x.bin", LIMITS) is DocumentFormat.PDF

    def test_docx_is_detected_by_content_whatever_its_name(self) -> None:
        assert inspect_upload(make_docx(["Hello"]), "report.pdf", LIMITS) is DocumentFormat.DOCX

    def test_text_named_pdf_is_text(self) -> None:
        assert inspect_upload(b"just some notes\n", "x.pdf", LIMITS) is DocumentFormat.TEXT

    @pytest.mark.parametrize("filename", ["README.md", "notes.MARKDOWN", "dir/Guide.Md"])
    def test_markdown_by_suffix(self, filename: str) -> None:
        assert inspect_upload(b"# Title\n\nBody\n", filename, LIMITS) is DocumentFormat.MARKDOWN

    @pytest.mark.parametrize("filename", ["notes.txt", "notes", "notes.md.txt", "md"])
    def test_other_names_are_plain_text(self, filename: str) -> None:
        assert inspect_upload(b"# Title\n", filename, LIMITS) is DocumentFormat.TEXT

    def test_utf8_bom_is_accepted(self) -> None:
        content = "\ufeffÜberschrift - naïve café".encode()
        assert inspect_upload(content, "a.txt", LIMITS) is DocumentFormat.TEXT

    @pytest.mark.parametrize(
        "content",
        [PNG_HEADER + bytes(range(256)), random.Random(7).randbytes(4096)],
        ids=["png", "random"],
    )
    def test_renamed_binary_is_rejected(self, content: bytes) -> None:
        description = rejected(content, "a.pdf")
        assert "PDF, DOCX, TXT or Markdown" in description

    def test_invalid_utf8_is_rejected(self) -> None:
        description = rejected("caf\u00e9 au lait".encode("latin-1"), "menu.txt")
        assert "not valid UTF-8" in description
        assert "PDF, DOCX, TXT or Markdown" in description

    def test_nul_bytes_are_rejected(self) -> None:
        description = rejected(b"looks like text\x00but is not", "a.md")
        assert "NUL" in description

    def test_utf16_text_is_rejected(self) -> None:
        assert "NUL" in rejected("hello".encode("utf-16"), "a.txt")

    @pytest.mark.parametrize("content", [b"", b"   \n\t\r\n ", b"\xef\xbb\xbf\n"])
    def test_empty_document_is_rejected(self, content: bytes) -> None:
        assert rejected(content, "a.txt") == "the document is empty"

    def test_zip_without_word_document_is_rejected(self) -> None:
        description = rejected(make_docx_like_zip_without_document(), "a.docx")
        assert "not a DOCX document" in description
        assert "PDF, DOCX, TXT or Markdown" in description

    def test_zip_bomb_is_rejected_without_decompressing(self) -> None:
        # Judged from the declared sizes in the central directory: nothing is inflated.
        assert "expand to more than 100 MiB" in rejected(make_zip_bomb(), "a.docx")

    def test_zip_bomb_is_rejected_by_ratio_under_a_generous_size_limit(self) -> None:
        limits = ParseLimits(docx_max_uncompressed_bytes=4 * 1024**3)
        assert "compressed suspiciously well" in rejected(make_zip_bomb(), "a.docx", limits)

    def test_too_many_entries_are_rejected(self) -> None:
        limits = ParseLimits(docx_max_entries=3)
        assert "more than 3 entries" in rejected(make_docx(["Hello"]), "a.docx", limits)

    def test_corrupt_zip_is_rejected(self) -> None:
        content = make_docx(["Hello"])
        # Cut into the central directory at the end of the archive.
        assert rejected(content[:-30], "a.docx") == "the DOCX archive is corrupt"

    @pytest.mark.parametrize("name", ["../evil.xml", "/etc/evil.xml", "word/../../evil.xml"])
    def test_paths_leaving_the_archive_are_rejected(self, name: str) -> None:
        content = _with_extra_entry(make_docx(["Hello"]), zipfile.ZipInfo(name))
        with pytest.raises(InvalidArgument) as caught:
            inspect_upload(content, "a.docx", LIMITS)
        assert "outside the archive" in caught.value.violations[0].description

    def test_symbolic_links_are_rejected(self) -> None:
        link = zipfile.ZipInfo("word/link.xml")
        link.external_attr = 0o120777 << 16
        content = _with_extra_entry(make_docx(["Hello"]), link)
        with pytest.raises(InvalidArgument) as caught:
            inspect_upload(content, "a.docx", LIMITS)
        assert "link" in caught.value.violations[0].description

    def test_ordinary_docx_passes_the_archive_checks(self) -> None:
        content = make_docx(["Title", *(f"Paragraph {n}" for n in range(200))])
        assert inspect_upload(content, "a.docx", LIMITS) is DocumentFormat.DOCX


class TestParseText:
    def test_line_ends_are_normalized_and_bom_dropped(self) -> None:
        parsed = parse_document(b"\xef\xbb\xbfone\r\ntwo\rthree\n", DocumentFormat.TEXT, LIMITS)
        assert parsed == ParsedText("one\ntwo\nthree\n", (0,))
        assert parsed.page_count == 1
        assert parsed.page_at(len(parsed.text)) == 1

    def test_markdown_keeps_its_markup(self) -> None:
        parsed = parse_document(b"# Title\n\n* item\n", DocumentFormat.MARKDOWN, LIMITS)
        assert parsed.text == "# Title\n\n* item\n"

    def test_invalid_utf8_is_unreadable(self) -> None:
        assert "UTF-8" in unreadable(b"\xff\xfe", DocumentFormat.TEXT)


class TestParseDocx:
    def test_paragraphs_and_table_are_extracted(self) -> None:
        content = make_docx(
            ["Quarterly report", "Revenue grew.", "", "Costs fell."],
            table=[["Region", "Revenue"], ["EMEA", "12"], ["APAC", "7"]],
        )
        parsed = parse_document(content, DocumentFormat.DOCX, LIMITS)
        assert parsed.text == (
            "Quarterly report\n\nRevenue grew.\n\nCosts fell.\n\n"
            "Region | Revenue\nEMEA | 12\nAPAC | 7"
        )
        assert parsed.page_starts == (0,)

    def test_tables_keep_their_place_between_paragraphs(self) -> None:
        document = docx.Document()
        document.add_paragraph("Before")
        table = document.add_table(rows=1, cols=3)
        table.rows[0].cells[0].text = "a"
        table.rows[0].cells[2].text = "c\nd"
        document.add_paragraph("After")
        buffer = io.BytesIO()
        document.save(buffer)
        parsed = parse_document(buffer.getvalue(), DocumentFormat.DOCX, LIMITS)
        assert parsed.text == "Before\n\na |  | c d\n\nAfter"

    def test_merged_cells_appear_once(self) -> None:
        document = docx.Document()
        table = document.add_table(rows=2, cols=3)
        merged = table.cell(0, 0).merge(table.cell(0, 1))
        merged.text = "wide"
        table.cell(0, 2).text = "narrow"
        buffer = io.BytesIO()
        document.save(buffer)
        parsed = parse_document(buffer.getvalue(), DocumentFormat.DOCX, LIMITS)
        assert parsed.text == "wide | narrow"

    def test_docx_without_text_is_unreadable(self) -> None:
        assert "no text" in unreadable(make_docx(["", "  "]), DocumentFormat.DOCX)

    def test_broken_docx_is_unreadable(self) -> None:
        # A well-formed archive holding a word/document.xml that is not XML at all.
        reason = unreadable(make_docx_like_zip_with_bad_document(), DocumentFormat.DOCX)
        assert reason.startswith("unreadable DOCX: ")

    def test_zip_bomb_is_refused_by_parse_too(self) -> None:
        assert "expand to more than" in unreadable(make_zip_bomb(), DocumentFormat.DOCX)


def make_docx_like_zip_with_bad_document() -> bytes:
    """A real DOCX whose main part has been replaced by garbage."""
    source = zipfile.ZipFile(io.BytesIO(make_docx(["Hello"])))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for entry in source.infolist():
            data = source.read(entry)
            target.writestr(entry, b"<<not xml" if entry.filename == "word/document.xml" else data)
    return buffer.getvalue()


class TestParsePdf:
    def test_pages_are_joined_and_located(self) -> None:
        content = make_pdf(["First page text.", "", "Third page text."])
        parsed = parse_document(content, DocumentFormat.PDF, LIMITS)
        assert parsed.text == "First page text.\n\n\n\nThird page text."
        assert parsed.page_starts == (0, 18, 20)
        assert parsed.page_count == 3
        assert parsed.page_at(0) == 1
        assert parsed.page_at(parsed.text.index("text.")) == 1
        # The separator after a page still belongs to that page.
        assert parsed.page_at(17) == 1
        assert parsed.page_at(parsed.text.index("Third")) == 3
        assert parsed.page_at(len(parsed.text)) == 3
        with pytest.raises(ValueError):
            parsed.page_at(len(parsed.text) + 1)

    def test_long_text_wraps_and_survives(self, long_pdf: bytes) -> None:
        parsed = parse_document(long_pdf, DocumentFormat.PDF, LIMITS)
        assert parsed.page_count == 80
        for number in (1, 40, 80):
            start = parsed.page_starts[number - 1]
            assert parsed.text.startswith(f"Page {number - 1}. Lorem ipsum", start)
            assert parsed.page_at(start + 5) == number
        assert " ".join(parsed.text.split()).count("Lorem ipsum dolor sit amet.") == 80 * 20

    def test_blank_pdf_needs_ocr(self) -> None:
        reason = unreadable(make_pdf(["", ""]), DocumentFormat.PDF)
        assert reason.startswith("no text could be extracted")
        assert "OCR" in reason

    def test_truncated_pdf_is_unreadable(self) -> None:
        content = make_pdf(["Hello there"])
        assert unreadable(content[:200], DocumentFormat.PDF).startswith("unreadable PDF: ")

    def test_garbage_after_header_is_unreadable(self) -> None:
        content = b"%PDF-1.7\n" + random.Random(3).randbytes(2000)
        assert unreadable(content, DocumentFormat.PDF).startswith("unreadable PDF: ")

    def test_too_many_pages(self) -> None:
        limits = ParseLimits(pdf_max_pages=2)
        content = make_pdf(["one", "two", "three"])
        assert unreadable(content, DocumentFormat.PDF, limits) == "the PDF has more than 2 pages"

    def test_encrypted_pdf_is_unreadable(self) -> None:
        content = encrypted_pdf(user_password="secret")
        assert unreadable(content, DocumentFormat.PDF) == "the PDF is encrypted"

    def test_pdf_with_only_an_owner_password_is_read(self) -> None:
        parsed = parse_document(encrypted_pdf(user_password=""), DocumentFormat.PDF, LIMITS)
        assert parsed.text == "Secret plans"

    def test_slow_parse_is_stopped(self, long_pdf: bytes) -> None:
        # Extracting 80 pages of text takes tens of milliseconds at the very least; the
        # limit is a hundred times shorter.
        limits = ParseLimits(pdf_timeout_seconds=0.0005)
        reason = unreadable(long_pdf, DocumentFormat.PDF, limits)
        assert reason == "PDF parsing took longer than 0.0005 s"

    def test_memory_limit_stops_the_parse(self) -> None:
        content = pdf_with_stream(70_000_000)
        # With room to inflate its 70 MB content stream (under pypdf's own 75 MB cap), the
        # file is read; it just has no text.
        roomy = ParseLimits(pdf_memory_bytes=512 * 1024**2)
        assert unreadable(content, DocumentFormat.PDF, roomy).startswith("no text")
        # The child starts at about 45 MiB of address space, so 64 MiB leaves no such room.
        tight = ParseLimits(pdf_memory_bytes=64 * 1024**2)
        assert unreadable(content, DocumentFormat.PDF, tight) == (
            "PDF parsing exceeded the memory limit"
        )

    def test_children_leak_no_file_descriptors(self, long_pdf: bytes) -> None:
        content = make_pdf(["Hello"])
        parse_document(content, DocumentFormat.PDF, LIMITS)  # the fork server's own are kept
        before = len(os.listdir("/proc/self/fd"))
        parse_document(content, DocumentFormat.PDF, LIMITS)
        unreadable(long_pdf, DocumentFormat.PDF, ParseLimits(pdf_timeout_seconds=0.01))
        unreadable(content[:200], DocumentFormat.PDF)
        assert len(os.listdir("/proc/self/fd")) == before


class TestParsedText:
    def test_page_starts_must_begin_at_zero(self) -> None:
        with pytest.raises(ValueError):
            ParsedText("abc", ())
        with pytest.raises(ValueError):
            ParsedText("abc", (1,))

    def test_negative_offset_is_refused(self) -> None:
        with pytest.raises(ValueError):
            ParsedText("abc", (0,)).page_at(-1)


def _with_extra_entry(content: bytes, entry: zipfile.ZipInfo) -> bytes:
    """`content` (a zip) with one more small entry."""
    buffer = io.BytesIO(content)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr(entry, b"<x/>")
    return buffer.getvalue()
