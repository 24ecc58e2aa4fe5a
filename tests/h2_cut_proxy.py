"""A TCP forwarder in front of an HTTP/2 server that passes every request on and cuts the
connection the moment the server starts to answer one: the server did the work, the client
never hears of it, as with a replica that dies right after handling a call."""

import asyncio
import contextlib

FRAME_HEADER = 9  # length (3 bytes), type, flags, stream id (4 bytes)
HEADERS = 0x1


class H2CutProxy:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        requests = asyncio.create_task(self._pipe(reader, upstream_writer))
        try:
            await self._answers(upstream_reader, writer)
        finally:
            requests.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await requests
            # abort, not close: the client sees a reset, not an orderly end.
            writer.transport.abort()
            upstream_writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    @staticmethod
    async def _answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward the server's frames (settings, pings, window updates) until it sends the
        headers of a response."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(FRAME_HEADER)
                length = int.from_bytes(header[:3], "big")
                stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                if header[3] == HEADERS and stream != 0:
                    return
                writer.write(header + await reader.readexactly(length))
                await writer.drain()
