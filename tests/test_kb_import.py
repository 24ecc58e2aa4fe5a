"""`agentmesh kb import` end to end: the real command in a subprocess, talking over a socket
to a real server on SQLite that ingests one document at a time and lets one more wait, so
uploads really meet RESOURCE_EXHAUSTED and have to wait it out."""

import asyncio
import contextlib
import json
import os
import pty
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb

from server import migrations
from server.config import ROOT
from server.main import Application
from tests.documents import make_docx, make_pdf
from tests.harness import PASSWORD, Account, Stubs, new_admin, new_user, running_app
from tests.knowledge import get_document, search

IMPORT_TIMEOUT = 240.0
# Waits for a busy server are capped this short, so the test does not sleep the 30 s the
# server asks for; the pause itself is what is tested.
FAST = ["--max-retry-delay", "0.2", "--poll-interval", "0.1"]


@contextlib.asynccontextmanager
async def busy_server(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[Application, Stubs]]:
    """A server with one ingestion worker and room for one waiting document."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await asyncio.to_thread(migrations.upgrade, url)
    limits = {"ingest_queue_size": 1, "ingest_workers": 1, **settings}
    async with running_app(url, tmp_path / "data", **limits) as running:
        yield running


@pytest.fixture(scope="module")
async def busy(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Application, Stubs]]:
    async with busy_server(tmp_path_factory.mktemp("kb-import")) as running:
        yield running


def command(app: Application, *args: str | Path) -> list[str]:
    target = f"127.0.0.1:{app.grpc_port}"
    return [sys.executable, "-m", "server", "kb", "import", "--target", target, *map(str, args)]


def environment(**variables: str) -> dict[str, str]:
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("AGENTMESH_TOKEN", "AGENTMESH_PASSWORD")
    }
    return {**inherited, **variables}


async def run_import(
    app: Application, *args: str | Path, stdin: bytes = b"", **env: str
) -> tuple[int, dict[str, Any], str]:
    """Exit code, the --json summary and stderr of one `agentmesh kb import`."""
    process = await asyncio.create_subprocess_exec(
        *command(app, "--json", *args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=environment(**env),
    )
    async with asyncio.timeout(IMPORT_TIMEOUT):
        out, err = await process.communicate(stdin)
    assert process.returncode is not None
    return process.returncode, json.loads(out), err.decode()


def by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(f["path"]).name: f for f in summary["files"]}


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def sentence(word: str) -> str:
    return f"The field notes record that the {word} appeared at dawn near the river."


# Each good file holds one made-up word, so a search for it must find that file first.
GOOD: dict[str, tuple[str, Callable[[str], bytes]]] = {
    "notes/alpha.txt": ("quillfeather", lambda text: text.encode()),
    "notes/beta.md": ("marrowlight", lambda text: f"# Beta\n\n{text}\n".encode()),
    "notes/deep/gamma.txt": ("tindlewick", lambda text: text.encode()),
    "guide.md": ("brambleshank", lambda text: f"## Guide\n\n{text}\n".encode()),
    "reports/delta.pdf": ("vorpellium", lambda text: make_pdf(["Cover page", text])),
    "reports/epsilon.pdf": ("glimmerstone", lambda text: make_pdf([text])),
    "reports/zeta.docx": ("snarkwillow", lambda text: make_docx(["Zeta", text])),
    "eta.docx": ("thistlegrove", lambda text: make_docx(["Eta", text])),
}


async def test_import_reports_each_outcome_and_waits_out_backpressure(
    busy: tuple[Application, Stubs], tmp_path: Path
) -> None:
    app, stubs = busy
    account = await new_user(stubs, "importer")
    folder = tmp_path / "docs"
    for name, (word, build) in GOOD.items():
        write(folder / name, build(sentence(word)))
    write(folder / "broken.pdf", b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 9 0 R\ngarbage")
    write(folder / "copy-of-alpha.txt", (folder / "notes/alpha.txt").read_bytes())
    write(folder / "picture.png", b"\x89PNG\r\n\x1a\n not really")
    write(folder / ".cache/hidden.txt", b"hidden folders are left out")

    code, summary, stderr = await run_import(
        app, folder, *FAST, AGENTMESH_TOKEN=account.access_token
    )

    files = by_name(summary)
    assert code == 1, stderr  # the broken PDF failed
    assert summary["stopped"] is None
    assert (summary["ready"], summary["failed"]) == (len(GOOD), 1)
    assert (summary["deduplicated"], summary["skipped"], summary["unfinished"]) == (1, 1, 0)
    assert "hidden.txt" not in files and len(files) == len(GOOD) + 3
    broken = files["broken.pdf"]
    assert broken["outcome"] == "failed" and broken["reason"] and broken["document_id"]
    assert (await get_document(stubs, account, broken["document_id"])).status == (
        kb_pb.DOCUMENT_STATUS_FAILED
    )
    # Twins: whichever went first was stored, the other got the same document back.
    twins = [files["alpha.txt"], files["copy-of-alpha.txt"]]
    assert sorted(f["outcome"] for f in twins) == ["deduplicated", "ready"]
    assert twins[0]["document_id"] == twins[1]["document_id"]
    assert files["picture.png"]["outcome"] == "skipped"
    assert "not a knowledge-base format" in files["picture.png"]["reason"]
    # The queue holds one document while four uploads run at once: the server refused some
    # with RESOURCE_EXHAUSTED, and the import waited and sent them again instead of failing.
    assert summary["backpressure_waits"] >= 1
    assert "INGESTION_QUEUE_FULL" in stderr
    # Notes as plain lines on stderr (no progress bar outside a terminal).
    assert "picture.png" in stderr and "broken.pdf" in stderr and "\x1b[" not in stderr

    for name, (word, _) in GOOD.items():
        assert files[Path(name).name]["outcome"] in ("ready", "deduplicated")
        results = await search(stubs, account, word)
        assert results and results[0].document_id == files[Path(name).name]["document_id"]
        assert word in results[0].text
    listed = await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=account.metadata)
    assert len(listed.documents) == len(GOOD) + 1  # the duplicate made no second document


async def test_a_refused_token_stops_the_import(
    busy: tuple[Application, Stubs], tmp_path: Path
) -> None:
    app, _ = busy
    write(tmp_path / "a.txt", b"never sent")
    code, summary, _ = await run_import(app, tmp_path, AGENTMESH_TOKEN="not-a-token")
    assert code == 2
    assert "refused the credentials" in summary["stopped"]
    assert summary["unfinished"] == 1 and summary["backpressure_waits"] == 0


async def test_sharing_needs_an_administrator(
    busy: tuple[Application, Stubs], tmp_path: Path
) -> None:
    app, stubs = busy
    user = await new_user(stubs, "sharer")
    write(tmp_path / "a.txt", sentence("plumtoggle").encode())
    write(tmp_path / "b.txt", sentence("fennelgrit").encode())
    code, summary, _ = await run_import(
        app, tmp_path, "--shared", *FAST, AGENTMESH_TOKEN=user.access_token
    )
    assert code == 2
    assert "only administrators can share documents" in summary["stopped"]
    assert summary["ready"] == 0
    listed = await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=user.metadata)
    assert not listed.documents


async def test_an_administrator_logs_in_with_email_and_shares(
    busy: tuple[Application, Stubs], tmp_path: Path
) -> None:
    """--email reads the password from stdin; the shared document is found by other users."""
    app, stubs = busy
    admin = await new_admin(app, stubs)
    write(tmp_path / "policy.md", f"# Policy\n\n{sentence('lanternmoss')}\n".encode())
    code, summary, stderr = await run_import(
        app, tmp_path, "--email", admin.email, "--shared", *FAST, stdin=f"{PASSWORD}\n".encode()
    )
    assert code == 0, stderr
    assert summary["ready"] == 1
    document_id = summary["files"][0]["document_id"]
    reader: Account = await new_user(stubs, "reader")
    results = await search(stubs, reader, "lanternmoss")
    assert results and results[0].document_id == document_id


async def test_progress_bars_on_a_terminal(busy: tuple[Application, Stubs], tmp_path: Path) -> None:
    """On a terminal the bars of upload and ingestion are drawn, then the plain summary."""
    app, stubs = busy
    account = await new_user(stubs, "terminal")
    write(tmp_path / "one.txt", sentence("cobblewisp").encode())
    write(tmp_path / "two.md", sentence("drizzlefen").encode())
    leader, follower = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            *command(app, tmp_path, *FAST),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=follower,
            stderr=follower,
            cwd=ROOT,
            env=environment(AGENTMESH_TOKEN=account.access_token, COLUMNS="120", TERM="xterm"),
        )
        os.close(follower)
        output = await asyncio.wait_for(asyncio.to_thread(read_all, leader), IMPORT_TIMEOUT)
        assert await process.wait() == 0, output
    finally:
        os.close(leader)
    assert "\x1b[" in output  # drawn and redrawn in place
    assert "upload" in output and "ingestion" in output and "2/2" in output
    assert "2 READY, 0 FAILED, 0 deduplicated, 0 skipped" in output


def read_all(fd: int) -> str:
    """Everything written to a pty until its last writer closes it."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


async def test_a_login_renews_its_expired_access_token(tmp_path: Path) -> None:
    """Access tokens live one second here (plus the server's ten seconds of leeway): the
    import, logged in with --email, refreshes the token when it is refused, and goes on."""
    async with busy_server(tmp_path, access_token_ttl_seconds=1) as (app, stubs):
        account = await new_user(stubs, "renewer")
        write(tmp_path / "docs" / "late.txt", sentence("wombleshade").encode())
        code, summary, stderr = await run_import(
            app,
            tmp_path / "docs",
            "--email",
            account.email,
            "--poll-interval",
            "12",  # the first poll comes after the first token expired
            AGENTMESH_PASSWORD=PASSWORD,
        )
        assert code == 0, stderr
        assert summary["ready"] == 1 and summary["token_renewals"] >= 1
