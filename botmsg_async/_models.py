"""The SDK's data: what a caller sends and what the service answers.

Plain frozen attrs classes in snake_case. They know nothing of the wire format
(camelCase names, omitted fields): that is ``_wire.py``'s job.
"""

from __future__ import annotations

import enum
from uuid import UUID

from attrs import define, field

__all__ = [
    "ApiError",
    "ApiWarning",
    "MessageDefaults",
    "Outcome",
    "SendRequest",
    "SendResult",
    "Status",
    "TextMessage",
]


class Status(enum.Enum):
    """The service's verdict on one send."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


class Outcome(enum.Enum):
    """What became of one item of a batch."""

    SENT = "sent"  #: The service answered SUCCESS.
    FAILED = "failed"  #: It was not delivered; ``error`` says why.
    UNKNOWN = "unknown"  #: It may or may not have been delivered (``DeliveryUnknownError``).
    SKIPPED = "skipped"  #: Never attempted, since the batch stopped before it.


@define(frozen=True)
class TextMessage:
    """A text bot message.

    The service supports text only, so the protocol (``TEXT``) and the number of
    attachments (0) are fixed and cannot be expressed here.

    Args:
        body: The text shown to the user. Must not be empty or whitespace only.
        subject: Optional subject line.
        sender_name: Optional name the message appears to come from.
        recipient_communication_value: Optional recipient address (e.g. an e-mail).
        type: Message type; the vendor documents only ``"DRAFT"``.
        purpose: Message purpose; the vendor documents only ``"F"``.
        is_manual: The vendor's ``isManual`` flag.

    Example:
        >>> TextMessage("Your parcel has arrived", subject="Delivery")
        TextMessage(body='Your parcel has arrived', subject='Delivery', ...)
    """

    body: str
    subject: str | None = field(default=None, kw_only=True)
    sender_name: str | None = field(default=None, kw_only=True)
    recipient_communication_value: str | None = field(default=None, kw_only=True)
    type: str = field(default="DRAFT", kw_only=True)
    purpose: str = field(default="F", kw_only=True)
    is_manual: bool = field(default=True, kw_only=True)


@define(frozen=True)
class MessageDefaults:
    """Client-wide values for messages given as plain strings.

    ``BotMessageClient(message_defaults=...)`` applies these whenever ``send`` gets
    a ``str``; a ``TextMessage`` is always sent exactly as built.
    """

    type: str = "DRAFT"
    purpose: str = "F"
    is_manual: bool = True
    sender_name: str | None = None
    subject: str | None = None

    def message(self, body: str) -> TextMessage:
        """Build the ``TextMessage`` a plain-string ``body`` stands for."""
        return TextMessage(
            body,
            subject=self.subject,
            sender_name=self.sender_name,
            type=self.type,
            purpose=self.purpose,
            is_manual=self.is_manual,
        )


@define(frozen=True)
class SendRequest:
    """One item of a bulk send: a message for one user of one department.

    Attributes:
        department_uuid: The department's id (a ``str``, or a ``uuid.UUID``).
        user_uuid: The user's id (a ``str``, or a ``uuid.UUID``).
        message: The text, or a ``TextMessage``.
        idempotency_key: The key its attempts carry (default: a new UUID4). Give
            the key of an earlier try only to resend that same message.
    """

    department_uuid: str | UUID
    user_uuid: str | UUID
    message: str | TextMessage
    idempotency_key: str | None = field(default=None, kw_only=True)


@define(frozen=True)
class ApiError:
    """One entry of the service's ``errors`` list."""

    code: str | None = None
    description: str | None = None
    uid: str | None = None


@define(frozen=True)
class ApiWarning:
    """One entry of the service's ``warnings`` list."""

    code: str | None = None
    description: str | None = None


@define(frozen=True)
class SendResult:
    """The service's answer to one send.

    Attributes:
        status: ``Status.SUCCESS`` or ``Status.FAILURE``.
        request_uuid: The service's id of the request, if it gave one.
        message_uuid: The id of the message created, if any.
        errors: Why the send failed (empty on success).
        warnings: Anything the service wants the caller to know.
        attempts: How many HTTP attempts this send took (1 when no retry was needed).
    """

    status: Status
    request_uuid: str | None = field(default=None, kw_only=True)
    message_uuid: str | None = field(default=None, kw_only=True)
    errors: tuple[ApiError, ...] = field(default=(), kw_only=True)
    warnings: tuple[ApiWarning, ...] = field(default=(), kw_only=True)
    attempts: int = field(default=1, kw_only=True)
