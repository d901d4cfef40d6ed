"""One POST, over aioresponses: the exact request on the wire, and what each answer becomes."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from aioresponses import core as aioresponses_core
from yarl import URL

from botmsg_async import (
    APIStatusError,
    ApiWarning,
    AuthenticationError,
    BotMessageClient,
    DeliveryUnknownError,
    InvalidResponseError,
    RateLimitedError,
    RetryPolicy,
    SendFailedError,
    ServerError,
    Status,
    TextMessage,
    TransportError,
)
from botmsg_async._http import bounded_timeout
from botmsg_async._wire import WireFormatError

from .conftest import DEPT, PASSWORD, SUCCESS, USER, USERNAME

BASE = "https://api.example.com/gw"
URL_RE = re.compile(r"^https://api\.example\.com/gw/communications/.*$")


def client() -> BotMessageClient:
    return BotMessageClient(BASE, USERNAME, PASSWORD, retry=RetryPolicy.none())


def only_call(mocked: aioresponses) -> tuple[URL, dict[str, Any]]:
    ((method, url), calls), *rest = mocked.requests.items()
    assert not rest
    assert len(calls) == 1
    assert method == "POST"
    return url, calls[0].kwargs


def test_aioresponses_still_needs_the_shim() -> None:
    """aioresponses still fails on aiohttp 3.14 without our shim: when this fails, drop the shim."""
    match = aioresponses_core.RequestMatch(BASE, method="POST")
    with pytest.raises(TypeError, match="stream_writer"):
        match._build_response(URL(BASE))


async def test_request_url_headers_and_body(mock_http: aioresponses) -> None:
    """A send POSTs camelCase JSON with Basic auth, JSON headers and an idempotency key."""
    mock_http.post(URL_RE, payload=SUCCESS)
    async with client() as c:
        result = await c.send(DEPT, USER, TextMessage("Hello", subject="Hi", sender_name="Bot"))
    url, kwargs = only_call(mock_http)
    assert str(url) == f"{BASE}/communications/department/{DEPT}/user/{USER}/botmessage/send"
    headers = kwargs["headers"]
    token = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    assert headers["Authorization"] == f"Basic {token}"
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "application/json"
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["Idempotency-Key"])
    assert "X-Retry-Count" not in headers
    assert kwargs["allow_redirects"] is False
    assert json.loads(kwargs["data"]) == {
        "messageAttributes": {
            "body": "Hello",
            "type": "DRAFT",
            "protocol": "TEXT",
            "purpose": "F",
            "isManual": True,
            "numberOfMessageAttachments": 0,
            "subject": "Hi",
        },
        "messageSendingAttributes": {"senderName": "Bot"},
    }
    assert result.status is Status.SUCCESS
    assert (result.request_uuid, result.message_uuid, result.attempts) == ("req-1", "msg-1", 1)


async def test_optional_fields_left_out_when_none(mock_http: aioresponses) -> None:
    """None-valued optional fields and an empty sending block are not sent at all."""
    mock_http.post(URL_RE, payload=SUCCESS)
    async with client() as c:
        await c.send(DEPT, USER, "plain text")
    _, kwargs = only_call(mock_http)
    body = json.loads(kwargs["data"])
    assert "messageSendingAttributes" not in body
    assert "subject" not in body["messageAttributes"]


async def test_ids_are_percent_encoded(mock_http: aioresponses) -> None:
    """Ids with non-path-changing special characters are percent-encoded, not rejected."""
    mock_http.post(URL_RE, payload=SUCCESS)
    async with client() as c:
        await c.send("dépt:1@x", "user+é", "hi")
    url, _ = only_call(mock_http)
    assert url.raw_path.endswith("/department/d%C3%A9pt%3A1%40x/user/user%2B%C3%A9/botmessage/send")


async def test_success_with_warnings(mock_http: aioresponses) -> None:
    """Warnings on a SUCCESS answer are returned, unknown fields ignored."""
    mock_http.post(
        URL_RE,
        payload={
            **SUCCESS,
            "warnings": [{"warningCode": "W1", "warningDescription": "slow"}],
            "new": 1,
        },
    )
    async with client() as c:
        result = await c.send(DEPT, USER, "hi")
    assert result.warnings == (ApiWarning("W1", "slow"),)


async def test_failure_answer_raises_send_failed(mock_http: aioresponses) -> None:
    """HTTP 200 with status FAILURE raises SendFailedError carrying the parsed answer."""
    mock_http.post(
        URL_RE,
        payload={
            "requestUuid": "r9",
            "status": "FAILURE",
            "errors": [
                {"errorCode": "INVALID_USER", "errorDescription": "no such user", "errorUID": "u1"}
            ],
        },
    )
    async with client() as c:
        with pytest.raises(SendFailedError) as info:
            await c.send(DEPT, USER, "hi")
    error = info.value
    assert error.transient is False
    assert error.result.request_uuid == "r9"
    assert error.result.errors[0].uid == "u1"
    assert (error.department_uuid, error.user_uuid, error.attempts) == (DEPT, USER, 1)
    assert "INVALID_USER" in str(error)


@pytest.mark.parametrize(
    ("status", "body", "error_type"),
    [
        (401, "denied", AuthenticationError),
        (403, "forbidden", AuthenticationError),
        (429, "slow down", RateLimitedError),
        (404, "not found", APIStatusError),
        (400, '{"detail": "bad"}', APIStatusError),
        (502, "<html><body>Bad Gateway</body></html>", ServerError),
        (500, "oops", ServerError),
        (504, "timeout", ServerError),
        (302, "", APIStatusError),
    ],
)
async def test_http_errors_are_typed(
    mock_http: aioresponses, status: int, body: str, error_type: type[APIStatusError]
) -> None:
    """Each non-2xx status raises its typed error with the status and a body excerpt."""
    mock_http.post(URL_RE, status=status, body=body, headers={"Location": "https://evil.example/"})
    async with client() as c:
        with pytest.raises(error_type) as info:
            await c.send(DEPT, USER, "hi")
    assert type(info.value) is error_type
    assert info.value.status == status
    assert info.value.body_excerpt == body


async def test_gateway_html_is_delivery_unknown(mock_http: aioresponses) -> None:
    """An HTML 502 page is both an APIStatusError and a DeliveryUnknownError."""
    mock_http.post(URL_RE, status=502, body="<html>" + "x" * 5000, content_type="text/html")
    async with client() as c:
        with pytest.raises(DeliveryUnknownError) as info:
            await c.send(DEPT, USER, "hi")
    assert isinstance(info.value, APIStatusError)
    assert len(info.value.body_excerpt) < 600
    assert info.value.idempotency_key is not None


@pytest.mark.parametrize(
    "body",
    [
        "",
        '{"requestUuid": "r", "status": "SUC',
        "[1, 2]",
        '{"status": "MAYBE"}',
        '{"requestUuid": "r"}',
        '{"status": "SUCCESS", "messageUuid": 42}',
        '{"status": "SUCCESS", "errors": "none"}',
        "<html>ok</html>",
        "null",
    ],
)
async def test_malformed_2xx_raises_invalid_response(mock_http: aioresponses, body: str) -> None:
    """A 2xx body that is not the documented JSON raises InvalidResponseError, never a raw error."""
    mock_http.post(URL_RE, status=200, body=body)
    async with client() as c:
        with pytest.raises(InvalidResponseError) as info:
            await c.send(DEPT, USER, "hi")
    assert info.value.status == 200
    assert info.value.body_excerpt == body
    assert info.value.problems
    assert isinstance(info.value.__cause__, WireFormatError)


async def test_null_lists_read_as_empty(mock_http: aioresponses) -> None:
    """`"errors": null` is read as no errors (some gateways send it)."""
    mock_http.post(URL_RE, payload={**SUCCESS, "errors": None, "warnings": None})
    async with client() as c:
        result = await c.send(DEPT, USER, "hi")
    assert result.errors == ()
    assert result.warnings == ()


async def test_connection_error_is_transport_error(mock_http: aioresponses) -> None:
    """A refused connection raises TransportError, not an aiohttp exception."""
    mock_http.post(
        URL_RE,
        exception=aiohttp.ClientConnectorError(
            connection_key=None,  # type: ignore[arg-type]  # only str() reads it
            os_error=ConnectionRefusedError(111, "refused"),
        ),
    )
    async with client() as c:
        with pytest.raises(TransportError) as info:
            await c.send(DEPT, USER, "hi")
    assert not isinstance(info.value, DeliveryUnknownError)
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)


async def test_duplicate_status_is_delivery_unknown(mock_http: aioresponses) -> None:
    """{"status":"FAILURE",...,"status":"SUCCESS"} is InvalidResponseError, never SENT."""
    mock_http.post(URL_RE, body=b'{"status":"FAILURE","requestUuid":"r","status":"SUCCESS"}')
    async with client() as c:
        with pytest.raises(InvalidResponseError) as info:
            await c.send(DEPT, USER, "hi")
    assert isinstance(info.value, DeliveryUnknownError)
    assert "ambiguous" in str(info.value)


@pytest.mark.parametrize(
    "timeout",
    [
        aiohttp.ClientTimeout(total=10, connect=5),
        aiohttp.ClientTimeout(total=6, connect=6),
        aiohttp.ClientTimeout(total=None, connect=None),
    ],
    ids=["defaults", "connect-equals-total", "no-total"],
)
def test_bounded_timeout_ends_connect_first_and_is_never_rounded(
    timeout: aiohttp.ClientTimeout,
) -> None:
    """Connect ends before the total, and aiohttp's whole-second rounding is off for both."""
    bounded = bounded_timeout(timeout, 5.05)
    assert bounded.total == 5.05
    assert bounded.connect is not None
    assert bounded.connect < bounded.total
    assert bounded.ceil_threshold > bounded.total
