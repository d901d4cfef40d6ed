"""The public surface: one sorted, honest __all__ and an error tree that holds together."""

from __future__ import annotations

import subprocess
import sys
import types

import botmsg_async
from botmsg_async import (
    APIStatusError,
    BotMessageError,
    DeliveryUnknownError,
    InvalidRequestError,
    InvalidResponseError,
    ResponseLostError,
    ServerError,
    TransportError,
)


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted and lists exactly the public, non-module names of the package."""
    public = {
        name
        for name, value in vars(botmsg_async).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert botmsg_async.__all__ == sorted(botmsg_async.__all__)
    assert set(botmsg_async.__all__) - {"__version__"} == public


def test_every_exported_error_is_a_bot_message_error() -> None:
    """Every exported exception class derives from BotMessageError."""
    for name in botmsg_async.__all__:
        value = getattr(botmsg_async, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, BotMessageError), name


def test_ambiguous_errors_are_delivery_unknown() -> None:
    """Errors that may hide a delivery are DeliveryUnknownErrors, as well as their kind."""
    assert issubclass(ServerError, APIStatusError)
    assert issubclass(ServerError, DeliveryUnknownError)
    assert issubclass(ResponseLostError, TransportError)
    assert issubclass(ResponseLostError, DeliveryUnknownError)
    assert issubclass(InvalidResponseError, DeliveryUnknownError)
    assert not issubclass(TransportError, DeliveryUnknownError)
    assert issubclass(InvalidRequestError, ValueError)


def test_error_args_carry_no_fields_beyond_the_message() -> None:
    """An error's args are its message alone, so nothing else leaks into reprs."""
    error = APIStatusError("boom", status=500, body_excerpt="x", department_uuid="d")
    assert error.args == ("boom",)
    assert str(error) == "boom (department=d, user=None)"


def test_the_library_and_cli_load_without_redis() -> None:
    """Importing the package, its CLI and every default-path module loads no redis module."""
    code = (
        "import sys\n"
        "import botmsg_async, botmsg_async.cli, botmsg_async.cli.parser, botmsg_async.bulk\n"
        "import botmsg_async.journal, botmsg_async.testing\n"
        "loaded = [m for m in sys.modules if m == 'redis' or m.startswith('redis.')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # noqa: S603 - our code
