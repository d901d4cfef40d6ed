"""Hostile input: header values, base URLs, certificates; no credential in any traceback."""

from __future__ import annotations

import asyncio
import base64
import math
import ssl
import traceback
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from botmsg_async import (
    AuthenticationError,
    BotMessageClient,
    BotMessageError,
    CertificateError,
    DeliveryUnknownError,
    InvalidRequestError,
    InvalidResponseError,
    RateLimitedError,
    ResponseLostError,
    RetryEvent,
    RetryPolicy,
    SendFailedError,
    SendResult,
    ServerError,
    TransportError,
    check_base_url,
)
from botmsg_async._http import parse_retry_after

from ..conftest import (
    DEPT,
    PASSWORD,
    USER,
    USERNAME,
    FakeClock,
    ScriptedServer,
    answer,
    failure,
)

MakeClient = Callable[..., BotMessageClient]

# -- Retry-After ------------------------------------------------------------------

NASTY_VALUES = [
    "Mon, 01 Jan 2020 00:00:00 +99999999999999999999",
    "Mon, 01 Jan 2020 00:00:00 -99999999999999999999",
    "Mon, 01 Jan 0000 00:00:00 GMT",
    "Fri, 31 Dec 9999 23:59:59 -2359",
    "Mon, 01 Jan 0001 00:00:00 +2359",
    "inf",
    "-inf",
    "Infinity",
    "1e400",
    "nan",
    "9" * 400,
    "1e308",
    "",
    "   ",
    "\x00",
]

zones = (
    st.sampled_from(["GMT", "UTC", "EST", "+0000", "-2359", "+2400", "Z", ""])
    | st.integers().map(lambda i: f"{i:+d}")
    | st.text(max_size=8)
)
http_dates = st.builds(
    "{}, {:02d} {} {} {:02d}:{:02d}:{:02d} {}".format,
    st.sampled_from(["Mon", "Sun", "Xyz", ""]),
    st.integers(-5, 99),
    st.sampled_from(["Jan", "Feb", "Dec", "Foo"]),
    st.integers(-10, 10**6) | st.text(max_size=5),
    st.integers(-1, 99),
    st.integers(-1, 99),
    st.integers(-1, 99),
    zones,
)
numbers = (
    st.floats().map(str)
    | st.integers().map(str)
    | st.floats().map(repr)
    | st.decimals(allow_nan=True).map(str)
)
latin1_text = st.text(st.characters(codec="latin-1"))
header_values = st.sampled_from(NASTY_VALUES) | numbers | http_dates | latin1_text | st.text()


@settings(deadline=None, max_examples=500)
@given(header_values | st.none(), header_values | st.none())
@example("Mon, 01 Jan 2020 00:00:00 +99999999999999999999", None)
@example(None, "inf")
@example(None, "1e400")
@example(None, "nan")
def test_parse_retry_after_is_total(retry_after: str | None, retry_after_ms: str | None) -> None:
    """Any header text gives None or a finite number of seconds >= 0, and never raises."""
    seconds = parse_retry_after(retry_after, retry_after_ms)
    assert seconds is None or (isinstance(seconds, float) and math.isfinite(seconds))
    assert seconds is None or seconds >= 0


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-inf"])
def test_non_finite_retry_after_ms_falls_back_to_retry_after(value: str) -> None:
    """A non-finite retry-after-ms counts as absent: Retry-After is read instead."""
    assert parse_retry_after(None, value) is None
    assert parse_retry_after("2", value) == 2.0


# Header text that an aiohttp.web server can put on the wire: no CR, LF or NUL.
wire_header_values = (
    st.sampled_from(NASTY_VALUES[:-1])
    | numbers
    | http_dates
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"))
).map(str.strip)


@settings(
    deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    status=st.sampled_from([429, 503]),
    name=st.sampled_from(["Retry-After", "retry-after-ms"]),
    value=wire_header_values,
)
@example(status=429, name="Retry-After", value="Mon, 01 Jan 2020 00:00:00 +99999999999999999999")
@example(status=429, name="retry-after-ms", value="inf")
@example(status=429, name="retry-after-ms", value="1e400")
@example(status=503, name="retry-after-ms", value="nan")
async def test_any_retry_header_leaves_the_client_working(
    server: ScriptedServer, status: int, name: str, value: str
) -> None:
    """Whatever Retry-After a 429/503 carries, only BotMessageErrors come out, and once
    the wait it asked for is over, the same client sends again."""
    clock = FakeClock()
    server.script[:] = [answer(status, "slow down", headers={name: value})]
    async with BotMessageClient(
        server.base_url, USERNAME, PASSWORD, sleep=clock.sleep, clock=clock
    ) as client:
        asked: float | None = None
        try:
            await client.send(DEPT, USER, "first")
        except RateLimitedError as exc:
            asked = exc.retry_after
        except BotMessageError:
            pass
        assert asked is None or math.isfinite(asked)
        clock.now += (asked or 0.0) + 3600.0  # the wait it asked for is over
        result = await client.send(DEPT, USER, "later")
    assert isinstance(result, SendResult)


# -- base URL ---------------------------------------------------------------------

url_parts = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "h", "[::1]", "[::1", "[zz]", "[", "]", "1.2.3.4", "xn--", "u:p@h", "%", "%zz", ".."]
)
url_like = st.builds(
    "{}://{}:{}{}".format,
    st.sampled_from(["http", "https", "HTTPS", "ftp", ""]),
    url_parts,
    st.integers(-(10**6), 10**6).map(str) | url_parts,
    url_parts,
) | st.builds("{}://{}{}".format, st.sampled_from(["http", "https"]), url_parts, url_parts)
any_text = st.text(st.characters(exclude_categories=()))  # lone surrogates included


@settings(deadline=None, max_examples=500)
@given(url_like | any_text)
@example("https://h:99999")
@example("https://h:-1")
@example("https://h:abc")
@example("https://[::1")
@example("https://[zz]")
@example("http://[:0:0]")
@example("0://[]@")
@example("http://[:]")
@example("http:// :")
@example("http://\x1c/")
@example("https://\u3000")
def test_check_base_url_is_total(text: str) -> None:
    """Any text is a usable URL or InvalidRequestError('base_url'), never yarl's ValueError."""
    try:
        url = check_base_url(text, allow_insecure_http=True)
    except InvalidRequestError as exc:
        refused: str | None = exc.field
    else:
        refused = None
    if refused is not None:
        assert refused == "base_url"
        return
    assert isinstance(url, URL)
    assert url.scheme in ("http", "https")
    assert url.host
    assert url.host.isprintable()
    assert not any(c.isspace() for c in url.host)
    assert URL(str(url)).host == url.host  # the URL as the client will write it
    str(url.with_path(url.raw_path + "/communications", encoded=True))  # what send() builds
    BotMessageClient(text, USERNAME, PASSWORD, allow_insecure_http=True)


# -- credentials in tracebacks ----------------------------------------------------

TOKEN = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()


def formatted_with_locals(exc: BaseException) -> str:
    """The exception, its causes and every frame's locals, as a crash reporter shows them."""
    return "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())


async def never_answer(request: web.Request) -> web.StreamResponse:
    """Hold the request until the client gives up."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def closed_port() -> str:
    """The base URL of a loopback port nobody listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


FAILURE_PATHS: list[tuple[str, Callable[[ScriptedServer], None], type[BotMessageError]]] = [
    ("transport", lambda s: None, TransportError),
    ("401", lambda s: s.script.append(answer(401, "who are you")), AuthenticationError),
    ("500", lambda s: s.script.append(answer(500, "boom")), ServerError),
    ("FAILURE", lambda s: s.script.append(failure("E_BAD", "bad user")), SendFailedError),
    ("invalid", lambda s: s.script.append(answer(200, b"<html>")), InvalidResponseError),
    ("timeout", lambda s: s.script.append(never_answer), ResponseLostError),
]


@pytest.mark.parametrize(
    ("path", "arrange", "expected"), FAILURE_PATHS, ids=[p[0] for p in FAILURE_PATHS]
)
async def test_no_credential_in_a_traceback_with_locals(
    server: ScriptedServer,
    make_client: MakeClient,
    path: str,
    arrange: Callable[[ScriptedServer], None],
    expected: type[BotMessageError],
) -> None:
    """On every failure path, a traceback with locals shows neither password nor token."""
    arrange(server)
    base_url = closed_port() if path == "transport" else server.base_url
    policy = RetryPolicy(max_attempts=2, attempt_timeout=0.3, retry_ambiguous=False)
    async with make_client(base_url, retry=policy) as client:
        with pytest.raises(expected) as info:
            await client.send(DEPT, USER, "hello")
    text = formatted_with_locals(info.value)
    assert "'Authorization': '<redacted>'" in text  # the headers were there, redacted
    assert PASSWORD not in text
    assert TOKEN not in text


async def test_authorization_reaches_the_wire_intact(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """The redacted-repr header value still goes out as the real Basic credential."""
    async with make_client(server.base_url) as client:
        await client.send(DEPT, USER, "hello")
    (_, headers, _), *_ = server.seen
    assert headers["Authorization"] == f"Basic {TOKEN}"


# -- TLS --------------------------------------------------------------------------


@pytest.fixture
async def tls_server() -> AsyncIterator[str]:
    """An HTTPS aiohttp.web server on loopback whose certificate no default trust store trusts."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    seen: list[web.Request] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        return web.json_response({"status": "SUCCESS"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    yield f"https://127.0.0.1:{port}"
    await runner.cleanup()
    assert seen == [], "a request got through an untrusted certificate"


async def test_untrusted_certificate_is_not_retried(
    tls_server: str, make_client: MakeClient
) -> None:
    """A TLS verification failure is one attempt, CertificateError, saying 'certificate'."""
    events: list[RetryEvent] = []
    async with make_client(tls_server, on_retry=events.append) as client:
        with pytest.raises(CertificateError) as info:
            await client.send(DEPT, USER, "hello")
    error = info.value
    assert error.attempts == 1
    assert events == []
    assert "certificate" in str(error)
    assert "verif" in str(error).lower()
    assert not isinstance(error, DeliveryUnknownError)
    assert isinstance(error, TransportError)
