"""``botmsg send-many --redis URL --job NAME --workers N``: N runs of the job from one command.

Through the real ``botmsg`` entry point in a subprocess, against the fake server
and the suite's own durable redis-server, as ``test_jobs_cli`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

from botmsg_async.cli import main
from botmsg_async.cli.jobs import NOT_FORWARDED, worker_argv
from botmsg_async.cli.parser import build_parser
from botmsg_async.testing import FakeBotMessageServer
from tests.test_cli import write_csv
from tests.test_cli_workers import alive, children, gone, no_process_left

from .conftest import JobRedis
from .test_jobs_cli import (
    PASSWORD,
    TIMEOUT,
    botmsg_start,
    check,
    finish,
    report,
    run_args,
    when_received,
    write_items,
)

__all__ = ["no_process_left"]  # the autouse fixture: no run outlives its test


async def runs_of(process: asyncio.subprocess.Process, count: int) -> list[int]:
    """The pids of the runs a ``--workers`` parent started, once all ``count`` are up."""
    while len(pids := children(process.pid)) < count:
        assert process.returncode is None
        await asyncio.sleep(0.01)
    return pids


async def test_two_workers_complete_the_job(tmp_path: Path, job_redis: JobRedis) -> None:
    """--workers 2 sends the job from two runs: one outcome per item, --out = the server."""
    n = 600
    path = write_items(tmp_path, n)
    out = tmp_path / "out.jsonl"
    async with FakeBotMessageServer(password=PASSWORD, fault_rate=0.1, seed=5) as server:
        parent = await botmsg_start(
            server, *run_args(job_redis, path, "--workers", "2", "--out", str(out))
        )
        code, err = await finish(parent)
    outcomes = check(server, out, n)
    expected = 3 if outcomes["unknown"] else 1 if outcomes["failed"] else 0
    assert code == expected, err
    assert outcomes["sent"] > n * 0.8
    # Both runs took part, each said so once; the job's summary is printed once.
    assert err.count("run 1: this run: sent") == err.count("run 2: this run: sent") == 1
    assert err.count("chunks 12/12") == 1
    assert "progress:" not in err.split("run(s) on this machine")[1]


async def test_sigterm_drains_every_run_and_leaves_none(
    tmp_path: Path, job_redis: JobRedis
) -> None:
    """SIGTERM of the parent reaches both runs: they drain (nothing unknown), all exit, 130."""
    n = 3000
    path = write_items(tmp_path, n)
    async with FakeBotMessageServer(password=PASSWORD, latency=0.02) as server:
        parent = await botmsg_start(server, *run_args(job_redis, path, "--workers", "2"))
        pids = await runs_of(parent, 2)
        await asyncio.wait_for(when_received(server, 100), TIMEOUT)
        parent.send_signal(signal.SIGTERM)
        code, err = await finish(parent)
        assert code == 130, err
        assert await gone(pids)
        received = len(server.messages)
        out = tmp_path / "report.jsonl"
        await report(server, job_redis, path, out)
    assert "stopping: every run finishes its sends in flight" in err
    assert received < n
    outcomes = check(server, out, n)
    # Drained: every send started finished; the rest never started.
    assert outcomes["unknown"] == outcomes["failed"] == 0
    assert outcomes["sent"] == received
    assert outcomes["sent"] + outcomes["skipped"] == n


async def test_killed_parent_leaves_no_run_behind(tmp_path: Path, job_redis: JobRedis) -> None:
    """SIGKILL of the parent: its runs see it gone, stop (draining) and exit by themselves."""
    n = 3000
    path = write_items(tmp_path, n)
    async with FakeBotMessageServer(password=PASSWORD, latency=0.02) as server:
        parent = await botmsg_start(server, *run_args(job_redis, path, "--workers", "2"))
        pids = await runs_of(parent, 2)
        await asyncio.wait_for(when_received(server, 100), TIMEOUT)
        parent.kill()
        await finish(parent)  # its stderr read to the end: the pipe's transport closes
        try:
            assert await gone(pids)
        finally:  # reparented: the autouse fixture would not find them
            for pid in pids:
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


async def test_bad_input_is_refused_before_any_run(tmp_path: Path, job_redis: JobRedis) -> None:
    """An invalid row: exit 2 from the parent's own check, no run started, nothing sent."""
    path = write_csv(
        tmp_path / "in.csv",
        [
            {"department_uuid": "d", "user_uuid": "u", "text": "x"},
            {"department_uuid": "d", "user_uuid": "", "text": "x"},
        ],
    )
    async with FakeBotMessageServer(password=PASSWORD) as server:
        parent = await botmsg_start(server, *run_args(job_redis, path, "--workers", "2"))
        code, err = await finish(parent)
        assert server.requests == 0
    assert code == 2, err
    assert "invalid row" in err
    assert "run 1:" not in err
    import redis

    with redis.Redis(unix_socket_path=str(job_redis.socket)) as client:
        assert client.keys("botmsg:job:*") == []


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_bad_workers_are_refused(tmp_path: Path, value: str) -> None:
    """--workers below 1 or not a number (or auto) with --redis: usage error, exit 2."""
    path = write_items(tmp_path, 3)
    with pytest.raises(SystemExit) as exit_info:
        main(["send-many", str(path), "--redis", "redis://127.0.0.1:1", "--job", "x",
              "--workers", value])  # fmt: skip
    assert exit_info.value.code == 2


def test_stdin_input_with_workers_is_refused() -> None:
    """INPUT - cannot be read by several runs: exit 2 before anything."""
    code = main(["send-many", "-", "--redis", "redis://127.0.0.1:1", "--job", "x",
                 "--workers", "2"])  # fmt: skip
    assert code == 2


def test_worker_argv_hands_every_option_on() -> None:
    """Each run gets the parent's options (values starting with '-' too), except the listed."""
    parser = build_parser()
    parent = parser.parse_args(
        [
            "--log-level", "INFO", "send-many", "--loop", "asyncio",
            "--format", "csv", "--text=-dash", "--subject=--s", "--sender-name", "n",
            "--ignore-columns", "a,b", "--concurrency", "7", "--rate", "2.5",
            "--per-department-rate", "0.1", "--redis", "redis://h:1/0", "--job=-j",
            "--claim-timeout", "3", "--chunk-size", "9", "--job-ttl", "60.5",
            "--allow-insecure-http", "--resend-unknown", "--skip-invalid",
            "--accept-redis-loss", "--workers", "3", "--out", "o.jsonl",
            "--base-url", "http://x", "--username", "u", "--progress-interval", "1",
            "--", "-odd.csv",
        ]
    )  # fmt: skip
    child = parser.parse_args(worker_argv(parent, "csv", 4242))
    assert child.worker_of == 4242
    assert child.workers == 1
    assert child.out is None
    assert child.base_url is None
    assert child.username is None
    assert child.input == parent.input == "-odd.csv"
    assert child.log_level == "INFO"
    defaults = parser.parse_args(["send-many", "in.csv"])
    for dest in set(vars(parent)) - NOT_FORWARDED:
        # Set here (so a new option, neither handed on nor listed, fails), and handed on.
        assert getattr(parent, dest) != getattr(defaults, dest), f"set {dest} in this test"
        assert getattr(child, dest) == getattr(parent, dest), dest


async def test_a_task_that_swallows_a_cancel_still_ends() -> None:
    """A run's background task that takes a cancel for a Redis failure is cancelled again."""
    from botmsg_async.jobs import _end_task

    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.Event().wait()  # until cancelled
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as a heartbeat catching redis-py's TimeoutError goes on

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    ending = asyncio.ensure_future(_end_task(task))
    # asyncio.wait, not wait_for: a timeout must not cancel (and so rescue) the await.
    await asyncio.wait({ending}, timeout=5.0)
    ended = ending.done()
    ending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ending
    assert ended
    assert task.cancelled()
    assert swallowed == 1
