"""Property tests: text survives the wire, ids never alter the path, any answer is handled."""

from __future__ import annotations

import json
import re
from typing import Any
from unittest.mock import patch
from urllib.parse import unquote

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
    TextMessage,
)
from botmsg_async._client import check_id
from botmsg_async._wire import decode_request, encode_request

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


@given(st.text(min_size=1).filter(str.strip))
def test_any_text_round_trips(body: str) -> None:
    """Any non-blank unicode text is encoded and read back exactly."""
    message = TextMessage(body, subject=body)
    wire = encode_request(message)
    assert json.loads(wire)["messageAttributes"]["body"] == body
    assert decode_request(wire) == message


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


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
