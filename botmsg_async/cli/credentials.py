"""Where ``botmsg`` sends and as whom: flags, the environment, or a prompt.

There is deliberately no ``--password VALUE`` flag: a command line is visible to
every user of the machine and lands in shell history.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from botmsg_async import BotMessageClient, InvalidRequestError, check_base_url

from .common import ENV_BASE_URL, ENV_PASSWORD, ENV_USERNAME, UsageError
from .console import Redactor

__all__ = ["Credentials", "make_client", "read_password_stdin", "resolve_credentials"]


@dataclass(frozen=True)
class Credentials:
    """Where to send and as whom. ``repr`` leaves the password out."""

    base_url: str
    username: str
    password: str = field(repr=False)
    allow_insecure_http: bool = False


def read_password_stdin() -> str:
    """The password on the first line of stdin.

    Raises:
        UsageError: the line is empty.
    """
    line = sys.stdin.readline()
    # Only the line break goes: spaces may be part of a password.
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise UsageError("--password-stdin: the first line of stdin is empty")
    return password


def resolve_credentials(
    args: argparse.Namespace, env: Mapping[str, str], redact: Redactor, *, stdin_taken: bool
) -> Credentials:
    """Credentials from flags, then the environment, then a prompt on a terminal.

    The user name and password are registered with ``redact`` before anything
    can print them.

    Raises:
        UsageError: something is missing, or stdin is asked for twice.
    """
    base_url = args.base_url or env.get(ENV_BASE_URL, "")
    if not base_url:
        raise UsageError(f"no service URL: pass --base-url or set {ENV_BASE_URL}")
    try:  # before anything runs: the client's own check, worded for a terminal
        check_base_url(base_url, allow_insecure_http=args.allow_insecure_http)
    except InvalidRequestError as exc:
        if not args.allow_insecure_http and _only_insecure(base_url):
            # The SDK's words name its argument; here the flag is what to pass.
            raise UsageError(
                f"--base-url (or {ENV_BASE_URL}) {exc.value!r}: http:// to a non-loopback "
                "host would send the password in clear text; use https:// or pass "
                "--allow-insecure-http"
            ) from None
        raise UsageError(f"--base-url (or {ENV_BASE_URL}): {exc}") from None
    except ValueError as exc:  # yarl's own: a port out of range, a broken IPv6 literal...
        raise UsageError(_bad_base_url(exc)) from None
    username = args.username or env.get(ENV_USERNAME, "")
    if not username:
        raise UsageError(f"no user name: pass --username or set {ENV_USERNAME}")
    if args.password_stdin:
        if stdin_taken:
            raise UsageError(
                "--password-stdin cannot share stdin with the input '-'; "
                f"set {ENV_PASSWORD} or pass the input as a file"
            )
        password = read_password_stdin()
    elif env.get(ENV_PASSWORD):
        password = env[ENV_PASSWORD]
    elif sys.stdin.isatty() and not stdin_taken:
        try:
            password = getpass.getpass("botmsg password: ")
        except EOFError:  # Ctrl-D at the prompt: no password, as an empty line
            password = ""
        if not password:
            raise UsageError("no password given")
    else:
        raise UsageError(
            f"no password: set {ENV_PASSWORD}, pipe it with --password-stdin, "
            "or run on a terminal to be asked for it"
        )
    redact.add_credentials(username, password)
    creds = Credentials(base_url, username, password, args.allow_insecure_http)
    # The client's own checks of them (a ':' in the user name...), now: before a
    # journal is begun or a worker started, not when the first client is made.
    make_client(creds)  # no session yet: nothing to close
    return creds


def _only_insecure(base_url: str) -> bool:
    """Whether ``--allow-insecure-http`` alone would make ``base_url`` acceptable."""
    try:
        check_base_url(base_url, allow_insecure_http=True)
    except ValueError:  # InvalidRequestError, or yarl's own
        return False
    return True


def _bad_base_url(exc: ValueError) -> str:
    """A usage message for a URL that does not parse; the URL itself is not repeated,
    as it may carry credentials."""
    return f"--base-url (or {ENV_BASE_URL}) is not a valid URL: {exc}"


def make_client(creds: Credentials) -> BotMessageClient:
    """A client for ``creds``.

    Raises:
        UsageError: the client refuses them.
    """
    try:
        return BotMessageClient(
            creds.base_url,
            creds.username,
            creds.password,
            allow_insecure_http=creds.allow_insecure_http,
        )
    except InvalidRequestError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # yarl's, should the client not turn it into its own error
        raise UsageError(_bad_base_url(exc)) from None
