"""botmsg_async.jobs against a real redis-server and the fake service, in one process."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import overload

import pytest
from aiohttp import web

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

from botmsg_async import SendRequest
from botmsg_async.jobs import (
    JobError,
    JobItemResult,
    JobReport,
    job_results,
    job_status,
    run_job_async,
)
from botmsg_async.testing import FakeBotMessageServer, Fault
from tests.conftest import serving_send

from .conftest import JobRedis


def _items(n: int, seed: str = "a") -> list[SendRequest | None]:
    dept = str(uuid.uuid5(uuid.NAMESPACE_DNS, "dept"))
    return [
        SendRequest(dept, str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{seed}{i}")), f"hello {i}")
        for i in range(n)
    ]


def _check_against_server(
    items: list[SendRequest | None], results: list[JobItemResult], server: FakeBotMessageServer
) -> None:
    """The report equals the server's records: sent ones received with their UUID, failed
    ones not received, and whatever was received is reported sent or unknown."""
    by_user = {m.user_uuid: m for m in server.messages}
    for r in results:
        item = items[r.index]
        assert item is not None
        got = by_user.get(str(item.user_uuid))
        if r.outcome == "sent":
            assert got is not None
            assert got.message_uuid == r.message_uuid
            assert got.idempotency_key == r.key
        elif r.outcome in ("failed", "skipped"):
            assert got is None
    assert len(results) == len({r.index for r in results})


async def test_three_runs_share_one_job(job_redis: JobRedis) -> None:
    """Three runs on one job: every item one outcome, none received twice, report = server."""
    items = _items(2000)
    async with FakeBotMessageServer(fault_rate=0.1, seed=7) as server:
        runs = [
            run_job_async(
                job_redis.url,
                "j1",
                items,
                base_url=server.base_url,
                username=server.username,
                password=server.password,
                concurrency=16,
                chunk_size=64,
            )
            for _ in range(3)
        ]
        reports = await asyncio.gather(*runs)
        assert sum(r.created for r in reports) == 1
        assert all(r.counts.total > 0 for r in reports)
        results = await job_results(job_redis.url, "j1", items)
        status = await job_status(job_redis.url, "j1")
    assert status.complete
    assert len(results) == 2000
    assert sorted(r.index for r in results) == list(range(2000))
    users = collections.Counter(m.user_uuid for m in server.messages)
    assert max(users.values()) == 1
    _check_against_server(items, results, server)
    assert status.counts.total == 2000


async def test_other_input_is_refused(job_redis: JobRedis) -> None:
    """The same job name with another input is refused before anything is sent."""
    async with FakeBotMessageServer() as server:
        url = server.base_url
        await run_job_async(
            job_redis.url, "j", _items(10), base_url=url, username="user", password="secret"
        )
        with pytest.raises(JobError, match="another input"):
            await run_job_async(
                job_redis.url,
                "j",
                _items(10, "b"),
                base_url=url,
                username="user",
                password="secret",
            )
        with pytest.raises(JobError, match="rate differ"):
            await run_job_async(
                job_redis.url,
                "j",
                _items(10),
                base_url=url,
                username="user",
                password="secret",
                rate_limit=5.0,
            )
        assert not server.messages[10:]


async def test_records_that_went_backwards_are_in_doubt(job_redis: JobRedis) -> None:
    """A generation lower than one a run saw (Redis lost writes): pending items unknown."""
    from redis.asyncio import Redis

    items = _items(600)
    async with FakeBotMessageServer(latency=0.01) as server:
        run = asyncio.ensure_future(
            run_job_async(
                job_redis.url, "j", items, base_url=server.base_url, username="user",
                password="secret", concurrency=8, chunk_size=50,
            )
        )  # fmt: skip
        while len(server.messages) < 100:  # noqa: ASYNC110 - the fake has no arrival event
            await asyncio.sleep(0.01)
        async with Redis.from_url(job_redis.url) as client:
            await client.hset("botmsg:job:{j}:meta", "gen", 0)  # as if the tail was lost
        report = await run
        results = await job_results(job_redis.url, "j", items)
    assert report.job.rewound
    assert report.job.complete
    _check_against_server(items, results, server)
    unknown = [r for r in results if r.outcome == "unknown"]
    assert unknown
    users = collections.Counter(m.user_uuid for m in server.messages)
    assert max(users.values()) == 1


async def test_runs_share_one_rate(job_redis: JobRedis) -> None:
    """Two runs of one job at rate 20/s share it: 50 sends span >= 2.3 s, not ~1.2 s each."""
    arrivals: list[float] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        arrivals.append(time.monotonic())
        key = request.headers["Idempotency-Key"]
        return web.json_response({"requestUuid": key, "status": "SUCCESS", "messageUuid": key})

    items = _items(50, seed="rate")
    async with serving_send(handle) as base_url:
        begun = time.monotonic()
        reports = await asyncio.gather(
            *(
                run_job_async(
                    job_redis.url,
                    "rated",
                    items,
                    base_url=base_url,
                    username="u",
                    password="p",
                    rate_limit=20,
                    chunk_size=5,
                )
                for _ in range(2)
            )
        )
    assert sum(r.counts.sent for r in reports) == 50
    assert all(r.counts.sent for r in reports)  # both runs sent, under one rate
    # Slots at 20/s with a burst of 2: the 50th is granted >= 2.4 s after the first, which
    # comes after ``begun``. A slow machine only delays the last arrival further (measuring
    # from the first arrival would not do: a late first send shortens that span); two
    # separate limits would be done in ~1.2 s.
    assert arrivals[-1] - begun >= 2.3


async def test_resend_unknown_on_a_complete_job(job_redis: JobRedis) -> None:
    """--resend-unknown on a complete job resends exactly its unknown items, same keys."""
    items = _items(300)
    doubtful = {str(item.user_uuid) for item in items[5::13] if item is not None}
    async with FakeBotMessageServer() as server:
        # A 500 proves nothing either way: the default policy reports the item unknown.
        server.inject(Fault.HTTP_500, when=lambda r: r.user_uuid in doubtful)

        async def run(resend_unknown: bool) -> JobReport:
            return await run_job_async(
                job_redis.url,
                "j-unknown",
                items,
                base_url=server.base_url,
                username=server.username,
                password=server.password,
                concurrency=8,
                chunk_size=64,
                resend_unknown=resend_unknown,
            )

        first = await run(False)
        assert first.job.complete
        before = {r.index: r for r in await job_results(job_redis.url, "j-unknown", items)}
        unknown = {i for i, r in before.items() if r.outcome == "unknown"}
        assert len(unknown) == len(doubtful)
        server.clear_faults()
        requests = server.requests
        plain = await run(False)
        assert plain.counts.total == 0
        assert server.requests == requests
        again = await run(True)
        after = {r.index: r for r in await job_results(job_redis.url, "j-unknown", items)}
        status = await job_status(job_redis.url, "j-unknown")
    assert again.counts.sent == len(unknown)
    assert server.requests == requests + len(unknown)
    resent = {m.idempotency_key for m in server.messages[-len(unknown) :]}
    assert resent == {before[i].key for i in unknown}
    assert all(after[i].outcome == "sent" and after[i].key == before[i].key for i in unknown)
    assert {i: r for i, r in after.items() if i not in unknown} == {
        i: r for i, r in before.items() if i not in unknown
    }
    assert status.complete
    assert status.counts.unknown == 0
    assert status.counts.sent == len(items)


def _gated(
    items: list[SendRequest | None], answer_at_once: set[int]
) -> tuple[Callable[[web.Request], Awaitable[web.Response]], asyncio.Event, list[int]]:
    """A send handler that holds every request but those of ``answer_at_once`` until the
    gate is set; the indices of the requests it has seen, in order."""
    index_of = {str(item.user_uuid): i for i, item in enumerate(items) if item is not None}
    gate = asyncio.Event()
    seen: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        index = index_of[request.match_info["user"]]
        seen.append(index)
        if index not in answer_at_once:
            await gate.wait()
        key = request.headers["Idempotency-Key"]
        return web.json_response({"requestUuid": key, "status": "SUCCESS", "messageUuid": key})

    return handle, gate, seen


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (up to 60 s, however loaded the machine) until ``condition()`` holds."""
    for _ in range(6000):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_a_waiting_run_hears_the_end(
    job_redis: JobRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with no chunk left ends when another run finishes the last chunk, told by
    pub/sub: its poll (patched to an hour here) is not what ends it."""
    from redis.asyncio import Redis

    from botmsg_async import jobs

    monkeypatch.setattr(jobs, "IDLE_POLL", 3600.0)
    items = _items(4, seed="end")
    handle, gate, seen = _gated(items, answer_at_once={2, 3})

    def run(base_url: str) -> asyncio.Future[JobReport]:
        # Concurrency 2: a run whose two sends are held pulls no further chunk.
        return asyncio.ensure_future(
            run_job_async(
                job_redis.url, "end", items, base_url=base_url, username="u", password="p",
                chunk_size=2, concurrency=2, claim_timeout=3600,
            )
        )  # fmt: skip

    async with serving_send(handle) as base_url, Redis.from_url(job_redis.url) as client:
        first = run(base_url)  # takes chunk 0: its sends are held at the gate

        async def held() -> bool:
            return len(seen) == 2

        await _until(held, "the first run's two sends held")
        second = run(base_url)  # takes chunk 1, sends it, then waits for the first

        async def second_waits() -> bool:
            subs = await client.pubsub_numsub("botmsg:job:{end}:events")
            return bool(subs and subs[0][1] == 1)

        await _until(second_waits, "the second run waiting on the job's channel")
        assert not second.done()
        gate.set()
        reports = await asyncio.wait_for(asyncio.gather(first, second), 60)
    assert [r.counts.sent for r in reports] == [2, 2]
    assert all(r.job.complete for r in reports)


async def test_a_stop_takes_back_starts_never_attempted(job_redis: JobRedis) -> None:
    """An item whose group start is on record but that a stop kept from being sent has
    its start taken back: reported not attempted, never unknown; the rest sent."""
    from redis.asyncio import Redis

    items = _items(8, seed="back")
    # Concurrency 2: starts go two at a time. Item 0 is answered at once, so its worker
    # takes the next group (items 2 and 3) and sends 2; item 3 waits for a free worker.
    handle, gate, seen = _gated(items, answer_at_once={0})
    stop = asyncio.Event()
    async with serving_send(handle) as base_url:
        run = asyncio.ensure_future(
            run_job_async(
                job_redis.url, "back", items, base_url=base_url, username="u", password="p",
                chunk_size=8, concurrency=2, stop=stop,
            )
        )  # fmt: skip

        async def two_held() -> bool:
            return sorted(seen) == [0, 1, 2]

        await _until(two_held, "items 1 and 2 held, item 3 started")
        async with Redis.from_url(job_redis.url) as client:
            assert await client.getbit("botmsg:job:{back}:started", 3) == 1
            stop.set()
            gate.set()
            report = await asyncio.wait_for(run, 60)
            started = [await client.getbit("botmsg:job:{back}:started", i) for i in range(8)]
        results = await job_results(job_redis.url, "back", items)
    assert sorted(seen) == [0, 1, 2]
    assert report.counts.sent == 3
    assert started == [1, 1, 1, 0, 0, 0, 0, 0]
    assert [r.outcome for r in results] == ["sent"] * 3 + ["skipped"] * 5


class _Counting(Sequence[SendRequest | None]):
    """Items made when read, counting the reads (a stand-in for a large file)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = collections.Counter[int]()

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> SendRequest | None: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[SendRequest | None]: ...

    def __getitem__(self, index: int | slice) -> SendRequest | Sequence[SendRequest | None] | None:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not 0 <= index < self.n:
            raise IndexError(index)
        self.reads[index] += 1
        return _items(1, seed=f"lazy{index}")[0]


async def test_a_sequence_read_on_demand_is_not_copied(job_redis: JobRedis) -> None:
    """Items from a sequence that is not a list are read when their chunk is taken (once
    each, given a fingerprint), not copied whole before the job starts."""
    items = _Counting(300)
    read_at_first_result: list[int] = []

    def first(_: JobItemResult) -> None:
        if not read_at_first_result:
            read_at_first_result.append(len(items.reads))

    async with FakeBotMessageServer() as server:
        report = await run_job_async(
            job_redis.url, "lazy", items, base_url=server.base_url, username=server.username,
            password=server.password, chunk_size=64, fingerprint="f" * 64, on_result=first,
        )  # fmt: skip
    assert report.counts.sent == 300
    assert read_at_first_result[0] < 300  # the first chunks only
    assert set(items.reads) == set(range(300))
    assert max(items.reads.values()) == 1


async def test_resent_unknown_items_keep_to_the_rate(job_redis: JobRedis) -> None:
    """--resend-unknown sends take their slots from the shared limiter too: 12 resends
    at 10/s span >= 1 s (they used to skip the limiter and go at once)."""
    arrivals: list[float] = []
    fail = [True]

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if fail[0]:
            return web.json_response({"detail": "boom"}, status=500)  # unknown: in doubt
        arrivals.append(time.monotonic())
        key = request.headers["Idempotency-Key"]
        return web.json_response({"requestUuid": key, "status": "SUCCESS", "messageUuid": key})

    items = _items(12, seed="rate-resend")
    async with serving_send(handle) as base_url:

        async def run(resend_unknown: bool) -> JobReport:
            return await run_job_async(
                job_redis.url, "rate-resend", items, base_url=base_url, username="u",
                password="p", rate_limit=10, resend_unknown=resend_unknown,
            )  # fmt: skip

        first = await run(False)
        assert first.job.counts.unknown == 12
        fail[0] = False
        begun = time.monotonic()
        again = await run(True)
    assert again.counts.sent == 12
    # Slots at 10/s with a burst of 1: the 12th is granted >= 1.1 s after the first, which
    # comes after ``begun``; a slow machine only delays the last arrival further.
    assert arrivals[-1] - begun >= 1.0
