"""What the telemetry hooks cost per send: off, with a no-op observer, with OpenTelemetry.

The HTTP exchange is stubbed out (an answer is ready at once), so what is timed
is the SDK's own Python work per ``send()``: a few microseconds against which
the hooks' cost is visible. Each variant runs in its own process, variants
alternate round by round, and the report gives medians.

``--baseline PATH`` adds the same run against another source tree of
botmsg_async (e.g. ``git archive <commit> botmsg_async | tar -x -C PATH``), to
compare "telemetry off" with the code before the hooks existed.

Usage: ``python -m benchmarks.telemetry_overhead [--sends N] [--rounds R] [--baseline PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

HERE = Path(__file__).resolve().parent.parent
DEPT = "7f0c6a52-1c7e-4c3e-9a53-6c1f8f0f2a10"
USER = "b3d1e0a4-55aa-4b7e-8c0e-2f0f7e9d1c22"


class _Answer:
    status = 200


class _Exchange:
    """Stands in for the POST's async context manager: the answer is there at once."""

    async def __aenter__(self) -> _Answer:
        return _Answer()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class _NoopWatch:
    def attempt_finished(self, *args: object) -> None:
        pass

    def retry_scheduled(self, *args: object) -> None:
        pass

    def send_finished(self, *args: object) -> None:
        pass


class _NoopObserver:
    """The cheapest observer there can be: what the hooks cost with nothing behind them."""

    watch = _NoopWatch()

    def send_started(self, *args: object) -> _NoopWatch:
        return self.watch

    def limiter_waited(self, seconds: float) -> None:
        pass

    def batch_started(self, *args: object) -> Any:
        raise NotImplementedError


def _telemetry(mode: str) -> Any:
    if mode == "off":
        return None
    if mode == "noop":
        return _NoopObserver()
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from botmsg_async.otel import Telemetry

    return Telemetry(tracer_provider=TracerProvider(), meter_provider=MeterProvider())


def worker(source: str, mode: str, sends: int) -> float:
    """Time ``sends`` stubbed sends with ``source``'s botmsg_async; CPU µs per send."""
    sys.path.insert(0, source)
    import botmsg_async
    from botmsg_async import _http

    assert Path(botmsg_async.__file__).is_relative_to(source), botmsg_async.__file__
    result = botmsg_async.SendResult(
        request_uuid="r", status=botmsg_async.Status.SUCCESS, message_uuid="m"
    )

    # *rest: the baseline and the current source differ in read_answer's arguments.
    async def read_answer(response: object, *rest: object) -> botmsg_async.SendResult:
        return result

    _http.open_post = lambda *args: _Exchange()  # type: ignore[assignment,misc,unused-ignore]
    _http.read_answer = read_answer  # type: ignore[assignment,unused-ignore]

    async def run() -> float:
        options = {} if mode == "off" else {"telemetry": _telemetry(mode)}
        async with botmsg_async.BotMessageClient(
            "http://127.0.0.1:9", "u", "p", **options
        ) as client:
            for _ in range(sends // 10):  # warm up
                await client.send(DEPT, USER, "hello")
            # CPU time of this thread: the other processes of a loaded machine
            # stretch wall time, not this.
            began = time.thread_time()
            for _ in range(sends):
                await client.send(DEPT, USER, "hello")
            return (time.thread_time() - began) / sends * 1e6

    return asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    """Run every variant ``--rounds`` times, alternating, and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline", type=Path, help="another botmsg_async source tree")
    parser.add_argument("--worker", nargs=3, metavar=("SOURCE", "MODE", "SENDS"))
    args = parser.parse_args(argv)
    if args.worker:
        source, mode, sends = args.worker
        print(f"{worker(source, mode, int(sends)):.4f}")
        return 0
    variants = [("off", str(HERE), "off"), ("noop", str(HERE), "noop")]
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        print("opentelemetry-sdk not installed: no 'otel' variant", file=sys.stderr)
    else:
        variants.append(("otel", str(HERE), "otel"))
    if args.baseline is not None:
        variants.insert(0, ("baseline", str(args.baseline.resolve()), "off"))
    timings: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(args.rounds):
        for name, source, mode in variants:
            command = ["-m", "benchmarks.telemetry_overhead", "--worker", source, mode]
            done = subprocess.run(
                [sys.executable, *command, str(args.sends)],
                capture_output=True,
                text=True,
                check=True,
                cwd=HERE,
            )
            timings[name].append(float(done.stdout))
    print(f"{'variant':<10} {'median CPU µs/send':>15} {'min':>8} {'max':>8}")
    for name, values in timings.items():
        print(
            f"{name:<10} {statistics.median(values):>15.3f} {min(values):>8.3f} {max(values):>8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
