"""A job's Redis commands whose reply is lost after Redis ran them (a dropped connection).

redis-py (and the run's own ``_patiently``) run such a command again; each of the
run's writes must come to the same as if it had run once: no item left "unknown"
that was never sent, none sent twice, no chunk lost from the accounting.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import uuid

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from botmsg_async import SendRequest
from botmsg_async.jobs import (
    _CREATE,
    _STOP,
    _WRITE,
    cancel_job,
    job_results,
    job_status,
    run_job_async,
)
from botmsg_async.testing import FakeBotMessageServer
from tests.redis._lossy import LossyRedisProxy

from .conftest import JobRedis

_WRITE_SHA = hashlib.sha1(_WRITE.encode()).hexdigest().encode()  # noqa: S324 - Redis's script id


def _items(n: int) -> list[SendRequest | None]:
    dept = str(uuid.uuid5(uuid.NAMESPACE_DNS, "dept"))
    return [
        SendRequest(dept, str(uuid.uuid5(uuid.NAMESPACE_DNS, f"lost{i}")), f"hello {i}")
        for i in range(n)
    ]


def _is_write(words: list[bytes]) -> bool:
    return words[0].upper() == b"EVALSHA" and words[1] == _WRITE_SHA


async def _run_through(
    proxy: LossyRedisProxy,
    items: list[SendRequest | None],
    *,
    created: bool = True,
    claim_timeout: float = 30.0,
    sent_before: int = 0,
) -> None:
    """Run the job "lost" through ``proxy``: every item sent, once; the job complete."""
    async with (
        FakeBotMessageServer() as server,
        Redis(port=proxy.port, retry=Retry(NoBackoff(), 1)) as redis,
    ):
        report = await run_job_async(
            redis,
            "lost",
            items,
            base_url=server.base_url,
            username=server.username,
            password=server.password,
            concurrency=4,
            chunk_size=8,
            claim_timeout=claim_timeout,
        )
        results = await job_results(redis, "lost", items)
        status = await job_status(redis, "lost")
        assert proxy.lost.is_set()
        assert report.created is created
        assert collections.Counter(r.outcome for r in results) == {"sent": len(items)}
        assert status.complete
        assert status.counts.sent == len(items)
        received = collections.Counter(m.user_uuid for m in server.messages)
        assert len(received) == len(items) - sent_before
        assert max(received.values()) == 1


async def _leave_chunks_of_a_stopped_run(url: str, items: list[SendRequest | None]) -> int:
    """Create the job with a run that stops after its first outcome: its other chunks stay
    pending under it, never refreshed again (as a dead run's), to be taken over.

    Returns how many messages it sent."""
    stop = asyncio.Event()
    async with FakeBotMessageServer() as server:
        await run_job_async(
            url,
            "lost",
            items,
            base_url=server.base_url,
            username=server.username,
            password=server.password,
            concurrency=1,
            chunk_size=8,
            on_result=lambda result: stop.set(),
            stop=stop,
        )
        return len(server.messages)


async def test_a_start_group_written_twice_is_sent_once(job_redis: JobRedis) -> None:
    """The first write (a start group) ran, its reply was lost, it ran again: all sent once."""
    async with LossyRedisProxy(str(job_redis.socket), _is_write) as proxy:
        await _run_through(proxy, _items(20))
        assert proxy.ran >= 2


@pytest.mark.parametrize("command", [b"XREADGROUP", b"XAUTOCLAIM"])
async def test_a_chunk_handed_out_with_its_reply_lost_is_not_lost(
    job_redis: JobRedis, command: bytes
) -> None:
    """The group gave the run a chunk, the reply was lost: the run still finds and sends it."""
    items = _items(24)
    sent_before = 0
    if command == b"XAUTOCLAIM":
        sent_before = await _leave_chunks_of_a_stopped_run(job_redis.url, items)
    async with LossyRedisProxy(
        str(job_redis.socket),
        lambda words: words[0].upper() == command,
        reply_matches=lambda reply: b"\r\na\r\n" in reply,  # it hands out a chunk {a, b}
    ) as proxy:
        # A run that lost a chunk waited for it for ever (its heartbeat kept it fresh).
        await asyncio.wait_for(
            _run_through(
                proxy,
                items,
                created=command == b"XREADGROUP",
                claim_timeout=0.2,
                sent_before=sent_before,
            ),
            20,
        )


async def test_a_run_whose_create_ran_twice_knows_it_created_the_job(job_redis: JobRedis) -> None:
    """The job's creation ran, its reply was lost, it ran again: the run still created it."""
    create_sha = hashlib.sha1(_CREATE.encode()).hexdigest().encode()  # noqa: S324
    async with LossyRedisProxy(
        str(job_redis.socket),
        lambda words: words[0].upper() == b"EVALSHA" and words[1] == create_sha,
    ) as proxy:
        await _run_through(proxy, _items(10), created=True)


async def test_a_cancel_whose_reply_was_lost_reports_the_cancel(job_redis: JobRedis) -> None:
    """The cancel ran, its reply was lost, it ran again: it still reports the job cancelled."""
    items = _items(4)
    async with FakeBotMessageServer() as server:
        await run_job_async(
            job_redis.url,
            "lost",
            items,
            base_url=server.base_url,
            username=server.username,
            password=server.password,
        )
    stop_sha = hashlib.sha1(_STOP.encode()).hexdigest().encode()  # noqa: S324
    async with (
        LossyRedisProxy(
            str(job_redis.socket),
            lambda words: words[0].upper() == b"EVALSHA" and words[1] == stop_sha,
        ) as proxy,
        Redis(port=proxy.port, retry=Retry(NoBackoff(), 1)) as redis,
    ):
        assert await cancel_job(redis, "lost") is True
        assert proxy.lost.is_set()
        assert (await job_status(redis, "lost")).state == "cancelled"
        assert await cancel_job(redis, "lost") is False  # a second cancel: not running
