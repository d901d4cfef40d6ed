"""The Redis tests' server fixtures (see tests/redis_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, require_binary


@pytest.fixture(scope="session")
def redis_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session."""
    binary = require_binary()
    pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_server(redis_session_server: RedisServer) -> RedisServer:
    """The session's redis-server, emptied for this test."""
    redis_session_server.flush()
    return redis_session_server


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may kill and restart."""
    binary = require_binary()
    pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, directory)
    server.start()
    yield server
    server.kill()
