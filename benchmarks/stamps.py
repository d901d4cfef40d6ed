"""Receive timestamps of a loopback service: what a rate limit's accuracy is measured on.

Shared by the Redis limiter's benchmark (issue #15) and the ``--workers`` one (issue #14):
the server's own clock says when each message arrived, whatever the clients did.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

from aiohttp import web

SEND_ROUTE = "/communications/department/{d}/user/{u}/botmessage/send"


def most_in_window(stamps: list[float], width: float = 1.0) -> int:
    """The most stamps in any interval of ``width`` seconds."""
    stamps = sorted(stamps)
    most = start = 0
    for end, t in enumerate(stamps):
        while t - stamps[start] >= width:
            start += 1
        most = max(most, end - start + 1)
    return most


def steady_rate(stamps: list[float], skip: float = 1.0) -> float:
    """Messages per second after the first ``skip`` seconds (the burst) to the last."""
    stamps = sorted(stamps)
    steady = [t for t in stamps if t >= stamps[0] + skip]
    if len(steady) < 2:
        return 0.0
    return (len(steady) - 1) / (steady[-1] - steady[0])


class Recorder:
    """A loopback service that records when each message arrived (and may answer 429)."""

    def __init__(self) -> None:
        self.stamps: list[tuple[str, float]] = []
        self.throttle_at: float | None = None
        self.throttled_at: float | None = None

    async def handle(self, request: web.Request) -> web.Response:
        """Record the message's department and arrival; answer SUCCESS (or one 429)."""
        now = time.monotonic()
        if self.throttle_at is not None and now >= self.throttle_at and not self.throttled_at:
            self.throttled_at = now
            return web.Response(status=429, headers={"Retry-After": "2"})
        self.stamps.append((request.match_info["d"], now))
        return web.json_response({"status": "SUCCESS", "requestUuid": "r", "messageUuid": "m"})

    async def serve(self) -> tuple[web.AppRunner, int]:
        """Serve on 127.0.0.1 at a free port, in the running loop: the runner and the port."""
        app = web.Application()
        app.router.add_post(SEND_ROUTE, self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]


@contextlib.contextmanager
def recording_server() -> Iterator[tuple[Recorder, str]]:
    """A ``Recorder`` served from a thread of its own (for clients in other processes).

    Yields the recorder and the service's base URL; stops the server on exit.
    """
    recorder = Recorder()
    loop = asyncio.new_event_loop()
    started: list[tuple[web.AppRunner, int]] = []
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        started.append(loop.run_until_complete(recorder.serve()))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait()
    runner, port = started[0]
    try:
        yield recorder, f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
