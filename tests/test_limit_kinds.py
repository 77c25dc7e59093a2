"""Limits of other kinds in the same all-or-nothing reservation as dollar limits: ``per="model"``
(one counter per serving model, degrades included), ``Limit(tokens=...)``, ``Limit(requests=...)``
and the ``minute`` window."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest

from langchain_budgetguard import BudgetExceededError, BudgetGuard, Limit
from langchain_budgetguard.stores.memory import MemoryStore

from .fakes import ExactEstimator, UsageChat

PRICES = {"big": {"input": "40", "output": "50"}, "mini": {"input": "4", "output": "5"}}


def model(name: str, **kw: Any) -> UsageChat:
    return UsageChat(model_name=name, input_tokens=1000, output_tokens=1000, max_tokens=1000, **kw)


def test_per_model_limits_are_separate_per_served_model_degrade_included() -> None:
    big, mini = model("big"), model("mini")
    guard = BudgetGuard(big, degrade_to=[mini], limits=[Limit(usd="0.10", per="model", window="day")],
                        store=MemoryStore(), name=f"pm-{uuid.uuid4().hex[:6]}", prices=PRICES,
                        estimator=ExactEstimator(1000))
    served = [guard.invoke("hi").response_metadata["budgetguard"]["model"] for _ in range(12)]
    # big's own $0.10 holds one $0.09 call; then mini's own counter takes its $0.009 calls (11 fit in $0.10).
    assert served == ["big"] + ["mini"] * 11
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke("hi")
    assert {r.scope_id for r in refused.value.refusals} == {"big", "mini"}
    (b,) = guard.status(model_id="big")
    (m,) = guard.status(model_id="mini")
    assert (b.scope, b.scope_id, b.spent) == ("model", "big", Decimal("0.09"))
    assert (m.scope_id, m.spent) == ("mini", Decimal("0.099"))
    assert guard.status() == [], "without a model the per-model limits are not among the counters"


def test_a_per_model_limit_beside_a_per_user_limit_draws_on_both() -> None:
    guard = BudgetGuard(model("big"), limits=[Limit(usd="1", per="user"), Limit(usd="0.10", per="model")],
                        store=MemoryStore(), prices=PRICES, estimator=ExactEstimator(1000))
    config = {"configurable": {"user_id": "alice"}}
    guard.invoke("hi", config=config)
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke("hi", config=config)
    assert refused.value.refusal.scope == "model"
    user, per_model = guard.status(config, model_id="big")
    assert user.spent == per_model.spent == Decimal("0.09")
