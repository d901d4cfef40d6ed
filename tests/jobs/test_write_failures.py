"""A run that Redis fails (a write refused, the shared limiter unusable) ends, truthfully."""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

import redis
import redis.asyncio as aioredis

from botmsg_async import BotMessageClient, CoordinationError, SendRequest
from botmsg_async.jobs import (
    JobError,
    _Chunk,
    _Pending,
    _Run,
    job_results,
    job_status,
    run_job_async,
)
from botmsg_async.shared import RedisRateLimiter
from botmsg_async.testing import FakeBotMessageServer, Fault, RequestInfo
from tests.test_cli import read_jsonl

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
    job_redis: JobRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared limiter failing closed for a while: its items go later, the run ends."""
    items = _items(20)
    # Redis refusing the limiter's script: every slot fails closed (nothing sent). (A schedule
    # key of another type did that once; it is now read as absent.)
    broken = [True]
    reserve = RedisRateLimiter._reserve

    async def refused(
        self: RedisRateLimiter, mode: int, department: str, slots: int
    ) -> tuple[int, int, list[int]]:
        if broken[0]:
            raise CoordinationError("the shared rate limiter could not use Redis (refused)")
        return await reserve(self, mode, department, slots)

    monkeypatch.setattr(RedisRateLimiter, "_reserve", refused)
    async with (
        FakeBotMessageServer() as server,
        aioredis.Redis.from_url(job_redis.url) as r,
    ):
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
        broken[0] = False  # the limiter works again
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


@pytest.mark.parametrize("what", ["an outcome", "a start group"])
async def test_a_write_to_a_job_gone_from_redis_leaves_no_key_for_ever(
    job_redis: JobRedis, what: str
) -> None:
    """A run's write after the job's keys were lost (a flush, a restart without them, an
    expiry): a JobError saying so, and nothing written (the old write left the meta and
    bitmaps with no TTL: the job name could never be joined again)."""
    async with (
        aioredis.Redis.from_url(job_redis.url) as r,
        BotMessageClient("http://127.0.0.1:9", "user", "pw") as client,
    ):
        run = _Run(
            r,
            "gone",
            _items(4),
            client=client,
            limiter=None,
            concurrency=1,
            retry=None,
            resend_unknown=False,
            claim_timeout=30,
            on_result=None,
        )
        if what == "an outcome":
            meta = _Pending(3, "k", _Chunk("1-0", 0, 4), in_doubt=False, started=True)
            run._record(meta, "sent", str(uuid.uuid4()), None, None, None)
            await run.drain()
            assert run.failure is not None
            assert "gone from Redis" in run.failure.message
        else:
            with pytest.raises(JobError, match="gone from Redis"):
                await run._start_group([0, 1])
        forever = [key for key in await r.keys("*") if await r.ttl(key) == -1]
        assert forever == []
        assert not await r.exists("botmsg:job:{gone}:meta")


def _after_the_first_page(monkeypatch: pytest.MonkeyPatch, then: Callable[[], None]) -> None:
    """Make the job report (4 items a page) call ``then`` once its first page is out."""
    from botmsg_async import jobs

    real = jobs.iter_job_results

    async def report(
        url: str,
        job: str,
        items: collections.abc.Sequence[SendRequest | None] | None = None,
        *,
        page_size: int = 4,
    ) -> collections.abc.AsyncGenerator[jobs.JobItemResult, None]:
        async with contextlib.aclosing(real(url, job, items, page_size=4)) as results:
            async for result in results:
                yield result
                if result.index == 3:
                    then()

    monkeypatch.setattr(jobs, "iter_job_results", report)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_redis_gone_while_out_is_written_is_exit_3_not_a_traceback(
    job_redis: JobRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    workers: str,
) -> None:
    """send-many --redis (a run, or a --workers parent) whose Redis goes away while it
    writes --out, every item sent: exit 3 saying --out is not complete (not a traceback,
    not exit 2 "nothing sent"); the lines written stand."""
    from botmsg_async import jobs
    from botmsg_async.cli import main
    from tests.test_docs import ThreadServer

    path = write_items(tmp_path, 10)
    out = tmp_path / "out.jsonl"
    _after_the_first_page(monkeypatch, job_redis.kill)
    monkeypatch.setattr(jobs, "REDIS_WAIT", 0.2)  # gone for good: no need to wait 60 s
    with ThreadServer() as server:
        monkeypatch.setenv("BOTMSG_BASE_URL", server.base_url)
        monkeypatch.setenv("BOTMSG_USERNAME", server.username)
        monkeypatch.setenv("BOTMSG_PASSWORD", server.password)
        code = main([*run_args(job_redis, path, "--workers", workers), "--out", str(out)])
        assert len(server.messages) == 10
    err = capsys.readouterr().err
    assert code == 3, err
    assert "--out is not complete" in err
    assert [line["index"] for line in read_jsonl(out)] == [0, 1, 2, 3]


def test_redis_restarted_while_out_is_written_loses_no_line(
    job_redis: JobRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """send-many --redis whose Redis restarts (AOF) while it writes --out: the report
    waits for it, as the run's other calls do, and --out gets every item (exit 0)."""
    from botmsg_async.cli import main
    from tests.test_docs import ThreadServer

    def restart() -> None:
        job_redis.kill()
        job_redis.start()

    path = write_items(tmp_path, 10)
    out = tmp_path / "out.jsonl"
    _after_the_first_page(monkeypatch, restart)
    with ThreadServer() as server:
        monkeypatch.setenv("BOTMSG_BASE_URL", server.base_url)
        monkeypatch.setenv("BOTMSG_USERNAME", server.username)
        monkeypatch.setenv("BOTMSG_PASSWORD", server.password)
        code = main([*run_args(job_redis, path), "--out", str(out)])
        assert len(server.messages) == 10
    err = capsys.readouterr().err
    assert code == 0, err
    lines = read_jsonl(out)
    assert [line["index"] for line in lines] == list(range(10))
    assert {line["outcome"] for line in lines} == {"sent"}
