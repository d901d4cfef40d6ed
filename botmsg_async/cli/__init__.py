"""The ``botmsg`` command line: send one message, send a file of them, or try it all offline.

Subcommands:

* ``botmsg send``: one message; the outcome as JSON on stdout.
* ``botmsg send-many INPUT``: a CSV or JSONL file of messages, validated in full
  before anything is sent, then streamed through ``BotMessageClient.stream_many``
  with an optional per-item ``--out`` file and a crash-safe ``--journal``.
* ``botmsg fake-server``: the fake service of ``botmsg_async.testing``, for manual tries.
* ``botmsg demo``: a realistic batch against an in-process fake service with faults.

Credentials come from ``BOTMSG_BASE_URL``, ``BOTMSG_USERNAME`` and
``BOTMSG_PASSWORD``, or ``--base-url``, ``--username`` and ``--password-stdin``,
or a prompt on a terminal. There is deliberately no ``--password VALUE`` flag:
a command line is visible to every user of the machine and lands in shell
history. Credentials never appear in any output, log or error message.

Exit codes: 0 every message sent; 1 some failed (not delivered); 2 usage or input
error, nothing sent; 3 some outcomes unknown (they may or may not have been
delivered: a human has to look, so 3 wins over 1); 130 interrupted (SIGINT or
SIGTERM).

The package uses only the public API of ``botmsg_async`` (and its public
``journal`` and ``testing`` modules), one module per job: ``parser``
(arguments), ``console`` (all output, redacted and escaped), ``credentials``,
``input`` (reading and checking ``send-many`` input), ``send``, ``send_many``
and ``results`` (the bulk run and its accounting), ``signals`` and ``offline``
(``fake-server``, ``demo``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_USAGE,
    UsageError,
)
from .console import Console
from .loops import loop_factory
from .parser import build_parser, check_no_password_argument

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNKNOWN",
    "EXIT_USAGE",
    "build_parser",
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``botmsg`` command line; return the exit code.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        0 all sent, 1 some failed, 2 usage or input error, 3 some outcomes
        unknown, 130 interrupted.
    """
    _fill_closed_streams()
    if isinstance(sys.stdout, io.TextIOWrapper):
        # stdout carries JSON (send's result, --out -), UTF-8 as an --out file is,
        # whatever the locale: a Latin-1 or ASCII one could not encode a non-ASCII id.
        sys.stdout.reconfigure(encoding="utf-8")
    console = Console()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_no_password_argument(argv)
    except UsageError as exc:
        console.err(str(exc))
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    console.setup_logging(args.log_level)
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    try:
        with _sigterm_interrupts():
            loop_factory(args.loop)  # a missing uvloop is a usage error before anything else
            return handler(args, console)
    except UsageError as exc:
        console.err(f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.err("interrupted")
        return EXIT_INTERRUPTED


def _fill_closed_streams() -> None:
    """Put ``/dev/null`` on a standard stream the caller closed (``2>&-``, ``<&-``).

    Python leaves ``sys.stdin``/``sys.stderr`` None then (every use of them would
    crash, with a traceback nobody sees), and the first file or socket opened
    takes the free descriptor: a journal on fd 2 would get whatever is written to
    stderr. stdout keeps ``sys.stdout`` None, so that ``--out -`` is refused
    rather than thrown away; its descriptor is taken all the same.
    """
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # pragma: no cover - the lowest free descriptor is fd
                os.dup2(null, fd)
                os.close(null)
        if name != "stdout":
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as SIGINT does, until the event loop takes both.

    Before the loop runs (reading stdin, checking the input, starting workers),
    SIGTERM would otherwise kill the process by its default action (exit 143,
    not the 130 the docs give); during the run, the loop's handlers stop it cleanly.
    """
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
