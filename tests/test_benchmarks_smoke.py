"""Smoke test of the benchmark harness (``python -m benchmarks``), so that it cannot rot.

Tiny N, one repetition, the aiohttp fallback server even where nginx is
installed, httpx only where it is installed. It checks the shape of the report
and that every message was sent; it never asserts a timing. About ten seconds:
most of it is starting the 12 Python processes the harness runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks.run import SCENARIOS, Config, render_markdown, run_benchmarks

RUN_KEYS = {
    "variant",
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
    "loop",
}

TINY = Config(
    throughput_n=60,
    httpx_max_n=20,
    latency_n=60,
    latency_concurrency=50,
    memory_large_n=120,
    memory_small_n=60,
    memory_concurrency=16,
    throughput_concurrency=16,
    reps=1,
    server="aiohttp",
    server_processes=1,
    httpx=importlib.util.find_spec("httpx") is not None,
)
COMPARED = {"sdk", "aiohttp", "httpx"} if TINY.httpx else {"sdk", "aiohttp"}


def _children() -> list[int]:
    """Pids of this process's children (Linux /proc), to prove none is left."""
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the ppid; the command name (field 2) may hold spaces, so split after it.
        if int(stat.rpartition(")")[2].split()[1]) == me:
            pids.append(int(entry.name))
    return pids


def _assert_all_sent(run: dict[str, Any], n: int) -> None:
    assert set(run) >= RUN_KEYS
    assert run["n"] == n
    assert run["sent"] == n
    assert run["not_sent"] == 0


def _assert_comparison(scenario: dict[str, Any], variants: set[str], n: int) -> None:
    assert set(scenario["variants"]) == variants
    for variant, data in scenario["variants"].items():
        expected = min(n, TINY.httpx_max_n) if variant == "httpx" else n
        assert len(data["runs"]) == TINY.reps
        for run in data["runs"]:
            _assert_all_sent(run, expected)
            assert run["variant"] == variant
        assert data["median"]["sent"] == expected
    assert "throughput_sdk_over_aiohttp" in scenario["ratios"]
    assert "cpu_per_msg_sdk_over_aiohttp" in scenario["ratios"]
    assert ("throughput_sdk_over_httpx" in scenario["ratios"]) == TINY.httpx


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the process check reads /proc")
def test_every_scenario_reports_every_message_sent(tmp_path: Path) -> None:
    """A tiny run of every benchmark scenario sends everything and leaves no process behind."""
    out = tmp_path / "report.json"
    before = set(_children())

    report = run_benchmarks(TINY, out=out, log=lambda _line: None)

    assert set(_children()) <= before, "the harness left processes behind"
    assert json.loads(out.read_text()) == report
    assert set(report) == {"meta", "scenarios", "targets"}
    assert report["meta"]["machine"]["python"]
    assert report["meta"]["config"]["throughput_n"] == TINY.throughput_n
    assert tuple(report["scenarios"]) == SCENARIOS
    scenarios = report["scenarios"]

    _assert_comparison(scenarios["throughput"], COMPARED, TINY.throughput_n)
    assert scenarios["throughput"]["server"].startswith("aiohttp")
    _assert_comparison(scenarios["latency"], COMPARED, TINY.latency_n)
    assert scenarios["latency"]["ideal_msgs_per_s"] == pytest.approx(50 / 0.05)

    memory = scenarios["memory"]
    _assert_all_sent(memory["runs"]["small"], TINY.memory_small_n)
    _assert_all_sent(memory["runs"]["large"], TINY.memory_large_n)
    assert memory["runs"]["large"]["p50_ms"] is None  # latency not recorded there
    assert memory["peak_rss_large_over_small"] > 0

    faults = scenarios["faults"]
    assert set(faults["variants"]) == {"clean", "faults"}
    _assert_all_sent(faults["variants"]["clean"]["runs"][0], TINY.throughput_n)
    faulty = faults["variants"]["faults"]["runs"][0]
    _assert_all_sent(faulty, TINY.throughput_n)
    assert faulty["retries"] > 0  # 1 answer in 5 was a FAILURE, and was retried

    expected_targets = {
        "throughput SDK / raw aiohttp",
        "CPU per msg SDK / raw aiohttp",
        "peak RSS, large stream (MB)",
        "peak RSS large / small stream",
    } | ({"throughput SDK / httpx"} if TINY.httpx else set())
    assert {t["target"] for t in report["targets"]} == expected_targets
    table = render_markdown(report)
    assert "(a) SDK send_many" in table
    assert "(b) raw aiohttp" in table
