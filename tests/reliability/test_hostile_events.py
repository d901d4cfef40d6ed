"""Property: faults on the wire plus hostile events on the client keep the delivery invariants.

Each example scripts the fake service's answer to every request (any ``Fault``)
and fires one client-side event when the service is handling the k-th request:
the caller's task cancelled, the client or a ``with_options`` view closed, a
callback raising. Then the report (or each ``send``'s answer) is compared with
the service's records: no message received under two keys, nothing FAILED or
SKIPPED that was received or got an ambiguous answer, SENT received, every
batch item accounted for once, and only the errors a caller may expect escape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

from hypothesis import given, settings
from hypothesis import strategies as st

from botmsg_async import (
    BotMessageClient,
    BotMessageError,
    DeliveryUnknownError,
    ItemResult,
    Outcome,
    RetryPolicy,
)
from botmsg_async.testing import FakeBotMessageServer, Fault, RequestInfo

from ..conftest import FakeClock  # pauses take no real time

#: Answers after which the client cannot know the message was not processed.
AMBIGUOUS_UNRECORDED = {Fault.DROP_BEFORE, Fault.HTTP_500, Fault.HTTP_502, Fault.HTTP_504}
Mode = Literal["send", "all", "failures", "none", "stream"]
Event = Literal["cancel", "aclose", "view_close", "on_result", "on_start", "on_retry"]


class CallerError(Exception):
    """The caller's own exception, raised from a callback."""


@settings(deadline=None, max_examples=150)
@given(
    script=st.lists(st.none() | st.sampled_from(list(Fault)), max_size=16),
    mode=st.sampled_from(["send", "all", "failures", "none", "stream"]),
    retry_ambiguous=st.booleans(),
    event=st.none()
    | st.sampled_from(["cancel", "aclose", "view_close", "on_result", "on_start", "on_retry"]),
    event_at=st.integers(1, 10),
    items=st.integers(1, 6),
    concurrency=st.integers(1, 4),
    through_view=st.booleans(),
)
async def test_hostile_events_keep_the_delivery_invariants(
    script: list[Fault | None],
    mode: Mode,
    retry_ambiguous: bool,
    event: Event | None,
    event_at: int,
    items: int,
    concurrency: int,
    through_view: bool,
) -> None:
    """Under scripted faults and a cancel, close or raising callback, no invariant breaks."""
    server = FakeBotMessageServer(retry_after="1", fault_latency=0.001, seed=1)
    await server.start()
    loop = asyncio.get_running_loop()
    ambiguous: set[str] = set()
    current: list[Fault | None] = [None]
    requests = 0
    runner: asyncio.Task[list[tuple[str, Outcome, BotMessageError | None]]] | None = None
    clock = FakeClock()
    closing: list[asyncio.Task[None]] = []  # the closes fired, awaited before the checks

    def on_retry(_: object) -> None:
        if event == "on_retry":
            raise CallerError("on_retry")

    client = BotMessageClient(
        server.base_url,
        server.username,
        server.password,
        retry=RetryPolicy(max_attempts=3, retry_ambiguous=retry_ambiguous),
        sleep=clock.sleep,
        clock=clock,
        on_retry=on_retry,
    )
    view = client.with_options(timeout=5.0) if through_view else client

    def fire() -> None:
        if event == "cancel" and runner is not None:
            runner.cancel()
        elif event == "aclose":
            closing.append(loop.create_task(client.aclose()))
        elif event == "view_close":
            closing.append(loop.create_task(view.aclose()))

    def tick(info: RequestInfo) -> bool:
        # The first rule, asked once per request: draws that request's fault.
        nonlocal requests
        current[0] = script[requests] if requests < len(script) else None
        requests += 1
        if current[0] in AMBIGUOUS_UNRECORDED:
            ambiguous.add(info.user_uuid)
        if requests == event_at:
            loop.call_soon(fire)
        return False

    server.inject(Fault.LATENCY, when=tick, times=None)

    def scripted(fault: Fault) -> Callable[[RequestInfo], bool]:
        return lambda _: current[0] is fault

    for fault in Fault:
        server.inject(fault, when=scripted(fault), times=None)

    rows = [(f"d{i % 2}", f"u{i}", f"message {i}") for i in range(items)]
    results = 0

    def on_result(_: object) -> None:
        nonlocal results
        results += 1
        if event == "on_result" and results == min(event_at, items):
            raise CallerError("on_result")

    def on_start(index: int, _: object) -> None:
        if event == "on_start" and index == min(event_at, items) - 1:
            raise CallerError("on_start")

    async def run() -> list[tuple[str, Outcome, BotMessageError | None]]:
        if mode == "send":

            async def one(row: tuple[str, str, str]) -> tuple[str, Outcome, BotMessageError | None]:
                try:
                    await view.send(*row)
                except DeliveryUnknownError as exc:
                    return row[1], Outcome.UNKNOWN, exc
                except BotMessageError as exc:  # any other error says "not delivered"
                    return row[1], Outcome.FAILED, exc
                return row[1], Outcome.SENT, None

            return list(await asyncio.gather(*(one(row) for row in rows)))
        if mode == "stream":
            seen: list[ItemResult] = []
            async with view.stream_many(
                rows, concurrency=concurrency, on_result=on_result, on_start=on_start
            ) as stream:
                async for item in stream:
                    seen.append(item)
            assert sorted(item.index for item in seen) == list(range(items))
            counts = stream.counts
            assert counts.sent + counts.failed + counts.unknown + counts.skipped == items
            return [(item.user_uuid, item.outcome, item.error) for item in seen]
        report = await view.send_many(
            rows, concurrency=concurrency, on_result=on_result, on_start=on_start, keep=mode
        )
        counts = report.counts
        assert counts.sent + counts.failed + counts.unknown + counts.skipped == items
        kept = list(report.results)
        if mode == "all":
            assert sorted(item.index for item in kept) == list(range(items))
        elif mode == "failures":
            assert sorted(item.index for item in kept) == sorted(
                item.index for item in kept if item.outcome is not Outcome.SENT
            )
            assert len(kept) == items - counts.sent
        return [(item.user_uuid, item.outcome, item.error) for item in kept]

    outcomes: list[tuple[str, Outcome, BotMessageError | None]] = []
    runner = asyncio.create_task(run())
    try:
        outcomes = await runner
    except CallerError:
        assert event in ("on_result", "on_start", "on_retry")
    except asyncio.CancelledError:
        assert event == "cancel"
    except BotMessageError:
        pass  # send_many on a client closed before it began
    finally:
        await asyncio.gather(*closing)
        await client.aclose()
        await server.close()  # every handler has finished: the records are complete

    received: dict[str, list[str | None]] = {}
    for message in server.messages:
        received.setdefault(message.user_uuid, []).append(message.idempotency_key)
    for user, keys in received.items():
        assert len(keys) == 1, f"{user} received under {keys}"
    for user, outcome, error in outcomes:
        if outcome is Outcome.SENT:
            assert user in received
        elif outcome is not Outcome.UNKNOWN:
            assert user not in received, (user, outcome, error)
            assert user not in ambiguous, (user, outcome, error)
