"""Which event loop a ``botmsg`` command runs on: ``--loop auto|asyncio|uvloop``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from .common import UsageError

__all__ = ["LOOPS", "describe", "loop_factory"]

#: The choices of ``--loop``; ``auto`` is uvloop when installed (the ``speed`` extra).
LOOPS: Final = ("auto", "asyncio", "uvloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for ``asyncio.Runner`` that ``--loop NAME`` asks for (None: asyncio's).

    uvloop costs less CPU per message than asyncio's default loop (send_many:
    -14% in the benchmarks' fair scenario, 2026-11-27; issue #17 measured +14-19%
    messages per second), so ``auto`` takes it when the ``speed`` extra installed
    it, and asyncio's loop otherwise.

    Raises:
        UsageError: ``uvloop`` was asked for and is not installed.
    """
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise UsageError(
                "--loop uvloop: uvloop is not installed; install botmsg-async[speed] "
                "or use --loop asyncio"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def describe(factory: Callable[[], asyncio.AbstractEventLoop] | None) -> str:
    """The loop's name for a log line: ``uvloop`` or ``asyncio``."""
    return "asyncio" if factory is None else "uvloop"
