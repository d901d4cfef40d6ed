"""A taskiq worker that sends bot messages: one quota and at-most-once delivery for all workers.

Every worker process shares one ``RedisRateLimiter`` (one rate for the vendor
account, a 429 pauses every worker) and one ``RedisSendGuard``: the queue
delivers a job at least once (a redelivery after a crash or a timeout), and the
guard makes the message go out at most once, because each job sends under its
own idempotency key.

Run the workers (``--ack-type when_saved``, taskiq's default, acknowledges a job
only after it ran, so a killed worker's jobs are delivered again)::

    export BOTMSG_BASE_URL=https://api.example.com BOTMSG_USERNAME=bot BOTMSG_PASSWORD=...
    export BOTMSG_REDIS_URL=redis://localhost:6379/0 BOTMSG_RATE=100
    taskiq worker examples.taskiq_send:broker --workers 4

and enqueue from anywhere::

    await send_message.kiq("order-1234-shipped", department_uuid, user_uuid, "Your parcel ...")

Each job's outcome (``sent``, ``failed`` or ``unknown``) is stored in the Redis
hash ``OUTCOMES``. A job whose earlier run died mid-send ends ``unknown``: it
may have been delivered, and it is never sent again under a new key.
"""

from __future__ import annotations

import os

from redis.asyncio import Redis
from taskiq import Context, TaskiqDepends, TaskiqEvents, TaskiqState
from taskiq_redis import RedisStreamBroker

from botmsg_async import BotMessageClient, BotMessageError, DeliveryUnknownError
from botmsg_async.shared import RedisRateLimiter, RedisSendGuard

REDIS_URL = os.environ.get("BOTMSG_REDIS_URL", "redis://localhost:6379/0")
#: The hash of job id -> outcome.
OUTCOMES = "botmsg-example:outcomes"
#: The hash of job id -> how many times the job ran (redeliveries included).
RUNS = "botmsg-example:runs"
#: The set of worker pids that ran a job (the demo picks one to kill).
WORKERS = "botmsg-example:workers"


def make_broker(redis_url: str) -> RedisStreamBroker:
    """The queue: a Redis stream whose unacknowledged jobs go to another worker.

    ``BOTMSG_REDELIVER_AFTER`` (seconds, default 60) must exceed the longest a
    job may run, rate-limit waits included: past it the queue hands a job still
    running to another worker, and the guard then reports that copy ``unknown``.
    """
    return RedisStreamBroker(
        redis_url,
        queue_name="botmsg-example:jobs",
        idle_timeout=int(float(os.environ.get("BOTMSG_REDELIVER_AFTER", "60")) * 1000),
        unacknowledged_lock_timeout=5,
        xread_block=200,
    )


broker = make_broker(REDIS_URL)


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def startup(state: TaskiqState) -> None:
    """One client per worker process, sharing the quota and the guard through Redis."""
    base_url = os.environ["BOTMSG_BASE_URL"]
    username = os.environ["BOTMSG_USERNAME"]
    rate = float(os.environ.get("BOTMSG_RATE", "100"))
    state.redis = Redis.from_url(REDIS_URL)
    state.limiter = RedisRateLimiter(state.redis, rate=rate, base_url=base_url, username=username)
    state.guard = RedisSendGuard(state.redis, base_url=base_url, username=username)
    state.client = BotMessageClient(
        base_url,
        username,
        os.environ["BOTMSG_PASSWORD"],
        rate_limiter=state.limiter,
        send_guard=state.guard,
    )
    await state.redis.sadd(WORKERS, os.getpid())


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def shutdown(state: TaskiqState) -> None:
    """Close the client, then the limiter and the Redis connection."""
    await state.client.aclose()
    await state.limiter.aclose()
    await state.redis.aclose()


@broker.task
async def nudge() -> None:
    """A no-op job: it makes a worker look for jobs that a dead worker left unacknowledged.

    taskiq-redis 1.2 reclaims such jobs (``XAUTOCLAIM``) only after a read that
    returned new jobs, so a queue that went quiet needs one now and then
    (taskiq-redis PR #129 reworks this); a busy queue reclaims on its own.
    """


@broker.task
async def send_message(
    job_id: str,
    department_uuid: str,
    user_uuid: str,
    text: str,
    context: Context = TaskiqDepends(),  # noqa: B008 - taskiq's dependency injection
) -> str:
    """Send one message, at most once per ``job_id`` whatever the queue redelivers."""
    client: BotMessageClient = context.state.client
    try:
        await client.send(department_uuid, user_uuid, text, idempotency_key=f"job-{job_id}")
        outcome = "sent"
    except DeliveryUnknownError:
        outcome = "unknown"  # may have been delivered: never sent again
    except BotMessageError:
        # Certainly not delivered (a CoordinationError too: Redis was away, nothing
        # was sent); enqueue the job again to retry it under the same key.
        outcome = "failed"
    redis: Redis = context.state.redis
    await redis.hset(OUTCOMES, job_id, outcome)
    await redis.hincrby(RUNS, job_id, 1)
    return outcome
