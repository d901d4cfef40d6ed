"""A real redis-server for the job tests, started by the suite (AOF, fsync always).

Without a ``redis-server`` on PATH the tests skip with how to get one; with
``BOTMSG_REQUIRE_REDIS=1`` (CI) they fail instead. The approach of the shared
limiter's fixture (issue #15), with the durability the jobs require.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = (
    "redis-server not found on PATH: install Redis to run the job tests "
    "(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)"
)


class JobRedis:
    """One redis-server on a unix socket, AOF with fsync always; can be killed and restarted."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with."""
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start the server; wait (at most 10 s) until it answers PING."""
        import redis

        self.process = subprocess.Popen(  # noqa: S603 - our own argument list
            [
                self.binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(unix_socket_path=str(self.socket)) as client:
                    client.ping()
                    return
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.socket.unlink(missing_ok=True)


@pytest.fixture
def job_redis(tmp_path: Path) -> Iterator[JobRedis]:
    """A durable redis-server of this test's own."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("BOTMSG_REQUIRE_REDIS") == "1":
            pytest.fail(f"BOTMSG_REQUIRE_REDIS=1 but {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = JobRedis(binary, directory)
    server.start()
    yield server
    server.kill()
