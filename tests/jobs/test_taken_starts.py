"""An item whose start another run holds when a run takes its chunk over is not lost.

The loss this guards against: run B takes over a chunk of run A (A not heard from for
the claim timeout: a network cut, a frozen loop), reads the item X not started, and
its start for X is refused: A's start (written late, tried again through the cut)
landed in between. B dropped X from the chunk and acknowledged the chunk. A then
stopped before attempting X and took its start back: X was never sent, never settled,
and the complete job reported it an "invalid input row".
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

from redis.asyncio import Redis

from botmsg_async import SendRequest
from botmsg_async.jobs import (
    NOT_IN_JOB_NOTE,
    _Keys,
    _Run,
    job_results,
    job_status,
    run_job_async,
)
from botmsg_async.testing import FakeBotMessageServer

from .conftest import JobRedis

#: A's claim timeout: its heartbeat refreshes once, then not for the test's length.
A_CLAIM = 3600.0
#: B's: A's chunk, not refreshed, is B's to take over within a few polls.
B_CLAIM = 0.05


def _items(n: int) -> list[SendRequest | None]:
    dept = str(uuid.uuid5(uuid.NAMESPACE_DNS, "dept"))
    return [
        SendRequest(dept, str(uuid.uuid5(uuid.NAMESPACE_DNS, f"taken{i}")), f"hello {i}")
        for i in range(n)
    ]


async def test_a_start_taken_back_after_a_takeover_is_sent_by_another_run(
    job_redis: JobRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's start of X refused (A's landed after B read X's bits), then A stops and takes its
    start back: X is still sent, once; the job ends complete, X reported sent."""
    a_holds, b_read, a_started, b_refused, a_done = (asyncio.Event() for _ in range(5))
    chunk_bits = _Run._chunk_bits
    start_group = _Run._start_group

    async def bits(self: _Run, first: int, end: int) -> tuple[bytes, bytes]:
        if b_read.is_set():
            await a_done.wait()  # B's take-over again: after A's start taken back (not racing it)
        started, settled = await chunk_bits(self, first, end)
        if self.claim_timeout == B_CLAIM and not any(started):
            b_read.set()  # B found X not started: A's start is yet to land
        return started, settled

    async def group(self: _Run, indices: list[int]) -> dict[int, str]:
        if self.claim_timeout == A_CLAIM:
            a_holds.set()
            await b_read.wait()  # A's start write, held up, lands after B's read
            verdicts = await start_group(self, indices)
            a_started.set()
            await b_refused.wait()
            self.stop("stopped on request")  # A's Ctrl-C, before X is attempted
            return verdicts
        await a_started.wait()
        verdicts = await start_group(self, indices)
        if verdicts:
            b_refused.set()
        return verdicts

    monkeypatch.setattr(_Run, "_chunk_bits", bits)
    monkeypatch.setattr(_Run, "_start_group", group)
    items = _items(1)

    async with FakeBotMessageServer() as server, Redis.from_url(job_redis.url) as redis:

        async def run(claim_timeout: float) -> Any:
            return await run_job_async(
                redis,
                "taken",
                items,
                base_url=server.base_url,
                username=server.username,
                password=server.password,
                concurrency=1,
                chunk_size=1,
                claim_timeout=claim_timeout,
            )

        a = asyncio.ensure_future(run(A_CLAIM))
        a.add_done_callback(lambda _: a_done.set())
        await asyncio.wait_for(a_holds.wait(), 30)
        b = asyncio.ensure_future(run(B_CLAIM))
        await asyncio.wait_for(asyncio.gather(a, b), 30)
        assert b_refused.is_set()  # the interleaving did happen
        results = await job_results(redis, "taken", items)
        status = await job_status(redis, "taken")
        assert status.complete
        assert [r.outcome for r in results] == ["sent"], results
        assert len(server.messages) == 1
        assert results[0].error is None


async def test_a_valid_item_never_started_is_not_called_an_invalid_row(
    job_redis: JobRedis,
) -> None:
    """A complete job's item that no run sent, given its items, is skipped "not attempted"
    (a valid row); without the items it cannot be told from an invalid one."""
    items = _items(3)
    items[2] = None  # an invalid input row: never part of the job
    async with FakeBotMessageServer() as server, Redis.from_url(job_redis.url) as redis:
        await run_job_async(
            redis,
            "never",
            items,
            base_url=server.base_url,
            username=server.username,
            password=server.password,
        )
        keys = _Keys("never")
        # Item 1's records gone (as the loss above left them): never started, never settled.
        await redis.setbit(keys.started, 1, 0)
        await redis.setbit(keys.settled, 1, 0)
        assert (await job_status(redis, "never")).complete
        given = await job_results(redis, "never", items)
        assert [r.index for r in given] == [0, 1]  # the invalid row is not yielded
        error = given[1].error
        assert given[1].outcome == "skipped"
        assert error is not None
        assert error["type"] != "InvalidRequestError"
        assert error["message"] != NOT_IN_JOB_NOTE
        assert "not attempted" in error["message"]
        bare = await job_results(redis, "never", None)
        assert bare[2].error is not None
        assert bare[2].error["message"] == NOT_IN_JOB_NOTE
