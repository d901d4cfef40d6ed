"""Every Python example in the docs (docs/*.md and README.md) runs here, so none can rot.

The extractor takes every fenced ```` ```python ```` block. An HTML comment on the line
before a block says how to run it (``<!-- docs-test: WORDS -->``, words separated by
commas); without one, the block is a whole program, run as ``__main__``:

- ``needs-server``: a ``FakeBotMessageServer`` runs on 127.0.0.1 (in a thread, with its
  own event loop, so that the block may call ``asyncio.run`` itself); the block sees it
  as ``server``, and ``BOTMSG_BASE_URL``, ``BOTMSG_USERNAME`` and ``BOTMSG_PASSWORD``
  point at it, as they would at the real service. A block with a top-level ``await``
  is run in a fresh event loop.
- ``needs-client``: the same, and ``client`` is an open ``BotMessageClient`` bound to it
  (no waits between retries); ``department_uuid`` and ``user_uuid`` are two ids. Every
  block of a chain runs in the one event loop the client belongs to.
- ``needs-redis``: a redis-server of the test's own runs (``tests/redis_server.py``), and
  ``BOTMSG_REDIS_URL`` points at it.
- ``continue``: the block runs after the page's previous block, in its namespace (and
  with its server and client): a page may build an example in steps.
- ``name=NAME``: the block defines things that a dedicated test below drives (a web app,
  a worker); it is run as a module, not as ``__main__``.
- ``pytest``: the block is a test module, run by pytest in a subprocess with the
  ``botmsg_async.pytest_plugin`` enabled.
- ``skip: REASON``: not run. Only for fragments that cannot run (none today: shell
  commands are in ``bash`` blocks, which are not Python); ``EXPECTED_SKIPS`` counts them.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import json
import linecache
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import botmsg_async
from botmsg_async import BotMessageClient, RetryPolicy
from botmsg_async.testing import FakeBotMessageServer, Fault
from tests.redis_server import RedisServer, require_binary

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]

#: Blocks marked ``skip`` (each with its reason); a new one must be counted here.
EXPECTED_SKIPS = 0
#: Fence languages that are not Python and so are not run (shell, data, diagrams).
NOT_PYTHON = {"bash", "console", "text", "json", "csv", "toml", "ini", "none"}
#: MyST directives used as fences; ``{eval-rst}`` holds autodoc directives, not code.
DIRECTIVES = {"{toctree}", "{eval-rst}", "{note}", "{warning}", "{important}", "{tip}"}
WORDS = {"needs-server", "needs-client", "needs-redis", "continue", "pytest"}
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<spec>.*?)\s*-->$")
DEPT = "7f0c6a52-1c7e-4c3e-9a53-6c1f8f0f2a10"
USER = "b3d1e0a4-55aa-4b7e-8c0e-2f0f7e9d1c22"


@dataclass(frozen=True)
class Example:
    """One ```` ```python ```` block and how its marker says to run it."""

    page: str
    line: int
    code: str
    words: frozenset[str]
    name: str | None
    skip: str | None

    @property
    def where(self) -> str:
        """``page:line`` of the block's first code line, for test ids and tracebacks."""
        return f"{self.page}:{self.line}"


def _parse_marker(spec: str, where: str) -> tuple[frozenset[str], str | None, str | None]:
    if spec.startswith("skip:"):
        reason = spec.removeprefix("skip:").strip()
        assert reason, f"{where}: a skip needs a reason"
        return frozenset(), None, reason
    words, name = set(), None
    for word in (w.strip() for w in spec.split(",")):
        if word.startswith("name="):
            name = word.removeprefix("name=")
        else:
            assert word in WORDS, f"{where}: unknown docs-test word {word!r}"
            words.add(word)
    return frozenset(words), name, None


def fences(path: Path) -> Iterator[tuple[int, str, str, str]]:
    """Each fenced block of a page: (first code line, language, code, the line before)."""
    lines = path.read_text("utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(`{3,})([^`\s]*)\s*$", lines[i])
        if match is None:
            i += 1
            continue
        fence, lang = match.groups()
        before = lines[i - 1].strip() if i else ""
        ends = [j for j in range(i + 1, len(lines)) if lines[j].rstrip() == fence]
        assert ends, f"{path.name}:{i + 1}: a fence that is never closed"
        end = ends[0]
        yield i + 2, lang, "\n".join(lines[i + 1 : end]) + "\n", before
        i = end + 1


def examples(path: Path) -> list[Example]:
    """The page's Python examples, in order."""
    page = path.relative_to(ROOT).as_posix()
    found = []
    for line, lang, code, before in fences(path):
        if lang != "python":
            continue
        marker = MARKER.match(before)
        words, name, skip = (
            _parse_marker(marker["spec"], f"{page}:{line}") if marker else (frozenset(), None, None)
        )
        found.append(Example(page, line, code, words, name, skip))
    return found


def chains() -> list[list[Example]]:
    """The examples grouped into chains: a ``continue`` block joins the one before it."""
    result: list[list[Example]] = []
    for path in PAGES:
        page_chains: list[list[Example]] = []
        for example in examples(path):
            if example.skip is not None:
                continue
            if "continue" in example.words:
                assert page_chains, f"{example.where}: 'continue' with no block before it"
                page_chains[-1].append(example)
            else:
                page_chains.append([example])
        result.extend(page_chains)
    return result


def named(name: str) -> list[Example]:
    """The chain that ends with the block named ``name``."""
    for chain in chains():
        for i, example in enumerate(chain):
            if example.name == name:
                return chain[: i + 1]
    raise LookupError(f"no docs block is named {name!r}")


def compile_example(example: Example) -> Any:
    """The block compiled (top-level ``await`` allowed), its source kept for tracebacks."""
    filename = f"<docs {example.where}>"
    # Line numbers in tracebacks are the page's: pad with the lines before the block.
    source = "\n" * (example.line - 1) + example.code
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return compile(source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def is_async(code: Any) -> bool:
    """Whether a compiled block has a top-level ``await`` (it runs as a coroutine)."""
    return bool(code.co_flags & inspect.CO_COROUTINE)


class ThreadServer:
    """A ``FakeBotMessageServer`` on its own event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = FakeBotMessageServer()

    def __enter__(self) -> FakeBotMessageServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)
        return self.server

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@contextlib.contextmanager
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBotMessageServer]:
    """A fake server in a thread, with the BOTMSG_* variables pointing at it."""
    with ThreadServer() as server:
        monkeypatch.setenv("BOTMSG_BASE_URL", server.base_url)
        monkeypatch.setenv("BOTMSG_USERNAME", server.username)
        monkeypatch.setenv("BOTMSG_PASSWORD", server.password)
        yield server


async def _no_wait(seconds: float) -> None:
    await asyncio.sleep(0)


async def _run_with_client(chain: list[Example], namespace: dict[str, Any]) -> None:
    server: FakeBotMessageServer = namespace["server"]
    async with BotMessageClient(
        server.base_url, server.username, server.password, sleep=_no_wait
    ) as client:
        namespace.update(client=client, department_uuid=DEPT, user_uuid=USER)
        for example in chain:
            code = compile_example(example)
            if is_async(code):
                await eval(code, namespace)  # noqa: S307 - the docs' own examples
            else:
                exec(code, namespace)  # noqa: S102 - the docs' own examples


def run_chain(chain: list[Example], namespace: dict[str, Any]) -> None:
    """Run a chain's blocks in ``namespace`` (which holds ``server`` if they need one)."""
    if "needs-client" in chain[0].words:
        asyncio.run(_run_with_client(chain, namespace))
        return
    for example in chain:
        code = compile_example(example)
        if is_async(code):
            asyncio.run(eval(code, namespace))  # noqa: S307 - the docs' own examples
        else:
            exec(code, namespace)  # noqa: S102 - the docs' own examples


def module_name(chain: list[Example]) -> str:
    """``__main__`` unless the chain's last block is named (a dedicated test drives it)."""
    return "docs_example" if chain[-1].name else "__main__"


def run_pytest_example(example: Example, tmp_path: Path) -> None:
    """Run a ``pytest`` block as a test module with the plugin, in a subprocess."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["botmsg_async.pytest_plugin"]\n')
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    (tmp_path / "test_docs_example.py").write_text(example.code)
    done = subprocess.run(  # noqa: S603 - this interpreter, running pytest
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{example.where}:\n{done.stdout}\n{done.stderr}"
    assert re.search(r"\d+ passed", done.stdout), done.stdout


CHAINS = chains()


@pytest.mark.parametrize("chain", CHAINS, ids=[c[0].where for c in CHAINS])
def test_example_runs(
    chain: list[Example], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A docs example (with any blocks that continue it) runs without error."""
    if "pytest" in chain[0].words:
        assert len(chain) == 1, f"{chain[0].where}: a pytest block cannot be continued"
        run_pytest_example(chain[0], tmp_path)
        return
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    namespace: dict[str, Any] = {"__name__": module_name(chain)}
    with contextlib.ExitStack() as stack:
        if "needs-redis" in chain[0].words:
            redis = RedisServer(require_binary(), tmp_path)
            redis.start()
            stack.callback(redis.kill)
            monkeypatch.setenv("BOTMSG_REDIS_URL", redis.url)
        _run_example(chain, namespace, monkeypatch)


def _run_example(
    chain: list[Example], namespace: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    if chain[0].words & {"needs-server", "needs-client"}:
        with served(monkeypatch) as server:
            namespace["server"] = server
            run_chain(chain, namespace)
    else:
        run_chain(chain, namespace)


def test_the_docs_have_examples() -> None:
    """The extractor finds the examples: a broken parser must not pass as 'nothing to run'."""
    assert len(CHAINS) >= 15
    pages = {c[0].page for c in CHAINS}
    assert {"README.md", "docs/sending.md", "docs/recipes.md", "docs/testing.md"} <= pages


def test_skips_are_counted() -> None:
    """Every skipped block has a reason, and their number is the one expected."""
    skipped = [e for path in PAGES for e in examples(path) if e.skip is not None]
    assert len(skipped) == EXPECTED_SKIPS, [(e.where, e.skip) for e in skipped]


def test_every_fence_is_python_or_known_not_to_be() -> None:
    """No code escapes the extractor under another spelling (``py``, ``python3``, ``pycon``)."""
    for path in PAGES:
        for line, lang, _, _ in fences(path):
            assert lang in {"python"} | NOT_PYTHON | DIRECTIVES, f"{path.name}:{line}: {lang!r}"


def test_the_api_reference_covers_the_public_names() -> None:
    """docs/api.md documents every name of ``botmsg_async.__all__``, so none is forgotten."""
    text = (DOCS / "api.md").read_text("utf-8")
    missing = [
        name
        for name in botmsg_async.__all__
        if name != "__version__" and not re.search(rf"botmsg_async\.{name}\b", text)
    ]
    assert missing == []


# -- the web recipes: driven over HTTP, each documented row checked ------------------------


def documented_statuses() -> dict[str, int]:
    """The error -> HTTP status table of docs/recipes.md: ``{error name: status}``."""
    text = (DOCS / "recipes.md").read_text("utf-8")
    rows = re.findall(r"^\| `(\w+)`[^|]*\| (\d{3}) \|", text, flags=re.MULTILINE)
    assert rows, "docs/recipes.md has no error table"
    return {name: int(status) for name, status in rows}


def load_recipe(name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the chain ending in the named block; its namespace, with retries not waiting."""
    chain = named(name)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    run_chain(chain, namespace)
    # A web request should not wait long for retries: the recipe's policy says so;
    # the test removes the waits themselves (the same attempts, no backoff).
    namespace["SEND_POLICY"] = RetryPolicy(backoff_initial=0, backoff_max=0)
    return namespace


def test_status_table_matches_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's ``STATUS_FOR`` is what the page's table says, row for row."""
    namespace = load_recipe("status-mapping", monkeypatch)
    code_table = {error.__name__: status for error, status in namespace["STATUS_FOR"]}
    assert code_table == documented_statuses()


#: What the fake server is told to do, and the status the web app must answer.
#: ``None``: no fault. Every documented row a fake server can produce is here.
WEB_CASES: list[tuple[str, Fault | None, dict[str, str], str, int]] = [
    ("sent", None, {}, "SendResult", 201),
    ("bad input", None, {"user": "a/b"}, "InvalidRequestError", 400),
    ("permanent FAILURE", Fault.PERMANENT_FAILURE, {}, "SendFailedError", 422),
    ("transient FAILURE", Fault.TRANSIENT_FAILURE, {}, "SendFailedError", 503),
    ("throttled", Fault.RATE_LIMITED, {}, "RateLimitedError", 503),
    ("dropped connection", Fault.DROP_BEFORE, {}, "DeliveryUnknownError", 502),
    ("answer lost", Fault.DROP_AFTER, {}, "DeliveryUnknownError", 502),
    ("502 from a proxy", Fault.HTTP_502, {}, "DeliveryUnknownError", 502),
    ("garbled answer", Fault.MALFORMED, {}, "DeliveryUnknownError", 502),
]


def test_web_cases_follow_the_table() -> None:
    """Each web case expects the status the page documents for its error."""
    documented = documented_statuses()
    for label, _, _, error, status in WEB_CASES:
        if error != "SendResult" and label != "transient FAILURE":  # its own line in prose
            assert documented[error] == status, label


async def _post(url: str, body: dict[str, str], key: str | None = None) -> tuple[int, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def _drive_aiohttp_app(
    namespace: dict[str, Any], server: FakeBotMessageServer
) -> list[tuple[str, int, Any]]:
    app: web.Application = namespace["make_app"]()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    seen = []
    try:
        for label, fault, override, _, _ in WEB_CASES:
            server.clear_faults()
            if fault is not None:
                server.inject(fault, times=None)
            body = {"department": DEPT, "user": USER, "text": f"hello ({label})"} | override
            status, answer = await _post(f"http://127.0.0.1:{port}/notify", body)
            seen.append((label, status, answer))
    finally:
        server.clear_faults()
        await runner.cleanup()
    return seen


def test_aiohttp_recipe_maps_errors_to_statuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The aiohttp.web recipe, served on loopback, answers each documented status."""
    with served(monkeypatch) as server:
        namespace = load_recipe("aiohttp-recipe", monkeypatch)
        seen = asyncio.run(_drive_aiohttp_app(namespace, server))
        assert [(label, status) for label, status, _ in seen] == [
            (label, status) for label, _, _, _, status in WEB_CASES
        ]
        # The one sent and the ambiguous ones reached the service; nothing was sent twice.
        assert server.duplicates == 0
        unknown = [answer for label, status, answer in seen if status == 502]
        assert all(a["outcome"] == "unknown" and a["idempotency_key"] for a in unknown)


def test_aiohttp_recipe_forwards_the_callers_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller's Idempotency-Key reaches the service, so the caller's retry dedupes."""
    with served(monkeypatch) as server:
        namespace = load_recipe("aiohttp-recipe", monkeypatch)

        async def twice() -> None:
            app: web.Application = namespace["make_app"]()
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/notify"
            body = {"department": DEPT, "user": USER, "text": "once"}
            key = "5d1b7f64-30c5-4a57-9d0e-0b8f6f0e6a11"
            try:
                assert (await _post(url, body, key))[0] == 201
                assert (await _post(url, body, key))[0] == 201
            finally:
                await runner.cleanup()

        asyncio.run(twice())
        assert [m.idempotency_key for m in server.messages] == [
            "5d1b7f64-30c5-4a57-9d0e-0b8f6f0e6a11"
        ]
        assert server.duplicates == 1


def test_aiohttp_recipe_refused_credentials_are_500(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own credentials refused is our fault, not the caller's: 500, per the table."""
    with served(monkeypatch):
        monkeypatch.setenv("BOTMSG_PASSWORD", "wrong")
        namespace = load_recipe("aiohttp-recipe", monkeypatch)

        async def once() -> int:
            app: web.Application = namespace["make_app"]()
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/notify"
            try:
                status, _ = await _post(url, {"department": DEPT, "user": USER, "text": "x"})
            finally:
                await runner.cleanup()
            return status

        assert asyncio.run(once()) == documented_statuses()["AuthenticationError"] == 500


def test_fastapi_recipe_maps_errors_to_statuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FastAPI recipe, with its lifespan run, answers each documented status."""
    import httpx

    with served(monkeypatch) as server:
        namespace = load_recipe("fastapi-recipe", monkeypatch)
        app = namespace["app"]

        async def drive() -> list[tuple[str, int]]:
            seen = []
            # The recipe's own lifespan (startup opens the client, shutdown closes it)
            # around the app, served in-process by httpx's ASGI transport.
            async with (
                namespace["lifespan"](app),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://app.test"
                ) as http,
            ):
                for label, fault, override, _, _ in WEB_CASES:
                    server.clear_faults()
                    if fault is not None:
                        server.inject(fault, times=None)
                    body = {"department": DEPT, "user": USER, "text": f"hi ({label})"} | override
                    seen.append((label, (await http.post("/notify", json=body)).status_code))
            server.clear_faults()
            assert app.state.botmsg.closed  # the lifespan's shutdown closed the client
            return seen

        assert asyncio.run(drive()) == [(label, status) for label, _, _, _, status in WEB_CASES]


# -- the queue worker: a real process, stopped by SIGTERM ----------------------------------


def test_queue_worker_stops_cleanly_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker recipe, as a process: sends what it is fed, then exits 0 on SIGTERM."""
    (script,) = named("queue-worker")
    path = tmp_path / "worker.py"
    path.write_text(script.code)
    with served(monkeypatch) as server:
        worker = subprocess.Popen(  # noqa: S603 - this interpreter, running the recipe
            [sys.executable, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        assert worker.stdin is not None
        assert worker.stdout is not None
        try:
            for n in range(5):
                job = {"department": DEPT, "user": USER, "text": f"job {n}"}
                worker.stdin.write(json.dumps(job) + "\n")
            worker.stdin.flush()
            # Each result is a line on stdout: wait for all five, then ask it to stop
            # while its input is still open (as a queue's would be).
            results = [json.loads(worker.stdout.readline()) for _ in range(5)]
            worker.send_signal(signal.SIGTERM)
            _, err = worker.communicate(timeout=60)
        finally:
            if worker.poll() is None:  # pragma: no cover - only when the test failed
                worker.kill()
                worker.wait()
        assert worker.returncode == 0, err
        assert [r["outcome"] for r in results] == ["sent"] * 5
        assert sorted(m.message.body for m in server.messages) == [f"job {n}" for n in range(5)]
        assert "stopped" in err
