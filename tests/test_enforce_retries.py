"""``enforce_budget`` charges the requests an SDK resent after they got no answer, as the guard does.

The block's handler sees only LangChain's start and end of a call: a ChatOpenAI with a short
timeout and ``max_retries`` got every answer but the last free. The handler now finds the model
its start event came from and counts the requests of its SDK while the call runs.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import httpx
import pytest

from langchain_core.callbacks import BaseCallbackHandler

from langchain_budgetguard import BudgetGuard, BudgetPolicy, Limit
from langchain_budgetguard.enforce import enforce_budget
from langchain_budgetguard.pricing import Pricer

from tests.providers.canned_server import CannedServer

from .test_billed_items import canned, server  # noqa: F401 - the canned server's fixtures
from .test_sdk_retries import PRICER, SLOW, TIMEOUT, late, openai
from .test_tool_fees import MODEL, TOKENS, genai, reply
from .test_unknown_outcome import reservation_of


def policy() -> BudgetPolicy:
    return BudgetPolicy(limits=[Limit(usd=1, per="user")], pricer=PRICER)


def spent(policy: BudgetPolicy) -> Decimal:
    (status,) = policy.status(user_id="alice")
    assert status.held == 0
    return status.spent


def one_reservation(server: CannedServer) -> Decimal:
    """What the block reserves for one such call: read off a call that got no answer and no retry."""
    probe = policy()
    server.push(late())
    with enforce_budget(probe, user_id="alice"), pytest.raises(Exception, match="(?i)timed? ?out"):
        openai(server, max_retries=0).invoke("hello", max_tokens=100)
    server.requests.clear()
    return spent(probe)


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "batch", "abatch"])
def test_a_resent_request_that_got_no_answer_is_charged_in_a_block(server: CannedServer, how: str) -> None:
    one = one_reservation(server)
    assert one > 0
    budget = policy()
    server.push(late(), reply())

    async def call_async() -> None:
        # its own async client: langchain-openai's shared default one is bound to an earlier event loop
        llm = openai(server, max_retries=1, http_async_client=httpx.AsyncClient())
        if how == "ainvoke":
            await llm.ainvoke("hello", max_tokens=100)
        else:
            await llm.abatch(["hello"], max_tokens=100)

    with enforce_budget(budget, user_id="alice"):
        if how == "invoke":
            openai(server, max_retries=1).invoke("hello", max_tokens=100)
        elif how == "batch":
            openai(server, max_retries=1).batch(["hello"], max_tokens=100)
        else:
            asyncio.run(call_async())
    assert len(server.requests) == 2  # the provider took (and may bill) both
    assert spent(budget) == genai(TOKENS, MODEL, "openai") + one


@pytest.mark.parametrize("how", ["stream", "astream"])
def test_a_stream_resent_after_it_got_no_answer_is_charged_in_a_block(openai_server: Any, how: str) -> None:
    from tests.conftest import list_price
    from tests.providers import Reply

    probe = policy()
    openai_server.script(Reply(text="late", delay=SLOW))
    with enforce_budget(probe, user_id="alice"), pytest.raises(Exception, match="(?i)timed? ?out"):
        list(openai_server.chat_model(timeout=TIMEOUT).stream("hello"))
    one = spent(probe)
    assert one > 0
    openai_server.reset()
    budget = policy()
    openai_server.script(Reply(text="late", delay=SLOW), Reply(text="a b c"))

    async def drain() -> str:
        llm = openai_server.chat_model(timeout=TIMEOUT, max_retries=1, stream_usage=True,
                                     http_async_client=httpx.AsyncClient())
        return "".join([c.content async for c in llm.astream("hello")])

    with enforce_budget(budget, user_id="alice"):
        if how == "stream":
            text = "".join(c.content for c in openai_server.chat_model(timeout=TIMEOUT, max_retries=1, stream_usage=True)
                           .stream("hello"))
        else:
            text = asyncio.run(drain())
    assert text == "a b c"
    lost, answered = openai_server.calls
    assert spent(budget) == list_price(answered) + one


def test_every_attempt_timing_out_is_charged_a_reservation_each_in_a_block(server: CannedServer) -> None:
    llm = openai(server, max_retries=2)
    one = one_reservation(server)
    budget = policy()
    server.push(late(), late(), late())
    with enforce_budget(budget, user_id="alice"), pytest.raises(Exception, match="(?i)timed? ?out"):
        llm.invoke("hello", max_tokens=100)
    assert spent(budget) == 3 * one


def test_an_error_status_resent_costs_nothing_more_in_a_block(server: CannedServer) -> None:
    llm = openai(server, max_retries=1)
    budget = policy()
    server.push({"error": {"message": "overloaded"}}, reply())
    with enforce_budget(budget, user_id="alice"):
        llm.invoke("hello", max_tokens=100)
    assert len(server.requests) == 2
    assert spent(budget) == genai(TOKENS, MODEL, "openai")


def test_requests_outside_a_call_and_after_the_block_are_not_counted(server: CannedServer) -> None:
    """The count is on while the block's call runs: the same client's later calls, outside the
    block or unguarded, charge the block's budget nothing."""
    llm = openai(server, max_retries=1)
    budget = policy()
    server.push(reply())
    with enforce_budget(budget, user_id="alice"):
        llm.invoke("hello", max_tokens=100)
    first = spent(budget)
    assert first == genai(TOKENS, MODEL, "openai")
    server.push(late(), reply())
    llm.invoke("hello", max_tokens=100)  # outside: nobody's budget here
    assert spent(budget) == first


def test_a_guard_on_another_budget_inside_a_block_charges_both_budgets_for_the_lost_attempt(
        server: CannedServer) -> None:
    """The block's count and the guard's count one request each: neither takes it from the other."""
    llm = openai(server, max_retries=1)
    guard = BudgetGuard(llm, limit=1, pricer=PRICER)
    one = one_reservation(server)
    guards = reservation_of(guard, max_tokens=100)
    budget = policy()
    server.push(late(), reply())
    with enforce_budget(budget, user_id="alice"):
        guard.invoke("hello", max_tokens=100)
    assert len(server.requests) == 2
    assert spent(budget) == genai(TOKENS, MODEL, "openai") + one
    (status,) = guard.status()
    assert status.held == 0 and status.spent == genai(TOKENS, MODEL, "openai") + guards


def test_anthropics_sdk_is_counted_in_a_block(server: CannedServer) -> None:
    from langchain_anthropic import ChatAnthropic

    from .test_billed_items import anthropic_body

    model = "claude-sonnet-4-5"
    pricer = Pricer(hosts={"127.0.0.1": "anthropic"})

    def llm(max_retries: int) -> Any:
        return ChatAnthropic(model=model, base_url=server.url, api_key="test", timeout=TIMEOUT, max_retries=max_retries)

    usage = {"input_tokens": 300, "output_tokens": 20}
    body = anthropic_body(model, usage)
    probe = BudgetPolicy(limits=[Limit(usd=1, per="user")], pricer=pricer)
    server.push({**body, "__delay_seconds__": SLOW})
    with enforce_budget(probe, user_id="alice"), pytest.raises(Exception, match="(?i)timed? ?out"):
        llm(0).invoke("hello", max_tokens=100)
    one = spent(probe)
    server.requests.clear()
    budget = BudgetPolicy(limits=[Limit(usd=1, per="user")], pricer=pricer)
    server.push({**body, "__delay_seconds__": SLOW}, body)
    with enforce_budget(budget, user_id="alice"):
        llm(1).invoke("hello", max_tokens=100)
    assert len(server.requests) == 2
    assert spent(budget) == genai(usage, model, "anthropic") + one


def test_nested_blocks_on_two_budgets_each_charge_the_lost_attempt(server: CannedServer) -> None:
    one = one_reservation(server)
    outer, inner = policy(), BudgetPolicy(name="team", limits=[Limit(usd=1, per="user")], pricer=PRICER)
    server.push(late(), reply())
    with enforce_budget(outer, user_id="alice"), enforce_budget(inner, user_id="alice"):
        openai(server, max_retries=1).invoke("hello", max_tokens=100)
    assert spent(outer) == spent(inner) == genai(TOKENS, MODEL, "openai") + one


# -- a call whose end never came: charged for the requests that went out -----------------------


def test_a_task_cancelled_while_its_request_waits_is_charged_its_reservation_in_a_block(server: CannedServer) -> None:
    """LangChain reports no end and no error for a cancelled task: the block used to release such a
    call for free although the provider took its request (and bills the answer it still sends)."""
    one = one_reservation(server)
    budget = policy()
    server.push(late())

    async def impatient() -> None:
        from langchain_openai import ChatOpenAI

        llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="test", use_responses_api=True,
                         timeout=5, max_retries=0, http_async_client=httpx.AsyncClient())
        with enforce_budget(budget, user_id="alice"):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(llm.ainvoke("hello", max_tokens=100), 0.3)

    asyncio.run(impatient())
    import gc

    gc.collect()
    assert len(server.requests) == 1
    assert spent(budget) == one


class RaisingAtEnd(BaseCallbackHandler):
    """A handler of the caller's, ahead of the enforcer, whose on_llm_end fails."""

    raise_error = True

    def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the caller's handler broke")


def test_an_answer_a_failing_handler_hid_and_the_block_caught_is_charged_its_reservation(
        server: CannedServer) -> None:
    """The enforcer never sees the reply, and the error does not leave the block (``answered`` would
    find the reply there): the call is charged its reservation, the most it can cost."""
    one = one_reservation(server)
    budget = policy()
    server.push(reply())
    with enforce_budget(budget, user_id="alice"):
        try:
            openai(server, max_retries=0).invoke("hello", max_tokens=100, config={"callbacks": [RaisingAtEnd()]})
        except RuntimeError:
            pass
    assert len(server.requests) == 1
    assert spent(budget) == one


class AbortingAtStart(BaseCallbackHandler):
    raise_error = True

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        raise PermissionError("not today")


def test_a_start_another_handler_aborted_still_costs_nothing(server: CannedServer) -> None:
    budget = policy()
    with enforce_budget(budget, user_id="alice") as enforcer:
        with pytest.raises(PermissionError):
            openai(server, max_retries=0).invoke("hello", max_tokens=100,
                                                 config={"callbacks": [enforcer, AbortingAtStart()]})
    assert server.requests == []
    assert spent(budget) == 0


def test_the_calls_after_an_aborted_start_are_not_counted_to_it(server: CannedServer) -> None:
    """The aborted call gets no end event and stays open while its run id lives (a kept traceback):
    the requests of the next calls in the same thread are theirs, not its."""
    import gc

    one = one_reservation(server)
    budget = policy()
    server.push(late(), reply())
    with enforce_budget(budget, user_id="alice") as enforcer:
        with pytest.raises(PermissionError) as aborted:
            openai(server, max_retries=0).invoke("hello", max_tokens=100,
                                                 config={"callbacks": [enforcer, AbortingAtStart()]})
        openai(server, max_retries=1).invoke("hello", max_tokens=100)  # one lost attempt, then the answer
        del aborted
        gc.collect()  # the aborted run is gone: the block's end settles it, for the nothing it sent
    assert len(server.requests) == 2
    assert spent(budget) == genai(TOKENS, MODEL, "openai") + one


@pytest.mark.parametrize("sends", [False, True], ids=["aborted start", "request sent"])
def test_a_call_whose_run_outlives_the_block_is_settled_once_its_run_is_gone(server: CannedServer,
                                                                              sends: bool) -> None:
    """A kept traceback keeps the run (and its hold, renewed) past the block's end; nothing there
    settles it. Once the run is gone the lease keeper settles it, as the block would have, instead
    of letting the hold expire and be charged its input estimate."""
    import gc
    import time

    lease = 0.6  # renewed every 0.2 s: a loaded machine must starve the keeper for 0.6 s to expire it
    one = one_reservation(server) if sends else Decimal(0)
    budget = BudgetPolicy(limits=[Limit(usd=1, per="user")], pricer=PRICER, lease_seconds=lease)
    if sends:
        server.push(reply())
    kept: list[BaseException] = []
    with enforce_budget(budget, user_id="alice") as enforcer:
        # the raising handler runs before the enforcer: the enforcer never sees the end
        handlers = [RaisingAtEnd(), enforcer] if sends else [enforcer, AbortingAtStart()]
        try:
            openai(server, max_retries=0).invoke("hello", max_tokens=100, config={"callbacks": handlers})
        except (RuntimeError, PermissionError) as error:
            kept.append(error)  # its traceback holds the run id
    assert len(server.requests) == (1 if sends else 0)
    time.sleep(2 * lease)  # past the lease: a hold that was not renewed would have expired by now
    (status,) = budget.status(user_id="alice")
    assert status.held > 0 and status.spent == 0  # still held, renewed: its call may be running
    kept.clear()
    gc.collect()
    deadline = time.monotonic() + 5 * lease
    while time.monotonic() < deadline:
        (status,) = budget.status(user_id="alice")
        if status.held == 0:
            break
        time.sleep(lease / 10)
    assert status.held == 0
    assert status.spent == one  # nothing sent: free; a request sent with no end seen: its reservation
