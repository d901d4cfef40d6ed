"""A run that Redis fails (a write refused, the shared limiter unusable) ends, truthfully."""

from __future__ import annotations

import asyncio
import collections
import uuid
from pathlib import Path

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

import redis
import redis.asyncio as aioredis

from botmsg_async import SendRequest
from botmsg_async.jobs import JobError, job_results, job_status, run_job_async
from botmsg_async.shared import account_name
from botmsg_async.testing import FakeBotMessageServer, Fault, RequestInfo

from .conftest import JobRedis
from .test_jobs_cli import PASSWORD, botmsg_start, finish, run_args, write_items


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


async def test_items_the_limiter_failed_closed_on_are_sent_once_it_is_back(
    job_redis: JobRedis,
) -> None:
    """The shared limiter failing closed for a while: its items go later, the run ends."""
    items = _items(20)
    async with (
        FakeBotMessageServer() as server,
        aioredis.Redis.from_url(job_redis.url) as r,
    ):
        # The limiter's schedule key of another type: every slot fails closed (nothing sent).
        rate_key = f"botmsg:{{{account_name(server.base_url, server.username)}}}:rate"
        await r.hset(rate_key, "junk", "1")
        run = asyncio.ensure_future(
            run_job_async(
                job_redis.url,
                "limited",
                items,
                base_url=server.base_url,
                username=server.username,
                password=server.password,
                chunk_size=10,
                concurrency=4,
                rate_limit=1000,
                claim_timeout=1.0,
            )
        )

        async def a_group_was_taken_back() -> None:
            meta = "botmsg:job:{limited}:meta"
            while True:
                async with r.pipeline(transaction=True) as pipe:
                    pipe.hget(meta, "gen")
                    pipe.bitcount("botmsg:job:{limited}:started")
                    gen, started = await pipe.execute()
                if int(gen or 0) >= 1 and started == 0:
                    return  # started, failed closed before any attempt, start taken back
                await asyncio.sleep(0.01)

        await asyncio.wait_for(a_group_was_taken_back(), 30)
        await r.delete(rate_key)  # the limiter works again
        report = await asyncio.wait_for(run, 60)  # the old code waited for ever
        status = await job_status(job_redis.url, "limited")
    assert status.complete
    assert report.counts.sent == 20
    received = collections.Counter(m.user_uuid for m in server.messages)
    assert len(received) == 20
    assert max(received.values()) == 1


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "volatile-ttl"])
async def test_a_redis_that_evicts_keys_is_refused(job_redis: JobRedis, policy: str) -> None:
    """A Redis that may evict keys at its memory limit (a job's among them): refused, unless
    the loss is accepted; with noeviction, or no limit, it runs."""
    items = _items(4)
    async with (
        FakeBotMessageServer() as server,
        aioredis.Redis.from_url(job_redis.url) as r,
    ):

        async def run(job: str, accept_redis_loss: bool = False) -> None:
            await run_job_async(
                job_redis.url,
                job,
                items,
                base_url=server.base_url,
                username=server.username,
                password=server.password,
                accept_redis_loss=accept_redis_loss,
            )

        await r.config_set("maxmemory", 100 * 2**20)
        await r.config_set("maxmemory-policy", policy)
        with pytest.raises(JobError, match="evicts keys"):
            await run("evicting")
        assert server.messages == []
        await run("accepted", accept_redis_loss=True)
        await r.config_set("maxmemory-policy", "noeviction")
        await run("noeviction")
        await r.config_set("maxmemory-policy", policy)
        await r.config_set("maxmemory", 0)
        await run("unlimited")


async def test_send_many_exits_unknown_not_usage_when_outcomes_go_unrecorded(
    job_redis: JobRedis, tmp_path: Path
) -> None:
    """send-many --redis whose outcomes Redis refuses: exit 3 (unknown), never 2 (nothing sent)."""
    path = write_items(tmp_path, 20)
    admin = redis.Redis.from_url(job_redis.url)

    def refuse_writes(request: RequestInfo) -> bool:
        if request.user_uuid == "user-19":
            admin.config_set("maxmemory", 1)  # Redis full from the last send on
        return False

    try:
        async with FakeBotMessageServer(password=PASSWORD) as server:
            server.inject(Fault.LATENCY, when=refuse_writes, times=None)
            process = await botmsg_start(
                server, *run_args(job_redis, path, "--concurrency", "4", "--chunk-size", "10")
            )
            code, err = await finish(process)
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    assert "record the outcomes" in err
    assert "Traceback" not in err
    assert len(server.messages) == 20
    assert code == 3, err
