"""Live limit overrides (store and config), and the operator API: status of every id, top, reset."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from decimal import Decimal

import fakeredis
import pytest

from langchain_budgetguard import BudgetExceededError, BudgetGuard, Limit
from langchain_budgetguard.overrides import (
    BudgetAdmin,
    LiveOverrides,
    Override,
    override_field,
    resolve_cap,
    window_for_label,
)
from langchain_budgetguard.policy import BudgetPolicy
from langchain_budgetguard.stores.base import AdminStore, Counter, CounterState, Hold
from langchain_budgetguard.stores.memory import MemoryStore
from langchain_budgetguard.stores.redis import RedisStore

from .fakes import UsageChat

# gpt-4o-mini: 150 nano-USD per input token, 600 per output token.
CALL_NANO = 1000 * 150 + 500 * 600  # 450_000 nano-USD = $0.00045
CALL_USD = Decimal("0.00045")


def model() -> UsageChat:
    return UsageChat(model_name="gpt-4o-mini", input_tokens=1000, output_tokens=500, max_tokens=500)


def ids(**kw: str) -> dict:
    return {"configurable": {f"{k}_id": v for k, v in kw.items()}}


class CountingStore(MemoryStore):
    """A MemoryStore that counts override reads (each one would be a round trip to Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.override_reads = 0

    def read_overrides(self, name, known_version=None):
        self.override_reads += 1
        return super().read_overrides(name, known_version)


# -- resolution --------------------------------------------------------------------------------


def test_an_ids_own_override_beats_the_scope_wide_one_and_the_store_beats_the_config():
    limit = Limit(usd=200, per="tenant", window="month")
    own, every = override_field(limit, "acme"), override_field(limit, None)
    assert own == "tenant:month:acme" and every == "tenant:month:*"
    config = {own: 1000}
    assert resolve_cap(limit, "acme", {}, {}) == (limit.nano, "limit")
    assert resolve_cap(limit, "acme", {}, config) == (1000, "config override")
    assert resolve_cap(limit, "acme", {every: 5}, config) == (1000, "config override")  # acme keeps its deal
    assert resolve_cap(limit, "other", {every: 5}, config) == (5, "store override (every id)")
    assert resolve_cap(limit, "acme", {own: 7, every: 5}, config) == (7, "store override")


def test_fields_escape_ids_and_carry_the_time_zone():
    paris = Limit(usd=1, per="user", window="day", tz="Europe/Paris")
    assert override_field(paris, "a:b*") == "user:day@Europe%2FParis:a%3Ab%2A"
    assert override_field(paris, "*") != override_field(paris, None)  # an id "*" is not every id


def test_config_overrides_must_name_an_existing_limit():
    limits = [Limit(usd=1, per="user", window="day"), Limit(usd=9, per="user", window="month")]
    with pytest.raises(ValueError, match="several limits"):
        BudgetPolicy(limits=limits, overrides=[Override(per="user", id="a", usd=1)])
    with pytest.raises(ValueError, match="no limit per team"):
        BudgetPolicy(limits=limits, overrides=[Override(per="team", id="a", usd=1)])
    with pytest.raises(ValueError, match="global limit has no ids"):
        Override(per="global", id="a", usd=1)
    policy = BudgetPolicy(limits=limits, overrides=[Override(per="user", id="a", usd=3, window="month")])
    assert policy.config_overrides == {"user:month:a": 3_000_000_000}


# -- enforcement -------------------------------------------------------------------------------


def test_a_zero_override_refuses_and_the_error_and_status_report_the_overridden_limit():
    guard = BudgetGuard(model(), limits=[Limit(usd=5, per="user", window="day")],
                        overrides=[Override(per="user", id="ci-bot", usd=0)])
    with pytest.raises(BudgetExceededError) as err:
        guard.invoke("hi", config=ids(user="ci-bot"))
    assert err.value.limit == Decimal(0) and err.value.scope_id == "ci-bot"
    assert [s.limit for s in guard.status(ids(user="ci-bot"))] == [Decimal(0)]
    guard.invoke("hi", config=ids(user="alice"))  # everyone else keeps $5
    assert [s.limit for s in guard.status(ids(user="alice"))] == [Decimal(5)]


def test_a_store_override_is_enforced_by_another_policy_on_the_same_store_after_its_refresh():
    store = MemoryStore()
    limits = [Limit(usd=1, per="user", window="day")]
    worker = BudgetGuard(model(), limits=limits, store=store, name="b", override_refresh_seconds=60)
    operator = BudgetAdmin(BudgetPolicy(limits=limits, store=store, name="b"))
    worker.invoke("hi", config=ids(user="alice"))
    operator.set_limit("user", 0, "alice")
    worker.invoke("hi", config=ids(user="alice"))  # its copy is fresh for 60 s: not seen yet
    worker.policy.live_overrides.expire()  # as if 60 s had passed
    with pytest.raises(BudgetExceededError) as err:
        worker.invoke("hi", config=ids(user="alice"))
    assert err.value.limit == 0
    worker.invoke("hi", config=ids(user="bob"))
    operator.clear_limit("user", "alice")
    worker.policy.live_overrides.expire()
    worker.invoke("hi", config=ids(user="alice"))
    assert worker.status(ids(user="alice"))[0].spent == 3 * CALL_USD


def test_overrides_cost_no_store_round_trip_per_call_while_the_copy_is_fresh():
    store = CountingStore()
    guard = BudgetGuard(model(), limits=[Limit(usd=5, per="user", window="day")], store=store,
                        override_refresh_seconds=60)
    for i in range(50):
        guard.invoke("hi", config=ids(user=f"u{i % 7}"))
    assert store.override_reads == 1
    guard.policy.live_overrides.expire()
    guard.invoke("hi", config=ids(user="u0"))
    assert store.override_reads == 2


def test_no_live_overrides_when_disabled():
    store = CountingStore()
    guard = BudgetGuard(model(), limit=5, store=store, override_refresh_seconds=None)
    guard.invoke("hi")
    assert guard.policy.live_overrides is None and store.override_reads == 0


def test_a_scope_wide_store_override_changes_every_id_but_those_with_their_own():
    store = MemoryStore()
    limits = [Limit(usd="0.001", per="tenant", window="month")]
    guard = BudgetGuard(model(), limits=limits, store=store, name="s", override_refresh_seconds=0,
                        overrides=[Override(per="tenant", id="acme", usd=1)])
    admin = BudgetAdmin(guard.policy)
    admin.set_limit("tenant", 0, None)
    with pytest.raises(BudgetExceededError):
        guard.invoke("hi", config=ids(tenant="globex"))
    guard.invoke("hi", config=ids(tenant="acme"))
    rows = {(r.scope_id, r.source): r.effective for r in admin.limit_rows("tenant")}
    assert rows == {(None, "store override (every id)"): 0, ("acme", "config override"): 1}


async def test_inside_an_event_loop_the_refresh_runs_in_the_background():
    store = CountingStore()
    limits = [Limit(usd=1, per="user", window="day")]
    guard = BudgetGuard(model(), limits=limits, store=store, name="a", override_refresh_seconds=0.05)
    await guard.ainvoke("hi", config=ids(user="alice"))  # the first read is inline
    store.set_override("a", "user:day:alice", 0)
    await asyncio.sleep(0.06)
    await guard.ainvoke("hi", config=ids(user="alice"))  # starts the refresh, served with the old copy
    await asyncio.sleep(0)  # the refresh task runs
    await asyncio.sleep(0.06)
    with pytest.raises(BudgetExceededError):
        await guard.ainvoke("hi", config=ids(user="alice"))


async def test_an_asyncio_only_redis_store_gets_its_overrides_in_the_background():
    server = fakeredis.FakeServer()
    store = RedisStore(fakeredis.FakeAsyncRedis(server=server))
    admin_store = RedisStore(fakeredis.FakeRedis(server=server))
    admin_store.set_override("a", "user:day:alice", 0)
    guard = BudgetGuard(model(), limits=[Limit(usd=1, per="user", window="day")], store=store, name="a")
    await guard.ainvoke("hi", config=ids(user="alice"))  # no sync client: the config's limit, meanwhile
    await asyncio.sleep(0.01)
    with pytest.raises(BudgetExceededError):
        await guard.ainvoke("hi", config=ids(user="alice"))


def test_a_store_that_cannot_be_read_keeps_the_last_overrides(caplog):
    class Flaky(MemoryStore):
        down = False

        def read_overrides(self, name, known_version=None):
            if self.down:
                raise ConnectionError("down")
            return super().read_overrides(name, known_version)

    store = Flaky()
    store.set_override("f", "user:day:alice", 0)
    guard = BudgetGuard(model(), limits=[Limit(usd=1, per="user", window="day")], store=store, name="f",
                        override_refresh_seconds=0)
    with pytest.raises(BudgetExceededError):
        guard.invoke("hi", config=ids(user="alice"))
    store.down = True
    with pytest.raises(BudgetExceededError):
        guard.invoke("hi", config=ids(user="alice"))
    assert "could not read live limit overrides" in caplog.text


def test_live_overrides_validate_the_refresh_time():
    with pytest.raises(ValueError, match="override_refresh_seconds"):
        LiveOverrides(MemoryStore(), "x", -1)


# -- stores ------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "fakeredis"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    return RedisStore(fakeredis.FakeRedis(), async_client=None)


def test_stores_version_their_overrides(store):
    assert isinstance(store, AdminStore)
    first = store.read_overrides("b")
    assert first.values == {}
    version = store.set_override("b", "user:day:alice", 5)
    assert store.read_overrides("b", first.version).values == {"user:day:alice": 5}
    assert store.read_overrides("b", version).values is None  # unchanged: nothing sent back
    assert store.read_overrides("other").values == {}
    store.set_override("b", "user:day:alice", None)
    assert store.read_overrides("b").values == {}
    with pytest.raises(ValueError):
        store.set_override("b", "user:day:alice", -1)


async def test_stores_async_twins(store):
    await store.aset_override("b", "user:day:x", 7)
    assert (await store.aread_overrides("b")).values == {"user:day:x": 7}
    await store.areserve([Counter("{b}:b:user:x:user:day:L", 100)], Hold("c", 10, 60))
    assert await store.ascan_counters("{*}:b:user:*:user:day:L") == [("{b}:b:user:x:user:day:L", CounterState(0, 10))]
    assert await store.areset_counter("{b}:b:user:x:user:day:L") == CounterState(0, 10)


def test_scan_lists_counters_only_and_reset_keeps_live_holds(store):
    a, b = "{b}:b:user:a:user:day:L", "{b}:b:user:b:user:day:L"
    store.reserve([Counter(a, 100)], Hold("c1", 10, 60))
    store.settle("c1", [a], 7)
    store.reserve([Counter(b, 100)], Hold("c2", 10, 60))
    store.set_override("b", "user:day:a", 1)
    assert store.scan_counters("{*}:b:user:*:user:day:L") == [(a, CounterState(7, 0)), (b, CounterState(0, 10))]
    assert store.scan_counters("{*}:b:user:a:*") == [(a, CounterState(7, 0))]
    assert store.scan_counters("{*}:x:*") == []
    assert store.reset_counter(b) == CounterState(0, 10)
    store.settle("c2", [b], 4)  # the call in flight settles as usual after a reset
    assert store.read([b]) == [CounterState(4, 0)]
    assert store.reset_counter("{b}:b:user:nobody:user:day:L") == CounterState()


# -- the operator API --------------------------------------------------------------------------


def spend(guard: BudgetGuard, calls: dict[str, int], scope: str = "user", **extra: str) -> None:
    for who, n in calls.items():
        for _ in range(n):
            guard.invoke("hi", config=ids(**{scope: who}, **extra))


def test_statuses_of_every_id_top_and_reset():
    guard = BudgetGuard(model(), limits=[Limit(usd=1, per="user", window="day"), Limit(usd=100, window="month")])
    spend(guard, {"alice": 3, "bob": 5, "carol": 1})
    admin = BudgetAdmin(guard.policy)
    rows = admin.statuses("user")
    assert {s.scope_id: s.spent for s in rows} == {"alice": 3 * CALL_USD, "bob": 5 * CALL_USD, "carol": CALL_USD}
    assert [s.scope_id for s in admin.top("user")] == ["bob", "alice", "carol"]
    assert [s.scope_id for s in admin.top("user", n=1)] == ["bob"]
    (total,) = admin.statuses("global")
    assert total.spent == 9 * CALL_USD and total.scope_id is None
    assert admin.statuses("user", "dave")[0].spent == 0  # an id that never spent reads as zeros
    (done,) = admin.reset("user", "bob")
    assert done.spent_before == 5 * CALL_USD
    assert guard.status(ids(user="bob"))[0].spent == 0
    assert [s.scope_id for s in admin.top("user")][:2] == ["alice", "carol"]
    with pytest.raises(ValueError, match="an id"):
        admin.reset("user")
    with pytest.raises(ValueError, match="no limit per team"):
        admin.top("team")


def test_ids_with_odd_characters_round_trip_through_the_keys():
    guard = BudgetGuard(model(), limits=[Limit(usd=1, per="user", window="day")])
    spend(guard, {"ann@example.com": 1, "a:b}{c": 2, "é": 1})
    admin = BudgetAdmin(guard.policy)
    assert [s.scope_id for s in admin.top("user")] == ["a:b}{c", "ann@example.com", "é"]
    admin.set_limit("user", 0, "a:b}{c")
    assert {r.scope_id for r in admin.limit_rows("user")} == {None, "a:b}{c"}


def test_tenant_scoped_budgets_find_a_users_counters_under_every_tenant():
    limits = [Limit(usd=10, per="tenant", window="month"), Limit(usd=1, per="user", window="day"),
              Limit(usd=100, window="month")]
    guard = BudgetGuard(model(), limits=limits, name="saas")
    guard.invoke("hi", config=ids(tenant="acme", user="u1"))
    guard.invoke("hi", config=ids(tenant="globex", user="u1"))
    guard.invoke("hi", config=ids(tenant="acme", user="u2"))
    admin = BudgetAdmin(guard.policy)
    assert sorted(s.spent for s in admin.statuses("user", "u1")) == [CALL_USD, CALL_USD]  # one per tenant
    assert [s.spent for s in admin.statuses("user", "u1", tenant="acme")] == [CALL_USD]
    assert [s.spent for s in admin.statuses("tenant", "acme")] == [2 * CALL_USD]
    assert [(s.scope_id, s.spent) for s in admin.top("tenant")] == [("acme", 2 * CALL_USD), ("globex", CALL_USD)]
    assert admin.statuses("global")[0].spent == 3 * CALL_USD


def test_tenant_scoped_budgets_find_the_one_per_model_counter_of_every_tenant():
    limits = [Limit(usd=10, per="tenant", window="month"), Limit(usd=1, per="user", window="day"),
              Limit(usd=1, per="model", window="day")]
    guard = BudgetGuard(model(), limits=limits, name="saas")
    for tenant, user in (("acme", "u1"), ("globex", "u1"), ("acme", "u2")):
        guard.invoke("hi", config=ids(tenant=tenant, user=user))
    admin = BudgetAdmin(guard.policy)
    (per_model,) = admin.statuses("model", "gpt-4o-mini")  # no tenant needed: it is nobody's own
    assert per_model.spent == 3 * CALL_USD and per_model.key.startswith("{saas}:")
    assert [s.spent for s in admin.statuses("model", "gpt-4o-mini", tenant="globex")] == [3 * CALL_USD]
    assert [(s.scope_id, s.spent) for s in admin.top("model")] == [("gpt-4o-mini", 3 * CALL_USD)]
    assert [s.spent for s in admin.statuses("model")] == [3 * CALL_USD]
    seen = {s.scope: s for s in guard.status(ids(tenant="globex", user="u1"), model_id="gpt-4o-mini")}
    assert seen["model"].key == per_model.key and seen["model"].spent == 3 * CALL_USD
    admin.set_limit("model", 3 * CALL_USD, "gpt-4o-mini")  # one cap for the model, whichever tenant calls
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke("hi", config=ids(tenant="initech", user="u9"))
    assert refused.value.refusal.scope == "model"
    (done,) = admin.reset("model", "gpt-4o-mini")
    assert done.spent_before == 3 * CALL_USD and done.key == per_model.key
    guard.invoke("hi", config=ids(tenant="initech", user="u9"))
    assert admin.statuses("model", "gpt-4o-mini")[0].spent == CALL_USD


def test_window_labels():
    now = datetime(2026, 3, 29, 12, tzinfo=timezone.utc)
    for window, label in (("hour", "2026-03-29T12"), ("day", "2026-03-29"), ("week", "2026-W13"),
                          ("month", "2026-03"), ("total", "all")):
        limit = Limit(usd=1, window=window, tz="Europe/Paris" if window != "hour" else "UTC")
        assert window_for_label(limit, None, now).label == label
        assert window_for_label(limit, label) == limit.window_at(now)
    with pytest.raises(ValueError, match="expected e.g. 2026-11"):
        window_for_label(Limit(usd=1, window="month"), "2026-11-22")
    with pytest.raises(ValueError):
        window_for_label(Limit(usd=1, window="day"), "2026-02-30")


def test_admin_on_a_past_window():
    guard = BudgetGuard(model(), limits=[Limit(usd=1, per="user", window="day")])
    spend(guard, {"alice": 1})
    admin = BudgetAdmin(guard.policy)
    today = admin.statuses("user")[0].window_label
    assert admin.top("user", at=today)[0].scope_id == "alice"
    assert admin.top("user", at="2020-01-01") == []


def test_a_forked_worker_checks_the_store_afresh():
    import os

    store = MemoryStore()
    guard = BudgetGuard(model(), limits=[Limit(usd=1, per="user", window="day")], store=store, name="k",
                        override_refresh_seconds=60)
    guard.invoke("hi", config=ids(user="alice"))
    live = guard.policy.live_overrides
    live._lock.acquire()  # as if another thread were checking when the process forked
    try:
        pid = os.fork()
        if pid == 0:  # the child: its lock is free and its copy due
            os._exit(0 if live._lock.acquire(blocking=False) and live.due() else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        live._lock.release()
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.redis
def test_admin_on_a_redis_cluster(tmp_path):
    from .redis_support import start_cluster

    servers = start_cluster(tmp_path)
    try:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
        limits = [Limit(usd=10, per="tenant", window="month"), Limit(usd=1, per="user", window="day"),
                  Limit(usd=100, window="month")]
        guard = BudgetGuard(model(), limits=limits, store=RedisStore(url), name="c", override_refresh_seconds=0)
        for t in range(9):  # tenants spread over the nodes
            for _ in range(1 + t % 3):
                guard.invoke("hi", config=ids(tenant=f"t{t}", user=f"u{t % 2}"))
        admin = BudgetAdmin(guard.policy)
        assert len(admin.statuses("tenant")) == 9 and len(admin.statuses("user", "u1")) == 4
        assert {s.spent for s in admin.top("tenant", n=3)} == {3 * CALL_USD}
        admin.set_limit("tenant", 0, "t5")
        with pytest.raises(BudgetExceededError):
            guard.invoke("hi", config=ids(tenant="t5", user="x"))
        (done,) = admin.reset("tenant", "t5")
        assert done.spent_before == 3 * CALL_USD
        guard.policy.store.close()
    finally:
        for server in servers:
            server.stop()


def test_an_override_hash_that_lost_writes_never_repeats_a_version():
    client = fakeredis.FakeRedis()
    store = RedisStore(client, async_client=None)
    store.set_override("b", "user:day:alice", 1000)
    seen = store.read_overrides("b")
    client.delete(store.overrides_key("b"))  # a restore from an older backup, a failover, a DEL
    store.set_override("b", "user:day:alice", 10)
    now = store.read_overrides("b", seen.version)
    assert now.version != seen.version
    assert now.values == {"user:day:alice": 10}  # a process that read the lost version reads again


def test_the_operator_views_show_a_long_ids_own_override():
    # An id over 96 escaped characters is kept in its counter key as a digest (~<sha256>).
    guard = BudgetGuard(UsageChat(), limits=[Limit(usd=10, per="user", window="day")])
    admin = BudgetAdmin(guard.policy)
    long_id = "customer-" + "x" * 100
    admin.set_limit("user", 1, scope_id=long_id)
    guard.invoke("hi", config={"configurable": {"user_id": long_id}})
    assert guard.status(user_id=long_id)[0].limit == Decimal(1)
    for rows in (admin.statuses(per="user"), admin.top("user")):
        assert [(s.limit, s.remaining) for s in rows] == [(Decimal(1), Decimal(1) - rows[0].spent)]
    named = [row for row in admin.limit_rows(per="user") if row.scope_id is not None]
    assert [(row.store_override, row.effective, row.source) for row in named] == [(Decimal(1), Decimal(1), "store override")]


def test_a_live_override_has_the_config_files_ceiling():
    """`limit set` took up to $4.6e9 where a config file stops at $1e9: a few digits too many
    became a budget."""
    from langchain_budgetguard.config.values import MAX_USD as CONFIG_MAX_USD

    store = MemoryStore()
    limits = [Limit(usd=1, per="user", window="day")]
    admin = BudgetAdmin(BudgetPolicy(limits=limits, store=store, name="ceiling"))
    assert admin.set_limit("user", CONFIG_MAX_USD, "alice").effective == Decimal(1_000_000_000)
    with pytest.raises(ValueError, match=r"at most \$1000000000 \(as in a config file\), got \$1000000000\.000000001"):
        admin.set_limit("user", "1000000000.000000001", "alice")
    with pytest.raises(ValueError, match="at most"):
        admin.set_limit("user", 4_000_000_000, "bob")
    assert [(r.scope_id, r.effective) for r in admin.limit_rows("user") if r.scope_id] == [("alice", 1_000_000_000)]
