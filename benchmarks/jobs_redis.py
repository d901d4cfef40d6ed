"""Redis job (send-many --redis): bytes per item in Redis and coordination cost, measured.

Usage: ``python -m benchmarks.jobs_redis [ITEMS]`` (default 30,000). Starts its own
redis-server (AOF, appendfsync always) in a temporary directory and a fake
service in process; runs one job with one run, then prints MEMORY USAGE of
every key of the job, in bytes per item, and the run's throughput.

``python -m benchmarks.jobs_redis throughput [--items 6000] [--runs 3]
[--concurrency 16] [--delay 0.05] [--chunk-size 64]``: the issue's throughput bar.
Against a latency-bound server (``benchmarks.fake_server`` in its own process,
every answer ``--delay`` late, so that one run is bound by latency x concurrency,
not by CPU), one job sent by ``--runs`` run processes at once, and another by one
run process, each run ``--concurrency`` sends in flight; then a plain
``send_many`` (one process, same concurrency, no Redis) for the CPU baseline.
Every process imports, builds its items and connects first, then all start on
one "go": msg/s is items over the time from "go" to the last process's end.
Printed: msg/s of each, their ratio, and the coordination cost per item in µs
(the runs' CPU per item minus the plain ``send_many``'s CPU per item; CPU is each
process's own user + system time from "go" to its end). The load average is
printed before and after: on a shared 2-core machine other work moves every figure.

``python -m benchmarks.jobs_redis faults [--items 30000] [--runs 3]``: the issue's
correctness bar: ``--runs`` run processes on one job against the fake service
(in this process) with 10% faults: every item exactly one outcome, none received
twice, the report equal to the server's records.

``python -m benchmarks.jobs_redis restart [--items 30000] [--runs 3]``: the same
with 20 ms answers, and redis-server killed (SIGKILL) and started again on its
AOF (``appendfsync always``) once about half of the job is settled: the job
completes; printed: items received twice, and the loss window (items the
server received whose start Redis no longer had, or sends Redis forgot).

``python -m benchmarks.jobs_redis rss [--rows 1000000] [--seconds 15]
[--package-dir DIR]``: peak RSS of one ``botmsg send-many INPUT --redis --job``
process on a ``--rows`` CSV, stopped (SIGINT) ``--seconds`` after its first send,
against a fast server (aiohttp, own process) and a Redis without AOF
(``--accept-redis-loss``). ``--package-dir``: a directory holding another
``botmsg_async`` to measure instead (e.g. ``git archive <commit> botmsg_async | tar
-x -C DIR``: the "before").

``python -m benchmarks.jobs_redis report [--items 1000000] [--package-dir DIR]``:
peak RSS and time of one ``botmsg job report --out FILE`` process on a finished job
of ``--items`` items written straight into a Redis without AOF with the documented
key layout (docs/jobs.md "Key layout"; no sends): 90% sent (message UUIDs packed
per chunk), 5% failed (a details field each), 3% unknown (started, no outcome), 2%
skipped (never started). ``--package-dir`` as for ``rss``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis

from benchmarks.servers import REPO_ROOT, child_env, start_server
from botmsg_async import BotMessageClient, SendRequest
from botmsg_async.jobs import job_results, job_status, run_job_async
from botmsg_async.testing import FakeBotMessageServer, Fault, RequestInfo


async def measure(items: int, sock: Path, client: redis.Redis) -> None:
    """One run of an ``items`` job; the job's keys' MEMORY USAGE and the run's rate."""
    work: list[SendRequest | None] = [
        SendRequest(str(uuid.uuid4()), str(uuid.uuid4()), f"message {i}") for i in range(items)
    ]
    async with FakeBotMessageServer() as fake:
        started = time.perf_counter()
        report = await run_job_async(
            f"unix://{sock}", "bench", work, base_url=fake.base_url,
            username=fake.username, password=fake.password, concurrency=64,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
    total = 0
    for key in sorted(client.scan_iter("botmsg:job:*")):
        size = int(client.memory_usage(key, samples=0) or 0)
        total += size
        print(f"{key.decode():40} {size:>10} bytes")
    print(f"total {total} bytes for {items} items: {total / items:.1f} bytes/item")
    print(f"{report.counts} in {elapsed:.1f} s: {items / elapsed:.0f} msg/s (one run)")


# -- throughput: runs in processes of their own ------------------------------------


def _work(items: int) -> list[SendRequest]:
    """The same items in every process (so that every run joins the same job)."""
    return [
        SendRequest(
            str(uuid.uuid5(uuid.NAMESPACE_URL, f"d{i % 10}")),
            str(uuid.uuid5(uuid.NAMESPACE_URL, f"u{i}")),
            f"message {i}",
        )
        for i in range(items)
    ]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _child(args: argparse.Namespace) -> None:
    """One process: ready, wait for "go" on stdin, send, print its CPU and counts as JSON."""
    work = _work(args.items)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    cpu = _cpu()
    last = [time.monotonic()]  # CLOCK_MONOTONIC: one clock for every process here

    def settled(_: object) -> None:
        last[0] = time.monotonic()

    if args.job:
        report = await run_job_async(
            args.redis, args.job, work, base_url=args.base_url, username="u",
            password="p",  # noqa: S106 - a fake server's credentials
            concurrency=args.concurrency, chunk_size=args.chunk_size, on_result=settled,
        )  # fmt: skip
        sent = report.counts.sent
    else:
        async with BotMessageClient(args.base_url, "u", "p") as client:
            plain = await client.send_many(
                work, concurrency=args.concurrency, keep="none", on_result=settled
            )
        sent = plain.sent
    print(json.dumps({"cpu": _cpu() - cpu, "sent": sent, "last": last[0]}), flush=True)


def _together(commands: list[list[str]]) -> tuple[float, float, float, int]:
    """Start ``commands``, let them all go at once.

    Returns:
        Seconds from "go" to the last item settled, seconds to the last process's
        end, CPU seconds of all, items sent.
    """
    procs = [
        subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=child_env(),
            text=True,
        )
        for command in commands
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a run exited with {proc.wait()} before it was ready")
        started = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
        wall = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    done = max(o["last"] for o in outputs) - started
    return done, wall, sum(o["cpu"] for o in outputs), sum(o["sent"] for o in outputs)


@contextmanager
def _redis_server(*, durable: bool = True) -> Iterator[tuple[Path, redis.Redis]]:
    """A redis-server of its own on a unix socket; durable: AOF, appendfsync always."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found on PATH")
    with tempfile.TemporaryDirectory() as directory:
        sock = Path(directory) / "redis.sock"
        server = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(sock), "--dir", directory,
             "--save", "", "--appendonly", "yes" if durable else "no",
             "--appendfsync", "always"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = redis.Redis(unix_socket_path=str(sock))
            for _ in range(500):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
            yield sock, client
        finally:
            server.kill()
            server.wait()


def throughput(args: argparse.Namespace) -> None:
    """N run processes vs one on a job against a latency-bound server; coordination cost."""
    print(f"load before: {os.getloadavg()}, cpus: {os.cpu_count()}")
    print(
        f"{args.items} items, concurrency {args.concurrency} per process, chunk "
        f"{args.chunk_size}, answers {args.delay * 1000:g} ms late"
    )
    child = [sys.executable, "-m", "benchmarks.jobs_redis", "_child", "--items", str(args.items)]
    child += ["--concurrency", str(args.concurrency), "--chunk-size", str(args.chunk_size)]
    with _redis_server() as (sock, _), start_server("aiohttp", processes=1, delay=args.delay) as s:
        child += ["--base-url", s.base_url, "--redis", f"unix://{sock}"]
        rows = []
        for name, count, extra in (
            (f"{args.runs} runs, one job", args.runs, ["--job", "many"]),
            ("1 run, one job", 1, ["--job", "one"]),
            ("plain send_many", 1, []),
        ):
            done, wall, cpu, sent = _together([child + extra for _ in range(count)])
            rows.append((args.items / done, args.items / wall, cpu / args.items * 1e6))
            print(
                f"{name:22} {args.items / done:6.0f} msg/s to the last item settled "
                f"({done:5.2f} s), {args.items / wall:6.0f} msg/s to the last exit "
                f"({wall:5.2f} s), CPU {cpu / args.items * 1e6:4.0f} µs/item, sent {sent}"
            )
    (many, many_exit, many_cpu), (one, one_exit, one_cpu), (_, _, plain_cpu) = rows
    print(
        f"ratio {args.runs} runs / 1 run: {many / one:.2f}x to the last item settled, "
        f"{many_exit / one_exit:.2f}x to the last exit"
    )
    print(
        f"coordination cost per item: {many_cpu - plain_cpu:.0f} µs ({args.runs} runs), "
        f"{one_cpu - plain_cpu:.0f} µs (1 run)"
    )
    print(f"load after: {os.getloadavg()}")


def _start_redis(binary: str, directory: str, sock: Path) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--dir", directory,
         "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(unix_socket_path=str(sock))
    for _ in range(1000):
        try:
            client.ping()
            break
        except (redis.ConnectionError, redis.BusyLoadingError):
            time.sleep(0.02)
    client.close()
    return server


async def _shared_job(args: argparse.Namespace, *, restart: bool) -> None:
    """``args.runs`` run processes on one job against the fake service with 10% faults
    (and, with ``restart``, Redis killed and started again mid-job); checks the bars."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found on PATH")
    print(f"load before: {os.getloadavg()}, cpus: {os.cpu_count()}")
    work = _work(args.items)
    with tempfile.TemporaryDirectory() as directory:
        sock = Path(directory) / "redis.sock"
        server = _start_redis(binary, directory, sock)
        url = f"unix://{sock}"
        try:
            async with FakeBotMessageServer(
                username="u",
                password="p",  # noqa: S106 - a fake server's credentials
                fault_rate=0.1,
                seed=16,
                latency=0.02 if restart else 0.0,
            ) as fake:  # fmt: skip
                # Every request's key and retry number (the fake deduplicates by key, so a
                # run that sent an item again under its key would not show as received twice).
                attempts: list[tuple[str | None, int]] = []

                def seen(info: RequestInfo) -> bool:
                    attempts.append((info.idempotency_key, info.retry_count))
                    return False

                fake.inject(Fault.HTTP_500, times=None, when=seen)
                child = [sys.executable, "-m", "benchmarks.jobs_redis", "_child"]
                child += ["--items", str(args.items), "--concurrency", str(args.concurrency)]
                child += ["--chunk-size", str(args.chunk_size), "--job", "shared"]
                child += ["--base-url", fake.base_url, "--redis", url]
                procs = [
                    await asyncio.create_subprocess_exec(
                        *child,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        cwd=REPO_ROOT,
                        env=child_env(),
                    )
                    for _ in range(args.runs)
                ]
                for proc in procs:
                    assert proc.stdout is not None
                    await proc.stdout.readline()
                started = time.monotonic()
                for proc in procs:
                    assert proc.stdin is not None
                    proc.stdin.write(b"go\n")
                    await proc.stdin.drain()
                killed_at = None
                if restart:
                    half = args.items // 2
                    while (await job_status(url, "shared")).counts.total < half:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)  # polling Redis: no event to wait on
                    killed_at = (await job_status(url, "shared")).counts.total
                    server.kill()  # a crash: no shutdown, no final fsync
                    server.wait()
                    down = time.monotonic()
                    server = _start_redis(binary, directory, sock)
                    print(
                        f"Redis killed at {killed_at} items settled, back (AOF replayed) "
                        f"after {time.monotonic() - down:.2f} s"
                    )
                outs = [(await proc.communicate())[0].decode() for proc in procs]
                wall = time.monotonic() - started
                codes = [proc.returncode for proc in procs]
                results = await job_results(url, "shared", work)
                status = await job_status(url, "shared")
                messages = list(fake.messages)
        finally:
            server.kill()
            server.wait()
    by_index = {r.index: r for r in results}
    user_index = {str(w.user_uuid): i for i, w in enumerate(work)}
    received = collections.Counter(user_index[m.user_uuid] for m in messages)
    twice = sum(1 for n in received.values() if n > 1)
    mismatches = 0
    lost = 0
    got_by_index = {user_index[m.user_uuid]: m for m in messages}
    for index in range(args.items):
        r = by_index.get(index)
        m = got_by_index.get(index)
        if r is None:
            mismatches += 1
        elif r.outcome == "sent":
            mismatches += (
                m is None or m.message_uuid != r.message_uuid or m.idempotency_key != r.key
            )
        elif r.outcome in ("failed", "skipped") and m is not None:
            lost += 1  # received, but Redis's records say it was never delivered
    counts = collections.Counter(r.outcome for r in results)
    # A first attempt (retry 0) of one key twice: a second run sent the item afresh, as
    # a lost start record would make it (a retry within one send has retry >= 1).
    firsts = collections.Counter(key for key, retry in attempts if retry == 0)
    again = sum(1 for n in firsts.values() if n > 1)
    print(
        f"{args.runs} run processes, {args.items} items, 10% faults: {wall:.1f} s, exit codes "
        f"{codes}, runs' own counts {[json.loads(o.splitlines()[-1])['sent'] for o in outs]}"
    )
    print(
        f"job complete: {status.complete}; outcomes {dict(counts)}; items with one outcome: "
        f"{len(by_index)}/{args.items}; received twice: {twice}; report != server: "
        f"{mismatches}; received but recorded not sent (loss window): {lost}; sent afresh "
        f"twice under one key: {again}"
    )
    print(f"load after: {os.getloadavg()}")


def rss(args: argparse.Namespace) -> None:
    """Peak RSS of one ``send-many --redis`` run process on a large input."""
    print(f"load before: {os.getloadavg()}, cpus: {os.cpu_count()}")
    with (
        tempfile.TemporaryDirectory() as directory,
        start_server("aiohttp", processes=1) as s,
        _redis_server(durable=False) as (sock, client),
    ):
        path = Path(directory) / "in.csv"
        with path.open("w", encoding="utf-8") as f:
            f.write("department_uuid,user_uuid,text\n")
            for i in range(args.rows):
                dept = uuid.uuid5(uuid.NAMESPACE_URL, f"d{i % 10}")
                f.write(f"{dept},{uuid.uuid5(uuid.NAMESPACE_URL, f'u{i}')},message number {i}\n")
        env = child_env()
        # The benchmark server checks no credentials.
        env.update(BOTMSG_BASE_URL=s.base_url, BOTMSG_USERNAME="u", BOTMSG_PASSWORD="p")  # noqa: S106
        if args.package_dir:
            env["PYTHONPATH"] = args.package_dir
        command = [sys.executable, "-m", "botmsg_async", "send-many", str(path)]
        command += ["--redis", f"unix://{sock}", "--job", "rss", "--accept-redis-loss"]
        started = time.monotonic()
        proc = subprocess.Popen(command, env=env, cwd=directory, stderr=subprocess.DEVNULL)
        while not client.hget("botmsg:job:{rss}:meta", "t0") and proc.poll() is None:
            time.sleep(0.1)
        began = time.monotonic() - started
        time.sleep(args.seconds)
        settled = client.bitcount("botmsg:job:{rss}:settled")
        proc.send_signal(signal.SIGINT)
        proc.wait()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"{args.rows} rows: first send after {began:.1f} s (input checked), {settled} items "
        f"settled in {args.seconds:g} s; peak RSS of the run process {peak:.0f} MiB"
    )
    print(f"load after: {os.getloadavg()}")


def _write_job(client: redis.Redis, job: str, items: int, chunk: int) -> None:
    """A finished job of ``items`` items, written key by key (docs/jobs.md "Key layout")."""
    prefix = f"botmsg:job:{{{job}}}:"
    chunks = (items + chunk - 1) // chunk
    started, settled = bytearray((items + 7) // 8), bytearray((items + 7) // 8)
    pipe = client.pipeline(transaction=False)
    for number in range(chunks):
        packed = bytearray(16 * chunk)
        details: list[str] = []  # field, value, field, value...
        for index in range(number * chunk, min(items, (number + 1) * chunk)):
            kind = index % 100  # 0-89 sent, 90-94 failed, 95-97 unknown, 98-99 skipped
            bit = 0x80 >> (index % 8)
            if kind < 98:
                started[index // 8] |= bit
            if kind < 95:
                settled[index // 8] |= bit
            if kind < 90:
                off = (index % chunk) * 16
                packed[off : off + 16] = uuid.uuid4().bytes
            elif kind < 95:
                error = {"t": "APIStatusError", "e": "user not found", "st": 404}
                details += [str(index), "f" + json.dumps(error)]
        pipe.hset(prefix + "m", str(number), bytes(packed))
        if details:
            pipe.hset(prefix + "details", items=details)
        if number % 64 == 63:
            pipe.execute()
    pipe.set(prefix + "started", bytes(started))
    pipe.set(prefix + "settled", bytes(settled))
    pipe.hset(
        prefix + "meta",
        mapping={
            "v": "1", "fingerprint": "0" * 64, "options": "{}", "items": items,
            "chunk": chunk, "chunks": chunks, "done": chunks, "nonce": uuid.uuid4().hex,
            "gen": 1, "state": "running", "t0": int(time.time()), "ttl": 3600,
            "ns": items * 90 // 100, "nf": items * 5 // 100, "nu": items * 3 // 100,
            "nk": items * 2 // 100,
        },
    )  # fmt: skip
    pipe.execute()


def report(args: argparse.Namespace) -> None:
    """Peak RSS and time of one ``botmsg job report --out`` process on a large finished job."""
    print(f"load before: {os.getloadavg()}, cpus: {os.cpu_count()}")
    with _redis_server(durable=False) as (sock, client), tempfile.TemporaryDirectory() as d:
        made = time.monotonic()
        _write_job(client, "report", args.items, 256)
        print(f"job of {args.items} items written in {time.monotonic() - made:.1f} s")
        env = child_env()
        if args.package_dir:
            env["PYTHONPATH"] = args.package_dir
        out = Path(d) / "report.jsonl"
        command = [sys.executable, "-m", "botmsg_async", "job", "report"]
        command += ["--redis", f"unix://{sock}", "--job", "report", "--out", str(out)]
        started = time.monotonic()
        done = subprocess.run(command, env=env, cwd=d, capture_output=True, text=True, check=False)
        took = time.monotonic() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with out.open("rb") as f:
            lines = sum(1 for _ in f)
    print(
        f"{args.items} items: exit {done.returncode}, {lines} lines in {took:.1f} s; "
        f"peak RSS of the report process {peak:.0f} MiB ({done.stderr.strip()})"
    )
    print(f"load after: {os.getloadavg()}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "rss":
        parser = argparse.ArgumentParser(prog="python -m benchmarks.jobs_redis rss")
        parser.add_argument("--rows", type=int, default=1_000_000)
        parser.add_argument("--seconds", type=float, default=15.0)
        parser.add_argument("--package-dir")
        rss(parser.parse_args(argv[1:]))
        return
    if argv and argv[0] == "report":
        parser = argparse.ArgumentParser(prog="python -m benchmarks.jobs_redis report")
        parser.add_argument("--items", type=int, default=1_000_000)
        parser.add_argument("--package-dir")
        report(parser.parse_args(argv[1:]))
        return
    if argv and argv[0] in ("faults", "restart"):
        parser = argparse.ArgumentParser(prog="python -m benchmarks.jobs_redis " + argv[0])
        parser.add_argument("--items", type=int, default=30_000)
        parser.add_argument("--runs", type=int, default=3)
        parser.add_argument("--concurrency", type=int, default=16)
        parser.add_argument("--chunk-size", type=int, default=256)
        args = parser.parse_args(argv[1:])
        asyncio.run(_shared_job(args, restart=argv[0] == "restart"))
        return
    if argv and argv[0] in ("throughput", "_child"):
        parser = argparse.ArgumentParser(prog="python -m benchmarks.jobs_redis " + argv[0])
        parser.add_argument("--items", type=int, default=6000)
        parser.add_argument("--runs", type=int, default=3)
        parser.add_argument("--concurrency", type=int, default=16)
        parser.add_argument("--delay", type=float, default=0.05)
        parser.add_argument("--chunk-size", type=int, default=64)
        parser.add_argument("--base-url", help=argparse.SUPPRESS)
        parser.add_argument("--redis", help=argparse.SUPPRESS)
        parser.add_argument("--job", help=argparse.SUPPRESS)
        args = parser.parse_args(argv[1:])
        if argv[0] == "_child":
            asyncio.run(_child(args))
        else:
            throughput(args)
        return
    # The default run: "python -m benchmarks.jobs_redis [ITEMS]" (argparse, for its --help).
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.jobs_redis",
        epilog="other runs: report, faults, restart, throughput (each with its own --help)",
    )
    parser.add_argument("items", nargs="?", type=int, default=30_000)
    items = parser.parse_args(argv).items
    with _redis_server() as (sock, client):
        asyncio.run(measure(items, sock, client))


if __name__ == "__main__":
    main()
