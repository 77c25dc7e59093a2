"""``BudgetMiddleware`` against the middleware LangChain ships and the ways an agent step can go.

Fakes (``tests.fakes.UsageChat``) stand for the provider: each call the fake makes is a call the
provider would bill, with the usage the fake reports.
"""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal

import pytest
from langchain.agents import create_agent
from langchain.agents.structured_output import ToolStrategy
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, create_model

from langchain_budgetguard import get_cost_callback
from langchain_budgetguard.middleware import BudgetMiddleware
from langchain_budgetguard.tokenizers import exact_family, render_openai_tool

from .fakes import UsageChat

ASK = {"messages": [("user", "hi")]}


def status_of(budget: BudgetMiddleware):
    (status,) = budget.policy.status()
    return status


def invoke(agent, asynchronous: bool, *args, **kwargs):
    import asyncio

    if asynchronous:
        return asyncio.run(agent.ainvoke(*args, **kwargs))
    return agent.invoke(*args, **kwargs)


# ---------------------------------------------------------------- the structured-output schema is held

_DESC = "A field whose meaning is explained at some length so that the schema is long. " * 6
Big = create_model("Report", **{f"field_{i}": (str, Field(description=f"{i}: {_DESC}")) for i in range(250)})
SCHEMA_TOKENS = exact_family("gpt-4o").count(render_openai_tool(convert_to_openai_tool(Big))
                                             or json.dumps(convert_to_openai_tool(Big)))
REPORT = {"reply": "", "tool_calls": [{"name": "Report", "args": {f"field_{i}": "x" for i in range(250)},
                                       "id": "c1"}]}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_tool_strategy_schema_is_held_with_the_step(asynchronous):
    """The agent binds the response format's schema after the middleware reserved: the hold must
    count it (26k tokens, billed as input), else the step costs past a strict limit."""
    assert SCHEMA_TOKENS > 20_000
    model = UsageChat(model_name="gpt-4o", input_tokens=SCHEMA_TOKENS + 20, output_tokens=1500, script=[REPORT])
    roomy = BudgetMiddleware(limit=1)
    agent = create_agent(model, tools=[], middleware=[roomy], response_format=ToolStrategy(Big))
    out = invoke(agent, asynchronous, {"messages": [("user", "report")]})
    meta = next(m for m in out["messages"] if m.type == "ai").response_metadata["budgetguard"]
    assert meta["reserved_usd"] >= meta["cost_usd"] > Decimal("0.06")

    strict = BudgetMiddleware(limit=Decimal("0.06"))
    agent = create_agent(model, tools=[], middleware=[strict], response_format=ToolStrategy(Big))
    out = invoke(agent, asynchronous, {"messages": [("user", "report")]})  # refused: the run ends
    assert out["messages"][-1].response_metadata["budgetguard"]["exhausted"]
    assert model.calls == 1 and status_of(strict).spent == 0


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_exhausted_step_ends_an_agent_that_waits_for_a_structured_response(asynchronous):
    """Without tools, an agent with a response format asks its model again until it gets one: a
    refused step must end the run, not loop on refusals up to the recursion limit."""
    model = UsageChat(model_name="gpt-4o", script=[REPORT])
    budget = BudgetMiddleware(limit=Decimal("0.000001"))
    agent = create_agent(model, tools=[], middleware=[budget], response_format=ToolStrategy(Big))
    out = invoke(agent, asynchronous, {"messages": [("user", "report")]}, {"recursion_limit": 10})
    assert [m.type for m in out["messages"]] == ["human", "ai"]
    assert out["messages"][-1].response_metadata["budgetguard"]["exhausted"]
    assert model.calls == 0


# ---------------------------------------------------------------- a long step keeps its hold


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_step_longer_than_the_lease_keeps_its_hold(asynchronous):
    """One gpt-4o-mini hold (~$0.00246) fits $0.004, two do not: a call made while a slow step runs
    (past two leases) must be refused, not admitted into a hold that lapsed."""
    import threading
    import time

    from langchain_budgetguard import BudgetExceededError, BudgetGuard

    budget = BudgetMiddleware(limit=Decimal("0.004"), lease_seconds=0.5, min_output_tokens=None)
    slow = UsageChat(model_name="gpt-4o-mini", output_tokens=4000, delay=3.0)
    agent = create_agent(slow, tools=[], middleware=[budget])
    step = threading.Thread(target=invoke, args=(agent, asynchronous, ASK))
    step.start()
    deadline = time.monotonic() + 10
    while status_of(budget).held == 0 and time.monotonic() < deadline:  # the step holds
        time.sleep(0.01)
    time.sleep(1.2)  # two leases later, the step is still in flight
    other = BudgetGuard(UsageChat(model_name="gpt-4o-mini", output_tokens=4000), policy=budget.policy)
    try:
        with pytest.raises(BudgetExceededError):
            other.invoke("hi")
    finally:
        step.join()
    status = status_of(budget)
    assert status.held == 0 and status.spent <= status.limit


# ---------------------------------------------------------------- every reply the step produced is charged

REFUSE = {"reply": [{"type": "refusal", "refusal": "I cannot"}]}


def gpt4o(**kwargs) -> UsageChat:
    return UsageChat(model_name="gpt-4o", input_tokens=1000, output_tokens=1000, **kwargs)  # $0.0125 a call


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_reply_an_inner_middleware_turns_into_an_error_is_charged(asynchronous):
    """ModelRefusalMiddleware raises ModelRefusalError on a billed refusal (its ``raw_message``,
    not ``ai_message``): the step is charged the reply's usage, not $0."""
    from langchain.agents.middleware.model_refusal import ModelRefusalMiddleware
    from langchain_core.exceptions import ModelRefusalError

    model = gpt4o(script=[REFUSE])
    budget = BudgetMiddleware(limit=1)
    agent = create_agent(model, tools=[], middleware=[budget, ModelRefusalMiddleware()])
    with get_cost_callback() as cb:
        for _ in range(2):
            with pytest.raises(ModelRefusalError):
                invoke(agent, asynchronous, ASK)
    assert model.calls == 2 and cb.total_cost == Decimal("0.025")
    status = status_of(budget)
    assert status.held == 0 and status.spent == cb.total_cost


@pytest.mark.parametrize("asynchronous", [False, True])
def test_each_attempt_an_inner_retry_makes_is_charged(asynchronous):
    from langchain.agents.middleware import ModelRetryMiddleware
    from langchain.agents.middleware.model_refusal import ModelRefusalMiddleware
    from langchain_core.exceptions import ModelRefusalError

    model = gpt4o(script=[REFUSE, REFUSE, {"reply": "fine"}])
    budget = BudgetMiddleware(limit=1)
    retry = ModelRetryMiddleware(max_retries=2, initial_delay=0, jitter=False, retry_on=(ModelRefusalError,))
    agent = create_agent(model, tools=[], middleware=[budget, retry, ModelRefusalMiddleware()])
    with get_cost_callback() as cb:
        out = invoke(agent, asynchronous, ASK)
    assert out["messages"][-1].content == "fine"
    assert model.calls == 3 and cb.total_cost == Decimal("0.0375")
    status = status_of(budget)
    assert status.held == 0 and status.spent == cb.total_cost


# ---------------------------------------------------------------- a model an inner middleware switches to


class _Down(UsageChat):
    def _generate(self, *args, **kwargs):
        self._count()
        raise ConnectionRefusedError("primary down (nothing billed)")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_dearer_fallback_model_is_reserved_before_it_runs(asynchronous):
    """ModelFallbackMiddleware inside the budget: the fallback (o1, $0.246 held) is reserved when it
    starts, refused before its request goes out, and the run ends as for any exhausted step."""
    from langchain.agents.middleware import ModelFallbackMiddleware

    primary = _Down(model_name="gpt-4o-mini")
    dear = UsageChat(model_name="o1", input_tokens=10, output_tokens=4000)
    budget = BudgetMiddleware(limit=Decimal("0.01"))
    agent = create_agent(primary, tools=[], middleware=[budget, ModelFallbackMiddleware(dear)])
    out = invoke(agent, asynchronous, ASK)
    meta = out["messages"][-1].response_metadata["budgetguard"]
    assert meta["exhausted"] and [r["model"] for r in meta["refusals"]] == ["o1"]
    assert primary.calls == 1 and dear.calls == 0
    status = status_of(budget)
    assert status.held == 0 and status.spent == 0


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_fallback_or_routed_model_that_fits_is_charged_what_it_cost(asynchronous):
    from langchain.agents.middleware import AgentMiddleware, ModelFallbackMiddleware

    class Route(AgentMiddleware):  # as ModelRouterMiddleware does: the step runs on another model
        def wrap_model_call(self, request, handler):
            return handler(request.override(model=routed))

        async def awrap_model_call(self, request, handler):
            return await handler(request.override(model=routed))

    routed = gpt4o()
    backup = gpt4o()
    for inner, served in ((Route(), routed), (ModelFallbackMiddleware(backup), backup)):
        budget = BudgetMiddleware(limit=1)
        agent = create_agent(_Down(model_name="gpt-4o-mini"), tools=[], middleware=[budget, inner])
        with get_cost_callback() as cb:
            out = invoke(agent, asynchronous, ASK)
        assert out["messages"][-1].content == served.reply
        meta = out["messages"][-1].response_metadata["budgetguard"]
        assert meta["model"] == "gpt-4o" and meta["reserved_usd"] >= meta["cost_usd"]  # held as what ran
        status = status_of(budget)
        assert status.held == 0 and status.spent == cb.total_cost == Decimal("0.0125")


# ---------------------------------------------------------------- model calls an inner middleware makes


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("enforced", [False, True])
def test_a_model_call_made_inside_the_step_is_charged(asynchronous, enforced):
    """An inner middleware that calls a model of its own in wrap_model_call (as
    LLMToolSelectorMiddleware does): charged once, by the middleware, with or without an
    ``enforce_budget`` block on the same budget (the step's mark hid it from the block)."""
    from langchain.agents.middleware import AgentMiddleware

    from langchain_budgetguard import enforce_budget

    side = UsageChat(model_name="gpt-4o", input_tokens=5000, output_tokens=500)  # $0.0175

    class Judge(AgentMiddleware):
        def wrap_model_call(self, request, handler):
            side.invoke("pick the tools")
            return handler(request)

        async def awrap_model_call(self, request, handler):
            await side.ainvoke("pick the tools")
            return await handler(request)

    budget = BudgetMiddleware(limit=5)
    agent = create_agent(UsageChat(model_name="gpt-4o-mini"), tools=[], middleware=[budget, Judge()])
    with get_cost_callback() as cb, enforce_budget(budget.policy) if enforced else contextlib.nullcontext():
        invoke(agent, asynchronous, ASK)
    assert cb.successful_requests == 2
    status = status_of(budget)
    assert status.held == 0 and status.spent == cb.total_cost > Decimal("0.0175")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_model_call_inside_the_step_that_does_not_fit_is_refused_and_ends_the_run(asynchronous):
    from langchain.agents.middleware import AgentMiddleware

    side = UsageChat(model_name="o1", output_tokens=4000)
    main = UsageChat(model_name="gpt-4o-mini")

    class Judge(AgentMiddleware):
        def wrap_model_call(self, request, handler):
            side.invoke("pick the tools")
            return handler(request)

        async def awrap_model_call(self, request, handler):
            await side.ainvoke("pick the tools")
            return await handler(request)

    budget = BudgetMiddleware(limit=Decimal("0.01"))
    agent = create_agent(main, tools=[], middleware=[budget, Judge()])
    out = invoke(agent, asynchronous, ASK)
    assert out["messages"][-1].response_metadata["budgetguard"]["exhausted"]
    assert side.calls == 0 and main.calls == 0
    status = status_of(budget)
    assert status.held == 0 and status.spent == 0


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_run_another_handler_aborts_after_the_step_reserved_it_is_released(asynchronous):
    """An ``enforce_budget`` block on another budget refuses each run after the step's watcher
    reserved it (no end event follows): once the step is over, nothing stays held."""
    from langchain.agents.middleware import AgentMiddleware

    from langchain_budgetguard import BudgetExceededError, BudgetPolicy, enforce_budget

    side = UsageChat(model_name="gpt-4o")

    class Judge(AgentMiddleware):  # carries on without its side call
        def wrap_model_call(self, request, handler):
            with contextlib.suppress(BudgetExceededError):
                side.invoke("pick the tools")
            return handler(request)

        async def awrap_model_call(self, request, handler):
            with contextlib.suppress(BudgetExceededError):
                await side.ainvoke("pick the tools")
            return await handler(request)

    budget = BudgetMiddleware(limit=1)
    other = BudgetPolicy(limit=Decimal("0.000001"))
    agent = create_agent(UsageChat(model_name="gpt-4o-mini"), tools=[], middleware=[budget, Judge()])
    with enforce_budget(other), pytest.raises(BudgetExceededError):
        invoke(agent, asynchronous, ASK)
    assert side.calls == 0
    status = status_of(budget)
    assert status.held == 0 and status.spent == 0
