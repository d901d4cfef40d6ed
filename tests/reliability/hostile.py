"""Raw HTTP/1.1 servers that close keep-alive connections in legal but unhelpful ways."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
from collections import Counter

_SUCCESS = b'{"requestUuid":"r","status":"SUCCESS","messageUuid":"m","errors":[],"warnings":[]}'
_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_SUCCESS)).encode() + b"\r\n\r\n" + _SUCCESS
)


class Closing(enum.Enum):
    """When the server closes a connection (never with ``Connection: close``)."""

    #: After a connection was idle this long, as uvicorn or Node do (5 s there).
    IDLE_TIMEOUT = "idle-timeout"
    #: Right after each answer (RFC 9112 section 9.5 allows closing at any time).
    AFTER_ANSWER = "after-answer"


class HostileServer:
    """A minimal HTTP/1.1 server that answers every POST with SUCCESS and then closes.

    It records each request it read in full by its ``Idempotency-Key``, so a test
    can tell a request that never arrived from one that arrived once or twice.
    """

    def __init__(self, closing: Closing, idle_timeout: float = 0.2) -> None:
        self.closing = closing
        self.idle_timeout = idle_timeout
        self.received: Counter[str] = Counter()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        sock.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        # Closing (not cancelling) the connections ends each handler at its next read.
        for writer in self._handlers.values():
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> HostileServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        self.connections += 1
        answered = False
        try:
            while True:
                head = reader.readuntil(b"\r\n\r\n")
                # The idle timer runs between requests, as uvicorn's and Node's
                # keep-alive timeouts do; a new connection waits for its first.
                if self.closing is Closing.IDLE_TIMEOUT and answered:
                    raw = await asyncio.wait_for(head, self.idle_timeout)
                else:
                    raw = await head
                length = 0
                key = ""
                for line in raw.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                    elif name.strip().lower() == "idempotency-key":
                        key = value.strip()
                await reader.readexactly(length)
                self.received[key] += 1
                writer.write(_ANSWER)
                await writer.drain()
                answered = True
                if self.closing is Closing.AFTER_ANSWER:
                    break
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.pop(task, None)
