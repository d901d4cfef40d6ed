"""The send guard's JSON records, without Redis: round trips, conflicts, total parsing."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botmsg_async import (
    APIStatusError,
    BotMessageClient,
    BotMessageError,
    CoordinationError,
    DeliveryUnknownError,
    IdempotencyConflictError,
    InvalidRequestError,
    ResponseLostError,
    SendFailedError,
    SendResult,
    Status,
)
from botmsg_async._guard import (
    check_guard,
    claim_record,
    fingerprint,
    outcome_record,
    read_record,
    settle,
)
from botmsg_async._models import ApiError, ApiWarning

FP = fingerprint("d", "u", b'{"body":"hi"}')


def _read(raw: str | bytes, fp: str = FP) -> SendResult:
    result = read_record(raw, "k", fp, "d", "u")
    assert result is not None  # no token given: no claim is this reader's own
    return result


def test_fingerprints_tell_messages_apart() -> None:
    """Department, user and body each change the fingerprint; parts cannot run together."""
    assert fingerprint("d", "u", b"x") == fingerprint("d", "u", b"x")
    assert len({fingerprint("d", "u", b"x"), fingerprint("e", "u", b"x")}) == 2
    assert fingerprint("d", "u", b"x") != fingerprint("d", "ux", b"")
    assert fingerprint("ab", "c", b"") != fingerprint("a", "bc", b"")


def test_a_sent_result_round_trips() -> None:
    """The recorded SendResult comes back equal, errors and warnings included."""
    result = SendResult(
        Status.SUCCESS,
        request_uuid="r",
        message_uuid="m",
        errors=(ApiError("E", None, "uid"),),
        warnings=(ApiWarning("W", "w"),),
        attempts=3,
    )
    assert _read(outcome_record(FP, result, None)) == result


@pytest.mark.parametrize(
    "error",
    [
        SendFailedError(
            SendResult(Status.FAILURE, errors=(ApiError("INVALID_USER", "no"),)), transient=False
        ),
        APIStatusError("not found", status=404, body_excerpt="nope"),
        BotMessageError("something else"),
    ],
    ids=["final FAILURE", "404", "other"],
)
def test_a_recorded_failure_is_raised_again(error: BotMessageError) -> None:
    """A recorded final error is rebuilt in the error tree, for the same message."""
    with pytest.raises(type(error)) as raised:
        _read(outcome_record(FP, None, error))
    assert (raised.value.department_uuid, raised.value.user_uuid) == ("d", "u")
    if isinstance(error, SendFailedError):
        assert isinstance(raised.value, SendFailedError)
        assert raised.value.result == error.result
    if isinstance(error, APIStatusError):
        assert isinstance(raised.value, APIStatusError)
        assert raised.value.status == 404


@pytest.mark.parametrize(
    "raw",
    [claim_record(FP), outcome_record(FP, None, ResponseLostError("lost"))],
    ids=["claim without outcome", "unknown outcome"],
)
def test_claims_and_unknown_outcomes_are_unknown(raw: str) -> None:
    """A claim with no outcome, or an unknown one, is DeliveryUnknownError with the key."""
    with pytest.raises(DeliveryUnknownError) as raised:
        _read(raw)
    assert raised.value.idempotency_key == "k"


def test_another_message_under_the_key_is_a_conflict() -> None:
    """A record for another fingerprint is refused as IdempotencyConflictError."""
    with pytest.raises(IdempotencyConflictError, match="different message"):
        _read(outcome_record(FP, SendResult(Status.SUCCESS), None), fp="other")


@settings(deadline=None, max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["v", "fp", "state", "result", "error", "status", "type"]),
                    inner,
                    max_size=6,
                )
            ),
            max_leaves=20,
        ).map(json.dumps),
    )
)
def test_reading_any_record_is_total(raw: str | bytes) -> None:
    """Whatever is stored under a key, reading it returns a result or a BotMessageError."""
    with contextlib.suppress(BotMessageError):
        _read(raw)


@settings(deadline=None, max_examples=100)
@given(st.sampled_from(["sent", "failed", "unknown", "claimed"]), st.data())
def test_a_mangled_but_valid_json_record_never_passes_for_another(
    state: str, data: st.DataObject
) -> None:
    """A record whose fields have the wrong types is 'unknown' (never resent), not a crash."""
    record = {"v": 1, "fp": FP, "state": state}
    record[data.draw(st.sampled_from(["result", "error"]))] = data.draw(
        st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3))
    )
    with pytest.raises(DeliveryUnknownError):
        _read(json.dumps(record))


class _BrokenGuard:
    async def claim(
        self, key: str, fp: str, department: str, user: str, *, token: str
    ) -> SendResult | None:
        return None

    async def record(
        self,
        key: str,
        fp: str,
        result: SendResult | None,
        error: BotMessageError | None,
        *,
        token: str,
    ) -> None:
        raise CoordinationError("down")

    async def release(self, key: str, fp: str, *, token: str) -> None:
        raise CoordinationError("down")


async def test_a_store_failure_after_the_send_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Recording fails after a send: the send's outcome stands; the key stays in doubt."""
    with caplog.at_level(logging.WARNING, logger="botmsg_async"):
        await settle(_BrokenGuard(), "k", FP, "tok", SendResult(Status.SUCCESS), None)
    assert "delivery is unknown" in caplog.text


@pytest.mark.usefixtures("broken_log_handler")
async def test_a_store_failure_logged_to_a_raising_handler_is_not_raised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Recording fails and the handler of its warning raises: settle still returns."""
    await settle(_BrokenGuard(), "k", FP, "tok", SendResult(Status.SUCCESS), None)
    assert "the handler broke" in capsys.readouterr().err


def test_importing_the_package_does_not_import_redis() -> None:
    """Without the extra in use, nothing imports redis (the in-process path is unchanged)."""
    code = "import sys, botmsg_async; sys.exit('redis' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)  # noqa: S603


@pytest.mark.parametrize(
    ("stored", "own"),
    [("mine", True), ("theirs", False), (None, False), (7, False), ("", False)],
    ids=["own token", "another token", "no token (older writer)", "not text", "empty"],
)
def test_only_a_claim_with_this_senders_token_is_its_own(stored: object, own: bool) -> None:
    """A claim is the reader's own (send now) only when it carries the reader's token."""
    data: dict[str, object] = {"v": 1, "state": "claimed", "fp": FP}
    if stored is not None:
        data["tok"] = stored
    raw = json.dumps(data)
    if own:
        assert read_record(raw, "k", FP, "d", "u", token="mine") is None
        assert raw == claim_record(FP, "mine")
    else:
        with pytest.raises(DeliveryUnknownError, match="claimed"):
            read_record(raw, "k", FP, "d", "u", token="mine")
    # Whatever the token, a claim for another message stays a conflict.
    with pytest.raises(IdempotencyConflictError):
        read_record(raw, "k", fingerprint("d", "u", b"other"), "d", "u", token="mine")


class _OldGuard:
    """A guard written to the protocol before claims carried a token."""

    async def claim(self, key: str, fp: str, department: str, user: str) -> SendResult | None:
        return None

    async def record(
        self, key: str, fp: str, result: SendResult | None, error: BotMessageError | None
    ) -> None:
        return None

    async def release(self, key: str, fp: str) -> None:
        return None


class _KeywordsGuard(_OldGuard):
    """A guard whose methods take any keyword (a wrapper's usual shape)."""

    async def claim(
        self, key: str, fp: str, department: str, user: str, **options: object
    ) -> SendResult | None:
        return None

    async def record(
        self,
        key: str,
        fp: str,
        result: SendResult | None,
        error: BotMessageError | None,
        **options: object,
    ) -> None:
        return None

    async def release(self, key: str, fp: str, **options: object) -> None:
        return None


def test_a_guard_without_token_is_refused_before_any_io() -> None:
    """A guard of the old protocol is an InvalidRequestError naming send_guard, not a TypeError."""
    with pytest.raises(InvalidRequestError, match="token=") as caught:
        BotMessageClient("https://api.example.com", "u", "p", send_guard=_OldGuard())  # type: ignore[arg-type]
    assert caught.value.field == "send_guard"
    with pytest.raises(InvalidRequestError, match="no claim"):
        check_guard(object())
    for guard in (_BrokenGuard(), _KeywordsGuard()):
        check_guard(guard)  # takes token=: accepted
