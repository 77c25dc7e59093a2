"""The guard under faults and hostile replies: long calls keep their holds, no call id admits twice,
usage that cannot be real and streams that cannot be read are charged by policy, never free."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
from langchain_core.messages import AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk

from langchain_budgetguard import (
    BudgetExceededError,
    BudgetGuard,
    BudgetStoreUnavailableError,
    CallIdReusedError,
    Limit,
)
from langchain_budgetguard.stores.base import SettleResult
from langchain_budgetguard.stores.memory import MemoryStore

from .fakes import ExactEstimator, UsageChat
from .redis_support import fresh_prefix, redis_url  # noqa: F401

PRICES = {"big": {"input": "40", "output": "50"}}  # 1000 in + 1000 out = $0.09, input alone $0.04


def big(**kwargs) -> UsageChat:
    return UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000, **kwargs)


def state(guard) -> tuple[Decimal, Decimal]:
    (status,) = guard.status()
    return status.spent, status.held


class LateStream(UsageChat):
    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        time.sleep(8.0)
        yield from super()._stream(messages, stop, run_manager, **kwargs)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_an_8s_invoke_and_an_8s_stream_keep_their_holds_with_a_2s_lease(request, store):
    url = request.getfixturevalue("redis_url") if store == "redis" else None
    options = dict(limit="0.20", prices=PRICES, estimator=ExactEstimator(1000), lease_seconds=2,
                   name=f"{fresh_prefix()}lease")
    if url:
        options["store"] = url
    slow = BudgetGuard(big(delay=8.0), **options)  # invoke: 8 s before the reply
    first_chunk_late = BudgetGuard(LateStream(model_name="big", input_tokens=1000, output_tokens=1000,
                                              max_tokens=1000), policy=slow.policy)  # first chunk after 8 s
    done: list[object] = []
    threads = [threading.Thread(target=lambda: done.append(slow.invoke("x"))),
               threading.Thread(target=lambda: done.append(list(first_chunk_late.stream("x"))))]
    for t in threads:
        t.start()
    time.sleep(5)  # well past two leases: without renewals both holds would have been reaped
    spent, held = state(slow)
    assert spent == 0 and held == Decimal("0.18")
    with pytest.raises(BudgetExceededError):  # $0.09 more fits only if the two holds were gone
        BudgetGuard(big(), policy=slow.policy).invoke("x")
    for t in threads:
        t.join()
    assert len(done) == 2
    assert state(slow) == (Decimal("0.18"), Decimal(0))


def test_a_repeated_call_id_is_refused_and_the_first_call_is_charged_once():
    guard = BudgetGuard(UsageChat(), limit=1)
    reservation = guard.reserve("hi", call_id="request-42")
    reservation.settle(usage=None, output_text="hello")
    with pytest.raises(CallIdReusedError, match="request-42"):
        guard.reserve("hi", call_id="request-42")
    with pytest.raises(ValueError):
        guard.reserve("hi", call_id="\ud800")
    spent, held = state(guard)
    assert spent > 0 and held == 0


def test_a_usage_report_that_cannot_be_real_charges_the_whole_reservation():
    class Absurd(UsageChat):
        def _usage(self):
            return {"input_tokens": 2**63, "output_tokens": 2**63, "total_tokens": 2**64 - 1}

    guard = BudgetGuard(Absurd(max_tokens=100), limit=1)
    reply = guard.invoke("hi")
    meta = reply.response_metadata["budgetguard"]
    assert meta["estimated"] is True and "problem" in meta
    assert meta["cost_usd"] == meta["reserved_usd"] > 0  # charged by policy: never free, never overflowing
    assert state(guard) == (meta["reserved_usd"], Decimal(0))


def test_a_stream_whose_last_chunk_has_junk_usage_is_settled_not_left_held():
    class JunkTail(UsageChat):
        def _stream(self, messages, stop=None, run_manager=None, **kwargs):
            yield ChatGenerationChunk(message=AIMessageChunk(content="Hello"))
            junk = AIMessageChunk(content="", usage_metadata={"input_tokens": 1, "output_tokens": 1,
                                                              "total_tokens": 2})
            junk.usage_metadata["output_tokens"] = "lots"  # passes validation, breaks LangChain's merge
            yield ChatGenerationChunk(message=junk)

    guard = BudgetGuard(JunkTail(max_tokens=100), limit=1)
    with pytest.raises(Exception):  # noqa: B017, PT011 - LangChain's own merge error
        list(guard.stream("hi"))
    spent, held = state(guard)
    assert held == 0 and spent > 0


def test_anthropic_default_max_tokens_does_not_hold_the_whole_output_limit(anthropic_server, billed):
    llm = anthropic_server.chat_model(model="claude-opus-4-6")
    assert llm.max_tokens > 60_000  # ChatAnthropic fills in the model's full output limit
    anthropic_server.set_default("A short answer.")
    guard = BudgetGuard(llm, limit=3)
    for _ in range(20):
        guard.invoke("hi")
    sent = {r.body["max_tokens"] for r in anthropic_server.calls}
    assert sent == {4096}  # the guard's default cap, sent and reserved instead of 128k
    spent, held = state(guard)
    assert held == 0 and spent == billed(anthropic_server) <= 3


def test_a_refusal_names_what_dominated_and_what_would_fit():
    guard = BudgetGuard(UsageChat(), limit="0.0005", min_output_tokens=None)  # no shrinking
    with pytest.raises(BudgetExceededError) as caught:
        guard.invoke("hi")
    message = str(caught.value)
    refusal = caught.value.refusal
    assert refusal.dominant == "output" and refusal.output_tokens == 4096
    assert "output cap dominates" in message and f"at most {refusal.fitting_output_tokens:,}" in message
    assert 0 < refusal.fitting_output_tokens < 4096
    # and the fix it names works: that cap fits
    guard.invoke("hi", max_tokens=refusal.fitting_output_tokens)


def test_close_and_context_managers_close_the_store():
    from langchain_budgetguard.stores.memory import MemoryStore

    class Closing(MemoryStore):
        closed = 0

        def close(self) -> None:
            Closing.closed += 1
            super().close()

        async def aclose(self) -> None:
            Closing.closed += 1
            await super().aclose()

    with BudgetGuard(UsageChat(), limit=1, store=Closing()) as guard:
        guard.invoke("hi")
    assert Closing.closed == 1

    async def run() -> None:
        async with BudgetGuard(UsageChat(), limit=1, store=Closing()) as guard:
            await guard.ainvoke("hi")

    import asyncio

    asyncio.run(run())
    assert Closing.closed == 2


@pytest.mark.parametrize(("policy", "outcome"), [("fail_closed", "fail_closed"), ("fail_open", "fail_open")])
def test_a_store_error_is_reported_as_an_event(policy, outcome):
    from langchain_core.callbacks import BaseCallbackHandler

    from langchain_budgetguard import BudgetStoreUnavailableError
    from langchain_budgetguard.stores.memory import MemoryStore

    class Down(MemoryStore):
        def reserve(self, counters, hold):
            raise BudgetStoreUnavailableError("the store is down (test)")

    seen = []

    class Events(BaseCallbackHandler):
        def on_custom_event(self, name, data, **kwargs):
            seen.append((name, data))

    guard = BudgetGuard(UsageChat(), limit=1, store=Down(), on_store_error=policy, fail_open_allowance=1)
    config = {"callbacks": [Events()]}
    if policy == "fail_closed":
        with pytest.raises(BudgetStoreUnavailableError):
            guard.invoke("hi", config)
    else:
        guard.invoke("hi", config)
    errors = [data for name, data in seen if name == "budgetguard_store_error"]
    assert [(e["operation"], e["outcome"], e["error"]) for e in errors] == [
        ("reserve", outcome, "BudgetStoreUnavailableError")]


# -- the fail-open allowance is one per outage, not refilled by any answer of the store ---------

class PartlyDown(MemoryStore):
    """A MemoryStore whose counters under the hash tags in ``down`` cannot be reached (a cluster
    with one master down, or, with every tag, a single Redis): reserves on them fail, settles are
    journaled as RedisStore journals them, and replayed by the next reserve that gets through."""

    def __init__(self) -> None:
        super().__init__()
        self.down: set[str] = set()
        self.journal: list[tuple] = []

    def _reachable(self, keys) -> bool:
        return not any(k.startswith("{") and k[1:k.index("}")] in self.down for k in keys)

    def reserve(self, counters, hold):
        if not self._reachable([c.key for c in counters]):
            raise BudgetStoreUnavailableError("test store: reserve failed (its master is down)")
        result = super().reserve(counters, hold)
        for entry in [e for e in self.journal if self._reachable(e[1])]:
            self.journal.remove(entry)
            super().settle(*entry[:3], **entry[3])
        return result

    async def areserve(self, counters, hold):
        return self.reserve(counters, hold)

    def settle(self, call_id, keys, amount, **options):
        if not self._reachable(keys):
            self.journal.append((call_id, tuple(keys), amount, options))
            return SettleResult(applied=False, charged=amount, pending=True)
        return super().settle(call_id, keys, amount, **options)

    async def asettle(self, call_id, keys, amount, **options):
        return self.settle(call_id, keys, amount, **options)


def _fail_open_guard(store, llm, **options):
    return BudgetGuard(llm, limits=[Limit(usd=10, per="tenant", window="day")], store=store, name="fo",
                       prices=PRICES, estimator=ExactEstimator(1000), on_store_error="fail_open",
                       fail_open_allowance="0.2", **options)  # $0.09 a call: 2 calls per allowance


def _served(guard, tenant: str, use_async: bool = False) -> bool:
    import asyncio

    config = {"configurable": {"tenant_id": tenant}}
    try:
        if use_async:
            asyncio.run(guard.ainvoke("hi", config=config))
        else:
            guard.invoke("hi", config=config)
        return True
    except BudgetStoreUnavailableError:
        return False


@pytest.mark.parametrize("use_async", [False, True])
def test_answers_for_tenants_on_live_nodes_do_not_refill_the_allowance_of_one_on_a_dead_node(use_async):
    store = PartlyDown()
    llm = big()
    guard = _fail_open_guard(store, llm)
    store.down = {"fo.t.acme"}  # acme's master is gone; beta's answers
    alone = [_served(guard, "acme", use_async) for _ in range(6)]
    assert alone == [True, True, False, False, False, False]
    guard.policy.end_outage()
    mixed = []
    for _ in range(6):
        mixed.append(_served(guard, "acme", use_async))
        assert _served(guard, "beta", use_async)  # held and charged in the store as usual
    assert mixed == alone, "another tenant's answers must not hand out a fresh allowance"
    assert llm.calls == 2 + 2 + 6


def test_a_flapping_store_gives_one_allowance_until_it_has_been_healthy_for_a_while():
    store = PartlyDown()
    llm = big()
    guard = _fail_open_guard(store, llm)
    guard.policy.outage_over_seconds = 0.3
    served = []
    for _ in range(4):  # down for one call, up for the next
        store.down = {"fo.t.acme"}
        served.append(_served(guard, "acme"))
        store.down = set()
        assert _served(guard, "acme")
    assert served == [True, True, False, False]
    assert not store.journal  # the journal drained while it was up: still the same outage
    time.sleep(0.35)
    assert _served(guard, "acme")  # healthy for outage_over_seconds: the outage is over
    store.down = {"fo.t.acme"}
    assert _served(guard, "acme")  # a new outage, a fresh allowance
    (status,) = guard.status(tenant_id="beta")
    assert status.spent == 0


def test_the_outage_goes_on_while_settles_served_fail_open_wait_in_the_journal():
    store = PartlyDown()
    guard = _fail_open_guard(store, big())
    guard.policy.outage_over_seconds = 0.1
    store.down = {"fo.t.acme"}
    assert [_served(guard, "acme") for _ in range(3)] == [True, True, False]
    assert len(store.journal) == 2
    time.sleep(0.15)
    assert _served(guard, "beta")  # no failure for 0.15 s, but acme's settles have not landed
    assert not _served(guard, "acme")
    store.down = set()
    assert _served(guard, "acme") and not store.journal  # acme's settles replayed: healthy from now
    time.sleep(0.15)
    assert _served(guard, "beta")  # the outage is over
    store.down = {"fo.t.acme"}
    assert [_served(guard, "acme") for _ in range(3)] == [True, True, False]  # a new one: a fresh allowance
    store.down = set()
    assert _served(guard, "beta")
    (status,) = guard.status(tenant_id="acme")
    assert status.spent == Decimal("0.45") and status.held == 0
