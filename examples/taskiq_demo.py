"""Drive the taskiq example end to end: N jobs, some redelivered, one worker SIGKILLed.

``python -m examples.taskiq_demo --redis-url redis://localhost:6379/15 --jobs 2000``
runs it against the fake service (in this process) and prints what happened;
the test suite runs a small version. The fake service stands in for the vendor:
it records every message, so the report can show that none arrived twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from attrs import define
from redis.asyncio import Redis
from taskiq.kicker import AsyncKicker

from botmsg_async.testing import FakeBotMessageServer

from .taskiq_send import OUTCOMES, RUNS, WORKERS, make_broker

ROOT = Path(__file__).resolve().parent.parent
TASK = "examples.taskiq_send:send_message"
NUDGE = "examples.taskiq_send:nudge"
PASSWORD = "pw"  # noqa: S105 - the fake service's, on loopback
DEPARTMENT = "7f0c6a52-1c7e-4c3e-9a53-6c1f8f0f2a10"


@define
class DemoReport:
    """What the demo saw: each job's outcome, and what the service received."""

    jobs: int
    redelivered: int
    outcomes: Counter[str]
    #: Jobs with no outcome at the end (should be 0).
    missing: int
    #: Messages the service received, and keys it received more than once.
    received: int
    received_twice: int
    #: Jobs reported "failed" although the service received them (should be 0).
    failed_but_received: int
    #: Jobs reported "sent" that the service never received (should be 0).
    sent_but_missing: int
    killed_pid: int | None
    elapsed: float
    #: Seconds from the start to each stage: "kicked", "killed", "all done",
    #: "redelivered done", "stopped".
    stages: dict[str, float]


def _text(value: bytes | str) -> str:
    """A Redis reply as text (the client may or may not decode replies)."""
    return value.decode() if isinstance(value, bytes) else value


async def _wait_for(what: str, check: Callable[[], Awaitable[bool]], deadline: float) -> None:
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def run_demo(
    redis_url: str,
    *,
    jobs: int,
    redelivered: int,
    workers: int = 2,
    kill_one: bool = True,
    rate: float = 500.0,
    give_up_after: float = 120.0,
    log: TextIO | None = None,
) -> DemoReport:
    """Run ``jobs`` jobs through ``workers`` taskiq workers; enqueue ``redelivered`` again.

    One worker is SIGKILLed once a third of the jobs have an outcome (taskiq
    restarts it); its unacknowledged jobs go to the others after 2 s. The jobs
    enqueued again are picked among those already done, as a queue redelivers
    a job whose acknowledgement it lost.
    """
    started = time.monotonic()
    stages: dict[str, float] = {}

    def stage(name: str) -> None:
        stages[name] = round(time.monotonic() - started, 2)
        print("STAGE", name, stages[name], file=sys.stderr, flush=True)

    deadline = started + give_up_after
    rng = random.Random(7)  # noqa: S311 - which jobs to redeliver, not cryptography
    async with (
        FakeBotMessageServer(username="bot", password=PASSWORD) as server,
        Redis.from_url(redis_url) as redis,
    ):
        await redis.delete(OUTCOMES, RUNS, WORKERS, "botmsg-example:jobs")
        broker = make_broker(redis_url)
        await broker.startup()  # creates the consumer group before any job exists
        env = {
            **os.environ,
            "BOTMSG_BASE_URL": server.base_url,
            "BOTMSG_USERNAME": "bot",
            "BOTMSG_PASSWORD": PASSWORD,
            "BOTMSG_REDIS_URL": redis_url,
            "BOTMSG_RATE": str(rate),
            "BOTMSG_REDELIVER_AFTER": "2",
            "PYTHONPATH": str(ROOT),
        }
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskiq",
            "worker",
            "examples.taskiq_send:broker",
            "--workers",
            str(workers),
            "--shutdown-timeout",
            "2",
            cwd=ROOT,
            # Its own process group: the worker processes it forks go with it.
            start_new_session=True,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log if log is not None else asyncio.subprocess.DEVNULL,
        )
        killed: int | None = None

        async def nudge_now_and_then() -> None:
            nudge: AsyncKicker[[], None] = AsyncKicker(NUDGE, broker, {})
            while True:
                await asyncio.sleep(0.5)
                await nudge.kiq()

        nudger = asyncio.create_task(nudge_now_and_then())
        try:
            kicker: AsyncKicker[..., str] = AsyncKicker(TASK, broker, {})
            ids = [f"{i:06d}" for i in range(jobs)]
            for job in ids:
                await kicker.kiq(job, DEPARTMENT, f"user-{job}", f"message {job}")
            stage("kicked")

            def outcomes(n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return int(await redis.hlen(OUTCOMES)) >= n

                return check

            if kill_one:
                await _wait_for("a third of the jobs", outcomes(jobs // 3), deadline)
                pids = sorted(int(p) for p in await redis.smembers(WORKERS))
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
                stage("killed")
            await _wait_for("every job", outcomes(jobs), deadline)
            stage("all done")

            # A job queue delivers again what it thinks may not have run.
            again = rng.sample(ids, redelivered)
            before = {job: int(await redis.hget(RUNS, job) or 0) for job in again}
            for job in again:
                await kicker.kiq(job, DEPARTMENT, f"user-{job}", f"message {job}")

            async def rerun() -> bool:
                runs = await redis.hmget(RUNS, again)
                return all(int(r or 0) > before[j] for j, r in zip(again, runs, strict=True))

            await _wait_for("the redelivered jobs", rerun, deadline)
            stage("redelivered done")
            final = {_text(k): _text(v) for k, v in (await redis.hgetall(OUTCOMES)).items()}
        finally:
            nudger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await nudger
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(worker.wait(), 2)
            # Whatever is left of the group we started (the worker processes).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            await worker.wait()
            await broker.shutdown()
            stage("stopped")
        keys = Counter(m.idempotency_key for m in server.messages)
        received = {key.removeprefix("job-") for key in keys if key}
        return DemoReport(
            jobs=jobs,
            redelivered=redelivered,
            outcomes=Counter(final.values()),
            missing=sum(job not in final for job in ids),
            received=len(server.messages),
            received_twice=server.duplicates + sum(n > 1 for n in keys.values()),
            failed_but_received=sum(final.get(j) == "failed" and j in received for j in ids),
            sent_but_missing=sum(final.get(j) == "sent" and j not in received for j in ids),
            killed_pid=killed,
            elapsed=time.monotonic() - started,
            stages=stages,
        )


def main() -> None:
    """Command line: run the demo and print its report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--redelivered", type=float, default=0.2, help="share of jobs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--log", type=argparse.FileType("w"), help="the workers' stderr")
    args = parser.parse_args()
    report = asyncio.run(
        run_demo(
            args.redis_url,
            jobs=args.jobs,
            redelivered=int(args.jobs * args.redelivered),
            workers=args.workers,
            rate=args.rate,
            log=args.log,
        )
    )
    print(report)


if __name__ == "__main__":
    main()
