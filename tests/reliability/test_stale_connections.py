"""Stale pooled connections: dropped or retried when provably unsent, never sent twice.

Two servers close keep-alive connections legally but unhelpfully: one after an
idle timeout equal to the client's send interval, one right after each answer
without ``Connection: close``. Each records what it received by idempotency key,
so an UNKNOWN for a request that never arrived is counted as a false UNKNOWN.
``FIGURES`` keeps the last run's counts for the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import select
import socket
import struct
import sys
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from botmsg_async import (
    BotMessageClient,
    BotMessageError,
    DeliveryUnknownError,
    InvalidRequestError,
    RetryBudget,
    RetryEvent,
    TransportError,
    _http,
)

from .hostile import Closing, HostileServer

STALE = "closed before the request was written"
FIGURES: dict[str, dict[str, int]] = {}


async def no_wait(_: float) -> None:
    """Retry backoff that does not wait: the decisions are the same."""
    await asyncio.sleep(0)


def is_stale_retry(event: RetryEvent) -> bool:
    error = event.error
    return (
        isinstance(error, TransportError)
        and not isinstance(error, DeliveryUnknownError)
        and STALE in error.message
    )


async def send_one_by_one(
    server: HostileServer,
    sends: int,
    *,
    interval: float = 0.0,
    keepalive_timeout: float = 4.0,
    session: aiohttp.ClientSession | None = None,
) -> dict[str, int]:
    """Send ``sends`` messages in turn, ``interval`` apart; count what became of them."""
    stale_retries = 0

    def on_retry(event: RetryEvent) -> None:
        nonlocal stale_retries
        stale_retries += is_stale_retry(event)

    outcomes: Counter[str] = Counter()
    async with BotMessageClient(
        server.base_url,
        "bot",
        "pw",
        keepalive_timeout=keepalive_timeout,
        retry_budget=RetryBudget(ratio=1.0, burst=sends),
        session=session,
        sleep=no_wait,
        on_retry=on_retry,
    ) as client:
        for i in range(sends):
            before = sum(server.received.values())
            try:
                await client.send("dept", f"user-{i}", f"message {i}")
            except DeliveryUnknownError as exc:
                outcomes["unknown"] += 1
                if server.received[exc.idempotency_key or ""] == 0:
                    outcomes["false_unknown"] += 1
            except BotMessageError:
                outcomes["failed"] += 1
                # FAILED must mean "not received": nothing new reached the server.
                assert sum(server.received.values()) == before
            else:
                outcomes["sent"] += 1
            if interval:
                await asyncio.sleep(interval)
    return {
        "sends": sends,
        "sent": outcomes["sent"],
        "failed": outcomes["failed"],
        "unknown": outcomes["unknown"],
        "false_unknown": outcomes["false_unknown"],
        "received_twice": sum(1 for n in server.received.values() if n > 1),
        "stale_retries": stale_retries,
        "connections": server.connections,
    }


def check_honest(counts: dict[str, int], server: HostileServer) -> None:
    """Nothing received twice; every SENT received once; every send accounted for."""
    assert counts["received_twice"] == 0
    assert counts["sent"] + counts["failed"] + counts["unknown"] == counts["sends"]
    assert counts["sent"] <= len(server.received)


async def test_closed_after_answer_is_not_unknown() -> None:
    """A server closing after each answer (no Connection: close) costs no false UNKNOWN."""
    async with HostileServer(Closing.AFTER_ANSWER) as server:
        counts = await send_one_by_one(server, 2_000)
    FIGURES["closes after each answer"] = counts
    check_honest(counts, server)
    assert counts["false_unknown"] <= counts["sends"] // 100  # was about half
    assert counts["sent"] == counts["sends"] - counts["unknown"]
    # The pool looks before it lends: no attempt is spent on a closed connection
    # (without the look, each one is refused unwritten and retried: 1,999 of 2,000).
    assert counts["stale_retries"] <= counts["sends"] // 100


async def test_closed_after_answer_lent_session_stays_honest() -> None:
    """With a lent session the client only maps the proof; still nothing received twice."""
    async with HostileServer(Closing.AFTER_ANSWER) as server, aiohttp.ClientSession() as session:
        counts = await send_one_by_one(server, 2_000, session=session)
    FIGURES["closes after each answer, lent session"] = counts
    check_honest(counts, server)


class ClosingConnector(aiohttp.TCPConnector):
    """Closes the first connection it lends, as a server FIN seen after the pick would."""

    dropped = 0

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[aiohttp.tracing.Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        transport = connection.transport
        if not self.dropped and transport is not None:
            self.dropped += 1
            # The FIN must be seen after the pick and before the write, which aiohttp
            # does at once on 3.12+ (an eager task) and one loop turn later on 3.11.
            if sys.version_info >= (3, 12):
                transport.close()
            else:
                asyncio.get_running_loop().call_soon(transport.close)
        return connection


async def test_closed_before_written_is_retried_as_unsent() -> None:
    """A connection closed before the request was written is a safe TransportError, retried."""
    events: list[RetryEvent] = []
    async with (
        HostileServer(Closing.AFTER_ANSWER) as server,
        aiohttp.ClientSession(connector=ClosingConnector()) as session,
        BotMessageClient(
            server.base_url, "bot", "pw", session=session, sleep=no_wait, on_retry=events.append
        ) as client,
    ):
        result = await client.send("dept", "user", "hello")
    assert result.attempts == 2
    assert [is_stale_retry(e) for e in events] == [True]
    assert list(server.received.values()) == [1]


@pytest.mark.slow
async def test_idle_timeout_equal_to_interval_stays_honest() -> None:
    """Idle timeout == send interval: ambiguous closes stay UNKNOWN, nothing received twice."""
    interval = 0.05
    async with HostileServer(Closing.IDLE_TIMEOUT, idle_timeout=interval) as server:
        counts = await send_one_by_one(server, 100, interval=interval)
    FIGURES[f"idle timeout {interval} s == interval, keepalive 4 s"] = counts
    check_honest(counts, server)


@pytest.mark.slow
async def test_idle_timeout_shorter_keepalive_avoids_the_race() -> None:
    """A client keep-alive shorter than the server's idle timeout never meets its close."""
    interval = 0.05
    async with HostileServer(Closing.IDLE_TIMEOUT, idle_timeout=interval) as server:
        counts = await send_one_by_one(
            server, 100, interval=interval, keepalive_timeout=interval / 2
        )
    FIGURES[f"idle timeout {interval} s == interval, keepalive {interval / 2} s"] = counts
    check_honest(counts, server)
    assert counts["sent"] == counts["sends"]


@pytest.mark.parametrize("value", [0, -1.0, math.nan])
def test_keepalive_timeout_must_be_positive(value: float) -> None:
    """keepalive_timeout <= 0 or NaN is refused up front."""
    with pytest.raises(InvalidRequestError, match="keepalive_timeout"):
        BotMessageClient("http://127.0.0.1:1", "bot", "pw", keepalive_timeout=value)


async def test_answers_are_read_in_pieces_the_heap_serves() -> None:
    """The pool's asyncio connections read 64 KiB at a time: 256 KiB is mmapped per read."""
    release = asyncio.Event()

    async def slow_body(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse()
        await answer.prepare(request)
        await release.wait()  # the body comes once the test has looked at the connection
        await answer.write(b"{}")
        return answer

    app = web.Application()
    app.router.add_post("/", slow_body)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    session = _http.new_session(_http.SessionOptions(), aiohttp.ClientTimeout(total=10))
    try:
        async with session, session.post(f"http://127.0.0.1:{port}/", data=b"{}") as response:
            assert response.connection is not None
            transport = response.connection.transport
            assert transport is not None
            assert transport.max_size == 64 * 1024  # type: ignore[attr-defined]
            release.set()
            assert await response.read() == b"{}"
    finally:
        release.set()
        await runner.cleanup()


# -- the pool's look at a connection: what the server did on it, and the verdict ------------


def _urgent_byte(peer: socket.socket) -> None:
    peer.send(b"!", socket.MSG_OOB)


def _data(peer: socket.socket) -> None:
    peer.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")


def _fin(peer: socket.socket) -> None:
    peer.shutdown(socket.SHUT_WR)


def _rst(peer: socket.socket) -> None:
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


#: What a server may do to an idle keep-alive connection, and whether the pool may
#: lend it afterwards: exactly when ``select`` finds nothing to read (the check's
#: meaning since it was written). TCP urgent data is not readable to ``select``
#: (it is an exceptional condition) and is not in the HTTP byte stream.
SERVER_DOES = {
    "nothing": (None, True),
    "urgent byte": (_urgent_byte, True),
    "data": (_data, False),
    "FIN": (_fin, False),
    "RST": (_rst, False),
}


@contextlib.asynccontextmanager
async def live_connection() -> AsyncIterator[tuple[_http._LiveHandler, socket.socket, int]]:
    """A loopback connection under the pool's protocol: (its handler, the server's socket, fd)."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        transport, handler = await loop.create_connection(
            lambda: _http._LiveHandler(loop=loop), "127.0.0.1", port
        )
        peer, _ = listener.accept()  # the handshake is done: accept does not block
        try:
            fd = transport.get_extra_info("socket").fileno()
            yield handler, peer, fd
        finally:
            transport.close()
            peer.close()
            await asyncio.sleep(0)  # the transport's close runs


def _arrived(fd: int) -> None:
    """Block until what the server did is in the client's socket (an event, not a delay)."""
    watch = select.poll()
    watch.register(fd, select.POLLIN | select.POLLPRI)
    assert watch.poll(10_000), "the server's action never reached the client"


@pytest.mark.parametrize("action", list(SERVER_DOES), ids=list(SERVER_DOES))
async def test_a_pooled_connection_is_lent_as_select_would_lend_it(action: str) -> None:
    """is_connected() is "nothing readable", as select says, for each thing a server may do."""
    do, lendable = SERVER_DOES[action]
    async with live_connection() as (handler, peer, fd):
        if do is not None:
            do(peer)
            _arrived(fd)
        # Asked before the loop reads anything: the look itself decides, not the transport.
        readable, _, _ = select.select((fd,), (), (), 0)
        assert handler.is_connected() is lendable
        assert lendable is not bool(readable)


@pytest.mark.skipif(sys.platform == "win32", reason="descriptors are not numbered there")
async def test_a_connection_above_descriptor_1023_is_lent_again() -> None:
    """A socket numbered past select's FD_SETSIZE (1024) is looked at, not taken as dead."""
    import resource  # POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 1100
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the descriptor limit ({hard}) is below {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    filler: list[int] = []
    try:
        filler.append(os.open(os.devnull, os.O_RDONLY))
        # New descriptors take the lowest free number: fill every one below 1024.
        while filler[-1] < 1024:
            filler.append(os.dup(filler[0]))
        async with live_connection() as (handler, _peer, fd):
            assert fd >= 1024
            assert handler.is_connected()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
