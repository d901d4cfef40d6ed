"""A job's records in Redis holding what no run writes: only a BotMessageError escapes."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from typing import overload

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

from redis.asyncio import Redis

from botmsg_async import BotMessageError, InvalidRequestError, SendRequest
from botmsg_async.jobs import JobError, job_results, job_status, run_job_async
from botmsg_async.testing import FakeBotMessageServer

from .conftest import JobRedis

#: Values no run writes into a field of the job's meta: too long for a float, too large a
#: count, nested too deep for the JSON parser, of another JSON type, not UTF-8, empty.
_JUNK = [
    b"1" + b"0" * 400,
    b"-1" + b"0" * 400,
    str(2**62).encode(),  # a Redis integer, yet more items than a job can hold
    b"[" * 100_000,
    b"5",
    b"[]",
    b"\xff\xfe",
    b"",
]
_META_FIELDS = ["items", "chunk", "chunks", "done", "t0", "ns", "nf", "nu", "nk", "options"]


def _items(n: int) -> list[SendRequest | None]:
    dept = str(uuid.uuid5(uuid.NAMESPACE_DNS, "dept"))
    return [
        SendRequest(dept, str(uuid.uuid5(uuid.NAMESPACE_DNS, f"hostile{i}")), f"hello {i}")
        for i in range(n)
    ]


async def test_junk_in_the_meta_is_a_job_error_or_read_as_absent(job_redis: JobRedis) -> None:
    """Each meta field holding junk: status, report and a rejoin raise a JobError at worst."""
    items = _items(20)
    async with FakeBotMessageServer() as server, Redis.from_url(job_redis.url) as r:

        async def join() -> None:
            await run_job_async(
                job_redis.url,
                "h",
                items,
                base_url=server.base_url,
                username=server.username,
                password=server.password,
                chunk_size=10,
            )

        await join()
        meta = "botmsg:job:{h}:meta"
        for field in _META_FIELDS:
            kept = await r.hget(meta, field)
            assert kept is not None
            for junk in _JUNK:
                await r.hset(meta, field, junk)
                for read in (job_status(job_redis.url, "h"), job_results(job_redis.url, "h")):
                    with contextlib.suppress(JobError):
                        await read
                if field in ("options", "items", "chunk"):  # checked when a run joins
                    with pytest.raises(JobError):
                        await join()
            await r.hset(meta, field, kept)
    assert len(server.messages) == 20


class _Counted(Sequence[SendRequest | None]):
    """A job's items that fail the test once asked their length far more often than a run
    of them may (a walk over a range no run wrote)."""

    def __init__(self, items: list[SendRequest | None]) -> None:
        self._items = items
        self.asked = 0

    def __len__(self) -> int:
        self.asked += 1
        if self.asked > 100_000:
            raise AssertionError("the run walks a range far beyond the job's items")
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> SendRequest | None: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[SendRequest | None]: ...

    def __getitem__(self, index: int | slice) -> SendRequest | Sequence[SendRequest | None] | None:
        return self._items[index]


@pytest.mark.parametrize(("first", "end"), [(0, 10**15), (-3, 0), (15, 5), (10, 21), (b"x", 5)])
async def test_a_corrupt_chunk_entry_stops_the_run_with_a_job_error(
    job_redis: JobRedis, first: int | bytes, end: int
) -> None:
    """A chunk entry whose range no run wrote: JobError, nothing sent again, no endless walk."""
    items = _items(20)
    async with FakeBotMessageServer() as server, Redis.from_url(job_redis.url) as r:

        async def join() -> None:
            await run_job_async(
                job_redis.url,
                "c",
                _Counted(items),
                base_url=server.base_url,
                username=server.username,
                password=server.password,
                chunk_size=10,
            )

        await join()
        await r.xadd("botmsg:job:{c}:chunks", {"a": first, "b": end})
        await r.hincrby("botmsg:job:{c}:meta", "chunks", 1)
        with pytest.raises(JobError, match="corrupt"):
            await join()
    assert len(server.messages) == 20


async def test_a_client_that_decodes_replies_is_refused(job_redis: JobRedis) -> None:
    """A Redis client that decodes replies to text is refused before anything is sent."""
    items = _items(4)
    async with (
        FakeBotMessageServer() as server,
        Redis.from_url(job_redis.url, decode_responses=True) as text_client,
    ):
        with pytest.raises(InvalidRequestError, match="bytes"):
            await run_job_async(
                text_client,
                "d",
                items,
                base_url=server.base_url,
                username=server.username,
                password=server.password,
            )
        with pytest.raises(InvalidRequestError, match="bytes"):
            await job_results(text_client, "d")
    assert server.messages == []


#: Redis URLs redis-py refuses, with words that quoted a piece of the password.
_BAD_URLS = [
    "redis://:s3cr/et@host:6379/0",  # an unencoded '/': the password's head taken for a port
    "redis://user:s3cret@host:99999999/0",
    "redis://:s3cret@host/0?socket_timeout=s3cret",
    "http://:s3cret@host/0",
]


@pytest.mark.parametrize("url", _BAD_URLS)
async def test_a_bad_redis_url_is_refused_without_quoting_it(url: str) -> None:
    """A Redis URL redis-py refuses: InvalidRequestError, and no piece of its password."""
    from botmsg_async.jobs import cancel_job
    from botmsg_async.shared import RedisRateLimiter, RedisSendGuard

    async def guard() -> None:
        RedisSendGuard(url, name="t")

    async def limiter() -> None:
        RedisRateLimiter(url, name="t", rate=1)

    async def status() -> None:
        await job_status(url, "j")

    async def cancel() -> None:
        await cancel_job(url, "j")

    for use in (guard, limiter, status, cancel):
        with pytest.raises(InvalidRequestError) as caught:
            await use()
        assert "s3cr" not in str(caught.value)
        assert "s3cr" not in repr(caught.value)


#: Redis URLs redis-py takes, with a password cut short by an unencoded '/', '?' or '#':
#: its head, 4711, was taken for a port (or a host) and quoted in every connection error.
_SPILLED_URLS = [
    "redis://:4711/s3cr@127.0.0.1:6379/0",
    "redis://:4711?s3cr@127.0.0.1",
    "redis://:4711#s3cr@127.0.0.1",
    "redis://user:4711/s3cr@127.0.0.1",
    "redis://:4711?a=s3cr@127.0.0.1",
    "rediss://:4711/s3cr@127.0.0.1",
    "unix://:4711#s3cr@/tmp/redis.sock",
]


@pytest.mark.parametrize("url", _SPILLED_URLS)
async def test_a_password_cut_short_in_a_redis_url_is_never_quoted(url: str) -> None:
    """A Redis URL whose password an unencoded '/', '?' or '#' cut short: refused before
    any connection, quoting no piece of it (not "connecting to localhost:4711")."""
    from botmsg_async.jobs import cancel_job
    from botmsg_async.shared import RedisRateLimiter, RedisSendGuard

    async def guard() -> None:
        async with RedisSendGuard(url, name="t") as made:
            await made.claim("k", "f", "d", "u", token="t")

    async def limiter() -> None:
        async with RedisRateLimiter(url, name="t", rate=1) as made:
            await made.acquire("d")

    async def status() -> None:
        await job_status(url, "j")

    async def cancel() -> None:
        await cancel_job(url, "j")

    for use in (guard, limiter, status, cancel):
        with pytest.raises(BotMessageError) as caught:
            await use()
        assert "4711" not in str(caught.value)
        assert "4711" not in repr(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?password=p@ss",
        "redis://127.0.0.1:1/0?username=me@home&password=x",
        "unix:///tmp/a@b/redis.sock",
        "redis://127.0.0.1:1/0?client_name=worker@box1",
        "rediss://127.0.0.1:1/0?ssl_ca_certs=/etc/redis@1/ca.pem&ssl_certfile=/k@/c.pem",
        "rediss://127.0.0.1:1/0?ssl_keyfile=/k@/k.pem&ssl_password=p@ss",
    ],
)
def test_an_at_sign_where_redis_reads_it_is_taken(url: str) -> None:
    """An '@' in a text option (password=, client_name=, a certificate's path...), or in a
    unix socket's path, is no cut."""
    from botmsg_async.shared import check_redis_url

    check_redis_url(url)


@pytest.mark.parametrize(
    "query",
    [
        "sockettimeout=5",  # a misspelt option
        "ssl_cert_reqs=none",  # an option of rediss:// only
        "protocol=5",
        "c=d@host",  # the password "s3cr?c=d" cut short at its '?'
    ],
)
async def test_an_option_redis_cannot_take_is_refused_up_front(query: str) -> None:
    """A Redis URL option redis-py's connections refuse (a TypeError, a RedisError at the
    first connection): an InvalidRequestError quoting none of it, never a traceback."""
    from botmsg_async.jobs import cancel_job
    from botmsg_async.shared import RedisRateLimiter, RedisSendGuard

    url = f"redis://:s3cr@127.0.0.1:1/0?{query}"
    if query.startswith("c="):
        url = f"redis://:s3cr?{query}"
    errors: list[InvalidRequestError] = []
    for make in (RedisSendGuard, RedisRateLimiter):
        with pytest.raises(InvalidRequestError) as caught:
            make(url, name="t")
        errors.append(caught.value)
    for command in (job_status, cancel_job):
        with pytest.raises(InvalidRequestError) as caught:
            await command(url, "j")
        errors.append(caught.value)
    for error in errors:
        for piece in ("s3cr", query):
            assert piece not in str(error)


async def test_arguments_no_redis_call_could_take_are_refused(job_redis: JobRedis) -> None:
    """Infinite rates, bursts, TTLs and timeouts, a TTL that deletes the job: refused up front."""
    from botmsg_async.shared import RedisRateLimiter, RedisSendGuard

    inf = float("inf")
    # rate, per_department_rate, burst, per_department_burst
    for rate, per_department, burst, per_department_burst in (
        (inf, None, None, None),
        (None, inf, None, None),
        (5.0, None, inf, None),
        (None, 5.0, None, inf),
    ):
        with pytest.raises(InvalidRequestError):
            RedisRateLimiter(
                job_redis.url,
                name="t",
                rate=rate,
                per_department_rate=per_department,
                burst=burst,
                per_department_burst=per_department_burst,
            )
    for ttl in (inf, 1e300):
        with pytest.raises(InvalidRequestError):
            RedisSendGuard(job_redis.url, name="t", ttl=ttl)
    # Finite but past what Redis's EXPIRE / XAUTOCLAIM take: the create script failed
    # half-way and left a job whose keys never expire, that no run could use again.
    async with FakeBotMessageServer() as server:
        for job_options in (
            {"claim_timeout": inf},
            {"ttl": 0},
            {"ttl": -5},
            {"ttl": 1.5},
            {"ttl": 10**300},
            {"ttl": 2**63},
            {"claim_timeout": 1e300},
        ):
            with pytest.raises(InvalidRequestError):
                await run_job_async(
                    job_redis.url,
                    "a",
                    _items(2),
                    base_url=server.base_url,
                    username=server.username,
                    password=server.password,
                    **job_options,
                )
    assert server.messages == []
    async with Redis.from_url(job_redis.url) as r:
        assert await r.keys("botmsg:job:*") == []
