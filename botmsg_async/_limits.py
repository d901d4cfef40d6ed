"""Rate limits and the shared 429 pause: the protocol senders use, and its in-process form.

``BotMessageClient(rate_limiter=...)`` and every batch take a ``RateLimiter``:
a slot per message (globally and per department) and one pause that a 429's
Retry-After, seen by any holder, imposes on all of them. ``LocalRateLimiter``
is the in-process implementation; limiters shared across processes or
machines implement the same three methods.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

from ._errors import InvalidRequestError

__all__ = ["LocalRateLimiter", "PauseOnly", "RateLimiter", "check_rate"]


class RateLimiter(Protocol):
    """What a client and a batch ask of a rate limiter.

    Implementations must be safe to share by every task of one event loop.
    """

    async def acquire(self, department_uuid: str) -> None:
        """Wait until one more message to ``department_uuid`` may be sent."""
        ...

    async def pause(self, seconds: float) -> None:
        """Make every holder wait ``seconds`` from now (a 429's Retry-After)."""
        ...

    async def paused_for(self) -> float:
        """Seconds left of the shared pause; 0 when there is none."""
        ...


class _Bucket(Protocol):
    async def acquire(self) -> None: ...


def _smooth_bucket(rate: float) -> _Bucket:
    """An aiolimiter leaky bucket with a burst of at most a tenth of a second."""
    try:
        from aiolimiter import AsyncLimiter
    except ImportError:  # pragma: no cover - depends on the environment
        raise InvalidRequestError(
            "rate_limit", rate, "needs aiolimiter: pip install 'botmsg-async[rate]'"
        ) from None
    capacity = max(1.0, rate / 10)
    return AsyncLimiter(capacity, capacity / rate)


class _Entry:
    """One department's bucket, when it was last used, and how many sends wait on it."""

    __slots__ = ("bucket", "last", "turn", "waiting")

    def __init__(self, bucket: _Bucket, last: float) -> None:
        self.bucket = bucket
        self.last = last
        self.waiting = 0
        # One send of the department at a time through its slot and the next gate.
        self.turn = asyncio.Lock()


class _PerKeyBuckets:
    """One bucket per department, forgotten once idle so memory stays flat."""

    def __init__(self, rate: float, make: Callable[[float], _Bucket]) -> None:
        self._rate = rate
        self._make = make
        # Least recently used first: arrivals and grants both count as use.
        self._buckets: OrderedDict[str, _Entry] = OrderedDict()
        # An idle bucket has fully drained after a second or two at most;
        # forgetting it then changes nothing but memory.
        self._idle = max(2.0, 2.0 / rate)

    def __len__(self) -> int:
        return len(self._buckets)

    async def acquire(self, key: str, then: Callable[[], Awaitable[None]] | None = None) -> None:
        """Wait for a slot of ``key``'s bucket, then for ``then()`` (the global slot).

        The department's sends go through both one at a time: were several to wait
        for ``then`` at once, they would all pass when it frees, faster than the
        department's rate.
        """
        # The loop's clock, as aiolimiter's: tests that move one move both.
        loop = asyncio.get_running_loop()
        now = loop.time()
        entry = self._buckets.pop(key, None)
        if entry is None:
            entry = _Entry(self._make(self._rate), now)
        entry.last = now
        self._buckets[key] = entry
        self._forget_idle(now)
        # A bucket is idle only when nobody waits on it and its last grant is old:
        # forgetting one with sends queued would let a new bucket grant beside it,
        # twice the department's rate.
        entry.waiting += 1
        try:
            async with entry.turn:
                await entry.bucket.acquire()
                if then is not None:
                    await then()
        finally:
            entry.waiting -= 1
            entry.last = loop.time()
            if self._buckets.get(key) is entry:
                self._buckets.move_to_end(key)

    def _forget_idle(self, now: float) -> None:
        for _ in range(len(self._buckets)):
            oldest_key, oldest = next(iter(self._buckets.items()))
            if now - oldest.last < self._idle:
                break
            if oldest.waiting:
                self._buckets.move_to_end(oldest_key)  # in use: kept
            else:
                del self._buckets[oldest_key]


class PauseOnly:
    """A limiter as a client sees it when its caller takes the slots: its pause only.

    A bulk sender that records each item's start takes the item's slot before
    that record (an item waiting for a slot is never in doubt), so the client
    must take none; a 429 it sees must still pause every holder of the limiter.

    Args:
        limiter: The limiter whose pause is shared.
    """

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def acquire(self, department_uuid: str) -> None:
        """No slot: the caller took it already."""
        return

    async def pause(self, seconds: float) -> None:
        """Pause every holder of the limiter."""
        await self._limiter.pause(seconds)

    async def paused_for(self) -> float:
        """Seconds left of the limiter's pause."""
        return await self._limiter.paused_for()

    def pause_left(self) -> float | None:
        """``paused_for`` without a coroutine, where the pause can be read at once.

        None (here): it cannot; the client then awaits ``paused_for``.
        """
        return None


def check_rate(field: str, value: object) -> None:
    """Raise ``InvalidRequestError`` naming ``field`` unless ``value`` is None or a rate
    a limiter can keep: an int or float > 0, finite both ways.

    Every limiter of the SDK checks its rates here. Finite both ways: aiolimiter
    hangs on an infinite rate (its period is NaN) and divides by zero on one so
    small that its period is infinite; a GCRA's arithmetic grants every slot at
    once on either, or overflows (an int too large for a float).
    """
    if value is None:
        return
    # numbers.Real: numpy's numbers too; a str would raise a TypeError naming neither
    # rate, and a bool is no rate.
    usable = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if usable:
        try:
            rate = float(value)  # type: ignore[arg-type]
        except OverflowError:  # an int too large for a float
            usable = False
        else:
            usable = rate > 0 and math.isfinite(rate) and math.isfinite(1 / rate)
    if not usable:
        raise InvalidRequestError(
            field, value, "must be a finite number > 0 messages per second, or None"
        )


class LocalRateLimiter:
    """A ``RateLimiter`` for one process: smooth rates (aiolimiter) and an in-memory pause.

    Args:
        rate: Most messages per second in all (None: no global limit).
        per_department_rate: Most messages per second to one department (None: no limit).
        clock: Monotonic clock for the pause (tests may pass a fake).

    Raises:
        InvalidRequestError: a rate that is not a finite number > 0, or aiolimiter missing
            (``pip install 'botmsg-async[rate]'``).

    Example:
        >>> limiter = LocalRateLimiter(rate=100, per_department_rate=5)
        >>> client = BotMessageClient(url, user, password, rate_limiter=limiter)
    """

    def __init__(
        self,
        rate: float | None = None,
        per_department_rate: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_rate("rate_limit", rate)
        check_rate("per_department_rate_limit", per_department_rate)
        self.rate = rate
        self.per_department_rate = per_department_rate
        self._global = _smooth_bucket(rate) if rate else None
        self._per_department = (
            _PerKeyBuckets(per_department_rate, _smooth_bucket) if per_department_rate else None
        )
        self._clock = clock
        self._paused_until = 0.0

    def __repr__(self) -> str:
        return f"LocalRateLimiter(rate={self.rate}, per_department_rate={self.per_department_rate})"

    async def acquire(self, department_uuid: str) -> None:
        """Wait for a slot for ``department_uuid``, then for a global one.

        The global slot comes last, right before the send: one taken first would be
        spent while the send still waited for its department, and the sends parked
        that way would later go beside the others, over the global rate.
        """
        glob = self._global
        if self._per_department is not None:
            await self._per_department.acquire(
                department_uuid, glob.acquire if glob is not None else None
            )
        elif glob is not None:
            await glob.acquire()

    async def pause(self, seconds: float) -> None:
        """Pause every holder until ``seconds`` from now (a longer pause already set stays)."""
        if seconds > 0:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def paused_for(self) -> float:
        """Seconds left of the pause; 0 when there is none."""
        if not self._paused_until:
            return 0.0
        return max(0.0, self._paused_until - self._clock())
