"""Tools for the reliability suite: a loopback TCP proxy that can refuse connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from _pytest.terminal import TerminalReporter


class RefusingProxy:
    """Forwards 127.0.0.1:port to a target port, and can stop listening for a while.

    While it is not listening, connections are refused by the kernel, exactly as
    when a server is down: the client gets ECONNREFUSED before sending anything.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        sock.close()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.refusals = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def refuse_for(self, seconds: float) -> None:
        """Stop listening for ``seconds``, then listen again on the same port."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.refusals += 1
        await asyncio.sleep(seconds)
        await self.start()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.close()


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    """Print the soak's figures at the end of every run: the README quotes them."""
    from . import test_soak

    for name, figures in test_soak.FIGURES.items():
        shown = {k: (str(v) if isinstance(v, dict) else v) for k, v in figures.items()}
        terminalreporter.write_line(f"reliability soak ({name}): {shown}")
    from . import test_stale_connections

    for name, counts in test_stale_connections.FIGURES.items():
        terminalreporter.write_line(f"stale connections ({name}): {counts}")
