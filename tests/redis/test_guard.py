"""RedisSendGuard against a real redis-server: each idempotency key is sent at most once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from typing import Literal

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from botmsg_async import (
    BotMessageClient,
    BotMessageError,
    CoordinationError,
    DeliveryUnknownError,
    IdempotencyConflictError,
    MessageDefaults,
    Outcome,
    RetryPolicy,
    SendFailedError,
    SendRequest,
    Status,
    shared,
)
from botmsg_async._guard import claim_record, fingerprint
from botmsg_async._wire import encode_request
from botmsg_async.shared import _CLAIM, RedisSendGuard
from botmsg_async.testing import FakeBotMessageServer, Fault
from tests.redis._lossy import LossyRedisProxy
from tests.redis_server import RedisServer

DEPT = "7f0c6a52-1c7e-4c3e-9a53-6c1f8f0f2a10"
USER = "b3d1e0a4-55aa-4b7e-8c0e-2f0f7e9d1c22"
NO_RETRY = RetryPolicy(max_attempts=1)


def _client(server: FakeBotMessageServer, guard: RedisSendGuard) -> BotMessageClient:
    return BotMessageClient(server.base_url, "bot", "pw", send_guard=guard, retry=NO_RETRY)


async def test_second_send_of_a_key_returns_the_recorded_result_without_sending(
    redis_server: RedisServer,
) -> None:
    """The first send records its SendResult; a second send of the key gets it back, unsent."""
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisSendGuard(redis_server.url, name="t") as guard,
        RedisSendGuard(redis_server.url, name="t") as other_worker,
        _client(server, guard) as first,
        _client(server, other_worker) as second,
    ):
        sent = await first.send(DEPT, USER, "hello", idempotency_key="job-1")
        again = await second.send(DEPT, USER, "hello", idempotency_key="job-1")
        assert again == sent
        assert again.status is Status.SUCCESS
        assert server.requests == 1
        # Records are JSON (never pickle) and expire after the guard's ttl.
        async with aioredis.Redis.from_url(redis_server.url) as r:
            raw = await r.get(guard.key_of("job-1"))
            assert raw is not None
            assert json.loads(raw)["state"] == "sent"
            assert 0 < await r.ttl(guard.key_of("job-1")) <= guard.ttl


async def test_a_recorded_final_failure_is_raised_again(redis_server: RedisServer) -> None:
    """A final FAILURE is recorded; a second send raises it, rebuilt, without sending."""
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisSendGuard(redis_server.url, name="t") as guard,
        _client(server, guard) as client,
    ):
        server.inject(Fault.PERMANENT_FAILURE, times=1)
        with pytest.raises(SendFailedError) as first:
            await client.send(DEPT, USER, "hello", idempotency_key="job-2")
        with pytest.raises(SendFailedError) as second:
            await client.send(DEPT, USER, "hello", idempotency_key="job-2")
        assert second.value.result.errors == first.value.result.errors
        assert not second.value.transient
        assert (second.value.department_uuid, second.value.user_uuid) == (DEPT, USER)
        assert server.requests == 1


async def test_a_key_is_freed_when_the_message_was_certainly_not_delivered(
    redis_server: RedisServer,
) -> None:
    """A transient FAILURE (not delivered, may go again) frees the key: a redelivery sends."""
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisSendGuard(redis_server.url, name="t") as guard,
        _client(server, guard) as client,
    ):
        server.inject(Fault.TRANSIENT_FAILURE, times=1)
        with pytest.raises(SendFailedError):
            await client.send(DEPT, USER, "hello", idempotency_key="job-3")
        result = await client.send(DEPT, USER, "hello", idempotency_key="job-3")
        assert result.status is Status.SUCCESS
        assert len(server.messages) == 1


async def test_an_unknown_delivery_stays_unknown(redis_server: RedisServer) -> None:
    """A send that may have been delivered is recorded unknown: never sent again."""
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisSendGuard(redis_server.url, name="t") as guard,
        _client(server, guard) as client,
    ):
        server.inject(Fault.DROP_AFTER, times=1)
        with pytest.raises(DeliveryUnknownError):
            await client.send(DEPT, USER, "hello", idempotency_key="job-4")
        with pytest.raises(DeliveryUnknownError) as again:
            await client.send(DEPT, USER, "hello", idempotency_key="job-4")
        assert again.value.idempotency_key == "job-4"
        assert server.requests == 1


async def test_a_claim_without_outcome_is_unknown_and_never_sent(
    redis_server: RedisServer,
) -> None:
    """A worker that died between claim and outcome leaves a claim: DeliveryUnknownError."""
    body = encode_request(MessageDefaults().message("hi"))
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisSendGuard(redis_server.url, name="t") as guard,
        _client(server, guard) as client,
        aioredis.Redis.from_url(redis_server.url) as r,
    ):
        await r.set(guard.key_of("job-5"), claim_record(fingerprint(DEPT, USER, body)))
        with pytest.raises(DeliveryUnknownError, match="claimed"):
            await client.send(DEPT, USER, "hi", idempotency_key="job-5")
        assert server.requests == 0


@pytest.mark.parametrize("kind", ["hash", "list", "set", "zset", "stream"])
async def test_a_key_of_another_type_is_unknown_and_never_sent(
    redis_server: RedisServer, kind: str
) -> None:
    """A record key another writer made a hash, list...: DeliveryUnknownError naming the
    type, never sent (not a CoordinationError that asks for the send again for ever)."""
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisSendGuard(redis_server.url, name="t") as guard,
        _client(server, guard) as client,
        aioredis.Redis.from_url(redis_server.url) as r,
    ):
        key = guard.key_of("job-6")
        if kind == "hash":
            await r.hset(key, "a", "1")
        elif kind == "list":
            await r.rpush(key, "a")
        elif kind == "set":
            await r.sadd(key, "a")
        elif kind == "zset":
            await r.zadd(key, {"a": 1})
        else:
            await r.xadd(key, {"a": "1"})
        for _ in range(2):
            with pytest.raises(DeliveryUnknownError, match=f"is a {kind}, not a record") as exc:
                await client.send(DEPT, USER, "hi", idempotency_key="job-6")
            assert exc.value.idempotency_key == "job-6"
        assert server.requests == 0
        assert await r.type(key) == kind.encode()  # left as it was: not ours to remove


@pytest.mark.parametrize(
    ("department", "user", "text"),
    [(str(uuid.uuid4()), USER, "hello"), (DEPT, str(uuid.uuid4()), "hello"), (DEPT, USER, "bye")],
    ids=["department", "user", "text"],
)
async def test_a_key_reused_for_another_message_is_refused(
    redis_server: RedisServer, department: str, user: str, text: str
) -> None:
    """The same key with another department, user or text is refused; nothing is sent."""
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisSendGuard(redis_server.url, name="t") as guard,
        _client(server, guard) as client,
    ):
        await client.send(DEPT, USER, "hello", idempotency_key="job-6")
        with pytest.raises(IdempotencyConflictError, match="different message"):
            await client.send(department, user, text, idempotency_key="job-6")
        assert server.requests == 1


async def test_sends_without_a_key_of_the_caller_are_not_guarded(
    redis_server: RedisServer,
) -> None:
    """A send with a generated key has nothing to dedupe: it writes no record."""
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisSendGuard(redis_server.url, name="t") as guard,
        _client(server, guard) as client,
        aioredis.Redis.from_url(redis_server.url) as r,
    ):
        await client.send(DEPT, USER, "hello")
        assert await r.dbsize() == 0


async def test_concurrent_sends_of_one_key_reach_the_service_once(
    redis_server: RedisServer,
) -> None:
    """Ten clients racing on one key: one sends, the others get the result or 'unknown'."""
    async with FakeBotMessageServer(username="bot", password="pw", latency=0.05) as server:
        guards = [RedisSendGuard(redis_server.url, name="t") for _ in range(10)]
        clients = [_client(server, guard) for guard in guards]
        try:
            outcomes = await asyncio.gather(
                *(c.send(DEPT, USER, "race", idempotency_key="job-7") for c in clients),
                return_exceptions=True,
            )
        finally:
            for c, g in zip(clients, guards, strict=True):
                await c.aclose()
                await g.aclose()
        assert server.requests == 1
        assert sum(not isinstance(o, BaseException) for o in outcomes) >= 1
        assert all(
            isinstance(o, DeliveryUnknownError) for o in outcomes if isinstance(o, BaseException)
        )


async def test_redis_down_fails_closed_and_recovers(own_redis_server: RedisServer) -> None:
    """Redis killed: the send fails with a 'not sent' CoordinationError; back: it sends."""
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisSendGuard(own_redis_server.url, name="t") as guard,
        _client(server, guard) as client,
    ):
        await client.send(DEPT, USER, "one", idempotency_key="job-8")
        own_redis_server.kill()
        with pytest.raises(CoordinationError, match="not sent"):
            await client.send(DEPT, USER, "two", idempotency_key="job-9")
        report = await client.send_many(
            [SendRequest(DEPT, USER, "three", idempotency_key="job-10")]
        )
        assert report.results[0].outcome is Outcome.FAILED
        assert isinstance(report.results[0].error, CoordinationError)
        assert server.requests == 1
        own_redis_server.start()
        result = await client.send(DEPT, USER, "two", idempotency_key="job-9")
        assert result.status is Status.SUCCESS
        assert server.requests == 2


# -- replies lost after Redis ran the command ------------------------------------------

_CLAIM_SHA = hashlib.sha1(_CLAIM.encode()).hexdigest().encode()  # noqa: S324 - Redis's script id


def _is_claim(words: list[bytes]) -> bool:
    return [w.upper() for w in words[:1]] == [b"EVALSHA"] and words[1] == _CLAIM_SHA


def _fp(text: str) -> str:
    return fingerprint(DEPT, USER, encode_request(MessageDefaults().message(text)))


def _their_claim(text: str, token: str | None) -> str:
    """Another sender's claim of ``text``, as ``claim_record`` writes it (by hand: the
    test also reads the same on the code from before tokens)."""
    data = {"v": 1, "state": "claimed", "fp": _fp(text)}
    if token is not None:
        data["tok"] = token
    return json.dumps(data)


@pytest.mark.parametrize("made_by", ["url", "caller"])
async def test_a_claim_whose_reply_was_lost_and_retried_is_ours_and_sent_once(
    redis_server: RedisServer, made_by: str
) -> None:
    """The claim ran, its reply was lost, redis-py ran it again: our own claim, sent once."""
    async with (
        LossyRedisProxy(str(redis_server.socket), _is_claim) as proxy,
        FakeBotMessageServer(username="bot", password="pw") as server,
        aioredis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 1)) as callers,
        RedisSendGuard(proxy.url if made_by == "url" else callers, name="t") as guard,
        _client(server, guard) as client,
        aioredis.Redis.from_url(redis_server.url) as r,
    ):
        result = await client.send(DEPT, USER, "hello", idempotency_key="lost-1")
        assert proxy.lost.is_set()
        assert proxy.ran == 2  # the claim ran twice: the retry found our own claim
        assert result.status is Status.SUCCESS
        assert server.requests == 1
        raw = await r.get(guard.key_of("lost-1"))
        assert raw is not None
        assert json.loads(raw)["state"] == "sent"
        assert await client.send(DEPT, USER, "hello", idempotency_key="lost-1") == result
        assert server.requests == 1


@pytest.mark.parametrize("mode", ["drop", "hold"])
async def test_a_claim_that_failed_after_it_ran_does_not_block_the_key(
    redis_server: RedisServer, mode: Literal["drop", "hold"]
) -> None:
    """A claim stored but unanswered (no retry): CoordinationError, and the key is freed."""
    async with (
        LossyRedisProxy(str(redis_server.socket), _is_claim, mode=mode) as proxy,
        FakeBotMessageServer(username="bot", password="pw") as server,
        aioredis.Redis(
            port=proxy.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0)
        ) as no_retry,
        RedisSendGuard(no_retry, name="t") as guard,
        _client(server, guard) as client,
        aioredis.Redis.from_url(redis_server.url) as r,
    ):
        with pytest.raises(CoordinationError, match="not sent"):
            await client.send(DEPT, USER, "hello", idempotency_key="lost-2")
        assert proxy.lost.is_set()
        assert server.requests == 0
        assert await r.get(guard.key_of("lost-2")) is None  # released
        result = await client.send(DEPT, USER, "hello", idempotency_key="lost-2")
        assert result.status is Status.SUCCESS
        assert server.requests == 1


@pytest.mark.parametrize("token", ["theirs", None], ids=["other token", "no token (old)"])
async def test_another_senders_claim_stays_unknown_and_is_never_released_by_us(
    redis_server: RedisServer, token: str | None
) -> None:
    """Someone else's claim (another token, or none): unknown, and our release leaves it."""
    theirs = _their_claim("hello", token)
    async with (
        LossyRedisProxy(str(redis_server.socket), _is_claim) as proxy,
        FakeBotMessageServer(username="bot", password="pw") as server,
        aioredis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0)) as no_retry,
        RedisSendGuard(no_retry, name="t") as guard,
        _client(server, guard) as client,
        aioredis.Redis.from_url(redis_server.url) as r,
    ):
        await r.set(guard.key_of("other"), theirs)
        # Our claim ran, found theirs, and its reply was lost: our release must not free it.
        with pytest.raises(CoordinationError):
            await client.send(DEPT, USER, "hello", idempotency_key="other")
        assert proxy.lost.is_set()
        assert await r.get(guard.key_of("other")) == theirs.encode()
        with pytest.raises(DeliveryUnknownError, match="claimed"):
            await client.send(DEPT, USER, "hello", idempotency_key="other")
        assert await r.get(guard.key_of("other")) == theirs.encode()
        assert server.requests == 0


@pytest.mark.parametrize("status", [503, 200], ids=["release", "record"])
async def test_a_settle_leaves_the_claim_another_sender_made_meanwhile(
    redis_server: RedisServer, status: int
) -> None:
    """Our claim expired mid-send and another sender claimed the key: our settle leaves it."""
    arrived, answer = asyncio.Event(), asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        arrived.set()
        await answer.wait()
        if status == 200:
            return web.json_response({"status": "SUCCESS", "messageUuid": str(uuid.uuid4())})
        return web.Response(status=status)  # not processed: the claim is released

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with (
            RedisSendGuard(redis_server.url, name="t") as guard,
            BotMessageClient(
                f"http://127.0.0.1:{port}", "bot", "pw", send_guard=guard, retry=NO_RETRY
            ) as client,
            aioredis.Redis.from_url(redis_server.url) as r,
        ):
            sending = asyncio.ensure_future(
                client.send(DEPT, USER, "hello", idempotency_key="swap")
            )
            await arrived.wait()
            theirs = _their_claim("hello", "theirs").encode()
            try:
                await r.set(guard.key_of("swap"), theirs)
            finally:
                answer.set()
            with contextlib.suppress(BotMessageError):
                await sending
            assert await r.get(guard.key_of("swap")) == theirs
    finally:
        await runner.cleanup()


async def test_a_send_cancelled_while_its_claim_ran_frees_the_key(
    redis_server: RedisServer,
) -> None:
    """Cancelled with the claim stored and its reply not yet back: the key is freed."""
    async with (
        LossyRedisProxy(str(redis_server.socket), _is_claim, mode="hold") as proxy,
        FakeBotMessageServer(username="bot", password="pw") as server,
        aioredis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0)) as callers,
        aioredis.Redis.from_url(redis_server.url) as r,
    ):
        guard = RedisSendGuard(callers, name="t")
        async with _client(server, guard) as client:
            sending = asyncio.ensure_future(
                client.send(DEPT, USER, "hello", idempotency_key="cancelled")
            )
            await proxy.lost.wait()  # Redis ran the claim; its reply is held
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            await guard.aclose()  # the release under way finishes
        assert await r.get(guard.key_of("cancelled")) is None
        async with (
            RedisSendGuard(redis_server.url, name="t") as again,
            _client(server, again) as client,
        ):
            result = await client.send(DEPT, USER, "hello", idempotency_key="cancelled")
        assert result.status is Status.SUCCESS
        assert server.requests == 1


async def test_aclose_does_not_wait_for_ever_on_a_release_redis_never_answers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancelled send's release that a silent Redis never answers: aclose gives it up."""
    monkeypatch.setattr(shared, "RELEASE_WAIT", 0.05)
    heard = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # a frozen host: takes every command, answers none
        while await reader.read(65536):
            heard.set()

    silent_redis = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = silent_redis.sockets[0].getsockname()[1]
    try:
        async with (
            FakeBotMessageServer(username="bot", password="pw") as server,
            aioredis.Redis(port=port, socket_timeout=None, socket_connect_timeout=None) as callers,
        ):
            guard = RedisSendGuard(callers, name="t")
            async with _client(server, guard) as client:
                sending = asyncio.ensure_future(
                    client.send(DEPT, USER, "hello", idempotency_key="frozen")
                )
                await heard.wait()  # the claim is on its way; no reply will ever come
                sending.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await sending
                with caplog.at_level(logging.WARNING, logger="botmsg_async"):
                    # Before: aclose awaited the release for ever.
                    await asyncio.wait_for(guard.aclose(), 30)
            assert "frozen" in caplog.text
            assert server.requests == 0
    finally:
        for writer in held:
            writer.close()
        silent_redis.close()
        await silent_redis.wait_closed()


async def test_a_send_again_right_after_a_cancelled_claim_is_sent(
    redis_server: RedisServer,
) -> None:
    """Cancelled mid-claim, then sent again at once with the key: sent, not "unknown"."""
    async with (
        LossyRedisProxy(str(redis_server.socket), _is_claim, mode="hold") as proxy,
        FakeBotMessageServer(username="bot", password="pw") as server,
        aioredis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0)) as callers,
        RedisSendGuard(callers, name="t") as guard,
        _client(server, guard) as client,
    ):
        sending = asyncio.ensure_future(client.send(DEPT, USER, "hello", idempotency_key="again"))
        await proxy.lost.wait()  # Redis ran the claim; its reply is held
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        # The caller's retry, before the cancelled claim's release has run: it used to
        # find that claim and report the message's delivery unknown.
        result = await client.send(DEPT, USER, "hello", idempotency_key="again")
        assert result.status is Status.SUCCESS
        assert server.requests == 1
