"""``BudgetMiddleware`` against the middleware LangChain ships and the ways an agent step can go.

Fakes (``tests.fakes.UsageChat``) stand for the provider: each call the fake makes is a call the
provider would bill, with the usage the fake reports.
"""

from __future__ import annotations

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
