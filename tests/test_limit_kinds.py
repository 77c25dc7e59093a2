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


class _Down(UsageChat):
    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("the primary is down")  # never reached a provider: costs nothing


def test_an_inner_fallback_is_held_on_each_models_counter_and_charged_to_the_one_that_served() -> None:
    limits = [Limit(usd="0.10", per="model"), Limit(usd="5", per="user")]
    policy = BudgetGuard(limits=limits, store=MemoryStore(), prices=PRICES, estimator=ExactEstimator(1000))
    fallback = policy.wrap(_Down(model_name="mini", max_tokens=1000).with_fallbacks([model("big")]))  # big answers every call
    direct = policy.wrap(model("big"))
    config = {"configurable": {"user_id": "alice"}}
    assert fallback.invoke("hi", config=config).response_metadata["budgetguard"]["model"] == "big"
    mini, _ = policy.status(config, model_id="mini")
    big, user = policy.status(config, model_id="big")
    assert (mini.scope_id, big.scope_id, user.scope) == ("mini", "big", "user")
    assert (mini.spent, mini.held, big.spent) == (0, 0, Decimal("0.09"))  # charged to the model that served
    for guard in (fallback, direct):  # big's own $0.10 has no room for another $0.09 call
        with pytest.raises(BudgetExceededError) as refused:
            guard.invoke("hi", config=config)
        assert "big" in {r.scope_id for r in refused.value.refusals}
    assert policy.status(config, model_id="big")[1].spent == Decimal("0.09")  # the user's counter: once


@pytest.mark.parametrize(("scope", "ids"), [("model", {}), ("team", {"team_id": "core"})])
def test_a_limit_outside_the_tenant_tree_is_one_counter_across_tenants(scope: str, ids: dict[str, str]) -> None:
    # With a tenant limit, user (and project) counters are the tenant's own; a per-model limit, or a
    # scope of another name, is one counter per id for every tenant.
    limits = [Limit(usd="10", per="tenant", window="day"), Limit(usd="5", per="user", window="day"),
              Limit(usd="0.20", per=scope, window="day")]  # two $0.09 calls in all
    guard = BudgetGuard(model("big"), limits=limits, store=MemoryStore(), name=f"pm-{uuid.uuid4().hex[:6]}",
                        prices=PRICES, estimator=ExactEstimator(1000))
    served: dict[str, int] = {}
    for tenant in ("acme", "globex", "initech"):
        served[tenant] = 0
        config = {"configurable": {"tenant_id": tenant, "user_id": "u1", **ids}}
        for _ in range(3):
            try:
                guard.invoke("hi", config=config)
                served[tenant] += 1
            except BudgetExceededError as refused:
                assert refused.refusal.scope == scope
    assert served == {"acme": 2, "globex": 0, "initech": 0}
    views = {tenant: {s.scope: s for s in guard.status({"configurable": {"tenant_id": tenant, "user_id": "u1", **ids}},
                                                       model_id="big")}
             for tenant in served}
    assert len({v[scope].key for v in views.values()}) == 1  # one counter, whoever reads it
    assert views["globex"][scope].spent == Decimal("0.18") and views["globex"][scope].held == 0
    assert {t: v["user"].spent for t, v in views.items()} == {"acme": Decimal("0.18"), "globex": 0, "initech": 0}


# -- tokens and requests beside dollars, all or nothing, 8 processes on one Redis ------------------

import multiprocessing  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

from .redis_support import fresh_prefix, redis_url  # noqa: E402,F401

WORKERS, ATTEMPTS = 8, 6
CALL_USD, CALL_TOKENS = Decimal("0.09"), 2000  # 1000 in + 1000 out, reserved and charged exactly


def kinds_limits(requests: int, tokens: int, usd: str) -> list[Limit]:
    return [Limit(requests=requests, per="user", window="minute"), Limit(tokens=tokens, per="user", window="day"),
            Limit(usd=usd, per="user", window="day")]


def _spend(spec: dict[str, Any]) -> tuple[int, int]:
    """One worker process: its own store and guard, ``ATTEMPTS`` calls; (served, refused)."""
    from langchain_budgetguard.stores.redis import RedisStore

    with RedisStore(spec["url"], prefix=spec["prefix"]) as store:
        guard = BudgetGuard(model("big"), limits=kinds_limits(*spec["limits"]), store=store, name=spec["name"],
                            prices=PRICES, estimator=ExactEstimator(1000))
        served = refused = 0
        config = {"configurable": {"user_id": "u"}}
        for i in range(ATTEMPTS):
            try:
                if i % 2:
                    list(guard.stream("hi", config=config))
                else:
                    guard.invoke("hi", config=config)
                served += 1
            except BudgetExceededError as exc:
                assert exc.refusal.scope == "user"
                refused += 1
        return served, refused


@pytest.fixture(scope="module")
def pool() -> Any:
    with multiprocessing.get_context("spawn").Pool(WORKERS) as workers:
        yield workers


@pytest.mark.redis
@pytest.mark.parametrize("limits, served, unit", [
    ((10, 10**9, "100"), 10, "requests"),  # 10 requests a minute
    ((1000, 5000, "100"), 2, "tokens"),  # 5,000 tokens: two calls of 2,000 (a third would need 6,000)
    ((1000, 10**9, "0.45"), 5, "usd"),  # $0.45: five calls of $0.09
])
def test_each_kind_of_limit_refuses_when_it_would_be_exceeded_with_8_processes(
        pool: Any, redis_url: str, limits: tuple[int, int, str], served: int, unit: str) -> None:  # noqa: F811
    now = datetime.now(timezone.utc)
    if now.second >= 50:  # the minute window must not turn during the run
        time.sleep(61 - now.second)
    spec = {"url": redis_url, "prefix": fresh_prefix(), "name": f"kinds-{uuid.uuid4().hex[:6]}", "limits": limits}
    results = pool.map(_spend, [spec] * WORKERS)
    assert sum(s for s, _ in results) == served and sum(r for _, r in results) == WORKERS * ATTEMPTS - served
    from langchain_budgetguard.stores.redis import RedisStore

    with RedisStore(redis_url, prefix=spec["prefix"]) as store:
        guard = BudgetGuard(limits=kinds_limits(*limits), store=store, name=spec["name"])
        requests, tokens, usd = guard.status({"configurable": {"user_id": "u"}})
        # All or nothing: a call refused by one limit holds and charges nothing on the others.
        assert (requests.unit, requests.spent, requests.held) == ("requests", served, 0)
        assert (tokens.unit, tokens.spent, tokens.held) == ("tokens", served * CALL_TOKENS, 0)
        assert (usd.unit, usd.spent, usd.held) == ("usd", served * CALL_USD, 0)
        binding = {"requests": requests, "tokens": tokens, "usd": usd}[unit]
        assert binding.spent <= binding.limit


def test_refusals_speak_the_unit_of_the_limit_that_refused() -> None:
    guard = BudgetGuard(model("big"), limits=[Limit(requests=1, per="user", window="minute")], store=MemoryStore(),
                        prices=PRICES, estimator=ExactEstimator(1000))
    config = {"configurable": {"user_id": "alice"}}
    guard.invoke("hi", config=config)
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke("hi", config=config)
    text = str(refused.value)
    assert "limit 1 request, used 1 request" in text and "needs 1 request" in text and "$" not in text.split(".")[0]
    tokens = BudgetGuard(model("big"), limits=[Limit(tokens=3000, per="user")], store=MemoryStore(), prices=PRICES,
                         estimator=ExactEstimator(1000), min_output_tokens=None)
    tokens.invoke("hi", config=config)
    with pytest.raises(BudgetExceededError) as refused:
        tokens.invoke("hi", config=config)
    assert "limit 3,000 tokens, used 2,000 tokens" in str(refused.value)
    assert refused.value.refusal.fitting_output_tokens is None or refused.value.refusal.fitting_output_tokens == 0


def test_a_tokens_limit_shrinks_the_output_cap_to_fit_what_is_left() -> None:
    guard = BudgetGuard(model("big"), limits=[Limit(tokens=3500, per="user")], store=MemoryStore(), prices=PRICES,
                        estimator=ExactEstimator(1000), min_output_tokens=256)
    config = {"configurable": {"user_id": "alice"}}
    guard.invoke("hi", config=config)  # 2,000 tokens used: 1,500 left, 1,000 of them for the prompt
    reservation = guard.reserve("hi", config)
    assert reservation.model_settings == {"max_tokens": 500} and reservation.admitted.estimate.clamped
    reservation.settle(usage=None)


def test_status_and_limits_of_token_and_request_limits_are_in_their_unit() -> None:
    guard = BudgetGuard(model("big"), limits=kinds_limits(10, 5000, "1"), store=MemoryStore(), prices=PRICES,
                        estimator=ExactEstimator(1000))
    config = {"configurable": {"user_id": "alice"}}
    guard.invoke("hi", config=config)
    requests, tokens, usd = guard.status(config)
    assert (requests.limit, requests.spent, requests.remaining) == (10, 1, 9)
    assert (tokens.limit, tokens.spent, tokens.remaining) == (5000, 2000, 3000)
    assert (usd.limit, usd.spent) == (Decimal(1), CALL_USD)
    assert requests.key != usd.key and requests.key.split(":")[-3].endswith("+requests")


def test_a_call_answered_from_the_cache_counts_no_request() -> None:
    from langchain_core.caches import InMemoryCache

    cached = model("big", cache=InMemoryCache())
    guard = BudgetGuard(cached, limits=[Limit(requests=1, per="user", window="minute")], store=MemoryStore(),
                        prices=PRICES, estimator=ExactEstimator(1000))
    config = {"configurable": {"user_id": "alice"}}
    first = guard.invoke("hi", config=config)
    (status,) = guard.status(config)
    assert status.spent == 1
    # The cached answer still needs room to be reserved (the guard cannot know it will be cached) ...
    with pytest.raises(BudgetExceededError):
        guard.invoke("hi", config=config)
    assert first.content


def test_a_per_call_model_override_draws_on_that_models_counter() -> None:
    guard = BudgetGuard(model("mini"), limits=[Limit(usd="0.10", per="model", window="day")], store=MemoryStore(),
                        prices=PRICES, estimator=ExactEstimator(1000))
    reservation = guard.reserve("hi", kwargs={"model": "big"})  # held as big, on big's counter
    assert reservation.admitted.estimate.reserve == 90_000_000
    (big,) = guard.status(model_id="big")
    (mini,) = guard.status(model_id="mini")
    assert (big.held, mini.held) == (Decimal("0.09"), 0)
    with pytest.raises(BudgetExceededError) as refused:
        guard.reserve("hi", kwargs={"model": "big"})
    assert refused.value.refusal.scope_id == "big"
    guard.invoke("hi")  # mini's own counter is untouched by big's calls
    reservation.settle(usage=None)
