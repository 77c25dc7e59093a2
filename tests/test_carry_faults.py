"""RedisStore(carry_settles=True) under faults: interrupted and cancelled calls, event loops that
end, settles above their hold, double settles, exit and close while a flush is in flight.

Each scenario checks what Redis ends up holding: every settle charged once, at its own amount,
its ledger row written; nothing lost with the exception that interrupted it.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from langchain_budgetguard.stores.base import Counter, CounterState, Hold
from langchain_budgetguard.stores.ledger import LedgerRow
from langchain_budgetguard.stores.redis import RedisStore

from .redis_support import fresh_prefix, redis_url, wait_until  # noqa: F401 - fixtures
from .test_store_carry import FAST, LONG, key_of, stored

pytestmark = pytest.mark.redis


class Interrupted(BaseException):
    """What a signal handler or KeyboardInterrupt raises in the middle of a call."""


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


def carrying(url: str, **options: Any) -> RedisStore:
    return RedisStore(url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=LONG, **options)


def row(call_id: str, key: str) -> LedgerRow:
    return LedgerRow(budget="b", call_id=call_id, keys=(key,))


# -- 1. interrupted and cancelled calls that carry settles -----------------------------------------


def test_an_interrupted_carrying_reserve_journals_its_settles(redis_url: str, admin: redis.Redis,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = carrying(redis_url)
    key = key_of()
    try:
        assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
        assert store.settle("a", [key], 30, row=row("a", key)).pending

        def interrupted(call: Any, policy: Any) -> Any:
            raise Interrupted  # before the carry script reaches Redis

        monkeypatch.setattr(store, "_execute", interrupted)
        with pytest.raises(Interrupted):
            store.reserve([Counter(key, 1000)], Hold("b", 100, 30))
        monkeypatch.undo()
        assert [e.call_id for e in store.pending_journal] == ["a"]  # not lost with the interruption
        assert store.flush_journal() == 1
        assert stored(admin, store, key) == CounterState(30, 0)
        assert [r.call_id for r in store.read_ledger("b")] == ["a"]
    finally:
        store.close()


def test_a_carried_settle_redis_applied_before_the_interruption_is_charged_once(
        redis_url: str, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    store = carrying(redis_url)
    key = key_of()
    real = store._execute  # noqa: SLF001
    try:
        assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
        assert store.settle("a", [key], 30, row=row("a", key)).pending

        def applied_then_interrupted(call: Any, policy: Any) -> Any:
            real(call, policy)
            raise Interrupted  # the reply never reaches the caller

        monkeypatch.setattr(store, "_execute", applied_then_interrupted)
        second = Hold("b", 100, 30)
        with pytest.raises(Interrupted):
            store.reserve([Counter(key, 1000)], second)
        monkeypatch.undo()
        assert store.flush_journal() == 1  # resent: settled before, changes nothing
        store.release("b", [key], second)
        assert stored(admin, store, key) == CounterState(30, 0)
        assert [r.call_id for r in store.read_ledger("b")] == ["a"]
    finally:
        store.close()


def _slow_carry(store: RedisStore, monkeypatch: pytest.MonkeyPatch, script: str = "carry") -> None:
    real = store._aexecute  # noqa: SLF001

    async def slow(call: Any, policy: Any) -> Any:
        if call.script == script:
            await asyncio.sleep(30)
        return await real(call, policy)

    monkeypatch.setattr(store, "_aexecute", slow)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_cancelled_carrying_areserve_journals_its_settles(redis_url: str, admin: redis.Redis,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = carrying(redis_url)
    key = key_of()
    try:
        assert (await store.areserve([Counter(key, 1000)], Hold("a", 100, 30))).ok
        assert (await store.asettle("a", [key], 30, row=row("a", key))).pending
        _slow_carry(store, monkeypatch)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.areserve([Counter(key, 1000)], Hold("b", 100, 30)), 0.2)
        monkeypatch.undo()
        assert [e.call_id for e in store.pending_journal] == ["a"]
        assert await store.aflush_journal() == 1
        assert stored(admin, store, key) == CounterState(30, 0)
        assert [r.call_id for r in store.read_ledger("b")] == ["a"]
    finally:
        await store.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_cancelled_aflush_carried_journals_what_it_took(redis_url: str, admin: redis.Redis,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = carrying(redis_url)
    keys = [key_of(), key_of()]  # two tags: two script calls, the second never started
    try:
        for n, key in enumerate(keys):
            assert (await store.areserve([Counter(key, 1000)], Hold(f"a{n}", 100, 30))).ok
            assert (await store.asettle(f"a{n}", [key], 30 + n, row=row(f"a{n}", key))).pending
        _slow_carry(store, monkeypatch)
        task = asyncio.ensure_future(store.aflush_carried())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.undo()
        assert sorted(e.call_id for e in store.pending_journal) == ["a0", "a1"]
        assert await store.aflush_journal() == 2
        assert [stored(admin, store, k) for k in keys] == [CounterState(30, 0), CounterState(31, 0)]
    finally:
        await store.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_reserve_cancelled_during_a_slice_refill_frees_the_slice(redis_url: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=True, slice_lease_seconds=1.0)
    store._book.hot_hits = 1  # noqa: SLF001 - a slice from the first reserve
    key = "{" + key_of()[1:9] + "}:b:global"
    try:
        assert (await store.areserve([Counter(key, 10**9)], Hold("a", 10**6, 30))).ok
        await store.asettle("a", [key], 10**6)
        _slow_carry(store, monkeypatch, script="slice")
        # The error is kept (as a log record or an error list would): its traceback keeps the plan.
        with pytest.raises(asyncio.TimeoutError) as kept:  # does not fit the slice's free part: a refill
            await asyncio.wait_for(store.areserve([Counter(key, 10**9)], Hold("b", 49_500_000, 30)), 0.2)
        monkeypatch.undo()
        assert not store._book.slices[key].busy  # noqa: SLF001 - the timer may report and renew it
        other = RedisStore(redis_url, prefix=store.prefix)
        # The timer reports the settle (or returns the idle slice): only what was spent is spent.
        wait_until(lambda: other.read([key])[0].spent == 10**6,
                   timeout=20, what="the slice reported")
        await asyncio.sleep(1.5)  # past the slice's lease: nothing was reaped as spent
        assert other.read([key])[0].spent == 10**6
        assert kept.value is not None
        other.close()
    finally:
        await store.aclose()


# -- 2, 7. asyncio settles whose event loop ends ---------------------------------------------------


def test_a_settle_queued_by_a_loop_that_ends_at_once_still_lands(redis_url: str, admin: redis.Redis) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True)  # the default 3 ms window
    key = key_of()

    async def job() -> None:  # the usual script: asyncio.run(guard.ainvoke(...)) ends the loop at once
        assert (await store.areserve([Counter(key, 1000)], Hold("a", 100, 30))).ok
        assert (await store.asettle("a", [key], 30, row=row("a", key))).pending

    try:
        asyncio.run(job())
        wait_until(lambda: stored(admin, store, key) == CounterState(30, 0), timeout=10, what="the settle sent")
        assert [r.call_id for r in store.read_ledger("b")] == ["a"]
    finally:
        store.close()


def test_a_store_given_only_an_asyncio_client_sends_each_settle_at_once(redis_url: str, admin: redis.Redis) -> None:
    prefix = fresh_prefix()
    key = key_of()

    async def job() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        store = RedisStore(client, prefix=prefix, carry_settles=True)
        assert store.carry_settles is False  # nothing would send a queued settle once the loop ends
        assert (await store.areserve([Counter(key, 1000)], Hold("a", 100, 30))).ok
        result = await store.asettle("a", [key], 30)
        assert (result.applied, result.pending) == (True, False)
        assert stored(admin, store, key) == CounterState(30, 0)
        await store.aclose()
        await client.aclose()

    asyncio.run(job())


def test_a_dropped_store_whose_async_settles_landed_is_freed(redis_url: str, admin: redis.Redis) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=0.005)
    key = key_of()

    async def job() -> None:
        assert (await store.areserve([Counter(key, 1000)], Hold("a", 100, 30))).ok
        assert (await store.asettle("a", [key], 30)).pending

    asyncio.run(job())
    wait_until(lambda: stored(admin, store, key) == CounterState(30, 0), timeout=10, what="the settle sent")
    ref = weakref.ref(store)
    del store
    wait_until(lambda: gc.collect() >= 0 and ref() is None, timeout=10, what="the store freed")


# -- 3. a settle above its hold --------------------------------------------------------------------


def test_a_settle_above_what_its_hold_charges_on_expiry_is_sent_at_once(redis_url: str, admin: redis.Redis) -> None:
    store = carrying(redis_url)
    key, other = key_of(), key_of()
    try:
        assert store.reserve([Counter(key, 10_000)], Hold("a", 100, 30, charge_on_expiry=100)).ok
        # A process killed with it queued would leave only the hold's 100 charged on expiry.
        result = store.settle("a", [key], 500)
        assert (result.applied, result.pending, result.charged) == (True, False, 500)
        assert stored(admin, store, key) == CounterState(500, 0)
        assert store.reserve([Counter(other, 10_000)], Hold("b", 100, 30, charge_on_expiry=0)).ok
        assert store.settle("b", [other], 100).pending  # up to the full reservation: still carried
        assert store.reserve([Counter(key, 10_000)], Hold("d", 10, 30)).ok
        assert store.settle("d", [key], 10, amounts=[11]).pending is False  # per-key amounts count too
    finally:
        store.close()


# -- 4. a call settled twice -----------------------------------------------------------------------


@pytest.mark.parametrize("carry", [False, True])
def test_the_first_settle_of_a_call_wins_with_or_without_carrying(redis_url: str, admin: redis.Redis,
                                                                  carry: bool) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=carry, carry_window_seconds=LONG)
    key = key_of()
    try:
        assert store.reserve([Counter(key, 10_000)], Hold("a", 100, 30)).ok
        store.settle("a", [key], 30, row=row("a", key))
        late = store.settle("a", [key], 80, row=row("a", key))  # a duplicate, late settle
        assert late.applied is False
        assert stored(admin, store, key) == CounterState(30, 0)
        assert [r.call_id for r in store.read_ledger("b")] == ["a"]  # one row, the first settle's
    finally:
        store.close()


# -- 5, 6. exit and close while the timer's flush is in flight; settles racing close ---------------


def _slow_timer_flush(store: RedisStore, seconds: float) -> threading.Event:
    """The carry script calls of ``store`` take ``seconds`` longer (a slow network); the event is
    set when one starts."""
    real, started = store._execute, threading.Event()  # noqa: SLF001

    def slow(call: Any, policy: Any) -> Any:
        if call.script == "carry":
            started.set()
            time.sleep(seconds)
        return real(call, policy)

    store._execute = slow  # type: ignore[method-assign]  # noqa: SLF001
    return started


def test_close_waits_for_the_timer_flush_in_flight(redis_url: str, admin: redis.Redis) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=0.005)
    key = key_of()
    assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
    started = _slow_timer_flush(store, 0.5)
    assert store.settle("a", [key], 30, row=row("a", key)).pending
    assert started.wait(10)  # the timer thread took it and waits for Redis
    store.close()
    assert stored(admin, store, key) == CounterState(30, 0)  # landed before close returned
    assert not store.pending_journal


def test_a_settle_the_closing_queue_refuses_is_sent_at_once(redis_url: str, admin: redis.Redis) -> None:
    store = carrying(redis_url)
    key = key_of()
    try:
        assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
        store._carry.close()  # noqa: SLF001 - close() has begun: its queue takes nothing more
        result = store.settle("a", [key], 30)
        assert (result.applied, result.pending) == (True, False)
        assert stored(admin, store, key) == CounterState(30, 0)
    finally:
        store.close()


EXIT_WORKER = textwrap.dedent("""
    import sys, time
    from langchain_budgetguard.stores.base import Counter, Hold
    from langchain_budgetguard.stores.ledger import LedgerRow
    from langchain_budgetguard.stores.redis import RedisStore
    url, prefix, key = sys.argv[1:4]
    store = RedisStore(url, prefix=prefix, carry_settles=True, carry_window_seconds=0.005)
    assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
    real = store._execute
    def slow(call, policy):  # a slow network under the timer's flush
        if call.script == "carry":
            print("flushing", flush=True)
            time.sleep(1.0)
        return real(call, policy)
    store._execute = slow
    store.settle("a", [key], 30, row=LedgerRow(budget="b", call_id="a", keys=(key,)))
    time.sleep(0.3)  # the timer thread takes the settle and waits for Redis: the process exits
""")


def test_a_normal_exit_waits_for_the_timer_flush_in_flight(redis_url: str, admin: redis.Redis) -> None:
    prefix, key = fresh_prefix(), key_of()
    done = subprocess.run([sys.executable, "-c", EXIT_WORKER, redis_url, prefix, key],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "flushing" in done.stdout  # the exit came while the timer's flush was in flight
    with RedisStore(redis_url, prefix=prefix) as other:
        assert stored(admin, other, key) == CounterState(30, 0)
        assert [r.call_id for r in other.read_ledger("b")] == ["a"]


# -- 8. one bad key in a carried batch ---------------------------------------------------------------


def test_one_wrongtype_key_fails_only_its_own_settle(redis_url: str, admin: redis.Redis) -> None:
    store = carrying(redis_url, retry=FAST)
    tag = key_of()[1:9]
    keys = {who: key_of(tag, who) for who in "abcd"}
    try:
        for who in "abc":
            assert store.reserve([Counter(keys[who], 10_000)], Hold(who, 100, 30)).ok
        admin.set(store.redis_keys(keys["b"])[1], "junk")  # b's lease set clobbered by someone else
        for who in "abc":
            assert store.settle(who, [keys[who]], 30).pending  # all three queued on one tag
        assert store.reserve([Counter(keys["d"], 10_000)], Hold("d", 100, 30)).ok  # carries them
        assert [e.call_id for e in store.pending_journal] == ["b"]  # only the settle at fault
        assert [stored(admin, store, keys[w]) for w in "acd"] == [CounterState(30, 0)] * 2 + [CounterState(0, 100)]
    finally:
        for entry in store.pending_journal:
            store.journal.done(entry)
        store.close()


def test_a_journal_replay_passes_over_an_entry_redis_refuses(redis_url: str, admin: redis.Redis) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), retry=FAST)
    bad, good = key_of(), key_of()
    try:
        assert store.reserve([Counter(bad, 10_000)], Hold("b", 100, 30)).ok
        assert store.reserve([Counter(good, 10_000)], Hold("c", 100, 30)).ok
        admin.set(store.redis_keys(bad)[1], "junk")
        store.journal.append("b", [bad], 30)  # journaled first, never applicable
        store.journal.append("c", [good], 30)
        assert store.flush_journal() == 1
        assert [e.call_id for e in store.pending_journal] == ["b"]
        assert stored(admin, store, good) == CounterState(30, 0)
    finally:
        for entry in store.pending_journal:
            store.journal.done(entry)
        store.close()


def test_settles_racing_close_all_land(redis_url: str, admin: redis.Redis) -> None:
    """A stress of the race (no timing asserted): settles from a thread while close() runs."""
    prefix = fresh_prefix()
    deadline = time.monotonic() + 3
    trials = 0
    while time.monotonic() < deadline or trials < 5:
        trials += 1
        key = key_of()
        store = RedisStore(redis_url, prefix=prefix, carry_settles=True, carry_window_seconds=LONG)
        ids = [f"c{trials}-{i}" for i in range(20)]
        for call_id in ids:
            assert store.reserve([Counter(key, 10**6)], Hold(call_id, 100, 30)).ok
        errors: list[BaseException] = []

        def settle_all(s: RedisStore = store, calls: list[str] = ids, k: str = key) -> None:
            for call_id in calls:
                try:
                    s.settle(call_id, [k], 10)
                except Exception as exc:  # noqa: BLE001 - collected: none may escape
                    errors.append(exc)

        thread = threading.Thread(target=settle_all)
        thread.start()
        time.sleep(0.0002 * (trials % 10))
        store.close()
        thread.join(30)
        assert not errors and not len(store._carry)  # noqa: SLF001
        store.flush_journal()
        assert stored(admin, store, key) == CounterState(10 * len(ids), 0), trials
        store.close()


def test_a_read_sees_a_settle_the_timer_is_sending(redis_url: str, admin: redis.Redis) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=0.005)
    key = key_of()
    try:
        assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
        started = _slow_timer_flush(store, 0.5)
        assert store.settle("a", [key], 30).pending
        assert started.wait(10)
        assert store.read([key])[0] == CounterState(30, 0)  # waited for the timer's flush
    finally:
        store.close()


# -- 7. a client that close() / aclose() closed under a call ---------------------------------------

# What redis-py raises from a connection torn down under a read (its reader gone: redis-py #2349;
# an asyncio transport closed under a write raises TypeError or AttributeError: redis-py #4287).
TORN_DOWN = AttributeError("'NoneType' object has no attribute 'feed'")


def test_a_call_whose_client_close_closed_under_it_is_retried(redis_url: str, admin: redis.Redis) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix())
    key = key_of()
    assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
    backend = store._sync  # noqa: SLF001

    def torn_down(keys: Any = (), args: Any = ()) -> Any:
        store.close()  # (from another thread, in life) closes this client under the call
        raise TORN_DOWN

    backend.scripts["settle"] = torn_down
    result = store.settle("a", [key], 30, row=row("a", key))
    assert (result.applied, result.pending) == (True, False)  # sent again on a new client
    assert stored(admin, store, key) == CounterState(30, 0)
    store.close()


async def test_an_async_call_whose_client_aclose_closed_under_it_is_retried(redis_url: str,
                                                                          admin: redis.Redis) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix())
    key = key_of()
    assert (await store.areserve([Counter(key, 1000)], Hold("a", 100, 30))).ok
    backend = store._async_backend()  # noqa: SLF001
    started, closed = asyncio.Event(), asyncio.Event()

    async def torn_down(keys: Any = (), args: Any = ()) -> Any:
        started.set()
        await closed.wait()  # aclose() closes this client meanwhile
        raise TORN_DOWN

    backend.scripts["settle"] = torn_down
    settling = asyncio.ensure_future(store.asettle("a", [key], 30, row=row("a", key)))
    await started.wait()
    await store.aclose()
    closed.set()
    result = await settling  # not the AttributeError: sent again on a new client
    assert (result.applied, result.pending) == (True, False)
    assert stored(admin, store, key) == CounterState(30, 0)
    assert not store.pending_journal
    await store.aclose()  # (the client the retry made)


async def test_an_error_of_a_live_async_client_is_not_retried(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix())
    key = key_of()
    assert (await store.areserve([Counter(key, 1000)], Hold("a", 100, 30))).ok
    calls = []

    async def broken(keys: Any = (), args: Any = ()) -> Any:
        calls.append(1)
        raise TORN_DOWN

    store._async_backend().scripts["settle"] = broken  # noqa: SLF001
    with pytest.raises(AttributeError):  # a bug, not a closed client: raised as it is
        await store.asettle("a", [key], 30)
    assert len(calls) == 1
    await store.aclose()
