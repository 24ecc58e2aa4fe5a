"""Builders of real documents (PDF, DOCX, hostile ZIP archives) for tests."""

import io
import struct
import zipfile
import zlib

import docx
from fpdf import FPDF

_MIB = 1024**2
# Declared size of the bomb's payload: five times the default 200 MiB limit.
_BOMB_MIB = 1024
_DOS_DATE_1980_01_01 = (1 << 5) | 1
_DEFLATE = 8
_ZIP_VERSION = 20


def make_pdf(pages: list[str]) -> bytes:
    """A PDF with one page per item, each holding that text (an empty item: a blank page)."""
    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def make_docx(paragraphs: list[str], table: list[list[str]] | None = None) -> bytes:
    """A DOCX whose first paragraph is a heading, followed by the others, then the table."""
    document = docx.Document()
    for index, text in enumerate(paragraphs):
        if index == 0:
            document.add_heading(text, level=1)
        else:
            document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=max(len(row) for row in table))
        for grid_row, row in zip(grid.rows, table, strict=True):
            for cell, text in zip(grid_row.cells, row, strict=False):
                cell.text = text
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def make_docx_like_zip_without_document() -> bytes:
    """A ZIP shaped like a DOCX but lacking word/document.xml."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        archive.writestr("_rels/.rels", '<?xml version="1.0"?><Relationships/>')
        archive.writestr("word/styles.xml", '<?xml version="1.0"?><w:styles/>')
    return buffer.getvalue()


def make_zip_bomb() -> bytes:
    """A valid ZIP with a DOCX's parts and 1 GiB of zeros deflated to about 1 MB."""
    types = b'<?xml version="1.0"?><Types/>'
    document = b'<?xml version="1.0"?><w:document/>'
    entries = [
        ("[Content_Types].xml", _deflate(types), zlib.crc32(types), len(types)),
        ("word/document.xml", _deflate(document), zlib.crc32(document), len(document)),
        ("word/media/zeros.bin", *_deflated_zeros(_BOMB_MIB)),
    ]
    return _zip_archive(entries)


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _deflated_zeros(mebibytes: int) -> tuple[bytes, int, int]:
    """Raw deflate data, CRC-32 and size of `mebibytes` MiB of zeros, built in well under 1 s."""
    zeros = bytes(_MIB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # A full flush resets the compressor, so each further MiB of zeros deflates to the
    # same bytes: compress one MiB and repeat it instead of compressing them all.
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(zeros, crc)
    return block * mebibytes + compressor.flush(), crc, mebibytes * _MIB


def _zip_archive(entries: list[tuple[str, bytes, int, int]]) -> bytes:
    """A ZIP of (name, raw deflate data, CRC-32, uncompressed size) entries, written by hand
    because zipfile can only store data it compresses itself."""
    body = bytearray()
    directory = bytearray()
    for name, data, crc, size in entries:
        encoded = name.encode()
        # method, time, date, CRC-32, compressed size, uncompressed size
        fields = (_DEFLATE, 0, _DOS_DATE_1980_01_01, crc, len(data), size)
        directory += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", _ZIP_VERSION, _ZIP_VERSION, 0, *fields,
            len(encoded), 0, 0, 0, 0, 0, len(body),
        )  # fmt: skip
        directory += encoded
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", _ZIP_VERSION, 0, *fields, len(encoded), 0)
        body += encoded + data
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), len(body), 0
    )
    return bytes(body + directory + end)
