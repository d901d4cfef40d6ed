"""Transport options over real loopback connections: proxy, TLS, environment, headers, tracing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from botmsg_async import (
    BotMessageClient,
    CertificateError,
    DeliveryUnknownError,
    InvalidRequestError,
    RetryPolicy,
    TransportError,
)

from .conftest import DEPT, PASSWORD, SUCCESS, USER, USERNAME, ScriptedServer, answer

MakeClient = Callable[..., BotMessageClient]
PROXY_USER, PROXY_PASSWORD = "proxy-user", "pr0xy-s3cret"


class LoopbackProxy:
    """A tiny HTTP proxy on 127.0.0.1: CONNECT tunnels, and absolute-form forwarding.

    ``heads`` keeps the head (request line and headers) of each connection's
    first request to the proxy, as the proxy read it. With ``refuse`` set, every
    request is answered with that status instead.
    """

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.refuse: int | None = None
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        # Closing every stream ends each pipe, so each handler returns on its own.
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            self.heads.append(head)
            method, target, _ = head.split(" ", 2)
            if self.refuse is not None:
                writer.write(f"HTTP/1.1 {self.refuse} No\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
            else:  # absolute-form: http://host:port/path
                host, port = target.split("/")[2].rsplit(":", 1)
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            self._writers.add(upstream_writer)
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream_writer.write(head.encode("latin-1"))  # aiohttp.web reads absolute-form
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[LoopbackProxy]:
    """A started loopback proxy."""
    srv = LoopbackProxy()
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture(scope="module")
def ca() -> Any:
    """A throwaway certificate authority (trustme)."""
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@contextlib.asynccontextmanager
async def tls_server(ca: Any) -> AsyncIterator[SimpleNamespace]:
    """An HTTPS aiohttp.web server on 127.0.0.1 whose certificate only ``ca`` vouches for."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    state = SimpleNamespace(seen=[], base_url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        state.seen.append(dict(request.headers))
        return web.json_response(SUCCESS)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    state.base_url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


def trusting(ca: Any) -> ssl.SSLContext:
    """A client context that trusts ``ca``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def chain_text(error: BaseException | None) -> str:
    texts = []
    while error is not None:
        texts += [str(error), repr(error), repr(error.args)]
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


# -- proxy -----------------------------------------------------------------------------


async def test_requests_go_through_the_proxy_with_its_credentials(
    server: ScriptedServer, proxy: LoopbackProxy, make_client: MakeClient
) -> None:
    """proxy=: the proxy sees the request and its Proxy-Authorization; the service answers."""
    with_credentials = proxy.url.replace("://", f"://{PROXY_USER}:{PROXY_PASSWORD}@")
    async with make_client(server.base_url, proxy=with_credentials) as client:
        result = await client.send(DEPT, USER, "hello")
        shown = repr(client)
    assert result.message_uuid == "msg-1"
    (head,) = proxy.heads
    assert head.startswith(f"POST {server.base_url}/communications/department/{DEPT}/")
    expected = aiohttp.encode_basic_auth(PROXY_USER, PROXY_PASSWORD)
    assert f"Proxy-Authorization: {expected}" in head
    assert len(server.seen) == 1
    assert PROXY_PASSWORD not in shown


async def test_https_through_a_connect_tunnel_with_a_private_ca(
    ca: Any, proxy: LoopbackProxy, make_client: MakeClient
) -> None:
    """https:// via proxy=: a CONNECT with the proxy's credentials, then TLS end to end."""
    with_credentials = proxy.url.replace("://", f"://{PROXY_USER}:{PROXY_PASSWORD}@")
    async with tls_server(ca) as tls:
        client = make_client(tls.base_url, proxy=with_credentials, ssl=trusting(ca))
        async with client:
            result = await client.send(DEPT, USER, "hello")
    assert result.http_status == 200
    (head,) = proxy.heads
    assert head.startswith(f"CONNECT {tls.base_url.removeprefix('https://')} ")
    assert f"Proxy-Authorization: {aiohttp.encode_basic_auth(PROXY_USER, PROXY_PASSWORD)}" in head
    (seen,) = tls.seen
    assert "Proxy-Authorization" not in seen  # the proxy's credentials stay with the proxy


async def test_a_refused_tunnel_is_a_transport_error(
    ca: Any, proxy: LoopbackProxy, make_client: MakeClient
) -> None:
    """The proxy answers CONNECT with 407: nothing reached the service, so not 'unknown'."""
    proxy.refuse = 407
    async with tls_server(ca) as tls:
        client = make_client(
            tls.base_url,
            proxy=proxy.url.replace("://", f"://{PROXY_USER}:{PROXY_PASSWORD}@"),
            ssl=trusting(ca),
            retry=RetryPolicy.none(),
        )
        async with client:
            with pytest.raises(TransportError) as info:
                await client.send(DEPT, USER, "hello")
    assert not isinstance(info.value, DeliveryUnknownError)
    assert "407" in str(info.value)
    assert PROXY_PASSWORD not in chain_text(info.value)
    assert tls.seen == []


async def test_an_unreachable_proxy_is_a_transport_error_without_credentials(
    make_client: MakeClient,
) -> None:
    """Nothing listens at the proxy: TransportError naming the proxy, never its password."""
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    proxy_url = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{port}"
    client = make_client("http://127.0.0.1:9", proxy=proxy_url, retry=RetryPolicy.none())
    async with client:
        with pytest.raises(TransportError) as info:
            await client.send(DEPT, USER, "hello")
    assert "proxy" in str(info.value)
    assert PROXY_PASSWORD not in chain_text(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        "socks5://u:pw@127.0.0.1:1080",
        "127.0.0.1:3128",
        "http://u:pw@",
        "http://u:pw@proxy:3128/path",
        "http://u:pw@proxy:3128?x=1",
        "http://u:pw@proxy:99999",
        "http://u:pw@[::1",
        "http://u%3Ax:pw@proxy:3128",
        42,
    ],
)
def test_a_bad_proxy_is_refused_before_io_without_its_password(bad: object) -> None:
    """proxy= is checked at construction; the error names 'proxy' and never shows 'pw'."""
    with pytest.raises(InvalidRequestError) as info:
        BotMessageClient("https://api.example.com", USERNAME, PASSWORD, proxy=bad)  # type: ignore[arg-type]
    assert info.value.field == "proxy"
    assert "pw" not in chain_text(info.value)


async def test_proxy_settings_from_the_environment_only_when_asked(
    server: ScriptedServer,
    proxy: LoopbackProxy,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """trust_env=True takes HTTP_PROXY from the environment; by default it is ignored."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    async with make_client(server.base_url) as client:
        await client.send(DEPT, USER, "direct")
    assert proxy.heads == []
    async with make_client(server.base_url, trust_env=True) as client:
        await client.send(DEPT, USER, "proxied")
    assert len(proxy.heads) == 1
    assert len(server.seen) == 2


# -- TLS -------------------------------------------------------------------------------


async def test_a_private_ca_works_with_ssl_context_and_fails_by_default(
    ca: Any, make_client: MakeClient
) -> None:
    """ssl=context trusts the private CA; the default verifies and refuses it."""
    async with tls_server(ca) as tls:
        async with make_client(tls.base_url, ssl=trusting(ca)) as client:
            result = await client.send(DEPT, USER, "hello")
        assert result.http_status == 200
        async with make_client(tls.base_url, retry=RetryPolicy.none()) as client:
            with pytest.raises(CertificateError):
                await client.send(DEPT, USER, "hello")
        async with make_client(tls.base_url, ssl=False) as client:
            await client.send(DEPT, USER, "unverified, as asked")
    assert len(tls.seen) == 2


@pytest.mark.parametrize("bad", ["no", None, 1, ssl.create_default_context])
def test_ssl_must_be_a_context_or_a_bool(bad: object) -> None:
    """ssl= anything else is refused before any I/O."""
    with pytest.raises(InvalidRequestError, match="ssl"):
        BotMessageClient("https://api.example.com", USERNAME, PASSWORD, ssl=bad)  # type: ignore[arg-type]


# -- headers and tracing ---------------------------------------------------------------


async def test_default_headers_arrive_on_every_request(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """default_headers go out on every attempt; Accept is replaced, not doubled."""
    extra = {"X-Api-Key": "k-123", "accept": "application/json; v=2"}
    async with make_client(server.base_url, default_headers=extra) as client:
        await client.send(DEPT, USER, "one")
        await client.send(DEPT, USER, "two")
        shown = repr(client._headers)
    for _, headers, _ in server.seen:
        assert headers["X-Api-Key"] == "k-123"
        assert headers["Accept"] == "application/json; v=2"
        assert headers["Authorization"].startswith("Basic ")
    assert "k-123" not in shown


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "CONTENT-TYPE",
        "Idempotency-Key",
        "idempotency-KEY",
        "Content-Length",
        "Transfer-Encoding",
        "X-Retry-Count",
    ],
)
def test_the_clients_own_headers_cannot_be_overridden(name: str) -> None:
    """Authorization, Content-Type, Idempotency-Key (any case) and framing are refused."""
    with pytest.raises(InvalidRequestError) as info:
        BotMessageClient(
            "https://api.example.com", USERNAME, PASSWORD, default_headers={name: "secret-v"}
        )
    assert info.value.field == "default_headers"
    assert name in str(info.value)
    assert "secret-v" not in chain_text(info.value)


def test_the_policys_idempotency_header_cannot_be_overridden() -> None:
    """A policy's own idempotency header name is as protected as the default one."""
    policy = RetryPolicy(idempotency_header="X-Dedup")
    with pytest.raises(InvalidRequestError, match="x-dedup"):
        BotMessageClient(
            "https://api.example.com",
            USERNAME,
            PASSWORD,
            retry=policy,
            default_headers={"x-dedup": "1"},
        )


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Ok": "a\r\nX-Injected: 1"},
        {"X-Ok": "a\nb"},
        {"X-Ok": "a\0"},
        {"Bad Name": "v"},
        {"": "v"},
        {"X-Ok": 1},
        {1: "v"},
        {"X-A": "1", "x-a": "2"},
        [("X-A", "1")],
    ],
)
def test_bad_default_headers_are_refused_before_io(headers: object) -> None:
    """Header injection, bad names, non-str values and duplicates are refused up front."""
    with pytest.raises(InvalidRequestError, match="default_headers"):
        BotMessageClient(
            "https://api.example.com",
            USERNAME,
            PASSWORD,
            default_headers=headers,  # type: ignore[arg-type]
        )


#: Every character aiohttp refuses in a header value (a control character but tab: it
#: raises a bare ValueError as it writes the request), and lone surrogates (its C writer
#: drops them silently, its Python writer cannot encode them).
_UNSENDABLE = [chr(c) for c in (*range(0x09), *range(0x0A, 0x20), 0x7F)] + ["\ud800", "\udcff"]


@pytest.mark.parametrize("char", _UNSENDABLE, ids=ascii)
async def test_a_header_value_that_cannot_be_sent_is_refused_up_front(
    server: ScriptedServer, char: str
) -> None:
    """default_headers, user_agent and with_options(headers=) holding a character no header
    value can carry: InvalidRequestError naming the field, before any I/O, never a bare
    ValueError out of send()."""
    value = f"a{char}b"
    for field, options in (
        ("default_headers", {"default_headers": {"X-Api-Key": value}}),
        ("user_agent", {"user_agent": value}),
    ):
        with pytest.raises(InvalidRequestError) as info:
            BotMessageClient(server.base_url, USERNAME, PASSWORD, **options)
        assert info.value.field == field
    async with BotMessageClient(server.base_url, USERNAME, PASSWORD) as client:
        with pytest.raises(InvalidRequestError) as info:
            client.with_options(headers={"X-Api-Key": value})
        assert info.value.field == "headers"
    assert server.seen == []


async def test_header_values_with_tab_and_non_ascii_text_arrive_intact(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A tab and non-ASCII text are header text aiohttp sends: accepted, and sent as given."""
    async with make_client(
        server.base_url, default_headers={"X-Tenant": "a\tb", "X-Name": "Jos\u00e9 \u4e2d"}
    ) as client:
        await client.send(DEPT, USER, "hi")
    _, headers, _ = server.seen[0]
    assert headers["X-Tenant"] == "a\tb"
    assert headers["X-Name"] == "Jos\u00e9 \u4e2d"


async def test_a_body_over_a_mebibyte_is_sent_whole_without_a_warning(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A body over aiohttp's 1 MiB for raw bytes goes out whole, with no ResourceWarning."""
    text = '"' * 600_000  # each escaped: a 1.2 MB body from 600 kB of text
    server.script.append(answer(503, "busy"))  # a retry sends the whole body again
    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, text)  # warnings are errors in this suite
    assert result.attempts == 2
    for _, headers, body in server.seen:
        assert len(body) > 2**20
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["messageAttributes"]["body"] == text


def test_user_agent_given_twice_is_refused() -> None:
    """user_agent= and a User-Agent default header together are ambiguous: refused."""
    with pytest.raises(InvalidRequestError, match="user_agent"):
        BotMessageClient(
            "https://api.example.com",
            USERNAME,
            PASSWORD,
            user_agent="a/1",
            default_headers={"user-agent": "b/2"},
        )


async def test_trace_configs_callbacks_fire(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """trace_configs reach the session: aiohttp calls their callbacks for each request."""
    seen: list[str] = []
    trace = aiohttp.TraceConfig()

    async def on_start(session: Any, context: Any, params: aiohttp.TraceRequestStartParams) -> None:
        seen.append(f"start {params.method} {params.url.path}")

    async def on_end(session: Any, context: Any, params: aiohttp.TraceRequestEndParams) -> None:
        seen.append(f"end {params.response.status}")

    trace.on_request_start.append(on_start)
    trace.on_request_end.append(on_end)
    async with make_client(server.base_url, trace_configs=[trace]) as client:
        await client.send(DEPT, USER, "hello")
    path = f"/communications/department/{DEPT}/user/{USER}/botmessage/send"
    assert seen == [f"start POST {path}", "end 200"]


# -- a lent session --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("proxy", f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:3128"),
        ("ssl", False),
        ("trust_env", True),
        ("trace_configs", [aiohttp.TraceConfig()]),
        ("max_connections", 10),
        ("keepalive_timeout", 30.0),
    ],
)
async def test_session_options_with_a_lent_session_are_refused(option: str, value: Any) -> None:
    """With session=, an option that belongs to the session is refused, not ignored."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(InvalidRequestError) as info:
            BotMessageClient(
                "https://api.example.com", USERNAME, PASSWORD, session=session, **{option: value}
            )
    assert info.value.field == option
    assert "session" in str(info.value)
    assert PROXY_PASSWORD not in chain_text(info.value)


async def test_per_request_options_with_a_lent_session_are_kept(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """default_headers and timeout are per request: they work with a lent session."""
    async with aiohttp.ClientSession() as session:
        client = make_client(
            server.base_url, session=session, default_headers={"X-Tenant": "t1"}, timeout=5.0
        )
        async with client:
            await client.send(DEPT, USER, "hello")
    assert server.seen[0][1]["X-Tenant"] == "t1"


async def test_a_refused_tunnel_keeps_no_encoded_proxy_credentials_in_its_chain(
    ca: Any, proxy: LoopbackProxy, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 407 to CONNECT via HTTPS_PROXY (trust_env): no error in the chain shows the credential."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv(
        "HTTPS_PROXY", proxy.url.replace("://", f"://{PROXY_USER}:{PROXY_PASSWORD}@")
    )
    proxy.refuse = 407
    encoded = aiohttp.encode_basic_auth(PROXY_USER, PROXY_PASSWORD).removeprefix("Basic ")
    async with tls_server(ca) as tls:
        client = make_client(
            tls.base_url, trust_env=True, ssl=trusting(ca), retry=RetryPolicy.none()
        )
        async with client:
            with pytest.raises(TransportError) as info:
                await client.send(DEPT, USER, "hello")
    assert encoded in proxy.heads[0]  # it was sent to the proxy
    assert encoded not in chain_text(info.value)


async def test_a_pinned_fingerprint_that_does_not_match_is_a_certificate_error(
    ca: Any, make_client: MakeClient
) -> None:
    """A lent session pinning another certificate: CertificateError, not 'unknown'; nothing sent."""
    pinned = aiohttp.Fingerprint(b"\x00" * 32)
    async with tls_server(ca) as tls:
        connector = aiohttp.TCPConnector(ssl=pinned)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = make_client(tls.base_url, session=session, retry=RetryPolicy.none())
            async with client:
                with pytest.raises(CertificateError) as info:
                    await client.send(DEPT, USER, "hello")
    assert not isinstance(info.value, DeliveryUnknownError)
    assert tls.seen == []
