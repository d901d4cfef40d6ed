"""Misuse of the client and the command line gets an error that says what to do instead."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from botmsg_async import BotMessageClient, Outcome, WrongEventLoopError
from botmsg_async._delivery import is_retryable, may_resend, outcome_of, stops_batch

from .conftest import DEPT, PASSWORD, SUCCESS, USER, USERNAME, ScriptedServer


async def _ok_then_close(request: web.Request) -> web.StreamResponse:
    """Answer SUCCESS and close the connection, so that no client pools it."""
    return web.json_response(SUCCESS, headers={"Connection": "close"})


@contextlib.contextmanager
def server_in_a_thread() -> Iterator[ScriptedServer]:
    """A scripted loopback server on its own loop in a thread: it outlives any asyncio.run."""
    loop = asyncio.new_event_loop()
    srv = ScriptedServer()
    srv.default = _ok_then_close
    loop.run_until_complete(srv.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_a_client_used_from_a_second_event_loop_says_so() -> None:
    """A client used in one asyncio.run, then another: WrongEventLoopError, nothing sent."""
    with server_in_a_thread() as srv:
        client = BotMessageClient(srv.base_url, USERNAME, PASSWORD)
        asyncio.run(client.send(DEPT, USER, "first"))
        assert len(srv.seen) == 1

        with pytest.raises(WrongEventLoopError, match=r"create one per loop, inside asyncio\.run"):
            asyncio.run(client.send(DEPT, USER, "second"))
        with pytest.raises(WrongEventLoopError, match="belongs to the event loop"):
            asyncio.run(client.send_many([(DEPT, USER, "third")]))
        assert len(srv.seen) == 1
        asyncio.run(client.aclose())


def test_a_client_opened_with_no_running_loop_says_so() -> None:
    """ensure_open() outside any event loop raises WrongEventLoopError, not aiohttp's error."""
    client = BotMessageClient("https://api.example.com", USERNAME, PASSWORD)
    with pytest.raises(WrongEventLoopError, match="no running event loop"):
        client.ensure_open()
    assert client._session is None


def test_a_second_event_loop_is_classified_like_a_closed_client() -> None:
    """Not retried, stops a batch, SKIPPED before any attempt, may be sent by a later run."""
    error = WrongEventLoopError("second loop")
    assert not is_retryable(error, retry_ambiguous=True)
    assert stops_batch(error)
    assert outcome_of(error, attempts=0) is Outcome.SKIPPED
    assert may_resend(error)
