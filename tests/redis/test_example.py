"""The taskiq worked example, end to end: redelivered jobs and a killed worker send at most once."""

from __future__ import annotations

import pytest

from tests.redis_server import RedisServer

pytest.importorskip("taskiq_redis", reason="pip install -e '.[test]' (taskiq-redis)")


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
