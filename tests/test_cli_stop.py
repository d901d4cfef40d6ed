"""A first SIGTERM to a single-process ``botmsg send-many``: nothing new starts, at once.

Items the batch has taken but not attempted (waiting for ``--rate`` or for a 429
pause) must not be started after the signal, and a 429 pause must not hold the
stop; ``tests/test_cli_workers.py`` holds ``--workers`` to the same.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from aiohttp import web

from tests.test_cli_workers import (
    check_accounting,
    finish,
    items,
    no_process_left,  # noqa: F401 - the autouse fixture: no process left behind
    resume,
    service,
    start,
)


async def test_a_stop_ends_the_wait_for_a_429_pause_without_workers(tmp_path: Path) -> None:
    """SIGTERM during a 30 s pause ends the run at once; nothing sent after; resume finishes."""
    n = 20
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    first = tmp_path / "first.jsonl"
    told = asyncio.Event()

    async def throttle(request: web.Request) -> web.Response:
        told.set()
        return web.json_response({}, status=429, headers={"Retry-After": "30"})

    async with service() as (svc, base_url):
        svc.script.append(throttle)
        process = await start(
            base_url, str(source), "-c", "1", "--journal", str(journal), "--out", str(first)
        )
        await asyncio.wait_for(told.wait(), 20)
        process.send_signal(signal.SIGTERM)
        code, err = await finish(process)
        assert code == 130, err
        assert svc.requests == 1  # the throttled item was not sent again
        # A 429 proves the item was not processed: failed, and resent by --resume.
        assert [line["outcome"] for line in check_lines(first)] == ["failed"]
        out = tmp_path / "out.jsonl"
        code, err = await resume(base_url, source, journal, out, workers=1)
    assert code == 0, err
    assert set(check_accounting(svc, out, n).values()) == {"sent"}


async def test_a_stop_starts_no_item_waiting_for_the_rate_limit(tmp_path: Path) -> None:
    """SIGTERM while items wait for --rate: none of them is sent; the resume sends them."""
    n = 20
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    first = tmp_path / "first.jsonl"
    async with service() as (svc, base_url):
        arrived = svc.when_received(1)
        # One message per 100 s: the first goes at once, the others wait for the limiter.
        process = await start(
            base_url, str(source), "-c", "4", "--rate", "0.01",
            "--journal", str(journal), "--out", str(first),
        )  # fmt: skip
        await asyncio.wait_for(arrived.wait(), 20)
        process.send_signal(signal.SIGTERM)
        code, err = await finish(process)
        assert code == 130, err
        assert svc.requests == 1
        outcomes = [line["outcome"] for line in check_lines(first)]
        assert outcomes.count("sent") == 1
        assert set(outcomes) <= {"sent", "skipped"}  # those taken but never attempted
        out = tmp_path / "out.jsonl"
        code, err = await resume(base_url, source, journal, out, workers=1)
    assert code == 0, err
    assert set(check_accounting(svc, out, n).values()) == {"sent"}
    assert svc.requests == n


def check_lines(out: Path) -> list[dict[str, object]]:
    """The lines of ``out``, each index once."""
    from tests.test_cli import read_jsonl

    lines = read_jsonl(out)
    assert len({line["index"] for line in lines}) == len(lines)
    return lines


@pytest.mark.parametrize("journal", [False, True], ids=["no journal", "journal"])
async def test_a_second_signal_lists_the_abandoned_sends_as_unknown(
    tmp_path: Path, journal: bool
) -> None:
    """A second SIGTERM abandons the sends in flight: each is an "unknown" line of --out."""
    source = items(tmp_path, 10)
    first = tmp_path / "first.jsonl"
    arrived, release = asyncio.Event(), asyncio.Event()
    keys: list[str] = []

    async def stall(request: web.Request) -> web.Response:
        keys.append(request.headers["Idempotency-Key"])
        arrived.set()
        await release.wait()
        return web.json_response({}, status=503)

    async with service() as (svc, base_url):
        svc.script.append(stall)
        extra = ["--journal", str(tmp_path / "journal")] if journal else []
        process = await start(base_url, str(source), "-c", "1", "--out", str(first), *extra)
        await asyncio.wait_for(arrived.wait(), 20)
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        # The second signal once the first is handled (two at once would be one).
        said = await asyncio.wait_for(process.stderr.readline(), 20)
        assert b"stopping" in said
        process.send_signal(signal.SIGTERM)
        code, err = await finish(process)
        release.set()
    assert code == 130, err
    # Without a journal, --out is all there is to tell the item in doubt from those
    # never started (which may be sent again): it must be listed.
    lines = check_lines(first)
    assert [(line["index"], line["outcome"]) for line in lines] == [(0, "unknown")]
    assert lines[0]["idempotency_key"] == keys[0]
    assert "0 sent, 0 failed, 1 unknown" in err


async def test_a_stop_with_workers_does_not_wait_for_their_rate_limit(tmp_path: Path) -> None:
    """--workers: SIGTERM while items wait for --rate ends the run at once, nothing more sent."""
    n = 20
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    async with service() as (svc, base_url):
        arrived = svc.when_received(1)
        # One message per 100 s for both workers: the first goes at once, seven wait.
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "4", "--rate", "0.01",
            "--journal", str(journal), "--out", str(tmp_path / "first.jsonl"),
        )  # fmt: skip
        await asyncio.wait_for(arrived.wait(), 20)
        process.send_signal(signal.SIGTERM)
        code, err = await finish(process)  # before: one slot per 100 s for each waiter
        assert code == 130, err
        assert svc.requests == 1
        out = tmp_path / "out.jsonl"
        code, err = await resume(base_url, source, journal, out)
    assert code == 0, err
    assert set(check_accounting(svc, out, n).values()) == {"sent"}


#: A ``sitecustomize`` for ``start``: the second signal's cancel (what its handler does)
#: comes right as item 0's answer is in, before the run reads it from the batch.
_CANCEL_AS_ITEM_0_ENDS = """
import asyncio, sys
if sys.argv[:1] != ["-c"]:
    from botmsg_async.cli import send_many
    run, on_result = send_many.SendMany.run, send_many.SendMany._on_result
    main = []
    async def recorded_run(self, creds):
        main.append(asyncio.current_task())
        return await run(self, creds)
    def cancelling_on_result(self, item):
        on_result(self, item)
        if item.index == 0:
            main[0].cancel()
    send_many.SendMany.run = recorded_run
    send_many.SendMany._on_result = cancelling_on_result
"""


@pytest.mark.parametrize("journal", [False, True], ids=["no journal", "journal"])
async def test_a_second_signal_reports_an_answered_item_as_it_ended(
    tmp_path: Path, journal: bool
) -> None:
    """A second signal as a send's answer is in: --out says it was sent, not unknown."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_CANCEL_AS_ITEM_0_ENDS)
    source = items(tmp_path, 2)
    first = tmp_path / "first.jsonl"
    arrived = [asyncio.Event(), asyncio.Event()]
    release = [asyncio.Event(), asyncio.Event()]

    async def stall(request: web.Request) -> web.Response:
        user = int(request.match_info["user"].removeprefix("user-"))
        arrived[user].set()
        await release[user].wait()
        return web.json_response({"requestUuid": "r", "status": "SUCCESS", "messageUuid": "m"})

    async with service() as (svc, base_url):
        svc.script += [stall, stall]
        extra = ["--journal", str(tmp_path / "journal")] if journal else []
        process = await start(
            base_url, str(source), "-c", "2", "--out", str(first), *extra, site=site
        )
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in arrived)), 20)
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        said = await asyncio.wait_for(process.stderr.readline(), 20)
        assert b"stopping" in said
        release[0].set()  # item 0 is answered; the cancel follows at once
        code, err = await finish(process)
        release[1].set()
    assert code == 130, err
    lines = {line["index"]: line for line in check_lines(first)}
    assert {index: line["outcome"] for index, line in lines.items()} == {
        0: "sent",
        1: "unknown",
    }
    assert lines[0]["message_uuid"] == "m"
    assert "1 sent, 0 failed, 1 unknown" in err
