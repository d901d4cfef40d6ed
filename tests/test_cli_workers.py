"""``botmsg send-many --workers N``: one job over worker processes, end to end.

Every run is the real ``botmsg`` entry point in a subprocess (its workers are
its own subprocesses); the service is an aiohttp server in the test's event
loop that deduplicates by ``Idempotency-Key`` and records which keys each
message arrived under, so that "received twice" means "under two keys".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from aiohttp import web
from attrs import evolve

from benchmarks.stamps import most_in_window
from botmsg_async import InvalidRequestError, SendRequest
from botmsg_async._batch import NotYet
from botmsg_async.bulk import (
    ParallelItem,
    ParallelSend,
    ProcessRateLimiter,
    WorkerConfig,
    WorkerPool,
    WorkItem,
    _Worker,
    max_workers,
    send_parallel,
    usable_cores,
)
from botmsg_async.cli.tunables import MALLOC_TUNABLES
from tests.conftest import serving_send, virtual_time
from tests.test_cli import read_jsonl, write_csv

USERNAME = "workers-user"
PASSWORD = "pw-workers-4471"
TIMEOUT = 60.0


class Service:
    """A deduplicating endpoint that records every message's keys and waits on counts."""

    def __init__(self) -> None:
        self.keys: dict[str, set[str]] = defaultdict(set)  # user -> keys it arrived under
        self.answers: dict[str, dict[str, str]] = {}
        self.requests = 0
        self.arrivals: list[float] = []
        self.script: list[Callable[[web.Request], Awaitable[web.Response]]] = []
        self._waiters: list[tuple[int, asyncio.Event]] = []

    @property
    def received(self) -> int:
        """Messages delivered (a repeated key counts once)."""
        return len(self.answers)

    def when_received(self, count: int) -> asyncio.Event:
        """An event set once ``count`` messages have been delivered."""
        event = asyncio.Event()
        if self.received >= count:
            event.set()
        else:
            self._waiters.append((count, event))
        return event

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        self.arrivals.append(time.monotonic())
        if self.script:
            return await self.script.pop(0)(request)
        key = request.headers["Idempotency-Key"]
        if key not in self.answers:
            self.keys[request.match_info["user"]].add(key)
            self.answers[key] = {"requestUuid": key, "status": "SUCCESS", "messageUuid": key}
            for count, event in self._waiters:
                if self.received >= count:
                    event.set()
        return web.json_response(self.answers[key])


@contextlib.asynccontextmanager
async def service() -> AsyncIterator[tuple[Service, str]]:
    svc = Service()
    async with serving_send(svc.handle) as base_url:
        yield svc, base_url


def stall_next(svc: Service, status: int) -> tuple[asyncio.Event, asyncio.Event, list[int]]:
    """Hold ``svc``'s next request until the second event is set; the first is set when it
    arrives, and the list gets its sender's port. Then it is answered ``status`` (200: a
    SUCCESS answer)."""
    arrived, release = asyncio.Event(), asyncio.Event()
    ports: list[int] = []

    async def stall(request: web.Request) -> web.Response:
        ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        arrived.set()
        await release.wait()
        if status == 200:
            return web.json_response({"requestUuid": "r", "status": "SUCCESS", "messageUuid": "m"})
        return web.json_response({}, status=status)

    svc.script.append(stall)
    return arrived, release, ports


def items(tmp_path: Path, n: int, departments: int = 3) -> Path:
    return write_csv(
        tmp_path / "in.csv",
        [
            {"department_uuid": f"dep-{i % departments}", "user_uuid": f"user-{i}", "text": f"#{i}"}
            for i in range(n)
        ],
    )


def worker_site(tmp_path: Path, code: str) -> Path:
    """A ``site`` for ``start`` whose ``sitecustomize`` runs ``code`` in the workers only.

    The workers are ``python -c`` processes; the command itself is not.
    """
    site = tmp_path / "site"
    site.mkdir()
    body = "".join(f"    {line}\n" for line in code.splitlines())
    (site / "sitecustomize.py").write_text(f"import sys\nif sys.argv[:1] == ['-c']:\n{body}")
    return site


async def start(
    base_url: str, *args: str, site: Path | None = None, new_session: bool = False
) -> asyncio.subprocess.Process:
    """``botmsg send-many *args`` against ``base_url``; ``site`` goes first on its
    PYTHONPATH (a ``sitecustomize``), ``new_session`` gives it a process group of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOTMSG_")}
    env.update(BOTMSG_BASE_URL=base_url, BOTMSG_USERNAME=USERNAME, BOTMSG_PASSWORD=PASSWORD)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "botmsg_async",
        "send-many",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=new_session,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str]:
    assert process.stderr is not None
    try:
        err = await asyncio.wait_for(process.stderr.read(), TIMEOUT)
        code = await asyncio.wait_for(process.wait(), TIMEOUT)
    except TimeoutError:
        # A hung run fails its test, and leaves no process behind.
        for pid in [*children(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await process.wait()
        raise
    assert PASSWORD.encode() not in err
    return code, err.decode()


async def botmsg(base_url: str, *args: str) -> tuple[int, str]:
    return await finish(await start(base_url, *args))


async def resume(
    base_url: str, source: Path, journal: Path, out: Path, *extra: str, workers: int = 2
) -> tuple[int, str]:
    """``botmsg send-many SOURCE --workers N --journal JOURNAL --resume EXTRA --out OUT``."""
    return await botmsg(
        base_url, str(source), "--workers", str(workers), "--journal", str(journal),
        "--resume", *extra, "--out", str(out),
    )  # fmt: skip


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """Whatever a test started is gone after it, even when the test failed midway."""
    yield
    for pid in children(os.getpid()):
        for process in [*children(pid), pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


async def gone(pids: list[int], within: float = 30.0) -> bool:
    """Whether every process of ``pids`` ends within ``within`` seconds."""
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def holds_open(pid: int, path: Path) -> None:
    """Return once process ``pid`` has ``path`` open (Linux /proc)."""
    while True:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                        return
        await asyncio.sleep(0.01)


async def worker_pids(process: asyncio.subprocess.Process, workers: int) -> list[int]:
    """The worker processes of a ``botmsg`` run, once they are all started."""
    while len(pids := children(process.pid)) < workers:
        assert process.returncode is None
        await asyncio.sleep(0.01)
    return pids


def check_accounting(svc: Service, out: Path, n: int) -> dict[int, str]:
    """Every item in ``--out`` once, none received twice, every "sent" one received.

    Returns:
        The outcome of each item.
    """
    lines = read_jsonl(out)
    indices = Counter(line["index"] for line in lines)
    assert sorted(indices) == list(range(n))
    assert set(indices.values()) == {1}
    twice = {user: keys for user, keys in svc.keys.items() if len(keys) > 1}
    assert twice == {}
    outcomes = {}
    for line in lines:
        received = bool(svc.keys.get(line["user_uuid"]))
        outcomes[line["index"]] = line["outcome"]
        if line["outcome"] == "sent":
            assert received
        elif not received:
            assert line["outcome"] in ("unknown", "failed", "skipped")
    return outcomes


@pytest.mark.slow
async def test_workers_send_each_item_once(tmp_path: Path) -> None:
    """Two workers send every item exactly once and --out lists each index once."""
    source = items(tmp_path, 600)
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        code, err = await botmsg(base_url, str(source), "--workers", "2", "--out", str(out))
    assert code == 0, err
    outcomes = check_accounting(svc, out, 600)
    assert set(outcomes.values()) == {"sent"}
    assert svc.received == 600
    assert "600 sent" in err


async def test_a_fast_worker_takes_more(tmp_path: Path) -> None:
    """While one worker is stopped (SIGSTOP), the other sends all the rest of the job."""
    n = 1000
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "8", "--journal", str(journal),
            "--out", str(out),
        )  # fmt: skip
        pids = await worker_pids(process, 2)
        environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")  # noqa: ASYNC240
        # glibc rewrites the variable in place as it parses it: its first tunable stays.
        first = MALLOC_TUNABLES.split(":")[0]
        assert any(e.startswith(f"GLIBC_TUNABLES={first}".encode()) for e in environ)
        await svc.when_received(1).wait()
        os.kill(pids[0], signal.SIGSTOP)
        try:
            # The stopped worker holds at most two chunks and its sends in flight.
            await asyncio.wait_for(svc.when_received(n - 64).wait(), TIMEOUT)
        finally:
            os.kill(pids[0], signal.SIGCONT)
        code, err = await finish(process)
    assert code == 0, err
    check_accounting(svc, out, n)
    starts = starts_by_segment(journal)
    assert sum(starts) == n
    assert max(starts) >= n - 64


def starts_by_segment(journal: Path) -> list[int]:
    """How many start records each segment of ``journal`` holds."""
    parts = journal.parent.glob(journal.name + ".part-*")
    return [part.read_text().count('"s":"start"') for part in parts]


def grants(log: Path) -> dict[str, list[tuple[float, int]]]:
    by_key: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for line in log.read_text().splitlines():
        slot, pid, key = line.split()
        by_key[key].append((float(slot), int(pid)))
    return by_key


def assert_rate(slots: list[float], rate: float) -> None:
    """No interval holds more grants than ``rate * length + burst`` (GCRA's bound)."""
    slots = sorted(slots)
    burst = max(1.0, rate / 10)
    for i, j in itertools.combinations(range(len(slots)), 2):
        assert j - i + 1 <= rate * (slots[j] - slots[i]) + burst + 1e-3, (i, j)


async def test_rate_limits_hold_across_workers(tmp_path: Path) -> None:
    """The grants of both workers together keep --rate; each department's, its own rate."""
    source = items(tmp_path, 300)
    log = tmp_path / "grants"
    async with service() as (svc, base_url):
        code, err = await botmsg(
            base_url, str(source), "--workers", "2", "--rate", "300",
            "--per-department-rate", "120", "--grant-log", str(log),
        )  # fmt: skip
    assert code == 0, err
    assert svc.received == 300
    by_key = grants(log)
    overall = by_key.pop("*")
    assert len(overall) == 300
    assert len({pid for _, pid in overall}) == 2  # both workers sent
    assert_rate([slot for slot, _ in overall], 300)
    assert sorted(by_key) == ["dep-0", "dep-1", "dep-2"]
    for department in by_key.values():
        assert len({pid for _, pid in department}) == 1  # one worker per department
        assert_rate([slot for slot, _ in department], 120)


async def test_the_limiter_is_one_across_processes(tmp_path: Path) -> None:
    """Slots another process reserved push this process's slot back; its pause is seen here."""
    fd = ProcessRateLimiter.create()
    log = tmp_path / "grants"
    try:
        # The child reserves 100 slots at 10/s (ten seconds ahead), then gives up on them.
        code = f"""
import asyncio
from botmsg_async.bulk import ProcessRateLimiter
async def main():
    limiter = ProcessRateLimiter({fd}, rate=10, grant_log={str(log)!r})
    tasks = [asyncio.ensure_future(limiter.acquire("d")) for _ in range(100)]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await limiter.pause(30)
asyncio.run(main())
"""
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", code, pass_fds=(fd,))
        assert await child.wait() == 0
        here = ProcessRateLimiter(fd, rate=10, grant_log=str(log))
        assert await here.paused_for() > 20
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(here.acquire("d"), 0.01)
        here.close()
    finally:
        os.close(fd)
    slots = [slot for slot, _ in grants(log)["*"]]
    assert len(slots) == 101
    assert_rate(slots, 10)


async def test_both_rates_hold_when_a_department_queues_behind_the_global_rate() -> None:
    """ProcessRateLimiter, rate=10 and 5 per department, a backlog for one: neither is passed."""
    loop = asyncio.get_running_loop()
    fd = ProcessRateLimiter.create()
    try:
        with virtual_time(loop):
            limiter = ProcessRateLimiter(fd, rate=10, per_department_rate=5, clock=loop.time)
            passed: dict[str, list[float]] = defaultdict(list)

            async def send(department: str) -> None:
                await limiter.acquire(department)
                passed[department].append(loop.time())

            departments = ["busy"] * 100 + [f"d{i}" for i in range(100)]
            await asyncio.gather(*(send(department) for department in departments))
            limiter.close()
    finally:
        os.close(fd)
    every = [t for times in passed.values() for t in times]
    assert len(every) == 200
    # A global slot taken before the department's would be spent while the send still
    # waited, and the sends parked that way would pass later beside the others.
    assert most_in_window(every, 1.0) <= 10 + 1  # the limit and its burst
    assert most_in_window(passed["busy"], 1.0) <= 5 + 1


@pytest.mark.slow
async def test_a_429_pauses_every_worker(tmp_path: Path) -> None:
    """After a 429 with Retry-After: 2, no worker sends in the middle of the pause."""
    told: list[float] = []

    async def throttle(request: web.Request) -> web.Response:
        told.append(time.monotonic())
        return web.json_response({}, status=429, headers={"Retry-After": "2"})

    source = items(tmp_path, 200)
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        svc.script.append(throttle)
        code, err = await botmsg(
            base_url, str(source), "--workers", "2", "-c", "4", "--out", str(out)
        )
    assert code == 0, err
    check_accounting(svc, out, 200)
    assert svc.received == 200
    # Requests in flight when the 429 was answered arrive just after it; none later
    # until the pause ends.
    middle = [t for t in svc.arrivals if told[0] + 0.5 < t < told[0] + 1.5]
    assert middle == []
    assert max(svc.arrivals) > told[0] + 1.9


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
async def test_an_error_before_an_items_start_gives_it_back_not_unknown(tmp_path: Path) -> None:
    """A worker's limiter failing before an item's start (not a BotMessageError): never unknown."""
    source = items(tmp_path, 20)
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        # Every grant is logged to a full disk: each worker's first slot raises OSError,
        # before its start record and its send.
        code, err = await botmsg(
            base_url, str(source), "--workers", "2", "--rate", "1000",
            "--grant-log", "/dev/full", "--out", str(out),
        )  # fmt: skip
    assert svc.requests == 0
    assert code == 1, err
    # Nothing was sent, so nothing "may have been delivered": all 20 go back to the job.
    assert "0 unknown" in err, err
    assert "20 item(s) not started" in err, err
    assert [line for line in read_jsonl(out) if line["outcome"] == "unknown"] == []


async def test_refused_credentials_stop_every_worker(tmp_path: Path) -> None:
    """A 401 stops both workers: at most their sends in flight go out, the rest SKIPPED."""

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        refused[0] += 1
        return web.json_response({}, status=401)

    refused = [0]
    source = items(tmp_path, 500)
    out = tmp_path / "out.jsonl"
    async with serving_send(refuse) as base_url:
        code, err = await botmsg(
            base_url, str(source), "--workers", "2", "-c", "4", "--out", str(out)
        )
    assert code == 1, err
    lines = read_jsonl(out)
    assert sorted(line["index"] for line in lines) == list(range(500))
    outcomes = Counter(line["outcome"] for line in lines)
    assert outcomes["sent"] == 0
    assert outcomes["failed"] == refused[0] <= 8
    assert outcomes["skipped"] == 500 - refused[0]
    assert "AuthenticationError" in err
    # The summary's rate is over what was attempted, with the requests really made.
    assert f"{refused[0]} attempted with {refused[0]} requests" in err


KILL_POINTS = [
    pytest.param(0.5, id="50%"),
    pytest.param(0.1, id="10%", marks=pytest.mark.slow),
    pytest.param(0.9, id="90%", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("share", KILL_POINTS)
async def test_parent_killed_then_resumed(tmp_path: Path, share: float) -> None:
    """SIGKILL of the parent: its workers exit; a resume with 3 workers settles the rest."""
    n = 1000
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "16", "--journal", str(journal),
            "--out", str(tmp_path / "first.jsonl"),
        )  # fmt: skip
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(svc.when_received(int(n * share)).wait(), TIMEOUT)
        process.kill()
        await process.wait()
        assert await gone(pids), "a worker outlived its parent"
        code, err = await resume(base_url, source, journal, out, workers=3)
    assert code in (0, 3), err
    outcomes = check_accounting(svc, out, n)
    assert (code == 3) == ("unknown" in outcomes.values())


ROUTED = pytest.param(0.5, ("--per-department-rate", "100000"), id="50%-routed")


@pytest.mark.parametrize(
    ("share", "flags"),
    [
        *(pytest.param(p.values[0], (), id=p.id, marks=p.marks) for p in KILL_POINTS),
        pytest.param(*ROUTED.values, id=ROUTED.id, marks=pytest.mark.slow),
    ],
)
async def test_worker_killed_then_resumed(
    tmp_path: Path, share: float, flags: tuple[str, ...]
) -> None:
    """SIGKILL of one worker: the other takes its unstarted items; a resume settles all."""
    n = 1000
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    first = tmp_path / "first.jsonl"
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "16", "--journal", str(journal),
            "--out", str(first), *flags,
        )  # fmt: skip
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(svc.when_received(int(n * share)).wait(), TIMEOUT)
        os.kill(pids[0], signal.SIGKILL)
        code, err = await finish(process)
        assert code in (1, 3), err
        assert "died" in err
        first_outcomes = check_accounting(svc, first, n)
        assert set(first_outcomes.values()) <= {"sent", "unknown"}
        assert (code == 3) == ("unknown" in first_outcomes.values())
        code, err = await resume(base_url, source, journal, out, workers=1)
    assert code in (0, 3), err
    outcomes = check_accounting(svc, out, n)
    assert outcomes == first_outcomes  # nothing in doubt is resent; nothing else was left


async def test_a_run_ending_with_an_input_error_still_reports_a_dead_worker(
    tmp_path: Path,
) -> None:
    """A worker killed, then the file grows: the run ends with that error and says who died."""
    n = 400
    source = items(tmp_path, n)
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        process = await start(base_url, str(source), "--workers", "2", "-c", "8", "--out", str(out))
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(svc.when_received(100).wait(), TIMEOUT)
        os.kill(pids[0], signal.SIGKILL)
        with source.open("a", encoding="utf-8") as f:  # read by the parent at its end
            f.write("dep-0,appended,x\n")
        code, err = await finish(process)
    assert code in (1, 3), err
    assert "changed while sending" in err
    assert "died" in err  # the death is reported though run() raised
    assert "Traceback" not in err
    outcomes = check_accounting(svc, out, n)
    assert set(outcomes.values()) <= {"sent", "unknown"}


@pytest.mark.slow
async def test_resume_with_other_workers_and_resend_unknown(tmp_path: Path) -> None:
    """Items left in doubt by a dead worker are resent by --resend-unknown under their key."""
    n = 400
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        stalled, hold, _ = stall_next(svc, 503)  # the first request never answers before the kill
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "4", "--journal", str(journal),
        )  # fmt: skip
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(stalled.wait(), TIMEOUT)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        code, err = await finish(process)
        hold.set()
        assert code == 3, err
        code, err = await resume(base_url, source, journal, out, "--resend-unknown", workers=3)
    assert code == 0, err
    outcomes = check_accounting(svc, out, n)
    assert set(outcomes.values()) == {"sent"}


@pytest.mark.slow
async def test_sigterm_drains_and_leaves_no_process(tmp_path: Path) -> None:
    """A first SIGTERM drains every worker: exit 130, no process left, resume finishes."""
    n = 1000
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "8", "--journal", str(journal),
            "--out", str(tmp_path / "first.jsonl"),
        )  # fmt: skip
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(svc.when_received(n // 4).wait(), TIMEOUT)
        process.send_signal(signal.SIGTERM)
        code, err = await finish(process)
        assert code == 130, err
        assert await gone(pids, within=5)
        lines = read_jsonl(tmp_path / "first.jsonl")
        assert len({line["index"] for line in lines}) == len(lines) < n
        code, err = await resume(base_url, source, journal, out)
    assert code == 0, err
    outcomes = check_accounting(svc, out, n)
    assert set(outcomes.values()) == {"sent"}
    assert svc.received == n


def owner_of_port(port: int, pids: list[int]) -> int:
    """Which of ``pids`` holds the loopback TCP socket whose local port is ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return pid
    raise AssertionError(f"no process of {pids} holds port {port}")


async def test_a_worker_stopped_alone_hands_its_items_to_another(tmp_path: Path) -> None:
    """A worker drained by its own SIGTERM gives back its queued items; an idle one sends them."""
    source = items(tmp_path, 4)
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        stalled, release, ports = stall_next(svc, 200)  # in flight until released
        # -c 1: chunks of two items; each worker holds one in flight and one queued.
        process = await start(base_url, str(source), "--workers", "2", "-c", "1", "--out", str(out))
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(stalled.wait(), TIMEOUT)
        # The other worker sends its two and waits for more, which only the stalled
        # worker's queued item can give it.
        await asyncio.wait_for(svc.when_received(2).wait(), TIMEOUT)
        os.kill(owner_of_port(ports[0], pids), signal.SIGTERM)  # it alone drains
        release.set()
        code, err = await finish(process)
    assert code == 0, err
    assert "not started" not in err
    lines = read_jsonl(out)
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3]
    assert {line["outcome"] for line in lines} == {"sent"}
    assert svc.received == 3  # the stalled one was answered by the script


async def test_workers_start_while_the_input_is_checked_and_end_with_bad_input(
    tmp_path: Path,
) -> None:
    """The workers start before the validation pass; a bad input ends them: exit 2, none left."""
    fifo = tmp_path / "in.csv"
    os.mkfifo(fifo)
    async with service() as (svc, base_url):
        process = await start(base_url, str(fifo), "--workers", "2")
        # Held open from the command's first look at its input to the end: it copies
        # the pipe (then checks the copy) and waits in its read, with the workers
        # started, until the rows below are written.
        writer = await asyncio.wait_for(asyncio.to_thread(open, fifo, "wb"), TIMEOUT)
        with writer:
            pids = await asyncio.wait_for(worker_pids(process, 2), TIMEOUT)
            # Written once the validation pass holds the input open (with no reader
            # the write would fail): the workers were started before it.
            await asyncio.wait_for(holds_open(process.pid, fifo), TIMEOUT)
            writer.write(b"department_uuid,user_uuid,text\ndep-1,user-1,hi\ndep-1,user/2,hi\n")
        code, err = await finish(process)
        assert code == 2, err
        assert "invalid row" in err
        assert await gone(pids, within=10)
    assert svc.requests == 0


def has_sigint(pid: int) -> bool:
    """Whether process ``pid`` has ended or holds a SIGINT it blocks (Linux /proc)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return True
    if not alive(pid):
        return True
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    bit = 1 << (signal.SIGINT - 1)
    pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(pending & int(fields["SigBlk"], 16) & bit)


async def sigint_reached(pids: list[int]) -> None:
    """Return once each of ``pids`` has ended or holds a SIGINT it blocks."""
    while True:
        if all(has_sigint(pid) for pid in pids):
            return
        await asyncio.sleep(0.01)


async def test_ctrl_c_while_the_workers_start_and_the_input_is_checked(tmp_path: Path) -> None:
    """Ctrl-C to the process group while the workers still start up: exit 130, no traceback."""
    # A worker (``python -c``) is held in its start-up, before its program runs,
    # until the gate below is opened: it is there when the terminal's SIGINT comes.
    site = tmp_path / "site"
    site.mkdir()
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    (site / "sitecustomize.py").write_text(
        f"import sys\nif sys.argv[:1] == ['-c']:\n    open({str(gate)!r}, 'rb').read()\n"
    )
    fifo = tmp_path / "in.csv"
    os.mkfifo(fifo)
    async with service() as (svc, base_url):
        # A session of its own: the signal goes to its group, as a terminal's Ctrl-C does.
        process = await start(base_url, str(fifo), "--workers", "2", site=site, new_session=True)
        writer = await asyncio.wait_for(asyncio.to_thread(open, fifo, "wb"), TIMEOUT)
        with writer:
            opened = await asyncio.wait_for(asyncio.to_thread(open, gate, "wb"), TIMEOUT)
            with opened:
                pids = await asyncio.wait_for(worker_pids(process, 2), TIMEOUT)
                for pid in pids:
                    await asyncio.wait_for(holds_open(pid, gate), TIMEOUT)
                await asyncio.wait_for(holds_open(process.pid, fifo), TIMEOUT)
                os.killpg(process.pid, signal.SIGINT)
                # Not let through before each worker has it (or has ended by it).
                await asyncio.wait_for(sigint_reached(pids), TIMEOUT)
        code, err = await finish(process)
        assert code == 130, err
        assert "Traceback" not in err
        assert "KeyboardInterrupt" not in err
        assert await gone(pids, within=10)
    assert svc.requests == 0


async def test_workers_that_cannot_start_are_an_error_not_a_traceback(tmp_path: Path) -> None:
    """A worker that cannot be started (no process left to fork) ends the run with an error."""
    # The command's own interpreter refuses to start any worker (``python -c``).
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import errno, subprocess, sys\n"
        "class Refused(subprocess.Popen):\n"
        "    def __init__(self, args, *rest, **options):\n"
        "        if '-c' in args:\n"
        "            raise BlockingIOError(errno.EAGAIN, 'no process can be started')\n"
        "        super().__init__(args, *rest, **options)\n"
        "if sys.argv[:1] != ['-c']:\n"
        "    subprocess.Popen = Refused\n"
    )
    source = items(tmp_path, 4)
    async with service() as (svc, base_url):
        process = await start(base_url, str(source), "--workers", "2", site=site)
        code, err = await finish(process)
        assert code == 1, err
        assert "Traceback" not in err
        assert "no process can be started" in err
    assert svc.requests == 0


def test_a_pool_closed_without_a_job_ends_its_workers() -> None:
    """Workers started ahead and never given a job exit when the pool closes."""
    before = set(children(os.getpid()))
    pool = WorkerPool(2)
    started = [pid for pid in children(os.getpid()) if pid not in before]
    assert len(started) == pool.size == 2
    pool.close()
    pool.close()  # a second close does nothing
    assert not any(alive(pid) for pid in started)


async def test_send_parallel_from_python() -> None:
    """``bulk.send_parallel`` sends a list from two workers and reports like a batch."""
    async with service() as (svc, base_url):
        work = [(f"dep-{i % 2}", f"user-{i}", f"#{i}") for i in range(100)]
        report = await asyncio.to_thread(
            send_parallel,
            work,
            base_url=base_url,
            username=USERNAME,
            password=PASSWORD,
            workers=2,
            concurrency=8,
        )
    assert report.counts.sent == 100
    assert [item.index for item in report.results] == list(range(100))
    assert svc.received == 100


async def test_an_input_error_lets_the_workers_finish_what_they_hold() -> None:
    """Reading the items fails: those handed out are sent and reported, then it is raised."""

    def items() -> Iterator[WorkItem]:
        for i in range(5):
            yield WorkItem(i, "dep-0", f"user-{i}", f"#{i}", f"key-{i}")
        raise OSError("disk gone")

    reported: list[ParallelItem] = []
    config = WorkerConfig(base_url="", username=USERNAME, password=PASSWORD, concurrency=8, items=5)
    async with service() as (svc, base_url):
        job = ParallelSend(
            evolve(config, base_url=base_url), items(), workers=1, on_result=reported.append
        )
        with pytest.raises(OSError, match="disk gone"):
            await asyncio.to_thread(job.run)
    assert sorted(item.index for item in reported) == list(range(5))
    assert {item.outcome for item in reported} == {"sent"}
    assert svc.received == 5


async def test_an_error_of_on_result_is_raised_not_taken_for_a_worker_death() -> None:
    """on_result raising OSError: run() raises it; no worker is called dead for it."""

    def refuse(item: ParallelItem) -> None:
        raise OSError("out gone")

    work = [WorkItem(i, "dep-0", f"user-{i}", f"#{i}", f"key-{i}") for i in range(5)]
    config = WorkerConfig(base_url="", username=USERNAME, password=PASSWORD, concurrency=8, items=5)
    async with service() as (_, base_url):
        job = ParallelSend(evolve(config, base_url=base_url), work, workers=1, on_result=refuse)
        with pytest.raises(OSError, match="out gone"):
            await asyncio.wait_for(asyncio.to_thread(job.run), TIMEOUT)
    assert job.worker_deaths == []


async def test_an_input_error_after_a_stop_still_reports_the_items_routed_ahead() -> None:
    """Input error, then a stop: items read ahead for a department's worker end skipped, once."""
    failed = threading.Event()

    def read() -> Iterator[WorkItem]:
        # One department: every item goes to its one worker, read ahead of its asking.
        for i in range(12):
            yield WorkItem(i, "dep-0", f"user-{i}", f"#{i}", f"key-{i}")
        failed.set()
        raise OSError("disk gone")

    reported: list[ParallelItem] = []
    config = WorkerConfig(
        base_url="",
        username=USERNAME,
        password=PASSWORD,
        concurrency=1,
        per_department_rate_limit=1000.0,
        items=12,
    )
    async with service() as (svc, base_url):
        arrived, release, _ = stall_next(svc, 401)  # refused credentials stop the job
        job = ParallelSend(
            evolve(config, base_url=base_url), read(), workers=2, on_result=reported.append
        )
        running = asyncio.ensure_future(asyncio.to_thread(job.run))
        await arrived.wait()
        await asyncio.to_thread(failed.wait, TIMEOUT)  # all read, the error recorded
        release.set()
        with pytest.raises(OSError, match="disk gone"):
            await asyncio.wait_for(running, TIMEOUT)
    assert sorted(item.index for item in reported) == list(range(12))
    assert Counter(item.outcome for item in reported) == {"failed": 1, "skipped": 11}
    assert svc.requests == 1


def _one_item_config(tmp_path: Path) -> WorkerConfig:
    """A worker's configuration for one item, its start map a file in ``tmp_path``
    (the caller closes ``started_fd``)."""
    started = tmp_path / "started"
    started.write_bytes(b"\0")
    return WorkerConfig(
        base_url="http://127.0.0.1:9",
        username=USERNAME,
        password=PASSWORD,
        items=1,
        started_fd=os.open(started, os.O_RDWR),
    )


async def test_a_worker_that_finds_its_parent_gone_as_it_asks_for_items_waits_for_none(
    tmp_path: Path,
) -> None:
    """Asking for a chunk finds the parent gone: the worker's items end, nothing waits for ever."""
    ours, theirs = socket.socketpair()
    ours.close()  # the parent died before the worker's reader saw it
    config = _one_item_config(tmp_path)
    started_fd = config.started_fd
    worker = _Worker(Connection(theirs.detach()), config)
    try:
        first = next(worker._items(), None)  # its buffer is empty: it asks for more
        assert worker.parent_gone
        # A NotYet: the batch awaits its event; the reader that would set it is gone.
        assert first is None or (isinstance(first, NotYet) and first.ready.is_set())
    finally:
        worker.conn.close()
        assert worker.started is not None
        worker.started.close()
        os.close(started_fd)


@pytest.mark.parametrize("workers", [0, True, 10**5])
def test_send_parallel_refuses_a_number_of_workers_it_cannot_use(workers: int) -> None:
    """workers below 1, a bool, or past four per core: InvalidRequestError before any process."""
    with pytest.raises(InvalidRequestError, match="workers"):
        send_parallel(
            [("d", "u", "x")],
            base_url="http://127.0.0.1:9",
            username=USERNAME,
            password=PASSWORD,
            workers=workers,
        )


def test_the_most_workers_is_four_per_usable_core() -> None:
    """max_workers() follows the usable cores, never below 4."""
    assert max_workers() == max(4, 4 * usable_cores())


async def test_send_parallel_refuses_one_key_for_two_items() -> None:
    """Two items with one idempotency key: InvalidRequestError naming both, nothing sent."""
    key = "5e1d-one-key"
    work: list[SendRequest | tuple[str, str, str]] = [
        SendRequest("dep-0", "user-0", "first", idempotency_key=key),
        ("dep-0", "user-1", "no key: one is made"),
        SendRequest("dep-1", "user-2", "another message", idempotency_key=key),
    ]
    async with service() as (svc, base_url):
        with pytest.raises(InvalidRequestError) as caught:
            await asyncio.to_thread(
                send_parallel,
                work,
                base_url=base_url,
                username=USERNAME,
                password=PASSWORD,
                workers=2,
            )
        assert svc.received == 0
    assert caught.value.field == "idempotency_key"
    assert "item 2 repeats the key of item 0" in str(caught.value)


@pytest.mark.slow
async def test_second_signal_abandons_in_flight_sends(tmp_path: Path) -> None:
    """A second SIGTERM abandons sends in flight: exit 130, no process left, them unknown."""
    n = 200
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    async with service() as (svc, base_url):
        stalled, hold, _ = stall_next(svc, 503)  # one send stays in flight until the end
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "2", "--journal", str(journal),
            "--out", str(tmp_path / "first.jsonl"),
        )  # fmt: skip
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(stalled.wait(), TIMEOUT)
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        # The second signal once the first is handled (two at once would be one).
        said = await asyncio.wait_for(process.stderr.readline(), TIMEOUT)
        assert b"stopping" in said
        process.send_signal(signal.SIGTERM)
        code, err = await finish(process)
        assert "interrupted" in err
        hold.set()
        assert code == 130, err
        assert await gone(pids, within=5)
        out = tmp_path / "out.jsonl"
        code, err = await botmsg(
            base_url, str(source), "--journal", str(journal), "--resume", "--out", str(out)
        )
    assert code == 3, err
    outcomes = check_accounting(svc, out, n)
    assert Counter(outcomes.values())["unknown"] >= 1


async def test_each_start_is_recorded_before_its_send(tmp_path: Path) -> None:
    """With --durable (group commit in the workers), each key is in a segment on arrival."""
    n = 300
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    missing: list[str] = []

    async def check(request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        segments = b"".join(
            part.read_bytes()
            for part in tmp_path.glob("journal.part-*")  # noqa: ASYNC240
        )
        if f'"key":"{key}"'.encode() not in segments:
            missing.append(key)
        return web.json_response({"requestUuid": key, "status": "SUCCESS", "messageUuid": key})

    async with serving_send(check) as base_url:
        code, err = await botmsg(
            base_url, str(source), "--workers", "2", "--durable", "--journal", str(journal)
        )
    assert code == 0, err
    assert missing == []
    assert sum(starts_by_segment(journal)) == n


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (("--workers", "0"), "--workers: must be at least 1"),
        (("--workers", "many"), "--workers: must be a number or 'auto'"),
        (("--workers", "100000"), "--workers: must be at most"),
        (("--per-department-rate", "0"), "--per-department-rate: must be a finite number"),
    ],
)
async def test_bad_worker_flags_send_nothing(
    tmp_path: Path, flags: tuple[str, ...], problem: str
) -> None:
    """A bad --workers or --per-department-rate is a usage error (exit 2), nothing sent."""
    source = items(tmp_path, 10)
    async with service() as (svc, base_url):
        code, err = await botmsg(base_url, str(source), *flags)
    assert code == 2
    assert problem in err
    assert svc.requests == 0


async def test_per_department_rate_in_one_process(tmp_path: Path) -> None:
    """Without --workers, --per-department-rate is the batch's per_department_rate_limit."""
    source = items(tmp_path, 40, departments=2)
    async with service() as (svc, base_url):
        code, err = await botmsg(base_url, str(source), "--per-department-rate", "1000")
    assert code == 0, err
    assert svc.received == 40


async def test_a_stop_ends_the_wait_for_a_429_pause(tmp_path: Path) -> None:
    """SIGTERM during a 30 s shared pause drains at once; the resume sends the rest."""
    n = 100
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    told = asyncio.Event()

    async def throttle(request: web.Request) -> web.Response:
        told.set()
        return web.json_response({}, status=429, headers={"Retry-After": "30"})

    async with service() as (svc, base_url):
        svc.script.append(throttle)
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "2", "--journal", str(journal),
            "--out", str(tmp_path / "first.jsonl"),
        )  # fmt: skip
        await asyncio.wait_for(told.wait(), TIMEOUT)
        process.send_signal(signal.SIGTERM)
        code, err = await asyncio.wait_for(finish(process), 20)  # well before the pause ends
        assert code == 130, err
        code, err = await resume(base_url, source, journal, out)
    assert code == 0, err
    assert set(check_accounting(svc, out, n).values()) == {"sent"}


# Faults of a worker at its end, injected through a ``sitecustomize`` that only the
# workers (``python -c``) act on.
_END_FAULTS = {
    # fsync reports a lost write as the segment is closed (EIO): the records were
    # handed to the OS, but may not all be on disk.
    "segment fsync fails": (
        "import errno, os\n"
        "from botmsg_async import journal\n"
        "def failing_close(self):\n"
        "    fd, self._fd = self._fd, None\n"
        "    if fd is not None:\n"
        "        os.close(fd)\n"
        "        raise OSError(errno.EIO, os.strerror(errno.EIO))\n"
        "journal.FileJournal.close = failing_close\n"
    ),
    # SIGKILL between its final report and its exit.
    "killed after its report": (
        "import os, signal\n"
        "from botmsg_async import bulk\n"
        "main = bulk._worker_main\n"
        "def then_killed(fd):\n"
        "    main(fd)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "bulk._worker_main = then_killed\n"
    ),
}


@pytest.mark.parametrize("fault", sorted(_END_FAULTS))
async def test_a_worker_failing_at_its_end_is_reported_for_what_it_costs(
    tmp_path: Path, fault: str
) -> None:
    """A segment not flushed is an error (exit 1); a kill after a complete report, a warning."""
    site = worker_site(tmp_path, _END_FAULTS[fault])
    n = 60
    source = items(tmp_path, n)
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "journal"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "--journal", str(journal),
            "--out", str(out), site=site,
        )  # fmt: skip
        code, err = await finish(process)
    # Every item's outcome was known before the fault: none changes.
    assert set(check_accounting(svc, out, n).values()) == {"sent"}
    assert "Traceback" not in err
    assert "died" not in err  # each reported its end
    if fault == "segment fsync fails":
        assert code == 1, err
        assert err.count("error: worker") == 2, err
        assert "could not flush its journal segment" in err
        assert f"{journal}.part-0001-0000" in err
        assert "Input/output error" in err
    else:
        assert code == 0, err
        assert err.count("warning: worker") == 2, err
        assert "ended with signal 9 after its final report" in err
        assert "error:" not in err


async def test_a_worker_that_fails_mid_run_is_listed_as_a_death(tmp_path: Path) -> None:
    """A defect raised in a worker mid-run: reported as its death; --resume finishes the job."""
    # Each worker's 10th result raises (as a bug would) before it is journaled or reported.
    site = worker_site(
        tmp_path,
        "from botmsg_async import bulk\n"
        "on_result = bulk._Worker._on_result\n"
        "calls = [0]\n"
        "def buggy(self, row):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 10:\n"
        "        raise RuntimeError('a defect')\n"
        "    on_result(self, row)\n"
        "bulk._Worker._on_result = buggy\n",
    )
    n = 100
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "4", "--journal", str(journal),
            "--out", str(first), site=site,
        )  # fmt: skip
        code, err = await finish(process)
        assert code == 3, err  # the item whose result was lost is unknown
        assert err.count("error: worker") == 2, err
        assert "failed (RuntimeError: a defect)" in err
        assert "after its final report" not in err  # not an end that "affected no outcome"
        # --out has what became known; the items no worker was left to start, --resume sends.
        assert len(read_jsonl(first)) < n
        code, err = await resume(base_url, source, journal, second)
    assert code == 3, err  # the unknown ones stay unknown: never resent
    outcomes = check_accounting(svc, second, n)
    assert set(outcomes.values()) == {"sent", "unknown"}


async def test_worker_killed_without_journal(tmp_path: Path) -> None:
    """Without --journal a dead worker's started items are unknown, the others sent once."""
    n = 600
    source = items(tmp_path, n)
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "16", "--out", str(out)
        )
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(svc.when_received(n // 2).wait(), TIMEOUT)
        os.kill(pids[1], signal.SIGKILL)
        code, err = await finish(process)
    assert "died" in err
    outcomes = check_accounting(svc, out, n)
    assert set(outcomes.values()) <= {"sent", "unknown"}
    assert code == (3 if "unknown" in outcomes.values() else 1)


async def test_workers_record_options_and_use_row_keys(tmp_path: Path) -> None:
    """--workers journals the message options for --resume and sends each row's own key."""
    source = write_csv(
        tmp_path / "keys.csv",
        [
            {"department_uuid": "dep-0", "user_uuid": f"user-{i}", "idempotency_key": f"k-{i}"}
            for i in range(40)
        ],
    )
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        code, err = await botmsg(
            base_url, str(source), "--workers", "2", "--text", "Closed on Friday",
            "--journal", str(journal),
        )  # fmt: skip
        assert code == 0, err
        # The resume is given no --text: it takes the journal's (a different one is refused).
        code, err = await resume(base_url, source, journal, out)
        assert code == 0, err
        code, err = await botmsg(
            base_url, str(source), "--workers", "2", "--journal", str(journal), "--resume",
            "--text", "Open on Friday",
        )  # fmt: skip
        assert code == 2, err
        assert "--text" in err
    assert {key for keys in svc.keys.values() for key in keys} == {f"k-{i}" for i in range(40)}
    assert {line["idempotency_key"] for line in read_jsonl(out)} == {f"k-{i}" for i in range(40)}


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_worker_writes_whole_messages_to_a_slow_parent(tmp_path: Path, loop: str) -> None:
    """A worker's message larger than the socket buffer waits for a slow parent, whole."""
    # First: without uvloop this skips, before any socket exists to leak.
    loop_factory = _loop_factory(loop)
    ours, theirs = socket.socketpair()
    parent = Connection(ours.detach())
    config = _one_item_config(tmp_path)
    started_fd = config.started_fd
    big = ("results", "x" * (4 << 20))
    received: list[object] = []

    def slow_parent(worker_fd: int) -> None:
        # Read only once the worker's side is full: a parent that lags behind.
        deadline = time.monotonic() + TIMEOUT
        while select.select([], [worker_fd], [], 0)[1] and time.monotonic() < deadline:
            time.sleep(0.001)
        with contextlib.suppress(EOFError, OSError):
            received.append(parent.recv())

    async def scenario() -> bool:
        worker = _Worker(Connection(theirs.detach()), config)
        reader = threading.Thread(target=slow_parent, args=(worker.conn.fileno(),))
        try:
            worker.listen()
            reader.start()
            worker._send(big)
            return worker.parent_gone
        finally:
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            worker.conn.close()  # a half-sent message's reader sees EOF, not a hang
            reader.join(TIMEOUT)
            assert worker.started is not None
            worker.started.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        parent_gone = runner.run(scenario())
    os.close(started_fd)
    parent.close()
    assert not parent_gone
    assert received == [big]


async def test_items_in_doubt_left_by_a_stop_stay_unknown(tmp_path: Path) -> None:
    """Items in doubt that a stop leaves unsent (in the parent) stay unknown, never skipped."""
    n = 40
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    out = tmp_path / "out.jsonl"
    answers = [500]

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({}, status=answers[0])

    async with serving_send(answer) as base_url:
        # Run 1: every send may have been delivered (a 500), so every item is in doubt.
        code, err = await botmsg(base_url, str(source), "--journal", str(journal))
        assert code == 3, err
        # Run 2 resends them under their keys; the first answer (a 401) stops the job
        # with most of them still in the parent.
        answers[0] = 401
        code, err = await botmsg(
            base_url, str(source), "--workers", "2", "-c", "1", "--journal", str(journal),
            "--resume", "--resend-unknown", "--out", str(out),
        )  # fmt: skip
    assert code == 3, err
    lines = read_jsonl(out)
    assert sorted(line["index"] for line in lines) == list(range(n))
    assert {line["outcome"] for line in lines} == {"unknown"}


async def test_every_worker_dead_counts_the_unread_rest_not_started(tmp_path: Path) -> None:
    """With every worker dead, each item is in --out or among those 'not started', none lost."""
    n = 400
    source = items(tmp_path, n)
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        stalled, hold, _ = stall_next(svc, 503)  # the first request never answers before the kills
        process = await start(base_url, str(source), "--workers", "2", "-c", "2", "--out", str(out))
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(stalled.wait(), TIMEOUT)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        code, err = await finish(process)
        hold.set()
    assert code == 3, err
    reported = len(read_jsonl(out))
    assert f"{n - reported} item(s) not started" in err


# A bulk script: send_parallel from its own process (a hung one can be killed).
_BULK_SCRIPT = """
import sys
from botmsg_async.bulk import send_parallel
n, size = int(sys.argv[2]), int(sys.argv[3])
work = [("dep-0", f"user-{i}", f"{i:06d}" + "b" * size) for i in range(n)]
report = send_parallel(
    work, base_url=sys.argv[1], username=sys.argv[4], password=sys.argv[5],
    workers=1, concurrency=256, keep="none",
)
print(f"counts {report.counts.sent} {report.counts.failed}", file=sys.stderr)
"""


@pytest.mark.slow
async def test_big_results_and_big_chunks_do_not_deadlock() -> None:
    """A worker writing more results than its socket holds while the parent writes it
    a chunk larger than that: both go through, no hang."""
    n = 2048
    description = "d" * 20_000  # a service's error text, echoing what it refused

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if int(request.match_info["user"].split("-")[1]) % 2:
            # Every other item: no run of failures long enough to stop the job.
            error = {"errorCode": "BAD", "errorDescription": description, "errorUID": "e"}
            return web.json_response({"requestUuid": "r", "status": "FAILURE", "errors": [error]})
        return web.json_response({"requestUuid": "r", "status": "SUCCESS", "messageUuid": "m"})

    async with serving_send(answer) as base_url:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BULK_SCRIPT, base_url, str(n), "4000", USERNAME, PASSWORD,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        code, err = await finish(process)
    assert code == 0, err
    assert f"counts {n // 2} {n // 2}" in err


async def test_a_segment_that_refuses_a_record_is_reported_and_resumed(tmp_path: Path) -> None:
    """ENOSPC writing a worker's start record: an error, no traceback, nothing sent twice."""
    # In the workers only: each one's 20th start record (and every later one) is refused.
    site = worker_site(
        tmp_path,
        "import errno, os\n"
        "from botmsg_async import journal\n"
        "start = journal.FileJournal.start\n"
        "calls = [0]\n"
        "def full(self, index, key):\n"
        "    calls[0] += 1\n"
        "    if calls[0] >= 20:\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)\n"
        "    start(self, index, key)\n"
        "journal.FileJournal.start = full\n",
    )
    n = 200
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "4", "--journal", str(journal),
            "--out", str(first), site=site,
        )  # fmt: skip
        code, err = await finish(process)
        assert code in (1, 3), err
        assert "Traceback" not in err
        assert "could not write its journal segment" in err
        assert "No space left on device" in err
        assert "after its final report" not in err
        for line in read_jsonl(first):
            assert line["outcome"] in ("sent", "unknown"), line
            if line["outcome"] == "sent":
                assert svc.keys.get(line["user_uuid"]), line
        code, err = await resume(base_url, source, journal, second)
    assert code in (0, 3), err
    outcomes = check_accounting(svc, second, n)  # each once, none under two keys
    assert set(outcomes.values()) <= {"sent", "unknown"}


async def test_a_refused_start_record_lets_the_sends_in_flight_finish(tmp_path: Path) -> None:
    """ENOSPC on a start record: the sends in flight finish (sent), not cancelled (unknown)."""
    # Each worker's 2nd start record is refused while its 1st item's send is held by the
    # service; the refusal says so through a FIFO, then the sends are let through.
    fifo = tmp_path / "refused"
    os.mkfifo(fifo)
    site = worker_site(
        tmp_path,
        "import errno, os\n"
        "from botmsg_async import journal\n"
        "start = journal.FileJournal.start\n"
        "calls = [0]\n"
        "def full(self, index, key):\n"
        "    calls[0] += 1\n"
        "    if calls[0] >= 2:\n"
        f"        fd = os.open({str(fifo)!r}, os.O_WRONLY | os.O_NONBLOCK)\n"
        "        os.write(fd, b'x')\n"
        "        os.close(fd)\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)\n"
        "    start(self, index, key)\n"
        "journal.FileJournal.start = full\n",
    )
    n = 20
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    signals: list[bytes] = []
    both = asyncio.Event()

    def on_signal() -> None:
        with contextlib.suppress(BlockingIOError):
            signals.append(os.read(reader, 16))
        if len(b"".join(signals)) >= 2:
            both.set()

    loop = asyncio.get_running_loop()
    loop.add_reader(reader, on_signal)
    try:
        async with service() as (svc, base_url):
            # Each worker sends one item (its 2nd start is refused): both are held.
            releases = [stall_next(svc, 200)[1] for _ in range(2)]
            process = await start(
                base_url, str(source), "--workers", "2", "-c", "2", "--journal", str(journal),
                "--out", str(first), site=site,
            )  # fmt: skip
            await asyncio.wait_for(both.wait(), TIMEOUT)
            for release in releases:
                release.set()
            code, err = await finish(process)
            assert code == 1, err  # nothing in doubt: the sends in flight finished
            assert "Traceback" not in err
            assert err.count("could not write its journal segment") == 2, err
            held = read_jsonl(first)
            assert [line["outcome"] for line in held] == ["sent", "sent"]
            code, err = await resume(base_url, source, journal, second)
    finally:
        loop.remove_reader(reader)
        os.close(reader)
    assert code == 0, err
    done = read_jsonl(second)
    assert sorted(line["index"] for line in done) == list(range(n))
    assert {line["outcome"] for line in done} == {"sent"}
    # The held sends were answered by the stall (not recorded): the resume sent the
    # others, each once, and not those two again.
    assert set(svc.keys) == {f"user-{i}" for i in range(n)} - {line["user_uuid"] for line in held}
    assert all(len(keys) == 1 for keys in svc.keys.values())


async def test_outcomes_a_segment_refuses_are_still_reported_as_they_were(
    tmp_path: Path,
) -> None:
    """ENOSPC on a worker's outcome records: --out says what happened; --resume says unknown."""
    # In the workers only: each one's 10th outcome record (and every later one) is refused.
    site = worker_site(
        tmp_path,
        "import errno, os\n"
        "from botmsg_async import journal\n"
        "outcome = journal.FileJournal.outcome\n"
        "calls = [0]\n"
        "def full(self, *args, **kwargs):\n"
        "    calls[0] += 1\n"
        "    if calls[0] >= 10:\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)\n"
        "    outcome(self, *args, **kwargs)\n"
        "journal.FileJournal.outcome = full\n",
    )
    n = 200
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "4", "--journal", str(journal),
            "--out", str(first), site=site,
        )  # fmt: skip
        code, err = await finish(process)
        assert code == 1, err  # every send it made is known: none unknown this run
        assert "Traceback" not in err
        assert err.count("could not write its journal segment") == 2, err
        assert "a --resume will report them unknown" in err
        done = read_jsonl(first)
        # What the service received, --out says, each with its real outcome.
        assert {line["outcome"] for line in done} == {"sent"}
        assert {line["user_uuid"] for line in done} == set(svc.keys)
        lacking = sum(int(m) for m in re.findall(r"lacks the outcome of (\d+) item", err))
        assert lacking >= 2
        code, err = await resume(base_url, source, journal, second)
    assert code == 3, err  # those whose outcome the journal lacks stay unknown, never resent
    outcomes = check_accounting(svc, second, n)
    assert Counter(outcomes.values())["unknown"] == lacking


async def test_items_a_stop_leaves_unattempted_are_not_started_everywhere(tmp_path: Path) -> None:
    """SIGINT under --rate: items pulled but never attempted are not started, journal and all."""
    n = 300
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    async with service() as (svc, base_url):
        # A slow rate: each worker's batch holds -c items waiting for a slot when the
        # signal comes; the stop refuses them before any attempt.
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "8", "--rate", "40",
            "--journal", str(journal), "--out", str(first),
        )  # fmt: skip
        await asyncio.wait_for(svc.when_received(10).wait(), TIMEOUT)
        process.send_signal(signal.SIGINT)
        code, err = await finish(process)
        assert code == 130, err
        lines = read_jsonl(first)
        sent = len(lines)
        # --out, the summary and the journal agree: what was attempted was sent, the
        # rest was not started (no "skipped" line or record for an item never tried).
        assert {line["outcome"] for line in lines} == {"sent"}, lines
        assert f"{sent} of {n} items: {sent} sent, 0 failed, 0 unknown, 0 skipped" in err
        assert f"stopped on request: {n - sent} item(s) not started" in err
        assert svc.received == sent
        records = [
            record
            for part in sorted(tmp_path.glob("journal*"))  # noqa: ASYNC240
            for record in read_jsonl(part)
            if "i" in record
        ]
        assert {r["i"] for r in records if r.get("o") == "sent"} == {
            line["index"] for line in lines
        }
        assert {r.get("o") for r in records} == {None, "sent"}  # start and sent records only
        assert {r["i"] for r in records if r.get("s") == "start"} == {
            line["index"] for line in lines
        }
        # --resume sends exactly the rest, each once, under a key never used.
        code, err = await resume(base_url, source, journal, second)
    assert code == 0, err
    assert set(check_accounting(svc, second, n).values()) == {"sent"}
    assert f"{sent} finished in an earlier run (from the journal)" in err
    assert svc.received == n


# A worker's segment that cannot be begun, in the workers only (``python -c``): the
# segment's file refused (no permission, no inode left), or its header refused by a full
# disk that takes half of it first (as ``os.write`` does when the disk fills mid-write).
_BEGIN_FAULTS = {
    "segment not created": (
        "import errno, os\n"
        "real = os.open\n"
        "def refused(path, flags, *args, **kwargs):\n"
        "    if '.part-' in os.fspath(path):\n"
        "        raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)\n"
        "    return real(path, flags, *args, **kwargs)\n"
        "os.open = refused\n"
    ),
    "header refused": (
        "import errno, os\n"
        "real = os.write\n"
        "def full(fd, data):\n"
        "    try:\n"
        "        segment = '.part-' in os.readlink(f'/proc/self/fd/{fd}')\n"
        "    except OSError:\n"
        "        segment = False\n"
        "    if not segment:\n"
        "        return real(fd, data)\n"
        "    if os.fstat(fd).st_size == 0:\n"
        "        return real(fd, bytes(data)[: len(data) // 2])\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "os.write = full\n"
    ),
}


@pytest.mark.parametrize("fault", sorted(_BEGIN_FAULTS))
async def test_a_segment_that_cannot_be_begun_is_reported_not_a_traceback(
    tmp_path: Path, fault: str
) -> None:
    """A segment refused from the start: an error line, nothing sent, --resume sends all."""
    site = worker_site(tmp_path, _BEGIN_FAULTS[fault])
    n = 50
    source = items(tmp_path, n)
    journal = tmp_path / "journal"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "--journal", str(journal),
            "--out", str(first), site=site,
        )  # fmt: skip
        code, err = await finish(process)
        assert code == 1, err
        assert "Traceback" not in err
        assert "died" not in err  # each reported why it sent nothing
        assert err.count("error: worker") == 2, err
        assert "could not write its journal segment" in err
        assert "it sent nothing" in err
        assert f"{journal}.part-0001-0000" in err
        assert f"{n} item(s) not started" in err
        assert read_jsonl(first) == []
        assert svc.received == 0
        # A torn header was cut off: --resume reads every segment and sends each item once.
        code, err = await resume(base_url, source, journal, second)
    assert code == 0, err
    assert set(check_accounting(svc, second, n).values()) == {"sent"}


async def test_many_departments_cost_the_limiter_linear_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Thousands of departments, each with a slot still ahead: each new one is no full scan."""
    from botmsg_async import bulk

    reads = 0

    class Counted(bulk._DepartmentSlots):
        # Every read of a department's next slot: the work of the acquire that makes it
        # and of any scan for departments to forget.
        @property
        def tat(self) -> float:
            nonlocal reads
            reads += 1
            return self._tat

        @tat.setter
        def tat(self, value: float) -> None:
            self._tat = value

    monkeypatch.setattr(bulk, "_DepartmentSlots", Counted)
    now = [100.0]
    fd = ProcessRateLimiter.create()
    try:
        # 0.1/s per department: each keeps a slot 10 s ahead; 5,000 new ones a second.
        limiter = ProcessRateLimiter(fd, per_department_rate=0.1, clock=lambda: now[0])
        n = 8_000
        for i in range(n):
            await limiter.acquire(f"d{i}")
            now[0] += 0.0002
        limiter.close()
    finally:
        os.close(fd)
    assert reads < 10 * n  # a full scan per new department was about n * n / 2


async def runs_worker_code(pid: int) -> None:
    """Return once process ``pid`` runs a worker's code (it was exec'd; Linux /proc)."""
    while True:
        if b"_worker_main" in Path(f"/proc/{pid}/cmdline").read_bytes():  # noqa: ASYNC240
            return
        await asyncio.sleep(0.01)


async def test_the_password_is_in_no_workers_environment(tmp_path: Path) -> None:
    """BOTMSG_PASSWORD is not copied into a worker's /proc/<pid>/environ (its socket has it)."""
    source = items(tmp_path, 4)
    async with service() as (svc, base_url):
        stalled, release, _ = stall_next(svc, 200)
        process = await start(base_url, str(source), "--workers", "2", "-c", "1")
        pids = await worker_pids(process, 2)
        await asyncio.wait_for(stalled.wait(), TIMEOUT)
        for pid in pids:
            await runs_worker_code(pid)  # between fork and exec, it shows the parent's
            environ = Path(f"/proc/{pid}/environ").read_bytes()  # noqa: ASYNC240
            assert PASSWORD.encode() not in environ
            assert f"BOTMSG_USERNAME={USERNAME}".encode() in environ  # the rest is kept
        release.set()
        code, err = await finish(process)
    assert code == 0, err


async def test_a_worker_stopped_half_way_through_a_message_holds_up_no_other(
    tmp_path: Path,
) -> None:
    """SIGSTOP of a worker mid-message: the other sends the rest; SIGCONT, and all is reported."""
    marker = tmp_path / "stopped"
    # The first worker to report results writes half of the message, then stops itself.
    site = worker_site(
        tmp_path,
        "import os, signal, struct\n"
        "from multiprocessing import connection\n"
        "send_bytes = connection.Connection._send_bytes\n"
        "def half_then_stop(self, buf):\n"
        "    data = bytes(buf)\n"
        "    if b'results' in data:\n"
        "        try:\n"
        f"            os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL))\n"
        "        except FileExistsError:\n"
        "            pass\n"
        "        else:\n"
        "            self._send(struct.pack('!i', len(data)) + data[: len(data) // 2])\n"
        "            os.kill(os.getpid(), signal.SIGSTOP)\n"
        "            self._send(data[len(data) // 2 :])\n"
        "            return\n"
        "    send_bytes(self, buf)\n"
        "connection.Connection._send_bytes = half_then_stop\n",
    )
    n = 600
    source = items(tmp_path, n)
    out = tmp_path / "out.jsonl"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "8", "--out", str(out), site=site
        )
        pids = await worker_pids(process, 2)
        try:
            # The stopped one holds two chunks of 16 and its results not yet reported.
            await asyncio.wait_for(svc.when_received(n - 64).wait(), TIMEOUT)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        code, err = await finish(process)
    assert marker.exists()
    assert code == 0, err
    assert set(check_accounting(svc, out, n).values()) == {"sent"}


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param("struct.pack('!i', 5) + b'\\x80\\x05junk'", id="no pickle"),
        pytest.param("struct.pack('!i', -7)", id="a negative size"),
        pytest.param("struct.pack('!i', 4) + pickle.dumps(7)[:4]", id="no tuple"),
    ],
)
async def test_a_worker_message_that_makes_no_sense_ends_it_as_a_death(
    tmp_path: Path, garbage: str
) -> None:
    """A worker's garbled message: it is killed and reconciled from its segment, no traceback."""
    marker = tmp_path / "garbled"
    site = worker_site(
        tmp_path,
        "import os, pickle, struct\n"
        "from multiprocessing import connection\n"
        "send_bytes = connection.Connection._send_bytes\n"
        "def garbled(self, buf):\n"
        "    if b'results' in bytes(buf):\n"
        "        try:\n"
        f"            os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL))\n"
        "        except FileExistsError:\n"
        "            pass\n"
        "        else:\n"
        f"            self._send({garbage})\n"
        "    send_bytes(self, buf)\n"
        "connection.Connection._send_bytes = garbled\n",
    )
    n = 300
    source = items(tmp_path, n)
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "journal"
    async with service() as (svc, base_url):
        process = await start(
            base_url, str(source), "--workers", "2", "-c", "8", "--journal", str(journal),
            "--out", str(out), site=site,
        )  # fmt: skip
        code, err = await finish(process)
    assert marker.exists()
    assert code in (1, 3), err
    assert "died: signal 9" in err
    assert "Traceback" not in err
    outcomes = check_accounting(svc, out, n)
    assert set(outcomes.values()) <= {"sent", "unknown"}
    assert (code == 3) == ("unknown" in outcomes.values())


BAD_OPTIONS = [
    ("workers", 0),
    ("concurrency", 0),
    ("max_pause", float("nan")),
    ("stop_after_consecutive_failures", 0),
    ("rate_limit", -1.0),
    ("rate_limit", 0.0),
    ("rate_limit", float("inf")),
    ("rate_limit", float("nan")),
    ("rate_limit", 1e-320),  # its period, 1 / rate, is infinite
    ("rate_limit", "10"),
    ("per_department_rate_limit", float("inf")),
    ("per_department_rate_limit", -5),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS)
def test_a_parallel_send_refuses_a_bad_option_before_any_worker_has_it(
    name: str, value: object
) -> None:
    """ParallelSend names a bad option at once: no worker starts, fails or sends at no limit."""
    config = WorkerConfig(base_url="http://127.0.0.1:9", username=USERNAME, password=PASSWORD)
    workers = 2
    if name == "workers":
        workers = value  # type: ignore[assignment]
    else:
        config = evolve(config, **{name: value})  # type: ignore[arg-type]
    before = children(os.getpid())
    with pytest.raises(InvalidRequestError, match=name):
        ParallelSend(config, [], workers=workers, on_result=print)
    assert children(os.getpid()) == before


@pytest.mark.parametrize(
    ("name", "value"), [(n, v) for n, v in BAD_OPTIONS if n.endswith("rate_limit")]
)
def test_the_shared_limiter_refuses_a_rate_it_cannot_keep(name: str, value: object) -> None:
    """ProcessRateLimiter names a rate that is not a finite number > 0, as LocalRateLimiter does."""
    fd = ProcessRateLimiter.create()
    try:
        argument = "rate" if name == "rate_limit" else "per_department_rate"
        with pytest.raises(InvalidRequestError, match=name):
            ProcessRateLimiter(fd, **{argument: value})  # type: ignore[arg-type]
    finally:
        os.close(fd)
