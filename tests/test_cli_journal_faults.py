"""``botmsg send-many --journal`` when the journal's disk fails: fsync or a write refused.

The CLI runs in a worker thread of this process (as in ``test_cli_durable``), with
``os.fsync`` or ``os.write`` failing for the journal file only; the server answers
from the test's loop.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
from pathlib import Path

import pytest
from aiohttp import web

from botmsg_async import cli
from botmsg_async.testing import FakeBotMessageServer
from tests.conftest import serving_send
from tests.test_cli import botmsg, cli_env, read_jsonl, rows, write_csv
from tests.test_cli import server as server  # the fixture, used by name
from tests.test_cli_durable import botmsg_in_thread, serving, success

#: The errors a disk reports when written-back data is lost or has no room.
_ERRNOS = [errno.EIO, errno.ENOSPC, errno.EDQUOT]


class _FailingFsync:
    """``os.fsync`` that fails for ``journal`` from its ``first``-th call on (a broken
    disk stays broken), and tracks how many of its bytes are known to be on disk."""

    def __init__(self, journal: Path, first: int, code: int) -> None:
        self.journal = journal
        self.first = first
        self.code = code
        self.calls = 0
        self.synced = 0  # bytes of the journal on disk
        self.real = os.fsync

    def __call__(self, fd: int) -> None:
        if not self.journal.exists() or os.fstat(fd).st_ino != self.journal.stat().st_ino:
            self.real(fd)
            return
        self.calls += 1
        if self.calls >= self.first:
            raise OSError(self.code, os.strerror(self.code))
        size = os.fstat(fd).st_size
        self.real(fd)
        self.synced = max(self.synced, size)


@pytest.mark.parametrize("code", _ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize(
    ("flags", "first"),
    [
        # Only the final close fsyncs after the first record (the header).
        ((), 2),
        # --durable: the first group commits succeed, then every fsync fails.
        (("--durable", "-c", "4"), 4),
    ],
    ids=["final-close", "durable-mid-run"],
)
async def test_a_journal_that_cannot_be_flushed_is_said_not_raised(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    flags: tuple[str, ...],
    first: int,
    code: int,
) -> None:
    """A failed journal fsync: summary, an error line on what a --resume risks, exit >= 1."""
    journal = tmp_path / "journal"
    source = write_csv(tmp_path / "in.csv", rows(60))
    fsync = _FailingFsync(journal, first, code)
    monkeypatch.setattr(os, "fsync", fsync)
    unsynced: list[str] = []  # with --durable: keys sent before their start was on disk

    def handle(request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        if flags and f'"key":"{key}"'.encode() not in journal.read_bytes()[: fsync.synced]:
            unsynced.append(key)
        return success(request)

    async with serving(handle) as base_url:
        rc = await botmsg_in_thread(
            monkeypatch, base_url, "send-many", str(source), "--journal", str(journal), *flags
        )
    err = capsys.readouterr().err
    assert rc >= cli.EXIT_FAILED, err
    assert "Traceback" not in err
    assert " of 60 items: " in err  # the summary
    assert (
        f"error: could not flush the journal {journal} to disk ({os.strerror(code)}): "
        "the outcomes reported stand, but it may lack records after a power cut, and a "
        "--resume from it could therefore send an item again"
    ) in err
    assert unsynced == []


class _FailingWrite:
    """``os.write`` that refuses the journal's ``first``-th record and every one after
    (ENOSPC: the disk is full), after taking part of that first one, as a full disk does."""

    def __init__(self, journal: Path, first: int) -> None:
        self.journal = journal
        self.first = first
        self.records = 0
        self.real = os.write

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        if not self.journal.exists() or os.fstat(fd).st_ino != self.journal.stat().st_ino:
            return self.real(fd, data)
        self.records += 1
        if self.records == self.first:
            return self.real(fd, bytes(data)[: len(data) // 2])
        if self.records > self.first:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


@pytest.mark.parametrize("first", [2, 9, 40])
@pytest.mark.parametrize("flags", [(), ("--durable",)], ids=["plain", "durable"])
async def test_a_journal_record_that_cannot_be_written_sends_nothing_twice(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    flags: tuple[str, ...],
    first: int,
) -> None:
    """ENOSPC appending a record: no send without its start record, and --resume resends none."""
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    n = 60
    source = write_csv(tmp_path / "in.csv", rows(n))
    write = _FailingWrite(journal, first)
    keys: dict[str, set[str]] = {}
    unjournaled: list[str] = []

    def handle(request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        keys.setdefault(request.match_info["user"], set()).add(key)
        if f'"key":"{key}"}}\n'.encode() not in journal.read_bytes():
            unjournaled.append(key)
        return success(request)

    args = ["send-many", str(source), "--journal", str(journal), "-c", "4", *flags]
    async with serving(handle) as base_url:
        monkeypatch.setattr(os, "write", write)
        rc = await botmsg_in_thread(monkeypatch, base_url, *args)
        err = capsys.readouterr().err
        assert rc >= cli.EXIT_FAILED, err
        assert "Traceback" not in err
        assert " of 60 items: " in err  # the summary
        assert "No space left on device" in err
        assert str(journal) in err
        assert unjournaled == []
        # A record the disk refused left nothing behind: no torn fragment.
        assert journal.read_bytes().endswith(b"\n")
        monkeypatch.setattr(os, "write", write.real)
        rc = await botmsg_in_thread(monkeypatch, base_url, *args, "--resume", "--out", str(out))
    err = capsys.readouterr().err
    assert rc in (cli.EXIT_OK, cli.EXIT_UNKNOWN), err
    assert "torn" not in err
    assert {user: k for user, k in keys.items() if len(k) > 1} == {}  # none under two keys
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(n))
    for line in lines:
        received = line["user_uuid"] in keys
        # Sent means received; unknown only for an item that was (or may have been) sent.
        assert line["outcome"] in ("sent", "unknown"), line
        if line["outcome"] == "sent":
            assert received, line


async def test_a_refused_start_record_lets_the_sends_in_flight_finish(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """ENOSPC on a start record: that item is not sent, the 3 in flight end sent, --resume."""
    journal = tmp_path / "journal"
    out, resumed = tmp_path / "out.jsonl", tmp_path / "resumed.jsonl"
    n = 8
    source = write_csv(tmp_path / "in.csv", rows(n))
    loop = asyncio.get_running_loop()
    refused = asyncio.Event()
    keys: dict[str, set[str]] = {}
    # Record 1 is the header, 2-4 the starts of the first three items, 5 the fourth's:
    # at -c 4 it is written while the three are at the server, held there until then.
    failing = _FailingWrite(journal, 5)

    def write(fd: int, data: bytes | memoryview) -> int:
        try:
            return failing(fd, data)
        except OSError:
            loop.call_soon_threadsafe(refused.set)
            raise

    async def held(request: web.Request) -> web.StreamResponse:
        await request.read()
        keys.setdefault(request.match_info["user"], set()).add(request.headers["Idempotency-Key"])
        await refused.wait()
        return success(request)

    args = ["send-many", str(source), "--journal", str(journal), "-c", "4"]
    async with serving_send(held) as base_url:
        monkeypatch.setattr(os, "write", write)
        try:
            rc = await botmsg_in_thread(monkeypatch, base_url, *args, "--out", str(out))
        finally:
            monkeypatch.setattr(os, "write", failing.real)
            refused.set()
        err = capsys.readouterr().err
        assert rc == cli.EXIT_FAILED, err
        assert "Traceback" not in err
        assert "4 of 8 items: 3 sent, 0 failed, 0 unknown, 1 skipped;" in err
        assert "No space left on device" in err
        assert "stopped with 0 item(s) unfinished" in err
        assert (
            "the journal refused the outcome of 3 item(s) whose start it holds: "
            "a --resume will report them unknown"
        ) in err
        first = [json.loads(line) for line in out.read_text().splitlines()]
        outcomes = {line["user_uuid"]: line["outcome"] for line in first}
        # The three in flight finished with their real outcome: cancelled, they were
        # unknown, and missing from --out. The fourth was never sent.
        assert sorted(outcomes.values()) == ["sent", "sent", "sent", "skipped"], err
        assert {user for user, outcome in outcomes.items() if outcome == "sent"} == set(keys)
        (skipped,) = (line for line in first if line["outcome"] == "skipped")
        assert "No space left on device" in skipped["error"]["message"]
        rc = await botmsg_in_thread(monkeypatch, base_url, *args, "--resume", "--out", str(resumed))
    err = capsys.readouterr().err
    assert rc == cli.EXIT_UNKNOWN, err
    assert "8 of 8 items: 5 sent, 0 failed, 3 unknown, 0 skipped;" in err
    assert all(len(k) == 1 for k in keys.values())  # nothing sent twice, or under a new key
    assert set(keys) == {f"user-{i}" for i in range(n)}  # the skipped one sent now
    second = {
        line["user_uuid"]: line["outcome"]
        for line in map(json.loads, resumed.read_text().splitlines())
    }
    assert len(second) == n
    # The journal lacks the outcomes of the three: in doubt for it, so never resent.
    assert second == {
        user: "unknown" if outcomes.get(user) == "sent" else "sent" for user in second
    }


# A ``sitecustomize`` that SIGKILLs the CLI right before the N-th write, pwrite or
# ftruncate its journal's begin() makes (N from BOTMSG_TEST_KILL_AT).
_KILL_IN_BEGIN = """\
import os, signal
from botmsg_async import journal

_at = int(os.environ["BOTMSG_TEST_KILL_AT"])
_calls = [0]
_active = [False]


def _killing(call):
    def wrapper(*args):
        if _active[0]:
            if _calls[0] == _at:
                os.kill(os.getpid(), signal.SIGKILL)
            _calls[0] += 1
        return call(*args)

    return wrapper


for _name in ("write", "pwrite", "ftruncate"):
    setattr(os, _name, _killing(getattr(os, _name)))
_begin = journal.FileJournal.begin


def _begin_killed(self, **options):
    _active[0] = True
    try:
        return _begin(self, **options)
    finally:
        _active[0] = False


journal.FileJournal.begin = _begin_killed
"""


@pytest.mark.parametrize("kill_at", range(4))
async def test_a_kill_while_a_resume_takes_over_a_torn_journal_never_sends_twice(
    server: FakeBotMessageServer, tmp_path: Path, kill_at: int
) -> None:
    """SIGKILL at any write of a resume's start over a torn tail: what it held back stays held."""
    total = 6
    source = write_csv(tmp_path / "in.csv", rows(total))
    journal = tmp_path / "journal"
    done = await botmsg("send-many", str(source), "--journal", str(journal), "-c", "2",
                        server=server)  # fmt: skip
    assert done.rc == 0, done.stderr
    # A power cut after item 4's start record: items 4 and 5 were sent, but the
    # journal lost their outcomes (and item 5's start), and ends in a torn record.
    lines = journal.read_bytes().splitlines(keepends=True)
    header, records = lines[0], [json.loads(line) for line in lines[1:]]
    kept = [r for r in records if r["i"] < 4 or (r["i"] == 4 and r.get("s") == "start")]
    journal.write_bytes(
        header + b"".join(json.dumps(r).encode() + b"\n" for r in kept) + b'{"i": 5, "s": "st'
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_KILL_IN_BEGIN)
    env = cli_env(server, PYTHONPATH=str(site), BOTMSG_TEST_KILL_AT=str(kill_at))
    killed = await botmsg(
        "send-many", str(source), "--journal", str(journal), "--resume", server=server, env=env
    )
    assert killed.rc in (-signal.SIGKILL, 3), killed.stderr

    out = tmp_path / "out.jsonl"
    run = await botmsg(
        "send-many", str(source), "--journal", str(journal), "--resume", "--out", str(out),
        server=server,
    )  # fmt: skip
    assert run.rc == 3, run.stderr
    assert len(server.messages) == total  # none sent again: 4 and 5 may have been delivered
    outcomes = {line["index"]: line["outcome"] for line in read_jsonl(out)}
    assert outcomes == {0: "sent", 1: "sent", 2: "sent", 3: "sent", 4: "unknown", 5: "unknown"}
