"""OpenTelemetry: spans and metrics read back from the SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.metrics import NoOpMeter, NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

from botmsg_async import (
    BotMessageClient,
    LocalRateLimiter,
    RetryEvent,
    RetryPolicy,
    ServerError,
    TextMessage,
    TransportError,
)
from botmsg_async._observe import Observer
from botmsg_async.otel import Telemetry

from .conftest import DEPT, PASSWORD, USER, ScriptedServer, Sleeps, answer, slow

TEXT = "the message text, never recorded"
ROUTE = "/communications/department/{department_uuid}/user/{user_uuid}/botmessage/send"
#: The only attribute keys a metric may carry: none names a department, user or key.
METRIC_KEYS = {"botmsg.outcome", "botmsg.status_class", "error.type"}


class Recorded:
    """An SDK tracer and meter provider writing to memory, and what they recorded."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )

    def finished(self, name: str) -> list[ReadableSpan]:
        """Ended spans called ``name``, in the order they ended."""
        return [span for span in self.spans.get_finished_spans() if span.name == name]

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """The data points of metric ``name`` by attribute set (sums, or histogram points)."""
        data = self.reader.get_metrics_data()
        found: dict[frozenset[tuple[str, Any]], Any] = {}
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        attributes = frozenset((point.attributes or {}).items())
                        found[attributes] = getattr(point, "value", point)
        return found

    def all_metric_keys(self) -> set[str]:
        """Every attribute key any metric data point carries."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            key
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            for point in metric.data.data_points
            for key in (point.attributes or {})
        }


def number(value: object) -> float:
    """``value``, checked to be a non-negative number (an attribute read back)."""
    assert isinstance(value, int | float)
    assert value >= 0
    return value


def attrs(**values: Any) -> frozenset[tuple[str, Any]]:
    """A metric attribute set, dotted names spelled with "__" for "."."""
    return frozenset((key.replace("__", "."), value) for key, value in values.items())


@pytest.fixture
def recorded(caplog: pytest.LogCaptureFixture) -> Iterator[Recorded]:
    """Fresh in-memory providers for one test; OpenTelemetry must log no error meanwhile."""
    rec = Recorded()
    with caplog.at_level(logging.WARNING, logger="opentelemetry"):
        yield rec
    rec.tracer_provider.shutdown()
    rec.meter_provider.shutdown()
    # e.g. "Failed to detach context": a span made current in one context, ended in another.
    assert [r for r in caplog.records if r.name.startswith("opentelemetry")] == []


def no_text_anywhere(span: ReadableSpan) -> None:
    """Neither the message text nor the password appears in a span or its events."""
    values = [*(span.attributes or {}).values()]
    for event in span.events:
        values.extend((event.attributes or {}).values())
    values.append(span.status.description)
    for value in values:
        assert TEXT not in str(value)
        assert PASSWORD not in str(value)


async def test_one_send_is_one_span_with_http_attributes(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], recorded: Recorded
) -> None:
    """A SENT send: one botmsg.send span, one attempt event, and its metrics."""
    async with make_client(server.base_url, telemetry=recorded.telemetry) as client:
        result = await client.send(DEPT, USER, TextMessage(TEXT), idempotency_key="key-1")
    assert result.attempts == 1
    [span] = recorded.finished("botmsg.send")
    port = int(server.base_url.rsplit(":", 1)[1])
    assert span.kind is trace.SpanKind.INTERNAL
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "url.template": ROUTE,
        "server.address": "127.0.0.1",
        "server.port": port,
        "botmsg.department_uuid": DEPT,
        "botmsg.user_uuid": USER,
        "botmsg.idempotency_key": "key-1",
        "botmsg.outcome": "sent",
        "botmsg.attempts": 1,
        "http.response.status_code": 200,
    }
    assert span.status.status_code is StatusCode.UNSET
    [event] = span.events
    assert event.name == "botmsg.attempt"
    event_attributes = dict(event.attributes or {})
    number(event_attributes.pop("botmsg.attempt.duration"))
    assert event_attributes == {
        "botmsg.attempt": 1,
        "botmsg.attempt.wait": 0.0,
        "http.response.status_code": 200,
    }
    no_text_anywhere(span)
    assert recorded.points("botmsg.client.sends") == {attrs(botmsg__outcome="sent"): 1}
    assert recorded.points("botmsg.client.attempts") == {attrs(botmsg__status_class="2xx"): 1}
    assert recorded.points("botmsg.client.retries") == {}
    [duration] = recorded.points("botmsg.client.send.duration").items()
    assert duration[0] == attrs(botmsg__outcome="sent")
    assert duration[1].count == 1
    assert recorded.points("botmsg.client.active_sends") == {frozenset(): 0}


async def test_a_retried_send_has_an_event_per_attempt_with_its_wait(
    server: ScriptedServer,
    make_client: Callable[..., BotMessageClient],
    recorded: Recorded,
    sleeps: Sleeps,
) -> None:
    """503 then 200: one span, two attempt events (the second with its wait), one retry."""
    server.script = [answer(503, {"error": "busy"})]
    async with make_client(server.base_url, telemetry=recorded.telemetry) as client:
        result = await client.send(DEPT, USER, TEXT)
    assert result.attempts == 2
    [span] = recorded.finished("botmsg.send")
    attributes = span.attributes or {}
    assert attributes["botmsg.outcome"] == "sent"
    assert attributes["botmsg.attempts"] == 2
    assert attributes["http.response.status_code"] == 200
    assert "error.type" not in attributes
    assert attributes["botmsg.idempotency_key"] == server.seen[0][1]["Idempotency-Key"]
    first, second = (dict(event.attributes or {}) for event in span.events)
    assert first["http.response.status_code"] == 503
    assert first["error.type"] == "APIStatusError"
    assert first["botmsg.attempt.wait"] == 0.0
    assert second["botmsg.attempt"] == 2
    assert second["http.request.resend_count"] == 1
    assert second["botmsg.attempt.wait"] == sleeps.waits[0]
    assert "error.type" not in second
    assert recorded.points("botmsg.client.retries") == {attrs(error__type="APIStatusError"): 1}
    assert recorded.points("botmsg.client.attempts") == {
        attrs(botmsg__status_class="5xx", error__type="APIStatusError"): 1,
        attrs(botmsg__status_class="2xx"): 1,
    }
    assert recorded.points("botmsg.client.sends") == {attrs(botmsg__outcome="sent"): 1}


async def test_an_unknown_outcome_is_an_error_span_and_counted_unknown(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], recorded: Recorded
) -> None:
    """HTTP 500: outcome unknown, error.type ServerError, the span's status ERROR."""
    server.script = [answer(500, f"echo: {TEXT}")]
    async with make_client(server.base_url, telemetry=recorded.telemetry) as client:
        with pytest.raises(ServerError):
            await client.send(DEPT, USER, TEXT)
    [span] = recorded.finished("botmsg.send")
    attributes = span.attributes or {}
    assert attributes["botmsg.outcome"] == "unknown"
    assert attributes["error.type"] == "ServerError"
    assert attributes["http.response.status_code"] == 500
    assert attributes["botmsg.attempts"] == 1
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ServerError"
    no_text_anywhere(span)  # the answer echoed the text: the error's type is kept, not its words
    assert recorded.points("botmsg.client.sends") == {attrs(botmsg__outcome="unknown"): 1}
    assert recorded.points("botmsg.client.retries") == {}
    assert recorded.points("botmsg.client.active_sends") == {frozenset(): 0}


async def test_no_answer_has_no_status_and_a_failed_outcome(
    make_client: Callable[..., BotMessageClient], recorded: Recorded
) -> None:
    """A refused connection: no status code, status class "none", outcome failed."""
    async with make_client(
        "http://127.0.0.1:9", telemetry=recorded.telemetry, retry=RetryPolicy(max_attempts=2)
    ) as client:
        with pytest.raises(TransportError):
            await client.send(DEPT, USER, TEXT)
    [span] = recorded.finished("botmsg.send")
    attributes = span.attributes or {}
    assert attributes["botmsg.outcome"] == "failed"
    assert "http.response.status_code" not in attributes
    keys = recorded.points("botmsg.client.attempts")
    assert keys == {attrs(botmsg__status_class="none", error__type="TransportError"): 2}
    assert attributes["botmsg.attempts"] == 2
    assert recorded.points("botmsg.client.retries") == {attrs(error__type="TransportError"): 1}


async def test_a_batch_is_the_parent_of_its_sends(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], recorded: Recorded
) -> None:
    """send_many: one botmsg.send_many span with the counts, parent of every send span."""
    server.script = [answer(200), answer(400, {"error": "bad"}), answer(200)]
    items = [(DEPT, USER, TEXT)] * 3
    async with make_client(server.base_url, telemetry=recorded.telemetry) as client:
        report = await client.send_many(items, concurrency=1, rate_limit=1000)
    assert (report.sent, report.failed) == (2, 1)
    [batch] = recorded.finished("botmsg.send_many")
    sends = recorded.finished("botmsg.send")
    assert len(sends) == 3
    assert batch.context is not None
    assert {span.parent.span_id for span in sends if span.parent} == {batch.context.span_id}
    assert {span.context.trace_id for span in sends if span.context} == {batch.context.trace_id}
    assert dict(batch.attributes or {}) == {
        "botmsg.batch.concurrency": 1,
        "botmsg.batch.sent": 2,
        "botmsg.batch.failed": 1,
        "botmsg.batch.unknown": 0,
        "botmsg.batch.skipped": 0,
        "botmsg.batch.retries": 0,
    }
    assert batch.status.status_code is StatusCode.UNSET
    assert recorded.points("botmsg.client.sends") == {
        attrs(botmsg__outcome="sent"): 2,
        attrs(botmsg__outcome="failed"): 1,
    }
    # The batch's own rate limit: one wait recorded per item.
    [wait] = recorded.points("botmsg.client.rate_limiter.wait").values()
    assert wait.count == 3
    assert recorded.all_metric_keys() <= METRIC_KEYS


async def test_a_stream_stopped_early_is_a_cancelled_batch(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], recorded: Recorded
) -> None:
    """stream_many left after one result: a botmsg.stream_many span marked cancelled."""
    items = [(DEPT, USER, TEXT)] * 5
    client = make_client(server.base_url, telemetry=recorded.telemetry)
    async with client, client.stream_many(items, concurrency=1) as stream:
        async for _ in stream:
            break
    [batch] = recorded.finished("botmsg.stream_many")
    attributes = batch.attributes or {}
    assert attributes["botmsg.batch.cancelled"] is True
    assert number(attributes["botmsg.batch.sent"]) >= 1
    assert recorded.points("botmsg.client.active_sends") == {frozenset(): 0}


async def test_a_batch_stopped_by_refused_credentials_says_why(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], recorded: Recorded
) -> None:
    """A 401 stops the batch: the span names it in botmsg.batch.stopped_by."""
    server.default = answer(401, {"error": "no"})
    async with make_client(server.base_url, telemetry=recorded.telemetry) as client:
        report = await client.send_many([(DEPT, USER, TEXT)] * 3, concurrency=1)
    assert report.skipped == 2
    [batch] = recorded.finished("botmsg.send_many")
    attributes = batch.attributes or {}
    assert attributes["botmsg.batch.stopped_by"] == "AuthenticationError"
    assert attributes["botmsg.batch.skipped"] == 2


async def test_the_client_rate_limiter_wait_is_in_the_span(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], recorded: Recorded
) -> None:
    """A client-level rate limiter: its wait is a span attribute and a histogram point."""
    limiter = LocalRateLimiter(rate=1000)
    async with make_client(
        server.base_url, telemetry=recorded.telemetry, rate_limiter=limiter
    ) as client:
        await client.send(DEPT, USER, TEXT)
    [span] = recorded.finished("botmsg.send")
    number((span.attributes or {})["botmsg.rate_limiter.wait"])
    [wait] = recorded.points("botmsg.client.rate_limiter.wait").values()
    assert wait.count == 1


async def test_the_send_span_is_current_while_it_runs(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], recorded: Recorded
) -> None:
    """Code run inside a send (here on_retry) sees botmsg.send as the current span."""
    server.script = [answer(503, {"error": "busy"})]
    seen: list[trace.Span] = []

    def on_retry(event: RetryEvent) -> None:
        seen.append(trace.get_current_span())

    async with make_client(
        server.base_url, telemetry=recorded.telemetry, on_retry=on_retry
    ) as client:
        await client.send(DEPT, USER, TEXT)
    [span] = recorded.finished("botmsg.send")
    assert [s.get_span_context().span_id for s in seen] == [span.context.span_id]
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached afterwards


async def test_a_cancelled_send_ends_its_span(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient], recorded: Recorded
) -> None:
    """A send cancelled mid-attempt: its span ends with outcome cancelled, nothing in flight."""
    arrived = asyncio.Event()

    async def hold(request: Any) -> Any:
        arrived.set()
        return await slow(60)(request)

    server.script = [hold]
    async with make_client(server.base_url, telemetry=recorded.telemetry) as client:
        task = asyncio.create_task(client.send(DEPT, USER, TEXT))
        await arrived.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    [span] = recorded.finished("botmsg.send")
    attributes = span.attributes or {}
    assert attributes["botmsg.outcome"] == "cancelled"
    assert attributes["error.type"] == "CancelledError"
    assert [dict(e.attributes or {})["error.type"] for e in span.events] == ["CancelledError"]
    assert recorded.points("botmsg.client.sends") == {attrs(botmsg__outcome="cancelled"): 1}
    assert recorded.points("botmsg.client.active_sends") == {frozenset(): 0}


async def test_sampled_out_sends_record_metrics_and_no_spans(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient]
) -> None:
    """With a sampler that drops every span, the metrics still count each send and retry."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    rec = Recorded()
    rec.telemetry = Telemetry(tracer_provider=tracer_provider, meter_provider=rec.meter_provider)
    server.script = [answer(503, {"error": "busy"})]
    async with make_client(server.base_url, telemetry=rec.telemetry) as client:
        await client.send(DEPT, USER, TEXT)
    assert exporter.get_finished_spans() == ()
    assert rec.points("botmsg.client.sends") == {attrs(botmsg__outcome="sent"): 1}
    assert rec.points("botmsg.client.retries") == {attrs(error__type="APIStatusError"): 1}
    rec.meter_provider.shutdown()
    tracer_provider.shutdown()


def test_the_default_path_never_imports_opentelemetry(tmp_path: Any) -> None:
    """Without telemetry, import, send and send_many load no opentelemetry module."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        import botmsg_async
        from botmsg_async.testing import FakeBotMessageServer

        async def main():
            async with FakeBotMessageServer(username="u", password="p") as server:
                async with botmsg_async.BotMessageClient(server.base_url, "u", "p") as client:
                    await client.send({DEPT!r}, {USER!r}, "hi")
                    report = await client.send_many([({DEPT!r}, {USER!r}, "hi")] * 3)
                    assert report.sent == 3, report

        asyncio.run(main())
        loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
        assert not loaded, loaded
        print("ok")
        """
    )
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_telemetry_is_an_observer() -> None:
    """Telemetry meets the client's Observer protocol (mypy checks the assignment)."""
    observer: Observer = Telemetry(tracer_provider=TracerProvider(), meter_provider=MeterProvider())
    assert repr(observer) == "<botmsg_async.otel.Telemetry>"


def test_the_overhead_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/telemetry_overhead.py runs its variants and prints a line for each."""
    from benchmarks.telemetry_overhead import main

    assert main(["--sends", "20", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["off", "noop", "otel"]


class FailingProcessor(SpanProcessor):
    """A span processor that raises where it is told to (a buggy exporter pipeline)."""

    def __init__(self, *, on_start: bool = False, on_end: bool = False) -> None:
        self.fail_start = on_start
        self.fail_end = on_end

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.fail_start:
            raise RuntimeError("span processor failed on start")

    def on_end(self, span: ReadableSpan) -> None:
        if self.fail_end:
            raise RuntimeError("span processor failed on end")


class FailingInstrument:
    """A metric instrument that raises on its first ``fails`` measurements (None: on all)."""

    def __init__(self, real: Any, fails: int | None) -> None:
        self.real = real
        self.fails = fails

    def _fail(self) -> None:
        if self.fails is None or self.fails > 0:
            self.fails = None if self.fails is None else self.fails - 1
            raise RuntimeError("meter failed")

    def add(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        self._fail()
        self.real.add(amount, attributes)

    def record(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        self._fail()
        self.real.record(amount, attributes)


class FailingMeterProvider(NoOpMeterProvider):
    """Wraps an SDK meter provider: the instruments named in ``fails`` raise (see above)."""

    def __init__(self, real: MeterProvider, fails: Mapping[str, int | None]) -> None:
        self.real = real
        self.fails = fails

    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        real = self.real.get_meter(name, *args, **kwargs)
        fails = self.fails

        class Meter(NoOpMeter):
            def _wrap(self, made: Any, *args: Any) -> Any:
                return FailingInstrument(made, fails[args[0]]) if args[0] in fails else made

            def create_counter(self, *args: Any, **kwargs: Any) -> Any:
                return self._wrap(real.create_counter(*args, **kwargs), *args)

            def create_up_down_counter(self, *args: Any, **kwargs: Any) -> Any:
                return self._wrap(real.create_up_down_counter(*args, **kwargs), *args)

            def create_histogram(self, *args: Any, **kwargs: Any) -> Any:
                return self._wrap(real.create_histogram(*args, **kwargs), *args)

        return Meter(name)


ALL_METRICS = (
    "botmsg.client.sends",
    "botmsg.client.attempts",
    "botmsg.client.retries",
    "botmsg.client.send.duration",
    "botmsg.client.rate_limiter.wait",
    "botmsg.client.active_sends",
)


def broken_telemetry(where: str, spans: InMemorySpanExporter) -> tuple[Telemetry, Recorded]:
    """A Telemetry whose tracer (span start or end) or meter raises; spans still exported."""
    rec = Recorded()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer_provider.add_span_processor(
        FailingProcessor(on_start=where == "start", on_end=where == "end")
    )
    meters: metrics.MeterProvider = rec.meter_provider
    if where == "meter":
        meters = FailingMeterProvider(rec.meter_provider, dict.fromkeys(ALL_METRICS))
    return Telemetry(tracer_provider=tracer_provider, meter_provider=meters), rec


@pytest.mark.parametrize("where", ["start", "end", "meter"])
async def test_a_failing_tracer_or_meter_never_changes_a_send(
    server: ScriptedServer,
    make_client: Callable[..., BotMessageClient],
    where: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Span start, span end or a metric raising: sends and batches end as without telemetry."""
    caplog.set_level(logging.WARNING, logger="botmsg_async.otel")
    spans = InMemorySpanExporter()
    telemetry, rec = broken_telemetry(where, spans)
    server.script = [answer(503, {"error": "busy"}), answer(200), answer(500, {"error": "x"})]
    async with make_client(
        server.base_url, telemetry=telemetry, retry=RetryPolicy(max_attempts=2)
    ) as client:
        first = await client.send(DEPT, USER, TEXT)
        with pytest.raises(ServerError):  # the span's failure does not replace the send's own
            await client.send(DEPT, USER, TEXT, retry=RetryPolicy.none())
        # The failed send's span is not left current: the next one is no child of it.
        assert trace.get_current_span() is trace.INVALID_SPAN
        report = await client.send_many([(DEPT, USER, TEXT)] * 3, concurrency=2)
        assert trace.get_current_span() is trace.INVALID_SPAN
    assert first.attempts == 2
    assert report.sent == 3
    assert len(server.seen) == 6
    ended = spans.get_finished_spans()
    if where != "start":  # a span that failed to start is not recorded
        [batch] = [s for s in ended if s.name == "botmsg.send_many"]
        assert batch.parent is None
        assert batch.context is not None
        sends = [s for s in ended if s.name == "botmsg.send"]
        parents = [s.parent.span_id if s.parent else None for s in sends]
        assert parents == [None, None] + [batch.context.span_id] * 3
        # A failing meter costs no part of the trace.
        assert (sends[0].attributes or {})["botmsg.outcome"] == "sent"
        assert len(sends[0].events) == 2
    if where != "meter":
        assert rec.points("botmsg.client.active_sends") in ({}, {frozenset(): 0})
    # Said once, at WARNING, with the traceback; the rest at DEBUG.
    [warning] = [r for r in caplog.records if r.name == "botmsg_async.otel"]
    assert warning.levelno == logging.WARNING
    assert warning.exc_info is not None
    rec.meter_provider.shutdown()


async def test_a_failing_gauge_update_does_not_drift_it(
    server: ScriptedServer, make_client: Callable[..., BotMessageClient]
) -> None:
    """A send whose sends counter (then the gauge itself) raised still leaves the gauge at 0."""
    for fails in ({"botmsg.client.sends": 1}, {"botmsg.client.active_sends": 1}):
        rec = Recorded()
        telemetry = Telemetry(
            tracer_provider=rec.tracer_provider,
            meter_provider=FailingMeterProvider(rec.meter_provider, fails),
        )
        async with make_client(server.base_url, telemetry=telemetry) as client:
            await client.send(DEPT, USER, TEXT)
            await client.send(DEPT, USER, TEXT)
        assert rec.points("botmsg.client.active_sends") == {frozenset(): 0}, fails
        rec.meter_provider.shutdown()
        rec.tracer_provider.shutdown()


@pytest.mark.usefixtures("broken_log_handler")
async def test_a_failing_meter_logged_to_a_raising_handler_never_changes_a_send(
    server: ScriptedServer,
    make_client: Callable[..., BotMessageClient],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The meter raises, and so does the handler its warning goes to: sends end as without."""
    rec = Recorded()
    telemetry = Telemetry(
        tracer_provider=rec.tracer_provider,
        meter_provider=FailingMeterProvider(rec.meter_provider, dict.fromkeys(ALL_METRICS)),
    )
    try:
        server.script = [answer(503, {"error": "busy"})]
        async with make_client(server.base_url, telemetry=telemetry) as client:
            first = await client.send(DEPT, USER, TEXT)
            report = await client.send_many([(DEPT, USER, TEXT)] * 3)
    finally:
        rec.meter_provider.shutdown()
        rec.tracer_provider.shutdown()
    assert first.attempts == 2
    assert (report.sent, report.failed, report.unknown) == (3, 0, 0)
    assert "the handler broke" in capsys.readouterr().err
