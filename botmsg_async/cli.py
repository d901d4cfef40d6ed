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
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import csv
import getpass
import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal, TextIO

from . import _journal
from ._batch import ItemResult, Outcome, Progress
from ._client import BotMessageClient
from ._delivery import may_resend, settles_doubt
from ._errors import (
    APIStatusError,
    BotMessageError,
    DeliveryUnknownError,
    InvalidRequestError,
    InvalidResponseError,
    RateLimitedError,
    SendFailedError,
)
from ._models import SendRequest, SendResult, TextMessage
from ._retry import RetryBudget, RetryPolicy
from ._validate import check_base_url, check_id

if TYPE_CHECKING:
    # Imported when used: the fake service is for fake-server and demo only.
    from .testing import FakeBotMessageServer

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNKNOWN",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_OK: Final = 0  #: Every message was sent.
EXIT_FAILED: Final = 1  #: Some messages were not delivered.
EXIT_USAGE: Final = 2  #: Usage or input error; nothing was sent.
EXIT_UNKNOWN: Final = 3  #: Some messages may or may not have been delivered.
EXIT_INTERRUPTED: Final = 130  #: Stopped by SIGINT or SIGTERM.

ENV_BASE_URL: Final = "BOTMSG_BASE_URL"
ENV_USERNAME: Final = "BOTMSG_USERNAME"
ENV_PASSWORD: Final = "BOTMSG_PASSWORD"  # noqa: S105 - the name of a variable, not a secret

FIELDS: Final = ("department_uuid", "user_uuid", "text", "subject", "sender_name")
REQUIRED_FIELDS: Final = ("department_uuid", "user_uuid")
#: Largest message text, in bytes of UTF-8; the same in CSV and JSONL. Same as the SDK's limit.
MAX_TEXT_BYTES: Final = 1024 * 1024
#: Largest CSV cell the csv module reads, in characters (its default is 128 Ki): far
#: enough above MAX_TEXT_BYTES that a text over the limit is reported as such, with its
#: line, and the row alone is refused; a cell beyond even this stops the read (memory).
_CSV_FIELD_LIMIT: Final = 16 * MAX_TEXT_BYTES
#: Invalid rows listed one by one on stderr; the rest are only counted.
MAX_LISTED_ROWS: Final = 50
#: Items not sent listed on stderr when there is no --out file to find them in.
MAX_LISTED_FAILURES: Final = 20

log = logging.getLogger("botmsg_async.cli")


class UsageError(Exception):
    """A usage or input error: reported on stderr, exit code 2, nothing sent."""


# -- output, with credentials kept out ---------------------------------------------


class _Redactor:
    """Replaces every known secret in text bound for stderr or a log.

    Secrets are registered as soon as they are known: the password, and the
    ``Authorization`` value (and its base64 part) built from it.
    """

    def __init__(self) -> None:
        self._secrets: list[str] = []

    def add_credentials(self, username: str, password: str) -> None:
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


_redact = _Redactor()

#: Characters that must never reach a terminal raw: C0 and C1 controls and DEL
#: (an ESC or a CSI, U+009B, can erase lines, move the cursor, fake a summary),
#: bidi controls (they reorder what is shown: "sent" can be made to read
#: "failed"), and lone surrogates (they cannot even be encoded).
_UNSAFE_CHARS: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _escape_json_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _printable(text: str, *, json_text: bool = False) -> str:
    """``text`` made safe for any output: secrets redacted, unsafe characters escaped.

    The one function every output of ``botmsg`` goes through (stdout, stderr,
    logs, ``--out``). Unsafe characters (``_UNSAFE_CHARS``) become visible
    escapes (``\\x1b``, ``\\u202e``); with ``json_text``, ``text`` is JSON and they
    become JSON escapes (``\\u001b``), which leave its meaning unchanged: outside
    strings, JSON text is plain ASCII.
    """
    text = _redact(text)
    return _UNSAFE_CHARS.sub(_escape_json_char if json_text else _escape_char, text)


class _RedactingFormatter(logging.Formatter):
    """A formatter whose output (message, arguments and traceback) never holds a secret."""

    def format(self, record: logging.LogRecord) -> str:
        # Line by line: a traceback keeps its line breaks, a message cannot add any.
        return "\n".join(_printable(line) for line in super().format(record).split("\n"))


#: The progress bar on screen, if any: messages go above it, not through it.
_active_bar: Any = None


def _err(message: str) -> None:
    """Print one message for a human on stderr."""
    text = _printable(f"botmsg: {message}")
    if _active_bar is not None:
        _active_bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


class _CliLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``botmsg`` installs; a second ``main()`` in one process replaces it."""


def _setup_logging(level_name: str) -> None:
    handler = _CliLogHandler(sys.stderr)
    handler.setFormatter(
        _RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CliLogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level_name))


def _dumps(obj: object) -> str:
    """``obj`` as one line of JSON for stdout or ``--out``: redacted, unsafe characters escaped."""
    text = json.dumps(_redact.scrub(obj), ensure_ascii=False, separators=(",", ":"))
    return _printable(text, json_text=True)


def _out(text: str) -> None:
    """Print one line (or lines) for stdout, each made safe by ``_printable``."""
    print("\n".join(_printable(line) for line in text.split("\n")), flush=True)


# -- credentials ---------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Where to send and as whom. ``repr`` leaves the password out."""

    base_url: str
    username: str
    password: str = field(repr=False)
    allow_insecure_http: bool = False


def _read_password_stdin() -> str:
    line = sys.stdin.readline()
    # Only the line break goes: spaces may be part of a password.
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise UsageError("--password-stdin: the first line of stdin is empty")
    return password


def _resolve_credentials(
    args: argparse.Namespace, env: Mapping[str, str], *, stdin_taken: bool
) -> Credentials:
    """Credentials from flags, then the environment, then a prompt on a terminal.

    Raises:
        UsageError: something is missing, or stdin is asked for twice.
    """
    base_url = args.base_url or env.get(ENV_BASE_URL, "")
    if not base_url:
        raise UsageError(f"no service URL: pass --base-url or set {ENV_BASE_URL}")
    try:  # before anything runs: the client's own check, worded for a terminal
        check_base_url(base_url, allow_insecure_http=args.allow_insecure_http)
    except InvalidRequestError as exc:
        raise UsageError(f"--base-url (or {ENV_BASE_URL}): {exc}") from None
    except ValueError as exc:  # yarl's own: a port out of range, a broken IPv6 literal...
        raise UsageError(_bad_base_url(exc)) from None
    username = args.username or env.get(ENV_USERNAME, "")
    if not username:
        raise UsageError(f"no user name: pass --username or set {ENV_USERNAME}")
    if args.password_stdin:
        if stdin_taken:
            raise UsageError(
                "--password-stdin cannot share stdin with the input '-'; "
                f"set {ENV_PASSWORD} or pass the input as a file"
            )
        password = _read_password_stdin()
    elif env.get(ENV_PASSWORD):
        password = env[ENV_PASSWORD]
    elif sys.stdin.isatty() and not stdin_taken:
        password = getpass.getpass("botmsg password: ")
        if not password:
            raise UsageError("no password given")
    else:
        raise UsageError(
            f"no password: set {ENV_PASSWORD}, pipe it with --password-stdin, "
            "or run on a terminal to be asked for it"
        )
    _redact.add_credentials(username, password)
    return Credentials(base_url, username, password, args.allow_insecure_http)


def _bad_base_url(exc: ValueError) -> str:
    """A usage message for a URL that does not parse; the URL itself is not repeated,
    as it may carry credentials."""
    return f"--base-url (or {ENV_BASE_URL}) is not a valid URL: {exc}"


def _make_client(creds: Credentials) -> BotMessageClient:
    try:
        return BotMessageClient(
            creds.base_url,
            creds.username,
            creds.password,
            allow_insecure_http=creds.allow_insecure_http,
        )
    except InvalidRequestError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # yarl's, should the client not turn it into its own error
        raise UsageError(_bad_base_url(exc)) from None


# -- one message ------------------------------------------------------------------------


def _error_json(exc: BotMessageError) -> dict[str, Any]:
    """An error as JSON: its type, message and whatever helps act on it."""
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, APIStatusError | InvalidResponseError):
        out["status"] = exc.status
    if isinstance(exc, RateLimitedError):
        out["retry_after"] = exc.retry_after
    if isinstance(exc, SendFailedError):
        out["transient"] = exc.transient
        out["request_uuid"] = exc.result.request_uuid
        out["errors"] = [
            {"code": e.code, "description": e.description, "uid": e.uid} for e in exc.result.errors
        ]
    if isinstance(exc, DeliveryUnknownError):
        out["idempotency_key"] = exc.idempotency_key
    return out


def _result_json(result: SendResult) -> dict[str, Any]:
    return {
        "outcome": Outcome.SENT.value,
        "request_uuid": result.request_uuid,
        "message_uuid": result.message_uuid,
        "attempts": result.attempts,
        "warnings": [{"code": w.code, "description": w.description} for w in result.warnings],
    }


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _text_problem(name: str, value: str) -> str | None:
    """Why ``value`` cannot be sent as field ``name``, or None.

    A lone surrogate (a JSON ``"\\ud800"``, or an undecodable byte in a command-line
    argument) has no UTF-8 form; a text over ``MAX_TEXT_BYTES`` is over the limit.
    """
    if match := _SURROGATE.search(value):
        return (
            f"{name} holds a lone surrogate (U+{ord(match.group()):04X} at character "
            f"{match.start()}): not valid Unicode text"
        )
    # Four bytes of UTF-8 at most per character: most texts need no encoding to know.
    if name == "text" and len(value) * 4 > MAX_TEXT_BYTES:
        size = len(value.encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            return (
                f"text is {size} bytes of UTF-8, over the limit of {MAX_TEXT_BYTES} bytes (1 MiB)"
            )
    return None


def _check_flags_text(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Refuse a text flag (or id) that cannot be sent, before anything else happens."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str):
            problem = _text_problem("text" if name == "text" else name, value)
            if problem is not None:
                raise UsageError(f"--{name.replace('_', '-')}: {problem}")


def _check_ids(department_uuid: str, user_uuid: str) -> None:
    for name, value in (("department_uuid", department_uuid), ("user_uuid", user_uuid)):
        try:
            check_id(name, value)
        except InvalidRequestError as exc:
            raise UsageError(f"{name} {value!r}: {exc.problem}") from None


def _cmd_send(args: argparse.Namespace) -> int:
    _check_flags_text(args, ("department", "user", "text", "subject", "sender_name"))
    _check_ids(args.department, args.user)
    if not args.text.strip():
        raise UsageError("--text must not be empty")
    message = TextMessage(
        args.text, subject=args.subject or None, sender_name=args.sender_name or None
    )
    creds = _resolve_credentials(args, os.environ, stdin_taken=False)
    return _run(_send_one(args, creds, message))


async def _send_one(args: argparse.Namespace, creds: Credentials, message: TextMessage) -> int:
    async with _make_client(creds) as client:
        try:
            result = await client.send(
                args.department, args.user, message, idempotency_key=args.idempotency_key
            )
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
        except BotMessageError as exc:
            unknown = isinstance(exc, DeliveryUnknownError)
            outcome = Outcome.UNKNOWN if unknown else Outcome.FAILED
            _out(
                _dumps(
                    {"outcome": outcome.value, "attempts": exc.attempts, "error": _error_json(exc)}
                )
            )
            _err(f"{outcome.value}: {exc}")
            return EXIT_UNKNOWN if unknown else EXIT_FAILED
    _out(_dumps(_result_json(result)))
    return EXIT_OK


# -- reading the input ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One valid input row.

    Attributes:
        index: Position among the data rows of the input, from 0.
        line: Line of the input where the row starts, from 1.
    """

    index: int
    line: int
    department_uuid: str
    user_uuid: str
    message: TextMessage


@dataclass(frozen=True, slots=True)
class BadRow:
    """One input row that cannot be sent, and why."""

    index: int
    line: int
    problem: str
    department_uuid: str = ""
    user_uuid: str = ""


@dataclass(frozen=True)
class RowDefaults:
    """What ``--text``, ``--subject`` and ``--sender-name`` give rows that lack them."""

    text: str | None = None
    subject: str | None = None
    sender_name: str | None = None


class _Source:
    """The input, readable twice: a file as is, stdin copied to a temporary file first."""

    def __init__(self, name: str, stack: contextlib.ExitStack) -> None:
        self.name = name
        self._path: str | None = None
        self._spool: BinaryIO | None = None
        if name == "-":
            self.display = "stdin"
            # Two passes need the data twice; stdin gives it once. Disk, not memory.
            spool = stack.enter_context(tempfile.TemporaryFile(prefix="botmsg-"))  # noqa: SIM115
            shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
            self._spool = spool
        else:
            self.display = name
            self._path = name
            try:
                with open(name, "rb"):
                    pass
            except OSError as exc:
                raise UsageError(f"{name}: cannot read: {exc.strerror}") from None

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """The input from its start."""
        if self._spool is not None:
            self._spool.seek(0)
            yield self._spool
        else:
            assert self._path is not None
            with open(self._path, "rb") as f:
                yield f

    def guess_format(self) -> Literal["csv", "jsonl"]:
        """By extension, else by the first character: ``{`` means JSON lines."""
        if self._path is not None:
            ext = os.path.splitext(self._path)[1].lower()
            if ext == ".csv":
                return "csv"
            if ext in (".jsonl", ".json", ".ndjson"):
                return "jsonl"
        with self.open() as f:
            start = True
            while chunk := f.read(4096):
                if start:
                    chunk = chunk.removeprefix(b"\xef\xbb\xbf")
                    start = False
                stripped = chunk.lstrip()
                if stripped:
                    return "jsonl" if stripped.startswith(b"{") else "csv"
        return "csv"


def _text_lines(f: BinaryIO, digest: Any | None) -> Iterator[str]:
    """The lines of ``f`` as text (a UTF-8 BOM dropped), fed to ``digest`` as bytes."""
    for lineno, raw in enumerate(f, 1):
        if digest is not None:
            digest.update(raw)
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"line {lineno}: not UTF-8 text") from None


def _make_row(
    index: int, line: int, values: Mapping[str, object], defaults: RowDefaults
) -> Row | BadRow:
    """Check one row's fields the way the client would, and build its message."""
    ids: list[str] = []
    problems: list[str] = []
    for name in REQUIRED_FIELDS:
        value = values.get(name)
        if value is None or value == "":
            problems.append(f"{name} is missing")
            value = ""
        elif not isinstance(value, str):
            problems.append(f"{name} must be a string, not {type(value).__name__}")
            value = ""
        else:
            # Ids never hold blanks (check_id refuses them): "a, b" in a CSV means "a","b".
            value = value.strip()
            if (problem := _text_problem(name, value)) is not None:
                problems.append(problem)
                value = ""  # not repeated: it cannot even be printed as is
            else:
                try:
                    check_id(name, value)
                except InvalidRequestError as exc:
                    problems.append(f"{name} {value!r}: {exc.problem}")
        ids.append(value)
    department_uuid, user_uuid = ids
    if problems:
        return BadRow(index, line, "; ".join(problems), department_uuid, user_uuid)
    optional: dict[str, str | None] = {}
    for name in ("text", "subject", "sender_name"):
        value = values.get(name)
        if value is not None and not isinstance(value, str):
            return BadRow(
                index,
                line,
                f"{name} must be a string, not {type(value).__name__}",
                department_uuid,
                user_uuid,
            )
        # A flag applies to every row ("--text sends one text to every row");
        # without it, each row's own value.
        optional[name] = chosen = getattr(defaults, name) or value
        if chosen is not None and (problem := _text_problem(name, chosen)) is not None:
            return BadRow(index, line, problem, department_uuid, user_uuid)
    text = optional["text"]
    if text is None or not text.strip():
        return BadRow(
            index, line, "no text: fill the text column or pass --text", department_uuid, user_uuid
        )
    message = TextMessage(
        text, subject=optional["subject"] or None, sender_name=optional["sender_name"] or None
    )
    return Row(index, line, department_uuid, user_uuid, message)


def _parse_csv(f: BinaryIO, defaults: RowDefaults, digest: Any | None) -> Iterator[Row | BadRow]:
    lines = _text_lines(f, digest)
    # The limit is the csv module's only setting, process-wide: raised, never lowered.
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
        while header == []:  # blank lines before the header
            header = next(reader, None)
        if header is None:
            raise UsageError("the input is empty: a CSV needs a header line")
        names = [h.strip() for h in header]
        unknown = [n for n in names if n not in FIELDS]
        if unknown:
            raise UsageError(
                f"line {reader.line_num}: unknown column(s) {', '.join(map(repr, unknown))}; "
                f"the columns are {', '.join(FIELDS)}"
            )
        if len(set(names)) != len(names):
            raise UsageError(f"line {reader.line_num}: a column appears twice")
        missing = [n for n in REQUIRED_FIELDS if n not in names]
        if missing:
            raise UsageError(f"line {reader.line_num}: missing column(s) {', '.join(missing)}")
        index = 0
        last_line = reader.line_num
        for record in reader:
            line = last_line + 1
            last_line = reader.line_num
            if not any(cell.strip() for cell in record):
                continue  # a blank line, or a spreadsheet's empty ",,," row
            if len(record) != len(names):
                yield BadRow(index, line, f"expected {len(names)} fields, got {len(record)}")
            else:
                yield _make_row(index, line, dict(zip(names, record, strict=True)), defaults)
            index += 1
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise UsageError(
                f"line {reader.line_num}: a cell is over {_CSV_FIELD_LIMIT} characters; "
                f"a text may hold at most {MAX_TEXT_BYTES} bytes of UTF-8 (1 MiB)"
            ) from None
        raise UsageError(f"line {reader.line_num}: not valid CSV: {exc}") from None


def _parse_jsonl(f: BinaryIO, defaults: RowDefaults, digest: Any | None) -> Iterator[Row | BadRow]:
    index = 0
    for line, text in enumerate(_text_lines(f, digest), 1):
        if not text.strip():
            continue
        if index == 0 and text.lstrip().startswith("["):
            raise UsageError(
                f"line {line}: this looks like a JSON array; send-many reads JSON lines, "
                "one object per line"
            )
        try:
            values = json.loads(text)
        except ValueError as exc:
            yield BadRow(index, line, f"not valid JSON: {exc}")
        else:
            if not isinstance(values, dict):
                yield BadRow(index, line, f"not a JSON object but {type(values).__name__}")
            elif unknown := [k for k in values if k not in FIELDS]:
                yield BadRow(
                    index,
                    line,
                    f"unknown key(s) {', '.join(map(repr, unknown))}; "
                    f"the keys are {', '.join(FIELDS)}",
                )
            else:
                yield _make_row(index, line, values, defaults)
        index += 1


def _parse(
    f: BinaryIO, fmt: str, defaults: RowDefaults, digest: Any | None = None
) -> Iterator[Row | BadRow]:
    if fmt == "csv":
        return _parse_csv(f, defaults, digest)
    return _parse_jsonl(f, defaults, digest)


@dataclass
class Scan:
    """What the validation pass found.

    Attributes:
        items: Data rows, valid or not.
        invalid: How many are invalid.
        listed: The first ``MAX_LISTED_ROWS`` invalid rows.
        fingerprint: sha256 of the input's bytes and the message defaults; a
            journal belongs to one fingerprint.
    """

    items: int = 0
    invalid: int = 0
    listed: list[BadRow] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def valid(self) -> int:
        """Rows that can be sent."""
        return self.items - self.invalid


def _scan(source: _Source, fmt: str, defaults: RowDefaults) -> Scan:
    """Read the whole input once, checking every row; keep only counts and a few errors."""
    scan = Scan()
    digest = hashlib.sha256()
    with source.open() as f:
        for parsed in _parse(f, fmt, defaults, digest):
            scan.items += 1
            if isinstance(parsed, BadRow):
                scan.invalid += 1
                if len(scan.listed) < MAX_LISTED_ROWS:
                    scan.listed.append(parsed)
    # The same rows sent with another --text are other messages: part of the identity.
    digest.update(
        b"\0"
        + json.dumps(
            [fmt, defaults.text, defaults.subject, defaults.sender_name],
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8", "surrogatepass")
    )
    scan.fingerprint = digest.hexdigest()
    return scan


# -- send-many -------------------------------------------------------------------------


def _describe(error: BotMessageError | None) -> str | None:
    """An item's error for --out and the journal: type and sentence (the ids have fields)."""
    return None if error is None else f"{type(error).__name__}: {error.message}"


@dataclass
class Tally:
    """Counts over every item of the input, this run's and the journal's."""

    sent: int = 0
    failed: int = 0
    unknown: int = 0
    skipped: int = 0
    invalid: int = 0
    from_journal: int = 0

    @property
    def total(self) -> int:
        """Items accounted for."""
        return self.sent + self.failed + self.unknown + self.skipped + self.invalid

    def exit_code(self) -> int:
        """Unknown beats failed: a human must look before anything else happens."""
        if self.unknown:
            return EXIT_UNKNOWN
        if self.failed or self.skipped:
            return EXIT_FAILED
        return EXIT_OK


class _Results:
    """Where per-item outcomes go: the ``--out`` file, the tally, a few stderr lines."""

    def __init__(self, out: TextIO | None) -> None:
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
        error: str | None = None,
        key: str | None = None,
        invalid: bool = False,
    ) -> None:
        tally = self.tally
        if outcome == "sent":
            tally.sent += 1
        elif outcome == "failed":
            tally.failed += 1
        elif outcome == "unknown":
            tally.unknown += 1
        elif invalid:
            tally.invalid += 1
        else:
            tally.skipped += 1
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
            self.out.write(_dumps(record) + "\n")
            self._since_flush += 1
            if self._since_flush >= 256:
                self.out.flush()
                self._since_flush = 0
        elif outcome != "sent" and not invalid and self.listed < MAX_LISTED_FAILURES:
            # No --out: name the first few that need attention, or they are lost.
            self.listed += 1
            _err(
                f"item {index} (department={department_uuid}, user={user_uuid}): {outcome}: {error}"
            )

    def close(self) -> None:
        if self.out is not None:
            self.out.flush()


@dataclass(frozen=True, slots=True)
class _Pending:
    """What the journal and --out need about an item in flight."""

    index: int
    key: str
    #: An earlier run may have delivered it (resent with --resend-unknown).
    in_doubt: bool = False


_IN_DOUBT_NOTE: Final = (
    "in flight when an earlier run stopped: it may or may not have been delivered "
    "(--resume --resend-unknown sends it again with the same idempotency key)"
)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return os.path.abspath(a) == os.path.abspath(b)


def _validate_send_many_flags(args: argparse.Namespace) -> None:
    if args.resume and not args.journal:
        raise UsageError("--resume needs --journal FILE")
    if args.resend_unknown and not args.resume:
        raise UsageError("--resend-unknown needs --resume")
    if args.durable and not args.journal:
        raise UsageError("--durable needs --journal FILE")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if args.rate is not None and not args.rate > 0:
        raise UsageError("--rate must be more than 0 messages per second")
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


def _open_journal(
    args: argparse.Namespace, scan: Scan, stack: contextlib.ExitStack
) -> tuple[_journal.JournalWriter, _journal.JournalState | None]:
    """Open (and lock) the journal; with --resume, read what it says.

    Raises:
        JournalError: missing with --resume, in use, corrupt, or for another input.
        OSError: it cannot be opened or written.
    """
    path: str = args.journal
    if args.resume and not os.path.exists(path):
        raise _journal.JournalError(f"{path}: no such journal; drop --resume to start a new one")
    # Lock first, then read: what is read stays true while we run.
    journal = _journal.JournalWriter(path, redact=_redact)
    stack.callback(journal.close)
    state: _journal.JournalState | None = None
    # How many start records a power cut could take: none when each is fsynced first.
    window = 0 if args.durable else args.concurrency
    if args.resume:
        state = _journal.load(path, fingerprint=scan.fingerprint, items=scan.items)
        journal.truncate(state.valid_bytes)
        if state.torn:
            _err(
                f"warning: {path} ends in a torn record (a power cut or crash while "
                f"writing): {len(state.torn_in_doubt)} item(s) the stopped run may have "
                "started without a record are held back as unknown, never to be resent"
            )
    elif journal.size():
        raise _journal.JournalError(f"{path} was just written by another run; pass --resume")
    if state is None or not state.has_header:
        journal.header(fingerprint=scan.fingerprint, items=scan.items, window=window)
    else:
        journal.resumed(window=window, held_back=state.torn_in_doubt)
    return journal, state


def _cmd_send_many(args: argparse.Namespace) -> int:
    _check_flags_text(args, ("text", "subject", "sender_name"))
    _validate_send_many_flags(args)
    defaults = RowDefaults(args.text, args.subject, args.sender_name)
    with contextlib.ExitStack() as stack:
        source = _Source(args.input, stack)
        creds = _resolve_credentials(args, os.environ, stdin_taken=args.input == "-")
        fmt: str = args.format or source.guess_format()
        try:
            scan = _scan(source, fmt, defaults)
        except UsageError as exc:
            raise UsageError(f"{source.display}: {exc}") from None
        for bad in scan.listed:
            _err(f"{source.display}:{bad.line}: {bad.problem}")
        if scan.invalid > len(scan.listed):
            _err(f"... and {scan.invalid - len(scan.listed)} more invalid rows")
        if scan.invalid and not args.skip_invalid:
            raise UsageError(
                f"{scan.invalid} invalid row(s) in {source.display}; nothing was sent. "
                "Fix them, or pass --skip-invalid to send the others"
            )
        if scan.invalid and not scan.valid:
            raise UsageError(f"no valid row in {source.display}; nothing was sent")
        if scan.invalid:
            _err(f"skipping {scan.invalid} invalid row(s)")

        state: _journal.JournalState | None = None
        journal: _journal.JournalWriter | None = None
        if args.journal:
            try:
                journal, state = _open_journal(args, scan, stack)
            except _journal.JournalError as exc:
                raise UsageError(str(exc)) from None
            except OSError as exc:
                raise UsageError(
                    f"{args.journal}: cannot use the journal: {exc.strerror}"
                ) from None

        out: TextIO | None = None
        if args.out == "-":
            out = sys.stdout
        elif args.out:
            try:
                out = stack.enter_context(open(args.out, "w", encoding="utf-8"))
            except OSError as exc:
                if journal is not None and state is None:
                    # Nothing was sent: leave no new journal that would demand --resume.
                    journal.discard()
                raise UsageError(f"{args.out}: cannot write: {exc.strerror}") from None
        results = _Results(out)
        stack.callback(results.close)
        job = _SendMany(args, source, fmt, defaults, scan, state, journal, results)
        return _run(job.run(creds), first_signal=job.request_stop)


class _SendMany:
    """One ``send-many`` run: the journal's finished items, then a stream of sends."""

    def __init__(
        self,
        args: argparse.Namespace,
        source: _Source,
        fmt: str,
        defaults: RowDefaults,
        scan: Scan,
        state: _journal.JournalState | None,
        journal: _journal.JournalWriter | None,
        results: _Results,
    ) -> None:
        self.args = args
        self.source = source
        self.fmt = fmt
        self.defaults = defaults
        self.scan = scan
        self.state = state
        self.journal = journal
        self.results = results
        # Stream index (order of pulling) -> the input item; only items in flight.
        self.pending: dict[int, _Pending] = {}
        self.pulled = 0
        self.finished = 0  # results of this run's sends
        self.stopped_by: BotMessageError | None = None
        self.stop_requested = False
        # --durable: items handed to the batch and not finished, and stream
        # indices whose start record is written but whose attempt has not begun.
        self.in_workers = 0
        self.unattempted: set[int] = set()

    def request_stop(self) -> None:
        """Start no new item; let those in flight finish (first SIGINT or SIGTERM)."""
        self.stop_requested = True
        _err(
            f"stopping: waiting for {len(self.pending)} send(s) in flight; "
            "signal again to abandon them (their outcome would be unknown)"
        )

    def _replay_journal(self) -> None:
        """Write the journal's sent and failed items to --out, as recorded."""
        if self.state is None:
            return
        assert self.args.journal
        for record in _journal.finished_records(self.args.journal, self.state):
            self.results.emit(
                record["i"],
                record.get("d", ""),
                record.get("u", ""),
                record["o"],
                message_uuid=record.get("m"),
                error=record.get("e"),
                key=record.get("k"),
            )
            self.results.tally.from_journal += 1

    def _to_send(self) -> int:
        """How many items this run will attempt (for the progress bar)."""
        count = self.scan.valid
        if self.state is not None:
            finished = sum(self.state.count(s) for s in _journal.FINAL_STATES)
            count -= finished
            if not self.args.resend_unknown:
                count -= len(self.state.in_doubt)
        return max(count, 0)

    def _items(self) -> Generator[SendRequest, None, None]:
        """The items to send, read lazily, each with its idempotency key.

        The journal's start record is written by ``_on_start``, which
        ``stream_many`` calls right before the first attempt (after any rate-limit
        wait), so an item waiting for the limiter is never taken for one in flight.
        """
        state = self.state
        with self.source.open() as f:
            for parsed in _parse(f, self.fmt, self.defaults):
                if self.stop_requested:
                    return
                if isinstance(parsed, BadRow):
                    if not self.args.skip_invalid:
                        # Valid in the first pass: the file changed underneath us.
                        raise UsageError(
                            f"{self.source.display}:{parsed.line} changed while sending: "
                            f"{parsed.problem}"
                        )
                    self.results.emit(
                        parsed.index,
                        parsed.department_uuid,
                        parsed.user_uuid,
                        Outcome.SKIPPED.value,
                        error=f"invalid input at line {parsed.line}: {parsed.problem}",
                        invalid=True,
                    )
                    continue
                index = parsed.index
                key: str | None = None
                if state is not None:
                    st = state.states[index]
                    if st in _journal.FINAL_STATES:
                        continue  # written to --out from the journal already
                    if st in _journal.IN_DOUBT_STATES:
                        key, error = state.in_doubt[index]
                        # Without a key (held back after a torn journal) it is never resent.
                        if not self.args.resend_unknown or key is None:
                            self.results.emit(
                                index,
                                parsed.department_uuid,
                                parsed.user_uuid,
                                Outcome.UNKNOWN.value,
                                error=error or _IN_DOUBT_NOTE,
                                key=key,
                            )
                            continue
                # Items never tried, or certainly not delivered, get a fresh key; a
                # deduplicating service could answer an old key with its old failure.
                in_doubt = key is not None
                key = key or str(uuid.uuid4())
                self.pending[self.pulled] = _Pending(index, key, in_doubt=in_doubt)
                self.pulled += 1
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
                if self.stop_requested:
                    return
                stream_index, request = ready.popleft()
                self.in_workers += 1
                yield request
        finally:
            for stream_index, _ in ready:
                self.unattempted.discard(stream_index)
                journal.unattempted(self.pending.pop(stream_index).index)
            source.close()

    def _on_start(self, stream_index: int, request: SendRequest) -> None:
        """Journal that an item is about to be sent, before its first attempt."""
        if self.args.durable:
            self.unattempted.discard(stream_index)  # journaled, and on disk, already
        elif self.journal is not None:
            meta = self.pending[stream_index]
            self.journal.start(meta.index, meta.key)

    def _settle(self, meta: _Pending, item: ItemResult) -> tuple[str, str | None]:
        """The outcome to record for ``item``, and why.

        An item resent because an earlier run may have delivered it stays
        unknown unless this resend settles it: SENT (a deduplicating service
        answers the earlier delivery), or a final FAILURE answer (the service
        processed the message and refused it, as it would have the first time).
        Anything else proves nothing about the earlier attempt: a retryable
        failure, a skip, an HTTP error (a 409 may well mean "key already used",
        a 404 a wrong --base-url this time). Recording it as failed would let a
        later --resume send the item under a new key.
        """
        outcome = item.outcome
        error: str | None
        if outcome is Outcome.SKIPPED:
            error = f"not attempted: the batch stopped after: {self.stopped_by}"
        else:
            error = _describe(item.error)
        if (
            meta.in_doubt
            and outcome is not Outcome.UNKNOWN
            and not settles_doubt(outcome, item.error)
        ):
            return Outcome.UNKNOWN.value, f"{_IN_DOUBT_NOTE}; this run's resend: {error}"
        return outcome.value, error

    def _on_result(self, item: ItemResult) -> None:
        """Journal an outcome the moment it is known, before anything else."""
        if self.journal is None:
            return
        meta = self.pending[item.index]
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
            retry=outcome == Outcome.FAILED.value and may_resend(item.error),
        )

    def _emit(self, item: ItemResult) -> None:
        meta = self.pending.pop(item.index)
        self.finished += 1
        outcome, error = self._settle(meta, item)
        self.results.emit(
            meta.index,
            item.department_uuid,
            item.user_uuid,
            outcome,
            message_uuid=item.result.message_uuid if item.result is not None else None,
            error=error,
            key=meta.key,
        )

    async def run(self, creds: Credentials) -> int:
        """Send, write results, print the summary; return the exit code."""
        self._replay_journal()
        items: Iterator[SendRequest] | AsyncIterator[SendRequest]
        items = self._durable_items() if self.args.durable else self._items()
        async with _make_client(creds) as client, _closing(items):
            try:
                stream = client.stream_many(
                    items,
                    concurrency=self.args.concurrency,
                    rate_limit=self.args.rate,
                    on_start=self._on_start,
                    on_result=self._on_result,
                    # For logs of unattended runs (--log-level INFO): a line every 10 s.
                    on_progress=_log_progress if log.isEnabledFor(logging.INFO) else None,
                    progress_interval=10.0,
                )
            except InvalidRequestError as exc:
                raise UsageError(str(exc)) from None
            bar = _Bar(self._to_send(), "sending")
            started = time.perf_counter()
            interrupted = False
            crash: BaseException | None = None
            try:
                async with stream:
                    async for item in stream:
                        self.stopped_by = stream.stopped_by
                        self._emit(item)
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
                self.results.close()
                self._summary(
                    time.perf_counter() - started,
                    stream.retries,
                    interrupted=interrupted,
                    crash=crash,
                )
        if crash is not None:
            return (
                EXIT_UNKNOWN if self.pending else max(EXIT_FAILED, self.results.tally.exit_code())
            )
        if self.stop_requested:
            return EXIT_INTERRUPTED
        return self.results.tally.exit_code()

    def _summary(
        self, elapsed: float, retries: int, *, interrupted: bool, crash: BaseException | None
    ) -> None:
        t = self.results.tally
        rate = self.finished / elapsed if elapsed > 0 else 0.0
        parts = [f"{t.sent} sent", f"{t.failed} failed", f"{t.unknown} unknown"]
        skipped = t.skipped + t.invalid
        parts.append(f"{skipped} skipped" + (f" ({t.invalid} invalid)" if t.invalid else ""))
        line = f"{t.total} of {self.scan.items} items: {', '.join(parts)}; {retries} retries"
        line += f"; {self.finished} sends in {elapsed:.1f} s, {rate:.0f} messages/s"
        if t.from_journal:
            line += f"; {t.from_journal} finished in an earlier run (from the journal)"
        _err(line)
        if self.stopped_by is not None:
            _err(f"the batch stopped early: {self.stopped_by}")
        if crash is not None:
            _err(
                f"error: {crash}; stopped with {len(self.pending)} item(s) unfinished"
                + (
                    f"; fix it and rerun with --journal {self.args.journal} --resume"
                    if self.args.journal
                    else ""
                )
            )
        if self.stop_requested and not interrupted:
            left = self.scan.items - t.total
            _err(
                f"stopped on request: {left} item(s) not started"
                + (
                    f"; rerun with --journal {self.args.journal} --resume to send them"
                    if self.args.journal
                    else ""
                )
            )
        if interrupted:
            where = (
                f"rerun with --journal {self.args.journal} --resume to finish"
                if self.args.journal
                else "items in flight may or may not have been delivered"
            )
            _err(f"interrupted with {len(self.pending)} item(s) in flight; {where}")
        elif t.unknown:
            _err(
                f"{t.unknown} item(s) may or may not have been delivered: check them before "
                "sending again" + (" (see --out)" if self.args.out else "")
            )


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


class _Bar:
    """A tqdm progress bar on stderr when it is a terminal; does nothing otherwise."""

    def __init__(self, total: int, desc: str) -> None:
        global _active_bar
        self._bar: Any = None
        self._shown = (0, 0)
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - the `cli` extra brings it
            return
        self._bar = tqdm(total=total, desc=desc, unit="msg", file=sys.stderr, dynamic_ncols=True)
        _active_bar = self._bar

    def update(self, failed: int, unknown: int) -> None:
        """One more item done; show the failed and unknown counts once there are any."""
        if self._bar is None:
            return
        if (failed, unknown) != self._shown:
            self._shown = (failed, unknown)
            self._bar.set_postfix(failed=failed, unknown=unknown, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        global _active_bar
        if self._bar is not None:
            self._bar.close()
            _active_bar = self._bar = None


# -- running a coroutine with signals -----------------------------------------------------


def _run(
    coro: Coroutine[Any, Any, int],
    *,
    on_signal: int = EXIT_INTERRUPTED,
    first_signal: Callable[[], None] | None = None,
) -> int:
    """Run ``coro`` under SIGINT/SIGTERM handling; return its exit code.

    A signal cancels ``coro`` (so its cleanup runs) and the exit code is
    ``on_signal``. With ``first_signal``, the first signal calls it instead,
    to stop gracefully, and only a second one cancels.
    """
    return asyncio.run(_with_signals(coro, on_signal, first_signal))


async def _with_signals(
    coro: Coroutine[Any, Any, int], on_signal: int, first_signal: Callable[[], None] | None
) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        if len(received) == 1 and first_signal is not None:
            first_signal()
        elif not task.cancelling():
            task.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop, signum)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows, threads
            continue
        installed.append(signum)
    try:
        return await coro
    except asyncio.CancelledError:
        if not received:
            raise
        task.uncancel()
        return on_signal
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


# -- fake-server ---------------------------------------------------------------------------


def _cmd_fake_server(args: argparse.Namespace) -> int:
    from .testing import FakeBotMessageServer

    if args.fault_rate is not None and not 0.0 <= args.fault_rate <= 1.0:
        raise UsageError("--fault-rate must be between 0 and 1")
    if args.latency < 0:
        raise UsageError("--latency must not be negative")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be between 0 and 65535")
    options: dict[str, Any] = {"latency": args.latency, "seed": args.seed}
    if args.fault_rate:
        options["fault_rate"] = args.fault_rate
    if args.password_stdin:
        password = _read_password_stdin()
        username = args.username or "user"
        _redact.add_credentials(username, password)
        options.update(username=username, password=password)
    elif args.username:
        options["username"] = args.username
    if args.port:
        options["port"] = args.port
    server = FakeBotMessageServer(**options)
    return _run(_serve(server, args.port), on_signal=EXIT_OK)


async def _serve(server: FakeBotMessageServer, port: int) -> int:
    try:
        await server.start()
    except OSError as exc:  # the port is taken, or privileged
        raise UsageError(f"--port {port}: cannot listen on 127.0.0.1: {exc.strerror}") from None
    try:
        _out(server.base_url)
        _err(
            f"fake service on {server.base_url}, user {server.username!r}; "
            "stop with Ctrl-C. Try: "
            f"{ENV_BASE_URL}={server.base_url} {ENV_USERNAME}={server.username} "
            f"{ENV_PASSWORD}=... botmsg send --department d-1 --user u-1 --text hi"
        )
        await asyncio.Event().wait()  # until a signal cancels us
    finally:
        received, requests = len(server.messages), server.requests
        _err(f"stopping: {received} message(s) received in {requests} request(s)")
        await server.close()
    return EXIT_OK  # pragma: no cover - only a signal ends the wait


# -- demo ------------------------------------------------------------------------------------

_FIRST_NAMES: Final = (
    "Ada", "Ben", "Chloé", "Dmitri", "Emeka", "Fatima", "Grace", "Hiro", "Inès", "Jonas",
    "Kateryna", "Liam", "Maya", "Nikhil", "Olga", "Pablo", "Qing", "Rosa", "Sven", "Thandiwe",
)  # fmt: skip
_TEMPLATES: Final = (
    "Hi {name}, your shift on {day} starts at {hour}:00. Reply STOP to opt out.",
    "{name}, your expense report #{number} was approved and will be paid on {day}.",
    "Reminder for {name}: the security training is due by {day}.",
    "Hello {name}! Ticket #{number} was resolved. Tell us how we did.",
    "{name}, the {hour}:00 meeting on {day} moved to room {number}.",
    "Welcome aboard, {name}! Your laptop will be ready on {day}.",
)
_DAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")


def _demo_items(
    rng: random.Random, messages: int, users: int, departments: int
) -> list[SendRequest]:
    def new_uuid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    dept_ids = [new_uuid() for _ in range(departments)]
    people = [
        (dept_ids[i % departments], new_uuid(), rng.choice(_FIRST_NAMES)) for i in range(users)
    ]
    items = []
    for n in range(messages):
        department_uuid, user_uuid, name = people[n % users]
        text = rng.choice(_TEMPLATES).format(
            name=name, day=rng.choice(_DAYS), hour=rng.randint(7, 18), number=rng.randint(100, 9999)
        )
        items.append(
            SendRequest(department_uuid, user_uuid, TextMessage(text, sender_name="HR bot"))
        )
    return items


def _cmd_demo(args: argparse.Namespace) -> int:
    return _run(_demo(args))


async def _demo(args: argparse.Namespace) -> int:
    from .testing import FakeBotMessageServer, Fault, FaultPlan

    rng = random.Random(args.seed)  # noqa: S311 - sample data, not cryptography
    items = _demo_items(rng, args.messages, users=200, departments=10)
    faults = FaultPlan(
        {
            Fault.TRANSIENT_FAILURE: 0.10,  # HTTP 200 with "FAILURE": temporarily unavailable
            Fault.RATE_LIMITED: 0.03,  # 429, Retry-After: 0
            Fault.HTTP_503: 0.02,
            Fault.LATENCY: 0.05,
        },
        seed=args.seed,
    )
    # Quick retries so the demo takes seconds; enough attempts that ~15 % faults
    # per attempt practically never exhaust them; a budget that never runs dry.
    policy = RetryPolicy(max_attempts=10, backoff_initial=0.02, backoff_max=0.2, deadline=20.0)
    budget = RetryBudget(ratio=1.0, min_per_second=1000.0, burst=10_000.0)
    async with FakeBotMessageServer(faults=faults, seed=args.seed) as server:
        _redact.add_credentials(server.username, server.password)
        _out(
            f"demo: {len(items)} messages to 200 users in 10 departments, against a fake "
            f"service on {server.base_url} that answers ~10% FAILURE (transient), "
            "~3% 429, ~2% 503 and delays ~5%"
        )
        bar = _Bar(len(items), "demo")
        counts = dict.fromkeys(Outcome, 0)

        def on_result(item: ItemResult) -> None:
            counts[item.outcome] += 1
            bar.update(counts[Outcome.FAILED], counts[Outcome.UNKNOWN])

        async with BotMessageClient(
            server.base_url, server.username, server.password, retry=policy, retry_budget=budget
        ) as client:
            batch = await client.send_many(
                items, concurrency=args.concurrency, on_result=on_result, keep="failures"
            )
        bar.close()
        report: dict[str, object] = {
            "sent": batch.sent,
            "failed": batch.failed,
            "unknown": batch.unknown,
            "skipped": batch.skipped,
            "retries": batch.retries,
            "seconds": round(batch.elapsed, 2),
            "messages_per_second": round(batch.messages_per_second, 1),
            "server_received": len(server.messages),
            "server_requests": server.requests,
            "server_duplicates": server.duplicates,
            "faults_injected": {f.value: n for f, n in server.faults_injected.items()},
        }
        faults_injected = dict(server.faults_injected)
    faults_seen = ", ".join(f"{n} {f.value}" for f, n in faults_injected.items())
    _out(
        f"sent      {batch.sent}\n"
        f"failed    {batch.failed}\n"
        f"unknown   {batch.unknown}\n"
        f"retries   {batch.retries}\n"
        f"time      {batch.elapsed:.2f} s, {report['messages_per_second']} messages/s\n"
        f"service   received {report['server_received']} messages in "
        f"{report['server_requests']} requests; duplicates: {report['server_duplicates']}\n"
        f"faults    {faults_seen or 'none'}\n"
        "report as JSON:"
    )
    _out(_dumps(report))
    for item in batch.results[:MAX_LISTED_FAILURES]:
        _err(f"item {item.index} (user={item.user_uuid}): {item.outcome.value}: {item.error}")
    if batch.unknown:
        return EXIT_UNKNOWN
    return EXIT_OK if batch.sent == len(items) else EXIT_FAILED


# -- the parser ------------------------------------------------------------------------------

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


def build_parser() -> argparse.ArgumentParser:
    """The ``botmsg`` argument parser."""
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
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"botmsg {__version__}")

    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    # SUPPRESS: a subcommand's default must not overwrite a value given before it.
    common.add_argument("--log-level", choices=levels, default=argparse.SUPPRESS)
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
    send.set_defaults(handler=_cmd_send)

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
    many.add_argument("--rate", type=float, help="most messages per second (default: no limit)")
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
        help="with --resume: send in-doubt items again, with their idempotency key",
    )
    many.add_argument(
        "--skip-invalid",
        action="store_true",
        help="send the valid rows, skip (and list) the others",
    )
    many.set_defaults(handler=_cmd_send_many)

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
    fake.add_argument("--latency", type=float, default=0.0, help="seconds every request waits")
    fake.add_argument("--seed", type=int, help="makes faults and answered UUIDs reproducible")
    fake.add_argument("--username", help="the user name to accept (default: user)")
    fake.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password to accept from stdin (default: secret)",
    )
    fake.set_defaults(handler=_cmd_fake_server)

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
    demo.set_defaults(handler=_cmd_demo)
    return parser


_SEND_MANY_HELP: Final = """\
Send the messages of a CSV file (with a header) or a JSON-lines file, with
the fields department_uuid, user_uuid and optionally text, subject, sender_name.
--text, --subject and --sender-name apply to every row, in place of the row's
own value; without them, each row's own value is used.

The whole input is checked before anything is sent: any invalid row is listed
with its line number and nothing is sent (exit 2), unless --skip-invalid.

--journal FILE records each item's start before it is sent and its outcome as
soon as it is known, so that after a crash (even kill -9) --resume sends only
what was never tried: items in flight at the crash are reported unknown and not
sent again, unless --resend-unknown (same idempotency key).

The journal survives a crash of botmsg (even kill -9), but it is fsynced only at
the end: a power cut or OS crash can lose its last seconds, and items sent then
could be sent again by --resume. A torn last record is detected and a window of
items around it held back as unknown, but a longer loss goes unnoticed.
--durable fsyncs each start record before its send (one fsync shared by all
sends ready at the time), so that nothing sent is ever forgotten.
"""


def _check_no_password_argument(argv: Sequence[str]) -> None:
    """Refuse ``--password`` before argparse, which would echo its value as unrecognized."""
    for arg in argv:
        if arg == "--":
            return
        if arg == "--password" or arg.startswith("--password="):
            raise UsageError(
                "there is no --password option, so that passwords stay out of shell history "
                f"and process lists; use {ENV_PASSWORD}, --password-stdin or the prompt"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``botmsg`` command line; return the exit code.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        0 all sent, 1 some failed, 2 usage or input error, 3 some outcomes
        unknown, 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_no_password_argument(argv)
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
