"""Message and base-URL validation: text UTF-8 can carry, a size limit, URLs yarl can read."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import botmsg_async
from botmsg_async import (
    MAX_TEXT_BYTES,
    BotMessageClient,
    InvalidRequestError,
    MessageDefaults,
    Outcome,
    SendRequest,
    TextMessage,
    _wire,
)
from botmsg_async._validate import check_base_url, check_message
from botmsg_async.testing import FakeBotMessageServer

from .conftest import DEPT, PASSWORD, USER, USERNAME, ScriptedServer

MakeClient = Callable[..., BotMessageClient]

TEXT_FIELDS = (
    "body",
    "subject",
    "sender_name",
    "recipient_communication_value",
    "type",
    "purpose",
)


def _orjson_dumps() -> Callable[[Any], bytes]:
    orjson = pytest.importorskip("orjson")
    dumps: Callable[[Any], bytes] = orjson.dumps
    return dumps


@pytest.fixture(params=["orjson", "json"])
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each JSON encoder _wire may pick (orjson when installed, else json)."""
    name: str = request.param
    dumps = _orjson_dumps() if name == "orjson" else _wire._json_dumps
    monkeypatch.setattr(_wire, "_dumps", dumps)
    return name


def with_text(field: str, value: str) -> TextMessage:
    """A valid message with ``field`` set to ``value``."""
    fields: dict[str, Any] = {"body": "hello"} | {field: value}
    body = fields.pop("body")
    return TextMessage(body, **fields)


@pytest.mark.usefixtures("encoder")
@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("surrogate", ["\ud800", "ok \udfff then", "é\ud83d"])
async def test_lone_surrogate_refused_before_io(
    server: ScriptedServer, make_client: MakeClient, field: str, surrogate: str
) -> None:
    """A lone surrogate in any text field is InvalidRequestError naming it; nothing is sent."""
    async with make_client(server.base_url) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.send(DEPT, USER, with_text(field, surrogate))
    assert info.value.field == f"message.{field}"
    assert "surrogate" in str(info.value)
    assert server.seen == []


@pytest.mark.usefixtures("encoder")
async def test_surrogate_from_a_json_row_refused(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """The JSON escape of a lone surrogate (as in a JSONL row) is refused like the character."""
    row = json.loads('{"body": "Hi \\ud800", "subject": "ok"}')
    async with make_client(server.base_url) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.send(DEPT, USER, TextMessage(row["body"], subject=row["subject"]))
    assert info.value.field == "message.body"
    assert server.seen == []


async def test_surrogate_in_defaults_refused(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A surrogate in a client-wide default reaches the check through a plain-string message."""
    defaults = MessageDefaults(sender_name="Bot \udfff")
    async with make_client(server.base_url, message_defaults=defaults) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.send(DEPT, USER, "hello")
    assert info.value.field == "message.sender_name"
    assert server.seen == []


@pytest.mark.usefixtures("encoder")
async def test_send_many_fails_the_surrogate_item_alone() -> None:
    """In a batch, the item with a surrogate is FAILED (InvalidRequestError); the rest are SENT."""
    bad_body = json.loads('"bad \\udc00 text"')
    items = [
        (DEPT, USER, "first"),
        (DEPT, USER, TextMessage("second", subject=bad_body)),
        (DEPT, USER, bad_body),
        (DEPT, USER, "fourth"),
    ]
    async with (
        FakeBotMessageServer(username=USERNAME, password=PASSWORD) as fake,
        BotMessageClient(fake.base_url, USERNAME, PASSWORD) as client,
    ):
        report = await client.send_many(items, concurrency=2)
    outcomes = [item.outcome for item in report.results]
    assert outcomes == [Outcome.SENT, Outcome.FAILED, Outcome.FAILED, Outcome.SENT]
    errors = [item.error for item in report.results]
    assert isinstance(errors[1], InvalidRequestError)
    assert errors[1].field == "message.subject"
    assert isinstance(errors[2], InvalidRequestError)
    assert errors[2].field == "message.body"
    assert [item.attempts for item in report.results] == [1, 0, 0, 1]
    assert sorted(m.message.body for m in fake.messages) == ["first", "fourth"]


@pytest.mark.parametrize("field", TEXT_FIELDS[1:4])
def test_non_text_optional_field_refused(field: str) -> None:
    """An optional text field holding a non-str (e.g. 3) is refused, naming the field."""
    message = TextMessage("hello", **{field: 3})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError) as info:
        check_message(message, MessageDefaults())
    assert info.value.field == f"message.{field}"


def test_max_text_bytes_is_one_mebibyte_and_exported() -> None:
    """The documented limit is 1 MiB of UTF-8, exported from the package."""
    assert MAX_TEXT_BYTES == 1024 * 1024
    assert "MAX_TEXT_BYTES" in botmsg_async.__all__


@pytest.mark.parametrize(
    ("body", "fits"),
    [
        ("a" * MAX_TEXT_BYTES, True),
        ("a" * (MAX_TEXT_BYTES + 1), False),
        ("é" * (MAX_TEXT_BYTES // 2), True),
        ("é" * (MAX_TEXT_BYTES // 2) + "a", False),
        ("😀" * (MAX_TEXT_BYTES // 4), True),
        ("😀" * (MAX_TEXT_BYTES // 4) + "a", False),
        ("€" * (MAX_TEXT_BYTES // 3 + 1), False),
    ],
)
def test_default_limit_counts_utf8_bytes(body: str, fits: bool) -> None:
    """The default limit counts bytes of UTF-8, not characters."""
    if fits:
        assert check_message(body, MessageDefaults()).body == body
        return
    with pytest.raises(InvalidRequestError) as info:
        check_message(body, MessageDefaults())
    assert info.value.field == "message.body"
    assert str(MAX_TEXT_BYTES) in info.value.problem
    assert len(str(info.value)) < 400  # the body itself is not echoed


@settings(deadline=None)
@given(
    body=st.text(min_size=1, max_size=40).filter(str.strip),
    limit=st.integers(min_value=1, max_value=120),
)
def test_limit_holds_for_any_text(body: str, limit: int) -> None:
    """Any text is accepted exactly when its UTF-8 fits the limit."""
    fits = len(body.encode()) <= limit
    try:
        check_message(body, MessageDefaults(), limit)
    except InvalidRequestError as exc:
        refused: str | None = exc.field
    else:
        refused = None
    assert refused == (None if fits else "message.body")


async def test_client_max_text_bytes_is_enforced_before_io(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """BotMessageClient(max_text_bytes=...) refuses a longer body before any I/O."""
    async with make_client(server.base_url, max_text_bytes=8) as client:
        await client.send(DEPT, USER, "éééé")  # 8 bytes: fits
        with pytest.raises(InvalidRequestError) as info:
            await client.send(DEPT, USER, "éééé!")  # 9 bytes
    assert info.value.field == "message.body"
    assert "8 bytes" in info.value.problem
    assert len(server.seen) == 1


@pytest.mark.parametrize("limit", [0, -1, 1.5, "10", None])
def test_max_text_bytes_argument_checked(limit: Any) -> None:
    """max_text_bytes must be an int >= 1."""
    with pytest.raises(InvalidRequestError) as info:
        BotMessageClient("https://api.example.com", USERNAME, PASSWORD, max_text_bytes=limit)
    assert info.value.field == "max_text_bytes"


@pytest.mark.parametrize(
    "base_url",
    [
        "https://h:99999",
        "https://h:-1",
        "https://h:abc",
        "https://[::1",
        "https://[zz]",
        "https://[::1]:65536/gw",
        "https://\udcff.example.com",
    ],
)
def test_unreadable_base_url_is_invalid_request(base_url: str) -> None:
    """A bad port or a broken IPv6 literal is InvalidRequestError('base_url'), not ValueError."""
    with pytest.raises(InvalidRequestError) as info:
        BotMessageClient(base_url, USERNAME, PASSWORD)
    assert info.value.field == "base_url"


@pytest.mark.parametrize("base_url", ["https://bot:hunter2@[zz]", "https://bot:hunter2@h:99999"])
def test_unreadable_base_url_with_credentials_is_not_echoed(base_url: str) -> None:
    """A broken URL that may carry user:password is not shown in the error."""
    with pytest.raises(InvalidRequestError) as info:
        check_base_url(base_url, allow_insecure_http=False)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(info.value.value)


def test_base_url_of_another_type_is_invalid_request() -> None:
    """A base_url that is neither str nor URL is InvalidRequestError, not AttributeError."""
    with pytest.raises(InvalidRequestError) as info:
        check_base_url(8080, allow_insecure_http=False)  # type: ignore[arg-type]
    assert info.value.field == "base_url"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (SendRequest("", "u", "hi"), "department_uuid"),
        (SendRequest("d", "a/b", "hi"), "user_uuid"),
        (SendRequest("d", "u", "  "), "message.body"),
        (SendRequest("d", "u", TextMessage("hi", subject="\ud800")), "message.subject"),
        (SendRequest("d", "u", "hi", idempotency_key="a\nb"), "idempotency_key"),
        (SendRequest("d", "u", "hi", idempotency_key=""), "idempotency_key"),
    ],
)
def test_check_request_names_the_field_send_would(request_: SendRequest, field: str) -> None:
    """The public pre-check refuses what send() refuses, naming the same field."""
    with pytest.raises(InvalidRequestError) as info:
        botmsg_async.check_request(request_)
    assert info.value.field == field


def test_check_request_applies_the_body_limit() -> None:
    """A body over the given limit is refused; within it, the request passes."""
    botmsg_async.check_request(SendRequest("d", "u", "x" * 10), max_text_bytes=10)
    with pytest.raises(InvalidRequestError, match="limit of 10 bytes"):
        botmsg_async.check_request(SendRequest("d", "u", "é" * 6), max_text_bytes=10)
