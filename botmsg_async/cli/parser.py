"""The ``botmsg`` argument parser: subcommands, flags, help texts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Final

from botmsg_async import __version__

from .common import ENV_BASE_URL, ENV_PASSWORD, ENV_USERNAME, UsageError
from .jobs import cmd_job
from .loops import LOOPS
from .offline import cmd_demo, cmd_fake_server
from .send import cmd_send
from .send_many import cmd_send_many
from .workers import parse_workers

__all__ = ["build_parser", "check_no_password_argument"]

_EPILOG: Final = """\
credentials: BOTMSG_BASE_URL, BOTMSG_USERNAME and BOTMSG_PASSWORD, or --base-url,
  --username and --password-stdin (first line of stdin), or a prompt on a terminal.

exit codes:
  0  every message sent
  1  some messages failed (not delivered)
  2  usage or input error: nothing was sent
  3  some outcomes unknown: they may or may not have been delivered (wins over 1)
  130 interrupted by SIGINT or SIGTERM
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number of seconds above 0")
    return value


def _rate(text: str) -> float:
    value = float(text)
    # Finite both ways: an infinite rate, or one whose period 1/rate is infinite,
    # would hang or crash the rate limiter mid-run instead of failing here.
    if not (value > 0 and math.isfinite(value) and math.isfinite(1 / value)):
        raise argparse.ArgumentTypeError("must be a finite number of messages per second above 0")
    return value


#: Longest --job-ttl and --claim-timeout (seconds): a century. Redis's EXPIRE and
#: XAUTOCLAIM refuse much longer ones, a job's create script half-way.
_MAX_SECONDS: Final = 100 * 365 * 86400


def _claim_timeout(text: str) -> float:
    value = float(text)
    if not 0 < value <= _MAX_SECONDS:  # NaN fails both
        raise argparse.ArgumentTypeError("must be a number of seconds above 0, at most 100 years")
    return value


def _job_ttl(text: str) -> float:
    value = float(text)
    if not 1 <= value <= _MAX_SECONDS:  # whole seconds (Redis's EXPIRE): 0.5 would be 0
        raise argparse.ArgumentTypeError("must be a number of seconds from 1 to 100 years")
    return value


def _delay(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):  # NaN or inf: every request would hang
        raise argparse.ArgumentTypeError("must be a finite number of seconds, 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``botmsg`` argument parser.

    Each subcommand sets ``handler``: a function of the parsed arguments and a
    ``Console`` that returns the exit code.
    """
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="botmsg",
        description="Send bot messages to users (botmsg-async).",
        epilog=_EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    parser.add_argument("--log-level", choices=levels, default="WARNING", help="default: WARNING")
    parser.add_argument("--version", action="version", version=f"botmsg {__version__}")

    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    # SUPPRESS: a subcommand's default must not overwrite a value given before it.
    common.add_argument("--log-level", choices=levels, default=argparse.SUPPRESS)
    common.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop when installed (the speed extra), else asyncio (default: auto)",
    )
    client = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = client.add_argument_group("service")
    group.add_argument("--base-url", help=f"the URL before /communications (or {ENV_BASE_URL})")
    group.add_argument("--username", help=f"Basic-auth user name (or {ENV_USERNAME})")
    group.add_argument(
        "--password-stdin",
        action="store_true",
        help=f"read the password from the first line of stdin (else {ENV_PASSWORD}, else a prompt)",
    )
    group.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="permit http:// to a host that is not loopback (the password travels in clear)",
    )
    message = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = message.add_argument_group("message")
    group.add_argument("--subject", help="subject line")
    group.add_argument("--sender-name", help="name the message appears to come from")

    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=argparse.ArgumentParser
    )

    send = sub.add_parser(
        "send",
        parents=[common, client, message],
        help="send one message",
        description="Send one message; print the outcome as JSON on stdout.",
        epilog=_EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    send.add_argument("--department", "-d", required=True, help="department UUID")
    send.add_argument("--user", "-u", required=True, help="user UUID")
    send.add_argument("--text", "-t", required=True, help="the message text")
    send.add_argument(
        "--idempotency-key",
        help="key of an earlier try, to resend that same message to a deduplicating service",
    )
    send.set_defaults(handler=cmd_send)

    many = sub.add_parser(
        "send-many",
        parents=[common, client, message],
        help="send the messages of a CSV or JSONL file",
        description=_SEND_MANY_HELP,
        epilog=_EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    many.add_argument("input", metavar="INPUT", help="CSV or JSONL file; - for stdin")
    many.add_argument(
        "--format", choices=["csv", "jsonl"], help="default: by extension, else sniffed"
    )
    many.add_argument("--text", "-t", help="one text for every row (instead of a text column)")
    many.add_argument("--concurrency", "-c", type=_positive_int, default=32, help="default: 32")
    many.add_argument("--rate", type=_rate, help="most messages per second (default: no limit)")
    many.add_argument(
        "--per-department-rate",
        type=_rate,
        help="most messages per second to one department (default: no limit)",
    )
    many.add_argument(
        "--workers",
        type=parse_workers,
        default=1,
        metavar="N",
        help="worker processes sending as one job; auto: one per usable core (default: 1)",
    )
    # Each rate-limit grant appended to FILE (for audits and the tests of the limits).
    many.add_argument("--grant-log", metavar="FILE", help=argparse.SUPPRESS)
    many.add_argument("--out", "-o", metavar="FILE", help="one JSON line per item; - for stdout")
    many.add_argument("--journal", metavar="FILE", help="crash-safe progress file")
    many.add_argument("--resume", action="store_true", help="continue the run of --journal")
    many.add_argument(
        "--durable",
        action="store_true",
        help="fsync each start record before its send, so that even a power cut loses "
        "no trace of a send (costs throughput; see below)",
    )
    many.add_argument(
        "--resend-unknown",
        action="store_true",
        help="with --resume or --redis: send in-doubt items again, with their idempotency key",
    )
    many.add_argument(
        "--skip-invalid",
        action="store_true",
        help="send the valid rows, skip (and list) the others",
    )
    many.add_argument(
        "--ignore-columns",
        metavar="A,B",
        help="extra CSV columns / JSON keys to read past (others not read are refused)",
    )
    many.add_argument(
        "--progress-interval",
        metavar="SECONDS",
        type=_positive_float,
        default=10.0,
        help="when stderr is no terminal, a progress line this often (default: 10)",
    )
    group = many.add_argument_group("one job on many machines (Redis, extra 'redis')")
    group.add_argument("--redis", metavar="URL", help="the Redis that holds the job (--job)")
    group.add_argument("--job", metavar="NAME", help="the job to create or join")
    group.add_argument(
        "--claim-timeout",
        type=_claim_timeout,
        default=30.0,
        metavar="SECONDS",
        help="a run silent this long has its chunks taken over (default: 30)",
    )
    group.add_argument(
        "--chunk-size", type=_positive_int, default=256, help="items per chunk (default: 256)"
    )
    group.add_argument(
        "--job-ttl",
        type=_job_ttl,
        default=7 * 24 * 3600.0,
        metavar="SECONDS",
        help="the job's records expire this long after its last activity (default: 7 days)",
    )
    group.add_argument(
        "--accept-redis-loss",
        action="store_true",
        help="run on a Redis without 'appendonly yes' and 'appendfsync always': a crash of "
        "Redis could then make messages sent twice",
    )
    # A run started by a `--workers N --redis` parent: quiet, no report, drains when that
    # parent (this pid) is gone, so that no run outlives it.
    group.add_argument("--worker-of", type=int, metavar="PID", help=argparse.SUPPRESS)
    many.set_defaults(handler=cmd_send_many)

    job = sub.add_parser(
        "job",
        parents=[common],
        help="status, report or cancel of a job shared through Redis",
        description="Look at or cancel a job of 'send-many --redis URL --job NAME'.",
        allow_abbrev=False,
    )
    job_sub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    where.add_argument("--redis", metavar="URL", required=True, help="the Redis of the job")
    where.add_argument("--job", metavar="NAME", required=True, help="the job's name")
    status = job_sub.add_parser(
        "status", parents=[common, where], help="counts, rate, workers alive, ETA"
    )
    status.add_argument("--watch", action="store_true", help="again every --interval seconds")
    status.add_argument("--interval", type=_positive_float, default=2.0, help="default: 2")
    status.add_argument("--json", action="store_true", help="one JSON object per line")
    status.add_argument(
        "--claim-timeout", type=_positive_float, default=30.0, help=argparse.SUPPRESS
    )
    report = job_sub.add_parser(
        "report",
        parents=[common, where, message],
        help="one line per item, as send-many --out writes them",
    )
    report.add_argument("--out", "-o", metavar="FILE", default="-", help="default: stdout")
    report.add_argument(
        "--input", metavar="FILE", help="the job's INPUT: fills department_uuid and user_uuid"
    )
    report.add_argument(
        "--format", choices=["csv", "jsonl"], help="default: the job's (by extension)"
    )
    report.add_argument("--text", "-t", help="default: the job's (as given to send-many)")
    job_sub.add_parser(
        "cancel", parents=[common, where], help="nothing new starts anywhere; in-flight finish"
    )
    job.set_defaults(handler=cmd_job)

    fake = sub.add_parser(
        "fake-server",
        parents=[common],
        help="run a fake service on 127.0.0.1 for manual tries",
        description=(
            "Run botmsg_async.testing.FakeBotMessageServer in the foreground and print its "
            "base URL. User 'user', password 'secret' unless --username/--password-stdin."
        ),
        allow_abbrev=False,
    )
    fake.add_argument("--port", type=int, default=0, help="default: any free port")
    fake.add_argument(
        "--fault-rate",
        type=float,
        help="share of requests that get a random fault, spread over every fault a retry "
        "can get through (ambiguous ones included: 500, dropped connections...)",
    )
    fake.add_argument("--latency", type=_delay, default=0.0, help="seconds every request waits")
    fake.add_argument("--seed", type=int, help="makes faults and answered UUIDs reproducible")
    fake.add_argument("--username", help="the user name to accept (default: user)")
    fake.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password to accept from stdin (default: secret)",
    )
    fake.set_defaults(handler=cmd_fake_server)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="send a realistic batch to an in-process fake service",
        description=(
            "Start a fake service with faults switched on, send 2,000 messages to 200 users "
            "in 10 departments, and report. Needs no configuration and no network."
        ),
        allow_abbrev=False,
    )
    demo.add_argument("--messages", type=_positive_int, default=2000, help=argparse.SUPPRESS)
    demo.add_argument("--concurrency", type=_positive_int, default=64, help=argparse.SUPPRESS)
    demo.add_argument("--seed", type=int, default=2024, help=argparse.SUPPRESS)
    demo.set_defaults(handler=cmd_demo)
    return parser


_SEND_MANY_HELP: Final = """\
Send the messages of a CSV file (with a header) or a JSON-lines file, with
the fields department_uuid, user_uuid and optionally text, subject, sender_name
and idempotency_key (the row's own key, used instead of a new one in every run).
--text, --subject and --sender-name apply to every row, in place of the row's
own value; without them, each row's own value is used. Any other column or key
is refused (a misspelt one would be lost), unless named by --ignore-columns.

The whole input is checked before anything is sent: any invalid row is listed
with its line number and nothing is sent (exit 2), unless --skip-invalid.

--journal FILE records each item's start before it is sent and its outcome as
soon as it is known, so that after a crash (even kill -9) --resume sends only
what was never tried: items in flight at the crash are reported unknown and not
sent again, unless --resend-unknown (same idempotency key). --resume takes
--text, --subject, --sender-name, --format and --ignore-columns from the journal
when they are not given; given, they must be the same.

On a terminal stderr shows a progress bar; elsewhere (a log, nohup, systemd) a
progress line every --progress-interval seconds.

The journal survives a crash of botmsg (even kill -9), but it is fsynced only at
the end: a power cut or OS crash can lose its last seconds, and items sent then
could be sent again by --resume. A torn last record is detected and a window of
items around it held back as unknown, but a longer loss goes unnoticed.
--durable fsyncs each start record before its send (one fsync shared by all
sends ready at the time), so that nothing sent is ever forgotten.

--workers N sends from N processes (auto: one per usable core; at most four per
core) as one job: a worker takes a new chunk of items when it runs low; --rate is
one limit for all of them; with --per-department-rate each department is sent by
one worker; a
429's pause and refused credentials stop them all. The journal is FILE plus a
segment per worker (FILE.part-RUN-WORKER); --resume works with any --workers.
A worker that dies leaves its items in flight unknown; the others take the rest.
--out lines come in the order results become known; "index" is the input row.

--redis URL --job NAME makes the run one of a job shared through Redis: run the
same command, with the same INPUT, on every machine (or several times on one).
The first run creates the job (the input's sha256 and options recorded; another
input or other options under NAME: exit 2, nothing sent); each run takes chunks
of --chunk-size items. As with --journal, each item's start is recorded in Redis
before its first attempt, so no item is sent twice: a run that dies leaves its
items in flight unknown (never resent under a new key; --resend-unknown resends
the job's unknown items under their same key, even once the job is complete)
and another run takes its chunks over after --claim-timeout. --rate and
--per-department-rate are one quota across all runs; a 429's pause, refused
credentials and 'botmsg job cancel' reach every run. Redis must be durable
('appendonly yes', 'appendfsync always'), else the run refuses unless
--accept-redis-loss. --out and the exit code cover the whole job; see 'botmsg
job status|report|cancel'. With --workers N, N runs of the job start on this
machine (each with --concurrency sends in flight); a signal reaches them all.
"""


def check_no_password_argument(argv: Sequence[str]) -> None:
    """Refuse ``--password`` before argparse, which would echo its value as unrecognized."""
    for arg in argv:
        if arg == "--":
            return
        if arg == "--password" or arg.startswith("--password="):
            raise UsageError(
                "there is no --password option, so that passwords stay out of shell history "
                f"and process lists; use {ENV_PASSWORD}, --password-stdin or the prompt"
            )
