"""Servers that misbehave: stalls, huge or odd answers, redirects, slammed connections."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from botmsg_async import (
    APIStatusError,
    BotMessageClient,
    DeliveryUnknownError,
    InvalidResponseError,
    Outcome,
    ResponseLostError,
    RetryPolicy,
)

from ..conftest import DEPT, USER, ScriptedServer, answer


async def test_headers_then_stall_is_cut_by_the_timeout(server: ScriptedServer) -> None:
    """A server that sends headers and then stalls is cut off within the attempt timeout."""

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"status":')
        await asyncio.sleep(30)
        return response

    server.script.append(stall)
    async with BotMessageClient(server.base_url, "u", "p", timeout=0.3) as client:
        # Only an outer bound far past the 0.3 s timeout (and short of the 30 s
        # stall): the test fails if the timeout does not cover the body's read.
        async with asyncio.timeout(15):
            with pytest.raises(ResponseLostError) as info:
                await client.send(DEPT, USER, "hi")
    assert info.value.attempts == 1  # ambiguous: not retried by default


@pytest.mark.parametrize("chunked", [False, True])
async def test_ten_megabyte_answer_refused_unread(server: ScriptedServer, chunked: bool) -> None:
    """A 10 MB answer is refused once past the 1 MiB cap, whether its length is announced or not."""
    body = b"{" + b" " * (10 * 1024 * 1024) + b"}"

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body)
        await response.prepare(request)
        try:
            for start in range(0, len(body), 256 * 1024):
                await response.write(body[start : start + 256 * 1024])
        except ConnectionError:
            return response  # the client hung up, as it should
        await response.write_eof()
        return response

    server.script.append(huge)
    async with BotMessageClient(server.base_url, "u", "p") as client:
        with pytest.raises(InvalidResponseError, match="over 1048576 bytes"):
            await client.send(DEPT, USER, "hi")


async def test_gzip_bomb_refused_past_the_cap(server: ScriptedServer) -> None:
    """A small gzip answer that inflates to 50 MB is refused at the cap, not inflated whole."""
    inflated = b"{" + b" " * (50 * 1024 * 1024) + b"}"
    packed = gzip.compress(inflated, compresslevel=9)
    assert len(packed) < 100 * 1024

    async def bomb(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=packed,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    server.script.append(bomb)
    async with BotMessageClient(server.base_url, "u", "p") as client:
        with pytest.raises(InvalidResponseError, match="over 1048576 bytes"):
            await client.send(DEPT, USER, "hi")


async def test_wrong_content_type_is_judged_by_the_body(server: ScriptedServer) -> None:
    """JSON labelled text/plain is read; HTML labelled JSON is an InvalidResponseError."""
    server.script.append(
        answer(200, '{"status":"SUCCESS","messageUuid":"m"}', {"Content-Type": "text/plain"})
    )
    server.script.append(answer(200, "<html>hi</html>", {"Content-Type": "application/json"}))
    async with BotMessageClient(server.base_url, "u", "p") as client:
        assert (await client.send(DEPT, USER, "hi")).message_uuid == "m"
        with pytest.raises(InvalidResponseError):
            await client.send(DEPT, USER, "hi")


@pytest.fixture
async def elsewhere() -> AsyncIterator[ScriptedServer]:
    """A second loopback server, the target of redirects."""
    srv = ScriptedServer()
    await srv.start()
    yield srv
    await srv.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_never_carry_credentials_elsewhere(
    server: ScriptedServer, elsewhere: ScriptedServer, status: int
) -> None:
    """A 30x is never followed: the redirect target never hears from the client.

    301/302/307/308 prove nothing was processed and are final; 303 (the answer to a
    processed POST) is ambiguous, so this policy retries it, never elsewhere.
    """
    server.default = answer(status, "", {"Location": f"{elsewhere.base_url}/steal"})
    async with BotMessageClient(
        server.base_url, "u", "p", retry=RetryPolicy(retry_ambiguous=True)
    ) as client:
        with pytest.raises(APIStatusError) as info:
            await client.send(DEPT, USER, "hi")
    assert info.value.status == status
    assert elsewhere.seen == []
    assert isinstance(info.value, DeliveryUnknownError) is (status == 303)
    assert len(server.seen) == (4 if status == 303 else 1)


@pytest.fixture
async def slammer() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A TCP server that reads each request and closes the connection without answering."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.read(65536))
        writer.close()

    tcp = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", requests
    tcp.close()
    await tcp.wait_closed()


async def test_server_closing_every_connection(slammer: tuple[str, list[bytes]]) -> None:
    """Every answer lost: each item is UNKNOWN after one attempt, none SENT, none resent."""
    base_url, requests = slammer
    async with BotMessageClient(base_url, "u", "p") as client:
        report = await client.send_many(
            ((DEPT, f"user-{i}", "hi") for i in range(40)), concurrency=8
        )
    assert report.unknown == 40
    assert all(r.outcome is Outcome.UNKNOWN for r in report.results)
    assert len(requests) == 40
