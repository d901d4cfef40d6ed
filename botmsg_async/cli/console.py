"""Everything ``botmsg`` prints, with credentials kept out and terminals kept safe.

One ``Console`` per run holds what output needs to know: the secrets to redact
and the progress bar on screen. Every output (stdout, stderr, logs, ``--out``,
the journal's strings) goes through it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any, Final

from botmsg_async import Progress

__all__ = ["Bar", "Console", "Redactor"]

log = logging.getLogger("botmsg_async.cli")


class Redactor:
    """Replaces every known secret in text bound for stderr or a log.

    Secrets are registered as soon as they are known: the password, and the
    ``Authorization`` value (and its base64 part) built from it.
    """

    def __init__(self) -> None:
        self._secrets: list[str] = []

    def add_credentials(self, username: str, password: str) -> None:
        """Register the secrets that ``username`` and ``password`` make."""
        pair = f"{username}:{password}"
        # surrogatepass: a password from a surrogate-escaped argv or environment must
        # not crash the redactor; such a token is never sent (the client refuses it).
        token = base64.b64encode(pair.encode("utf-8", "surrogatepass")).decode()
        for secret in (pair, password, token):
            # A password of one to three characters is everywhere in ordinary text:
            # blanking it would garble every message and, by the gaps, reveal it.
            if len(secret) >= 4 and secret not in self._secrets:
                self._secrets.append(secret)
        # Longest first, so that a password inside the token cannot break the token's match.
        self._secrets.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text

    def scrub(self, obj: object) -> object:
        """``obj`` (JSON-like: dicts, lists, strings...) with every string redacted.

        Done on the values, before encoding: a secret holding ``"`` or ``\\`` is
        escaped in JSON text, where a search for it would miss it.
        """
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, dict):
            return {self(str(k)): self.scrub(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.scrub(v) for v in obj]
        return obj


#: Characters that must never reach a terminal raw: C0 and C1 controls and DEL
#: (an ESC or a CSI, U+009B, can erase lines, move the cursor, fake a summary),
#: bidi controls (they reorder what is shown: "sent" can be made to read
#: "failed"), the line and paragraph separators (str.splitlines() and JavaScript
#: end a line there: one --out record would read as two), and lone surrogates
#: (they cannot even be encoded).
_UNSAFE_CHARS: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _escape_json_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class _RedactingFormatter(logging.Formatter):
    """A formatter whose output (message, arguments and traceback) never holds a secret."""

    def __init__(self, console: Console, fmt: str, datefmt: str) -> None:
        super().__init__(fmt, datefmt)
        self._console = console

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The record's own line: its line breaks (from a server's words in an error,
        # a URL's decoded path) are escaped, so that no text can forge a record.
        return self._console.printable(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        # Line by line: a traceback keeps its line breaks, a message cannot add any
        # (formatMessage escaped them).
        printable = self._console.printable
        return "\n".join(printable(line) for line in super().format(record).split("\n"))


class _CliLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``botmsg`` installs; a second ``main()`` in one process replaces it."""


class Console:
    """The output of one ``botmsg`` run: stdout, stderr and logs, made safe.

    Attributes:
        redact: The secrets known so far; register credentials here as soon as
            they are read.
        active_bar: The progress bar on screen, if any: messages go above it,
            not through it (set by ``Bar``).
    """

    def __init__(self) -> None:
        self.redact = Redactor()
        self.active_bar: Any = None
        #: Whether stdout's reader went away (EPIPE): what is left for it is dropped.
        self._stdout_gone = False

    def printable(self, text: str, *, json_text: bool = False) -> str:
        """``text`` made safe for any output: secrets redacted, unsafe characters escaped.

        The one function every output of ``botmsg`` goes through (stdout, stderr,
        logs, ``--out``). Unsafe characters (``_UNSAFE_CHARS``) become visible
        escapes (``\\x1b``, ``\\u202e``); with ``json_text``, ``text`` is JSON and they
        become JSON escapes (``\\u001b``), which leave its meaning unchanged: outside
        strings, JSON text is plain ASCII.
        """
        text = self.redact(text)
        return _UNSAFE_CHARS.sub(_escape_json_char if json_text else _escape_char, text)

    def dumps(self, obj: object) -> str:
        """``obj`` as one line of JSON for stdout or ``--out``: redacted, unsafe characters
        escaped."""
        text = json.dumps(self.redact.scrub(obj), ensure_ascii=False, separators=(",", ":"))
        return self.printable(text, json_text=True)

    def err(self, message: str) -> None:
        """Print one message for a human on stderr."""
        text = self.printable(f"botmsg: {message}")
        try:
            if self.active_bar is not None:
                self.active_bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)
        except BrokenPipeError:  # nobody reads stderr any more: nobody to tell
            _discard(sys.stderr)

    def out(self, text: str) -> None:
        """Print one line (or lines) for stdout, each made safe by ``printable``.

        When stdout's reader has gone (``botmsg send | head -c0``: EPIPE), that is
        said once on stderr and the rest of stdout is dropped: the command goes on
        to the exit code of what it did (a message sent is not "failed" because its
        JSON found no reader, and an unknown outcome must still exit 3).
        """
        if self._stdout_gone:
            return
        try:
            print("\n".join(self.printable(line) for line in text.split("\n")), flush=True)
        except BrokenPipeError:
            self._stdout_gone = True
            _discard(sys.stdout)
            self.err("standard output is closed (broken pipe); the rest of it is dropped")

    def setup_logging(self, level_name: str) -> None:
        """Send log records to stderr through this console's filter, at ``level_name``."""
        handler = _CliLogHandler(sys.stderr)
        handler.setFormatter(
            _RedactingFormatter(self, "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root = logging.getLogger()
        for old in [h for h in root.handlers if isinstance(h, _CliLogHandler)]:
            root.removeHandler(old)
        root.addHandler(handler)
        root.setLevel(getattr(logging, level_name))

    @staticmethod
    def progress_logger() -> Callable[[Progress], None] | None:
        """For logs of unattended runs (``--log-level INFO``): a progress line callback."""
        return _log_progress if log.isEnabledFor(logging.INFO) else None


def _discard(stream: Any) -> None:
    """Point ``stream``'s descriptor at /dev/null, its reader having gone (EPIPE).

    What is still in its buffer is then dropped when flushed, at the latest at
    exit, where a failed flush would print "Exception ignored" and exit 120.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _log_progress(progress: Progress) -> None:
    log.info(
        "progress: %d sent, %d failed, %d unknown, %d in flight, %d retries; %.0f messages/s",
        progress.sent,
        progress.failed,
        progress.unknown,
        progress.in_flight,
        progress.retries,
        progress.rate,
    )


def _bar_size() -> tuple[int, int] | None:
    """A fixed size (columns, rows) for the bar when the terminal reports none, else None.

    Some terminals (a serial console, a container started without a tty size)
    report 0 columns and 0 rows; tqdm then draws nothing at all (it takes the
    bar for one below the last row). Then ``COLUMNS`` and ``LINES`` if they are
    positive numbers, else 80 by 24, as ``shutil.get_terminal_size`` falls back.
    """
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return None  # a real size: follow it as it changes
    return (
        size.columns if size.columns > 0 else _positive_env("COLUMNS", 80),
        size.lines if size.lines > 0 else _positive_env("LINES", 24),
    )


def _positive_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdecimal() and 0 < int(value) < 10_000 else default


class Bar:
    """A tqdm progress bar on stderr when it is a terminal; does nothing otherwise."""

    def __init__(self, console: Console, total: int, desc: str) -> None:
        self._console = console
        self._bar: Any = None
        self._shown = (0, 0)
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - the `cli` extra brings it
            return
        size = _bar_size()
        self._bar = tqdm(
            total=total,
            desc=desc,
            unit="msg",
            file=sys.stderr,
            ncols=None if size is None else size[0],
            nrows=None if size is None else size[1],
            dynamic_ncols=size is None,
        )
        console.active_bar = self._bar

    def update(self, failed: int, unknown: int) -> None:
        """One more item done; show the failed and unknown counts once there are any."""
        if self._bar is None:
            return
        if (failed, unknown) != self._shown:
            self._shown = (failed, unknown)
            self._bar.set_postfix(failed=failed, unknown=unknown, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Take the bar off the screen; a second call does nothing."""
        if self._bar is not None:
            self._bar.close()
            self._bar = self._console.active_bar = None
