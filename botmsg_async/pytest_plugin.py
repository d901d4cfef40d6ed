"""pytest fixtures for testing code that sends bot messages.

Enable the plugin in your top-level ``conftest.py`` (it needs ``pytest-asyncio``, and
``jsonschema`` from the ``testing`` extra)::

    pytest_plugins = ["botmsg_async.pytest_plugin"]

and use the fixtures: ``botmsg_server``, a started ``FakeBotMessageServer`` per
test, and ``botmsg_client``, a ``BotMessageClient`` bound to it that never waits
between retries::

    async def test_welcome(botmsg_server):
        await send_welcome(base_url=botmsg_server.base_url, username="user", password="secret")
        assert botmsg_server.messages[0].message.body == "Welcome!"

To configure the server, override ``botmsg_server_options`` (in a module, a class
or a conftest)::

    @pytest.fixture
    def botmsg_server_options():
        return {"fault_rate": 0.2, "seed": 1}
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from botmsg_async import BotMessageClient
from botmsg_async.testing import FakeBotMessageServer

__all__ = ["botmsg_client", "botmsg_server", "botmsg_server_options"]


@pytest.fixture
def botmsg_server_options() -> dict[str, Any]:
    """Keyword arguments for the ``botmsg_server`` fixture's server; override to change them.

    Returns:
        ``FakeBotMessageServer`` keyword arguments; none by default (user ``"user"``,
        password ``"secret"``, no faults).
    """
    return {}


@pytest_asyncio.fixture
async def botmsg_server(
    botmsg_server_options: dict[str, Any],
) -> AsyncIterator[FakeBotMessageServer]:
    """A started ``FakeBotMessageServer`` on 127.0.0.1, closed after the test.

    Returns:
        The server, configured by ``botmsg_server_options``.
    """
    async with FakeBotMessageServer(**botmsg_server_options) as server:
        yield server


@pytest_asyncio.fixture
async def botmsg_client(botmsg_server: FakeBotMessageServer) -> AsyncIterator[BotMessageClient]:
    """A ``BotMessageClient`` bound to ``botmsg_server`` that never waits to retry.

    Returns:
        An open client; it is closed after the test.
    """

    async def no_wait(seconds: float) -> None:
        await asyncio.sleep(0)

    async with BotMessageClient(
        botmsg_server.base_url, botmsg_server.username, botmsg_server.password, sleep=no_wait
    ) as client:
        yield client
