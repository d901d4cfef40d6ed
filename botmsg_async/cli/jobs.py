"""``botmsg send-many --redis URL --job NAME`` and ``botmsg job status|report|cancel``.

One job shared by many machines through Redis (``botmsg_async.jobs``): the same
command, with the same INPUT, on every machine. This module only reads the
input and reports; the job's logic is the library's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO, Final, TextIO, cast, overload

from botmsg_async import BotMessageError, InvalidRequestError, SendRequest

from .common import (
    ENV_BASE_URL,
    ENV_PASSWORD,
    ENV_USERNAME,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_USAGE,
    UsageError,
)
from .console import Console
from .credentials import Credentials
from .input import BadRow, RowDefaults, Scan, Source, parse, scan_input
from .loops import loop_factory
from .results import Results, error_json, open_out
from .signals import run

if TYPE_CHECKING:
    from botmsg_async.jobs import JobItemResult, JobStatus

__all__ = ["NOT_FORWARDED", "cmd_job", "run_redis_job", "validate_redis_flags", "worker_argv"]


def _jobs() -> ModuleType:
    """``botmsg_async.jobs``, imported when used: the CLI loads without the redis extra."""
    try:
        import botmsg_async.jobs
    except ImportError:
        raise UsageError(
            "--redis needs the redis extra: pip install 'botmsg-async[redis]'"
        ) from None
    return botmsg_async.jobs


def validate_redis_flags(args: argparse.Namespace) -> None:
    """Refuse the file journal's flags with ``--redis`` (the job's records are in Redis).

    Raises:
        UsageError: a flag that does not go with ``--redis``, or one missing.
    """
    if bool(args.redis) != bool(args.job):
        raise UsageError("--redis and --job go together")
    for flag, value in (
        ("--journal", args.journal),
        ("--resume", args.resume),
        ("--durable", args.durable),
    ):
        if value:
            raise UsageError(
                f"{flag} does not go with --redis: the job's records are in Redis "
                "(a run joins the job and goes on with it by itself)"
            )
    if args.worker_of is not None and args.workers != 1:
        raise UsageError("--worker-of is for the runs that --workers starts")
    if args.workers > 1 and args.input == "-":
        raise UsageError(
            "--workers with --redis starts runs that each read INPUT: give a file, not stdin"
        )


class _Counted:
    """The raw lines of a binary file, counting the bytes handed out (``pos``)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.pos = 0

    def __iter__(self) -> Iterator[bytes]:
        for line in self._f:
            self.pos += len(line)
            yield line


class FileItems(Sequence[SendRequest | None]):
    """A job's items read from the input file on demand, one chunk of rows at a time.

    Built by one pass over the input that keeps, per chunk of ``chunk`` rows, the
    byte offset of its first row (and the indices of invalid rows): a row is read
    again from the file when its chunk is asked for, so a run holds one chunk of
    rows, not the whole input (a CSV's header is read once and put before each
    chunk's rows). Rows are mostly asked for in order (a job's chunks, the report).
    An invalid row is ``None``, as is a row that became invalid since the check.

    Raises:
        UsageError: the input cannot be read as ``fmt`` (as ``scan_input``).
    """

    def __init__(
        self,
        source: Source,
        fmt: str,
        defaults: RowDefaults,
        chunk: int,
        stack: contextlib.ExitStack,
    ) -> None:
        self._fmt = fmt
        self._defaults = defaults
        self._chunk = max(1, chunk)
        self._offsets: list[int] = []
        self._invalid: set[int] = set()
        self._prefix = b""
        start = 0
        if fmt == "csv":
            start = self._header_end(source)
            with source.open() as f:
                self._prefix = f.read(start)
        count = 0
        with source.open() as f:
            counted = _Counted(f)
            end = start  # where the next row starts (blank lines before it are skipped)
            for row in parse(cast(BinaryIO, counted), fmt, defaults):
                if row.index % self._chunk == 0:
                    self._offsets.append(end)
                if isinstance(row, BadRow):
                    self._invalid.add(row.index)
                end = counted.pos
                count += 1
        self._len = count
        self._f = stack.enter_context(source.open())
        self._loaded = -1
        self._rows: list[SendRequest | None] = []

    @staticmethod
    def _header_end(source: Source) -> int:
        """Bytes up to the end of a CSV's header record (a BOM and blank lines before it)."""
        with source.open() as f:
            counted = _Counted(f)
            lines = (
                (raw.removeprefix(b"\xef\xbb\xbf") if n == 0 else raw).decode("utf-8", "replace")
                for n, raw in enumerate(counted)
            )
            for record in csv.reader(lines, strict=True):
                if record:
                    break
            return counted.pos

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> SendRequest | None: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[SendRequest | None]: ...

    def __getitem__(self, index: int | slice) -> SendRequest | Sequence[SendRequest | None] | None:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("item index out of range")
        number = index // self._chunk
        if number != self._loaded:
            self._load(number)
        return self._rows[index - number * self._chunk]

    def _load(self, number: int) -> None:
        first = number * self._chunk
        count = min(self._chunk, self._len - first)
        self._f.seek(self._offsets[number])
        prefix = self._prefix
        skip = 0
        if self._fmt != "csv" and number > 0:
            # A JSON-lines parse takes a first line starting with "[" for a JSON array:
            # an empty object first (an invalid row, dropped) keeps a later row a row.
            prefix, skip = b"{}\n", 1
        lines = itertools.chain(io.BytesIO(prefix), self._f)  # lines as the file splits them
        rows = itertools.islice(
            parse(cast(BinaryIO, lines), self._fmt, self._defaults), skip, skip + count
        )
        self._rows = []
        for k, row in enumerate(rows):
            if isinstance(row, BadRow) or first + k in self._invalid:
                self._rows.append(None)
            else:
                self._rows.append(
                    SendRequest(
                        row.department_uuid,
                        row.user_uuid,
                        row.message,
                        idempotency_key=row.idempotency_key,
                    )
                )
        self._rows += [None] * (count - len(self._rows))  # the file got shorter: not sent
        self._loaded = number


def _describe(status: JobStatus) -> str:
    c = status.counts
    eta = f", ETA {status.eta:.0f} s" if status.eta is not None and not status.complete else ""
    state = "complete" if status.complete else status.state
    line = (
        f"job {status.name}: {state}; {c.total}/{status.items} items done: sent {c.sent}, "
        f"failed {c.failed}, unknown {c.unknown}, skipped {c.skipped}; in flight "
        f"{status.in_flight}; chunks {status.done}/{status.chunks}; workers alive "
        f"{status.workers_alive}; {status.rate:.1f} msg/s{eta}"
    )
    if status.stopped_by:
        line += f"; stopped by: {status.stopped_by}"
    if status.rewound:
        line += "; Redis lost records of this job once: pending items were held as unknown"
    return line


async def _write_report(
    console: Console,
    out: TextIO | None,
    results: AsyncGenerator[JobItemResult, None],
    items: Sequence[SendRequest | None] | None,
    not_in_job: str | None = None,
) -> tuple[int, int]:
    """Every item to ``out`` as ``send-many --out`` writes it, each line as its result comes.

    ``results`` are in index order (``iter_job_results``); an index of ``items``
    with no result is an invalid input row, reported skipped, as is (without
    ``items``) a result whose error says so (``not_in_job``: a complete job's).

    Returns:
        The exit code of the tally, and how many results came.
    """
    sink = Results(console, out)

    def invalid(index: int) -> None:
        item = items[index] if items is not None else None
        sink.emit(
            index,
            str(item.department_uuid) if item is not None else "",
            str(item.user_uuid) if item is not None else "",
            "skipped",
            error=error_json("invalid input row", default_type="InvalidRequestError"),
            invalid=True,
        )

    following = 0  # the next index to report
    count = 0
    async with contextlib.aclosing(results):
        async for result in results:
            for index in range(following, result.index):
                invalid(index)
            if (
                not_in_job is not None
                and result.outcome == "skipped"
                and result.error is not None
                and result.error["message"] == not_in_job
            ):
                invalid(result.index)  # as the job's runs reported it
                following = result.index + 1
                count += 1
                continue
            item = items[result.index] if items is not None else None
            sink.emit(
                result.index,
                str(item.department_uuid) if item is not None else "",
                str(item.user_uuid) if item is not None else "",
                result.outcome,
                message_uuid=result.message_uuid,
                error=result.error,
                key=result.key,
            )
            following = result.index + 1
            count += 1
    for index in range(following, len(items) if items is not None else 0):
        invalid(index)
    sink.close()
    return sink.tally.exit_code(), count


def run_redis_job(
    args: argparse.Namespace,
    console: Console,
    source: Source,
    fmt: str,
    defaults: RowDefaults,
    scan: Scan,
    creds: Credentials,
    stack: contextlib.ExitStack,
    options: Mapping[str, Any],
) -> int:
    """Join (or create) the job ``--job`` in ``--redis`` and send until it has no work left.

    ``--out`` gets the whole job's report (every item, whichever run sent it)
    when this run ends. Exit codes as ``send-many``'s, over the whole job.

    Raises:
        UsageError: the job exists with another input or options, Redis refuses
            (not durable without --accept-redis-loss, unreachable): nothing sent.
    """
    jobs = _jobs()
    out = open_out(args.out, stack)
    items = FileItems(source, fmt, defaults, args.chunk_size, stack)
    if args.workers > 1:
        return _run_workers(args, console, jobs, fmt, creds, out, items)
    stop = asyncio.Event()
    worker_of: int | None = args.worker_of
    recorded = {
        **options,
        "chunk_size": args.chunk_size,
        "skip_invalid": bool(args.skip_invalid),
    }

    async def go() -> int:
        orphaned = asyncio.ensure_future(_watch_parent(worker_of, stop))
        try:
            report = await jobs.run_job_async(
                args.redis,
                args.job,
                items,
                base_url=creds.base_url,
                username=creds.username,
                password=creds.password,
                fingerprint=scan.fingerprint,
                options=recorded,
                concurrency=args.concurrency,
                rate_limit=args.rate,
                per_department_rate_limit=args.per_department_rate,
                resend_unknown=args.resend_unknown,
                accept_redis_loss=args.accept_redis_loss,
                claim_timeout=args.claim_timeout,
                chunk_size=args.chunk_size,
                ttl=int(args.job_ttl),
                allow_insecure_http=creds.allow_insecure_http,
                stop=stop,
            )
        except BotMessageError as exc:
            # InvalidRequestError: an argument refused before anything was sent (a bad URL).
            if not isinstance(exc, jobs.JobError | InvalidRequestError) or stop.is_set():
                raise
            if isinstance(exc, jobs.JobError) and exc.may_have_sent:
                # After sends: no usage error ("nothing was sent"), their outcome unknown.
                console.err(
                    f"error: {console.redact(exc.message)}; items this run sent without "
                    "a recorded outcome may have been delivered (see botmsg job report)"
                )
                return EXIT_UNKNOWN
            raise UsageError(console.redact(exc.message)) from None
        finally:
            orphaned.cancel()
        c = report.counts
        console.err(
            f"this run: sent {c.sent}, failed {c.failed}, unknown {c.unknown}"
            + (" (created the job)" if report.created else "")
        )
        if worker_of is not None:
            # One of a --workers parent's runs: the parent sums up and writes the report.
            return EXIT_INTERRUPTED if stop.is_set() else EXIT_OK
        console.err(_describe(report.job))
        if stop.is_set():
            return EXIT_INTERRUPTED
        if not report.job.complete and report.job.state == "running":
            console.err("other runs hold the job's last chunks: see botmsg job status")
        results = jobs.iter_job_results(args.redis, args.job, items)
        try:
            code, _ = await _write_report(console, out, results, items)
        except jobs.JobError as exc:
            return _report_failed(console, exc)
        return code

    return run(go(), first_signal=stop.set)


def _report_failed(console: Console, exc: BotMessageError) -> int:
    """Say that Redis failed once the job's runs had sent; return ``EXIT_UNKNOWN``.

    Not a usage error (exit 2 says nothing was sent), nor a traceback: the job's
    outcomes are on record in Redis, but ``--out`` (written up to here) lacks them.
    """
    console.err(
        f"error: {console.redact(exc.message)}; --out is not complete: the job's outcomes "
        "are in Redis (botmsg job report writes them once it is back)"
    )
    return EXIT_UNKNOWN


def cmd_job(args: argparse.Namespace, console: Console) -> int:
    """Run ``botmsg job status|report|cancel``; return the exit code.

    Raises:
        UsageError: a bad flag, or Redis cannot be read.
    """
    jobs = _jobs()
    if args.job_command == "report" and args.input and args.out != "-":
        same = os.path.abspath(args.input) == os.path.abspath(args.out)
        with contextlib.suppress(OSError):  # --out does not exist (yet)
            same = same or os.path.samefile(args.input, args.out)
        if same:
            # --out would truncate the input before its rows are read.
            raise UsageError("--input and --out must be different files")
    try:
        return run(_job(args, console, jobs))
    except (jobs.JobError, InvalidRequestError) as exc:  # Redis unusable, a bad URL
        raise UsageError(console.redact(exc.message)) from None


async def _job(args: argparse.Namespace, console: Console, jobs: ModuleType) -> int:
    if args.job_command == "status":
        while True:
            status = await jobs.job_status(args.redis, args.job, claim_timeout=args.claim_timeout)
            if status.state == "missing":
                console.err(f"no job {args.job!r} in Redis (never created, or expired)")
                return EXIT_USAGE
            console.out(console.dumps(_status_json(status)) if args.json else _describe(status))
            if not args.watch or status.complete or status.state != "running":
                return EXIT_OK
            await asyncio.sleep(args.interval)
    if args.job_command == "cancel":
        cancelled = await jobs.cancel_job(args.redis, args.job)
        console.err(
            "cancelled: no run starts anything new; sends in flight finish"
            if cancelled
            else "the job was not running (missing, stopped or cancelled already)"
        )
        return EXIT_OK
    items: Sequence[SendRequest | None] | None = None
    with contextlib.ExitStack() as stack:
        if args.input:
            status = await jobs.job_status(args.redis, args.job)
            if status.state == "missing":
                console.err(f"no job {args.job!r} in Redis (never created, or expired)")
                return EXIT_USAGE
            ignore = _take_job_options(args, status.options)
            source = Source(args.input, stack)
            fmt = args.format or source.guess_format()
            defaults = RowDefaults(args.text, args.subject, args.sender_name, ignore)
            items = FileItems(source, fmt, defaults, 256, stack)
            _check_job_input(jobs, status, source, fmt, defaults, items)
        out = open_out(args.out, stack)
        started = time.perf_counter()
        results = jobs.iter_job_results(args.redis, args.job, items)
        code, count = await _write_report(console, out, results, items, jobs.NOT_IN_JOB_NOTE)
        console.err(f"{count} item(s) reported in {time.perf_counter() - started:.1f} s")
        return code


#: The options that shape the messages, recorded with a job by ``send-many --redis``
#: and taken from it by ``job report --input``: (recorded name, attribute of args, flag).
_MESSAGE_OPTIONS: Final = (
    ("format", "format", "--format"),
    ("text", "text", "--text"),
    ("subject", "subject", "--subject"),
    ("sender_name", "sender_name", "--sender-name"),
)


def _take_job_options(args: argparse.Namespace, recorded: Mapping[str, Any]) -> frozenset[str]:
    """Take the message options not given from the job's (the input's rows are read as its
    runs read them); refuse one given that differs.

    Returns:
        The job's ignored columns.

    Raises:
        UsageError: an option differs from the job's, or the job's are corrupt.
    """
    for name, dest, flag in _MESSAGE_OPTIONS:
        value = recorded.get(name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"the job's recorded {name} is corrupt in Redis")
        given = getattr(args, dest)
        if given is None:
            setattr(args, dest, value)
        elif value is not None and given != value:
            # (None recorded: a job run from Python; the input's fingerprint decides.)
            raise UsageError(
                f"{flag} differs from the job's: its runs were given another, so the report "
                f"would read the input's rows as other messages; drop {flag} to use the job's"
            )
    ignore = recorded.get("ignore_columns", [])
    if not isinstance(ignore, list) or not all(isinstance(n, str) for n in ignore):
        raise UsageError("the job's recorded ignore_columns are corrupt in Redis")
    return frozenset(ignore)


def _check_job_input(
    jobs: ModuleType,
    status: JobStatus,
    source: Source,
    fmt: str,
    defaults: RowDefaults,
    items: Sequence[SendRequest | None],
) -> None:
    """Refuse an input that is not the job's: its report would name other rows.

    The job records its input's fingerprint: ``send-many``'s (the file's bytes and the
    message options), or, for a job run from Python, ``job_fingerprint`` of its items.

    Raises:
        UsageError: the input's fingerprint is neither.
    """
    if status.fingerprint == scan_input(source, fmt, defaults).fingerprint:
        return
    if status.fingerprint == jobs.job_fingerprint(items):
        return
    raise UsageError(
        f"--input {source.display} is not the job's input (its sha256, with the job's "
        "message options, differs from the one the job recorded): give the file its runs "
        "were given"
    )


def _status_json(status: JobStatus) -> dict[str, Any]:
    c = status.counts
    return {
        "job": status.name,
        "state": status.state,
        "complete": status.complete,
        "items": status.items,
        "sent": c.sent,
        "failed": c.failed,
        "unknown": c.unknown,
        "skipped": c.skipped,
        "in_flight": status.in_flight,
        "chunks": status.chunks,
        "chunks_done": status.done,
        "workers_alive": status.workers_alive,
        "rate": round(status.rate, 3),
        "eta": status.eta,
        "stopped_by": status.stopped_by,
        "rewound": status.rewound,
    }


# -- send-many --redis --workers N: N runs of the job on this machine ------------------

#: ``send-many`` options a ``--workers`` parent does not hand to its runs: credentials
#: (they go through the environment, never a command line), what only the parent does
#: (``--out``, progress, ``--workers``), the file journal's (refused with ``--redis``),
#: and argparse's own.
NOT_FORWARDED: Final = frozenset(
    {
        "base_url",
        "username",
        "password_stdin",
        "out",
        "workers",
        "progress_interval",
        "grant_log",
        "journal",
        "resume",
        "durable",
        "worker_of",
        "input",
        "command",
        "handler",
        "log_level",
    }
)

#: Options handed to each run as ``--flag=value`` (a value may start with "-").
_VALUED: Final = (
    ("loop", "--loop"),
    ("format", "--format"),
    ("text", "--text"),
    ("subject", "--subject"),
    ("sender_name", "--sender-name"),
    ("ignore_columns", "--ignore-columns"),
    ("concurrency", "--concurrency"),
    ("rate", "--rate"),
    ("per_department_rate", "--per-department-rate"),
    ("redis", "--redis"),
    ("job", "--job"),
    ("claim_timeout", "--claim-timeout"),
    ("chunk_size", "--chunk-size"),
    ("job_ttl", "--job-ttl"),
)
#: Switches handed to each run when set.
_SWITCHES: Final = (
    ("allow_insecure_http", "--allow-insecure-http"),
    ("resend_unknown", "--resend-unknown"),
    ("skip_invalid", "--skip-invalid"),
    ("accept_redis_loss", "--accept-redis-loss"),
)


def worker_argv(args: argparse.Namespace, fmt: str, parent: int) -> list[str]:
    """The ``botmsg`` arguments of one run a ``--workers N --redis`` parent starts.

    The parent's own arguments minus ``NOT_FORWARDED`` (and with ``--format``
    resolved to ``fmt``), plus ``--worker-of parent``.
    """
    argv = [f"--log-level={args.log_level}"] if getattr(args, "log_level", None) else []
    argv.append("send-many")
    for dest, flag in _VALUED:
        value = fmt if dest == "format" else getattr(args, dest)
        if value is not None:
            argv.append(f"{flag}={value}")
    argv += [flag for dest, flag in _SWITCHES if getattr(args, dest)]
    argv += [f"--worker-of={parent}", "--", args.input]
    return argv


async def _watch_parent(parent: int | None, stop: asyncio.Event) -> None:
    """Stop this run (it drains) once the ``--workers`` parent ``parent`` is gone."""
    if parent is None:
        return
    # The parent's death reparents this process: no pipe or signal needed to see it.
    while os.getppid() == parent:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    stop.set()


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"ended with exit code {code}"


def _run_workers(
    args: argparse.Namespace,
    console: Console,
    jobs: ModuleType,
    fmt: str,
    creds: Credentials,
    out: TextIO | None,
    items: FileItems,
) -> int:
    """Run ``args.workers`` runs of the job as child processes; report the job once.

    Each child is ``botmsg send-many`` with this run's arguments (``worker_argv``)
    and the credentials in its environment: it joins the job as a run started
    by hand would. The first SIGINT/SIGTERM goes to every child (they drain), a
    second too (they abandon). A child that dies is a run that died: the others
    take over its chunks after ``--claim-timeout``. When all have ended, the
    summary and ``--out`` are the job's, as a single run writes them.

    Returns:
        130 after a signal; 2 when every run refused (usage error: nothing sent);
        3 when Redis cannot be read at the end (the report not complete); else the
        exit code of the job's report (0, 1 or 3), as a single run's.

    Raises:
        UsageError: a run could not be started.
    """
    argv = worker_argv(args, fmt, os.getpid())
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOTMSG_")}
    env.update(
        {ENV_BASE_URL: creds.base_url, ENV_USERNAME: creds.username, ENV_PASSWORD: creds.password}
    )
    received: list[int] = []
    procs: list[asyncio.subprocess.Process] = []

    def forward(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            console.err(
                "stopping: every run finishes its sends in flight and starts no new one; "
                "signal again to abandon them (their outcome would be unknown)"
            )
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    async def relay(number: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            try:
                raw = await proc.stderr.readline()
            except ValueError:  # a line over the stream's limit: its start is dropped
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n").removeprefix("botmsg: ")
            console.err(f"run {number}: {line}")

    async def progress() -> None:
        while True:
            await asyncio.sleep(args.progress_interval)
            if procs and all(proc.returncode is not None for proc in procs):
                return  # the summary follows
            try:
                status = await jobs.job_status(
                    args.redis, args.job, claim_timeout=args.claim_timeout
                )
            except BotMessageError:
                continue  # Redis away for a moment (the runs wait for it too), a bad URL
            if status.state != "missing" and not status.complete:  # complete: the summary
                console.err(f"progress: {_describe(status)}")

    async def start() -> list[int]:
        relays = []
        for number in range(1, args.workers + 1):
            if received:
                break  # stopped while starting: no new run
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "botmsg_async",
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                # Its own process group: a terminal's Ctrl-C reaches the parent only,
                # which forwards it once (twice would abandon the sends in flight).
                start_new_session=True,
            )
            procs.append(proc)
            relays.append(asyncio.ensure_future(relay(number, proc)))
        codes = [await proc.wait() for proc in procs]
        await asyncio.gather(*relays)
        return codes

    async def go() -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, forward, signum)
        ticker = asyncio.ensure_future(progress())
        try:
            codes = await start()
        except OSError as exc:
            raise UsageError(f"cannot start a run: {exc.strerror}") from None
        finally:
            ticker.cancel()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            await _end_all(procs)
        return await sum_up(codes)

    async def sum_up(codes: list[int]) -> int:
        for number, code in enumerate(codes, 1):
            if code not in (EXIT_OK, EXIT_USAGE) and not (received and code == EXIT_INTERRUPTED):
                console.err(f"run {number} {_ended(code)}: its items in flight are unknown")
        if codes and all(code == EXIT_USAGE for code in codes):
            return EXIT_USAGE
        try:
            status = await jobs.job_status(args.redis, args.job, claim_timeout=args.claim_timeout)
        except jobs.JobError as exc:
            code = _report_failed(console, exc)
            return EXIT_INTERRUPTED if received else code
        if status.state == "missing":
            console.err(f"no run joined the job {args.job!r}: nothing was sent")
            return EXIT_USAGE
        console.err(f"{len(codes)} run(s) on this machine: {_describe(status)}")
        if received:
            return EXIT_INTERRUPTED
        if not status.complete and status.state == "running":
            console.err(
                "the job is not complete: runs elsewhere, or one that died, hold its last "
                "chunks (taken over after --claim-timeout); see botmsg job status"
            )
        results = jobs.iter_job_results(args.redis, args.job, items)
        try:
            code, _ = await _write_report(console, out, results, items)
        except jobs.JobError as exc:
            return _report_failed(console, exc)
        return code

    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        return runner.run(go())


async def _end_all(procs: Sequence[asyncio.subprocess.Process]) -> None:
    """Leave no run behind: SIGTERM (drain), then SIGKILL those still alive after 10 s.

    Normally every run has ended already; this is for a parent leaving on an error.
    """
    alive = [proc for proc in procs if proc.returncode is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    for proc in alive:
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
