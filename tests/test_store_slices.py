"""Leased budget slices (RedisStore(lease_slices=True), stores.slices)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis

from langchain_budgetguard.stores.base import Counter, CounterState, Hold
from langchain_budgetguard.stores.redis import RedisStore

from .redis_support import fresh_prefix, redis_url, script_calls  # noqa: F401 - fixtures
from .store_contract import StoreContract, StoreEnv
from .test_store_redis import expiry_reader


@pytest.mark.redis
class TestSlicedRedisContract(StoreContract):
    """The whole store contract with every counter admitted from slices from its first reserve."""

    @pytest_asyncio.fixture
    async def env(self, redis_url: str) -> AsyncIterator[StoreEnv]:  # noqa: F811
        store = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=True)
        store._book.hot_hits = 1
        admin = redis.Redis.from_url(redis_url)
        try:
            yield StoreEnv(store=store, sleep=asyncio.sleep, expiry_of=expiry_reader(admin, store))
        finally:
            await store.aclose()
            admin.close()


# -- behaviour of slices themselves ----------------------------------------------------------------

WORKER = r"""
import json, random, sys, time
import langchain_budgetguard.stores.slices as slices
from langchain_budgetguard.stores.base import Counter, Hold
from langchain_budgetguard.stores.redis import RedisStore

spec = json.loads(sys.argv[1])
if spec.get("quiet"):  # settles stay unreported until the test kills this process
    slices.REPORT_SECONDS = slices.IDLE_SECONDS = 3600.0
store = RedisStore(spec["url"], prefix=spec["prefix"], lease_slices=True, carry_settles=True,
                   carry_window_seconds=1.0, slice_lease_seconds=spec.get("slice_lease", 30.0))
rng = random.Random(spec["seed"])
key = spec["key"]
if spec["mode"] == "spend":
    store.read([key])  # connected and scripts loaded: then wait for the others
    print("ready", flush=True)
    sys.stdin.readline()
    charged = admitted = refused_in_a_row = 0
    while refused_in_a_row < 40:
        amount = rng.randint(50, 150)
        hold = Hold(f"{spec['seed']}-{admitted}-{refused_in_a_row}", amount, 30, charge_on_expiry=amount)
        if store.reserve([Counter(key, spec["limit"])], hold).ok:
            cost = amount - rng.randint(0, 20)
            store.settle(hold.call_id, [key], cost)
            charged += cost
            admitted += 1
            refused_in_a_row = 0
        else:
            refused_in_a_row += 1
    store.close()
    print(json.dumps({"charged": charged, "admitted": admitted}), flush=True)
else:  # "crash": a slice, settles it has not reported, one carried settle, one call in flight
    for i in range(2):  # the counter gets hot on its third reserve: these two are settled in Redis
        assert store.reserve([Counter(key, spec["limit"])], Hold(f"warm-{i}", 1000, spec["lease"])).ok
        store.settle(f"warm-{i}", [key], 500)
    store.flush_carried()
    users = [f"{{u}}:crash:user:{i}" for i in range(6)]  # each seen once: cold
    assert store.reserve([Counter(key, spec["limit"]), Counter(users[0], 10**6)],
                         Hold("in-flight", 1000, spec["lease"], charge_on_expiry=spec["charge"])).ok
    charged = []
    for i, user in enumerate(users[1:]):
        hold = Hold(f"done-{i}", 1000, spec["lease"], charge_on_expiry=spec["charge"])
        assert store.reserve([Counter(key, spec["limit"]), Counter(user, 10**6)], hold).ok
        store.settle(hold.call_id, [key, user], 700 + i)  # the user's settle is carried by the next reserve
        charged.append(700 + i)
    print(json.dumps({"charged": charged, "users": users, "queued": len(store._carry)}), flush=True)
    time.sleep(120)
"""


def _spawn(spec: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:  # noqa: F811
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _sliced(redis_url: str, **options) -> RedisStore:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=True, **options)
    store._book.hot_hits = 1
    return store


def _slice_field(admin: redis.Redis, store: RedisStore, key: str) -> tuple[str, int, int]:
    """(slice id, grant, charge_on_expiry) of the one slice on ``key``."""
    fields = {f: v for f, v in admin.hgetall(store.redis_keys(key)[0]).items() if f.startswith("%")}
    ((name, value),) = fields.items()
    grant, charge = value.split(":")
    return name[1:], int(grant), int(charge)


@pytest.mark.redis
def test_a_hot_counter_is_admitted_without_round_trips(redis_url: str, script_calls) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=True)
    key = "{hot}:b:global"
    for i in range(300):
        assert store.reserve([Counter(key, 10**12)], Hold(f"c{i}", 100, 30, charge_on_expiry=30)).ok
        assert store.settle(f"c{i}", [key], 90).applied
    calls = len(script_calls)
    assert calls <= 20, f"{calls} script calls for 300 calls"  # 2 hot-up calls, then a refill per 64 calls
    holdings = store.slice_holdings()
    assert holdings[key][1] == 0  # nothing in flight
    assert store.read([key]) == [CounterState(300 * 90, 0)]  # a read reports first and returns the slice
    store.close()


@pytest.mark.redis
def test_cold_counters_stay_admitted_in_redis(redis_url: str) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=True)
    for i in range(50):
        key = f"{{cold}}:b:user:{i}"  # a user seen once
        assert store.reserve([Counter(key, 1000)], Hold(f"c{i}", 100, 30)).ok
        assert store.read([key]) == [CounterState(0, 100)]  # held in Redis, per call
        store.settle(f"c{i}", [key], 60)
    assert store.slice_holdings() == {}
    store.close()


@pytest.mark.redis
def test_slices_never_overspend_across_processes_and_fill_the_budget(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    prefix, key, limit = fresh_prefix(), "{p}:b:global", 400_000
    procs = [_spawn({"mode": "spend", "url": redis_url, "prefix": prefix, "key": key, "limit": limit, "seed": s})
             for s in range(4)]
    for proc in procs:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()[-2000:] if proc.poll() is not None else ""
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        reports.append(json.loads(out))
    charged = sum(r["charged"] for r in reports)
    with RedisStore(redis_url, prefix=prefix) as store:
        (state,) = store.read([key])
    assert state == CounterState(charged, 0), "Redis must show exactly what the processes charged, nothing held"
    assert state.sliced == 0 and not admin.hget(store.redis_keys(key)[0], "g")
    assert charged <= limit
    assert charged >= limit * 0.97, f"refused with {100 * (1 - charged / limit):.1f}% of the budget left"
    assert all(r["admitted"] > 0 for r in reports), reports


@pytest.mark.redis
@pytest.mark.parametrize("charge", [1000, 250])
def test_a_killed_process_slice_and_deferred_settles_end_with_their_lease(
    redis_url: str, admin: redis.Redis, charge: int  # noqa: F811
) -> None:
    prefix, key, limit, lease = fresh_prefix(), "{g}:crash:global", 10**6, 4.0
    proc = _spawn({"mode": "crash", "url": redis_url, "prefix": prefix, "key": key, "limit": limit, "seed": 0,
                   "lease": lease, "charge": charge, "slice_lease": 3.0, "quiet": True})
    try:
        said = json.loads(proc.stdout.readline() or "{}")
        assert said, proc.stderr.read()[-2000:] if proc.poll() is not None else "the worker said nothing"
        watcher = RedisStore(redis_url, prefix=prefix)
        counter = watcher.redis_keys(key)[0]
        spent_before = int(admin.hget(counter, "s") or 0)
        _, grant, slice_charge = _slice_field(admin, watcher, key)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert said["queued"] == 1  # the last user's settle was still waiting for a reserve
    assert spent_before == 2 * 500  # the warm-up calls; every settle of the slice's calls was unreported
    # What the slice's one report recorded: nothing in flight yet, and the charge/amount ratio of
    # its calls (in 64ths, rounded up) of the slice, for the calls it would admit.
    k = -(-charge * 64 // 1000)
    assert slice_charge == min(grant, k * (grant // 64) + k)
    deadline = time.monotonic() + 20
    while True:
        (global_state,) = watcher.read([key])
        users = watcher.read(said["users"])
        if global_state.held == 0 and all(u.held == 0 for u in users):
            break
        assert time.monotonic() < deadline, "the dead process's slice or holds never expired"
        time.sleep(0.2)
    assert global_state == CounterState(spent_before + slice_charge, 0)
    assert global_state.spent <= limit
    # No call is free: the policy's charge of every call admitted and not reported stands in for it.
    assert global_state.spent >= charge * (len(said["charged"]) + 1)
    # The users: settles that landed (carried by the next reserve) at their cost; the one still
    # queued and the call in flight at their charge_on_expiry, as holds whose lease ended.
    assert [u.spent for u in users] == [charge, *said["charged"][:-1], charge]
    watcher.close()
