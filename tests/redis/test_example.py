"""The taskiq worked example, end to end: redelivered jobs and a killed worker send at most once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from botmsg_async.testing import FakeBotMessageServer, Fault
from tests.redis_server import RedisServer

pytest.importorskip("taskiq_redis", reason="pip install -e '.[test]' (taskiq-redis)")

ROOT = Path(__file__).resolve().parent.parent.parent
DEPT = "7f0c6a52-1c7e-4c3e-9a53-6c1f8f0f2a10"


async def _run_hook(hook: Callable[[Any], Awaitable[None] | None], state: Any) -> None:
    """Run a taskiq event handler as the worker would (it may be sync or async)."""
    pending = hook(state)
    if pending is not None:
        await pending


@pytest.mark.slow
async def test_redelivered_jobs_and_a_killed_worker_send_each_message_at_most_once(
    redis_server: RedisServer,
) -> None:
    """200 jobs, 40 redelivered, one worker SIGKILLed: each received at most once, all settled."""
    from examples.taskiq_demo import run_demo

    report = await run_demo(redis_server.url, jobs=200, redelivered=40, workers=2)
    assert report.received_twice == 0
    assert report.missing == 0
    assert report.failed_but_received == 0
    assert report.sent_but_missing == 0
    assert report.killed_pid is not None
    assert sum(report.outcomes.values()) == 200
    assert set(report.outcomes) <= {"sent", "unknown"}


async def test_the_task_reports_each_outcome_and_sends_a_job_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example's task, run in-process as a worker runs it: sent, unknown, failed, once each."""
    from taskiq import Context, TaskiqMessage

    from examples import taskiq_send

    async with FakeBotMessageServer(username="bot", password="pw") as server:
        # What the docstring tells a worker to set (BOTMSG_RATE left at its default).
        monkeypatch.setenv("BOTMSG_BASE_URL", server.base_url)
        monkeypatch.setenv("BOTMSG_USERNAME", "bot")
        monkeypatch.setenv("BOTMSG_PASSWORD", "pw")
        monkeypatch.setattr(taskiq_send, "REDIS_URL", redis_server.url)  # read at import
        broker = taskiq_send.make_broker(redis_server.url)
        await _run_hook(taskiq_send.startup, broker.state)
        try:
            message = TaskiqMessage(task_id="t", task_name="send", labels={}, args=[], kwargs={})
            context = Context(message, broker)

            async def job(job_id: str, user: str) -> str:
                text = f"message {job_id}"
                return await taskiq_send.send_message(job_id, DEPT, user, text, context)

            assert await job("1", "u-1") == "sent"
            assert await job("1", "u-1") == "sent"  # redelivered: answered from the guard
            server.inject(Fault.DROP_AFTER)  # processed, then the answer is lost
            assert await job("2", "u-2") == "unknown"
            assert await job("2", "u-2") == "unknown"  # never resent under a new key
            server.inject(Fault.PERMANENT_FAILURE)
            assert await job("3", "u-3") == "failed"
            outcomes = await broker.state.redis.hgetall(taskiq_send.OUTCOMES)
            runs = await broker.state.redis.hgetall(taskiq_send.RUNS)
        finally:
            await _run_hook(taskiq_send.shutdown, broker.state)
        assert {k.decode(): v.decode() for k, v in outcomes.items()} == {
            "1": "sent",
            "2": "unknown",
            "3": "failed",
        }
        assert {k.decode(): int(v) for k, v in runs.items()} == {"1": 2, "2": 2, "3": 1}
        assert sorted(m.message.body for m in server.messages) == ["message 1", "message 2"]
        assert server.duplicates == 0


def test_the_demo_command_line_documented_in_its_docstring_parses() -> None:
    """``python -m examples.taskiq_demo --help`` runs from the checkout and names its flags."""
    done = subprocess.run(
        [sys.executable, "-m", "examples.taskiq_demo", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for flag in ("--redis-url", "--jobs", "--redelivered", "--workers", "--rate", "--log"):
        assert flag in done.stdout
