"""``botmsg send-many --workers N``: the same job, sent from N worker processes.

This process (the parent) owns the terminal, the progress bar, ``--out``, the
exit code and the signals; ``botmsg_async.bulk`` runs the workers. The input is
read here, once, and handed out in chunks; each item's outcome is written to
``--out`` when its worker reports it (in the order results become known, each
line with its input ``index``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

from botmsg_async import InvalidRequestError, Outcome
from botmsg_async.bulk import (
    JournalSet,
    ParallelItem,
    ParallelReport,
    ParallelSend,
    WorkerConfig,
    WorkerPool,
    WorkItem,
    check_workers,
    usable_cores,
)
from botmsg_async.journal import (
    JournalError,
    JournalState,
)

from .common import ENV_PASSWORD, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_UNKNOWN, UsageError
from .console import Bar, Console
from .credentials import Credentials
from .input import RowDefaults, Scan, Source
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
from .tunables import MALLOC_TUNABLES

__all__ = ["parse_workers", "run_with_workers", "start_workers", "uses_workers"]


def parse_workers(text: str) -> int:
    """``--workers``: a number of processes, or ``auto`` (the usable cores)."""
    if text == "auto":
        return usable_cores()
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number or 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    try:
        return check_workers(value)  # the library's bound, in its words
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def uses_workers(args: argparse.Namespace) -> bool:
    """Whether this run goes through worker processes: ``--workers`` above 1, or a
    journal that workers wrote (resumed with any ``--workers``)."""
    if args.workers != 1:
        return True
    return bool(args.journal and args.resume and JournalSet.segments_of(args.journal))


def start_workers(args: argparse.Namespace, stack: contextlib.ExitStack) -> WorkerPool | None:
    """The run's worker processes, started before its input is checked (None: one process).

    A worker's start-up (about 0.3 s of CPU) then overlaps the validation pass; the
    workers wait for the job, and ``stack`` ends them if there is none (bad input).
    None also when they cannot be started: the job tries again, and reports it.
    """
    if not uses_workers(args):
        return None
    try:
        pool = WorkerPool(args.workers, _worker_env())
    except OSError:
        # Not an error before the input is checked: the job starts its workers
        # itself then, and reports a failure like any other end of the run.
        return None
    stack.callback(pool.close)
    return pool


def _worker_env() -> dict[str, str | None]:
    # The password reaches a worker over its socket: not in its environment, where
    # anything reading /proc/<pid>/environ for as long as it runs would find it.
    env: dict[str, str | None] = {ENV_PASSWORD: None}
    if sys.platform != "linux":
        return env
    tunables = os.environ.get("GLIBC_TUNABLES")
    # A user's own tunables win; ours are added after them.
    env["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNABLES}" if tunables else MALLOC_TUNABLES
    return env


class _Signals:
    """SIGINT/SIGTERM while the job runs: the first drains, the second abandons."""

    def __init__(self, job: ParallelSend, console: Console) -> None:
        self.job = job
        self.console = console
        self.received = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        if self.received == 1:
            self.job.request_stop()
            self.console.err(
                "stopping: every worker finishes its sends in flight and starts no new one; "
                "signal again to abandon them (their outcome would be unknown)"
            )
        else:
            self.job.abandon()


class _Run:
    """One ``send-many --workers`` run: the journal's finished items, then the workers."""

    def __init__(
        self,
        args: argparse.Namespace,
        console: Console,
        run_input: RunInput,
        results: Results,
    ) -> None:
        self.args = args
        self.console = console
        self.input = run_input
        self.results = results
        self.finished = 0
        self.attempted = 0  # of them, items attempted (not skipped)
        self.requests = 0  # HTTP requests made for them
        #: --out could not be written: the job starts nothing new, finishes what is in flight.
        self.out_error: OSError | None = None

    def to_send(self) -> int:
        """How many items this run will attempt (for the progress bar and the ETA)."""
        return self.input.to_send(resend_unknown=self.args.resend_unknown)

    def items(self) -> Iterator[WorkItem]:
        """The items to send, read lazily; the others accounted for on the way."""
        for parsed, key, in_doubt in self.input.rows(
            self.results,
            skip_invalid=self.args.skip_invalid,
            resend_unknown=self.args.resend_unknown,
        ):
            yield WorkItem(
                parsed.index,
                parsed.department_uuid,
                parsed.user_uuid,
                parsed.message,
                key,
                in_doubt=in_doubt,
            )

    def on_result(self, item: ParallelItem) -> None:
        self.finished += 1
        self.requests += item.attempts
        if item.outcome != Outcome.SKIPPED.value:
            self.attempted += 1
        self.results.emit(
            item.index,
            item.department_uuid,
            item.user_uuid,
            item.outcome,
            message_uuid=item.message_uuid,
            error=item.error,
            key=item.key,
        )


def _open_journal(
    args: argparse.Namespace,
    console: Console,
    scan: Scan,
    stack: contextlib.ExitStack,
    options: Mapping[str, Any],
) -> tuple[JournalSet, JournalState | None]:
    path: str = args.journal
    if args.resume and not os.path.exists(path):
        raise JournalError(f"{path}: no such journal; drop --resume to start a new one")
    journal = JournalSet(path, redact=console.redact)
    # run_with_workers closes it as the job ends; this only when it did not.
    stack.callback(close_journal, journal.close, path, console)
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
            f"warning: {path} ends in a torn record (a power cut or crash while writing): "
            f"{len(state.torn_in_doubt)} item(s) the stopped run may have started without a "
            "record are held back as unknown, never to be resent"
        )
    return journal, state


def run_with_workers(
    args: argparse.Namespace,
    console: Console,
    source: Source,
    fmt: str,
    defaults: RowDefaults,
    scan: Scan,
    creds: Credentials,
    stack: contextlib.ExitStack,
    options: Mapping[str, Any],
    pool: WorkerPool | None = None,
) -> int:
    """Run ``send-many`` through ``args.workers`` worker processes; return the exit code.

    ``options`` are the job's message options, which a new journal records; ``pool``
    holds the workers if they were started already (``start_workers``).

    Raises:
        UsageError: a journal or ``--out`` that cannot be used: nothing sent.
    """
    journal: JournalSet | None = None
    state: JournalState | None = None
    if args.journal:
        try:
            journal, state = _open_journal(args, console, scan, stack, options)
        except JournalError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"{args.journal}: cannot use the journal: {exc.strerror}") from None
    # Nothing sent if --out cannot be written: leave no new journal demanding --resume.
    new_journal = journal if journal is not None and state is None else None
    out = open_out(args.out, stack, new_journal.discard if new_journal else None)
    results = Results(console, out)
    stack.callback(results.close)
    run = _Run(args, console, RunInput(source, fmt, defaults, scan, state), results)
    if journal is not None and state is not None:
        for record in journal.finished_records():
            results.emit(
                record["i"],
                record.get("d", ""),
                record.get("u", ""),
                record["o"],
                message_uuid=record.get("m"),
                error=None
                if record.get("e") is None
                else error_json(record["e"], default_type="BotMessageError"),
                key=record.get("k"),
            )
            results.tally.from_journal += 1
    config = WorkerConfig(
        base_url=creds.base_url,
        username=creds.username,
        password=creds.password,
        allow_insecure_http=creds.allow_insecure_http,
        concurrency=args.concurrency,
        rate_limit=args.rate,
        per_department_rate_limit=args.per_department_rate,
        fingerprint=scan.fingerprint,
        items=scan.items,
        durable=args.durable,
        grant_log=args.grant_log,
        # --loop: "auto" takes uvloop when installed; a missing one was refused already.
        use_uvloop=args.loop != "asyncio",
    )
    bar = Bar(console, run.to_send(), "sending")

    def on_result(item: ParallelItem) -> None:
        try:
            run.on_result(item)  # counted before it is written
        except OSError as exc:
            # --out is full or its reader is gone: as without workers, the sends in
            # flight still finish, journaled and counted, and nothing new starts.
            if run.out_error is None:
                run.out_error = exc
                results.out = None  # the rest are named on stderr
                job.request_stop()
        bar.update(results.tally.failed, results.tally.unknown)

    started = time.perf_counter()
    to_send = run.to_send()

    def on_tick() -> None:
        # Without a terminal (CI logs, nohup, systemd) no bar is drawn: a line instead.
        elapsed = time.perf_counter() - started
        console.err(
            progress_line(
                results.tally,
                scan.items,
                left=max(to_send - run.finished, 0),
                rate=run.finished / elapsed if elapsed > 0 else 0.0,
                in_flight=job.held,
                retries=None,  # the workers report theirs as they end
            )
        )

    job = ParallelSend(
        config,
        run.items(),
        workers=args.workers,
        on_result=on_result,
        journal=journal,
        worker_env=_worker_env(),
        on_tick=None if sys.stderr.isatty() else on_tick,
        tick_interval=args.progress_interval,
        pool=pool,
    )
    crash: BaseException | None = None
    report: ParallelReport | None = None
    with _Signals(job, console) as signals:
        try:
            report = job.run()
        except (UsageError, OSError) as exc:
            crash = exc
        finally:
            bar.close()
            results.close()
    crash = crash or run.out_error
    retries = report.retries if report is not None else job.retries
    end = RunEnd(
        items=scan.items,
        finished=run.finished,
        elapsed=time.perf_counter() - started,
        retries=retries,
        in_flight=0,
        stopped_by=None,
        crash=crash,
        stop_requested=signals.received > 0,
        interrupted=signals.received > 1,
        journal=args.journal,
        out=args.out,
        attempted=run.attempted,
        requests=run.requests,
    )
    print_summary(console, results.tally, end)
    flushed = journal is None or close_journal(journal.close, args.journal, console)
    if report is not None and report.stopped_by is not None:
        console.err(f"the batch stopped early: {report.stopped_by}")
    # From the job, not its report: there is none when the run ended with an error.
    deaths = job.worker_deaths
    for death in deaths:
        console.err(f"error: {death}")
    for late in job.late_exits:
        console.err(f"warning: {late}")
    if job.not_started and not signals.received and run.out_error is None:
        console.err(f"{job.not_started} item(s) not started: no worker was left to send them")
    if signals.received:
        return EXIT_INTERRUPTED
    code = results.tally.exit_code()
    if crash is not None or deaths or job.not_started or not flushed:
        # A worker's death is never "all sent": exit 3 when it left items in doubt.
        return max(code, EXIT_FAILED) if code != EXIT_UNKNOWN else EXIT_UNKNOWN
    return code
