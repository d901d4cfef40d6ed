"""The wire format, as unit tests: encode_request/decode_request/decode_response.

What a whole POST sends and what each answer becomes is in test_http.py.
"""

from __future__ import annotations

import json

import pytest

from botmsg_async import Status, TextMessage, _wire
from botmsg_async._wire import WireFormatError, decode_request, decode_response, encode_request


def test_encode_decode_request_round_trip() -> None:
    """Every field of a TextMessage survives encode_request/decode_request."""
    message = TextMessage(
        "b",
        subject="s",
        sender_name="n",
        recipient_communication_value="r@example.com",
        type="T",
        purpose="P",
        is_manual=False,
    )
    assert decode_request(encode_request(message)) == message


def test_decode_request_refuses_other_protocols() -> None:
    """The request reader refuses protocols other than TEXT and attachments."""
    body = json.dumps({"messageAttributes": {"body": "x", "protocol": "SMS"}}).encode()
    with pytest.raises(WireFormatError, match="TEXT"):
        decode_request(body)


def test_decode_response_reads_errors() -> None:
    """The response reader maps errorCode/errorDescription/errorUID."""
    result = decode_response(
        b'{"status":"FAILURE","errors":[{"errorCode":"C","errorDescription":"D","errorUID":"U"}]}'
    )
    assert (result.errors[0].code, result.errors[0].description, result.errors[0].uid) == (
        "C",
        "D",
        "U",
    )


@pytest.mark.parametrize(
    ("fields", "errors"),
    [
        ('"errors":[{"errorCode":1001,"errorDescription":"busy"}]', [("1001", "busy", None)]),
        (
            '"errors":[{"errorCode":"E","errorUID":7,"errorDescription":{"x":[1]}}]',
            [("E", '{"x":[1]}', "7")],
        ),
        ('"errors":{"errorCode":"E","errorDescription":"d"}', [("E", "d", None)]),
        (
            '"errors":"service temporarily unavailable"',
            [(None, "service temporarily unavailable", None)],
        ),
        (
            '"errors":["service temporarily unavailable"]',
            [(None, "service temporarily unavailable", None)],
        ),
        (
            '"errors":[null,3,true,[1]]',
            [(None, "3", None), (None, "true", None), (None, "[1]", None)],
        ),
        ('"errors":5', [(None, "5", None)]),
        ('"errors":[{"errorCode":"E"}],"requestUuid":12', [("E", None, None)]),
        ('"errors":[],"warnings":[{"warningCode":2}]', []),
    ],
)
def test_a_failure_is_a_failure_whatever_shape_its_errors_take(
    fields: str, errors: list[tuple[str | None, ...]]
) -> None:
    """ "status": "FAILURE" proves a refusal: errors of other types than the contract's
    are read as text, never turned into a WireFormatError (an unknown delivery)."""
    result = decode_response(f'{{"status":"FAILURE",{fields}}}'.encode())
    assert result.status is Status.FAILURE
    assert [(e.code, e.description, e.uid) for e in result.errors] == errors


def test_problems_name_wire_fields() -> None:
    """Problems point at the wire's camelCase names, nested ones included."""
    with pytest.raises(WireFormatError) as info:
        decode_response(b'{"status":"SUCCESS","requestUuid":1,"errors":[{"errorUID":2}]}')
    assert set(info.value.problems) == {
        "invalid value for type, expected str | None @ $.requestUuid",
        "invalid value for type, expected str | None @ $.errors.errorUID",
    }


def test_request_reader_refuses_unknown_keys() -> None:
    """A misspelt request key is an error on the request side (answers stay lenient)."""
    with pytest.raises(WireFormatError, match=r"sujbect.*\$\.messageAttributes"):
        decode_request(b'{"messageAttributes":{"body":"x","sujbect":"s"}}')


@pytest.mark.parametrize("body", [b"NaN", b'{"status":"SUCCESS","x":Infinity}'])
def test_non_json_constants_refused(body: bytes) -> None:
    """NaN and Infinity are not JSON, with or without orjson installed."""
    with pytest.raises(WireFormatError):
        decode_response(body)


@pytest.fixture(params=["orjson", "json"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each JSON decoder _wire may pick (orjson when installed, else json)."""
    name: str = request.param
    if name == "orjson":
        orjson = pytest.importorskip("orjson")
        monkeypatch.setattr(_wire, "_loads", orjson.loads)
    else:
        monkeypatch.setattr(_wire, "_loads", _wire._json_loads)
    return name


@pytest.mark.usefixtures("decoder")
@pytest.mark.parametrize(
    "body",
    [
        b'{"status":"FAILURE","requestUuid":"r","status":"SUCCESS"}',
        b'{"status":"SUCCESS","messageUuid":"m1","messageUuid":"m2"}',
        b'{"status":"FAILURE","st\\u0061tus":"SUCCESS"}',
        b'{"status":"SUCCESS","errors":[{"errorCode":"A","errorCode":"B"}]}',
        b'{"status":"SUCCESS","x":{"y":1,"y":true}}',
        b'{"status":"SUCCESS","x":1,"x":1.0}',
        '{"status":"SUCCESS","é":"a","é":"b"}'.encode(),
        '{"status":"FAILURE","status":"SUCCESS"}'.encode("utf-16"),
    ],
)
def test_conflicting_duplicate_keys_are_refused(body: bytes) -> None:
    """One key twice with different values (at any depth, however written) is a bad answer."""
    with pytest.raises(WireFormatError, match=r"ambiguous|not JSON"):
        decode_response(body)


@pytest.mark.usefixtures("decoder")
@pytest.mark.parametrize(
    "body",
    [
        b'{"status":"SUCCESS","status":"SUCCESS","messageUuid":"m"}',
        b'{"status":"SUCCESS","x":{"a":[1,{"b":null}]},"x":{"a":[1,{"b":null}]}}',
        b'{"status":"SUCCESS","requestUuid":"status","messageUuid":"status"}',
        b'{"status":"SUCCESS","errors":[],"warnings":[{"warningCode":"W"},{"warningCode":"W"}]}',
    ],
)
def test_same_value_twice_and_repeated_names_are_read(body: bytes) -> None:
    """A key repeated with the same value, or one name in several objects, is not refused."""
    assert decode_response(body).status is Status.SUCCESS


@pytest.mark.usefixtures("decoder")
def test_deep_nesting_is_a_bad_answer() -> None:
    """An answer nested past the decoder's depth is WireFormatError, not RecursionError."""
    with pytest.raises(WireFormatError):
        decode_response(b'{"status":"SUCCESS","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
