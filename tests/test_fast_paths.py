"""The per-message fast paths hold to the slow paths they stand in for: keys, encoding, answers."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botmsg_async import (
    ApiError,
    ApiWarning,
    BatchReport,
    BotMessageClient,
    Counts,
    InvalidRequestError,
    ItemResult,
    MessageDefaults,
    Outcome,
    SendRequest,
    SendResult,
    Status,
    _client,
    _validate,
    _wire,
)
from botmsg_async._batch import BatchOptions, BatchStream, collect
from botmsg_async._report import ItemResults
from botmsg_async._validate import check_message, message_encoder, new_idempotency_key

from .conftest import SUCCESS, ScriptedServer

MakeClient = Callable[..., BotMessageClient]

# -- idempotency keys ------------------------------------------------------------


def _is_uuid4_text(key: str) -> bool:
    parsed = uuid.UUID(key)
    return parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == key


def test_keys_are_uuid4_text_with_version_and_variant_bits() -> None:
    """Every key is canonical UUID4 text: version 4, RFC 4122 variant, lower-case hex."""
    keys = [new_idempotency_key() for _ in range(5000)]
    assert all(_is_uuid4_text(key) for key in keys)
    assert len(set(keys)) == len(keys)


def test_one_urandom_call_serves_many_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are cut from one os.urandom call per 256, not one system call each."""
    calls: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counting)
    source = _validate._KeySource()
    keys = [source.take() for _ in range(512)]
    assert calls == [16 * 256, 16 * 256]
    assert len(set(keys)) == 512
    assert all(_is_uuid4_text(key) for key in keys)


def test_every_bit_but_version_and_variant_is_random() -> None:
    """The fixed bits are exactly the UUID4 ones: each other hex digit takes many values."""
    keys = [new_idempotency_key().replace("-", "") for _ in range(2000)]
    for position in range(32):
        digits = {key[position] for key in keys}
        if position == 12:
            assert digits == {"4"}
        elif position == 16:
            assert digits == set("89ab")
        else:
            assert len(digits) == 16, position


def test_threads_never_get_the_same_key() -> None:
    """Many threads taking keys at once from one source get distinct keys, none lost."""
    source = _validate._KeySource(batch=4)  # a tiny batch: refills race all the time
    per_thread = 2000
    results: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(len(results))

    def take(out: list[str]) -> None:
        start.wait()
        out.extend(source.take() for _ in range(per_thread))

    threads = [threading.Thread(target=take, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    keys = [key for out in results for key in out]
    assert len(keys) == len(set(keys)) == per_thread * len(results)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_reuses_the_parents_buffered_keys() -> None:
    """After fork, the child draws fresh random bytes: it never hands out the parent's next keys."""
    new_idempotency_key()  # the buffer now holds keys the parent will hand out next
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # 3.12+ warns about fork in a process with threads; this child only writes and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write_end, ",".join(new_idempotency_key() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_keys = set(pipe.read().decode().split(","))
    os.waitpid(pid, 0)
    parent_keys = {new_idempotency_key() for _ in range(300)}
    assert len(child_keys) == 10
    assert all(_is_uuid4_text(key) for key in child_keys)
    assert not child_keys & parent_keys


# -- encoding: the plain-text fast path -----------------------------------------------

#: Any text, lone surrogates included (st.text() leaves them out by default).
ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60)
TRICKY_TEXT = st.sampled_from(
    ["", " ", "\x00", '"', "\\", "\u2028", "\ud800", "a\udfffb", "é\n\t\r\x7f", "😀", "</script>"]
)
DEFAULTS = st.builds(
    MessageDefaults,
    type=st.sampled_from(["DRAFT", "NOTE", 'q"uote']),
    purpose=st.sampled_from(["F", "X"]),
    is_manual=st.booleans(),
    sender_name=st.none() | ANY_TEXT,
    subject=st.none() | ANY_TEXT,
)


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """What ``call`` returns, or which error it raises and how it reads."""
    try:
        return ("ok", call())
    except InvalidRequestError as exc:
        return ("invalid", (str(exc), exc.args))
    except (TypeError, ValueError) as exc:  # orjson's JSONEncodeError, UnicodeEncodeError
        return ("refused", type(exc))


@pytest.mark.parametrize("dumps", ["orjson", "json"])
@settings(deadline=None, max_examples=300)
@given(text=ANY_TEXT | TRICKY_TEXT, defaults=st.just(MessageDefaults()) | DEFAULTS)
def test_plain_text_encoder_is_byte_identical_to_the_converter(
    dumps: str, text: str, defaults: MessageDefaults
) -> None:
    """Prefix + encoded text + suffix is exactly the converter's JSON, and refuses what it does."""
    chosen = pytest.importorskip("orjson").dumps if dumps == "orjson" else _wire._json_dumps
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_wire, "_dumps", chosen)
        try:
            encoder = _wire.PlainTextEncoder(defaults)
        except ValueError:
            # Only defaults the encoder itself refuses (a lone surrogate) have no fast path.
            assert _outcome(lambda: _wire.encode_request(defaults.message("x")))[0] == "refused"
            return
        fast = _outcome(lambda: encoder(text))
        slow = _outcome(lambda: _wire.encode_request(defaults.message(text)))
    assert fast == slow


@settings(deadline=None, max_examples=300)
@given(
    message=ANY_TEXT | TRICKY_TEXT | st.integers() | st.none(),
    defaults=st.just(MessageDefaults()) | DEFAULTS,
    limit=st.sampled_from([1, 8, 64, 1 << 20]),
)
def test_message_encoder_checks_and_encodes_as_check_message_does(
    message: object, defaults: MessageDefaults, limit: int
) -> None:
    """The client's encoder gives the bytes and errors of encode_request(check_message(...))."""
    fast = _outcome(lambda: message_encoder(defaults, limit)(message))
    slow = _outcome(lambda: _wire.encode_request(check_message(message, defaults, limit)))
    assert fast == slow


def test_plain_strings_skip_the_converter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain string under valid defaults never reaches encode_request (the fast path is taken)."""
    encode = message_encoder(MessageDefaults(subject="Hi"))
    monkeypatch.setattr(_validate, "encode_request", None)  # would raise if called
    assert encode("hello").startswith(b'{"messageAttributes":{"body":"hello",')


# -- answers: the plain SUCCESS path ---------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "errorCode": st.none() | st.text(max_size=5) | st.integers(),
        "errorDescription": st.none() | st.text(max_size=5),
        "warningCode": st.none() | st.text(max_size=5),
    },
)
ANSWERS = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["SUCCESS", "FAILURE", "success", ""]) | JSON_SCALARS,
        "requestUuid": st.none() | st.text(max_size=8) | JSON_VALUES,
        "messageUuid": st.none() | st.text(max_size=8) | JSON_VALUES,
        "errors": st.none() | st.just([]) | st.lists(ENTRY, max_size=2) | JSON_VALUES,
        "warnings": st.none() | st.just([]) | st.lists(ENTRY, max_size=2) | JSON_VALUES,
        "attempts": JSON_VALUES,
        "extra": JSON_VALUES,
    },
)


def _decoded(decode: Callable[[bytes], SendResult], body: bytes) -> tuple[str, Any]:
    try:
        return ("ok", decode(body))
    except _wire.WireFormatError as exc:
        return ("error", exc.problems)


def _full_path(body: bytes) -> SendResult:
    # decode_response without its fast path: the converter (and a FAILURE's leniency).
    with mock.patch.object(_wire, "_plain_success", return_value=None):
        return _wire.decode_response(body)


@settings(deadline=None, max_examples=500)
@given(answer=ANSWERS)
def test_plain_success_path_reads_answers_as_the_converter_does(answer: dict[str, Any]) -> None:
    """Over any answer shape, decode_response's results and errors equal the cattrs path's."""
    import json

    body = json.dumps(answer).encode()
    assert _decoded(_wire.decode_response, body) == _decoded(_full_path, body)


def test_a_plain_success_skips_the_converter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common answer (SUCCESS, two ids, empty lists) is read without cattrs."""
    monkeypatch.setattr(_wire, "_structure_result", None)  # would raise if called
    body = b'{"requestUuid":"r","status":"SUCCESS","messageUuid":"m","errors":[],"warnings":[]}'
    result = _wire.decode_response(body)
    assert (result.request_uuid, result.message_uuid, result.errors) == ("r", "m", ())


_OPTIONAL_TEXT = st.none() | st.text(max_size=40)


@settings(deadline=None, max_examples=300)
@given(
    request_uuid=_OPTIONAL_TEXT,
    message_uuid=_OPTIONAL_TEXT,
    http_status=st.none() | st.integers(100, 599),
    elapsed=st.none() | st.floats(allow_nan=False),
    headers=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)
def test_success_result_is_the_attrs_built_result_field_by_field(
    request_uuid: str | None,
    message_uuid: str | None,
    http_status: int | None,
    elapsed: float | None,
    headers: dict[str, str],
) -> None:
    """success_result sets every field (those outside == too) as SendResult(...) does."""
    import attrs

    from botmsg_async._models import ResponseHeaders, success_result

    kept = ResponseHeaders(headers)
    fast = success_result(request_uuid, message_uuid, http_status, elapsed, kept)
    built = SendResult(
        Status.SUCCESS,
        request_uuid=request_uuid,
        message_uuid=message_uuid,
        http_status=http_status,
        elapsed=elapsed,
        headers=kept,
    )
    assert type(fast) is SendResult
    for field in attrs.fields(SendResult):
        assert getattr(fast, field.name) == getattr(built, field.name), field.name
    assert fast == built
    assert hash(fast) == hash(built)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast.attempts = 2  # type: ignore[misc]


@settings(deadline=None, max_examples=300)
@given(answer=ANSWERS, http_status=st.integers(200, 299), elapsed=st.floats(0, 10))
def test_an_answer_carries_its_exchange_on_either_path(
    answer: dict[str, Any], http_status: int, elapsed: float
) -> None:
    """decode_response's result holds the status, time and headers given, plain answer or not."""
    import json

    from botmsg_async._models import ResponseHeaders

    headers = ResponseHeaders({"x-request-id": "abc"})
    body = json.dumps(answer).encode()
    try:
        result = _wire.decode_response(body, http_status, elapsed, headers)
    except _wire.WireFormatError:
        return
    assert (result.http_status, result.elapsed, result.headers) == (http_status, elapsed, headers)
    assert result == _full_path(body)


# -- batch bookkeeping and compact reports ----------------------------------------------


def _items(n: int, departments: int = 3) -> list[tuple[str, str, str]]:
    return [(f"dept-{i % departments}", f"user-{i}", "hello") for i in range(n)]


async def test_a_kept_report_leaves_no_object_per_item_for_the_collector(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """keep="all" results hold no GC-tracked object per item (a list of ItemResult held two)."""
    async with make_client(server.base_url) as client:
        report = await client.send_many(_items(1000), concurrency=16)
    assert report.sent == 1000
    gc.collect()
    before = len(gc.get_objects())
    del report
    gc.collect()
    assert before - len(gc.get_objects()) < 100


async def test_no_item_result_is_built_for_a_report_until_read(
    server: ScriptedServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_many without on_result builds no ItemResult per item; reading builds equal ones."""
    built: list[int] = []
    real_init = ItemResult.__init__

    def counting(self: ItemResult, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ItemResult, "__init__", counting)
    async with make_client(server.base_url) as client:
        report = await client.send_many(_items(200), concurrency=8)
    assert built == []
    first = report.results[0]
    assert (first.index, first.user_uuid, first.outcome) == (0, "user-0", Outcome.SENT)
    assert first.result is not None
    assert first.result.message_uuid == SUCCESS["messageUuid"]
    assert len(built) == 1


async def test_tuple_items_build_a_send_request_only_for_on_start(
    server: ScriptedServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SendRequest per tuple item is built only when on_start needs one, equal to before."""
    built: list[int] = []
    real_init = SendRequest.__init__

    def counting(self: SendRequest, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(SendRequest, "__init__", counting)
    started: list[tuple[int, SendRequest]] = []
    async with make_client(server.base_url) as client:
        await client.send_many(_items(50), concurrency=4)
        assert built == []
        await client.send_many(
            _items(5), concurrency=1, on_start=lambda i, r: started.append((i, r))
        )
    assert started == [(i, SendRequest(*item)) for i, item in enumerate(_items(5))]


async def test_a_plain_iterator_is_read_without_a_coroutine_per_item(
    server: ScriptedServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items of a plain iterable are pulled inline; the async pull is for async iterables."""

    async def no_pull(self: BatchStream) -> None:
        raise AssertionError("a plain iterator went through _pull")

    monkeypatch.setattr(BatchStream, "_pull", no_pull)
    async with make_client(server.base_url) as client:
        report = await client.send_many(iter(_items(100)), concurrency=8)
    assert report.sent == 100
    assert [r.user_uuid for r in report.results] == [f"user-{i}" for i in range(100)]


class _InstantSender:
    """A Sender whose every send succeeds at once, without yielding to the loop."""

    result = SendResult(Status.SUCCESS, message_uuid="m", attempts=1)

    async def send(
        self,
        department_uuid: str,
        user_uuid: str,
        message: object,
        *,
        retry: object = None,
        idempotency_key: str | None = None,
    ) -> SendResult:
        return self.result

    def ensure_open(self) -> None:
        pass

    def pause_remaining(self) -> float:
        return 0.0

    async def wait_out_pause(self) -> None:
        pass


async def test_an_async_source_that_waited_once_costs_no_wake_up_per_item() -> None:
    """After an async source waits once, items are not handed over through a task wake-up each."""
    n = 1000

    async def source() -> AsyncIterator[tuple[str, str, str]]:
        await asyncio.sleep(0)  # every worker now waits for the source
        for item in _items(n):
            yield item

    turns = 0
    stream = BatchStream(_InstantSender(), source(), BatchOptions(concurrency=8))
    batch = asyncio.ensure_future(collect(stream, keep="none"))
    while not batch.done():
        turns += 1
        await asyncio.sleep(0)
    report = await batch
    assert report.counts.sent == n
    # A fair lock made each item wait for a loop turn (about n turns).
    assert turns < n // 10


async def test_a_department_id_is_checked_once_while_it_repeats(
    server: ScriptedServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same department is checked once in a row; a bad one after a good one is refused."""
    checked: list[object] = []
    real = _validate.check_id

    def counting(name: str, value: object) -> str:
        if name == "department_uuid":
            checked.append(value)
        return real(name, value)

    monkeypatch.setattr(_client, "check_id", counting)
    async with make_client(server.base_url) as client:
        for user in ("u1", "u2", "u3"):
            await client.send("dept-1", user, "hello")
        with pytest.raises(InvalidRequestError, match="department_uuid"):
            await client.send("dept/1", "u4", "hello")
        await client.send(uuid.UUID(int=7), "u5", "hello")
        await client.send(uuid.UUID(int=7), "u6", "hello")
    assert checked == ["dept-1", "dept/1", str(uuid.UUID(int=7))]
    assert len(server.seen) == 5


OUTCOMES = st.sampled_from(list(Outcome))
SEND_RESULTS = st.builds(
    SendResult,
    st.sampled_from(list(Status)),
    request_uuid=st.none() | st.text(max_size=5),
    message_uuid=st.none() | st.text(max_size=5),
    errors=st.lists(st.builds(ApiError, code=st.none() | st.text(max_size=3)), max_size=2).map(
        tuple
    ),
    warnings=st.lists(st.builds(ApiWarning), max_size=1).map(tuple),
    attempts=st.integers(1, 5),
)


@st.composite
def item_results(draw: st.DrawFn) -> list[ItemResult]:
    """ItemResults with distinct indexes, in a random order (as a batch completes them)."""
    indexes = draw(st.lists(st.integers(0, 10_000), unique=True, max_size=30))
    return [
        ItemResult(
            index,
            draw(st.text(max_size=4)),
            draw(st.text(max_size=4)),
            draw(OUTCOMES),
            result=draw(st.none() | SEND_RESULTS),
            error=draw(st.none() | st.builds(InvalidRequestError, st.just("item"), st.integers())),
        )
        for index in indexes
    ]


@settings(deadline=None, max_examples=200)
@given(items=item_results(), data=st.data())
def test_item_results_read_as_the_sorted_list_they_replace(
    items: list[ItemResult], data: st.DataObject
) -> None:
    """ItemResults reads back as the list of ItemResult sorted by index: items, slices, errors."""
    results = ItemResults(items)
    expected = sorted(items, key=lambda r: r.index)
    assert list(results) == expected
    assert results == expected
    assert results != tuple(expected)
    assert len(results) == len(expected)
    assert repr(results) == repr(expected)
    for r in expected:
        assert results.index(r) == expected.index(r)
    if expected:
        i = data.draw(st.integers(-len(expected), len(expected) - 1))
        assert results[i] == expected[i]
        assert results[i].error is expected[i].error
    start, stop = data.draw(st.integers(-40, 40)), data.draw(st.integers(-40, 40))
    assert results[start:stop] == expected[start:stop]
    with pytest.raises(IndexError):
        results[len(expected)]


def test_a_report_accepts_a_plain_list_of_results() -> None:
    """BatchReport(results=[...]) still takes a list, as built by hand."""
    item = ItemResult(0, "d", "u", Outcome.SKIPPED)
    report = BatchReport(results=[item], counts=Counts(skipped=1), retries=0, elapsed=0.0)
    assert report.results == [item]
    assert report.results == ItemResults([item])
