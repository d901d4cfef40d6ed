"""``botmsg send-many`` for long jobs, end to end through the real entry point.

Options a resume takes from the journal, progress lines without a terminal (and
a bar on a terminal that reports no width), a summary rate over what was really
sent, extra input columns, and a row's own idempotency key.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from botmsg_async.testing import FakeBotMessageServer

from .conftest import SUCCESS, serving_send
from .test_cli import (
    Inline,
    botmsg,
    cli_env,
    read_jsonl,
    rows,
    start_cli,
    write_csv,
    write_jsonl,
)
from .test_cli import inline as inline  # the fixture, used by name
from .test_cli import server as server  # the fixture, used by name

README_TEXT = "Office closed on Friday"
WAIT = 30.0


def recipients(n: int) -> list[dict[str, str]]:
    """``n`` rows without a text column, as in the README's example."""
    return [{"department_uuid": f"dep-{i % 3}", "user_uuid": f"user-{i}"} for i in range(n)]


async def stopped_first_run(
    server: FakeBotMessageServer, source: Path, journal: Path, *flags: str
) -> None:
    """A first run that the service stops at once (refused credentials): nothing sent."""
    wrong = cli_env(server, BOTMSG_PASSWORD="not-the-password")
    run = await botmsg(
        "send-many", str(source), "--journal", str(journal), *flags, server=server, env=wrong
    )
    assert run.rc == 1, run.stderr
    assert server.messages == []


# -- item 6: --resume takes the message options from the journal -----------------------------


async def test_the_readme_resume_example_takes_text_from_the_journal(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """The README's two commands: the resume, without --text, sends the first run's text."""
    source = write_csv(tmp_path / "recipients.csv", recipients(5))
    journal, out = tmp_path / "job.journal", tmp_path / "results.jsonl"
    await stopped_first_run(
        server, source, journal, "--text", README_TEXT, "--out", str(out), "--rate", "50"
    )
    run = await botmsg(
        "send-many",
        str(source),
        "--out",
        str(out),
        "--journal",
        str(journal),
        "--resume",
        server=server,
    )
    assert run.rc == 0, run.stderr
    assert sorted(m.user_uuid for m in server.messages) == sorted(f"user-{i}" for i in range(5))
    assert {m.message.body for m in server.messages} == {README_TEXT}
    assert {line["outcome"] for line in read_jsonl(out)} == {"sent"}


async def test_a_resume_option_that_differs_from_the_journal_is_named(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """Given and different from the journal's, a message option exits 2 naming it."""
    source = write_jsonl(tmp_path / "in.jsonl", recipients(3))
    journal = tmp_path / "job.journal"
    await stopped_first_run(server, source, journal, "--text", "T", "--subject", "S")
    resume = ("send-many", str(source), "--journal", str(journal), "--resume")
    cases = {
        "--text": ["--text", "other"],
        "--subject": ["--subject", "other"],
        "--sender-name": ["--sender-name", "Bot"],  # the first run had none
        "--format": ["--format", "csv"],
    }
    for flag, given in cases.items():
        run = inline(*resume, *given, server=server)
        assert run.rc == 2, (flag, run.stderr)
        assert f"{flag} differs from the journal's" in run.stderr, run.stderr
    assert server.messages == []
    # The same values again are no difference.
    run = await botmsg(*resume, "--text", "T", "--format", "jsonl", server=server)
    assert run.rc == 0, run.stderr
    assert {(m.message.body, m.message.subject) for m in server.messages} == {("T", "S")}


async def test_a_version_1_journal_resumes_as_before(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """A journal without options (format 1) takes nothing from it: the hash check as before."""
    source = write_csv(tmp_path / "in.csv", recipients(3))
    journal = tmp_path / "job.journal"
    await stopped_first_run(server, source, journal, "--text", "T")
    header, rest = journal.read_bytes().split(b"\n", 1)
    record = json.loads(header)
    assert record["botmsg_journal"] == 2
    assert record["options"]["text"] == "T"
    del record["options"]
    record["botmsg_journal"] = 1
    journal.write_bytes(json.dumps(record).encode() + b"\n" + rest)
    resume = ("send-many", str(source), "--journal", str(journal), "--resume")
    run = inline(*resume, server=server)
    assert run.rc == 2  # as before: rows without text need --text
    run = inline(*resume, "--text", "other", server=server)
    assert run.rc == 2
    assert "another input" in run.stderr
    run = await botmsg(*resume, "--text", "T", server=server)
    assert run.rc == 0, run.stderr
    assert {m.message.body for m in server.messages} == {"T"}


# -- item 7: progress without a terminal; a bar on a terminal of no width -----------------------


@pytest_asyncio.fixture
async def held_server() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A send endpoint that answers users 0 and 1 at once and holds the rest until released."""
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.match_info["user"] not in ("user-0", "user-1"):
            await release.wait()
        return web.json_response(SUCCESS)

    async with serving_send(handle) as base_url:
        try:
            yield base_url, release
        finally:
            release.set()


ETA = r"ETA (\d+ s|\d+ min \d+ s|\d+ h \d+ min)\n"


async def progress_run(
    server: tuple[str, asyncio.Event], tmp_path: Path, *flags: str
) -> tuple[str, list[str], str]:
    """Run send-many on 4 rows (2 answered, 2 held): the "2/4 items done" progress line,
    the stderr lines up to it, and the rest of stderr once the held ones are answered."""
    base_url, release = server
    source = write_csv(tmp_path / "in.csv", recipients(4))
    env = cli_env(None, BOTMSG_BASE_URL=base_url, BOTMSG_USERNAME="u", BOTMSG_PASSWORD="p")
    process = await start_cli(
        "send-many", str(source), "--text", "hi", "--progress-interval", "0.2", *flags, env=env
    )
    assert process.stderr is not None
    try:
        seen: list[str] = []

        async def progress_line() -> str:
            while True:
                line = (await process.stderr.readline()).decode()  # type: ignore[union-attr]
                assert line, f"stderr ended without the line: {seen}"
                seen.append(line)
                if "2/4 items done" in line:
                    return line

        # Two answered, two held: whatever the timing, this line must come.
        line = await asyncio.wait_for(progress_line(), WAIT)
        release.set()
        _, err = await asyncio.wait_for(process.communicate(), WAIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err
    return line, seen, err.decode()


async def test_without_a_terminal_progress_lines_come_every_interval(
    held_server: tuple[str, asyncio.Event], tmp_path: Path
) -> None:
    """stderr a pipe: a line with done/total, outcomes, rate and ETA while the job runs."""
    line, seen, err = await progress_run(held_server, tmp_path)
    assert re.fullmatch(
        r"botmsg: progress: 2/4 items done \(50%\): 2 sent, 0 failed, 0 unknown; "
        r"2 in flight, 0 retries; \d+ messages/s; " + ETA,
        line,
    ), line
    assert "\r" not in "".join(seen)  # no bar drawn in a log
    assert "4 of 4 items: 4 sent" in err


async def test_with_workers_progress_lines_come_from_the_parent(
    held_server: tuple[str, asyncio.Event], tmp_path: Path
) -> None:
    """--workers 2, stderr a pipe: the parent prints the same line while workers hold items."""
    line, _, err = await progress_run(held_server, tmp_path, "--workers", "2")
    assert re.fullmatch(
        r"botmsg: progress: 2/4 items done \(50%\): 2 sent, 0 failed, 0 unknown; "
        r"[0-2] in flight; \d+ messages/s; " + ETA,
        line,
    ), line
    assert "4 of 4 items: 4 sent" in err


async def test_on_a_terminal_of_no_width_the_bar_is_still_drawn(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """stderr a terminal that reports 0 columns: a bar of 80 columns, not an empty line."""
    source = write_csv(tmp_path / "in.csv", rows(3))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    os.set_blocking(master, False)
    shown = bytearray()
    drained = asyncio.Event()
    loop = asyncio.get_running_loop()

    def read() -> None:
        try:
            chunk = os.read(master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: every writer gone and all read
            chunk = b""
        if chunk:
            shown.extend(chunk)
        else:
            loop.remove_reader(master)
            drained.set()

    env = {k: v for k, v in cli_env(server).items() if k not in ("COLUMNS", "LINES")}
    loop.add_reader(master, read)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "botmsg_async",
            "send-many",
            str(source),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        slave = -1
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
        await asyncio.wait_for(drained.wait(), WAIT)
    finally:
        loop.remove_reader(master)
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = shown.decode()
    bars = [part for part in re.split(r"[\r\n]+", text) if "sending:" in part]
    assert any("100%" in bar and "3/3" in bar for bar in bars), text
    assert all(len(bar) <= 80 for bar in bars), bars
    assert "3 of 3 items: 3 sent" in text


# -- item 8: the summary's rate counts what was really sent ---------------------------------------


async def test_a_batch_stopped_by_refused_credentials_reports_the_requests_made(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """The skipped rest of a stopped batch are no sends: the summary counts requests made."""
    source = write_csv(tmp_path / "in.csv", rows(300))
    wrong = cli_env(server, BOTMSG_PASSWORD="not-the-password")
    run = await botmsg("send-many", str(source), "-c", "4", server=server, env=wrong)
    assert run.rc == 1, run.stderr
    summary = re.search(
        r"; (\d+) attempted with (\d+) requests in ([\d.]+) s, (\d+) messages/s", run.stderr
    )
    assert summary is not None, run.stderr
    attempted, requests = int(summary[1]), int(summary[2])
    assert requests == server.requests  # every request the service saw, no more
    assert 1 <= attempted <= 4  # at most the items in flight when the 401 came
    assert "0 sent, " in run.stderr
    assert " skipped" in run.stderr
    assert "300 sends" not in run.stderr


# -- item 9: extra columns, a row's own idempotency key --------------------------------------------


async def test_extra_columns_are_refused_unless_ignored_by_name(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """An export's name/email columns: refused naming --ignore-columns; sent with it."""
    export = [{**r, "name": "Ann", "email": "a@example.com"} for r in rows(3)]
    source = write_csv(tmp_path / "in.csv", export)
    run = inline("send-many", str(source), server=server)
    assert run.rc == 2
    assert "unknown column(s) 'name', 'email'" in run.stderr
    assert "--ignore-columns name,email" in run.stderr
    # A misspelt field stays refused when others are ignored.
    typo = write_csv(tmp_path / "typo.csv", [{**r, "subjct": "S"} for r in export])
    run = inline("send-many", str(typo), "--ignore-columns", "name, email", server=server)
    assert run.rc == 2
    assert "'subjct'" in run.stderr
    assert "'name'" not in run.stderr
    # A field botmsg reads cannot be ignored: that would change the messages.
    run = inline("send-many", str(source), "--ignore-columns", "name,subject", server=server)
    assert run.rc == 2
    assert "--ignore-columns: 'subject' is read by botmsg" in run.stderr
    run = await botmsg("send-many", str(source), "--ignore-columns", "email,name", server=server)
    assert run.rc == 0, run.stderr
    assert len(server.messages) == 3


async def test_extra_jsonl_keys_are_refused_unless_ignored_by_name(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """JSON lines: a row with an unknown key is invalid, its error naming the flag."""
    source = write_jsonl(tmp_path / "in.jsonl", [{**r, "name": "Ann"} for r in rows(2)])
    run = inline("send-many", str(source), server=server)
    assert run.rc == 2
    assert "in.jsonl:1: unknown key(s) 'name'" in run.stderr
    assert "--ignore-columns name" in run.stderr
    run = await botmsg("send-many", str(source), "--ignore-columns", "name", server=server)
    assert run.rc == 0, run.stderr
    assert len(server.messages) == 2


async def test_resume_takes_the_ignored_columns_from_the_journal(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """--ignore-columns given to the first run need not be repeated to resume it."""
    source = write_csv(tmp_path / "in.csv", [{**r, "name": "Ann"} for r in rows(3)])
    journal = tmp_path / "job.journal"
    await stopped_first_run(server, source, journal, "--ignore-columns", "name")
    run = await botmsg(
        "send-many", str(source), "--journal", str(journal), "--resume", server=server
    )
    assert run.rc == 0, run.stderr
    assert len(server.messages) == 3


async def test_a_rows_own_idempotency_key_is_sent_and_kept_across_runs(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """A row's key goes on every attempt, in --out, the journal and a resumed run."""
    items = [
        {**r, "idempotency_key": f"order-{i}" if i != 1 else ""} for i, r in enumerate(rows(3))
    ]
    source = write_csv(tmp_path / "in.csv", items)
    journal, out = tmp_path / "job.journal", tmp_path / "out.jsonl"
    await stopped_first_run(server, source, journal, "-c", "3")
    started = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    first_keys = {r["i"]: r["key"] for r in started if r.get("s") == "start"}
    assert first_keys
    assert all(first_keys[i] == f"order-{i}" for i in first_keys if i != 1)
    run = await botmsg(
        "send-many",
        str(source),
        "--journal",
        str(journal),
        "--resume",
        "--out",
        str(out),
        server=server,
    )
    assert run.rc == 0, run.stderr
    keys = {m.user_uuid: m.idempotency_key for m in server.messages}
    assert keys["user-0"] == "order-0"
    assert keys["user-2"] == "order-2"
    assert keys["user-1"] not in (None, "", first_keys.get(1))  # no key of its own: a new one
    assert {line["index"]: line["idempotency_key"] for line in read_jsonl(out)} == {
        0: "order-0",
        1: keys["user-1"],
        2: "order-2",
    }


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("tab\there", r"idempotency_key 'tab\there': must be a non-empty printable str"),
        (7, "idempotency_key must be a string, not int"),
    ],
    ids=["not-printable", "not-a-string"],
)
def test_a_bad_idempotency_key_is_an_invalid_row(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path, key: object, problem: str
) -> None:
    """A row's key is checked as the SDK checks one: the row is listed, nothing sent."""
    items: list[dict[str, object]] = [dict(r) for r in rows(2)]
    items[1]["idempotency_key"] = key
    source = write_jsonl(tmp_path / "in.jsonl", items)
    run = inline("send-many", str(source), server=server)
    assert run.rc == 2
    assert f"in.jsonl:2: {problem}" in run.stderr, run.stderr


def test_a_repeated_idempotency_key_is_an_invalid_row(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """Two rows with one key: a deduplicating service would drop the second; it is refused."""
    items = [{**r, "idempotency_key": "same"} for r in rows(2)]
    source = write_csv(tmp_path / "in.csv", items)
    run = inline("send-many", str(source), server=server)
    assert run.rc == 2
    assert "in.csv:3: idempotency_key repeats an earlier row's" in run.stderr, run.stderr
