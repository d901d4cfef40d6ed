"""Smoke test of the harness's workers scenario (issue #14), so that it cannot rot.

Tiny N, one round, the aiohttp fallback server: it checks what the report holds
(the four runs, every message sent, the bars checked, no process left) and never
asserts a timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.run import Config, render_markdown, run_benchmarks

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
