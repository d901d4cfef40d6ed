"""Smoke test of the harness's fair and malloc scenarios (issue #17), so that they cannot rot.

Tiny N, one run per variant, the aiohttp fallback server: it checks what the
report holds (every variant on every installed loop, GC time, the tunables in
the runs' environment, the bars) and never asserts a timing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from benchmarks.run import Config, render_markdown, run_benchmarks
from botmsg_async.cli.tunables import MALLOC_TUNABLES

from .test_benchmarks_smoke import _children

LOOPS = ("asyncio", "uvloop") if importlib.util.find_spec("uvloop") else ("asyncio",)
FAIR = {"raw_discard", "raw_keep", "sdk_all", "sdk_none", "sdk_stream"}
TINY = Config(
    throughput_n=40,
    throughput_concurrency=8,
    server="aiohttp",
    server_processes=1,
    httpx=False,
    fair_reps=1,
    scenarios=("fair", "malloc"),
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the process check reads /proc")
def test_fair_and_malloc_scenarios_report_every_variant() -> None:
    """Every fair variant runs on every installed loop; the malloc runs carry the tunables."""
    before = set(_children())

    report = run_benchmarks(TINY, out=None, log=lambda _line: None)

    assert set(_children()) <= before, "the harness left processes behind"
    assert report["meta"]["load_average_start"] is not None
    assert report["meta"]["load_average_end"] is not None
    fair = report["scenarios"]["fair"]
    assert set(fair["variants"]) == {f"{name}@{loop}" for name in FAIR for loop in LOOPS}
    for label, data in fair["variants"].items():
        [run] = data["runs"]
        assert (run["sent"], run["not_sent"]) == (TINY.throughput_n, 0), label
        assert run["loop"] == label.partition("@")[2]
        assert run["gc_us_per_msg"] >= 0
        assert len(run["gc_collections"]) == 3
    assert f"{LOOPS[0]}: CPU sdk_all / raw_keep" in fair["ratios"]

    malloc = report["scenarios"]["malloc"]
    assert malloc["tunables"] == MALLOC_TUNABLES
    for label, data in malloc["variants"].items():
        [run] = data["runs"]
        assert run["sent"] == TINY.throughput_n
        assert run["malloc_tunables"] == (MALLOC_TUNABLES if "+tunables" in label else "")

    targets = {t["target"] for t in report["targets"]}
    assert f"{LOOPS[0]}: CPU send_many keep=all / raw keeping answers" in targets
    assert f"{LOOPS[0]}: CPU send_many keep=none / raw dropping answers" in targets
    table = render_markdown(report)
    assert "fair comparison" in table
    assert "malloc tunables" in table
