"""A call that timed out or was cancelled waiting for its answer is charged its whole reservation.

The provider bills a request it received and answered, whether or not the answer reached the
caller. The guard settled every exception of the model step as a call that failed before any
output, at $0: ``asyncio.wait_for(guard.ainvoke(...), 0.05)`` in a loop, or a client timeout shorter
than the answer, let the provider answer (and bill) call after call that the budget never saw. Now
such a call costs its reservation, the most it can cost; a call that failed before its request went
out (a refused connection) or that the provider refused (an HTTP error) still costs nothing.
"""

from __future__ import annotations

import asyncio
import socket
from decimal import Decimal
from typing import Any

import httpx
import pytest

from langchain_budgetguard import BudgetGuard, enforce_budget
from langchain_budgetguard.failures import billed_unknown
from langchain_budgetguard.pricing import Pricer

from tests.fakes import UsageChat
from tests.providers.canned_server import CannedServer

from .test_billed_items import canned, chat_openai, server  # noqa: F401 - the canned server's fixtures
from .test_tool_fees import MODEL, TOKENS, genai, reply


def reservation_of(guard: BudgetGuard, prompt: str = "hello", **kwargs: Any) -> Decimal:
    """What one such call reserves (the guard's own figure, read off a reservation it releases)."""
    reservation = guard.reserve([prompt], kwargs=kwargs)
    held = reservation.admitted.estimate.reserve
    reservation.settle()
    return Decimal(held) / 10**9


def test_an_async_call_cancelled_by_a_timeout_is_charged_its_reservation() -> None:
    model = UsageChat(delay=0.3)
    guard = BudgetGuard(model, limit=1)
    one = reservation_of(guard)

    async def impatient() -> None:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(guard.ainvoke("hello"), 0.02)

    asyncio.run(impatient())
    (status,) = guard.status()
    assert status.held == 0
    assert status.spent == 3 * one > 0


def test_a_client_timeout_is_charged_its_reservation_a_refused_connection_and_an_error_nothing(
    server: CannedServer,
) -> None:
    pricer = Pricer(hosts={"127.0.0.1": "openai"})
    slow = chat_openai(server, MODEL, use_responses_api=True, timeout=0.2)
    guard = BudgetGuard(slow, limit=1, pricer=pricer)
    one = reservation_of(guard, max_tokens=100)
    server.push({**reply(), "__delay_seconds__": 1.0})
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        guard.invoke("hello", max_tokens=100)
    (status,) = guard.status()
    assert status.held == 0 and status.spent == one

    # the same call answered in time is charged what the provider reports
    server.push(reply())
    guard.invoke("hello", max_tokens=100)
    assert guard.status()[0].spent == one + genai(TOKENS, MODEL, "openai")

    # an HTTP error (the provider refused the request) and a refused connection cost nothing
    before = guard.status()[0].spent
    server.push({"error": {"message": "overloaded"}})
    with pytest.raises(Exception, match="overloaded"):
        guard.invoke("hello", max_tokens=100)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # a port nobody listens on
    from langchain_openai import ChatOpenAI

    nowhere = ChatOpenAI(model=MODEL, base_url=f"http://127.0.0.1:{closed}/v1", api_key="test", max_retries=0,
                         use_responses_api=True)
    refused = BudgetGuard(nowhere, limit=1, pricer=pricer, store=guard.policy.store)
    with pytest.raises(Exception, match="(?i)connect"):
        refused.invoke("hello", max_tokens=100)
    (status,) = guard.status()
    assert status.spent == before and status.held == 0


def test_a_stream_that_breaks_off_is_charged_for_what_came_not_its_reservation() -> None:
    model = UsageChat(fail_after=2)
    guard = BudgetGuard(model, limit=1)
    one = reservation_of(guard)
    with pytest.raises(Exception):
        list(guard.stream("hello"))
    (status,) = guard.status()
    assert 0 < status.spent < one and status.held == 0


def test_enforce_budget_charges_a_timed_out_call_its_reservation(server: CannedServer) -> None:
    """A client timeout reaches enforce_budget's handler as on_llm_error: charged like the guard's."""
    slow = chat_openai(server, MODEL, use_responses_api=True, timeout=0.2)
    policy = BudgetGuard(limit=1, pricer=Pricer(hosts={"127.0.0.1": "openai"}))
    server.push({**reply(), "__delay_seconds__": 1.0})
    with enforce_budget(policy), pytest.raises(Exception, match="(?i)timed? ?out"):
        slow.invoke("hello", max_tokens=100)
    (status,) = policy.status()
    assert status.held == 0
    # the reservation (its 100 output tokens at $1.60 per million alone are $0.00016), not the input
    assert status.spent > Decimal("0.00016")


def test_enforce_budget_leaves_no_hold_of_a_cancelled_call_behind() -> None:
    """LangChain reports no error for a call whose task was cancelled (its gather is cancelled with
    it). On a model with no SDK whose requests are counted, enforce_budget cannot tell it from a start
    another handler aborted: it releases it when the run is gone, at the latest when the block ends
    (README; test_enforce_retries charges one on an SDK). The hold must not outlive that."""
    policy = BudgetGuard(limit=1)
    model = UsageChat(delay=0.3)

    async def impatient() -> None:
        with enforce_budget(policy):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(model.ainvoke("hello"), 0.02)

    asyncio.run(impatient())
    import gc

    gc.collect()
    (status,) = policy.status()
    assert status.held == 0


def _raised(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except BaseException as chained:
        return chained


@pytest.mark.parametrize("error, unknown", [
    (asyncio.CancelledError(), True),
    (KeyboardInterrupt(), True),
    (TimeoutError(), True),
    (httpx.ReadTimeout("read"), True),
    (httpx.RemoteProtocolError("peer closed"), True),
    (httpx.ConnectTimeout("connect"), False),
    (httpx.ConnectError("refused"), False),
    (httpx.PoolTimeout("pool"), False),
    (RuntimeError("bug"), False),
    (ValueError("bad JSON"), False),
    (None, False),
])
def test_billed_unknown_tells_a_call_the_provider_may_have_answered(error: Any, unknown: bool) -> None:
    assert billed_unknown(error) is unknown


def test_billed_unknown_reads_the_chain_of_causes() -> None:
    import openai

    request = httpx.Request("POST", "http://127.0.0.1/v1/responses")
    assert billed_unknown(_raised(openai.APITimeoutError(request), httpx.ReadTimeout("read")))
    # the SDK raises its timeout error for a connect timeout too: the cause says nothing went out
    assert not billed_unknown(_raised(openai.APITimeoutError(request), httpx.ConnectTimeout("connect")))
    assert not billed_unknown(_raised(openai.APIConnectionError(request=request), httpx.ConnectError("refused")))
    assert billed_unknown(_raised(RuntimeError("wrapped"), asyncio.CancelledError()))


@pytest.mark.parametrize("how", ["stream", "astream"])
def test_a_stream_that_times_out_before_its_first_chunk_is_charged_its_reservation(how: str) -> None:
    """The first chunk never came: the provider may still have answered (and billed) in full."""

    class TimesOut(UsageChat):
        def _stream(self, *args: Any, **kwargs: Any) -> Any:
            raise httpx.ReadTimeout("the answer did not come in time")
            yield  # noqa: unreachable - a generator

        async def _astream(self, *args: Any, **kwargs: Any) -> Any:
            raise httpx.ReadTimeout("the answer did not come in time")
            yield  # noqa: unreachable - a generator

    guard = BudgetGuard(TimesOut(), limit=1)
    one = reservation_of(guard)
    with pytest.raises(httpx.ReadTimeout):
        if how == "stream":
            list(guard.stream("hello"))
        else:
            async def drain() -> None:
                async for _ in guard.astream("hello"):
                    pass
            asyncio.run(drain())
    (status,) = guard.status()
    assert status.held == 0 and status.spent == one > 0
