"""Spend indexes instead of SCAN: ``top``, ``status SCOPE``, the metrics collector and the
dashboard read a sorted set per (scope, window) and tag that the scripts keep, so their cost
grows with the ids asked for, not with the keyspace."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.cluster import RedisCluster

from langchain_budgetguard import BudgetGuard, Limit
from langchain_budgetguard.limits import Identity
from langchain_budgetguard.metrics import BudgetMetrics
from langchain_budgetguard.money import nano_to_usd
from langchain_budgetguard.overrides import BudgetAdmin
from langchain_budgetguard.stores.base import Counter, Hold
from langchain_budgetguard.stores.memory import MemoryStore
from langchain_budgetguard.stores.redis import RedisStore

from .fakes import ExactEstimator, UsageChat
from .redis_support import RedisServer, fresh_prefix, redis_url, start_cluster  # noqa: F401 - fixture

PRICES = {"big": {"input": "40", "output": "50"}}


def guard_on(store: Any, per: str = "user", **options: Any) -> BudgetGuard:
    return BudgetGuard(UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000),
                       limits=[Limit(usd=1000, per=per, window="day"), Limit(usd=10_000, per="global", window="month")],
                       store=store, name=f"idx-{uuid.uuid4().hex[:8]}", prices=PRICES, estimator=ExactEstimator(1000),
                       **options)


def charge(guard: BudgetGuard, who: str, nano: int, per: str = "user") -> None:
    """Settle ``nano`` on ``who``'s counters as the guard would (reserve then settle)."""
    policy = guard.policy
    plan = policy.plan(Identity({per: who}))
    cid = uuid.uuid4().hex
    assert policy.store.reserve(plan.counters(), Hold(cid, nano, 600.0, 0)).ok
    assert policy.store.settle(cid, plan.keys, nano).applied


def no_scan(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: Any, **k: Any) -> Any:
        raise AssertionError("scanned the keyspace although the store keeps an index")

    monkeypatch.setattr(store, "scan_counters", fail)
    monkeypatch.setattr(store, "ascan_counters", fail, raising=False)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("redis_url")
    with RedisStore(url, prefix=fresh_prefix()) as s:
        yield s


def test_top_status_metrics_and_dashboard_read_the_index_never_scan(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = guard_on(store)
    spend = {f"user-{i}": (i * 7919) % 1000 * 1000 + 1 for i in range(300)}
    for who, nano in spend.items():
        charge(guard, who, nano)
    no_scan(store, monkeypatch)
    admin = BudgetAdmin(guard.policy)
    everyone = admin.statuses("user")
    assert {s.scope_id: s.spent for s in everyone} == {w: nano_to_usd(n) for w, n in spend.items()}
    heaviest = sorted(spend, key=lambda w: (-spend[w], w))[:5]
    assert [s.scope_id for s in admin.top("user", n=5)] == heaviest
    assert [s.spent for s in admin.top("user", n=5)] == [nano_to_usd(spend[w]) for w in heaviest]
    limit = guard.policy.limits[0]
    label = limit.window_at(__import__("datetime").datetime.now(__import__("datetime").timezone.utc)).label
    assert sorted(s.scope_id for s in admin.read_scope_index(limit, label)) == sorted(spend)
    metrics = BudgetMetrics(registry=CollectorRegistry(), min_interval=0)
    metrics.watch(guard)
    text = metrics.exposition()
    assert f'budgetguard_ids{{budget="{guard.policy.name}",scope="user",window="day"}} 300.0' in text
    from langchain_budgetguard.dashboard.data import DashboardData

    page = DashboardData(admin, cache_seconds=0).scope_page("user", sort="spent")
    assert page.source == "index" and page.all_ids == 300 and page.rows[0].scope_id == heaviest[0]


def test_top_sees_holds_and_reset_and_ties_by_id(store: Any) -> None:
    guard = guard_on(store)
    for who in ("a", "b", "c", "d"):
        charge(guard, who, 5_000)
    policy = guard.policy
    plan = policy.plan(Identity({"user": "c"}))
    assert store.reserve(plan.counters(), Hold("in-flight", 777, 600.0, 0)).ok  # held, not spent
    admin = BudgetAdmin(policy)
    assert [(s.scope_id, s.held) for s in admin.top("user", n=2)] == [("c", nano_to_usd(777)), ("a", 0)]
    admin.reset("user", "a", window="day")
    top = admin.top("user", n=4)
    assert [s.scope_id for s in top] == ["c", "b", "d", "a"] and top[-1].spent == 0
    fresh = guard_on(store)
    plan = fresh.policy.plan(Identity({"user": "only-held"}))
    assert store.reserve(plan.counters(), Hold("h2", 5, 600.0, 0)).ok  # an id with a hold and no spend is listed
    assert [s.scope_id for s in BudgetAdmin(fresh.policy).statuses("user")] == ["only-held"]


@pytest.mark.redis
def test_index_lives_as_long_as_its_counters(redis_url: str) -> None:  # noqa: F811
    with RedisStore(redis_url, prefix=fresh_prefix()) as store, redis.Redis.from_url(redis_url) as admin:
        expires = int(time.time()) + 3600
        day = "{t}:b:user:alice:day:2026-12-01"
        ever = "{t}:b:user:alice:total:all"
        store.reserve([Counter(day, 10**6, expires), Counter(ever, 10**6)], Hold("c", 10, 30))
        store.settle("c", [day, ever], 7)
        day_index, member = store.index_key(day)
        assert member == "alice" and admin.expiretime(day_index) == expires == admin.expiretime(store.redis_keys(day)[0])
        assert admin.ttl(store.index_key(ever)[0]) == -1  # a total window's counter and index never expire
        later = expires + 7200  # a guard with longer retention extends the counter, and the index with it
        store.reserve([Counter("{t}:b:user:bob:day:2026-12-01", 10**6, later)], Hold("c2", 1, 30))
        assert admin.expiretime(day_index) == later
        assert admin.zscore(day_index, "alice") == 7


def commands_run(client: redis.Redis) -> int:
    """Commands Redis ran (those inside scripts included), but for connection setup and INFO itself."""
    setup = ("client", "hello", "info", "select", "auth")
    return sum(int(v["calls"]) for k, v in client.info("commandstats").items()
               if not k.removeprefix("cmdstat_").startswith(setup))


@pytest.mark.redis
def test_cost_of_top_and_status_is_independent_of_other_keys(tmp_path: Any) -> None:
    """Counted in commands Redis ran: the same before and after 50k unrelated keys."""
    server = RedisServer(tmp_path).start()
    try:
        with RedisStore(server.url, prefix=fresh_prefix()) as store, redis.Redis.from_url(server.url) as client:
            # Live overrides are re-read every 5 s (two commands more): the 52k writes below can
            # take longer than that on a slow machine, and this test counts commands.
            guard = guard_on(store, override_refresh_seconds=None)
            for i in range(500):
                charge(guard, f"u{i}", 1000 + i)
            admin = BudgetAdmin(guard.policy)

            def cost() -> tuple[int, int]:
                before = commands_run(client)
                admin.top("user", n=10)
                middle = commands_run(client)
                admin.statuses("user")
                return middle - before, commands_run(client) - middle

            other = guard_on(store)  # another budget's counters in the same Redis
            for i in range(200):
                charge(other, f"v{i}", 1)
            cost()  # scripts loaded (a first EVALSHA of a script also runs SCRIPT LOAD)
            first = cost()
            pipe = client.pipeline(transaction=False)
            for i in range(50_000):
                pipe.set(f"other:{i}", "x")
            pipe.execute()
            for i in range(200, 2200):  # and ten times more counters of the other budget
                charge(other, f"v{i}", 1)
            assert client.dbsize() > 50_000
            assert cost() == first  # commands run, those inside the scripts included
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    servers = start_cluster(tmp_path_factory.mktemp("redis-cluster-idx"))
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_cluster_index_is_merged_across_tags_on_every_node(cluster: list[RedisServer],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in cluster[:2])
    with RedisStore(url, prefix=fresh_prefix()) as store:
        guard = guard_on(store, per="tenant")  # each tenant has its own hash tag
        spend = {f"t{i}": 1000 * (i + 1) for i in range(30)}
        for who, nano in spend.items():
            charge(guard, who, nano, per="tenant")
        no_scan(store, monkeypatch)
        admin = BudgetAdmin(guard.policy)
        assert [s.scope_id for s in admin.top("tenant", n=3)] == ["t29", "t28", "t27"]
        assert {s.scope_id: s.spent for s in admin.statuses("tenant")} == {w: nano_to_usd(n) for w, n in spend.items()}
        client = RedisCluster(host="127.0.0.1", port=cluster[0].port)
        try:
            tags = {t.decode() for t in client.smembers(store.tags_key)}
            nodes = {client.get_node_from_key(store.index_key(k)[0]).name
                     for k in (f"{t}:x:tenant:-:day:2026-12-01" for t in tags if t.startswith("{"))}
            assert len(nodes) == 3
        finally:
            client.close()
    assert sum(spend.values()) == sum(Decimal(n) for n in spend.values())
