"""A run's background loops end when cancelled, even when the cancel is lost in a Redis call.

The hang this guards against: ``run_job_async`` cancels its heartbeat and awaits it. A
cancel that lands inside the heartbeat's refresh call can be lost (redis-py writes each
command under ``asyncio.wait_for``, which on Python 3.11 returns the result and drops the
cancel when both come at once) or come out as a ``ConnectionError``; the loop went on
beating, with the job cancelled, and the run never ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from botmsg_async import BotMessageClient
from botmsg_async.jobs import _Run
from botmsg_async.shared import RedisRateLimiter


class _Call:
    """A Redis call that waits until cancelled, then loses the cancel (returns ``reply``)
    or raises ``ConnectionError`` instead; any later call ends the task (the bug: the
    loop went on after its cancel)."""

    def __init__(self, how: str, reply: Any = None) -> None:
        self.how = how
        self.reply = reply
        self.entered = asyncio.Event()
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise asyncio.CancelledError  # the loop went on after its cancel: end the test
        self.entered.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            if self.how == "lost":
                return self.reply
            raise RedisConnectionError("Connection closed by server.") from None
        raise AssertionError("never answered but by a cancel")


class _PubSub:
    """A pub/sub whose ``subscribe`` and ``get_message`` are the call above."""

    def __init__(self, call: _Call) -> None:
        self.subscribe = call
        self.get_message = call

    async def aclose(self) -> None:
        """Nothing to close."""


def _run(redis: Redis) -> _Run:
    client = BotMessageClient("http://127.0.0.1:9", "user", "pw")
    # A tiny claim timeout: the old heartbeat's next beat (its wrong going on) comes at once.
    return _Run(
        redis,
        "j",
        [],
        client=client,
        limiter=None,
        concurrency=1,
        retry=None,
        resend_unknown=False,
        claim_timeout=0.004,
        on_result=None,
    )


HOW = pytest.mark.parametrize("how", ["lost", "error"])


@HOW
async def test_the_heartbeat_ends_on_a_cancel_lost_in_its_redis_call(how: str) -> None:
    """A cancel lost in the refresh call (or come out as ConnectionError) ends the heartbeat."""
    redis = Redis.from_url("redis://127.0.0.1:9")  # never connected: the call is replaced
    run = _run(redis)
    call = _Call(how, [b"cancelled", b"cancelled by request"])
    run._refresh = call  # type: ignore[assignment]
    beat = asyncio.ensure_future(run.heartbeat())
    await call.entered.wait()
    beat.cancel()
    with pytest.raises(asyncio.CancelledError):
        await beat
    assert call.calls == 1
    await redis.aclose()


@HOW
async def test_the_listener_ends_on_a_cancel_lost_in_its_redis_call(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A cancel lost in the subscribe call (or come out as ConnectionError) ends the listener."""
    redis = Redis.from_url("redis://127.0.0.1:9")
    run = _run(redis)
    call = _Call(how)
    monkeypatch.setattr(redis, "pubsub", lambda: _PubSub(call))
    # The listener waits half a second before listening again: not in this test.
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    listener = asyncio.ensure_future(run._listen(asyncio.Event()))
    await call.entered.wait()
    listener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await listener
    assert call.calls == 1
    await redis.aclose()


_real_sleep = asyncio.sleep


async def _no_sleep(delay: float, result: Any = None) -> Any:
    return await _real_sleep(0, result)


@HOW
async def test_the_limiter_listener_ends_on_a_cancel_lost_in_its_redis_call(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The run's shared limiter closes though its pause listener's cancel was lost."""
    redis = Redis.from_url("redis://127.0.0.1:9")
    call = _Call(how)
    monkeypatch.setattr(redis, "pubsub", lambda: _PubSub(call))
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    limiter = RedisRateLimiter(redis, name="t")
    # Starts the listener; its subscribe never answers, so this gives up waiting for it.
    assert await limiter.paused_for() == 0.0
    await call.entered.wait()
    await limiter.aclose()  # the old listener went on listening: this never returned
    assert call.calls == 1
    await redis.aclose()


async def test_a_redis_that_goes_silent_fails_the_run_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis that accepts and never answers: each command times out; a JobError, no hang."""
    from botmsg_async import jobs
    from botmsg_async.jobs import JobError, job_status, run_job_async

    connections: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read()  # reads the commands, never replies

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(jobs, "REDIS_SOCKET_TIMEOUT", 0.2)
    monkeypatch.setattr(jobs, "REDIS_WAIT", 0.5)
    try:
        with pytest.raises(JobError, match="Redis"):
            # Without socket timeouts this awaits a reply for ever (the guard: 30 s).
            await asyncio.wait_for(
                run_job_async(
                    f"redis://127.0.0.1:{port}",
                    "silent",
                    [("d", "u", "x")],
                    base_url="http://127.0.0.1:9",
                    username="u",
                    password="p",
                ),
                30,
            )
        with pytest.raises(JobError, match="Redis"):
            await asyncio.wait_for(job_status(f"redis://127.0.0.1:{port}", "silent"), 30)
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
    assert connections  # it did connect: the silence, not a refusal, was met


def test_a_client_made_from_a_url_has_the_jobs_own_timeouts() -> None:
    """Not redis-py's defaults (none before 8.0, 5 s in 8.x): the jobs module's own."""
    from botmsg_async import jobs

    client, owned = jobs._connect("redis://127.0.0.1:9")
    settings = client.connection_pool.connection_kwargs
    assert owned
    assert settings["socket_timeout"] == jobs.REDIS_SOCKET_TIMEOUT
    assert settings["socket_connect_timeout"] == jobs.REDIS_CONNECT_TIMEOUT
    assert jobs.LISTEN_WAIT < jobs.REDIS_SOCKET_TIMEOUT  # a quiet channel is no error
