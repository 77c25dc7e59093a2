"""Prometheus metrics: what calls did (callback handler) and what the store holds (collector)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry

from langchain_budgetguard import BudgetExceededError, BudgetGuard, Limit
from langchain_budgetguard.config import parse_config
from langchain_budgetguard.metrics import BudgetMetrics
from langchain_budgetguard.stores.memory import MemoryStore

from .fakes import UsageChat

BIG_USD = Decimal("0.0075")  # gpt-4o: 1000 input tokens at $2.50/M + 500 output at $10/M
MINI_USD = Decimal("0.00045")  # gpt-4o-mini: 1000 at $0.15/M + 500 at $0.60/M


def models() -> tuple[UsageChat, UsageChat]:
    kw = {"input_tokens": 1000, "output_tokens": 500, "max_tokens": 500}
    return UsageChat(model_name="gpt-4o", **kw), UsageChat(model_name="gpt-4o-mini", **kw)


def sample(metrics: BudgetMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def scripted_run(guard: BudgetGuard, handler) -> tuple[int, int]:
    """Alice calls until refused; returns (calls served by gpt-4o, by gpt-4o-mini)."""
    served = {"gpt-4o": 0, "gpt-4o-mini": 0}
    config = {"configurable": {"user_id": "alice"}, "callbacks": [handler]}
    with pytest.raises(BudgetExceededError):
        for _ in range(100):
            reply = guard.invoke("hi", config=config)
            served[reply.response_metadata["budgetguard"]["model"]] += 1
    return served["gpt-4o"], served["gpt-4o-mini"]


def test_metrics_show_spend_refusals_and_degrades_after_a_scripted_run():
    big, mini = models()
    guard = BudgetGuard(big, degrade_to=[mini], limits=[Limit(usd="0.02", per="user", window="day")],
                        name="support", degrade_at=0.6)
    metrics = BudgetMetrics(registry=CollectorRegistry(), min_interval=0)
    metrics.watch(guard)
    n_big, n_mini = scripted_run(guard, metrics.callback(guard))
    assert n_big >= 1 and n_mini >= 1
    spent = n_big * BIG_USD + n_mini * MINI_USD
    assert sample(metrics, "budgetguard_spend_usd_total", budget="support", model="gpt-4o") == pytest.approx(
        float(n_big * BIG_USD))
    assert sample(metrics, "budgetguard_spend_usd_total", budget="support", model="gpt-4o-mini") == pytest.approx(
        float(n_mini * MINI_USD))
    assert sample(metrics, "budgetguard_calls_total", budget="support", model="gpt-4o-mini", degraded="true") == n_mini
    assert sample(metrics, "budgetguard_refusals_total", budget="support", scope="user", window="day",
                  model="gpt-4o") == 1
    assert sample(metrics, "budgetguard_degrades_total", budget="support", scope="user", window="day",
                  from_model="gpt-4o", to_model="gpt-4o-mini") == n_mini + 1  # the refused call tried it too
    # From the store: exact to the nano-USD before Prometheus' float.
    (status,) = guard.status({"configurable": {"user_id": "alice"}})
    assert status.spent == spent
    labels = {"budget": "support", "scope": "user", "window": "day"}
    assert sample(metrics, "budgetguard_spent_usd", **labels) == float(spent)
    assert sample(metrics, "budgetguard_limit_usd", **labels) == 0.02
    # (The fake model reports 1000 input tokens for "hi", more than any estimate: spend may pass the limit.)
    assert sample(metrics, "budgetguard_remaining_usd", **labels) == float(max(Decimal("0.02") - spent, 0))
    assert sample(metrics, "budgetguard_held_usd", **labels) == 0
    assert sample(metrics, "budgetguard_ids", **labels) == 1
    assert sample(metrics, "budgetguard_store_up", budget="support") == 1
    text = metrics.exposition()
    assert "budgetguard_refusals_total" in text and "alice" not in text  # no raw ids by default


def test_ids_become_labels_only_for_the_scopes_asked():
    big, _ = models()
    store = MemoryStore()
    limits = [Limit(usd=1, per="tenant", window="month"), Limit(usd=1, per="user", window="day")]
    guard = BudgetGuard(big, limits=limits, store=store, name="saas")
    for tenant, user in (("acme", "u1"), ("acme", "u2"), ("globex", "u3")):
        guard.invoke("hi", config={"configurable": {"tenant_id": tenant, "user_id": user}})
    metrics = BudgetMetrics(registry=CollectorRegistry(), id_labels={"tenant"})
    metrics.watch(guard.policy)
    tenant = {"budget": "saas", "scope": "tenant", "window": "month"}
    assert sample(metrics, "budgetguard_id_spent_usd", **tenant, id="acme") == float(2 * BIG_USD)
    assert sample(metrics, "budgetguard_id_limit_usd", **tenant, id="globex") == 1
    assert sample(metrics, "budgetguard_spent_usd", **tenant) == float(3 * BIG_USD)
    assert sample(metrics, "budgetguard_ids", budget="saas", scope="user", window="day") == 3
    assert "u1" not in metrics.exposition()


def test_store_readings_are_reused_for_min_interval():
    big, _ = models()
    guard = BudgetGuard(big, limit=1, name="cached")
    metrics = BudgetMetrics(registry=CollectorRegistry(), min_interval=3600)
    metrics.watch(guard)
    assert sample(metrics, "budgetguard_spent_usd", budget="cached", scope="global", window="total") == 0
    guard.invoke("hi")
    assert sample(metrics, "budgetguard_spent_usd", budget="cached", scope="global", window="total") == 0
    metrics.min_interval = 0
    assert sample(metrics, "budgetguard_spent_usd", budget="cached", scope="global", window="total") == float(BIG_USD)


def test_a_store_that_is_down_reports_store_up_zero_instead_of_failing_the_scrape():
    config = parse_config('[budget]\nname = "down"\n[store]\nurl = "redis://127.0.0.1:1/0"\nlive_overrides = false\n'
                          '[[limits]]\nper = "user"\nwindow = "day"\nusd = 1\n')
    metrics = BudgetMetrics(registry=CollectorRegistry())
    metrics.watch(config)
    assert sample(metrics, "budgetguard_store_up", budget="down") == 0


async def test_the_handler_counts_async_calls_too():
    big, mini = models()
    guard = BudgetGuard(big, degrade_to=[mini], limits=[Limit(usd="0.008", per="user", window="day")], name="a")
    metrics = BudgetMetrics(registry=CollectorRegistry())
    config = {"configurable": {"user_id": "bob"}, "callbacks": [metrics.callback("a")]}
    await guard.ainvoke("hi", config=config)  # gpt-4o
    await guard.ainvoke("hi", config=config)  # degraded
    assert sample(metrics, "budgetguard_calls_total", budget="a", model="gpt-4o", degraded="false") == 1
    assert sample(metrics, "budgetguard_degrades_total", budget="a", scope="user", window="day",
                  from_model="gpt-4o", to_model="gpt-4o-mini") == 1


def test_limits_of_one_scope_and_window_in_different_zones_are_different_series():
    guard = BudgetGuard(UsageChat(model_name="gpt-4o-mini", input_tokens=1000, output_tokens=500, max_tokens=500),
                        limits=[Limit(usd=5, per="user", window="day"),
                                Limit(usd=8, per="user", window="day", tz="Asia/Tokyo"),
                                Limit(tokens=100000, per="user", window="day"),
                                Limit(tokens=200000, per="user", window="day", tz="Asia/Tokyo")],
                        name="zones")
    guard.invoke("hi", config={"configurable": {"user_id": "alice"}})
    metrics = BudgetMetrics(registry=CollectorRegistry(), min_interval=0, id_labels={"user"})
    metrics.watch(guard)
    series = [line.rsplit(" ", 1)[0] for line in metrics.exposition().splitlines()
              if line and not line.startswith("#")]
    assert len(series) == len(set(series)), "a series exported twice"
    utc = {"budget": "zones", "scope": "user", "window": "day"}  # UTC limits: the labels they always had
    tokyo = {**utc, "tz": "Asia/Tokyo"}
    assert sample(metrics, "budgetguard_limit_usd", **utc) == 5
    assert sample(metrics, "budgetguard_limit_usd", **tokyo) == 8
    assert sample(metrics, "budgetguard_spent_usd", **utc) == sample(metrics, "budgetguard_spent_usd", **tokyo) \
        == float(MINI_USD)
    assert sample(metrics, "budgetguard_limit_amount", unit="tokens", **utc) == 100000
    assert sample(metrics, "budgetguard_limit_amount", unit="tokens", **tokyo) == 200000
    assert sample(metrics, "budgetguard_used_amount", unit="tokens", **tokyo) == 1500
    assert sample(metrics, "budgetguard_id_limit_usd", id="alice", **tokyo) == 8
    assert sample(metrics, "budgetguard_id_limit_usd", id="alice", **utc) == 5


def test_every_metric_passes_promtool_check_metrics():
    """promtool rejected the gauges ``budgetguard_limit_count`` / ``_used_count``: a ``_count``
    suffix belongs to histograms and summaries (they are ``_limit_amount`` / ``_used_amount``)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships it)")
    guard = BudgetGuard(UsageChat(model_name="gpt-4o-mini"),
                        limits=[Limit(usd=5, per="user", window="day"), Limit(tokens=100000, per="user", window="day"),
                                Limit(requests=10, per="user", window="day", tz="Asia/Tokyo")], name="promtool")
    handler_metrics = BudgetMetrics(registry=CollectorRegistry(), min_interval=0, id_labels={"user"})
    handler_metrics.watch(guard)
    guard.invoke("hi", config={"configurable": {"user_id": "alice"}, "callbacks": [handler_metrics.callback(guard)]})
    text = handler_metrics.exposition()
    assert "budgetguard_limit_amount" in text and "budgetguard_used_amount" in text and "budgetguard_calls" in text
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
