"""``botmsg send``: one message; the outcome as JSON on stdout."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from botmsg_async import (
    APIStatusError,
    BotMessageError,
    DeliveryUnknownError,
    InvalidRequestError,
    InvalidResponseError,
    Outcome,
    RateLimitedError,
    SendFailedError,
    SendRequest,
    SendResult,
    TextMessage,
    check_request,
    new_idempotency_key,
)

from .common import EXIT_FAILED, EXIT_OK, EXIT_UNKNOWN, UsageError
from .console import Console
from .credentials import Credentials, make_client, resolve_credentials
from .input import check_flags_text
from .signals import run

__all__ = ["cmd_send"]


def _error_json(exc: BotMessageError) -> dict[str, Any]:
    """An error as JSON: its type, message and whatever helps act on it."""
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, APIStatusError | InvalidResponseError):
        out["status"] = exc.status
    if isinstance(exc, RateLimitedError):
        out["retry_after"] = exc.retry_after
    if isinstance(exc, SendFailedError):
        out["transient"] = exc.transient
        out["request_uuid"] = exc.result.request_uuid
        out["errors"] = [
            {"code": e.code, "description": e.description, "uid": e.uid} for e in exc.result.errors
        ]
    if isinstance(exc, DeliveryUnknownError):
        out["idempotency_key"] = exc.idempotency_key
    return out


def _interrupted(console: Console, key: str) -> None:
    """Say that an interrupted send's outcome is unknown, and how to resend it safely."""
    message = (
        "interrupted: the message may have been delivered; to send it again without a "
        f"duplicate, pass --idempotency-key {key}"
    )
    error = {"type": "Interrupted", "message": message, "idempotency_key": key}
    console.out(console.dumps({"outcome": Outcome.UNKNOWN.value, "attempts": None, "error": error}))
    console.err(message)


def _result_json(result: SendResult) -> dict[str, Any]:
    return {
        "outcome": Outcome.SENT.value,
        "request_uuid": result.request_uuid,
        "message_uuid": result.message_uuid,
        "attempts": result.attempts,
        "warnings": [{"code": w.code, "description": w.description} for w in result.warnings],
    }


def cmd_send(args: argparse.Namespace, console: Console) -> int:
    """Run ``botmsg send``; return the exit code.

    Raises:
        UsageError: a flag cannot be sent, or the credentials are missing.
    """
    check_flags_text(args, ("department", "user", "text", "subject", "sender_name"))
    message = TextMessage(
        args.text, subject=args.subject or None, sender_name=args.sender_name or None
    )
    _check_request(args.department, args.user, message, args.idempotency_key)
    creds = resolve_credentials(args, os.environ, console.redact, stdin_taken=False)
    return run(_send_one(args, console, creds, message), loop=args.loop)


def _check_request(
    department_uuid: str, user_uuid: str, message: TextMessage, idempotency_key: str | None
) -> None:
    """Refuse what the client would refuse, worded for the command line (ids first)."""
    try:
        check_request(
            SendRequest(department_uuid, user_uuid, message, idempotency_key=idempotency_key)
        )
    except InvalidRequestError as exc:
        if exc.field in ("department_uuid", "user_uuid"):
            raise UsageError(f"{exc.field} {exc.value!r}: {exc.problem}") from None
        if exc.field == "idempotency_key":
            raise UsageError(f"--idempotency-key {exc.value!r}: {exc.problem}") from None
        if exc.field == "message.body" and not message.body.strip():
            raise UsageError("--text must not be empty") from None
        raise UsageError(str(exc)) from None


async def _send_one(
    args: argparse.Namespace, console: Console, creds: Credentials, message: TextMessage
) -> int:
    # Chosen here, not by the client: an interrupted send must be able to name it.
    key: str = args.idempotency_key or new_idempotency_key()
    async with make_client(creds) as client:
        try:
            result = await client.send(args.department, args.user, message, idempotency_key=key)
        except asyncio.CancelledError:  # a signal (exit 130): its request may be at the service
            _interrupted(console, key)
            raise
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
        except BotMessageError as exc:
            unknown = isinstance(exc, DeliveryUnknownError)
            outcome = Outcome.UNKNOWN if unknown else Outcome.FAILED
            console.out(
                console.dumps(
                    {"outcome": outcome.value, "attempts": exc.attempts, "error": _error_json(exc)}
                )
            )
            console.err(f"{outcome.value}: {exc}")
            return EXIT_UNKNOWN if unknown else EXIT_FAILED
    console.out(console.dumps(_result_json(result)))
    return EXIT_OK
