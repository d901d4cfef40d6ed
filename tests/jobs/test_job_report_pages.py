"""The report of a Redis job read a page at a time (``iter_job_results``), against a real Redis."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

import redis

from botmsg_async import InvalidRequestError, SendRequest
from botmsg_async.jobs import (
    DIED_NOTE,
    JobError,
    JobItemResult,
    iter_job_results,
    job_results,
)

from .conftest import JobRedis

_NONCE = uuid.UUID(int=7)
#: What a details field may hold: every outcome code, and values no run writes (corrupt).
_DETAILS = [
    "f" + json.dumps({"t": "APIStatusError", "e": "user not found", "st": 404}),
    "u" + json.dumps({"t": "DeliveryUnknownError", "e": "timed out"}),
    "k" + json.dumps({"t": "BatchStoppedError", "e": "stopped"}),
    "s" + json.dumps({"m": "0b5f2e36-4c1e-4e0e-9a43-1b9b1d0b7a11"}),
    "f{not json",
    "f[1, 2]",
    "",
    "x",
    "f" + json.dumps({"t": 5, "e": None, "st": "404"}),
]
#: Per item: (started, settled, details index or None, packed UUID present).
_ITEM = st.tuples(
    st.booleans(), st.booleans(), st.none() | st.integers(0, len(_DETAILS) - 1), st.booleans()
)


def _write_job(
    client: redis.Redis, job: str, kinds: list[tuple[bool, bool, int | None, bool]], chunk: int
) -> None:
    """A job's keys written directly, with the documented layout (docs/jobs.md)."""
    prefix = f"botmsg:job:{{{job}}}:"
    client.delete(*(prefix + k for k in ("meta", "started", "settled", "details", "m")))
    packed: dict[int, bytearray] = {}
    for index, (started, settled, detail, has_uuid) in enumerate(kinds):
        if started:
            client.setbit(prefix + "started", index, 1)
        if settled:
            client.setbit(prefix + "settled", index, 1)
        if detail is not None:
            client.hset(prefix + "details", str(index), _DETAILS[detail])
        if has_uuid:
            blob = packed.setdefault(index // chunk, bytearray())
            off = (index % chunk) * 16
            blob += bytes(max(0, off - len(blob)))  # a chunk's blob may be short (corrupt)
            blob[off : off + 16] = uuid.UUID(int=index + 1).bytes
    for number, blob in packed.items():
        client.hset(prefix + "m", str(number), bytes(blob))
    client.hset(
        prefix + "meta",
        mapping={"v": "1", "items": len(kinds), "chunk": chunk, "nonce": _NONCE.hex,
                 "state": "stopped", "stopped_by": "a 401"},
    )  # fmt: skip


def _b(value: object) -> bytes:
    """A reply of the bytes client, typed (empty for a missing key)."""
    assert value is None or isinstance(value, bytes)
    return value or b""


def _old_job_results(
    client: redis.Redis, job: str, items: list[SendRequest | None] | None
) -> list[JobItemResult]:
    """The report as job_results built it before pages (one HGETALL/GET of each key)."""
    prefix = f"botmsg:job:{{{job}}}:"
    meta = {_b(k).decode(): _b(v).decode() for k, v in client.hgetall(prefix + "meta").items()}
    started, settled = _b(client.get(prefix + "started")), _b(client.get(prefix + "settled"))
    details = {int(k): _b(v).decode() for k, v in client.hgetall(prefix + "details").items()}
    packed = {int(k): _b(v) for k, v in client.hgetall(prefix + "m").items()}
    chunk, nonce = int(meta["chunk"]), uuid.UUID(hex=meta["nonce"])
    never = f"not attempted: the job stopped after: {meta['stopped_by']}"
    out = []
    for index in range(int(meta["items"])):
        item = items[index] if items is not None and index < len(items) else None
        if items is not None and item is None:
            continue
        key = item.idempotency_key if item is not None else None
        key = key or str(uuid.uuid5(nonce, str(index)))
        byte, mask = index // 8, 0x80 >> (index % 8)
        error: dict[str, Any]
        if byte < len(settled) and settled[byte] & mask:
            detail = details.get(index)
            if detail is None:
                piece = packed.get(index // chunk, b"")[(index % chunk) * 16 :][:16]
                muuid = str(uuid.UUID(bytes=piece)) if len(piece) == 16 and any(piece) else None
                out.append(JobItemResult(index, "sent", muuid, None, key))
                continue
            outcome = {"s": "sent", "f": "failed", "u": "unknown", "k": "skipped"}.get(
                detail[:1], "unknown"
            )
            try:
                body = json.loads(detail[1:]) if detail[1:] else {}
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            if outcome == "sent":
                m = body.get("m")
                out.append(
                    JobItemResult(index, "sent", m if isinstance(m, str) else None, None, key)
                )
                continue
            error = {
                "type": body.get("t") if isinstance(body.get("t"), str) else "BotMessageError",
                "message": body.get("e") if isinstance(body.get("e"), str) else "",
                "status": body.get("st") if isinstance(body.get("st"), int) else None,
            }
            out.append(JobItemResult(index, outcome, None, error, key))
        elif byte < len(started) and started[byte] & mask:
            error = {"type": "DeliveryUnknownError", "message": DIED_NOTE, "status": None}
            out.append(JobItemResult(index, "unknown", None, error, key))
        else:
            error = {"type": "BatchStoppedError", "message": never, "status": None}
            out.append(JobItemResult(index, "skipped", None, error, None))
    return out


async def _collect(url: str, job: str, items: Any, page_size: int) -> list[JobItemResult]:
    return [r async for r in iter_job_results(url, job, items, page_size=page_size)]


@settings(
    deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(_ITEM, min_size=1, max_size=70),
    chunk=st.integers(1, 20),
    page_size=st.integers(1, 40),
    keep=st.none() | st.lists(st.booleans(), max_size=80),
)
def test_pages_equal_the_whole_read(
    job_redis: JobRedis,
    kinds: list[tuple[bool, bool, int | None, bool]],
    chunk: int,
    page_size: int,
    keep: list[bool] | None,
) -> None:
    """Any page size gives the old whole-job list: every outcome, corrupt details, row keys."""
    client = redis.Redis.from_url(job_redis.url)
    try:
        _write_job(client, "p", kinds, chunk)
        items: list[SendRequest | None] | None = None
        if keep is not None:  # None: an invalid row; some rows bring their own key
            items = [
                SendRequest("d", f"u{i}", "hi", idempotency_key=f"row-{i}" if i % 3 else None)
                if k
                else None
                for i, k in enumerate(keep)
            ]
        expected = _old_job_results(client, "p", items)
    finally:
        client.close()
    assert asyncio.run(_collect(job_redis.url, "p", items, page_size)) == expected
    assert asyncio.run(job_results(job_redis.url, "p", items)) == expected


async def test_the_report_streams(job_redis: JobRedis) -> None:
    """The first item is yielded after one page is read, not the whole job."""
    from redis.asyncio import Redis

    client = redis.Redis.from_url(job_redis.url)
    try:
        kinds = [(True, i % 4 != 0, 0 if i % 4 == 1 else None, i % 4 > 1) for i in range(800)]
        _write_job(client, "s", kinds, 16)
    finally:
        client.close()
    async with Redis.from_url(job_redis.url) as stats:

        async def calls(command: str) -> int:
            info = await stats.info("commandstats")
            return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))

        await stats.config_resetstat()
        results = iter_job_results(job_redis.url, "s", page_size=64)
        first = await anext(results)
        assert first.index == 0
        assert await calls("getrange") == 2  # one page of both bitmaps
        assert await calls("hmget") == 2  # the page's details and packed UUIDs
        assert await calls("hgetall") == 1  # the meta, nothing else whole
        rest = [r async for r in results]
        assert await calls("getrange") == 2 * (800 // 64 + 1)
    assert [r.index for r in rest] == list(range(1, 800))


async def test_a_key_of_another_type_is_a_job_error(job_redis: JobRedis) -> None:
    """A bitmap key holding a hash (corrupt) is a JobError, as before; a bad page size refused."""
    client = redis.Redis.from_url(job_redis.url)
    try:
        _write_job(client, "c", [(True, True, None, True)] * 10, 4)
        client.delete("botmsg:job:{c}:settled")
        client.hset("botmsg:job:{c}:settled", "x", "1")
    finally:
        client.close()
    with pytest.raises(JobError, match="cannot read the job"):
        await job_results(job_redis.url, "c")
    with pytest.raises(InvalidRequestError):
        await anext(iter_job_results(job_redis.url, "c", page_size=0))
