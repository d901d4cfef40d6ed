"""What ``botmsg`` prints: no raw control or bidi character, and clear usage errors.

Covers the one output filter (``Console.printable`` and ``Console.dumps``), property
tested, and end to end against a server that answers with terminal escapes; and
the usage errors for inputs the client cannot send (bad URLs, lone surrogates,
texts over the limit).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from botmsg_async import MAX_TEXT_BYTES, cli
from botmsg_async.cli.console import Console
from tests.conftest import run_botmsg, serving_send
from tests.test_cli import Inline, inline, rows, write_csv, write_jsonl

__all__ = ["inline"]  # the fixture, imported for the tests here

#: What must never be printed raw.
UNSAFE = {
    *map(chr, range(0x20)),
    *map(chr, range(0x7F, 0xA0)),
    "\u061c",
    "\u200e",
    "\u200f",
    "\u2028",  # line and paragraph separators: str.splitlines() (and JavaScript) break there
    "\u2029",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
}
SURROGATES = {chr(c) for c in range(0xD800, 0xE000)}

HOSTILE = "\x1b[2K\x1b[1A\rbotmsg: 3 of 3 items: 3 sent\x9b2J\x7f\u202egnp.exe\u2066x\u200f\x00"


def unsafe_in(text: str) -> set[str]:
    return {c for c in text if c in UNSAFE or c in SURROGATES}


any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)


@settings(deadline=None, max_examples=300)
@given(any_text)
def test_printable_leaves_no_unsafe_character(text: str) -> None:
    """Any text made printable holds no control, DEL, bidi control or surrogate."""
    assert not unsafe_in(Console().printable(text))
    assert not unsafe_in(Console().printable(text, json_text=True))


@settings(deadline=None, max_examples=300)
@given(st.recursive(any_text | st.integers() | st.none(), lambda inner: st.lists(inner)))
def test_dumps_escapes_unsafe_characters_and_keeps_the_value(value: object) -> None:
    """JSON from _dumps holds no unsafe character raw, and decodes to the same value."""
    text = Console().dumps({"v": value})
    assert not unsafe_in(text)
    assert len(text.splitlines()) == 1  # one line, whatever reads it
    assert json.loads(text) == {"v": value}


def test_plain_text_escapes_are_visible() -> None:
    """An ESC shows as \\x1b, a bidi override as \\u202e, in plain text."""
    assert Console().printable("a\x1b[2Kb\u202ec\x9b") == "a\\x1b[2Kb\\u202ec\\x9b"


@contextlib.asynccontextmanager
async def hostile_server() -> AsyncIterator[str]:
    """A server whose FAILURE answers carry terminal escapes and bidi controls."""

    async def handle(request: web.Request) -> web.Response:
        error = {"errorCode": HOSTILE, "errorDescription": HOSTILE, "errorUID": HOSTILE}
        return web.json_response({"requestUuid": HOSTILE, "status": "FAILURE", "errors": [error]})

    async with serving_send(handle) as base_url:
        yield base_url


async def run(*args: str, base_url: str) -> tuple[int, str, str]:
    return await run_botmsg(*args, base_url=base_url, username="u", password="secret-pw")


async def test_server_text_reaches_no_output_raw(tmp_path: Path) -> None:
    """Escapes and bidi controls in an answer are escaped on stdout, stderr and --out."""
    source = write_jsonl(tmp_path / "in.jsonl", rows(2))
    out = tmp_path / "out.jsonl"
    async with hostile_server() as base_url:
        runs = [
            await run("--log-level", "DEBUG", "send", "-d", "d", "-u", "u", "-t", "hi",
                      base_url=base_url),
            await run("send-many", str(source), "--out", "-", base_url=base_url),
            await run("send-many", str(source), "--out", str(out), base_url=base_url),
            await run("send-many", str(source), base_url=base_url),  # errors listed on stderr
        ]  # fmt: skip
    for rc, stdout, stderr in runs:
        assert rc == 1, stderr
        assert not unsafe_in(stdout.replace("\n", "")), stdout
        assert not unsafe_in(stderr.replace("\n", "")), stderr
    assert "\\u001b[2K" in runs[0][1]  # in JSON: escaped, so a JSON reader gets it back
    assert "\\x1b[2K" in runs[3][2]  # on stderr: visible
    written = out.read_text(encoding="utf-8")
    assert not unsafe_in(written.replace("\n", ""))
    assert HOSTILE in json.loads(written.splitlines()[0])["error"]["message"]


# -- usage errors -------------------------------------------------------------------


@pytest.mark.parametrize("base_url", ["https://h:99999", "https://[::1", "https://u:pw@h:99999"])
def test_an_unparsable_base_url_is_a_usage_error(inline: Inline, base_url: str) -> None:
    """A URL yarl cannot parse exits 2 with a message naming --base-url, no traceback."""
    env = {"BOTMSG_BASE_URL": base_url, "BOTMSG_USERNAME": "u", "BOTMSG_PASSWORD": "pw-secret"}
    result = inline("send", "-d", "d", "-u", "u", "-t", "hi", server=None, env=env)
    assert result.rc == cli.EXIT_USAGE
    assert "--base-url" in result.stderr
    assert "Traceback" not in result.stderr
    assert "pw" not in result.stderr.replace("--password", "")


def test_a_lone_surrogate_in_a_jsonl_row_is_refused_with_its_line(
    inline: Inline, tmp_path: Path
) -> None:
    """A JSON "\\ud800" in a text is an invalid row at its line: exit 2, nothing sent."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"department_uuid": "d", "user_uuid": "u1", "text": "fine"}\n'
        '{"department_uuid": "d", "user_uuid": "u2", "text": "bad \\ud800 text"}\n',
        encoding="utf-8",
    )
    env = {"BOTMSG_BASE_URL": "http://127.0.0.1:9", "BOTMSG_USERNAME": "u",
           "BOTMSG_PASSWORD": "pw-secret"}  # fmt: skip
    result = inline("send-many", str(source), server=None, env=env)
    assert result.rc == cli.EXIT_USAGE
    assert f"{source}:2: text holds a lone surrogate (U+D800" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["send", "send-many"])
def test_a_lone_surrogate_in_a_text_flag_is_a_usage_error(
    inline: Inline, tmp_path: Path, command: str
) -> None:
    """--text with an undecodable byte (a surrogate escape in argv) exits 2."""
    env = {"BOTMSG_BASE_URL": "http://127.0.0.1:9", "BOTMSG_USERNAME": "u",
           "BOTMSG_PASSWORD": "pw-secret"}  # fmt: skip
    text = b"caf\xe9".decode("utf-8", "surrogateescape")
    if command == "send":
        args = ["send", "-d", "d", "-u", "u", "-t", text]
    else:
        args = ["send-many", str(write_csv(tmp_path / "in.csv", rows(1))), "-t", text]
    result = inline(*args, server=None, env=env)
    assert result.rc == cli.EXIT_USAGE
    assert "--text: text holds a lone surrogate (U+DCE9" in result.stderr


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_the_text_limit_is_one_mib_of_utf8_in_both_formats(
    inline: Inline, tmp_path: Path, fmt: str
) -> None:
    """A text of exactly 1 MiB passes the scan, one byte more is refused at its line.

    200 KiB-long cells used to stop the CSV reader (its 128 KiB default) while
    JSONL took anything; the limit is now the same, in bytes of UTF-8.
    """
    at_limit = "é" * (MAX_TEXT_BYTES // 2)  # two bytes each
    items = [
        {"department_uuid": "d", "user_uuid": "u1", "text": at_limit},
        {"department_uuid": "d", "user_uuid": "u2", "text": at_limit + "x"},
    ]
    path = tmp_path / f"in.{fmt}"
    source = write_csv(path, items) if fmt == "csv" else write_jsonl(path, items)
    env = {"BOTMSG_BASE_URL": "http://127.0.0.1:9", "BOTMSG_USERNAME": "u",
           "BOTMSG_PASSWORD": "pw-secret"}  # fmt: skip
    result = inline("send-many", str(source), server=None, env=env)
    assert result.rc == cli.EXIT_USAGE
    line = 3 if fmt == "csv" else 2  # the CSV's header is line 1
    assert f"{source}:{line}: text is {MAX_TEXT_BYTES + 1} bytes" in result.stderr
    assert f"limit of {MAX_TEXT_BYTES} bytes" in result.stderr
    assert "1 invalid row(s)" in result.stderr


def fail(message: str) -> None:
    """Raise a RuntimeError saying ``message``."""
    raise RuntimeError(message)


def test_a_log_message_cannot_start_a_line_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    """A record whose text holds line breaks stays one line; a traceback keeps its lines."""
    console = Console()
    console.redact.add_credentials("bot-user", "secret-pw")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    console.setup_logging("DEBUG")
    try:
        forged = "12:00:00 INFO botmsg_async: 3 of 3 items: 3 sent"
        # Text a server chose (an error description) and text an operator chose (a path).
        logging.getLogger("botmsg_async").debug("retrying: %s", f"busy\n{forged}\r\x85x")
        logging.getLogger("botmsg_async").warning("POST /a\u2028b\n%s", forged)
        try:
            fail("first line\nsecret-pw")
        except RuntimeError:
            logging.getLogger("botmsg_async").exception("failed:\n%s", forged)
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    lines = capsys.readouterr().err.split("\n")
    assert not any(line.startswith("12:00:00") for line in lines), lines
    records = [line for line in lines if " botmsg_async: " in line]
    assert len(records) == 3, lines
    assert "busy\\x0a12:00:00 INFO" in records[0]
    assert "Traceback (most recent call last):" in lines  # the traceback is still legible
    assert "secret-pw" not in "\n".join(lines)
