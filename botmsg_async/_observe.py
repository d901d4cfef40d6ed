"""The telemetry hooks: what a client and a batch tell an observer, and nothing else.

``BotMessageClient(telemetry=...)`` takes an ``Observer``; ``botmsg_async.otel``
implements it with OpenTelemetry, and only a program that imports that module
imports OpenTelemetry. Without one, the send path pays one ``is not None``
check per hook and nothing more: no clock reads, no objects.

Every hook is called synchronously on the event loop, in the task of the send
or batch it concerns, so an observer may keep per-task context (OpenTelemetry's
"current span") between a ``*_started`` call and its ``*_finished``. Hooks
never receive the message text or a credential. A hook must not raise: the
client does not catch it, and its exception would replace the send's own
result (``botmsg_async.otel`` catches and logs every failure of OpenTelemetry).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from yarl import URL

    from ._models import Outcome

__all__ = ["BatchObservation", "Observer", "SendObservation", "log_quietly"]


def log_quietly(
    logger: logging.Logger,
    level: int,
    msg: str,
    *args: object,
    extra: Mapping[str, object] | None = None,
    exc_info: bool = False,
) -> None:
    """``logger.log(level, msg, *args)``, except that it never raises into its caller.

    The SDK logs from inside a send (after its answer came, before a retry,
    settling its outcome): an application's handler whose ``emit`` raises, or a
    filter that does, would otherwise replace the send's own result (a delivered
    message raising the handler's error, a batch losing its report). Their
    exception is reported as ``logging`` reports a failing handler's: a
    traceback on stderr when ``logging.raiseExceptions`` is set.
    """
    try:
        # stacklevel=2: the record names the SDK's line that logged, not this one.
        logger.log(level, msg, *args, extra=extra, exc_info=exc_info, stacklevel=2)
    except Exception:
        if logging.raiseExceptions:
            with contextlib.suppress(Exception):  # no stderr (closed, None) either
                print("--- Logging error (botmsg_async) ---", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)


class SendObservation(Protocol):
    """One logical send being observed, from its first attempt to its outcome."""

    def attempt_finished(
        self, attempt: int, status: int | None, error: BaseException | None, duration: float
    ) -> None:
        """An HTTP attempt ended.

        Args:
            attempt: Its number (1 for the first).
            status: The HTTP status it got; None when no answer came.
            error: What it raised (None: the service answered SUCCESS).
            duration: Seconds it took (``time.perf_counter``).
        """
        ...

    def retry_scheduled(self, attempt: int, wait: float, error: BaseException) -> None:
        """Attempt ``attempt`` failed with ``error``; the next starts after ``wait`` seconds."""
        ...

    def send_finished(
        self, outcome: Outcome | None, attempts: int, error: BaseException | None
    ) -> None:
        """The send ended: SENT, or the error it raises, with its outcome.

        ``outcome`` is None when the send was cancelled (by its caller, a
        timeout, or a batch that stopped): after an attempt began, its delivery
        is unknown.
        """
        ...


class BatchObservation(Protocol):
    """One batch (``send_many`` / ``stream_many``) being observed."""

    def batch_finished(
        self,
        counts: Mapping[Outcome, int],
        retries: int,
        stopped_by: BaseException | None,
        error: BaseException | None,
    ) -> None:
        """The batch's task ended: its counts so far, why it stopped early if it did.

        Args:
            counts: Items with an outcome so far, by outcome.
            retries: HTTP retries made.
            stopped_by: ``BatchReport.stopped_by``: why no new item started.
            error: What ended the batch's task, if anything did: an input or a
                callback that raised, or ``asyncio.CancelledError`` when the
                stream was closed early.
        """
        ...


class Observer(Protocol):
    """What a client tells its telemetry: one call when a send or a batch starts."""

    def send_started(
        self,
        department_uuid: str,
        user_uuid: str,
        idempotency_key: str,
        base_url: URL,
        limiter_wait: float | None,
    ) -> SendObservation:
        """A logical send starts its first attempt.

        Args:
            department_uuid: The department's id.
            user_uuid: The user's id.
            idempotency_key: The key every attempt carries.
            base_url: The client's ``base_url`` (no credentials in it).
            limiter_wait: Seconds the client's rate limiter held the send back
                just before this call; None when the client has no limiter.
        """
        ...

    def limiter_waited(self, seconds: float) -> None:
        """A batch's own rate limit held one item back ``seconds``."""
        ...

    def batch_started(
        self, kind: Literal["send_many", "stream_many"], concurrency: int
    ) -> BatchObservation:
        """A batch's workers start, in the batch's own task (every send is under it)."""
        ...
