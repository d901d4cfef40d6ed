"""Reading ``send-many`` input: CSV or JSON lines, every row checked as the client would.

``scan_input`` reads the whole input once before anything is sent (the validation
pre-scan), keeping only counts, the first few bad rows and a fingerprint;
``parse`` reads it again, lazily, to send. Rows are checked with the SDK's own
``check_request``: a row the scan passes is one the client accepts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, Literal, NamedTuple

from botmsg_async import (
    MAX_TEXT_BYTES,
    InvalidRequestError,
    MessageDefaults,
    SendRequest,
    TextMessage,
    check_request,
)

from .common import UsageError

__all__ = [
    "FIELDS",
    "MAX_LISTED_ROWS",
    "MAX_TEXT_BYTES",
    "REQUIRED_FIELDS",
    "BadRow",
    "Row",
    "RowDefaults",
    "Scan",
    "Source",
    "check_flags_text",
    "ignored_columns",
    "parse",
    "scan_input",
    "text_problem",
]

FIELDS: Final = (
    "department_uuid",
    "user_uuid",
    "text",
    "subject",
    "sender_name",
    "idempotency_key",
)
REQUIRED_FIELDS: Final = ("department_uuid", "user_uuid")
#: Largest CSV cell the csv module reads, in characters (its default is 128 Ki): far
#: enough above MAX_TEXT_BYTES that a text over the limit is reported as such, with its
#: line, and the row alone is refused; a cell beyond even this stops the read (memory).
_CSV_FIELD_LIMIT: Final = 16 * MAX_TEXT_BYTES
#: Longest line read (bytes): a JSON line over it is an invalid row, a CSV line a broken
#: input, without it ever being held whole (a file whose lines end in CR alone is one
#: line). Far above any row that can be sent: a text is 1 MiB of UTF-8 at most.
_MAX_LINE_BYTES: Final = 4 * _CSV_FIELD_LIMIT
#: Invalid rows listed one by one on stderr; the rest are only counted.
MAX_LISTED_ROWS: Final = 50

_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# json's C scanner recurses per nesting level: a row of ``[[[[...`` raises
# RecursionError, which is a row that is not JSON like any other.
_NOT_JSON: Final = (ValueError, RecursionError)


def text_problem(name: str, value: str) -> str | None:
    """Why ``value`` cannot be sent as field ``name``, or None.

    A lone surrogate (a JSON ``"\\ud800"``, or an undecodable byte in a command-line
    argument) has no UTF-8 form; a text over ``MAX_TEXT_BYTES`` is over the limit.
    """
    if match := _SURROGATE.search(value):
        code = ord(match.group())
        # U+DC80..U+DCFF: what an undecodable byte of a file or an argument decodes to.
        byte = f" (a byte 0x{code - 0xDC00:02X} that is not UTF-8)" if code >= 0xDC80 else ""
        return (
            f"{name} holds a lone surrogate (U+{code:04X} at character "
            f"{match.start()}){byte}: not valid Unicode text"
        )
    # Four bytes of UTF-8 at most per character: most texts need no encoding to know.
    if name == "text" and len(value) * 4 > MAX_TEXT_BYTES:
        size = len(value.encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            return (
                f"text is {size} bytes of UTF-8, over the limit of {MAX_TEXT_BYTES} bytes (1 MiB)"
            )
    return None


def check_flags_text(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Refuse a text flag (or id) that cannot be sent, before anything else happens."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str):
            problem = text_problem("text" if name == "text" else name, value)
            if problem is not None:
                raise UsageError(f"--{name.replace('_', '-')}: {problem}")


class Row(NamedTuple):
    """One valid input row (a named tuple: one is built per row and pass, cheaply).

    Attributes:
        index: Position among the data rows of the input, from 0.
        line: Line of the input where the row starts, from 1.
        message: What the client sends: a row with only a text is that text (a
            ``str``, the client's plain-text message, sent on its fast path);
            one with a subject or a sender is a ``TextMessage``.
        idempotency_key: The row's own key (its ``idempotency_key`` field), used
            in every run instead of a new one; None when it has none.
    """

    # The field hides tuple.index(), which no caller of a row uses.
    index: int  # type: ignore[assignment]
    line: int
    department_uuid: str
    user_uuid: str
    message: str | TextMessage
    idempotency_key: str | None = None


#: A row's text alone is the same message as ``TextMessage(text)`` to a client
#: without ``message_defaults`` (the CLI's): then a row may carry it as a ``str``.
_TEXT_IS_PLAIN: Final = TextMessage("x") == MessageDefaults().message("x")


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
    """What the flags do to rows: ``--text``, ``--subject`` and ``--sender-name``
    give every row its value; ``--ignore-columns`` names columns (CSV) or keys
    (JSON lines) that are read past, not refused as unknown."""

    text: str | None = None
    subject: str | None = None
    sender_name: str | None = None
    ignore_columns: frozenset[str] = frozenset()

    @property
    def plain(self) -> bool:
        """Whether no flag changes a row's message (each row's own text is sent)."""
        return self.text is None and self.subject is None and self.sender_name is None


def ignored_columns(flag: str | None) -> frozenset[str]:
    """The names of ``--ignore-columns a,b`` (blanks around names dropped).

    Raises:
        UsageError: a name is one of the fields botmsg reads: ignoring it
            would change the messages (a subject dropped, say).
    """
    if flag is None:
        return frozenset()
    names = frozenset(n.strip() for n in flag.split(",") if n.strip())
    if read := sorted(names & set(FIELDS)):
        raise UsageError(
            f"--ignore-columns: {', '.join(map(repr, read))} is read by botmsg, not an "
            f"extra column; the fields it reads are {', '.join(FIELDS)}"
        )
    return names


def _unknown_hint(unknown: Sequence[str]) -> str:
    """The end of an "unknown column" error: what is read, and how to read past the rest."""
    names = ",".join(unknown)
    # A name with a comma cannot be given to the flag: say so rather than suggest it.
    if any("," in n or not n.strip() for n in unknown):
        return f"the fields read are {', '.join(FIELDS)}"
    return (
        f"the fields read are {', '.join(FIELDS)}; if the extra ones are meant to be there, "
        f"pass --ignore-columns {names}"
    )


class Source:
    """The input, readable twice: a file as is, stdin copied to a temporary file first."""

    def __init__(self, name: str, stack: contextlib.ExitStack) -> None:
        self.name = name
        self._path: str | None = None
        self._spool: BinaryIO | None = None
        if name == "-":
            self.display = "stdin"
            self._spool = self._copy(sys.stdin.buffer, stack)
            return
        self.display = name
        try:
            with open(name, "rb") as f:
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    self._path = name
                else:
                    # A pipe (a FIFO, <(command), /dev/stdin) gives its data once,
                    # to the first open: read again, it would wait for a writer forever.
                    self._spool = self._copy(f, stack)
        except OSError as exc:
            raise UsageError(f"{name}: cannot read: {exc.strerror}") from None

    @staticmethod
    def _copy(f: BinaryIO, stack: contextlib.ExitStack) -> BinaryIO:
        """``f`` copied to a temporary file: two passes need the data twice. Disk, not memory."""
        spool = stack.enter_context(tempfile.TemporaryFile(prefix="botmsg-"))  # noqa: SIM115
        shutil.copyfileobj(f, spool, 1 << 20)
        return spool

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
        if self.name != "-":
            ext = os.path.splitext(self.name)[1].lower()
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


def _text_lines(f: BinaryIO, digest: Any | None) -> Iterator[str | None]:
    """The lines of ``f`` as text (a UTF-8 BOM dropped), fed to ``digest`` as bytes;
    None for a line over ``_MAX_LINE_BYTES``.

    A byte that is not UTF-8 becomes a lone surrogate (``surrogateescape``), which
    the field holding it refuses (``text_problem``): that row alone is invalid,
    named by its line and field, as any other bad value is.
    """
    # A file is read a limited piece at a time; lines handed out by an iterator
    # (``cli.jobs`` reads a chunk of them) come whole, and are judged the same.
    readline = getattr(f, "readline", None)
    pieces = iter(f) if readline is None else iter(lambda: readline(_MAX_LINE_BYTES), b"")
    for lineno, raw in enumerate(pieces, 1):
        if digest is not None:
            digest.update(raw)
        if len(raw) >= _MAX_LINE_BYTES and not (len(raw) == _MAX_LINE_BYTES and raw[-1:] == b"\n"):
            # Over the limit: read past the rest of it, a piece at a time.
            while not raw.endswith(b"\n") and (raw := next(pieces, b"")):
                if digest is not None:
                    digest.update(raw)
            yield None
            continue
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        yield raw.decode("utf-8", "surrogateescape")


#: The fields of the usual row: two ids and a text, nothing else.
_PLAIN_FIELDS: Final = frozenset(("department_uuid", "user_uuid", "text"))


def _plain_id(value: str) -> bool:
    """Whether ``value`` is an id every check passes: ASCII letters, digits and dashes."""
    return value.isascii() and value.replace("-", "").isalnum()


def _plain_row(index: int, line: int, values: Mapping[str, object]) -> Row | None:
    """The usual row as ``_make_row`` builds it, or None: then ``_make_row`` decides.

    Usual: two ids of ASCII letters, digits and dashes (a UUID) and a non-blank
    ASCII text within the limit, no other field. Nothing ``_make_row`` or the
    client checks can refuse such a row, so they need not run (two thirds of a
    row's time); a property test holds this to ``_make_row``'s own result.
    """
    if values.keys() != _PLAIN_FIELDS:
        return None
    department_uuid = values["department_uuid"]
    user_uuid = values["user_uuid"]
    text = values["text"]
    if type(department_uuid) is not str or type(user_uuid) is not str or type(text) is not str:
        return None
    department_uuid = department_uuid.strip()
    user_uuid = user_uuid.strip()
    if (
        _plain_id(department_uuid)
        and _plain_id(user_uuid)
        and text.isascii()
        and text
        and not text.isspace()
        and len(text) <= MAX_TEXT_BYTES
    ):
        return Row(
            index, line, department_uuid, user_uuid, text if _TEXT_IS_PLAIN else TextMessage(text)
        )
    return None


def _make_row(
    index: int, line: int, values: Mapping[str, object], defaults: RowDefaults
) -> Row | BadRow:
    """Check one row's fields the way the client would, and build its message."""
    if defaults.plain and (row := _plain_row(index, line, values)) is not None:
        return row
    return _checked_row(index, line, values, defaults)


def _checked_row(
    index: int, line: int, values: Mapping[str, object], defaults: RowDefaults
) -> Row | BadRow:
    """``_make_row`` the long way: every check, each problem worded."""
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
            # Ids never hold blanks (the client refuses them): "a, b" in a CSV means "a","b".
            value = value.strip()
            if (problem := text_problem(name, value)) is not None:
                problems.append(problem)
                value = ""  # not repeated: it cannot even be printed as is
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
        if chosen is not None and (problem := text_problem(name, chosen)) is not None:
            return BadRow(index, line, problem, department_uuid, user_uuid)
    message = TextMessage(
        optional["text"] or "",
        subject=optional["subject"] or None,
        sender_name=optional["sender_name"] or None,
    )
    key = values.get("idempotency_key")
    if key is not None and not isinstance(key, str):
        return BadRow(
            index,
            line,
            f"idempotency_key must be a string, not {type(key).__name__}",
            department_uuid,
            user_uuid,
        )
    key = key or None  # an empty cell: no key of its own, a new one is made
    try:
        # The client's own checks (ids, the message, the key): what passes here,
        # the client accepts.
        check_request(SendRequest(department_uuid, user_uuid, message, idempotency_key=key))
    except InvalidRequestError as exc:
        return BadRow(index, line, _request_problem(exc, message), department_uuid, user_uuid)
    if _TEXT_IS_PLAIN and message.subject is None and message.sender_name is None:
        return Row(index, line, department_uuid, user_uuid, message.body, key)
    return Row(index, line, department_uuid, user_uuid, message, key)


def _request_problem(exc: InvalidRequestError, message: TextMessage) -> str:
    """A row's problem as ``check_request`` found it, worded for an input file."""
    if exc.field == "message.body" and not message.body.strip():
        return "no text: fill the text column or pass --text"
    return f"{exc.field} {exc.value!r}: {exc.problem}"


def _csv_lines(lines: Iterator[str | None]) -> Iterator[str]:
    """``lines``; one over the limit ends the read, as a cell over the csv module's does."""
    for lineno, line in enumerate(lines, 1):
        if line is None:
            raise UsageError(
                f"line {lineno}: over {_MAX_LINE_BYTES} bytes; a text may hold at most "
                f"{MAX_TEXT_BYTES} bytes of UTF-8 (1 MiB)"
            )
        yield line


def _parse_csv(f: BinaryIO, defaults: RowDefaults, digest: Any | None) -> Iterator[Row | BadRow]:
    lines = _csv_lines(_text_lines(f, digest))
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
        if any(_SURROGATE.search(h) for h in header):
            # Not one bad row: no row can be read (a UTF-16 file, a legacy code page).
            raise UsageError(f"line {reader.line_num}: the header is not UTF-8 text")
        names = [h.strip() for h in header]
        unknown = [n for n in names if n not in FIELDS and n not in defaults.ignore_columns]
        if unknown:
            raise UsageError(
                f"line {reader.line_num}: unknown column(s) {', '.join(map(repr, unknown))}; "
                + _unknown_hint(unknown)
            )
        read = [n for n in names if n in FIELDS]
        if len(set(read)) != len(read):
            raise UsageError(f"line {reader.line_num}: a column appears twice")
        missing = [n for n in REQUIRED_FIELDS if n not in names]
        if missing:
            raise UsageError(f"line {reader.line_num}: missing column(s) {', '.join(missing)}")
        index = 0
        last_line = reader.line_num
        for record in reader:
            line = last_line + 1
            last_line = reader.line_num
            if not "".join(record).strip():
                continue  # a blank line, or a spreadsheet's empty ",,," row
            if len(record) != len(names):
                yield BadRow(index, line, f"expected {len(names)} fields, got {len(record)}")
            else:
                values = {n: v for n, v in zip(names, record, strict=True) if n in FIELDS}
                yield _make_row(index, line, values, defaults)
            index += 1
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise UsageError(
                f"line {reader.line_num}: a cell is over {_CSV_FIELD_LIMIT} characters; "
                f"a text may hold at most {MAX_TEXT_BYTES} bytes of UTF-8 (1 MiB)"
            ) from None
        raise UsageError(f"line {reader.line_num}: not valid CSV: {exc}") from None


class _RepeatedKeyError(ValueError):
    """A JSON object holds one key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    values = dict(pairs)
    if len(values) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKeyError(key)
            seen.add(key)
    return values


def _repeated_key(text: str, values: dict[str, Any]) -> str | None:
    """A key that the JSON object ``text`` (decoded as ``values``) holds twice, or None.

    json keeps the last value of a repeated key, so ``{"user_uuid": "a", ...,
    "user_uuid": "b"}`` would silently send to ``b`` (a CSV with a column twice is
    refused). Every JSON string is delimited by two quotes, and an escaped one
    only adds to the count; a repeated key leaves a key out of ``values``. So
    when ``text`` has two quotes per key and string value of ``values``, no key
    repeats; only otherwise (nested values, escapes) is it decoded again to tell.
    """
    strings = len(values)
    for value in values.values():  # a loop: a third of sum()'s time on the usual row
        if type(value) is str:
            strings += 1
    if text.count('"') == 2 * strings:
        return None
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except _RepeatedKeyError as exc:
        return str(exc.args[0])
    return None


def _parse_jsonl(f: BinaryIO, defaults: RowDefaults, digest: Any | None) -> Iterator[Row | BadRow]:
    index = 0
    for line, text in enumerate(_text_lines(f, digest), 1):
        if text is None:
            yield BadRow(index, line, f"over {_MAX_LINE_BYTES} bytes: not read")
            index += 1
            continue
        if not text.strip():
            continue
        if index == 0 and text.lstrip().startswith("["):
            raise UsageError(
                f"line {line}: this looks like a JSON array; send-many reads JSON lines, "
                "one object per line"
            )
        try:
            values = json.loads(text)
        except _NOT_JSON as exc:
            # A byte that is not UTF-8 is the likelier cause than the JSON error it leads to.
            utf8 = "not UTF-8 text" if _SURROGATE.search(text) else None
            yield BadRow(index, line, utf8 or f"not valid JSON: {exc}")
        else:
            if not isinstance(values, dict):
                yield BadRow(index, line, f"not a JSON object but {type(values).__name__}")
            elif (repeated := _repeated_key(text, values)) is not None:
                yield BadRow(index, line, f"key {repeated!r} appears twice: which one counts?")
            elif unknown := [
                k for k in values if k not in FIELDS and k not in defaults.ignore_columns
            ]:
                yield BadRow(
                    index,
                    line,
                    f"unknown key(s) {', '.join(map(repr, unknown))}; " + _unknown_hint(unknown),
                )
            else:
                yield _make_row(index, line, values, defaults)
        index += 1


def parse(
    f: BinaryIO, fmt: str, defaults: RowDefaults, digest: Any | None = None
) -> Iterator[Row | BadRow]:
    """The data rows of ``f`` (``"csv"`` or ``"jsonl"``), read lazily, each checked.

    Args:
        f: The input, from its start.
        fmt: ``"csv"`` or ``"jsonl"``.
        defaults: What the message flags give every row.
        digest: A hash fed the input's bytes as they are read (``scan_input``'s fingerprint).

    Raises:
        UsageError: the input cannot be read as ``fmt`` at all; a bad row is a ``BadRow``.
    """
    rows = _parse_csv(f, defaults, digest) if fmt == "csv" else _parse_jsonl(f, defaults, digest)
    return _no_repeated_keys(rows)


def _no_repeated_keys(rows: Iterator[Row | BadRow]) -> Iterator[Row | BadRow]:
    """``rows``, with a row whose own idempotency key an earlier row has made a ``BadRow``.

    A deduplicating service would answer the second send with the first's
    result: the second message would be reported sent and never delivered.
    Keys are kept as 16-byte digests (memory grows with the rows that have one).
    """
    seen: set[bytes] = set()
    for row in rows:
        if isinstance(row, Row) and row.idempotency_key is not None:
            digest = hashlib.blake2b(row.idempotency_key.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                yield BadRow(
                    row.index,
                    row.line,
                    "idempotency_key repeats an earlier row's: a service that deduplicates "
                    "would drop this message; give each row its own key",
                    row.department_uuid,
                    row.user_uuid,
                )
                continue
            seen.add(digest)
        yield row


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
    # One byte per row up to the last invalid one (nothing while all are valid).
    _invalid_rows: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def valid(self) -> int:
        """Rows that can be sent."""
        return self.items - self.invalid

    def add_invalid(self, index: int) -> None:
        """Count row ``index`` as invalid."""
        self.invalid += 1
        if index >= len(self._invalid_rows):
            self._invalid_rows.extend(bytes(index + 1 - len(self._invalid_rows)))
        self._invalid_rows[index] = 1

    def is_invalid(self, index: int) -> bool:
        """Whether row ``index`` is invalid: no run sends it."""
        return index < len(self._invalid_rows) and self._invalid_rows[index] == 1


def scan_input(source: Source, fmt: str, defaults: RowDefaults) -> Scan:
    """Read the whole input once, checking every row; keep only counts and a few errors.

    Raises:
        UsageError: the input cannot be read as ``fmt`` at all (a
            broken CSV, a JSON array...); a bad row is only counted and listed.
    """
    found = Scan()
    digest = hashlib.sha256()
    with source.open() as f:
        for parsed in parse(f, fmt, defaults, digest):
            found.items += 1
            if isinstance(parsed, BadRow):
                found.add_invalid(parsed.index)
                if len(found.listed) < MAX_LISTED_ROWS:
                    found.listed.append(parsed)
    # The same rows sent with another --text are other messages: part of the identity.
    digest.update(
        b"\0"
        + json.dumps(
            [fmt, defaults.text, defaults.subject, defaults.sender_name],
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8", "surrogatepass")
    )
    found.fingerprint = digest.hexdigest()
    return found
