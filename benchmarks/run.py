"""Run every benchmark scenario once and report: ``python -m benchmarks [--quick]``.

Scenarios (``benchmarks/README.md`` has the why and the latest numbers):

1. ``throughput``: the SDK's ``send_many`` vs a raw aiohttp loop vs httpx,
   against a fast server (nginx when installed).
2. ``latency``: the same three against a server that waits 50 ms per request,
   at concurrency 200: throughput should approach ``200 / 0.05`` = 4,000 msg/s.
3. ``memory``: ``stream_many`` over a generator of 1,000,000 and of 100,000
   items; the peak RSS of the two should be about equal.
4. ``faults``: 1 answer in 5 a transient FAILURE; the SDK retrying at once,
   compared with the same SDK set-up against a server that never fails.
5. ``fair`` and ``malloc`` (issue #17): raw loops dropping and keeping answers,
   ``send_many`` keeping all and none, ``stream_many``, on each installed loop,
   pinned; the same runs with and without glibc's malloc tunables.
6. ``workers`` (issue #14): ``botmsg send-many --workers 2`` against two raw
   aiohttp processes on the same loop and one on asyncio's (``benchmarks.workers``).

Each run is a fresh process (so peak RSS is that run's), runs of a scenario
alternate between variants (a, b, c, a, b, c, ...) so that a noisy machine
hurts all of them alike, and the report gives medians. Results go to
``benchmarks/results/latest.json``; a markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from attrs import asdict, define, evolve

from benchmarks.servers import REPO_ROOT, Server, child_env, nginx_version, start_server
from benchmarks.variants import RunSpec

__all__ = [
    "ALL_SCENARIOS",
    "FAIR_SCENARIOS",
    "SCENARIOS",
    "WORKER_SCENARIOS",
    "Config",
    "main",
    "render_markdown",
    "run_benchmarks",
]

SCENARIOS = ("throughput", "latency", "memory", "faults")
#: Issue #17's same-run comparisons, run by default from the command line too.
FAIR_SCENARIOS = ("fair", "malloc")
#: Issue #14's: ``botmsg send-many --workers`` against raw aiohttp processes.
WORKER_SCENARIOS = ("workers",)
ALL_SCENARIOS = SCENARIOS + FAIR_SCENARIOS + WORKER_SCENARIOS
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "latest.json"
# The metrics of a run that get a median across repetitions.
_METRICS = (
    "n",
    "sent",
    "not_sent",
    "retries",
    "wall_s",
    "msgs_per_s",
    "cpu_s",
    "cpu_us_per_msg",
    "p50_ms",
    "p99_ms",
    "baseline_rss_mb",
    "peak_rss_mb",
    "gc_us_per_msg",
)
_LABELS = {
    "sdk": "(a) SDK send_many",
    "aiohttp": "(b) raw aiohttp",
    "httpx": "(c) raw httpx",
    "sdk_zero_backoff": "SDK send_many, zero backoff",
    "sdk_stream": "SDK stream_many",
    "sdk_keep_none": "SDK send_many keep=none",
    "aiohttp_keep": "raw aiohttp, answers kept",
}
#: The fair comparison (issue #17): what runs, and as which variant.
_FAIR = {
    "raw_discard": "aiohttp",
    "raw_keep": "aiohttp_keep",
    "sdk_all": "sdk",
    "sdk_none": "sdk_keep_none",
    "sdk_stream": "sdk_stream",
}


@define(frozen=True)
class Config:
    """Sizes and switches of one benchmark run.

    Attributes:
        throughput_n: Messages per run in the throughput and faults scenarios.
        throughput_concurrency: Concurrency there.
        httpx_max_n: Cap on httpx's messages per run: httpx is so much slower
            that the full N would take minutes per run. Its rates are per
            message, so the ratios still compare.
        latency_n: Messages per run in the latency-bound scenario.
        latency_concurrency: Concurrency there.
        latency_delay: Seconds the slow server waits per request.
        memory_large_n: Items streamed in the large memory run.
        memory_small_n: Items streamed in the small memory run.
        memory_concurrency: Concurrency of the memory runs.
        fail_every: In the faults scenario, 1 answer in this many is a FAILURE.
        reps: Runs per variant in the throughput, latency and faults scenarios.
        server: ``"auto"`` (nginx when installed), ``"nginx"`` or ``"aiohttp"``.
        server_processes: Processes of the aiohttp server (SO_REUSEPORT).
        uvloop: Run the clients on uvloop.
        httpx: Include the httpx variant.
        scenarios: Which scenarios to run, in order.
        fair_reps: Runs per variant in the fair and malloc scenarios (>= 5).
        pin: In those scenarios, pin the client to CPU 0 and the server to CPU 1
            (when there are two CPUs).
        workers_n: Messages per run in the workers scenario (a bulk job: start-up
            and the validation pass are paid once per job).
        workers: Worker processes there (and raw processes in its like-for-like run).
    """

    throughput_n: int = 20_000
    throughput_concurrency: int = 64
    httpx_max_n: int = 2_000
    latency_n: int = 8_000
    latency_concurrency: int = 200
    latency_delay: float = 0.05
    memory_large_n: int = 1_000_000
    memory_small_n: int = 100_000
    memory_concurrency: int = 64
    fail_every: int = 5
    reps: int = 3
    server: str = "auto"
    server_processes: int = 2
    uvloop: bool = False
    httpx: bool = True
    scenarios: tuple[str, ...] = SCENARIOS
    fair_reps: int = 5
    pin: bool = True
    workers_n: int = 100_000
    workers: int = 2

    def quick(self) -> Config:
        """The same run with every N ten times smaller."""
        return evolve(
            self,
            throughput_n=self.throughput_n // 10,
            httpx_max_n=self.httpx_max_n // 10,
            latency_n=self.latency_n // 10,
            memory_large_n=self.memory_large_n // 10,
            memory_small_n=self.memory_small_n // 10,
            workers_n=self.workers_n // 10,
        )


def _run_child(spec: RunSpec, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one variant in a fresh interpreter and return its ``RunResult`` dict.

    ``env`` adds to the environment (e.g. ``GLIBC_TUNABLES``, read at exec).
    """
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.variants", json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=child_env() | (env or {}),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec.variant} run failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    medians: dict[str, Any] = {}
    for key in _METRICS:
        values = [run[key] for run in runs if run.get(key) is not None]
        medians[key] = statistics.median(values) if values else None
    return medians


def _alternate(
    specs: dict[str, RunSpec],
    reps: int,
    log: Callable[[str], None],
    envs: dict[str, dict[str, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run each spec ``reps`` times, round-robin, and summarise each by medians.

    Args:
        specs: Variant label to the run it stands for.
        reps: Rounds.
        log: Progress lines.
        envs: Extra environment per label.

    Returns:
        Per label: ``{"runs": [...], "median": {...}}``.
    """
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in specs}
    for rep in range(reps):
        for label, spec in specs.items():
            result = _run_child(spec, (envs or {}).get(label))
            runs[label].append(result)
            log(
                f"  {label:<18} rep {rep + 1}/{reps}: {result['msgs_per_s']:8.0f} msg/s  "
                f"{result['cpu_us_per_msg']:6.0f} us CPU/msg  "
                f"sent {result['sent']}/{result['n']}"
            )
    return {label: {"runs": items, "median": _median(items)} for label, items in runs.items()}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _versus_raw(variants: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    sdk = variants["sdk"]["median"]
    ratios: dict[str, float | None] = {}
    for other in ("aiohttp", "httpx"):
        if other in variants:
            theirs = variants[other]["median"]
            ratios[f"throughput_sdk_over_{other}"] = _ratio(sdk["msgs_per_s"], theirs["msgs_per_s"])
            ratios[f"cpu_per_msg_sdk_over_{other}"] = _ratio(
                sdk["cpu_us_per_msg"], theirs["cpu_us_per_msg"]
            )
    return ratios


def _comparison(
    config: Config, server: Server, n: int, concurrency: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """The SDK vs the raw loops against one server: scenarios 1 and 2."""

    def spec(variant: str, count: int) -> RunSpec:
        return RunSpec(variant, server.base_url, count, concurrency, uvloop=config.uvloop)

    specs = {"sdk": spec("sdk", n), "aiohttp": spec("aiohttp", n)}
    if config.httpx:
        specs["httpx"] = spec("httpx", min(n, config.httpx_max_n))
    variants = _alternate(specs, config.reps, log)
    return {
        "server": server.description,
        "n": n,
        "concurrency": concurrency,
        "variants": variants,
        "ratios": _versus_raw(variants),
    }


def _scenario_throughput(config: Config, log: Callable[[str], None]) -> dict[str, Any]:
    with start_server(config.server, processes=config.server_processes) as server:
        return _comparison(config, server, config.throughput_n, config.throughput_concurrency, log)


def _scenario_latency(config: Config, log: Callable[[str], None]) -> dict[str, Any]:
    with start_server(
        config.server, processes=config.server_processes, delay=config.latency_delay
    ) as server:
        result = _comparison(config, server, config.latency_n, config.latency_concurrency, log)
    ideal = config.latency_concurrency / config.latency_delay
    result["ideal_msgs_per_s"] = ideal
    result["sdk_share_of_ideal"] = _ratio(result["variants"]["sdk"]["median"]["msgs_per_s"], ideal)
    return result


def _scenario_memory(config: Config, log: Callable[[str], None]) -> dict[str, Any]:
    with start_server(config.server, processes=config.server_processes) as server:
        runs: dict[str, dict[str, Any]] = {}
        for label, n in (("small", config.memory_small_n), ("large", config.memory_large_n)):
            # No latency recording: its arrays would grow with N, which is the
            # very thing this scenario checks the SDK does not do.
            spec = RunSpec(
                "sdk_stream",
                server.base_url,
                n,
                config.memory_concurrency,
                latency=False,
                uvloop=config.uvloop,
            )
            runs[label] = _run_child(spec)
            log(
                f"  stream_many {n:>9,} items: peak RSS {runs[label]['peak_rss_mb']:.1f} MB, "
                f"{runs[label]['msgs_per_s']:.0f} msg/s"
            )
    return {
        "server": server.description,
        "concurrency": config.memory_concurrency,
        "runs": runs,
        "peak_rss_large_over_small": _ratio(
            runs["large"]["peak_rss_mb"], runs["small"]["peak_rss_mb"]
        ),
    }


def _scenario_faults(config: Config, log: Callable[[str], None]) -> dict[str, Any]:
    # Both servers run at once so that the faulty and the clean runs alternate.
    with (
        start_server(config.server, processes=config.server_processes) as clean,
        start_server(
            config.server, processes=config.server_processes, fail_every=config.fail_every
        ) as faulty,
    ):
        specs = {
            variant: RunSpec(
                "sdk_zero_backoff",
                server.base_url,
                config.throughput_n,
                config.throughput_concurrency,
                uvloop=config.uvloop,
            )
            for variant, server in (("clean", clean), ("faults", faulty))
        }
        variants = _alternate(specs, config.reps, log)
    return {
        "server": faulty.description,
        "n": config.throughput_n,
        "concurrency": config.throughput_concurrency,
        "policy": "RetryPolicy(backoff_initial=0, backoff_max=0, max_attempts=8), "
        "RetryBudget(ratio=1.0)",
        "variants": variants,
        "throughput_faults_over_clean": _ratio(
            variants["faults"]["median"]["msgs_per_s"], variants["clean"]["median"]["msgs_per_s"]
        ),
    }


def _pins(config: Config) -> tuple[int | None, int | None]:
    """CPUs for the client and the server: 0 and 1 when pinning on two or more CPUs."""
    if config.pin and hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        first, second = sorted(os.sched_getaffinity(0))[:2]
        return first, second
    return None, None


def _loops() -> tuple[str, ...]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ("asyncio",)
    return ("asyncio", "uvloop")


def _scenario_fair(config: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Issue #17's comparison: the SDK's ways to send against raw loops, per event loop.

    Every variant alternates with every other in one run, pinned, ``fair_reps``
    times; the ratios compare medians of the same run.
    """
    client_cpu, server_cpu = _pins(config)
    loops = _loops()
    with start_server(config.server, processes=config.server_processes, cpu=server_cpu) as server:
        specs = {
            f"{name}@{loop}": RunSpec(
                variant,
                server.base_url,
                config.throughput_n,
                config.throughput_concurrency,
                # No latency recording: for the SDK it needs on_result, which builds an
                # ItemResult per item that neither raw loop pays for.
                latency=False,
                uvloop=loop == "uvloop",
                cpu=client_cpu,
            )
            for loop in loops
            for name, variant in _FAIR.items()
        }
        variants = _alternate(specs, config.fair_reps, log)
    ratios: dict[str, float | None] = {}
    for loop in loops:

        def median(name: str, metric: str, loop: str = loop) -> float | None:
            value: float | None = variants[f"{name}@{loop}"]["median"][metric]
            return value

        ratios[f"{loop}: throughput sdk_all / raw_keep"] = _ratio(
            median("sdk_all", "msgs_per_s"), median("raw_keep", "msgs_per_s")
        )
        ratios[f"{loop}: CPU sdk_all / raw_keep"] = _ratio(
            median("sdk_all", "cpu_us_per_msg"), median("raw_keep", "cpu_us_per_msg")
        )
        ratios[f"{loop}: CPU sdk_none / raw_discard"] = _ratio(
            median("sdk_none", "cpu_us_per_msg"), median("raw_discard", "cpu_us_per_msg")
        )
        ratios[f"{loop}: CPU sdk_stream / raw_discard"] = _ratio(
            median("sdk_stream", "cpu_us_per_msg"), median("raw_discard", "cpu_us_per_msg")
        )
    if "uvloop" in loops:
        ratios["throughput sdk_all uvloop / asyncio"] = _ratio(
            variants["sdk_all@uvloop"]["median"]["msgs_per_s"],
            variants["sdk_all@asyncio"]["median"]["msgs_per_s"],
        )
    return {
        "server": server.description,
        "n": config.throughput_n,
        "concurrency": config.throughput_concurrency,
        "pinned": {"client_cpu": client_cpu, "server_cpu": server_cpu},
        "variants": variants,
        "ratios": ratios,
    }


def _scenario_malloc(config: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """The 256 KiB receive buffer: the same runs with and without glibc's malloc tunables.

    asyncio's selector transport reads with ``sock.recv(256 KiB)``; below glibc's
    mmap threshold that buffer comes from the heap, not a fresh mmap/munmap per read.
    """
    from botmsg_async.cli.tunables import MALLOC_TUNABLES

    client_cpu, server_cpu = _pins(config)
    with start_server(config.server, processes=config.server_processes, cpu=server_cpu) as server:
        specs: dict[str, RunSpec] = {}
        envs: dict[str, dict[str, str]] = {}
        for name, variant in (("sdk_all", "sdk"), ("raw_keep", "aiohttp_keep")):
            for tuned in (False, True):
                label = f"{name}{'+tunables' if tuned else ''}"
                specs[label] = RunSpec(
                    variant,
                    server.base_url,
                    config.throughput_n,
                    config.throughput_concurrency,
                    latency=False,
                    cpu=client_cpu,
                )
                # The untuned runs must not inherit a tunable from the harness's shell.
                envs[label] = {"GLIBC_TUNABLES": MALLOC_TUNABLES if tuned else ""}
        variants = _alternate(specs, config.fair_reps, log, envs)
    return {
        "server": server.description,
        "tunables": MALLOC_TUNABLES,
        "variants": variants,
        "ratios": {
            f"CPU {name}+tunables / {name}": _ratio(
                variants[f"{name}+tunables"]["median"]["cpu_us_per_msg"],
                variants[name]["median"]["cpu_us_per_msg"],
            )
            for name in ("sdk_all", "raw_keep")
        },
    }


def _scenario_workers(config: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """``send-many --workers`` vs raw aiohttp processes (``benchmarks.workers``), same run."""
    from benchmarks.workers import speed

    log(f"  workers: {config.reps} rounds of 4 runs, {config.workers_n:,} messages each")
    return speed(
        config.workers_n,
        config.workers,
        config.throughput_concurrency,
        config.reps,
        config.server,
    )


_RUNNERS: dict[str, Callable[[Config, Callable[[str], None]], dict[str, Any]]] = {
    "throughput": _scenario_throughput,
    "latency": _scenario_latency,
    "memory": _scenario_memory,
    "faults": _scenario_faults,
    "fair": _scenario_fair,
    "malloc": _scenario_malloc,
    "workers": _scenario_workers,
}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    """The commit measured, with ``+dirty`` when botmsg_async/ has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "botmsg_async"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """Describe this machine and the software the numbers depend on."""
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "httpx": _version("httpx"),
        "orjson": _version("orjson"),
        "uvloop": _version("uvloop"),
        "botmsg_async": _version("botmsg-async"),
        "nginx": nginx_version(),
    }


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the issue's targets against this run's numbers."""
    targets: list[dict[str, Any]] = []

    def check(name: str, value: float | None, op: str, limit: float) -> None:
        passed = None if value is None else (value >= limit if op == ">=" else value <= limit)
        targets.append({"target": name, "value": value, "op": op, "limit": limit, "pass": passed})

    scenarios = report["scenarios"]
    if "throughput" in scenarios:
        ratios = scenarios["throughput"]["ratios"]
        check("throughput SDK / raw aiohttp", ratios.get("throughput_sdk_over_aiohttp"), ">=", 0.9)
        check(
            "CPU per msg SDK / raw aiohttp", ratios.get("cpu_per_msg_sdk_over_aiohttp"), "<=", 1.15
        )
        if "throughput_sdk_over_httpx" in ratios:
            check("throughput SDK / httpx", ratios["throughput_sdk_over_httpx"], ">=", 5.0)
    if "fair" in scenarios:
        fair = scenarios["fair"]["ratios"]
        for loop in ("asyncio", "uvloop"):
            if f"{loop}: CPU sdk_all / raw_keep" in fair:
                check(
                    f"{loop}: throughput send_many keep=all / raw keeping answers",
                    fair[f"{loop}: throughput sdk_all / raw_keep"],
                    ">=",
                    0.95,
                )
                check(
                    f"{loop}: CPU send_many keep=all / raw keeping answers",
                    fair[f"{loop}: CPU sdk_all / raw_keep"],
                    "<=",
                    1.05,
                )
                check(
                    f"{loop}: CPU send_many keep=none / raw dropping answers",
                    fair[f"{loop}: CPU sdk_none / raw_discard"],
                    "<=",
                    1.00,
                )
    if "workers" in scenarios:
        workers = scenarios["workers"]
        w = workers["workers"]
        check(
            f"--workers {w} / {w} raw aiohttp processes, same loop (throughput)",
            workers["workers_vs_raw_same_processes_same_loop"],
            ">=",
            workers["bars"]["same_processes_same_loop"],
        )
        check(
            f"--workers {w} / 1 raw aiohttp process, asyncio (throughput)",
            workers["workers_vs_one_raw_default_loop"],
            ">=",
            workers["bars"]["one_raw_default_loop"],
        )
    if "memory" in scenarios:
        memory = scenarios["memory"]
        check("peak RSS, large stream (MB)", memory["runs"]["large"]["peak_rss_mb"], "<=", 100.0)
        check("peak RSS large / small stream", memory["peak_rss_large_over_small"], "<=", 1.10)
    return targets


def run_benchmarks(
    config: Config, *, out: Path | None = DEFAULT_OUT, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the scenarios of ``config``; write and return the report.

    Args:
        config: What to run.
        out: Where to write the JSON report (None: nowhere).
        log: Progress lines go here.

    Returns:
        The report: ``meta`` (date, machine, config), ``scenarios`` and ``targets``.
    """
    unknown = set(config.scenarios) - set(ALL_SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios: {sorted(unknown)}")
    report: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            # A list, not a tuple: the report should read back from JSON unchanged.
            "config": {**asdict(config), "scenarios": list(config.scenarios)},
            "loop": "uvloop" if config.uvloop else "asyncio",
            # The SDK is re-imported by every run: edit it mid-run and runs differ.
            "revision": _git_revision(),
            # A shared machine: how busy it was when the run began (and, below, ended).
            "load_average_start": _load_average(),
        },
        "scenarios": {},
    }
    for name in config.scenarios:
        log(f"scenario {name}")
        report["scenarios"][name] = _RUNNERS[name](config, log)
    report["meta"]["load_average_end"] = _load_average()
    report["targets"] = _targets(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """Render the report as markdown tables: one row per scenario and variant."""
    lines = [
        "| scenario | variant | N | msg/s | CPU µs/msg | p50 ms | p99 ms | peak RSS MB | sent |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(scenario: str, label: str, m: dict[str, Any]) -> None:
        lines.append(
            f"| {scenario} | {label} | {_fmt(m['n'])} | {_fmt(m['msgs_per_s'])} "
            f"| {_fmt(m['cpu_us_per_msg'])} | {_fmt(m['p50_ms'], 1)} | {_fmt(m['p99_ms'], 1)} "
            f"| {_fmt(m['peak_rss_mb'], 1)} | {_fmt(m['sent'])}/{_fmt(m['n'])} |"
        )

    scenarios = report["scenarios"]
    for name in ("throughput", "latency"):
        if name in scenarios:
            title = f"{name} (C={scenarios[name]['concurrency']})"
            for variant, data in scenarios[name]["variants"].items():
                row(title, _LABELS.get(variant, variant), data["median"])
    if "memory" in scenarios:
        for label, data in scenarios["memory"]["runs"].items():
            row(f"memory ({label})", _LABELS["sdk_stream"], data)
    if "faults" in scenarios:
        for variant, data in scenarios["faults"]["variants"].items():
            row(f"faults: {variant}", _LABELS["sdk_zero_backoff"], data["median"])

    lines += ["", "| ratio | value |", "|---|---:|"]
    for name in ("throughput", "latency"):
        if name in scenarios:
            for key, value in scenarios[name]["ratios"].items():
                lines.append(f"| {name}: {key} | {_fmt(value, 2)} |")
    if "latency" in scenarios:
        lines.append(
            f"| latency: SDK share of ideal {_fmt(scenarios['latency']['ideal_msgs_per_s'])} "
            f"msg/s | {_fmt(scenarios['latency']['sdk_share_of_ideal'], 2)} |"
        )
    if "memory" in scenarios:
        lines.append(
            f"| memory: peak RSS large / small | "
            f"{_fmt(scenarios['memory']['peak_rss_large_over_small'], 3)} |"
        )
    if "faults" in scenarios:
        lines.append(
            f"| faults: throughput with faults / clean | "
            f"{_fmt(scenarios['faults']['throughput_faults_over_clean'], 2)} |"
        )
    if "fair" in scenarios:
        lines += _fair_table(scenarios["fair"])
    if "malloc" in scenarios:
        lines += _malloc_table(scenarios["malloc"])
    if "workers" in scenarios:
        lines += _workers_table(scenarios["workers"])
    if report.get("targets"):
        lines += ["", "| target | value | limit | pass |", "|---|---:|---:|---|"]
        for target in report["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[target["pass"]]
            lines.append(
                f"| {target['target']} | {_fmt(target['value'], 2)} "
                f"| {target['op']} {target['limit']:g} | {verdict} |"
            )
    return "\n".join(lines)


def _fair_table(fair: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"fair comparison (C={fair['concurrency']}, N={fair['n']:,}, pinned {fair['pinned']}):",
        "",
        "| variant | loop | msg/s | CPU µs/msg | GC µs/msg | runs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, data in fair["variants"].items():
        name, _, loop = label.partition("@")
        m = data["median"]
        lines.append(
            f"| {name} | {loop} | {_fmt(m['msgs_per_s'])} | {_fmt(m['cpu_us_per_msg'], 1)} "
            f"| {_fmt(m['gc_us_per_msg'], 2)} | {len(data['runs'])} |"
        )
    lines += ["", "| ratio (medians, same run) | value |", "|---|---:|"]
    lines += [f"| {key} | {_fmt(value, 3)} |" for key, value in fair["ratios"].items()]
    return lines


def _workers_table(workers: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"several processes (N={workers['n']:,}, C={workers['concurrency']}, "
        f"{workers['reps']} rounds, {workers['server']}):",
        "",
        "| run | msg/s | CPU µs/msg (process tree) |",
        "|---|---:|---:|",
    ]
    for name, m in workers["medians"].items():
        lines.append(f"| {name} | {_fmt(m['msgs_per_s'])} | {_fmt(m['cpu_tree_us_per_msg'], 1)} |")
    lines.append(
        f"| coordination CPU per item (--workers less one process) "
        f"| | {_fmt(workers['coordination_us_per_item'], 1)} |"
    )
    return lines


def _malloc_table(malloc: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"malloc tunables ({malloc['tunables']}), default loop:",
        "",
        "| variant | msg/s | CPU µs/msg | runs |",
        "|---|---:|---:|---:|",
    ]
    for label, data in malloc["variants"].items():
        m = data["median"]
        lines.append(
            f"| {label} | {_fmt(m['msgs_per_s'])} | {_fmt(m['cpu_us_per_msg'], 1)} "
            f"| {len(data['runs'])} |"
        )
    lines += [f"| {key} | {_fmt(value, 3)} | | |" for key, value in malloc["ratios"].items()]
    return lines


def _parse_args(argv: Sequence[str] | None) -> tuple[Config, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Benchmark botmsg-async against raw clients."
    )
    parser.add_argument("--quick", action="store_true", help="every N ten times smaller")
    parser.add_argument("--reps", type=int, default=3, help="runs per variant")
    parser.add_argument(
        "--server",
        choices=("auto", "nginx", "aiohttp"),
        default="auto",
        help="fast server: nginx if installed (auto), or the aiohttp fallback",
    )
    parser.add_argument("--uvloop", action="store_true", help="run the clients on uvloop")
    parser.add_argument("--no-httpx", action="store_true", help="leave the httpx variant out")
    parser.add_argument(
        "--fair-reps", type=int, default=5, help="runs per variant in fair and malloc (default 5)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin client and server to separate CPUs"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=ALL_SCENARIOS,
        help="run only this scenario (repeatable); default: all",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON report path (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    config = Config(
        reps=args.reps,
        server=args.server,
        uvloop=args.uvloop,
        httpx=not args.no_httpx,
        scenarios=tuple(args.scenario or ALL_SCENARIOS),
        fair_reps=args.fair_reps,
        pin=not args.no_pin,
    )
    return (config.quick() if args.quick else config), args.out


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    # SIGTERM unwinds like Ctrl-C: the servers and the running child are stopped.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    config, out = _parse_args(argv)
    if config.uvloop:
        import uvloop  # noqa: F401 - fail now, not in the first child, when it is missing
    if config.httpx:
        try:
            import httpx  # noqa: F401
        except ImportError:
            print("httpx is not installed: leaving the httpx variant out", file=sys.stderr)
            config = evolve(config, httpx=False)
    report = run_benchmarks(config, out=out, log=lambda line: print(line, flush=True))
    print()
    print(render_markdown(report))
    if out is not None:
        print(f"\nJSON report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
