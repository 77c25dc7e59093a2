"""RedisStore(carry_settles=True): settles carried by the next reserve on the same tag.

A carried settle costs no round trip: it goes with the next reserve of the process on its hash
tag (one script call), or on its own after the carry window, on read(), close() and at exit.
Every scenario checks what Redis holds: each settle charged once, its ledger row written once,
money held until the settle lands, never spent above the limit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from langchain_budgetguard.stores.base import Counter, CounterState, Hold
from langchain_budgetguard.stores.ledger import LedgerRow
from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

from .redis_support import (  # noqa: F401 - fixtures
    RedisServer,
    ReplyDroppingProxy,
    fresh_prefix,
    redis_url,
    script_calls,
    start_cluster,
    wait_until,
)

pytestmark = pytest.mark.redis
FAST = RetryPolicy(attempts=3, deadline_seconds=0.5, first_wait=0.01, max_wait=0.05)
LONG = 1.0  # a carry window no test outlives by accident: only what the test does flushes


def key_of(tag: str | None = None, who: str = "alice") -> str:
    return "{" + (tag or uuid.uuid4().hex[:8]) + "}:b:user:" + who + ":day:2026-12-01"


def cid() -> str:
    return uuid.uuid4().hex


def stored(admin: redis.Redis, store: RedisStore, key: str) -> CounterState:
    """What Redis holds, read without the store (a store's read flushes its queue)."""
    spent, held = admin.hmget(store.redis_keys(key)[0], "s", "h")
    return CounterState(int(spent or 0), int(held or 0))


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    s = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=LONG)
    try:
        yield s
    finally:
        s.close()


# -- options -------------------------------------------------------------------------------------


def test_carrying_is_off_by_default_and_set_by_url_or_argument(redis_url: str) -> None:
    assert RedisStore(redis_url, prefix=fresh_prefix()).carry_settles is False
    on = RedisStore(redis_url + "?carry_settles=1&carry_window_seconds=0.002", prefix=fresh_prefix())
    assert (on.carry_settles, on.carry_window_seconds) == (True, 0.002)
    assert RedisStore(redis_url + "?carry_settles=off", prefix=fresh_prefix()).carry_settles is False
    with pytest.raises(ValueError, match="carry_settles in the URL"):
        RedisStore(redis_url + "?carry_settles=maybe")
    with pytest.raises(ValueError, match="carry_window_seconds must be seconds in"):
        RedisStore(redis_url, carry_settles=True, carry_window_seconds=5)
    with pytest.raises(ValueError, match="carry_settles must be True or False"):
        RedisStore(redis_url, carry_settles="yes")


def test_without_carrying_a_settle_is_its_own_round_trip(redis_url: str, admin: redis.Redis,
                                                         script_calls: list) -> None:
    with RedisStore(redis_url, prefix=fresh_prefix()) as store:
        key = key_of()
        assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
        before = len(script_calls)
        result = store.settle("a", [key], 40)
        assert (result.applied, result.pending) == (True, False)
        assert len(script_calls) == before + 1 and stored(admin, store, key) == CounterState(40, 0)


# -- carried with the next reserve ------------------------------------------------------------------


def test_a_settle_goes_with_the_next_reserve_in_one_script_call(store: RedisStore, admin: redis.Redis,
                                                               script_calls: list) -> None:
    key = key_of()
    row = LedgerRow(budget="b", call_id="a", keys=(key,), model="m")
    assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
    calls = len(script_calls)
    result = store.settle("a", [key], 40, row=row)
    assert (result.applied, result.pending, result.charged) == (False, True, 40)
    assert len(script_calls) == calls  # no round trip
    assert stored(admin, store, key) == CounterState(0, 100)  # still held: never free meanwhile
    second = store.reserve([Counter(key, 1000)], Hold("b", 100, 30))
    assert len(script_calls) == calls + 1  # the settle and the reserve: one script call
    assert second.ok and second.states == (CounterState(40, 100),)  # the reserve saw the settle applied
    assert stored(admin, store, key) == CounterState(40, 100)
    (written,) = store.read_ledger("b")
    assert (written.call_id, written.cost_nano) == ("a", 40)


def test_per_key_amounts_and_many_queued_settles_are_carried_in_order(store: RedisStore, admin: redis.Redis) -> None:
    tag = uuid.uuid4().hex[:8]
    dollars, tokens = key_of(tag), key_of(tag, "tokens")
    counters = [Counter(dollars, 10**6), Counter(tokens, 10**6, amount=50, charge_on_expiry=50)]
    ids = [cid() for _ in range(40)]  # more than one script call carries (32)
    for call_id in ids:
        assert store.reserve(counters, Hold(call_id, 100, 30)).ok
    for n, call_id in enumerate(ids):
        store.settle(call_id, [dollars, tokens], 10, amounts=[10 + n, 7])
    assert store.reserve(counters, Hold(cid(), 100, 30)).ok
    assert len(store._carry) == 8  # 32 went with the reserve; the rest wait  # noqa: SLF001
    assert store.read([dollars, tokens]) == [CounterState(sum(10 + n for n in range(40)), 100),
                                             CounterState(7 * 40, 50)]


def test_a_settle_of_another_tag_is_not_carried_and_the_timer_sends_it(redis_url: str, admin: redis.Redis,
                                                                      script_calls: list) -> None:
    with RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=0.2) as store:
        one, two = key_of(), key_of()
        assert store.reserve([Counter(one, 1000)], Hold("a", 100, 30)).ok
        store.settle("a", [one], 60)
        calls = len(script_calls)
        assert store.reserve([Counter(two, 1000)], Hold("b", 100, 30)).ok
        tag_one = one.split("}")[0] + "}"
        assert not any(tag_one in k for call in script_calls[calls:] for k in call)  # tag two's keys only
        assert stored(admin, store, one) == CounterState(0, 100)
        wait_until(lambda: stored(admin, store, one) == CounterState(60, 0), timeout=2, what="timer flush")
        flushes = [call for call in script_calls[calls:] if any(tag_one in k for k in call)]
        assert len(flushes) == 1  # the timer's flush, on its own


def test_a_settle_spanning_tags_goes_at_once(store: RedisStore, admin: redis.Redis) -> None:
    one, two = key_of(), key_of()
    assert store.reserve([Counter(one, 1000), Counter(two, 1000)], Hold("a", 100, 30)).ok
    result = store.settle("a", [one, two], 30)
    assert (result.applied, result.pending) == (True, False)
    assert [stored(admin, store, k) for k in (one, two)] == [CounterState(30, 0)] * 2


def test_read_and_close_flush_the_queue(redis_url: str, admin: redis.Redis) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=LONG)
    one, two = key_of(), key_of()
    for call_id, key in (("a", one), ("b", two)):
        assert store.reserve([Counter(key, 1000)], Hold(call_id, 100, 30)).ok
    store.settle("a", [one], 10)
    assert store.read([one]) == [CounterState(10, 0)]
    store.settle("b", [two], 20)
    assert stored(admin, store, two) == CounterState(0, 100)
    store.close()
    assert stored(admin, store, two) == CounterState(20, 0)
    after = store.settle("c", [one], 5)  # a closed store settles at once
    assert not after.pending


def test_a_store_dropped_with_settles_queued_still_sends_them(redis_url: str, admin: redis.Redis) -> None:
    import gc

    key = key_of()
    dropped = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=0.005)
    name = dropped.redis_keys(key)[0]
    assert dropped.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
    dropped.settle("a", [key], 30)
    del dropped
    gc.collect()
    wait_until(lambda: admin.hmget(name, "s", "h") == [b"30", b"0"], timeout=5, what="the dropped store's flush")


def test_crossings_of_a_carried_settle_go_to_on_carried_crossed(store: RedisStore) -> None:
    key = key_of()
    seen: list[tuple[str, tuple]] = []
    store.on_carried_crossed = lambda call_id, crossed: seen.append((call_id, crossed))
    assert store.reserve([Counter(key, 1000, alerts=(500,))], Hold("a", 600, 30)).ok
    store.settle("a", [key], 550)
    assert seen == []
    store.read([key])
    ((call_id, (crossing,)),) = seen
    assert (call_id, crossing.key, crossing.threshold, crossing.spent) == ("a", key, 500, 550)


def test_release_sends_the_queued_settle_first_and_renew_says_settled(store: RedisStore, admin: redis.Redis) -> None:
    key = key_of()
    hold = Hold("a", 100, 30)
    assert store.reserve([Counter(key, 1000)], hold).ok
    store.settle("a", [key], 30)
    assert store.renew("a", [key], 30) is False  # settled, though its hold is still in Redis
    assert stored(admin, store, key) == CounterState(0, 100)
    store.release("a", [key], hold)  # a settled call stays settled
    assert stored(admin, store, key) == CounterState(30, 0)


def test_a_hold_this_store_did_not_place_or_whose_lease_may_end_first_is_settled_at_once(
        store: RedisStore, redis_url: str, admin: redis.Redis) -> None:
    key = key_of()
    with RedisStore(redis_url, prefix=store.prefix) as other:
        assert other.reserve([Counter(key, 1000)], Hold("elsewhere", 100, 30)).ok
    assert store.reserve([Counter(key, 1000)], Hold("short", 100, 1.5)).ok  # < 1 s margin + 2 windows
    assert store.reserve([Counter(key, 1000)], Hold("long", 100, 30)).ok
    for call_id in ("elsewhere", "short"):
        result = store.settle(call_id, [key], 10)
        assert (result.applied, result.pending) == (True, False)
    assert store.renew("long", [key], 1.5)  # renewed to a lease too short to wait in the queue
    assert store.settle("long", [key], 10).applied
    assert stored(admin, store, key) == CounterState(30, 0)


def test_a_reset_counts_the_settles_made_before_it(store: RedisStore) -> None:
    key = key_of()
    assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
    store.settle("a", [key], 30)
    assert store.reset_counter(key) == CounterState(30, 0)  # the queued settle landed before the reset
    assert store.read([key]) == [CounterState(0, 0)]


def test_a_forked_child_neither_sends_its_parents_queue_nor_loses_its_own(store: RedisStore,
                                                                          admin: redis.Redis) -> None:
    key, own = key_of(), key_of()
    assert store.reserve([Counter(key, 1000)], Hold("parent", 100, 30)).ok
    assert store.reserve([Counter(own, 1000)], Hold("child", 100, 30)).ok
    store.settle("parent", [key], 30)
    pid = os.fork()
    if pid == 0:  # the child: its own settle goes out by the timer (a thread of its own)
        try:
            store.carry_window_seconds = store._carry.window = 0.005  # noqa: SLF001
            store.settle("child", [own], 20)
            deadline = time.monotonic() + 5
            while stored(admin, store, own) != CounterState(20, 0) and time.monotonic() < deadline:
                time.sleep(0.01)
            os._exit(0 if stored(admin, store, own) == CounterState(20, 0) and len(store._carry) == 0 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert stored(admin, store, key) == CounterState(0, 100)  # the parent's settle is still the parent's
    assert store.read([key]) == [CounterState(30, 0)]


# -- processes: exit and SIGKILL ----------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys
    from langchain_budgetguard.stores.base import Counter, Hold
    from langchain_budgetguard.stores.redis import RedisStore

    url, prefix, key, calls, charge = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    store = RedisStore(url, prefix=prefix, carry_settles=True, carry_window_seconds=0.5)
    for n in range(calls):
        assert store.reserve([Counter(key, 10**6)], Hold(f"c{n}", 100, 2.5, charge_on_expiry=charge)).ok
        assert store.settle(f"c{n}", [key], 10 + n).pending
    print("queued", len(store._carry), flush=True)
    sys.stdin.readline()
    """
)


def start_worker(url: str, prefix: str, key: str, calls: int, charge: int = 100) -> subprocess.Popen[str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-c", WORKER, url, prefix, key, str(calls), str(charge)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline().split()
    assert line[:1] == ["queued"], process.stderr.read() if process.stderr else ""
    assert int(line[1]) >= 1
    return process


def test_the_queue_is_flushed_at_a_normal_exit(redis_url: str, admin: redis.Redis) -> None:
    prefix, key = fresh_prefix(), key_of()
    worker = start_worker(redis_url, prefix, key, 5)
    assert worker.stdin is not None
    worker.stdin.write("exit\n")
    worker.stdin.flush()
    assert worker.wait(timeout=30) == 0
    spent, held = admin.hmget(prefix + key, "s", "h")
    assert (int(spent), int(held)) == (sum(10 + n for n in range(5)), 0)


def _settle_and_leave(url: str, prefix: str, key: str) -> None:
    store = RedisStore(url, prefix=prefix, carry_settles=True, carry_window_seconds=1.0)
    assert store.reserve([Counter(key, 1000)], Hold("mp", 100, 30)).ok
    assert store.settle("mp", [key], 45).pending  # still queued when the child leaves by os._exit


def test_a_multiprocessing_child_flushes_when_it_ends(redis_url: str, admin: redis.Redis) -> None:
    import multiprocessing

    prefix, key = fresh_prefix(), key_of()
    child = multiprocessing.get_context("fork").Process(target=_settle_and_leave, args=(redis_url, prefix, key))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    spent, held = admin.hmget(prefix + key, "s", "h")
    assert (int(spent), int(held)) == (45, 0)


def test_sigkill_with_queued_settles_leaves_expiry_charges_and_no_hold(redis_url: str, admin: redis.Redis) -> None:
    prefix, key = fresh_prefix(), key_of()
    worker = start_worker(redis_url, prefix, key, 5)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    # Each reserve carried the settle before it: 4 settles landed; the last one died in the queue.
    landed = sum(10 + n for n in range(4))
    spent, held = (int(v or 0) for v in admin.hmget(prefix + key, "s", "h"))
    assert (spent, held) == (landed, 100)  # the queued settle's money stayed held
    time.sleep(2.6)  # its lease (2.5 s) ends: the next touch reaps it at its charge_on_expiry
    with RedisStore(redis_url, prefix=prefix) as other:
        (state,) = other.read([key])  # a read reaps expired holds
    assert state == CounterState(landed + 100, 0)  # charged its full reservation, no hold left


def test_a_queued_settle_of_a_dead_process_charges_its_full_reservation(redis_url: str, admin: redis.Redis) -> None:
    """Whatever the hold's own expiry charge (the guard's charge_input: its input estimate), a
    call whose settle was still queued when its process died was served: it costs all it reserved."""
    prefix, key = fresh_prefix(), key_of()
    worker = start_worker(redis_url, prefix, key, 5, charge=10)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    landed = sum(10 + n for n in range(4))
    time.sleep(2.6)
    with RedisStore(redis_url, prefix=prefix) as other:
        (state,) = other.read([key])
    assert state == CounterState(landed + 100, 0)  # not landed + 10


# -- faults ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path_factory.mktemp("carry")).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[ReplyDroppingProxy]:
    p = ReplyDroppingProxy(server.port)
    try:
        yield p
    finally:
        p.close()


def test_a_lost_reply_of_a_carrying_reserve_charges_once(proxy: ReplyDroppingProxy) -> None:
    with RedisStore(proxy.url, prefix=fresh_prefix(), retry=FAST, carry_settles=True,
                    carry_window_seconds=LONG) as store:
        key = key_of()
        store.read([key])  # scripts loaded
        assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
        store.settle("a", [key], 40, row=LedgerRow(budget="b", call_id="a", keys=(key,)))
        proxy.drop_script_replies = 1  # Redis runs the carry script; the reply is lost; the retry repeats it
        assert store.reserve([Counter(key, 1000)], Hold("b", 100, 30)).ok
        assert proxy.lost == 1
        assert store.read([key]) == [CounterState(40, 100)]
        assert [r.call_id for r in store.read_ledger("b")] == ["a"]


def test_a_carried_settle_that_cannot_be_sent_is_journaled_and_replayed_once(proxy: ReplyDroppingProxy) -> None:
    with RedisStore(proxy.url, prefix=fresh_prefix(), retry=FAST, carry_settles=True,
                    carry_window_seconds=LONG) as store:
        key = key_of()
        store.read([key])
        assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
        store.settle("a", [key], 40, row=LedgerRow(budget="b", call_id="a", keys=(key,)))
        proxy.drop_script_replies = -1  # the carry script runs in Redis, every reply is lost
        with pytest.raises(Exception, match="unavailable"):
            store.reserve([Counter(key, 1000)], Hold("b", 100, 30))
        assert [e.call_id for e in store.pending_journal] == ["a"]
        proxy.drop_script_replies = 0
        store.flush_journal()
        assert not store.pending_journal
        assert store.read([key]) == [CounterState(40, 0)]  # once; b's hold was released
        assert [r.call_id for r in store.read_ledger("b")] == ["a"]


def test_the_timer_journals_what_it_cannot_send(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    store = RedisStore(server.url, prefix=fresh_prefix(), retry=FAST, carry_settles=True, carry_window_seconds=0.005)
    key = key_of()
    try:
        assert store.reserve([Counter(key, 1000)], Hold("a", 100, 30)).ok
        server.stop()
        assert store.settle("a", [key], 70).pending
        wait_until(lambda: len(store.pending_journal) == 1, timeout=5, what="journaled by the timer")
        server.start()
        wait_until(lambda: not store.pending_journal, timeout=10, what="replayed")
        assert store.read([key]) == [CounterState(70, 0)]
    finally:
        store.close()
        server.stop()


# -- concurrency: never above the limit -----------------------------------------------------------------


def test_eight_threads_on_one_counter_never_overspend(redis_url: str, admin: redis.Redis) -> None:
    limit, amount = 20_000, 100
    key = key_of()
    store = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=0.003)
    name = store.redis_keys(key)[0]
    charged: list[int] = []
    worst: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            spent, held = admin.hmget(name, "s", "h")
            worst.append(int(spent or 0) + int(held or 0))

    def work(n: int) -> None:
        for i in range(150):
            call_id = f"t{n}-{i}"
            if store.reserve([Counter(key, limit)], Hold(call_id, amount, 30, charge_on_expiry=amount)).ok:
                cost = 60 + (i % 40)
                store.settle(call_id, [key], cost)
                charged.append(cost)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    state = store.read([key])[0]
    store.close()
    assert len(charged) < 8 * 150  # the limit refused some: the test ran at the edge
    assert max(worst) <= limit
    assert state == CounterState(sum(charged), 0)
    assert state.spent > limit - 2 * 8 * amount  # refused only near the limit


# -- Redis Cluster --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    servers = start_cluster(tmp_path_factory.mktemp("carry-cluster"))
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_cluster_carries_only_within_a_tag(cluster: list[RedisServer], script_calls: list) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in cluster)
    with RedisStore(url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=LONG) as store:
        tenants = [key_of(f"t{n}") for n in range(6)]  # tags on different nodes
        for n, key in enumerate(tenants):
            assert store.reserve([Counter(key, 1000)], Hold(f"a{n}", 100, 30)).ok
            store.settle(f"a{n}", [key], 10 + n)
        calls = len(script_calls)
        assert store.reserve([Counter(tenants[0], 1000)], Hold("b", 100, 30)).ok  # carries a0 only
        assert len(script_calls) == calls + 1 and len(store._carry) == 5  # noqa: SLF001
        assert store.read(tenants) == [CounterState(10, 100)] + [CounterState(10 + n, 0) for n in range(1, 6)]
        both = [Counter(tenants[1], 1000), Counter(tenants[2], 1000)]
        assert store.reserve(both, Hold("c", 100, 30)).ok
        assert store.settle("c", [tenants[1], tenants[2]], 5).applied  # two tags: sent at once


# -- async twins -------------------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_async_settle_goes_with_the_next_areserve(redis_url: str, admin: redis.Redis,
                                                       script_calls: list) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=LONG)
    key = key_of()
    assert (await store.areserve([Counter(key, 1000)], Hold("a", 100, 30))).ok
    calls = len(script_calls)
    assert (await store.asettle("a", [key], 40)).pending
    assert len(script_calls) == calls
    second = await store.areserve([Counter(key, 1000)], Hold("b", 100, 30))
    assert len(script_calls) == calls + 1 and second.states == (CounterState(40, 100),)
    await store.asettle("b", [key], 30)
    await store.aclose()
    assert stored(admin, store, key) == CounterState(70, 0)


@pytest.mark.asyncio(loop_scope="session")
async def test_the_timer_flushes_an_async_settle_with_no_follower(redis_url: str, admin: redis.Redis) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix(), carry_settles=True, carry_window_seconds=0.005)
    key = key_of()
    try:
        assert (await store.areserve([Counter(key, 1000)], Hold("a", 100, 30))).ok
        assert (await store.asettle("a", [key], 25)).pending
        for _ in range(200):
            if stored(admin, store, key) == CounterState(25, 0):
                break
            await asyncio.sleep(0.01)
        assert stored(admin, store, key) == CounterState(25, 0)
    finally:
        await store.aclose()

