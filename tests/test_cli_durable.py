"""``botmsg send-many --durable``: no send goes out before its start record is on disk.

The CLI runs in a worker thread of this process (its own event loop there), so
that ``os.fsync`` can be observed; the server answers from the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from botmsg_async import cli
from tests.conftest import serving_send
from tests.test_cli import rows, write_csv

Handler = Callable[[web.Request], web.Response]


@contextlib.asynccontextmanager
async def serving(handle: Handler) -> AsyncIterator[str]:
    async def endpoint(request: web.Request) -> web.Response:
        await request.read()
        return handle(request)

    async with serving_send(endpoint) as base_url:
        yield base_url


def success(request: web.Request) -> web.Response:
    uid = request.headers["Idempotency-Key"]
    return web.json_response({"requestUuid": uid, "status": "SUCCESS", "messageUuid": uid})


async def botmsg_in_thread(monkeypatch: pytest.MonkeyPatch, base_url: str, *args: str) -> int:
    """Run ``cli.main(args)`` in a worker thread; restore the logging it set up."""
    monkeypatch.setenv("BOTMSG_BASE_URL", base_url)
    monkeypatch.setenv("BOTMSG_USERNAME", "u")
    monkeypatch.setenv("BOTMSG_PASSWORD", "durable-pw")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return await asyncio.to_thread(cli.main, list(args))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_no_send_before_its_start_record_is_fsynced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every request's key is in the part of the journal fsynced before it arrived."""
    journal = tmp_path / "journal"
    source = write_csv(tmp_path / "in.csv", rows(200))
    durable = [0]  # bytes of the journal known to be on disk
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        same = journal.exists() and os.fstat(fd).st_ino == journal.stat().st_ino
        real_fsync(fd)
        if same:
            durable[0] = max(durable[0], size)

    monkeypatch.setattr(os, "fsync", fsync)
    missing: list[str] = []
    keys: list[str] = []

    def handle(request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        keys.append(key)
        on_disk = journal.read_bytes()[: durable[0]]
        if f'"key":"{key}"'.encode() not in on_disk:
            missing.append(key)
        return success(request)

    async with serving(handle) as base_url:
        rc = await botmsg_in_thread(
            monkeypatch, base_url, "send-many", str(source), "--journal", str(journal),
            "--durable", "-c", "8",
        )  # fmt: skip
    assert rc == cli.EXIT_OK
    assert len(keys) == 200
    assert missing == []
    assert b'"window":0' in journal.read_bytes().splitlines()[0]


async def test_durable_starts_never_attempted_are_withdrawn_and_resumed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Items written ahead but skipped (the batch stopped) are sent by --resume, not unknown."""
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    source = write_csv(tmp_path / "in.csv", rows(40))
    refuse = [True]
    users: list[str] = []

    def handle(request: web.Request) -> web.Response:
        if refuse[0]:  # the first answer refuses the credentials: the batch stops
            refuse[0] = False
            return web.json_response({"detail": "no"}, status=401)
        users.append(request.match_info["user"])
        return success(request)

    args = ["send-many", str(source), "--journal", str(journal), "--durable", "-c", "4"]
    async with serving(handle) as base_url:
        rc = await botmsg_in_thread(monkeypatch, base_url, *args)
        assert rc == cli.EXIT_FAILED
        assert b'"attempted":false' in journal.read_bytes()
        rc = await botmsg_in_thread(monkeypatch, base_url, *args, "--resume", "--out", str(out))
    assert rc == cli.EXIT_OK
    outcomes = [json.loads(line)["outcome"] for line in out.read_text().splitlines()]
    assert outcomes == ["sent"] * 40
    assert sorted(users) == sorted(f"user-{i}" for i in range(40))
