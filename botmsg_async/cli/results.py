"""Where ``send-many`` accounts for its items: the ``--out`` file, the tally, the summary."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from botmsg_async import BotMessageError, Counts, Outcome
from botmsg_async.journal import flush_failure

from .common import EXIT_FAILED, EXIT_OK, EXIT_UNKNOWN, MAX_LISTED_FAILURES, UsageError
from .console import Console

__all__ = [
    "Results",
    "RunEnd",
    "Tally",
    "close_journal",
    "error_json",
    "open_out",
    "print_summary",
]

#: How ``send-many`` describes an item's error in its journal: ``"<Type>: <message>"``.
_DESCRIBED = re.compile(r"([A-Z][A-Za-z0-9]*Error): (.*)", re.DOTALL)
#: Each outcome by its text: a dict lookup per item instead of ``Outcome(text)`` (0.03 vs 0.3 us).
_OUTCOMES: dict[str, Outcome] = {outcome.value: outcome for outcome in Outcome}


def error_json(text: str, *, default_type: str, status: int | None = None) -> dict[str, Any]:
    """An item's error for ``--out``, shaped as ``botmsg send`` prints one.

    Args:
        text: The error as the journal records it (``"<Type>: <message>"``), or
            a sentence of the CLI's own.
        default_type: The type to give a sentence that names none.
        status: The HTTP status of the answer, if there was one.

    Returns:
        ``{"type", "message", "status"}``.
    """
    described = _DESCRIBED.fullmatch(text)
    if described is not None:
        return {"type": described[1], "message": described[2], "status": status}
    return {"type": default_type, "message": text, "status": status}


class Tally:
    """Counts over every item of the input, this run's and the journal's.

    The outcomes are the SDK's ``Counts`` (as in ``BatchReport`` and ``Progress``);
    the CLI adds rows refused before sending (``invalid``) and how many outcomes
    came from an earlier run's journal.
    """

    def __init__(self) -> None:
        self._by_outcome = dict.fromkeys(Outcome, 0)
        self.invalid = 0
        self.from_journal = 0

    def add(self, outcome: Outcome) -> None:
        """Count one item's outcome."""
        self._by_outcome[outcome] += 1

    @property
    def counts(self) -> Counts:
        """The items with an outcome, by outcome."""
        by = self._by_outcome
        return Counts(
            by[Outcome.SENT], by[Outcome.FAILED], by[Outcome.UNKNOWN], by[Outcome.SKIPPED]
        )

    @property
    def sent(self) -> int:
        """Items sent."""
        return self._by_outcome[Outcome.SENT]

    @property
    def failed(self) -> int:
        """Items not delivered."""
        return self._by_outcome[Outcome.FAILED]

    @property
    def unknown(self) -> int:
        """Items that may or may not have been delivered."""
        return self._by_outcome[Outcome.UNKNOWN]

    @property
    def skipped(self) -> int:
        """Items never attempted (invalid rows not included)."""
        return self._by_outcome[Outcome.SKIPPED]

    @property
    def total(self) -> int:
        """Items accounted for."""
        return self.counts.total + self.invalid

    def exit_code(self) -> int:
        """Unknown beats failed: a human must look before anything else happens."""
        if self.unknown:
            return EXIT_UNKNOWN
        if self.failed or self.skipped:
            return EXIT_FAILED
        return EXIT_OK


def open_out(
    path: str | None,
    stack: contextlib.ExitStack,
    not_written: Callable[[], None] | None = None,
) -> TextIO | None:
    """The ``--out`` stream: standard output for ``-``, else ``path`` opened with ``stack``.

    Args:
        path: ``--out`` (None or empty: no file).
        stack: Closes the file when the run ends.
        not_written: Called before the error when ``path`` cannot be opened
            (nothing was sent: e.g. drop a journal just created).

    Raises:
        UsageError: ``path`` cannot be written.
    """
    if path == "-":
        if sys.stdout is None:  # started with stdout closed (>&-): results would vanish
            if not_written is not None:
                not_written()
            raise UsageError("--out -: standard output is closed")
        return sys.stdout
    if not path:
        return None
    try:
        return stack.enter_context(open(path, "w", encoding="utf-8"))
    except OSError as exc:
        if not_written is not None:
            not_written()
        raise UsageError(f"{path}: cannot write: {exc.strerror}") from None


def close_journal(close: Callable[[], None], path: str, console: Console) -> bool:
    """Close (fsync) a run's journal; if that fails, say on stderr what it risks.

    Called once the run's last record is written, and again (doing nothing then)
    by the run's cleanup: a journal's close never ends the command in a traceback.

    Args:
        close: The journal's ``close`` (a second call does nothing).
        path: The ``--journal`` file, for the error line.
        console: Where the error line goes.

    Returns:
        Whether every record is on disk; False means an exit code of at least 1.
    """
    try:
        close()
    except OSError as exc:  # EIO, ENOSPC, EDQUOT: written back late, and lost
        console.err(f"error: {flush_failure(f'the journal {path}', exc)}")
        return False
    return True


class Results:
    """Where per-item outcomes go: the ``--out`` file, the tally, a few stderr lines."""

    def __init__(self, console: Console, out: TextIO | None) -> None:
        self.console = console
        self.out = out
        self.tally = Tally()
        self.listed = 0
        self._since_flush = 0

    def emit(
        self,
        index: int,
        department_uuid: str,
        user_uuid: str,
        outcome: str,
        *,
        message_uuid: str | None = None,
        error: dict[str, Any] | None = None,
        key: str | None = None,
        invalid: bool = False,
    ) -> None:
        """Account for one item: count it, write it to ``--out`` (or name it on stderr).

        ``error`` is ``{"type", "message", "status"}`` (see ``error_json``).
        """
        if invalid:
            self.tally.invalid += 1
        else:
            # Outcome(outcome) for an unknown text: the error it always raised.
            self.tally.add(_OUTCOMES.get(outcome) or Outcome(outcome))
        if self.out is not None:
            record = {
                "index": index,
                "department_uuid": department_uuid,
                "user_uuid": user_uuid,
                "outcome": outcome,
                "message_uuid": message_uuid,
                "error": error,
                "idempotency_key": key,
            }
            self.out.write(self.console.dumps(record) + "\n")
            self._since_flush += 1
            if self._since_flush >= 256:
                self.out.flush()
                self._since_flush = 0
        elif outcome != "sent" and not invalid and self.listed < MAX_LISTED_FAILURES:
            # No --out: name the first few that need attention, or they are lost.
            self.listed += 1
            said = None if error is None else f"{error['type']}: {error['message']}"
            self.console.err(
                f"item {index} (department={department_uuid}, user={user_uuid}): {outcome}: {said}"
            )

    def close(self) -> None:
        """Flush ``--out``."""
        if self.out is not None:
            self.out.flush()


@dataclass(frozen=True)
class RunEnd:
    """How a ``send-many`` run ended, for its summary.

    Attributes:
        items: Data rows of the input.
        finished: Results of this run's sends (skipped items included).
        attempted: Of them, items attempted: the rate counts these, not the
            items a stopped batch skipped.
        requests: HTTP requests made for them, retries included.
        elapsed: Seconds this run's sends took.
        retries: Retries made.
        in_flight: Items unfinished at the end.
        stopped_by: The error that stopped the batch early, if any.
        crash: What ended the run before its end (the input changed, a file
            could not be written...), if anything.
        stop_requested: A first signal asked the run to stop.
        interrupted: A second signal cancelled it.
        journal: The ``--journal`` file, if any.
        out: The ``--out`` file, if any.
    """

    items: int
    finished: int
    elapsed: float
    retries: int
    in_flight: int
    stopped_by: BotMessageError | None
    crash: BaseException | None
    stop_requested: bool
    interrupted: bool
    journal: str | None
    out: str | None
    attempted: int = 0
    requests: int = 0


def progress_line(
    t: Tally, items: int, *, left: int, rate: float, in_flight: int, retries: int | None
) -> str:
    """One progress line for a log: done/total of the input, outcomes, rate and ETA.

    Args:
        t: The counts so far (this run's and the journal's).
        items: Items in the input.
        left: Items this run still has to finish.
        rate: This run's items per second so far.
        in_flight: Items being sent (or held by workers) now.
        retries: HTTP retries so far (None: not known until the end).
    """
    percent = 100 * t.total // items if items else 100
    if not left:
        eta = "0 s"
    elif rate > 0:
        eta = duration_text(left / rate)
    else:
        eta = "unknown"
    retried = "" if retries is None else f", {retries} retries"
    return (
        f"progress: {t.total}/{items} items done ({percent}%): {t.sent} sent, "
        f"{t.failed} failed, {t.unknown} unknown; {in_flight} in flight{retried}; "
        f"{rate:.0f} messages/s; ETA {eta}"
    )


def duration_text(seconds: float) -> str:
    """``seconds`` for a human: ``45 s``, ``12 min 5 s``, ``3 h 20 min``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def print_summary(console: Console, t: Tally, end: RunEnd) -> None:
    """Print the run's summary on stderr, and what to do next."""
    # Items really attempted: a batch stopped by refused credentials after 32
    # requests skipped the rest in no time, and they are no messages per second.
    rate = end.attempted / end.elapsed if end.elapsed > 0 else 0.0
    parts = [f"{t.sent} sent", f"{t.failed} failed", f"{t.unknown} unknown"]
    skipped = t.skipped + t.invalid
    parts.append(f"{skipped} skipped" + (f" ({t.invalid} invalid)" if t.invalid else ""))
    line = f"{t.total} of {end.items} items: {', '.join(parts)}; {end.retries} retries"
    line += (
        f"; {end.attempted} attempted with {end.requests} requests in {end.elapsed:.1f} s, "
        f"{rate:.0f} messages/s"
    )
    if t.from_journal:
        line += f"; {t.from_journal} finished in an earlier run (from the journal)"
    console.err(line)
    if end.stopped_by is not None:
        console.err(f"the batch stopped early: {end.stopped_by}")
    if end.crash is not None:
        console.err(
            f"error: {end.crash}; stopped with {end.in_flight} item(s) unfinished"
            + (f"; fix it and rerun with --journal {end.journal} --resume" if end.journal else "")
        )
    if end.stop_requested and not end.interrupted:
        left = end.items - t.total
        console.err(
            f"stopped on request: {left} item(s) not started"
            + (f"; rerun with --journal {end.journal} --resume to send them" if end.journal else "")
        )
    if end.interrupted:
        where = (
            f"rerun with --journal {end.journal} --resume to finish"
            if end.journal
            else "items in flight may or may not have been delivered"
        )
        console.err(f"interrupted with {end.in_flight} item(s) in flight; {where}")
    elif t.unknown:
        _advise_unknown(console, t.unknown, end)


def _advise_unknown(console: Console, unknown: int, end: RunEnd) -> None:
    """Say where the items in doubt are listed and what a resend of them would risk."""
    where = (
        f'they are the lines of {end.out} with "outcome": "unknown"'
        if end.out
        else 'rerun with --out FILE to list them (outcome "unknown")'
    )
    console.err(
        f"{unknown} item(s) may or may not have been delivered: {where}; check with their "
        "recipients before sending them again"
    )
    resend = (
        f"a rerun with --journal {end.journal} --resume --resend-unknown resends them"
        if end.journal
        else "--resend-unknown (on a rerun with --journal and --resume) resends such items"
    )
    console.err(
        f"{resend} under the same idempotency key: safe only if the service deduplicates "
        "by Idempotency-Key, which its spec does not document"
        + ("" if end.journal else "; this run kept no --journal")
    )
