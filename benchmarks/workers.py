"""``botmsg send-many --workers N`` against raw aiohttp processes: the bars of issue #14.

Run (speed)::

    python -m benchmarks.workers [--n 100000] [--reps 3] [--workers 2]

Run (memory)::

    python -m benchmarks.workers --memory [--memory-n 1000000] [--memory-small 100000]

Against nginx on loopback when installed (else the aiohttp fallback server).

**Speed**: in each of ``--reps`` rounds, alternated, medians reported:

* ``raw x1 asyncio``: one raw aiohttp process on asyncio's default loop (what a
  user writes by hand).
* ``raw xW <loop>``: W raw aiohttp processes at once, N/W messages each, on the
  loop ``--workers`` runs on as shipped (uvloop when the ``speed`` extra is
  installed); msg/s is N over the longest one's send phase.
* ``botmsg x1``: ``botmsg send-many`` as shipped, one process.
* ``botmsg --workers W``: the same with W workers, as shipped.

The bars: ``--workers W`` >= 0.9x ``raw xW`` on the same loop (scaling, like for
like) and >= 1.8x ``raw x1 asyncio`` (what a user gains over writing it by hand).

Throughput of a ``botmsg`` run is N over the sending phase the command reports
(worker start-up included, the validation pass excluded); of a raw run, N over
its send phase (interpreter start-up and imports excluded). N defaults to
100,000: a bulk job is large, and a worker's start-up (about 0.3 s of CPU:
interpreter, aiohttp, uvloop, the SDK) and the parent's validation pass are paid
once per job; at 100,000 messages they are a few percent of the run, as in a real
job, where at a few thousand they would be most of it.

CPU per message is the whole process tree's (every process of the run, start to
end: interpreter start-up, imports and, for ``botmsg``, the validation pass
included), from ``RUSAGE_CHILDREN``, over N. The ``botmsg`` runs also report the
parent's own CPU per item. The coordination cost per item is the tree CPU of
``--workers W`` less that of one process, over N: what running as W processes
costs (the extra start-ups, handing items out and results back, and the two
cores shared by more processes).

**Rate accuracy** (``--rate-accuracy [--rate 500] [--per-department-rate 5] [--seconds 10]``):
``--workers W --rate R`` and then ``--per-department-rate`` over four departments, each
for ``--seconds`` at the limit, against a loopback service that stamps each arrival on
its own clock: the steady rate received (from the end of the first second, which holds
the burst) in percent of the limit, and the most received in any one second. The bar:
within 5% over 10 s.

**Memory**: ``--workers W`` with a ``--journal``, over ``--memory-small`` and
``--memory-n`` rows: the peak RSS of the parent (its own ``ru_maxrss``) and of
every worker (``VmHWM``, sampled from ``/proc`` while it runs; the largest
exactly, from the parent's ``RUSAGE_CHILDREN``). The bar: every process <= 100 MB,
the same (within noise) at both sizes.

The machine's load average is printed before and after: on a shared 2-core
machine other work changes every figure; ratios are from the same run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrs import asdict

from benchmarks.servers import REPO_ROOT, child_env, start_server
from benchmarks.stamps import most_in_window, recording_server, steady_rate
from benchmarks.variants import RunSpec, make_items

# The summary line: "N of M items: ...; ... in T s, R messages/s".
_SUMMARY = re.compile(r"(\d+) of \d+ items: .* in ([0-9.]+) s, ([0-9,]+) messages/s")
# What the botmsg runs print at exit, on stderr, after this marker.
_MARKER = "BENCH-RUSAGE "
# ``botmsg`` in a process that reports its own CPU and peak RSS, and its workers'.
_WRAPPER = (
    "import atexit, json, resource, sys\n"
    "def _report():\n"
    "    s = resource.getrusage(resource.RUSAGE_SELF)\n"
    "    c = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "    sys.stderr.write('" + _MARKER + "' + json.dumps({\n"
    "        'self_cpu': s.ru_utime + s.ru_stime, 'self_maxrss_kb': s.ru_maxrss,\n"
    "        'children_cpu': c.ru_utime + c.ru_stime, 'children_maxrss_kb': c.ru_maxrss,\n"
    "    }) + '\\n')\n"
    "atexit.register(_report)\n"
    "from botmsg_async.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
MEMORY_BAR_MB = 100.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _shipped_loop() -> bool:
    """Whether ``botmsg`` as shipped runs on uvloop here (``--loop auto``)."""
    return importlib.util.find_spec("uvloop") is not None


def _raw(base_url: str, n: int, processes: int, concurrency: int, uvloop: bool) -> dict[str, float]:
    """``processes`` raw aiohttp processes at once, ``n`` messages in all."""
    cpu = _children_cpu()
    share = n // processes
    spec = [
        json.dumps(
            asdict(RunSpec("aiohttp", base_url, share, concurrency, latency=False, uvloop=uvloop))
        )
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
        "send_cpu_us_per_msg": sum(r["cpu_s"] for r in results) / sent * 1e6,
        "cpu_tree_us_per_msg": (_children_cpu() - cpu) / sent * 1e6,
    }


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (Linux ``/proc``; empty elsewhere)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
        found.extend(children)
        todo.extend(children)
    return found


def _hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class _RssSampler:
    """The peak RSS (``VmHWM``) of every process under a pid, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks_kb: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.2):
            for pid in _descendants(self.pid):
                hwm = _hwm_kb(pid)
                if hwm is not None:
                    self.peaks_kb[pid] = max(self.peaks_kb.get(pid, 0), hwm)

    def stop(self) -> dict[int, int]:
        self._done.set()
        self._thread.join()
        return self.peaks_kb


def _botmsg(
    base_url: str,
    source: Path,
    n: int,
    workers: int,
    concurrency: int,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """One ``botmsg send-many`` run as shipped; its speed, CPU and peak RSS."""
    env = child_env()
    # The fake servers' default credentials (nginx accepts any).
    env.update(BOTMSG_BASE_URL=base_url, BOTMSG_USERNAME="user", BOTMSG_PASSWORD="secret")  # noqa: S106
    cpu = _children_cpu()
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _WRAPPER,
            "send-many",
            str(source),
            "--workers",
            str(workers),
            "-c",
            str(concurrency),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    sampler = _RssSampler(process.pid)
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    sampled = sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"botmsg failed ({process.returncode}): {stderr[-2000:]}")
    match = _SUMMARY.search(stderr)
    if match is None or int(match[1]) != n:
        raise RuntimeError(f"unexpected summary: {stderr[-2000:]}")
    usage = json.loads(stderr.rpartition(_MARKER)[2].splitlines()[0])
    tree = _children_cpu() - cpu
    return {
        # The command's own rate: from its unrounded time (a tiny run prints "in 0.0 s").
        "msgs_per_s": float(match[3].replace(",", "")),
        "command_wall_s": wall,
        "cpu_tree_us_per_msg": tree / n * 1e6,
        "parent_cpu_us_per_msg": usage["self_cpu"] / n * 1e6,
        "parent_peak_rss_mb": usage["self_maxrss_kb"] / 1024,
        "workers_peak_rss_mb": usage["children_maxrss_kb"] / 1024,
        "sampled_peak_rss_mb": sorted(
            (round(kb / 1024, 1) for pid, kb in sampled.items() if pid != process.pid),
            reverse=True,
        ),
    }


def _write_input(path: Path, n: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["department_uuid", "user_uuid", "text"])
        writer.writerows(make_items(n))


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    return speed(args.n, args.workers, args.concurrency, args.reps, args.server)


def speed(n: int, w: int, c: int, reps: int, server_kind: str) -> dict[str, Any]:
    """The speed comparison: ``reps`` alternated rounds of the four runs, their medians.

    Args:
        n: Messages per run.
        w: Worker processes (and raw processes in the like-for-like run).
        c: Concurrency of every process.
        reps: Rounds.
        server_kind: ``"auto"``, ``"nginx"`` or ``"aiohttp"``.

    Returns:
        The medians of each run and the ratios the bars are about (JSON-friendly).
    """
    uvloop = _shipped_loop()
    loop = "uvloop" if uvloop else "asyncio"
    runs: dict[str, list[dict[str, Any]]] = {}
    names = ("raw x1 asyncio", f"raw x{w} {loop}", "botmsg x1", f"botmsg --workers {w}")
    with tempfile.TemporaryDirectory() as tmp, start_server(server_kind) as server:
        source = Path(tmp) / "in.csv"
        _write_input(source, n)
        url = server.base_url
        for _ in range(reps):
            runs.setdefault(names[0], []).append(_raw(url, n, 1, c, uvloop=False))
            runs.setdefault(names[1], []).append(_raw(url, n, w, c, uvloop=uvloop))
            runs.setdefault(names[2], []).append(_botmsg(url, source, n, 1, c))
            runs.setdefault(names[3], []).append(_botmsg(url, source, n, w, c))
        description = server.description
    medians = {
        name: {
            key: statistics.median(r[key] for r in results)
            for key, value in results[0].items()
            if isinstance(value, float)
        }
        for name, results in runs.items()
    }
    workers = medians[names[3]]
    single = medians[names[2]]
    return {
        "server": description,
        "n": n,
        "reps": reps,
        "workers": w,
        "concurrency": c,
        "loop_as_shipped": loop,
        "medians": medians,
        "workers_vs_raw_same_processes_same_loop": workers["msgs_per_s"]
        / medians[names[1]]["msgs_per_s"],
        "workers_vs_one_raw_default_loop": workers["msgs_per_s"] / medians[names[0]]["msgs_per_s"],
        "workers_vs_one_botmsg": workers["msgs_per_s"] / single["msgs_per_s"],
        "coordination_us_per_item": workers["cpu_tree_us_per_msg"] - single["cpu_tree_us_per_msg"],
        "bars": {"same_processes_same_loop": 0.9, "one_raw_default_loop": 1.8},
    }


def _memory(args: argparse.Namespace) -> dict[str, Any]:
    w, c = args.workers, args.concurrency
    sizes = (args.memory_small, args.memory_n)
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, start_server(args.server) as server:
        for n in sizes:
            source = Path(tmp) / f"in-{n}.csv"
            _write_input(source, n)
            journal = Path(tmp) / f"journal-{n}"
            run = _botmsg(server.base_url, source, n, w, c, ("--journal", str(journal)))
            source.unlink()
            found[str(n)] = {
                key: run[key]
                for key in (
                    "msgs_per_s",
                    "parent_peak_rss_mb",
                    "workers_peak_rss_mb",
                    "sampled_peak_rss_mb",
                )
            }
        found["server"] = server.description
    peaks = [
        max(found[str(n)]["parent_peak_rss_mb"], found[str(n)]["workers_peak_rss_mb"])
        for n in sizes
    ]
    found["every_process_within_bar"] = max(peaks) <= MEMORY_BAR_MB
    found["growth_mb_small_to_large"] = peaks[1] - peaks[0]
    return found


#: Departments of the per-department rate run: each one's rate is measured apart.
RATE_DEPARTMENTS = tuple(f"00000000-0000-4000-9000-{i:012d}" for i in range(4))
#: Issue #14's accuracy bar: the rate received over the run within 5% of the limit.
RATE_TOLERANCE_PCT = 5.0


def _rate_input(path: Path, n: int, departments: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["department_uuid", "user_uuid", "text"])
        for i, (_, user, text) in enumerate(make_items(n)):
            writer.writerow([departments[i % len(departments)], user, text])


def _received(stamps: list[float], limit: float) -> dict[str, Any]:
    burst = max(1, int(limit / 10))  # ProcessRateLimiter's burst: a tenth of a second
    rate = steady_rate(stamps)
    return {
        "received": len(stamps),
        "seconds": round(max(stamps) - min(stamps), 2) if stamps else 0.0,
        "steady_rate_pct": round(rate / limit * 100, 1),
        "most_in_1s": most_in_window(stamps),
        "limit_plus_burst": round(limit) + burst,
    }


def rate_accuracy(
    rate: float, per_department_rate: float, seconds: float, workers: int, concurrency: int
) -> dict[str, Any]:
    """``--workers`` under ``--rate`` and under ``--per-department-rate``, on the server's clock.

    Each run sends ``seconds + 1`` seconds' worth at the limit (the first second
    holds the burst) to a loopback service that stamps each arrival; the steady
    rate is measured from the end of the first second to the last arrival.

    Args:
        rate: The global limit (messages per second, all workers together).
        per_department_rate: The per-department limit, over four departments.
        seconds: The steady part of each run.
        workers: Worker processes.
        concurrency: Sends in flight per worker.

    Returns:
        Per run: messages received, the steady rate in percent of the limit, the
        most received in any one second, and whether the 5% bar holds.
    """
    found: dict[str, Any] = {"workers": workers, "concurrency": concurrency}
    runs = (
        ("global", "--rate", rate, RATE_DEPARTMENTS[:1]),
        ("per_department", "--per-department-rate", per_department_rate, RATE_DEPARTMENTS),
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, flag, limit, departments in runs:
            n = round(limit * len(departments) * (seconds + 1))
            source = Path(tmp) / f"{name}.csv"
            _rate_input(source, n, departments)
            with recording_server() as (recorder, url):
                _botmsg(url, source, n, workers, concurrency, (flag, str(limit)))
                stamps = list(recorder.stamps)
            per = {
                department: _received([t for d, t in stamps if d == department], limit)
                for department in departments
            }
            found[name] = {
                "limit": limit,
                "by_department": per,
                "within_bar": all(
                    abs(r["steady_rate_pct"] - 100.0) <= RATE_TOLERANCE_PCT for r in per.values()
                ),
            }
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison (or the memory run); print a JSON report and a small table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers")
    parser.add_argument("--n", type=int, default=100_000, help="messages per speed run")
    parser.add_argument("--reps", type=int, default=3, help="runs per variant (alternated)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--server", choices=["auto", "nginx", "aiohttp"], default="auto")
    parser.add_argument("--memory", action="store_true", help="the memory run instead")
    parser.add_argument("--memory-n", type=int, default=1_000_000)
    parser.add_argument("--memory-small", type=int, default=100_000)
    parser.add_argument(
        "--rate-accuracy", action="store_true", help="the --rate accuracy runs instead"
    )
    parser.add_argument("--rate", type=float, default=500.0, help="global limit, msg/s")
    parser.add_argument("--per-department-rate", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="steady part of a rate run")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_before": os.getloadavg(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    if args.rate_accuracy:
        report.update(
            rate_accuracy(
                args.rate, args.per_department_rate, args.seconds, args.workers, args.concurrency
            )
        )
    else:
        report.update(_memory(args) if args.memory else _speed(args))
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if not args.memory and not args.rate_accuracy:
        for name, m in report["medians"].items():
            print(
                f"{name:24} {m['msgs_per_s']:8.0f} msg/s  "
                f"{m['cpu_tree_us_per_msg']:6.1f} µs CPU/msg (process tree)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
