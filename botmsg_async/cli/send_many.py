"""``botmsg send-many``: the messages of a file, streamed, with ``--out`` and a journal.

The input is checked in full first (``input.scan``); then ``SendMany`` streams
it through ``BotMessageClient.stream_many``, recording each item's start and
outcome in a ``JournalStore`` (``--journal``) so that ``--resume`` sends only
what was never tried.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import os
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Final

from botmsg_async import (
    APIStatusError,
    BatchStream,
    BotMessageError,
    InvalidRequestError,
    InvalidResponseError,
    ItemResult,
    Outcome,
    Progress,
    SendRequest,
)
from botmsg_async.journal import (
    FileJournal,
    JournalError,
    JournalState,
    JournalStore,
    read_options,
    retry_later,
    settle,
)

from .common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_UNKNOWN, UsageError
from .console import Bar, Console
from .credentials import Credentials, make_client, resolve_credentials
from .input import (
    RowDefaults,
    Scan,
    Source,
    check_flags_text,
    ignored_columns,
    scan_input,
)
from .jobs import run_redis_job, validate_redis_flags
from .results import (
    Results,
    RunEnd,
    close_journal,
    error_json,
    open_out,
    print_summary,
    progress_line,
)
from .rows import RunInput
from .signals import run
from .workers import run_with_workers, start_workers, uses_workers

__all__ = ["SendMany", "cmd_send_many"]


def _journal_error(text: object, outcome: object) -> dict[str, Any] | None:
    """An error the journal recorded as text, for --out (the journal keeps no status)."""
    if not isinstance(text, str):
        return None
    unknown = outcome == Outcome.UNKNOWN.value
    return error_json(text, default_type="DeliveryUnknownError" if unknown else "BotMessageError")


def _describe(error: BotMessageError | None) -> str | None:
    """An item's error for --out and the journal: type and sentence (the ids have fields)."""
    return None if error is None else f"{type(error).__name__}: {error.message}"


def _error_object(item: ItemResult, text: str | None, outcome: str) -> dict[str, Any] | None:
    """An item's error for --out, ``{"type", "message", "status"}``, from its journal text."""
    if text is None:
        return None
    error = item.error
    if error is None:  # not attempted: the batch stopped
        return error_json(text, default_type="BatchStoppedError")
    status = error.status if isinstance(error, APIStatusError | InvalidResponseError) else None
    if outcome == Outcome.UNKNOWN.value and item.outcome is not Outcome.UNKNOWN:
        # Still in doubt from an earlier run: the text says so, and what the resend met.
        return error_json(text, default_type="DeliveryUnknownError", status=status)
    return {"type": type(error).__name__, "message": error.message, "status": status}


@dataclass(frozen=True, slots=True)
class _Pending:
    """What the journal and --out need about an item in flight."""

    index: int
    key: str
    #: An earlier run may have delivered it (resent with --resend-unknown).
    in_doubt: bool = False
    department_uuid: str = ""
    user_uuid: str = ""


#: What --out says of a send a second signal abandoned in flight.
_ABANDONED: Final = "abandoned in flight by a second signal: it may or may not have been delivered"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return os.path.abspath(a) == os.path.abspath(b)


def _validate_send_many_flags(args: argparse.Namespace) -> None:
    if args.resume and not args.journal:
        raise UsageError("--resume needs --journal FILE")
    if args.resend_unknown and not (args.resume or args.redis):
        raise UsageError("--resend-unknown needs --resume (or --redis)")
    if args.durable and not args.journal:
        raise UsageError("--durable needs --journal FILE")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if args.rate is not None and not args.rate > 0:
        raise UsageError("--rate must be more than 0 messages per second")
    if args.per_department_rate is not None and not args.per_department_rate > 0:
        raise UsageError("--per-department-rate must be more than 0 messages per second")
    if args.text is not None and not args.text.strip():
        raise UsageError("--text must not be empty")
    files = {"INPUT": args.input, "--out": args.out, "--journal": args.journal}
    named = [(flag, path) for flag, path in files.items() if path and path != "-"]
    for i, (flag, path) in enumerate(named):
        for other_flag, other in named[i + 1 :]:
            if _same_file(path, other):
                # --out would truncate the input before it is read again, or the journal.
                raise UsageError(f"{flag} and {other_flag} must be different files")
    if args.journal and not args.resume:
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(args.journal) > 0:
                raise UsageError(
                    f"{args.journal} already exists: pass --resume to continue that run, "
                    "or choose another journal file"
                )


#: The options that shape the messages, which a journal records (format version 2)
#: and --resume takes from it when they are not given: (attribute of args, flag).
_RECORDED_OPTIONS: Final = (
    ("format", "--format"),
    ("text", "--text"),
    ("subject", "--subject"),
    ("sender_name", "--sender-name"),
)


def _job_options(args: argparse.Namespace, fmt: str, defaults: RowDefaults) -> dict[str, Any]:
    """What the journal records of this job's options, for a later --resume."""
    return {
        "format": fmt,
        "text": args.text,
        "subject": args.subject,
        "sender_name": args.sender_name,
        "ignore_columns": sorted(defaults.ignore_columns),
    }


def _take_journal_options(args: argparse.Namespace) -> None:
    """With --resume, take the options not given from the journal; refuse ones that differ.

    A version 1 journal records only a hash of them (in its fingerprint), checked
    when it is loaded, as before.

    Raises:
        UsageError: an option differs from the journal's, or the journal's are corrupt.
    """
    path: str = args.journal
    try:
        recorded = read_options(path)
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    if recorded is None:
        return
    for name, flag in _RECORDED_OPTIONS:
        value = recorded.get(name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{path}: bad {name} {value!r} in its options; the journal is corrupt")
        if name == "format" and value not in (None, "csv", "jsonl"):
            raise UsageError(f"{path}: bad format {value!r} in its options; the journal is corrupt")
        given = getattr(args, name)
        if given is None:
            setattr(args, name, value)
        elif given != value:
            had = f"was given another {flag}" if value is not None else f"had no {flag}"
            raise UsageError(
                f"{flag} differs from the journal's: the run of {path} {had}, and resuming "
                f"with another would send other messages; drop {flag} to use the journal's, "
                "or start a new journal"
            )
    ignore = recorded.get("ignore_columns", [])
    if not isinstance(ignore, list) or not all(isinstance(n, str) for n in ignore):
        raise UsageError(
            f"{path}: bad ignore_columns {ignore!r} in its options; the journal is corrupt"
        )
    if args.ignore_columns is None:
        if ignore:
            # Ignored columns never change a message (a field botmsg reads cannot be one).
            args.ignore_columns = ",".join(ignore)
    elif ignored_columns(args.ignore_columns) != frozenset(ignore):
        # The fingerprint does not cover them: checked here, as the docs promise.
        had = f"was given --ignore-columns {','.join(ignore)}" if ignore else "had none"
        raise UsageError(
            f"--ignore-columns differs from the journal's: the run of {path} {had}; "
            "drop --ignore-columns to use the journal's, or start a new journal"
        )


def _open_journal(
    args: argparse.Namespace,
    console: Console,
    scan: Scan,
    stack: contextlib.ExitStack,
    options: dict[str, Any],
) -> tuple[JournalStore, JournalState | None]:
    """Open (and lock) the journal; with --resume, read what it says.

    Raises:
        JournalError: missing with --resume, in use, corrupt, or for another input.
        OSError: it cannot be opened or written.
    """
    path: str = args.journal
    if args.resume and not os.path.exists(path):
        raise JournalError(f"{path}: no such journal; drop --resume to start a new one")
    # Locked as it opens; begin() reads it only then: what is read stays true while we run.
    journal = FileJournal(path, redact=console.redact)
    # SendMany.run closes it once its last record is written; this only when it did not.
    stack.callback(close_journal, journal.close, path, console)
    # How many start records a power cut could take: none when each is fsynced first.
    window = 0 if args.durable else args.concurrency
    state = journal.begin(
        fingerprint=scan.fingerprint,
        items=scan.items,
        window=window,
        resume=args.resume,
        options=options,
        never_sent=scan.is_invalid,  # a torn tail's window counts only rows a run sends
    )
    if state is not None and state.torn:
        console.err(
            f"warning: {path} ends in a torn record (a power cut or crash while "
            f"writing): {len(state.torn_in_doubt)} item(s) the stopped run may have "
            "started without a record are held back as unknown, never to be resent"
        )
    return journal, state


def cmd_send_many(args: argparse.Namespace, console: Console) -> int:
    """Run ``botmsg send-many``; return the exit code.

    Raises:
        UsageError: a bad flag or input, or a journal that cannot be used: nothing sent.
    """
    check_flags_text(args, ("text", "subject", "sender_name"))
    if args.redis or args.job:
        validate_redis_flags(args)
    _validate_send_many_flags(args)
    if args.resume:
        _take_journal_options(args)
        check_flags_text(args, ("text", "subject", "sender_name"))  # a journal edited by hand
    defaults = RowDefaults(
        args.text, args.subject, args.sender_name, ignored_columns(args.ignore_columns)
    )
    with contextlib.ExitStack() as stack:
        # The workers start now, so that their start-up overlaps reading the input
        # (a pipe's is copied first) and the validation pass; they wait for the job,
        # and end with this block if there is none.
        pool = start_workers(args, stack) if not args.redis else None
        source = Source(args.input, stack)
        creds = resolve_credentials(args, os.environ, console.redact, stdin_taken=args.input == "-")
        fmt: str = args.format or source.guess_format()
        try:
            scan = scan_input(source, fmt, defaults)
        except UsageError as exc:
            raise UsageError(f"{source.display}: {exc}") from None
        for bad in scan.listed:
            console.err(f"{source.display}:{bad.line}: {bad.problem}")
        if scan.invalid > len(scan.listed):
            console.err(f"... and {scan.invalid - len(scan.listed)} more invalid rows")
        if scan.invalid and not args.skip_invalid:
            raise UsageError(
                f"{scan.invalid} invalid row(s) in {source.display}; nothing was sent. "
                "Fix them, or pass --skip-invalid to send the others"
            )
        if scan.invalid and not scan.valid:
            raise UsageError(f"no valid row in {source.display}; nothing was sent")
        if scan.invalid:
            console.err(f"skipping {scan.invalid} invalid row(s)")
        if args.redis:
            options = _job_options(args, fmt, defaults)
            return run_redis_job(args, console, source, fmt, defaults, scan, creds, stack, options)
        if uses_workers(args):
            options = _job_options(args, fmt, defaults)
            return run_with_workers(
                args, console, source, fmt, defaults, scan, creds, stack, options, pool
            )

        state: JournalState | None = None
        journal: JournalStore | None = None
        if args.journal:
            try:
                options = _job_options(args, fmt, defaults)
                journal, state = _open_journal(args, console, scan, stack, options)
            except JournalError as exc:
                raise UsageError(str(exc)) from None
            except OSError as exc:
                raise UsageError(
                    f"{args.journal}: cannot use the journal: {exc.strerror}"
                ) from None

        # Nothing sent if --out cannot be written: leave no new journal demanding --resume.
        new_journal = journal if journal is not None and state is None else None
        out = open_out(args.out, stack, new_journal.discard if new_journal else None)
        results = Results(console, out)
        stack.callback(results.close)
        run_input = RunInput(source, fmt, defaults, scan, state)
        job = SendMany(args, console, run_input, journal, results)
        try:
            return run(job.run(creds), first_signal=job.request_stop, loop=args.loop)
        except UsageError:
            # Refused before the first send (the client refused the credentials...):
            # nothing was sent, so leave no new journal demanding --resume.
            if new_journal is not None:
                new_journal.discard()
            raise


class SendMany:
    """One ``send-many`` run: the journal's finished items, then a stream of sends."""

    def __init__(
        self,
        args: argparse.Namespace,
        console: Console,
        run_input: RunInput,
        journal: JournalStore | None,
        results: Results,
    ) -> None:
        self.args = args
        self.console = console
        self.input = run_input
        self.state = run_input.state
        self.scan = run_input.scan
        self.journal = journal
        self.results = results
        # Stream index (order of pulling) -> the input item; only items in flight.
        self.pending: dict[int, _Pending] = {}
        self.pulled = 0
        self.finished = 0  # results of this run's sends
        self.attempted = 0  # of them, items attempted (not skipped)
        self.requests = 0  # HTTP requests made for them
        self.to_send = 0  # items this run will attempt, set when it begins
        self.last_line_at = 0.0  # the batch's elapsed time at the last progress line
        self.stopped_by: BotMessageError | None = None
        self.stop_requested = False
        #: The batch, once it runs: a stop request drains it (``BatchStream.stop``).
        self.stream: BatchStream | None = None
        #: --out could not be written: start no new item, finish those in flight.
        self.out_error: OSError | None = None
        # --durable: items handed to the batch and not finished, and stream
        # indices whose start record is written but whose attempt has not begun.
        self.in_workers = 0
        self.unattempted: set[int] = set()
        #: Stream indices of the items whose first attempt began and that have no
        #: result yet: what a second signal abandons in doubt.
        self.attempting: set[int] = set()
        #: Stream indices -> results the batch gave ``on_result`` and not yet read from
        #: the stream: a second signal must report them as they ended, not unknown.
        self.answered: dict[int, ItemResult] = {}
        #: What the journal refused first (a full disk): the batch stops on it, as
        #: on an input error (the sends in flight finish), and the items it did not
        #: start are reported as stopped by it.
        self.journal_error: Exception | None = None
        self.unjournaled = 0  # items with a start on record whose outcome it refused

    def request_stop(self) -> None:
        """Start no new item; let those in flight finish (first SIGINT or SIGTERM)."""
        self.stop_requested = True
        if self.stream is not None:
            # Items waiting for --rate or a 429 pause are not started; a 429'd one
            # is not sent again: only the sends in flight finish.
            self.stream.stop()
        self.console.err(
            f"stopping: waiting for {len(self.pending)} send(s) in flight; "
            "signal again to abandon them (their outcome would be unknown)"
        )

    def _replay_journal(self) -> None:
        """Write the journal's sent and failed items to --out, as recorded."""
        if self.state is None:
            return
        assert self.journal is not None
        for record in self.journal.finished_records(self.state):
            self.results.emit(
                record["i"],
                record.get("d", ""),
                record.get("u", ""),
                record["o"],
                message_uuid=record.get("m"),
                error=_journal_error(record.get("e"), record["o"]),
                key=record.get("k"),
            )
            self.results.tally.from_journal += 1

    def _to_send(self) -> int:
        """How many items this run will attempt (for the progress bar)."""
        return self.input.to_send(resend_unknown=self.args.resend_unknown)

    def _items(self) -> Generator[SendRequest, None, None]:
        """The items to send, read lazily, each with its idempotency key.

        The journal's start record is written by ``_on_start``, which
        ``stream_many`` calls right before the first attempt (after any rate-limit
        wait), so an item waiting for the limiter is never taken for one in flight.
        """
        for parsed, key, in_doubt in self.input.rows(
            self.results,
            skip_invalid=self.args.skip_invalid,
            resend_unknown=self.args.resend_unknown,
            stopped=lambda: self.stop_requested or self.out_error is not None,
        ):
            self.pending[self.pulled] = _Pending(
                parsed.index,
                key,
                in_doubt=in_doubt,
                department_uuid=parsed.department_uuid,
                user_uuid=parsed.user_uuid,
            )
            self.pulled += 1
            # A row with only a text is that text (a str): the client (default
            # message settings) sends it on its fast path (~4 us less).
            yield SendRequest(
                parsed.department_uuid, parsed.user_uuid, parsed.message, idempotency_key=key
            )

    async def _durable_items(self) -> AsyncIterator[SendRequest]:
        """``_items`` for ``--durable``: no send before its start record is on disk.

        The batch pulls items one at a time (under a lock) and, with no rate limit,
        goes straight from the pull to ``on_start`` and the first attempt without
        yielding to the loop. So the start record is written here, at the pull,
        and fsynced before the item is handed over. Group commit: when asked for
        an item, this writes the start records of as many items as there are idle
        workers (each is waiting for the pull lock), fsyncs once in a thread, then
        hands them out one by one; workers that free up during that fsync wait for
        the next one, so one fsync serves all of them.

        An item handed over but never attempted (the batch stopped meanwhile)
        and an item written ahead but never handed over (a stop, a cancel) get a
        record withdrawing the start. With ``--rate``, the start record is
        written before the rate limiter's wait: at most ``--concurrency`` items
        a crash would then report unknown though they were never sent.
        """
        journal = self.journal
        assert journal is not None
        source = self._items()
        ready: collections.deque[tuple[int, SendRequest]] = collections.deque()
        try:
            while True:
                if not ready:
                    idle = max(1, self.args.concurrency - self.in_workers)
                    for request in itertools.islice(source, idle):
                        stream_index = self.pulled - 1  # _items counted it when it yielded
                        meta = self.pending[stream_index]
                        journal.start(meta.index, meta.key)
                        self.unattempted.add(stream_index)
                        ready.append((stream_index, request))
                    if not ready:
                        return
                    await journal.sync()
                if self.stop_requested or self.out_error is not None:
                    return
                stream_index, request = ready.popleft()
                self.in_workers += 1
                yield request
        finally:
            for stream_index, _ in ready:
                self.unattempted.discard(stream_index)
                try:
                    journal.unattempted(self.pending.pop(stream_index).index)
                except Exception as exc:
                    # A full disk: its start stands, in doubt for --resume (never resent
                    # under a new key). Said after the summary, not raised from the cleanup.
                    self.journal_error = self.journal_error or exc
                    self.unjournaled += 1
            source.close()

    def _on_start(self, stream_index: int, request: SendRequest) -> None:
        """Journal that an item is about to be sent, before its first attempt."""
        if self.args.durable:
            self.unattempted.discard(stream_index)  # journaled, and on disk, already
        elif self.journal is not None:
            meta = self.pending[stream_index]
            try:
                self.journal.start(meta.index, meta.key)
            except Exception as exc:
                # The item is not sent (reported skipped); --resume sends it.
                self.journal_error = self.journal_error or exc
                raise
        self.attempting.add(stream_index)

    def _report_abandoned(self) -> None:
        """List each send a second signal abandoned in flight as unknown (--out, summary).

        Only --out tells such an item from those never started, which a rerun may
        send: without it, a rerun of the rows missing from --out would send it
        again under a new key. Its start record (with --journal) stands: a
        --resume reports it unknown too.
        """
        # Those whose outcome is known (the cancel came as their result was queued, or
        # while a worker waited to queue it) are reported as they ended.
        for stream_index in sorted(self.answered):
            try:
                self._emit(self.answered[stream_index])
            except OSError as exc:  # --out is full: the rest are named on stderr
                self.out_error = self.out_error or exc
                self.results.out = None
        for stream_index in sorted(self.attempting):
            meta = self.pending.get(stream_index)
            if meta is None:
                continue
            unknown = (meta.index, meta.department_uuid, meta.user_uuid, Outcome.UNKNOWN.value)
            error = error_json(_ABANDONED, default_type="DeliveryUnknownError")
            try:
                self.results.emit(*unknown, error=error, key=meta.key)
            except OSError as exc:  # --out is full: the rest are named on stderr
                self.out_error = self.out_error or exc
                self.results.out = None
                self.results.emit(*unknown, error=error, key=meta.key)
        self.attempting.clear()

    def _settle(self, meta: _Pending, item: ItemResult) -> tuple[str, str | None]:
        """The outcome to record for ``item``, and why.

        The journal's rule (``journal.settle``): an item resent because an
        earlier run may have delivered it stays unknown unless this resend
        settles it; its error then says so.
        """
        error: str | None
        if item.outcome is Outcome.SKIPPED:
            reason = (
                self.stopped_by
                or self.journal_error
                or ("a stop request (SIGINT or SIGTERM)" if self.stop_requested else None)
                or "an error (in the summary)"
            )
            error = f"not attempted: the batch stopped after: {reason}"
        else:
            error = _describe(item.error)
        outcome, note = settle(item.outcome, item.error, in_doubt=meta.in_doubt)
        if note is not None:
            return outcome.value, f"{note}; this run's resend: {error}"
        return outcome.value, error

    def _on_result(self, item: ItemResult) -> None:
        """Journal an outcome the moment it is known, before anything else."""
        self.answered[item.index] = item
        if self.journal is None:
            return
        meta = self.pending[item.index]
        try:
            if self.args.durable:
                self.in_workers -= 1
                if item.index in self.unattempted:
                    self.unattempted.discard(item.index)
                    if item.outcome is Outcome.SKIPPED:
                        self.journal.unattempted(meta.index)
                        return
            outcome, error = self._settle(meta, item)
            self.journal.outcome(
                meta.index,
                outcome,
                key=meta.key,
                department_uuid=item.department_uuid,
                user_uuid=item.user_uuid,
                message_uuid=item.result.message_uuid if item.result is not None else None,
                error=None if outcome == Outcome.SKIPPED.value else error,
                retry=retry_later(Outcome(outcome), item.error),
            )
        except Exception as exc:
            # The batch stops; this item and those still in flight are reported all
            # the same (--out). One with a start on record (any but a skipped item,
            # which had none unless --durable wrote it ahead) a --resume takes for an
            # item in doubt.
            self.journal_error = self.journal_error or exc
            if item.outcome is not Outcome.SKIPPED or self.args.durable:
                self.unjournaled += 1
            raise

    def _emit(self, item: ItemResult) -> None:
        meta = self.pending.pop(item.index)
        self.attempting.discard(item.index)
        self.answered.pop(item.index, None)
        self.finished += 1
        self.requests += item.attempts
        if item.outcome is not Outcome.SKIPPED:
            self.attempted += 1
        outcome, error = self._settle(meta, item)
        self.results.emit(
            meta.index,
            item.department_uuid,
            item.user_uuid,
            outcome,
            message_uuid=item.result.message_uuid if item.result is not None else None,
            error=_error_object(item, error, outcome),
            key=meta.key,
        )

    def _progress_callback(self) -> Callable[[Progress], None] | None:
        """What ``stream_many`` calls every ``--progress-interval`` seconds.

        Without a terminal (a CI log, nohup, systemd), where no bar can be drawn:
        a progress line on stderr. On a terminal the bar shows progress; a log
        line too with ``--log-level INFO``.
        """
        if sys.stderr.isatty():
            return self.console.progress_logger()
        return self._progress_line

    def _progress_line(self, progress: Progress) -> None:
        """One progress line: done/total of the input, outcomes, rate and ETA.

        The batch reports once more as it ends; the summary follows at once, so
        that report is printed only if the last line is half an interval old.
        """
        if progress.elapsed - self.last_line_at < self.args.progress_interval / 2:
            return
        self.last_line_at = progress.elapsed
        self.console.err(
            progress_line(
                self.results.tally,
                self.scan.items,
                left=max(self.to_send - progress.done, 0),
                rate=progress.rate,
                in_flight=progress.in_flight,
                retries=progress.retries,
            )
        )

    async def run(self, creds: Credentials) -> int:
        """Send, write results, print the summary; return the exit code."""
        self._replay_journal()
        self.to_send = self._to_send()
        items: Iterator[SendRequest] | AsyncIterator[SendRequest]
        items = self._durable_items() if self.args.durable else self._items()
        async with make_client(creds) as client, _closing(items):
            try:
                stream = client.stream_many(
                    items,
                    concurrency=self.args.concurrency,
                    rate_limit=self.args.rate,
                    per_department_rate_limit=self.args.per_department_rate,
                    on_start=self._on_start,
                    on_result=self._on_result,
                    on_progress=self._progress_callback(),
                    progress_interval=self.args.progress_interval,
                )
            except InvalidRequestError as exc:
                raise UsageError(str(exc)) from None
            self.stream = stream
            if self.stop_requested:  # a signal came before the batch existed
                stream.stop()
            bar = Bar(self.console, self.to_send, "sending")
            started = time.perf_counter()
            interrupted = False
            crash: BaseException | None = None
            try:
                async with stream:
                    async for item in stream:
                        self.stopped_by = stream.stopped_by
                        try:
                            self._emit(item)
                        except OSError as exc:
                            # --out is full or its reader is gone: the sends in flight
                            # still finish, journaled, instead of being left in doubt.
                            self.out_error = self.out_error or exc
                            self.results.out = None  # the rest are named on stderr
                        tally = self.results.tally
                        bar.update(tally.failed, tally.unknown)
                    self.stopped_by = stream.stopped_by
            except asyncio.CancelledError:
                interrupted = True
                raise
            except (UsageError, OSError, BotMessageError) as exc:
                # The input changed under us, the journal or --out could not be
                # written...: some items may be done, so this is no usage error.
                crash = exc
            finally:
                bar.close()
                if interrupted:
                    self._report_abandoned()
                self.results.close()
                crash = crash or self.out_error
                end = RunEnd(
                    items=self.scan.items,
                    finished=self.finished,
                    attempted=self.attempted,
                    requests=self.requests,
                    elapsed=time.perf_counter() - started,
                    retries=stream.retries,
                    in_flight=len(self.pending),
                    stopped_by=self.stopped_by,
                    crash=crash,
                    stop_requested=self.stop_requested,
                    interrupted=interrupted,
                    journal=self.args.journal,
                    out=self.args.out,
                )
                print_summary(self.console, self.results.tally, end)
        if self.unjournaled:  # after the source closed: its withdrawals are journal records too
            self.console.err(
                f"the journal refused the outcome of {self.unjournaled} item(s) whose start "
                "it holds: a --resume will report them unknown"
                + (
                    f" ({self.args.out} has what became of those this run finished)"
                    if self.args.out
                    else ""
                )
            )
        # After the last record (an item written ahead and withdrawn as the source
        # closed, with --durable): a failed flush is said, not raised from the cleanup.
        flushed = self.journal is None or close_journal(
            self.journal.close, self.args.journal, self.console
        )
        tally = self.results.tally
        if crash is not None:
            code = EXIT_UNKNOWN if self.pending else max(EXIT_FAILED, tally.exit_code())
        elif self.stop_requested:
            code = EXIT_INTERRUPTED
        else:
            code = tally.exit_code()
        return code if flushed and not self.unjournaled else max(code, EXIT_FAILED)


@contextlib.asynccontextmanager
async def _closing(items: Iterator[Any] | AsyncIterator[Any]) -> AsyncIterator[None]:
    """Close ``items`` at the end, so a generator's cleanup runs now, not at exit."""
    try:
        yield
    finally:
        if isinstance(items, AsyncGenerator):
            await items.aclose()
        elif isinstance(items, Generator):
            items.close()
