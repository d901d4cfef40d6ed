"""Start and stop the loopback servers the benchmarks run against.

Every server runs in processes of its own, so that the CPU time and memory
measured in the client process are the client's alone. nginx (from the OS) is
preferred for the fast answers: it costs the shared CPUs least. Without it,
``fake_server.py`` runs in a few processes sharing one port. Everything binds
127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from attrs import define

from benchmarks.fake_server import FAILURE_BODY, SUCCESS_BODY

__all__ = ["REPO_ROOT", "Server", "child_env", "free_port", "nginx_version", "start_server"]

REPO_ROOT = Path(__file__).resolve().parent.parent
_STARTUP_TIMEOUT = 15.0


@define(frozen=True)
class Server:
    """A running server: where it is and what it is.

    Attributes:
        base_url: ``http://127.0.0.1:PORT``, the client's ``base_url``.
        kind: ``"nginx"`` or ``"aiohttp"``.
        description: One line for the report, e.g. ``"aiohttp x2, +50 ms"``.
    """

    base_url: str
    kind: str
    description: str


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nginx_version() -> str | None:
    """Return nginx's version string (``nginx/1.22.1``), or None without nginx."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if binary is None:
        return None
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    # nginx prints "nginx version: nginx/1.22.1" on stderr.
    return done.stderr.strip().rpartition(" ")[2] or None


def child_env() -> dict[str, str]:
    """The environment for harness subprocesses: this repository importable first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _nginx_string(body: bytes) -> str:
    # The answers contain double quotes and no single quote or backslash, so a
    # single-quoted nginx string holds them verbatim.
    text = body.decode()
    if "'" in text or "\\" in text:
        raise ValueError("an answer nginx cannot quote")
    return f"'{text}'"


def _nginx_config(workdir: Path, port: int, fail_percent: int, cpu: int | None = None) -> str:
    if fail_percent:
        # split_clients hashes the per-request random id: about fail_percent of
        # the answers are FAILURE, in no fixed pattern (nginx cannot count).
        answers = (
            'split_clients "${request_id}" $botmsg_answer {\n'
            f"        {fail_percent}% {_nginx_string(FAILURE_BODY)};\n"
            f"        * {_nginx_string(SUCCESS_BODY)};\n"
            "    }\n"
        )
        answer = "$botmsg_answer"
    else:
        answers = ""
        answer = _nginx_string(SUCCESS_BODY)
    # A bit mask, highest CPU first: "10" is CPU 1.
    affinity = "" if cpu is None else f"worker_cpu_affinity 1{'0' * cpu};"
    return f"""\
daemon off;
master_process on;
# One worker: the client gets the other CPU of a 2-CPU machine to itself.
worker_processes 1;
{affinity}
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    # nginx closes a keep-alive connection after 1000 requests by default: the
    # clients would spend time reconnecting, which is not what is measured here.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    {answers}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location / {{
            return 200 {answer};
        }}
    }}
}}
"""


def _probe(port: int) -> bool:
    """POST one request; True when a JSON answer with a status came back."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        conn.request(
            "POST",
            "/communications/department/d/user/u/botmessage/send",
            body=b'{"messageAttributes":{"body":"probe"}}',
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        data = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()
    return response.status == 200 and data.get("status") in ("SUCCESS", "FAILURE")


def _wait_until_up(port: int, procs: list[subprocess.Popen[bytes]], log: Path | None) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                detail = log.read_text() if log is not None and log.exists() else ""
                raise RuntimeError(f"server exited with {proc.returncode} at startup\n{detail}")
        if _probe(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server on 127.0.0.1:{port} did not answer within {_STARTUP_TIMEOUT} s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def _nginx(fail_percent: int, cpu: int | None) -> Iterator[Server]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory(prefix="botmsg-bench-nginx-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(_nginx_config(workdir, port, fail_percent, cpu))
        # -e: nginx opens its default error log before reading the config;
        # point that at the temp dir too, so nothing outside it is touched.
        cmd = [binary, "-e", str(workdir / "error.log"), "-p", str(workdir), "-c", str(conf)]
        procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)]
        try:
            _wait_until_up(port, procs, workdir / "error.log")
            faults = f", {fail_percent}% FAILURE" if fail_percent else ""
            yield Server(f"http://127.0.0.1:{port}", "nginx", f"nginx 1 worker{faults}")
        finally:
            # SIGTERM is nginx's fast shutdown; the master stops its workers.
            _stop(procs)


@contextlib.contextmanager
def _aiohttp(processes: int, delay: float, fail_every: int, cpu: int | None) -> Iterator[Server]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.fake_server",
        "--port",
        str(port),
        "--delay",
        str(delay),
        "--fail-every",
        str(fail_every),
    ]
    if processes > 1:
        cmd.append("--reuse-port")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(processes):
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                cwd=REPO_ROOT,
                env=child_env(),
            )
            procs.append(proc)
            if cpu is not None:
                os.sched_setaffinity(proc.pid, {cpu})
            # Each process says "ready" once it listens, so none is left out of
            # the SO_REUSEPORT group when the clients connect.
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"fake server exited with {proc.wait()} at startup")
        _wait_until_up(port, procs, None)
        extra = (f", +{delay * 1000:g} ms" if delay else "") + (
            f", FAILURE every {fail_every}th" if fail_every else ""
        )
        yield Server(f"http://127.0.0.1:{port}", "aiohttp", f"aiohttp x{processes}{extra}")
    finally:
        _stop(procs)


def start_server(
    prefer: str,
    *,
    processes: int = 2,
    delay: float = 0.0,
    fail_every: int = 0,
    cpu: int | None = None,
) -> contextlib.AbstractContextManager[Server]:
    """Start a server for one scenario; leaving the ``with`` block stops it.

    Args:
        prefer: ``"nginx"`` (fail if absent), ``"aiohttp"``, or ``"auto"`` (nginx
            when installed, else aiohttp). A ``delay`` always takes aiohttp.
        processes: aiohttp server processes sharing the port.
        delay: Seconds each answer waits.
        fail_every: Make 1 in ``fail_every`` answers a transient FAILURE (0: none).
        cpu: Pin the server's processes to this CPU, or None.

    Returns:
        A context manager yielding the running ``Server``.
    """
    if prefer not in ("auto", "nginx", "aiohttp"):
        raise ValueError(f"unknown server kind {prefer!r}")
    use_nginx = not delay and (
        prefer == "nginx" or (prefer == "auto" and nginx_version() is not None)
    )
    if use_nginx:
        return _nginx(round(100 / fail_every) if fail_every else 0, cpu)
    return _aiohttp(processes, delay, fail_every, cpu)
