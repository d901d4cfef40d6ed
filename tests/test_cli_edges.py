"""The ``botmsg`` command line at its operational edges: closed streams, pipes, signals.

Every run goes through the real entry point in a subprocess, against the fake service.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from botmsg_async.testing import FakeBotMessageServer, Fault

from .conftest import ok, run_botmsg, serving_send
from .test_cli import (
    RUN_TIMEOUT,
    Run,
    botmsg,
    cli_env,
    read_jsonl,
    rows,
    start_cli,
    write_jsonl,
)
from .test_cli import server as server  # the fixture, used by name

#: Runs ``python -m botmsg_async ARGS`` with the standard stream given first closed.
_CLOSED = (
    'fd=$1; shift; case $fd in 0) exec "$@" <&- ;; 1) exec "$@" >&- ;; 2) exec "$@" 2>&- ;; esac'
)


async def botmsg_closed(fd: int, *args: str, server: FakeBotMessageServer) -> Run:
    """Run ``botmsg ARGS`` with standard stream ``fd`` closed; the others are pipes."""
    process = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        _CLOSED,
        "sh",
        str(fd),
        sys.executable,
        "-m",
        "botmsg_async",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(server),
    )
    out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def test_a_closed_stderr_changes_neither_the_sends_nor_stdout(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """With stderr closed (2>&-) the run sends all, and no human line lands on stdout."""
    source = write_jsonl(tmp_path / "in.jsonl", rows(5))
    out = tmp_path / "out.jsonl"
    run = await botmsg_closed(2, "send-many", str(source), "--out", str(out), server=server)
    assert run.rc == 0, run
    assert [r["outcome"] for r in read_jsonl(out)] == ["sent"] * 5
    assert run.stdout == ""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"department_uuid": "d", "user_uuid": "u u"}])
    run = await botmsg_closed(2, "send-many", str(bad), server=server)
    assert (run.rc, run.stdout) == (2, "")  # the refusal was for stderr, which is closed


async def test_a_closed_stdin_or_stdout_is_a_usage_error_when_the_run_needs_it(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """`-` from a closed stdin, or `--out -` to a closed stdout: exit 2, said, nothing sent."""
    run = await botmsg_closed(0, "send-many", "-", server=server)
    assert run.rc == 2, run
    assert "stdin: the input is empty" in run.stderr
    assert "Traceback" not in run.stderr
    source = write_jsonl(tmp_path / "in.jsonl", rows(3))
    journal = tmp_path / "job.journal"
    run = await botmsg_closed(
        1, "send-many", str(source), "--out", "-", "--journal", str(journal), server=server
    )
    assert run.rc == 2, run
    assert "--out -: standard output is closed" in run.stderr
    assert server.messages == []
    assert not journal.exists()  # nothing sent: no journal demanding --resume


async def _writer_connected(fifo: Path) -> int:
    """Open ``fifo`` for writing once a reader has it open; return the descriptor."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            await asyncio.sleep(0.01)


async def test_a_named_pipe_input_is_read_once_and_sent(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """A FIFO or <(command) as INPUT gives its data once: it is all sent, no hang."""
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    run_task = asyncio.create_task(botmsg("send-many", str(fifo), "--out", str(out), server=server))
    fd = await asyncio.wait_for(_writer_connected(fifo), RUN_TIMEOUT)
    data = write_jsonl(tmp_path / "data.jsonl", rows(20)).read_bytes()
    os.set_blocking(fd, True)
    try:
        await asyncio.to_thread(os.write, fd, data)
    except BrokenPipeError:  # the old code closed its first open at once
        pass
    finally:
        os.close(fd)
    run = await run_task
    assert run.rc == 0, run
    assert sorted(r["index"] for r in read_jsonl(out)) == list(range(20))


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
async def test_a_signal_while_reading_the_input_exits_130(
    server: FakeBotMessageServer, tmp_path: Path, signal_name: str
) -> None:
    """SIGTERM before the run starts (reading a pipe) exits 130 like SIGINT, not 143."""
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "botmsg_async",
        "send-many",
        str(fifo),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(server),
    )
    fd = await asyncio.wait_for(_writer_connected(fifo), RUN_TIMEOUT)
    try:
        os.write(fd, b'{"department_uuid": "d", ')  # half a row: the reader waits for more
        process.send_signal(getattr(signal, signal_name))
        _, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    finally:
        os.close(fd)
    assert process.returncode == 130, err
    assert b"interrupted" in err
    assert b"Traceback" not in err
    assert server.messages == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_an_out_that_cannot_be_written_leaves_no_send_in_doubt(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """--out failing mid-run (ENOSPC) starts nothing new, and settles every send begun."""
    source = write_jsonl(tmp_path / "in.jsonl", rows(400))
    journal = tmp_path / "job.journal"
    run = await botmsg(
        "send-many", str(source), "--out", "/dev/full", "--journal", str(journal), server=server
    )
    assert run.rc == 1, run
    assert "No space left on device" in run.stderr
    assert "Traceback" not in run.stderr
    records = read_jsonl(journal)[1:]
    started = {r["i"] for r in records if r.get("s") == "start"}
    settled = {r["i"] for r in records if "o" in r}
    assert started == settled  # nothing in flight was abandoned
    assert 0 < len(server.messages) == len(settled) < 400


def _summary_counts(stderr: str) -> dict[str, int]:
    """The counts of a ``send-many`` summary line: done, of, sent, failed, unknown, skipped."""
    match = re.search(
        r"(\d+) of (\d+) items: (\d+) sent, (\d+) failed, (\d+) unknown, (\d+) skipped", stderr
    )
    assert match is not None, stderr
    names = ("done", "of", "sent", "failed", "unknown", "skipped")
    return dict(zip(names, map(int, match.groups()), strict=True))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_an_out_that_cannot_be_written_is_summed_up_as_the_journal_says(
    server: FakeBotMessageServer, tmp_path: Path, workers: str
) -> None:
    """--out failing mid-run: with or without workers, the summary counts what the journal holds."""
    n = 1500
    source = write_jsonl(tmp_path / "in.jsonl", rows(n))
    journal = tmp_path / "journal"
    run = await botmsg(
        "send-many", str(source), "--out", "/dev/full", "--journal", str(journal),
        "--workers", workers, server=server,
    )  # fmt: skip
    assert run.rc == 1, run
    assert "No space left on device" in run.stderr
    assert "Traceback" not in run.stderr
    last: dict[int, dict[str, Any]] = {}
    for record in _journal_records(tmp_path):
        if "i" in record:
            last[record["i"]] = record
    assert all("o" in r for r in last.values())  # every send begun was settled
    recorded = Counter(r["o"] for r in last.values())
    counts = _summary_counts(run.stderr)
    assert counts["of"] == n
    assert {o: counts[o] for o in ("sent", "failed", "unknown", "skipped")} == {
        o: recorded[o] for o in ("sent", "failed", "unknown", "skipped")
    }
    assert counts["done"] == len(last) == len(server.messages) < n
    assert "stopped with 0 item(s) unfinished" in run.stderr


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
async def test_stdout_is_utf8_json_whatever_the_locale(
    server: FakeBotMessageServer, tmp_path: Path, encoding: str
) -> None:
    """--out - under an ASCII or Latin-1 locale writes UTF-8 JSON, as an --out file does."""
    items = [{"department_uuid": "d", "user_uuid": "юзер-1", "text": "Привет"}, *rows(2)]
    source = write_jsonl(tmp_path / "in.jsonl", items)
    env = cli_env(server, PYTHONIOENCODING=encoding)
    run = await botmsg("send-many", str(source), "--out", "-", server=server, env=env)
    assert run.rc == 0, run
    assert sorted(r["user_uuid"] for r in run.json_lines()) == ["user-0", "user-1", "юзер-1"]


def _journal_records(directory: Path) -> list[dict[str, Any]]:
    """Every record of the journal ``directory/journal`` and of its segments."""
    return [
        json.loads(line)
        for part in sorted(directory.glob("journal*"))
        for line in part.read_text(encoding="utf-8").splitlines()
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_rows_appended_after_the_check_are_never_sent(tmp_path: Path, workers: str) -> None:
    """An input that grows during the run stops it: the new rows were never checked."""
    source = write_jsonl(tmp_path / "in.jsonl", rows(2000))
    first = asyncio.Event()
    release = asyncio.Event()
    users: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        users.append(request.match_info["user"])
        first.set()
        await release.wait()  # the first send waits until the file has grown
        if users.count("user-7") == 1 and users[-1] == "user-7":
            return web.Response(status=503)  # not processed: retried once, and counted
        return await ok(request)

    async with serving_send(handle) as base_url:
        run = asyncio.create_task(
            run_botmsg(
                "send-many",
                str(source),
                "--concurrency",
                "1",
                "--workers",
                workers,
                "--journal",
                str(tmp_path / "journal"),
                base_url=base_url,
                username="u",
                password="secret-pw",
            )
        )
        await asyncio.wait_for(first.wait(), RUN_TIMEOUT)
        with source.open("a", encoding="utf-8") as f:
            f.write(
                json.dumps({"department_uuid": "d", "user_uuid": "appended", "text": "x"}) + "\n"
            )
        release.set()
        rc, _, err = await run
    assert rc in (1, 3), err
    assert "changed while sending" in err
    assert "Traceback" not in err
    assert "appended" not in users
    # The rows in flight when it was found finished: each checked row sent once, none
    # left in doubt (abandoned, they would be "unknown").
    assert sorted(set(users)) == sorted(f"user-{i}" for i in range(2000))
    assert len(users) == 2001  # user-7 twice: its 503 proved it was not processed
    assert "; 1 retries" in err  # counted, also when the run ends with the input's error
    records = _journal_records(tmp_path)
    started = {r["i"] for r in records if r.get("s") == "start"}
    sent = {r["i"] for r in records if r.get("o") == "sent"}
    assert started == sent == set(range(2000))


async def botmsg_to_a_closed_pipe(*args: str, server: FakeBotMessageServer) -> Run:
    """Run ``botmsg ARGS`` with stdout a pipe nobody reads any more (``| true``: EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone: every write to stdout fails with EPIPE
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "botmsg_async",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(server),
        )
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    assert process.returncode is not None
    return Run(process.returncode, "", err.decode())


@pytest.mark.parametrize(
    ("fault", "rc", "outcome"),
    [(None, 0, "sent"), (Fault.PERMANENT_FAILURE, 1, "failed"), (Fault.HTTP_500, 3, "unknown")],
)
async def test_send_to_a_closed_stdout_still_exits_with_its_outcome(
    server: FakeBotMessageServer, fault: Fault | None, rc: int, outcome: str
) -> None:
    """`botmsg send | true`: the exit code is the send's outcome (not 1), said on stderr."""
    if fault is not None:
        server.inject(fault)
    run = await botmsg_to_a_closed_pipe("send", "-d", "d-1", "-u", "u-1", "-t", "hi", server=server)
    assert run.rc == rc, run
    assert "Traceback" not in run.stderr
    assert "standard output is closed" in run.stderr
    assert server.requests == 1
    if fault is not None:
        assert f"{outcome}: " in run.stderr  # the human line still comes


async def test_demo_to_a_closed_stdout_still_exits_with_its_outcome(
    server: FakeBotMessageServer,
) -> None:
    """`botmsg demo | true` runs its batch and exits 0, with no traceback and no exit 120."""
    run = await botmsg_to_a_closed_pipe("demo", "--messages", "20", server=server)
    assert run.rc == 0, run
    assert "Traceback" not in run.stderr
    assert "Exception ignored" not in run.stderr
    assert "standard output is closed" in run.stderr


async def test_end_of_input_at_the_password_prompt_is_a_usage_error(
    server: FakeBotMessageServer,
) -> None:
    """Ctrl-D at the terminal's password prompt: exit 2 "no password given", no traceback."""
    env = cli_env(server)
    del env["BOTMSG_PASSWORD"]
    master, slave = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "botmsg_async",
            "send",
            "-d",
            "d",
            "-u",
            "u",
            "-t",
            "hi",
            stdin=slave,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            # No controlling terminal: getpass asks on stdin, the pty, never on the
            # terminal the tests were started from.
            start_new_session=True,
        )
        assert process.stderr is not None
        prompt = await asyncio.wait_for(process.stderr.readuntil(b"password: "), RUN_TIMEOUT)
        assert prompt.endswith(b"password: ")
        os.write(master, b"\x04")  # Ctrl-D at the start of a line: end of input
        _, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    finally:
        os.close(master)
        os.close(slave)
    assert process.returncode == 2, err
    assert b"Traceback" not in err
    assert b"no password given" in err
    assert server.requests == 0


@pytest.mark.parametrize("given_key", [False, True])
async def test_send_interrupted_mid_request_reports_unknown_with_its_key(
    tmp_path: Path, given_key: bool
) -> None:
    """Ctrl-C while the request is at the service: exit 130, outcome unknown, the key to reuse."""
    arrived, release = asyncio.Event(), asyncio.Event()
    keys: list[str] = []

    async def hold(request: web.Request) -> web.StreamResponse:
        keys.append(request.headers["Idempotency-Key"])
        arrived.set()
        await release.wait()  # the service is slow: the answer comes after the signal
        return await ok(request)

    async with serving_send(hold) as base_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOTMSG_")}
        env.update(BOTMSG_BASE_URL=base_url, BOTMSG_USERNAME="u", BOTMSG_PASSWORD="secret-pw")
        extra = ["--idempotency-key", "my-key-1"] if given_key else []
        process = await start_cli("send", "-d", "d", "-u", "u", "-t", "hi", *extra, env=env)
        await asyncio.wait_for(arrived.wait(), RUN_TIMEOUT)
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
        release.set()
    assert process.returncode == 130, err
    [key] = keys
    if given_key:
        assert key == "my-key-1"
    result = json.loads(out)
    assert result["outcome"] == "unknown"
    assert result["error"]["idempotency_key"] == key
    assert f"--idempotency-key {key}" in err.decode()
    assert b"Traceback" not in err
