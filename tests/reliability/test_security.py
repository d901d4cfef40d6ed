"""Secrets stay secret: with DEBUG logging on, no password or Authorization value escapes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from botmsg_async import BotMessageClient, BotMessageError, InvalidRequestError, RetryPolicy
from botmsg_async.testing import FakeBotMessageServer, Fault

from ..conftest import run_botmsg, serving_send

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


# -- the CLI: every sink redacted, even when the server echoes the credentials -------------

CLI_USER = "echo-user"
# A quote and a backslash: JSON escapes them, so a search of the raw output would miss them.
CLI_PASSWORD = 'pw"Zq\\8-echo-4412'


def all_strings(value: object) -> list[str]:
    """Every string (keys included) inside a decoded JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *all_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in all_strings(v)]
    return []


def decoded_texts(text: str) -> list[str]:
    """``text`` itself, and every string of each line that is JSON."""
    texts = [text]
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            texts += all_strings(json.loads(line))
    return texts


@contextlib.asynccontextmanager
async def echoing_server() -> AsyncIterator[str]:
    """A server that answers every send with the request's credentials in its error text.

    User ``fail-*``: HTTP 200 FAILURE with them in ``errorDescription``; ``http-*``:
    HTTP 400 with them in a JSON body; else SUCCESS with them in ``messageUuid``.
    """

    async def handle(request: web.Request) -> web.Response:
        authorization = request.headers["Authorization"]
        decoded = base64.b64decode(authorization.split()[1]).decode()
        password = decoded.partition(":")[2]
        echo = f"refused {authorization!r} = {decoded} (password {password})"
        user = request.match_info["user"]
        if user.startswith("fail-"):
            error = {"errorCode": "DENIED", "errorDescription": echo, "errorUID": password}
            return web.json_response({"requestUuid": echo, "status": "FAILURE", "errors": [error]})
        if user.startswith("http-"):
            return web.json_response({"errorDescription": echo}, status=400)
        return web.json_response({"requestUuid": "r", "status": "SUCCESS", "messageUuid": echo})

    async with serving_send(handle) as base_url:
        yield base_url


async def run_cli(*args: str, base_url: str) -> tuple[int, str, str]:
    return await run_botmsg(*args, base_url=base_url, username=CLI_USER, password=CLI_PASSWORD)


def assert_no_cli_secret(texts: list[str]) -> None:
    token = base64.b64encode(f"{CLI_USER}:{CLI_PASSWORD}".encode()).decode()
    for secret in (CLI_PASSWORD, token, f"{CLI_USER}:{CLI_PASSWORD}"):
        for text in texts:
            assert secret not in text


@pytest.mark.parametrize("user", ["fail-1", "http-1", "ok-1"])
async def test_cli_send_redacts_credentials_the_server_echoes(user: str) -> None:
    """botmsg send: credentials echoed by the server show in neither stdout nor stderr."""
    async with echoing_server() as base_url:
        rc, out, err = await run_cli(
            "--log-level", "DEBUG", "send", "-d", "d-1", "-u", user, "-t", "hi", base_url=base_url
        )
    assert rc in (0, 1), err
    if not user.startswith("http-"):  # a 400's body is not shown at all
        assert "[redacted]" in out + err
    assert_no_cli_secret(decoded_texts(out) + decoded_texts(err))


async def test_cli_send_many_redacts_echoed_credentials_in_out_and_journal(
    tmp_path: Path,
) -> None:
    """botmsg send-many: echoed credentials reach no sink: stdout, stderr, --out, journal."""
    source = tmp_path / "in.jsonl"
    users = ["fail-1", "http-2", "ok-3", "fail-4"]
    source.write_text(
        "".join(
            json.dumps({"department_uuid": "d-1", "user_uuid": u, "text": "hi"}) + "\n"
            for u in users
        ),
        encoding="utf-8",
    )
    out, journal = tmp_path / "out.jsonl", tmp_path / "journal"
    async with echoing_server() as base_url:
        for extra in (["--out", str(out)], ["--out", "-"]):
            journal.unlink(missing_ok=True)
            rc, stdout, stderr = await run_cli(
                "send-many", str(source), "--journal", str(journal), *extra, base_url=base_url
            )
            assert rc == 1, stderr
            texts = decoded_texts(stdout) + decoded_texts(stderr)
            texts += decoded_texts(journal.read_text(encoding="utf-8"))
            if extra[1] != "-":
                texts += decoded_texts(out.read_text(encoding="utf-8"))
                assert "[redacted]" in out.read_text(encoding="utf-8")
            assert_no_cli_secret(texts)


@pytest.mark.parametrize("key", [PASSWORD, 'pw"Zq\\8-echo', "tab\there"])
def test_a_repeated_key_is_not_quoted_in_the_error(key: str) -> None:
    """An answer repeating a key (say, an echoed password) is refused without quoting the key."""
    from botmsg_async._wire import WireFormatError, decode_response

    body = (
        '{"requestUuid":"r","status":"SUCCESS",' + json.dumps(key) + ":1," + json.dumps(key) + ":2}"
    ).encode()
    with pytest.raises(WireFormatError) as info:
        decode_response(body)
    text = " ".join(info.value.problems)
    for form in (key, repr(key)[1:-1], json.dumps(key)[1:-1]):
        assert form not in text
