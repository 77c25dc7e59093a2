"""Agents and graphs with the real ChatOpenAI against the scripted server: every model step is charged.

``create_agent(model=BudgetGuard(...))``, ``BudgetMiddleware`` (reserve, degrade, end or raise,
ids from the runtime context, custom events) and a LangGraph ``StateGraph`` node calling a
guarded model, streamed in "messages" and "updates" modes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from pydantic import BaseModel

from langchain_budgetguard import BudgetExceededError, BudgetGuard, BudgetPolicy, IdentityError, Limit
from langchain_budgetguard import get_cost_callback
from langchain_budgetguard.middleware import BudgetMiddleware

from .providers import Reply, ToolCall


@tool
def get_weather(city: str) -> str:
    """Weather for a city."""
    return f"sunny in {city}"


@dataclass
class Context:
    user_id: str


class City(BaseModel):
    name: str
    population: int


def tool_step(city: str) -> Reply:
    return Reply(tool_calls=(ToolCall("get_weather", {"city": city}),), input_tokens=900, output_tokens=40)


THREE_STEPS = (tool_step("Oslo"), tool_step("Paris"), tool_step("Rome"),
               Reply(text="Sunny everywhere.", input_tokens=1200, output_tokens=30, cache_read_tokens=512))
ASK = {"messages": [("user", "Weather in Oslo, Paris and Rome?")]}
LOOP = {"recursion_limit": 100}


def spent(policy, **ids) -> Decimal:
    (status,) = policy.status(**ids)
    assert status.held == 0, "nothing may stay held once the run is over"
    return status.spent


def served(messages) -> list[str]:
    return [m.response_metadata["budgetguard"]["model"] for m in messages
            if isinstance(m, AIMessage) and "model" in m.response_metadata.get("budgetguard", {})]


# ---------------------------------------------------------------- a guarded model as the agent's model


def test_create_agent_with_a_guarded_model_charges_every_step(openai_server, billed):
    openai_server.script(*THREE_STEPS)
    guard = BudgetGuard(openai_server.chat_model(), limit=1)
    with get_cost_callback() as cb:
        out = create_agent(model=guard, tools=[get_weather]).invoke(ASK)
    assert sum(isinstance(m, ToolMessage) for m in out["messages"]) == 3
    assert out["messages"][-1].content == "Sunny everywhere."
    assert served(out["messages"]) == ["gpt-4o-mini"] * 4 and len(openai_server.calls) == 4
    assert spent(guard) == cb.total_cost == billed(openai_server)


async def test_create_agent_with_a_guarded_model_async_per_user(openai_server, billed):
    openai_server.script(*THREE_STEPS)
    guard = BudgetGuard(openai_server.chat_model(), limits=[Limit(usd=1, per="user")])
    agent = create_agent(model=guard, tools=[get_weather])
    out = await agent.ainvoke(ASK, config={"configurable": {"user_id": "alice"}})
    assert len(served(out["messages"])) == 4
    assert spent(guard, user_id="alice") == billed(openai_server)
    assert spent(guard, user_id="bob") == 0


# ---------------------------------------------------------------- BudgetMiddleware


def test_middleware_charges_every_step_exactly(openai_server, billed):
    openai_server.script(*THREE_STEPS)
    budget = BudgetMiddleware(limits=[Limit(usd=1, per="user", window="day")])
    agent = create_agent(openai_server.chat_model(), tools=[get_weather], middleware=[budget],
                         context_schema=Context)
    with get_cost_callback() as cb:
        out = agent.invoke(ASK, context=Context(user_id="alice"))
    assert served(out["messages"]) == ["gpt-4o-mini"] * 4
    assert spent(budget.policy, user_id="alice") == cb.total_cost == billed(openai_server)


async def test_middleware_async_streamed_steps_ask_for_usage_and_are_exact(openai_server, billed):
    """A custom base_url turns ChatOpenAI's stream usage off; streamed agent steps must still be exact."""
    openai_server.script(*THREE_STEPS)
    budget = BudgetMiddleware(limit=1)
    agent = create_agent(openai_server.chat_model(), tools=[get_weather], middleware=[budget])
    tokens = [chunk async for chunk, _ in agent.astream(ASK, stream_mode="messages")
              if isinstance(chunk, AIMessageChunk) and chunk.content]
    assert "".join(t.content for t in tokens) == "Sunny everywhere."
    assert all(r.body.get("stream_options") == {"include_usage": True} for r in openai_server.calls)
    assert spent(budget.policy) == billed(openai_server)


@pytest.mark.parametrize("failure", [Reply(text="a b c d e f", cut_after=3), Reply(error=500)])
async def test_middleware_charges_a_streamed_step_cut_midway_and_releases_a_failed_one(openai_server, failure):
    openai_server.script(failure)
    budget = BudgetMiddleware(limit=1)
    agent = create_agent(openai_server.chat_model(), tools=[get_weather], middleware=[budget])
    seen = []
    with pytest.raises(Exception):  # noqa: B017, PT011 - the client's own error
        async for chunk, _ in agent.astream(ASK, stream_mode="messages"):
            seen.append(chunk.content)
    (status,) = budget.policy.status()
    assert status.held == 0
    if failure.error:
        assert status.spent == 0, "no output, nothing to charge"
    else:
        assert "".join(seen) == "a b "
        assert status.spent > 0, "the provider bills the prompt of a stream that has begun"


def test_middleware_charges_a_step_that_timed_out_waiting_its_reservation(openai_server):
    """The provider may answer (and bill) a request whose client gave up: never $0."""
    openai_server.script(Reply(text="late", delay=1.0))
    budget = BudgetMiddleware(limit=1)
    agent = create_agent(openai_server.chat_model(timeout=0.2), tools=[get_weather], middleware=[budget])
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        agent.invoke(ASK)
    (status,) = budget.policy.status()
    assert status.held == 0
    assert status.spent > Decimal("0.001")  # the step's reservation (its default output cap), not its prompt


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
def test_middleware_charges_a_step_whose_reply_a_raising_handler_failed_on(openai_server, billed, how):
    """A handler with ``raise_error=True`` that fails in ``on_llm_end`` ends the step in an exception
    after the provider billed it: charged the reply's usage, not $0."""
    import asyncio

    from langchain_core.callbacks import BaseCallbackHandler

    class Raises(BaseCallbackHandler):
        raise_error = True

        def on_llm_end(self, response, **kwargs):
            raise RuntimeError("handler failed")

    openai_server.script(tool_step("Oslo"))
    budget = BudgetMiddleware(limit=1)
    agent = create_agent(openai_server.chat_model(), tools=[get_weather], middleware=[budget])
    config = {"callbacks": [Raises()]}
    with pytest.raises(RuntimeError, match="handler failed"):
        if how == "invoke":
            agent.invoke(ASK, config)
        else:
            asyncio.run(agent.ainvoke(ASK, config))
    assert len(openai_server.calls) == 1
    assert spent(budget.policy) == billed(openai_server) > 0


def test_middleware_charges_a_step_the_sdk_resent_after_it_timed_out(openai_server):
    """The SDK resends a request that timed out (max_retries): the provider may have billed both."""
    from dataclasses import replace

    first = replace(THREE_STEPS[-1], delay=1.0)
    openai_server.script(first, THREE_STEPS[-1])
    budget = BudgetMiddleware(limit=1)
    agent = create_agent(openai_server.chat_model(timeout=0.25, max_retries=1), tools=[get_weather],
                         middleware=[budget])
    agent.invoke(ASK)
    from .conftest import list_price

    lost, answered = openai_server.calls
    assert lost.usage is None  # the server's answer never reached the client
    (status,) = budget.policy.status()
    assert status.held == 0
    # the answered step's usage, plus the lost one's reservation: 4,096 output tokens (the default
    # cap) at gpt-4o-mini's $0.60 per million alone are $0.0024576
    assert status.spent - list_price(answered) > Decimal("0.0024576")


def test_middleware_degrades_mid_run_then_ends_the_run_cleanly(openai_server, billed):
    openai_server.set_default(tool_step("Oslo"))  # the model never stops calling tools
    big = openai_server.chat_model(model="gpt-4.1", max_tokens=200)  # $0.0021 a step
    mini = openai_server.chat_model(model="gpt-4o-mini", max_tokens=200)  # $0.000159 a step
    budget = BudgetMiddleware(limits=[Limit(usd="0.008", per="user")], degrade_to=[mini])
    out = create_agent(big, tools=[get_weather], middleware=[budget]).invoke(
        ASK, config={**LOOP, "configurable": {"user_id": "alice"}}
    )
    models = served(out["messages"])
    switch = models.index("gpt-4o-mini")
    assert switch > 0 and models == ["gpt-4.1"] * switch + ["gpt-4o-mini"] * (len(models) - switch)
    assert [r.body["model"] for r in openai_server.calls] == models, "the refused step sent no request"
    last = out["messages"][-1]
    assert isinstance(last, AIMessage) and not last.tool_calls
    assert "budget" in last.content and last.response_metadata["budgetguard"]["exhausted"] is True
    assert [r["model"] for r in last.response_metadata["budgetguard"]["refusals"]] == ["gpt-4.1", "gpt-4o-mini"]
    assert spent(budget.policy, user_id="alice") == billed(openai_server) <= Decimal("0.008")


@pytest.mark.parametrize("on_exhausted", ["end", "raise"])
async def test_middleware_refused_step_sends_no_request(openai_server, on_exhausted):
    budget = BudgetMiddleware(limit="0.00001", on_exhausted=on_exhausted)
    agent = create_agent(openai_server.chat_model(), tools=[get_weather], middleware=[budget])
    if on_exhausted == "raise":
        with pytest.raises(BudgetExceededError):
            agent.invoke(ASK)
        with pytest.raises(BudgetExceededError):
            await agent.ainvoke(ASK)
    else:
        for out in (agent.invoke(ASK), await agent.ainvoke(ASK)):
            assert out["messages"][-1].response_metadata["budgetguard"]["exhausted"] is True
    assert openai_server.requests == []
    assert spent(budget.policy) == 0


def test_middleware_reads_ids_from_context_then_config_and_never_pools(openai_server, billed):
    policy = BudgetPolicy(limits=[Limit(usd=1, per="user"), Limit(usd=5, per="project")])
    agent = create_agent(openai_server.chat_model(), middleware=[BudgetMiddleware(policy)])
    agent.invoke(ASK, context={"user_id": "alice"}, config={"metadata": {"project_id": "acme"}})
    agent.invoke(ASK, config={"configurable": {"user_id": "bob", "project_id": "acme"}})
    # The runtime context wins over configurable.
    agent.invoke(ASK, context={"user_id": "carol"}, config={"configurable": {"user_id": "bob", "project_id": "x"}})
    one_call = billed(openai_server) / 3  # three identical requests
    by_scope = {(s.scope, s.scope_id): s.spent for who, project in (("alice", "acme"), ("bob", "acme"), ("carol", "x"))
                for s in policy.status(user_id=who, project_id=project)}
    assert by_scope == {("user", "alice"): one_call, ("user", "bob"): one_call, ("user", "carol"): one_call,
                        ("project", "acme"): 2 * one_call, ("project", "x"): one_call}
    with pytest.raises(IdentityError):
        agent.invoke(ASK)
    assert len(openai_server.calls) == 3


def test_middleware_and_a_guarded_model_on_one_budget_charge_once(openai_server, billed):
    openai_server.script(*THREE_STEPS)
    policy = BudgetGuard(limit=1)
    agent = create_agent(policy.wrap(openai_server.chat_model()), tools=[get_weather],
                         middleware=[BudgetMiddleware(policy)])
    agent.invoke(ASK)
    assert spent(policy) == billed(openai_server)


def test_middleware_with_structured_output(openai_server, billed):
    openai_server.script(tool_step("Oslo"), Reply(text=json.dumps({"name": "Oslo", "population": 700000})))
    budget = BudgetMiddleware(limit=1)
    agent = create_agent(openai_server.chat_model(), tools=[get_weather], response_format=City,
                         middleware=[budget])
    out = agent.invoke(ASK)
    assert out["structured_response"] == City(name="Oslo", population=700000)
    assert spent(budget.policy) == billed(openai_server)


# ---------------------------------------------------------------- visible decisions


async def _custom_events(agent, **kwargs):
    return [e async for e in agent.astream_events(ASK, version="v2", **kwargs) if e["event"] == "on_custom_event"]


async def test_middleware_decisions_show_in_astream_events(openai_server):
    openai_server.set_default(tool_step("Oslo"))
    big = openai_server.chat_model(model="gpt-4.1", max_tokens=200)
    mini = openai_server.chat_model(model="gpt-4o-mini", max_tokens=200)
    budget = BudgetMiddleware(limit="0.008", degrade_to=[mini])
    agent = create_agent(big, tools=[get_weather], middleware=[budget])
    events = await _custom_events(agent, config=LOOP)
    names = [e["name"] for e in events]
    first_degrade = names.index("budgetguard_degrade")
    assert set(names[:first_degrade]) == {"budgetguard_cost"} and first_degrade > 0
    assert names[-1] == "budgetguard_refusal"
    degrade = events[first_degrade]["data"]
    assert (degrade["from_model"], degrade["to_model"]) == ("gpt-4.1", "gpt-4o-mini")
    assert degrade["refusal"]["model"] == "gpt-4.1" and degrade["refusal"]["limit"] == Decimal("0.008")
    assert [r["model"] for r in events[-1]["data"]["refusals"]] == ["gpt-4.1", "gpt-4o-mini"]
    costs = [e["data"] for e in events if e["name"] == "budgetguard_cost"]
    assert len(costs) == len(openai_server.calls)
    assert sum((c["cost_usd"] for c in costs), Decimal(0)) == spent(budget.policy)
    assert [c["model"] for c in costs] == [r.body["model"] for r in openai_server.calls]


async def test_guarded_model_decisions_show_in_an_agents_astream_events(openai_server):
    openai_server.set_default(tool_step("Oslo"))
    guard = BudgetGuard(openai_server.chat_model(model="gpt-4.1", max_tokens=200), limit="0.008",
                        degrade_to=[openai_server.chat_model(model="gpt-4o-mini", max_tokens=200)])
    agent = create_agent(guard, tools=[get_weather])
    events = []
    with pytest.raises(BudgetExceededError):  # a guard has no "end the run" option: the agent stops
        async for event in agent.astream_events(ASK, version="v2", config=LOOP):
            if event["event"] == "on_custom_event":
                events.append(event)
    names = [e["name"] for e in events]
    assert names.count("budgetguard_cost") == len(openai_server.calls) > 0
    assert "budgetguard_degrade" in names and names[-1] == "budgetguard_refusal"
    assert [r["model"] for r in events[-1]["data"]["refusals"]] == ["gpt-4.1", "gpt-4o-mini"]


# ---------------------------------------------------------------- LangGraph


class State(TypedDict):
    messages: Annotated[list, add_messages]


def _graph(guard):
    def chat(state: State) -> dict:
        return {"messages": [guard.invoke(state["messages"])]}

    return StateGraph(State).add_node("chat", chat).add_edge(START, "chat").add_edge("chat", END).compile()


@pytest.mark.parametrize("mode", ["messages", "updates"])
def test_langgraph_node_with_a_guarded_model_streams_and_is_charged(openai_server, billed, mode):
    openai_server.script(Reply(text="one two three", input_tokens=50, output_tokens=6))
    guard = BudgetGuard(openai_server.chat_model(stream_usage=True), limit=1)
    items = list(_graph(guard).stream({"messages": [("user", "count")]}, stream_mode=mode))
    if mode == "messages":
        assert "".join(chunk.content for chunk, meta in items if meta["langgraph_node"] == "chat") == "one two three"
    else:
        (update,) = items
        assert update["chat"]["messages"][0].response_metadata["budgetguard"]["cost_usd"] == billed(openai_server)
    assert spent(guard) == billed(openai_server)


async def test_langgraph_messages_mode_with_a_default_custom_base_url_model_is_exact(openai_server, billed):
    openai_server.script(Reply(text="one two three", input_tokens=50, output_tokens=6))
    guard = BudgetGuard(openai_server.chat_model(), limit=1)
    [_ async for _ in _graph(guard).astream({"messages": [("user", "count")]}, stream_mode="messages")]
    assert openai_server.last.body.get("stream_options") == {"include_usage": True}
    assert spent(guard) == billed(openai_server)


def test_langgraph_messages_mode_step_cut_midway_is_charged(openai_server):
    openai_server.script(Reply(text="a b c d e f", cut_after=3))
    guard = BudgetGuard(openai_server.chat_model(stream_usage=True), limit=1)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the client's own error
        list(_graph(guard).stream({"messages": [("user", "count")]}, stream_mode="messages"))
    (status,) = guard.status()
    assert status.held == 0 and status.spent > 0
