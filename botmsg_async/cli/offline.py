"""The offline commands: ``botmsg fake-server`` and ``botmsg demo``.

Both use the fake service of ``botmsg_async.testing``, imported when run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid
from typing import TYPE_CHECKING, Any, Final

from botmsg_async import (
    BotMessageClient,
    ItemResult,
    Outcome,
    RetryBudget,
    RetryPolicy,
    SendRequest,
    TextMessage,
)

from .common import (
    ENV_BASE_URL,
    ENV_PASSWORD,
    ENV_USERNAME,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNKNOWN,
    MAX_LISTED_FAILURES,
    UsageError,
)
from .console import Bar, Console
from .credentials import read_password_stdin
from .signals import run

if TYPE_CHECKING:
    # Imported when used: the fake service is for fake-server and demo only.
    from botmsg_async.testing import FakeBotMessageServer

__all__ = ["cmd_demo", "cmd_fake_server"]

# -- fake-server ---------------------------------------------------------------------------


def cmd_fake_server(args: argparse.Namespace, console: Console) -> int:
    """Run ``botmsg fake-server`` until a signal; return the exit code.

    Raises:
        UsageError: a bad flag, or the port cannot be used.
    """
    from botmsg_async.testing import FakeBotMessageServer

    if args.fault_rate is not None and not 0.0 <= args.fault_rate <= 1.0:
        raise UsageError("--fault-rate must be between 0 and 1")
    if args.latency < 0:
        raise UsageError("--latency must not be negative")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be between 0 and 65535")
    options: dict[str, Any] = {"latency": args.latency, "seed": args.seed}
    if args.fault_rate:
        options["fault_rate"] = args.fault_rate
    if args.password_stdin:
        password = read_password_stdin()
        username = args.username or "user"
        console.redact.add_credentials(username, password)
        options.update(username=username, password=password)
    elif args.username:
        options["username"] = args.username
    if args.port:
        options["port"] = args.port
    server = FakeBotMessageServer(**options)
    return run(_serve(console, server, args.port), on_signal=EXIT_OK, loop=args.loop)


async def _serve(console: Console, server: FakeBotMessageServer, port: int) -> int:
    try:
        await server.start()
    except OSError as exc:  # the port is taken, or privileged
        raise UsageError(f"--port {port}: cannot listen on 127.0.0.1: {exc.strerror}") from None
    try:
        console.out(server.base_url)
        console.err(
            f"fake service on {server.base_url}, user {server.username!r}; "
            "stop with Ctrl-C. Try: "
            f"{ENV_BASE_URL}={server.base_url} {ENV_USERNAME}={server.username} "
            f"{ENV_PASSWORD}=... botmsg send --department d-1 --user u-1 --text hi"
        )
        await asyncio.Event().wait()  # until a signal cancels us
    finally:
        received, requests = len(server.messages), server.requests
        console.err(f"stopping: {received} message(s) received in {requests} request(s)")
        await server.close()
    return EXIT_OK  # pragma: no cover - only a signal ends the wait


# -- demo ------------------------------------------------------------------------------------

_FIRST_NAMES: Final = (
    "Ada", "Ben", "Chloé", "Dmitri", "Emeka", "Fatima", "Grace", "Hiro", "Inès", "Jonas",
    "Kateryna", "Liam", "Maya", "Nikhil", "Olga", "Pablo", "Qing", "Rosa", "Sven", "Thandiwe",
)  # fmt: skip
_TEMPLATES: Final = (
    "Hi {name}, your shift on {day} starts at {hour}:00. Reply STOP to opt out.",
    "{name}, your expense report #{number} was approved and will be paid on {day}.",
    "Reminder for {name}: the security training is due by {day}.",
    "Hello {name}! Ticket #{number} was resolved. Tell us how we did.",
    "{name}, the {hour}:00 meeting on {day} moved to room {number}.",
    "Welcome aboard, {name}! Your laptop will be ready on {day}.",
)
_DAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")


def _demo_items(
    rng: random.Random, messages: int, users: int, departments: int
) -> list[SendRequest]:
    def new_uuid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    dept_ids = [new_uuid() for _ in range(departments)]
    people = [
        (dept_ids[i % departments], new_uuid(), rng.choice(_FIRST_NAMES)) for i in range(users)
    ]
    items = []
    for n in range(messages):
        department_uuid, user_uuid, name = people[n % users]
        text = rng.choice(_TEMPLATES).format(
            name=name, day=rng.choice(_DAYS), hour=rng.randint(7, 18), number=rng.randint(100, 9999)
        )
        items.append(
            SendRequest(department_uuid, user_uuid, TextMessage(text, sender_name="HR bot"))
        )
    return items


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """Run ``botmsg demo``; return the exit code."""
    return run(_demo(args, console), loop=args.loop)


async def _demo(args: argparse.Namespace, console: Console) -> int:
    from botmsg_async.testing import FakeBotMessageServer, Fault, FaultPlan

    rng = random.Random(args.seed)  # noqa: S311 - sample data, not cryptography
    items = _demo_items(rng, args.messages, users=200, departments=10)
    faults = FaultPlan(
        {
            Fault.TRANSIENT_FAILURE: 0.10,  # HTTP 200 with "FAILURE": temporarily unavailable
            Fault.RATE_LIMITED: 0.03,  # 429, Retry-After: 0
            Fault.HTTP_503: 0.02,
            Fault.LATENCY: 0.05,
        },
        seed=args.seed,
    )
    # Quick retries so the demo takes seconds; enough attempts that ~15 % faults
    # per attempt practically never exhaust them; a budget that never runs dry.
    policy = RetryPolicy(max_attempts=10, backoff_initial=0.02, backoff_max=0.2, deadline=20.0)
    budget = RetryBudget(ratio=1.0, min_per_second=1000.0, burst=10_000.0)
    async with FakeBotMessageServer(faults=faults, seed=args.seed) as server:
        console.redact.add_credentials(server.username, server.password)
        console.out(
            f"demo: {len(items)} messages to 200 users in 10 departments, against a fake "
            f"service on {server.base_url} that answers ~10% FAILURE (transient), "
            "~3% 429, ~2% 503 and delays ~5%"
        )
        bar = Bar(console, len(items), "demo")
        counts = dict.fromkeys(Outcome, 0)

        def on_result(item: ItemResult) -> None:
            counts[item.outcome] += 1
            bar.update(counts[Outcome.FAILED], counts[Outcome.UNKNOWN])

        async with BotMessageClient(
            server.base_url, server.username, server.password, retry=policy, retry_budget=budget
        ) as client:
            batch = await client.send_many(
                items, concurrency=args.concurrency, on_result=on_result, keep="failures"
            )
        bar.close()
        report: dict[str, object] = {
            "sent": batch.sent,
            "failed": batch.failed,
            "unknown": batch.unknown,
            "skipped": batch.skipped,
            "retries": batch.retries,
            "seconds": round(batch.elapsed, 2),
            "messages_per_second": round(batch.messages_per_second, 1),
            "server_received": len(server.messages),
            "server_requests": server.requests,
            "server_duplicates": server.duplicates,
            "faults_injected": {f.value: n for f, n in server.faults_injected.items()},
        }
        faults_injected = dict(server.faults_injected)
    faults_seen = ", ".join(f"{n} {f.value}" for f, n in faults_injected.items())
    console.out(
        f"sent      {batch.sent}\n"
        f"failed    {batch.failed}\n"
        f"unknown   {batch.unknown}\n"
        f"retries   {batch.retries}\n"
        f"time      {batch.elapsed:.2f} s, {report['messages_per_second']} messages/s\n"
        f"service   received {report['server_received']} messages in "
        f"{report['server_requests']} requests; duplicates: {report['server_duplicates']}\n"
        f"faults    {faults_seen or 'none'}\n"
        "report as JSON:"
    )
    console.out(console.dumps(report))
    for item in batch.results[:MAX_LISTED_FAILURES]:
        console.err(
            f"item {item.index} (user={item.user_uuid}): {item.outcome.value}: {item.error}"
        )
    if batch.unknown:
        return EXIT_UNKNOWN
    return EXIT_OK if batch.sent == len(items) else EXIT_FAILED
