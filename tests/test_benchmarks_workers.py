"""Smoke test of the harness's workers scenario (issue #14), so that it cannot rot.

Tiny N, one round, the aiohttp fallback server: it checks what the report holds
(the four runs, every message sent, the bars checked, no process left) and never
asserts a timing. The same for the ``--rate`` accuracy runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.run import Config, render_markdown, run_benchmarks
from benchmarks.workers import RATE_DEPARTMENTS, rate_accuracy

from .test_benchmarks_smoke import _children

TINY = Config(
    throughput_concurrency=8,
    server="aiohttp",
    httpx=False,
    reps=1,
    scenarios=("workers",),
    workers_n=200,
    workers=2,
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the process check reads /proc")
def test_the_workers_scenario_reports_its_four_runs_and_the_bars() -> None:
    """python -m benchmarks runs the --workers comparison: four runs, two bars checked."""
    before = set(_children())

    report = run_benchmarks(TINY, out=None, log=lambda _line: None)

    assert set(_children()) <= before, "the harness left processes behind"
    workers = report["scenarios"]["workers"]
    assert workers["n"] == TINY.workers_n
    assert workers["workers"] == 2
    loop = workers["loop_as_shipped"]
    assert set(workers["medians"]) == {
        "raw x1 asyncio",
        f"raw x2 {loop}",
        "botmsg x1",
        "botmsg --workers 2",
    }
    for name, medians in workers["medians"].items():
        assert medians["msgs_per_s"] > 0, name
        assert medians["cpu_tree_us_per_msg"] > 0, name
    bars = {t["target"]: t for t in report["targets"]}
    same = bars["--workers 2 / 2 raw aiohttp processes, same loop (throughput)"]
    assert (same["op"], same["limit"]) == (">=", 0.9)
    assert same["value"] == workers["workers_vs_raw_same_processes_same_loop"]
    one = bars["--workers 2 / 1 raw aiohttp process, asyncio (throughput)"]
    assert (one["op"], one["limit"]) == (">=", 1.8)
    assert "several processes" in render_markdown(report)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the process check reads /proc")
def test_the_rate_accuracy_run_counts_every_arrival_by_department() -> None:
    """python -m benchmarks.workers --rate-accuracy: both runs measured on the server's clock."""
    before = set(_children())

    report = rate_accuracy(100.0, 20.0, 0.2, workers=2, concurrency=8)

    assert set(_children()) <= before, "the run left processes behind"
    glob = report["global"]
    assert glob["limit"] == 100.0
    assert [r["received"] for r in glob["by_department"].values()] == [120]
    per = report["per_department"]
    assert set(per["by_department"]) == set(RATE_DEPARTMENTS)
    assert [r["received"] for r in per["by_department"].values()] == [24] * 4
    for run in (glob, per):
        assert isinstance(run["within_bar"], bool)
        for received in run["by_department"].values():
            assert received["steady_rate_pct"] > 0
            assert received["most_in_1s"] >= 1
