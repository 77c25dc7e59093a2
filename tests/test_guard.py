"""The guard on the in-process store: admission, degrade, refusal, streams, concurrency."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any
from decimal import Decimal

import pytest
from langchain_core.runnables import RunnableBinding
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_budgetguard import (
    BudgetExceededError,
    BudgetGuard,
    GuardMisuseError,
    IdentityError,
    Limit,
    UnknownModelPriceError,
)
from langchain_budgetguard.money import usd_to_nano

from .fakes import ExactEstimator, UsageChat

# $40/MTok in, $50/MTok out: 1000 in + 1000 out = $0.09 a call; "mini" is a tenth of that.
PRICES = {
    "big": {"input": "40", "output": "50"},
    "mini": {"input": "4", "output": "5"},
}


def big(**kw):
    return UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000, **kw)


def mini(**kw):
    return UsageChat(model_name="mini", input_tokens=1000, output_tokens=1000, max_tokens=1000, **kw)


def spent(guard, **ids):
    return sum((s.spent for s in guard.status(**ids)), Decimal(0))


def test_calls_are_served_until_the_next_would_exceed_then_refused_before_the_model():
    llm = big()
    guard = BudgetGuard(llm, limit=0.50, prices=PRICES, estimator=ExactEstimator(1000))
    for _ in range(5):
        guard.invoke("hi")
    assert llm.calls == 5
    (status,) = guard.status()
    assert status.spent == Decimal("0.45") and status.held == 0 and status.remaining == Decimal("0.05")
    with pytest.raises(BudgetExceededError) as info:
        guard.invoke("hi")
    assert llm.calls == 5, "a refused call must not reach the model"
    err = info.value
    assert (err.scope, err.scope_id, err.limit, err.spent, err.held) == ("global", None, Decimal("0.5"),
                                                                          Decimal("0.45"), Decimal(0))
    assert err.estimate == Decimal("0.09") and err.model == "big" and err.resets_at is None
    assert "limit $0.5" in str(err) and "spent $0.45" in str(err) and "big" in str(err)


def test_degrade_to_a_cheaper_model_then_refuse_when_nothing_fits():
    llm, cheap = big(), mini()
    guard = BudgetGuard(llm, limit=0.50, degrade_to=[cheap], prices=PRICES, estimator=ExactEstimator(1000))
    served = []
    with pytest.raises(BudgetExceededError) as info:
        for _ in range(100):
            served.append(guard.invoke("hi").response_metadata["budgetguard"]["model"])
    assert served == ["big"] * 5 + ["mini"] * 5
    assert (llm.calls, cheap.calls) == (5, 5)
    assert [r.model for r in info.value.refusals] == ["big", "mini"]
    assert spent(guard) == Decimal("0.495") <= Decimal("0.5")


@pytest.mark.parametrize("how", ["configurable_alternatives", "call kwarg"])
def test_a_refusal_names_the_model_the_call_goes_to(how):
    """A configurable_alternatives call for o1 was held at o1's price but refused as "estimate on
    gpt-4o-mini ... Models tried: gpt-4o-mini" (the default's name), and ``refusal.model`` said the same."""
    from langchain_core.runnables import ConfigurableField

    guard = BudgetGuard(UsageChat(model_name="gpt-4o-mini"), limit=Decimal("0.01"), min_output_tokens=None)
    if how == "configurable_alternatives":
        runnable = guard.configurable_alternatives(ConfigurableField(id="m"), default_key="mini",
                                                   o1=UsageChat(model_name="o1"))
        call = {"config": {"configurable": {"m": "o1"}}}
    else:
        runnable, call = guard, {"model": "o1"}
    for run in (lambda: runnable.invoke("hi", **call), lambda: asyncio.run(runnable.ainvoke("hi", **call))):
        with pytest.raises(BudgetExceededError) as info:
            run()
        error = info.value
        assert error.model == error.refusal.model == "o1"
        assert "estimate on o1 " in str(error) and "Models tried: o1." in str(error)
        assert "gpt-4o-mini" not in str(error)
    assert spent(guard) == 0 and guard.invoke("hi").response_metadata["budgetguard"]["model"] == "gpt-4o-mini"


def test_degrade_at_starts_degrading_before_the_limit():
    llm, cheap = big(), mini()
    guard = BudgetGuard(llm, limit=1.0, degrade_to=[cheap], degrade_at=0.5, prices=PRICES,
                        estimator=ExactEstimator(1000))
    served = [guard.invoke("hi").response_metadata["budgetguard"]["model"] for _ in range(7)]
    # big while spent + 0.09 <= 0.50: five calls (0.45); then mini.
    assert served == ["big"] * 5 + ["mini"] * 2


def test_reply_carries_served_model_and_exact_cost():
    guard = BudgetGuard(UsageChat(), limit=5)
    reply = guard.invoke("hello")
    meta = reply.response_metadata["budgetguard"]
    # gpt-4o-mini: 8 in * $0.15/MTok + 9 out * $0.60/MTok
    assert meta["cost_usd"] == Decimal("0.0000066") and meta["model"] == "gpt-4o-mini"
    assert meta["degraded"] is False and meta["estimated"] is False
    assert spent(guard) == Decimal("0.0000066")


def test_strict_default_never_overspends_with_real_estimates():
    # 18 prompt tokens: what OpenAI counts for this message (o200k content + chat framing); strict is
    # exact for gpt-4o-mini now, so the fake must report a count the provider could report.
    llm = UsageChat(model_name="gpt-4o-mini", input_tokens=18, output_tokens=500, max_tokens=500)
    guard = BudgetGuard(llm, limit=0.01)
    with pytest.raises(BudgetExceededError):
        for _ in range(1000):
            guard.invoke("What's the oldest known example of cuneiform?")
    (status,) = guard.status()
    assert status.spent <= Decimal("0.01") and status.held == 0
    assert llm.calls > 10


def test_per_user_limits_are_independent_and_need_an_id():
    guard = BudgetGuard(big(), limits=[Limit(usd=0.2, per="user", window="day")], prices=PRICES,
                        estimator=ExactEstimator(1000))
    alice = {"configurable": {"user_id": "alice"}}
    bob = {"metadata": {"user_id": "bob"}}
    guard.invoke("hi", alice)
    guard.invoke("hi", alice)
    with pytest.raises(BudgetExceededError) as info:
        guard.invoke("hi", alice)
    assert info.value.scope == "user" and info.value.scope_id == "alice"
    assert info.value.resets_at is not None
    guard.invoke("hi", bob)  # bob's budget is untouched by alice's
    assert spent(guard, user_id="alice") == Decimal("0.18") and spent(guard, user_id="bob") == Decimal("0.09")
    with pytest.raises(IdentityError, match="user_id"):
        guard.invoke("hi")


def test_guards_of_the_same_name_share_a_budget_and_other_names_do_not():
    from langchain_budgetguard.stores import MemoryStore

    store = MemoryStore()
    kw = dict(limit=0.2, store=store, prices=PRICES, estimator=ExactEstimator(1000))
    a, b = BudgetGuard(big(), name="team", **kw), BudgetGuard(big(), name="team", **kw)
    other = BudgetGuard(big(), name="other", **kw)
    a.invoke("hi")
    b.invoke("hi")
    with pytest.raises(BudgetExceededError):
        a.invoke("hi")
    other.invoke("hi")
    assert spent(a) == Decimal("0.18") and spent(other) == Decimal("0.09")


def test_policy_wrap_shares_one_budget():
    policy = BudgetGuard(limit=0.2, prices=PRICES, estimator=ExactEstimator(1000))
    a, b = policy.wrap(big()), policy.wrap(mini())
    a.invoke("hi")
    b.invoke("hi")
    assert spent(policy) == Decimal("0.099")


def test_guard_after_the_model_fails_at_once_with_the_wrapping_form():
    llm = big()
    chain = llm | BudgetGuard(limit=5.0, prices=PRICES)
    with pytest.raises(GuardMisuseError, match=r"BudgetGuard\(llm, limit=5.0\)"):
        chain.invoke("hi")
    with pytest.raises(GuardMisuseError, match="wrap"):
        BudgetGuard(limit=5.0).invoke("hi")


def test_unknown_model_is_refused_not_free_and_fallback_price_works():
    llm = UsageChat(model_name="my-private-finetune", provider="acme")
    with pytest.raises(UnknownModelPriceError, match="prices="):
        BudgetGuard(llm, limit=5).invoke("hi")
    assert llm.calls == 0
    reply = BudgetGuard(llm, limit=5, fallback_price={"input": "1", "output": "2"}).invoke("hi")
    assert reply.response_metadata["budgetguard"]["cost_usd"] == Decimal("0.000026")


def test_lcel_chain_with_prompt_and_parser():
    guard = BudgetGuard(UsageChat(reply="pong"), limit=1)
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | guard | StrOutputParser()
    assert chain.invoke({"q": "ping"}) == "pong"
    assert chain.batch([{"q": "a"}, {"q": "b"}]) == ["pong", "pong"]
    assert spent(guard) == Decimal("0.0000066") * 3


def test_eight_threads_never_overspend():
    llm = big(delay=0.001)
    guard = BudgetGuard(llm, limit=1.0, prices=PRICES, estimator=ExactEstimator(1000))
    refused = []

    def worker():
        for _ in range(30):
            try:
                guard.invoke("hi")
            except BudgetExceededError:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (status,) = guard.status()
    assert llm.calls == 11 and status.spent == Decimal("0.99") and status.held == 0
    assert len(refused) == 240 - 11


async def test_gather_of_ainvoke_never_overspends():
    llm = big(delay=0.01)
    guard = BudgetGuard(llm, limit=0.5, prices=PRICES, estimator=ExactEstimator(1000))
    results = await asyncio.gather(*(guard.ainvoke("hi") for _ in range(10)), return_exceptions=True)
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(served) == 5 and all(isinstance(r, BudgetExceededError) for r in results if r not in served)
    (status,) = await guard.astatus()
    assert status.spent == Decimal("0.45") and status.held == 0


def test_batch_charges_every_input():
    llm = big()
    guard = BudgetGuard(llm, limit=1, prices=PRICES, estimator=ExactEstimator(1000))
    out = guard.batch(["a", "b", "c"])
    assert len(out) == 3 and spent(guard) == Decimal("0.27")


async def test_abatch_charges_every_input():
    guard = BudgetGuard(big(), limit=1, prices=PRICES, estimator=ExactEstimator(1000))
    await guard.abatch(["a", "b"])
    assert spent(guard) == Decimal("0.18")


def test_full_stream_is_charged_exactly_and_ends_with_a_cost_chunk():
    guard = BudgetGuard(UsageChat(), limit=1)
    chunks = list(guard.stream("hello"))
    text = "".join(c.content for c in chunks)
    assert text == "Hello! How can I assist you today?"
    assert chunks[-1].response_metadata["budgetguard"]["cost_usd"] == Decimal("0.0000066")
    (status,) = guard.status()
    assert status.spent == Decimal("0.0000066") and status.held == 0


async def test_full_astream_is_charged_exactly():
    guard = BudgetGuard(UsageChat(), limit=1)
    chunks = [c async for c in guard.astream("hello")]
    assert chunks[-1].response_metadata["budgetguard"]["estimated"] is False
    (status,) = await guard.astatus()
    assert status.spent == Decimal("0.0000066") and status.held == 0


def test_stream_without_usage_is_charged_from_counted_output_marked_estimated():
    guard = BudgetGuard(UsageChat(report_usage=False), limit=1)
    chunks = list(guard.stream("hello"))
    meta = chunks[-1].response_metadata["budgetguard"]
    assert meta["estimated"] is True and meta["output_tokens"] > 0 and meta["cost_usd"] > 0
    (status,) = guard.status()
    assert status.spent == meta["cost_usd"] and status.held == 0


def test_abandoned_stream_is_charged_and_holds_nothing():
    guard = BudgetGuard(UsageChat(reply="one two three four five six"), limit=1)
    stream = guard.stream("hello")
    next(stream)
    next(stream)
    (during,) = guard.status()
    assert during.held > 0
    del stream
    gc.collect()
    (after,) = guard.status()
    assert after.held == 0 and after.spent > 0


async def test_abandoned_astream_is_charged_and_holds_nothing():
    guard = BudgetGuard(UsageChat(reply="one two three four five six"), limit=1)
    stream = guard.astream("hello")
    await stream.__anext__()
    await stream.aclose()
    (after,) = await guard.astatus()
    assert after.held == 0 and after.spent > 0


def test_stream_that_fails_midway_is_charged_and_releases_its_hold():
    guard = BudgetGuard(UsageChat(reply="one two three four", fail_after=2), limit=1)
    with pytest.raises(ConnectionError):
        list(guard.stream("hello"))
    (status,) = guard.status()
    assert status.held == 0 and status.spent > 0


class _StreamingFake(UsageChat):
    streaming: bool = False  # as ChatOpenAI's: True makes invoke stream


@pytest.mark.parametrize("api", ["sync", "async"])
def test_an_invoke_that_streams_and_breaks_off_is_charged_what_it_streamed(api):
    """An invoke the model serves by streaming, cut after 4 chunks by an error that names no
    network failure: with no run of the guard's own, nothing saw the chunks, and the call was free."""
    model = _StreamingFake(reply="one two three four five six seven eight", fail_after=4, streaming=True)
    guard = BudgetGuard(model, limit=1)
    whole = BudgetGuard(_StreamingFake(reply="one two three four", report_usage=False), limit=1)
    with pytest.raises(ConnectionError):
        guard.invoke("hello") if api == "sync" else asyncio.run(guard.ainvoke("hello"))
    list(whole.stream("hello"))  # the same four chunks and no usage report: what they cost, estimated
    (status,), (reference,) = guard.status(), whole.status()
    assert status.held == 0 and status.spent == reference.spent > 0


def test_failed_invoke_releases_its_hold():
    class Boom(UsageChat):
        def _generate(self, *a, **k):
            raise RuntimeError("provider down")

    guard = BudgetGuard(Boom(), limit=1)
    with pytest.raises(RuntimeError):
        guard.invoke("hi")
    (status,) = guard.status()
    assert status.held == 0 and status.spent == 0


async def test_astream_events_shows_the_model_run_inside_the_guard():
    guard = BudgetGuard(UsageChat(), limit=1)
    events = [e async for e in guard.astream_events("hello", version="v2")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "on_chain_start" and events[0]["name"] == "BudgetGuard"
    assert "on_chat_model_stream" in kinds and kinds[-1] == "on_chain_end"
    (status,) = await guard.astatus()
    assert status.spent == Decimal("0.0000066")


def test_callbacks_see_the_guard_run_and_the_model_run():
    from langchain_core.callbacks import BaseCallbackHandler

    seen = []

    class Spy(BaseCallbackHandler):
        def on_chain_start(self, serialized, inputs, **kw):
            seen.append(("chain", kw.get("name")))

        def on_chat_model_start(self, serialized, messages, **kw):
            seen.append(("model", kw.get("parent_run_id") is not None))

    BudgetGuard(UsageChat(), limit=1).invoke("hi", {"callbacks": [Spy()]})
    assert seen == [("chain", "BudgetGuard"), ("model", True)]


def test_bind_tools_returns_a_guarded_runnable_with_tools_in_the_estimate():
    from langchain_core.tools import tool

    @tool
    def lookup(city: str) -> str:
        """Look up the weather of a city in the almanac of the world."""
        return "sunny"

    guard = BudgetGuard(UsageChat(), limit=1)
    bound = guard.bind_tools([lookup])
    # What LangChain expects of bind_tools: a binding (the tools travel with the call) over a guard.
    assert isinstance(bound, RunnableBinding) and isinstance(bound.bound, BudgetGuard)
    assert bound.bound.policy is guard.policy and "tools" in bound.kwargs
    reply = bound.invoke("weather in Paris?")
    assert reply.response_metadata["budgetguard"]["reserved_usd"] > \
        guard.invoke("weather in Paris?").response_metadata["budgetguard"]["reserved_usd"]


def test_with_structured_output_is_guarded():
    from pydantic import BaseModel

    class Answer(BaseModel):
        city: str

    llm = UsageChat(tool_calls=[{"name": "Answer", "args": {"city": "Paris"}, "id": "1"}])
    guard = BudgetGuard(llm, limit=1)
    structured = guard.with_structured_output(Answer)
    assert structured.invoke("where?") == Answer(city="Paris")
    assert spent(guard) == Decimal("0.0000066")
    raw = guard.with_structured_output(Answer, include_raw=True).invoke("where?")
    assert raw["parsed"] == Answer(city="Paris") and "budgetguard" in raw["raw"].response_metadata


def test_attributes_read_through_to_the_model():
    guard = BudgetGuard(UsageChat(model_name="gpt-4o"), limit=1)
    assert guard.model_name == "gpt-4o"
    with pytest.raises(AttributeError):
        guard.no_such_attribute


def test_reservation_uses_max_tokens_and_default_cap():
    guard = BudgetGuard(UsageChat(model_name="big", max_tokens=None), limit=100, prices=PRICES,
                        estimator=ExactEstimator(1000))
    capped = guard.bind(max_tokens=10)
    r1 = capped.invoke("hi").response_metadata["budgetguard"]["reserved_usd"]
    r2 = guard.invoke("hi").response_metadata["budgetguard"]["reserved_usd"]
    assert r1 == Decimal("0.0405")  # 1000 in * 40 + 10 out * 50, per MTok
    assert r2 == Decimal("0.04") + Decimal(4096) * 50 / 10**6


def test_lease_expiry_reaps_a_crashed_calls_hold_by_policy():
    from langchain_budgetguard.stores import Counter, Hold, MemoryStore

    clock = [1000.0]
    store = MemoryStore(clock=lambda: clock[0])
    guard = BudgetGuard(big(), limit=1, store=store, prices=PRICES, estimator=ExactEstimator(1000),
                        lease_seconds=30)
    (status,) = guard.status()
    # A call that crashed after reserving: a hold with no settle.
    store.reserve([Counter(status.key, usd_to_nano(1))], Hold("crashed", usd_to_nano("0.09"), 30,
                                                              usd_to_nano("0.04")))
    assert guard.status()[0].held == Decimal("0.09")
    clock[0] += 31
    (status,) = guard.status()
    assert status.held == 0 and status.spent == Decimal("0.04")


async def test_astream_events_shows_degrade_refusal_and_cost_events():
    guard = BudgetGuard(big(), limit=0.2, degrade_to=[mini()], prices=PRICES, estimator=ExactEstimator(1000))

    async def custom_events():
        try:
            return [e async for e in guard.astream_events("hi", version="v2") if e["event"] == "on_custom_event"]
        except BudgetExceededError as exc:
            return exc

    first = await custom_events()
    assert [e["name"] for e in first] == ["budgetguard_cost"] and first[0]["data"]["model"] == "big"
    await custom_events()
    third = await custom_events()  # 0.18 spent: big no longer fits, mini does
    assert [e["name"] for e in third] == ["budgetguard_degrade", "budgetguard_cost"]
    assert third[0]["data"]["from_model"] == "big" and third[0]["data"]["to_model"] == "mini"
    assert third[0]["data"]["refusal"]["spent"] == Decimal("0.18")
    await custom_events()  # mini: 0.198 spent, 0.002 left
    events = []
    with pytest.raises(BudgetExceededError):
        async for e in guard.astream_events("hi", version="v2"):
            events.append(e)
    names = [e["name"] for e in events if e["event"] == "on_custom_event"]
    assert names == ["budgetguard_degrade", "budgetguard_refusal"]


def test_long_stream_renews_its_lease_and_a_failed_renewal_does_not_break_it():
    from langchain_budgetguard.errors import BudgetStoreUnavailableError
    from langchain_budgetguard.stores import MemoryStore

    class FlakyRenewStore(MemoryStore):
        renewals = 0

        def renew(self, call_id, keys, lease_seconds):
            FlakyRenewStore.renewals += 1
            if FlakyRenewStore.renewals == 1:
                raise BudgetStoreUnavailableError("store down during renew")
            return super().renew(call_id, keys, lease_seconds)

    store = FlakyRenewStore()
    llm = UsageChat(reply="a b c d e f", delay=0)
    guard = BudgetGuard(llm, limit=1, store=store, lease_seconds=0.03)
    chunks = []
    import time as _time
    for chunk in guard.stream("hello"):
        chunks.append(chunk)
        _time.sleep(0.02)
    assert "".join(c.content for c in chunks) == "a b c d e f"
    assert FlakyRenewStore.renewals >= 2
    (status,) = guard.status()
    assert status.held == 0 and status.spent == Decimal("0.0000066")


def test_fail_open_allowance_is_per_outage_and_closed_refuses_clearly():
    from langchain_budgetguard.errors import BudgetStoreUnavailableError
    from langchain_budgetguard.stores import MemoryStore

    class SwitchableStore(MemoryStore):
        down = False

        def reserve(self, counters, hold):
            if self.down:
                raise BudgetStoreUnavailableError("memory-test: reserve failed (store down)")
            return super().reserve(counters, hold)

    store = SwitchableStore()
    closed = BudgetGuard(big(), limit=10, store=store, prices=PRICES, estimator=ExactEstimator(1000))
    llm = big()
    guard = BudgetGuard(llm, limit=10, store=store, prices=PRICES, estimator=ExactEstimator(1000),
                        on_store_error="fail_open", fail_open_allowance="0.2")
    store.down = True
    with pytest.raises(BudgetStoreUnavailableError, match="store down"):
        closed.invoke("hi")
    guard.invoke("hi")
    guard.invoke("hi")  # 0.18 of the 0.20 allowance
    with pytest.raises(BudgetStoreUnavailableError, match="allowance"):
        guard.invoke("hi")
    assert llm.calls == 2
    guard.policy.outage_over_seconds = 0.05
    store.down = False
    guard.invoke("hi")  # the store answers (the outage is over once it has for outage_over_seconds)
    time.sleep(0.06)
    guard.invoke("hi")  # answered with no failure for 0.06 s: the outage is over
    store.down = True
    guard.invoke("hi")  # a new outage, a fresh allowance
    assert llm.calls == 5
    (status,) = guard.status()
    assert status.spent == Decimal("0.45") and status.held == 0  # every served call reached the store


class _UsageUpFront(UsageChat):
    """Reports the prompt's usage on its first chunk (input, 1 output token), the rest at its end."""

    def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        from langchain_core.messages import AIMessageChunk
        from langchain_core.outputs import ChatGenerationChunk

        pieces = self._pieces()
        for i, piece in enumerate(pieces):
            if self.fail_after is not None and i >= self.fail_after:
                raise ConnectionError("the connection dropped")
            usage = {"input_tokens": 1000, "output_tokens": 1, "total_tokens": 1001} if i == 0 else None
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece, usage_metadata=usage))
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata={"input_tokens": 0, "output_tokens": len(pieces) - 1,
                                        "total_tokens": len(pieces) - 1}))


@pytest.mark.parametrize("how", ["closed", "cut"])
def test_a_stream_broken_off_after_an_early_usage_report_is_charged_the_output_it_streamed(how: str) -> None:
    reply = " ".join(["word"] * 200)
    guard = BudgetGuard(_UsageUpFront(reply=reply, fail_after=100 if how == "cut" else None), limit=1)
    stream = guard.stream("hi")
    if how == "closed":
        for _ in range(100):
            next(stream)
        stream.close()
    else:
        with pytest.raises(ConnectionError):
            list(stream)
    (row,) = guard.policy.store.read_ledger(guard.policy.name)
    assert row.tokens["output"] >= 100  # the words it streamed, not the 1 the early report counted
    assert guard.status()[0].held == 0
