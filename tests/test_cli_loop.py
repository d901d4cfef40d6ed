"""``--loop``: uvloop by default when installed, asyncio without it, a usage error when forced."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from botmsg_async.testing import FakeBotMessageServer

from .test_cli import botmsg, cli_env, server

__all__ = ["server"]  # the fixture, used here by name

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
SEND = ("send", "-d", "dep-1", "-u", "user-1", "--text", "Hello", "--log-level", "DEBUG")


def without_uvloop(tmp_path: Path, server: FakeBotMessageServer) -> dict[str, str]:
    """An environment in which ``import uvloop`` fails, as where the speed extra is absent."""
    blocker = tmp_path / "blocked" / "uvloop"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("uvloop is blocked in this test")\n')
    path = os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")]))
    return cli_env(server, PYTHONPATH=path)


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop (the speed extra) is not installed")
@pytest.mark.parametrize("flag", [(), ("--loop", "auto"), ("--loop", "uvloop")])
async def test_uvloop_is_the_default_when_installed(
    server: FakeBotMessageServer, flag: tuple[str, ...]
) -> None:
    """With uvloop installed, auto (the default) and uvloop both run the command on uvloop."""
    run = await botmsg(*SEND, *flag, server=server)
    assert run.rc == 0, run.stderr
    assert "event loop: uvloop" in run.stderr
    assert len(server.messages) == 1


async def test_loop_asyncio_runs_on_asyncios_own_loop(server: FakeBotMessageServer) -> None:
    """--loop asyncio keeps asyncio's default loop even where uvloop is installed."""
    run = await botmsg(*SEND, "--loop", "asyncio", server=server)
    assert run.rc == 0, run.stderr
    assert "event loop: asyncio" in run.stderr
    assert len(server.messages) == 1


async def test_auto_falls_back_to_asyncio_without_uvloop(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """Without uvloop, the default (auto) runs on asyncio and sends as usual."""
    run = await botmsg(*SEND, server=server, env=without_uvloop(tmp_path, server))
    assert run.rc == 0, run.stderr
    assert "event loop: asyncio" in run.stderr
    assert len(server.messages) == 1


@pytest.mark.parametrize("command", ["send", "send-many"])
async def test_loop_uvloop_without_uvloop_is_a_usage_error(
    server: FakeBotMessageServer, tmp_path: Path, command: str
) -> None:
    """--loop uvloop where uvloop is missing exits 2 with a hint, before anything is sent."""
    rows = tmp_path / "rows.csv"
    rows.write_text("department_uuid,user_uuid,text\ndep-1,user-1,Hello\n")
    args = SEND if command == "send" else ("send-many", str(rows))
    run = await botmsg(
        *args, "--loop", "uvloop", server=server, env=without_uvloop(tmp_path, server)
    )
    assert run.rc == 2
    assert "--loop uvloop" in run.stderr
    assert "speed" in run.stderr
    assert server.messages == []


async def test_an_unknown_loop_is_refused_by_the_parser(server: FakeBotMessageServer) -> None:
    """--loop takes only auto, asyncio or uvloop (argparse's usage error, exit 2)."""
    run = await botmsg(*SEND, "--loop", "trio", server=server)
    assert run.rc == 2
    assert "invalid choice" in run.stderr
