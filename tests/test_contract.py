"""The project's spec, the schema the package ships, the SDK's encoder and the fake server agree."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from typing import Any, Final

import aiohttp
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botmsg_async import TextMessage
from botmsg_async._wire import encode_request
from botmsg_async.testing import FakeBotMessageServer, Fault, _message_from_json

from .spec_schema import (
    REQUEST_SCHEMA,
    VENDOR_SPEC,
    _resolved,
    load_spec,
    render,
    request_schema,
)

SEND_PATH: Final = "/communications/department/{departmentUUID}/user/{userUUID}/botmessage/send"
OPTIONAL_FIELDS: Final = ("subject", "sender_name", "recipient_communication_value")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The project's spec, parsed."""
    return load_spec()


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    """The request schema the package ships."""
    schema: dict[str, Any] = json.loads(REQUEST_SCHEMA.read_text(encoding="utf-8"))
    return schema


@pytest.fixture(scope="module")
def validator(shipped: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator of the shipped request schema."""
    checker: jsonschema.protocols.Validator = jsonschema.Draft202012Validator(shipped)
    return checker


# -- the spec and the shipped schema ----------------------------------------------------


def test_shipped_schema_is_generated_from_the_spec(
    spec: dict[str, Any], shipped: dict[str, Any]
) -> None:
    """send-request.json is what the spec says (regenerate: python -m tests.spec_schema)."""
    assert shipped == request_schema(spec)
    assert REQUEST_SCHEMA.read_text(encoding="utf-8") == render(shipped)


def test_shipped_schema_is_a_valid_json_schema(shipped: dict[str, Any]) -> None:
    """The shipped schema passes its meta-schema, so the validator reads it as meant."""
    jsonschema.Draft202012Validator.check_schema(shipped)


def test_fake_server_validates_with_the_shipped_schema() -> None:
    """The fake server's validator holds exactly the schema file of the package."""
    server = FakeBotMessageServer()
    assert server._validator.schema == json.loads(REQUEST_SCHEMA.read_text(encoding="utf-8"))


def _without_assumptions(node: Any) -> Any:
    """``node`` with every marked assumption taken out (see the spec's header)."""
    if isinstance(node, list):
        return [_without_assumptions(item) for item in node if not _is_added(item)]
    if not isinstance(node, dict):
        return node
    added = set(node.get("x-botmsg-adds", ())) | {"x-botmsg-adds", "x-botmsg-assumption"}
    return {
        key: _without_assumptions(value)
        for key, value in node.items()
        if key not in added and not _is_added(value)
    }


def _is_added(node: Any) -> bool:
    return isinstance(node, dict) and "x-botmsg-assumption" in node and "x-botmsg-adds" not in node


def _marked(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, list):
        for item in node:
            yield from _marked(item)
    elif isinstance(node, dict):
        if "x-botmsg-assumption" in node or "x-botmsg-adds" in node:
            yield node
        for value in node.values():
            yield from _marked(value)


def test_spec_is_the_vendors_plus_marked_assumptions(spec: dict[str, Any]) -> None:
    """Taking out what is marked x-botmsg-assumption gives back the vendor's copy exactly."""
    assert _without_assumptions(spec) == load_spec(VENDOR_SPEC)


def test_every_assumption_says_why_and_names_real_keys(spec: dict[str, Any]) -> None:
    """Each marked node has a reason, and x-botmsg-adds lists keys the node has."""
    marked = list(_marked(spec))
    assert marked
    for node in marked:
        assert isinstance(node.get("x-botmsg-assumption"), str), node
        assert node["x-botmsg-assumption"].strip(), node
        assert set(node.get("x-botmsg-adds", ())) <= set(node), node


# -- the SDK's encoder against the shipped schema ------------------------------------------


def _message(present: tuple[str, ...], **fixed: Any) -> TextMessage:
    optional = {name: f"{name} text" for name in present}
    return TextMessage(
        "Hello",
        subject=optional.get("subject"),
        sender_name=optional.get("sender_name"),
        recipient_communication_value=optional.get("recipient_communication_value"),
        **fixed,
    )


COMBINATIONS: Final = [
    present
    for size in range(len(OPTIONAL_FIELDS) + 1)
    for present in itertools.combinations(OPTIONAL_FIELDS, size)
]


@pytest.mark.parametrize("is_manual", [True, False])
@pytest.mark.parametrize("present", COMBINATIONS, ids=lambda p: "+".join(p) or "none")
def test_encoded_requests_validate_for_every_optional_field_combination(
    validator: jsonschema.protocols.Validator, present: tuple[str, ...], is_manual: bool
) -> None:
    """encode_request's body is valid, whichever optional fields are set."""
    message = _message(present, is_manual=is_manual, type="OTHER", purpose="P")
    data = json.loads(encode_request(message))

    assert list(validator.iter_errors(data)) == []
    assert _message_from_json(data) == message


def _key_paths(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _key_paths(value, (*prefix, key))


FULL_BODY: Final = json.loads(encode_request(_message(OPTIONAL_FIELDS)))


@pytest.mark.parametrize("path", list(_key_paths(FULL_BODY)), ids="/".join)
def test_a_misspelt_name_fails_the_schema(
    validator: jsonschema.protocols.Validator, path: tuple[str, ...]
) -> None:
    """Renaming any key of a full request makes it invalid: a wrong camelCase name cannot pass."""
    body = copy.deepcopy(FULL_BODY)
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1].lower() + "_"] = parent.pop(path[-1])

    assert not validator.is_valid(body)


_TEXT: Final = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    body=_TEXT.filter(str.strip),
    subject=st.none() | _TEXT,
    sender_name=st.none() | _TEXT,
    recipient=st.none() | _TEXT,
    type_=_TEXT,
    purpose=_TEXT,
    is_manual=st.booleans(),
)
def test_any_sdk_message_validates_and_reads_back(
    validator: jsonschema.protocols.Validator,
    body: str,
    subject: str | None,
    sender_name: str | None,
    recipient: str | None,
    type_: str,
    purpose: str,
    is_manual: bool,
) -> None:
    """Any message the SDK would send is valid, and the fake server reads back that message."""
    message = TextMessage(
        body,
        subject=subject,
        sender_name=sender_name,
        recipient_communication_value=recipient,
        type=type_,
        purpose=purpose,
        is_manual=is_manual,
    )
    data = json.loads(encode_request(message))

    assert list(validator.iter_errors(data)) == []
    assert _message_from_json(data) == message


# -- what the fake server answers is what the spec documents --------------------------------


def _documented(spec: dict[str, Any], status: int) -> dict[str, Any] | None:
    responses: dict[str, Any] = spec["paths"][SEND_PATH]["post"]["responses"]
    found: dict[str, Any] | None = responses.get(str(status), responses.get(f"{status // 100}XX"))
    return found


def _check_documented(spec: dict[str, Any], status: int, content_type: str, body: bytes) -> None:
    response = _documented(spec, status)
    assert response is not None, f"HTTP {status} is not documented"
    media = response["content"].get(content_type)
    assert media is not None, f"HTTP {status} {content_type} is not documented"
    if content_type == "application/json":
        schema = _resolved(media["schema"], spec["components"]["schemas"])
        jsonschema.validate(json.loads(body), schema)


@pytest.mark.parametrize(
    "fault", [f for f in Fault if f not in (Fault.DROP_BEFORE, Fault.DROP_AFTER)]
)
async def test_every_fault_answer_is_documented(spec: dict[str, Any], fault: Fault) -> None:
    """Each fault's answer has a status, content type and body the spec documents."""
    async with FakeBotMessageServer(fault_latency=0.0) as server:
        server.inject(fault)
        auth = aiohttp.encode_basic_auth(server.username, server.password)
        async with (
            aiohttp.ClientSession(headers={"Authorization": auth}) as session,
            session.post(server.url("d", "u"), data=encode_request(TextMessage("hi"))) as answer,
        ):
            body = await answer.read()
            status, content_type = answer.status, answer.content_type

    if fault is Fault.MALFORMED:  # a cut-off body is the fault: only its status counts
        assert _documented(spec, status) is not None
        return
    _check_documented(spec, status, content_type, body)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"{}", {}),
        (b"nope", {}),
        (b'{"messageAttributes": {"body": " "}}', {}),
        (b'{"messageAttributes": {"body": "hi"}}', {"X-Retry-Count": "x"}),
        (b'{"messageAttributes": {"body": "hi"}}', {"Authorization": "Basic Ym90Ong="}),
    ],
    ids=["empty-object", "not-json", "blank-text", "bad-retry-count", "bad-credentials"],
)
async def test_every_refusal_is_documented(
    spec: dict[str, Any], body: bytes, headers: dict[str, str]
) -> None:
    """Refusals (400, 401, 422) have a status, content type and body the spec documents."""
    async with FakeBotMessageServer() as server:
        auth = aiohttp.encode_basic_auth(server.username, server.password)
        async with (
            aiohttp.ClientSession(headers={"Authorization": auth}) as session,
            session.post(server.url("d", "u"), data=body, headers=headers) as answer,
        ):
            answer_body = await answer.read()
            status, content_type = answer.status, answer.content_type

    assert status in (400, 401, 422)
    _check_documented(spec, status, content_type, answer_body)
