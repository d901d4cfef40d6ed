"""Structured logs: every record of the botmsg_async logger carries its fields as attributes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import pytest

from botmsg_async import BotMessageClient, RetryPolicy, ServerError

from .conftest import (
    DEPT,
    PASSWORD,
    USER,
    USERNAME,
    BrokenLogHandler,
    ScriptedServer,
    answer,
    failure,
)

TEXT = "the message text, never logged"
FIELDS = ("department_uuid", "user_uuid", "idempotency_key", "attempt", "status", "outcome")


class Capture(logging.Handler):
    """Keeps every record it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Capture]:
    """The botmsg_async logger at DEBUG, captured (restored afterwards)."""
    logger = logging.getLogger("botmsg_async")
    handler = Capture()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields of ``record``, as a JSON formatter would read them."""
    return {name: getattr(record, name) for name in FIELDS}


def assert_clean(records: list[logging.LogRecord]) -> None:
    """No record's text or attributes hold the password, the user name or the message."""
    for record in records:
        dumped = record.getMessage() + json.dumps(vars(record), default=repr)
        for secret in (PASSWORD, USERNAME, TEXT):
            assert secret not in dumped


async def test_a_retried_send_logs_each_attempt_with_its_fields(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], captured: Capture
) -> None:
    """503 then 200: attempt, retry and attempt records, each with the send's fields."""
    server.script = [answer(503, {"error": "busy"})]
    async with make_client(server.base_url) as client:
        await client.send(DEPT, USER, TEXT, idempotency_key="key-7")
    common = {"department_uuid": DEPT, "user_uuid": USER, "idempotency_key": "key-7"}
    assert [fields(record) for record in captured.records] == [
        {**common, "attempt": 1, "status": 503, "outcome": None},  # POST -> 503
        {**common, "attempt": 1, "status": 503, "outcome": None},  # retrying
        {**common, "attempt": 2, "status": 200, "outcome": "sent"},  # POST -> 200
    ]
    assert [record.levelno for record in captured.records] == [logging.DEBUG] * 3
    assert all(record.name == "botmsg_async" for record in captured.records)
    # Each record names the SDK's line that logged it, not a logging helper's.
    assert [record.funcName for record in captured.records] == [
        "_attempt",
        "_before_retry",
        "_attempt",
    ]
    assert_clean(captured.records)


async def test_a_send_that_ends_in_doubt_logs_its_outcome(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], captured: Capture
) -> None:
    """HTTP 500: the last record says outcome unknown, with status and attempts."""
    server.script = [answer(500, f"echo {TEXT}")]
    async with make_client(server.base_url, retry=RetryPolicy.none()) as client:
        with pytest.raises(ServerError):
            await client.send(DEPT, USER, TEXT)
    last = captured.records[-1]
    assert fields(last)["outcome"] == "unknown"
    assert fields(last)["status"] == 500
    assert fields(last)["attempt"] == 1
    assert "ended unknown" in last.getMessage()
    for record in captured.records:
        assert set(FIELDS) <= set(vars(record))
    assert_clean(captured.records)


async def test_a_json_formatter_gets_the_fields_without_parsing_text(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], captured: Capture
) -> None:
    """A formatter that dumps the record's extra fields emits them as JSON values."""

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps({"message": record.getMessage(), **fields(record)})

    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, TEXT)
    [line] = [JsonFormatter().format(record) for record in captured.records]
    parsed = json.loads(line)
    assert parsed["outcome"] == "sent"
    assert parsed["status"] == 200
    assert parsed["department_uuid"] == DEPT
    assert result.attempts == parsed["attempt"] == 1


async def test_a_retried_failure_that_quotes_the_text_logs_its_type_only(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], captured: Capture
) -> None:
    """A transient FAILURE whose description echoes the message: no record holds the text."""
    server.script = [failure("TEMPORARILY_UNAVAILABLE", f"try again later: {TEXT!r}")]
    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, TEXT)
    assert result.attempts == 2
    retrying = captured.records[1]
    assert "retrying" in retrying.getMessage()
    assert retrying.getMessage().endswith(": SendFailedError")
    assert_clean(captured.records)


def broken_filter(record: logging.LogRecord) -> bool:
    """An application's log filter with a bug: it raises."""
    raise RuntimeError("the filter broke")


@pytest.mark.parametrize("broken", ["handler", "filter"])
async def test_a_raising_handler_or_filter_never_changes_a_send(
    server: ScriptedServer,
    make_client: Callable[..., BotMessageClient],
    broken: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A handler or filter that raises: sends keep their results, a batch its report."""
    logger = logging.getLogger("botmsg_async")
    handler: logging.Handler = BrokenLogHandler()
    if broken == "filter":
        handler = Capture()
        handler.addFilter(broken_filter)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        server.script = [answer(503, {"error": "busy"})]
        async with make_client(server.base_url) as client:
            result = await client.send(DEPT, USER, TEXT)  # delivered on its second attempt
            assert result.attempts == 2
            server.script = [answer(500, "oops")]
            with pytest.raises(ServerError):  # its own error, not the handler's
                await client.send(DEPT, USER, TEXT, retry=RetryPolicy.none())
            report = await client.send_many([(DEPT, USER, TEXT)] * 3)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (report.sent, report.failed, report.unknown) == (3, 0, 0)
    assert len(server.seen) == 6
    assert f"the {broken} broke" in capsys.readouterr().err  # said, as logging says it
