"""``enforce_budget``: every chat model call in a block is reserved and settled, even in code we don't build.

The chain here stands for third-party code: built outside the block, from the real ChatOpenAI
pointed at the scripted server, with no guard anywhere in it.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import time
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler
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

from .fakes import ExactEstimator, UsageChat, UsageUpFront
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


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_model_another_middleware_calls_inside_a_budget_middleware_is_still_charged(how: str) -> None:
    from langchain.agents.middleware import AgentMiddleware

    side = UsageChat(model_name="gpt-4o", input_tokens=5000, output_tokens=500, max_tokens=500, reply="search")

    class AsksAnotherModelFirst(AgentMiddleware):
        """Inside BudgetMiddleware, calls a model of its own before the step (as
        LLMToolSelectorMiddleware does): BudgetMiddleware charges the step's call, not this one."""

        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            side.invoke("which tools?")
            return handler(request)

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            await side.ainvoke("which tools?")
            return await handler(request)

    policy = BudgetPolicy(limit=1)
    step = UsageChat(model_name="gpt-4o-mini", input_tokens=8, output_tokens=9, max_tokens=100)
    agent = create_agent(step, middleware=[BudgetMiddleware(policy), AsksAnotherModelFirst()])
    with enforce_budget(policy):
        if how == "sync":
            agent.invoke({"messages": [("user", "hi")]})
        else:
            asyncio.run(agent.ainvoke({"messages": [("user", "hi")]}))
    assert (side.calls, step.calls) == (1, 1)
    rows = sorted((r.model, dict(r.tokens), r.cost_nano) for r in policy.store.read_ledger(policy.name))
    assert rows == [("gpt-4o", {"input": 5000, "output": 500}, 5000 * 2500 + 500 * 10000),  # by the enforcer
                    ("gpt-4o-mini", {"input": 8, "output": 9}, 8 * 150 + 9 * 600)]  # by the middleware, once
    assert held(policy) == 0


class _Down(UsageChat):
    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("the primary is down")  # never reached a provider: costs nothing

    async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("the primary is down")


@pytest.mark.parametrize("order", ["budget outside", "budget inside"])
def test_a_fallback_model_inside_or_outside_a_budget_middleware_is_charged_once(order: str) -> None:
    from langchain.agents.middleware import ModelFallbackMiddleware

    policy = BudgetPolicy(limit=1)
    fallback = UsageChat(model_name="gpt-4o", input_tokens=8, output_tokens=9, max_tokens=100)
    middleware = [BudgetMiddleware(policy), ModelFallbackMiddleware(fallback)]
    agent = create_agent(_Down(model_name="gpt-4o-mini", max_tokens=100),
                         middleware=middleware if order == "budget outside" else middleware[::-1])
    with enforce_budget(policy):
        agent.invoke({"messages": [("user", "hi")]})
    assert fallback.calls == 1
    assert spent(policy) == Decimal(8 * 2500 + 9 * 10000) / 10**9 and held(policy) == 0  # gpt-4o's call, once


# -- call ids: a run_id that callers reuse never admits a free call ------------------------------

SHARED_RUN_ID = UUID("00000000-0000-4000-8000-000000000042")


class GatedChat(UsageChat):
    """A UsageChat whose calls wait at a gate: every admitted call is in flight at the same time."""

    gate: Any = None
    inside: Any = None

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.inside.release()
        assert self.gate.wait(30), "the test never opened the gate"
        return super()._generate(messages, stop, run_manager, **kwargs)


def _one_call_cost() -> Decimal:
    """What one call of the fake model costs: the budget below fits exactly 18 of them."""
    probe = BudgetPolicy(limit=1, estimator=ExactEstimator(8))
    with enforce_budget(probe):
        UsageChat(max_tokens=9).invoke("hi")
    return spent(probe)


def test_one_run_id_for_100_sequential_calls_admits_each_once_and_charges_each():
    cost = _one_call_cost()
    assert cost > 0
    policy = BudgetPolicy(limit=18 * cost, estimator=ExactEstimator(8))
    llm = UsageChat(max_tokens=9)
    served = refused = 0
    with enforce_budget(policy):
        for _ in range(100):
            try:
                llm.invoke("hi", config={"run_id": SHARED_RUN_ID})
                served += 1
            except BudgetExceededError:
                refused += 1
    assert (served, refused, llm.calls) == (18, 82, 18)
    assert spent(policy) == 18 * cost and held(policy) == 0


def test_one_run_id_for_100_concurrent_calls_admits_18_and_settles_each():
    cost = _one_call_cost()
    policy = BudgetPolicy(limit=18 * cost, estimator=ExactEstimator(8))
    llm = GatedChat(max_tokens=9, gate=threading.Event(), inside=threading.Semaphore(0))
    outcomes: list[str] = []
    lock = threading.Lock()

    def call():
        try:
            llm.invoke("hi", config={"run_id": SHARED_RUN_ID})
            outcome = "served"
        except BudgetExceededError:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    with enforce_budget(policy):
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(call,)) for _ in range(100)]
        for t in threads:
            t.start()
        for _ in range(18):  # 18 calls are inside the model, holding the whole budget ...
            assert llm.inside.acquire(timeout=30)
        deadline = time.monotonic() + 30
        while len(outcomes) < 82 and time.monotonic() < deadline:  # ... and the 82 others were refused
            time.sleep(0.01)
        assert sorted(outcomes) == ["refused"] * 82
        assert held(policy) == 18 * cost and spent(policy) == 0
        llm.gate.set()
        for t in threads:
            t.join(30)
    assert outcomes.count("served") == 18 and llm.calls == 18
    assert spent(policy) == 18 * cost and held(policy) == 0


async def test_one_run_id_for_100_async_calls_admits_18():
    cost = _one_call_cost()
    policy = BudgetPolicy(limit=18 * cost, estimator=ExactEstimator(8))
    llm = UsageChat(max_tokens=9, delay=0.05)
    with enforce_budget(policy):
        results = await asyncio.gather(
            *(llm.ainvoke("hi", config={"run_id": SHARED_RUN_ID}) for _ in range(100)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, BudgetExceededError)]
    assert len(refused) == 82 and len(results) - len(refused) == 18 == llm.calls
    assert spent(policy) == 18 * cost and held(policy) == 0


def test_enforced_call_ids_are_random_never_the_run_id():
    from langchain_budgetguard.enforce import new_call_id

    ids = {new_call_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("enforce-") and len(i) == len("enforce-") + 32 for i in ids)
    assert SHARED_RUN_ID.hex not in "".join(ids)


# -- leases: a long call keeps its hold; a call another handler aborted gives its hold back -------


def test_a_call_longer_than_its_lease_keeps_its_hold():
    cost = _one_call_cost()
    # One call fits, two do not; an expired hold would be released for free, letting a second in.
    policy = BudgetPolicy(limit=cost * Decimal("1.5"), estimator=ExactEstimator(8), lease_seconds=0.3,
                          expired_hold="release")
    slow = UsageChat(max_tokens=9, delay=1.2)
    with enforce_budget(policy):
        first = threading.Thread(target=contextvars.copy_context().run, args=(lambda: slow.invoke("hi"),))
        first.start()
        time.sleep(0.7)  # the first call has outlived its lease twice over
        with pytest.raises(BudgetExceededError):
            UsageChat(max_tokens=9).invoke("hi")
        first.join(10)
    assert slow.calls == 1 and spent(policy) == cost and held(policy) == 0


class AbortingHandler(BaseCallbackHandler):
    """Another handler that refuses a call at its start, after the enforcer reserved it."""

    raise_error = True

    def on_chat_model_start(self, *args, **kwargs):
        raise PermissionError("not today")


def test_a_call_another_handler_aborts_at_start_gives_its_hold_back():
    cost = _one_call_cost()
    policy = BudgetPolicy(limit=cost, estimator=ExactEstimator(8))
    llm = UsageChat(max_tokens=9)
    with enforce_budget(policy) as enforcer:
        with pytest.raises(PermissionError):
            llm.invoke("hi", config={"callbacks": [enforcer, AbortingHandler()]})
        assert held(policy) == cost and llm.calls == 0  # reserved, then the run never started
        gc.collect()  # LangChain has dropped the run: its id is gone without an end event
        llm.invoke("hi")  # the next call releases the orphan first, so it fits
    assert llm.calls == 1 and spent(policy) == cost and held(policy) == 0


def test_the_block_reaches_the_calls_made_in_its_context_only():
    """As the README says: batch and a copied context carry the block; a thread started without
    the context runs its model call outside the block (the limit of any ContextVar-based hook)."""
    from concurrent.futures import ThreadPoolExecutor

    policy = BudgetGuard(limits=[Limit(usd=1, per="user")])
    model = UsageChat()
    with enforce_budget(policy, user_id="alice"), ThreadPoolExecutor(2) as pool:
        pool.submit(model.invoke, "hi").result()  # no context: unguarded
        pool.submit(contextvars.copy_context().run, model.invoke, "hi").result()
        model.batch(["hi", "hi"])
    (status,) = policy.status(user_id="alice")
    assert status.held == 0
    assert status.spent == 3 * Decimal("0.0000066")  # 8 input + 9 output tokens of gpt-4o-mini, three calls


class _AnsweredByAnother(UsageChat):
    """Asked for gpt-4o-mini; its reply names gpt-4o, as a provider's routing may."""

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._generate(*args, **kwargs)
        result.generations[0].message.response_metadata["model_name"] = "gpt-4o"
        return result

    def _stream(self, *args: Any, **kwargs: Any) -> Any:
        chunks = list(super()._stream(*args, **kwargs))
        chunks[-1].message.response_metadata["model_name"] = "gpt-4o"
        yield from chunks


@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_a_call_is_charged_as_the_model_its_reply_names(how: str) -> None:
    policy = BudgetGuard(limit=1)
    model = _AnsweredByAnother(model_name="gpt-4o-mini", input_tokens=1000, output_tokens=1000, max_tokens=1000)
    with enforce_budget(policy):
        reply = model.invoke("hi") if how == "invoke" else list(model.stream("hi"))[-1]
    guarded = BudgetGuard(_AnsweredByAnother(model_name="gpt-4o-mini", input_tokens=1000, output_tokens=1000,
                                             max_tokens=1000), limit=1)
    guarded.invoke("hi")
    assert policy.status()[0].spent == guarded.status()[0].spent == Decimal("0.0125")  # gpt-4o's price
    assert "budgetguard" not in reply.response_metadata  # the caller's reply is left as the model made it


# -- streams cut off after an early usage report (Anthropic's message_start, OpenAI mid-stream) ------


def _stream_in(model: Any, how: str, *, enforce: BudgetPolicy | None = None) -> None:
    """Stream ``model`` to its end (or its error), in an enforce block on ``enforce`` if given."""
    async def consume() -> None:
        async for _ in model.astream("hi"):
            pass

    def run() -> None:
        if how == "sync":
            for _ in model.stream("hi"):
                pass
        else:
            asyncio.run(consume())

    if enforce is None:
        run()
    else:
        with enforce_budget(enforce):
            run()


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_stream_cut_after_an_early_usage_report_is_charged_the_output_it_streamed_after_it(how: str) -> None:
    reply = " ".join(["word"] * 200)
    policy = BudgetPolicy(limit=1)
    with pytest.raises(ConnectionError):
        _stream_in(UsageUpFront(reply=reply, input_tokens=1000, output_tokens=200, fail_after=100, max_tokens=1000),
                   how, enforce=policy)
    (row,) = policy.store.read_ledger(policy.name)
    assert row.tokens["input"] == 1000
    assert row.tokens["output"] >= 100, "the words streamed after the report are charged, not its 1 output token"
    assert held(policy) == 0
    # Exactly what a BudgetGuard charges the same cut stream: one rule for both paths.
    guard = BudgetGuard(UsageUpFront(reply=reply, input_tokens=1000, output_tokens=200, fail_after=100,
                                     max_tokens=1000), limit=1)
    with pytest.raises(ConnectionError):
        _stream_in(guard, how)
    (guarded,) = guard.policy.store.read_ledger(guard.policy.name)
    assert (row.tokens, row.cost_nano) == (guarded.tokens, guarded.cost_nano)


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_stream_that_errored_after_its_full_usage_report_is_charged_that_report_only(how: str) -> None:
    from langchain_budgetguard.estimate import estimate_output_tokens

    reply = " ".join(["antidisestablishmentarianism"] * 50)  # the tokenizer counts far more than 50
    assert estimate_output_tokens(BudgetPolicy(limit=1).estimator, reply, "gpt-4o-mini") > 100
    policy = BudgetPolicy(limit=1)
    with pytest.raises(ConnectionError):
        _stream_in(UsageUpFront(reply=reply, input_tokens=1000, output_tokens=50, fail_at_end=True, max_tokens=1000),
                   how, enforce=policy)
    (row,) = policy.store.read_ledger(policy.name)
    assert (row.tokens["input"], row.tokens["output"]) == (1000, 50), "its usage is known: nothing estimated"
    assert row.cost_nano == 1000 * 150 + 50 * 600  # gpt-4o-mini: $0.15 / $0.60 per 1M tokens
    assert held(policy) == 0


# -- streams iterated alternately in one block: each is charged its own usage ---------------------


def _alternately(*streams: Any) -> list[str]:
    """Advance each stream one chunk in turn until all have ended; the error each ended in, by name."""
    active, ended = list(enumerate(streams)), [""] * len(streams)
    while active:
        for entry in list(active):
            i, stream = entry
            try:
                next(stream)
            except StopIteration:
                active.remove(entry)
            except ConnectionError as error:
                ended[i] = type(error).__name__
                active.remove(entry)
    return ended


async def _aalternately(*streams: Any) -> list[str]:
    active, ended = list(enumerate(streams)), [""] * len(streams)
    while active:
        for entry in list(active):
            i, stream = entry
            try:
                await stream.__anext__()
            except StopAsyncIteration:
                active.remove(entry)
            except ConnectionError as error:
                ended[i] = type(error).__name__
                active.remove(entry)
    return ended


@pytest.mark.parametrize("how", ["sync", "async"])
@pytest.mark.parametrize("run_ids", ["own", "shared"])
@pytest.mark.parametrize("models", ["different", "same"])
def test_streams_iterated_alternately_in_one_block_are_each_charged_their_own_usage(how: str, run_ids: str,
                                                                                    models: str) -> None:
    second_model = "gpt-4o" if models == "different" else "gpt-4o-mini"
    # The long one is cut off after its early usage report; the short one ends first, with its full usage.
    cut = UsageUpFront(model_name="gpt-4o-mini", reply=" ".join(["word"] * 60), input_tokens=1000, output_tokens=60,
                       fail_after=40, max_tokens=500)
    whole = UsageChat(model_name=second_model, reply="one two three", input_tokens=2000, output_tokens=7,
                      max_tokens=500)
    # Besides the budget's own limit, a limit per model: each call must draw on its own model's counter.
    policy = BudgetPolicy(limits=[Limit(usd=1), Limit(usd=1, per="model")])
    shared = UUID(int=7)

    def config() -> dict[str, Any]:
        return {"run_id": shared} if run_ids == "shared" else {}

    with enforce_budget(policy):
        if how == "sync":
            ended = _alternately(cut.stream("hi", config=config()), whole.stream("hi", config=config()))
        else:
            async def both() -> list[str]:
                return await _aalternately(cut.astream("hi", config=config()), whole.astream("hi", config=config()))
            ended = asyncio.run(both())
    assert ended == ["ConnectionError", ""]
    guard = BudgetGuard(UsageUpFront(model_name="gpt-4o-mini", reply=" ".join(["word"] * 60), input_tokens=1000,
                                     output_tokens=60, fail_after=40, max_tokens=500), limit=1)
    with pytest.raises(ConnectionError):
        list(guard.stream("hi"))
    (alone,) = guard.policy.store.read_ledger(guard.policy.name)
    rows = sorted(policy.store.read_ledger(policy.name), key=lambda r: r.tokens["input"])
    assert [(r.model, dict(r.tokens), r.cost_nano) for r in rows] == [
        ("gpt-4o-mini", dict(alone.tokens), alone.cost_nano),  # what the cut stream costs alone
        (second_model, {"input": 2000, "output": 7}, 2000 * 2500 + 7 * 10000 if models == "different"
         else 2000 * 150 + 7 * 600),
    ]
    assert alone.tokens["output"] >= 40
    assert held(policy) == 0
    mini, second = (sum(r.cost_nano for r in rows if r.model == m) for m in ("gpt-4o-mini", second_model))
    if models == "different":  # each model's counter holds that model's calls only
        assert [s.spent for s in policy.status(model_id="gpt-4o-mini") if s.scope == "model"] == [
            Decimal(mini) / 10**9]
        assert [s.spent for s in policy.status(model_id="gpt-4o") if s.scope == "model"] == [
            Decimal(second) / 10**9]


# -- the chunks a call streamed are charged when its end event does not carry them ---------------


class _StreamingChat(UsageChat):
    """A model whose ``invoke`` streams (``streaming=True``): LangChain's error event then carries
    none of what it streamed."""

    streaming: bool = False


class _RaisesOnError(BaseCallbackHandler):
    """A handler of the caller's, with ``raise_error``, that fails on a call's error event: the
    enforcer, after it, never gets that event."""

    raise_error = True

    def on_llm_error(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the caller's handler broke")


def _only_row(policy: BudgetPolicy) -> Any:
    (row,) = policy.store.read_ledger(policy.name)
    return row


@pytest.mark.parametrize("how", ["sync", "async"])
def test_an_invoke_that_streams_and_is_cut_off_is_charged_what_it_streamed(how: str) -> None:
    policy = BudgetPolicy(limit=1, estimator=ExactEstimator(1000))
    model = _StreamingChat(streaming=True, reply=" ".join(["word"] * 50), fail_after=30, max_tokens=500)
    with enforce_budget(policy), pytest.raises(ConnectionError):
        model.invoke("hi") if how == "sync" else asyncio.run(model.ainvoke("hi"))
    row = _only_row(policy)
    assert row.tokens["input"] == 1000 and row.tokens["output"] >= 30, "the 30 words it streamed are billed"
    assert held(policy) == 0


@pytest.mark.parametrize("how", ["sync", "async"])
@pytest.mark.parametrize("where", ["caught in the block", "leaving the block"])
def test_a_cut_stream_whose_error_event_a_handler_kept_from_the_enforcer_is_charged_what_it_streamed(
        how: str, where: str) -> None:
    policy = BudgetPolicy(limit=1, estimator=ExactEstimator(1000))
    model = UsageChat(reply=" ".join(["word"] * 50), fail_after=30, max_tokens=500)
    config = {"callbacks": [_RaisesOnError()]}

    async def consume() -> None:
        async for _ in model.astream("hi", config=config):
            pass

    def stream() -> None:
        if how == "sync":
            for _ in model.stream("hi", config=config):
                pass
        else:
            asyncio.run(consume())

    with pytest.raises(RuntimeError, match="handler broke"), enforce_budget(policy):
        if where == "caught in the block":
            try:
                stream()
            except RuntimeError:
                pass
            gc.collect()  # the run is gone without an end: settled at the block's end
            raise RuntimeError("the caller's handler broke (and the block went on)")
        stream()
    # At once (the error leaving the block holds the run, and the frames that say what it streamed).
    row = _only_row(policy)
    assert row.tokens["input"] == 1000 and row.tokens["output"] >= 30
    assert held(policy) == 0
