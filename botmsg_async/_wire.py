"""The wire format: one private cattrs converter between our models and the JSON.

All wire knowledge lives here: the camelCase names, the nesting of the request
into ``messageAttributes`` / ``messageSendingAttributes``, the fixed ``protocol``
and attachment count, and leaving out optional fields that are ``None``.
Responses are read leniently where the contract allows (unknown fields are
ignored, missing optional ones default, ``null`` lists are empty) and strictly
where it matters (``status`` must be SUCCESS or FAILURE; strings must be strings),
but for a FAILURE: its status alone proves the refusal, so its other fields are
read as text whatever their types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from types import UnionType
from typing import Any, Union, get_args, get_origin

import attrs
import cattrs
from attrs import define, evolve
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.json import make_converter

from ._models import (
    NO_HEADERS,
    ApiError,
    ApiWarning,
    MessageDefaults,
    SendResult,
    Status,
    TextMessage,
    success_result,
)

__all__ = [
    "PlainTextEncoder",
    "WireFormatError",
    "converter",
    "decode_request",
    "decode_response",
    "encode_request",
]


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _refuse_constant(name: str) -> Any:
    # orjson refuses NaN and Infinity; the fallback must read the same JSON.
    raise ValueError(f"{name} is not JSON")


def _json_loads(body: bytes | str) -> Any:
    return json.loads(body, parse_constant=_refuse_constant)


# json's C scanner recurses per nesting level: a deep answer ([[[[...) raises
# RecursionError, which is a bad answer like any other (orjson stops at 1024).
_DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, UnicodeDecodeError, RecursionError)

try:  # The `speed` extra: orjson encodes several times faster than json.
    import orjson

    _dumps: Callable[[Any], bytes] = orjson.dumps
    _loads: Callable[[bytes | str], Any] = orjson.loads
except ImportError:  # pragma: no cover - exercised when the extra is absent
    _dumps = _json_dumps
    _loads = _json_loads


# The wire shapes are built for every send and never shared: plain (not frozen)
# attrs classes, since a frozen one's __init__ costs three times as much.
@define
class _MessageAttributes:
    body: str
    type: str = "DRAFT"
    purpose: str = "F"
    is_manual: bool = True
    subject: str | None = None
    protocol: str = "TEXT"
    number_of_message_attachments: int = 0


@define
class _MessageSendingAttributes:
    recipient_communication_value: str | None = None
    sender_name: str | None = None


@define
class _SendBotMessageRequest:
    message_attributes: _MessageAttributes
    message_sending_attributes: _MessageSendingAttributes | None = None


def _strict_str(value: object, _: object) -> str:
    # cattrs' default would turn 123 or {} into a string; a wrong type is a bad answer.
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _strict_optional_str(value: object, _: object) -> str | None:
    # Registered for ``str | None`` directly: cattrs' generic Optional hook
    # dispatches on the inner type on every call, a cost paid per answer field.
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"expected a string or null, got {type(value).__name__}")


_STATUSES = {status.value: status for status in Status}


def _status(value: object, _: object) -> Status:
    try:
        return _STATUSES[value]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"{value!r} is not a valid Status") from None


def _strict_bool(value: object, _: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _strict_int(value: object, _: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


#: Every name that differs between a model field and the wire, per class.
_RENAMES: dict[type, dict[str, str]] = {
    _MessageAttributes: {
        "is_manual": "isManual",
        "number_of_message_attachments": "numberOfMessageAttachments",
    },
    _MessageSendingAttributes: {
        "recipient_communication_value": "recipientCommunicationValue",
        "sender_name": "senderName",
    },
    _SendBotMessageRequest: {
        "message_attributes": "messageAttributes",
        "message_sending_attributes": "messageSendingAttributes",
    },
    ApiError: {"code": "errorCode", "description": "errorDescription", "uid": "errorUID"},
    ApiWarning: {"code": "warningCode", "description": "warningDescription"},
    SendResult: {"request_uuid": "requestUuid", "message_uuid": "messageUuid"},
}
#: Request fields always sent, even at their default value.
_ALWAYS_SENT = ("body", "type", "purpose", "is_manual", "protocol", "number_of_message_attachments")


def _renamed(cls: type, **extra: Any) -> dict[str, Any]:
    overrides = {name: override(rename=wire) for name, wire in _RENAMES[cls].items()}
    return overrides | extra


def _structure_fn(
    cls: type, conv: cattrs.Converter, overrides: dict[str, Any], *, strict: bool
) -> Callable[[Any, Any], Any]:
    return make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=strict, **overrides)


def _unstructure_fn(
    cls: type, conv: cattrs.Converter, overrides: dict[str, Any]
) -> Callable[[Any], dict[str, Any]]:
    return make_dict_unstructure_fn(cls, conv, _cattrs_omit_if_default=True, **overrides)


def _make_converter() -> cattrs.Converter:
    conv = make_converter(detailed_validation=True, forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(str | None, _strict_optional_str)
    conv.register_structure_hook(Status, _status)

    # Request side: nested camelCase, None left out, protocol/attachments always sent.
    for cls in (_MessageAttributes, _MessageSendingAttributes, _SendBotMessageRequest):
        keep = {
            name: override(rename=_RENAMES[cls].get(name), omit_if_default=False)
            for name in _ALWAYS_SENT
            if cls is _MessageAttributes
        }
        conv.register_unstructure_hook(cls, _unstructure_fn(cls, conv, _renamed(cls, **keep)))
        # Read back strictly (the fake server validates requests with this): an
        # unknown key there is a typo in the client, not forward compatibility.
        conv.register_structure_hook(cls, _structure_fn(cls, conv, _renamed(cls), strict=True))

    # Response side: unknown keys are ignored, so the service may add fields.
    for answer_part in (ApiError, ApiWarning):
        conv.register_structure_hook(
            answer_part, _structure_fn(answer_part, conv, _renamed(answer_part), strict=False)
        )

    def _null_is_empty(item_type: type[Any]) -> Callable[[object, object], tuple[Any, ...]]:
        # Some gateways send "errors": null where the contract has an array.
        def hook(value: object, _: object) -> tuple[Any, ...]:
            if value is None or value == []:  # the common answer: nothing to report
                return ()
            if not isinstance(value, list):
                raise TypeError(f"expected an array, got {type(value).__name__}")
            # An entry that is a bare string is its description (not an empty entry,
            # as the structure hook would read it: it tests `"errorCode" in "text"`).
            return tuple(
                item_type(description=v) if isinstance(v, str) else conv.structure(v, item_type)
                for v in value
            )

        return hook

    result_overrides = _renamed(
        SendResult,
        errors=override(struct_hook=_null_is_empty(ApiError)),
        warnings=override(struct_hook=_null_is_empty(ApiWarning)),
        # What the client knows of the exchange, never read from the body.
        attempts=override(omit=True),
        http_status=override(omit=True),
        elapsed=override(omit=True),
        headers=override(omit=True),
    )
    conv.register_structure_hook(
        SendResult, _structure_fn(SendResult, conv, result_overrides, strict=False)
    )
    return conv


def _wire_path(root: type, path: str) -> str:
    """Turn cattrs' ``$.message_attributes.is_manual`` into ``$.messageAttributes.isManual``."""
    parts = []
    current: Any = root
    for token in re.findall(r"\.([^.\[]+)|(\[[^\]]*\])", path):
        name, index = token
        if index:
            parts.append(index)
            args = [a for a in get_args(current) if a is not Ellipsis]
            current = args[0] if args else None
            continue
        if get_origin(current) in (tuple, list):  # our null-tolerant hook drops the index
            current = get_args(current)[0]
        parts.append("." + _RENAMES.get(current, {}).get(name, name))
        fields = attrs.fields_dict(current) if attrs.has(current) else {}
        current = fields[name].type if name in fields else None
        if get_origin(current) in (UnionType, Union):  # X | None: follow X
            current = next((a for a in get_args(current) if a is not type(None)), None)
    return "$" + "".join(parts)


def _problems(exc: Exception, root: type) -> tuple[str, ...]:
    def wire_named(message: str) -> str:
        text, sep, path = message.rpartition(" @ ")
        return f"{text}{sep}{_wire_path(root, path)}" if sep else message

    return tuple(wire_named(m) for m in cattrs.transform_error(exc))


#: The one converter between models and wire. Private: never the global cattrs one.
converter = _make_converter()
_unstructure_request = converter.get_unstructure_hook(_SendBotMessageRequest)
_structure_result = converter.get_structure_hook(SendResult)
_structure_request = converter.get_structure_hook(_SendBotMessageRequest)


def encode_request(message: TextMessage) -> bytes:
    """Encode ``message`` as the JSON body of a send request."""
    sending = (
        None
        if message.recipient_communication_value is None and message.sender_name is None
        else _MessageSendingAttributes(
            recipient_communication_value=message.recipient_communication_value,
            sender_name=message.sender_name,
        )
    )
    wire = _SendBotMessageRequest(
        _MessageAttributes(
            body=message.body,
            type=message.type,
            purpose=message.purpose,
            is_manual=message.is_manual,
            subject=message.subject,
        ),
        sending,
    )
    return _dumps(_unstructure_request(wire))


class PlainTextEncoder:
    """``encode_request`` of a plain-string message under fixed defaults, without the converter.

    Only the body differs between two such requests, and it is the first field
    of the JSON, so the bytes around it are worked out once: a request is the
    prefix, the body as a JSON string, and the suffix. That skips building a
    ``TextMessage``, the wire shapes and their unstructuring (about 5 µs a
    message); the output is byte for byte the converter's (a property test
    holds it to that), and a body the encoder refuses (a lone surrogate) is
    refused the same way.

    Raises:
        ValueError: the defaults cannot be encoded, or the converter's output
            does not start with the body (then there is no fast path to take).
    """

    __slots__ = ("_prefix", "_suffix")

    _HEAD = b'{"messageAttributes":{"body":'

    def __init__(self, defaults: MessageDefaults) -> None:
        try:
            whole = encode_request(defaults.message(""))
        except (TypeError, ValueError, UnicodeError) as exc:  # a default UTF-8 cannot carry
            raise ValueError(f"defaults cannot be encoded: {exc}") from None
        if not whole.startswith(self._HEAD + b'""'):
            raise ValueError("the body is not the request's first field")
        self._prefix = self._HEAD
        self._suffix = whole[len(self._HEAD) + 2 :]

    def __call__(self, body: str) -> bytes:
        """The request body for the text ``body``."""
        return b"".join((self._prefix, _dumps(body), self._suffix))


class WireFormatError(ValueError):
    """A body that does not match the contract; ``problems`` says where."""

    def __init__(self, problems: tuple[str, ...]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _string_count(data: dict[str, Any]) -> int:
    """How many JSON strings ``data`` holds: every key, and every string value."""
    # The top level by itself: an answer is usually flat (strings, nulls, empty lists).
    count = len(data)
    pending: list[Any] = []
    for item in data.values():
        if type(item) is str:
            count += 1
        elif (type(item) is dict or type(item) is list) and item:
            pending.append(item)
    while pending:
        value = pending.pop()
        if type(value) is dict:
            count += len(value)
            value = value.values()
        for item in value:
            if type(item) is str:
                count += 1
            elif type(item) is dict or type(item) is list:
                pending.append(item)
    return count


def _may_repeat_a_key(body: bytes, data: dict[str, Any]) -> bool:
    """Whether an object in ``body`` may hold a key twice; False only when none does.

    Every JSON string in the body is delimited by two quote bytes; other quote
    bytes (an escaped ``\\"``, or the wider encodings UTF-16 and UTF-32, which
    json also reads) only add to the count. A key written twice leaves its pair
    out of ``data``, so the body then has more quotes than ``data`` has strings:
    equality proves that no key was dropped, escapes (``\\u00e9``) or not.
    """
    return body.count(b'"') != 2 * _string_count(data)


class _ConflictingKeyError(ValueError):
    """A JSON object holds one key twice with different values."""


def _same_json(a: object, b: object) -> bool:
    # Python's == takes 1, 1.0 and true for one value; the JSON texts tell them apart.
    return a == b and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result and not _same_json(result[key], value):
            # The key is not quoted: it is the server's text (it could echo a
            # credential), and a repr would escape it past the CLI's redaction.
            raise _ConflictingKeyError("a key appears twice with different values")
        result[key] = value
    return result


def _check_duplicate_keys(body: bytes, data: dict[str, Any]) -> None:
    """Refuse a body with one key twice at different values: which one counts is a guess.

    Both decoders keep the last value, so ``{"status": "FAILURE", ..., "status":
    "SUCCESS"}`` would read as a success. The exact check decodes again with a
    hook on every object, so it runs only when the cheap scan cannot rule it out.
    """
    if not _may_repeat_a_key(body, data):
        return
    try:
        json.loads(body, object_pairs_hook=_unique_pairs, parse_constant=_refuse_constant)
    except _ConflictingKeyError as exc:
        raise WireFormatError((f"ambiguous JSON: {exc}",)) from exc
    except _DECODE_ERRORS as exc:  # read by orjson but not by json: not the documented JSON
        raise WireFormatError((f"not JSON: {exc}",)) from exc


def _load_object(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``; anything else (or an ambiguous one) is refused."""
    try:
        data = _loads(body)
    except _DECODE_ERRORS as exc:
        raise WireFormatError((f"not JSON: {exc}",)) from exc
    if not isinstance(data, dict):
        raise WireFormatError((f"expected a JSON object, got {type(data).__name__}",))
    _check_duplicate_keys(body, data)
    return data


def _parse(body: bytes, hook: Callable[[Any, Any], Any], cls: type[Any]) -> Any:
    data = _load_object(body)
    try:
        return hook(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        raise WireFormatError(_problems(exc, cls)) from exc


def _plain_success(
    data: dict[str, Any],
    http_status: int | None,
    elapsed: float | None,
    headers: Mapping[str, str],
) -> SendResult | None:
    """The ``SendResult`` of a plain SUCCESS answer, as the converter reads it; else None.

    Plain: ``status`` SUCCESS, each id a string, null or absent, and no errors
    or warnings (absent, null or ``[]``); other keys are ignored, as the
    converter ignores them. Anything else returns None and takes the full path,
    which also words the errors. Most answers are plain, and this reads them in
    a fraction of the converter's time (a property test holds the two to the
    same results).
    """
    if data.get("status") != "SUCCESS":
        return None
    request_uuid = data.get("requestUuid")
    message_uuid = data.get("messageUuid")
    errors = data.get("errors")
    warnings = data.get("warnings")
    if (
        (request_uuid is None or type(request_uuid) is str)
        and (message_uuid is None or type(message_uuid) is str)
        and (errors is None or errors == [])
        and (warnings is None or warnings == [])
    ):
        return success_result(request_uuid, message_uuid, http_status, elapsed, headers)
    return None


def _as_text(value: object) -> str | None:
    """A field of a FAILURE answer as text: a string as it is, null as None, else its JSON."""
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError):  # a number or nesting json will not write back
        return f"<{type(value).__name__}>"


def _entries(value: object, names: tuple[str, ...]) -> list[tuple[str | None, ...]]:
    """The fields ``names`` of each entry of an ``errors``/``warnings`` value, as text.

    An array's entries, or the value itself as the one entry; an object entry gives
    its fields, any other the text of it as the description (the second field).
    """
    items = value if isinstance(value, list) else [value]
    entries: list[tuple[str | None, ...]] = []
    for item in items:
        if isinstance(item, dict):
            entries.append(tuple(_as_text(item.get(name)) for name in names))
        elif item is not None:
            entries.append((None, _as_text(item), *(None,) * (len(names) - 2)))
    return entries


def _lenient_failure(
    data: dict[str, Any],
    http_status: int | None,
    elapsed: float | None,
    headers: Mapping[str, str],
) -> SendResult | None:
    """A FAILURE answer whose other fields are not the documented types, read leniently.

    ``"status": "FAILURE"`` alone proves the service refused the message: an
    error code that is a number, an ``errors`` that is an object or holds
    strings, say what went wrong in a shape the contract does not name, and
    must not turn a refusal into "unknown". Each such field is kept as text
    (its JSON), so that ``RetryPolicy`` can still classify the failure (an
    ``errorCode`` of 1001 matches ``transient_error_codes={"1001"}``). Any other
    status returns None.
    """
    if data.get("status") != "FAILURE":
        return None
    return SendResult(
        Status.FAILURE,
        request_uuid=_as_text(data.get("requestUuid")),
        message_uuid=_as_text(data.get("messageUuid")),
        errors=tuple(
            ApiError(*fields)
            for fields in _entries(
                data.get("errors"), ("errorCode", "errorDescription", "errorUID")
            )
        ),
        warnings=tuple(
            ApiWarning(*fields)
            for fields in _entries(data.get("warnings"), ("warningCode", "warningDescription"))
        ),
        http_status=http_status,
        elapsed=elapsed,
        headers=headers,
    )


def decode_response(
    body: bytes,
    http_status: int | None = None,
    elapsed: float | None = None,
    headers: Mapping[str, str] = NO_HEADERS,
) -> SendResult:
    """Parse a send answer into a ``SendResult`` that carries its exchange.

    ``http_status``, ``elapsed`` and ``headers`` are what the client knows of the
    exchange the answer came in (a body cannot set them); left out, the result is
    as the body alone says.

    A FAILURE answer is a FAILURE whatever the types of its other fields (see
    ``_lenient_failure``); any other answer must match the contract.

    Raises:
        WireFormatError: the body is not the documented JSON object.
    """
    data = _load_object(body)
    # The usual answer is built once, with its exchange (no copy per message).
    plain = _plain_success(data, http_status, elapsed, headers)
    if plain is not None:
        return plain
    try:
        result: SendResult = _structure_result(data, SendResult)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        failure = _lenient_failure(data, http_status, elapsed, headers)
        if failure is not None:
            return failure
        raise WireFormatError(_problems(exc, SendResult)) from exc
    if http_status is None and elapsed is None and headers is NO_HEADERS:
        return result
    return evolve(result, http_status=http_status, elapsed=elapsed, headers=headers)


def decode_request(body: bytes) -> TextMessage:
    """Parse a send request body back into a ``TextMessage`` (for the fake server).

    Raises:
        WireFormatError: the body does not match the request schema, or asks for
            something the service does not support (a protocol other than TEXT,
            attachments).
    """
    wire: _SendBotMessageRequest = _parse(body, _structure_request, _SendBotMessageRequest)
    attrs_ = wire.message_attributes
    if attrs_.protocol != "TEXT":
        raise WireFormatError(
            (f"$.messageAttributes.protocol: only TEXT is supported, got {attrs_.protocol!r}",)
        )
    if attrs_.number_of_message_attachments != 0:
        raise WireFormatError(("$.messageAttributes.numberOfMessageAttachments: must be 0",))
    sending = wire.message_sending_attributes or _MessageSendingAttributes()
    return TextMessage(
        attrs_.body,
        subject=attrs_.subject,
        sender_name=sending.sender_name,
        recipient_communication_value=sending.recipient_communication_value,
        type=attrs_.type,
        purpose=attrs_.purpose,
        is_manual=attrs_.is_manual,
    )
