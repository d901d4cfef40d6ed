"""A job's records in Redis holding what no run writes: only a BotMessageError escapes."""

from __future__ import annotations

import contextlib
import uuid

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

from redis.asyncio import Redis

from botmsg_async import SendRequest
from botmsg_async.jobs import JobError, job_results, job_status, run_job_async
from botmsg_async.testing import FakeBotMessageServer

from .conftest import JobRedis

#: Values no run writes into a field of the job's meta: too long for a float, too large a
#: count, nested too deep for the JSON parser, of another JSON type, not UTF-8, empty.
_JUNK = [
    b"1" + b"0" * 400,
    b"-1" + b"0" * 400,
    str(2**62).encode(),  # a Redis integer, yet more items than a job can hold
    b"[" * 100_000,
    b"5",
    b"[]",
    b"\xff\xfe",
    b"",
]
_META_FIELDS = ["items", "chunk", "chunks", "done", "t0", "ns", "nf", "nu", "nk", "options"]


def _items(n: int) -> list[SendRequest | None]:
    dept = str(uuid.uuid5(uuid.NAMESPACE_DNS, "dept"))
    return [
        SendRequest(dept, str(uuid.uuid5(uuid.NAMESPACE_DNS, f"hostile{i}")), f"hello {i}")
        for i in range(n)
    ]


async def test_junk_in_the_meta_is_a_job_error_or_read_as_absent(job_redis: JobRedis) -> None:
    """Each meta field holding junk: status, report and a rejoin raise a JobError at worst."""
    items = _items(20)
    async with FakeBotMessageServer() as server, Redis.from_url(job_redis.url) as r:

        async def join() -> None:
            await run_job_async(
                job_redis.url,
                "h",
                items,
                base_url=server.base_url,
                username=server.username,
                password=server.password,
                chunk_size=10,
            )

        await join()
        meta = "botmsg:job:{h}:meta"
        for field in _META_FIELDS:
            kept = await r.hget(meta, field)
            assert kept is not None
            for junk in _JUNK:
                await r.hset(meta, field, junk)
                for read in (job_status(job_redis.url, "h"), job_results(job_redis.url, "h")):
                    with contextlib.suppress(JobError):
                        await read
                if field in ("options", "items", "chunk"):  # checked when a run joins
                    with pytest.raises(JobError):
                        await join()
            await r.hset(meta, field, kept)
    assert len(server.messages) == 20
