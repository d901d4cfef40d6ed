"""What every ``botmsg`` command shares: exit codes, environment variables, usage errors."""

from __future__ import annotations

from typing import Final

__all__ = [
    "ENV_BASE_URL",
    "ENV_PASSWORD",
    "ENV_USERNAME",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNKNOWN",
    "EXIT_USAGE",
    "MAX_LISTED_FAILURES",
    "UsageError",
]

EXIT_OK: Final = 0  #: Every message was sent.
EXIT_FAILED: Final = 1  #: Some messages were not delivered.
EXIT_USAGE: Final = 2  #: Usage or input error; nothing was sent.
EXIT_UNKNOWN: Final = 3  #: Some messages may or may not have been delivered.
EXIT_INTERRUPTED: Final = 130  #: Stopped by SIGINT or SIGTERM.

ENV_BASE_URL: Final = "BOTMSG_BASE_URL"
ENV_USERNAME: Final = "BOTMSG_USERNAME"
ENV_PASSWORD: Final = "BOTMSG_PASSWORD"  # noqa: S105 - the name of a variable, not a secret

#: Items not sent listed on stderr when there is no --out file to find them in.
MAX_LISTED_FAILURES: Final = 20


class UsageError(Exception):
    """A usage or input error: reported on stderr, exit code 2, nothing sent."""
