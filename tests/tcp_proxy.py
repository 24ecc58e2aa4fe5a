"""A TCP forwarder the tests can cut and restore, to take a real server away mid-test."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(eq=False)
class _Relay:
    """One client connection and the proxy's connection upstream for it."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    severed: bool = False


class TcpProxy:
    """Forwards a local port to Redis; `stop` drops every connection, `start` listens again,
    `sever` drops them unseen (see there); `reply_delay` (seconds) holds back every reply,
    making the server slow instead of gone."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._relays: set[_Relay] = set()
        self.port = 0
        self.reply_delay = 0.0

    async def start(self) -> None:
        # Same port on restart, so the client's pool reconnects to where it was.
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        writers, self._writers = self._writers, set()
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def sever(self) -> None:
        """Drop every connection on the server's side only, as a server that restarted
        behind a NAT or load balancer does: a client learns of it only when it next sends,
        with a reset. New connections work at once (the server is back)."""
        for relay in list(self._relays):
            relay.severed = True
            relay.upstream.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.add(upstream_writer)
        relay = _Relay(writer, upstream_writer)
        self._relays.add(relay)
        try:
            await asyncio.gather(
                self._pipe(reader, relay, upstream_writer),
                self._pipe(upstream_reader, relay, writer),
                return_exceptions=True,
            )
        finally:
            self._relays.discard(relay)

    async def _pipe(
        self, reader: asyncio.StreamReader, relay: _Relay, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                if relay.severed:  # the client sent something on a severed connection
                    relay.client.transport.abort()
                    return
                if writer is relay.client and self.reply_delay:
                    await asyncio.sleep(self.reply_delay)
                writer.write(data)
                await writer.drain()
        finally:
            if not relay.severed:
                writer.close()


@contextlib.asynccontextmanager
async def proxy_to(url: str, default_port: int) -> AsyncIterator[TcpProxy]:
    """A started TcpProxy in front of the server at `url`, stopped on the way out whether
    or not the test left it listening."""
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or default_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
