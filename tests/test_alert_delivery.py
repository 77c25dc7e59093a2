"""Threshold alerts end to end: 8 processes share one budget on Redis and cross 50%, 80% and 100% of
it; each threshold of each counter fires exactly once across all of them (the store's script
decides it, in the same step that moves the counter), through every process's ``on_alert`` and
through a webhook served by this test, within a second of the crossing. A webhook that never
answers does not slow the calls.
"""

from __future__ import annotations

import http.server
import json
import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from langchain_budgetguard import BudgetExceededError, BudgetGuard, Limit
from langchain_budgetguard.alerts import Webhook
from langchain_budgetguard.stores.memory import MemoryStore

from .fakes import ExactEstimator, UsageChat
from .redis_support import fresh_prefix, redis_url  # noqa: F401

PRICES = {"big": {"input": "40", "output": "50"}}  # $0.09 a call, reserved and charged exactly
WORKERS, ATTEMPTS, FITS = 8, 7, 40  # $3.60 and 40 requests: exactly 40 calls fit, then both are full
THRESHOLDS = [Decimal("0.5"), Decimal("0.8"), Decimal("1")]


def limits() -> list[Limit]:
    return [Limit(usd="3.60", per="tenant", window="day", alerts=THRESHOLDS),
            Limit(requests=FITS, per="global", window="day", alerts=THRESHOLDS)]


class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[tuple[float, dict[str, Any]]] = []
        self.delay = delay
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/alerts"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append((time.time(), body))
        time.sleep(self.server.delay)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _spend(spec: dict[str, Any]) -> int:
    """One worker: its own store and guard; writes what its on_alert received to its own file."""
    from langchain_budgetguard.stores.redis import RedisStore

    seen: list[dict[str, Any]] = []
    with RedisStore(spec["url"], prefix=spec["prefix"]) as store:
        guard = BudgetGuard(UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000),
                            limits=limits(), store=store, name=spec["name"], prices=PRICES,
                            estimator=ExactEstimator(1000), on_alert=lambda alert: seen.append(alert.to_json()),
                            alert_webhook=spec["webhook"], decision_alert_seconds=None)
        served = 0
        for _ in range(ATTEMPTS):
            try:
                guard.invoke("hi", config={"configurable": {"tenant_id": "acme"}})
                served += 1
            except BudgetExceededError:
                pass
        guard.close()  # delivers what is queued
    Path(spec["out"]).write_text(json.dumps(seen))
    return served


@pytest.mark.redis
def test_8_processes_cross_each_threshold_and_each_alert_fires_exactly_once(
        redis_url: str, receiver: Receiver, tmp_path: Path) -> None:  # noqa: F811
    name = f"alerts-{uuid.uuid4().hex[:6]}"
    specs = [{"url": redis_url, "prefix": fresh_prefix(), "name": name, "webhook": receiver.url,
              "out": str(tmp_path / f"w{i}.json")} for i in range(WORKERS)]
    for spec in specs:
        spec["prefix"] = specs[0]["prefix"]
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
        served = sum(pool.map(_spend, specs))
    assert served == FITS
    called = [a for spec in specs for a in json.loads(Path(spec["out"]).read_text())]
    expected = {(scope, str(t)) for scope in ("tenant", "global") for t in THRESHOLDS}
    assert sorted((a["scope"], a["threshold"]) for a in called) == sorted(expected), "each exactly once"
    deadline = time.time() + 5
    while len(receiver.bodies) < len(expected) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # nothing more arrives
    hooked = [body for _, body in receiver.bodies]
    assert sorted((a["scope"], a["threshold"]) for a in hooked) == sorted(expected)
    for received, body in receiver.bodies:  # delivered within a second of the crossing
        assert received - datetime.fromisoformat(body["at"]).timestamp() < 1.0
    tenant = {a["threshold"]: a for a in hooked if a["scope"] == "tenant"}
    # Each settle adds $0.09, so the step that crosses 50% (80%) of $3.60 lands on $1.80 ($2.88) exactly.
    assert Decimal(tenant["0.5"]["spent"]) == Decimal("1.80") and Decimal(tenant["0.8"]["spent"]) == Decimal("2.88")
    assert Decimal(tenant["1"]["spent"]) == Decimal("3.60") and Decimal(tenant["1"]["limit"]) == Decimal("3.60")
    assert tenant["1"]["scope_id"] == "acme" and tenant["1"]["budget"] == name and tenant["1"]["unit"] == "usd"
    requests = {a["threshold"]: a for a in hooked if a["scope"] == "global"}
    assert Decimal(requests["0.8"]["spent"]) == 32 and requests["0.8"]["unit"] == "requests"


def test_a_webhook_that_never_answers_does_not_slow_the_calls() -> None:
    slow = Receiver(delay=30)
    thread = threading.Thread(target=slow.serve_forever, daemon=True)
    thread.start()
    try:
        guard = BudgetGuard(UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000),
                            limits=[Limit(usd="0.90", per="global", alerts=[0.1, 0.2, 0.3, 0.4, 0.5])],
                            store=MemoryStore(), prices=PRICES, estimator=ExactEstimator(1000),
                            alert_webhook=Webhook(slow.url, timeout_seconds=10, attempts=1))
        took = []
        for _ in range(6):  # each call crosses a threshold: each alert goes to a webhook that hangs
            start = time.perf_counter()
            guard.invoke("hi")
            took.append(time.perf_counter() - start)
        assert max(took) < 0.25, took
        assert guard.policy.alerts.flush(timeout=0.1) is False, "the webhook is still hanging"
    finally:
        slow.shutdown()
        slow.server_close()


def test_refusal_alerts_are_rate_limited_per_scope_id() -> None:
    seen: list[Any] = []
    guard = BudgetGuard(UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000),
                        limits=[Limit(usd="0.10", per="user")], store=MemoryStore(), prices=PRICES,
                        estimator=ExactEstimator(1000), on_alert=seen.append, decision_alert_seconds=3600)
    for who in ("alice", "bob", "alice"):
        config = {"configurable": {"user_id": who}}
        if guard.status(config)[0].spent == 0:
            guard.invoke("hi", config=config)
        for _ in range(3):
            with pytest.raises(BudgetExceededError):
                guard.invoke("hi", config=config)
    guard.close()
    refusals = [a for a in seen if a.kind == "refusal"]
    assert [a.scope_id for a in refusals] == ["alice", "bob"], "one per id per interval"
    assert refusals[0].spent == Decimal("0.09") and refusals[0].limit == Decimal("0.10")


def test_shadow_mode_alerts_say_they_are_shadow() -> None:
    seen: list[Any] = []
    guard = BudgetGuard(UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000),
                        limits=[Limit(usd="0.10", per="user", alerts=[1])], store=MemoryStore(), prices=PRICES,
                        estimator=ExactEstimator(1000), on_alert=seen.append, mode="shadow")
    config = {"configurable": {"user_id": "alice"}}
    for _ in range(3):
        guard.invoke("hi", config=config)
    guard.close()
    kinds = sorted((a.kind, a.shadow) for a in seen)
    assert kinds == [("refusal", True), ("threshold", True)], kinds
    (threshold,) = [a for a in seen if a.kind == "threshold"]
    assert threshold.spent == Decimal("0.18") and threshold.threshold == 1


@pytest.mark.redis
def test_a_settle_journaled_in_an_outage_alerts_when_it_is_replayed(tmp_path: Path) -> None:
    from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

    from .redis_support import RedisServer

    server = RedisServer(tmp_path / "redis", None, "--appendonly", "yes").start()  # the counters survive the restart
    seen: list[Any] = []
    try:
        store = RedisStore(server.url, prefix=fresh_prefix(),
                           retry=RetryPolicy(attempts=2, deadline_seconds=0.3, first_wait=0.01, max_wait=0.05))
        guard = BudgetGuard(UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000),
                            limits=[Limit(usd="0.18", per="user", alerts=[1])], store=store, prices=PRICES,
                            estimator=ExactEstimator(1000), on_alert=seen.append, on_store_error="fail_open")
        config = {"configurable": {"user_id": "alice"}}
        guard.invoke("hi", config=config)  # $0.09 of $0.18
        reservation = guard.reserve("hi", config)  # held on Redis: its settle is the one that reaches 100%
        server.stop()
        reservation.settle(usage=None, output_text="x" * 4000)  # Redis is down: journaled
        assert len(store.pending_journal) == 1 and seen == []
        server.start()
        assert store.flush_journal() == 1
        assert guard.status(config)[0].spent == Decimal("0.18")
        guard.close()
        (alert,) = seen
        assert (alert.kind, alert.scope, alert.scope_id, alert.threshold) == ("threshold", "user", "alice", 1)
        assert alert.spent == Decimal("0.18") and alert.limit == Decimal("0.18")
    finally:
        server.stop()


@pytest.mark.redis
def test_a_carried_settle_alerts_when_it_lands(redis_url: str) -> None:  # noqa: F811
    from langchain_budgetguard.stores.redis import RedisStore

    seen: list[Any] = []
    with RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True) as store:
        guard = BudgetGuard(UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000),
                            limits=[Limit(usd="0.18", per="user", alerts=[0.5, 1])], store=store, prices=PRICES,
                            estimator=ExactEstimator(1000), on_alert=seen.append)
        config = {"configurable": {"user_id": "alice"}}
        guard.invoke("hi", config=config)
        guard.invoke("hi", config=config)  # carries the first settle; its own settle waits for the timer
        guard.close()  # sends the queued settle, then delivers the alert it fired
        assert sorted(a.threshold for a in seen) == [Decimal("0.5"), Decimal("1")]
