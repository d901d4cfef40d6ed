"""Property tests: text survives the wire, ids never alter the path, any answer is handled."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from unittest.mock import patch
from urllib.parse import unquote

import pytest
from aioresponses import aioresponses
from aioresponses import core as aioresponses_core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from botmsg_async import (
    BotMessageClient,
    InvalidRequestError,
    InvalidResponseError,
    RetryPolicy,
    SendFailedError,
    SendResult,
    Status,
    TextMessage,
    _wire,
)
from botmsg_async._validate import check_id
from botmsg_async._wire import WireFormatError, decode_request, decode_response, encode_request

from ..conftest import _ShimmedResponse

BASE = "https://api.example.com"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
answer_like = st.fixed_dictionaries(
    {"status": st.sampled_from(["SUCCESS", "FAILURE", "success", "", None])},
    optional={
        "requestUuid": json_values,
        "messageUuid": json_values,
        "errors": json_values,
        "warnings": json_values,
    },
)


@settings(deadline=None)
@given(st.text(min_size=1).filter(str.strip))
def test_any_text_round_trips(body: str) -> None:
    """Any non-blank unicode text is encoded and read back exactly."""
    message = TextMessage(body, subject=body)
    wire = encode_request(message)
    assert json.loads(wire)["messageAttributes"]["body"] == body
    assert decode_request(wire) == message


@settings(deadline=None)
@given(st.text(max_size=40))
def test_ids_never_alter_the_path(identifier: str) -> None:
    """Any id is refused or encoded into exactly one path segment that decodes back to it."""
    try:
        encoded = check_id("user_uuid", identifier)
    except InvalidRequestError:
        return
    url = URL(f"{BASE}/communications/department/d/user/{encoded}/botmessage/send", encoded=True)
    segments = url.raw_path.split("/")
    assert segments[1:4] == ["communications", "department", "d"]
    assert segments[4] == "user"
    assert segments[6:] == ["botmessage", "send"]
    assert unquote(segments[5]) == identifier
    assert not url.raw_query_string
    assert not url.raw_fragment


@settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.one_of(json_values, answer_like))
async def test_any_json_answer_is_a_result_or_invalid_response(value: Any) -> None:
    """Whatever JSON a 200 carries, send returns a SendResult or raises one of our errors."""
    outcome: object
    with (
        patch.object(aioresponses_core, "ClientResponse", _ShimmedResponse),
        aioresponses() as mocked,
    ):
        mocked.post(re.compile(r"^https://api\.example\.com/.*$"), body=json.dumps(value))
        async with BotMessageClient(BASE, "u", "p", retry=RetryPolicy.none()) as client:
            try:
                outcome = await client.send("d", "u", "hi")
            except (InvalidResponseError, SendFailedError) as exc:
                outcome = exc
    if isinstance(outcome, InvalidResponseError):
        assert outcome.status == 200
    elif isinstance(outcome, SendFailedError):
        assert isinstance(outcome.result, SendResult)
    else:
        assert isinstance(outcome, SendResult)


def _loaders() -> list[Callable[[bytes | str], Any]]:
    loaders: list[Callable[[bytes | str], Any]] = [_wire._json_loads]
    try:
        import orjson
    except ImportError:  # pragma: no cover - the speed extra is absent
        return loaders
    return [*loaders, orjson.loads]


def _object_text(pairs: list[tuple[str, Any]], ascii_only: bool) -> str:
    """A JSON object written pair by pair, so that a key may appear twice."""
    return (
        "{"
        + ",".join(
            f"{json.dumps(k, ensure_ascii=ascii_only)}:{json.dumps(v, ensure_ascii=ascii_only)}"
            for k, v in pairs
        )
        + "}"
    )


def _outcome(body: bytes) -> object:
    try:
        return decode_response(body)
    except WireFormatError as exc:
        return ("WireFormatError", exc.problems)


# Only JSON proper (no Infinity), so that a body is refused for its repeat or not at all.
finite_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
finite_answer_like = st.fixed_dictionaries(
    {"status": st.sampled_from(["SUCCESS", "FAILURE", "success", "", None])},
    optional={
        "requestUuid": finite_json_values,
        "messageUuid": finite_json_values,
        "errors": finite_json_values,
        "warnings": finite_json_values,
    },
)


@st.composite
def with_a_repeated_key(draw: st.DrawFn, *, differing: bool) -> tuple[bytes, bytes]:
    """An answer-like object, written once plainly and once with one key repeated."""
    fields = draw(
        st.one_of(finite_answer_like, st.dictionaries(st.text(max_size=8), finite_json_values))
    )
    fields = {"status": "SUCCESS"} | fields if draw(st.booleans()) else fields
    pairs = list(fields.items())
    repeat_existing: bool = draw(st.booleans())
    if pairs and repeat_existing:
        key, first = pairs[draw(st.integers(0, len(pairs) - 1))]
    else:  # a key the object does not have yet
        key = draw(st.text(max_size=8).filter(lambda k: k not in fields))
        first = draw(finite_json_values)
        pairs.append((key, first))
    if differing:
        second = draw(finite_json_values.filter(lambda v: _canonical(v) != _canonical(first)))
    else:
        second = first
    at = draw(st.integers(0, len(pairs)))
    repeated = [*pairs[:at], (key, second), *pairs[at:]]
    ascii_only = draw(st.booleans())
    plain, doubled = _object_text(pairs, ascii_only), _object_text(repeated, ascii_only)
    if draw(st.booleans()):  # the same, one level down
        plain, doubled = (f'{{"status":"SUCCESS","x":{text}}}' for text in (plain, doubled))
    return plain.encode(), doubled.encode()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


@settings(deadline=None, max_examples=300)
@given(with_a_repeated_key(differing=True), st.sampled_from(_loaders()))
def test_a_key_twice_with_different_values_is_refused(
    bodies: tuple[bytes, bytes], loads: Callable[[bytes | str], Any]
) -> None:
    """Any JSON object holding one key twice with different values is a WireFormatError."""
    _, doubled = bodies
    with patch.object(_wire, "_loads", loads), pytest.raises(WireFormatError):
        decode_response(doubled)


@settings(deadline=None, max_examples=300)
@given(with_a_repeated_key(differing=False), st.sampled_from(_loaders()))
def test_a_key_twice_with_the_same_value_reads_as_once(
    bodies: tuple[bytes, bytes], loads: Callable[[bytes | str], Any]
) -> None:
    """A key repeated with the same value reads exactly as the object without the repeat."""
    plain, doubled = bodies
    with patch.object(_wire, "_loads", loads):
        assert _outcome(doubled) == _outcome(plain)


#: JSON both decoders read: finite floats, integers within 64 bits (orjson's range).
_readable_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(deadline=None, max_examples=200)
@given(
    st.fixed_dictionaries(
        {},
        optional=dict.fromkeys(
            ("requestUuid", "messageUuid", "errors", "warnings", "x"), _readable_values
        ),
    ),
    st.sampled_from(_loaders()),
)
def test_a_failure_answer_is_always_a_failure(
    value: dict[str, Any], loads: Callable[[bytes | str], Any]
) -> None:
    """Any JSON object whose status is FAILURE decodes to a FAILURE result, whatever its
    other fields hold (the status proves the refusal), with either decoder."""
    value = value | {"status": "FAILURE"}
    with patch.object(_wire, "_loads", loads):
        result = decode_response(json.dumps(value).encode())
    assert result.status is Status.FAILURE
    texts = [(e.code, e.description, e.uid) for e in result.errors]
    texts += [(w.code, w.description, None) for w in result.warnings]
    assert all(text is None or isinstance(text, str) for entry in texts for text in entry)
