"""Shared fixtures: a zero-wait client factory, a scripted loopback server, aioresponses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses
from aioresponses import core as aioresponses_core

from botmsg_async import BotMessageClient, RetryPolicy

USERNAME = "bot-user"
PASSWORD = "s3cr3t-pa55"
DEPT = "7f0c6a52-1c7e-4c3e-9a53-6c1f8f0f2a10"
USER = "b3d1e0a4-55aa-4b7e-8c0e-2f0f7e9d1c22"
SUCCESS = {"requestUuid": "req-1", "status": "SUCCESS", "messageUuid": "msg-1"}


class _ShimmedResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without aiohttp 3.14's ``stream_writer``.

    Upstream: pnuckowski/aioresponses#289 (fixes proposed in #288 and #292).
    ``test_aioresponses_still_needs_the_shim`` fails once a release no longer
    needs this; then delete it.
    """

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


@pytest.fixture
def mock_http(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    """aioresponses, patched to build aiohttp 3.14 responses."""
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _ShimmedResponse)
    with aioresponses() as mocked:
        yield mocked


class Sleeps:
    """A stand-in for asyncio.sleep that records waits and never waits."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


class FakeClock:
    """A monotonic clock that moves only when its ``sleep`` waits (or the test sets ``now``)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def sleeps() -> Sleeps:
    """Recorded, instant sleeps for clients under test."""
    return Sleeps()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ScriptedServer:
    """A real aiohttp.web server on 127.0.0.1 that answers from a script.

    Each request pops the next handler from ``script``; when it is empty,
    ``default`` answers (SUCCESS). ``seen`` keeps every request's headers and body.
    """

    def __init__(self) -> None:
        self.script: list[Handler] = []
        self.default: Handler = ok
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.peers: set[tuple[str, int]] = set()
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.path_qs, dict(request.headers), body))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer is not None:
            self.peers.add((peer[0], peer[1]))
        handler = self.script.pop(0) if self.script else self.default
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def start(self) -> None:
        # As the service must: the SDK's largest body (1 MiB of text, escaped) is over
        # aiohttp's default limit of 1 MiB.
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def ok(request: web.Request) -> web.StreamResponse:
    """Answer SUCCESS."""
    return web.json_response(SUCCESS)


def answer(
    status: int = 200, body: object = None, headers: dict[str, str] | None = None
) -> Handler:
    """A handler that answers ``body`` (JSON unless bytes/str) with ``status``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if isinstance(body, bytes | str):
            return web.Response(status=status, body=body, headers=headers)
        return web.json_response(
            body if body is not None else SUCCESS, status=status, headers=headers
        )

    return handler


def failure(code: str, description: str) -> Handler:
    """A handler that answers HTTP 200 with status FAILURE."""
    return answer(
        200,
        {
            "requestUuid": "r",
            "status": "FAILURE",
            "errors": [{"errorCode": code, "errorDescription": description}],
        },
    )


async def drop(request: web.Request) -> web.StreamResponse:
    """Read the request, then close the connection without answering."""
    assert request.transport is not None
    request.transport.close()
    raise asyncio.CancelledError  # aiohttp.web: stop handling, send nothing


def slow(seconds: float, then: Handler = ok) -> Handler:
    """A handler that waits ``seconds`` before answering."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await then(request)

    return handler


def client_tasks() -> set[asyncio.Task[Any]]:
    """Running tasks, leaving out the loopback server's own connection handlers."""
    return {t for t in asyncio.all_tasks() if "web_protocol" not in repr(t)}


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    """A started scripted loopback server."""
    srv = ScriptedServer()
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
def make_client(sleeps: Sleeps) -> Iterator[Callable[..., BotMessageClient]]:
    """Build clients that never wait for real; closes them all at the end."""
    made: list[BotMessageClient] = []

    def make(base_url: str, **options: Any) -> BotMessageClient:
        options.setdefault("sleep", sleeps)
        client = BotMessageClient(base_url, USERNAME, PASSWORD, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        assert client.closed, "a test left a client open"


__all__ = ["DEPT", "PASSWORD", "SUCCESS", "USER", "USERNAME", "RetryPolicy"]


SEND_ROUTE = "/communications/department/{dept}/user/{user}/botmessage/send"


@contextlib.asynccontextmanager
async def serving_send(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """Serve ``handle`` on the send endpoint on 127.0.0.1; yield the base URL."""
    app = web.Application()
    app.router.add_post(SEND_ROUTE, handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def run_botmsg(
    *args: str, base_url: str, username: str, password: str
) -> tuple[int, str, str]:
    """Run the real ``botmsg`` entry point in a subprocess; return (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOTMSG_")}
    env.update(BOTMSG_BASE_URL=base_url, BOTMSG_USERNAME=username, BOTMSG_PASSWORD=password)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "botmsg_async",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.contextmanager
def virtual_time(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Run ``loop`` on a clock that jumps to the next timer instead of waiting for it.

    As aiolimiter's own tests do, ``loop.time`` is replaced; the selector then
    never blocks: a wait for the next timer moves the clock by that much.
    Only for code that does no real I/O.
    """
    now = loop.time()
    selector: Any = loop._selector  # type: ignore[attr-defined]
    real_select = selector.select

    def time() -> float:
        return now

    def select(timeout: float | None = None) -> Any:
        nonlocal now
        events = real_select(0)
        if not events and timeout is not None:
            # At least a tick: a timer computed from float sums can land a hair
            # short of its instant, and a clock that never moves would spin there.
            now += max(timeout, 1e-7)
        return events

    with mock.patch.object(loop, "time", time), mock.patch.object(selector, "select", select):
        yield


class BrokenLogHandler(logging.Handler):
    """An application's log handler with a bug: its emit raises (no handleError)."""

    def emit(self, record: logging.LogRecord) -> None:
        raise RuntimeError("the handler broke")


@pytest.fixture
def broken_log_handler() -> Iterator[None]:
    """A ``BrokenLogHandler`` on the ``botmsg_async`` logger for the test's duration."""
    logger = logging.getLogger("botmsg_async")
    handler = BrokenLogHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
