"""``botmsg send-many --redis --job``: runs as processes on loopback standing in for machines.

Each run is the real ``botmsg`` entry point in a subprocess; the service is the
fake server (with faults) in the test's loop; Redis is a real redis-server with
AOF and ``appendfsync always``. "Received twice" means two accepted messages
for one user (the fake server deduplicates by idempotency key).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

pytest.importorskip("redis", reason="pip install 'botmsg-async[redis]'")

from botmsg_async.testing import FakeBotMessageServer, Fault
from tests.test_cli import read_jsonl, write_csv
from tests.test_cli_workers import no_process_left

from .conftest import JobRedis

__all__ = ["no_process_left"]  # the autouse fixture: no run outlives its test

PASSWORD = "pw-jobs-5521"
WRONG_PASSWORD = "pw-jobs-refused-8830"
TIMEOUT = 60.0


def write_items(tmp_path: Path, n: int) -> Path:
    return write_csv(
        tmp_path / "in.csv",
        [
            {"department_uuid": f"dep-{i % 3}", "user_uuid": f"user-{i}", "text": f"#{i}"}
            for i in range(n)
        ],
    )


async def botmsg_start(
    server: FakeBotMessageServer,
    *args: str,
    stdout: int = asyncio.subprocess.DEVNULL,
    password: str = PASSWORD,
) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOTMSG_")}
    env.update(BOTMSG_BASE_URL=server.base_url, BOTMSG_USERNAME="user", BOTMSG_PASSWORD=password)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "botmsg_async",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str]:
    assert process.stderr is not None
    try:
        err = await asyncio.wait_for(process.stderr.read(), TIMEOUT)
        code = await asyncio.wait_for(process.wait(), TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    assert PASSWORD.encode() not in err
    assert WRONG_PASSWORD.encode() not in err
    return code, err.decode()


def run_args(redis: JobRedis, path: Path, *extra: str) -> list[str]:
    return [
        "send-many",
        str(path),
        "--redis",
        redis.url,
        "--job",
        "the-job",
        "--chunk-size",
        "50",
        "--concurrency",
        "8",
        "--claim-timeout",
        "1",
        *extra,
    ]


async def when_received(server: FakeBotMessageServer, count: int) -> None:
    # The fake server has no arrival event: poll its records (no timing is asserted).
    while len(server.messages) < count:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def report(server: FakeBotMessageServer, redis: JobRedis, path: Path, out: Path) -> int:
    process = await botmsg_start(
        server,
        "job", "report", "--redis", redis.url, "--job", "the-job",
        "--input", str(path), "--out", str(out),
    )  # fmt: skip
    code, err = await finish(process)
    assert "Traceback" not in err
    return code


def check(server: FakeBotMessageServer, out: Path, n: int) -> collections.Counter[str]:
    """Every item once in the report, none received twice, the report equals the server."""
    lines = read_jsonl(out)
    assert sorted(line["index"] for line in lines) == list(range(n))
    users = collections.Counter(m.user_uuid for m in server.messages)
    assert [u for u, c in users.items() if c > 1] == []
    by_user = {m.user_uuid: m for m in server.messages}
    for line in lines:
        got = by_user.get(line["user_uuid"])
        if line["outcome"] == "sent":
            assert got is not None
            assert got.message_uuid == line["message_uuid"]
            assert got.idempotency_key == line["idempotency_key"]
        elif line["outcome"] in ("failed", "skipped"):
            assert got is None
    return collections.Counter(line["outcome"] for line in lines)


async def test_three_processes_one_job(tmp_path: Path, job_redis: JobRedis) -> None:
    """Three runs (as on three machines) against a faulty service: one outcome per item."""
    n = 1500
    path = write_items(tmp_path, n)
    async with FakeBotMessageServer(password=PASSWORD, fault_rate=0.1, seed=3) as server:
        runs = [await botmsg_start(server, *run_args(job_redis, path)) for _ in range(3)]
        results = [await finish(p) for p in runs]
        for code, err in results:
            assert code in (0, 1, 3), err
        out = tmp_path / "report.jsonl"
        await report(server, job_redis, path, out)
    outcomes = check(server, out, n)
    assert outcomes["sent"] > n * 0.8


@pytest.mark.parametrize(
    "share",
    [0.1, 0.5, pytest.param(0.9, marks=pytest.mark.slow)],  # 0.9: ~5 s on 2 loaded cores
)
async def test_one_killed_the_others_finish(
    tmp_path: Path, job_redis: JobRedis, share: float
) -> None:
    """SIGKILL of one run at 10/50/90 %: the others take its chunks; its in-flight unknown."""
    n = 1500
    path = write_items(tmp_path, n)
    async with FakeBotMessageServer(password=PASSWORD, latency=0.01) as server:
        runs = [await botmsg_start(server, *run_args(job_redis, path)) for _ in range(3)]
        await asyncio.wait_for(when_received(server, int(n * share)), TIMEOUT)
        runs[0].kill()
        await runs[0].wait()
        for process in runs[1:]:
            code, err = await finish(process)
            assert code in (0, 3), err
        out = tmp_path / "report.jsonl"
        await report(server, job_redis, path, out)
    outcomes = check(server, out, n)
    assert outcomes["failed"] == outcomes["skipped"] == 0
    # At most the killed run's sends in flight (8) and its outcomes not yet written (8).
    assert outcomes["unknown"] <= 16
    assert outcomes["sent"] + outcomes["unknown"] == n


async def test_all_killed_then_one_completes(tmp_path: Path, job_redis: JobRedis) -> None:
    """SIGKILL of every run, then one restarted: it completes the job."""
    n = 1200
    path = write_items(tmp_path, n)
    async with FakeBotMessageServer(password=PASSWORD, latency=0.01) as server:
        runs = [await botmsg_start(server, *run_args(job_redis, path)) for _ in range(3)]
        await asyncio.wait_for(when_received(server, n // 3), TIMEOUT)
        for process in runs:
            process.kill()
            await process.wait()
        out = tmp_path / "out.jsonl"
        again = await botmsg_start(server, *run_args(job_redis, path, "--out", str(out)))
        code, err = await finish(again)
        assert code in (0, 3), err
    outcomes = check(server, out, n)
    assert outcomes["unknown"] <= 3 * 16
    assert outcomes["sent"] + outcomes["unknown"] == n


async def test_redis_restarted_mid_job(tmp_path: Path, job_redis: JobRedis) -> None:
    """Redis SIGKILLed and restarted (AOF, fsync always) mid-job: the job completes."""
    n = 1200
    path = write_items(tmp_path, n)
    async with FakeBotMessageServer(password=PASSWORD, latency=0.01) as server:
        runs = [await botmsg_start(server, *run_args(job_redis, path)) for _ in range(2)]
        await asyncio.wait_for(when_received(server, n // 2), TIMEOUT)
        job_redis.kill()
        await asyncio.sleep(0.3)
        job_redis.start()
        for process in runs:
            code, err = await finish(process)
            assert code in (0, 3), err
        out = tmp_path / "report.jsonl"
        await report(server, job_redis, path, out)
    outcomes = check(server, out, n)
    assert outcomes["sent"] + outcomes["unknown"] == n


async def test_complete_job_exits_at_once_and_other_input_is_refused(
    tmp_path: Path, job_redis: JobRedis
) -> None:
    """A run of a finished job sends nothing; another input under the name exits 2."""
    path = write_items(tmp_path, 120)
    async with FakeBotMessageServer(password=PASSWORD) as server:
        code, err = await finish(await botmsg_start(server, *run_args(job_redis, path)))
        assert code == 0, err
        before = server.requests
        code, err = await finish(await botmsg_start(server, *run_args(job_redis, path)))
        assert code == 0, err
        assert "complete" in err
        assert server.requests == before
        other = write_csv(
            tmp_path / "other.csv", [{"department_uuid": "d", "user_uuid": "u", "text": "x"}]
        )
        code, err = await finish(await botmsg_start(server, *run_args(job_redis, other)))
        assert code == 2
        assert "another input" in err
        code, err = await finish(
            await botmsg_start(server, *run_args(job_redis, path, "--rate", "5"))
        )
        assert code == 2
        assert "rate" in err
        assert server.requests == before


async def test_non_durable_redis_is_refused(tmp_path: Path, job_redis: JobRedis) -> None:
    """Without appendfsync always the run refuses (exit 2) unless --accept-redis-loss."""
    import redis

    with redis.Redis(unix_socket_path=str(job_redis.socket)) as client:
        client.config_set("appendfsync", "everysec")
    path = write_items(tmp_path, 20)
    async with FakeBotMessageServer(password=PASSWORD) as server:
        code, err = await finish(await botmsg_start(server, *run_args(job_redis, path)))
        assert code == 2
        assert "appendfsync" in err
        assert server.requests == 0
        code, err = await finish(
            await botmsg_start(server, *run_args(job_redis, path, "--accept-redis-loss"))
        )
        assert code == 0, err


async def test_status_and_cancel(tmp_path: Path, job_redis: JobRedis) -> None:
    """job cancel stops every run (nothing new starts); status says so; report: skipped."""
    n = 1000
    path = write_items(tmp_path, n)
    # 2 runs x 8 in flight / 50 ms: ~3 s of work, so the cancel (a process of its own,
    # ~1 s to start on a busy CPU) lands long before the job could be complete.
    async with FakeBotMessageServer(password=PASSWORD, latency=0.05) as server:
        runs = [await botmsg_start(server, *run_args(job_redis, path)) for _ in range(2)]
        await asyncio.wait_for(when_received(server, 100), TIMEOUT)
        cancel = await botmsg_start(
            server, "job", "cancel", "--redis", job_redis.url, "--job", "the-job"
        )
        code, _ = await finish(cancel)
        assert code == 0
        for process in runs:
            code, _ = await finish(process)
        received = len(server.messages)
        status = await botmsg_start(
            server, "job", "status", "--redis", job_redis.url, "--job", "the-job", "--json",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert status.stdout is not None
        text = (await status.stdout.read()).decode()
        await finish(status)
        out = tmp_path / "report.jsonl"
        code = await report(server, job_redis, path, out)
    assert '"state": "cancelled"' in text or '"state":"cancelled"' in text
    assert received < n
    outcomes = check(server, out, n)
    assert outcomes["skipped"] > 0
    assert code == 1


async def test_refused_credentials_stop_every_run(tmp_path: Path, job_redis: JobRedis) -> None:
    """A 401 seen by one run stops the job: the others start nothing new; the rest skipped."""
    # Slow enough (2 runs x 8 in flight / 50 ms: ~10 s of work) that the refused run,
    # started after 100 are received, joins long before the job could be complete.
    n = 3000
    path = write_items(tmp_path, n)
    async with FakeBotMessageServer(password=PASSWORD, latency=0.05) as server:
        runs = [await botmsg_start(server, *run_args(job_redis, path)) for _ in range(2)]
        await asyncio.wait_for(when_received(server, 100), TIMEOUT)
        refused = await botmsg_start(server, *run_args(job_redis, path), password=WRONG_PASSWORD)
        # Each run exits with the job's code as it ends: 3 while another run's sends
        # were still in flight (unknown until they end), else 1 (skipped, failed).
        code, err = await finish(refused)
        assert code in (1, 3), err
        assert "this run: sent 0" in err
        for process in runs:
            code, err = await finish(process)
            assert code in (1, 3), err
            assert "stopped by: AuthenticationError" in err
        received = len(server.messages)
        status = await botmsg_start(
            server, "job", "status", "--redis", job_redis.url, "--job", "the-job", "--json",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert status.stdout is not None
        text = (await status.stdout.read()).decode()
        await finish(status)
        out = tmp_path / "report.jsonl"
        code = await report(server, job_redis, path, out)
    state = json.loads(text)
    assert state["state"] == "stopped"
    assert "AuthenticationError" in state["stopped_by"]
    assert received < n
    outcomes = check(server, out, n)
    assert outcomes["skipped"] > 0
    # Only the refused run's first sends failed (one 401 each, at most its concurrency).
    assert outcomes["failed"] <= 8
    assert outcomes["sent"] + outcomes["unknown"] <= received + 16
    assert code == 1


async def test_resend_unknown_on_a_complete_job(tmp_path: Path, job_redis: JobRedis) -> None:
    """send-many --redis --resend-unknown on a complete job resends its unknown items."""
    n = 200
    path = write_items(tmp_path, n)
    doubtful = {f"user-{i}" for i in range(3, n, 17)}
    async with FakeBotMessageServer(password=PASSWORD) as server:
        server.inject(Fault.HTTP_500, when=lambda r: r.user_uuid in doubtful)
        first = tmp_path / "first.jsonl"
        code, err = await finish(
            await botmsg_start(server, *run_args(job_redis, path, "--out", str(first)))
        )
        assert code == 3, err
        server.clear_faults()
        out = tmp_path / "again.jsonl"
        code, err = await finish(
            await botmsg_start(
                server, *run_args(job_redis, path, "--resend-unknown", "--out", str(out))
            )
        )
        assert code == 0, err
    before = {line["index"]: line for line in read_jsonl(first)}
    unknown = {i for i, line in before.items() if line["outcome"] == "unknown"}
    assert {before[i]["user_uuid"] for i in unknown} == doubtful
    assert {m.idempotency_key for m in server.messages if m.user_uuid in doubtful} == {
        before[i]["idempotency_key"] for i in unknown
    }
    outcomes = check(server, out, n)
    assert outcomes == {"sent": n}


async def test_the_report_reads_the_input_with_the_jobs_message_options(
    tmp_path: Path, job_redis: JobRedis
) -> None:
    """job report --input of a job run with --text/--ignore-columns, given neither: the
    job's (every sent item sent, as the run's --out says); other options or another input
    than the job's: exit 2 naming them, no report."""
    rows = [{"department_uuid": f"dep-{i % 3}", "user_uuid": f"user-{i}", "note": "x"}
            for i in range(12)]  # fmt: skip
    path = write_csv(tmp_path / "in.csv", rows)
    other = write_csv(tmp_path / "other.csv", rows[:-1])
    run_out, out = tmp_path / "run.jsonl", tmp_path / "report.jsonl"
    where = ("--redis", job_redis.url, "--job", "the-job")
    async with FakeBotMessageServer(password=PASSWORD) as server:
        code, err = await finish(
            await botmsg_start(
                server, "send-many", str(path), *where, "--text", "Office closed",
                "--ignore-columns", "note", "--out", str(run_out),
            )
        )  # fmt: skip
        assert code == 0, err
        assert len(server.messages) == 12

        async def report(*extra: str) -> tuple[int, str]:
            return await finish(
                await botmsg_start(server, "job", "report", *where, "--out", str(out), *extra)
            )

        code, err = await report("--input", str(path))
        assert code == 0, err
        assert read_jsonl(out) == read_jsonl(run_out)
        for extra, named in (
            (["--input", str(path), "--text", "Another text"], "--text"),
            (["--input", str(path), "--format", "jsonl"], "--format"),
            (["--input", str(other)], "--input"),
        ):
            out.unlink(missing_ok=True)
            code, err = await report(*extra)
            assert code == 2, (extra, err)
            assert named in err, err
            assert "Traceback" not in err
            assert not out.exists()


@pytest.mark.parametrize("command", ["send-many", "job"])
async def test_a_bad_redis_url_is_a_usage_error_that_does_not_quote_it(
    tmp_path: Path, command: str
) -> None:
    """A --redis URL redis-py refuses: exit 2, one line, no traceback, no piece of its password."""
    url = "redis://:s3cr/et@127.0.0.1:6379/0"  # an unencoded '/': its head taken for a port
    args = (
        ["send-many", "--redis", url, "--job", "j", str(write_items(tmp_path, 3))]
        if command == "send-many"
        else ["job", "status", "--redis", url, "--job", "j"]
    )
    async with FakeBotMessageServer() as server:
        code, err = await finish(await botmsg_start(server, *args))
    assert code == 2, err
    assert "Traceback" not in err
    assert "s3cr" not in err
    assert "not a Redis URL" in err
    assert server.messages == []


@pytest.mark.parametrize("flag", ["--journal=j", "--resume", "--durable"])
def test_file_journal_flags_are_refused(tmp_path: Path, flag: str) -> None:
    """The file journal's flags do not go with --redis (usage error, nothing sent)."""
    from botmsg_async.cli import main

    path = write_items(tmp_path, 3)
    code = main(["send-many", str(path), "--redis", "redis://127.0.0.1:1", "--job", "x", flag])
    assert code == 2


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--job-ttl", "1e300"),  # past Redis's EXPIRE: a job whose keys never expire
        ("--job-ttl", "0.5"),  # rounded down to 0: refused as "invalid ttl 0"
        ("--job-ttl", "nan"),
        ("--claim-timeout", "1e300"),  # past XAUTOCLAIM's min-idle-time
        ("--claim-timeout", "nan"),
    ],
)
def test_a_time_redis_cannot_take_is_a_usage_error_naming_its_flag(
    tmp_path: Path,
    job_redis: JobRedis,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
) -> None:
    """--job-ttl / --claim-timeout outside 1 s (0 s) .. 100 years: exit 2 naming the flag,
    before Redis is touched."""
    import redis

    from botmsg_async.cli import main

    path = write_items(tmp_path, 3)
    args = ["send-many", str(path), "--redis", job_redis.url, "--job", "x", "--text", "t"]
    env = {"BOTMSG_BASE_URL": "http://127.0.0.1:9", "BOTMSG_USERNAME": "u", "BOTMSG_PASSWORD": "p"}
    with pytest.MonkeyPatch.context() as patch:
        for name, env_value in env.items():
            patch.setenv(name, env_value)
        with pytest.raises(SystemExit) as exit_info:
            main([*args, f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    with redis.Redis(unix_socket_path=str(job_redis.socket)) as client:
        assert client.keys("botmsg:job:*") == []


def test_send_many_help_explains_redis_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    """send-many --help says what --redis/--job do and guarantee."""
    from botmsg_async.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["send-many", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--redis URL --job NAME makes the run one of a job shared through Redis" in text
    assert "no item is sent twice" in text
    assert "one quota across all runs" in text
    assert "--accept-redis-loss" in text


def test_job_report_refuses_out_on_its_input(
    tmp_path: Path, job_redis: JobRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """job report --out the --input file (or a link to it): exit 2, the input untouched
    (it was truncated before its rows were read: every item reported skipped, invalid)."""
    from botmsg_async.cli import main
    from tests.test_docs import ThreadServer

    path = write_items(tmp_path, 3)
    before = path.read_bytes()
    with ThreadServer() as server:
        monkeypatch.setenv("BOTMSG_BASE_URL", server.base_url)
        monkeypatch.setenv("BOTMSG_USERNAME", server.username)
        monkeypatch.setenv("BOTMSG_PASSWORD", server.password)
        assert main(run_args(job_redis, path)) == 0
    link = tmp_path / "link.csv"
    link.symlink_to(path)
    where = ["--redis", job_redis.url, "--job", "the-job", "--input", str(path)]
    for out in (path, link):
        assert main(["job", "report", *where, "--out", str(out)]) == 2
        assert path.read_bytes() == before
    assert main(["job", "report", *where, "--out", str(tmp_path / "out.jsonl")]) == 0


def test_a_report_without_input_names_invalid_rows_as_the_run_did(
    tmp_path: Path,
    job_redis: JobRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """job report without --input of a complete job with --skip-invalid rows: those rows
    skipped as invalid, exit 0, as the run's --out (not "the job is still running", exit 1)."""
    from botmsg_async.cli import main
    from tests.test_docs import ThreadServer

    rows = [{"department_uuid": f"dep-{i}", "user_uuid": f"user-{i}", "text": "hi"}
            for i in range(5)]  # fmt: skip
    rows[2]["department_uuid"] = ""  # invalid: never sent by any run
    path = write_csv(tmp_path / "in.csv", rows)
    run_out, out = tmp_path / "run.jsonl", tmp_path / "report.jsonl"
    with ThreadServer() as server:
        monkeypatch.setenv("BOTMSG_BASE_URL", server.base_url)
        monkeypatch.setenv("BOTMSG_USERNAME", server.username)
        monkeypatch.setenv("BOTMSG_PASSWORD", server.password)
        args = [*run_args(job_redis, path, "--skip-invalid"), "--out", str(run_out)]
        assert main(args) == 0
        assert len(server.messages) == 4
    where = ["--redis", job_redis.url, "--job", "the-job"]
    code = main(["job", "report", *where, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    blank = {"department_uuid": "", "user_uuid": ""}
    assert read_jsonl(out) == [{**line, **blank} for line in read_jsonl(run_out)]
