"""A loopback TCP proxy to a redis-server that loses the reply of a command Redis ran.

The proxy reads the RESP (2 or 3) frames both ways: the commands the client
sends, and Redis's replies, which come back in the same order. The first reply
to a command that ``matches``, that is not an error (so Redis ran it: a
NOSCRIPT error, say, is passed on) and that ``reply_matches``, is lost: the
proxy closes the client's connection instead of passing it on
(``mode="drop"``), or keeps it, and everything after it on that connection,
until the client gives up (``mode="hold"``: the client's socket timeout
elapses). Later connections go through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Literal, Self


def frame_end(buf: bytes | bytearray, pos: int) -> int | None:
    """Where the RESP2/RESP3 frame that starts at ``pos`` ends; None while it is incomplete."""
    line = buf.find(b"\r\n", pos)
    if line < 0:
        return None
    kind, head = buf[pos : pos + 1], bytes(buf[pos + 1 : line])
    if kind in (b"+", b"-", b":", b"_", b"#", b",", b"("):
        return line + 2
    if kind in (b"$", b"!", b"="):
        size = int(head)
        if size < 0:
            return line + 2
        end = line + 2 + size + 2
        return end if len(buf) >= end else None
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = max(int(head), 0) * (2 if kind in (b"%", b"|") else 1)
        at: int | None = line + 2
        for _ in range(count):
            assert at is not None
            at = frame_end(buf, at)
            if at is None:
                return None
        if kind == b"|" and at is not None:
            return frame_end(buf, at)  # attributes come before the reply they describe
        return at
    raise ValueError(f"not RESP: {bytes(buf[pos : pos + 20])!r}")


def command_words(frame: bytes) -> list[bytes]:
    """The words of a command frame (an array of bulk strings, as redis-py sends)."""
    words: list[bytes] = []
    line = frame.find(b"\r\n")
    at = line + 2
    for _ in range(int(frame[1:line])):
        line = frame.find(b"\r\n", at)
        size = int(frame[at + 1 : line])
        words.append(frame[line + 2 : line + 2 + size])
        at = line + 2 + size + 2
    return words


class LossyRedisProxy:
    """``127.0.0.1:port`` -> the redis-server's unix socket, losing one chosen reply.

    Attributes:
        lost: Set once the chosen reply has been lost.
        ran: How many times Redis ran a matching command (non-error replies).
    """

    def __init__(
        self,
        socket_path: str,
        matches: Callable[[list[bytes]], bool],
        *,
        mode: Literal["drop", "hold"] = "drop",
        reply_matches: Callable[[bytes], bool] = lambda reply: True,
    ) -> None:
        self.socket_path = socket_path
        self.matches = matches
        self.reply_matches = reply_matches
        self.mode = mode
        self.lost = asyncio.Event()
        self.ran = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        """The URL a client connects through."""
        return f"redis://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_unix_connection(self.socket_path)
        self._writers += [client_w, redis_w]
        doomed: deque[bool] = deque()  # per command sent, in order: does it match?
        up = asyncio.ensure_future(self._commands(client_r, redis_w, doomed))
        down = asyncio.ensure_future(self._replies(redis_r, client_w, doomed))
        self._tasks |= {up, down}
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        if self.mode == "hold" and not down.done():
            await asyncio.wait([up])  # a held reply: until the client hangs up
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        for writer in (client_w, redis_w):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _commands(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, doomed: deque[bool]
    ) -> None:
        buf = bytearray()
        while data := await reader.read(65536):
            buf += data
            at = 0
            while (end := frame_end(buf, at)) is not None:
                doomed.append(self.matches(command_words(bytes(buf[at:end]))))
                at = end
            del buf[:at]
            writer.write(data)
            await writer.drain()

    async def _replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, doomed: deque[bool]
    ) -> None:
        buf = bytearray()
        while data := await reader.read(65536):
            buf += data
            at = 0
            while (end := frame_end(buf, at)) is not None:
                reply = bytes(buf[at:end])
                at = end
                # A push (or a reply with no command waiting) is a pub/sub message.
                matched = doomed.popleft() if doomed and not reply.startswith(b">") else False
                if matched and not reply.startswith((b"-", b"!")):
                    self.ran += 1
                    if not self.lost.is_set() and self.reply_matches(reply):
                        self.lost.set()
                        if self.mode == "drop":
                            writer.close()
                        return  # "hold": nothing more reaches this client
                writer.write(reply)
            del buf[:at]
            await writer.drain()
