"""client.with_options(): a cheap view sharing the pool, 429 pause, budget and limiter."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest

from botmsg_async import (
    BotMessageClient,
    ClientClosedError,
    InvalidRequestError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
)

from .conftest import DEPT, USER, FakeClock, ScriptedServer, Sleeps, answer

MakeClient = Callable[..., BotMessageClient]


class RecordingLimiter:
    """A RateLimiter that grants at once and records who asked."""

    def __init__(self) -> None:
        self.acquired: list[str] = []
        self.paused: list[float] = []

    async def acquire(self, department_uuid: str) -> None:
        self.acquired.append(department_uuid)

    async def pause(self, seconds: float) -> None:
        self.paused.append(seconds)

    async def paused_for(self) -> float:
        return 0.0


async def test_a_view_shares_the_pool_and_sends_its_own_headers(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Parent and view send over one pooled connection; only the view adds its headers."""
    async with make_client(server.base_url, default_headers={"X-Tenant": "t1"}) as client:
        view = client.with_options(headers={"X-Priority": "high"})
        await client.send(DEPT, USER, "from the client")
        await view.send(DEPT, USER, "from the view")
        await client.send(DEPT, USER, "from the client again")
    assert len(server.peers) == 1  # one connection: one pool
    parent, viewed, again = (headers for _, headers, _ in server.seen)
    assert "X-Priority" not in parent
    assert "X-Priority" not in again
    assert viewed["X-Priority"] == "high"
    assert viewed["X-Tenant"] == parent["X-Tenant"] == "t1"


async def test_a_view_has_its_own_retry_policy(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """retry= on the view applies to the view's sends only."""
    policy = RetryPolicy(retry_ambiguous=True, backoff_initial=0, backoff_max=0, max_attempts=3)
    server.script += [answer(502, "bad gateway")] * 2
    async with make_client(server.base_url, retry=policy) as client:
        view = client.with_options(retry=RetryPolicy.none())
        with pytest.raises(ServerError) as info:
            await view.send(DEPT, USER, "once")
        result = await client.send(DEPT, USER, "retried")
    assert info.value.attempts == 1
    assert result.attempts == 2


async def test_a_429_through_the_view_pauses_the_client(
    server: ScriptedServer, make_client: MakeClient, sleeps: Sleeps
) -> None:
    """The Retry-After a view is told pauses the parent's next send (one account)."""
    clock = FakeClock()
    server.script.append(answer(429, "slow down", {"Retry-After": "5"}))
    async with make_client(server.base_url, clock=clock) as client:
        view = client.with_options(retry=RetryPolicy.none())
        with pytest.raises(RateLimitedError):
            await view.send(DEPT, USER, "throttled")
        assert client.pause_remaining() == 5.0
        assert view.pause_remaining() == 5.0
        sleeps.waits.clear()
        await client.send(DEPT, USER, "waits first")
    assert sleeps.waits
    assert sleeps.waits[0] >= 5.0


async def test_a_429_through_the_client_pauses_the_view(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """And the other way round: the client's pause is the view's."""
    clock = FakeClock()
    server.script.append(answer(429, "slow down", {"Retry-After": "12"}))
    async with make_client(server.base_url, clock=clock, retry=RetryPolicy.none()) as client:
        view = client.with_options(timeout=3.0)
        with pytest.raises(RateLimitedError):
            await client.send(DEPT, USER, "throttled")
        assert view.pause_remaining() == 12.0


async def test_a_view_shares_the_retry_budget_and_the_rate_limiter(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """One budget and one limiter for the client and all its views."""
    limiter = RecordingLimiter()
    async with make_client(server.base_url, rate_limiter=limiter) as client:
        view = client.with_options(timeout=5.0)
        await view.send("dept-view", USER, "hello")
        await client.send("dept-client", USER, "hello")
        assert view.retry_budget is client.retry_budget
    assert limiter.acquired == ["dept-view", "dept-client"]


async def test_closing_a_view_leaves_the_client_open(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """aclose() / async with on a view closes the view only."""
    async with make_client(server.base_url) as client:
        async with client.with_options(timeout=5.0) as view:
            await view.send(DEPT, USER, "via the view")
        assert view.closed
        assert not client.closed
        with pytest.raises(ClientClosedError):
            await view.send(DEPT, USER, "closed view")
        await client.send(DEPT, USER, "the client still sends")
    assert len(server.seen) == 2


async def test_closing_the_client_closes_its_views(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Once the client is closed, so is every view of it (and views of views)."""
    client = make_client(server.base_url)
    view = client.with_options(timeout=5.0)
    grandchild = view.with_options(headers={"X-A": "1"})
    await view.send(DEPT, USER, "the view opens the shared session")
    await client.aclose()
    assert view.closed
    assert grandchild.closed
    assert "closed" in repr(view)
    with pytest.raises(ClientClosedError):
        await grandchild.send(DEPT, USER, "too late")
    with pytest.raises(ClientClosedError):
        client.with_options(timeout=1.0)


async def test_a_view_left_open_warns_nothing(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A view owns no session: dropping it unclosed is fine (warnings are errors here)."""
    async with make_client(server.base_url) as client:
        view = client.with_options(timeout=5.0)
        await view.send(DEPT, USER, "hello")
        del view
        gc.collect()
        await client.send(DEPT, USER, "still fine")


@pytest.mark.parametrize("name", ["Authorization", "content-type", "IDEMPOTENCY-KEY"])
async def test_a_view_refuses_the_clients_own_headers(
    server: ScriptedServer, make_client: MakeClient, name: str
) -> None:
    """with_options(headers=) refuses the same names as default_headers, in any case."""
    async with make_client(server.base_url) as client:
        with pytest.raises(InvalidRequestError) as info:
            client.with_options(headers={name: "x"})
    assert info.value.field == "headers"
    assert name in str(info.value)


async def test_a_views_policy_is_checked_against_the_clients_headers(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A view's policy may not use a header name the client already sends as its own."""
    async with make_client(server.base_url, default_headers={"X-Dedup": "1"}) as client:
        with pytest.raises(InvalidRequestError, match="X-Dedup"):
            client.with_options(retry=RetryPolicy(idempotency_header="x-dedup"))
