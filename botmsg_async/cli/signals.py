"""Running a command's coroutine under SIGINT/SIGTERM: a signal stops it, cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from .common import EXIT_INTERRUPTED
from .loops import describe, loop_factory

__all__ = ["run"]

log = logging.getLogger("botmsg_async.cli")


def run(
    coro: Coroutine[Any, Any, int],
    *,
    on_signal: int = EXIT_INTERRUPTED,
    first_signal: Callable[[], None] | None = None,
    loop: str = "auto",
) -> int:
    """Run ``coro`` under SIGINT/SIGTERM handling; return its exit code.

    A signal cancels ``coro`` (so its cleanup runs) and the exit code is
    ``on_signal``. With ``first_signal``, the first signal calls it instead,
    to stop gracefully, and only a second one cancels. ``loop`` is the
    ``--loop`` choice (``auto``, ``asyncio`` or ``uvloop``).

    Raises:
        UsageError: ``loop`` asks for uvloop and it is not installed.
    """
    factory = loop_factory(loop)
    log.debug("event loop: %s", describe(factory))
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_with_signals(coro, on_signal, first_signal))


async def _with_signals(
    coro: Coroutine[Any, Any, int], on_signal: int, first_signal: Callable[[], None] | None
) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        if len(received) == 1 and first_signal is not None:
            first_signal()
        elif not task.cancelling():
            task.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop, signum)
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
            # Windows; or not the main thread (asyncio says RuntimeError, uvloop ValueError).
            continue
        installed.append(signum)
    try:
        return await coro
    except asyncio.CancelledError:
        if not received:
            raise
        task.uncancel()
        return on_signal
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
