"""Secrets stay secret: with DEBUG logging on, no password or Authorization value escapes."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from botmsg_async import BotMessageClient, BotMessageError, InvalidRequestError, RetryPolicy
from botmsg_async.testing import FakeBotMessageServer, Fault

PASSWORD = "pa55:w0rd-Ünïcode-s3cr3t"


def secrets_of(username: str, password: str) -> list[str]:
    authorization = aiohttp.encode_basic_auth(username, password)
    return [password, authorization, authorization.split()[1]]


def chain(error: BaseException | None) -> list[str]:
    texts = []
    while error is not None:
        texts += [str(error), repr(error), repr(error.args)]
        error = error.__cause__ or error.__context__
    return texts


async def test_nothing_secret_in_logs_reprs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Sends, retries, failures and batches at DEBUG leave no credential anywhere."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with FakeBotMessageServer(username="bot", password=PASSWORD, seed=3) as server:
        server.inject(Fault.TRANSIENT_FAILURE, times=2)
        server.inject(Fault.HTTP_502)
        server.inject(Fault.DROP_AFTER)
        server.inject(Fault.MALFORMED)
        policy = RetryPolicy(backoff_initial=0, backoff_max=0)
        async with BotMessageClient(server.base_url, "bot", PASSWORD, retry=policy) as client:
            texts.append(repr(client))
            for _ in range(5):
                try:
                    texts.append(repr(await client.send("d", "u", "hello")))
                except BotMessageError as exc:
                    texts += chain(exc)
            for bad in ("a/b", "", "..", "x y"):
                with pytest.raises(InvalidRequestError) as info:
                    await client.send(bad, "u", "hello")
                texts += chain(info.value)
            report = await client.send_many([("d", f"u{i}", "hi") for i in range(20)])
            texts.append(repr(report))
        async with BotMessageClient(server.base_url, "bot", "wrong-" + PASSWORD) as client:
            report = await client.send_many([("d", f"u{i}", "hi") for i in range(5)])
            texts.append(repr(report))
            texts += chain(report.stopped_by)
    texts.append(caplog.text)
    texts += [repr(record.args) for record in caplog.records]
    assert "POST /communications/department/d/user/u/botmessage/send" in caplog.text
    assert "retrying" in caplog.text
    for secret in secrets_of("bot", PASSWORD) + secrets_of("bot", "wrong-" + PASSWORD):
        for text in texts:
            assert secret not in text


@pytest.mark.parametrize("scheme", ["https", "http", "ftp"])
def test_credentials_in_base_url_are_refused_and_not_echoed(scheme: str) -> None:
    """A base_url carrying user:password is refused without repeating it, whatever the scheme."""
    with pytest.raises(InvalidRequestError) as info:
        BotMessageClient(f"{scheme}://bot:{PASSWORD}@api.example.com", "bot", PASSWORD)
    assert all(PASSWORD not in text for text in chain(info.value))


@pytest.mark.parametrize("base_url", ["http://api.example.com", "http://192.168.1.10:8080"])
def test_insecure_http_guard(base_url: str) -> None:
    """http:// to a non-loopback host is refused before any connection."""
    with pytest.raises(InvalidRequestError, match="clear text"):
        BotMessageClient(base_url, "bot", PASSWORD)


@pytest.mark.parametrize(
    "identifier", ["../../admin", "..", "a/../b", "x?admin=1", "x#y", "%2e%2e", "a\\b", "a\tb"]
)
async def test_path_injection_ids_rejected_before_io(identifier: str) -> None:
    """Ids that could alter the request path are refused and nothing reaches the server."""
    async with (
        FakeBotMessageServer() as server,
        BotMessageClient(server.base_url, server.username, server.password) as client,
    ):
        with pytest.raises(InvalidRequestError):
            await client.send(identifier, "u", "hi")
        with pytest.raises(InvalidRequestError):
            await client.send("d", identifier, "hi")
        assert server.requests == 0


async def test_chained_aiohttp_errors_carry_no_authorization() -> None:
    """A malformed answer's chained aiohttp error has no request headers left in it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n{}")
        await writer.drain()
        writer.close()

    tcp = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        async with BotMessageClient(f"http://127.0.0.1:{port}", "bot", PASSWORD) as client:
            with pytest.raises(BotMessageError) as info:
                await client.send("d", "u", "hi")
    finally:
        tcp.close()
        await tcp.wait_closed()
    for secret in secrets_of("bot", PASSWORD):
        assert all(secret not in text for text in chain(info.value))
