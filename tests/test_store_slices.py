"""Leased budget slices (RedisStore(lease_slices=True), stores.slices)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from langchain_budgetguard.errors import BudgetStoreUnavailableError
from langchain_budgetguard.stores.base import Counter, CounterState, Hold
from langchain_budgetguard.stores.ledger import LedgerRow
from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

from .redis_support import ReplyDroppingProxy, admin, fresh_prefix, redis_url, script_calls  # noqa: F401 - fixtures
from . import test_store_redis as redis_tests  # (its contract class, not re-collected here)


class TestSlicedRedisContract(redis_tests.TestRealRedisContract):
    """The whole store contract with every counter admitted from slices from its first reserve."""

    sliced = True
    fill_margin = 80


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
def proxy(redis_url: str) -> Iterator[ReplyDroppingProxy]:  # noqa: F811
    from urllib.parse import urlparse

    p = ReplyDroppingProxy(urlparse(redis_url).port or 6379)
    yield p
    p.close()


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
    assert not admin.hget(store.redis_keys(key)[0], "n")  # no slice counted
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
    # What the slice's one report recorded: nothing in flight yet, and the whole slice for the
    # calls it would admit after the report (their reservations: settles Redis never saw).
    assert slice_charge == grant
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
    # No call is free: every call admitted and not reported is charged its whole reservation.
    assert global_state.spent >= 1000 * (len(said["charged"]) + 1)
    # The users: settles that landed (carried by the next reserve) at their cost; the one still
    # queued and the call in flight at their full reservation (1000, whatever charge_on_expiry
    # they asked for: a carrying store cannot tell Redis which settles wait), as holds whose lease ended.
    assert [u.spent for u in users] == [1000, *said["charged"][:-1], 1000]
    watcher.close()


@pytest.mark.redis
def test_a_late_report_replaces_what_the_slice_lease_charged(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    paused = _sliced(redis_url, slice_lease_seconds=0.3)
    key = "{late}:b:global"
    assert paused.reserve([Counter(key, 10**6)], Hold("a", 1000, 30, charge_on_expiry=1000)).ok
    paused.flush_slices = lambda final=False: 0  # a process that stops (GC pause, SIGSTOP): no timer
    paused.settle("a", [key], 400)
    _, grant, charge = _slice_field(admin, paused, key)
    assert charge == grant  # charge_on_expiry == amount: the whole slice
    time.sleep(0.5)
    other = RedisStore(redis_url, prefix=paused.prefix)
    assert other.read([key]) == [CounterState(charge, 0)]  # the lease ended: charged by the record
    del paused.flush_slices  # the process goes on: its report replaces that charge
    assert paused.flush_slices(final=True) == 1
    assert other.read([key]) == [CounterState(400, 0)]
    counter, leases = paused.redis_keys(key)
    assert not [f for f in admin.hkeys(counter) if f[0] in "%!gn"] and not admin.zrange(leases, 0, -1)
    other.close()
    paused.close()


@pytest.mark.redis
def test_a_report_whose_reply_was_lost_applies_once(redis_url: str, proxy) -> None:  # noqa: F811
    store = RedisStore(proxy.url, prefix=fresh_prefix(), lease_slices=True)
    store._book.hot_hits = 1
    key = "{lost}:b:global"
    proxy.drop_script_replies = 1  # the refill ran in Redis; its reply is lost, the retry is a duplicate
    assert store.reserve([Counter(key, 10**6)], Hold("a", 1000, 30)).ok
    assert proxy.lost == 1
    store.settle("a", [key], 300)
    assert store.reserve([Counter(key, 10**6)], Hold("b", 1000, 30)).ok
    store.settle("b", [key], 200)
    proxy.drop_script_replies = 1  # the report carrying both settles: lost reply, retried
    assert store.flush_slices(final=True) == 1
    assert proxy.lost == 2
    assert store.read([key]) == [CounterState(500, 0)]
    store.close()


@pytest.mark.redis
def test_a_report_that_cannot_reach_redis_is_sent_again_as_it_was(redis_url: str, proxy) -> None:  # noqa: F811
    store = RedisStore(proxy.url, prefix=fresh_prefix(), lease_slices=True,
                       retry=RetryPolicy(attempts=2, deadline_seconds=0.3, first_wait=0.01, max_wait=0.05))
    store._book.hot_hits = 1
    key = "{down}:b:global"
    assert store.reserve([Counter(key, 10**6)], Hold("a", 1000, 30)).ok
    store.settle("a", [key], 300)
    proxy.drop_script_replies = -1  # Redis runs every script, no reply comes back
    assert store.flush_slices(final=True) == 0
    with pytest.raises(BudgetStoreUnavailableError):  # the slice is broken: calls go to Redis, which is away
        store.reserve([Counter(key, 10**6)], Hold("b", 1000, 30))
    proxy.drop_script_replies = 0
    assert store.flush_slices(final=True) == 1  # the same report again: it had applied, once
    store.flush_journal()  # b's release, queued when its reply was lost (else by the repair thread, sometime)
    assert store.read([key]) == [CounterState(300, 0)]
    assert store.reserve([Counter(key, 10**6)], Hold("c", 1000, 30)).ok
    store.settle("c", [key], 100)
    assert store.read([key]) == [CounterState(400, 0)]
    store.close()


@pytest.mark.redis
def test_sliced_settles_write_their_ledger_rows_and_fire_alerts_once(redis_url: str) -> None:  # noqa: F811
    store = _sliced(redis_url)
    crossed = []
    store.on_carried_crossed = lambda call_id, found: crossed.extend(found)
    key = "{led}:acme:global:-:total"
    counter = Counter(key, 10**6, alerts=(1_000, 5_000))
    for i in range(12):
        hold = Hold(f"call-{i}", 1000, 30)
        result = store.reserve([counter], hold)
        assert result.ok
        crossed += result.crossed
        row = LedgerRow(budget="acme", call_id=hold.call_id, scopes={"global": "-"}, keys=(key,), model="mödel-💸",
                        tokens={"input": i + 1}, detail='a "quoted", \\ naïve\tdetail')
        store.settle(hold.call_id, [key], 500, row=row)
    rows = store.read_ledger("acme", limit=100)  # a ledger read reports this process's settles first
    assert sorted(r.call_id for r in rows) == sorted(f"call-{i}" for i in range(12))
    assert {r.cost_nano for r in rows} == {500}
    assert {(r.model, r.detail) for r in rows} == {("mödel-💸", 'a "quoted", \\ naïve\tdetail')}
    assert sorted(r.tokens["input"] for r in rows) == list(range(1, 13))
    store.flush_slices(final=True)
    assert store.read([key]) == [CounterState(6_000, 0)]
    assert sorted(c.threshold for c in crossed) == [1_000, 5_000]
    assert all(c.key == key for c in crossed)
    store.close()


@pytest.mark.redis
def test_a_call_on_hot_and_cold_counters_is_split_and_settled_exactly(redis_url: str, script_calls) -> None:  # noqa: F811
    store = _sliced(redis_url)
    hot = "{mix}:acme:global:-:total"
    store.reserve([Counter(hot, 10**6)], Hold("warm", 1000, 30))  # a slice for 64 such calls
    store.settle("warm", [hot], 10)
    before = len(script_calls)
    user = "{mix}:acme:user:alice:total"
    store._book.hot_hits = 1000  # alice is seen rarely: she stays in Redis
    assert store.reserve([Counter(user, 5_000), Counter(hot, 10**6)], Hold("c", 1000, 30)).ok
    assert len(script_calls) == before + 1  # one reserve, of alice's counter only
    assert store.read([user]) == [CounterState(0, 1000)]
    row = LedgerRow(budget="acme", call_id="c", scopes={"user": "alice", "global": "-"}, keys=(user, hot))
    store.settle("c", [user, hot], 700, amounts=[700, 600], row=row)
    assert store.read([user, hot]) == [CounterState(700, 0), CounterState(610, 0)]
    assert [r.call_id for r in store.read_ledger("acme", limit=10)].count("c") == 1
    # alice's limit refuses in Redis; nothing stays taken from the slice
    assert not store.reserve([Counter(user, 5_000), Counter(hot, 10**6)], Hold("d", 4_500, 30)).ok
    assert store.slice_holdings().get(hot, (0, 0, 0))[1] == 0
    store.close()


@pytest.mark.redis
def test_a_lower_limit_shrinks_the_slice_at_once(redis_url: str) -> None:  # noqa: F811
    store = _sliced(redis_url)
    key = "{low}:b:global"
    assert store.reserve([Counter(key, 10**6)], Hold("a", 100, 30)).ok
    store.settle("a", [key], 100)
    assert store.slice_holdings()[key][0] >= 5_000  # a slice of the $ limit's room
    admitted = 0
    for i in range(50):  # the limit is lowered (a live override): the next reserve re-sizes
        if store.reserve([Counter(key, 1_000)], Hold(f"b{i}", 100, 30)).ok:
            store.settle(f"b{i}", [key], 100)
            admitted += 1
    assert admitted == 9  # 100 + 9 * 100 = 1_000
    assert store.read([key]) == [CounterState(1_000, 0)]
    store.close()


@pytest.mark.redis
async def test_async_gather_on_slices_never_overspends(redis_url: str) -> None:  # noqa: F811
    store = _sliced(redis_url)
    key, limit = "{agg}:b:global", 50_000

    async def one(i: int) -> int:
        total = 0
        for j in range(40):
            hold = Hold(f"{i}-{j}", 100, 30, charge_on_expiry=100)
            if (await store.areserve([Counter(key, limit)], hold)).ok:
                await asyncio.sleep(0)
                await store.asettle(hold.call_id, [key], 90)
                total += 90
        return total

    charged = sum(await asyncio.gather(*(one(i) for i in range(20))))
    assert await store.aread([key]) == [CounterState(charged, 0)]
    assert limit - 100 < charged + 10 * 50 and charged <= limit  # the limit stopped it, not an error
    await store.aclose()


@pytest.mark.redis
def test_an_asyncio_only_store_cannot_lease_slices() -> None:
    client = redis.asyncio.Redis()
    with pytest.raises(ValueError, match="lease_slices needs a URL or a sync client"):
        RedisStore(client, lease_slices=True)


@pytest.mark.redis
def test_status_shows_slices_apart_from_holds(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    owner = _sliced(redis_url)
    key = "{st}:b:global"
    assert owner.reserve([Counter(key, 10**6)], Hold("a", 100, 30)).ok
    other = RedisStore(redis_url, prefix=owner.prefix)  # another process's view: the slice is held
    (state,) = other.read([key])
    _, grant, _ = _slice_field(admin, owner, key)
    assert (state.held, state.sliced) == (grant, grant) and grant > 100
    owner.settle("a", [key], 100)
    owner.close()  # returns the slice
    assert other.read([key]) == [CounterState(100, 0)] and other.read([key])[0].sliced == 0
    other.close()


@pytest.mark.redis
def test_a_call_in_flight_past_its_lease_is_charged_and_corrected_by_its_late_settle(redis_url: str) -> None:  # noqa: F811
    store = _sliced(redis_url)
    key = "{exp}:b:global"
    assert store.reserve([Counter(key, 10**6)], Hold("a", 1000, 0.3, charge_on_expiry=400)).ok
    time.sleep(0.6)  # the store's timer ends the call's lease: charged charge_on_expiry
    assert store.read([key]) == [CounterState(400, 0)]
    assert store.reserve([Counter(key, 10**6)], Hold("a", 10, 30)).reused
    store.settle("a", [key], 250)  # the late settle replaces it
    assert store.read([key]) == [CounterState(250, 0)]
    assert not store.settle("a", [key], 250).applied
    store.close()


@pytest.mark.redis
def test_a_guard_on_a_sliced_store_charges_every_call_exactly(redis_url: str, script_calls) -> None:  # noqa: F811
    from decimal import Decimal

    from langchain_budgetguard import BudgetExceededError, BudgetGuard

    from .guard_worker import CALL_COST, PRICES, big
    from .fakes import ExactEstimator

    store = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=True)
    guard = BudgetGuard(big(), limit="20", store=store, name="sliced", prices=PRICES, estimator=ExactEstimator(1000))
    served = 0
    with pytest.raises(BudgetExceededError):
        for _ in range(300):
            reply = guard.invoke("hi")
            assert reply.response_metadata["budgetguard"]["cost_usd"] == CALL_COST
            served += 1
    assert served == 222  # $19.98; one more would make $20.07
    assert len(script_calls) < served, "the calls were not admitted from a slice"  # per call: 2 each
    (status,) = guard.status()
    assert (status.spent, status.held) == (served * CALL_COST, Decimal(0))
    rows = store.read_ledger("sliced", limit=1000)
    assert len([r for r in rows if r.kind == "call"]) == served
    guard.close()


@pytest.mark.redis
def test_status_of_another_process_shows_the_slices_apart(redis_url: str) -> None:  # noqa: F811
    from langchain_budgetguard import BudgetGuard
    from langchain_budgetguard.cli import _status_json, _status_rows

    from .fakes import ExactEstimator
    from .guard_worker import PRICES, big

    options = {"limit": "100", "name": "apart", "prices": PRICES, "estimator": ExactEstimator(1000)}
    owner = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=True)
    guard = BudgetGuard(big(), store=owner, **options)
    for _ in range(5):
        guard.invoke("hi")
    watcher = BudgetGuard(None, store=RedisStore(redis_url, prefix=owner.prefix), **options)
    (status,) = watcher.status()
    grant = sum(g for g, _, _ in owner.slice_holdings().values())
    assert status.sliced * 10**9 == grant and status.held == status.sliced > 0
    assert status.remaining == 100 - status.spent - status.held
    assert _status_json(status)["sliced"] == str(status.sliced)
    assert "in slices)" in _status_rows([status])
    guard.close()  # the slice goes back
    (status,) = watcher.status()
    assert (status.held, status.sliced) == (0, 0) and "in slices" not in _status_rows([status])
    watcher.close()


@pytest.mark.redis
def test_a_slice_whose_lease_was_not_renewed_admits_nothing_more(redis_url: str, script_calls) -> None:  # noqa: F811
    store = _sliced(redis_url, slice_lease_seconds=0.6)
    store.flush_slices = lambda final=False: 0  # its timer cannot renew (Redis away from here only)
    key = "{renew}:b:global"
    assert store.reserve([Counter(key, 10**6)], Hold("a", 100, 30)).ok
    calls = len(script_calls)
    assert store.reserve([Counter(key, 10**6)], Hold("b", 100, 30)).ok
    assert len(script_calls) == calls  # from the slice
    time.sleep(0.45)  # past two thirds of the lease: Redis may soon reap the slice and hand out its room
    assert store.reserve([Counter(key, 10**6)], Hold("c", 100, 30)).ok
    assert len(script_calls) == calls + 1  # a refill first (it renews the lease)
    for cid in "abc":
        store.settle(cid, [key], 100)
    del store.flush_slices
    store.close()
    with RedisStore(redis_url, prefix=store.prefix) as other:
        assert other.read([key]) == [CounterState(300, 0)]


@pytest.mark.redis
def test_ledger_rows_of_a_report_read_back_newest_first_among_single_rows(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    store = _sliced(redis_url)
    key = "{ord}:acme:global:-:total"
    for i in range(5):  # sliced: their rows go as one stream entry, with the report
        assert store.reserve([Counter(key, 10**6)], Hold(f"s{i}", 100, 30)).ok
        store.settle(f"s{i}", [key], 10 + i, row=LedgerRow(budget="acme", call_id=f"s{i}", keys=(key,)))
    store.flush_slices(final=True)
    time.sleep(0.002)
    store.append_ledger(LedgerRow(budget="acme", call_id="later", kind="refusal", keys=(key,)))
    entries = admin.xrange(store.ledger_key(key))
    assert len(entries) == 2 and sorted(entries[0][1]) == ["C", "J", "n"]  # five rows in one entry, then one
    rows = store.read_ledger("acme", limit=10)
    assert [r.call_id for r in rows] == ["later", "s4", "s3", "s2", "s1", "s0"]
    assert [r.cost_nano for r in rows[1:]] == [14, 13, 12, 11, 10]
    assert [r.call_id for r in store.read_ledger("acme", limit=3)] == ["later", "s4", "s3"]
    store.close()


@pytest.mark.redis
def test_slices_shrink_with_the_number_of_processes_holding_one(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    first, key, limit = _sliced(redis_url), "{many}:b:global", 10**7
    second = RedisStore(redis_url, prefix=first.prefix, lease_slices=True)
    second._book.hot_hits = 1
    assert first.reserve([Counter(key, limit)], Hold("a", 10_000, 30)).ok
    (one,) = first.slice_holdings().values()
    assert one[0] == (limit - 0) // 20  # alone: 1/20 of the room (it asked for 256 calls' worth)
    assert second.reserve([Counter(key, limit)], Hold("b", 10_000, 30)).ok
    (two,) = second.slice_holdings().values()
    assert two[0] == (limit - one[0]) // (20 + 4)  # one other slice: 1/24 of the room it leaves
    assert admin.hget(first.redis_keys(key)[0], "n") == "2"
    for store, cid in ((first, "a"), (second, "b")):
        store.settle(cid, [key], 10_000)
        store.close()
    assert not admin.hget(first.redis_keys(key)[0], "n")


# -- a call admitted from a slice, settled by another store ------------------------------------------


def _other(store: RedisStore, redis_url: str, kind: str) -> RedisStore:  # noqa: F811
    """Another store on the same Redis and prefix (another process, or a second store here)."""
    return RedisStore(redis_url, prefix=store.prefix, lease_slices=kind == "sliced")


def _record(admin: redis.Redis, store: RedisStore, key: str, call_id: str) -> str | None:  # noqa: F811
    return admin.get(f"{store.prefix}c:{{{key[1:key.index('}')]}}}:{call_id}")


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["plain", "sliced"])
@pytest.mark.parametrize("reported", [False, True], ids=["before-its-report", "after-its-report"])
def test_a_call_another_store_settles_is_charged_once(redis_url: str, admin: redis.Redis, kind: str,
                                                      reported: bool) -> None:  # noqa: F811
    owner = _sliced(redis_url)
    key = f"{{foreign-{kind}-{reported}}}:b:global"
    hold = Hold("a", 1000, 1.5, charge_on_expiry=1000)
    assert owner.reserve([Counter(key, 10**9)], hold).ok
    assert owner.slice_holdings()[key][1] == 1000  # admitted from the slice: no record in Redis yet
    if reported:  # the owner's timer records the call in Redis with the slice's next report
        _wait_for_value(lambda: _record(admin, owner, key, "a"), "h:" + hold.token)
    other = _other(owner, redis_url, kind)
    assert other.settle("a", [key], 700, row=LedgerRow(budget="b", call_id="a", keys=(key,))).applied
    # The call's lease ends in the owner (it never settles there): its expiry charges nothing more.
    _wait_for_value(lambda: owner.slice_holdings(), {})
    assert other.read([key]) == [CounterState(700, 0)]
    assert [r.call_id for r in other.read_ledger("b")] == ["a"]
    owner.settle("a", [key], 900)  # a late settle here too: the report finds the call settled
    owner.close()
    assert other.read([key]) == [CounterState(700, 0)]
    assert [r.call_id for r in other.read_ledger("b")] == ["a"]
    other.close()


def _wait_for_value(get, want, timeout: float = 20.0) -> None:
    until = time.monotonic() + timeout
    while (got := get()) != want:
        assert time.monotonic() < until, f"timed out: {got!r} != {want!r}"
        time.sleep(0.01)


@pytest.mark.redis
def test_a_settle_from_another_store_after_the_owner_charged_expiry_replaces_it(
        redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    owner = _sliced(redis_url)
    key = "{foreign-late}:b:global"
    assert owner.reserve([Counter(key, 10**6)], Hold("a", 1000, 0.3, charge_on_expiry=400)).ok
    _wait_for_value(lambda: owner.slice_holdings(), {})  # its lease ended here: 400 charged, reported
    other = _other(owner, redis_url, "plain")
    assert other.read([key]) == [CounterState(400, 0)]
    assert other.settle("a", [key], 250).applied  # replaces the expiry charge, as a reaped hold's
    assert other.read([key]) == [CounterState(250, 0)]
    assert owner.settle("a", [key], 900).applied  # the owner's own late settle: settled already
    _wait_for_value(lambda: owner.slice_holdings(), {})
    assert other.read([key]) == [CounterState(250, 0)]
    owner.close()
    other.close()


@pytest.mark.redis
def test_a_call_settled_by_its_owner_and_by_another_store_is_charged_once(
        redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    owner = _sliced(redis_url)
    other = _other(owner, redis_url, "plain")
    first, second = "{both-owner-first}:b:global", "{both-other-first}:b:global"
    for call_id, key in (("a", first), ("b", second)):
        assert owner.reserve([Counter(key, 10**6)], Hold(call_id, 1000, 30)).ok
    assert owner.settle("a", [first], 700, row=LedgerRow(budget="b", call_id="a", keys=(first,))).applied
    _wait_for_value(lambda: _record(admin, owner, first, "a"), "s")  # reported: the call is settled in Redis
    assert not other.settle("a", [first], 500, row=LedgerRow(budget="b", call_id="a", keys=(first,))).applied
    assert other.settle("b", [second], 500, row=LedgerRow(budget="c", call_id="b", keys=(second,))).applied
    assert owner.settle("b", [second], 700, row=LedgerRow(budget="c", call_id="b", keys=(second,))).applied
    owner.close()  # reports the owner's settle of the second: settled already, charged nothing
    assert other.read([first, second]) == [CounterState(700, 0), CounterState(500, 0)]
    assert [r.cost_nano for r in other.read_ledger("b")] == [700]
    assert [r.cost_nano for r in other.read_ledger("c")] == [500]
    other.close()


@pytest.mark.redis
def test_the_longest_call_ids_are_recorded_by_a_slice_report(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    owner = _sliced(redis_url)
    key = "{long-ids}:b:global"
    call_id = "é" * 512  # the longest call id: 1024 bytes
    hold = Hold(call_id, 1000, 30)
    assert owner.reserve([Counter(key, 10**6)], hold).ok
    _wait_for_value(lambda: _record(admin, owner, key, call_id), "h:" + hold.token)
    assert owner.settle(call_id, [key], 600).applied
    owner.close()
    assert _record(admin, owner, key, call_id) == "s"
    assert owner.read([key]) == [CounterState(600, 0)]
