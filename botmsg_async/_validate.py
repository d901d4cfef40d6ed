"""Checks of everything a caller hands the SDK, before any I/O: ids, messages, URLs, keys.

Pure functions: no network, no aiohttp. Each raises ``InvalidRequestError``
naming the field at fault, so bad input fails alone and early.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Collection, Mapping
from urllib.parse import quote
from uuid import UUID

from yarl import URL

from ._errors import InvalidRequestError
from ._models import MessageDefaults, SendRequest, TextMessage
from ._wire import PlainTextEncoder, encode_request

__all__ = [
    "MAX_TEXT_BYTES",
    "check_base_url",
    "check_headers",
    "check_id",
    "check_idempotency_key",
    "check_message",
    "check_proxy",
    "check_request",
    "id_text",
    "message_encoder",
    "new_idempotency_key",
]

_FORBIDDEN_ID_CHARS = frozenset("/?#%\\")
#: Ids that need neither checking nor encoding (UUIDs among them): the fast path.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*")


class _KeySource:
    """Random UUID4 keys, cut from one ``os.urandom`` call per ``batch`` keys.

    A key per ``os.urandom(16)`` is one ``getrandom`` system call per message
    (3.5 µs of a bulk send's CPU); one call for 256 keys spreads that over all
    of them. The keys are as random as before: every byte comes from the OS's
    CSPRNG, used once.

    Thread-safe without a lock: ``list.pop`` is atomic, so two threads never
    get the same key; two threads finding the list empty at once each refill it,
    and only unused random bytes are lost. Never shared across ``fork``: the
    child must not hand out the keys its parent will also hand out, so a fork
    hook empties the child's list (``os.register_at_fork``).
    """

    __slots__ = ("_batch", "_keys")

    def __init__(self, batch: int = 256) -> None:
        self._batch = batch
        self._keys: list[str] = []

    def take(self) -> str:
        """One new key."""
        try:
            return self._keys.pop()
        except IndexError:
            keys = self._fresh()
            key = keys.pop()
            self._keys = keys
            return key

    def forget(self) -> None:
        """Drop the keys not handed out yet (in a forked child: they are the parent's too)."""
        self._keys = []

    def _fresh(self) -> list[str]:
        raw = bytearray(os.urandom(16 * self._batch))
        # Byte 6 of each key carries the version (4), byte 8 the RFC 4122
        # variant: set in every key at once by translating those columns.
        raw[6::16] = raw[6::16].translate(_VERSION_4)
        raw[8::16] = raw[8::16].translate(_VARIANT_RFC_4122)
        # The text of all keys at once, in C: each hex digit column is copied
        # into its place in a row of "8-4-4-4-12 " templates, then split.
        digits = raw.hex().encode()
        text = bytearray(_KEY_TEMPLATE * self._batch)
        for column, slot in enumerate(_DIGIT_SLOTS):
            text[slot :: len(_KEY_TEMPLATE)] = digits[column::32]
        return text.decode("ascii").split()


_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))
_KEY_TEMPLATE = b"00000000-0000-0000-0000-000000000000 "
#: Where each of a key's 32 hex digits goes in its template.
_DIGIT_SLOTS = tuple(i for i, char in enumerate(_KEY_TEMPLATE) if char == ord("0"))

#: The process's one key source. Module-level state on purpose: a fork hook
#: (registered once, below) must be able to reach it, and one buffer per
#: process is what makes the ``os.urandom`` call rare.
_KEYS = _KeySource()
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_KEYS.forget)


def new_idempotency_key() -> str:
    """A random UUID4, as text (as ``str(uuid.uuid4())``, several times cheaper).

    Safe across threads and ``fork``: no two calls, in any thread or forked
    child, hand out the same random bytes.
    """
    return _KEYS.take()


def id_text(value: str | UUID) -> str:
    """A ``uuid.UUID`` id as its text; anything else as it is, for ``check_id``."""
    return str(value) if isinstance(value, UUID) else value


def check_id(name: str, value: object) -> str:
    """Return ``value`` percent-encoded for the path, or raise ``InvalidRequestError``.

    Ids are opaque strings, but none may change the path: empty ids, ``.`` and
    ``..``, and ids with ``/ ? # % \\``, whitespace or control characters are
    refused; everything else is percent-encoded.
    """
    if not isinstance(value, str):
        raise InvalidRequestError(name, value, f"must be a str, not {type(value).__name__}")
    if _PLAIN_ID.fullmatch(value) is not None:
        return value
    if not value:
        raise InvalidRequestError(name, value, "must not be empty")
    if value in (".", ".."):
        raise InvalidRequestError(name, value, "must not be a path segment like '.' or '..'")
    for ch in value:
        if ch in _FORBIDDEN_ID_CHARS or ch.isspace() or not ch.isprintable():
            raise InvalidRequestError(
                name, value, f"must not contain {ch!r} (it could change the request path)"
            )
    return quote(value, safe="")


#: Largest message body accepted, in bytes of UTF-8 (1 MiB); ``max_text_bytes`` changes it.
MAX_TEXT_BYTES = 1024 * 1024

#: A lone surrogate: a str may hold one (from "\\ud800" in JSON), UTF-8 cannot.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _shown(text: str) -> str:
    """``text`` as an error shows it: at most 60 characters, so a 1 MiB body stays out."""
    return text if len(text) <= 60 else f"{text[:60]}... [{len(text)} characters]"


def _check_text(name: str, value: object, *, optional: bool) -> None:
    """Raise ``InvalidRequestError`` unless ``value`` is text that UTF-8 can carry."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        kind = "a str or None" if optional else "a str"
        raise InvalidRequestError(name, value, f"must be {kind}, not {type(value).__name__}")
    # isascii() is O(1): only non-ASCII text is searched for surrogates.
    if not value.isascii() and (found := _SURROGATE.search(value)) is not None:
        raise InvalidRequestError(
            name,
            _shown(value),
            f"holds a lone surrogate {found.group()!r} at index {found.start()}, "
            "which is not text and cannot be sent as UTF-8",
        )


def check_message(
    message: object, defaults: MessageDefaults, max_text_bytes: int = MAX_TEXT_BYTES
) -> TextMessage:
    """Return ``message`` as a ``TextMessage``, or raise ``InvalidRequestError``.

    Every text field must be a ``str`` that UTF-8 can encode (no lone
    surrogates), and the body non-blank and at most ``max_text_bytes`` of UTF-8.
    """
    if isinstance(message, str):
        message = defaults.message(message)
    elif not isinstance(message, TextMessage):
        raise InvalidRequestError(
            "message", message, f"must be a str or TextMessage, not {type(message).__name__}"
        )
    _check_body(message.body, max_text_bytes)
    _check_text("message.subject", message.subject, optional=True)
    _check_text("message.sender_name", message.sender_name, optional=True)
    _check_text(
        "message.recipient_communication_value",
        message.recipient_communication_value,
        optional=True,
    )
    _check_text("message.type", message.type, optional=False)
    _check_text("message.purpose", message.purpose, optional=False)
    return message


def _check_body(body: str, max_text_bytes: int) -> None:
    """Raise ``InvalidRequestError`` unless ``body`` is sendable text within the limit."""
    _check_text("message.body", body, optional=False)  # a TextMessage may hold anything
    if not body.strip():
        raise InvalidRequestError("message.body", body, "must be non-empty text")
    # A character is at most 4 bytes of UTF-8: only a long body needs encoding to measure.
    if len(body) > max_text_bytes // 4 and (
        len(body) > max_text_bytes or len(body.encode()) > max_text_bytes
    ):
        raise InvalidRequestError(
            "message.body",
            _shown(body),
            f"is over the limit of {max_text_bytes} bytes of UTF-8; "
            "split it, or raise BotMessageClient(max_text_bytes=...)",
        )


def message_encoder(
    defaults: MessageDefaults, max_text_bytes: int = MAX_TEXT_BYTES
) -> Callable[[object], bytes]:
    """Return a function that checks a message as ``check_message`` does and encodes it.

    The same checks, errors and bytes as ``encode_request(check_message(...))``;
    a plain ``str`` under defaults that pass the checks (they do not change, so
    they are checked once, here) takes ``PlainTextEncoder``'s fast path, and only
    its body is checked per message.
    """

    def encode_any(message: object) -> bytes:
        return encode_request(check_message(message, defaults, max_text_bytes))

    try:
        check_message(defaults.message("x"), defaults, max_text_bytes)
        plain = PlainTextEncoder(defaults)
    except (InvalidRequestError, ValueError):
        return encode_any  # every str then fails as check_message says, or takes the long way

    def encode(message: object) -> bytes:
        if type(message) is not str:  # a TextMessage, or a str subclass: the long way
            return encode_any(message)
        _check_body(message, max_text_bytes)
        return plain(message)

    return encode


def _endpoint_part(path: str) -> str | None:
    """The tail of a base URL's path that is the endpoint's own path, if it has one.

    A ``communications`` segment that ends the path or is followed by
    ``department``, or a path ending in ``/botmessage/send``: the client would
    add the endpoint's path again and get a 404.
    """
    segments = path.lower().split("/")
    for i, segment in enumerate(segments):
        if segment == "communications" and segments[i + 1 : i + 2] in ([], ["department"]):
            return path[len("/".join(segments[:i])) :]
    if segments[-2:] == ["botmessage", "send"]:
        return path[-len("/botmessage/send") :]
    return None


def check_base_url(base_url: str | URL, *, allow_insecure_http: bool = False) -> URL:
    """Return ``base_url`` as a ``URL`` without a trailing slash, or raise ``InvalidRequestError``.

    The check ``BotMessageClient`` makes; public for callers that check
    configuration before building a client. Total over any text: yarl parses
    lazily, so a bad port or IPv6 literal may only fail when ``port`` or
    ``host`` is read; all of them are read here.

    Args:
        base_url: Scheme, host and any gateway prefix before ``/communications``.
        allow_insecure_http: Permit ``http://`` to a host that is not loopback.

    Raises:
        InvalidRequestError: no usable URL, credentials in it, a query or
            fragment, the endpoint's own path (``/communications...``), or
            ``http://`` to a remote host without permission.
    """
    if not isinstance(base_url, str | URL):
        raise InvalidRequestError(
            "base_url", base_url, f"must be a str or yarl.URL, not {type(base_url).__name__}"
        )
    try:
        url = URL(base_url) if isinstance(base_url, str) else base_url
        has_credentials = url.user is not None or url.password is not None
        scheme, _, _ = url.scheme, url.host, url.port
        has_extra = bool(url.query_string or url.fragment)
        trimmed = url.with_path(url.path.rstrip("/"))
        # Rebuilt, a URL can fail or lose its host where the original did not
        # ("http://[:0:0]" and "http://[:]" lose their brackets): the one that will
        # be used is read, and must read back as the same host from its own text.
        shown, host, _ = str(url), trimmed.host, trimmed.port
        written = URL(str(trimmed)).host if host else None
    except Exception as exc:
        # Whatever yarl raises on text it cannot parse (ValueError, UnicodeError
        # from IDNA, even IndexError for "0://[]@") means the same: no usable URL.
        # Echoed only when it cannot hold credentials (user:password@host).
        if isinstance(base_url, str) and "@" not in base_url:
            raise InvalidRequestError(
                "base_url", base_url, f"is not a valid URL ({exc}); check the host and port"
            ) from None
        raise InvalidRequestError(
            "base_url", "<redacted>", "is not a valid URL; check the host and port"
        ) from None
    if has_credentials:
        # Checked first, and the URL not echoed: it holds credentials.
        raise InvalidRequestError(
            "base_url", "<redacted>", "must not carry credentials; pass username and password"
        )
    if (
        scheme not in ("http", "https")
        or not host
        or written != host
        # No host name has blanks or control characters (yarl lets "http:// :" by).
        or not host.isprintable()
        or any(c.isspace() for c in host)
    ):
        raise InvalidRequestError(
            "base_url", shown, "must be an absolute http:// or https:// URL with a host"
        )
    if has_extra:
        raise InvalidRequestError("base_url", shown, "must not have a query or fragment")
    endpoint = _endpoint_part(trimmed.path)
    if endpoint is not None:
        # Caught here, not as a 404 from a doubled path on the first send.
        raise InvalidRequestError(
            "base_url",
            shown,
            f"base_url is what comes before /communications; drop {endpoint!r} "
            "(the client adds the endpoint's path itself)",
        )
    if scheme == "http" and not allow_insecure_http and not _is_loopback(host):
        raise InvalidRequestError(
            "base_url",
            shown,
            "http:// to a non-loopback host would send the password in clear text; "
            "use https:// or pass allow_insecure_http=True",
        )
    return trimmed


def check_proxy(proxy: str | URL) -> tuple[URL, str | None, str | None]:
    """Split an HTTP(S) proxy URL into the URL without credentials, the user and password.

    Total over any text, like ``check_base_url``; the credentials are never echoed
    (an error shows the URL with its userinfo as ``<redacted>``).

    Returns:
        The proxy's URL without userinfo, its user name and its password (None
        when absent), to be sent as ``Proxy-Authorization``.

    Raises:
        InvalidRequestError: not an absolute ``http://`` or ``https://`` URL with a
            host and no path, query or fragment.
    """
    if not isinstance(proxy, str | URL):
        raise InvalidRequestError(
            "proxy", proxy, f"must be a str or yarl.URL, not {type(proxy).__name__}"
        )
    try:
        url = URL(proxy) if isinstance(proxy, str) else proxy
        user, password = url.user, url.password
        bare = url.with_user(None)
        scheme, host, _ = bare.scheme, bare.host, bare.port
        has_extra = bool(bare.path not in ("", "/") or bare.query_string or bare.fragment)
        shown = str(bare)
    except Exception:
        # Whatever yarl raises means one thing: no usable URL. Never echoed:
        # the text may hold a password.
        raise InvalidRequestError(
            "proxy", "<redacted>", "is not a valid URL; check the host and port"
        ) from None
    if user is not None or password is not None:
        shown = shown.replace("://", "://<redacted>@", 1)
    if (
        scheme not in ("http", "https")
        or not host
        # No host name has blanks or control characters (yarl lets "http:// :" by).
        or not host.isprintable()
        or any(c.isspace() for c in host)
    ):
        raise InvalidRequestError(
            "proxy", shown, "must be an absolute http:// or https:// URL with a host"
        )
    if has_extra:
        raise InvalidRequestError("proxy", shown, "must not have a path, query or fragment")
    return bare, user, password


#: A header name: an RFC 9110 token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: What no header value may hold: a control character but tab (CR and LF would inject
#: headers; aiohttp refuses every one of them with a bare ValueError as it writes the
#: request), or a lone surrogate (not text: aiohttp would drop it or fail to encode it).
_UNSENDABLE_VALUE = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def check_headers(field: str, headers: object, protected: Collection[str]) -> dict[str, str]:
    """Return extra request headers as a plain dict, or raise ``InvalidRequestError``.

    Names must be RFC 9110 tokens and values ``str`` with no control character but
    tab (no header injection) and no lone surrogate; ``protected`` names
    (lower-case: the client's own, e.g. ``authorization``) are refused whatever
    their case. Values are never echoed
    (they may be API keys): an error names the header only.
    """
    if not isinstance(headers, Mapping):
        raise InvalidRequestError(
            field, headers, f"must be a mapping of names to values, not {type(headers).__name__}"
        )
    checked: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in headers.items():
        if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
            raise InvalidRequestError(field, name, "is not a valid header name")
        lower = name.lower()
        if lower in protected:
            raise InvalidRequestError(
                field,
                name,
                "is set by the client itself and cannot be overridden "
                f"(nor can {', '.join(sorted(protected))})",
            )
        if lower in seen:
            raise InvalidRequestError(field, name, "is given twice (header names ignore case)")
        seen.add(lower)
        if not isinstance(value, str) or _UNSENDABLE_VALUE.search(value) is not None:
            raise InvalidRequestError(
                field,
                name,
                "must have a str value without control characters (tab aside) or lone "
                "surrogates (value not shown)",
            )
        checked[name] = value
    return checked


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: The defaults ``check_request`` applies when given none (frozen: one is enough).
_DEFAULTS = MessageDefaults()


def check_idempotency_key(key: object) -> None:
    """Raise ``InvalidRequestError`` unless ``key`` is None or a non-empty printable ``str``.

    An empty key is refused, not taken for None: a caller resending under an
    earlier key that came out empty (an unset variable) would otherwise send
    under a new key, and a deduplicating service would deliver the message twice.
    """
    if key is not None and (not isinstance(key, str) or not key or not key.isprintable()):
        raise InvalidRequestError(
            "idempotency_key", key, "must be a non-empty printable str (None for a new key)"
        )


def check_request(
    request: SendRequest,
    *,
    message_defaults: MessageDefaults | None = None,
    max_text_bytes: int = MAX_TEXT_BYTES,
) -> None:
    """Check one item of a batch as ``send`` would, without sending it.

    For callers who pre-check a whole input before the first send (as
    ``botmsg send-many`` does): the same rules, the same errors.

    Args:
        request: The item.
        message_defaults: The client's defaults for plain-string messages.
        max_text_bytes: The client's body limit.

    Raises:
        InvalidRequestError: the first problem found, naming the field.

    Example:
        >>> check_request(SendRequest("dept-1", "user/1", "hi"))
        Traceback (most recent call last):
        botmsg_async._errors.InvalidRequestError: invalid user_uuid 'user/1': ...
    """
    if not isinstance(request, SendRequest):
        raise InvalidRequestError(
            "item", request, f"must be a SendRequest, not {type(request).__name__}"
        )
    check_id("department_uuid", id_text(request.department_uuid))
    check_id("user_uuid", id_text(request.user_uuid))
    check_message(request.message, message_defaults or _DEFAULTS, max_text_bytes)
    check_idempotency_key(request.idempotency_key)
