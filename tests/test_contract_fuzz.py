"""schemathesis, a spec-driven fuzzer, against the fake server: both must agree with the spec.

It sends requests the project's spec calls valid (the fake server must accept
them) and ones it calls invalid (the fake server must refuse them), and checks
every answer: no 5xx, only statuses the spec documents, bodies and content types
as documented.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any, Final

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.config import SchemathesisConfig

from botmsg_async.testing import FakeBotMessageServer

from .spec_schema import SPEC

USERNAME: Final = "bot"
PASSWORD: Final = "pw"

#: The settings a run by hand uses too (spec/README.md), plus the fake server's credentials.
CONFIG: Final = SchemathesisConfig.from_path(SPEC.parent / "schemathesis.toml")
CONFIG.projects.override.auth.update(basic=(USERNAME, PASSWORD))
schema = schemathesis.openapi.from_path(SPEC, config=CONFIG)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeBotMessageServer]:
    """A FakeBotMessageServer on 127.0.0.1 in a thread of its own (schemathesis calls block)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-server", daemon=True)
    thread.start()
    server = FakeBotMessageServer(username=USERNAME, password=PASSWORD, seed=1)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
    # A guard against a vacuous run: some of the requests were valid and accepted.
    assert server.messages, "schemathesis sent no request the fake server accepted"


# About 3 s: not marked slow, so every run checks the spec and the fake server agree.
@schema.parametrize()
@settings(max_examples=50, derandomize=True, deadline=None)
def test_fake_server_conforms_to_the_spec(
    case: schemathesis.Case[Any], fake_server: FakeBotMessageServer
) -> None:
    """Every answer of the fake server to schemathesis' requests passes every default check."""
    case.call_and_validate(base_url=fake_server.base_url, timeout=30)
