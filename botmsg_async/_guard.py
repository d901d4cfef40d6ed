"""At-most-once sends across processes: the send-guard protocol and its record format.

``BotMessageClient(send_guard=...)`` hands every send that carries a caller's
``idempotency_key`` to a ``SendGuard``: the first sender of a key claims it,
sends, and records the outcome; any later send of that key (another worker, a
job queue's redelivery) gets the recorded outcome back instead of sending.
Whether a key is freed or recorded after a failure is ``_delivery``'s call
(``releases_claim``). The records are JSON, built and read here, so every
store (Redis in ``botmsg_async.shared``, others later) writes the same format.
No I/O and no third-party import here.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import secrets
from typing import Any, Protocol

from ._delivery import releases_claim
from ._errors import (
    APIStatusError,
    BotMessageError,
    DeliveryUnknownError,
    IdempotencyConflictError,
    InvalidRequestError,
    SendFailedError,
)
from ._models import ApiError, ApiWarning, SendResult, Status
from ._observe import log_quietly

__all__ = [
    "RECORD_VERSION",
    "SendGuard",
    "check_guard",
    "claim_record",
    "claim_token",
    "fingerprint",
    "outcome_record",
    "read_record",
    "settle",
]

log = logging.getLogger("botmsg_async")

#: Version of the JSON record layout; a reader refuses (as "unknown") any other.
RECORD_VERSION = 1


class SendGuard(Protocol):
    """What a client asks of an at-most-once store (``BotMessageClient(send_guard=...)``).

    Every method raises ``CoordinationError`` when the store cannot be used:
    then nothing was sent (``claim``) or the send's own outcome stands
    (``record``/``release``; the client logs it and keeps the send's result).

    ``token`` (``claim_token()``, new for each send) names one claim attempt:
    a store whose command ran but whose reply was lost may run it again, and
    must then recognise the claim as this sender's own (send now), not as
    another sender's (delivery unknown); ``record`` and ``release`` touch only
    the claim that carries it, never another sender's claim of the same key.
    """

    async def claim(
        self, key: str, fingerprint: str, department_uuid: str, user_uuid: str, *, token: str
    ) -> SendResult | None:
        """Claim ``key`` for the message ``fingerprint`` names.

        Returns:
            None when this caller now holds the claim (the one ``token`` names)
            and must send; the recorded ``SendResult`` when the message was sent
            before.

        Raises:
            IdempotencyConflictError: the key was used for a different message.
            DeliveryUnknownError: the key is claimed with no outcome (its sender
                died mid-send, or is sending right now) or its outcome was unknown.
            BotMessageError: the recorded final error of the first send.
            CoordinationError: the store failed; nothing was sent.
        """
        ...

    async def record(
        self,
        key: str,
        fingerprint: str,
        result: SendResult | None,
        error: BotMessageError | None,
        *,
        token: str,
    ) -> None:
        """Record the outcome of the send that holds ``token``'s claim: its result, or its error."""
        ...

    async def release(self, key: str, fingerprint: str, *, token: str) -> None:
        """Free ``token``'s claim of a key whose message was certainly not delivered."""
        ...


def check_guard(guard: object) -> None:
    """Refuse, before any I/O, a guard whose methods do not take ``token=``.

    A guard written before claims carried a token would raise ``TypeError`` on
    every guarded send; refused here, the client says which argument is at fault.
    A method whose signature cannot be read (a C function, a mock) is accepted.

    Raises:
        InvalidRequestError: ``claim``, ``record`` or ``release`` is missing or
            takes no ``token`` keyword.
    """
    for name in ("claim", "record", "release"):
        method = getattr(guard, name, None)
        if not callable(method):
            raise InvalidRequestError(
                "send_guard", type(guard).__name__, f"has no {name}() (see SendGuard)"
            )
        try:
            parameters = inspect.signature(method).parameters.values()
        except (TypeError, ValueError):
            continue
        if not any(
            p.kind is p.VAR_KEYWORD
            or (p.name == "token" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
            for p in parameters
        ):
            raise InvalidRequestError(
                "send_guard",
                type(guard).__name__,
                f"its {name}() takes no token= keyword: SendGuard methods take the "
                "send's claim token (see SendGuard)",
            )


def fingerprint(department_uuid: str, user_uuid: str, body: bytes) -> str:
    """A short digest of what a message is: department, user and the exact request body.

    The body holds the text and every message field (subject, sender...), so a
    key reused for any other message gets another fingerprint.
    """
    digest = hashlib.sha256()
    for part in (department_uuid.encode(), user_uuid.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:32]


def claim_token() -> str:
    """A new random name for one claim attempt (the ``token`` of ``SendGuard``)."""
    return secrets.token_hex(16)


def claim_record(fingerprint: str, token: str | None = None) -> str:
    """The JSON a claim writes: "being sent", no outcome yet, by the sender ``token`` names.

    The token is an optional field of the same record version: a reader that
    does not know it reads the claim as before (someone's claim: unknown).
    """
    data = {"v": RECORD_VERSION, "state": "claimed", "fp": fingerprint}
    if token is not None:
        data["tok"] = token
    return json.dumps(data)


def _result_data(result: SendResult) -> dict[str, Any]:
    return {
        "status": result.status.value,
        "request_uuid": result.request_uuid,
        "message_uuid": result.message_uuid,
        "errors": [[e.code, e.description, e.uid] for e in result.errors],
        "warnings": [[w.code, w.description] for w in result.warnings],
        "attempts": result.attempts,
    }


def outcome_record(
    fingerprint: str, result: SendResult | None, error: BotMessageError | None
) -> str:
    """The JSON that records a send's outcome (never pickle: any reader may rebuild it)."""
    data: dict[str, Any] = {"v": RECORD_VERSION, "fp": fingerprint}
    if error is None and result is not None:
        data["state"] = "sent"
        data["result"] = _result_data(result)
    elif isinstance(error, DeliveryUnknownError):
        data["state"] = "unknown"
        data["error"] = {"type": "DeliveryUnknownError", "message": error.message}
    else:
        data["state"] = "failed"
        failure: dict[str, Any] = {
            "type": type(error).__name__,
            "message": error.message if error is not None else "no outcome",
        }
        if isinstance(error, SendFailedError):
            failure["result"] = _result_data(error.result)
            failure["transient"] = error.transient
        if isinstance(error, APIStatusError):
            failure["status"] = error.status
            failure["body_excerpt"] = error.body_excerpt
        data["error"] = failure
    return json.dumps(data)


class _BadRecordError(ValueError):
    """A stored record that is not what ``outcome_record`` writes."""


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _BadRecordError(f"expected text or null, got {type(value).__name__}")


def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _BadRecordError(f"expected an integer, got {type(value).__name__}")


def _object(value: object) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise _BadRecordError(f"expected an object, got {type(value).__name__}")


def _rows(value: object, width: int) -> list[list[object]]:
    if not isinstance(value, list) or not all(
        isinstance(row, list) and len(row) == width for row in value
    ):
        raise _BadRecordError(f"expected a list of {width}-item lists")
    return value


def _result(value: object) -> SendResult:
    data = _object(value)
    try:
        status = Status(data.get("status"))
    except ValueError:
        raise _BadRecordError("unknown status") from None
    return SendResult(
        status,
        request_uuid=_text(data.get("request_uuid")),
        message_uuid=_text(data.get("message_uuid")),
        errors=tuple(
            ApiError(_text(a), _text(b), _text(c)) for a, b, c in _rows(data.get("errors"), 3)
        ),
        warnings=tuple(ApiWarning(_text(a), _text(b)) for a, b in _rows(data.get("warnings"), 2)),
        attempts=_int(data.get("attempts")),
    )


def _error(value: object, department_uuid: str, user_uuid: str) -> BotMessageError:
    """Rebuild a recorded final error as the closest class of the error tree."""
    data = _object(value)
    message = f"recorded outcome of an earlier send: {_text(data.get('message')) or ''}"
    kind = data.get("type")
    if kind == "SendFailedError":
        transient = data.get("transient")
        if not isinstance(transient, bool):
            raise _BadRecordError("transient must be a boolean")
        return SendFailedError(
            _result(data.get("result")),
            transient=transient,
            department_uuid=department_uuid,
            user_uuid=user_uuid,
        )
    if "status" in data:
        return APIStatusError(
            message,
            status=_int(data.get("status")),
            body_excerpt=_text(data.get("body_excerpt")) or "",
            department_uuid=department_uuid,
            user_uuid=user_uuid,
        )
    return BotMessageError(message, department_uuid=department_uuid, user_uuid=user_uuid)


def read_record(
    raw: str | bytes,
    key: str,
    fingerprint: str,
    department_uuid: str,
    user_uuid: str,
    token: str | None = None,
) -> SendResult | None:
    """What a send of ``key`` finds when the key is already claimed or recorded.

    Total: a record that cannot be read counts as "delivery unknown" (the
    safe answer: never sent again).

    Args:
        token: This send's claim token: a claim that carries it is this send's
            own (its claim ran, then its reply was lost and the claim was run
            again), not another sender's.

    Returns:
        None for this send's own claim (nothing was sent yet: send now); the
        recorded ``SendResult`` of a message already sent.

    Raises:
        IdempotencyConflictError: the record is for a different message.
        DeliveryUnknownError: claimed by another sender (or by a writer that
            named no token) with no outcome, an unknown outcome, or an
            unreadable record.
        BotMessageError: the recorded final error (rebuilt in the error tree).
    """
    try:
        data = _object(json.loads(raw))
        if data.get("v") != RECORD_VERSION:
            raise _BadRecordError(f"record version {data.get('v')!r}")
        stored = data.get("fp")
        state = data.get("state")
        if stored != fingerprint:
            raise IdempotencyConflictError(
                "idempotency_key",
                key,
                "already used for a different message (department, user or text differ); "
                "use a new key for a new message",
                department_uuid=department_uuid,
                user_uuid=user_uuid,
            )
        if state == "sent":
            return _result(data.get("result"))
        if state == "failed":
            error = _error(data.get("error"), department_uuid, user_uuid)
        elif state == "claimed":
            if token is not None and data.get("tok") == token:
                return None
            error = DeliveryUnknownError(
                "another sender claimed this idempotency key and recorded no outcome (it is "
                "sending right now, or died mid-send): the message may have been delivered",
                department_uuid=department_uuid,
                user_uuid=user_uuid,
            )
        elif state == "unknown":
            error = DeliveryUnknownError(
                "an earlier send under this idempotency key ended with delivery unknown",
                department_uuid=department_uuid,
                user_uuid=user_uuid,
            )
        else:
            raise _BadRecordError(f"unknown state {state!r}")
    except (ValueError, TypeError, RecursionError) as exc:
        if isinstance(exc, BotMessageError):
            raise
        unknown = DeliveryUnknownError(
            f"the record of this idempotency key is unreadable ({exc}): the message may "
            "have been delivered",
            department_uuid=department_uuid,
            user_uuid=user_uuid,
        )
        unknown.idempotency_key = key
        raise unknown from None
    if isinstance(error, DeliveryUnknownError):
        error.idempotency_key = key
    raise error


async def settle(
    guard: SendGuard,
    key: str,
    fingerprint: str,
    token: str,
    result: SendResult | None,
    error: BotMessageError | None,
) -> None:
    """Record a claimed send's outcome, or free its key (``releases_claim``).

    A store failure here is logged, never raised: the send's own outcome is
    what the caller must get. The key then stays claimed with no outcome, so a
    later send of it is told "unknown" rather than sending twice.
    """
    try:
        if error is not None and releases_claim(error):
            await guard.release(key, fingerprint, token=token)
        else:
            await guard.record(key, fingerprint, result, error, token=token)
    except BotMessageError as exc:
        log_quietly(
            log,
            logging.WARNING,
            "could not record the outcome of idempotency key %s (%s); a later send of this "
            "key will be told its delivery is unknown",
            key,
            exc,
        )
