"""A durable redis-server for the job tests (AOF, fsync always), of each test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, require_binary

#: The job tests' server: AOF with ``appendfsync always``, as the jobs require.
JobRedis = RedisServer


@pytest.fixture
def job_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A durable redis-server of this test's own."""
    binary = require_binary()
    pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, directory, aof=True)
    server.start()
    yield server
    server.kill()
