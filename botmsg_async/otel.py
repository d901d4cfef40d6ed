"""OpenTelemetry traces and metrics for botmsg-async (the ``otel`` extra).

Install ``botmsg-async[otel]`` (it brings ``opentelemetry-api`` only; your
application configures the SDK and its exporters), then give the client a
``Telemetry``:

    >>> from botmsg_async.otel import Telemetry
    >>> client = BotMessageClient(url, user, password, telemetry=Telemetry())

What is recorded:

* A span ``botmsg.send`` per logical send (all its attempts and retry waits,
  and the wait for the client's rate limiter before them), kind INTERNAL, with
  ``botmsg.department_uuid``, ``botmsg.user_uuid``, ``botmsg.idempotency_key``,
  ``botmsg.outcome``, ``botmsg.attempts``, the HTTP semantic conventions'
  ``http.request.method``, ``server.address``, ``server.port``,
  ``url.template`` and, for the last attempt, ``http.response.status_code``
  and ``error.type``. The span is current during the attempts, so an aiohttp
  client instrumentation nests its HTTP spans under it.
* An event ``botmsg.attempt`` per HTTP attempt: ``botmsg.attempt``,
  ``botmsg.attempt.wait`` (seconds waited before it), ``botmsg.attempt.duration``,
  ``http.request.resend_count``, ``http.response.status_code``, ``error.type``.
* A span ``botmsg.send_many`` or ``botmsg.stream_many`` per batch, parent of
  its sends, with its counts and ``botmsg.batch.stopped_by``.
* Metrics (attributes never name a department, user or key):
  ``botmsg.client.sends`` (by ``botmsg.outcome``), ``botmsg.client.attempts``
  (by ``botmsg.status_class`` and ``error.type``), ``botmsg.client.retries`` (by
  ``error.type``: the reason), ``botmsg.client.send.duration`` (seconds, by
  ``botmsg.outcome``), ``botmsg.client.rate_limiter.wait`` (seconds) and
  ``botmsg.client.active_sends``.

The message text and the credentials are never recorded; errors are recorded
by their type, not their text (an answer's body could echo the message).

A send never fails because its telemetry did: an exception from the tracer,
the meter or a span processor is logged (the ``botmsg_async.otel`` logger,
WARNING once per ``Telemetry``, then DEBUG) and the send goes on unrecorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, StatusCode

from ._models import Outcome
from ._observe import log_quietly
from ._version import __version__

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.util.types import AttributeValue
    from yarl import URL

__all__ = ["Telemetry"]

log = logging.getLogger("botmsg_async.otel")

#: The instrumentation scope: tracer and meter name.
SCOPE = "botmsg_async"

# The buckets the HTTP semantic conventions advise for request durations, in seconds.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ROUTE = "/communications/department/{department_uuid}/user/{user_uuid}/botmessage/send"

# Metric attribute sets, built once: outcome labels and status classes are few.
_OUTCOME_ATTRS = {outcome: {"botmsg.outcome": outcome.value} for outcome in Outcome}
_CANCELLED_ATTRS = {"botmsg.outcome": "cancelled"}
_ERROR_ATTRS = {"botmsg.outcome": "error"}


def _status_class(status: int | None) -> str:
    if status is None:
        return "none"
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def _error_type(error: BaseException) -> str:
    # The class name: a small, fixed set for the SDK's own errors (see _errors).
    return type(error).__name__


class _Endpoint:
    """What the spans say about the endpoint of one ``base_url``, worked out once."""

    __slots__ = ("attributes", "base_url")

    def __init__(self, base_url: URL) -> None:
        self.base_url = base_url
        attributes: dict[str, AttributeValue] = {
            "http.request.method": "POST",
            "url.template": base_url.path.rstrip("/") + _ROUTE,
        }
        if base_url.host is not None:
            attributes["server.address"] = base_url.host
        if base_url.port is not None:
            attributes["server.port"] = base_url.port
        self.attributes = attributes


class _SendWatch:
    """One logical send: its span, made current until it ends, and its timings."""

    __slots__ = (
        "_active",
        "_began",
        "_last_status",
        "_next_wait",
        "_span",
        "_telemetry",
        "_token",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        span: trace.Span,
        token: Token[Context],
        began: float,
        active: bool,
    ) -> None:
        self._telemetry = telemetry
        self._span = span
        self._token = token
        self._began = began
        #: Whether this send was added to the active_sends gauge (it then takes itself off).
        self._active = active
        self._last_status: int | None = None
        self._next_wait = 0.0

    def attempt_finished(
        self, attempt: int, status: int | None, error: BaseException | None, duration: float
    ) -> None:
        # Metrics and span apart: a failing meter must not cost the trace, nor the reverse.
        self._last_status = status
        telemetry = self._telemetry
        error_type = _error_type(error) if error is not None else None
        try:
            metric_attributes: dict[str, AttributeValue] = {
                "botmsg.status_class": _status_class(status)
            }
            if error_type is not None:
                metric_attributes["error.type"] = error_type
            telemetry._attempts.add(1, metric_attributes)
        except Exception:  # telemetry must never fail a send
            telemetry._failed("count an attempt")
        try:
            if self._span.is_recording():  # a sampled-out span would drop the event anyway
                attributes: dict[str, AttributeValue] = {
                    "botmsg.attempt": attempt,
                    "botmsg.attempt.wait": self._next_wait,
                    "botmsg.attempt.duration": duration,
                }
                if attempt > 1:
                    attributes["http.request.resend_count"] = attempt - 1
                if status is not None:
                    attributes["http.response.status_code"] = status
                if error_type is not None:
                    attributes["error.type"] = error_type
                self._span.add_event("botmsg.attempt", attributes)
        except Exception:  # telemetry must never fail a send
            telemetry._failed("record an attempt on its span")
        self._next_wait = 0.0

    def retry_scheduled(self, attempt: int, wait: float, error: BaseException) -> None:
        self._next_wait = wait
        try:
            self._telemetry._retries.add(1, {"error.type": _error_type(error)})
        except Exception:  # telemetry must never fail a send
            self._telemetry._failed("count a retry")

    def send_finished(
        self, outcome: Outcome | None, attempts: int, error: BaseException | None
    ) -> None:
        # Each step runs whatever the one before raised: the gauge must come back
        # down, and the span must end and stop being current, or every later send
        # of this task would nest under it.
        telemetry = self._telemetry
        span = self._span
        if outcome is not None:
            label = outcome.value
            metric_attributes = _OUTCOME_ATTRS[outcome]
        elif isinstance(error, asyncio.CancelledError):
            label, metric_attributes = "cancelled", _CANCELLED_ATTRS
        else:
            label, metric_attributes = "error", _ERROR_ATTRS
        try:
            attributes: dict[str, AttributeValue] = {
                "botmsg.outcome": label,
                "botmsg.attempts": attempts,
            }
            if self._last_status is not None:
                attributes["http.response.status_code"] = self._last_status
            if error is not None:
                attributes["error.type"] = _error_type(error)
            span.set_attributes(attributes)
            if outcome is not Outcome.SENT:
                # The description is the error's type, not its text (see the module doc).
                span.set_status(
                    StatusCode.ERROR, _error_type(error) if error is not None else label
                )
        except Exception:  # telemetry must never fail a send
            telemetry._failed("record a send's outcome on its span")
        try:
            telemetry._sends.add(1, metric_attributes)
            telemetry._duration.record(time.perf_counter() - self._began, metric_attributes)
        except Exception:  # telemetry must never fail a send
            telemetry._failed("count a send")
        if self._active:
            try:
                telemetry._active.add(-1)
            except Exception:  # telemetry must never fail a send
                telemetry._failed("count an active send")
        try:
            span.end()
        except Exception:  # telemetry must never fail a send
            telemetry._failed("end a send's span")
        finally:
            otel_context.detach(self._token)


class _BatchWatch:
    """One batch: its span, current in the batch's task so that its sends nest under it."""

    __slots__ = ("_span", "_telemetry", "_token")

    def __init__(self, telemetry: Telemetry, span: trace.Span, token: Token[Context]) -> None:
        self._telemetry = telemetry
        self._span = span
        self._token = token

    def batch_finished(
        self,
        counts: Mapping[Outcome, int],
        retries: int,
        stopped_by: BaseException | None,
        error: BaseException | None,
    ) -> None:
        span = self._span
        try:
            try:
                self._record_end(counts, retries, stopped_by, error)
            finally:
                try:
                    span.end()
                finally:
                    otel_context.detach(self._token)
        except Exception:  # telemetry must never fail a batch
            self._telemetry._failed("record a batch's end")

    def _record_end(
        self,
        counts: Mapping[Outcome, int],
        retries: int,
        stopped_by: BaseException | None,
        error: BaseException | None,
    ) -> None:
        span = self._span
        if isinstance(error, asyncio.CancelledError):
            # Left early by its consumer (or cancelled with its caller): no failure.
            span.set_attribute("botmsg.batch.cancelled", True)
        elif error is not None:
            span.set_attribute("error.type", _error_type(error))
            span.set_status(StatusCode.ERROR, _error_type(error))
        attributes: dict[str, AttributeValue] = {
            f"botmsg.batch.{outcome.value}": count for outcome, count in counts.items()
        }
        attributes["botmsg.batch.retries"] = retries
        if stopped_by is not None:
            reason = getattr(stopped_by, "reason", None)
            attributes["botmsg.batch.stopped_by"] = (
                reason if isinstance(reason, str) else _error_type(stopped_by)
            )
        span.set_attributes(attributes)


class Telemetry:
    """Record botmsg-async's sends and batches as OpenTelemetry spans and metrics.

    Give it to ``BotMessageClient(telemetry=...)``. One ``Telemetry`` may serve
    many clients.

    Args:
        tracer_provider: Where spans go (default: the global tracer provider).
        meter_provider: Where metrics go (default: the global meter provider).

    Example:
        >>> telemetry = Telemetry(tracer_provider=provider, meter_provider=meters)
        >>> async with BotMessageClient(url, user, pw, telemetry=telemetry) as client:
        ...     await client.send(department_id, user_id, "Hello!")
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, __version__, meter_provider=meter_provider)
        self._sends = meter.create_counter(
            "botmsg.client.sends", "{send}", "Logical sends, by outcome."
        )
        self._attempts = meter.create_counter(
            "botmsg.client.attempts", "{attempt}", "HTTP attempts, by status class and error type."
        )
        self._retries = meter.create_counter(
            "botmsg.client.retries", "{retry}", "Retries scheduled, by the error that caused them."
        )
        self._duration = meter.create_histogram(
            "botmsg.client.send.duration",
            "s",
            "Duration of logical sends, retries and rate-limiter wait included, by outcome.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._limiter_wait = meter.create_histogram(
            "botmsg.client.rate_limiter.wait",
            "s",
            "Time a send waited for a rate limiter's slot.",
            explicit_bucket_boundaries_advisory=_WAIT_BUCKETS,
        )
        self._active = meter.create_up_down_counter(
            "botmsg.client.active_sends", "{send}", "Logical sends in progress."
        )
        self._endpoint: _Endpoint | None = None
        #: Whether a failure of OpenTelemetry was logged at WARNING already (later: DEBUG).
        self._warned = False

    def __repr__(self) -> str:
        return "<botmsg_async.otel.Telemetry>"

    def _failed(self, what: str) -> None:
        """Log the exception being handled: OpenTelemetry failed to ``what``.

        Called in an ``except`` block; the send or batch goes on as if unobserved.
        """
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        # Quietly: a handler that raises must not fail the send either.
        log_quietly(log, level, "OpenTelemetry failed to %s; not recorded", what, exc_info=True)

    def _endpoint_for(self, base_url: URL) -> _Endpoint:
        endpoint = self._endpoint
        if endpoint is None or endpoint.base_url is not base_url:
            endpoint = self._endpoint = _Endpoint(base_url)
        return endpoint

    def send_started(
        self,
        department_uuid: str,
        user_uuid: str,
        idempotency_key: str,
        base_url: URL,
        limiter_wait: float | None,
    ) -> _SendWatch:
        """Start the ``botmsg.send`` span (see ``_observe.Observer``)."""
        attributes = dict(self._endpoint_for(base_url).attributes)
        attributes["botmsg.department_uuid"] = department_uuid
        attributes["botmsg.user_uuid"] = user_uuid
        attributes["botmsg.idempotency_key"] = idempotency_key
        began = time.perf_counter()
        start_time = None
        if limiter_wait is not None:
            attributes["botmsg.rate_limiter.wait"] = limiter_wait
            began -= limiter_wait
            start_time = time.time_ns() - int(limiter_wait * 1e9)
            self.limiter_waited(limiter_wait)
        span = self._start_span("botmsg.send", attributes, start_time)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            self._active.add(1)
            active = True
        except Exception:  # telemetry must never fail a send
            self._failed("count an active send")
            active = False  # then not taken off either: the gauge stays true
        return _SendWatch(self, span, token, began, active)

    def _start_span(
        self, name: str, attributes: dict[str, AttributeValue], start_time: int | None = None
    ) -> trace.Span:
        """Start span ``name``; a span that records nothing if OpenTelemetry fails to."""
        try:
            return self._tracer.start_span(
                name,
                kind=SpanKind.INTERNAL,
                attributes=attributes,
                start_time=start_time,
                record_exception=False,
                set_status_on_exception=False,
            )
        except Exception:  # telemetry must never fail a send
            self._failed(f"start a {name} span")
            return trace.INVALID_SPAN

    def limiter_waited(self, seconds: float) -> None:
        """Record a batch's rate-limit wait for one item."""
        try:
            self._limiter_wait.record(seconds)
        except Exception:  # telemetry must never fail a send
            self._failed("record a rate limiter's wait")

    def batch_started(
        self, kind: Literal["send_many", "stream_many"], concurrency: int
    ) -> _BatchWatch:
        """Start the batch's span and make it current in the batch's task."""
        span = self._start_span(f"botmsg.{kind}", {"botmsg.batch.concurrency": concurrency})
        token = otel_context.attach(trace.set_span_in_context(span))
        return _BatchWatch(self, span, token)
