"""Misuse of the client and the command line gets an error that says what to do instead."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from botmsg_async import (
    BotMessageClient,
    DeliveryUnknownError,
    InvalidRequestError,
    Outcome,
    RetryPolicy,
    SendFailedError,
    SendResult,
    Status,
    WrongEventLoopError,
    check_base_url,
)
from botmsg_async._delivery import is_retryable, may_resend, outcome_of, stops_batch
from botmsg_async._http import session_loop
from botmsg_async.testing import FakeBotMessageServer, Fault, RequestInfo

from .conftest import (
    DEPT,
    PASSWORD,
    SUCCESS,
    USER,
    USERNAME,
    Handler,
    ScriptedServer,
    answer,
    drop,
    run_botmsg,
)

MakeClient = Callable[..., BotMessageClient]


async def _ok_then_close(request: web.Request) -> web.StreamResponse:
    """Answer SUCCESS and close the connection, so that no client pools it."""
    return web.json_response(SUCCESS, headers={"Connection": "close"})


@contextlib.contextmanager
def server_in_a_thread() -> Iterator[ScriptedServer]:
    """A scripted loopback server on its own loop in a thread: it outlives any asyncio.run."""
    loop = asyncio.new_event_loop()
    srv = ScriptedServer()
    srv.default = _ok_then_close
    loop.run_until_complete(srv.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_a_client_used_from_a_second_event_loop_says_so() -> None:
    """A client used in one asyncio.run, then another: WrongEventLoopError, nothing sent."""
    with server_in_a_thread() as srv:
        client = BotMessageClient(srv.base_url, USERNAME, PASSWORD)
        asyncio.run(client.send(DEPT, USER, "first"))
        assert len(srv.seen) == 1

        with pytest.raises(WrongEventLoopError, match=r"create one per loop, inside asyncio\.run"):
            asyncio.run(client.send(DEPT, USER, "second"))
        with pytest.raises(WrongEventLoopError, match="belongs to the event loop"):
            asyncio.run(client.send_many([(DEPT, USER, "third")]))
        assert len(srv.seen) == 1
        asyncio.run(client.aclose())


def test_a_client_opened_with_no_running_loop_says_so() -> None:
    """ensure_open() outside any event loop raises WrongEventLoopError, not aiohttp's error."""
    client = BotMessageClient("https://api.example.com", USERNAME, PASSWORD)
    with pytest.raises(WrongEventLoopError, match="no running event loop"):
        client.ensure_open()
    assert client._shared.session is None


async def _session_made_here() -> aiohttp.ClientSession:
    """An aiohttp session made on the running loop (as a caller's own would be)."""
    return aiohttp.ClientSession()


async def _use_for_send(client: BotMessageClient) -> None:
    """Use ``client`` for one send."""
    await client.send(DEPT, USER, "hi")


async def _use_for_send_many(client: BotMessageClient) -> None:
    """Use ``client`` for a batch of one."""
    await client.send_many([(DEPT, USER, "hi")])


async def _use_as_context(client: BotMessageClient) -> None:
    """Enter ``client`` as an async context manager."""
    async with client:
        pass


@pytest.mark.parametrize("use", [_use_for_send, _use_for_send_many, _use_as_context])
@pytest.mark.parametrize("session_loop", ["closed", "running in another thread"])
def test_a_lent_session_of_another_event_loop_says_so(
    use: Callable[[BotMessageClient], Any], session_loop: str
) -> None:
    """session= made on another loop (closed or alive): WrongEventLoopError, nothing sent."""
    with server_in_a_thread() as srv:
        other = asyncio.new_event_loop()
        thread = threading.Thread(target=other.run_forever, daemon=True)
        if session_loop == "closed":
            session = other.run_until_complete(_session_made_here())
        else:
            thread.start()
            session = asyncio.run_coroutine_threadsafe(_session_made_here(), other).result(30)
        try:
            client = BotMessageClient(srv.base_url, USERNAME, PASSWORD, session=session)
            with pytest.raises(WrongEventLoopError, match="session= belongs to another event"):
                asyncio.run(use(client))
            assert srv.seen == []
            assert not session.closed  # the caller's, as lent
        finally:
            if thread.is_alive():
                asyncio.run_coroutine_threadsafe(session.close(), other).result(30)
                other.call_soon_threadsafe(other.stop)
                thread.join(timeout=30)
            else:
                other.run_until_complete(session.close())
            other.close()


async def test_a_lent_session_of_the_running_loop_is_used(server: ScriptedServer) -> None:
    """session= made on the running loop: no false alarm, and the loop aiohttp keeps is seen."""
    async with aiohttp.ClientSession() as session:
        # Pins the attribute read in place of aiohttp's deprecated ClientSession.loop:
        # if an aiohttp release drops it, the check above degrades to none, and this says so.
        assert session_loop(session) is asyncio.get_running_loop()
        async with BotMessageClient(server.base_url, USERNAME, PASSWORD, session=session) as c:
            await c.send(DEPT, USER, "hi")
    assert len(server.seen) == 1


def test_a_second_event_loop_is_classified_like_a_closed_client() -> None:
    """Not retried, stops a batch, SKIPPED before any attempt, may be sent by a later run."""
    error = WrongEventLoopError("second loop")
    assert not is_retryable(error, retry_ambiguous=True)
    assert stops_batch(error)
    assert outcome_of(error, attempts=0) is Outcome.SKIPPED
    assert may_resend(error)


def _drop_and_collect(clients: list[BotMessageClient]) -> None:
    """Drop the last references to ``clients`` and collect them (a client is in a cycle)."""
    clients.clear()
    gc.collect()


def test_a_client_dropped_unclosed_warns_naming_itself() -> None:
    """A client that sent and is garbage-collected unclosed emits our ResourceWarning."""
    with server_in_a_thread() as srv:
        clients = [BotMessageClient(srv.base_url, USERNAME, PASSWORD)]
        asyncio.run(clients[0].send(DEPT, USER, "hello"))
    ours_only = r"unclosed <BotMessageClient .*aclose\(\)"
    # aiohttp warns about its own session too; that one is not under test here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unclosed (client session|connector)", ResourceWarning)
        with pytest.warns(ResourceWarning, match=ours_only) as seen:
            _drop_and_collect(clients)
    ours = [w for w in seen if "BotMessageClient" in str(w.message)]
    assert len(ours) == 1
    assert "async with" in str(ours[0].message)


async def test_a_client_closed_unused_or_lent_a_session_does_not_warn() -> None:
    """No warning for a client never used, one closed, or one whose session is the caller's."""
    never_used = BotMessageClient("https://api.example.com", USERNAME, PASSWORD)
    closed = BotMessageClient("https://api.example.com", USERNAME, PASSWORD)
    closed.ensure_open()
    await closed.aclose()
    async with aiohttp.ClientSession() as session:
        lent = BotMessageClient("https://api.example.com", USERNAME, PASSWORD, session=session)
        lent.ensure_open()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            del never_used, closed, lent
            gc.collect()
    assert [str(w.message) for w in seen] == []


def test_a_client_whose_init_failed_does_not_warn() -> None:
    """A half-built client (refused arguments) is collected without a warning or an error."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(InvalidRequestError):
            BotMessageClient("ftp://example.com", USERNAME, PASSWORD)
        gc.collect()
    assert [str(w.message) for w in seen] == []


@pytest.mark.parametrize(
    ("base_url", "drop"),
    [
        ("https://api.example.com/communications", "/communications"),
        ("https://api.example.com/gw/communications/", "/communications"),
        ("https://api.example.com/gw/Communications", "/Communications"),
        ("https://api.example.com/communications/department", "/communications/department"),
        (
            f"https://api.example.com/gw/communications/department/{DEPT}/user/{USER}"
            "/botmessage/send",
            f"/communications/department/{DEPT}/user/{USER}/botmessage/send",
        ),
        ("https://api.example.com/gw/botmessage/send", "/botmessage/send"),
    ],
)
def test_a_base_url_with_the_endpoint_path_is_refused_with_a_hint(base_url: str, drop: str) -> None:
    """A base_url that already holds /communications... is refused up front, saying what to drop."""
    for check in (
        lambda: check_base_url(base_url),
        lambda: BotMessageClient(base_url, USERNAME, PASSWORD),
    ):
        with pytest.raises(InvalidRequestError) as caught:
            check()
        assert caught.value.field == "base_url"
        assert "base_url is what comes before /communications" in str(caught.value)
        assert f"drop {drop!r}" in str(caught.value)


@pytest.mark.parametrize(
    "base_url",
    [
        "https://api.example.com",
        "https://api.example.com/gw/",
        "https://api.example.com/communications-api",
        "https://api.example.com/communications/v2",
        "https://api.example.com/botmessage",
    ],
)
def test_a_gateway_prefix_is_not_mistaken_for_the_endpoint(base_url: str) -> None:
    """Prefixes that only resemble the endpoint's path are accepted."""
    assert str(check_base_url(base_url)) == base_url.rstrip("/")


@pytest.mark.parametrize(
    ("username", "password", "field"),
    [
        (None, PASSWORD, "username"),
        (USERNAME, None, "password"),
        (USERNAME, b"secret-bytes", "password"),
        (42, None, "username"),
    ],
)
def test_a_credential_of_the_wrong_type_names_its_own_field(
    username: object, password: object, field: str
) -> None:
    """username=None names username, password=None names password; neither value is echoed."""
    with pytest.raises(InvalidRequestError) as caught:
        BotMessageClient("https://api.example.com", username, password)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert caught.value.value == "<redacted>"
    assert "secret-bytes" not in str(caught.value)
    assert PASSWORD not in str(caught.value)


UNKNOWN_ADVICE = (
    "check with the recipient before sending it again (a resend is safe only under the "
    "same idempotency key, and only if the service deduplicates by it)"
)


@pytest.mark.parametrize(
    ("script", "retry_ambiguous"),
    [
        ([answer(500, "boom")], False),
        ([answer(303, "")], False),
        ([answer(200, "{not json")], False),
        ([drop], False),
        ([answer(500, "boom"), answer(404, "nope")], True),  # built by the client's _settled
    ],
    ids=["500", "303", "bad-body", "dropped", "500-then-404"],
)
async def test_an_unknown_delivery_says_what_to_do_next(
    server: ScriptedServer,
    make_client: MakeClient,
    script: list[Handler],
    retry_ambiguous: bool,
) -> None:
    """Every DeliveryUnknownError the client raises ends with the advice on resending."""
    server.script = list(script)
    policy = RetryPolicy(retry_ambiguous=retry_ambiguous)
    async with make_client(server.base_url, retry=policy) as client:
        with pytest.raises(DeliveryUnknownError) as caught:
            await client.send(DEPT, USER, "hello")
    assert caught.value.message.endswith(UNKNOWN_ADVICE)
    assert caught.value.message.count(UNKNOWN_ADVICE) == 1


def test_a_failure_without_errors_says_the_service_gave_no_reason() -> None:
    """A FAILURE with an empty errors list says so in plain words."""
    error = SendFailedError(SendResult(Status.FAILURE, errors=()), transient=False)
    assert "the service gave no reason" in str(error)
    assert "no error given" not in str(error)


@pytest.mark.parametrize("with_files", [True, False], ids=["out-and-journal", "bare"])
async def test_the_cli_summary_says_how_to_look_at_unknown_items(
    tmp_path: Path, with_files: bool
) -> None:
    """An unknown item: the summary names --out, outcome unknown and --resend-unknown."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(
            json.dumps({"department_uuid": DEPT, "user_uuid": f"user-{i}", "text": "hi"}) + "\n"
            for i in range(3)
        ),
        encoding="utf-8",
    )
    out, journal = tmp_path / "out.jsonl", tmp_path / "journal"
    files = ["--out", str(out), "--journal", str(journal)] if with_files else []

    def user_1(request: RequestInfo) -> bool:
        return request.user_uuid == "user-1"

    async with FakeBotMessageServer(username=USERNAME, password=PASSWORD) as fake:
        fake.inject(Fault.HTTP_500, when=user_1)
        rc, _, err = await run_botmsg(
            "send-many",
            str(source),
            *files,
            base_url=fake.base_url,
            username=USERNAME,
            password=PASSWORD,
        )
    assert rc == 3, err
    assert "1 item(s) may or may not have been delivered" in err
    assert "--resend-unknown" in err
    assert "under the same idempotency key" in err
    assert "deduplicates by Idempotency-Key, which its spec does not document" in err
    if with_files:
        assert f'the lines of {out} with "outcome": "unknown"' in err
        assert f"--journal {journal} --resume --resend-unknown" in err
    else:
        assert 'rerun with --out FILE to list them (outcome "unknown")' in err
    assert PASSWORD not in err


@pytest.mark.parametrize("command", ["send", "send-many"])
async def test_the_cli_http_refusal_names_its_flag(tmp_path: Path, command: str) -> None:
    """http:// to a remote host is refused naming --allow-insecure-http, not the SDK argument."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"department_uuid": DEPT, "user_uuid": USER, "text": "hi"}) + "\n")
    args = (
        ["send", "--department", DEPT, "--user", USER, "--text", "hi"]
        if command == "send"
        else ["send-many", str(source)]
    )
    rc, out, err = await run_botmsg(
        *args, base_url="http://api.example.com", username=USERNAME, password=PASSWORD
    )
    assert rc == 2, err
    assert "pass --allow-insecure-http" in err
    assert "allow_insecure_http=True" not in err
    assert PASSWORD not in err + out


async def test_the_cli_out_error_is_an_object_like_send_prints(tmp_path: Path) -> None:
    """--out's error is {type, message, status}, from this run and replayed from the journal."""
    lines = [
        {"department_uuid": DEPT, "user_uuid": "user-ok", "text": "hi"},
        {"department_uuid": DEPT, "user_uuid": "user-500", "text": "hi"},
        {"department_uuid": DEPT, "user_uuid": "user-refused", "text": "hi"},
        {"department_uuid": DEPT, "user_uuid": "user-bad"},  # no text: invalid
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    journal = tmp_path / "journal"
    faults = {"user-500": Fault.HTTP_500, "user-refused": Fault.PERMANENT_FAILURE}

    def faulty(fault: Fault) -> Callable[[RequestInfo], bool]:
        return lambda request: faults.get(request.user_uuid) is fault

    async with FakeBotMessageServer(username=USERNAME, password=PASSWORD) as fake:
        for fault in faults.values():
            fake.inject(fault, when=faulty(fault))
        runs = []
        for n, extra in enumerate((["--skip-invalid"], ["--skip-invalid", "--resume"])):
            out = tmp_path / f"out-{n}.jsonl"
            runs.append(out)
            rc, _, err = await run_botmsg(
                "send-many",
                str(source),
                "--journal",
                str(journal),
                "--out",
                str(out),
                *extra,
                base_url=fake.base_url,
                username=USERNAME,
                password=PASSWORD,
            )
            assert rc == 3, err
    first, replayed = (
        {r["user_uuid"]: r for r in map(json.loads, out.read_text().splitlines())} for out in runs
    )
    assert first["user-ok"]["error"] is None
    assert first["user-500"]["error"]["type"] == "ServerError"
    assert first["user-500"]["error"]["status"] == 500
    assert first["user-500"]["error"]["message"].startswith("HTTP 500")
    assert first["user-refused"]["error"]["type"] == "SendFailedError"
    assert first["user-refused"]["error"]["status"] is None
    assert first["user-bad"]["error"]["type"] == "InvalidRequestError"
    assert "invalid input at line 4" in first["user-bad"]["error"]["message"]
    # Replayed from the journal, which keeps the text alone: same type and message.
    for user in ("user-500", "user-refused"):
        assert replayed[user]["error"]["type"] == first[user]["error"]["type"]
        assert replayed[user]["error"]["message"] == first[user]["error"]["message"]
    # The journal itself still records the error as text.
    recorded = [json.loads(line).get("e") for line in journal.read_text().splitlines()]
    assert any(isinstance(e, str) and e.startswith("ServerError: HTTP 500") for e in recorded)


@pytest.mark.parametrize("user_agent", ["bot\r\nX-Evil: 1", "bot\nx", "bot\x00"])
def test_a_user_agent_that_cannot_be_a_header_value_is_refused_up_front(user_agent: str) -> None:
    """user_agent= with CR, LF or NUL: InvalidRequestError at construction, not at send."""
    with pytest.raises(InvalidRequestError) as info:
        BotMessageClient("https://api.example.com", USERNAME, PASSWORD, user_agent=user_agent)
    assert info.value.field == "user_agent"


@pytest.mark.parametrize(
    ("field", "username", "password"),
    [
        ("username", "bot:1", "pw"),
        # A lone surrogate: what os.environ makes of bytes that are not UTF-8.
        ("username", "b\udcffot", "pw"),
        ("password", "bot", "p\udcffw"),
        ("password", "bot", "\ud800"),
    ],
)
def test_credentials_that_cannot_be_sent_name_their_own_field(
    field: str, username: str, password: str
) -> None:
    """A user name with ':' or either credential with a lone surrogate (not UTF-8): the
    error names that field and says why, and echoes neither."""
    with pytest.raises(InvalidRequestError) as info:
        BotMessageClient("https://api.example.com", username, password)
    assert info.value.field == field
    if ":" not in username:
        assert "':'" not in str(info.value)
        assert "UTF-8" in str(info.value)
    for secret in (username, password):
        assert secret not in str(info.value)
        assert secret not in repr(info.value.args)


_BAD_POLICIES = [
    RetryPolicy(idempotency_header="Idem\r\nX-Evil: 1"),
    RetryPolicy(idempotency_header="Idem key"),
    RetryPolicy(idempotency_header=""),
    RetryPolicy(idempotency_header="Authorization"),
    RetryPolicy(retry_count_header="X-Retry\n"),
    RetryPolicy(idempotency_header="X-Key", retry_count_header="X-Key"),
    RetryPolicy(idempotency_header="X-Key", retry_count_header="x-key"),
]


@pytest.mark.parametrize("policy", _BAD_POLICIES)
async def test_a_policy_whose_headers_cannot_be_sent_is_refused_before_io(
    server: ScriptedServer, policy: RetryPolicy
) -> None:
    """A policy's header names that are no tokens, the client's own, or one name twice
    (the retry count would replace the key): InvalidRequestError, whichever way the
    policy is given, and nothing reaches the server."""
    with pytest.raises(InvalidRequestError):
        BotMessageClient(server.base_url, USERNAME, PASSWORD, retry=policy)
    async with BotMessageClient(server.base_url, USERNAME, PASSWORD) as client:
        with pytest.raises(InvalidRequestError):
            await client.send(DEPT, USER, "hi", retry=policy)
        with pytest.raises(InvalidRequestError):
            client.with_options(retry=policy)
        with pytest.raises(InvalidRequestError):
            await client.send_many([(DEPT, USER, "hi")], retry=policy)
    assert server.seen == []
