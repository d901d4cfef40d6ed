"""One quota and at-most-once sends across processes and machines, on Redis (extra ``redis``).

``RedisRateLimiter`` is a ``RateLimiter`` (``BotMessageClient(rate_limiter=...)``)
whose state lives in Redis, so every worker of one vendor account shares one
global rate, exact per-department rates and one 429 pause. ``RedisSendGuard``
is a ``SendGuard`` (``BotMessageClient(send_guard=...)``): a message sent under
a caller's idempotency key is sent at most once by all workers together, which
turns an at-least-once job queue into at-most-once delivery.

The limiter is GCRA (the generic cell rate algorithm) evaluated in one Lua
script per round trip, on the Redis server's clock (``TIME``): clock skew
between machines does not matter. A caller reserves its slot and sleeps until
it (no polling; first come, first served, so no waiter starves). At high rates
a process reserves a few consecutive slots per round trip (a lease, bounded to
``lease_time`` seconds of the rate) and hands them out locally in order.

Redis faults fail closed: a send that cannot consult Redis raises
``CoordinationError`` before any attempt (nothing was sent: the item is FAILED
and may go again). ``RedisRateLimiter(fail_open=True)`` limits each process on
its own instead while Redis is away; the guard never fails open. Both recover
by themselves when Redis is back.

Every key written (``N`` is the name, by default a hash of base URL and user name)::

    botmsg:{N}:rate         string  global schedule (µs, Redis clock)  expires 1 s after it drains
    botmsg:{N}:dept:<id>    string  one department's schedule          expires 1 s after it drains
    botmsg:{N}:pause        string  end of the shared 429 pause (µs)   expires when the pause ends
    botmsg:N:send:<key>     string  JSON claim / outcome of one key    ``ttl`` (default 7 days)

and one pub/sub channel, ``botmsg:{N}:pause``, that tells every limiter of a new pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from ._errors import (
    BotMessageError,
    CoordinationError,
    DeliveryUnknownError,
    InvalidRequestError,
)
from ._guard import claim_record, outcome_record, read_record
from ._limits import LocalRateLimiter, check_rate
from ._models import SendResult
from ._observe import log_quietly

__all__ = ["RedisRateLimiter", "RedisSendGuard", "account_name"]

log = logging.getLogger("botmsg_async")

#: Why a Redis URL was refused (never the URL itself, which may carry a password).
URL_HINT: Final = (
    "is not a Redis URL: redis://[[user]:password@]host[:port][/db], rediss://... or "
    "unix://path, with '/', '?', '#', '@', ':' and '%' percent-encoded in a password"
)
#: Errors of a Redis that is down, slow or refusing us.
_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
#: Longest ``RedisSendGuard`` ttl (seconds): a century.
_MAX_TTL = 100 * 365 * 86400
#: Longest shared pause heard from the channel (µs): a day, far above any Retry-After.
_MAX_PAUSE = 86400 * 10**6
#: Most seconds ``RedisSendGuard.aclose`` waits for the releases under way (a cancelled
#: send's claim, freed in the background): on a URL's client each fails within about 5 s
#: (its timeouts, one retry); a client of the caller's with no timeout, on a Redis gone
#: silent, would hold the close up for ever. A release given up leaves its key claimed.
RELEASE_WAIT: Final = 10.0

# The server's clock (µs), and ``instant(key)``: the instant (µs, that clock) a
# schedule or pause key holds, or 0 when it holds none of ours. Each is SET with a TTL
# that outlasts its instant; another writer's (a hand edit, another program) may hold
# a word, a number centuries ahead or with no TTL, or a hash: read as such, every
# reservation would fail on it, or wait for centuries, for as long as the key lives.
# Taken for absent, it is overwritten by the next SET of ours.
_INSTANT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function instant(key)
  local v = redis.pcall('GET', key)
  if type(v) ~= 'string' then return 0 end
  local n = tonumber(v)
  local ttl = redis.call('PTTL', key)
  if n and ttl >= 0 and n <= now + ttl * 1000 + 1000000 then return n end
  return 0
end
"""

# One reservation. KEYS: global schedule, department schedule, pause.
# ARGV: global interval and burst tolerance (µs; interval 0: no global limit),
# department interval and tolerance, slots wanted (global only), mode (1: take
# the department's slot and the global one; 2: only the global one, for a
# caller already holding its department slot).
# Reply: {status, the server's clock (µs), waits (µs)...}: status 0, the pause's
# time left (nothing reserved: come back after it); 1, the wait of each slot
# reserved; 2, the wait of the department slot now held, which binds: sleep, then
# ask again in mode 2 for the global slot.
_ACQUIRE = (
    _INSTANT
    + """
local pause = instant(KEYS[3])
if pause > now then return {0, now, pause - now} end
local tg, taug = tonumber(ARGV[1]), tonumber(ARGV[2])
local td, taud = tonumber(ARGV[3]), tonumber(ARGV[4])
local n, mode = tonumber(ARGV[5]), tonumber(ARGV[6])
local gtat = now
local start = now
if tg > 0 then
  gtat = math.max(instant(KEYS[1]), now)
  start = math.max(now, gtat - taug)
end
if mode == 1 and td > 0 then
  local dtat = math.max(instant(KEYS[2]), now)
  local sd = math.max(now, dtat - taud)
  if sd > start then
    dtat = dtat + td
    redis.call('SET', KEYS[2], string.format('%.0f', dtat), 'PX',
      math.floor((dtat - now) / 1000) + 1000)
    if tg > 0 then return {2, now, sd - now} end
    return {1, now, sd - now}
  end
  dtat = math.max(dtat, start) + td
  redis.call('SET', KEYS[2], string.format('%.0f', dtat), 'PX',
    math.floor((dtat - now) / 1000) + 1000)
end
if tg == 0 then return {1, now, start - now} end
local reply = {1, now}
for i = 0, n - 1 do
  reply[#reply + 1] = math.max(now, gtat + i * tg - taug) - now
end
gtat = gtat + n * tg
redis.call('SET', KEYS[1], string.format('%.0f', gtat), 'PX',
  math.floor((gtat - now) / 1000) + 1000)
return reply
"""
)

# KEYS: pause. ARGV: seconds in µs, channel. Extends the pause (never shortens
# it) and tells every subscriber how long it now lasts. Reply: µs left.
_PAUSE = (
    _INSTANT
    + """
local untl = now + tonumber(ARGV[1])
local cur = instant(KEYS[1])
if untl > cur then
  redis.call('SET', KEYS[1], string.format('%.0f', untl), 'PX',
    math.floor((untl - now) / 1000) + 1)
  redis.call('PUBLISH', ARGV[2], string.format('%.0f', untl - now))
  return untl - now
end
return cur - now
"""
)

# KEYS: the key's record. ARGV: the claim JSON, TTL in ms. Reply: nil when
# claimed now, else the record already there, or {its type} when the key holds no
# string (another writer's hash, list...: no record of ours, nor one to claim).
_CLAIM = """
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then return {redis.call('TYPE', KEYS[1]).ok} end
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# KEYS: the key's record. ARGV: fingerprint, new record JSON ('' deletes), TTL
# in ms, claim token. Only our own claim is settled: a record that is no longer
# this sender's claim for this message (expired and claimed again, by anyone:
# another sender's claim carries another token, or none) is left alone. Run
# again after its reply was lost, it finds no claim of ours: a no-op. Reply: 1 if done.
_SETTLE = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, rec = pcall(cjson.decode, v)
if not ok or type(rec) ~= 'table' or rec.state ~= 'claimed' or rec.fp ~= ARGV[1]
  or rec.tok ~= ARGV[4] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


def account_name(base_url: str, username: str) -> str:
    """The default name of one vendor account's shared state: a hash, never the password.

    Every client of the same base URL and user name gets the same name, so
    they share one quota without configuration.
    """
    digest = hashlib.sha256(f"{base_url.rstrip('/')}\n{username}".encode())
    return digest.hexdigest()[:16]


def _name(name: str | None, base_url: str | None, username: str | None) -> str:
    if name is None:
        if base_url is None or username is None:
            raise InvalidRequestError(
                "name", None, "give a name, or base_url and username to derive one"
            )
        return account_name(base_url, username)
    if not isinstance(name, str) or not 0 < len(name) <= 100 or not name.isprintable():
        raise InvalidRequestError("name", name, "must be 1-100 printable characters")
    if any(c in name for c in "{} "):
        raise InvalidRequestError("name", name, "must not contain '{', '}' or spaces")
    return name


#: Query options of a Redis URL that redis-py passes on as text, where an '@' is no
#: sign of a password cut short (``check_redis_url``).
_TEXT_OPTIONS: Final = frozenset(
    {
        "password",
        "username",
        "client_name",
        "lib_name",
        "lib_version",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
    }
)


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL whose password was cut short by an unencoded '/', '?' or '#'.

    The rest of the password (and the host) then follows that character, so an '@'
    shows there; redis-py would take the password's head for a port or a host (a
    password "4711/x" connects to localhost:4711) and quote it in every connection
    error. An '@' is left alone only in the value of a query option redis-py reads as
    text (``password=``, ``client_name=``, a certificate's path: ``_TEXT_OPTIONS``),
    and in a ``unix://`` socket's path.

    Raises:
        InvalidRequestError: such a URL (never quoted: ``URL_HINT``).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return  # redis-py refuses it too (refused, unquoted, by the caller)
    spilled = "@" in parts.fragment or ("@" in parts.path and parts.scheme != "unix")
    for piece in parts.query.split("&"):
        name, _, value = piece.partition("=")
        if "@" in name or ("@" in value and name not in _TEXT_OPTIONS):
            spilled = True
    if spilled:
        raise InvalidRequestError("redis", "<url>", URL_HINT)


def check_redis_options(client: Redis) -> None:
    """Refuse a client (made from a URL) whose connections redis-py could never make.

    A query option it does not know (a typo, ``ssl_cert_reqs`` on ``redis://``) or a
    value it refuses only when it makes the first connection: a ``TypeError`` or a
    ``RedisError`` out of every send (taken for Redis being away), a traceback out
    of a job's command. Made here once, without connecting.

    Raises:
        InvalidRequestError: such an option (never quoted: its name or value may be a
            piece of a password cut short at an unencoded '?').
    """
    pool = client.connection_pool
    try:
        pool.connection_class(**pool.connection_kwargs)
    except (TypeError, ValueError, RedisError):
        raise InvalidRequestError(
            "redis",
            "<url>",
            "has a query option redis-py does not take, or a value it refuses (not shown: "
            "it may hold a piece of a password; percent-encode '?' in a password)",
        ) from None


def client_from_url(redis: object, make: Callable[[str], Redis]) -> Redis:
    """``make(redis)``, a client for a Redis URL, with the URL checked before and after.

    Every client this package builds from a URL is built here (``make`` sets its
    timeouts): the URL and its options are checked, and refused without ever being
    quoted, nor redis-py's words on them (they may quote a piece of its password:
    "Port could not be cast to integer value as 's3cr'" for ':s3cr/et@').

    Raises:
        InvalidRequestError: ``redis`` is no ``str``, or no URL redis-py can use.
    """
    if not isinstance(redis, str):
        raise InvalidRequestError(
            "redis", type(redis).__name__, "must be a redis:// URL or a redis.asyncio.Redis"
        )
    check_redis_url(redis)
    try:
        client = make(redis)
    except ValueError:
        raise InvalidRequestError("redis", "<url>", URL_HINT) from None
    check_redis_options(client)
    return client


def _connect(redis: str | Redis) -> tuple[Redis, bool]:
    """A client for ``redis`` (a URL, or a client of the caller's) and whether we own it."""
    if isinstance(redis, Redis):
        return redis, False
    # Short timeouts and one quick retry: with Redis away, each send fails closed in
    # about a second instead of hanging.
    make = functools.partial(
        Redis.from_url,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
    )
    return client_from_url(redis, make), True


def _unavailable(what: str, exc: BaseException) -> CoordinationError:
    return CoordinationError(
        f"{what} could not use Redis ({type(exc).__name__}: {exc}); the message was not "
        "sent: send it again once Redis is back"
    )


class RedisRateLimiter:
    """A ``RateLimiter`` shared by every process that uses the same Redis and name.

    Args:
        redis: A ``redis://`` (or ``rediss://``, ``unix://``) URL, or a
            ``redis.asyncio.Redis`` of yours (then you close it).
        rate: Most messages per second in all (None: no global limit).
        per_department_rate: Most messages per second to one department (None: none).
        burst: Messages the global rate may send at once after an idle spell
            (default: a tenth of a second's worth, at least 1).
        per_department_burst: The same for each department (default as ``burst``).
        name: Names the shared state; every limiter with the same name shares
            one quota. Default: ``account_name(base_url, username)``.
        base_url: With ``username``, derives the default name.
        username: See ``base_url``.
        fail_open: When Redis cannot be used, limit each process on its own
            (a ``LocalRateLimiter`` with the same rates: N processes may then send
            N times the rate) instead of failing each send with
            ``CoordinationError``. Default False: fail closed.
        lease_time: Most seconds of the global rate one round trip may reserve
            for this process (several slots at high rates; 0 for one slot per trip).
        sleep: How to wait (tests may pass their own).
        on_grant: Called with the department and the instant (seconds on the Redis
            server's clock) of each slot this limiter hands out: the grant
            timestamps that tests and benchmarks check the limits on.

    Raises:
        InvalidRequestError: a bad rate, name or URL.

    Example:
        >>> limiter = RedisRateLimiter("redis://localhost", rate=100, per_department_rate=5,
        ...                            base_url=url, username=user)
        >>> client = BotMessageClient(url, user, password, rate_limiter=limiter)
    """

    def __init__(
        self,
        redis: str | Redis,
        *,
        rate: float | None = None,
        per_department_rate: float | None = None,
        burst: float | None = None,
        per_department_burst: float | None = None,
        name: str | None = None,
        base_url: str | None = None,
        username: str | None = None,
        fail_open: bool = False,
        lease_time: float = 0.02,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_grant: Callable[[str, float], object] | None = None,
    ) -> None:
        check_rate("rate", rate)
        check_rate("per_department_rate", per_department_rate)
        for field, value in (("burst", burst), ("per_department_burst", per_department_burst)):
            if value is not None and not (
                isinstance(value, int | float) and value >= 1 and math.isfinite(value)
            ):
                raise InvalidRequestError(field, value, "must be >= 1, or None")
        if not (isinstance(lease_time, int | float) and 0 <= lease_time <= 1):
            raise InvalidRequestError("lease_time", lease_time, "must be within 0-1 seconds")
        self.name = _name(name, base_url, username)
        self.rate = rate
        self.per_department_rate = per_department_rate
        self.fail_open = fail_open
        self._redis, self._owned = _connect(redis)
        prefix = f"botmsg:{{{self.name}}}:"
        self._global_key = prefix + "rate"
        self._department_prefix = prefix + "dept:"
        self._pause_key = prefix + "pause"
        self._channel = self._pause_key
        self._interval_g = round(1e6 / rate) if rate else 0
        self._tau_g = round((max(1.0, burst or rate / 10) - 1) * 1e6 / rate) if rate else 0
        self._interval_d = round(1e6 / per_department_rate) if per_department_rate else 0
        dept_burst = per_department_burst or burst
        self._tau_d = (
            round(
                (max(1.0, dept_burst or per_department_rate / 10) - 1) * 1e6 / per_department_rate
            )
            if per_department_rate
            else 0
        )
        self._lease_time = lease_time
        # A leased slot not taken this long after its instant is dropped (a busy
        # loop may wake a waiter a little late; a lease is never held for long).
        self._stale_after = max(0.05, lease_time)
        self._max_lease = (
            min(256, max(1, int(rate * lease_time))) if rate and not per_department_rate else 1
        )
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._pause = self._redis.register_script(_PAUSE)
        self._sleep = sleep
        self._on_grant = on_grant
        # Per-process state, all on the loop's clock.
        # Leased slots: (instant on the loop's clock, instant on Redis's clock).
        self._slots: deque[tuple[float, float]] = deque()
        self._fetching: asyncio.Event | None = None
        self._waiting = 0
        # Slots taken since the last lease, and when that was: the recent demand.
        self._taken = 0
        self._last_fetch = 0.0
        self._paused_until = 0.0
        self._pause_epoch = 0
        self._down_until = 0.0
        self._warned_at = -1e9
        self._fallback: LocalRateLimiter | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        self._closed = False
        #: Reservation round trips made to Redis so far (one per slot, or per lease).
        self.round_trips = 0

    def __repr__(self) -> str:
        return (
            f"RedisRateLimiter(name={self.name!r}, rate={self.rate}, "
            f"per_department_rate={self.per_department_rate}, fail_open={self.fail_open})"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening for pauses; close the Redis client if this limiter made it."""
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            try:
                await listener
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
        if self._owned:
            await self._redis.aclose()

    # -- the RateLimiter protocol ------------------------------------------------

    async def acquire(self, department_uuid: str) -> None:
        """Wait for this message's slot (global, then its department's).

        Raises:
            CoordinationError: Redis cannot be used and ``fail_open`` is False;
                nothing was sent.
        """
        if self.rate is None and self.per_department_rate is None:
            return
        await self._listen()
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            await self._redis_down(department_uuid, None)
            return
        try:
            if self.per_department_rate is None:
                await self._global_slot(loop, department_uuid)
            else:
                await self._department_slot(loop, department_uuid)
        except CoordinationError as exc:
            self._down_until = loop.time() + 1.0
            await self._redis_down(department_uuid, exc)

    async def pause(self, seconds: float) -> None:
        """Pause every limiter of this name until ``seconds`` from now (Redis clock).

        A Redis failure here is logged, not raised: the 429 that called for the
        pause still pauses this process.
        """
        if not seconds > 0:
            return
        self._note_pause(seconds)
        try:
            await self._pause(keys=[self._pause_key], args=[round(seconds * 1e6), self._channel])
        except _REDIS_ERRORS as exc:
            log_quietly(
                log,
                logging.WARNING,
                "could not share a %.1f s pause through Redis: %s",
                seconds,
                exc,
            )

    async def paused_for(self) -> float:
        """Seconds left of the shared pause, as last heard from Redis (no round trip)."""
        await self._listen()
        if not self._paused_until:
            return 0.0
        return max(0.0, self._paused_until - asyncio.get_running_loop().time())

    # -- internals --------------------------------------------------------------

    def _note_pause(self, seconds: float) -> None:
        until = asyncio.get_running_loop().time() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._pause_epoch += 1
            # Slots leased before the pause fall inside it: not to be used.
            self._slots.clear()

    def _paused_since(self, epoch: int, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a pause began after ``epoch`` and still runs: a slot slept for is void."""
        return self._pause_epoch != epoch and self._paused_until > loop.time()

    async def _redis_down(self, department_uuid: str, exc: CoordinationError | None) -> None:
        loop = asyncio.get_running_loop()
        if not self.fail_open:
            if exc is None:
                exc = CoordinationError(
                    "the shared rate limiter could not use Redis a moment ago; the message was "
                    "not sent: send it again once Redis is back"
                )
            raise exc
        if loop.time() - self._warned_at > 10:
            self._warned_at = loop.time()
            log_quietly(
                log,
                logging.WARNING,
                "Redis unavailable; fail_open=True: each process limits itself to the "
                "full rate until it is back (%s)",
                exc,
            )
        if self._fallback is None:
            self._fallback = LocalRateLimiter(self.rate, self.per_department_rate)
        await self._fallback.acquire(department_uuid)

    async def _reserve(
        self, mode: int, department_uuid: str, slots: int
    ) -> tuple[int, int, list[int]]:
        keys = [self._global_key, self._department_prefix + department_uuid, self._pause_key]
        args = [self._interval_g, self._tau_g, self._interval_d, self._tau_d, slots, mode]
        self.round_trips += 1
        try:
            reply: Any = await self._acquire(keys=keys, args=args)
        except _REDIS_ERRORS as exc:
            raise _unavailable("the shared rate limiter", exc) from exc
        if (
            not isinstance(reply, list)
            or len(reply) < 3
            or not all(isinstance(v, int) and v >= 0 for v in reply)
            or reply[0] not in (0, 1, 2)
        ):
            raise CoordinationError(
                f"the shared rate limiter got an odd reply from Redis ({reply!r:.80}); "
                "the message was not sent"
            )
        return reply[0], reply[1], reply[2:]

    async def _wait_pause(self, micros: int) -> None:
        self._note_pause(micros / 1e6)
        await self._sleep(micros / 1e6)

    async def _department_slot(self, loop: asyncio.AbstractEventLoop, department: str) -> None:
        mode = 1
        while True:
            status, now, waits = await self._reserve(mode, department, 1)
            if status == 0:
                await self._wait_pause(waits[0])
                continue
            epoch = self._pause_epoch
            if waits[0]:
                await self._sleep(waits[0] / 1e6)
            if self._paused_since(epoch, loop):
                continue  # a pause began while we waited: ask again after it
            if status == 1:
                if self._on_grant is not None:
                    self._on_grant(department, (now + waits[0]) / 1e6)
                return
            mode = 2  # the department slot is ours; now the global one

    async def _global_slot(self, loop: asyncio.AbstractEventLoop, department: str) -> None:
        while True:
            while self._slots:
                at, granted = self._slots.popleft()
                now = loop.time()
                if at < now - self._stale_after:
                    continue  # a leased slot nobody took in time: gone, as leases are bounded
                epoch = self._pause_epoch
                if at > now:
                    await self._sleep(at - now)
                if self._paused_since(epoch, loop):
                    continue
                self._taken += 1
                if self._on_grant is not None:
                    self._on_grant(department, granted)
                return
            fetching = self._fetching
            if fetching is not None:
                # One round trip at a time per process; the others wait for its lease.
                self._waiting += 1
                try:
                    await fetching.wait()
                finally:
                    self._waiting -= 1
                continue
            fetching = self._fetching = asyncio.Event()
            try:
                # As many slots as wait now, or as were taken in one lease time of
                # late (the demand a saturated process keeps up), within the bound.
                now = loop.time()
                elapsed = max(now - self._last_fetch, 1e-3)
                recent = math.ceil(self._taken * self._lease_time / elapsed)
                wanted = min(self._max_lease, max(self._waiting + 1, recent))
                self._taken, self._last_fetch = 0, now
                status, server_now, waits = await self._reserve(1, "", wanted)
                if status == 0:
                    await self._wait_pause(waits[0])
                    continue
                base = loop.time()
                self._slots.extend(((base + w / 1e6), (server_now + w) / 1e6) for w in waits)
            finally:
                self._fetching = None
                fetching.set()

    async def _listen(self) -> None:
        """Start (once per loop) the task that hears pauses set by other processes."""
        if self._listener is not None or self._closed:
            return
        self._subscribed = asyncio.Event()
        self._listener = asyncio.get_running_loop().create_task(self._listen_forever())
        # Subscribed before the first send, so a pause set right after is heard;
        # bounded, so a Redis that is away does not hold the send up.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 0.5)

    async def _listen_forever(self) -> None:
        # Until closed, not only until cancelled: a cancel that lands in a Redis call can
        # be lost (redis-py's asyncio.wait_for on Python 3.11) or come out as a Redis
        # error, which this loop outlives; and ``aclose`` awaits this task's end.
        while not self._closed:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                if self._subscribed is not None:
                    self._subscribed.set()
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None and message.get("type") == "message":
                        try:
                            micros = int(message["data"])
                        except (TypeError, ValueError):
                            continue
                        # Anything else on the channel is not a pause of ours (a huge
                        # number would overflow the float clock and end this listener).
                        if 0 < micros <= _MAX_PAUSE:
                            self._note_pause(micros / 1e6)
            except _REDIS_ERRORS:
                pass  # Redis away: listen again in a moment
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            if not self._closed:
                await asyncio.sleep(0.5)


class RedisSendGuard:
    """A ``SendGuard`` on Redis: each idempotency key is sent at most once, by any process.

    The first send of a key stores a claim (``SET`` if absent, with ``ttl``),
    sends, then replaces the claim with its outcome as JSON; a certain "not
    delivered" frees the key instead (see ``_delivery.releases_claim``). A later
    send of the key returns the recorded ``SendResult``, raises the recorded
    final error, or raises ``DeliveryUnknownError`` for a claim with no outcome
    (a worker that died mid-send: never sent again). The guard always fails
    closed: with Redis away, ``CoordinationError`` and nothing is sent.

    Args:
        redis: A Redis URL, or a ``redis.asyncio.Redis`` of yours (then you close it).
        name: Names the shared state (default: ``account_name(base_url, username)``).
        base_url: With ``username``, derives the default name.
        username: See ``base_url``.
        ttl: Seconds a claim or an outcome is kept (default 7 days); longer than
            your job queue may redeliver a job.

    Example:
        >>> guard = RedisSendGuard("redis://localhost", base_url=url, username=user)
        >>> client = BotMessageClient(url, user, password, send_guard=guard)
        >>> await client.send(dept, user_id, "Hello", idempotency_key=f"job-{job_id}")
    """

    def __init__(
        self,
        redis: str | Redis,
        *,
        name: str | None = None,
        base_url: str | None = None,
        username: str | None = None,
        ttl: float = 7 * 86400,
    ) -> None:
        # At most a century: an infinite one reached round() in every claim (OverflowError),
        # a huge one Redis's PX (refused: no send could claim its key).
        if not (isinstance(ttl, int | float) and 1 <= ttl <= _MAX_TTL):
            raise InvalidRequestError("ttl", ttl, "must be 1 second to 100 years")
        self.name = _name(name, base_url, username)
        self.ttl = ttl
        self._redis, self._owned = _connect(redis)
        self._prefix = f"botmsg:{self.name}:send:"
        self._claim = self._redis.register_script(_CLAIM)
        self._settle = self._redis.register_script(_SETTLE)
        # Releases of claims whose send was cancelled mid-claim (``claim``), under way.
        # Task -> the key it frees: a send of that key waits for it (``claim``).
        self._releasing: dict[asyncio.Task[None], str] = {}

    def __repr__(self) -> str:
        return f"RedisSendGuard(name={self.name!r}, ttl={self.ttl})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Finish the releases under way (``RELEASE_WAIT`` at most), then close our client.

        The Redis client is closed only if this guard made it (from a URL).
        """
        if self._releasing:
            releasing = set(self._releasing)
            _, late = await asyncio.wait(releasing, timeout=RELEASE_WAIT)
            for task in late:
                task.cancel()
            # Every one's end retrieved (no "exception was never retrieved" at exit).
            await asyncio.gather(*releasing, return_exceptions=True)
        if self._owned:
            await self._redis.aclose()

    def key_of(self, idempotency_key: str) -> str:
        """The Redis key that holds ``idempotency_key``'s claim or outcome."""
        return self._prefix + idempotency_key

    async def claim(
        self, key: str, fingerprint: str, department_uuid: str, user_uuid: str, *, token: str
    ) -> SendResult | None:
        """Claim ``key`` (None: send it now) or return/raise its recorded outcome.

        The claim carries ``token``: when its reply is lost and redis-py runs it
        again, the second run finds this very claim and ``read_record`` knows it
        for ours (send now). When no reply comes at all, or the send is cancelled
        while it waits for one, the claim may be stored though nothing will be
        sent: it is released (best effort; in the background for a cancel) before
        the ``CoordinationError`` (or the cancel) goes on, so a later send of the
        key is not blocked. A send of a key whose release is under way waits for it
        first: it would find that claim and take it for another sender's.
        """
        freeing = [task for task, of in self._releasing.items() if of == key]
        if freeing:
            await asyncio.wait(freeing)  # never cancels them: a cancel here leaves them be
        try:
            existing: Any = await self._claim(
                keys=[self.key_of(key)],
                args=[claim_record(fingerprint, token), round(self.ttl * 1000)],
            )
        except _REDIS_ERRORS as exc:
            error = _unavailable("the send guard", exc)
            with contextlib.suppress(CoordinationError):
                await self.release(key, fingerprint, token=token)
            raise error from exc
        except asyncio.CancelledError:
            # Cancelled mid-claim: the claim may be stored, and nothing will be sent. It
            # is freed in the background (only our own claim), not holding the cancel up.
            task = asyncio.ensure_future(self._release_quietly(key, fingerprint, token))
            self._releasing[task] = key
            task.add_done_callback(self._forget_release)
            raise
        if existing is None:
            return None
        if isinstance(existing, list):
            kind = existing[0] if existing else "?"
            if isinstance(kind, bytes):
                kind = kind.decode("ascii", "replace")
            unknown = DeliveryUnknownError(
                f"the record of this idempotency key in Redis is a {kind}, not a record "
                "(another writer's): the message may have been delivered",
                department_uuid=department_uuid,
                user_uuid=user_uuid,
            )
            unknown.idempotency_key = key
            raise unknown
        if not isinstance(existing, bytes | str):
            existing = b"?"
        return read_record(existing, key, fingerprint, department_uuid, user_uuid, token)

    async def record(
        self,
        key: str,
        fingerprint: str,
        result: SendResult | None,
        error: BotMessageError | None,
        *,
        token: str,
    ) -> None:
        """Replace this sender's claim (``token``) of ``key`` with the send's outcome."""
        await self._run_settle(key, fingerprint, token, outcome_record(fingerprint, result, error))

    async def release(self, key: str, fingerprint: str, *, token: str) -> None:
        """Free this sender's claim (``token``) of ``key``: certainly not delivered."""
        await self._run_settle(key, fingerprint, token, "")

    def _forget_release(self, task: asyncio.Task[None]) -> None:
        self._releasing.pop(task, None)

    async def _release_quietly(self, key: str, fingerprint: str, token: str) -> None:
        freed = False
        # Cancelled: ``aclose`` gave it up (RELEASE_WAIT), or the event loop is ending.
        why = "given up before Redis answered"
        try:
            await self.release(key, fingerprint, token=token)
            freed = True
        except CoordinationError as exc:
            why = str(exc)
        finally:
            if not freed:
                log.warning(
                    "could not free idempotency key %s after its send was cancelled before "
                    "sending (%s); a later send of this key will be told its delivery is "
                    "unknown",
                    key,
                    why,
                )

    async def _run_settle(self, key: str, fingerprint: str, token: str, record: str) -> None:
        try:
            await self._settle(
                keys=[self.key_of(key)],
                args=[fingerprint, record, round(self.ttl * 1000), token],
            )
        except _REDIS_ERRORS as exc:
            raise _unavailable("the send guard", exc) from exc
