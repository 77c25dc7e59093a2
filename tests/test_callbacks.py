"""get_cost_callback: every chat model call in the block, exact Decimal cost, familiar printout."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_budgetguard import BudgetGuard, Limit, get_cost_callback

from .fakes import UsageChat

SEED = json.loads((Path(__file__).parent / "fixtures" / "seed_usage.json").read_text())


def test_printout_matches_the_familiar_form_and_the_fixture():
    llm = UsageChat(model_name="gpt-4o-mini", input_tokens=11, output_tokens=16)
    with get_cost_callback() as cb:
        llm.invoke("Tell me a joke")
    assert str(cb) == SEED["callback_printout"]
    assert cb.total_cost == Decimal("0.00001125")
    assert (cb.total_tokens, cb.prompt_tokens, cb.completion_tokens, cb.successful_requests) == (27, 11, 16, 1)


@pytest.mark.parametrize("row", SEED["costs"], ids=lambda r: f"{r['model']}-{r['prompt_tokens']}")
def test_fixture_costs_are_exact_through_the_callback(row):
    llm = UsageChat(model_name=row["model"], provider=row["provider"], input_tokens=row["prompt_tokens"],
                    output_tokens=row["completion_tokens"])
    with get_cost_callback() as cb:
        llm.invoke("x")
    assert cb.total_cost == Decimal(row["usd"])


def test_chain_stream_async_and_per_model_breakdown():
    a = UsageChat(model_name="gpt-4o-mini", input_tokens=11, output_tokens=16)
    b = UsageChat(model_name="gpt-4", input_tokens=11, output_tokens=13)
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | a | StrOutputParser()
    with get_cost_callback() as cb:
        chain.invoke({"q": "hi"})
        list(b.stream("hi"))
        asyncio.run(a.ainvoke("hi"))
    assert cb.successful_requests == 3
    assert cb.by_model["gpt-4o-mini"].requests == 2 and cb.by_model["gpt-4"].requests == 1
    assert cb.by_model["gpt-4"].cost == Decimal("0.00111")
    assert cb.total_cost == Decimal("0.00111") + 2 * Decimal("0.00001125")


def test_calls_outside_the_block_are_not_counted():
    llm = UsageChat()
    with get_cost_callback() as cb:
        llm.invoke("in")
    llm.invoke("out")
    assert cb.successful_requests == 1


def test_threads_batch_and_context_copies_are_counted():
    llm = UsageChat(model_name="gpt-4o-mini", input_tokens=11, output_tokens=16)
    with get_cost_callback() as cb:
        llm.batch(["a", "b", "c", "d"])  # LangChain's own thread pool
        with ThreadPoolExecutor(4) as pool:
            ctx = [contextvars.copy_context() for _ in range(4)]
            list(pool.map(lambda c: c.run(llm.invoke, "x"), ctx))
    assert cb.successful_requests == 8
    assert cb.total_cost == 8 * Decimal("0.00001125")


def test_process_scope_sees_plain_threads():
    llm = UsageChat(model_name="gpt-4o-mini", input_tokens=11, output_tokens=16)
    with get_cost_callback(scope="process") as cb:
        threads = [threading.Thread(target=llm.invoke, args=("x",)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    llm.invoke("after")
    assert cb.successful_requests == 3


async def test_async_gather_is_counted():
    llm = UsageChat(model_name="gpt-4o-mini", input_tokens=11, output_tokens=16)
    with get_cost_callback() as cb:
        await asyncio.gather(*(llm.ainvoke("x") for _ in range(5)))
    assert cb.successful_requests == 5 and cb.total_cost == 5 * Decimal("0.00001125")


def test_unpriced_model_is_counted_with_a_warning_and_never_breaks_the_call():
    llm = UsageChat(model_name="in-house-llm", provider="acme", input_tokens=5, output_tokens=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with get_cost_callback() as cb:
            assert llm.invoke("x").content
    assert cb.successful_requests == 1 and cb.total_tokens == 12 and cb.total_cost == 0
    assert cb.unpriced_models == {"in-house-llm"} and cb.by_model["in-house-llm"].cost is None
    assert any("in-house-llm" in str(w.message) for w in caught)
    assert "Unpriced models" in str(cb)


def test_prices_given_to_the_callback_price_custom_models():
    llm = UsageChat(model_name="in-house-llm", provider="acme", input_tokens=1000, output_tokens=1000)
    with get_cost_callback(prices={"in-house-llm": {"input": "1", "output": "2"}}) as cb:
        llm.invoke("x")
    assert cb.total_cost == Decimal("0.003")


def test_stream_without_usage_is_still_counted_as_estimated():
    llm = UsageChat(report_usage=False)
    with get_cost_callback() as cb:
        list(llm.stream("hello there"))
    assert cb.successful_requests == 1 and cb.estimated_requests == 1
    assert cb.prompt_tokens > 0 and cb.completion_tokens > 0 and cb.total_cost > 0


def test_create_agent_with_guarded_model_every_call_charged_and_callback_agrees():
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Weather of a city."""
        return f"sunny in {city}"

    llm = UsageChat(
        model_name="gpt-4o-mini", input_tokens=120, output_tokens=30,
        script=[
            {"reply": "", "tool_calls": [{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}]},
            {"reply": "It is sunny in Paris."},
        ],
    )
    guard = BudgetGuard(llm, limits=[Limit(usd=1, per="user", window="day")])
    agent = create_agent(model=guard, tools=[get_weather])
    config = {"configurable": {"user_id": "alice"}}
    with get_cost_callback() as cb:
        result = agent.invoke({"messages": [("human", "weather in Paris?")]}, config)
    assert result["messages"][-1].content == "It is sunny in Paris."
    assert llm.calls == 2 and cb.successful_requests == 2
    (status,) = guard.status(config)
    per_call = Decimal(120) * Decimal("0.15") / 10**6 + Decimal(30) * Decimal("0.6") / 10**6
    assert status.spent == cb.total_cost == 2 * per_call and status.held == 0


def test_a_request_with_several_choices_counts_once():
    from uuid import uuid4

    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.outputs import ChatGeneration, LLMResult

    from langchain_budgetguard.callbacks import CostCallbackHandler

    usage = {"input_tokens": 11, "output_tokens": 16, "total_tokens": 27}
    reply = LLMResult(generations=[[ChatGeneration(message=AIMessage("a", usage_metadata=usage)),
                                    ChatGeneration(message=AIMessage("b", usage_metadata=usage))]])
    handler, run_id = CostCallbackHandler(), uuid4()
    handler.on_chat_model_start({"id": ["ChatOpenAI"]}, [[HumanMessage("hi")]], run_id=run_id,
                                metadata={"ls_provider": "openai", "ls_model_name": "gpt-4o-mini"})
    handler.on_llm_end(reply, run_id=run_id)
    assert (handler.successful_requests, handler.total_tokens, handler.estimated_requests) == (1, 27, 0)
    assert handler.total_cost == Decimal("0.00001125")


# -- what the reply says and what a cut stream produced -----------------------------------------


class _AnsweredByGpt4o(UsageChat):
    def _generate(self, *args, **kwargs):
        result = super()._generate(*args, **kwargs)
        result.generations[0].message.response_metadata["model_name"] = "gpt-4o"
        return result


def test_the_callback_prices_the_model_the_reply_names():
    model = _AnsweredByGpt4o(model_name="gpt-4o-mini", input_tokens=1000, output_tokens=1000)
    with get_cost_callback() as cb:
        model.invoke("hi")
    assert set(cb.by_model) == {"gpt-4o"} and cb.total_cost == Decimal("0.0125")


def test_a_reply_from_langchains_cache_costs_nothing_in_the_callback():
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import set_llm_cache

    set_llm_cache(InMemoryCache())
    try:
        model = UsageChat(input_tokens=1000, output_tokens=1000)
        with get_cost_callback() as cb:
            model.invoke("hi")
            model.invoke("hi")
    finally:
        set_llm_cache(None)
    assert cb.successful_requests == 1 and cb.total_cost == Decimal("0.00075")


def test_a_stream_cut_after_its_first_chunks_is_counted_by_the_callback():
    model = UsageChat(reply="a b c d e f g h", fail_after=4, input_tokens=1000, output_tokens=1000)
    with get_cost_callback() as cb:
        with pytest.raises(ConnectionError):
            list(model.stream("hi"))
    assert cb.successful_requests == 1 and cb.total_cost > 0 and cb.completion_tokens > 0
