"""The ``botmsg`` command line, end to end: real subprocesses against the fake service.

The fake service runs in the test's event loop, so every CLI run is an asyncio
subprocess (never ``subprocess.run``, which would block the loop the server
answers from).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio
from attrs import frozen

from botmsg_async import BotMessageClient, cli
from botmsg_async.journal import FileJournal
from botmsg_async.testing import FakeBotMessageServer, Fault, RequestInfo

USERNAME = "cli-user"
PASSWORD = "pw-Zq8!unique-7731"
TOKEN = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
RUN_TIMEOUT = 30.0


@frozen
class Run:
    """A finished CLI run."""

    rc: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def cli_env(server: FakeBotMessageServer | None, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: no stray BOTMSG_* variables, credentials of ``server``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOTMSG_")}
    env["PYTHONUNBUFFERED"] = "1"
    if server is not None:
        env.update(
            BOTMSG_BASE_URL=server.base_url, BOTMSG_USERNAME=USERNAME, BOTMSG_PASSWORD=PASSWORD
        )
    env.update(extra)
    return env


async def start_cli(
    *args: str, env: Mapping[str, str], stdin: bool = False
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "botmsg_async",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )


async def botmsg(
    *args: str,
    server: FakeBotMessageServer | None,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> Run:
    """Run ``python -m botmsg_async ARGS`` to the end, the server answering meanwhile."""
    process = await start_cli(
        *args, env=env if env is not None else cli_env(server), stdin=input is not None
    )
    out, err = await asyncio.wait_for(process.communicate(input), RUN_TIMEOUT)
    assert process.returncode is not None
    run = Run(process.returncode, out.decode(), err.decode())
    # Whatever happened, the credentials never show.
    for secret in (PASSWORD, TOKEN):
        assert secret not in run.stdout
        assert secret not in run.stderr
    return run


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeBotMessageServer]:
    """A fake service with the test credentials, no faults."""
    async with FakeBotMessageServer(username=USERNAME, password=PASSWORD, seed=1) as fake:
        yield fake


class Inline(Protocol):
    def __call__(
        self, *args: str, server: FakeBotMessageServer | None, env: Mapping[str, str] | None = None
    ) -> Run: ...


@pytest.fixture
def inline(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Inline:
    """Run ``botmsg`` in this process: for paths that stop before any event loop starts.

    Usage and input errors end before ``asyncio.run``; were one of them to go on
    and try to send, ``asyncio.run`` inside the test's loop would fail the test.
    That saves a subprocess start (about a second) per test.
    """

    def run(
        *args: str, server: FakeBotMessageServer | None, env: Mapping[str, str] | None = None
    ) -> Run:
        environment = env if env is not None else cli_env(server)
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        with monkeypatch.context() as patch:
            for name in os.environ:
                if name.startswith("BOTMSG_"):
                    patch.delenv(name)
            for name, value in environment.items():
                if name.startswith("BOTMSG_"):
                    patch.setenv(name, value)
            try:
                rc = cli.main(list(args))
            except SystemExit as exc:  # argparse's own usage errors
                rc = int(exc.code or 0)
            finally:
                root.handlers[:] = handlers
                root.setLevel(level)
        out, err = capsys.readouterr()
        for secret in (PASSWORD, TOKEN):
            assert secret not in out + err
        return Run(rc, out, err)

    return run


def rows(n: int, start: int = 0) -> list[dict[str, str]]:
    """``n`` distinct messages: one per user, over three departments."""
    return [
        {"department_uuid": f"dep-{i % 3}", "user_uuid": f"user-{i}", "text": f"Message #{i}"}
        for i in range(start, start + n)
    ]


def write_csv(path: Path, items: Sequence[Mapping[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(items[0]))
        writer.writeheader()
        writer.writerows(items)
    return path


def write_jsonl(path: Path, items: Sequence[Mapping[str, object]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def received(server: FakeBotMessageServer) -> list[tuple[str, str, str]]:
    return [(m.department_uuid, m.user_uuid, m.message.body) for m in server.messages]


def for_user(user: str) -> Any:
    def when(request: RequestInfo) -> bool:
        return request.user_uuid == user

    return when


# -- send -------------------------------------------------------------------------------------


async def test_send_prints_the_sent_result_as_json_and_exits_0(
    server: FakeBotMessageServer,
) -> None:
    """`send` delivers one message and prints its outcome, ids and attempts as JSON."""
    run = await botmsg(
        "send",
        "-d",
        "dep-1",
        "-u",
        "user-1",
        "--text",
        "Hello",
        "--subject",
        "Hi",
        server=server,
    )
    assert run.rc == 0, run.stderr
    [result] = run.json_lines()
    record = server.messages[0]
    assert result == {
        "outcome": "sent",
        "request_uuid": record.request_uuid,
        "message_uuid": record.message_uuid,
        "attempts": 1,
        "warnings": [],
    }
    assert (record.message.body, record.message.subject) == ("Hello", "Hi")


async def test_send_failure_prints_the_error_and_exits_1(server: FakeBotMessageServer) -> None:
    """A FAILURE answer is printed with its type and the service's errors; exit code 1."""
    server.inject(Fault.PERMANENT_FAILURE)
    run = await botmsg("send", "-d", "dep-1", "-u", "user-1", "-t", "Hello", server=server)
    assert run.rc == 1
    [result] = run.json_lines()
    assert result["outcome"] == "failed"
    assert result["error"]["type"] == "SendFailedError"
    assert result["error"]["errors"][0]["code"] == "INVALID_USER"
    assert "failed" in run.stderr
    assert server.messages == []


async def test_send_unknown_outcome_exits_3(server: FakeBotMessageServer) -> None:
    """An HTTP 500 leaves delivery unknown: outcome "unknown" with the idempotency key, exit 3."""
    server.inject(Fault.HTTP_500)
    run = await botmsg("send", "-d", "dep-1", "-u", "user-1", "-t", "Hello", server=server)
    assert run.rc == 3
    [result] = run.json_lines()
    assert result["outcome"] == "unknown"
    assert result["error"]["type"] == "ServerError"
    assert result["error"]["idempotency_key"]


async def test_send_with_an_unsafe_id_is_a_usage_error(
    inline: Inline, server: FakeBotMessageServer
) -> None:
    """An id the client would refuse exits 2 before anything is sent."""
    run = inline("send", "-d", "dep/../x", "-u", "user-1", "-t", "Hello", server=server)
    assert run.rc == 2
    assert "department_uuid" in run.stderr
    assert run.stdout == ""
    assert server.requests == 0


@pytest.mark.parametrize("key", ["", "a\tb"])
async def test_send_with_an_unusable_idempotency_key_is_a_usage_error(
    inline: Inline, server: FakeBotMessageServer, key: str
) -> None:
    """An empty (an unset "$KEY") or unprintable --idempotency-key exits 2, nothing sent."""
    run = inline(
        "send", "-d", "dep-1", "-u", "user-1", "-t", "Hello", "--idempotency-key", key,
        server=server,
    )  # fmt: skip
    assert run.rc == 2
    assert "--idempotency-key" in run.stderr
    assert run.stdout == ""
    assert server.requests == 0


async def test_password_is_read_from_stdin_and_never_shown_even_at_debug(
    server: FakeBotMessageServer,
) -> None:
    """--password-stdin takes stdin's first line; DEBUG logs show neither it nor the header."""
    env = cli_env(server)
    del env["BOTMSG_PASSWORD"]
    run = await botmsg(
        "--log-level",
        "DEBUG",
        "send",
        "--password-stdin",
        "-d",
        "d",
        "-u",
        "u",
        "-t",
        "hi",
        server=server,
        env=env,
        input=f"{PASSWORD}\n".encode(),
    )
    assert run.rc == 0, run.stderr
    assert "POST /communications/department/d/user/u/botmessage/send" in run.stderr
    # botmsg() has checked that neither the password nor the Authorization value appear.


async def test_wrong_password_exits_1_without_echoing_it(server: FakeBotMessageServer) -> None:
    """A refused password fails the send (exit 1); the error never contains it."""
    env = cli_env(server, BOTMSG_PASSWORD="wrong-" + PASSWORD[::-1])
    run = await botmsg(
        "--log-level", "DEBUG", "send", "-d", "d", "-u", "u", "-t", "hi", server=server, env=env
    )
    assert run.rc == 1
    assert PASSWORD[::-1] not in run.stdout + run.stderr
    assert "AuthenticationError" in run.stdout


async def test_a_password_flag_is_refused_without_echoing_its_value(
    inline: Inline,
    server: FakeBotMessageServer,
) -> None:
    """`--password VALUE` does not exist; the refusal does not repeat the value."""
    run = inline(
        "send", "--password", "hunter2-xyz", "-d", "d", "-u", "u", "-t", "hi", server=server
    )
    assert run.rc == 2
    assert "hunter2-xyz" not in run.stderr
    assert "--password-stdin" in run.stderr


async def test_missing_credentials_without_a_terminal_are_a_usage_error(
    inline: Inline,
    server: FakeBotMessageServer,
) -> None:
    """No password anywhere and no terminal to ask on: exit 2, nothing sent."""
    env = cli_env(server)
    del env["BOTMSG_PASSWORD"]
    run = inline("send", "-d", "d", "-u", "u", "-t", "hi", server=server, env=env)
    assert run.rc == 2
    assert "BOTMSG_PASSWORD" in run.stderr
    assert server.requests == 0


async def test_base_url_with_credentials_is_refused_without_echoing_them(
    inline: Inline,
    server: FakeBotMessageServer,
) -> None:
    """A base URL carrying user:password is refused and never printed."""
    url = server.base_url.replace("http://", f"ftp://{USERNAME}:{PASSWORD}@")
    run = inline("send", "--base-url", url, "-d", "d", "-u", "u", "-t", "hi", server=server)
    assert run.rc == 2
    assert "credentials" in run.stderr


# -- send-many: input ---------------------------------------------------------------------


async def test_send_many_from_csv_sends_every_row_and_writes_out(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """Every CSV row is sent once; --out has one line per item with its message uuid."""
    items = rows(30)
    source = write_csv(tmp_path / "in.csv", items)
    out = tmp_path / "out.jsonl"
    run = await botmsg("send-many", str(source), "--out", str(out), server=server)
    assert run.rc == 0, run.stderr
    assert sorted(received(server)) == sorted(
        (r["department_uuid"], r["user_uuid"], r["text"]) for r in items
    )
    lines = read_jsonl(out)
    assert sorted(line["index"] for line in lines) == list(range(30))
    by_key = {m.idempotency_key: m for m in server.messages}
    for line in lines:
        assert line["outcome"] == "sent"
        assert line["error"] is None
        assert line["user_uuid"] == items[line["index"]]["user_uuid"]
        assert by_key[line["idempotency_key"]].message_uuid == line["message_uuid"]
    assert "30 sent" in run.stderr


async def test_send_many_text_flag_sends_one_text_to_every_row(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """--text/--subject apply to every row, own values or not; JSONL nulls count as none."""
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"department_uuid": "d", "user_uuid": "u1", "text": "own", "subject": "own subject"},
            {"department_uuid": "d", "user_uuid": "u2", "subject": None},
            {"department_uuid": "d", "user_uuid": "u3", "text": ""},
        ],
    )
    run = await botmsg(
        "send-many", str(source), "--text", "for all", "--subject", "S", server=server
    )
    assert run.rc == 0, run.stderr
    got = {m.user_uuid: (m.message.body, m.message.subject) for m in server.messages}
    assert got == {"u1": ("for all", "S"), "u2": ("for all", "S"), "u3": ("for all", "S")}


async def test_send_many_rows_keep_their_own_values_without_flags(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """Without --text, each row sends its own text and subject."""
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"department_uuid": "d", "user_uuid": "u1", "text": "one", "subject": "S1"},
            {"department_uuid": "d", "user_uuid": "u2", "text": "two", "subject": None},
        ],
    )
    run = await botmsg("send-many", str(source), server=server)
    assert run.rc == 0, run.stderr
    got = {m.user_uuid: (m.message.body, m.message.subject) for m in server.messages}
    assert got == {"u1": ("one", "S1"), "u2": ("two", None)}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_send_many_reads_stdin_and_sniffs_its_format(
    server: FakeBotMessageServer, tmp_path: Path, fmt: str
) -> None:
    """`-` reads stdin (buffered for two passes) and tells JSONL from CSV by its first char."""
    items = rows(5)
    path = tmp_path / f"in.{fmt}"
    (write_csv if fmt == "csv" else write_jsonl)(path, items)
    run = await botmsg("send-many", "-", server=server, input=path.read_bytes())
    assert run.rc == 0, run.stderr
    assert len(server.messages) == 5


async def test_invalid_rows_are_listed_by_line_and_nothing_is_sent(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """One bad row anywhere: every bad row is reported with its line, exit 2, no request made."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"department_uuid": "d", "user_uuid": "u1", "text": "ok"}\n'
        "\n"
        '{"department_uuid": "d", "user_uuid": "a/b", "text": "bad id"}\n'
        "{not json\n"
        '{"department_uuid": "d", "user_uuid": "u4", "text": "   "}\n'
        '{"department_uuid": "d", "user_uuid": "u5", "text": "fine"}\n',
        encoding="utf-8",
    )
    run = await botmsg("send-many", str(source), server=server)
    assert run.rc == 2
    assert f"{source}:3: user_uuid 'a/b'" in run.stderr
    assert f"{source}:4: not valid JSON" in run.stderr
    assert f"{source}:5: no text" in run.stderr
    assert "nothing was sent" in run.stderr
    assert server.requests == 0


async def test_invalid_csv_rows_report_the_line_a_multiline_record_starts_on(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """CSV line numbers stay right after a quoted multi-line text."""
    source = tmp_path / "in.csv"
    source.write_text(
        'department_uuid,user_uuid,text\nd,u1,"two\nlines"\nd,,missing user\n', encoding="utf-8"
    )
    run = inline("send-many", str(source), server=server)
    assert run.rc == 2
    assert f"{source}:4: user_uuid is missing" in run.stderr
    assert server.requests == 0


async def test_skip_invalid_sends_the_rest_and_reports_skipped_rows(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """--skip-invalid sends valid rows, lists the bad ones, marks them skipped in --out."""
    items = rows(4)
    items[1]["user_uuid"] = ".."
    source = write_csv(tmp_path / "in.csv", items)
    out = tmp_path / "out.jsonl"
    run = await botmsg("send-many", str(source), "--skip-invalid", "--out", str(out), server=server)
    assert run.rc == 0, run.stderr
    assert f"{source}:3: user_uuid '..'" in run.stderr
    assert len(server.messages) == 3
    outcomes = {line["index"]: line for line in read_jsonl(out)}
    assert outcomes[1]["outcome"] == "skipped"
    assert "line 3" in outcomes[1]["error"]["message"]
    assert [outcomes[i]["outcome"] for i in (0, 2, 3)] == ["sent"] * 3


async def test_unknown_csv_column_is_an_input_error(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """A misspelt column is refused rather than silently ignored."""
    source = write_csv(
        tmp_path / "in.csv", [{"department_uuid": "d", "user_uuid": "u", "txet": "typo"}]
    )
    run = inline("send-many", str(source), server=server)
    assert run.rc == 2
    assert "'txet'" in run.stderr


# -- send-many: outcomes and exit codes ---------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "expected_rc", "outcomes"),
    [
        ({}, 0, {"sent": 6}),
        ({"user-2": Fault.PERMANENT_FAILURE}, 1, {"sent": 5, "failed": 1}),
        ({"user-3": Fault.HTTP_500}, 3, {"sent": 5, "unknown": 1}),
        (
            {"user-2": Fault.PERMANENT_FAILURE, "user-3": Fault.DROP_AFTER},
            3,
            {"sent": 4, "failed": 1, "unknown": 1},
        ),
    ],
    ids=["all-sent", "failed", "unknown", "failed-and-unknown"],
)
async def test_send_many_exit_code_reflects_the_worst_outcome(
    server: FakeBotMessageServer,
    tmp_path: Path,
    faults: dict[str, Fault],
    expected_rc: int,
    outcomes: dict[str, int],
) -> None:
    """0 all sent, 1 some failed, 3 some unknown (3 also when some failed too)."""
    for user, fault in faults.items():
        server.inject(fault, when=for_user(user))
    source = write_jsonl(tmp_path / "in.jsonl", rows(6))
    out = tmp_path / "out.jsonl"
    run = await botmsg("send-many", str(source), "--out", str(out), server=server)
    assert run.rc == expected_rc, run.stderr
    counted: dict[str, int] = {}
    for line in read_jsonl(out):
        counted[line["outcome"]] = counted.get(line["outcome"], 0) + 1
        assert (line["error"] is None) == (line["outcome"] == "sent")
    assert counted == outcomes


async def test_refused_credentials_stop_the_batch_and_resume_sends_the_rest(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """Wrong credentials: exit 1, nothing delivered; --resume with the right ones sends all."""
    source = write_csv(tmp_path / "in.csv", rows(10))
    journal = tmp_path / "journal"
    wrong = cli_env(server, BOTMSG_PASSWORD="not-the-password")
    run = await botmsg(
        "send-many", str(source), "--journal", str(journal), "-c", "2", server=server, env=wrong
    )
    assert run.rc == 1
    assert "stopped early" in run.stderr
    assert server.messages == []
    out = tmp_path / "out.jsonl"
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
    assert len(server.messages) == 10
    assert {line["outcome"] for line in read_jsonl(out)} == {"sent"}


# -- the journal ------------------------------------------------------------------------------


@pytest.mark.parametrize("mistake", ["wrong-password", "wrong-base-url"])
async def test_an_in_doubt_item_stays_in_doubt_until_a_resend_settles_it(
    server: FakeBotMessageServer, tmp_path: Path, mistake: str
) -> None:
    """A resend of an in-doubt item that proves nothing (401, 404) keeps it unknown."""
    source = write_csv(tmp_path / "in.csv", rows(5))
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    # Delivered, but the answer is lost: in doubt.
    server.inject(Fault.DROP_AFTER, times=1, when=for_user("user-3"))
    run = await botmsg("send-many", str(source), "--journal", str(journal), server=server)
    assert run.rc == 3, run.stderr
    assert len(server.messages) == 5

    # --resend-unknown that goes wrong: the resend settles nothing.
    if mistake == "wrong-password":
        wrong = cli_env(server, BOTMSG_PASSWORD="not-the-password")
    else:  # a 404: final for a fresh message, says nothing about the earlier attempt
        wrong = cli_env(server, BOTMSG_BASE_URL=f"{server.base_url}/no-such-gateway")
    args = ("send-many", str(source), "--journal", str(journal), "--resume", "--out", str(out))
    run = await botmsg(*args, "--resend-unknown", server=server, env=wrong)
    assert run.rc != 0
    (line,) = [line for line in read_jsonl(out) if line["index"] == 3]
    assert line["outcome"] == "unknown"
    assert "may or may not have been delivered" in line["error"]["message"]

    # A plain --resume must still report it unknown, not send it under a new key.
    run = await botmsg(*args, server=server)
    assert run.rc == 3, run.stderr
    assert [m.user_uuid for m in server.messages].count("user-3") == 1
    (line,) = [line for line in read_jsonl(out) if line["index"] == 3]
    assert line["outcome"] == "unknown"


async def wait_for_outcomes(journal: Path, count: int, process: asyncio.subprocess.Process) -> None:
    """Return once ``journal`` holds ``count`` outcome records (or the process ended)."""
    # Polling: the journal is a file another process appends to; nothing to await.
    while process.returncode is None and outcome_records(journal) < count:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def outcome_records(journal: Path) -> int:
    """How many outcome records ``journal`` holds so far."""
    try:
        return journal.read_bytes().count(b'"o":')
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [0.1, 0.5, 0.9])
async def test_sigkill_then_resume_never_sends_twice_and_accounts_for_every_item(
    tmp_path: Path, kill_at: float
) -> None:
    """After kill -9 mid-run, --resume sends nothing twice and --out covers every item."""
    total = 80
    items = rows(total)
    wanted = {(r["department_uuid"], r["user_uuid"], r["text"]) for r in items}
    source = write_csv(tmp_path / "in.csv", items)
    journal = tmp_path / "journal"
    # The last four items are held (answered an hour late) until the kill: however
    # slow this test's side is, the run cannot end before it is killed, while the
    # kill still lands wherever the free-running items happen to be.
    holding = [True]

    def held(info: RequestInfo) -> bool:
        return holding[0] and int(info.user_uuid.removeprefix("user-")) >= total - 4

    async with FakeBotMessageServer(
        username=USERNAME, password=PASSWORD, latency=0.02, fault_latency=3600
    ) as server:
        server.inject(Fault.LATENCY, when=held)
        env = cli_env(server)
        first = await start_cli(
            "send-many", str(source), "--journal", str(journal), "-c", "4", env=env
        )
        await asyncio.wait_for(wait_for_outcomes(journal, int(total * kill_at), first), RUN_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):  # it finished first: asserted below
            first.kill()
        await first.communicate()
        holding[0] = False
        assert first.returncode == -signal.SIGKILL, "the run ended before the kill"

        out = tmp_path / "resumed.jsonl"
        run = await botmsg(
            "send-many",
            str(source),
            "--journal",
            str(journal),
            "--resume",
            "--out",
            str(out),
            "-c",
            "4",
            server=server,
        )
        lines = read_jsonl(out)
        got = received(server)
        # Nothing delivered twice, by content or by key.
        assert len(set(got)) == len(got)
        keys = [m.idempotency_key for m in server.messages]
        assert len(set(keys)) == len(keys)
        # --out covers every item exactly once, and is truthful about each.
        assert sorted(line["index"] for line in lines) == list(range(total))
        by_key = {m.idempotency_key: m for m in server.messages}
        unknown = 0
        for line in lines:
            item = items[line["index"]]
            content = (item["department_uuid"], item["user_uuid"], item["text"])
            if line["outcome"] == "sent":
                assert by_key[line["idempotency_key"]].message_uuid == line["message_uuid"]
            else:
                assert line["outcome"] == "unknown", line
                unknown += 1
            if content not in got:
                assert line["outcome"] in ("unknown", "failed"), line
        assert run.rc == (3 if unknown else 0), run.stderr
        assert unknown <= 4  # at most the items in flight at the kill

        if kill_at != 0.5:
            return  # the same path for every kill point: run it once, for time
        # Sending the in-doubt ones again with their keys completes the job, still once each.
        run = await botmsg(
            "send-many",
            str(source),
            "--journal",
            str(journal),
            "--resume",
            "--resend-unknown",
            "--out",
            str(out),
            server=server,
        )
        assert run.rc == 0, run.stderr
        assert {line["outcome"] for line in read_jsonl(out)} == {"sent"}
        got = received(server)
        assert sorted(got) == sorted(wanted)


async def test_sigterm_drains_in_flight_sends_so_resume_has_nothing_in_doubt(
    tmp_path: Path,
) -> None:
    """A first SIGTERM starts nothing new but lets in-flight sends finish: exit 130, no unknown."""
    total = 80
    source = write_csv(tmp_path / "in.csv", rows(total))
    journal = tmp_path / "journal"
    # Items 20 to 23 fill all four workers and are answered 2 s late: the run is
    # parked there, not racing to its end, when the SIGTERM comes (the fake
    # server has no "hold until released", so this is a margin of 2 s, not an event).
    held = range(total // 4, total // 4 + 4)

    def parked(info: RequestInfo) -> bool:
        return int(info.user_uuid.removeprefix("user-")) in held

    async with FakeBotMessageServer(
        username=USERNAME, password=PASSWORD, latency=0.02, fault_latency=2.0
    ) as server:
        server.inject(Fault.LATENCY, when=parked)
        first = await start_cli(
            "send-many", str(source), "--journal", str(journal), "-c", "4", env=cli_env(server)
        )
        await asyncio.wait_for(wait_for_outcomes(journal, total // 4, first), RUN_TIMEOUT)
        first.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(first.communicate(), RUN_TIMEOUT)
        assert first.returncode == 130
        assert "not started" in err.decode()
        assert "0 unknown" in err.decode()
        assert len(server.messages) == total // 4 + 4  # the parked ones were drained

        run = await botmsg(
            "send-many", str(source), "--journal", str(journal), "--resume", server=server
        )
        assert run.rc == 0, run.stderr
        assert sorted(received(server)) == sorted(
            (r["department_uuid"], r["user_uuid"], r["text"]) for r in rows(total)
        )


async def test_a_torn_journal_holds_back_the_window_after_it(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """A journal cut mid-record resumes with a warning; the run's window is held back.

    A torn record means the journal's end may be lost (a power cut): the next
    --concurrency items the run would have started may have been sent with no
    surviving start record, so they are reported unknown, never sent again.
    """
    source = write_csv(tmp_path / "in.csv", rows(6))
    journal = tmp_path / "journal"
    run = await botmsg(
        "send-many", str(source), "--journal", str(journal), "-c", "1", server=server
    )
    assert run.rc == 0
    # One at a time: header, start 0, outcome 0, start 1, outcome 1, ...
    lines = journal.read_bytes().splitlines(keepends=True)
    assert b'"window":1' in lines[0]
    assert b'"s":"start"' in lines[3]
    assert b'"o":"sent"' in lines[4]
    # Cut while writing item 1's outcome: item 1 is in doubt, and so is item 2,
    # the one window (-c 1) after it: its start record may be lost too.
    journal.write_bytes(b"".join(lines[:4]) + lines[4][:15])
    server.reset()
    out = tmp_path / "out.jsonl"
    args = ["send-many", str(source), "--journal", str(journal), "--resume", "--out", str(out)]
    run = await botmsg(*args, server=server)
    assert run.rc == 3, run.stderr
    assert "torn record" in run.stderr
    assert "1 item(s) the stopped run may have started" in run.stderr
    outcomes = {line["index"]: line["outcome"] for line in read_jsonl(out)}
    assert outcomes == {0: "sent", 1: "unknown", 2: "unknown", 3: "sent", 4: "sent", 5: "sent"}
    (held,) = [line for line in read_jsonl(out) if line["index"] == 2]
    assert held["idempotency_key"] is None
    assert "cannot be resent safely" in held["error"]["message"]
    for line in journal.read_bytes().splitlines():
        json.loads(line)  # the fragment is gone, no record got glued to it
    assert sorted(m.user_uuid for m in server.messages) == [f"user-{i}" for i in range(3, 6)]

    # The torn record is gone now; the journal still holds item 2 back, even
    # from --resend-unknown, which resends item 1 under its own key.
    run = await botmsg(*args, "--resend-unknown", server=server)
    assert run.rc == 3, run.stderr
    outcomes = {line["index"]: line["outcome"] for line in read_jsonl(out)}
    assert outcomes == {0: "sent", 1: "sent", 2: "unknown", 3: "sent", 4: "sent", 5: "sent"}
    assert sorted(m.user_uuid for m in server.messages) == [f"user-{i}" for i in (1, 3, 4, 5)]


async def test_resume_refuses_a_journal_of_another_input(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """A journal belongs to one input (and --text): resuming another exits 2, sends nothing."""
    source = write_csv(tmp_path / "in.csv", rows(3))
    journal = tmp_path / "journal"
    assert (
        await botmsg("send-many", str(source), "--journal", str(journal), server=server)
    ).rc == 0
    other = write_csv(tmp_path / "other.csv", rows(3, start=10))
    run = inline("send-many", str(other), "--journal", str(journal), "--resume", server=server)
    assert run.rc == 2
    assert "another input" in run.stderr
    assert len(server.messages) == 3


async def test_an_existing_journal_needs_resume(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """Rerunning with the same journal but without --resume is refused: it would resend all."""
    source = write_csv(tmp_path / "in.csv", rows(3))
    journal = tmp_path / "journal"
    assert (
        await botmsg("send-many", str(source), "--journal", str(journal), server=server)
    ).rc == 0
    run = inline("send-many", str(source), "--journal", str(journal), server=server)
    assert run.rc == 2
    assert "--resume" in run.stderr
    assert len(server.messages) == 3


async def test_a_journal_in_use_by_another_run_is_refused(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """Two runs on one journal would both send its open items: the second exits 2."""
    source = write_csv(tmp_path / "in.csv", rows(3))
    journal = tmp_path / "journal"
    holder = FileJournal(str(journal))  # as a running botmsg would hold it
    try:
        run = inline("send-many", str(source), "--journal", str(journal), server=server)
    finally:
        holder.close()
    assert run.rc == 2
    assert "in use by another botmsg run" in run.stderr
    assert server.requests == 0


async def test_an_unwritable_out_leaves_no_journal_behind(
    inline: Inline, server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """A bad --out exits 2 before sending and leaves no journal demanding --resume."""
    source = write_csv(tmp_path / "in.csv", rows(3))
    journal = tmp_path / "journal"
    args = ("send-many", str(source), "--journal", str(journal), "--out")
    run = inline(*args, str(tmp_path), server=server)  # a directory
    assert run.rc == 2
    assert "cannot write" in run.stderr
    assert not journal.exists()
    assert (await botmsg(*args, str(tmp_path / "out.jsonl"), server=server)).rc == 0
    assert len(server.messages) == 3


# -- fake-server and demo ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("send-many", "IN", "--rate", "inf"), "--rate"),
        (("send-many", "IN", "--rate", "nan"), "--rate"),
        (("send-many", "IN", "--rate", "1e-320"), "--rate"),
        (("send-many", "IN", "--per-department-rate", "inf"), "--per-department-rate"),
        (("send-many", "IN", "--per-department-rate", "-1"), "--per-department-rate"),
        (("fake-server", "--latency", "nan"), "--latency"),
        (("fake-server", "--latency", "inf"), "--latency"),
        (("fake-server", "--latency", "-1"), "--latency"),
    ],
)
async def test_numbers_that_would_hang_or_crash_later_are_usage_errors(
    inline: Inline, tmp_path: Path, args: tuple[str, ...], option: str
) -> None:
    """An infinite, NaN or out-of-range rate or delay exits 2 naming the option, before any I/O."""
    # Async on purpose: a run that went on past the checks would call asyncio.run
    # inside this test's loop and fail, instead of sending or serving for ever.
    path = str(write_csv(tmp_path / "in.csv", rows(1)))
    run = inline(*(path if a == "IN" else a for a in args), server=None)
    assert run.rc == 2
    assert option in run.stderr
    assert "Traceback" not in run.stderr


def test_fake_server_refuses_an_impossible_port(inline: Inline) -> None:
    """An out-of-range --port is a usage error (exit 2), not a traceback."""
    run = inline("fake-server", "--port", "70000", server=None)
    assert run.rc == 2
    assert "--port 70000" in run.stderr
    assert "Traceback" not in run.stderr


async def test_fake_server_on_a_taken_port_is_a_usage_error(server: FakeBotMessageServer) -> None:
    """A --port already in use exits 2 with the reason, not a traceback."""
    run = await botmsg("fake-server", "--port", str(server.port), server=None)
    assert run.rc == 2
    assert "cannot listen" in run.stderr
    assert "Traceback" not in run.stderr


async def test_fake_server_prints_its_url_serves_and_stops_on_sigterm() -> None:
    """`fake-server` prints a base URL that accepts the default credentials; SIGTERM exits 0."""
    process = await start_cli("fake-server", "--seed", "3", env=cli_env(None))
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), RUN_TIMEOUT)
        base_url = line.decode().strip()
        assert base_url.startswith("http://127.0.0.1:")
        async with BotMessageClient(base_url, "user", "secret") as client:
            result = await client.send("dep-1", "user-1", "Hello")
        assert result.message_uuid
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    assert process.returncode == 0
    assert "1 message(s) received" in err.decode()


async def test_demo_sends_everything_despite_faults_and_exits_0() -> None:
    """`demo` needs no configuration, retries through its faults and reports no duplicates."""
    run = await botmsg("demo", server=None)
    assert run.rc == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["sent"] == report["server_received"] == 2000
    assert report["failed"] == report["unknown"] == report["server_duplicates"] == 0
    assert report["retries"] > 0
