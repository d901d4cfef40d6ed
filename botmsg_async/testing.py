"""A fake bot-message service to run tests against instead of the real one.

``FakeBotMessageServer`` is a real HTTP server (``aiohttp.web``) on
``127.0.0.1`` and a port the OS picks. It serves the one endpoint of the
contract, checks Basic auth, validates the request body against the JSON
Schema taken from the project's spec (``spec/botmessage-openapi.yaml``, shipped
as ``botmsg_async/schemas/send-request.json``), records what it accepted,
deduplicates by ``Idempotency-Key``, and can be told to misbehave: answer
``FAILURE``, 429, 5xx, garbage, be slow, or drop the connection before or
after it processed the message.

Example:
    >>> from botmsg_async import BotMessageClient
    >>> from botmsg_async.testing import FakeBotMessageServer, Fault, FaultPlan
    >>> async with FakeBotMessageServer(username="bot", password="pw") as server:
    ...     server.inject(Fault.HTTP_503, times=2)  # the next two sends get a 503
    ...     async with BotMessageClient(server.base_url, "bot", "pw") as client:
    ...         await client.send("dep-1", "user-1", "Hello!")
    ...     assert [m.message.body for m in server.messages] == ["Hello!"]
    ...     assert server.faults_injected[Fault.HTTP_503] == 2

Random faults are reproducible with a seed: the n-th faultable request always
gets the same fault (which message that is depends on arrival order when sends
run concurrently)::

    FakeBotMessageServer(faults=FaultPlan({Fault.HTTP_502: 0.1, Fault.DROP_AFTER: 0.05}), seed=7)
    FakeBotMessageServer(fault_rate=0.3, seed=1)  # 30 %, spread over every retryable fault

Faults only ever replace the answer to an authenticated, well-formed request;
401, 400 and 422 answers are never replaced and do not use up a scripted fault.
Every status it answers is documented in the spec (but aiohttp's 413 to a request
body over 64 MiB, far past the SDK's largest message). It needs ``jsonschema``:
install the ``testing`` (or ``cli``) extra. With pytest,
``botmsg_async.pytest_plugin`` provides a ready ``botmsg_server`` fixture.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import enum
import importlib.resources
import json
import math
import random
import secrets
import socket
import types
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal

import aiohttp
from aiohttp import hdrs, web
from attrs import define, field

from botmsg_async import TextMessage

try:
    import jsonschema
except ImportError as exc:  # pragma: no cover - exercised when the extra is absent
    raise ImportError(
        "botmsg_async.testing needs jsonschema: pip install 'botmsg-async[testing]'"
    ) from exc

__all__ = [
    "FakeBotMessageServer",
    "Fault",
    "FaultPlan",
    "ReceivedMessage",
    "RequestInfo",
]

_SEND_PATH: Final = "/communications/department/{departmentUUID}/user/{userUUID}/botmessage/send"


class Fault(enum.Enum):
    """A way the fake service can misbehave on one request.

    Whether the message counts as delivered (is recorded in
    ``FakeBotMessageServer.messages`` and remembered for deduplication):

    ==================  =========================================================  =========
    Fault               What the client sees                                       Recorded
    ==================  =========================================================  =========
    TRANSIENT_FAILURE   200, ``FAILURE``, error ``TEMPORARILY_UNAVAILABLE``        no
    PERMANENT_FAILURE   200, ``FAILURE``, error ``INVALID_USER``                   no
    RATE_LIMITED        429 with ``Retry-After`` (the server's ``retry_after``)    no
    HTTP_500            500, plain text                                            no
    HTTP_502            502, an HTML page as a proxy would send                    no
    HTTP_503            503, plain text, no ``Retry-After``                        no
    HTTP_504            504, an HTML page as a proxy would send                    no
    LATENCY             the normal answer, ``fault_latency`` seconds late          yes
    DROP_BEFORE         connection closed, no answer; message not processed        no
    DROP_AFTER          connection closed, no answer; message WAS processed        yes
    MALFORMED           200 with a truncated JSON body; message WAS processed      yes
    ==================  =========================================================  =========

    ``DROP_AFTER`` and ``MALFORMED`` are the ambiguous cases: the client cannot
    tell the message went through, and only a retry with the same idempotency
    key avoids both loss and duplication.
    """

    TRANSIENT_FAILURE = "transient_failure"
    PERMANENT_FAILURE = "permanent_failure"
    RATE_LIMITED = "rate_limited"
    HTTP_500 = "http_500"
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"
    HTTP_504 = "http_504"
    LATENCY = "latency"
    DROP_BEFORE = "drop_before"
    DROP_AFTER = "drop_after"
    MALFORMED = "malformed"


#: What ``FaultPlan.uniform`` (and ``fault_rate=``) spreads over: every fault a
#: retrying client can get through, i.e. all but ``PERMANENT_FAILURE``.
_RETRYABLE_FAULTS: Final = tuple(f for f in Fault if f is not Fault.PERMANENT_FAILURE)


def _rates_converter(rates: Mapping[Fault, float]) -> Mapping[Fault, float]:
    for fault, rate in rates.items():
        if not isinstance(fault, Fault):
            raise TypeError(f"rates keys must be Fault members, got {fault!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate of {fault.name} must be within [0, 1], got {rate}")
    # A little slack: ten rates of 0.1 do not add up to exactly 1.0 in floating point.
    total = sum(rates.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"fault rates add up to {total}, more than 1")
    # Enum order, not the caller's insertion order, so that equal plans draw alike.
    return types.MappingProxyType({f: float(rates[f]) for f in Fault if f in rates})


@define(frozen=True)
class FaultPlan:
    """Random faults: the chance of each fault on each faultable request.

    One random draw per authenticated, well-formed request picks at most one
    fault, so a plan with a seed gives the same sequence of faults on every run
    (the n-th such request always gets the same fault; which message that is
    depends on the order requests arrive in).

    Args:
        rates: Chance (0 to 1) of each fault; together at most 1.
        seed: Seed of the draws; ``None`` uses the server's ``seed``.

    Raises:
        ValueError: A rate outside [0, 1], or rates adding up to more than 1.
        TypeError: A key that is not a ``Fault``.

    Example:
        >>> FaultPlan({Fault.HTTP_503: 0.05, Fault.DROP_AFTER: 0.01}, seed=42)
    """

    # Read-only (a mappingproxy), which neither hashes nor pickles: the hash is the
    # seed's (equal plans still hash alike) and __reduce__ rebuilds from a dict.
    rates: Mapping[Fault, float] = field(factory=dict, converter=_rates_converter, hash=False)
    seed: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (FaultPlan, (dict(self.rates), self.seed))

    @classmethod
    def uniform(
        cls, rate: float, faults: Iterable[Fault] | None = None, *, seed: int | None = None
    ) -> FaultPlan:
        """A plan where ``rate`` of the requests fail, spread evenly over ``faults``.

        Args:
            rate: Chance (0 to 1) that a request gets some fault.
            faults: The faults to spread over; default: every fault but
                ``PERMANENT_FAILURE``, since a retrying client gets through those.
            seed: Seed of the draws; ``None`` uses the server's ``seed``.

        Returns:
            The plan.

        Raises:
            ValueError: ``rate`` outside [0, 1], or ``faults`` empty.
        """
        kinds = _RETRYABLE_FAULTS if faults is None else tuple(dict.fromkeys(faults))
        if not kinds:
            raise ValueError("faults must name at least one Fault")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate}")
        return cls({f: rate / len(kinds) for f in kinds}, seed=seed)


@define(frozen=True)
class RequestInfo:
    """What a fault predicate (``inject(..., when=...)``) learns about a request.

    Attributes:
        department_uuid: The ``departmentUUID`` of the path.
        user_uuid: The ``userUUID`` of the path.
        message: The parsed request body.
        idempotency_key: The ``Idempotency-Key`` header, if any.
        retry_count: The ``X-Retry-Count`` header (0 when absent): which retry this is.
    """

    department_uuid: str
    user_uuid: str
    message: TextMessage
    idempotency_key: str | None
    retry_count: int


@define(frozen=True)
class ReceivedMessage:
    """One message the fake service accepted.

    Attributes:
        department_uuid: The ``departmentUUID`` of the path.
        user_uuid: The ``userUUID`` of the path.
        message: The parsed request body.
        idempotency_key: The ``Idempotency-Key`` header, if any.
        retry_count: The ``X-Retry-Count`` header of the accepted attempt (0 when
            absent).
        message_uuid: The ``messageUuid`` the service answered.
        request_uuid: The ``requestUuid`` the service answered.
    """

    department_uuid: str
    user_uuid: str
    message: TextMessage
    idempotency_key: str | None
    retry_count: int
    message_uuid: str
    request_uuid: str


class _Default(enum.Enum):
    # A sentinel with a readable repr in signatures and help().
    TIMES = "<1, or unlimited with when=>"

    def __repr__(self) -> str:
        return self.value


@define
class _Rule:
    fault: Fault
    remaining: int | None
    when: Callable[[RequestInfo], bool] | None


_JSON: Final = "application/json"
_HTML_502: Final = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_HTML_504: Final = (
    "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    "<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_FAILURES: Final = {
    Fault.TRANSIENT_FAILURE: (
        "TEMPORARILY_UNAVAILABLE",
        "Service temporarily unavailable, try again",
    ),
    Fault.PERMANENT_FAILURE: ("INVALID_USER", "User does not exist"),
}
_NOT_RECORDED_STATUS: Final = {
    Fault.HTTP_500: (500, "500 Internal Server Error", "text/plain"),
    Fault.HTTP_502: (502, _HTML_502, "text/html"),
    Fault.HTTP_503: (503, "503 Service Unavailable", "text/plain"),
    Fault.HTTP_504: (504, _HTML_504, "text/html"),
}


#: Where the request schema lives in the package (generated from spec/botmessage-openapi.yaml).
_REQUEST_SCHEMA: Final = "schemas/send-request.json"
#: A request's ``messageAttributes.body``: blank text there is answered 422, not 400.
_BODY_PATH: Final = ("messageAttributes", "body")
#: Bounds on a 400's problem list, so that a huge body cannot make a huge answer.
_MAX_PROBLEMS: Final = 10
_MAX_PROBLEM_CHARS: Final = 200
#: What a field the request leaves out stands for: the SDK's own defaults.
_DEFAULTS: Final = TextMessage("-")
#: The largest request body read. aiohttp's default (1 MiB) answered 413, a status
#: the spec does not list, to the SDK's largest message (1 MiB of text, up to six
#: times that once JSON escapes it); this leaves room for a raised ``max_text_bytes``.
_MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024


class _RefusedError(Exception):
    """A request body the fake server does not accept: the status and what is wrong."""

    def __init__(self, status: int, problems: list[str]) -> None:
        super().__init__(status, problems)
        self.status = status
        self.problems = problems


def _request_validator() -> jsonschema.protocols.Validator:
    """A validator of the request schema shipped with the package."""
    text = importlib.resources.files(__package__).joinpath(_REQUEST_SCHEMA).read_text("utf-8")
    schema = json.loads(text)
    validator: jsonschema.protocols.Validator = jsonschema.validators.validator_for(schema)(schema)
    return validator


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Which of two values counts would be a guess: refuse the body instead.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("an object holds one key twice")
    return result


def _problem(error: jsonschema.ValidationError) -> str:
    text = f"{error.json_path}: {error.message}"
    return text if len(text) <= _MAX_PROBLEM_CHARS else f"{text[:_MAX_PROBLEM_CHARS]}..."


def _message_from_json(data: Mapping[str, Any]) -> TextMessage:
    """The message a schema-valid request body holds.

    The fake server's own reading of the spec's camelCase names, independent of
    the SDK's encoder, so that a wrong name on the SDK's side fails the schema
    instead of passing on both sides. A field left out takes the SDK's default.
    """
    attributes: Mapping[str, Any] = data["messageAttributes"]
    sending: Mapping[str, Any] = data.get("messageSendingAttributes", {})
    return TextMessage(
        attributes["body"],
        subject=attributes.get("subject"),
        sender_name=sending.get("senderName"),
        recipient_communication_value=sending.get("recipientCommunicationValue"),
        type=attributes.get("type", _DEFAULTS.type),
        purpose=attributes.get("purpose", _DEFAULTS.purpose),
        is_manual=attributes.get("isManual", _DEFAULTS.is_manual),
    )


def _read_request(body: bytes, validator: jsonschema.protocols.Validator) -> TextMessage:
    """The message of a send request body.

    Raises:
        _RefusedError: 400 for a body that is not JSON or not the request schema,
            422 for one whose only fault is a blank message text.
    """
    try:
        data = json.loads(body, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _RefusedError(400, [f"not JSON: {exc}"[:_MAX_PROBLEM_CHARS]]) from None
    errors = sorted(validator.iter_errors(data), key=lambda e: (e.json_path, e.message))
    if not errors:
        return _message_from_json(data)
    if all(e.validator == "pattern" and tuple(e.absolute_path) == _BODY_PATH for e in errors):
        raise _RefusedError(422, ["$.messageAttributes.body: must not be empty or whitespace"])
    raise _RefusedError(400, [_problem(e) for e in errors[:_MAX_PROBLEMS]])


def _decimal(digits: str) -> int:
    """The value of ASCII decimal ``digits``, however many (``int()`` refuses over 4,300)."""
    value = 0
    for start in range(0, len(digits), 4000):
        chunk = digits[start : start + 4000]
        value = value * 10 ** len(chunk) + int(chunk)
    return value


def _detail(status: int, detail: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps({"detail": detail}).encode(),
        content_type=_JSON,
        headers=headers,
    )


class FakeBotMessageServer:
    """An in-process fake of the bot-message service, on 127.0.0.1.

    Use it as an async context manager (or ``await start()`` / ``await close()``)
    and point the client at ``base_url``.

    Args:
        username: The Basic-auth user name the server accepts.
        password: The Basic-auth password the server accepts.
        faults: Random faults to inject; see ``FaultPlan``.
        fault_rate: Shortcut for ``faults=FaultPlan.uniform(fault_rate)``: that
            share of requests get a fault, spread over every retryable fault.
        latency: Seconds every request waits before it is handled.
        seed: Makes the random faults (when the plan has no seed of its own) and
            the UUIDs the server answers reproducible.
        retry_after: ``Retry-After`` value of ``Fault.RATE_LIMITED`` answers, sent
            as is; ``None`` leaves the header out. The default ``"0"`` keeps tests
            fast; pass ``"1"`` (or an HTTP date) to test waiting.
        fault_latency: Extra seconds a ``Fault.LATENCY`` request waits.
        idempotency_header: Header carrying the idempotency key.
        retry_count_header: Header carrying the retry number.
        port: Port to listen on (127.0.0.1 only); 0, the default, picks a free one.

    Raises:
        ValueError: Both ``faults`` and ``fault_rate`` given, a negative, infinite or NaN delay,
            a ``fault_rate`` outside [0, 1], or a ``:`` in ``username``.

    Attributes:
        messages: Every message accepted, in order; a repeated idempotency key
            is recorded once.
        requests: Every HTTP request that reached the endpoint, whatever the answer.
        duplicates: Requests answered from the idempotency memory.
        faults_injected: How many times each fault was injected.
    """

    def __init__(
        self,
        *,
        username: str = "user",
        password: str = "secret",  # noqa: S107 - a fake server's default credential
        faults: FaultPlan | None = None,
        fault_rate: float | None = None,
        latency: float = 0.0,
        seed: int | None = None,
        retry_after: str | None = "0",
        fault_latency: float = 0.05,
        idempotency_header: str = "Idempotency-Key",
        retry_count_header: str = "X-Retry-Count",
        port: int = 0,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be within [0, 65535], got {port}")
        if faults is not None and fault_rate is not None:
            raise ValueError("give faults or fault_rate, not both")
        # Finite and not NaN: asyncio.sleep(nan) or sleep(inf) never returns, so every
        # request would hang.
        if not all(d >= 0 and math.isfinite(d) for d in (latency, fault_latency)):
            raise ValueError("latency and fault_latency must be finite and not negative")
        if fault_rate is not None:
            faults = FaultPlan.uniform(fault_rate)
        self._username = username
        self._password = password
        # The client sends exactly this; comparing strings skips base64 on the hot path.
        self._authorization = aiohttp.encode_basic_auth(username, password)
        self._latency = latency
        self._seed = seed
        self._retry_after = retry_after
        self._fault_latency = fault_latency
        self._idempotency_header = idempotency_header
        self._retry_count_header = retry_count_header
        self._validator = _request_validator()
        self._id_rng = self._new_id_rng()
        self._rules: list[_Rule] = []
        self._plan: FaultPlan
        self._fault_rng: random.Random
        self._thresholds: tuple[tuple[float, Fault], ...]
        self.fault_plan = faults if faults is not None else FaultPlan()

        self.messages: list[ReceivedMessage] = []
        self.requests = 0
        self.duplicates = 0
        self.faults_injected: collections.Counter[Fault] = collections.Counter()
        # Idempotency memory: the key's record holds all of the first answer, so a
        # message costs one dict entry beyond its record.
        self._by_key: dict[str, ReceivedMessage] = {}

        self._runner: web.AppRunner | None = None
        self._bind_port = port
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start serving on 127.0.0.1 (on a free port unless one was given).

        Raises:
            RuntimeError: The server is already started.
        """
        if self._runner is not None:
            raise RuntimeError("FakeBotMessageServer is already started")
        app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
        app.router.add_post(_SEND_PATH, self._handle)
        # No access log: a throughput test would spend its time logging.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        # Binding the socket ourselves gives the port without private attributes.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", self._bind_port))
            site = web.SockSite(runner, sock, backlog=1024)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._port = sock.getsockname()[1]
        self._runner = runner

    async def close(self) -> None:
        """Stop serving and close every connection; calling it again does nothing.

        Records and counters stay readable after closing.
        """
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeBotMessageServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The TCP port the server listens on.

        Raises:
            RuntimeError: The server was never started.
        """
        if self._port is None:
            raise RuntimeError("FakeBotMessageServer is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The client's ``base_url``, e.g. ``http://127.0.0.1:54321``.

        Raises:
            RuntimeError: The server was never started.
        """
        return f"http://127.0.0.1:{self.port}"

    @property
    def username(self) -> str:
        """The Basic-auth user name the server accepts."""
        return self._username

    @property
    def password(self) -> str:
        """The Basic-auth password the server accepts."""
        return self._password

    def url(self, department_uuid: str, user_uuid: str) -> str:
        """The full send URL for one user of one department (for raw HTTP clients).

        Raises:
            RuntimeError: The server was never started.
        """
        return (
            f"{self.base_url}/communications/department/{department_uuid}"
            f"/user/{user_uuid}/botmessage/send"
        )

    # -- faults --------------------------------------------------------------------

    @property
    def fault_plan(self) -> FaultPlan:
        """The random faults in force; assign a new ``FaultPlan`` to change them.

        Assigning restarts the random draws from the plan's seed (or the server's).
        """
        return self._plan

    @fault_plan.setter
    def fault_plan(self, plan: FaultPlan) -> None:
        seed = plan.seed if plan.seed is not None else self._seed
        self._plan = plan
        self._fault_rng = random.Random(seed)  # noqa: S311 - reproducible on purpose
        cumulative = 0.0
        thresholds = []
        for fault, rate in plan.rates.items():
            if rate > 0:
                cumulative += rate
                thresholds.append((cumulative, fault))
        self._thresholds = tuple(thresholds)

    def inject(
        self,
        fault: Fault,
        *,
        times: int | Literal[_Default.TIMES] | None = _Default.TIMES,
        when: Callable[[RequestInfo], bool] | None = None,
    ) -> None:
        """Script a fault for upcoming requests.

        Scripted faults come before the random ones of the ``FaultPlan``; when
        several match a request, the one injected first applies.

        Args:
            fault: The fault.
            times: How many requests get it; ``None`` for every one until
                ``clear_faults()``. Default: 1 request, or every matching one
                when ``when`` is given.
            when: Only requests for which this returns true get it (and count
                toward ``times``). It runs inside the request handler: if it
                raises, the client gets a 500 and aiohttp logs the error.

        Raises:
            ValueError: ``times`` is less than 1.
            TypeError: ``times`` is not an int.

        Example:
            >>> server.inject(Fault.HTTP_502, times=3)
            >>> server.inject(Fault.PERMANENT_FAILURE, when=lambda r: r.user_uuid == "gone")
            >>> server.inject(Fault.DROP_AFTER, when=lambda r: r.retry_count == 0)
            >>> server.inject(Fault.HTTP_500, times=None)  # until clear_faults()
        """
        if times is _Default.TIMES:
            times = 1 if when is None else None
        if times is not None and not isinstance(times, int):
            # A count of 1.5 would never reach 0: the fault would last for ever.
            raise TypeError(f"times must be an int (or None), got {times!r}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 (or None), got {times}")
        self._rules.append(_Rule(fault, times, when))

    def clear_faults(self) -> None:
        """Forget every scripted fault (the ``FaultPlan`` stays)."""
        self._rules.clear()

    def reset(self) -> None:
        """Start over without restarting: as if just constructed with the same arguments.

        Forgets scripted faults, records, counters and the idempotency memory, and
        restarts the seeded random sequences. The ``fault_plan`` stays.
        """
        self._id_rng = self._new_id_rng()
        self.fault_plan = self._plan
        self._rules.clear()
        self.messages.clear()
        self._by_key.clear()
        self.requests = 0
        self.duplicates = 0
        self.faults_injected.clear()

    # -- records -------------------------------------------------------------------

    def received(self, department_uuid: str, user_uuid: str) -> list[ReceivedMessage]:
        """The messages accepted for one user of one department, in order.

        Args:
            department_uuid: The ``departmentUUID`` of the path.
            user_uuid: The ``userUUID`` of the path.

        Returns:
            The matching records of ``messages``.
        """
        return [
            m
            for m in self.messages
            if m.user_uuid == user_uuid and m.department_uuid == department_uuid
        ]

    # -- the endpoint --------------------------------------------------------------

    def _new_id_rng(self) -> random.Random:
        # Not cryptography: ids of a fake, reproducible when seeded. A stream of its
        # own, so that the fault draws do not depend on how many ids were made.
        return random.Random(None if self._seed is None else f"ids:{self._seed}")  # noqa: S311

    def _new_uuid(self) -> str:
        return str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))

    def _authorized(self, header: str | None) -> bool:
        if header == self._authorization:
            return True
        if header is None:
            return False
        # Slow path for what the exact match misses: a lower-case scheme, extra
        # blanks, a client encoding the credentials as Latin-1 rather than UTF-8.
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        for encoding in ("utf-8", "latin-1"):
            try:
                user, sep, password = raw.decode(encoding).partition(":")
            except UnicodeDecodeError:
                continue
            if sep and secrets.compare_digest(
                f"{user}:{password}".encode(), f"{self._username}:{self._password}".encode()
            ):
                return True
        return False

    def _pick_fault(self, info: Callable[[], RequestInfo]) -> Fault | None:
        fault: Fault | None = None
        if self._rules:
            request_info: RequestInfo | None = None
            for i, rule in enumerate(self._rules):
                if rule.when is not None:
                    if request_info is None:
                        request_info = info()
                    if not rule.when(request_info):
                        continue
                fault = rule.fault
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        del self._rules[i]
                break
        if self._thresholds:
            # Drawn even when a scripted fault wins, so the n-th request draws the
            # same number whatever was scripted.
            draw = self._fault_rng.random()
            if fault is None:
                for threshold, candidate in self._thresholds:
                    if draw < threshold:
                        fault = candidate
                        break
        if fault is not None:
            self.faults_injected[fault] += 1
        return fault

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        # force_close() closes the transport, so aiohttp's attempt to write the
        # response we return fails with a ConnectionError it treats as a client
        # that went away: nothing is sent and nothing is logged. (Raising instead
        # would make aiohttp log the error and try to answer 500.)
        request.protocol.force_close()
        return web.Response()

    def _success(self, record: ReceivedMessage) -> bytes:
        return (
            f'{{"requestUuid":"{record.request_uuid}","status":"SUCCESS",'
            f'"messageUuid":"{record.message_uuid}","errors":[],"warnings":[]}}'
        ).encode()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self._latency:
            await asyncio.sleep(self._latency)
        if not self._authorized(request.headers.get(hdrs.AUTHORIZATION)):
            return _detail(
                401,
                "Authentication required",
                {hdrs.WWW_AUTHENTICATE: 'Basic realm="botmessage"'},
            )
        try:
            body = await request.read()
        except ConnectionError:
            # The client went away mid-request (a test killed it): nothing to answer.
            return web.Response(status=499)
        try:
            message = _read_request(body, self._validator)
        except _RefusedError as exc:
            return _detail(exc.status, exc.problems)
        headers = request.headers
        key = headers.get(self._idempotency_header)
        raw_retry = headers.get(self._retry_count_header)
        retry_count = 0
        if raw_retry is not None:
            # Stricter than the real service (which ignores the header) on purpose:
            # a garbled header is an SDK bug worth a loud failure in tests.
            if not (raw_retry.isascii() and raw_retry.isdigit()):
                return _detail(400, [f"{self._retry_count_header}: not a non-negative integer"])
            retry_count = _decimal(raw_retry)
        department_uuid = request.match_info["departmentUUID"]
        user_uuid = request.match_info["userUUID"]

        fault = None
        if self._rules or self._thresholds:
            fault = self._pick_fault(
                lambda: RequestInfo(department_uuid, user_uuid, message, key, retry_count)
            )
            if fault is not None:
                early = await self._fault_before(request, fault)
                if early is not None:
                    return early

        record = self._by_key.get(key) if key is not None else None
        if record is not None:
            self.duplicates += 1
        else:
            record = ReceivedMessage(
                department_uuid,
                user_uuid,
                message,
                key,
                retry_count,
                self._new_uuid(),
                self._new_uuid(),
            )
            self.messages.append(record)
            if key is not None:
                self._by_key[key] = record

        if fault is Fault.DROP_AFTER:
            return self._drop(request)
        body = self._success(record)
        if fault is Fault.MALFORMED:
            body = body[: len(body) // 2]
        return web.Response(body=body, content_type=_JSON)

    async def _fault_before(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        """The answer of a fault that stops the message, or None to process it."""
        if fault is Fault.LATENCY:
            await asyncio.sleep(self._fault_latency)
            return None
        if fault is Fault.DROP_AFTER or fault is Fault.MALFORMED:
            return None
        if fault is Fault.DROP_BEFORE:
            return self._drop(request)
        if fault is Fault.RATE_LIMITED:
            headers: dict[str, str] = {}
            if self._retry_after is not None:
                headers[hdrs.RETRY_AFTER] = self._retry_after
            return _detail(429, "Too many requests", headers)
        failure = _FAILURES.get(fault)
        if failure is not None:
            code, description = failure
            answer: dict[str, Any] = {
                "requestUuid": self._new_uuid(),
                "status": "FAILURE",
                "errors": [
                    {
                        "errorCode": code,
                        "errorDescription": description,
                        "errorUID": self._new_uuid(),
                    }
                ],
                "warnings": [],
            }
            return web.Response(body=json.dumps(answer).encode(), content_type=_JSON)
        status, text, content_type = _NOT_RECORDED_STATUS[fault]
        return web.Response(status=status, text=text, content_type=content_type)
