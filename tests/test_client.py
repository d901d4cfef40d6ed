"""The client against a real loopback server: lifecycle, pooling, safety guards, bad input."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Callable
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web

from botmsg_async import (
    APIStatusError,
    AuthenticationError,
    BotMessageClient,
    BotMessageError,
    ClientClosedError,
    DeliveryUnknownError,
    InvalidRequestError,
    InvalidResponseError,
    MessageDefaults,
    RateLimitedError,
    ResponseLostError,
    RetryPolicy,
    SendFailedError,
    TextMessage,
    TransportError,
)

from .conftest import DEPT, PASSWORD, USER, USERNAME, ScriptedServer, answer, slow

MakeClient = Callable[..., BotMessageClient]


async def test_round_trip(server: ScriptedServer, make_client: MakeClient) -> None:
    """A send reaches the server on the documented path and returns its answer."""
    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, "hello")
    assert result.message_uuid == "msg-1"
    path, headers, _ = server.seen[0]
    assert path == f"/communications/department/{DEPT}/user/{USER}/botmessage/send"
    assert headers["Authorization"].startswith("Basic ")


async def test_connection_is_reused(server: ScriptedServer, make_client: MakeClient) -> None:
    """Sequential sends reuse one pooled keep-alive connection."""
    async with make_client(server.base_url) as client:
        for _ in range(5):
            await client.send(DEPT, USER, "hello")
    assert len(server.seen) == 5
    assert len(server.peers) == 1


async def test_constructed_outside_a_loop() -> None:
    """The client can be built with no running event loop; the session comes later."""

    def build() -> BotMessageClient:
        return BotMessageClient("https://api.example.com", USERNAME, PASSWORD)

    client = await asyncio.get_running_loop().run_in_executor(None, build)
    assert client._shared.session is None
    await client.aclose()


async def test_close_is_idempotent_and_final(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """aclose() twice is fine; a closed client refuses sends and re-entry."""
    client = make_client(server.base_url)
    await client.send(DEPT, USER, "hello")
    session = client._shared.session
    await client.aclose()
    await client.aclose()
    assert session is not None
    assert session.closed
    with pytest.raises(ClientClosedError):
        await client.send(DEPT, USER, "hello")
    with pytest.raises(ClientClosedError):
        async with client:
            pass
    assert len(server.seen) == 1


async def test_lent_session_is_left_open(server: ScriptedServer, make_client: MakeClient) -> None:
    """A caller's own session is used and never closed by the client."""
    async with aiohttp.ClientSession() as session:
        async with make_client(server.base_url, session=session) as client:
            await client.send(DEPT, USER, "hello")
        assert not session.closed
    assert len(server.seen) == 1


async def test_pool_is_not_capped_by_default(make_client: MakeClient) -> None:
    """The owned connector has no limit of its own unless max_connections is given."""
    async with make_client("http://127.0.0.1:9") as client:
        assert client._ensure_session().connector.limit == 0  # type: ignore[union-attr]
    async with make_client("http://127.0.0.1:9", max_connections=10) as client:
        assert client._ensure_session().connector.limit == 10  # type: ignore[union-attr]


async def test_message_defaults_apply_to_plain_strings(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Client-wide defaults shape str messages; a TextMessage is sent as built."""
    defaults = MessageDefaults(type="NOTE", purpose="X", is_manual=False, sender_name="Ops")
    async with make_client(server.base_url, message_defaults=defaults) as client:
        await client.send(DEPT, USER, "one")
        await client.send(DEPT, USER, TextMessage("two"))
    first, second = (body for _, _, body in server.seen)
    assert b'"type":"NOTE"' in first
    assert b'"senderName":"Ops"' in first
    assert b'"type":"DRAFT"' in second
    assert b"senderName" not in second


async def test_uuid_objects_are_accepted_as_ids(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """uuid.UUID ids are sent as their text, in send() and in a batch; other types are refused."""
    dept, user = uuid.uuid4(), uuid.uuid4()
    async with make_client(server.base_url) as client:
        await client.send(dept, user, "hi")
        report = await client.send_many([(dept, user, "hi")])
        with pytest.raises(InvalidRequestError, match="department_uuid"):
            await client.send(42, user, "hi")  # type: ignore[arg-type]
    path = f"/communications/department/{dept}/user/{user}/botmessage/send"
    assert [seen[0] for seen in server.seen] == [path, path]
    (item,) = report.results
    assert (item.department_uuid, item.user_uuid) == (str(dept), str(user))


@pytest.mark.parametrize(
    ("field", "department", "user", "message"),
    [
        ("department_uuid", "", USER, "hi"),
        ("department_uuid", "a/b", USER, "hi"),
        ("department_uuid", "..", USER, "hi"),
        ("department_uuid", ".", USER, "hi"),
        ("user_uuid", DEPT, "u?x=1", "hi"),
        ("user_uuid", DEPT, "u#frag", "hi"),
        ("user_uuid", DEPT, "u%2F", "hi"),
        ("user_uuid", DEPT, "u\\x", "hi"),
        ("user_uuid", DEPT, "u x", "hi"),
        ("user_uuid", DEPT, "u\x00", "hi"),
        ("user_uuid", DEPT, "u\n", "hi"),
        ("user_uuid", DEPT, 5, "hi"),
        ("message.body", DEPT, USER, ""),
        ("message.body", DEPT, USER, "   \n\t"),
        ("message.body", DEPT, USER, TextMessage(" ")),
        ("message", DEPT, USER, 42),
    ],
)
async def test_bad_input_rejected_before_io(
    server: ScriptedServer,
    make_client: MakeClient,
    field: str,
    department: Any,
    user: Any,
    message: Any,
) -> None:
    """Bad ids and bodies raise InvalidRequestError naming the field, and nothing is sent."""
    async with make_client(server.base_url) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.send(department, user, message)
    assert info.value.field == field
    assert field in str(info.value)
    assert server.seen == []


@pytest.mark.parametrize(
    "base_url",
    [
        "http://api.example.com",
        "http://10.0.0.5:8080",
        "ftp://x",
        "api.example.com",
        "https://u:p@h",
    ],
)
def test_unsafe_base_urls_refused(base_url: str) -> None:
    """Plain http to a remote host, non-http schemes and URLs with credentials are refused."""
    with pytest.raises(InvalidRequestError) as info:
        BotMessageClient(base_url, USERNAME, PASSWORD)
    assert ":p@" not in str(info.value)


async def test_insecure_http_allowed_when_asked() -> None:
    """allow_insecure_http=True permits http:// to a remote host; loopback needs no flag."""
    await BotMessageClient(
        "http://api.example.com", USERNAME, PASSWORD, allow_insecure_http=True
    ).aclose()
    await BotMessageClient("http://localhost:1", USERNAME, PASSWORD).aclose()
    await BotMessageClient("http://[::1]:1", USERNAME, PASSWORD).aclose()


async def test_credentials_never_in_repr_or_errors(
    server: ScriptedServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the password nor the Authorization value shows in repr, logs or errors."""
    server.script.append(answer(401, "nope"))
    server.script.append(answer(500, "boom"))
    caplog.set_level(logging.DEBUG, logger="botmsg_async")
    errors: list[BaseException] = []
    async with make_client(server.base_url) as client:
        for _ in range(2):
            try:
                await client.send(DEPT, USER, "hello")
            except Exception as exc:
                errors.append(exc)
        seen = [repr(client), caplog.text]
    authorization = server.seen[0][1]["Authorization"]
    seen += [repr(e) for e in errors] + [str(e) for e in errors] + [repr(e.args) for e in errors]
    for text in seen:
        assert PASSWORD not in text
        assert authorization.split()[1] not in text
    assert "POST /communications/department/" in caplog.text


async def test_redirect_not_followed(server: ScriptedServer, make_client: MakeClient) -> None:
    """A 307 is an APIStatusError; the client never follows it with the credentials."""
    server.script.append(answer(307, "", headers={"Location": "http://127.0.0.1:1/steal"}))
    async with make_client(server.base_url) as client:
        with pytest.raises(APIStatusError) as info:
            await client.send(DEPT, USER, "hello")
    assert info.value.status == 307
    assert len(server.seen) == 1


async def test_oversized_answer_not_read(server: ScriptedServer, make_client: MakeClient) -> None:
    """An answer over max_response_bytes is refused without reading it all."""
    server.script.append(answer(200, b"{" + b" " * 200_000 + b"}"))
    async with make_client(server.base_url, max_response_bytes=1000) as client:
        with pytest.raises(InvalidResponseError, match="over 1000 bytes"):
            await client.send(DEPT, USER, "hello")


async def test_chunked_oversized_answer_not_read(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A chunked answer is cut off once it passes max_response_bytes."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(50):
            await response.write(b" " * 1000)
        await response.write_eof()
        return response

    server.script.append(chunked)
    async with make_client(server.base_url, max_response_bytes=5000) as client:
        with pytest.raises(InvalidResponseError, match="over 5000 bytes"):
            await client.send(DEPT, USER, "hello")


async def test_gzip_answer_is_read(server: ScriptedServer, make_client: MakeClient) -> None:
    """A gzip-encoded JSON answer is decoded like a plain one."""

    async def gzipped(request: web.Request) -> web.StreamResponse:
        response = web.json_response({"status": "SUCCESS", "messageUuid": "gz"})
        response.enable_compression(web.ContentCoding.gzip)
        return response

    server.script.append(gzipped)
    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, "hello")
    assert result.message_uuid == "gz"


async def test_refused_connection_is_transport_error(make_client: MakeClient) -> None:
    """Nothing listening: TransportError (nothing was sent), after the policy's attempts."""
    async with make_client("http://127.0.0.1:9", retry=RetryPolicy(max_attempts=2)) as client:
        with pytest.raises(TransportError) as info:
            await client.send(DEPT, USER, "hello")
    assert not isinstance(info.value, ResponseLostError)
    assert info.value.attempts == 2


async def test_stalled_answer_times_out(server: ScriptedServer, make_client: MakeClient) -> None:
    """A server that stalls is cut off by the per-attempt timeout as a lost response."""
    server.script.append(slow(5))
    async with make_client(server.base_url, timeout=0.2) as client:
        with pytest.raises(ResponseLostError):
            await client.send(DEPT, USER, "hello")


class SlowResolver(aiohttp.abc.AbstractResolver):
    """A resolver that never answers in time: a connect phase that hangs."""

    async def resolve(
        self, host: str, port: int = 0, family: int = 0
    ) -> list[aiohttp.abc.ResolveResult]:
        await asyncio.sleep(5)
        raise AssertionError("the connect timeout should have fired")

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "attempt_timeout",
    [0.2, aiohttp.ClientTimeout(total=0.2), aiohttp.ClientTimeout(total=0.2, connect=0.2)],
    ids=["seconds", "total-only", "connect-equals-total"],
)
async def test_timeout_while_connecting_is_safe(
    make_client: MakeClient, attempt_timeout: float | aiohttp.ClientTimeout
) -> None:
    """A timeout that cuts the connect phase says "nothing was sent", whatever the total."""
    connector = aiohttp.TCPConnector(resolver=SlowResolver())
    async with aiohttp.ClientSession(connector=connector) as session:
        client = make_client(
            "http://slow.invalid",
            session=session,
            timeout=attempt_timeout,
            allow_insecure_http=True,
            retry=RetryPolicy.none(),
        )
        async with client:
            with pytest.raises(TransportError) as info:
                await client.send(DEPT, USER, "hello")
    assert not isinstance(info.value, ResponseLostError)


async def test_closing_the_client_while_a_send_waits_for_the_pool(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """aclose() while a send waits for a pool slot: ClientClosedError, nothing sent."""
    held, queued = asyncio.Event(), asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        held.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def on_queued(*_: object) -> None:
        queued.set()

    trace = aiohttp.TraceConfig()
    trace.on_connection_queued_start.append(on_queued)
    server.default = hold
    client = make_client(
        server.base_url, max_connections=1, trace_configs=[trace], retry=RetryPolicy.none()
    )
    first = asyncio.create_task(client.send(DEPT, USER, "holds the only connection"))
    await held.wait()
    second = asyncio.create_task(client.send(DEPT, USER, "waits for it"))
    await queued.wait()
    await client.aclose()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(results[0], ResponseLostError)  # it reached the server
    assert isinstance(results[1], ClientClosedError)  # it never left the pool's queue
    assert len(server.seen) == 1


@pytest.mark.parametrize(
    ("status", "expected"),
    [(401, AuthenticationError), (429, RateLimitedError), (400, APIStatusError)],
)
async def test_a_lent_session_that_raises_for_status_is_read_as_ours(
    server: ScriptedServer, make_client: MakeClient, status: int, expected: type[Exception]
) -> None:
    """A lent session's raise_for_status=True does not turn a refusal into 'unknown'."""
    server.default = answer(status, {"error": "no"})
    async with aiohttp.ClientSession(raise_for_status=True) as session:
        client = make_client(server.base_url, session=session, retry=RetryPolicy.none())
        async with client:
            with pytest.raises(expected) as info:
                await client.send(DEPT, USER, "hello")
    assert not isinstance(info.value, DeliveryUnknownError)
    assert info.value.status == status  # type: ignore[attr-defined]


async def test_a_lent_session_without_auto_decompress_still_reads_a_gzip_answer(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A lent session's auto_decompress=False does not make a gzip SUCCESS unreadable."""

    async def gzipped(request: web.Request) -> web.StreamResponse:
        response = web.json_response({"status": "SUCCESS", "messageUuid": "gz"})
        response.enable_compression(web.ContentCoding.gzip)
        return response

    server.default = gzipped
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        client = make_client(server.base_url, session=session)
        async with client:
            result = await client.send(DEPT, USER, "hello")
    assert result.message_uuid == "gz"


class GateResolver(aiohttp.abc.AbstractResolver):
    """A resolver that answers 127.0.0.1 once ``release`` is set; ``entered`` when asked."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def resolve(
        self, host: str, port: int = 0, family: int = 0
    ) -> list[aiohttp.abc.ResolveResult]:
        self.entered.set()
        await self.release.wait()
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("use_dns_cache", [True, False])
async def test_a_session_closed_while_a_connection_is_made_sends_nothing_and_says_so(
    server: ScriptedServer, make_client: MakeClient, use_dns_cache: bool
) -> None:
    """The lent session closes while a send's connection is being made: not 'unknown'."""
    resolver = GateResolver()
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=use_dns_cache)
    port = server.base_url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession(connector=connector) as session:
        client = make_client(
            f"http://gate.test:{port}",
            session=session,
            allow_insecure_http=True,
            retry=RetryPolicy.none(),
        )
        async with client:
            send = asyncio.create_task(client.send(DEPT, USER, "hello"))
            await resolver.entered.wait()
            await session.close()
            resolver.release.set()
            (error,) = await asyncio.gather(send, return_exceptions=True)
    assert isinstance(error, TransportError | ClientClosedError)
    assert not isinstance(error, DeliveryUnknownError)
    assert server.seen == []


async def test_a_total_timeout_that_cuts_the_connect_phase_says_nothing_was_sent(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """The attempt's total timer fires before its connect timer, mid-connect: not 'unknown'.

    The loop's clock is moved on by half the total once aiohttp has started the
    total timer and before it starts the connect timer (a loop held up between
    the two), so that the total fires first while the host is still resolving.
    """
    loop = asyncio.get_running_loop()
    real_time = loop.time
    offset = 0.0
    resolver = GateResolver()

    async def on_request_start(*_: object) -> None:
        nonlocal offset
        offset += 0.1

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    connector = aiohttp.TCPConnector(resolver=resolver)
    port = server.base_url.rsplit(":", 1)[1]

    def shifted_time() -> float:
        return real_time() + offset

    with mock.patch.object(loop, "time", shifted_time):
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            client = make_client(
                f"http://gate.test:{port}",
                session=session,
                timeout=0.2,
                allow_insecure_http=True,
                retry=RetryPolicy.none(),
            )
            async with client:
                with pytest.raises(BotMessageError) as info:
                    await client.send(DEPT, USER, "hello")
    assert resolver.entered.is_set()
    assert isinstance(info.value, TransportError)
    assert not isinstance(info.value, DeliveryUnknownError)
    assert server.seen == []


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), True, "10"])
def test_a_timeout_that_is_no_positive_number_is_refused(timeout: Any) -> None:
    """timeout= 0, negative, NaN or not a number: aiohttp would run no timer at all."""
    with pytest.raises(InvalidRequestError) as info:
        BotMessageClient("https://api.example.com", USERNAME, PASSWORD, timeout=timeout)
    assert info.value.field == "timeout"


@pytest.mark.parametrize(
    ("attempt_timeout", "policy"),
    [
        (None, RetryPolicy(deadline=float("inf"), attempt_timeout=float("inf"))),
        (aiohttp.ClientTimeout(total=None), RetryPolicy(deadline=float("inf"))),
        (float("inf"), RetryPolicy(deadline=float("inf"), connect_timeout=float("inf"))),
    ],
    ids=["policy", "client-timeout", "seconds"],
)
async def test_an_infinite_deadline_sends(
    server: ScriptedServer,
    make_client: MakeClient,
    attempt_timeout: float | aiohttp.ClientTimeout | None,
    policy: RetryPolicy,
) -> None:
    """deadline=inf ("never give up") with no finite attempt timeout still sends."""
    async with make_client(server.base_url, timeout=attempt_timeout, retry=policy) as client:
        result = await client.send(DEPT, USER, "hi")
    assert result.message_uuid == "msg-1"


@pytest.mark.parametrize(
    "field", ["deadline", "attempt_timeout", "connect_timeout", "backoff_max", "max_retry_after"]
)
async def test_a_policy_figure_too_large_for_a_float_is_no_bound(
    server: ScriptedServer, make_client: MakeClient, field: str
) -> None:
    """A RetryPolicy figure given as an int past a float's range is inf: no OverflowError."""
    figures: dict[str, Any] = {field: 10**400}
    policy = RetryPolicy(**figures)
    assert getattr(policy, field) == float("inf")
    async with make_client(server.base_url, retry=policy) as client:
        result = await client.send(DEPT, USER, "hi")
    assert result.message_uuid == "msg-1"


@pytest.mark.parametrize(
    "attempt_timeout",
    [
        aiohttp.ClientTimeout(total=None, sock_read=None),
        aiohttp.ClientTimeout(total=0),
        aiohttp.ClientTimeout(total=-1),
        aiohttp.ClientTimeout(total=float("nan")),
        aiohttp.ClientTimeout(total=None, connect=-1, sock_read=0),
        10**400,
        aiohttp.ClientTimeout(total=10**400),
        aiohttp.ClientTimeout(connect=10**400),
    ],
    ids=["no-total", "zero", "negative", "nan", "no-total-negative-connect", "huge-number",
         "huge-total", "huge-connect"],
)  # fmt: skip
async def test_a_timeout_that_bounds_nothing_still_ends_at_the_deadline(
    server: ScriptedServer, make_client: MakeClient, attempt_timeout: Any
) -> None:
    """A timeout aiohttp runs no timer for (none, 0, negative, NaN, past a float's range)
    is cut at the policy's deadline: no hang, no OverflowError."""

    async def never(request: web.Request) -> web.StreamResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    server.default = never
    async with make_client(
        server.base_url, timeout=attempt_timeout, retry=RetryPolicy(deadline=0.3)
    ) as client:
        # Only an outer bound far past the 0.3 s deadline: uncut, the send never ends.
        async with asyncio.timeout(15):
            with pytest.raises(ResponseLostError):
                await client.send(DEPT, USER, "hi")


async def test_a_failure_with_numeric_error_codes_is_a_refusal_not_unknown(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A 200 FAILURE whose errorCode is a number is SendFailedError (certainly not
    delivered), not an unknown delivery; its code, as text, is what the policy matches:
    a transient one is retried under the same key."""
    failure = {"status": "FAILURE", "errors": [{"errorCode": 1001, "errorDescription": "x"}]}
    server.script = [answer(200, failure), answer(200, failure)]
    async with make_client(server.base_url) as client:
        with pytest.raises(SendFailedError) as info:
            await client.send(DEPT, USER, "hi")
        assert not isinstance(info.value, DeliveryUnknownError)
        assert info.value.result.errors[0].code == "1001"
        assert not info.value.transient
        retried = RetryPolicy(max_attempts=2, transient_error_codes={"1001"})
        result = await client.send(DEPT, USER, "hi", retry=retried)
    assert result.attempts == 2
    keys = [headers["Idempotency-Key"] for _, headers, _ in server.seen[1:]]
    assert len(keys) == 2
    assert keys[0] == keys[1]


_FAILURE_CAFE = '{"status":"FAILURE","errors":[{"errorCode":"E","errorDescription":"café"}]}'


@pytest.mark.parametrize(
    ("content_type", "encoding", "read"),
    [
        ("application/json; charset=iso-8859-1", "latin-1", True),
        ("application/json; charset=windows-1252", "cp1252", True),
        ("application/json; charset=UTF-16", "utf-16", True),
        ("application/json; charset=utf-8", "utf-8", True),
        # No charset named, or one Python does not know: JSON's UTF-8 alone.
        ("application/json", "latin-1", False),
        ("application/json; charset=x-unknown", "latin-1", False),
    ],
)
async def test_an_answer_in_the_charset_its_content_type_names_is_read(
    server: ScriptedServer, make_client: MakeClient, content_type: str, encoding: str, read: bool
) -> None:
    """A FAILURE written in the charset its Content-Type names is a refusal (its text
    intact), not an unreadable answer of unknown delivery."""
    body = _FAILURE_CAFE.encode(encoding)
    server.script = [answer(200, body, headers={"Content-Type": content_type})]
    async with make_client(server.base_url, retry=RetryPolicy.none()) as client:
        with pytest.raises(BotMessageError) as info:
            await client.send(DEPT, USER, "hi")
    if read:
        assert isinstance(info.value, SendFailedError)
        assert info.value.result.errors[0].description == "café"
    else:
        assert isinstance(info.value, InvalidResponseError)
