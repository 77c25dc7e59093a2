"""Per-counter amounts and threshold alerts, on MemoryStore, a real Redis and a real Redis Cluster.

Per-counter amounts: a token or request counter beside a dollar counter in one all-or-nothing
reservation (``Counter.amount`` / ``charge_on_expiry``), settled per key (``amounts=``), replayed
from the settle journal with those amounts. Alerts (``Counter.alerts``): each threshold is
decided inside the atomic step that moves the counter, so that it fires exactly once across
threads and processes; ``reset_counter`` re-arms it; a repeated settle reports nothing.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import uuid
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from langchain_budgetguard.stores import MemoryStore
from langchain_budgetguard.stores.base import Counter, CounterState, Crossing, Hold
from langchain_budgetguard.stores.journal import SqliteJournal
from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

from .redis_support import fresh_prefix, free_port, redis_url  # noqa: F401 - fixture
from .test_redis_cluster import admin, cluster, cluster_url, tags_on_every_node  # noqa: F401 - fixtures

FAST_FAIL = RetryPolicy(attempts=2, deadline_seconds=0.3, first_wait=0.01, max_wait=0.02)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    store: Any
    tags: tuple[str, ...]
    expire: Callable[[], Awaitable[None]]  # wait until a hold of LEASE seconds has expired
    url: str | None = None

    def key(self, name: str, tag: int = 0) -> str:
        return "{" + self.tags[tag] + "}:" + name


LEASE = 0.2


def cid() -> str:
    return uuid.uuid4().hex


@pytest.fixture(params=["memory", "redis", "cluster"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    run = uuid.uuid4().hex[:8]
    if request.param == "memory":
        clock = ManualClock()

        async def tick() -> None:
            clock.now += LEASE + 0.01

        yield Env(MemoryStore(clock=clock), (f"a{run}", f"b{run}"), tick)
        return
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        tags: tuple[str, ...] = (f"a{run}", f"b{run}")
    else:
        servers = request.getfixturevalue("cluster")
        url = cluster_url(servers)
        tags = tuple(tags_on_every_node(request.getfixturevalue("admin"))[:2])  # two tags on two nodes
    store = RedisStore(url, prefix=fresh_prefix())

    async def wait() -> None:
        await asyncio.sleep(LEASE + 0.1)

    try:
        yield Env(store, tags, wait, url)
    finally:
        store.close()


@pytest.fixture(params=["sync", "async"])
def use_async(request: pytest.FixtureRequest) -> bool:
    return request.param == "async"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def reserve(env: Env, use_async: bool, counters: list[Counter], hold: Hold) -> Any:
    if use_async:
        return await env.store.areserve(counters, hold)
    return env.store.reserve(counters, hold)


async def settle(env: Env, use_async: bool, call_id: str, keys: list[str], amount: int, **kw: Any) -> Any:
    if use_async:
        return await env.store.asettle(call_id, keys, amount, **kw)
    return env.store.settle(call_id, keys, amount, **kw)


async def read(env: Env, use_async: bool, keys: list[str]) -> list[CounterState]:
    return await env.store.aread(keys) if use_async else env.store.read(keys)


async def close_async(env: Env) -> None:
    if isinstance(env.store, RedisStore):
        for backend in list(env.store._async_by_loop.values()):  # test-only reach: one loop per asyncio.run
            for closer in backend.closers:
                await closer.aclose()
        env.store._async_by_loop.clear()


# -- per-counter amounts ----------------------------------------------------------------------------


def test_a_token_counter_that_would_overflow_refuses_the_whole_reservation(env: Env, use_async: bool) -> None:
    usd, tokens = env.key("usd"), env.key("tokens", tag=1)

    async def scenario() -> None:
        first = await reserve(env, use_async, [Counter(usd, 1_000), Counter(tokens, 500, amount=400)], Hold(cid(), 100, 30))
        assert first.ok
        assert first.states == (CounterState(0, 100), CounterState(0, 400))
        # Dollars would fit (200 <= 1000); tokens would not (400 + 200 > 500): nothing is held anywhere.
        second = await reserve(env, use_async, [Counter(usd, 1_000), Counter(tokens, 500, amount=200)], Hold(cid(), 100, 30))
        assert not second.ok and second.blocked == 1
        assert await read(env, use_async, [usd, tokens]) == [CounterState(0, 100), CounterState(0, 400)]
        # Tokens first in the list: refused at index 0, dollars untouched too.
        third = await reserve(env, use_async, [Counter(tokens, 500, amount=101), Counter(usd, 1_000)], Hold(cid(), 1, 30))
        assert not third.ok and third.blocked == 0
        assert await read(env, use_async, [usd, tokens]) == [CounterState(0, 100), CounterState(0, 400)]
        await close_async(env)

    run(scenario())


def test_settle_charges_each_key_its_own_amount_once(env: Env, use_async: bool) -> None:
    usd, tokens, requests = env.key("usd"), env.key("tokens", tag=1), env.key("requests")
    call = cid()
    counters = [Counter(usd, 1_000), Counter(tokens, 10_000, amount=4_000), Counter(requests, 10, amount=1)]
    keys = [c.key for c in counters]

    async def scenario() -> None:
        assert (await reserve(env, use_async, counters, Hold(call, 100, 30))).ok
        assert await read(env, use_async, keys) == [CounterState(0, 100), CounterState(0, 4_000), CounterState(0, 1)]
        done = await settle(env, use_async, call, keys, 70, amounts=[70, 3_512, 1])
        assert done.applied and done.charged == 70 and not done.capped
        assert await read(env, use_async, keys) == [CounterState(70, 0), CounterState(3_512, 0), CounterState(1, 0)]
        again = await settle(env, use_async, call, keys, 999, amounts=[999, 999, 999])
        assert not again.applied and again.crossed == ()
        assert await read(env, use_async, keys) == [CounterState(70, 0), CounterState(3_512, 0), CounterState(1, 0)]
        await close_async(env)

    run(scenario())


@pytest.mark.parametrize(
    "amounts, message",
    [([5], "one amount per key"), ([5, -1], "settle amount"), ([5, 1.5], "integer"), ("55", "sequence")],
)
def test_bad_settle_amounts_are_refused_before_anything_changes(env: Env, amounts: Any, message: str) -> None:
    usd, tokens = env.key("usd"), env.key("tokens", tag=1)
    call = cid()
    assert env.store.reserve([Counter(usd, 1_000), Counter(tokens, 1_000, amount=50)], Hold(call, 10, 30)).ok
    with pytest.raises(ValueError, match=message):
        env.store.settle(call, [usd, tokens], 5, amounts=amounts)
    assert env.store.read([usd, tokens]) == [CounterState(0, 10), CounterState(0, 50)]
    assert env.store.settle(call, [usd, tokens], 5, amounts=[5, 40]).applied  # the hold was still there
    assert env.store.read([usd, tokens]) == [CounterState(5, 0), CounterState(40, 0)]


def test_a_settle_amount_above_the_maximum_is_capped_on_that_key(env: Env) -> None:
    usd, tokens = env.key("usd"), env.key("tokens", tag=1)
    done = env.store.settle(cid(), [usd, tokens], 5, amounts=[5, 2**70])
    assert done.applied and done.capped and done.charged == 5
    assert env.store.read([usd, tokens]) == [CounterState(5, 0), CounterState(2**62, 0)]


@pytest.mark.parametrize(
    "counter, message",
    [
        (Counter("{x}:t", 100, amount=-1), "amount of counter"),
        (Counter("{x}:t", 100, amount=True), "amount of counter"),
        (Counter("{x}:t", 100, amount=5, charge_on_expiry=2**63), "charge_on_expiry of counter"),
        (Counter("{x}:t", 100, alerts=(50, 20)), "ascending"),
        (Counter("{x}:t", 100, alerts=(0, 20)), "at least 1"),
        (Counter("{x}:t", 100, alerts=(2**62 + 1,)), "between 0 and"),
        (Counter("{x}:t", 100, alerts=("10",)), "integer"),
        (Counter("{x}:t", 100, alerts=10), "tuple of thresholds"),  # type: ignore[arg-type]
    ],
)
def test_bad_counter_fields_are_refused_before_any_write(env: Env, counter: Counter, message: str) -> None:
    usd = env.key("usd")
    bad = Counter(env.key("t", tag=1), counter.limit, amount=counter.amount,
                  charge_on_expiry=counter.charge_on_expiry, alerts=counter.alerts)
    with pytest.raises(ValueError, match=message):
        env.store.reserve([Counter(usd, 1_000), bad], Hold(cid(), 10, 30))
    assert env.store.read([usd, bad.key]) == [CounterState(), CounterState()]


def test_a_key_listed_twice_with_different_amounts_is_refused(env: Env) -> None:
    key = env.key("shared")
    with pytest.raises(ValueError, match="listed twice with different amounts"):
        env.store.reserve([Counter(key, 1_000), Counter(key, 1_000, amount=7)], Hold(cid(), 10, 30))
    assert env.store.reserve([Counter(key, 1_000, amount=7), Counter(key, 500, amount=7)], Hold(cid(), 10, 30)).ok
    assert env.store.read([key]) == [CounterState(0, 7)]
    with pytest.raises(ValueError, match="listed twice"):
        env.store.settle(cid(), [key, key], 5, amounts=[5, 6])


def test_expiry_charges_each_counter_its_own_charge(env: Env, use_async: bool) -> None:
    usd, tokens, requests = env.key("usd"), env.key("tokens", tag=1), env.key("requests")
    counters = [Counter(usd, 1_000), Counter(tokens, 10_000, amount=4_000, charge_on_expiry=2_500),
                Counter(requests, 10, amount=1)]  # an own amount without an own charge: expiry charges 0
    keys = [c.key for c in counters]
    call = cid()

    async def scenario() -> None:
        assert (await reserve(env, use_async, counters, Hold(call, 100, LEASE, charge_on_expiry=30))).ok
        await env.expire()
        assert await read(env, use_async, keys) == [CounterState(30, 0), CounterState(2_500, 0), CounterState(0, 0)]
        # The late settle replaces each counter's own expiry charge with its own actual amount.
        assert (await settle(env, use_async, call, keys, 10, amounts=[10, 1_200, 1])).applied
        assert await read(env, use_async, keys) == [CounterState(10, 0), CounterState(1_200, 0), CounterState(1, 0)]
        await close_async(env)

    run(scenario())


def test_release_and_renew_work_with_own_amounts(env: Env) -> None:
    usd, tokens = env.key("usd"), env.key("tokens", tag=1)
    counters = [Counter(usd, 1_000), Counter(tokens, 1_000, amount=300)]
    hold = Hold(cid(), 10, 30)
    assert env.store.reserve(counters, hold).ok
    assert env.store.renew(hold.call_id, [usd, tokens], 60)
    env.store.release(hold.call_id, [usd, tokens], hold)
    assert env.store.read([usd, tokens]) == [CounterState(0, 0), CounterState(0, 0)]


# -- alerts ---------------------------------------------------------------------------------------


def test_alerts_fire_once_each_report_spent_and_position_and_reset_rearms(env: Env, use_async: bool) -> None:
    usd, tokens = env.key("usd"), env.key("tokens", tag=1)  # two tags: two cluster nodes

    def counters() -> list[Counter]:
        return [Counter(usd, 10_000, alerts=(100, 200, 300)), Counter(tokens, 10**6, amount=10, alerts=(1_000,))]

    keys = [usd, tokens]

    async def call(amount: int, tokens_used: int) -> Any:
        call_id = cid()
        reserved = await reserve(env, use_async, counters(), Hold(call_id, 50, 30))
        assert reserved.ok and reserved.crossed == ()
        return call_id, await settle(env, use_async, call_id, keys, amount, amounts=[amount, tokens_used])

    async def scenario() -> None:
        _, first = await call(150, 999)
        assert first.crossed == (Crossing(0, usd, 100, 150),)
        last, second = await call(200, 1)
        assert sorted(second.crossed, key=lambda c: c.threshold) == [
            Crossing(0, usd, 200, 350), Crossing(0, usd, 300, 350), Crossing(1, tokens, 1_000, 1_000)]
        repeated = await settle(env, use_async, last, keys, 5_000, amounts=[5_000, 5_000])
        assert not repeated.applied and repeated.crossed == ()
        _, quiet = await call(10, 10)
        assert quiet.crossed == ()
        if use_async:
            await env.store.areset_counter(usd)
        else:
            env.store.reset_counter(usd)
        _, rearmed = await call(120, 0)
        assert rearmed.crossed == (Crossing(0, usd, 100, 120),)
        # The position is the key's first place in the call's keys.
        positioned = await settle(env, use_async, cid(), [tokens, usd, usd], 90, amounts=[0, 90, 90])
        assert positioned.crossed == (Crossing(1, usd, 200, 210),)
        await close_async(env)

    run(scenario())


def test_a_settle_without_reserve_fires_stored_alerts_and_none_before_any_are_stored(env: Env) -> None:
    key = env.key("late")
    assert env.store.settle(cid(), [key], 500).crossed == ()  # no thresholds stored yet
    assert env.store.reserve([Counter(key, 10_000, alerts=(400, 600))], Hold(cid(), 1, 30)).crossed == ()
    # Stored now: 400 is already behind spent and fires at the next change, with 600.
    assert env.store.settle(cid(), [key], 100).crossed == (Crossing(0, key, 400, 600), Crossing(0, key, 600, 600))
    # A reserve without alerts leaves the stored ones alone.
    assert env.store.reserve([Counter(key, 10_000)], Hold(cid(), 1, 30)).ok
    env.store.reset_counter(key)
    assert env.store.settle(cid(), [key], 450).crossed == (Crossing(0, key, 400, 450),)


def test_an_expiry_charge_crossing_is_reported_by_the_next_reserve(env: Env) -> None:
    key = env.key("expiring")
    counter = Counter(key, 10_000, alerts=(100,))
    assert env.store.reserve([counter], Hold(cid(), 10, LEASE, charge_on_expiry=150)).ok
    run(env.expire())
    later = env.store.reserve([counter], Hold(cid(), 10, 30))
    assert later.ok and later.crossed == (Crossing(0, key, 100, 150),)
    assert env.store.reserve([counter], Hold(cid(), 10, 30)).crossed == ()


def test_threads_crossing_thresholds_together_report_each_exactly_once(env: Env) -> None:
    key = env.key("hot")
    thresholds = tuple(range(100, 3_001, 100))
    found: list[Crossing] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(15):
            call_id = cid()
            counter = Counter(key, 10**9, amount=13, alerts=thresholds)
            reserved = env.store.reserve([counter], Hold(call_id, 999, 30))
            done = env.store.settle(call_id, [key], 0, amounts=[13])
            with lock:
                found.extend(reserved.crossed + done.crossed)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spent = env.store.read([key])[0].spent
    assert spent == 12 * 15 * 13
    tally = Tally(c.threshold for c in found)
    assert tally == Tally(t for t in thresholds if t <= spent)  # each reached threshold exactly once
    assert all(c.threshold <= c.spent < c.threshold + 13 for c in found)  # fired by the change that crossed it


def _hammer(url: str, prefix: str, key: str, thresholds: tuple[int, ...], rounds: int) -> list[tuple[int, int]]:
    """One process: reserve and settle ``rounds`` calls on ``key``; the crossings it was told of."""
    out = []
    with RedisStore(url, prefix=prefix) as store:
        for _ in range(rounds):
            call_id = cid()
            counter = Counter(key, 10**12, amount=7, alerts=thresholds)
            reserved = store.reserve([counter], Hold(call_id, 1, 30, charge_on_expiry=1))
            done = store.settle(call_id, [key], 1, amounts=[7])
            out += [(c.threshold, c.spent) for c in reserved.crossed + done.crossed]
    return out


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_processes_crossing_thresholds_together_report_each_exactly_once(
    request: pytest.FixtureRequest, where: str
) -> None:
    url = request.getfixturevalue("redis_url") if where == "redis" else cluster_url(request.getfixturevalue("cluster"))
    prefix, key = fresh_prefix(), "{" + uuid.uuid4().hex[:8] + "}:shared"
    thresholds = tuple(range(50, 8 * 40 * 7 + 1, 50))
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        results = pool.starmap(_hammer, [(url, prefix, key, thresholds, 40)] * 8)
    with RedisStore(url, prefix=prefix) as store:
        spent = store.read([key])[0].spent
    assert spent == 8 * 40 * 7
    found = [c for r in results for c in r]
    assert Tally(t for t, _ in found) == Tally(t for t in thresholds if t <= spent)
    assert all(t <= s < t + 7 for t, s in found)
    assert sum(1 for r in results if r) >= 2, "one process saw every crossing: the test did not race"


# -- the settle journal (Redis) ---------------------------------------------------------------------


def test_a_journaled_settle_replays_with_its_per_key_amounts(redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    prefix = fresh_prefix()
    usd, tokens = "{jr}:usd", "{jt}:tokens"
    path = tmp_path / "journal.sqlite"
    live = RedisStore(redis_url, prefix=prefix)
    call = cid()
    assert live.reserve([Counter(usd, 1_000), Counter(tokens, 10_000, amount=900, alerts=(500,))],
                        Hold(call, 100, 30)).ok
    # Redis "unreachable": a store on a dead port, with a file journal.
    away = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix, journal_path=str(path), retry=FAST_FAIL,
                      socket_connect_timeout=0.2)
    pending = away.settle(call, [usd, tokens], 40, amounts=[40, 640])
    assert pending.pending and not pending.applied and pending.charged == 40
    assert away.pending_journal[0].amounts == (40, 640)
    # The next process opens the same file and replays it with the per-key amounts, once.
    replayed: list[tuple[str, tuple[Crossing, ...]]] = []
    later = RedisStore(redis_url, prefix=prefix, journal_path=str(path))
    later.on_replay_crossed = lambda entry, crossed: replayed.append((entry.call_id, crossed))
    assert later.pending_journal[0].amounts == (40, 640)
    assert later.flush_journal() == 1
    assert later.read([usd, tokens]) == [CounterState(40, 0), CounterState(640, 0)]
    assert replayed == [(call, (Crossing(1, tokens, 500, 640),))]
    assert later.flush_journal() == 0 and later.read([usd, tokens]) == [CounterState(40, 0), CounterState(640, 0)]
    later.close()
    away.close()  # its file journal is empty now: nothing left to flush
    live.close()


def test_sqlite_journal_from_before_per_key_amounts_still_opens(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
    db.execute("CREATE TABLE settles (seq INTEGER PRIMARY KEY AUTOINCREMENT, call_id TEXT NOT NULL, "
               "keys TEXT NOT NULL, amount INTEGER NOT NULL)")
    db.execute("INSERT INTO settles (call_id, keys, amount) VALUES ('old', '[\"{a}:k\"]', 5)")
    db.commit()
    db.close()
    journal = SqliteJournal(path)
    journal.append("new", ["{a}:k", "{a}:t"], 6, amounts=[6, 60])
    assert [(e.call_id, e.amount, e.amounts) for e in journal.pending()] == [("old", 5, None), ("new", 6, (6, 60))]
    with pytest.raises(ValueError, match="one amount per key"):
        journal.append("bad", ["{a}:k"], 1, amounts=[1, 2])
    journal.close()


def test_a_reserve_stores_alerts_in_one_field_of_the_counter(redis_url: str) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix())
    key = "{al}:k"
    store.reserve([Counter(key, 1_000, alerts=(10, 20))], Hold(cid(), 1, 30))
    store.settle(cid(), [key], 15)
    with redis.Redis.from_url(redis_url) as admin_client:
        fields = admin_client.hgetall(store.redis_keys(key)[0])
        assert fields[b"a"] == b"10,20" and fields[b"A10"] == b"1" and b"A20" not in fields
        store.reset_counter(key)
        assert b"A10" not in admin_client.hgetall(store.redis_keys(key)[0])
    store.close()


@pytest.mark.parametrize("journaled", [False, True])
def test_a_settle_whose_reply_was_lost_still_reports_its_crossings(redis_url: str, journaled: bool) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix())
    key, call = "{lost}:k", cid()
    assert store.reserve([Counter(key, 10_000, alerts=(100,))], Hold(call, 1, 30)).ok
    scripts = store._sync_backend().scripts  # test-only reach: lose the settle's first reply
    real, runs = scripts["settle"], []

    def lose_first(keys: Any = None, args: Any = None, client: Any = None) -> Any:
        runs.append(args)
        reply = real(keys=keys, args=args)
        if len(runs) == 1:
            raise redis.exceptions.ConnectionError("reply lost")
        return reply

    scripts["settle"] = lose_first
    if journaled:  # the replay's reply is lost: its retry hands the crossing to the hook
        seen: list[tuple[Crossing, ...]] = []
        store.on_replay_crossed = lambda entry, crossed: seen.append(crossed)
        store.journal.append(call, (key,), 150)
        assert store.flush_journal() == 1
        assert seen == [(Crossing(0, key, 100, 150),)]
    else:
        done = store.settle(call, [key], 150)
        assert done.crossed == (Crossing(0, key, 100, 150),)
    assert len(runs) == 2 and runs[0] == runs[1]
    scripts["settle"] = real
    assert store.settle(call, [key], 150).crossed == ()  # another settle of the call: nothing
    assert store.read([key]) == [CounterState(150, 0)]
    store.close()


def test_a_settle_journaled_half_way_reports_the_crossings_of_the_tags_it_reached(redis_url: str) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix(), retry=FAST_FAIL)
    usd, tokens, call = "{half1}:usd", "{half2}:tokens", cid()
    counters = [Counter(usd, 10_000, alerts=(100,)), Counter(tokens, 10_000, amount=80, alerts=(50,))]
    assert store.reserve(counters, Hold(call, 200, 30)).ok
    scripts = store._sync_backend().scripts  # test-only reach: the second tag's node is away
    real = scripts["settle"]
    tokens_hash = store.redis_keys(tokens)[0]

    def second_tag_down(keys: Any = None, args: Any = None, client: Any = None) -> Any:
        if tokens_hash in keys:
            raise redis.exceptions.ConnectionError("node down")
        return real(keys=keys, args=args)

    scripts["settle"] = second_tag_down
    store._start_repairer = lambda: None  # type: ignore[method-assign]  # replay by hand below
    pending = store.settle(call, [usd, tokens], 150, amounts=[150, 60])
    assert pending.pending and pending.crossed == (Crossing(0, usd, 100, 150),)
    assert store.read([usd, tokens]) == [CounterState(150, 0), CounterState(0, 80)]
    scripts["settle"] = real
    replayed: list[tuple[Crossing, ...]] = []
    store.on_replay_crossed = lambda entry, crossed: replayed.append(crossed)
    assert store.flush_journal() == 1
    assert replayed == [(Crossing(1, tokens, 50, 60),)]  # the first tag's crossing is not reported twice
    assert store.read([usd, tokens]) == [CounterState(150, 0), CounterState(60, 0)]
    store.close()
