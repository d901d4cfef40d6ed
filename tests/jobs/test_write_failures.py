"""A run whose records Redis refuses to write: it ends, and nothing is reported but the truth."""

from __future__ import annotations

import asyncio
import collections
import uuid

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

import redis

from botmsg_async import SendRequest
from botmsg_async.jobs import JobError, job_results, run_job_async
from botmsg_async.testing import FakeBotMessageServer, Fault, RequestInfo

from .conftest import JobRedis


def _items(n: int) -> list[SendRequest | None]:
    dept = str(uuid.uuid5(uuid.NAMESPACE_DNS, "dept"))
    return [
        SendRequest(dept, str(uuid.uuid5(uuid.NAMESPACE_DNS, f"refused{i}")), f"hello {i}")
        for i in range(n)
    ]


async def test_outcomes_redis_refuses_end_the_run_with_a_job_error(job_redis: JobRedis) -> None:
    """Redis full as the last send goes out: a JobError (no hang), and no outcome made up."""
    items = _items(20)
    last = items[-1]
    assert last is not None
    admin = redis.Redis.from_url(job_redis.url)

    def refuse_writes(request: RequestInfo) -> bool:
        if request.user_uuid == str(last.user_uuid):
            # As a Redis at its memory limit (noeviction): from the last item's send on,
            # every script call is refused (OOM), so its outcome cannot be recorded, while
            # reads and the stream's commands go on.
            admin.config_set("maxmemory", 1)
        return False

    try:
        async with FakeBotMessageServer() as server:
            server.inject(Fault.LATENCY, when=refuse_writes, times=None)
            run = run_job_async(
                job_redis.url,
                "refused",
                items,
                base_url=server.base_url,
                username=server.username,
                password=server.password,
                chunk_size=10,
                concurrency=4,
            )
            with pytest.raises(JobError, match="record the outcomes"):
                await asyncio.wait_for(run, 60)  # the old code waited for ever
            admin.config_set("maxmemory", 0)
            results = await job_results(job_redis.url, "refused", items)
    finally:
        admin.close()
    received = collections.Counter(m.user_uuid for m in server.messages)
    assert len(received) == 20
    assert max(received.values()) == 1
    outcomes = collections.Counter(r.outcome for r in results)
    assert set(outcomes) <= {"sent", "unknown"}  # received: never failed nor skipped
    assert outcomes["unknown"] >= 1  # the last item's outcome is not on record
