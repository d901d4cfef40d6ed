"""Benchmarks of the Redis-shared limiter (issue #15): reported, never asserted.

``python -m benchmarks.redis_shared [--section compare|accuracy|overhead]...``
starts its own redis-server (unix socket in a temp dir) and prints JSON:

- ``compare``: the candidates for the machinery, on the same Redis: cost per
  acquire with no wait, and three workers x 8 tasks sharing 100/s for 3 s
  (achieved rate, most grants in any 1-s window, each worker's share, Redis
  commands per grant). pyrate-limiter's Redis bucket and ``limits``' async
  Redis storage run only when installed (``pip install pyrate-limiter
  'limits[async-redis]'``).
- ``accuracy``: 4 processes x 16 concurrent sends through ``BotMessageClient``
  sharing one 100 msg/s limit for 10 s, then 5 msg/s per department (4
  departments), then a 429 with ``Retry-After: 2`` seen by one process; the
  receive timestamps of a loopback server are the measure.
- ``overhead``: one process at 2,000 msg/s against nginx (or the aiohttp
  fallback): ``LocalRateLimiter`` against ``RedisRateLimiter`` with and without
  leases, same run, alternating; µs of CPU per message and per Redis round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.stamps import Recorder, most_in_window, steady_rate
from botmsg_async import BotMessageClient, LocalRateLimiter, RateLimiter, RetryPolicy
from botmsg_async.shared import RedisRateLimiter

DEPT = "7f0c6a52-1c7e-4c3e-9a53-6c1f8f0f2a10"
USER = "b3d1e0a4-55aa-4b7e-8c0e-2f0f7e9d1c22"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a unix socket; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    with tempfile.TemporaryDirectory() as directory:
        sock = Path(directory) / "redis.sock"
        process = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(500):
                if sock.exists():
                    break
                time.sleep(0.01)
            time.sleep(0.05)
            yield f"unix://{sock}"
        finally:
            process.kill()
            process.wait()


# -- compare ---------------------------------------------------------------------

Acquire = Callable[[], Awaitable[None]]


async def _ours(url: str, rate: float, lease_time: float) -> tuple[Acquire, Callable[[], Any]]:
    limiter = RedisRateLimiter(url, rate=rate, name="cmp", lease_time=lease_time)

    async def acquire() -> None:
        await limiter.acquire(DEPT)

    return acquire, limiter.aclose


async def _pyrate(url: str, rate: float) -> tuple[Acquire, Callable[[], Any]]:
    from pyrate_limiter import Limiter, Rate, RedisBucket
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    bucket = await RedisBucket.init([Rate(int(rate), 1000)], redis, "pyrate-cmp")
    limiter = Limiter(bucket)

    async def acquire() -> None:
        await limiter.try_acquire_async("cmp", blocking=True)

    return acquire, redis.aclose


async def _limits(url: str, rate: float) -> tuple[Acquire, Callable[[], Any]]:
    from limits import RateLimitItemPerSecond
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import MovingWindowRateLimiter

    storage = RedisStorage(url.replace("unix://", "async+redis+unix://"), implementation="redispy")
    limiter = MovingWindowRateLimiter(storage)
    item = RateLimitItemPerSecond(int(rate))

    async def acquire() -> None:
        # limits has no blocking acquire: poll, sleeping until the window moves.
        while not await limiter.hit(item, "cmp"):
            stats = await limiter.get_window_stats(item, "cmp")
            await asyncio.sleep(max(0.001, stats.reset_time - time.time()))

    async def close() -> None:
        pass

    return acquire, close


_CANDIDATES: dict[str, Callable[[str, float], Awaitable[tuple[Acquire, Callable[[], Any]]]]] = {
    "botmsg RedisRateLimiter (GCRA, leases)": lambda url, rate: _ours(url, rate, 0.02),
    "botmsg RedisRateLimiter (GCRA, 1 slot per trip)": lambda url, rate: _ours(url, rate, 0.0),
    "pyrate-limiter RedisBucket (blocking)": _pyrate,
    "limits async Redis, moving window (polled)": _limits,
}


async def _redis_commands(url: str) -> int:
    from redis.asyncio import Redis

    async with Redis.from_url(url) as r:
        info = await r.info("stats")
        return int(info["total_commands_processed"])


async def _compare_one(url: str, make: Any) -> dict[str, Any]:
    from redis.asyncio import Redis

    async with Redis.from_url(url) as r:
        await r.flushall()
    acquire, close = await make(url, 1_000_000.0)
    n = 2000
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await acquire()
    cost = {
        "us_per_acquire_no_wait": round((time.perf_counter() - wall) / n * 1e6, 1),
        "cpu_us_per_acquire": round((time.process_time() - cpu) / n * 1e6, 1),
    }
    await close()
    async with Redis.from_url(url) as r:
        await r.flushall()
    workers = [await make(url, 100.0) for _ in range(3)]
    stamps: list[list[float]] = [[], [], []]
    before = await _redis_commands(url)
    stop = time.monotonic() + 3.0

    async def task(index: int, acquire: Acquire) -> None:
        while time.monotonic() < stop:
            await acquire()
            stamps[index].append(time.monotonic())

    await asyncio.gather(
        *(task(i, acquire) for i, (acquire, _) in enumerate(workers) for _ in range(8))
    )
    commands = await _redis_commands(url) - before
    for _, close in workers:
        await close()
    every = [t for s in stamps for t in s]
    shares = [len(s) / max(1, len(every)) for s in stamps]
    return {
        **cost,
        "shared_100_per_s": {
            "grants": len(every),
            "steady_rate": round(steady_rate(every), 1),
            "most_in_1s": most_in_window(every),
            "worker_shares": [round(s, 2) for s in shares],
            "redis_commands_per_grant": round(commands / max(1, len(every)), 2),
        },
    }


async def compare(url: str) -> dict[str, Any]:
    """Each candidate's cost per acquire and its behaviour when shared."""
    results: dict[str, Any] = {}
    for name, make in _CANDIDATES.items():
        try:
            results[name] = await _compare_one(url, make)
        except ImportError as exc:
            results[name] = f"not installed ({exc.name})"
    return results


# -- accuracy --------------------------------------------------------------------


def _sender(
    url: str,
    base_url: str,
    rate: float | None,
    per_department_rate: float | None,
    departments: list[str],
    seconds: float,
    go: multiprocessing.synchronize.Event,
) -> None:
    async def main() -> None:
        async with (
            RedisRateLimiter(
                url, rate=rate, per_department_rate=per_department_rate, name="acc"
            ) as limiter,
            BotMessageClient(
                base_url,
                "bot",
                "pw",
                rate_limiter=limiter,
                retry=RetryPolicy(max_attempts=3, deadline=30),
            ) as client,
        ):
            await limiter.paused_for()
            go.wait()
            stop = time.monotonic() + seconds

            async def task(i: int) -> None:
                # Each task keeps to one department, so every department has waiters.
                department = departments[i % len(departments)]
                while time.monotonic() < stop:
                    with contextlib.suppress(Exception):
                        await client.send(department, USER, "hello")

            await asyncio.gather(*(task(i) for i in range(16)))

    asyncio.run(main())


async def _run_senders(
    url: str,
    rate: float | None,
    per_department_rate: float | None,
    departments: list[str],
    seconds: float,
    throttle_after: float | None = None,
) -> Recorder:
    recorder = Recorder()
    runner, port = await recorder.serve()
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    processes = [
        context.Process(
            target=_sender,
            args=(
                url,
                f"http://127.0.0.1:{port}",
                rate,
                per_department_rate,
                departments,
                seconds,
                go,
            ),
        )
        for _ in range(4)
    ]
    for p in processes:
        p.start()
    await asyncio.sleep(3)  # the children import and connect
    go.set()
    if throttle_after is not None:
        recorder.throttle_at = time.monotonic() + throttle_after
    for p in processes:
        await asyncio.to_thread(p.join)
    await runner.cleanup()
    return recorder


async def accuracy(url: str, seconds: float = 10.0) -> dict[str, Any]:
    """The bars of issue #15 on the receive timestamps of a loopback server."""
    from redis.asyncio import Redis

    result: dict[str, Any] = {}
    recorder = await _run_senders(url, 100.0, None, [DEPT], seconds)
    stamps = [t for _, t in recorder.stamps]
    result["global_100_per_s"] = {
        "received": len(stamps),
        "steady_rate_pct": round(steady_rate(stamps) / 100 * 100, 1),
        "most_in_1s": most_in_window(stamps),
        "limit_plus_burst": 110,
    }
    async with Redis.from_url(url) as r:
        await r.flushall()
    departments = [f"dept-{i}" for i in range(4)]
    recorder = await _run_senders(url, None, 5.0, departments, seconds)
    per: dict[str, Any] = {}
    for department in departments:
        d_stamps = [t for d, t in recorder.stamps if d == department]
        per[department] = {
            "received": len(d_stamps),
            "steady_rate_pct": round(steady_rate(d_stamps) / 5 * 100, 1),
            "most_in_1s": most_in_window(d_stamps),
        }
    result["per_department_5_per_s"] = per
    async with Redis.from_url(url) as r:
        await r.flushall()
    recorder = await _run_senders(url, 100.0, None, [DEPT], 6.0, throttle_after=2.0)
    at = recorder.throttled_at or 0.0
    after = sorted(t for _, t in recorder.stamps if t > at)
    result["pause_after_429_retry_after_2"] = {
        "first_send_after_s": round(after[0] - at, 3) if after else None,
        "sends_within_2s": sum(t < at + 2.0 for t in after),
    }
    return result


# -- overhead --------------------------------------------------------------------


async def _throughput(base_url: str, limiter: RateLimiter, n: int) -> dict[str, float]:
    async with BotMessageClient(base_url, "bot", "pw", rate_limiter=limiter) as client:
        items = [(DEPT, USER, "hello")] * n
        cpu, wall = time.process_time(), time.perf_counter()
        report = await client.send_many(items, concurrency=64, keep="none")
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
    return {
        "msg_per_s": round(report.counts.sent / wall, 1),
        "cpu_us_per_msg": round(cpu / n * 1e6, 1),
    }


async def overhead(url: str, n: int = 10_000, reps: int = 3) -> dict[str, Any]:
    """2,000 msg/s in one process: Local vs Redis (leases) vs Redis (1 slot per trip)."""
    from benchmarks.servers import start_server

    variants: dict[str, Callable[[], RateLimiter]] = {
        "local": lambda: LocalRateLimiter(rate=2000),
        "redis_lease": lambda: RedisRateLimiter(url, rate=2000, name=f"ov{time.time_ns()}"),
        "redis_1_per_trip": lambda: RedisRateLimiter(
            url, rate=2000, name=f"ov{time.time_ns()}", lease_time=0
        ),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    trips: dict[str, int] = {}
    with start_server("auto") as server:
        for _ in range(reps):
            for name, make in variants.items():
                limiter = make()
                runs[name].append(await _throughput(server.base_url, limiter, n))
                if isinstance(limiter, RedisRateLimiter):
                    trips[name] = limiter.round_trips
                    await limiter.aclose()
        description = server.description

    def median(name: str, key: str) -> float:
        values = sorted(r[key] for r in runs[name])
        return values[len(values) // 2]

    result: dict[str, Any] = {"server": description, "messages": n, "reps": reps}
    for name in variants:
        result[name] = {
            "msg_per_s": median(name, "msg_per_s"),
            "cpu_us_per_msg": median(name, "cpu_us_per_msg"),
        }
        if name in trips:
            extra = median(name, "cpu_us_per_msg") - median("local", "cpu_us_per_msg")
            result[name]["redis_round_trips"] = trips[name]
            result[name]["throughput_vs_local"] = round(
                median(name, "msg_per_s") / median("local", "msg_per_s"), 3
            )
            result[name]["extra_cpu_us_per_round_trip"] = round(extra * n / trips[name], 1)
    return result


def main() -> None:
    """Run the chosen sections and print their results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--section", action="append", choices=["compare", "accuracy", "overhead"], default=None
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="accuracy run length")
    args = parser.parse_args()
    sections = args.section or ["compare", "accuracy", "overhead"]
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    with redis_server() as url:
        for section in sections:
            if section == "compare":
                report["compare"] = asyncio.run(compare(url))
            elif section == "accuracy":
                report["accuracy"] = asyncio.run(accuracy(url, args.seconds))
            else:
                report["overhead"] = asyncio.run(overhead(url))
            print(json.dumps({section: report[section]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
