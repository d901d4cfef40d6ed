"""botmsg-async: an asyncio client for sending bot messages to users.

Example:
    >>> import botmsg_async
    >>> async with botmsg_async.BotMessageClient(base_url, username, password) as client:
    ...     result = await client.send(department_uuid, user_uuid, "Hello!")
"""

from ._batch import BatchOptions, BatchStream, Sender
from ._client import BotMessageClient
from ._errors import (
    APIStatusError,
    AuthenticationError,
    BatchFailedError,
    BatchStoppedError,
    BotMessageError,
    CertificateError,
    ClientClosedError,
    CoordinationError,
    DeliveryUnknownError,
    IdempotencyConflictError,
    InvalidRequestError,
    InvalidResponseError,
    NotAttemptedError,
    RateLimitedError,
    ResponseLostError,
    SendFailedError,
    ServerError,
    TransportError,
    UnexpectedStatusError,
    WrongEventLoopError,
)
from ._guard import SendGuard
from ._limits import LocalRateLimiter, RateLimiter
from ._models import (
    ApiError,
    ApiWarning,
    MessageDefaults,
    Outcome,
    SendRequest,
    SendResult,
    Status,
    TextMessage,
)
from ._report import BatchReport, Counts, ItemResult, Progress
from ._retry import RetryBudget, RetryEvent, RetryPolicy
from ._validate import MAX_TEXT_BYTES, check_base_url, check_request, new_idempotency_key
from ._version import __version__

__all__ = [  # noqa: RUF022 - plain sorted(), as test_public_api checks
    "APIStatusError",
    "ApiError",
    "ApiWarning",
    "AuthenticationError",
    "BatchFailedError",
    "BatchOptions",
    "BatchReport",
    "BatchStoppedError",
    "BatchStream",
    "BotMessageClient",
    "BotMessageError",
    "CertificateError",
    "ClientClosedError",
    "CoordinationError",
    "Counts",
    "DeliveryUnknownError",
    "IdempotencyConflictError",
    "InvalidRequestError",
    "InvalidResponseError",
    "ItemResult",
    "LocalRateLimiter",
    "MAX_TEXT_BYTES",
    "MessageDefaults",
    "NotAttemptedError",
    "Outcome",
    "Progress",
    "RateLimitedError",
    "RateLimiter",
    "ResponseLostError",
    "RetryBudget",
    "RetryEvent",
    "RetryPolicy",
    "SendFailedError",
    "SendGuard",
    "SendRequest",
    "SendResult",
    "Sender",
    "ServerError",
    "Status",
    "TextMessage",
    "TransportError",
    "UnexpectedStatusError",
    "WrongEventLoopError",
    "__version__",
    "check_base_url",
    "check_request",
    "new_idempotency_key",
]
