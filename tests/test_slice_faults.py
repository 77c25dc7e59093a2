"""Leased slices under faults: options from a URL, close during a report, dropped stores,
forked children, lost replies past the lease, late settles and releases, status."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator

import pytest
import redis

import langchain_budgetguard.stores.slices as slices
from langchain_budgetguard.stores.base import Counter, CounterState, Hold
from langchain_budgetguard.stores.ledger import LedgerRow
from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

from .redis_support import ReplyDroppingProxy, admin, fresh_prefix, redis_url  # noqa: F401 - fixtures


def _sliced(redis_url: str, **options) -> RedisStore:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=True, **options)
    store._book.hot_hits = 1
    return store


def _counter(admin: redis.Redis, store: RedisStore, key: str) -> dict[str, int]:  # noqa: F811
    """spent, held and sliced of ``key`` straight from Redis."""
    fields = admin.hgetall(store.redis_keys(key)[0])
    return {f: int(fields.get(f, 0)) for f in ("s", "h", "g")}


@pytest.mark.redis
def test_a_url_turns_slices_on_and_sets_their_lease(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    store = RedisStore(redis_url + "?lease_slices=1&slice_lease_seconds=5", prefix=fresh_prefix())
    try:
        assert store.lease_slices and store._book.lease_seconds == 5.0
        store._book.hot_hits = 1
        key = "{url}:b:global"
        assert store.reserve([Counter(key, 10**9)], Hold("u1", 100, 30)).ok  # no TypeError from redis-py
        assert store.slice_holdings()[key][0] > 0
        assert store.settle("u1", [key], 80).applied
    finally:
        store.close()
    assert _counter(admin, store, key) == {"s": 80, "h": 0, "g": 0}
    with pytest.raises(ValueError, match="slice_lease_seconds"):
        RedisStore(redis_url + "?lease_slices=1&slice_lease_seconds=soon")
    with pytest.raises(ValueError, match="lease_slices"):
        RedisStore(redis_url + "?lease_slices=maybe")


def _slow_timer_reports(store: RedisStore, seconds: float) -> None:
    """The store's timer thread waits ``seconds`` before each slice report it sends."""
    real = store._execute

    def slow(call, policy):
        if call.script == "slice" and threading.current_thread().name == "budgetguard-slices":
            time.sleep(seconds)
        return real(call, policy)

    store._execute = slow


def _wait_for(condition, timeout: float = 20.0) -> None:
    until = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < until, "timed out"
        time.sleep(0.002)


@pytest.mark.redis
def test_close_returns_a_slice_whose_report_is_in_flight(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    store = _sliced(redis_url)
    _slow_timer_reports(store, 0.3)
    key = "{closing}:b:global"
    assert store.reserve([Counter(key, 10**9)], Hold("a", 1000, 30, charge_on_expiry=1000)).ok
    assert store.settle("a", [key], 700).applied
    _wait_for(lambda: store._book.reporting([key]))  # the timer reports the settle
    store.close()
    assert _counter(admin, store, key) == {"s": 700, "h": 0, "g": 0}
    assert store.slice_holdings() == {}


@pytest.mark.redis
async def test_aclose_returns_a_slice_whose_report_is_in_flight(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    store = _sliced(redis_url)
    _slow_timer_reports(store, 0.3)
    key = "{aclosing}:b:global"
    assert (await store.areserve([Counter(key, 10**9)], Hold("a", 1000, 30, charge_on_expiry=1000))).ok
    assert (await store.asettle("a", [key], 700)).applied
    while not store._book.reporting([key]):
        await asyncio.sleep(0.002)
    await store.aclose()
    assert _counter(admin, store, key) == {"s": 700, "h": 0, "g": 0}


@pytest.mark.redis
def test_a_store_dropped_without_close_reports_its_settles_and_returns_its_slice(
        redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    key = "{dropped}:b:global"
    prefix = fresh_prefix()

    def per_request() -> tuple[str, weakref.ref]:
        store = RedisStore(redis_url, prefix=prefix, lease_slices=True)
        store._book.hot_hits = 1
        for i in range(3):
            assert store.reserve([Counter(key, 10**9)], Hold(f"r{i}", 1000, 30, charge_on_expiry=1000)).ok
            assert store.settle(f"r{i}", [key], 600, row=LedgerRow(budget="b", call_id=f"r{i}", keys=(key,))).applied
        return store.redis_keys(key)[0], weakref.ref(store)

    counter, ref = per_request()
    gc.collect()

    def reported_and_returned() -> bool:
        fields = admin.hgetall(counter)
        return fields.get("s") == "1800" and "g" not in fields

    _wait_for(reported_and_returned)  # by its timer: within REPORT_SECONDS, returned after IDLE_SECONDS
    _wait_for(lambda: gc.collect() is not None and ref() is None)  # then let go of
    reader = RedisStore(redis_url, prefix=prefix)
    assert sorted(row.call_id for row in reader.read_ledger("b")) == ["r0", "r1", "r2"]
    reader.close()


MP_PARENT = r"""
import json, sys
from langchain_budgetguard.stores.base import Counter, Hold
from langchain_budgetguard.stores.redis import RedisStore

url, prefix, key = sys.argv[1:]
store = RedisStore(url, prefix=prefix, lease_slices=True)
store._book.hot_hits = 1
import multiprocessing  # (after the store: the store must not depend on it being imported first)

def child():
    for i in range(5):
        assert store.reserve([Counter(key, 10**9)], Hold(f"c{i}", 1000, 30, charge_on_expiry=1000)).ok
        assert store.settle(f"c{i}", [key], 700).applied

if __name__ == "__main__":
    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(60)
    print(json.dumps({"exitcode": p.exitcode}), flush=True)
"""


@pytest.mark.redis
def test_a_multiprocessing_child_returns_its_slice_when_it_ends(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    prefix, key = fresh_prefix(), "{mp}:b:global"
    done = subprocess.run([sys.executable, "-c", MP_PARENT, redis_url, prefix, key], capture_output=True, text=True,
                          timeout=120)
    assert json.loads(done.stdout.splitlines()[-1]) == {"exitcode": 0}, done.stderr
    reader = RedisStore(redis_url, prefix=prefix)
    # Reported and returned when the child ended, not charged whole when its lease ends in 30 s.
    assert _counter(admin, reader, key) == {"s": 3500, "h": 0, "g": 0}
    reader.close()


@pytest.fixture
def proxy(redis_url: str) -> Iterator[ReplyDroppingProxy]:  # noqa: F811
    from urllib.parse import urlparse

    p = ReplyDroppingProxy(urlparse(redis_url).port or 6379)
    yield p
    p.close()


@pytest.mark.redis
def test_a_report_applied_with_its_reply_lost_then_reaped_replaces_the_charge_once(
        redis_url: str, admin: redis.Redis, proxy, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(slices, "REPORT_SECONDS", 0.05)
    store = RedisStore(proxy.url, prefix=fresh_prefix(), lease_slices=True, slice_lease_seconds=1.5,
                       retry=RetryPolicy(attempts=2, deadline_seconds=0.3, first_wait=0.01, max_wait=0.05))
    store._book.hot_hits = 1
    store.flush_slices = lambda final=False: 0  # its timer sends nothing: the test sends the reports
    key = "{reaped}:b:global"
    assert store.reserve([Counter(key, 10**8)], Hold("a", 1000, 30, charge_on_expiry=1000)).ok
    assert store.settle("a", [key], 700).applied
    time.sleep(0.1)
    proxy.drop_script_replies = -1  # the report (keeping the slice's free part) runs, its replies are lost
    assert RedisStore.flush_slices(store) == 0
    assert _counter(admin, store, key)["s"] == 700
    proxy.drop_script_replies, proxy.lost = 0, 0
    other = RedisStore(redis_url, prefix=store.prefix)
    _wait_for(lambda: other.read([key])[0].held == 0)  # the lease ended: the whole slice is charged
    assert other.read([key])[0].spent > 700
    proxy.drop_script_replies = 1  # and the reply to the first resend is lost too: it is sent a third time
    assert RedisStore.flush_slices(store, final=True) >= 1  # the same report again, then the slice's return
    assert proxy.lost == 1
    assert other.read([key]) == [CounterState(700, 0)]
    assert RedisStore.flush_slices(store, final=True) == 0
    assert other.read([key]) == [CounterState(700, 0)]
    counter, leases = store.redis_keys(key)
    assert not [f for f in admin.hkeys(counter) if f[0] in "%!gn"] and not admin.zrange(leases, 0, -1)
    other.close()
    store.close()


@pytest.mark.redis
def test_a_late_settle_after_the_slice_was_returned_is_reported_by_the_timer(
        redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    store = _sliced(redis_url)
    key = "{late-settle}:b:global"
    assert store.reserve([Counter(key, 10**6)], Hold("a", 1000, 0.5, charge_on_expiry=300)).ok
    # Its lease ends here (never renewed): the timer charges 300, reports it, returns the idle slice and stops.
    _wait_for(lambda: store._slice_timer is None and not store.slice_holdings())
    assert _counter(admin, store, key) == {"s": 300, "h": 0, "g": 0}
    assert store.settle("a", [key], 800).applied  # the late settle replaces the expiry charge
    _wait_for(lambda: _counter(admin, store, key)["s"] == 800)  # reported by a timer, not only at close
    _wait_for(lambda: not store.slice_holdings())
    assert _counter(admin, store, key) == {"s": 800, "h": 0, "g": 0}
    store.close()


@pytest.mark.redis
def test_a_release_after_the_lease_ended_refunds_the_expiry_charge_as_without_slices(
        redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    store = _sliced(redis_url)
    hot, cold = "{rel}:b:global", "{rel}:b:user:u1"
    assert store.reserve([Counter(hot, 10**6)], Hold("warm", 10, 30)).ok  # the global counter has a slice
    assert store.settle("warm", [hot], 0).applied
    store._book.hot_hits = 1000  # the user stays cold: the call is split
    hold = Hold("a", 1000, 0.3, charge_on_expiry=400)
    assert store.reserve([Counter(hot, 10**6), Counter(cold, 10**6)], hold).ok
    assert store.slice_holdings()[hot][1] == 1000
    _wait_for(lambda: [s.spent for s in store.read([hot, cold])] == [400, 400])  # expiry charged both parts
    store.release("a", [hot, cold], Hold("a", 1000, 0.3, charge_on_expiry=400, token="other"))  # not its attempt
    assert [s.spent for s in store.read([hot, cold])] == [400, 400]
    store.release("a", [hot, cold], hold)
    assert [s.spent for s in store.read([hot, cold])] == [0, 0]
    store.release("a", [hot, cold], hold)  # once
    assert store.settle("a", [hot, cold], 900).applied is False  # released: a settle changes nothing
    store.close()
    assert _counter(admin, store, hot) == {"s": 0, "h": 0, "g": 0}
    assert _counter(admin, store, cold)["s"] == 0


@pytest.mark.redis
async def test_the_owner_reads_its_own_calls_in_flight_as_held_not_sliced(redis_url: str) -> None:  # noqa: F811
    owner = _sliced(redis_url)
    key = "{own}:b:global"
    assert owner.reserve([Counter(key, 10**9)], Hold("a", 5000, 30)).ok
    assert owner.slice_holdings()[key][1] == 5000  # admitted from its slice
    for state in (owner.read([key])[0], (await owner.aread([key]))[0]):
        assert (state.spent, state.held, state.sliced) == (0, 5000, 0)
    other = RedisStore(redis_url, prefix=owner.prefix)
    (state,) = other.read([key])
    assert (state.held, state.sliced) == (5000, 5000)  # from elsewhere, the owner's slice is a slice
    assert owner.settle("a", [key], 4000).applied
    owner.close()
    assert other.read([key]) == [CounterState(4000, 0)]
    other.close()


DROPPED_AT_EXIT = r"""
import gc, sys
import langchain_budgetguard.stores.slices as slices
from langchain_budgetguard.stores.base import Counter, Hold
from langchain_budgetguard.stores.redis import RedisStore

slices.REPORT_SECONDS = slices.IDLE_SECONDS = 3600.0  # its timer reports nothing: exit must
url, prefix, key = sys.argv[1:]

def per_request():
    store = RedisStore(url, prefix=prefix, lease_slices=True)
    store._book.hot_hits = 1
    for i in range(3):
        assert store.reserve([Counter(key, 10**9)], Hold(f"r{i}", 1000, 30, charge_on_expiry=1000)).ok
        assert store.settle(f"r{i}", [key], 600).applied

per_request()
gc.collect()
"""


@pytest.mark.redis
def test_a_store_dropped_without_close_is_flushed_at_exit(redis_url: str, admin: redis.Redis) -> None:  # noqa: F811
    prefix, key = fresh_prefix(), "{dropped-exit}:b:global"
    done = subprocess.run([sys.executable, "-c", DROPPED_AT_EXIT, redis_url, prefix, key], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reader = RedisStore(redis_url, prefix=prefix)
    assert _counter(admin, reader, key) == {"s": 1800, "h": 0, "g": 0}
    reader.close()


# -- calls still in flight when close() runs ---------------------------------------------------------


def _no_exit_flush(store: RedisStore, monkeypatch) -> None:
    """What only interpreter exit would send does not count: the test reads Redis before exit."""
    from langchain_budgetguard.stores import redis as redis_module

    monkeypatch.setattr(redis_module, "_LIVE_STORES", weakref.WeakSet())


@pytest.mark.redis
def test_a_call_in_flight_at_close_is_reported_when_it_settles(
        redis_url: str, admin: redis.Redis, monkeypatch) -> None:  # noqa: F811
    store = _sliced(redis_url)
    _no_exit_flush(store, monkeypatch)
    key = "{closed-settle}:b:global"
    holds = {c: Hold(c, 1000, 30, charge_on_expiry=1000) for c in "abc"}
    for hold in holds.values():
        assert store.reserve([Counter(key, 10**9)], hold).ok
    assert store.slice_holdings()[key][1] == 3000  # all three admitted from the slice
    store.close()  # returns the slice but for what the three calls hold
    assert _counter(admin, store, key) == {"s": 0, "h": 0, "g": 3000}
    assert store.settle("a", [key], 700, row=LedgerRow(budget="b", call_id="a", keys=(key,))).applied
    assert _counter(admin, store, key) == {"s": 700, "h": 0, "g": 2000}  # reported at once
    store.release("b", [key], holds["b"])
    assert _counter(admin, store, key) == {"s": 700, "h": 0, "g": 1000}
    assert not store.settle("a", [key], 700).applied  # once
    assert store.settle("c", [key], 400).applied
    assert _counter(admin, store, key) == {"s": 1100, "h": 0, "g": 0}
    counter, leases = store.redis_keys(key)
    assert not [f for f in admin.hkeys(counter) if f[0] in "%!gn"] and not admin.zrange(leases, 0, -1)
    assert store.slice_holdings() == {}
    with RedisStore(redis_url, prefix=store.prefix) as reader:
        assert [r.call_id for r in reader.read_ledger("b")] == ["a"]


@pytest.mark.redis
async def test_a_call_in_flight_at_aclose_is_reported_when_it_settles(
        redis_url: str, admin: redis.Redis, monkeypatch) -> None:  # noqa: F811
    store = _sliced(redis_url)
    _no_exit_flush(store, monkeypatch)
    key = "{aclosed-settle}:b:global"
    holds = {c: Hold(c, 1000, 30, charge_on_expiry=1000) for c in "ab"}
    for hold in holds.values():
        assert (await store.areserve([Counter(key, 10**9)], hold)).ok
    assert store.slice_holdings()[key][1] == 2000
    await store.aclose()
    assert _counter(admin, store, key) == {"s": 0, "h": 0, "g": 2000}
    assert (await store.asettle("a", [key], 600)).applied
    assert _counter(admin, store, key) == {"s": 600, "h": 0, "g": 1000}
    await store.arelease("b", [key], holds["b"])
    assert _counter(admin, store, key) == {"s": 600, "h": 0, "g": 0}
    assert store.slice_holdings() == {}


@pytest.mark.redis
def test_a_settle_racing_close_is_reported(redis_url: str, admin: redis.Redis, monkeypatch) -> None:  # noqa: F811
    """A settle made after close's final reports were taken, before close marked the store closed."""
    store = _sliced(redis_url)
    _no_exit_flush(store, monkeypatch)
    key = "{racing-close}:b:global"
    assert store.reserve([Counter(key, 10**9)], Hold("a", 1000, 30, charge_on_expiry=1000)).ok
    real = store._close_sync

    def settle_then_close() -> None:  # close's final flush is done; the store is not closed yet
        assert store.settle("a", [key], 300).applied
        real()

    store._close_sync = settle_then_close
    store.close()
    _wait_for(lambda: _counter(admin, store, key) == {"s": 300, "h": 0, "g": 0}, timeout=5)


@pytest.mark.redis
def test_a_call_in_flight_at_close_that_renews_keeps_its_slice_alive(
        redis_url: str, admin: redis.Redis, monkeypatch) -> None:  # noqa: F811
    store = _sliced(redis_url, slice_lease_seconds=1.0)
    _no_exit_flush(store, monkeypatch)
    key = "{closed-renew}:b:global"
    assert store.reserve([Counter(key, 10**9)], Hold("a", 1000, 30, charge_on_expiry=1000)).ok
    store.close()
    for _ in range(4):  # 1.6 s: past the slice's lease, were it not renewed
        time.sleep(0.4)
        assert store.renew("a", [key], 30)
    assert _counter(admin, store, key) == {"s": 0, "h": 0, "g": 1000}  # not reaped (and charged) by Redis
    assert store.settle("a", [key], 250).applied
    assert _counter(admin, store, key) == {"s": 250, "h": 0, "g": 0}
