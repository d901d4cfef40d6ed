"""One bulk send over several worker processes: ``botmsg send-many --workers N``.

A library module: the CLI uses it, and so can a bulk script (``send_parallel``).
One parent process hands out the items in chunks and collects the results;
each worker process runs its own event loop (uvloop when installed) and its
own ``BotMessageClient``, and sends its items through a ``BatchStream``.

One job, not N:

* **Load balance**: a worker asks for a new chunk when its own runs low, so a
  fast worker takes more. With a per-department limit, each department is
  routed to one worker (the least loaded when the department is first seen)
  for the whole run, so that the worker's own per-department limiter holds it
  exactly; without one, items go to whoever asks.
* **One rate and one pause**: ``ProcessRateLimiter`` keeps the global rate
  (GCRA) and the 429 pause in a few bytes of shared memory under a POSIX
  record lock; every worker's client holds it, so a Retry-After seen by one
  worker pauses all of them until the instant the server named.
* **One stop**: a worker whose batch stops (refused credentials, a redirect,
  too many failures in a row) tells the parent, which stops every worker; the
  rest is SKIPPED.
* **One journal**: ``JournalSet``. The ``--journal`` file itself keeps its
  header and one record per run; each worker of each run writes its own
  segment, a ``FileJournal`` named ``<journal>.part-<run>-<worker>``, with the
  same records as a single-process journal (a start record right before the
  first attempt, the outcome when known). A resumed run reads all of them,
  whatever ``--workers`` wrote them and whatever ``--workers`` it runs with.
* **A worker that dies**: its segment says which of its items started (in
  doubt: unknown) and which never did (handed to the other workers). Without
  ``--journal``, segments are kept in a temporary directory for that purpose.

A ``WorkerPool`` starts the workers ahead of their job (the CLI starts them before
it checks the input, so that their start-up overlaps that pass); each waits on its
socket for the job's configuration, and exits if the socket closes first.

Workers are started with ``subprocess`` (``python -m botmsg_async.bulk``), not
``multiprocessing``: the parent chooses each worker's environment (the CLI
sets a malloc tunable that glibc reads at exec), a caller's ``__main__`` is
never imported again in the workers, and no helper process (fork server,
resource tracker) is left to outlive the job. The parent and a worker talk
over a socket pair with ``multiprocessing.connection.Connection`` framing.
A worker whose parent dies sees the socket close: it starts nothing new,
lets its sends in flight finish (recording them), and exits.
"""

from __future__ import annotations

import array
import asyncio
import base64
import collections
import contextlib
import glob
import mmap
import os
import pickle
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from multiprocessing.connection import Connection
from typing import Any, Final, cast

from attrs import astuple, define, evolve, field, fields

from ._batch import BatchOptions, BatchStream, Items, NotYet, drain
from ._client import BotMessageClient
from ._errors import (
    APIStatusError,
    BotMessageError,
    ClientClosedError,
    InvalidRequestError,
    InvalidResponseError,
)
from ._limits import PauseOnly, check_rate
from ._models import MessageDefaults, Outcome, SendRequest, SendResult, TextMessage
from ._report import Counts, ResultRow
from ._retry import RetryPolicy
from ._validate import new_idempotency_key
from .journal import (
    FINAL_STATES,
    IN_DOUBT_STATES,
    NEW,
    RETRY,
    SKIPPED,
    TORN_NOTE,
    UNKNOWN,
    FileJournal,
    JournalError,
    JournalState,
    finished_records,
    flush_failure,
    load,
    retry_later,
    settle,
)

__all__ = [
    "JournalSet",
    "ParallelItem",
    "ParallelReport",
    "ParallelSend",
    "ProcessRateLimiter",
    "WorkItem",
    "WorkerConfig",
    "WorkerPool",
    "check_workers",
    "max_workers",
    "send_parallel",
    "usable_cores",
]

#: Why an item is unknown when the worker sending it died.
WORKER_DIED_NOTE: Final = (
    "the worker process sending it died while it was in flight: it may or may not "
    "have been delivered"
)
_FRESH: Final = frozenset({NEW, RETRY, SKIPPED})
# A worker's program: imports this module by name (not as __main__), so that what it
# sends back unpickles in the parent as the same classes. It starts with SIGINT blocked
# (``WorkerPool._spawn``): it ignores it first, so that a Ctrl-C that came during its
# start-up (the terminal's, sent to the whole process group) is dropped, not raised as
# a KeyboardInterrupt with a traceback; only then does it let SIGINT through.
_WORKER_CODE: Final = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "import sys; from botmsg_async.bulk import _worker_main; "
    "sys.exit(_worker_main(int(sys.argv[1])))"
)
_SEGMENT = re.compile(r"\.part-(\d+)-(\d+)$")


def usable_cores() -> int:
    """The number of cores this process may run on (``--workers auto``)."""
    counter = getattr(os, "process_cpu_count", None)  # 3.13+
    if counter is not None:
        return int(counter() or 1)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def max_workers() -> int:
    """The most worker processes a job may start here: four per usable core (at least 4).

    A bulk send is CPU-bound: processes beyond the cores only share them, and each
    costs its start-up and tens of MB. A number like 10,000 (a typo, a variable
    unset) would exhaust the machine's memory or process table before sending.
    """
    return max(4, 4 * usable_cores())


def check_workers(workers: object) -> int:
    """``workers`` if a job may start that many worker processes here.

    Raises:
        InvalidRequestError: not an int >= 1, or more than ``max_workers()``.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise InvalidRequestError("workers", workers, "must be an int >= 1")
    if workers > max_workers():
        raise InvalidRequestError(
            "workers",
            workers,
            f"must be at most {max_workers()} here (4 per usable core): more processes "
            "than cores only share them; raise the concurrency instead",
        )
    return workers


# -- the shared rate limiter -------------------------------------------------------


# Shared state: the global GCRA's theoretical arrival time, and the pause's end,
# both on CLOCK_MONOTONIC, which every process of the machine shares.
_STATE = struct.Struct("=dd")


class _DepartmentSlots:
    """One department's schedule in this process: its next slot, its turn, its waiters."""

    __slots__ = ("tat", "turn", "waiting")

    def __init__(self) -> None:
        self.tat = 0.0  # theoretical arrival time of its next send (GCRA)
        self.turn = asyncio.Lock()
        self.waiting = 0


class ProcessRateLimiter:
    """A ``RateLimiter`` shared by the processes of one machine.

    The global rate is a GCRA (generic cell rate algorithm) whose state, one
    instant, lives in shared memory with the 429 pause's end; each acquire takes
    a POSIX record lock for a few microseconds, reserves its slot and sleeps
    until it (no polling). The per-department rate is kept in this process only:
    the parent routes each department to one worker while it is set.

    Grants are reservations: with a burst of ``max(1, rate / 10)`` (a tenth of
    a second), no interval of ``w`` seconds holds more than ``rate * w + burst``
    grants, whichever process took them.

    Args:
        fd: A file descriptor of the shared state (``create`` makes one).
        rate: Most messages per second across every holder (None: no limit).
        per_department_rate: Most messages per second to one department, in
            this process (None: no limit).
        grant_log: Append each grant (the slot's monotonic time, the pid and the
            department) to this file: for audits and tests of the limits.
        clock: The monotonic clock every holder shares (``time.monotonic``; tests
            may pass the loop's).

    Raises:
        InvalidRequestError: a rate that is not a finite number > 0 (or None).
    """

    def __init__(
        self,
        fd: int,
        *,
        rate: float | None = None,
        per_department_rate: float | None = None,
        grant_log: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_rate("rate_limit", rate)
        check_rate("per_department_rate_limit", per_department_rate)
        # Imported here: the module (and the CLI that imports it) loads on Windows,
        # where there are no POSIX record locks and no workers.
        import fcntl

        self._lockf = fcntl.lockf
        self._flags = (fcntl.LOCK_UN, fcntl.LOCK_EX)
        self._fd = fd
        self._map = mmap.mmap(fd, _STATE.size)
        self.rate = rate
        self.per_department_rate = per_department_rate
        self._interval = 1.0 / rate if rate else 0.0
        self._tolerance = (max(1.0, rate / 10) - 1.0) * self._interval if rate else 0.0
        self._dept_interval = 1.0 / per_department_rate if per_department_rate else 0.0
        self._dept_tolerance = (
            (max(1.0, per_department_rate / 10) - 1.0) * self._dept_interval
            if per_department_rate
            else 0.0
        )
        self._clock = clock
        self._dept: dict[str, _DepartmentSlots] = {}
        self._forget_at = 4096  # departments held when the next scan forgets the idle
        self._log_fd = (
            os.open(grant_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if grant_log
            else None
        )

    def _lock(self, exclusive: bool) -> None:
        self._lockf(self._fd, self._flags[exclusive])

    @staticmethod
    def create() -> int:
        """A new shared state (zeroed), as an unnamed file's descriptor to pass to workers."""
        with tempfile.TemporaryFile() as f:
            f.write(b"\0" * _STATE.size)
            f.flush()
            return os.dup(f.fileno())

    def __repr__(self) -> str:
        return (
            f"ProcessRateLimiter(rate={self.rate}, per_department_rate={self.per_department_rate})"
        )

    def close(self) -> None:
        """Release the mapping and the grant log."""
        self._map.close()
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def _reserve_global(self, now: float) -> float:
        self._lock(True)
        try:
            tat: float
            paused_until: float
            tat, paused_until = _STATE.unpack_from(self._map)
            tat = max(tat, now)
            slot: float = max(now, tat - self._tolerance)
            _STATE.pack_into(self._map, 0, tat + self._interval, paused_until)
        finally:
            self._lock(False)
        return slot

    def _department(self, department_uuid: str, now: float) -> _DepartmentSlots:
        found = self._dept.get(department_uuid)
        if found is None:
            if len(self._dept) >= self._forget_at:
                # Forget departments whose schedule is in the past and that nobody
                # waits on: nothing of them holds.
                self._dept = {
                    d: slots for d, slots in self._dept.items() if slots.tat > now or slots.waiting
                }
                # The next scan once the kept ones have doubled, not at the next new
                # department: with thousands of slots still ahead (a low rate, many
                # departments), a scan per new department cost quadratic CPU.
                self._forget_at = max(4096, 2 * len(self._dept))
            found = self._dept[department_uuid] = _DepartmentSlots()
        return found

    async def _wait_until(self, slot: float) -> None:
        wait = slot - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)

    async def acquire(self, department_uuid: str) -> None:
        """Wait for a slot for ``department_uuid``, then for a global one.

        The global slot comes last, right before the send: one taken first would be
        spent while the send still waited for its department, and the sends parked
        that way would later go beside the others, over the global rate. A
        department's sends go through both one at a time: several waiting for
        global slots at once could get them closer together than its own rate.
        """
        if not self.per_department_rate:
            if self.rate:
                await self._acquire_global()
            return
        slots = self._department(department_uuid, self._clock())
        slots.waiting += 1
        try:
            async with slots.turn:
                now = self._clock()
                tat = max(slots.tat, now)
                slot = max(now, tat - self._dept_tolerance)
                slots.tat = tat + self._dept_interval
                self._log(slot, department_uuid)
                await self._wait_until(slot)
                if self.rate:
                    await self._acquire_global()
        finally:
            slots.waiting -= 1

    async def _acquire_global(self) -> None:
        slot = self._reserve_global(self._clock())
        self._log(slot, "*")
        await self._wait_until(slot)

    def _log(self, slot: float, department: str) -> None:
        if self._log_fd is not None:
            os.write(self._log_fd, f"{slot:.6f} {os.getpid()} {department}\n".encode())

    async def pause(self, seconds: float) -> None:
        """Pause every holder, in every process, until ``seconds`` from now."""
        if not seconds > 0:
            return
        until = self._clock() + seconds
        self._lock(True)
        try:
            tat, paused_until = _STATE.unpack_from(self._map)
            _STATE.pack_into(self._map, 0, tat, max(paused_until, until))
        finally:
            self._lock(False)

    async def paused_for(self) -> float:
        """Seconds left of the shared pause; 0 when there is none."""
        return self.pause_left()

    def pause_left(self) -> float:
        """``paused_for``, without a coroutine: for a sender's fast path."""
        # An aligned 8-byte read: no lock needed to see either the old or the new end.
        paused_until: float = _STATE.unpack_from(self._map)[1]
        return max(0.0, paused_until - self._clock()) if paused_until else 0.0


class _SharedPause(PauseOnly):
    """``PauseOnly`` over the machine's shared limiter: its pause read without a coroutine.

    A worker's client asks before every attempt; through ``paused_for`` that is
    two coroutines per attempt for a read of shared memory (with the no-op slot
    of a send, about 2 us per message in an in-process A/B).
    """

    def __init__(self, limiter: ProcessRateLimiter) -> None:
        super().__init__(limiter)
        self._shared = limiter

    async def paused_for(self) -> float:
        """Seconds left of the shared pause."""
        return self._shared.pause_left()

    def pause_left(self) -> float:
        """The same, without a coroutine: what the client reads before every attempt."""
        return self._shared.pause_left()


# -- what travels between the processes --------------------------------------------


@define(frozen=True, slots=True)
class WorkItem:
    """One item to send: its input index, its message and its idempotency key.

    ``in_doubt``: an earlier run may have delivered it (resent with its old key).
    """

    index: int
    department_uuid: str
    user_uuid: str
    message: str | TextMessage
    key: str
    in_doubt: bool = False


@define(frozen=True, slots=True)
class ParallelItem:
    """The outcome of one item of a parallel send.

    Attributes:
        index: The item's input index.
        outcome: ``"sent"``, ``"failed"``, ``"unknown"`` or ``"skipped"``.
        error: ``{"type", "message", "status"}`` when not sent, else None.
        journal_error: The error as the journal records it (``"<Type>: <message>"``).
        from_journal: Whether the outcome comes from a journal segment (the
            worker died before reporting it), not from a worker's report.
    """

    index: int
    department_uuid: str
    user_uuid: str
    outcome: str
    message_uuid: str | None
    error: dict[str, Any] | None
    key: str | None
    attempts: int = 0
    journal_error: str | None = None
    from_journal: bool = False


@define(frozen=True, kw_only=True)
class WorkerConfig:
    """What a worker needs to know; sent over its socket, never on its command line."""

    base_url: str
    username: str
    password: str = field(repr=False)
    allow_insecure_http: bool = False
    concurrency: int = 32
    rate_limit: float | None = None
    per_department_rate_limit: float | None = None
    retry: RetryPolicy | None = None
    stop_after_consecutive_failures: int | None = 100
    max_pause: float = 300.0
    segment: str = ""
    fingerprint: str = ""
    items: int = 0
    durable: bool = False
    #: A shared map of one byte per item (used without a journal), set before the item's
    #: first attempt, to tell what a dead worker had started (no system call per
    #: item, unlike a segment); an item it finished without reporting is then
    #: unknown, never resent. -1 with a journal (its segment says it all).
    started_fd: int = -1
    limiter_fd: int = -1
    grant_log: str | None = None
    use_uvloop: bool = True


# Plain tuples on the wire: pickling an attrs class with slots builds a dict per
# object, several microseconds per item each way.
_Wire = tuple[int, str, str, "str | tuple[Any, ...]", str, bool]


# A worker's report of one item: (index, outcome, message_uuid, error object, attempts,
# journal error). The parent adds the ids and the key from the item it handed out.
_Result = tuple[int, str, "str | None", "dict[str, Any] | None", int, "str | None"]


# What a worker's client makes of a plain-string message (it has no message_defaults).
_PLAIN: Final = MessageDefaults()


def _pack(message: str | TextMessage) -> str | tuple[Any, ...]:
    """``message`` for the wire: as its body alone when that is what the client sends.

    A ``TextMessage`` with nothing but a body and the defaults (every row of a
    ``send-many`` file without subject or sender) is, for a client without
    ``message_defaults``, the same request as its body as a ``str``, which the
    client encodes without building the wire shapes (``message_encoder``'s fast
    path: about 4 µs less CPU per message) and which pickles smaller. Exact types
    only: anything else travels whole and is encoded the long way.
    """
    if isinstance(message, str):
        return message
    if (
        type(message.body) is str
        and message.subject is None
        and message.sender_name is None
        and message.recipient_communication_value is None
        and type(message.type) is str
        and message.type == _PLAIN.type
        and type(message.purpose) is str
        and message.purpose == _PLAIN.purpose
        and message.is_manual is _PLAIN.is_manual
    ):
        return message.body
    return astuple(message)


def _to_wire(item: WorkItem) -> _Wire:
    return (
        item.index,
        item.department_uuid,
        item.user_uuid,
        _pack(item.message),
        item.key,
        item.in_doubt,
    )


#: ``TextMessage``'s fields in order: a packed message is its values (``astuple``).
_MESSAGE_FIELDS: Final = tuple(f.name for f in fields(TextMessage))


def _message_of(packed: str | tuple[Any, ...]) -> str | TextMessage:
    if isinstance(packed, str):
        return packed
    return TextMessage(**dict(zip(_MESSAGE_FIELDS, packed, strict=True)))


def _from_wire(wire: _Wire) -> WorkItem:
    index, department_uuid, user_uuid, packed, key, in_doubt = wire
    return WorkItem(index, department_uuid, user_uuid, _message_of(packed), key, in_doubt)


def _describe(error: BotMessageError | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error.message}"


def _error_object(
    error: BotMessageError | None, text: str | None, outcome: Outcome, recorded: str
) -> dict[str, Any] | None:
    """``{"type", "message", "status"}`` for ``--out``, as ``botmsg send-many`` writes it."""
    if text is None:
        return None
    if error is None:  # not attempted: the batch stopped
        return {"type": "BatchStoppedError", "message": text, "status": None}
    status = error.status if isinstance(error, APIStatusError | InvalidResponseError) else None
    if recorded == Outcome.UNKNOWN.value and outcome is not Outcome.UNKNOWN:
        # Still in doubt from an earlier run: the text says so, and what the resend met.
        return {"type": "DeliveryUnknownError", "message": text, "status": status}
    return {"type": type(error).__name__, "message": error.message, "status": status}


_DESCRIBED = re.compile(r"([A-Z][A-Za-z0-9]*Error): (.*)", re.DOTALL)


def _error_from_text(text: object, default_type: str) -> dict[str, Any] | None:
    """An error a journal recorded as ``"<Type>: <message>"``, for ``--out``."""
    if not isinstance(text, str):
        return None
    described = _DESCRIBED.fullmatch(text)
    if described is not None:
        return {"type": described[1], "message": described[2], "status": None}
    return {"type": default_type, "message": text, "status": None}


# -- the worker process ------------------------------------------------------------


class _JobStoppingError(ClientClosedError):
    """Raised, before any attempt, for an item the job will not start (it is stopping)."""


@define(slots=True)
class _Meta:
    """A worker's item in flight: as it came over the wire (``_Wire``), no ``WorkItem``."""

    index: int
    key: str
    in_doubt: bool
    wire: _Wire
    started: bool = False


class _GroupSync:
    """fsync of the segment for ``--durable``: one fsync serves every start record
    written before it began (group commit)."""

    def __init__(self, journal: FileJournal) -> None:
        self._journal = journal
        self.written = 0
        self._synced = 0
        self._task: asyncio.Future[None] | None = None

    async def _sync(self, target: int) -> None:
        try:
            await self._journal.sync()
            self._synced = max(self._synced, target)
        finally:
            self._task = None

    async def wait(self, upto: int) -> None:
        """Return once every record up to the ``upto``-th is on disk."""
        while self._synced < upto:
            if self._task is None:
                self._task = asyncio.ensure_future(self._sync(self.written))
            await asyncio.shield(self._task)


class _Worker:
    """One worker process: items from the parent, sends, results back."""

    def __init__(self, conn: Connection, config: WorkerConfig) -> None:
        self.conn = conn
        self.config = config
        # Items as they came over the wire: a worker builds no object per item
        # beyond the SendRequest its batch reads.
        self.buffer: collections.deque[_Wire] = collections.deque()
        self.requested = False
        self.ended = False
        self.stopping = False
        self.parent_gone = False
        self.wakeup = asyncio.Event()
        self.stopped = asyncio.Event()
        self.pending: dict[int, _Meta] = {}  # stream index -> item
        self.by_key: dict[str, _Meta] = {}
        self.pulled = 0
        #: Items the batch pulled but never attempted (it stopped, or the job is
        #: stopping): given back with the final report, like those never pulled.
        self.unstarted: list[_Wire] = []
        self.outbox: list[_Result] = []  # to send
        #: Outcomes reported to the parent that its segment refused (a full disk): a
        #: --resume reports those items unknown (a start record, no outcome).
        self.unjournaled = 0
        #: A start record its segment refused: it stopped; ``run`` raises it after the drain.
        self.refused: OSError | None = None
        self.flush_scheduled = False
        self.stream: BatchStream | None = None
        self.reported_stop = False
        self.main: asyncio.Task[None] | None = None
        self.low_water = max(1, config.concurrency)
        pair = f"{config.username}:{config.password}"
        token = base64.b64encode(pair.encode("utf-8", "surrogatepass")).decode()
        # Longest first; a secret of under four characters is everywhere in text.
        self.secrets = sorted(
            {s for s in (pair, config.password, token) if len(s) >= 4}, key=len, reverse=True
        )
        self.journal: FileJournal | None = None
        #: What its final report says went wrong (its journal segment, or a failure of
        #: its own), if anything: the parent lists it among the workers' deaths.
        self.problem: str | None = None
        self.started: mmap.mmap | None = None
        if config.started_fd >= 0:
            self.started = mmap.mmap(config.started_fd, max(1, config.items))
        else:
            try:
                self.journal = FileJournal(config.segment, redact=self._redact)
            except OSError as exc:  # a directory it may not write, no inode left
                self.problem = _cannot_begin(exc)
        self.sync = _GroupSync(self.journal) if self.journal is not None else None

    def _redact(self, text: str) -> str:
        # An error text is the server's, and a server may echo the password.
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text

    def _send(self, message: tuple[Any, ...]) -> None:
        if self.parent_gone:
            return
        try:
            self.conn.send(message)
        except OSError:  # the parent died: finish what is in flight, then exit
            self._parent_died()

    def _parent_died(self) -> None:
        self.parent_gone = True
        self.stop()
        self.wakeup.set()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())

    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                kind = message[0]
                if kind == "items":
                    self.buffer.extend(message[1])
                    self.requested = False
                elif kind == "end":
                    self.ended = True
                elif kind == "stop":
                    self.stop()
                elif kind == "abandon" and self.main is not None:
                    self.stop()
                    self.main.cancel()
                self.wakeup.set()
        except (EOFError, OSError):
            self._parent_died()

    def _request(self) -> None:
        if not self.requested and not self.ended and not self.stopping:
            self.requested = True
            self._send(("more",))

    def _items(self) -> Iterator[SendRequest | NotYet]:
        # A plain generator: the batch reads it without a coroutine per item, and
        # waits on ``NotYet`` when the next chunk has not come yet.
        not_yet = NotYet(self.wakeup)
        while True:
            if self.stopping:
                return
            if not self.buffer:
                if self.ended:
                    return
                # Cleared before asking, not after: asking may find the parent gone,
                # which stops the worker and sets the event; cleared then, the batch
                # would wait on it for ever (the reader that sets it is removed).
                self.wakeup.clear()
                self._request()
                yield not_yet
                continue
            if len(self.buffer) <= self.low_water:
                self._request()
            wire = self.buffer.popleft()
            index, department_uuid, user_uuid, packed, key, in_doubt = wire
            meta = _Meta(index, key, in_doubt, wire)
            self.pending[self.pulled] = meta
            self.by_key[key] = meta
            self.pulled += 1
            yield SendRequest(department_uuid, user_uuid, _message_of(packed), idempotency_key=key)

    def _on_result(self, row: ResultRow) -> None:
        # A row, not an ItemResult: no object per item (see ``drain``).
        index, department_uuid, user_uuid, sent_outcome, result, error = row
        meta = self.pending.pop(index)
        self.by_key.pop(meta.key, None)
        error_text: str | None
        stream = self.stream
        assert stream is not None
        stopped = stream.stopped_by
        if stopped is not None and not self.reported_stop:
            self.reported_stop = True
            if not isinstance(stopped, _JobStoppingError):
                self._send(("stopped", f"{type(stopped).__name__}: {stopped.message}"))
        if not meta.started and result is None:
            # Never attempted, so it has no journal record: the parent accounts for it
            # as for the items this worker never pulled (not started after a stop on
            # request, skipped after a stop for a cause), so that the summary, --out
            # and a --resume from the journal agree on it. Whatever its outcome: the
            # client never had it, so an error before its start (of the limiter, an
            # "unexpected error" the batch calls unknown) cannot have sent it.
            self.unstarted.append(meta.wire)
            return
        if sent_outcome is Outcome.SKIPPED:
            error_text = f"not attempted: the batch stopped after: {stream.stopped_by}"
        else:
            error_text = _describe(error)
        outcome, note = settle(sent_outcome, error, in_doubt=meta.in_doubt)
        if note is not None:
            error_text = f"{note}; this run's resend: {error_text}"
        message_uuid = result.message_uuid if result is not None else None
        attempts = result.attempts if result is not None else 0 if error is None else error.attempts
        refused: OSError | None = None
        if meta.started and self.journal is not None:
            # Never-started items get no record: a resumed run sends them, and an
            # item in doubt from an earlier run stays so.
            try:
                self.journal.outcome(
                    meta.index,
                    outcome.value,
                    key=meta.key,
                    department_uuid=department_uuid,
                    user_uuid=user_uuid,
                    message_uuid=message_uuid,
                    error=None if outcome is Outcome.SKIPPED else error_text,
                    retry=retry_later(outcome, error),
                )
            except OSError as exc:
                # Refused (a full disk): the parent still hears the outcome below, so
                # its --out and summary say what became of the item, as without
                # workers; the segment lacks it, so a --resume reports it unknown.
                refused = exc
                self.unjournaled += 1
        # No object here per item, and not the ids and key: the parent holds the
        # item it handed out, and fills them in (less to pickle on both sides).
        self.outbox.append(
            (
                meta.index,
                outcome.value,
                message_uuid,
                _error_object(error, error_text, sent_outcome, outcome.value),
                attempts,
                error_text,
            )
        )
        # A message per few milliseconds, not per result: each costs both sides
        # a system call and a wake-up.
        if len(self.outbox) >= 256:
            self._flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_later(0.005, self._flush)
        if refused is not None:
            raise refused  # the batch stops: nothing new starts, the rest in flight finish

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.outbox:
            outbox, self.outbox = self.outbox, []
            self._send(("results", outbox))

    def listen(self) -> None:
        """Read the parent's messages as they come, from the running loop.

        uvloop (libuv) makes a watched descriptor non-blocking; the socket is made
        blocking again, because ``Connection.send`` writes a message in several
        system calls: non-blocking, a parent slow to read (a loaded machine) fails
        a send of results half-way (``BlockingIOError``), which the worker took
        for its parent's death, leaving the rest of its items unknown.
        """
        fd = self.conn.fileno()
        asyncio.get_running_loop().add_reader(fd, self._on_readable)
        os.set_blocking(fd, True)

    async def run(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        self.listen()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, self._drain)
        if self.journal is not None:
            try:
                self.journal.begin(
                    fingerprint=config.fingerprint,
                    items=config.items,
                    window=0 if config.durable else config.concurrency,
                    resume=False,
                )
            except OSError as exc:  # its header refused (a full disk): the error names it
                self.problem = _cannot_begin(exc)
        if self.problem is not None:
            # Its segment cannot be written: it starts no send (none could be journaled),
            # and says why in its final report, not in a traceback; the parent gives its
            # items to the other workers.
            self._close_segment()
            self._send(("done", 0, list(self.buffer), self.problem))
            return
        limiter = ProcessRateLimiter(
            config.limiter_fd,
            rate=config.rate_limit,
            per_department_rate=config.per_department_rate_limit,
            grant_log=config.grant_log,
        )
        client = BotMessageClient(
            config.base_url,
            config.username,
            config.password,
            allow_insecure_http=config.allow_insecure_http,
            rate_limiter=_SharedPause(limiter),
        )
        retries = 0
        try:
            async with client:
                sender = _WorkerSender(self, client, limiter)
                stream = BatchStream(
                    sender,
                    # A plain source that may yield NotYet, which BatchStream takes.
                    cast("Items", self._items()),
                    BatchOptions(
                        concurrency=config.concurrency,
                        retry=config.retry,
                        stop_after_consecutive_failures=config.stop_after_consecutive_failures,
                        max_pause=config.max_pause,
                    ),
                )
                self.stream = stream
                self.main = asyncio.current_task()
                # Cancelled: the parent abandoned the job; sends in flight were cancelled,
                # and their start records without outcomes say "unknown".
                try:
                    with contextlib.suppress(asyncio.CancelledError):
                        # The results go to the parent from _on_result: no queue, no
                        # consumer task (a task switch per item), no report kept.
                        await drain(stream, self._on_result)
                    self._raise_refused()
                except OSError as exc:
                    # Its segment refused a record (a full disk; the error names it): the
                    # batch started nothing new. An item whose start was refused was not
                    # sent; the sends in flight finished, and those whose outcome the
                    # segment refused too are "unknown" (a start record, no outcome).
                    # Said in the report, not as a traceback.
                    lacking = (
                        f"; the segment lacks the outcome of {self.unjournaled} item(s) "
                        "reported here: a --resume will report them unknown"
                        if self.unjournaled
                        else ""
                    )
                    self.problem = (
                        f"could not write its journal segment ({exc}): it stopped, and "
                        f"the others went back to the job{lacking}"
                    )
                except Exception as exc:
                    # A defect, not the outside world: its traceback follows (raised on),
                    # and its report says what it may have cost, so that the parent lists
                    # it among the deaths, not as an end that "affected no outcome".
                    self.problem = (
                        f"failed ({type(exc).__name__}: {self._redact(str(exc))}): it "
                        "stopped; items it could not report are unknown, the others went "
                        "back to the job"
                    )
                    raise
                retries = stream.retries
        finally:
            limiter.close()
            # Closed (fsynced) before the final report, never after: a worker that
            # fails once it reported cannot have left its segment short.
            self._close_segment()
            if self.started is not None:
                self.started.close()
            self._flush()
            left = [*self.buffer, *self.unstarted, *(m.wire for m in self.pending.values())]
            self._send(("done", retries, left, self.problem))

    def _raise_refused(self) -> None:
        """Raise the start record's refusal that stopped it, if any: ``run`` reports it."""
        if self.refused is not None:
            raise self.refused

    def _close_segment(self) -> None:
        """Close (fsync) its journal segment, if it has one; a failure goes in the report."""
        if self.journal is None:
            return
        try:
            self.journal.close()
        except OSError as exc:
            # Its records were handed to the OS (the parent reads them), but fsync
            # failed: a power cut may lose some. Said in the report, not as a traceback.
            self.problem = self.problem or flush_failure(
                f"its journal segment {self.journal.path}", exc
            )

    def _drain(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Start nothing new: waits for a slot or a pause end now, not at their end."""
        self.stopping = True
        self.stopped.set()
        self.wakeup.set()


def _cannot_begin(error: OSError) -> str:
    """What a worker whose journal segment cannot be created or begun says of it."""
    return (
        f"could not write its journal segment ({error}): it sent nothing; its items "
        "went back to the job"
    )


class _WorkerSender:
    """The ``Sender`` a worker's batch uses: the shared limiter, the start record,
    then the client. The slot is taken before the start record, so a crash while
    an item waits for its slot leaves nothing in doubt."""

    def __init__(
        self, worker: _Worker, client: BotMessageClient, limiter: ProcessRateLimiter
    ) -> None:
        self._worker = worker
        self._client = client
        self._limiter = limiter
        self._limited = bool(limiter.rate or limiter.per_department_rate)

    async def _admit(self, department_uuid: str) -> None:
        limiter = self._limiter
        stopped = self._worker.stopped
        while not stopped.is_set():
            # A stop ends the wait for a slot too: with a slow --rate, the queued
            # items would otherwise each wait their turn before being turned away.
            if (limiter.rate or limiter.per_department_rate) and not await _unless_stopped(
                limiter.acquire(department_uuid), stopped
            ):
                return
            pause = await limiter.paused_for()
            if pause <= 0:
                return
            # A slot taken before or during a pause is taken again after it. A stop
            # (another worker's refused credentials, a signal) ends the wait at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), pause)

    async def send(
        self,
        department_uuid: str,
        user_uuid: str,
        message: str | TextMessage,
        *,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> SendResult:
        worker = self._worker
        # None: not an item of this worker's in flight (a resend after a 429 of an item
        # whose key another item shared and freed): sent again, under a new slot.
        meta = worker.by_key.get(idempotency_key) if idempotency_key is not None else None
        if meta is not None and not meta.started:
            if worker.stopping:
                raise _JobStoppingError("not attempted: the job is stopping")
            if self._limited or self._limiter.pause_left():
                await self._admit(department_uuid)
            if worker.stopping:
                raise _JobStoppingError("not attempted: the job is stopping")
            try:
                if worker.journal is not None:
                    worker.journal.start(meta.index, meta.key)
                else:
                    assert worker.started is not None
                    worker.started[meta.index] = 1
                meta.started = True
                if worker.sync is not None and worker.config.durable:
                    worker.sync.written += 1
                    await worker.sync.wait(worker.sync.written)
            except OSError as exc:
                # Its segment refused the record (a full disk): this item is not sent,
                # and the worker stops as after a callback's error: nothing new starts,
                # the sends in flight finish (raised here, the error would cancel them
                # into "unknown"); ``run`` reports it.
                worker.refused = worker.refused or exc
                worker.stop()
                raise _JobStoppingError("not attempted: its journal segment refused it") from None
        else:
            # A resend after a 429 (which proved the message was not processed).
            if worker.stopping:
                raise _JobStoppingError("not sent again after a 429: the job is stopping")
            await self._admit(department_uuid)  # a new slot
            if worker.stopping:
                raise _JobStoppingError("not sent again after a 429: the job is stopping")
        return await self._client.send(
            department_uuid, user_uuid, message, retry=retry, idempotency_key=idempotency_key
        )

    def ensure_open(self) -> None:
        self._client.ensure_open()

    def pause_remaining(self) -> float:
        # Stopping: nothing waits for the pause; what the batch then tries to
        # start (or to send again) is refused at once by ``send``.
        return 0.0 if self._worker.stopping else self._client.pause_remaining()

    async def wait_out_pause(self) -> None:
        wait = self.pause_remaining()
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._worker.stopped.wait(), wait)


async def _unless_stopped(wait: Coroutine[Any, Any, None], stopped: asyncio.Event) -> bool:
    """Await ``wait``, unless ``stopped`` is set first (``wait`` is then cancelled).

    Returns:
        Whether ``wait`` ended.
    """
    task = asyncio.ensure_future(wait)
    stop = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (task, stop):
            if not waiting.done():
                waiting.cancel()
        # Wait for the cancelled slot's cleanup (its department's turn) to run.
        await asyncio.gather(task, stop, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # re-raises what the wait raised
    return True


def _worker_main(fd: int) -> int:
    """A worker process's life: read its config, send, report, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    try:
        config: WorkerConfig = conn.recv()
    except (EOFError, OSError):
        return 1
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if config.use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        worker = _Worker(conn, config)
        runner.run(worker.run())
    conn.close()
    return 0 if worker.problem is None else 1


# -- the journal of a parallel run -------------------------------------------------


class JournalSet:
    """The journal of a job run by several workers: a main file and its segments.

    The main file (``path``, a ``FileJournal``) is locked for the whole run and
    keeps the header and a record per run (and, for a journal begun by a
    single-process run, that run's records). Worker ``w`` of run ``r`` writes
    ``<path>.part-<r>-<w>``. Reading combines them: within a run each item was
    started by at most one worker (an item is handed to another worker only if
    its first worker's segment shows no start), and a later run's record of an
    item wins over an earlier run's, except that a resend that settles nothing
    leaves an item in doubt with its old key.

    Args:
        path: The ``--journal`` file.
        redact: Applied to every string written.

    Raises:
        JournalError: another run holds the journal.
        OSError: it cannot be opened.
    """

    def __init__(self, path: str, *, redact: Callable[[str], str] | None = None) -> None:
        self.path = path
        self.main = FileJournal(path, redact=redact)
        self.run = 1
        self.state: JournalState | None = None
        self._sources: array.array[int] | None = None
        self._segments: list[tuple[int, str, JournalState]] = []

    @staticmethod
    def segments_of(path: str) -> list[tuple[int, int, str]]:
        """The segments of the journal at ``path``: ``(run, worker, file)``, in order."""
        found = []
        for name in glob.glob(glob.escape(path) + ".part-*"):
            match = _SEGMENT.search(name)
            if match is not None and name == path + match[0]:
                found.append((int(match[1]), int(match[2]), name))
        return sorted(found)

    def segment(self, worker: int) -> str:
        """The segment file of ``worker`` in this run."""
        return f"{self.path}.part-{self.run:04d}-{worker:04d}"

    def begin(
        self,
        *,
        fingerprint: str,
        items: int,
        window: int,
        resume: bool,
        options: Mapping[str, Any] | None = None,
        never_sent: Callable[[int], bool] | None = None,
    ) -> JournalState | None:
        """Start this run: read (with ``resume``) what every earlier run left.

        ``options`` go in the main journal's first record, as ``FileJournal.begin``
        writes them (the job's message options, for a later ``--resume``).
        ``never_sent`` is ``load``'s (the items no run sends: invalid rows), for
        the main journal and every segment: a torn tail's window does not count them.

        Returns:
            With ``resume``, the combined state (None when nothing was recorded).

        Raises:
            JournalError: corrupt, for another input, or stale segments
                without ``resume``.
        """
        segments = self.segments_of(self.path)
        if segments and not resume:
            self.main.discard()
            raise JournalError(
                f"{self.path}: segments of an earlier run exist ({segments[0][2]}...): "
                "pass --resume to continue it, or remove them"
            )
        main_state = self.main.begin(
            fingerprint=fingerprint,
            items=items,
            window=window,
            resume=resume,
            options=options,
            never_sent=never_sent,
        )
        if not resume:
            return None
        combined = JournalState(items)
        sources = array.array("i", [-1]) * items
        runs = array.array("i", [-1]) * items
        parts: list[tuple[int, str, JournalState]] = []
        if main_state is not None and main_state.has_header:
            parts.append((0, self.path, main_state))
        for run, _, name in segments:
            part = load(name, fingerprint=fingerprint, items=items, never_sent=never_sent)
            parts.append((run, name, part))
            self.run = max(self.run, run + 1)
        held: list[tuple[int, JournalState]] = []
        position = 0
        while position < len(parts):
            run = parts[position][0]
            group = []
            while position < len(parts) and parts[position][0] == run:
                group.append(position)
                position += 1
            self._merge_run(combined, sources, runs, parts, group)
            held.extend((run, parts[p][2]) for p in group if parts[p][2].torn)
        for run, part in held:
            for index in part.torn_in_doubt:
                if combined.states[index] in _FRESH and runs[index] <= run:
                    combined.states[index] = UNKNOWN
                    combined.in_doubt[index] = (None, TORN_NOTE)
                    combined.torn_in_doubt.append(index)
        # As load() says of one file: a torn tail was found (the caller warns of it).
        combined.torn = bool(held)
        self.state = combined
        self._sources = sources
        self._segments = parts
        return combined if parts else None

    @staticmethod
    def _merge_run(
        combined: JournalState,
        sources: array.array[int],
        runs: array.array[int],
        parts: list[tuple[int, str, JournalState]],
        group: list[int],
    ) -> None:
        # Item -> the part that speaks for it in this run: four bytes per item.
        best = array.array("i", [-1]) * combined.items
        for p in group:
            part = parts[p][2]
            torn = set(part.torn_in_doubt)
            states = part.states
            for index in range(part.items):
                state = states[index]
                if state == NEW or index in torn:
                    continue
                other = best[index]
                if other < 0 or parts[other][2].states[index] in _FRESH:
                    best[index] = p
        for index, p in enumerate(best):
            if p < 0:
                continue
            run, _, part = parts[p]
            new = part.states[index]
            previous = combined.states[index]
            runs[index] = run
            sources[index] = p
            if previous in IN_DOUBT_STATES and new in _FRESH:
                # A resend that settled nothing: still in doubt, under its old key.
                combined.states[index] = UNKNOWN
                continue
            combined.states[index] = new
            if new in IN_DOUBT_STATES:
                key, error = part.in_doubt.get(index, (None, None))
                if key is None and index in combined.in_doubt:
                    key = combined.in_doubt[index][0]
                combined.in_doubt[index] = (key, error)
            else:
                combined.in_doubt.pop(index, None)

    def finished_records(self) -> Iterator[dict[str, Any]]:
        """The outcome record of every item that needs no new send, once each."""
        assert self.state is not None
        assert self._sources is not None
        for p, (_, name, part) in enumerate(self._segments):
            for record in finished_records(name, part):
                index = record["i"]
                if self._sources[index] == p and self.state.states[index] in FINAL_STATES:
                    yield record

    def close(self) -> None:
        """Release the journal (the segments are the workers' to close)."""
        self.main.close()

    def discard(self) -> None:
        """Nothing was sent: undo this run's part of the main file."""
        self.main.discard()


# -- the parent --------------------------------------------------------------------


class WorkerPool:
    """Worker processes started ahead of their job, so that they load while the input is checked.

    A worker's start-up (the interpreter, aiohttp, uvloop and this package: about 0.3 s
    of CPU) then overlaps the parent's validation pass instead of delaying the first
    send. Each worker waits on its socket for the job's configuration; ``ParallelSend``
    takes the workers over when it runs. Closing the pool ends the workers it still
    holds (their sockets close: a worker finding its socket closed exits) and releases
    the shared state; a worker also exits when the parent dies.

    Args:
        count: Worker processes to start.
        env: Variables set in each worker's environment over this process's; one
            whose value is None is left out (a credential the workers get over
            their socket, not to be read in their ``/proc/<pid>/environ``).
    """

    def __init__(self, count: int, env: Mapping[str, str | None] | None = None) -> None:
        self._env = dict(os.environ)
        for name, value in (env or {}).items():
            if value is None:
                self._env.pop(name, None)
            else:
                self._env[name] = value
        self._spawned: list[tuple[subprocess.Popen[bytes], Connection]] = []
        #: The shared limiter's state (``ProcessRateLimiter``), zeroed.
        self.limiter_fd = ProcessRateLimiter.create()
        # The map of started items (used without a journal) gets its size, one byte
        # per item, once the input is counted: an empty file until then.
        with tempfile.TemporaryFile() as f:
            #: The map of started items, sized by the job (``ParallelSend.run``).
            self.started_fd = os.dup(f.fileno())
        self._closed = False
        try:
            # SIGINT is held while the workers start: each inherits the blocked mask
            # and drops a Ctrl-C of its start-up (``_WORKER_CODE``); here, one that
            # comes meanwhile is raised once every started worker is recorded, so
            # that the ``except`` below ends them all.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                for _ in range(count):
                    self._spawned.append(self._spawn())
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        """How many workers the pool holds (not yet taken by a job)."""
        return len(self._spawned)

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Connection]:
        ours, theirs = socket.socketpair()
        try:
            popen = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-c", _WORKER_CODE, str(theirs.fileno())],
                pass_fds=(theirs.fileno(), self.limiter_fd, self.started_fd),
                env=self._env,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return popen, Connection(ours.detach())

    def _hand_over(self) -> list[tuple[subprocess.Popen[bytes], Connection]]:
        """Hand the workers over to a job, which then ends them; the pool holds none after."""
        taken, self._spawned = self._spawned, []
        return taken

    def close(self) -> None:
        """End the workers not taken (they are waiting for a job) and release the shared state."""
        spawned, self._spawned = self._spawned, []
        for _, conn in spawned:
            with contextlib.suppress(OSError):
                conn.close()  # the worker's wait for its job ends: it exits
        deadline = time.monotonic() + 10
        for popen, _ in spawned:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(max(0.0, deadline - time.monotonic()))
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        if not self._closed:
            self._closed = True
            os.close(self.limiter_fd)
            os.close(self.started_fd)


@define(slots=True)
class _Process:
    number: int
    popen: subprocess.Popen[bytes]
    conn: Connection
    segment: str
    outstanding: dict[int, WorkItem] = field(factory=dict)
    wants: bool = False
    done: bool = False
    exited: bool = False
    retries: int = 0
    #: What its final report said may be incomplete (its journal segment), if anything.
    problem: str | None = None
    returned: list[WorkItem] = field(factory=list)
    #: Framed messages not yet taken by its socket (``ParallelSend._post``).
    out: bytearray = field(factory=bytearray)
    #: What its socket gave of messages not yet whole (``ParallelSend._receive``).
    inbox: bytearray = field(factory=bytearray)
    #: The socket again (a duplicate), for writes that never block.
    sock: socket.socket | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.sock is not None:
            self.sock.close()
        self.out.clear()


@define(slots=True)
class ParallelReport:
    """What a parallel send came to (this run's items).

    Attributes:
        counts: Items by outcome.
        retries: HTTP retries made.
        elapsed: Seconds from the first worker's start to the last one's end.
        stopped_by: Why the job stopped early (``"<Type>: <message>"``), if it did.
        worker_deaths: Workers that died before their end (killed, out of memory), or
            whose journal segment may be incomplete on disk: each says what it cost.
        not_started: Items left unsent by a stop on request (or with no worker left).
        results: The items' outcomes, as ``keep`` asked (in input order).
        late_exits: Workers that ended abnormally (a signal, a non-zero exit code)
            after their final report, which they send once their results are sent
            and their journal segment is on disk: no item or record is affected.
    """

    counts: Counts
    retries: int
    elapsed: float
    stopped_by: str | None
    worker_deaths: list[str]
    not_started: int
    results: list[ParallelItem]
    late_exits: list[str] = field(factory=list)


class ParallelSend:
    """The parent of a parallel send: hands out items, gathers results, owns the workers.

    Args:
        config: What every worker needs (its ``segment`` and ``limiter_fd`` are
            filled in here).
        items: The items to send, read lazily; their keys must differ (a worker
            tells its items apart by their keys).
        workers: How many worker processes.
        on_result: Called with each item's outcome as it becomes known.
        journal: The job's journal, or None (segments then go to a temporary
            directory, to know what a dead worker had started).
        worker_env: Environment variables to set for the workers (None: left out).
        on_tick: Called every ``tick_interval`` seconds while the job runs
            (progress reports), results or not.
        tick_interval: Seconds between ``on_tick`` calls.

    Raises:
        InvalidRequestError: a bad number of workers or option of ``config``, before
            any worker is given the job.
    """

    def __init__(
        self,
        config: WorkerConfig,
        items: Iterable[WorkItem],
        *,
        workers: int,
        on_result: Callable[[ParallelItem], object],
        journal: JournalSet | None = None,
        worker_env: Mapping[str, str | None] | None = None,
        on_tick: Callable[[], object] | None = None,
        tick_interval: float = 10.0,
        pool: WorkerPool | None = None,
    ) -> None:
        # Checked here, where the error reaches the caller: a worker meets a bad option
        # only once it runs, and hands its items back unsent (or sends at no limit).
        check_workers(workers)
        BatchOptions(
            concurrency=config.concurrency,
            retry=config.retry,
            stop_after_consecutive_failures=config.stop_after_consecutive_failures,
            max_pause=config.max_pause,
        )
        check_rate("rate_limit", config.rate_limit)
        check_rate("per_department_rate_limit", config.per_department_rate_limit)
        self._config = config
        self._pool = pool
        self._on_tick = on_tick
        self._tick_interval = tick_interval
        self._items = iter(items)
        self._workers = workers
        self._on_result = on_result
        self._journal = journal
        self._env = dict(worker_env or {})
        self._route = config.per_department_rate_limit is not None
        self._backlog: collections.deque[WorkItem] = collections.deque()
        self._routed: dict[int, collections.deque[WorkItem]] = {}
        self._owner: dict[str, int] = {}
        self._input_done = False
        #: What reading ``items`` raised: ``run`` raises it once the workers are done.
        self.input_error: Exception | None = None
        self._processes: list[_Process] = []
        self.stopped_by: str | None = None
        self.stop_requested = False
        self.abandoned = False
        self.worker_deaths: list[str] = []
        self.late_exits: list[str] = []
        self.counts = {o.value: 0 for o in Outcome}
        self.not_started = 0
        self._started_fd = -1
        self._started: mmap.mmap | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector: selectors.BaseSelector | None = None

    def _chunk(self) -> int:
        # Chunks of up to a few hundred items keep the pipes quiet; near the end
        # of a short input they shrink, so that every worker gets its share.
        return max(1, min(256, self._config.concurrency * 2))

    def request_stop(self) -> None:
        """Start no new item anywhere; let those in flight finish (signal-safe)."""
        self.stop_requested = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"s")

    def abandon(self) -> None:
        """Cancel every send in flight (their outcome unknown) and end (signal-safe)."""
        self.abandoned = True
        self.stop_requested = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"a")

    # -- items --------------------------------------------------------------------

    def _next_input(self) -> WorkItem | None:
        if self._input_done or self.stop_requested or self.stopped_by is not None:
            return None
        try:
            item = next(self._items, None)
        except Exception as exc:
            # Read no more; what the workers hold is sent and reported, then ``run``
            # raises it (raised now, it would abandon their sends in flight: unknown).
            self.input_error = exc
            item = None
        if item is None:
            self._input_done = True
        return item

    def _live(self) -> list[_Process]:
        return [p for p in self._processes if not p.exited and not p.done]

    def _owner_of(self, department: str) -> _Process | None:
        number = self._owner.get(department)
        live = {p.number: p for p in self._live()}
        if number in live:
            return live[number]
        if not live:
            return None
        chosen = min(
            live.values(),
            key=lambda p: len(p.outstanding) + len(self._routed.get(p.number, ())),
        )
        self._owner[department] = chosen.number
        return chosen

    def _take(self, process: _Process) -> list[WorkItem]:
        """Up to a chunk of items for ``process``."""
        size = self._chunk()
        chunk: list[WorkItem] = []
        if not self._route:
            while self._backlog and len(chunk) < size:
                chunk.append(self._backlog.popleft())
            while len(chunk) < size and (pulled := self._next_input()) is not None:
                chunk.append(pulled)
            return chunk
        mine = self._routed.setdefault(process.number, collections.deque())
        # Read ahead, routing each item to its department's worker, until this
        # worker has a chunk or the read-ahead is at its bound.
        bound = size * max(1, len(self._processes)) * 4
        while len(mine) < size:
            if self._backlog:
                item: WorkItem | None = self._backlog.popleft()
            else:
                if sum(len(q) for q in self._routed.values()) >= bound:
                    break
                item = self._next_input()
            if item is None:
                break
            owner = self._owner_of(item.department_uuid)
            if owner is None:
                self._backlog.appendleft(item)
                break
            self._routed.setdefault(owner.number, collections.deque()).append(item)
        while mine and len(chunk) < size:
            chunk.append(mine.popleft())
        return chunk

    def _serve(self) -> None:
        """Give work to every worker that asked for it, or tell it there is none."""
        for process in self._live():
            if not process.wants:
                continue
            chunk = self._take(process)
            if chunk:
                process.wants = False
                for item in chunk:
                    process.outstanding[item.index] = item
                self._post(process, ("items", [_to_wire(item) for item in chunk]))
            elif self._exhausted():
                process.wants = False
                self._post(process, ("end",))

    @property
    def retries(self) -> int:
        """Retries the workers reported as they ended (also when ``run`` raised)."""
        return sum(p.retries for p in self._processes)

    @property
    def held(self) -> int:
        """How many items live workers hold (handed out, not yet reported), in flight or queued."""
        return sum(len(p.outstanding) for p in self._live())

    def _exhausted(self) -> bool:
        if self.stop_requested or self.stopped_by is not None:
            return True
        routed = any(self._routed.values())
        # While a worker holds items, it may die and give some back: the others
        # wait for them rather than end. A worker that reported its end (a SIGTERM of
        # its own) holds those it gave back until it exits: they are handed out then.
        held = any(p.outstanding or p.returned for p in self._processes if not p.exited)
        return self._input_done and not self._backlog and not routed and not held

    def _post(self, process: _Process, message: tuple[Any, ...]) -> None:
        """Queue ``message`` for ``process`` and write what its socket takes now.

        Never blocks: a worker writes its results with blocking sends, so a parent
        blocked writing it a chunk (larger than the socket holds) while the worker
        is blocked writing results (larger than that too) would wait for each other
        forever. What the socket does not take is written as it drains (``_loop``).
        """
        if process.exited:
            return
        if process.sock is None:  # no descriptor left for the duplicate: a blocking send
            with contextlib.suppress(OSError):
                process.conn.send(message)
            return
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        # ``Connection``'s framing, which the worker's ``recv`` reads.
        size = len(data)
        if size > 0x7FFFFFFF:
            process.out += struct.pack("!i", -1) + struct.pack("!Q", size)
        else:
            process.out += struct.pack("!i", size)
        process.out += data
        self._write(process)

    def _write(self, process: _Process) -> None:
        """Write as much of ``process``'s queued output as its socket takes, unblocked."""
        out = process.out
        sock = process.sock
        assert sock is not None
        try:
            while out:
                del out[: sock.send(out, socket.MSG_DONTWAIT)]
        except BlockingIOError:
            pass
        except OSError:
            # It died: its end is handled when its socket reports EOF.
            out.clear()
        if self._selector is not None and self._selector.get_map() is not None:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0)
            with contextlib.suppress(KeyError, ValueError):
                key = self._selector.get_key(process.conn.fileno())
                if key.events != events:
                    self._selector.modify(process.conn.fileno(), events, process)

    # -- results ------------------------------------------------------------------

    def _emit(self, item: ParallelItem) -> None:
        self.counts[item.outcome] += 1
        self._on_result(item)

    def _on_message(self, process: _Process, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "more":
            process.wants = True
        elif kind == "results":
            outstanding = process.outstanding
            for index, outcome, message_uuid, error, attempts, journal_error in message[1]:
                item = outstanding.pop(index, None)
                if item is None:
                    continue  # not an item it holds (cannot happen): nothing to report
                self._emit(
                    ParallelItem(
                        index,
                        item.department_uuid,
                        item.user_uuid,
                        outcome,
                        message_uuid,
                        error,
                        item.key,
                        attempts,
                        journal_error,
                    )
                )
        elif kind == "stopped":
            if self.stopped_by is None:
                self.stopped_by = message[1]
                for other in self._live():
                    self._post(other, ("stop",))
        elif kind == "done":
            process.done = True
            process.retries = message[1]
            process.problem = message[3]
            for item in map(_from_wire, message[2]):
                if process.outstanding.pop(item.index, None) is not None:
                    process.returned.append(item)

    def _reconcile(self, process: _Process) -> None:
        """Account for the items a worker held when it ended: from its segment."""
        left = dict(process.outstanding)
        process.outstanding.clear()
        for item in process.returned:
            left.setdefault(item.index, item)
        process.returned.clear()
        if not left:
            return
        if self._started is not None:
            unstarted = []
            for index, item in sorted(left.items()):
                if self._started[index]:
                    self._emit(self._unknown(item, WORKER_DIED_NOTE))
                else:
                    unstarted.append(item)  # its key was never used
            self._requeue(unstarted)
            return
        if not os.path.exists(process.segment):
            self._requeue(list(left.values()))  # it died before it could start any
            return
        try:
            state = load(
                process.segment, fingerprint=self._config.fingerprint, items=self._config.items
            )
        except JournalError as exc:
            # Unreadable: any of its items may have started.
            for _, item in sorted(left.items()):
                self._emit(self._unknown(item, f"{WORKER_DIED_NOTE} ({exc})"))
            return
        if not state.has_header:
            # It wrote nothing (died at birth): none of its items started.
            self._requeue(list(left.values()))
            return
        torn = set(state.torn_in_doubt)
        for record in finished_records(process.segment, state):
            if record["i"] in left:
                item = left.pop(record["i"])
                error = record.get("e")
                self._emit(
                    ParallelItem(
                        item.index,
                        item.department_uuid,
                        item.user_uuid,
                        record["o"],
                        record.get("m"),
                        _error_from_text(error, "BotMessageError"),
                        item.key,
                        journal_error=error,
                        from_journal=True,
                    )
                )
        again: list[WorkItem] = []
        for index, item in sorted(left.items()):
            st = state.states[index]
            if st in IN_DOUBT_STATES or index in torn:
                recorded = state.in_doubt.get(index, (None, None))[1]
                self._emit(self._unknown(item, recorded or WORKER_DIED_NOTE))
            elif st == NEW or item.in_doubt:
                again.append(item)  # never started: its key was never used
            else:
                # Started, and certainly not delivered: sent again with a new key.
                again.append(
                    WorkItem(
                        item.index,
                        item.department_uuid,
                        item.user_uuid,
                        item.message,
                        new_idempotency_key(),
                    )
                )
        self._requeue(again)

    @staticmethod
    def _unknown(item: WorkItem, why: str) -> ParallelItem:
        return ParallelItem(
            item.index,
            item.department_uuid,
            item.user_uuid,
            "unknown",
            None,
            _error_from_text(why, "DeliveryUnknownError"),
            item.key,
            journal_error=why,
            from_journal=True,
        )

    def _requeue(self, items: list[WorkItem]) -> None:
        if self.stopped_by is not None:
            for item in items:
                self._skip(item)
        elif self.stop_requested:
            self.not_started += len(items)
        else:
            self._backlog.extendleft(reversed(items))

    def _skip(self, item: WorkItem) -> None:
        text = f"not attempted: the batch stopped after: {self.stopped_by}"
        # The journal's rule, as a worker applies it to an item it skips: an item an
        # earlier run may have delivered stays unknown (its key kept), never "skipped".
        outcome, note = settle(Outcome.SKIPPED, None, in_doubt=item.in_doubt)
        if note is not None:
            text = f"{note}; this run's resend: {text}"
        self._emit(
            ParallelItem(
                item.index,
                item.department_uuid,
                item.user_uuid,
                outcome.value,
                None,
                {"type": "BatchStoppedError", "message": text, "status": None},
                item.key,
                journal_error=text,
            )
        )

    # -- processes ----------------------------------------------------------------

    def _start(
        self,
        number: int,
        popen: subprocess.Popen[bytes],
        conn: Connection,
        segment: str,
        limiter_fd: int,
    ) -> _Process:
        """Give a started worker its configuration: from then on it works on this job."""
        # It died before it was given the job: its end is handled when its socket says so.
        with contextlib.suppress(OSError):
            conn.send(
                evolve(
                    self._config,
                    segment=segment,
                    started_fd=self._started_fd,
                    limiter_fd=limiter_fd,
                )
            )
        process = _Process(number, popen, conn, segment)
        with contextlib.suppress(OSError):
            process.sock = socket.socket(fileno=os.dup(conn.fileno()))
        return process

    def _ended(self, process: _Process) -> None:
        process.exited = True
        # Items routed to it and not yet handed over go to their departments' new owners.
        self._backlog.extendleft(reversed(self._routed.pop(process.number, ())))
        process.close()
        code = process.popen.wait()
        name = f"worker {process.number} (pid {process.popen.pid})"
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if not process.done:
            self.worker_deaths.append(
                f"{name} died: {how}; its items in flight are unknown, the others were resent"
            )
        elif process.problem is not None:
            self.worker_deaths.append(f"{name} {process.problem}")
        elif code:
            # After its final report: its results came and its segment was closed
            # (fsynced) before it, so nothing it owned is incomplete; said, not hidden.
            self.late_exits.append(
                f"{name} ended with {how} after its final report; its results and "
                "journal segment were complete by then: no outcome is affected"
            )
        self._reconcile(process)

    def run(self) -> ParallelReport:
        """Run the job to its end; return its report. Every worker has exited on return.

        Raises:
            Exception: what reading the items raised; no item is handed out after
                it, and the items the workers held were sent and reported first.
        """
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            pool = self._pool
            if pool is None or pool.size != self._workers:
                if pool is not None:
                    pool.close()
                pool = WorkerPool(self._workers, self._env)
                stack.callback(pool.close)
            stack.callback(self._wake_r.close)
            stack.callback(self._wake_w.close)
            if self._journal is not None:
                segment_of: Callable[[int], str] = self._journal.segment
            else:
                segment_of = str  # unused: the workers mark starts in a shared map
                self._started_fd = pool.started_fd
                os.ftruncate(self._started_fd, max(1, self._config.items))  # sparse zeros
                self._started = mmap.mmap(self._started_fd, max(1, self._config.items))
                stack.callback(self._started.close)
            stack.callback(self._reap)
            for number, (popen, conn) in enumerate(pool._hand_over()):
                self._processes.append(
                    self._start(number, popen, conn, segment_of(number), pool.limiter_fd)
                )
            self._loop()
        retries = self.retries
        # Items never handed out when a stop came: not started.
        if self.stopped_by is not None:
            for item in self._leftovers():
                self._skip(item)
        else:
            self.not_started += sum(1 for _ in self._leftovers())
        if self.input_error is not None:
            # After the leftovers: items read before it failed (read ahead for a
            # department's worker) are reported like any others a stop left.
            raise self.input_error
        c = self.counts
        return ParallelReport(
            counts=Counts(c["sent"], c["failed"], c["unknown"], c["skipped"]),
            retries=retries,
            elapsed=time.perf_counter() - started,
            stopped_by=self.stopped_by,
            worker_deaths=self.worker_deaths,
            not_started=self.not_started,
            results=[],
            late_exits=self.late_exits,
        )

    def _leftovers(self) -> Iterator[WorkItem]:
        yield from self._backlog
        self._backlog.clear()
        for queue in self._routed.values():
            yield from queue
            queue.clear()
        if not self._input_done and (self.stopped_by is not None or not self.stop_requested):
            # Refused credentials and the like: the rest of the input is SKIPPED, as
            # in a single-process batch (a stop on request leaves it unread). With no
            # worker left (every one died), the rest is not started: it is counted
            # too, so that each item is reported or counted, none lost.
            self._input_done = True
            yield from self._items

    def _loop(self) -> None:
        stop_sent = abandon_sent = False
        # One selector for the whole run: multiprocessing.connection.wait builds a
        # new one per call, tens of microseconds a message.
        next_tick = time.monotonic() + self._tick_interval
        timeout: float | None = None
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            for process in self._processes:
                selector.register(process.conn.fileno(), selectors.EVENT_READ, process)
            # For _post's writes that wait for the socket; closed with the loop.
            self._selector = selector
            while any(not p.exited for p in self._processes):
                if self.stop_requested and not stop_sent:
                    stop_sent = True
                    for p in self._processes:
                        self._post(p, ("stop",))
                if self.abandoned and not abandon_sent:
                    abandon_sent = True
                    for p in self._processes:
                        self._post(p, ("abandon",))
                if self._on_tick is not None:
                    now = time.monotonic()
                    if now >= next_tick:
                        next_tick = now + self._tick_interval
                        self._on_tick()
                    timeout = max(0.0, next_tick - now)
                for key, events in selector.select(timeout):
                    process = key.data
                    if process is None:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(64)
                        continue
                    if events & selectors.EVENT_WRITE:
                        self._write(process)
                    if not events & selectors.EVENT_READ:
                        continue
                    messages, closed = self._receive(process)
                    # Outside ``_receive``: an error of ``on_result`` (an --out that cannot
                    # be written) is no sign of the worker's end.
                    for message in messages:
                        self._on_message(process, message)
                    if closed:
                        selector.unregister(key.fd)
                        self._ended(process)
                self._serve()

    def _receive(self, process: _Process) -> tuple[list[tuple[Any, ...]], bool]:
        """The whole messages ``process``'s socket holds now, and whether it is closed.

        Never blocks: a worker stopped (SIGSTOP) half-way through writing a message
        would otherwise hold the parent in its read, and with it every other worker
        and the signals' stop. A message cut short by the worker's death is dropped
        (its segment tells what became of its items); one that does not unpickle, or
        a frame's size that cannot be, ends the worker as a death: it is killed.
        """
        sock = process.sock
        if sock is None:  # no descriptor left for the duplicate: a blocking read
            try:
                return [process.conn.recv()], False
            except (EOFError, OSError):
                return [], True
        inbox = process.inbox
        closed = False
        try:
            # 64 KiB: a larger buffer is above glibc's mmap threshold, mapped and
            # unmapped on every read (see _http's _READ_SIZE); a longer message
            # takes several reads, the selector reporting the rest.
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data is not None:
            if data:
                inbox += data
            else:
                closed = True
        messages: list[tuple[Any, ...]] = []
        while len(inbox) >= 4:
            # ``Connection``'s framing, which the worker's ``send`` writes.
            (size,) = struct.unpack_from("!i", inbox)
            head = 4
            if size == -1:
                if len(inbox) < 12:
                    break
                (size,) = struct.unpack_from("!Q", inbox, 4)
                head = 12
            if size < 0:
                return messages, self._garbled(process)
            if len(inbox) < head + size:
                break
            frame = bytes(inbox[head : head + size])
            del inbox[: head + size]
            try:
                message = pickle.loads(frame)  # noqa: S301 - our own worker's message
            except Exception:
                return messages, self._garbled(process)
            if not isinstance(message, tuple) or not message:
                return messages, self._garbled(process)
            messages.append(message)
        return messages, closed

    @staticmethod
    def _garbled(process: _Process) -> bool:
        """A worker's message made no sense: it is killed, and ends as a death."""
        process.inbox.clear()
        with contextlib.suppress(OSError):
            process.popen.kill()
        return True

    def _reap(self) -> None:
        """No worker outlives the job: those still running are told to stop, then killed."""
        for process in self._processes:
            if process.popen.poll() is None:
                self._post(process, ("abandon",))
        deadline = time.monotonic() + 10
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(max(0.0, deadline - time.monotonic()))
            if process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait()
            if not process.exited:
                process.exited = True
                process.close()


def send_parallel(
    items: Iterable[SendRequest | tuple[str, str, str | TextMessage]],
    *,
    base_url: str,
    username: str,
    password: str,
    workers: int = 2,
    concurrency: int = 64,
    rate_limit: float | None = None,
    per_department_rate_limit: float | None = None,
    keep: str = "all",
    allow_insecure_http: bool = False,
) -> ParallelReport:
    """Send many messages from ``workers`` processes, as one job; block until done.

    The parent (this process) hands the items out in chunks to worker processes,
    each with its own event loop and client; ``rate_limit`` is one limit across
    all of them, ``per_department_rate_limit`` is exact (each department goes to
    one worker), a 429's pause and refused credentials stop them all. Call it
    from a script's main code (not inside a running event loop: it blocks).

    Args:
        items: ``SendRequest``s or ``(department_uuid, user_uuid, message)`` tuples.
        base_url: The URL before ``/communications``.
        username: Basic-auth user name.
        password: Basic-auth password (sent to the workers over their socket).
        workers: Worker processes (``usable_cores()`` for one per core).
        concurrency: Sends in flight per worker.
        rate_limit: Most messages per second in all.
        per_department_rate_limit: Most messages per second to one department.
        keep: Which results to keep in the report: ``"all"``, ``"failures"``, ``"none"``.
        allow_insecure_http: Permit ``http://`` to a host that is not loopback.

    Returns:
        A ``ParallelReport`` (counts as ``BatchReport``'s; results in input order).

    Raises:
        InvalidRequestError: a bad option or item (two items with one idempotency
            key among them), before anything is sent.
    """
    check_workers(workers)
    if keep not in ("all", "failures", "none"):
        raise InvalidRequestError("keep", keep, "must be 'all', 'failures' or 'none'")
    BatchOptions(
        concurrency=concurrency,
        rate_limit=rate_limit,
        per_department_rate_limit=per_department_rate_limit,
    )
    # Checked here, where the error reaches the caller, not in a worker.
    BotMessageClient(base_url, username, password, allow_insecure_http=allow_insecure_http)

    # Held in memory (the CLI streams its file instead): a worker's segment is
    # sized by the number of items, to tell after its death what it had started.
    work: list[WorkItem] = []
    # A worker tells its items apart by their keys: a key given twice would mix up
    # two messages' start records (one key names one message; the CLI refuses it too).
    keys: dict[str, int] = {}
    for index, raw in enumerate(items):
        if isinstance(raw, SendRequest):
            request = raw
        elif isinstance(raw, tuple) and len(raw) == 3:
            request = SendRequest(raw[0], raw[1], raw[2])
        else:
            raise InvalidRequestError(
                "item",
                raw,
                "must be a SendRequest or a (department_uuid, user_uuid, message) tuple",
            )
        key = request.idempotency_key
        if key:
            first = keys.setdefault(key, index)
            if first != index:
                raise InvalidRequestError(
                    "idempotency_key",
                    key,
                    f"item {index} repeats the key of item {first}; one key names one "
                    "message (nothing was sent)",
                )
        work.append(
            WorkItem(
                index,
                str(request.department_uuid),
                str(request.user_uuid),
                request.message,
                key or new_idempotency_key(),
            )
        )

    kept: list[ParallelItem] = []

    def on_result(item: ParallelItem) -> None:
        if keep == "all" or (keep == "failures" and item.outcome != "sent"):
            kept.append(item)

    config = WorkerConfig(
        base_url=base_url,
        username=username,
        password=password,
        allow_insecure_http=allow_insecure_http,
        concurrency=concurrency,
        rate_limit=rate_limit,
        per_department_rate_limit=per_department_rate_limit,
        fingerprint="send_parallel",
        items=len(work),
    )
    job = ParallelSend(config, work, workers=workers, on_result=on_result)
    report = job.run()
    kept.sort(key=lambda r: r.index)
    report.results = kept
    return report
