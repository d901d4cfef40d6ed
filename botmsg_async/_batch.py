"""Many sends at once: a fixed pool of workers over a lazily read input.

Memory is O(concurrency) whatever the input's size: ``concurrency`` workers
share one iterator over the items and pull the next only when they are free,
and finished results wait in a queue of the same size, so the input is never
read far ahead of what the consumer has taken. No task per item, no ``list()``
of the input.
"""

from __future__ import annotations

import asyncio
import numbers
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, Self, TypeAlias
from uuid import UUID

from attrs import define, evolve

from ._delivery import outcome_of, stops_batch, trips_breaker, unexpected_error
from ._errors import (
    BatchStoppedError,
    BotMessageError,
    InvalidRequestError,
    RateLimitedError,
)
from ._limits import LocalRateLimiter
from ._models import Outcome, SendRequest, SendResult, TextMessage
from ._report import BatchReport, Counts, ItemResult, ItemResults, Progress, ResultRow, Tally
from ._validate import id_text, new_idempotency_key

if TYPE_CHECKING:
    from ._observe import Observer
    from ._retry import RetryPolicy

__all__ = ["BatchOptions", "BatchStream", "Items", "NotYet", "Sender", "collect", "drain"]

ItemLike: TypeAlias = SendRequest | tuple[str | UUID, str | UUID, str | TextMessage]
Items: TypeAlias = Iterable[ItemLike] | AsyncIterable[ItemLike]


class NotYet:
    """What a plain iterator of items may yield when it has none ready yet.

    The batch waits for ``ready`` and then asks the iterator again. A source
    that fills up while the batch runs (a bulk worker between two chunks) is
    then read as a plain iterator, without the coroutine and ``anext`` per
    item an async one costs (2-3 us per message in an in-process A/B). Not part
    of the public API: ``send_many`` callers pass async iterables.
    """

    __slots__ = ("ready",)

    def __init__(self, ready: asyncio.Event) -> None:
        self.ready = ready


def _number(value: object) -> bool:
    """Whether ``value`` is a number an option may compare (a bool or a string is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_options(options: BatchOptions) -> None:
    """Raise ``InvalidRequestError`` naming the first bad batch option.

    Of the wrong type too: a comparison would raise a ``TypeError`` naming no
    option, and a callback that cannot be called would fail the batch only once
    its first items were sent.
    """
    if not isinstance(options.concurrency, int) or options.concurrency < 1:
        raise InvalidRequestError("concurrency", options.concurrency, "must be an int >= 1")
    for name, rate in (
        ("rate_limit", options.rate_limit),
        ("per_department_rate_limit", options.per_department_rate_limit),
    ):
        if rate is not None and not (_number(rate) and rate > 0):
            raise InvalidRequestError(name, rate, "must be > 0 messages per second, or None")
    stop_after = options.stop_after_consecutive_failures
    if stop_after is not None and not (_number(stop_after) and stop_after >= 1):
        raise InvalidRequestError("stop_after_consecutive_failures", stop_after, "must be >= 1")
    if not (_number(options.max_pause) and options.max_pause >= 0):
        raise InvalidRequestError("max_pause", options.max_pause, "must be >= 0 seconds")
    if not (_number(options.progress_interval) and options.progress_interval > 0):
        raise InvalidRequestError("progress_interval", options.progress_interval, "must be > 0")
    for name, callback in (
        ("on_result", options.on_result),
        ("on_start", options.on_start),
        ("on_progress", options.on_progress),
    ):
        if callback is not None and not callable(callback):
            raise InvalidRequestError(name, callback, "must be callable, or None")


@define(frozen=True, kw_only=True)
class BatchOptions:
    """How a batch runs: built once, checked once, handed to the batch whole.

    ``send_many`` and ``stream_many`` build one from their keyword arguments,
    which they document.

    Raises:
        InvalidRequestError: a bad option, named, before anything is sent.
    """

    concurrency: int = 64
    rate_limit: float | None = None
    per_department_rate_limit: float | None = None
    retry: RetryPolicy | None = None
    on_result: Callable[[ItemResult], object] | None = None
    on_start: Callable[[int, SendRequest], object] | None = None
    on_progress: Callable[[Progress], object] | None = None
    progress_interval: float = 1.0
    stop_after_consecutive_failures: int | None = 100
    max_pause: float = 300.0

    def __attrs_post_init__(self) -> None:
        _check_options(self)


class Sender(Protocol):
    """What a batch needs of a client: ``BotMessageClient`` is one."""

    async def send(
        self,
        department_uuid: str,
        user_uuid: str,
        message: str | TextMessage,
        *,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> SendResult:
        """Send one message, with its retries."""
        ...

    def ensure_open(self) -> None:
        """Raise ``ClientClosedError`` when the sender is closed."""
        ...

    def pause_remaining(self) -> float:
        """Seconds left of a 429 pause the sender knows of (0 when none)."""
        ...

    async def wait_out_pause(self) -> None:
        """Sleep until that pause ends."""
        ...


def _not_an_item(raw: object) -> InvalidRequestError:
    return InvalidRequestError(
        "item", raw, "must be a SendRequest or a (department_uuid, user_uuid, message) tuple"
    )


_DONE = object()

#: What a callback or the input may raise of its own: a CancelledError too (a
#: cancelled future's ``result()``, a source awaiting a cancelled producer), see
#: ``_own_error``.
_RAISED = (Exception, asyncio.CancelledError)


def _own_error(error: BaseException) -> Exception:
    """What a callback or the input raised, as the error that stops the batch.

    A CancelledError there is not a cancellation of the batch (those reach only
    its own awaits) and is wrapped: raised as it is, asyncio takes it for one, so
    the worker would end silently, the items after it neither sent nor reported,
    and the caller (or its TaskGroup) would see a cancellation nobody asked for.
    """
    if isinstance(error, Exception):
        return error
    wrapped = RuntimeError(
        f"a callback or the input raised {type(error).__name__}, though the batch was not "
        "cancelled; the batch stopped"
    )
    wrapped.__cause__ = error
    return wrapped


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class BatchStream:
    """An async iterator of ``ItemResult`` values, in completion order.

    Also an async context manager: leaving the ``async with`` block (or
    ``aclose()``) stops the workers and cancels in-flight sends. Iterating to
    the end cleans up too. Outside ``async with``, leaving an ``async for``
    early (``break``, an exception) stops the workers as soon as the loop runs
    again, and so does a cancelled read (it may be the consumer's end); a later
    read raises ``RuntimeError``. Inside ``async with``, a ``break`` or a
    cancelled read leaves the stream running, to be read on; an error of a
    callback or of the input that the block did not read to is raised by its exit.

    ``telemetry`` (the client's) is told when the batch starts and ends, and of
    the time its own rate limits hold items back.
    """

    def __init__(
        self,
        sender: Sender,
        items: Items,
        options: BatchOptions,
        *,
        telemetry: Observer | None = None,
    ) -> None:
        if isinstance(items, AsyncIterable):
            self._aiter: AsyncIterator[ItemLike] | None = aiter(items)
            self._iter: Iterator[ItemLike | NotYet] | None = None
        elif isinstance(items, Iterable) and not isinstance(items, str | bytes):
            self._aiter = None
            # A bulk worker's source may also yield NotYet (see there).
            self._iter = iter(items)
        else:
            raise InvalidRequestError("items", items, "must be an iterable or async iterable")
        self._sender = sender
        self.options = options
        self._telemetry = telemetry
        self._concurrency = options.concurrency
        self._limiter = (
            LocalRateLimiter(options.rate_limit, options.per_department_rate_limit)
            if options.rate_limit or options.per_department_rate_limit
            else None
        )
        self._retry = options.retry
        self._on_result = options.on_result
        self._on_start = options.on_start
        self._on_progress = options.on_progress
        self._progress_interval = options.progress_interval
        self._stop_after = options.stop_after_consecutive_failures
        self._max_pause = options.max_pause
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=options.concurrency)
        # An async source is read by one worker at a time: ``_pulling`` while one
        # is inside it; ``_pulled`` (made only when another waits) says it left.
        self._pulling = False
        self._pulled: asyncio.Future[None] | None = None
        #: What reading the input or a callback raised first: no item starts after
        #: it, and it is raised once the items in flight are done and reported.
        self._error: Exception | None = None
        #: ``stop()`` was called: no item starts, the sends in flight finish.
        self._stopping = False
        self._later_errors = 0  # callback errors after it, dropped (a note says how many)
        #: Workers waiting for something other than a send (the input's next item, a
        #: rate limit, a 429 pause): an error cancels their wait (``_fail``), since a
        #: source that waits for more (a queue, a job) would otherwise hold the batch.
        self._waiting: set[asyncio.Task[object]] = set()
        self._woken: set[asyncio.Task[object]] = set()  # those whose wait it cancelled
        #: Those of them in ``_admit`` (a rate limit, a 429 pause): a stop (``_halt``)
        #: ends their wait too, or each would wait for its slot only to be SKIPPED.
        self._admitting: set[asyncio.Task[object]] = set()
        self._next_index = 0
        self._runner: asyncio.Task[None] | None = None
        self._finished = False
        self._sink: Callable[[ResultRow], object] | None = None
        self._managed = False
        self._abandoned = False
        self._reported = False  # the runner's outcome was (or is being) raised to the caller
        self._started = 0.0
        self.stopped_by: BotMessageError | None = None
        self._tally = Tally()
        self.in_flight = 0
        self._consecutive_failures = 0
        self._workers: asyncio.TaskGroup | None = None
        self._spawned = 0

    # -- consumer side ---------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[ItemResult]:
        if self._managed:
            # Inside ``async with`` the block's exit stops the workers, so no
            # generator is needed, and one would end for good at the first
            # cancelled read (an exception ends a generator): ``async for`` with
            # a per-read timeout would then stop early, silently, the batch running on.
            return self
        # An async generator, not ``self``: when a bare ``async for`` is left
        # early (``break``, an exception), the generator is dropped and asyncio's
        # own async-generator finalizer runs its ``finally``, which stops the
        # workers. A plain iterator object would never hear of the break, and its
        # pending workers would be garbage-collected mid-send.
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ItemResult]:
        try:
            while True:
                try:
                    item = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self._managed:  # inside ``async with``, the block's exit decides
                await self.aclose()

    async def __anext__(self) -> ItemResult:
        if self._abandoned:
            raise RuntimeError(
                "this stream stopped when a read of it was cancelled outside `async with`; "
                "use `async with client.stream_many(...) as stream:` to keep reading after one"
            )
        if self._finished:
            raise StopAsyncIteration
        if self._runner is None:
            self._sender.ensure_open()  # a closed client fails here, before any read
            self._started = time.perf_counter()
            self._runner = asyncio.create_task(self._observed_run())
            # _run's end wakes a reader waiting on the empty queue; a batch cancelled
            # before its first step (aclose() from another task) never runs it.
            self._runner.add_done_callback(self._wake_reader)
        if self._queue.empty() and self._runner.done():
            item: object = _DONE
        else:
            try:
                item = await self._queue.get()
            except asyncio.CancelledError:
                # Without ``async with`` this may be the last we hear of the
                # consumer (a cancelled bare ``async for``): stop the workers now
                # rather than let them go on sending with nobody watching. Inside
                # ``async with``, the block's exit decides, so a timed-out read
                # (``wait_for(anext(stream), ...)``) leaves the stream running.
                if not self._managed:
                    self._abandon()
                raise
        if isinstance(item, ItemResult):
            return item
        self._finished = True
        runner = self._runner
        if runner is None:  # aclose() (from another task) took it: its outcome is aclose's
            raise StopAsyncIteration
        self._reported = True
        await runner  # re-raises what stopped the workers, if anything
        raise StopAsyncIteration

    def _wake_reader(self, runner: asyncio.Task[None]) -> None:
        """Wake a reader waiting for a result once the batch's task is over (see there)."""
        if self._queue.empty():
            self._queue.put_nowait(_DONE)

    async def __aenter__(self) -> Self:
        self._managed = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        error = await self._stop()
        if error is not None and exc is None:
            # The block ended early (a ``break``) after a callback or the input
            # failed: the caller hears of it, as at the end of the stream.
            raise error

    async def aclose(self) -> None:
        """Stop: no new item starts, in-flight sends are cancelled."""
        await self._stop()

    def stop(self) -> None:
        """Drain: start no new item, and let the sends in flight finish; then the stream ends.

        Unlike ``aclose()``, nothing in flight is cancelled, so nothing is left in
        doubt: read on to get the last results. Items taken from the input but not
        attempted yet (waiting for the rate limit, or for a 429 pause the batch
        waits out: one longer than the retry policy's ``max_retry_after`` or the
        send's deadline) are not started and are reported SKIPPED; an item such a
        429 refused is not sent again and is reported FAILED, as its answer proved
        it was not processed. A shorter pause is waited out inside the sends, which
        are in flight: they go ahead when it ends. The input is read no more. Safe
        to call from the event loop's signal handler (``loop.add_signal_handler``),
        and more than once.
        """
        self._stopping = True
        self._wake(self._waiting)

    async def _stop(self) -> Exception | None:
        """Stop the workers; return what failed them (a callback, the input) if not yet raised.

        Its outcome is always fetched: a runner that failed while nobody read on
        would otherwise be logged as "Task exception was never retrieved".
        """
        self._finished = True
        runner, self._runner = self._runner, None
        if runner is None or self._reported:
            return None
        self._reported = True
        if not runner.done():
            runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            # Our own cancellation of the runner, unless we are being cancelled too.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception as exc:
            return exc
        # Cancelled while the sends in flight after an input or callback error were
        # finishing: that error still stopped the batch, and is not to be lost with it.
        return self._first_error()

    async def _drain(self, sink: Callable[[ResultRow], object]) -> None:
        """Run to the end handing each result to ``sink`` instead of the queue.

        For ``send_many``: the queue's hand-over to a consumer task costs a task
        switch per item, and a report needs no backpressure. ``sink`` gets each
        item's ``ItemResult`` fields as a tuple (``ResultRow``): a report stores
        them as columns, and building an ``ItemResult`` nobody reads costs ~1 µs.
        """
        if self._runner is not None:
            raise RuntimeError("_drain() must be the first use of the stream")
        self._sender.ensure_open()
        self._started = time.perf_counter()
        self._sink = sink
        self._runner = asyncio.create_task(self._observed_run())
        self._reported = True  # its outcome is raised here
        await self._runner
        self._finished = True

    def _abandon(self) -> None:
        self._abandoned = self._finished = True
        runner = self._runner
        if runner is not None and not runner.done():
            runner.cancel()
            # Nobody will await it: fetch its outcome so that asyncio does not
            # warn about an exception that was never retrieved.
            runner.add_done_callback(lambda task: task.cancelled() or task.exception())

    @property
    def elapsed(self) -> float:
        """Seconds since the first item was pulled."""
        return time.perf_counter() - self._started if self._started else 0.0

    @property
    def counts(self) -> Counts:
        """Completed items so far, by outcome."""
        return self._tally.counts()

    @property
    def sent(self) -> int:
        """Items the service accepted so far."""
        return self._tally.sent

    @property
    def failed(self) -> int:
        """Items not delivered so far."""
        return self._tally.failed

    @property
    def unknown(self) -> int:
        """Items whose delivery is unknown so far."""
        return self._tally.unknown

    @property
    def skipped(self) -> int:
        """Items never attempted so far."""
        return self._tally.skipped

    @property
    def retries(self) -> int:
        """HTTP retries made so far."""
        return self._tally.retries

    def progress(self) -> Progress:
        """A snapshot of the counts so far."""
        tally = self._tally
        return Progress(tally.counts(), self.in_flight, tally.retries, self.elapsed)

    # -- worker side -------------------------------------------------------------

    async def _observed_run(self) -> None:
        """``_run``, inside the telemetry's batch (its span is current for every worker)."""
        telemetry = self._telemetry
        if telemetry is None:
            await self._run()
            return
        try:
            watch = telemetry.batch_started(
                "send_many" if self._sink is not None else "stream_many", self._concurrency
            )
        except BaseException:
            # A hook must not raise (see _observe); one that does fails the batch,
            # and a reader waiting on the empty queue must hear of it: _run, which
            # would wake it, never runs.
            self._queue.put_nowait(_DONE)
            raise
        error: BaseException | None = None
        try:
            await self._run()
        except BaseException as exc:
            error = exc
            raise
        finally:
            tally = self._tally
            counts = {
                Outcome.SENT: tally.sent,
                Outcome.FAILED: tally.failed,
                Outcome.UNKNOWN: tally.unknown,
                Outcome.SKIPPED: tally.skipped,
            }
            watch.batch_finished(counts, tally.retries, self.stopped_by, error)

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                ticker = group.create_task(self._tick()) if self._on_progress is not None else None
                async with asyncio.TaskGroup() as workers:
                    # One worker; each starts the next when it takes an item, so a
                    # batch has no more workers than items (concurrency=10**9 for
                    # three items must not build a billion tasks).
                    self._workers = workers
                    self._spawned = 1
                    workers.create_task(self._work())
                if ticker is not None:
                    ticker.cancel()
                error = self._first_error()
                if error is not None:
                    # Raised once the sends in flight when it failed have finished and
                    # been reported: cancelled, their outcome would be unknown.
                    raise error
            if self._on_progress is not None:
                try:
                    self._on_progress(self.progress())
                except asyncio.CancelledError as exc:
                    raise _own_error(exc) from exc
        except BaseExceptionGroup as group_error:
            # Callers should see the error itself (a failing input iterator or
            # callback), not the TaskGroup's wrapping of it; the cause it was raised
            # from (``raise ... from``) stays its own.
            leaf = _first_leaf(group_error)
            raise leaf from leaf.__cause__
        finally:
            # Wake a consumer blocked on an empty queue; a consumer with items
            # still queued finds this task done once it has taken them.
            if not self._queue.full():
                self._queue.put_nowait(_DONE)

    async def _tick(self) -> None:
        assert self._on_progress is not None
        while True:
            await asyncio.sleep(self._progress_interval)
            try:
                self._on_progress(self.progress())
            except _RAISED as exc:
                self._fail(exc)  # as for on_result: the sends in flight finish
                return

    async def _pull(self) -> tuple[int, object] | None:
        """The next item of the async source, and its index (None: no more).

        A plain iterator is read in ``_work`` itself, without this coroutine.
        """
        assert self._aiter is not None
        # An async generator refuses concurrent __anext__ calls. Not an
        # asyncio.Lock: a fair lock, once its waiters queue (the source waited
        # once), hands every later item over through a task wake-up, a convoy
        # that lasts the whole batch. Here a free source is taken at once, and
        # waiters all wake when it is free and try again.
        while self._pulling:
            if self._pulled is None:
                self._pulled = asyncio.get_running_loop().create_future()
            # Shielded: a waiter's cancellation must not cancel the others' wait.
            await asyncio.shield(self._pulled)
        if self._error is not None or self._stopping:
            return None  # it (or a callback) failed, or a stop, while we waited: read it no more
        self._pulling = True
        waiting = self._wait_begins()
        try:
            raw = await anext(self._aiter)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError as exc:
            if self._wait_cancelled(waiting):
                return None  # an error stopped the batch: the input is read no more
            current = asyncio.current_task()
            if current is not None and not current.cancelling():
                raise _own_error(exc) from exc  # the source's own, as any error of it
            raise
        finally:
            self._pulling = False
            self._wait_ends(waiting)
            pulled, self._pulled = self._pulled, None
            if pulled is not None:
                pulled.set_result(None)
        index = self._next_index
        self._next_index += 1
        return index, raw

    async def _work(self) -> None:
        sink = self._sink
        items = self._iter
        while True:
            if self._error is not None or self._stopping:
                return  # the input or a callback failed, or stop(): nothing new starts
            if items is not None:
                # A plain iterator is read here, not through _pull: no coroutine per item.
                try:
                    raw: object = next(items)
                except StopIteration:
                    return
                except _RAISED as exc:
                    self._fail(exc)
                    return
                if type(raw) is NotYet:
                    waiting = self._wait_begins()
                    try:
                        await raw.ready.wait()
                    except asyncio.CancelledError:
                        if not self._wait_cancelled(waiting):
                            raise  # else the loop's check ends this worker
                    finally:
                        self._wait_ends(waiting)
                    continue
                index = self._next_index
                self._next_index += 1
            else:
                try:
                    pulled = await self._pull()
                except Exception as exc:
                    self._fail(exc)
                    return
                if pulled is None:
                    return
                index, raw = pulled
            if self._spawned < self._concurrency:
                assert self._workers is not None
                self._spawned += 1
                self._workers.create_task(self._work())
            row = await self._handle(index, raw)
            _, _, _, outcome, result, error = row
            attempts = (
                result.attempts if result is not None else 0 if error is None else error.attempts
            )
            self._record(outcome, error, attempts)
            if sink is None:
                item = ItemResult(*row)
                if self._on_result is not None:
                    try:
                        self._on_result(item)
                    except _RAISED as exc:
                        self._fail(exc)  # the item is still counted and streamed
                await self._queue.put(item)
                continue
            # send_many's report stores rows: an ItemResult only for on_result.
            if self._on_result is not None:
                try:
                    self._on_result(ItemResult(*row))
                except _RAISED as exc:
                    self._fail(exc)  # the item is still counted and reported
            try:
                sink(row)
            except _RAISED as exc:
                # A drain's sink (a bulk worker's, which journals the outcome) is a
                # callback too: its error stops the batch, the rest in flight finish.
                self._fail(exc)
            if attempts == 0:
                # Skipped or refused before any I/O: nothing here awaited,
                # so let the loop run others (a ticker, a timeout, a cancel).
                await asyncio.sleep(0)

    async def _handle(self, index: int, raw: object) -> ResultRow:
        request: SendRequest | None
        if isinstance(raw, SendRequest):
            request = raw
            department, user, message, key = (
                raw.department_uuid,
                raw.user_uuid,
                raw.message,
                raw.idempotency_key,
            )
        elif isinstance(raw, tuple) and len(raw) == 3:
            # A SendRequest is built only if on_start asks for one: nothing else reads it.
            request = None
            department, user, message = raw
            key = None
        else:
            return (index, "", "", Outcome.FAILED, None, _not_an_item(raw))
        # uuid.UUID ids (send() takes them too) are reported as text.
        if type(department) is str and type(user) is str:
            department_uuid, user_uuid = department, user
        else:
            department_uuid, user_uuid = id_text(department), id_text(user)
            for name, value in (("department_uuid", department_uuid), ("user_uuid", user_uuid)):
                if not isinstance(value, str):
                    # Refused here, as send() would: an id that is not text would
                    # otherwise reach the rate limiter (an unhashable one, a
                    # TypeError that fails the batch) and the report as it is.
                    error = InvalidRequestError(
                        name, value, f"must be a str or uuid.UUID, not {type(value).__name__}"
                    )
                    shown = [v if isinstance(v, str) else "" for v in (department_uuid, user_uuid)]
                    return (index, shown[0], shown[1], Outcome.FAILED, None, error)
        sender = self._sender
        # An error of the input or a callback during this item's pull (an async
        # source) or its rate-limit wait: it is not started, as after a stop.
        if self.stopped_by is not None or self._error is not None or self._stopping:
            return (index, department_uuid, user_uuid, Outcome.SKIPPED, None, None)
        if self._limiter is not None or sender.pause_remaining():
            await self._admit(department_uuid)
            if self.stopped_by is not None or self._error is not None or self._stopping:
                return (index, department_uuid, user_uuid, Outcome.SKIPPED, None, None)
        if self._on_start is not None:
            try:
                self._on_start(index, request or SendRequest(department, user, message))
            except _RAISED as exc:
                # Before any I/O for the item (a journal's start record was refused):
                # it is not sent, and is reported SKIPPED, never attempted.
                self._fail(exc)
                return (index, department_uuid, user_uuid, Outcome.SKIPPED, None, None)
        # A key of our own when the caller gave none: an item throttled by a 429
        # is sent again after the pause, and must carry the same key then.
        key = key or new_idempotency_key()
        earlier_attempts = 0
        paused = 0.0
        self.in_flight += 1
        try:
            while True:
                try:
                    result = await sender.send(
                        department_uuid,
                        user_uuid,
                        message,
                        retry=self._retry,
                        idempotency_key=key,
                    )
                except BotMessageError as exc:
                    exc.attempts += earlier_attempts
                    pause = sender.pause_remaining()
                    if (
                        isinstance(exc, RateLimitedError)
                        and pause
                        and self.stopped_by is None
                        and self._error is None
                        and not self._stopping
                    ):
                        # Not processed, and the service named when to come back:
                        # the whole batch pauses, this item goes again after it.
                        paused += pause
                        if paused <= self._max_pause:
                            earlier_attempts = exc.attempts
                            await self._admit(department_uuid)
                            # Not sent again once the batch stopped (a cause, an error)
                            # meanwhile: its answer, a 429, says it was not processed.
                            if (
                                self.stopped_by is None
                                and self._error is None
                                and not self._stopping
                            ):
                                continue
                        else:
                            self._stop_for_pause(pause, exc)
                    outcome = outcome_of(exc, exc.attempts)
                    if stops_batch(exc) and self.stopped_by is None:
                        self._halt(exc)
                    return (index, department_uuid, user_uuid, outcome, None, exc)
                except Exception as exc:
                    # Not a send's own end but a defect (a custom sender's, a warning
                    # raised as an error): this item is unknown, and the batch stops as
                    # on an error of a callback: the sends in flight finish and are
                    # reported, and then it is raised.
                    self._fail(exc)
                    unknown = unexpected_error(exc)
                    outcome = outcome_of(unknown, 0)
                    return (index, department_uuid, user_uuid, outcome, None, unknown)
                if earlier_attempts:
                    result = evolve(result, attempts=result.attempts + earlier_attempts)
                return (index, department_uuid, user_uuid, Outcome.SENT, result, None)
        finally:
            self.in_flight -= 1

    def _fail(self, error: BaseException) -> None:
        """Stop the batch on an error of the input or a callback: keep the first, count the rest.

        Nothing new starts; the sends in flight finish, and each is still counted
        and reported (``on_result`` too: it may succeed for them). The first error
        is raised at the end; later ones are dropped, and a note on it says how many.
        Workers waiting for the input, a rate limit or a 429 pause stop waiting.
        """
        if self._error is None:
            self._error = _own_error(error)
            self._wake(self._waiting)
        elif error is not self._error:
            self._later_errors += 1

    def _halt(self, stop: BotMessageError) -> None:
        """Stop the batch for ``stop`` (``stopped_by``): nothing new starts, the rest SKIPPED.

        Items waiting for a rate limit or a 429 pause stop waiting, to be SKIPPED at
        once: at a low rate, each would otherwise wait for its slot (minutes).
        """
        self.stopped_by = stop
        self._wake(self._admitting)

    def _wake(self, tasks: set[asyncio.Task[object]]) -> None:
        """Cancel the waits of ``tasks`` but the current one's (``_wait_cancelled`` undoes it)."""
        current = asyncio.current_task()
        for task in list(tasks):
            if task is not current and task not in self._woken:
                self._woken.add(task)
                task.cancel()

    def _wait_begins(self) -> asyncio.Task[object] | None:
        """Note that this worker waits for something other than a send (see ``_fail``)."""
        if self._error is not None:
            return None  # already stopped: nothing will cancel this wait
        task = asyncio.current_task()
        if task is not None:
            self._waiting.add(task)
        return task

    def _wait_ends(self, task: asyncio.Task[object] | None) -> None:
        if task is None:
            return
        self._waiting.discard(task)
        if task in self._woken:
            # Its wait ended though cancelled (the source caught the cancel and
            # yielded an item, then SKIPPED): take the cancel back, or the task would
            # pass for one being cancelled (``cancelling()``) in its next send.
            self._woken.discard(task)
            task.uncancel()

    def _wait_cancelled(self, task: asyncio.Task[object] | None) -> bool:
        """Whether the cancel a wait ended with was ``_fail``'s alone (then it is taken back)."""
        if task is None or task not in self._woken:
            return False
        self._woken.discard(task)
        return task.uncancel() == 0

    def _first_error(self) -> Exception | None:
        """The error that stopped the batch (input or callback), noted with the dropped ones."""
        error, later = self._error, self._later_errors
        if error is not None and later:
            self._later_errors = 0  # noted once, however often this is asked
            error.add_note(
                f"and {later} later error(s) of the input or a callback, dropped while the sends "
                "in flight finished"
            )
        return error

    def _stop_for_pause(self, pause: float, error: BotMessageError | None) -> None:
        if self.stopped_by is None:
            stop = BatchStoppedError(
                f"the service asked to pause {pause:.1f} s, past max_pause={self._max_pause:g} s; "
                "the batch stopped (the rest SKIPPED): resume it later",
                reason="pause_too_long",
                last_error=error,
            )
            stop.__cause__ = error
            self._halt(stop)

    def _trip_breaker(self, error: BotMessageError | None) -> None:
        stop = BatchStoppedError(
            f"{self._consecutive_failures} items in a row failed or are unknown "
            f"(stop_after_consecutive_failures={self._stop_after}); the service or the "
            f"configuration looks broken, so the batch stopped (the rest SKIPPED). "
            f"Last error: {error}",
            reason="consecutive_failures",
            last_error=error,
        )
        stop.__cause__ = error
        self._halt(stop)

    async def _admit(self, department_uuid: str) -> None:
        """Wait for the rate limits, and for any 429 pause that began meanwhile.

        A token taken before or during a pause is spent again after it: otherwise
        every worker that got one while the service asked us to wait would send
        at the same instant when the pause ends, far above the rate limit. A
        pause longer than ``max_pause`` stops the batch instead.
        """
        waiting = self._wait_begins()
        if waiting is not None:
            self._admitting.add(waiting)
        try:
            await self._wait_turn(department_uuid)
        except asyncio.CancelledError:
            if not self._wait_cancelled(waiting):
                raise  # else an error or a stop ended it: the caller sees it and stops
        finally:
            if waiting is not None:
                self._admitting.discard(waiting)
            self._wait_ends(waiting)

    async def _wait_turn(self, department_uuid: str) -> None:
        """``_admit``'s waits: the rate limits, then any 429 pause (see there)."""
        sender = self._sender
        while True:
            if self._limiter is not None:
                if self._telemetry is None:
                    await self._limiter.acquire(department_uuid)
                else:
                    began = time.perf_counter()
                    await self._limiter.acquire(department_uuid)
                    self._telemetry.limiter_waited(time.perf_counter() - began)
            pause = sender.pause_remaining()
            if (
                pause <= 0
                or self.stopped_by is not None
                or self._error is not None
                or self._stopping
            ):
                return
            if pause > self._max_pause:
                self._stop_for_pause(pause, None)
                return
            await sender.wait_out_pause()

    def _record(self, outcome: Outcome, error: BotMessageError | None, attempts: int) -> None:
        tally = self._tally
        if outcome is Outcome.SENT:
            tally.sent += 1
            self._consecutive_failures = 0
        elif outcome is Outcome.SKIPPED:
            tally.skipped += 1
        else:
            if outcome is Outcome.FAILED:
                tally.failed += 1
            else:
                tally.unknown += 1
            if trips_breaker(outcome, error):
                self._consecutive_failures += 1
                if (
                    self._stop_after is not None
                    and self._consecutive_failures >= self._stop_after
                    and self.stopped_by is None
                ):
                    self._trip_breaker(error)
        if attempts > 1:
            tally.retries += attempts - 1


async def drain(stream: BatchStream, sink: Callable[[ResultRow], object]) -> None:
    """Run ``stream`` to the end, handing each item's result to ``sink`` as it is known.

    ``sink`` gets the ``ItemResult`` fields as a tuple (``ResultRow``): a caller
    that keeps its own accounting (a bulk worker) builds no object per item. An
    error of ``sink`` stops the batch as a callback's does: nothing new starts,
    the sends in flight finish (``sink`` still gets them), then it is raised.
    """
    async with stream:
        await stream._drain(sink)


async def collect(
    stream: BatchStream, keep: Literal["all", "failures", "none"] = "all"
) -> BatchReport:
    """Run ``stream`` to the end and build its ``BatchReport``."""
    if keep not in ("all", "failures", "none"):
        raise InvalidRequestError("keep", keep, "must be 'all', 'failures' or 'none'")
    results = ItemResults()
    if keep == "all":
        sink: Callable[[ResultRow], object] = results.add
    elif keep == "failures":

        def sink(row: ResultRow) -> None:
            if row[3] is not Outcome.SENT:
                results.add(row)

    else:

        def sink(row: ResultRow) -> None:
            pass

    await drain(stream, sink)
    results.sort()
    return BatchReport(
        results=results,
        counts=stream.counts,
        retries=stream.retries,
        elapsed=stream.elapsed,
        stopped_by=stream.stopped_by,
    )
