"""``enforce_budget``: every chat model call in a block is reserved and settled, even in code we don't build.

The chain here stands for third-party code: built outside the block, from the real ChatOpenAI
pointed at the scripted server, with no guard anywhere in it.
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal

import pytest
from langchain.agents import create_agent
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from langchain_budgetguard import (
    BudgetExceededError,
    BudgetGuard,
    BudgetPolicy,
    IdentityError,
    Limit,
    UnknownModelPriceError,
    get_cost_callback,
)
from langchain_budgetguard.enforce import enforce_budget
from langchain_budgetguard.middleware import BudgetMiddleware

from .providers import Reply


def third_party_chain(llm):
    return ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{q}")]) | llm | StrOutputParser()


def spent(policy, **ids) -> Decimal:
    return sum((s.spent for s in policy.status(**ids)), Decimal(0))


def held(policy, **ids) -> Decimal:
    return sum((s.held for s in policy.status(**ids)), Decimal(0))


def test_calls_deep_in_a_chain_are_charged_exactly(openai_server, billed):
    openai_server.script(Reply(text="Paris.", input_tokens=1200, output_tokens=30, cache_read_tokens=1024,
                               reasoning_tokens=10), Reply(text="Rome.", input_tokens=40, output_tokens=3))
    chain = third_party_chain(openai_server.chat_model())
    policy = BudgetPolicy(limits=[Limit(usd=1, per="user", window="day")])
    with get_cost_callback() as cb, enforce_budget(policy, user_id="alice") as enforcer:
        assert chain.invoke({"q": "Capital of France?"}) == "Paris."
        assert chain.batch([{"q": "Capital of Italy?"}]) == ["Rome."]
    assert spent(policy, user_id="alice") == cb.total_cost == billed(openai_server) > 0
    assert held(policy, user_id="alice") == 0
    assert enforcer.status()[0].spent == spent(policy, user_id="alice")
    chain.invoke({"q": "outside the block"})
    assert spent(policy, user_id="alice") == cb.total_cost, "calls after the block are not enforced"


async def test_ainvoke_and_astream_are_charged_exactly(openai_server, billed):
    openai_server.script(Reply(text="one", input_tokens=30, output_tokens=2),
                         Reply(text="two three", input_tokens=31, output_tokens=4))
    chain = third_party_chain(openai_server.chat_model(stream_usage=True))
    policy = BudgetPolicy(limit=1)
    with enforce_budget(policy):
        assert await chain.ainvoke({"q": "1"}) == "one"
        assert "".join([c async for c in chain.astream({"q": "2"})]) == "two three"
    assert spent(policy) == billed(openai_server) and held(policy) == 0


def test_sync_stream_is_charged_and_the_handler_runs_in_thread_pools(openai_server, billed):
    openai_server.script(*(Reply(text=f"r{i}", input_tokens=20 + i, output_tokens=2) for i in range(4)))
    chain = third_party_chain(openai_server.chat_model(stream_usage=True))
    policy = BudgetPolicy(limit=1)
    with enforce_budget(policy):
        assert "".join(chain.stream({"q": "x"})) == "r0"
        assert sorted(chain.batch([{"q": "a"}, {"q": "b"}, {"q": "c"}], config={"max_concurrency": 3})) == [
            "r1", "r2", "r3"]
    assert spent(policy) == billed(openai_server) and held(policy) == 0


async def test_a_refused_call_sends_no_request(openai_server):
    chain = third_party_chain(openai_server.chat_model())
    policy = BudgetPolicy(limit="0.000001")
    with enforce_budget(policy):
        with pytest.raises(BudgetExceededError):
            chain.invoke({"q": "hi"})
        with pytest.raises(BudgetExceededError):
            list(chain.stream({"q": "hi"}))
        with pytest.raises(BudgetExceededError):
            await chain.ainvoke({"q": "hi"})  # a sync inline handler aborts async calls too
        with pytest.raises(BudgetExceededError):
            [c async for c in chain.astream({"q": "hi"})]
        with pytest.raises(BudgetExceededError):
            chain.batch([{"q": "a"}, {"q": "b"}])
    assert openai_server.requests == []
    assert spent(policy) == held(policy) == 0


def test_ids_come_from_the_block_then_the_runs_metadata_and_are_never_pooled(openai_server):
    chain = third_party_chain(openai_server.chat_model())
    policy = BudgetPolicy(limits=[Limit(usd=1, per="user")])
    with enforce_budget(policy):
        chain.invoke({"q": "hi"}, config={"metadata": {"user_id": "bob"}})
        chain.invoke({"q": "hi"}, config={"configurable": {"user_id": "carol"}})
        with pytest.raises(IdentityError):
            chain.invoke({"q": "hi"})
    assert spent(policy, user_id="bob") > 0 and spent(policy, user_id="carol") > 0
    assert len(openai_server.calls) == 2
    with pytest.raises(TypeError, match="user_id"):
        with enforce_budget(policy, user="alice"):
            pass


def test_a_model_it_cannot_price_is_refused_not_free(openai_server):
    chain = third_party_chain(openai_server.chat_model(model="my-finetune"))
    with enforce_budget(BudgetPolicy(limit=1)), pytest.raises(UnknownModelPriceError):
        chain.invoke({"q": "hi"})
    assert openai_server.requests == []


@pytest.mark.parametrize("failure", [Reply(error=500), Reply(text="a b c d e f", cut_after=3)])
def test_a_failed_call_releases_its_hold_and_a_cut_stream_is_charged(openai_server, failure):
    openai_server.script(failure)
    chain = third_party_chain(openai_server.chat_model(stream_usage=True))
    policy = BudgetPolicy(limit=1)
    with enforce_budget(policy), pytest.raises(Exception):  # noqa: B017, PT011 - the client's own error
        list(chain.stream({"q": "hi"}))
    assert held(policy) == 0
    if failure.error:
        assert spent(policy) == 0, "no output, nothing to charge"
    else:
        assert spent(policy) > 0, "the provider bills the prompt of a stream that has begun"


def test_nested_blocks_charge_each_budget_once_and_inner_ids_win(openai_server, billed):
    openai_server.script(Reply(text="x", input_tokens=300, output_tokens=10))
    llm = openai_server.chat_model()
    users = BudgetPolicy(limits=[Limit(usd=1, per="user")])
    org = BudgetPolicy(limit=10, name="org")

    def library_code(q):  # runs under the outer block's handler, inherited through its run
        with enforce_budget(org), enforce_budget(users, user_id="bob"):
            return llm.invoke(q)

    with enforce_budget(users, user_id="alice"):
        RunnableLambda(library_code).invoke("hi")
    assert spent(org) == spent(users, user_id="bob") == billed(openai_server)
    assert spent(users, user_id="alice") == 0


def test_a_plain_thread_with_the_callbacks_passed_along_is_charged_once(openai_server, billed):
    llm = openai_server.chat_model()
    policy = BudgetPolicy(limits=[Limit(usd=1, per="user")])

    def fan_out(q, config):  # third-party code starting a plain thread (no ContextVars), passing its config
        worker = threading.Thread(target=lambda: llm.invoke(q, config))
        worker.start()
        worker.join()
        return q

    def nested(q, config):  # a second enforcer of the same budget: both handlers reach the thread
        with enforce_budget(policy, user_id="bob"):
            return RunnableLambda(fan_out).invoke(q, config)

    with enforce_budget(policy, user_id="alice"):
        RunnableLambda(nested).invoke("hi")
    assert len(openai_server.calls) == 1
    assert spent(policy, user_id="alice") + spent(policy, user_id="bob") == billed(openai_server) > 0
    assert held(policy, user_id="alice") == held(policy, user_id="bob") == 0


def test_a_guard_on_another_budget_is_still_counted(openai_server, billed):
    openai_server.script(Reply(text="x", input_tokens=300, output_tokens=10))
    guard = BudgetGuard(openai_server.chat_model(), limit=1, name="per-model")
    org = BudgetPolicy(limit=10, name="org")
    with enforce_budget(org):
        third_party_chain(guard).invoke({"q": "hi"})
    assert spent(guard.policy) == spent(org) == billed(openai_server)


def test_a_guard_on_the_same_budget_is_not_charged_twice(openai_server, billed):
    policy = BudgetGuard(limit=1)
    with enforce_budget(policy):
        third_party_chain(policy.wrap(openai_server.chat_model())).invoke({"q": "hi"})
    assert spent(policy) == billed(openai_server)


def test_a_budget_middleware_on_the_same_budget_is_not_charged_twice(openai_server, billed):
    openai_server.script(Reply(text="hello", input_tokens=100, output_tokens=5))
    policy = BudgetPolicy(limit=1)
    agent = create_agent(openai_server.chat_model(), middleware=[BudgetMiddleware(policy)])
    with enforce_budget(policy):
        asyncio.run(agent.ainvoke({"messages": [("user", "hi")]}))
        agent.invoke({"messages": [("user", "hi")]})
    assert spent(policy) == billed(openai_server) > 0
