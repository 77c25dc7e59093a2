"""Shadow mode: the guard reserves, settles and records exactly as in enforce mode, but never refuses
or degrades; what enforce mode would have done goes to the ledger, the metrics and the events.

A $0.10 budget and calls of $0.09 each: enforce mode serves one call and refuses the rest; shadow
mode serves every call, charges each exactly, and marks every call after the first as a would-be
refusal (ledger row ``refused``, ``budgetguard_refusal`` event with ``shadow``, the
``budgetguard_shadow_refusals_total`` metric; never ``budgetguard_refusals_total``).
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from prometheus_client import CollectorRegistry

from langchain_budgetguard import BudgetExceededError, BudgetGuard, Limit
from langchain_budgetguard.metrics import BudgetMetrics
from langchain_budgetguard.overrides import BudgetAdmin
from langchain_budgetguard.stores.memory import MemoryStore
from langchain_budgetguard.stores.redis import RedisStore

from .fakes import ExactEstimator, UsageChat
from .redis_support import fresh_prefix, redis_url  # noqa: F401

PRICES = {"big": {"input": "40", "output": "50"}, "mini": {"input": "4", "output": "5"}}
CALL = Decimal("0.09")  # 1000 input tokens at $40/M + 1000 output tokens at $50/M


class Events(BaseCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.seen.append((name, data))


def model(name: str) -> UsageChat:
    return UsageChat(model_name=name, input_tokens=1000, output_tokens=1000, max_tokens=1000)


def guard_on(store: Any, mode: str, **kw: Any) -> BudgetGuard:
    return BudgetGuard(model("big"), limits=[Limit(usd="0.10", per="user", window="day")], store=store,
                       name=f"shadow-{uuid.uuid4().hex[:8]}", prices=PRICES, estimator=ExactEstimator(1000),
                       mode=mode, **kw)


def run(guard: BudgetGuard, calls: int, handler: BaseCallbackHandler) -> list[str]:
    config = {"configurable": {"user_id": "alice"}, "callbacks": [handler]}
    served = []
    for i in range(calls):
        try:
            if i % 3 == 1:
                list(guard.stream("hi", config=config))
            elif i % 3 == 2:
                asyncio.run(guard.ainvoke("hi", config=config))
            else:
                guard.invoke("hi", config=config)
            served.append("served")
        except BudgetExceededError:
            served.append("refused")
    return served


def check_shadow(store: Any) -> None:
    registry = CollectorRegistry()
    metrics = BudgetMetrics(registry=registry)
    enforce, shadow = guard_on(store, "enforce"), guard_on(store, "shadow")
    events = Events()
    # What enforce mode does with the same calls: one served, the rest refused.
    assert run(enforce, 6, metrics.callback(enforce)) == ["served"] + ["refused"] * 5
    assert run(shadow, 6, events) == ["served"] * 6
    (status,) = shadow.status({"configurable": {"user_id": "alice"}})
    assert status.spent == 6 * CALL and status.held == 0, "every call charged exactly, beyond the limit"
    rows = BudgetAdmin(shadow.policy).read_ledger(limit=100)
    assert len(rows) == 6 and sum((r.cost for r in rows), Decimal(0)) == status.spent
    rows.reverse()  # oldest first
    assert [r.refused for r in rows] == [False] + [True] * 5, "each would-be refusal is in the ledger"
    assert all(r.detail.startswith("shadow: would refuse (user 'alice'") for r in rows[1:])
    assert BudgetAdmin(shadow.policy).read_ledger(kinds=("refusal",), limit=100) == [
        r for r in BudgetAdmin(shadow.policy).read_ledger(limit=100) if r.refused]
    refusals = [data for name, data in events.seen if name == "budgetguard_refusal"]
    assert len(refusals) == 5 and all(data["shadow"] for data in refusals)
    assert refusals[0]["refusals"][0]["spent"] == CALL and refusals[-1]["refusals"][0]["spent"] == 5 * CALL
    costs = [data for name, data in events.seen if name == "budgetguard_cost"]
    assert len(costs) == 6 and all(data["cost_usd"] == CALL for data in costs)
    # The metrics: shadow refusals apart from real ones.
    for name, data in events.seen:
        metrics.record(shadow.policy.name, name, data)
    labels = {"budget": shadow.policy.name, "scope": "user", "window": "day", "model": "big"}
    assert registry.get_sample_value("budgetguard_shadow_refusals_total", labels) == 5
    assert registry.get_sample_value("budgetguard_refusals_total", labels) is None
    assert registry.get_sample_value("budgetguard_refusals_total", {**labels, "budget": enforce.policy.name}) == 5


def test_shadow_mode_serves_every_call_and_records_would_be_refusals_in_memory() -> None:
    check_shadow(MemoryStore())


@pytest.mark.redis
def test_shadow_mode_serves_every_call_and_records_would_be_refusals_on_redis(redis_url: str) -> None:  # noqa: F811
    with RedisStore(redis_url, prefix=fresh_prefix()) as store:
        check_shadow(store)


def test_shadow_mode_records_a_would_be_degrade_and_serves_the_model_asked_for() -> None:
    guard = guard_on(MemoryStore(), "shadow")
    guard = BudgetGuard(model("big"), degrade_to=[model("mini")], policy=guard.policy)
    events = Events()
    assert run(guard, 3, events) == ["served"] * 3
    degrades = [data for name, data in events.seen if name == "budgetguard_degrade"]
    # The second call would have degraded to mini ($0.09 + $0.009 fits $0.10); the third is past even that.
    assert [d["to_model"] for d in degrades] == ["mini"] and degrades[0]["shadow"]
    assert len([1 for name, data in events.seen if name == "budgetguard_refusal"]) == 1
    rows = BudgetAdmin(guard.policy).read_ledger(limit=10)[::-1]
    assert [r.model for r in rows] == ["big"] * 3, "shadow never degrades"
    assert "would degrade to mini" in rows[1].detail and not rows[1].degraded and rows[2].refused


def test_shadow_mode_still_refuses_a_reused_call_id() -> None:
    guard = guard_on(MemoryStore(), "shadow")
    config = {"configurable": {"user_id": "alice"}}
    reservation = guard.reserve("hi", config, call_id="once")
    reservation.settle(usage=None)
    from langchain_budgetguard.errors import CallIdReusedError

    with pytest.raises(CallIdReusedError):
        guard.reserve("hi", config, call_id="once")


def test_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="mode: expected 'enforce'"):
        BudgetGuard(model("big"), limit=1, mode="dry-run")
