"""Redis job (send-many --redis): bytes per item in Redis and coordination cost, measured.

Usage: ``python -m benchmarks.jobs_redis [ITEMS]`` (default 30,000). Starts its own
redis-server (AOF, appendfsync always) in a temporary directory and a fake
service in process; runs one job with one run, then prints MEMORY USAGE of
every key of the job, in bytes per item, and the run's throughput.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from botmsg_async import SendRequest
from botmsg_async.jobs import run_job_async
from botmsg_async.testing import FakeBotMessageServer


async def measure(items: int, sock: Path, client: redis.Redis) -> None:
    """One run of an ``items`` job; the job's keys' MEMORY USAGE and the run's rate."""
    work: list[SendRequest | None] = [
        SendRequest(str(uuid.uuid4()), str(uuid.uuid4()), f"message {i}") for i in range(items)
    ]
    async with FakeBotMessageServer() as fake:
        started = time.perf_counter()
        report = await run_job_async(
            f"unix://{sock}", "bench", work, base_url=fake.base_url,
            username=fake.username, password=fake.password, concurrency=64,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
    total = 0
    for key in sorted(client.scan_iter("botmsg:job:*")):
        size = int(client.memory_usage(key, samples=0) or 0)
        total += size
        print(f"{key.decode():40} {size:>10} bytes")
    print(f"total {total} bytes for {items} items: {total / items:.1f} bytes/item")
    print(f"{report.counts} in {elapsed:.1f} s: {items / elapsed:.0f} msg/s (one run)")


def main() -> None:
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found on PATH")
    with tempfile.TemporaryDirectory() as directory:
        sock = Path(directory) / "redis.sock"
        server = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(sock), "--dir", directory,
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = redis.Redis(unix_socket_path=str(sock))
            for _ in range(500):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
            asyncio.run(measure(items, sock, client))
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
