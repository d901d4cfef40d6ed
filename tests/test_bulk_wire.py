"""What a parallel send's parent hands its workers: the same requests, cheaper to carry."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from botmsg_async import InvalidRequestError, MessageDefaults, TextMessage
from botmsg_async._validate import message_encoder
from botmsg_async.bulk import WorkItem, _message_of, _to_wire

_DEPT = "5b0e8a4c-2f6d-4c1a-9e3b-7d8f0a1b2c3d"
_USER = "00000000-0000-4000-8000-000000000001"
# A worker's client is built without message_defaults: this is how it encodes a message.
_ENCODE = message_encoder(MessageDefaults())


def _carried(message: str | TextMessage) -> str | TextMessage:
    """The message as a worker rebuilds it from the wire."""
    return _message_of(_to_wire(WorkItem(3, _DEPT, _USER, message, "k" * 20))[3])


def _encoded(message: object) -> bytes | str:
    try:
        return _ENCODE(message)
    except InvalidRequestError as exc:
        return f"{exc.field}: {exc.problem}"


def test_a_row_with_only_a_text_travels_as_a_plain_string() -> None:
    """A send-many row without subject or sender reaches the worker as a str (the fast path)."""
    assert _carried(TextMessage("Your parcel has arrived")) == "Your parcel has arrived"
    assert isinstance(_carried(TextMessage("hi", subject="s")), TextMessage)


_TEXT = st.text(max_size=40)
_OPTIONAL = st.none() | _TEXT


@settings(deadline=None, max_examples=300)
@given(
    body=_TEXT,
    subject=_OPTIONAL,
    sender_name=_OPTIONAL,
    value=_OPTIONAL,
    kind=st.sampled_from(["DRAFT", "OTHER", ""]),
    purpose=st.sampled_from(["F", "G"]),
    manual=st.booleans(),
)
def test_a_worker_sends_the_same_bytes_as_the_message_given(
    body: str,
    subject: str | None,
    sender_name: str | None,
    value: str | None,
    kind: str,
    purpose: str,
    manual: bool,
) -> None:
    """Whatever the message, the worker's client encodes (or refuses) it as the caller's would."""
    message = TextMessage(
        body,
        subject=subject,
        sender_name=sender_name,
        recipient_communication_value=value,
        type=kind,
        purpose=purpose,
        is_manual=manual,
    )
    assert _encoded(_carried(message)) == _encoded(message)
    assert _encoded(_carried(body)) == _encoded(body)
