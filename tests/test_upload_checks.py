"""Uploads are typed by their content at upload time: a file that is not what it must be
(a PDF header anywhere but the start, a ZIP without a DOCX's parts, a PDF that is also a
ZIP, a renamed executable) is INVALID_ARGUMENT on `content` before anything is stored or
queued, through the real server on SQLite and PostgreSQL."""

import io
import zipfile

import grpc
import pytest
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb

from tests.documents import make_docx, make_pdf
from tests.harness import Account, Stubs, new_user
from tests.knowledge import upload
from tests.rpc_errors import error_info, field_violations

# The start of an ELF executable: magic, 64-bit, little-endian, then NUL padding.
ELF = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00" + bytes(200)
# The start of a Windows executable: the DOS header and stub.
EXE = b"MZ\x90\x00\x03" + bytes(55) + b"\x80\x00\x00\x00This program cannot be run in DOS mode."


def html_with_pdf_header_at(offset: int) -> bytes:
    head = b"<!DOCTYPE html><html><body><p>"
    filler = b"x" * (offset - len(head))
    return head + filler + b"%PDF-1.4\n1 0 obj << >> endobj</p></body></html>\n"


def docx_without(part: str) -> bytes:
    """A real DOCX with one of its parts left out."""
    source = zipfile.ZipFile(io.BytesIO(make_docx(["Hello", "World"])))
    buffer = io.BytesIO()
    with source, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            if entry.filename != part:
                target.writestr(entry, source.read(entry))
    return buffer.getvalue()


def zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


async def refused(stubs: Stubs, account: Account, filename: str, content: bytes) -> str:
    """The description of the `content` violation the upload fails with; checks that the
    caller's document list stayed empty (nothing stored, nothing queued)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stubs, account, filename, content)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_info(error).reason == "INVALID_ARGUMENT"
    violations = field_violations(error)
    assert list(violations) == ["content"], violations
    listed = await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=account.metadata)
    assert list(listed.documents) == []
    return violations["content"][0]


@pytest.mark.parametrize("offset", [100, 500, 1000])
async def test_html_with_a_pdf_header_inside_is_refused(stubs: Stubs, offset: int) -> None:
    user = await new_user(stubs)
    description = await refused(stubs, user, "report.pdf", html_with_pdf_header_at(offset))
    assert f"PDF header appears at byte {offset}" in description


async def test_pdf_header_inside_other_text_is_refused_whatever_the_name(stubs: Stubs) -> None:
    user = await new_user(stubs)
    content = b"Release notes\n\nThe exporter now writes %PDF-1.7 files.\n"
    assert "PDF header appears at byte" in await refused(stubs, user, "notes.md", content)


@pytest.mark.parametrize("part", ["[Content_Types].xml", "word/document.xml"])
async def test_docx_without_a_required_part_is_refused(stubs: Stubs, part: str) -> None:
    user = await new_user(stubs)
    description = await refused(stubs, user, "report.docx", docx_without(part))
    assert "not a DOCX document" in description and part in description


async def test_other_zip_archives_are_refused(stubs: Stubs) -> None:
    user = await new_user(stubs)
    content = zip_of({"mimetype": b"application/vnd.oasis.opendocument.text", "a.xml": b"<a/>"})
    assert "not a DOCX document" in await refused(stubs, user, "report.docx", content)


async def test_a_pdf_that_is_also_a_zip_is_refused(stubs: Stubs) -> None:
    user = await new_user(stubs)
    polyglot = make_pdf(["Hello"]) + make_docx(["Hello"])
    assert "both a PDF and a ZIP" in await refused(stubs, user, "report.pdf", polyglot)


async def test_a_docx_with_a_pdf_header_in_its_first_kilobyte_is_refused(stubs: Stubs) -> None:
    # A stored (uncompressed) first entry puts its bytes near the start of the archive.
    user = await new_user(stubs)
    source = zipfile.ZipFile(io.BytesIO(make_docx(["Hello"])))
    buffer = io.BytesIO()
    with source, zipfile.ZipFile(buffer, "w") as target:
        target.writestr("word/media/a.pdf", b"%PDF-1.4\n", zipfile.ZIP_STORED)
        for entry in source.infolist():
            target.writestr(entry, source.read(entry))
    assert "PDF header appears at byte" in await refused(stubs, user, "a.docx", buffer.getvalue())


@pytest.mark.parametrize(
    ("filename", "content"),
    [("setup.pdf", ELF), ("notes.txt", ELF), ("report.docx", EXE), ("readme.md", EXE)],
    ids=["elf-as-pdf", "elf-as-txt", "exe-as-docx", "exe-as-md"],
)
async def test_renamed_executables_are_refused(stubs: Stubs, filename: str, content: bytes) -> None:
    user = await new_user(stubs)
    description = await refused(stubs, user, filename, content)
    assert "unsupported document type" in description


async def test_text_that_is_not_utf8_is_refused(stubs: Stubs) -> None:
    user = await new_user(stubs)
    content = "Prix: 12 €, café".encode("cp1252")
    assert "not valid UTF-8" in await refused(stubs, user, "prices.txt", content)


@pytest.mark.parametrize(
    ("filename", "content", "document_type"),
    [
        ("a.pdf", make_pdf(["Quarterly report"]), kb_pb.DOCUMENT_TYPE_PDF),
        ("a.pdf", b"\r\n" + make_pdf(["Leading newline"]), kb_pb.DOCUMENT_TYPE_PDF),
        ("a.docx", make_docx(["Quarterly report"]), kb_pb.DOCUMENT_TYPE_DOCX),
        ("a.md", "# Café\n\nNaïve résumé.\n".encode(), kb_pb.DOCUMENT_TYPE_MARKDOWN),
    ],
    ids=["pdf", "pdf-after-whitespace", "docx", "markdown"],
)
async def test_real_documents_pass(
    stubs: Stubs, filename: str, content: bytes, document_type: int
) -> None:
    user = await new_user(stubs)
    response = await upload(stubs, user, filename, content)
    assert response.document.document_type == document_type
    assert response.document.status == kb_pb.DOCUMENT_STATUS_PROCESSING
