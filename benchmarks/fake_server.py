"""A loopback stand-in for the service, run as its own process by ``servers.py``.

It answers every POST with a fixed JSON answer, optionally after a delay
(latency-bound scenario) or with a transient FAILURE on every ``--fail-every``-th
request (faults scenario). Several processes may share one port
(``SO_REUSEPORT``); each counts its own requests, so every ``n``-th still means
``1/n`` of the whole.

Usage: ``python -m benchmarks.fake_server --port PORT [--delay S] [--fail-every N]``.
It prints ``ready`` once it listens, and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

from aiohttp import web

SUCCESS_BODY = (
    b'{"requestUuid":"7d0e1c1e-0c1f-4bb0-9d7e-2b5c9c4b7a01","status":"SUCCESS",'
    b'"messageUuid":"0f3b4a6e-7c2d-4e59-a1b8-5d9e6f7a8b90","errors":[],"warnings":[]}'
)
FAILURE_BODY = (
    b'{"requestUuid":"7d0e1c1e-0c1f-4bb0-9d7e-2b5c9c4b7a02","status":"FAILURE",'
    b'"errors":[{"errorCode":"TEMPORARILY_UNAVAILABLE",'
    b'"errorDescription":"Service temporarily unavailable, try again"}],"warnings":[]}'
)


def make_app(*, delay: float, fail_every: int) -> web.Application:
    """Build the application.

    Args:
        delay: Seconds to wait before each SUCCESS answer.
        fail_every: Answer FAILURE to every n-th request (0: never).

    Returns:
        The aiohttp application with one catch-all POST route.
    """
    count = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal count
        # Read the body as the real service would; an unread body would also
        # make aiohttp drop the keep-alive connection.
        await request.read()
        count += 1
        if fail_every and count % fail_every == 0:
            return web.Response(body=FAILURE_BODY, content_type="application/json")
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=SUCCESS_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    return app


async def serve(port: int, *, delay: float, fail_every: int, reuse_port: bool) -> None:
    """Listen on 127.0.0.1:``port`` until SIGTERM or SIGINT.

    Args:
        port: TCP port on 127.0.0.1.
        delay: See ``make_app``.
        fail_every: See ``make_app``.
        reuse_port: Set ``SO_REUSEPORT`` so sibling processes share the port.
    """
    runner = web.AppRunner(
        make_app(delay=delay, fail_every=fail_every), access_log=None, handle_signals=False
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_port=reuse_port, backlog=4096)
        await site.start()
        print("ready", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and serve until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args(argv)
    coro = serve(
        args.port, delay=args.delay, fail_every=args.fail_every, reuse_port=args.reuse_port
    )
    # The server should be as cheap as possible so that the client is what is measured.
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
