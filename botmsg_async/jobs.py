"""One bulk job shared by many machines through Redis (extra ``redis``): ``send-many --redis``.

Every run of a job (``botmsg send-many INPUT --redis URL --job NAME`` on each
machine, or ``run_job`` from Python) is given the same items. The first run
creates the job: its fingerprint (the input's sha256 with the options that
shape the messages), its options and its chunks (index ranges, ``chunk_size``
items each) in a Redis stream with one consumer group; every run then takes
chunks from the group (``XREADGROUP``) and sends their items. The stream
carries ranges, never message data.

Crash safety, as the file journal defines it:

* an item's start is recorded (a bit in the ``started`` bitmap) before its
  first attempt, a group at a time (up to the run's concurrency, at most 32 and
  50 ms of the rate: one round trip, and with ``appendfsync always`` one fsync,
  right before the group's first item is handed out); its outcome when known
  (a bit in ``settled``, details only when not SENT, the message UUID packed
  per chunk), written within ``OUTCOME_WINDOW`` together with the other
  outcomes, take-backs and chunk acknowledgements of that moment (one Lua call);
  an item of a started group that a stop keeps from its send has its start
  taken back (it certainly was not sent);
* the idempotency key of an item is derived from the job's nonce and the
  item's index (a UUID5; or the row's own key): one key per item for the
  whole job, so nothing in doubt is ever resent under a new key, and no key
  needs to be stored;
* a run that dies leaves its chunks pending in the group; after
  ``claim_timeout`` seconds without a refresh another run takes them over
  (``XAUTOCLAIM``); live runs refresh their chunks (``XCLAIM ... JUSTID``) a few
  times per timeout. Items started with no outcome are in doubt: reported
  unknown, never resent, unless ``resend_unknown`` (same key);
* finished chunks are acknowledged and deleted (``XACK``, ``XDEL``);
* a stop (refused credentials) or a cancel is a job-level state every run
  watches: nothing new starts anywhere, sends in flight finish.

Durability: a start record must survive a Redis crash, or a later run would
take the item for a fresh one. ``run_job`` refuses a Redis without
``appendonly yes`` and ``appendfsync always`` unless ``accept_redis_loss``.
Every start group also bumps a generation counter in the job's meta; a run
that finds it lower than the last value it saw knows Redis went backwards
(lost writes: a restart without fsync, a failover) and marks every item not
settled of every pending chunk as in doubt.

Keys (``J`` is the job name; the braces keep every key of a job in one
cluster slot); each expires ``ttl`` seconds after the job's last activity::

    botmsg:job:{J}:meta      hash    fingerprint, options, items, chunk, chunks, done,
                                     nonce, gen, state, stopped_by, stop_id, counts, t0, ttl
    botmsg:job:{J}:chunks    stream  one entry per chunk {a: first index, b: end}
                                     (group "workers"); acknowledged entries are deleted
    botmsg:job:{J}:started   string  bitmap, one bit per item: start recorded
    botmsg:job:{J}:settled   string  bitmap, one bit per item: outcome recorded
    botmsg:job:{J}:details   hash    index -> outcome code + JSON, only for items not SENT
    botmsg:job:{J}:m         hash    chunk number -> message UUIDs, 16 bytes per item
    botmsg:job:{J}:workers   hash    consumer -> last heartbeat (ms, Redis clock)
    botmsg:job:{J}:writes    hash    consumer -> id and reply of its last write (once only)
    botmsg:job:{J}:events    channel "end" (last chunk done), "stop", "chunks" (put back)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar, cast, overload

from attrs import astuple, define, field
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._batch import BatchOptions, BatchStream
from ._client import BotMessageClient
from ._errors import (
    APIStatusError,
    BotMessageError,
    InvalidRequestError,
    InvalidResponseError,
    NotAttemptedError,
)
from ._limits import PauseOnly, RateLimiter
from ._models import Outcome, SendRequest, SendResult, TextMessage
from ._report import Counts, ItemResult
from ._retry import RetryPolicy
from .journal import settle
from .shared import RedisRateLimiter, client_from_url

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CLAIM_TIMEOUT",
    "DEFAULT_TTL",
    "REPORT_PAGE_SIZE",
    "JobError",
    "JobItemResult",
    "JobReport",
    "JobStatus",
    "cancel_job",
    "check_durability",
    "iter_job_results",
    "job_fingerprint",
    "job_results",
    "job_status",
    "run_job",
    "run_job_async",
]

#: Items per chunk (one stream entry, one round trip to take it).
DEFAULT_CHUNK_SIZE: Final = 256
#: Seconds a chunk may go without its run's refresh before another run takes it over.
DEFAULT_CLAIM_TIMEOUT: Final = 30.0
#: Items per page of a report (``iter_job_results``): ~256 KiB of packed UUIDs per read.
REPORT_PAGE_SIZE: Final = 16384
#: Seconds a job's keys live after its last activity (7 days).
DEFAULT_TTL: Final = 7 * 24 * 3600
#: The options a run may choose on its own: the rest must match the job's.
PER_RUN_OPTIONS: Final = frozenset({"workers", "concurrency"})

#: Most items a job can have: a Redis bitmap (``started``, ``settled``) holds 2**32 bits.
_MAX_ITEMS: Final = 2**32
#: Longest ``ttl`` and ``claim_timeout`` (seconds): a century. Far longer ones fail in
#: Redis (EXPIRE, XAUTOCLAIM take 64-bit milliseconds), the create script half-way.
_MAX_SECONDS: Final = 100 * 365 * 86400
_T = TypeVar("_T")
_GROUP: Final = "workers"
_LAYOUT: Final = "1"
#: Why an item found started with no outcome is unknown.
DIED_NOTE: Final = (
    "in flight when the run sending it stopped or died: it may or may not have been "
    "delivered (--resend-unknown sends it again with the same idempotency key)"
)
#: Why an item of a complete job was never started: no run was given it (``None`` among
#: the items: an invalid input row).
NOT_IN_JOB_NOTE: Final = "invalid input row"
#: Why a valid item of a complete job was never started (its records lost: its start
#: taken back after its chunk was finished, a key flushed...): certainly not sent.
NOT_SENT_NOTE: Final = "not attempted: no run sent it (the job is complete)"
#: Why an item is unknown after Redis lost records.
REWOUND_NOTE: Final = (
    "Redis lost recent records of the job (restarted without fsync, or failed over): this "
    "item may have been started: it may or may not have been delivered"
)

_CODES: Final = {"sent": "s", "failed": "f", "unknown": "u", "skipped": "k"}
_OUTCOMES: Final = {v: k for k, v in _CODES.items()}


class JobError(BotMessageError):
    """The job cannot be run: another input or options under its name, Redis unusable...

    Attributes:
        may_have_sent: True when it came after this run handed messages to the
            service (Redis failed mid-run, or refused to record outcomes): some may
            have been delivered, their outcomes not all on record. False when this
            run sent nothing.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.may_have_sent = False


# -- Lua ----------------------------------------------------------------------------

# KEYS: meta, stream, started, settled, details, m, workers. ARGV: fingerprint,
# options JSON, items, chunk size, nonce, ttl (s), group. Creates the job and its
# chunks at once (one script: no run sees half a job), or returns the existing one's.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HMGET', KEYS[1], 'fingerprint', 'options', 'items', 'chunk', 'nonce',
    'state', 'v')}
end
local items, chunk, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local n = 0
for a = 0, items - 1, chunk do
  redis.call('XADD', KEYS[2], '*', 'a', a, 'b', math.min(a + chunk, items))
  n = n + 1
end
if n == 0 then redis.call('XADD', KEYS[2], '*', 'a', 0, 'b', 0); n = 1 end
redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[7], '0')
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'v', '1', 'fingerprint', ARGV[1], 'options', ARGV[2],
  'items', items, 'chunk', chunk, 'chunks', n, 'done', 0, 'nonce', ARGV[5], 'gen', 0,
  'state', 'running', 'created', t[1], 'ttl', ttl, 'ns', 0, 'nf', 0, 'nu', 0, 'nk', 0)
redis.call('SETBIT', KEYS[3], math.max(items - 1, 0), 0)
redis.call('SETBIT', KEYS[4], math.max(items - 1, 0), 0)
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
return {1}
"""

# KEYS: meta, started, settled, details, m, stream, writes. ARGV: the generation this
# run last saw, chunk size, group, consumer, channel, this write's id (new for each
# write of the run), then four lists, each its length first: outcomes (index, code,
# packed message UUID or '', detail or '': 4 values each), releases (indices this run
# started and certainly never attempted: their start is taken back), acknowledgements
# (stream entries of chunks finished by these outcomes), starts (indices). Everything
# one run has to write at a moment, in one round trip (and one fsync): outcomes
# first, so a refused start loses none.
# An outcome never replaces a recorded one, except that a known one replaces an
# unknown (a run taken for dead that finished its send after all). A chunk is
# acknowledged (XACK, XDEL) only if this run still owns it. When the last chunk is
# done, the job's channel hears "end". Reply {status, gen, refused...}: status 1
# started (refused: already started by another run, not to be sent here); 0 no
# start asked; -1 the job is not running (nothing started); -2 the generation went
# backwards (nothing started); -3 the job is gone (its meta lost in a restart, flushed,
# expired): nothing written, as each write would leave a key with no TTL for ever (the
# meta among them, which no run could then join again).
# Once only: the reply is kept under the run's consumer in KEYS[7], and a write run
# again with the same id (redis-py or ``_patiently`` trying again after the reply was
# lost) returns it unchanged; run twice, its starts would come back refused, and
# items never sent would be left started with no outcome (reported unknown).
_WRITE = """
local wid = ARGV[6]
local seen = redis.call('HGET', KEYS[7], ARGV[4])
if seen and string.sub(seen, 1, #wid + 1) == wid .. ' ' then
  return cjson.decode(string.sub(seen, #wid + 2))
end
local function write()
if not tonumber(redis.call('HGET', KEYS[1], 'ttl') or '') then return {-3, 0} end
local chunk = tonumber(ARGV[2])
local p = 7
local no = tonumber(ARGV[p]); local o0 = p + 1; p = o0 + no * 4
local nr = tonumber(ARGV[p]); local r0 = p + 1; p = r0 + nr
local na = tonumber(ARGV[p]); local a0 = p + 1; p = a0 + na
local ns = tonumber(ARGV[p]); local s0 = p + 1
if no > 0 then
  local counts, blobs = {}, {}
  for i = o0, o0 + no * 4 - 1, 4 do
    local ix, code, mu, detail = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local write, replace = true, false
    if redis.call('SETBIT', KEYS[3], ix, 1) == 1 then
      local old = redis.call('HGET', KEYS[4], ix)
      if code ~= 'u' and old and string.sub(old, 1, 1) == 'u' then
        counts['u'] = (counts['u'] or 0) - 1
        replace = true
      else
        write = false
      end
    end
    if write then
      counts[code] = (counts[code] or 0) + 1
      if detail ~= '' then redis.call('HSET', KEYS[4], ix, detail)
      elseif replace then redis.call('HDEL', KEYS[4], ix) end
      if mu ~= '' then
        local n = tonumber(ix)
        local c = math.floor(n / chunk)
        local off = (n % chunk) * 16
        local v = blobs[c] or redis.call('HGET', KEYS[5], c) or ''
        if #v < off then v = v .. string.rep('\\0', off - #v) end
        blobs[c] = string.sub(v, 1, off) .. mu .. string.sub(v, off + 17)
      end
    end
  end
  for code, n in pairs(counts) do redis.call('HINCRBY', KEYS[1], 'n' .. code, n) end
  for c, v in pairs(blobs) do redis.call('HSET', KEYS[5], c, v) end
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl'))
  redis.call('EXPIRE', KEYS[4], ttl)
  redis.call('EXPIRE', KEYS[5], ttl)
end
for i = r0, r0 + nr - 1 do
  if redis.call('GETBIT', KEYS[3], ARGV[i]) == 0 then redis.call('SETBIT', KEYS[2], ARGV[i], 0) end
end
local acked = 0
for i = a0, a0 + na - 1 do
  local pe = redis.call('XPENDING', KEYS[6], ARGV[3], ARGV[i], ARGV[i], 1)
  if #pe == 1 and pe[1][2] == ARGV[4] then
    redis.call('XACK', KEYS[6], ARGV[3], ARGV[i])
    redis.call('XDEL', KEYS[6], ARGV[i])
    acked = acked + 1
  end
end
if acked > 0 then
  local done = redis.call('HINCRBY', KEYS[1], 'done', acked)
  if done >= tonumber(redis.call('HGET', KEYS[1], 'chunks')) then
    redis.call('PUBLISH', ARGV[5], 'end')
  end
end
if ns == 0 then return {0, 0} end
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= 'running' then return {-1, 0} end
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen'))
if gen < tonumber(ARGV[1]) then return {-2, gen} end
local reply = {1, 0}
for i = s0, s0 + ns - 1 do
  if redis.call('SETBIT', KEYS[2], ARGV[i], 1) == 1 then reply[#reply + 1] = tonumber(ARGV[i]) end
end
reply[2] = redis.call('HINCRBY', KEYS[1], 'gen', 1)
if redis.call('HEXISTS', KEYS[1], 't0') == 0 then
  redis.call('HSET', KEYS[1], 't0', redis.call('TIME')[1])
end
return reply
end
local reply = write()
redis.call('HSET', KEYS[7], ARGV[4], wid .. ' ' .. cjson.encode(reply))
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl') or '0') or 0
redis.call('EXPIRE', KEYS[7], ttl > 0 and ttl or 86400)
return reply
"""

# KEYS: stream, meta, workers, started, settled, details, m. ARGV: group, consumer,
# then the chunks this run left to others (their entries). Refreshes the idle time of
# this run's own chunks (never another's, nor one it left: that one goes idle, to be
# taken over), records the heartbeat, keeps the job's keys alive. Reply: {state,
# stopped_by, ids...}.
_REFRESH = """
local ttl = tonumber(redis.call('HGET', KEYS[2], 'ttl') or '0')
if ttl == 0 then return {false, false} end
local left = {}
for i = 3, #ARGV do left[ARGV[i]] = true end
local mine = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])
local reply = redis.call('HMGET', KEYS[2], 'state', 'stopped_by')
for _, e in ipairs(mine) do
  if not left[e[1]] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, e[1], 'JUSTID')
    reply[#reply + 1] = e[1]
  end
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[3], ARGV[2], t[1] * 1000 + math.floor(t[2] / 1000))
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
return reply
"""

# KEYS: stream, started, settled. ARGV: group. After Redis went backwards: every
# item not settled of every pending chunk is marked started (in doubt).
_IN_DOUBT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 100000)
local marked = 0
for _, e in ipairs(pending) do
  local entry = redis.call('XRANGE', KEYS[1], e[1], e[1])
  if #entry == 1 then
    local f = entry[1][2]
    local a, b = tonumber(f[2]), tonumber(f[4])
    for ix = a, b - 1 do
      if redis.call('GETBIT', KEYS[3], ix) == 0 then
        redis.call('SETBIT', KEYS[2], ix, 1)
        marked = marked + 1
      end
    end
  end
end
return marked
"""

# KEYS: meta, stream, details. ARGV: the job's channel. For --resend-unknown on a
# complete job: puts the chunks that hold items recorded unknown back in the stream
# (once per completion: the job is then not complete, so a second run's call adds
# nothing); runs waiting for others hear of them. Reply: how many.
_REOPEN = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
local f = redis.call('HMGET', KEYS[1], 'done', 'chunks', 'items', 'chunk')
local done, chunks, items, chunk = tonumber(f[1]), tonumber(f[2]), tonumber(f[3]), tonumber(f[4])
if done < chunks then return 0 end
local found, list = {}, {}
local details = redis.call('HGETALL', KEYS[3])
for i = 1, #details, 2 do
  if string.sub(details[i + 1], 1, 1) == 'u' then
    local c = math.floor(tonumber(details[i]) / chunk)
    if not found[c] then found[c] = true; list[#list + 1] = c end
  end
end
table.sort(list)
for _, c in ipairs(list) do
  redis.call('XADD', KEYS[2], '*', 'a', c * chunk, 'b', math.min((c + 1) * chunk, items))
end
if #list > 0 then
  redis.call('HINCRBY', KEYS[1], 'chunks', #list)
  redis.call('PUBLISH', ARGV[1], 'chunks')
end
return #list
"""

# KEYS: meta. ARGV: new state, why, the job's channel, this stop's id. running ->
# stopped/cancelled, once; the runs waiting for others hear it at once. Reply 1 when
# this stop ended the run of the job, also when run again after its reply was lost
# (the stop's id is kept).
_STOP = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  if redis.call('HGET', KEYS[1], 'stop_id') == ARGV[4] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'stopped_by', ARGV[2], 'stop_id', ARGV[4])
redis.call('PUBLISH', ARGV[3], 'stop')
return 1
"""


#: Seconds a run waits for Redis to come back (a restart) before it gives up.
REDIS_WAIT: Final = 60.0
#: Most seconds one command waits for Redis's reply (and a connection for Redis to
#: accept it), on the clients a URL makes: a Redis that went silent (a network cut,
#: a frozen host) fails the command, which ``REDIS_WAIT`` then tries again, instead of
#: hanging the run for ever. Set here, not left to redis-py: before 8.0 it waits for
#: ever, 8.x gives up after 5 s. Far above any command of a job's (each touches one
#: chunk or one page).
REDIS_SOCKET_TIMEOUT: Final = 10.0
REDIS_CONNECT_TIMEOUT: Final = 5.0
#: Most seconds the listener waits for a message before it listens again (under
#: ``REDIS_SOCKET_TIMEOUT``, so that silence on the channel is no error).
LISTEN_WAIT: Final = 5.0
#: Most seconds an outcome waits to share its round trip (and fsync) with others, unless
#: a start group goes first: what a run that dies loses of its known outcomes at most.
OUTCOME_WINDOW: Final = 0.02
#: Most items one start record covers (one round trip): a run that dies leaves at most
#: this many started and not yet attempted, besides its sends in flight, unknown.
MAX_START_GROUP: Final = 32
#: With a rate, a start group is at most this many seconds of it (its items wait for
#: their slots after their start record; a smaller group keeps that wait short).
START_GROUP_TIME: Final = 0.05
#: Most seconds a run with no chunk left waits between looks for chunks idle too long
#: (the job's end, a stop or chunks put back wake it at once, by pub/sub).
IDLE_POLL: Final = 1.0


def _start_group_size(
    concurrency: int, rate: float | None, per_department_rate: float | None
) -> int:
    """Items per start group: the sends a run keeps in flight, bounded by
    ``MAX_START_GROUP`` and by ``START_GROUP_TIME`` seconds of each rate."""
    size = min(concurrency, MAX_START_GROUP)
    for r in (rate, per_department_rate):
        if r is not None:
            size = min(size, int(r * START_GROUP_TIME))
    return max(1, size)


async def _patiently(call: Callable[[], Awaitable[_T]]) -> _T:
    """``call()``, tried again while Redis is unreachable or loading (a restart), up to
    ``REDIS_WAIT`` seconds; then its error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REDIS_WAIT
    delay = 0.05
    while True:
        try:
            return await call()
        except (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError):
            if loop.time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)


def _honour_cancel() -> None:
    """Raise ``CancelledError`` if this task was asked to stop.

    For the run's background loops (heartbeat, listener), which outlive Redis
    errors: a cancel that lands inside a Redis command can be lost (redis-py
    writes each command under ``asyncio.wait_for``, which on Python 3.11 returns
    the result and drops the cancel when both come at once) or come out as a
    ``RedisError``/``OSError``. Such a loop would go on forever, and the run,
    which awaits its end after cancelling it, would never end. A requested
    cancel stays counted (``Task.cancelling``) however it was lost.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Keys:
    """The names of one job's keys."""

    def __init__(self, job: str) -> None:
        prefix = f"botmsg:job:{{{job}}}:"
        self.meta = prefix + "meta"
        self.stream = prefix + "chunks"
        self.started = prefix + "started"
        self.settled = prefix + "settled"
        self.details = prefix + "details"
        self.m = prefix + "m"
        self.workers = prefix + "workers"
        #: consumer -> id and reply of its last ``_WRITE`` (run again: the same reply).
        self.writes = prefix + "writes"
        #: Pub/sub channel: "end" (last chunk done), "stop", "chunks" (chunks put back).
        self.events = prefix + "events"

    def all(self) -> list[str]:
        return [
            self.stream,
            self.meta,
            self.workers,
            self.started,
            self.settled,
            self.details,
            self.m,
            self.writes,
        ]


def _check_name(job: object) -> str:
    if not isinstance(job, str) or not job or len(job) > 200 or any(c in job for c in "{}\n"):
        raise InvalidRequestError("job", job, "must be 1-200 characters without braces or newlines")
    return job


def _connect(redis: str | Redis) -> tuple[Redis, bool]:
    if isinstance(redis, Redis):
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            # The job's records are binary (bitmaps, packed UUIDs) and read as bytes: such
            # a client turns them into text or fails to (a chunk misread, a report broken).
            raise InvalidRequestError(
                "redis",
                "Redis(decode_responses=True)",
                "must return bytes: pass a client "
                "made with decode_responses=False (the default), or a URL",
            )
        return redis, False
    make = functools.partial(
        Redis.from_url,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
    )
    return client_from_url(redis, make), True


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _int(value: object, default: int = 0) -> int:
    """A Redis integer field, or ``default`` when it holds anything else.

    Redis integers are 64-bit: a longer number is not one a run wrote, and would
    overflow the float arithmetic of a status (rates, ages).
    """
    text = _text(value)
    try:
        number = int(text) if text is not None else default
    except ValueError:
        return default
    return number if -(2**63) <= number < 2**63 else default


def _redis_failed(what: str, exc: BaseException) -> JobError:
    return JobError(f"Redis: cannot {what}: {type(exc).__name__}: {exc}")


async def check_durability(redis: Redis) -> str | None:
    """Why Redis could lose a start record it acknowledged; None when it cannot.

    Asks ``CONFIG GET appendonly`` and ``appendfsync``: only an AOF fsynced on
    every write keeps what it acknowledged through a crash of the server or
    the machine; and ``maxmemory-policy``: a Redis that evicts keys at its
    memory limit may drop a job's keys (they all have a TTL, so the
    ``volatile-*`` policies too) as if they were never written.
    """
    try:
        config = await redis.config_get("append*")
        config.update(await redis.config_get("maxmemory*"))
    except ResponseError as exc:  # CONFIG renamed or forbidden (managed Redis)
        return f"its configuration cannot be read ({exc}), so its durability is not known"
    values = {_text(k): _text(v) for k, v in config.items()}
    if values.get("appendonly") != "yes":
        return "appendonly is not 'yes': a restart loses every record since the last snapshot"
    if values.get("appendfsync") != "always":
        return (
            f"appendfsync is {values.get('appendfsync')!r}, not 'always': a crash of Redis's "
            "machine can lose the last second of records"
        )
    if values.get("maxmemory") != "0" and values.get("maxmemory-policy") != "noeviction":
        return (
            f"maxmemory-policy is {values.get('maxmemory-policy')!r} with a maxmemory: at its "
            "memory limit Redis evicts keys, a job's start records among them "
            "(set maxmemory-policy noeviction)"
        )
    return None


# -- items --------------------------------------------------------------------------


def _message_json(message: str | TextMessage) -> Any:
    # Its fields' values in order (a JSON array).
    return message if isinstance(message, str) else astuple(message)


def job_fingerprint(items: Sequence[SendRequest | None]) -> str:
    """The sha256 of a job's items (departments, users, messages, own keys), as hex.

    ``None`` stands for an item that is not sent (an invalid input row).
    """
    digest = hashlib.sha256()
    for item in items:
        if item is None:
            digest.update(b"null\n")
            continue
        record = [
            str(item.department_uuid),
            str(item.user_uuid),
            _message_json(item.message),
            item.idempotency_key,
        ]
        digest.update(json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()


def _key_of(nonce: uuid.UUID, index: int, item: SendRequest) -> str:
    """The item's idempotency key for the whole job: its own, else derived from its index."""
    return item.idempotency_key or str(uuid.uuid5(nonce, str(index)))


@define(frozen=True, slots=True)
class JobItemResult:
    """One item of a job's report (``job_results``), as ``send-many --out`` writes it.

    Attributes:
        index: The item's index in the input.
        outcome: ``"sent"``, ``"failed"``, ``"unknown"`` or ``"skipped"``.
        message_uuid: The service's id of the message, when sent.
        error: ``{"type", "message", "status"}`` when not sent, else None.
        key: The item's idempotency key (None for an item never attempted).
    """

    index: int
    outcome: str
    message_uuid: str | None
    error: dict[str, Any] | None
    key: str | None


@define(frozen=True, slots=True)
class JobStatus:
    """A job's progress, read from Redis (``job_status``).

    Attributes:
        name: The job.
        state: ``"running"``, ``"cancelled"``, ``"stopped"`` or ``"missing"``.
        items: Items in the job.
        counts: Items with a recorded outcome, by outcome.
        in_flight: Items started with no outcome yet (in doubt if their run died).
        chunks: Chunks in all; ``done``: of them, finished.
        workers_alive: Runs seen within the claim timeout.
        elapsed: Seconds since the job's first start (0 before).
        rate: Outcomes per second since the first start.
        eta: Seconds left at that rate (None when unknown).
        stopped_by: Why the job stopped or was cancelled.
        rewound: Whether a run found that Redis lost records of the job.
        fingerprint: The input's fingerprint recorded when the job was created.
        options: The options recorded with the job (``{}`` when unreadable).
    """

    name: str
    state: str
    items: int
    counts: Counts
    in_flight: int
    chunks: int
    done: int
    workers_alive: int
    elapsed: float
    rate: float
    eta: float | None
    stopped_by: str | None
    rewound: bool
    fingerprint: str | None = None
    options: Mapping[str, Any] = field(factory=dict)

    @property
    def complete(self) -> bool:
        """Every chunk finished."""
        return self.state != "missing" and self.done >= self.chunks


@define(slots=True)
class JobReport:
    """What ``run_job`` came to.

    Attributes:
        job: The job's status when this run ended (counts over the whole job).
        counts: This run's own items, by outcome.
        created: Whether this run created the job.
        stopped_by: Why the job stopped (refused credentials...), if it did.
    """

    job: JobStatus
    counts: Counts
    created: bool
    stopped_by: str | None


# -- one run -----------------------------------------------------------------------


class _NotStartedError(JobError, NotAttemptedError):
    """Raised, before any attempt, for an item this run will not start.

    Not a ``ClientClosedError``: that would stop this run's whole batch, when
    only this item is not to be sent here (another run started it, the job is
    stopping, or its start may have been lost). A ``NotAttemptedError``: it does
    not count toward the batch's consecutive-failure breaker (after a rewind, or a
    chunk another run also holds, a whole chunk of them could otherwise trip it and
    stop the job)."""


@define(slots=True)
class _Chunk:
    entry: str
    first: int
    end: int
    open: set[int] = field(factory=set)
    produced: bool = False
    abandoned: bool = False  # or acknowledged: either way, not to be acknowledged (again)


@define(slots=True)
class _Pending:
    index: int
    key: str
    chunk: _Chunk
    in_doubt: bool
    started: bool = False  # its start is on record (by this run's group, or earlier)
    attempted: bool = False  # handed to the client: from here on it may be delivered


@define(slots=True)
class _Record:
    index: int
    code: str
    packed: bytes
    detail: str


class _Run:
    """One run of a job: takes chunks, records starts and outcomes, sends."""

    def __init__(
        self,
        redis: Redis,
        job: str,
        items: Sequence[SendRequest | None],
        *,
        client: BotMessageClient,
        limiter: RateLimiter | None,
        concurrency: int,
        retry: RetryPolicy | None,
        resend_unknown: bool,
        claim_timeout: float,
        on_result: Callable[[JobItemResult], object] | None,
    ) -> None:
        self.redis = redis
        self.job = job
        self.keys = _Keys(job)
        self.items = items
        self.client = client
        self.limiter = limiter
        self.concurrency = concurrency
        self.retry = retry
        self.resend_unknown = resend_unknown
        self.claim_timeout = claim_timeout
        self.on_result = on_result
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.nonce = uuid.UUID(int=0)
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.gen = 0
        self.stopping = False
        self.stopped_by: str | None = None
        self.rewound = False
        self.reopened = False  # --resend-unknown: this run put unknown items back once
        self.stop_event = asyncio.Event()
        self.wake = asyncio.Event()  # a chunk acknowledged, or a stop
        self.tasks: set[asyncio.Future[Any]] = set()
        self.pending: dict[int, _Pending] = {}  # stream index -> item
        #: Entries of the chunks this run left unfinished (``_not_attempted``): no longer
        #: refreshed, so that after ``claim_timeout`` a run (this one too) takes them over.
        self.left: set[str] = set()
        #: Entries of the chunks this run took and has not acknowledged yet.
        self.held: set[str] = set()
        self.by_key: dict[str, _Pending] = {}
        self.pulled = 0
        #: Items started per round trip (see ``start_group_size``).
        self.group_size = 16
        #: Id of this run's last write to Redis (``_WRITE`` runs once per id).
        self.write_id = 0
        # What the writer (one round trip for all of it) has to put in Redis.
        self.outbox: list[_Record] = []
        self.waiting_outcomes: list[_Pending] = []
        self.releases: list[int] = []
        self.to_ack: list[_Chunk] = []
        self.start_request: tuple[list[int], asyncio.Future[tuple[int, int, set[int]]]] | None
        self.start_request = None
        self.hurry = asyncio.Event()  # write now: a start waits, or the run drains
        self.writer: asyncio.Task[None] | None = None
        self.listener: asyncio.Task[None] | None = None
        self.counts = dict.fromkeys(_CODES.values(), 0)
        self.stream: BatchStream | None = None
        #: Why this run could not record what it must (outcomes...): it stops and raises it.
        self.failure: JobError | None = None
        self._write = redis.register_script(_WRITE)
        self._refresh = redis.register_script(_REFRESH)
        self._in_doubt = redis.register_script(_IN_DOUBT)
        self._stop = redis.register_script(_STOP)
        self._reopen = redis.register_script(_REOPEN)

    # -- the job's state ------------------------------------------------------------

    def stop(self, why: str | None = None) -> None:
        """Start nothing new in this run (sends in flight finish)."""
        self.stopping = True
        if why is not None and self.stopped_by is None:
            self.stopped_by = why
        self.stop_event.set()
        self.wake.set()

    def fail(self, error: JobError) -> None:
        """Stop this run: it cannot record what it must; ``run_job_async`` raises ``error``."""
        if self.failure is None:
            self.failure = error
        self.stop(error.message)

    async def stop_job(self, state: str, why: str) -> None:
        """Stop the whole job: every run sees it at its next start group or refresh."""
        await self._stop(
            keys=[self.keys.meta], args=[state, why, self.keys.events, uuid.uuid4().hex]
        )
        self.stop(why)

    async def heartbeat(self) -> None:
        """Refresh this run's chunks and the job's TTL; watch the job's state."""
        while True:
            _honour_cancel()
            try:
                reply = await self._refresh(
                    keys=self.keys.all(), args=[_GROUP, self.consumer, *self.left]
                )
                state = _text(reply[0]) if reply else None
                if state != "running":
                    why = _text(reply[1]) if reply and len(reply) > 1 else None
                    self.stop(why or f"the job is {state or 'gone from Redis'}")
            except (RedisError, OSError):
                _honour_cancel()  # a cancel redis-py turned into its error is no outage
                # Otherwise the next beat tries again; the chunk stays ours until the timeout.
            await asyncio.sleep(self.claim_timeout / 4)

    # -- chunks -----------------------------------------------------------------------

    async def _chunk_bits(self, first: int, end: int) -> tuple[bytes, bytes]:
        lo, hi = first // 8, max(first, end - 1) // 8
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.getrange(self.keys.started, lo, hi)
            pipe.getrange(self.keys.settled, lo, hi)
            started, settled = await pipe.execute()
        return bytes(started), bytes(settled)

    async def next_chunk(self) -> _Chunk | None:
        """A dead run's chunk, else a new one; None when the job has none left for us."""
        idle_ms = int(self.claim_timeout * 1000)
        while not self.stopping:
            entries: Any = await self._lost_chunk()
            if not entries:
                claimed: Any = await _patiently(
                    lambda: self.redis.xautoclaim(
                        self.keys.stream, _GROUP, self.consumer, idle_ms, "0-0", count=1
                    )
                )
                entries = claimed[1] if claimed else []
            if not entries:
                read: Any = await _patiently(
                    lambda: self.redis.xreadgroup(
                        _GROUP, self.consumer, {self.keys.stream: ">"}, count=1
                    )
                )
                entries = read[0][1] if read else []
            for entry_id, fields in entries:
                if fields is None:
                    continue
                first = _int(fields.get(b"a"), -1)  # -1: not a number (corrupt)
                end = _int(fields.get(b"b"), -1)
                entry = _text(entry_id) or ""
                self.left.discard(entry)  # taken (back): ours to refresh again
                if not 0 <= first <= end <= len(self.items):
                    # Not a range a run wrote (corrupt): which items it meant is unknown,
                    # and walking it could take for ever. This run stops; the entry stays.
                    self.fail(JobError(f"the job's chunk {entry} in Redis is corrupt"))
                    return None
                self.held.add(entry)
                return _Chunk(entry, first, end)
            meta = await _patiently(
                lambda: self.redis.hmget(self.keys.meta, "done", "chunks", "state")
            )
            if _text(meta[2]) != "running":
                self.stop(None)
                return None
            if _int(meta[0]) >= _int(meta[1]):
                if not self.resend_unknown or self.reopened:
                    return None
                # Complete, with items perhaps left unknown: their chunks go back in
                # the stream, where this run (and any other) takes them as above.
                self.reopened = True
                await _patiently(
                    functools.partial(
                        self._reopen,
                        keys=[self.keys.meta, self.keys.stream, self.keys.details],
                        args=[self.keys.events],
                    )
                )
                continue
            if self.listener is None:
                # Hear the job's end (or stop, or chunks put back) the moment it happens;
                # subscribed before looking again, so an end in between is not missed.
                subscribed = asyncio.Event()
                self.listener = asyncio.ensure_future(self._listen(subscribed))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(subscribed.wait(), 1.0)
                continue
            # Other runs hold the rest: wait for them to finish or to be taken for dead
            # (the timeout: to look for chunks idle too long).
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), min(IDLE_POLL, self.claim_timeout / 4))
        return None

    async def _lost_chunk(self) -> list[Any]:
        """A chunk the group gave this run whose reply was lost: ``[(entry, fields)]``, or [].

        ``XREADGROUP`` and ``XAUTOCLAIM`` run again after a lost reply (by redis-py,
        or ``_patiently``) hand out the next entry: the first stays pending under this
        run, which never heard of it and whose heartbeat keeps it fresh, so no run
        would ever take it over, and every run would wait for it. It is this run's
        own pending entry that it neither holds nor left to others.
        """
        known = self.held | self.left
        pending: Any = await _patiently(
            lambda: self.redis.xpending_range(
                self.keys.stream, _GROUP, "-", "+", len(known) + 1, consumername=self.consumer
            )
        )
        for row in pending:
            entry = _text(row.get("message_id")) or ""
            if entry and entry not in known:
                found: Any = await _patiently(
                    functools.partial(self.redis.xrange, self.keys.stream, entry, entry, count=1)
                )
                if found:
                    return list(found)
        return []

    async def _listen(self, subscribed: asyncio.Event) -> None:
        """Wake the run on each message of the job's channel (end, stop, chunks put back)."""
        while True:
            _honour_cancel()
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.events)
                subscribed.set()
                while True:
                    _honour_cancel()
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=LISTEN_WAIT
                    )
                    if message is not None:
                        self.wake.set()
            except (RedisError, OSError):
                _honour_cancel()  # a cancel redis-py turned into its error is no outage
                subscribed.set()  # Redis away: the poll goes on; listen again in a moment
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(0.5)

    async def requests(self) -> AsyncIterator[SendRequest]:
        """The batch's items: each chunk's, those with no outcome yet.

        Starts are recorded a group at a time (``group_size`` items, one round
        trip) right before the group's first item is handed to the batch; an
        item of the group that this run then never attempts (a stop) has its
        start taken back, as it certainly was not sent.
        """
        while not self.stopping:
            chunk = await self.next_chunk()
            if chunk is None:
                return
            started, settled = await _patiently(
                functools.partial(self._chunk_bits, chunk.first, chunk.end)
            )
            base = (chunk.first // 8) * 8
            recorded_unknown = await self._recorded_unknown(chunk, settled, base)
            todo: list[tuple[_Pending, SendRequest]] = []
            for index in range(chunk.first, chunk.end):
                item = self.items[index] if index < len(self.items) else None
                if item is None:
                    continue
                bit = index - base
                byte, mask = bit // 8, 0x80 >> (bit % 8)
                if byte < len(settled) and settled[byte] & mask:
                    if index not in recorded_unknown:
                        continue
                    in_doubt = True  # recorded unknown: resent (--resend-unknown), same key
                else:
                    in_doubt = byte < len(started) and bool(started[byte] & mask)
                key = _key_of(self.nonce, index, item)
                # An item in doubt is resent (--resend-unknown) under its only key, with
                # no new start record: its start is on record already.
                meta = _Pending(index, key, chunk, in_doubt, started=in_doubt)
                chunk.open.add(index)
                if in_doubt and not self.resend_unknown:
                    self._record(meta, "unknown", None, DIED_NOTE, "DeliveryUnknownError", None)
                    continue
                todo.append((meta, item))
            for at in range(0, len(todo), self.group_size):
                group = todo[at : at + self.group_size]
                if self.stopping:
                    verdicts = dict.fromkeys((meta.index for meta, _ in group), "stopped")
                else:
                    verdicts = await self._start_group(
                        [meta.index for meta, _ in group if not meta.started]
                    )
                for meta, item in group:
                    verdict = verdicts.get(meta.index, "ok")
                    if verdict == "ok":
                        meta.started = True  # on record: from here, a stop takes it back
                        if self.stopping:
                            verdict = "stopped"
                    if verdict == "taken":
                        # Another run started it since this one read the chunk (it held the
                        # chunk before, its start landing late): its outcome is that run's
                        # to record, or its start taken back (never attempted). Either way
                        # not this run's to count finished: the chunk is left unacknowledged,
                        # taken over again after the claim timeout, where the item is found
                        # settled, in doubt (started, no outcome), or free to send.
                        self._leave(chunk, meta.index)
                        continue
                    if verdict == "rewound":
                        self._record(
                            meta, "unknown", None, REWOUND_NOTE, "DeliveryUnknownError", None
                        )
                        continue
                    if verdict != "ok":
                        self._not_attempted(meta)
                        continue
                    self.pending[self.pulled] = meta
                    self.by_key[meta.key] = meta
                    self.pulled += 1
                    yield SendRequest(
                        item.department_uuid, item.user_uuid, item.message, idempotency_key=meta.key
                    )
            chunk.produced = True
            self._maybe_ack(chunk)

    def _not_attempted(self, meta: _Pending) -> None:
        """``meta`` will not be attempted by this run: take its start back if it was this
        run's; its chunk is not finished here (another run takes it over)."""
        if meta.started and not meta.in_doubt:
            self.releases.append(meta.index)
            self._kick()
        self._leave(meta.chunk, meta.index)

    def _leave(self, chunk: _Chunk, index: int) -> None:
        """``index`` is not finished by this run: nor is ``chunk``, which is left unacknowledged
        and no longer refreshed (after ``claim_timeout`` a run, this one too, takes it over)."""
        chunk.open.discard(index)
        chunk.abandoned = True
        self.left.add(chunk.entry)

    async def _recorded_unknown(self, chunk: _Chunk, settled: bytes, base: int) -> set[int]:
        """With --resend-unknown: the chunk's items whose recorded outcome is unknown."""
        if not self.resend_unknown:
            return set()
        done = [
            index
            for index in range(chunk.first, chunk.end)
            if (index - base) // 8 < len(settled)
            and settled[(index - base) // 8] & (0x80 >> ((index - base) % 8))
        ]
        if not done:
            return set()
        details: list[Any] = await _patiently(
            functools.partial(self.redis.hmget, self.keys.details, done)
        )
        return {
            index
            for index, detail in zip(done, details, strict=True)
            if (_text(detail) or "")[:1] == _CODES["unknown"]
        }

    def _maybe_ack(self, chunk: _Chunk) -> None:
        """Acknowledge ``chunk`` (with the writer's next round trip) if it is finished."""
        if chunk.produced and not chunk.open and not chunk.abandoned:
            chunk.abandoned = True  # acknowledged once
            self.to_ack.append(chunk)
            self._kick()

    # -- starts ---------------------------------------------------------------------

    async def _start_group(self, indices: list[int]) -> dict[int, str]:
        """Record the starts of ``indices`` (one round trip); each one's verdict if not
        ``"ok"``: ``"taken"`` (another run started it), ``"rewound"``, ``"stopped"``."""
        if not indices:
            return {}
        future: asyncio.Future[tuple[int, int, set[int]]]
        future = asyncio.get_running_loop().create_future()
        self.start_request = (indices, future)
        self._kick()
        self.hurry.set()
        status, gen, refused = await future
        if status == -1:
            self.stop(None)
            return dict.fromkeys(indices, "stopped")
        if status == -2:
            await self._went_backwards(gen)
            return dict.fromkeys(indices, "rewound")
        self.gen = max(self.gen, gen)
        # After a rewind, an item found started may be one marked in doubt here.
        taken = "rewound" if self.rewound else "taken"
        return dict.fromkeys(refused, taken)

    async def _went_backwards(self, gen: int) -> None:
        self.rewound = True
        await _patiently(lambda: self.redis.hset(self.keys.meta, "rewound", "1"))
        keys = [self.keys.stream, self.keys.started, self.keys.settled]
        await _patiently(lambda: self._in_doubt(keys=keys, args=[_GROUP]))
        self.gen = gen

    # -- outcomes -------------------------------------------------------------------

    def _record(
        self,
        meta: _Pending,
        outcome: str,
        message_uuid: str | None,
        error_text: str | None,
        error_type: str | None,
        status: int | None,
    ) -> None:
        code = _CODES[outcome]
        packed = b""
        detail: dict[str, Any] = {}
        if outcome == "sent" and message_uuid is not None:
            try:
                packed = uuid.UUID(message_uuid).bytes
            except ValueError:
                detail["m"] = message_uuid  # not a UUID: kept whole
        if outcome != "sent":
            detail = {"t": error_type, "e": error_text, "st": status}
        text = code + json.dumps(detail, ensure_ascii=False) if detail else ""
        self.outbox.append(_Record(meta.index, code, packed, text))
        self.waiting_outcomes.append(meta)
        self.counts[code] += 1
        if self.on_result is not None:
            error = (
                None
                if outcome == "sent"
                else {"type": error_type, "message": error_text, "status": status}
            )
            self.on_result(JobItemResult(meta.index, outcome, message_uuid, error, meta.key))
        self._kick()

    def _kick(self) -> None:
        if self.writer is None:
            self.writer = asyncio.ensure_future(self._write_all())

    async def _write_all(self) -> None:
        """Write what waits (outcomes, releases, acknowledgements, a start group) in one
        round trip per turn; outcomes wait up to ``OUTCOME_WINDOW`` for company, unless a
        start group is asked for (or the run drains) first."""
        try:
            while self.outbox or self.releases or self.to_ack or self.start_request:
                if self.start_request is None and not self.hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.hurry.wait(), OUTCOME_WINDOW)
                else:
                    await asyncio.sleep(0)  # what else is ready in this loop turn joins
                if self.start_request is None:
                    self.hurry.clear()
                await self._write_once()
        finally:
            self.writer = None

    async def _write_once(self) -> None:
        batch, self.outbox = self.outbox, []
        metas, self.waiting_outcomes = self.waiting_outcomes, []
        releases, self.releases = self.releases, []
        request, self.start_request = self.start_request, None
        self.hurry.clear()
        # Chunks these outcomes finish are acknowledged in the same script, after them.
        settling: dict[int, set[int]] = {}
        for meta in metas:
            settling.setdefault(id(meta.chunk), set()).add(meta.index)
        for meta in metas:
            chunk = meta.chunk
            if (
                chunk.produced
                and not chunk.abandoned
                and chunk.open <= settling.get(id(chunk), set())
            ):
                chunk.abandoned = True
                self.to_ack.append(chunk)
        acks, self.to_ack = self.to_ack, []
        starts = request[0] if request is not None else []
        self.write_id += 1
        args: list[Any] = [self.gen, self.chunk_size, _GROUP, self.consumer, self.keys.events]
        args += [self.write_id, len(batch)]
        for r in batch:
            args += [r.index, r.code, r.packed, r.detail]
        args.append(len(releases))
        args += releases
        args.append(len(acks))
        args += [chunk.entry for chunk in acks]
        args.append(len(starts))
        args += starts
        keys = [
            self.keys.meta,
            self.keys.started,
            self.keys.settled,
            self.keys.details,
            self.keys.m,
            self.keys.stream,
            self.keys.writes,
        ]
        try:
            # Unrecorded, outcomes would leave their items in doubt: wait for Redis a while.
            reply: Any = await _patiently(functools.partial(self._write, keys=keys, args=args))
        except (RedisError, OSError) as exc:
            if request is not None:
                # Not recorded: not sent (certainly not delivered).
                request[1].set_exception(_redis_failed("record a start", exc))
            if batch or releases or acks:
                # Lost: their items stay started with no outcome (unknown, as a dead run's)
                # and their chunks unfinished, which this run would wait for in vain: it
                # stops, and its caller learns the outcomes are not on record.
                self.fail(_redis_failed("record the outcomes of sends", exc))
            return
        if int(reply[0]) == -3:
            gone = JobError(
                "the job is gone from Redis (expired, flushed, or lost when Redis restarted; "
                "or its meta has no ttl: corrupt): the outcomes of this run's sends cannot be "
                "recorded"
            )
            if request is not None:
                request[1].set_exception(gone)  # not recorded: not sent
            if batch or releases or acks:
                self.fail(gone)
            return
        for meta in metas:
            meta.chunk.open.discard(meta.index)
        for chunk in acks:
            self.held.discard(chunk.entry)
        if acks:
            self.wake.set()
        if request is not None:
            refused = {int(i) for i in reply[2:]}
            request[1].set_result((int(reply[0]), int(reply[1]), refused))

    def on_item(self, result: ItemResult) -> None:
        """A batch result: record its outcome (unless it never started)."""
        meta = self.pending.pop(result.index)
        self.by_key.pop(meta.key, None)
        stream = self.stream
        assert stream is not None
        stopped = stream.stopped_by
        if (
            stopped is not None
            and not isinstance(stopped, _NotStartedError)
            and self.stopped_by is None
        ):
            why = f"{type(stopped).__name__}: {stopped.message}"
            self.stop(why)
            task = asyncio.ensure_future(self.stop_job("stopped", why))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if not meta.attempted:
            # Never attempted here: no outcome; its start taken back (certainly not
            # sent); its chunk is not finished by this run.
            self._not_attempted(meta)
            return
        if result.outcome is Outcome.SKIPPED:
            text: str | None = f"not attempted: the job stopped after: {self.stopped_by}"
        else:
            text = None if result.error is None else result.error.message
        outcome, note = settle(result.outcome, result.error, in_doubt=meta.in_doubt)
        error = result.error
        error_type = type(error).__name__ if error is not None else "BatchStoppedError"
        if note is not None:
            text = f"{note}; this run's resend: {text}"
            error_type = "DeliveryUnknownError"
        status = error.status if isinstance(error, APIStatusError | InvalidResponseError) else None
        message_uuid = result.result.message_uuid if result.result is not None else None
        self._record(meta, outcome.value, message_uuid, text, error_type, status)

    async def drain(self) -> None:
        """Wait until every outcome and start of this run is in Redis."""
        while self.writer is not None or self.tasks:
            self.hurry.set()
            for task in (self.writer, *self.tasks):
                if task is not None:
                    await asyncio.shield(task)


class _JobSender:
    """The batch's ``Sender``: a slot of the limiter, the start record, then the client."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._client = run.client

    async def send(
        self,
        department_uuid: str,
        user_uuid: str,
        message: str | TextMessage,
        *,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> SendResult:
        run = self._run
        meta = run.by_key.get(idempotency_key) if idempotency_key is not None else None
        if meta is not None:
            # Its start is on record (its group's); not attempted yet, so a stop now
            # takes the start back (``_Run.on_item``).
            if run.stopping:
                raise _NotStartedError("not attempted: the job is stopping")
            if run.limiter is not None:
                await run.limiter.acquire(department_uuid)
                if run.stopping:
                    raise _NotStartedError("not attempted: the job is stopping")
            meta.attempted = True
        return await self._client.send(
            department_uuid, user_uuid, message, retry=retry, idempotency_key=idempotency_key
        )

    def ensure_open(self) -> None:
        self._client.ensure_open()

    def pause_remaining(self) -> float:
        return 0.0 if self._run.stopping else self._client.pause_remaining()

    async def wait_out_pause(self) -> None:
        wait = self.pause_remaining()
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._run.stop_event.wait(), wait)


# -- public entry points ------------------------------------------------------------


def _item(raw: object) -> SendRequest | None:
    if raw is None or isinstance(raw, SendRequest):
        return raw
    if isinstance(raw, tuple) and len(raw) == 3:
        return SendRequest(raw[0], raw[1], raw[2])
    raise InvalidRequestError(
        "item", raw, "must be a SendRequest, a (department, user, message) tuple or None"
    )


class _OnDemand(Sequence[SendRequest | None]):
    """The items of a sequence that is not a list or tuple (one that reads them on demand,
    from a large file, say), each checked when read: never copied whole."""

    def __init__(self, items: Sequence[object]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> SendRequest | None: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[SendRequest | None]: ...

    def __getitem__(self, index: int | slice) -> SendRequest | Sequence[SendRequest | None] | None:
        if isinstance(index, slice):
            return [_item(raw) for raw in self._items[index]]
        return _item(self._items[index])


def _normalize(
    items: Sequence[SendRequest | tuple[str, str, str | TextMessage] | None],
) -> Sequence[SendRequest | None]:
    if not isinstance(items, list | tuple):
        return _OnDemand(items)
    if all(raw is None or isinstance(raw, SendRequest) for raw in items):
        return cast("Sequence[SendRequest | None]", items)  # used as given, not copied
    return [_item(raw) for raw in items]


async def _create_or_join(
    redis: Redis,
    keys: _Keys,
    *,
    fingerprint: str,
    options: Mapping[str, Any],
    items: int,
    chunk_size: int,
    ttl: int,
) -> tuple[bool, uuid.UUID]:
    options_json = json.dumps(
        {k: v for k, v in sorted(options.items()) if k not in PER_RUN_OPTIONS},
        ensure_ascii=False,
        sort_keys=True,
    )
    script = redis.register_script(_CREATE)
    nonce = uuid.uuid4().hex
    reply = await script(
        keys=[
            keys.meta,
            keys.stream,
            keys.started,
            keys.settled,
            keys.details,
            keys.m,
            keys.workers,
        ],
        args=[fingerprint, options_json, items, chunk_size, nonce, ttl, _GROUP],
    )
    fields = await redis.hmget(keys.meta, "fingerprint", "options", "items", "chunk", "nonce", "v")
    # Our nonce: this run created the job, even when the script ran again after its reply
    # was lost and found the job it had just made.
    created = int(reply[0]) == 1 or _text(fields[4]) == nonce
    if _text(fields[5]) != _LAYOUT:
        raise JobError(f"the job's records in Redis are not of layout {_LAYOUT}: corrupt or newer")
    if _text(fields[0]) != fingerprint:
        raise JobError(
            "the job exists with another input (its sha256 differs): give the same input "
            "on every machine, or another --job name"
        )
    if _text(fields[1]) != options_json:
        try:
            recorded = json.loads(_text(fields[1]) or "{}")
        except (ValueError, RecursionError):
            recorded = {}
        if not isinstance(recorded, dict):
            recorded = {}  # not what a run writes: every option differs
        mine = json.loads(options_json)
        differ = sorted(k for k in set(recorded) | set(mine) if recorded.get(k) != mine.get(k)) or [
            "options"
        ]
        raise JobError(
            f"the job exists with other options ({', '.join(differ)} differ): only --workers "
            "and --concurrency may differ between runs of one job"
        )
    if _int(fields[2], -1) != items or _int(fields[3], -1) != chunk_size:
        raise JobError("the job exists with another number of items or chunk size")
    try:
        job_nonce = uuid.UUID(hex=_text(fields[4]) or "")
    except ValueError:
        raise JobError("the job's nonce in Redis is corrupt") from None
    return created, job_nonce


async def job_status(
    redis: str | Redis, job: str, *, claim_timeout: float = DEFAULT_CLAIM_TIMEOUT
) -> JobStatus:
    """Read a job's progress from Redis.

    Args:
        redis: A Redis URL, or a ``redis.asyncio.Redis`` (you close it).
        job: The job's name.
        claim_timeout: A run not heard from for this long is not counted alive.

    Raises:
        JobError: Redis cannot be read.
    """
    name = _check_name(job)
    client, owned = _connect(redis)
    keys = _Keys(name)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.meta)
            pipe.bitcount(keys.started)
            pipe.bitcount(keys.settled)
            pipe.hvals(keys.workers)
            pipe.time()
            meta_raw, started, settled, beats, now = await pipe.execute()
    except (RedisError, OSError) as exc:
        raise _redis_failed("read the job", exc) from None
    finally:
        if owned:
            await client.aclose()
    meta = {_text(k): v for k, v in meta_raw.items()}
    now_s = float(now[0]) + float(now[1]) / 1e6
    if not meta:
        return JobStatus(
            name, "missing", 0, Counts(0, 0, 0, 0), 0, 0, 0, 0, 0.0, 0.0, None, None, False
        )
    counts = Counts(
        _int(meta.get("ns")), _int(meta.get("nf")), _int(meta.get("nu")), _int(meta.get("nk"))
    )
    items = _int(meta.get("items"))
    alive = sum(1 for b in beats if now_s * 1000 - _int(b) <= claim_timeout * 1000)
    t0 = _int(meta.get("t0"))
    elapsed = max(0.0, now_s - t0) if t0 else 0.0
    rate = counts.total / elapsed if elapsed > 0 else 0.0
    left = items - counts.total
    try:
        options = json.loads(_text(meta.get("options")) or "{}")
    except (ValueError, RecursionError):  # not what a run writes (corrupt)
        options = {}
    return JobStatus(
        name=name,
        state=_text(meta.get("state")) or "missing",
        items=items,
        counts=counts,
        in_flight=max(0, int(started) - int(settled)),
        chunks=_int(meta.get("chunks")),
        done=_int(meta.get("done")),
        workers_alive=alive,
        elapsed=elapsed,
        rate=rate,
        eta=left / rate if rate > 0 else None,
        stopped_by=_text(meta.get("stopped_by")),
        rewound=_text(meta.get("rewound")) == "1",
        fingerprint=_text(meta.get("fingerprint")),
        options=options if isinstance(options, dict) else {},
    )


async def cancel_job(redis: str | Redis, job: str) -> bool:
    """Cancel a job: no run starts anything new; sends in flight finish.

    Returns:
        Whether the job was running (False: missing, stopped or cancelled already).

    Raises:
        JobError: Redis cannot be written.
    """
    keys = _Keys(_check_name(job))
    client, owned = _connect(redis)
    try:
        script = client.register_script(_STOP)
        return bool(
            await script(
                keys=[keys.meta],
                args=["cancelled", "cancelled by request", keys.events, uuid.uuid4().hex],
            )
        )
    except (RedisError, OSError) as exc:
        raise _redis_failed("cancel the job", exc) from None
    finally:
        if owned:
            await client.aclose()


async def job_results(
    redis: str | Redis,
    job: str,
    items: Sequence[SendRequest | None] | None = None,
) -> list[JobItemResult]:
    """Every item's outcome as Redis records it, as one list: for small jobs.

    The list holds every item at once (hundreds of bytes each): for a large job,
    iterate ``iter_job_results`` instead, which reads and yields a page at a time.

    Args:
        redis: A Redis URL or client.
        job: The job's name.
        items: The job's items, to name the idempotency keys of items no
            outcome was recorded for (row keys); None: keys derived from the job.

    Returns:
        What ``iter_job_results`` yields, in index order.

    Raises:
        JobError: the job is missing or Redis cannot be read.
    """
    return [result async for result in iter_job_results(redis, job, items)]


async def iter_job_results(
    redis: str | Redis,
    job: str,
    items: Sequence[SendRequest | None] | None = None,
    *,
    page_size: int = REPORT_PAGE_SIZE,
) -> AsyncGenerator[JobItemResult, None]:
    """Every item's outcome as Redis records it, in index order, read a page at a time.

    The report of ``botmsg job report`` and of ``send-many --redis --out``. Memory
    stays flat however large the job: each page of ``page_size`` items is read
    with a few commands (``GETRANGE`` of both bitmaps and ``HMGET`` of the page's
    packed message UUIDs, then ``HMGET`` of the details of its settled items), and
    its results are yielded before the next page is read.

    An item started with no outcome is unknown; one never started is skipped
    (the job stopped, was cancelled, or is still running: the error says which; in
    a complete job, an item no run was given: ``None``, an invalid input row, with
    an ``InvalidRequestError`` of ``NOT_IN_JOB_NOTE``; but with ``items`` given, a
    valid one of them is a ``NotAttemptedError`` of ``NOT_SENT_NOTE``).

    A report taken while runs still write the job is not a snapshot: each page
    shows its items as they were when that page was read, so a later page may
    show a later state than an earlier one (an item counted skipped or unknown
    on an early page may since have been sent). Each item's own record is
    consistent (its bits and details are read together); the job's state in the
    skipped items' error is the one read at the start. Read the report again once
    the job is complete for final outcomes.

    Args:
        redis: A Redis URL or client (a URL's connection is closed when the
            iteration ends or the iterator is closed).
        job: The job's name.
        items: The job's items, to name the idempotency keys of items no
            outcome was recorded for (row keys); None: keys derived from the job.
            An index whose item is None (an invalid row) is not yielded.
        page_size: Items read per page (at least 1).

    Yields:
        One ``JobItemResult`` per item of the job, in index order.

    Raises:
        JobError: the job is missing or Redis cannot be read (at the start, or
            on a later page: the results yielded before it stand).
        InvalidRequestError: ``page_size`` is not a positive integer.
    """
    keys = _Keys(_check_name(job))
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise InvalidRequestError("page_size", page_size, "must be a positive integer")
    client, owned = _connect(redis)
    try:
        try:
            # Patient, as a run's calls: a restart of Redis while a run writes its report.
            meta_raw = await _patiently(functools.partial(client.hgetall, keys.meta))
        except (RedisError, OSError) as exc:
            raise _redis_failed("read the job", exc) from None
        meta = {_text(k): v for k, v in meta_raw.items()}
        if not meta:
            raise JobError(f"no job {job!r} in Redis (never created, or expired)")
        total = _int(meta.get("items"))
        if not 0 <= total <= _MAX_ITEMS:
            # Not a count a job can have (its bitmaps hold 2**32 bits): a report of it
            # would read pages for ever.
            raise JobError(f"the job's item count in Redis is corrupt ({total})")
        chunk = max(1, _int(meta.get("chunk"), DEFAULT_CHUNK_SIZE))
        try:
            nonce = uuid.UUID(hex=_text(meta.get("nonce")) or "")
        except ValueError:
            raise JobError("the job's nonce in Redis is corrupt") from None
        state = _text(meta.get("state")) or "running"
        why = _text(meta.get("stopped_by"))
        chunks = _int(meta.get("chunks"))
        never = (
            ("BatchStoppedError", f"not attempted: the job stopped after: {why}")
            if state == "stopped"
            else ("BatchStoppedError", "not attempted: the job was cancelled")
            if state == "cancelled"
            # Complete: every chunk finished, so no run was given this item (None).
            else ("InvalidRequestError", NOT_IN_JOB_NOTE)
            if 0 < chunks <= _int(meta.get("done"))
            else ("BatchStoppedError", "not attempted (yet): the job is still running")
        )
        for first in range(0, max(0, total), page_size):
            page = await _read_page(client, keys, first, min(total, first + page_size), chunk)
            for index in range(first, min(total, first + page_size)):
                item = items[index] if items is not None and index < len(items) else None
                if items is not None and item is None:
                    continue  # not part of the job (an invalid row): the caller reports it
                key = (
                    _key_of(nonce, index, item)
                    if item is not None
                    else str(uuid.uuid5(nonce, str(index)))
                )
                if item is not None and never[1] == NOT_IN_JOB_NOTE:
                    # A valid item (the caller's items say so) that no run sent: skipped,
                    # not to be reported as an invalid row (nor dropped from --out as one).
                    yield page.result(index, key, ("NotAttemptedError", NOT_SENT_NOTE))
                    continue
                yield page.result(index, key, never)
    finally:
        if owned:
            await client.aclose()


@define(slots=True)
class _Page:
    """The records of items ``first``..``end - 1``, as one page of a report read them."""

    first: int
    chunk: int
    started: bytes
    settled: bytes
    packed: dict[int, bytes]
    details: dict[int, str]

    def bit(self, bitmap: bytes, index: int) -> bool:
        """Item ``index``'s bit in one of the page's bitmaps."""
        at = index - self.first + self.first % 8  # the page's bitmaps start at byte first // 8
        byte = at // 8
        return byte < len(bitmap) and bool(bitmap[byte] & (0x80 >> (at % 8)))

    def result(self, index: int, key: str, never: tuple[str, str]) -> JobItemResult:
        """Item ``index``'s outcome; ``key`` its idempotency key; ``never`` the error type and
        text of an item never started."""
        if self.bit(self.settled, index):
            detail = self.details.get(index)
            if detail is None:
                raw = self.packed.get(index // self.chunk, b"")
                off = (index % self.chunk) * 16
                piece = raw[off : off + 16]
                muuid = str(uuid.UUID(bytes=piece)) if len(piece) == 16 and any(piece) else None
                return JobItemResult(index, "sent", muuid, None, key)
            outcome = _OUTCOMES.get(detail[:1], "unknown")
            try:
                body = json.loads(detail[1:]) if detail[1:] else {}
            except (ValueError, RecursionError):  # RecursionError: nested too deep (corrupt)
                body = {}
            if not isinstance(body, dict):
                body = {}
            if outcome == "sent":
                m = body.get("m")
                return JobItemResult(index, "sent", m if isinstance(m, str) else None, None, key)
            status = body.get("st")
            error = {
                "type": body.get("t") if isinstance(body.get("t"), str) else "BotMessageError",
                "message": body.get("e") if isinstance(body.get("e"), str) else "",
                "status": status if isinstance(status, int) else None,
            }
            return JobItemResult(index, outcome, None, error, key)
        if self.bit(self.started, index):
            error = {"type": "DeliveryUnknownError", "message": DIED_NOTE, "status": None}
            return JobItemResult(index, "unknown", None, error, key)
        error = {"type": never[0], "message": never[1], "status": None}
        return JobItemResult(index, "skipped", None, error, None)


async def _read_page(client: Redis, keys: _Keys, first: int, end: int, chunk: int) -> _Page:
    """Read the records of items ``first``..``end - 1`` (``first < end``) from Redis.

    Two round trips, each one transaction: both bitmaps' bytes, then the details and
    packed UUIDs of the items found settled. A settled bit is never cleared, and an
    outcome's bit, details and UUID are written by one script call, so the second
    read sees each settled item's details and UUID as of one moment. Read again while
    Redis is unreachable or loading, for up to ``REDIS_WAIT`` seconds (a restart).

    Raises:
        JobError: Redis cannot be read (or holds a key of another type).
    """
    try:
        return await _patiently(functools.partial(_read_page_once, client, keys, first, end, chunk))
    except (RedisError, OSError) as exc:
        raise _redis_failed("read the job", exc) from None


async def _read_page_once(client: Redis, keys: _Keys, first: int, end: int, chunk: int) -> _Page:
    """``_read_page``'s reads, once (raises Redis's errors)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.getrange(keys.started, first // 8, (end - 1) // 8)
        pipe.getrange(keys.settled, first // 8, (end - 1) // 8)
        started, settled = await pipe.execute()
    page = _Page(first, chunk, bytes(started or b""), bytes(settled or b""), {}, {})
    wanted = [i for i in range(first, end) if page.bit(page.settled, i)]
    if wanted:
        numbers = list(range(wanted[0] // chunk, wanted[-1] // chunk + 1))
        async with client.pipeline(transaction=True) as pipe:
            pipe.hmget(keys.details, [str(i) for i in wanted])
            pipe.hmget(keys.m, [str(n) for n in numbers])
            details, packed = await pipe.execute()
        page.details = {
            i: _text(v) or "" for i, v in zip(wanted, details, strict=True) if v is not None
        }
        page.packed = {n: bytes(v) for n, v in zip(numbers, packed, strict=True) if v}
    return page


async def run_job_async(
    redis: str | Redis,
    job: str,
    items: Sequence[SendRequest | tuple[str, str, str | TextMessage] | None],
    *,
    base_url: str,
    username: str,
    password: str,
    fingerprint: str | None = None,
    options: Mapping[str, Any] | None = None,
    concurrency: int = 32,
    rate_limit: float | None = None,
    per_department_rate_limit: float | None = None,
    retry: RetryPolicy | None = None,
    resend_unknown: bool = False,
    accept_redis_loss: bool = False,
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ttl: int = DEFAULT_TTL,
    allow_insecure_http: bool = False,
    on_result: Callable[[JobItemResult], object] | None = None,
    stop: asyncio.Event | None = None,
) -> JobReport:
    """Join (or create) the job ``job`` in Redis and send its items until none is left.

    Run it on every machine with the same ``items``: the first run creates the
    job; each takes chunks of items, records each start before its first
    attempt and each outcome when known, and takes over the chunks of runs
    that died. Returns when the job has no chunk left for this run (finished,
    or held by live runs that will finish it), or it was stopped or cancelled.

    Args:
        redis: A Redis URL (``redis://``, ``rediss://``, ``unix://``) or a client (you close it).
        job: The job's name (shared by its runs).
        items: The items, in input order; ``None`` for an input row not sent. A list or
            tuple is checked before anything is sent; another sequence (one that reads
            its items on demand, from a large file, say) is read a chunk at a time, in
            order, each item checked when read.
        base_url: The URL before ``/communications``.
        username: Basic-auth user name.
        password: Basic-auth password.
        fingerprint: Identifies the input (default: ``job_fingerprint(items)``).
        options: The options that shape the job, recorded; every run must give
            the same, except ``workers`` and ``concurrency``.
        concurrency: Sends in flight in this run.
        rate_limit: Most messages per second (recorded with the job).
        per_department_rate_limit: Most messages per second to one department.
        retry: The retry policy (default: the client's).
        resend_unknown: Send items in doubt again, with their (only) key.
        accept_redis_loss: Run on a Redis that could lose acknowledged records
            (no AOF, or not fsynced always): a crash of Redis can then make an
            item sent twice.
        claim_timeout: Seconds without a refresh after which a run's chunks are
            taken over by another.
        chunk_size: Items per chunk (recorded with the job).
        ttl: Seconds the job's keys live after its last activity.
        allow_insecure_http: Permit ``http://`` to a host that is not loopback.
        on_result: Called with each item this run settles, when it is known.
        stop: Set it to stop this run (nothing new starts; sends in flight finish).

    Returns:
        A ``JobReport``.

    Raises:
        InvalidRequestError: a bad argument, before anything is sent.
        JobError: Redis not durable (without ``accept_redis_loss``), unreachable,
            or the job exists with another input or options; or Redis refused to
            record outcomes of this run's sends (the run stopped: those items stay
            in doubt, reported unknown, never resent under another key). Its
            ``may_have_sent`` says whether this run had handed items to the service.
    """
    name = _check_name(job)
    work = _normalize(items)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise InvalidRequestError("chunk_size", chunk_size, "must be an int >= 1")
    if (
        isinstance(claim_timeout, bool)
        or not isinstance(claim_timeout, int | float)
        or not 0 < claim_timeout <= _MAX_SECONDS  # inf, NaN: int() fails; 1e300: XAUTOCLAIM
    ):
        raise InvalidRequestError(
            "claim_timeout", claim_timeout, "must be > 0 seconds, at most 100 years"
        )
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= _MAX_SECONDS:
        # Redis's EXPIRE takes whole seconds; 0 or less deletes the job's keys at once, and
        # one too long for it failed the create script half-way: keys that never expire.
        raise InvalidRequestError("ttl", ttl, "must be an int of 1 second to 100 years")
    BatchOptions(
        concurrency=concurrency,
        rate_limit=rate_limit,
        per_department_rate_limit=per_department_rate_limit,
    )
    recorded = {
        **(options or {}),
        "rate": rate_limit,
        "per_department_rate": per_department_rate_limit,
    }
    client_redis, owned = _connect(redis)
    keys = _Keys(name)
    try:
        if not accept_redis_loss:
            try:
                risk = await check_durability(client_redis)
            except (RedisError, OSError) as exc:
                raise _redis_failed("connect", exc) from None
            if risk is not None:
                raise JobError(
                    f"Redis could lose the job's start records: {risk}. Configure "
                    "'appendonly yes' and 'appendfsync always', or accept the risk "
                    "(--accept-redis-loss): an item could then be sent twice"
                )
        try:
            created, nonce = await _create_or_join(
                client_redis,
                keys,
                fingerprint=fingerprint or job_fingerprint(work),
                options=recorded,
                items=len(work),
                chunk_size=chunk_size,
                ttl=ttl,
            )
        except (RedisError, OSError) as exc:
            raise _redis_failed("create or join the job", exc) from None
        # One quota for the job's runs on every machine, and for any other client of
        # this vendor account (the limiter's default name: base URL and user name): one
        # global and per-department rate, and one pause a 429 seen by any run imposes.
        limiter = RedisRateLimiter(
            client_redis,
            rate=rate_limit,
            per_department_rate=per_department_rate_limit,
            base_url=base_url,
            username=username,
        )
        client = BotMessageClient(
            base_url,
            username,
            password,
            allow_insecure_http=allow_insecure_http,
            # The run takes each slot before the item's start record; the client
            # only shares the pause.
            rate_limiter=PauseOnly(limiter),
        )
        run = _Run(
            client_redis,
            name,
            work,
            client=client,
            limiter=limiter,
            concurrency=concurrency,
            retry=retry,
            resend_unknown=resend_unknown,
            claim_timeout=claim_timeout,
            on_result=on_result,
        )
        run.nonce = nonce
        run.chunk_size = chunk_size
        run.group_size = _start_group_size(concurrency, rate_limit, per_department_rate_limit)
        beat = asyncio.ensure_future(run.heartbeat())
        watcher = asyncio.ensure_future(_watch(stop, run)) if stop is not None else None
        try:
            async with client:
                stream = BatchStream(
                    _JobSender(run),
                    run.requests(),
                    BatchOptions(concurrency=concurrency, retry=retry, on_result=run.on_item),
                )
                run.stream = stream
                async with stream:
                    async for _ in stream:
                        pass
            await run.drain()
            if run.failure is not None:
                raise run.failure
        except (RedisError, OSError) as exc:
            error = _redis_failed("go on with the job", exc)
            error.may_have_sent = run.pulled > 0
            raise error from None
        except JobError as exc:
            # Not "nothing was sent": the items this run handed to the batch may be out.
            exc.may_have_sent = run.pulled > 0
            raise
        finally:
            for task in (beat, watcher, run.listener):
                if task is not None:
                    await _end_task(task)
            await limiter.aclose()  # its pause listener; the Redis client is ours
        try:
            status = await job_status(client_redis, name, claim_timeout=claim_timeout)
        except JobError as exc:
            exc.may_have_sent = run.pulled > 0
            raise
        c = run.counts
        return JobReport(
            job=status,
            counts=Counts(c["s"], c["f"], c["u"], c["k"]),
            created=created,
            stopped_by=status.stopped_by if status.state != "running" else run.stopped_by,
        )
    finally:
        if owned:
            await client_redis.aclose()


async def _end_task(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for its end, cancelling it again while it goes on.

    A cancel that lands inside a Redis command can come out of redis-py as a
    ``TimeoutError`` (Python 3.11's ``asyncio.timeout`` racing the cancel), which
    the heartbeat's and the listener's loops take for a Redis failure and go on:
    one cancel and an ``await`` would then wait forever, and the run never end.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _watch(stop: asyncio.Event, run: _Run) -> None:
    await stop.wait()
    run.stop("stopped on request")


def run_job(
    redis: str,
    job: str,
    items: Sequence[SendRequest | tuple[str, str, str | TextMessage] | None],
    *,
    base_url: str,
    username: str,
    password: str,
    concurrency: int = 32,
    rate_limit: float | None = None,
    resend_unknown: bool = False,
    accept_redis_loss: bool = False,
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
    allow_insecure_http: bool = False,
) -> JobReport:
    """``run_job_async`` for a script's main code (blocks; not inside a running loop).

    See ``run_job_async`` for the arguments and what it guarantees.
    """
    return asyncio.run(
        run_job_async(
            redis,
            job,
            items,
            base_url=base_url,
            username=username,
            password=password,
            concurrency=concurrency,
            rate_limit=rate_limit,
            resend_unknown=resend_unknown,
            accept_redis_loss=accept_redis_loss,
            claim_timeout=claim_timeout,
            allow_insecure_http=allow_insecure_http,
        )
    )
