"""Crash-safe progress of a bulk send: the ``botmsg send-many --journal`` file.

A library module: ``botmsg send-many`` uses it, and so can any bulk job that must
survive a crash without sending a message twice. What a job needs from a journal
is the ``JournalStore`` protocol; ``FileJournal`` (a JSON-lines file) is its first
implementation. The rules for what to record come from the SDK's delivery rules:
``settle`` (what became of an item resent while in doubt) and ``retry_later``
(which failures a resumed run sends again, under a new key).

The file journal is JSON lines, appended with one ``os.write`` per record on an
``O_APPEND`` descriptor, so a record is in the operating system's hands (and
survives ``kill -9``) before the next step happens. The first record says which
input it belongs to; then, per item::

    {"i": 17, "s": "start", "key": "<idempotency key>"}          before the first attempt
    {"i": 17, "o": "sent", "m": "<message uuid>", ...}            as soon as the answer is known
    {"i": 17, "o": "failed", "retry": false, "e": "<why>", ...}   not delivered
    {"i": 17, "o": "unknown", "e": "<why>", ...}                  may or may not have been delivered
    {"i": 17, "o": "skipped"}                                     pulled but never attempted

The first record also holds ``"window"``: how many start records the run could
lose at once (its ``--concurrency``; 0 with ``--durable``), and, from format
version 2 on, ``"options"``: what the run was given that shapes its messages
(``botmsg send-many`` records ``format``, ``text``, ``subject``, ``sender_name``
and ``ignore_columns``), so that a resumed run can take them from the journal
(``read_options``). A version 1 journal has only the input's fingerprint, which
covers the same options as a hash. Each resumed run
appends ``{"resume": 1, "window": W}``. ``{"i": 17, "o": "skipped", "attempted":
false}`` withdraws a start record written ahead of an attempt that never came
(``--durable``); ``{"i": 17, "o": "unknown", "e": "<why>"}`` without a key marks an
item held back after a torn tail (below).

An item with a ``start`` and no outcome was in flight when the process died: it
may or may not have been delivered. A run with ``--resume`` reports such items
as unknown and never sends them again unless told to (``--resend-unknown``, with
the same idempotency key). ``"retry": true`` marks a failure that certainly did
not deliver the message and may succeed later (throttling, a transient FAILURE,
no connection): a resumed run sends those again, with a new key. An item in
doubt that a ``--resend-unknown`` run sends again stays in doubt unless that
send settles it (sent, or a failure that is not ``"retry": true``).

Records are handed to the OS one by one, but fsynced only at the end, so a
power cut (unlike a crash) can lose the journal's last seconds. A torn last
record shows such a loss; ``load`` then holds back, as unknown and never to be
sent again, the items the last run may have started without a surviving start
record: the items it had pulled without any record, and the next ``window``
items it would have pulled after its highest started one. More lost records
than that go unnoticed: only ``--durable`` (every start record fsynced before
its send) makes the journal safe against power cuts.

Reading the journal costs two bytes per input item plus the in-doubt items, so a
resumed run over ten million rows needs about ten megabytes; the records of
finished items are streamed from the file again when ``--out`` needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, Protocol

# A library module may use the private delivery rules; the CLI asks this module.
from ._delivery import may_resend, settles_doubt
from ._errors import BotMessageError
from ._models import Outcome

__all__ = [
    "DEFAULT_WINDOW",
    "FAILED",
    "FINAL_STATES",
    "FORMAT_VERSION",
    "IN_DOUBT_NOTE",
    "IN_DOUBT_STATES",
    "NEW",
    "RETRY",
    "SENT",
    "SKIPPED",
    "STARTED",
    "TORN_NOTE",
    "UNKNOWN",
    "FileJournal",
    "JournalError",
    "JournalState",
    "JournalStore",
    "finished_records",
    "flush_failure",
    "load",
    "read_options",
    "retry_later",
    "settle",
]

#: The version written with options. 2 adds ``"options"`` to the first record; a
#: journal begun without options is written as version 1, and both are read.
FORMAT_VERSION: Final = 2
#: The versions ``load`` reads.
_READ_VERSIONS: Final = frozenset({1, 2})
#: The window of journals written before it was recorded (the largest default concurrency).
DEFAULT_WINDOW: Final = 64
#: Why an item held back after a torn tail is unknown.
TORN_NOTE: Final = (
    "the journal's end was lost (a power cut?) while this item may have been in flight: "
    "it may or may not have been delivered, and with no idempotency key on record it "
    "cannot be resent safely (not even with --resend-unknown); check it by hand"
)
#: Why an item an earlier run left in doubt is still unknown.
IN_DOUBT_NOTE: Final = (
    "in flight when an earlier run stopped: it may or may not have been delivered "
    "(--resume --resend-unknown sends it again with the same idempotency key)"
)

# One byte per item: what the journal says became of it.
NEW: Final = 0  #: Never pulled.
STARTED: Final = 1  #: Started with no outcome (in flight when the process died).
SENT: Final = 2  #: Delivered.
FAILED: Final = 3  #: Not delivered, and sending it again would fail the same way.
RETRY: Final = 4  #: Not delivered, may succeed if sent again.
UNKNOWN: Final = 5  #: May or may not have been delivered.
SKIPPED: Final = 6  #: Pulled but never attempted (the batch had stopped).

#: States whose item needs no new send on resume, and whose record ``--out`` repeats.
FINAL_STATES: Final = frozenset({SENT, FAILED})
#: States whose delivery is in doubt.
IN_DOUBT_STATES: Final = frozenset({STARTED, UNKNOWN})
#: States whose item a run sends with a new key: what a lost start record may hide.
_FRESH_STATES: Final = frozenset({NEW, RETRY, SKIPPED})

_OUTCOME_STATES: Final = {"sent": SENT, "unknown": UNKNOWN, "skipped": SKIPPED}
# json's C scanner recurses per nesting level: a garbled line of ``[[[[...`` raises
# RecursionError, which is a line that is not a record like any other.
_NOT_JSON: Final = (ValueError, RecursionError)


class JournalError(BotMessageError):
    """The journal cannot be used: missing, corrupt, in use, or written for another input.

    A ``BotMessageError``, as every error from reading outside data is: a program
    that catches the package's errors catches a corrupt journal's too.
    """


def settle(
    outcome: Outcome, error: BotMessageError | None, *, in_doubt: bool
) -> tuple[Outcome, str | None]:
    """The outcome to record for an item's send, and a note when it stays in doubt.

    An item resent because an earlier run may have delivered it stays
    unknown unless this resend settles it: SENT (a deduplicating service
    answers the earlier delivery), or a final FAILURE answer (the service
    processed the message and refused it, as it would have the first time).
    Anything else proves nothing about the earlier attempt: a retryable
    failure, a skip, an HTTP error (a 409 may well mean "key already used",
    a 404 a wrong base URL this time). Recording it as failed would let a
    later resumed run send the item under a new key.

    Args:
        outcome: What this send came to.
        error: Its error, if any.
        in_doubt: Whether an earlier run may have delivered the item (it is
            resent with the key it had then).

    Returns:
        The outcome to record, and ``IN_DOUBT_NOTE`` when the send left the item
        in doubt (``outcome`` was not UNKNOWN, and is recorded as UNKNOWN), else None.
    """
    if in_doubt and outcome is not Outcome.UNKNOWN and not settles_doubt(outcome, error):
        return Outcome.UNKNOWN, IN_DOUBT_NOTE
    return outcome, None


def retry_later(outcome: Outcome, error: BotMessageError | None) -> bool:
    """Whether a resumed run sends the item again, under a new key (``"retry": true``).

    Only a FAILED item whose error proves the message was not delivered and
    that may get through later (throttling, a transient FAILURE, no connection):
    the delivery rule ``may_resend``.

    Args:
        outcome: The outcome recorded (after ``settle``).
        error: The send's error, if any.
    """
    return outcome is Outcome.FAILED and may_resend(error)


class JournalStore(Protocol):
    """What a bulk send needs from a journal: a record per step, and what earlier runs left.

    A store is locked to one run from its creation (two runs on one journal
    would both send its open items) until ``close`` or ``discard``. Records are
    appended: each must be safe (survive a crash of the process) before the
    method returns, except that start records may wait for ``sync``.
    ``FileJournal`` is the implementation for a local file.
    """

    def begin(
        self,
        *,
        fingerprint: str,
        items: int,
        window: int,
        resume: bool,
        options: Mapping[str, object] | None = None,
    ) -> JournalState | None:
        """Start this run's part of the journal.

        Args:
            fingerprint: The input's identity; a journal belongs to one.
            items: The input's number of items.
            window: How many start records this run may lose at once (its
                concurrency; 0 when each is synced before its send).
            resume: Continue the journal's earlier runs.
            options: JSON-able options of the job, recorded in the first record
                when this run writes it (``read_options`` gives them back).

        Returns:
            With ``resume``, what the earlier runs left (None when they left nothing).

        Raises:
            JournalError: the journal is corrupt, for another input, or (without
                ``resume``) already holds records.
            OSError: it cannot be read or written.
        """
        ...

    def finished_records(self, state: JournalState) -> Iterator[dict[str, Any]]:
        """The outcome record of every item that needs no new send (sent or failed)."""
        ...

    def start(self, index: int, key: str) -> None:
        """Record that item ``index`` is about to be sent with idempotency ``key``."""
        ...

    def unattempted(self, index: int) -> None:
        """Withdraw the start record of item ``index``: it was never attempted."""
        ...

    def outcome(
        self,
        index: int,
        outcome: str,
        *,
        key: str | None,
        department_uuid: str,
        user_uuid: str,
        message_uuid: str | None = None,
        error: str | None = None,
        retry: bool = False,
    ) -> None:
        """Record the outcome of item ``index``: sent, failed, unknown or skipped."""
        ...

    async def sync(self) -> None:
        """Make every record so far safe against a power cut, without blocking the loop."""
        ...

    def discard(self) -> None:
        """Undo this run's records (nothing was sent) and release the journal."""
        ...

    def close(self) -> None:
        """Make every record safe and release the journal; a second call does nothing."""
        ...


def flush_failure(subject: str, error: OSError) -> str:
    """What a journal file whose final fsync failed risks, for an error line.

    Its records were all handed to the OS (a crash of the process loses none of
    them), but the disk may not hold them: a power cut could take a start record,
    and a resumed run would then send that item again, under a new key. The
    ``--workers`` report and the single-process run say it in these words.

    Args:
        subject: The file, as the sentence names it (``"the journal PATH"``).
        error: What the fsync (or close) raised.
    """
    reason = error.strerror or str(error)
    return (
        f"could not flush {subject} to disk ({reason}): the outcomes reported stand, "
        "but it may lack records after a power cut, and a --resume from it could "
        "therefore send an item again"
    )


def _fsync(fd: int, path: str) -> None:
    """``os.fsync(fd)``; its error names ``path``, as a refused write's does."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None


def _lock(fd: int, path: str) -> None:
    if sys.platform == "win32":  # pragma: no cover - no flock; the README says one run at a time
        return
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise JournalError(
            f"{path}: in use by another botmsg run; running both would send messages twice"
        ) from None


def _state_of(record: dict[str, Any]) -> int | None:
    """The state an outcome record stands for, or None when it is no outcome record."""
    outcome = record.get("o")
    if outcome == "failed":
        return RETRY if record.get("retry") is True else FAILED
    if isinstance(outcome, str):
        return _OUTCOME_STATES.get(outcome)
    return None


class JournalState:
    """What an existing journal says about every item of its input.

    Attributes:
        items: Number of items of the input the journal was written for.
        states: One state byte per item (``NEW``, ``SENT``, ...).
        in_doubt: For each item whose state is ``STARTED`` or ``UNKNOWN``: its
            idempotency key (None for an item held back after a torn tail: it
            cannot be resent) and the error recorded, if any.
        resent: Items started again while in doubt, whose last start has no
            outcome yet that settles the doubt.
        valid_bytes: Length of the journal up to its last complete record; a torn
            tail beyond it is overwritten by the next run's first records.
        has_header: Whether the journal has its first record; an empty journal
            (killed before writing it) has nothing to resume.
        torn: Whether a torn last record was found (and ignored).
        torn_in_doubt: The items held back because of it (now ``UNKNOWN``, no
            key); the caller records them, since the torn record that revealed
            the loss is about to be overwritten.
    """

    def __init__(self, items: int) -> None:
        self.items = items
        self.states = bytearray(items)
        self.in_doubt: dict[int, tuple[str | None, str | None]] = {}
        self.resent: set[int] = set()
        self.valid_bytes = 0
        self.has_header = False
        self.torn = False
        self.torn_in_doubt: list[int] = []
        # The last run's part of the journal: its window, its highest started
        # item, and which items it wrote any record for.
        self._window = DEFAULT_WINDOW
        self._run_high = -1
        self._run_seen = bytearray(items)

    def count(self, state: int) -> int:
        """How many items are in ``state``."""
        return self.states.count(state)


def _parse_line(raw: bytes, lineno: int, path: str) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except _NOT_JSON:
        raise JournalError(f"{path}:{lineno}: not a JSON record; the journal is corrupt") from None
    if not isinstance(record, dict):
        raise JournalError(f"{path}:{lineno}: not a JSON object; the journal is corrupt")
    return record


def _lines(path: str) -> Iterator[tuple[int, int, bytes, bool]]:
    """Yield ``(line number, offset after the line, line, is_last)`` for each line."""
    with open(path, "rb") as f:
        offset = 0
        lineno = 0
        previous: bytes | None = None
        for raw in f:
            if previous is not None:
                offset += len(previous)
                yield lineno, offset, previous, False
            lineno += 1
            previous = raw
        if previous is not None:
            offset += len(previous)
            yield lineno, offset, previous, True


def load(
    path: str,
    *,
    fingerprint: str,
    items: int,
    never_sent: Callable[[int], bool] | None = None,
) -> JournalState:
    """Read the journal at ``path`` for an input with ``fingerprint`` and ``items`` items.

    A torn last line (cut by a power cut or a crash while it was written) is
    ignored, and the items the last run may have started without a surviving
    record are held back (see the module's documentation): ``torn`` and
    ``torn_in_doubt`` say so. Any other bad line makes the journal unusable.
    Reads only: for a run that appends, ``FileJournal.begin`` locks first, then loads.

    Args:
        path: The journal file.
        fingerprint: The input's identity, as written in the journal's first record.
        items: The input's number of items.
        never_sent: Whether item ``index`` is one no run sends (an invalid row
            skipped): after a torn tail it takes no place in the window held back.

    Returns:
        What the journal says about every item.

    Raises:
        JournalError: the journal is missing, corrupt, or belongs to another input.
    """
    state = JournalState(items)
    try:
        for lineno, end, raw, is_last in _lines(path):
            if not raw.strip():
                if not is_last or raw.endswith(b"\n"):
                    state.valid_bytes = end
                continue
            if is_last and not raw.endswith(b"\n"):
                state.torn = True  # cut mid-write
                break
            try:
                record = _parse_line(raw, lineno, path)
            except JournalError:
                if is_last:
                    state.torn = True  # a garbled last line is a torn one too
                    break
                raise
            if not state.has_header:
                state._window = _check_header(record, path, fingerprint=fingerprint, items=items)
                state.has_header = True
            elif "resume" in record:
                state._window = _window_of(record, path, lineno)
                state._run_high = -1
                state._run_seen = bytearray(items)
            else:
                _apply(state, record, lineno, path)
            state.valid_bytes = end
    except FileNotFoundError:
        raise JournalError(f"{path}: no such journal; drop --resume to start a new one") from None
    except OSError as exc:
        raise JournalError(f"{path}: cannot read the journal: {exc.strerror}") from None
    if state.torn and state.has_header:
        _hold_back(state, never_sent)
    return state


def _hold_back(state: JournalState, never_sent: Callable[[int], bool] | None) -> None:
    """Mark unknown, without a key, each item the last run may have started unrecorded.

    The last run pulled items in input order, skipping those it did not send
    with a new key, and at most ``window`` of them had a start record not yet
    on disk. So: the items below its highest started one that it would have
    pulled yet has no record of, and the next ``window`` it would have pulled.
    An item that no run sends (``never_sent``) was never pulled: it is skipped,
    not counted in the window.
    """
    high, seen = state._run_high, state._run_seen
    left = state._window
    for index in range(state.items):
        if state.states[index] not in _FRESH_STATES or seen[index]:
            continue
        if never_sent is not None and never_sent(index):
            continue
        if index > high:
            if left == 0:
                break
            left -= 1
        state.states[index] = UNKNOWN
        state.in_doubt[index] = (None, TORN_NOTE)
        state.torn_in_doubt.append(index)


def _window_of(record: dict[str, Any], path: str, lineno: int) -> int:
    window = record.get("window", DEFAULT_WINDOW)
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise JournalError(f"{path}:{lineno}: bad window {window!r}")
    return window


def _check_header(record: dict[str, Any], path: str, *, fingerprint: str, items: int) -> int:
    """Check the first record; return its window (``DEFAULT_WINDOW`` if it has none)."""
    version = record.get("botmsg_journal")
    # type() first: a list or an object here is unhashable, and `in` a set would raise.
    if type(version) is not int or version not in _READ_VERSIONS:
        versions = " or ".join(map(str, sorted(_READ_VERSIONS)))
        raise JournalError(f"{path}:1: not a botmsg journal (version {versions})")
    if record.get("input") != fingerprint or record.get("items") != items:
        raise JournalError(
            f"{path}: this journal was written for another input (or other --text, "
            "--subject, --sender-name); resuming it would send the wrong messages. "
            "Use the original input, or a new journal"
        )
    return _window_of(record, path, 1)


def read_options(path: str) -> dict[str, Any] | None:
    """The options the journal at ``path`` recorded for its job, if it recorded any.

    Reads only the first record, without the lock: a resumed run takes the
    options it was not given from here before reading its input; ``load``
    (under the lock) then checks the input's fingerprint, which covers them.

    Args:
        path: The journal file.

    Returns:
        The ``"options"`` object of a version 2 journal; None when the journal
        is empty, its first record torn, or of version 1 (which records only a
        hash of them); what else may be wrong with the journal ``load`` reports.

    Raises:
        JournalError: the journal is missing or unreadable, or its options are
            not a JSON object.
    """
    try:
        with open(path, "rb") as f:
            first = b""
            for raw in f:
                if raw.strip():
                    first = raw
                    break
    except FileNotFoundError:
        raise JournalError(f"{path}: no such journal; drop --resume to start a new one") from None
    except OSError as exc:
        raise JournalError(f"{path}: cannot read the journal: {exc.strerror}") from None
    if not first.endswith(b"\n"):
        return None  # empty, or torn while its first record was written: nothing recorded
    try:
        record = json.loads(first)
    except _NOT_JSON:
        return None  # load says what is wrong
    if not isinstance(record, dict) or record.get("botmsg_journal") != FORMAT_VERSION:
        return None
    options = record.get("options")
    if options is None:
        return None
    if not isinstance(options, dict):
        raise JournalError(f"{path}:1: bad options {options!r}; the journal is corrupt")
    return options


def _key_of(value: object) -> str | None:
    """``value`` if it is a key a send uses as given, else None.

    An empty key means "make a new one" to the client, and one that is not
    printable it refuses: neither names the key an item was sent with.
    """
    return value if isinstance(value, str) and value and value.isprintable() else None


def _apply(state: JournalState, record: dict[str, Any], lineno: int, path: str) -> None:
    index = record.get("i")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < state.items:
        raise JournalError(f"{path}:{lineno}: item index {index!r} out of range")
    state._run_seen[index] = 1
    if record.get("s") == "start":
        state._run_high = max(state._run_high, index)
        key = _key_of(record.get("key"))
        if key is None:
            raise JournalError(f"{path}:{lineno}: start record without a key")
        previous = state.in_doubt.get(index)
        if previous is not None:
            # Started again while in doubt: a --resend-unknown run, same key.
            state.resent.add(index)
        state.states[index] = STARTED
        state.in_doubt[index] = (key, previous[1] if previous else None)
        return
    new = _state_of(record)
    if new is None:
        raise JournalError(f"{path}:{lineno}: unknown record")
    if new == SKIPPED and record.get("attempted") is False and index not in state.resent:
        # A start written ahead (--durable) for an attempt that never came: void.
        # (Had the item been in doubt before that start, it stays so, below.)
        state.in_doubt.pop(index, None)
        state.states[index] = SKIPPED
        return
    if (new == SKIPPED and index in state.in_doubt) or (new == RETRY and index in state.resent):
        # A resend of an item in doubt that settled nothing (skipped, or a failure
        # that proves nothing about the earlier attempt): it stays in doubt, with
        # its key, so that no later run sends it under a new one.
        state.states[index] = UNKNOWN
        return
    state.resent.discard(index)
    state.states[index] = new
    if new == UNKNOWN:
        previous = state.in_doubt.get(index)
        key = _key_of(record.get("k"))
        # No key at all: an item held back after a torn tail; it is never resent.
        key = key or (previous[0] if previous else None)
        error = record.get("e")
        state.in_doubt[index] = (key, error if isinstance(error, str) else None)
    else:
        state.in_doubt.pop(index, None)


def finished_records(path: str, state: JournalState) -> Iterator[dict[str, Any]]:
    """Stream the outcome record of every item that needs no new send (sent or failed).

    Yields each such item once, in journal order; only the part of the file that
    ``load`` found valid is read.

    Args:
        path: The journal file.
        state: What ``load`` read from it.

    Returns:
        The records, as dicts (``"i"``, ``"o"``, ``"m"``, ``"k"``, ``"d"``, ``"u"``, ``"e"``).
    """
    seen = bytearray(state.items)
    header_seen = False
    for lineno, end, raw, _ in _lines(path):
        if end > state.valid_bytes:
            break
        if not raw.strip():
            continue
        record = _parse_line(raw, lineno, path)
        if not header_seen:
            header_seen = True
            continue
        if "resume" in record:  # where a resumed run began
            continue
        index = record["i"]
        record_state = _state_of(record)
        if record_state in FINAL_STATES and state.states[index] == record_state and not seen[index]:
            seen[index] = 1
            yield record


class FileJournal:
    """A journal in a local file (``JournalStore``): each record handed to the OS
    before returning.

    The journal is locked (``flock``, where the OS has it) while the writer is
    open: two runs resuming one journal at once would both send its open items.

    Args:
        path: The journal file; created if missing.
        redact: Applied to every string written (the CLI's credential redactor):
            an error text is the server's, and a server may echo the password.

    Raises:
        JournalError: another process holds the journal.
        OSError: it cannot be opened.
    """

    def __init__(self, path: str, *, redact: Callable[[str], str] | None = None) -> None:
        self.path = path
        self._redact = redact
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd: int | None = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            #: Whether this writer created the file (``discard`` removes only such).
            self.created = True
        except FileExistsError:
            self._fd = os.open(path, flags)
            self.created = False
        self._initial_size = os.fstat(self._fd).st_size
        try:
            _lock(self._fd, path)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def begin(
        self,
        *,
        fingerprint: str,
        items: int,
        window: int,
        resume: bool,
        options: Mapping[str, object] | None = None,
        never_sent: Callable[[int], bool] | None = None,
    ) -> JournalState | None:
        """Start this run's part of the journal (see ``JournalStore.begin``).

        With ``resume``, read the journal (``load``); the items held back
        because of a torn tail (``JournalState.torn_in_doubt``) are recorded as
        unknown, over that tail (``resumed``). Locked first, then read: what is read stays true
        while this run goes on. ``never_sent`` is ``load``'s: the items no run
        sends (invalid rows), which a torn tail's window does not count.

        Raises:
            JournalError: corrupt, for another input, or (without ``resume``)
                written meanwhile by another run.
            OSError: it cannot be read or written.
        """
        state: JournalState | None = None
        if resume:
            state = load(self.path, fingerprint=fingerprint, items=items, never_sent=never_sent)
            if not state.has_header:
                self.truncate(state.valid_bytes)  # nothing was sent: nothing to hold back
        elif self.size():
            raise JournalError(f"{self.path} was just written by another run; pass --resume")
        if state is None or not state.has_header:
            self.header(fingerprint=fingerprint, items=items, window=window, options=options)
        else:
            self.resumed(window=window, held_back=state.torn_in_doubt, at=state.valid_bytes)
        return state

    def finished_records(self, state: JournalState) -> Iterator[dict[str, Any]]:
        """``finished_records`` of this journal's file."""
        return finished_records(self.path, state)

    def size(self) -> int:
        """The journal's length in bytes now."""
        assert self._fd is not None
        return os.fstat(self._fd).st_size

    def truncate(self, valid_bytes: int) -> None:
        """Cut off anything after ``valid_bytes`` (a torn record), so that new
        records never get glued to a fragment."""
        assert self._fd is not None
        if self.size() > valid_bytes:
            os.ftruncate(self._fd, valid_bytes)

    def _redacted(self, value: object) -> object:
        """``value`` (JSON-like) with the redactor applied to every string in it."""
        if self._redact is None:
            return value
        if isinstance(value, str):
            return self._redact(value)
        if isinstance(value, dict):
            return {k: self._redacted(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._redacted(v) for v in value]
        return value

    def _encode(self, record: dict[str, Any]) -> bytes:
        """``record`` as one line of the journal, redacted."""
        if self._redact is not None:
            redact = self._redact
            record = {k: redact(v) if isinstance(v, str) else v for k, v in record.items()}
        # ensure_ascii: any text can be written, a lone surrogate from a server included,
        # and no control character of it reaches a terminal that shows the journal.
        return (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode()

    def _write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise JournalError(f"{self.path}: journal already closed")
        data = self._encode(record)
        view = memoryview(data)
        try:
            while view:  # a regular file takes it all in one call unless the disk is full
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            if len(view) < len(data):
                # A full disk took part of the record: cut it off, so that the record is
                # missing as a whole (a start record missing means "not sent"; an outcome
                # missing, "in doubt"). Torn, it would hold back the items around it as
                # unknown for good; glued to a later record, it would corrupt the journal.
                with contextlib.suppress(OSError):
                    size = os.fstat(self._fd).st_size
                    os.ftruncate(self._fd, size - (len(data) - len(view)))
            # Named: the run's error line says which file failed.
            raise OSError(exc.errno, exc.strerror, self.path) from None

    def header(
        self,
        *,
        fingerprint: str,
        items: int,
        window: int,
        options: Mapping[str, object] | None = None,
    ) -> None:
        """Write the first record, naming the input; fsynced, since it is written once.

        Args:
            fingerprint: The input's identity.
            items: Its number of items.
            window: How many start records this run may lose in a power cut: its
                concurrency, or 0 when each is fsynced before its send.
            options: The job's options (JSON-able), for ``read_options``; the
                credential redactor applies to their strings too.
        """
        # Without options, version 1: byte for byte what earlier versions wrote and read.
        record: dict[str, Any] = {
            "botmsg_journal": 1 if options is None else FORMAT_VERSION,
            "input": fingerprint,
            "items": items,
            "window": window,
        }
        if options is not None:
            record["options"] = self._redacted(dict(options))
        self._write(record)
        assert self._fd is not None
        _fsync(self._fd, self.path)

    def resumed(self, *, window: int, held_back: list[int], at: int | None = None) -> None:
        """Start a resumed run's part of the journal; record the items ``load`` held
        back after a torn tail, and fsync.

        Args:
            window: This run's window (see ``header``).
            held_back: The items ``load`` held back (``JournalState.torn_in_doubt``).
            at: Where the journal's valid part ends (``JournalState.valid_bytes``):
                a torn tail beyond it is overwritten by these records in one write,
                never cut off first. Cut off, a kill before the records were written
                would leave a journal with neither the torn record nor the items it
                held back, which the next run would send under new keys.
        """
        assert self._fd is not None
        records: list[dict[str, Any]] = [{"resume": 1, "window": window}]
        records += [{"i": index, "o": "unknown", "e": TORN_NOTE} for index in held_back]
        if at is None or self.size() <= at:
            for record in records:
                self._write(record)
            if held_back:
                _fsync(self._fd, self.path)
            return
        data = b"".join(map(self._encode, records))
        torn = self.size() - at
        if len(data) < torn:
            # Blanks before the last newline (JSON allows them) cover the whole torn tail,
            # so that no fragment of it is left behind to be read as a record.
            data = data[:-1] + b" " * (torn - len(data)) + b"\n"
        # Written at an offset: through a descriptor without O_APPEND.
        fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            tail = os.pread(fd, torn, at)
            os.lseek(fd, at, os.SEEK_SET)
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                # Cut short (a full disk): the torn tail is put back. Records written in
                # part would start this run's part of the journal (its resume record)
                # without all the held-back items, which the next load, reading that
                # part's window, would no longer hold back.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, at + len(tail))
                    os.pwrite(fd, tail, at)
                raise
            _fsync(fd, self.path)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.path) from None
        finally:
            os.close(fd)

    def start(self, index: int, key: str) -> None:
        """Record that item ``index`` is about to be sent with idempotency ``key``."""
        self._write({"i": index, "s": "start", "key": key})

    def unattempted(self, index: int) -> None:
        """Withdraw the start record of item ``index``: it was never attempted."""
        self._write({"i": index, "o": "skipped", "attempted": False})

    async def sync(self) -> None:
        """fsync everything written so far, in a thread, so the event loop runs on.

        The thread works on a duplicate descriptor: if the caller is cancelled
        and the journal closed meanwhile, it still syncs (and closes) its own.
        A cancel that comes before the thread took it closes it here: a duplicate
        shares the journal's lock, and one left open would hold it.
        """
        if self._fd is None:
            raise JournalError(f"{self.path}: journal already closed")
        fd = os.dup(self._fd)
        # Whoever takes it closes the duplicate: the thread, or the caller when the
        # thread never ran it (cancelled while queued, or no thread to run it).
        owner = threading.Lock()

        def fsync_and_close() -> None:
            if not owner.acquire(blocking=False):
                return
            try:
                _fsync(fd, self.path)
            finally:
                os.close(fd)

        try:
            await asyncio.to_thread(fsync_and_close)
        except BaseException:
            if owner.acquire(blocking=False):
                os.close(fd)
            raise

    def outcome(
        self,
        index: int,
        outcome: str,
        *,
        key: str | None,
        department_uuid: str,
        user_uuid: str,
        message_uuid: str | None = None,
        error: str | None = None,
        retry: bool = False,
    ) -> None:
        """Record the outcome of item ``index``: sent, failed, unknown or skipped."""
        record: dict[str, Any] = {"i": index, "o": outcome}
        if outcome != "skipped":
            record.update(m=message_uuid, k=key, d=department_uuid, u=user_uuid)
            if error is not None:
                record["e"] = error
            if outcome == "failed":
                record["retry"] = retry
        self._write(record)

    def discard(self) -> None:
        """Undo this writer's work and close: delete the file it created, or cut
        the file it found back to its length then."""
        if self._fd is not None:
            # Still locked: no other run can be using it.
            if self.created:
                os.unlink(self.path)
            else:
                os.ftruncate(self._fd, self._initial_size)
            self.close()

    def close(self) -> None:
        """Flush the journal to disk and close it; a second call does nothing."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                _fsync(fd, self.path)
            finally:
                os.close(fd)
