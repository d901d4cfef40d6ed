"""Code the multi-process tests run in child processes (spawned: importable, picklable)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing.synchronize
from pathlib import Path

from botmsg_async.shared import RedisRateLimiter


def grant_worker(
    url: str,
    rate: float | None,
    per_department_rate: float | None,
    departments: list[str],
    count: int,
    concurrency: int,
    out: str,
    go: multiprocessing.synchronize.Event,
) -> None:
    """Take ``count`` slots with ``concurrency`` tasks; write (department, grant) pairs as JSON."""

    async def main() -> list[tuple[str, float]]:
        grants: list[tuple[str, float]] = []
        todo = iter(range(count))
        async with RedisRateLimiter(
            url,
            rate=rate,
            per_department_rate=per_department_rate,
            name="mp",
            on_grant=lambda department, at: grants.append((department, at)),
        ) as limiter:

            async def task() -> None:
                for i in todo:
                    await limiter.acquire(departments[i % len(departments)])

            await limiter.paused_for()  # connected and subscribed before the start
            go.wait()
            await asyncio.gather(*(task() for _ in range(concurrency)))
        return grants

    Path(out).write_text(json.dumps(asyncio.run(main())))
