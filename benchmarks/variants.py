"""The client variants, each run in a fresh process so its peak RSS is its own.

``python -m benchmarks.variants '<RunSpec as JSON>'`` runs one variant against
a running server and prints one JSON object (see ``RunResult``) on stdout.

What is measured, the same way for every variant:

* wall time and CPU time (``time.process_time``: this process, all threads)
  of the send phase only: from the first item pulled to the last result, with
  the session already built, so interpreter start-up and imports are left out;
* per-item latency: from the moment a worker pulls the item from the input
  to the moment its result is known. The input generator stamps the pull time
  and the result handler (``on_result`` for the SDK, the pool loop for the raw
  clients) computes the difference, so the SDK's own work per item (checks,
  encoding, retries, result objects) counts, as a caller would see it;
* peak RSS of the whole process, at the end: ``VmHWM`` from ``/proc/self/status``
  where there is one. Not ``ru_maxrss``: Linux carries it over ``fork`` and
  ``exec``, so a child would report at least the harness's own RSS at the fork.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Literal

import aiohttp
from attrs import asdict, define

import botmsg_async

__all__ = ["VARIANTS", "Counts", "Recorder", "RunResult", "RunSpec", "make_items", "run_pool"]

Item = tuple[str, str, str]

USERNAME = "bench-bot"
PASSWORD = "bench-password"  # noqa: S105 - the loopback server checks nothing
DEPARTMENT = "5b0e8a4c-2f6d-4c1a-9e3b-7d8f0a1b2c3d"
# A fixed set of user ids, built once: making a uuid per item would cost the
# generator more than some of the clients spend per request.
USERS = tuple(f"00000000-0000-4000-8000-{i:012d}" for i in range(1000))
TEXT = "Your parcel has arrived at the pick-up point and will be kept for 7 days."


@define(frozen=True)
class RunSpec:
    """One run of one variant.

    Attributes:
        variant: A key of ``VARIANTS``.
        base_url: The server's ``http://127.0.0.1:PORT``.
        n: Messages to send.
        concurrency: Requests in flight at once.
        latency: Record per-item latency (costs 16 bytes per item, so the memory
            scenario turns it off).
        uvloop: Run on uvloop instead of asyncio's default loop.
        cpu: Pin the run to this CPU (``sched_setaffinity``), or None.
    """

    variant: str
    base_url: str
    n: int
    concurrency: int
    latency: bool = True
    uvloop: bool = False
    cpu: int | None = None


@define(frozen=True)
class Counts:
    """What became of the messages of one run."""

    sent: int
    not_sent: int
    retries: int = 0


@define(frozen=True)
class RunResult:
    """The measurements of one run (all JSON-friendly).

    Attributes:
        variant: The variant that ran.
        n: Messages in the input.
        sent: Messages answered SUCCESS.
        not_sent: Messages that ended otherwise.
        retries: Extra HTTP attempts (the SDK only).
        wall_s: Seconds of the send phase.
        msgs_per_s: ``n / wall_s``.
        cpu_s: CPU seconds of this process in the send phase.
        cpu_us_per_msg: ``cpu_s / n`` in microseconds.
        p50_ms: Median per-item latency (None when not recorded).
        p99_ms: 99th percentile per-item latency (None when not recorded).
        baseline_rss_mb: Peak RSS before the send phase (interpreter and imports).
        peak_rss_mb: Peak RSS of the process at the end.
        loop: ``"uvloop"`` or ``"asyncio"``.
        gc_collections: Garbage collections in the send phase, per generation.
        gc_us_per_msg: Time spent in them, µs per message.
        malloc_tunables: ``GLIBC_TUNABLES`` of the run, if any.
    """

    variant: str
    n: int
    sent: int
    not_sent: int
    retries: int
    wall_s: float
    msgs_per_s: float
    cpu_s: float
    cpu_us_per_msg: float
    p50_ms: float | None
    p99_ms: float | None
    baseline_rss_mb: float
    peak_rss_mb: float
    loop: str
    gc_collections: list[int]
    gc_us_per_msg: float
    malloc_tunables: str | None


def make_items(n: int) -> Iterator[Item]:
    """Yield ``n`` ``(department, user, text)`` tuples, lazily."""
    users = USERS
    count = len(users)
    for i in range(n):
        yield (DEPARTMENT, users[i % count], TEXT)


class Recorder:
    """Per-item latency: stamped when an item is pulled, read when it is done.

    Args:
        n: Items in the input.
        enabled: Record at all; when False, ``timed`` passes items through and
            ``finish`` does nothing, so memory stays flat.
    """

    def __init__(self, n: int, enabled: bool) -> None:
        self.enabled = enabled
        self._starts = [0.0] * n if enabled else []
        self._latencies = [0.0] * n if enabled else []

    def timed(self, items: Iterator[Item]) -> Iterator[Item]:
        """Wrap ``items``, stamping the time each one is pulled by a worker."""
        if not self.enabled:
            return items
        return self._stamp(items)

    def _stamp(self, items: Iterator[Item]) -> Iterator[Item]:
        starts = self._starts
        clock = time.perf_counter
        for index, item in enumerate(items):
            # Runs inside the worker's next(): the stamp is the pull time.
            starts[index] = clock()
            yield item

    def finish(self, index: int) -> None:
        """Record that item ``index`` has its result now."""
        if self.enabled:
            self._latencies[index] = time.perf_counter() - self._starts[index]

    def percentiles_ms(self) -> tuple[float | None, float | None]:
        """Return the p50 and p99 latencies in milliseconds (None when disabled)."""
        if not self._latencies:
            return None, None
        ordered = sorted(self._latencies)
        last = len(ordered) - 1
        return ordered[round(0.5 * last)] * 1000, ordered[round(0.99 * last)] * 1000


class Meter:
    """Wall and CPU time of a ``with`` block (the send phase of one run), and its GC time."""

    wall = 0.0
    cpu = 0.0

    def __init__(self) -> None:
        self.gc_seconds = 0.0
        self.gc_collections = [0, 0, 0]
        self._gc_started = 0.0
        self._on = False

    def _gc_callback(self, phase: str, info: dict[str, int]) -> None:
        # gc calls this around every automatic collection: the time between the
        # two calls is what keeping objects alive costs the run.
        if not self._on:
            return
        if phase == "start":
            self._gc_started = time.process_time()
        else:
            self.gc_seconds += time.process_time() - self._gc_started
            self.gc_collections[info["generation"]] += 1

    def __enter__(self) -> None:
        # A collection left over from set-up should not land in the measurement.
        gc.collect()
        gc.callbacks.append(self._gc_callback)
        self._on = True
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self._wall0
        self.cpu = time.process_time() - self._cpu0
        self._on = False
        gc.callbacks.remove(self._gc_callback)


async def run_pool(
    items: Iterator[Item],
    concurrency: int,
    send_one: Callable[[Item], Awaitable[bool]],
    recorder: Recorder,
) -> Counts:
    """The raw clients' worker pool: ``concurrency`` tasks over one shared iterator.

    The same shape as the SDK's pool (no task per item, input read lazily), so
    the comparison is of the per-request work, not of the scheduling.

    Args:
        items: The input; each worker pulls the next item when it is free.
        concurrency: Number of workers.
        send_one: Sends one item; returns whether the answer was SUCCESS.
        recorder: Told when each item is done.

    Returns:
        How many items were sent and how many were not.
    """
    numbered = enumerate(items)
    sent = 0
    not_sent = 0

    async def worker() -> None:
        nonlocal sent, not_sent
        for index, item in numbered:
            if await send_one(item):
                sent += 1
            else:
                not_sent += 1
            recorder.finish(index)

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return Counts(sent, not_sent)


# -- the raw clients: what a hand-written loop would do ---------------------------

_AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()}


def _raw_request(base_url: str, item: Item) -> tuple[str, dict[str, Any]]:
    dept, user, text = item
    url = f"{base_url}/communications/department/{dept}/user/{user}/botmessage/send"
    body = {
        "messageAttributes": {
            "body": text,
            "type": "DRAFT",
            "purpose": "F",
            "isManual": True,
            "protocol": "TEXT",
            "numberOfMessageAttachments": 0,
        }
    }
    return url, body


async def raw_aiohttp(spec: RunSpec, recorder: Recorder, meter: Meter) -> Counts:
    """A plain aiohttp loop: post JSON, read JSON, no retries, no models; answers dropped."""
    return await _raw_aiohttp(spec, recorder, meter, None)


async def raw_aiohttp_keep(spec: RunSpec, recorder: Recorder, meter: Meter) -> Counts:
    """The same loop keeping every answer in a list, as ``send_many(keep="all")`` does."""
    kept: list[Any] = []
    return await _raw_aiohttp(spec, recorder, meter, kept)


async def _raw_aiohttp(
    spec: RunSpec, recorder: Recorder, meter: Meter, kept: list[Any] | None
) -> Counts:
    # The default connector allows 100 connections: size it to the concurrency.
    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send_one(item: Item) -> bool:
            url, body = _raw_request(spec.base_url, item)
            async with session.post(url, json=body, headers=_AUTH) as response:
                data = await response.json()
            if kept is not None:
                kept.append(data)
            return response.status == 200 and data.get("status") == "SUCCESS"

        with meter:
            return await run_pool(
                recorder.timed(make_items(spec.n)), spec.concurrency, send_one, recorder
            )


async def raw_httpx(spec: RunSpec, recorder: Recorder, meter: Meter) -> Counts:
    """The same loop on ``httpx.AsyncClient``, its pool sized to the concurrency."""
    import httpx

    limits = httpx.Limits(
        max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency
    )
    async with httpx.AsyncClient(limits=limits, timeout=30.0, trust_env=False) as client:

        async def send_one(item: Item) -> bool:
            url, body = _raw_request(spec.base_url, item)
            response = await client.post(url, json=body, headers=_AUTH)
            return response.status_code == 200 and response.json().get("status") == "SUCCESS"

        with meter:
            return await run_pool(
                recorder.timed(make_items(spec.n)), spec.concurrency, send_one, recorder
            )


# -- the SDK ----------------------------------------------------------------------


def _sdk_client(spec: RunSpec, **options: Any) -> botmsg_async.BotMessageClient:
    return botmsg_async.BotMessageClient(spec.base_url, USERNAME, PASSWORD, **options)


async def _send_many(
    spec: RunSpec,
    recorder: Recorder,
    meter: Meter,
    client: botmsg_async.BotMessageClient,
    keep: Literal["all", "failures", "none"] = "all",
) -> Counts:
    async with client:
        on_result = _finisher(recorder)
        with meter:
            report = await client.send_many(
                recorder.timed(make_items(spec.n)),
                concurrency=spec.concurrency,
                on_result=on_result,
                keep=keep,
            )
    return Counts(report.sent, report.total - report.sent, report.retries)


async def sdk_send_many(spec: RunSpec, recorder: Recorder, meter: Meter) -> Counts:
    """``client.send_many(items, concurrency=C)`` with default settings (retries on)."""
    return await _send_many(spec, recorder, meter, _sdk_client(spec))


async def sdk_keep_none(spec: RunSpec, recorder: Recorder, meter: Meter) -> Counts:
    """``send_many(..., keep="none")``: only the counts are kept."""
    return await _send_many(spec, recorder, meter, _sdk_client(spec), keep="none")


async def sdk_zero_backoff(spec: RunSpec, recorder: Recorder, meter: Meter) -> Counts:
    """``send_many`` retrying at once, with a retry budget that never runs out.

    ``max_attempts=8``: with 1 answer in 5 a FAILURE, 4 attempts would leave
    about 0.2**4 = 0.16% of the messages unsent by chance; 8 leave next to none,
    so every run sends everything and runs compare.
    """
    policy = botmsg_async.RetryPolicy(backoff_initial=0.0, backoff_max=0.0, max_attempts=8)
    budget = botmsg_async.RetryBudget(ratio=1.0)
    client = _sdk_client(spec, retry=policy, retry_budget=budget)
    return await _send_many(spec, recorder, meter, client)


async def sdk_stream(spec: RunSpec, recorder: Recorder, meter: Meter) -> Counts:
    """``stream_many`` over a generator, each result counted and dropped."""
    sent = not_sent = retries = 0
    async with _sdk_client(spec) as client:
        with meter:
            async with client.stream_many(
                recorder.timed(make_items(spec.n)),
                concurrency=spec.concurrency,
                on_result=_finisher(recorder),
            ) as results:
                async for item in results:
                    if item.outcome is botmsg_async.Outcome.SENT:
                        sent += 1
                    else:
                        not_sent += 1
                    retries += item.attempts - 1 if item.attempts > 1 else 0
    return Counts(sent, not_sent, retries)


def _finisher(recorder: Recorder) -> Callable[[botmsg_async.ItemResult], None] | None:
    if not recorder.enabled:
        return None
    finish = recorder.finish

    def on_result(item: botmsg_async.ItemResult) -> None:
        finish(item.index)

    return on_result


VARIANTS: dict[str, Callable[[RunSpec, Recorder, Meter], Coroutine[Any, Any, Counts]]] = {
    "sdk": sdk_send_many,
    "sdk_keep_none": sdk_keep_none,
    "sdk_zero_backoff": sdk_zero_backoff,
    "sdk_stream": sdk_stream,
    "aiohttp": raw_aiohttp,
    "aiohttp_keep": raw_aiohttp_keep,
    "httpx": raw_httpx,
}


def peak_rss_kb() -> int:
    """This process's peak RSS in KiB since its ``exec``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    # Elsewhere ru_maxrss (KiB on Linux, bytes on macOS; this fallback is for Linux
    # without /proc mounted) is the best there is.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(spec: RunSpec) -> RunResult:
    """Run one variant in this process and measure it."""
    if spec.cpu is not None:
        os.sched_setaffinity(0, {spec.cpu})
    recorder = Recorder(spec.n, spec.latency)
    meter = Meter()
    loop_factory = None
    if spec.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    baseline_kb = peak_rss_kb()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        counts = runner.run(VARIANTS[spec.variant](spec, recorder, meter))
    peak_kb = peak_rss_kb()
    p50, p99 = recorder.percentiles_ms()
    return RunResult(
        variant=spec.variant,
        n=spec.n,
        sent=counts.sent,
        not_sent=counts.not_sent,
        retries=counts.retries,
        wall_s=meter.wall,
        msgs_per_s=spec.n / meter.wall if meter.wall else 0.0,
        cpu_s=meter.cpu,
        cpu_us_per_msg=meter.cpu / spec.n * 1e6 if spec.n else 0.0,
        p50_ms=p50,
        p99_ms=p99,
        baseline_rss_mb=baseline_kb / 1024,
        peak_rss_mb=peak_kb / 1024,
        loop="uvloop" if spec.uvloop else "asyncio",
        gc_collections=meter.gc_collections,
        gc_us_per_msg=meter.gc_seconds / spec.n * 1e6 if spec.n else 0.0,
        malloc_tunables=os.environ.get("GLIBC_TUNABLES"),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the ``RunSpec`` given as JSON in ``argv[0]``; print the result as JSON."""
    args = sys.argv[1:] if argv is None else argv
    spec = RunSpec(**json.loads(args[0]))
    print(json.dumps(asdict(run(spec))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
