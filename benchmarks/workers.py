"""``botmsg send-many --workers N`` against raw aiohttp processes (issue #14).

Run: ``python -m benchmarks.workers [--n 40000] [--reps 3] [--workers 2]``.

Same run, alternated, medians of ``--reps``, against nginx on loopback when
installed (else the aiohttp fallback server):

* ``raw x1``: one raw aiohttp process (``benchmarks.variants`` ``raw_aiohttp``).
* ``raw xW``: W raw aiohttp processes at once, N/W messages each; msg/s is N over
  the longest one's send phase.
* ``botmsg x1``: ``botmsg send-many`` as shipped, one process.
* ``botmsg --workers W``: the same with W workers.

The ``botmsg`` runs are timed as the command reports its own sending phase (worker
start-up included, input checking excluded); CPU per message is the whole process
tree's (``RUSAGE_CHILDREN``: the parent and its workers), over N. The difference
between ``--workers W`` and one process is the coordination cost per item. The
machine's load average is printed before and after: other work on a 2-core
machine changes every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrs import asdict

from benchmarks.servers import REPO_ROOT, child_env, start_server
from benchmarks.variants import RunSpec, make_items

# The summary line: "N of M items: ...; ... in T s, R messages/s".
_SUMMARY = re.compile(r"(\d+) of \d+ items: .* in ([0-9.]+) s,")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _raw(base_url: str, n: int, processes: int, concurrency: int) -> dict[str, float]:
    """``processes`` raw aiohttp processes at once, ``n`` messages in all."""
    cpu = _children_cpu()
    share = n // processes
    spec = [
        json.dumps(asdict(RunSpec("aiohttp", base_url, share, concurrency, latency=False)))
        for _ in range(processes)
    ]
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.variants", s],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=child_env(),
        )
        for s in spec
    ]
    results = []
    for process in running:
        out, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError("a raw aiohttp run failed")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    wall = max(r["wall_s"] for r in results)
    sent = share * processes
    return {
        "msgs_per_s": sent / wall,
        "cpu_us_per_msg": sum(r["cpu_s"] for r in results) / sent * 1e6,
        "cpu_tree_us_per_msg": (_children_cpu() - cpu) / sent * 1e6,
    }


def _botmsg(
    base_url: str, source: Path, n: int, workers: int, concurrency: int
) -> dict[str, float]:
    env = child_env()
    # The fake servers' default credentials (nginx accepts any).
    env.update(BOTMSG_BASE_URL=base_url, BOTMSG_USERNAME="user", BOTMSG_PASSWORD="secret")  # noqa: S106
    cpu = _children_cpu()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "botmsg_async",
            "send-many",
            str(source),
            "--workers",
            str(workers),
            "-c",
            str(concurrency),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"botmsg failed ({done.returncode}): {done.stderr}")
    match = _SUMMARY.search(done.stderr)
    if match is None or int(match[1]) != n:
        raise RuntimeError(f"unexpected summary: {done.stderr}")
    return {
        "msgs_per_s": n / float(match[2]),
        "cpu_tree_us_per_msg": (_children_cpu() - cpu) / n * 1e6,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; print a JSON report and a small table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers")
    parser.add_argument("--n", type=int, default=40_000, help="messages per run")
    parser.add_argument("--reps", type=int, default=3, help="runs per variant (alternated)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--server", choices=["auto", "nginx", "aiohttp"], default="auto")
    args = parser.parse_args(argv)
    n, w, c = args.n, args.workers, args.concurrency
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, start_server(args.server) as server:
        source = Path(tmp) / "in.csv"
        with source.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["department_uuid", "user_uuid", "text"])
            writer.writerows(make_items(n))
        url = server.base_url
        for _ in range(args.reps):
            runs.setdefault("raw x1", []).append(_raw(url, n, 1, c))
            runs.setdefault(f"raw x{w}", []).append(_raw(url, n, w, c))
            runs.setdefault("botmsg x1", []).append(_botmsg(url, source, n, 1, c))
            runs.setdefault(f"botmsg --workers {w}", []).append(_botmsg(url, source, n, w, c))
        description = server.description
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }
    raw1 = medians["raw x1"]["msgs_per_s"]
    raww = medians[f"raw x{w}"]["msgs_per_s"]
    workers = medians[f"botmsg --workers {w}"]
    single = medians["botmsg x1"]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "server": description,
        "n": n,
        "reps": args.reps,
        "workers": w,
        "concurrency": c,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "medians": medians,
        "workers_vs_raw_same_processes": workers["msgs_per_s"] / raww,
        "workers_vs_one_raw": workers["msgs_per_s"] / raw1,
        "workers_vs_one_botmsg": workers["msgs_per_s"] / single["msgs_per_s"],
        "coordination_us_per_item": workers["cpu_tree_us_per_msg"] - single["cpu_tree_us_per_msg"],
    }
    print(json.dumps(report, indent=2))
    for name, m in medians.items():
        print(f"{name:24} {m['msgs_per_s']:8.0f} msg/s  {m['cpu_tree_us_per_msg']:6.1f} µs CPU/msg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
