"""RedisStore under faults, on throwaway redis-servers: lost replies, stalls, command errors.

Each scenario ends with nothing held and spent equal to what callers were charged. Faults are
made for real: a proxy that loses replies after Redis ran the command, DEBUG SLEEP and CLIENT
PAUSE (a stalled server that runs queued commands late), maxmemory, a read-only replica.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from langchain_budgetguard.errors import BudgetStoreUnavailableError
from langchain_budgetguard.stores.base import Counter, CounterState, Hold
from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

from .redis_support import RedisServer, ReplyDroppingProxy, fresh_prefix, wait_until

FAST_FAIL = RetryPolicy(attempts=3, deadline_seconds=0.5, first_wait=0.01, max_wait=0.05)
pytestmark = pytest.mark.redis


def call_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One throwaway server for the module (DEBUG allowed)."""
    s = RedisServer(tmp_path_factory.mktemp("faults"), None, "--enable-debug-command", "yes").start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis(port=server.port) as client:
        yield client


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[ReplyDroppingProxy]:
    p = ReplyDroppingProxy(server.port)
    try:
        yield p
    finally:
        p.close()


def tagged(name: str, tag: str) -> str:
    return "{" + tag + "}:" + name


def two_tags() -> tuple[Counter, Counter]:
    tenant, platform = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    return Counter(tagged("user:alice", tenant), 1_000), Counter(tagged("all", platform), 1_000)


def warm(store: RedisStore) -> None:
    """Load every script once, so that a lost reply is a script's, not a NOSCRIPT's."""
    warm_id = call_id()
    store.reserve([Counter("{warm}:k", 10)], Hold(warm_id, 1, 30))
    store.settle(warm_id, ["{warm}:k"], 0)
    store.release(call_id(), ["{warm}:k"], Hold("x", 1, 30))


def settled_everywhere(store: RedisStore) -> None:
    wait_until(lambda: store.pending_releases == 0 and not store.pending_journal, timeout=10, what="repairs")


# -- lost replies ----------------------------------------------------------------------------------


def test_a_lost_reply_retried_as_duplicate_counts_as_placed(proxy: ReplyDroppingProxy) -> None:
    store = RedisStore(proxy.url, prefix=fresh_prefix(), retry=FAST_FAIL)
    tenant, platform = two_tags()
    keys = [tenant.key, platform.key]
    warm(store)
    store.settle(call_id(), [platform.key], 950)  # the platform counter cannot take the call
    proxy.drop_script_replies = 1  # the tenant step runs, its reply is lost, the retry says duplicate
    result = store.reserve([tenant, platform], Hold(call_id(), 100, 30, charge_on_expiry=100))
    assert proxy.lost == 1
    assert not result.ok and result.blocked == 1
    assert store.read(keys) == [CounterState(0, 0), CounterState(950, 0)]  # no phantom hold on the tenant
    store.close()


def test_a_lost_reply_of_a_placed_call_is_ok_and_counted_once(proxy: ReplyDroppingProxy) -> None:
    store = RedisStore(proxy.url, prefix=fresh_prefix(), retry=FAST_FAIL)
    tenant, platform = two_tags()
    cid = call_id()
    warm(store)
    proxy.drop_script_replies = 1
    assert store.reserve([tenant, platform], Hold(cid, 100, 30)).ok
    proxy.drop_script_replies = 1
    store.settle(cid, [tenant.key, platform.key], 70)  # ran once; its retry finds it settled
    assert proxy.lost == 2
    assert store.read([tenant.key, platform.key]) == [CounterState(70, 0)] * 2
    store.close()


def test_every_reply_lost_releases_before_raising(proxy: ReplyDroppingProxy, admin: redis.Redis) -> None:
    store = RedisStore(proxy.url, prefix=fresh_prefix(), retry=FAST_FAIL)
    tenant, platform = two_tags()
    hold = Hold(call_id(), 100, 30, charge_on_expiry=100)
    warm(store)  # scripts loaded before the proxy starts losing replies
    proxy.drop_script_replies = -1
    with pytest.raises(BudgetStoreUnavailableError):
        store.reserve([tenant, platform], hold)
    assert proxy.lost >= 3
    # The reserve ran in Redis (its replies were lost); so did the release.
    with RedisStore(f"redis://127.0.0.1:{proxy.target_port}/0", prefix=store.prefix) as direct:
        assert direct.read([tenant.key, platform.key]) == [CounterState(0, 0)] * 2
    proxy.drop_script_replies = 0
    settled_everywhere(store)
    assert admin.get(store.record_key(hold.call_id, tenant.key)) == b"r"  # a tombstone
    again = store.reserve([tenant, platform], hold)  # the burnt call id admits nothing
    assert not again.ok and again.reused
    assert store.read([tenant.key, platform.key]) == [CounterState(0, 0)] * 2
    store.close()


def test_step_two_failing_releases_step_one_retried_until_it_lands(proxy: ReplyDroppingProxy) -> None:
    store = RedisStore(proxy.url, prefix=fresh_prefix(), retry=FAST_FAIL)
    tenant, platform = two_tags()
    warm(store)
    proxy.skip_script_replies, proxy.drop_script_replies = 1, -1  # the tenant step answers, then nothing
    with pytest.raises(BudgetStoreUnavailableError):
        store.reserve([tenant, platform], Hold(call_id(), 100, 30, charge_on_expiry=100))
    proxy.drop_script_replies = 0
    settled_everywhere(store)
    assert store.read([tenant.key, platform.key]) == [CounterState(0, 0)] * 2
    store.close()


def test_a_release_that_cannot_reach_redis_is_retried_in_the_background(tmp_path: Path) -> None:
    lonely = RedisServer(tmp_path).start()
    try:
        store = RedisStore(lonely.url, prefix=fresh_prefix(), retry=FAST_FAIL)
        tenant, platform = two_tags()
        warm(store)
        backend = store._sync_backend()  # test-only reach: stop the server between the two steps
        real = backend.scripts["reserve"]
        runs = []

        def reserve_then_die(keys=None, args=None, client=None):
            runs.append(keys)
            if len(runs) == 1:
                reply = real(keys=keys, args=args)
                lonely.stop()
                return reply
            return real(keys=keys, args=args)

        backend.scripts["reserve"] = reserve_then_die
        with pytest.raises(BudgetStoreUnavailableError):
            store.reserve([tenant, platform], Hold(call_id(), 100, 30, charge_on_expiry=100))
        assert store.pending_releases >= 1
        lonely.start()  # no data kept: start with the hold gone anyway; the release still lands
        settled_everywhere(store)
        assert store.pending_releases == 0
        store.close()
    finally:
        lonely.stop()


# -- a stalled server runs queued commands after the client gave up --------------------------------


@pytest.mark.parametrize("stall", ["DEBUG SLEEP", "CLIENT PAUSE"])
def test_a_reserve_that_runs_after_its_client_gave_up_leaves_no_hold(
    server: RedisServer, admin: redis.Redis, stall: str
) -> None:
    store = RedisStore(server.url + "?socket_timeout=0.3", prefix=fresh_prefix(), retry=FAST_FAIL)
    tenant, platform = two_tags()
    keys = [tenant.key, platform.key]
    warm(store)
    hold = Hold(call_id(), 100, 30, charge_on_expiry=100)

    def stall_server() -> None:
        with redis.Redis(port=server.port, socket_timeout=5) as other:
            if stall == "DEBUG SLEEP":
                other.execute_command("DEBUG", "SLEEP", "1.2")
            else:
                other.execute_command("CLIENT", "PAUSE", "1200", "WRITE")

    stalling = threading.Thread(target=stall_server)
    stalling.start()
    time.sleep(0.1)
    with pytest.raises(BudgetStoreUnavailableError):
        store.reserve([tenant, platform], hold)
    stalling.join()
    settled_everywhere(store)
    time.sleep(0.3)  # every queued command has run by now
    assert store.read(keys) == [CounterState(0, 0)] * 2
    with redis.Redis(port=server.port) as check:
        assert check.get(store.record_key(hold.call_id, tenant.key)) == b"r"
    store.close()


def test_a_reserve_interrupted_during_its_second_step_leaves_no_hold(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KeyboardInterrupt (or a signal handler's timeout) while step 2 is in flight, after Redis
    ran it: both tags' holds are released, tombstoned, in the background."""
    store = RedisStore(server.url, prefix=fresh_prefix(), retry=FAST_FAIL)
    tenant, platform = two_tags()
    keys = [tenant.key, platform.key]
    warm(store)
    real = store._attempt

    def interrupted(call):  # type: ignore[no-untyped-def]
        reply = real(call)
        if call.script == "reserve" and any(platform.key in k for k in call.keys):
            raise KeyboardInterrupt
        return reply

    monkeypatch.setattr(store, "_attempt", interrupted)
    hold = Hold(call_id(), 100, 30, charge_on_expiry=100)
    with pytest.raises(KeyboardInterrupt):
        store.reserve([tenant, platform], hold)
    monkeypatch.setattr(store, "_attempt", real)
    settled_everywhere(store)
    assert store.read(keys) == [CounterState(0, 0)] * 2
    with redis.Redis(port=server.port) as check:
        for key in keys:
            assert check.get(store.record_key(hold.call_id, key)) == b"r"
    store.close()


# -- command errors ----------------------------------------------------------------------------


def test_out_of_memory_is_unavailable_and_nothing_is_lost(server: RedisServer, admin: redis.Redis) -> None:
    store = RedisStore(server.url, prefix=fresh_prefix(), retry=FAST_FAIL)
    tenant, platform = two_tags()
    keys = [tenant.key, platform.key]
    cid = call_id()
    assert store.reserve([tenant, platform], Hold(cid, 100, 30)).ok
    admin.config_set("maxmemory", "1")  # every write is refused with OOM (noeviction)
    try:
        with pytest.raises(BudgetStoreUnavailableError, match="out of memory") as caught:
            store.reserve([tenant, platform], Hold(call_id(), 100, 30))
        assert not isinstance(caught.value, redis.exceptions.ResponseError)
        result = store.settle(cid, keys, 60)  # the billed call's settle is journaled, not lost
        assert result.pending and result.charged == 60
    finally:
        admin.config_set("maxmemory", "0")
    settled_everywhere(store)
    assert store.read(keys) == [CounterState(60, 0)] * 2
    store.close()


def test_a_read_only_replica_is_unavailable_with_advice(tmp_path: Path, server: RedisServer) -> None:
    replica = RedisServer(tmp_path, None, "--replicaof", "127.0.0.1", str(server.port)).start()
    try:
        store = RedisStore(replica.url, prefix=fresh_prefix(), retry=FAST_FAIL)
        with pytest.raises(BudgetStoreUnavailableError, match="read-only replica"):
            store.reserve([Counter("{ro}:k", 100)], Hold(call_id(), 1, 30))
        store.close()
    finally:
        replica.stop()


@pytest.mark.parametrize(
    "reply, advice",
    [
        ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist", "disk"),
        ("OOM command not allowed when used memory > 'maxmemory'.", "out of memory"),
        ("BUSY Redis is busy running a script.", "running and reachable"),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", "another application"),
    ],
)
def test_command_errors_become_unavailable(server: RedisServer, reply: str, advice: str) -> None:
    store = RedisStore(server.url, prefix=fresh_prefix(), retry=FAST_FAIL)
    store.read(["{e}:k"])
    backend = store._sync_backend()  # test-only reach: the reply Redis would give

    def failing(keys=None, args=None, client=None):
        raise redis.exceptions.ResponseError(reply)

    backend.scripts["reserve"] = failing
    with pytest.raises(BudgetStoreUnavailableError, match=advice):
        store.reserve([Counter("{e}:k", 100)], Hold(call_id(), 1, 30))
    store.close()


# -- evicting policies -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_an_evicting_policy_is_refused_with_what_to_set(tmp_path: Path, policy: str) -> None:
    evicting = RedisServer(tmp_path, None, "--maxmemory", "64mb", "--maxmemory-policy", policy).start()
    try:
        store = RedisStore(evicting.url, prefix=fresh_prefix(), retry=FAST_FAIL)
        with pytest.raises(BudgetStoreUnavailableError, match="maxmemory-policy noeviction"):
            store.reserve([Counter("{ev}:k", 100)], Hold(call_id(), 1, 30))
        with redis.Redis(port=evicting.port) as admin:
            assert admin.dbsize() == 0  # refused before anything was written
        store.close()
    finally:
        evicting.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_an_evicting_policy_may_only_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    evicting = RedisServer(tmp_path, None, "--maxmemory-policy", "allkeys-lru").start()
    try:
        for store in (
            RedisStore(evicting.url, prefix=fresh_prefix(), evicting_policy="warn"),
            RedisStore(evicting.url + "?evicting_policy=warn", prefix=fresh_prefix()),
        ):
            with caplog.at_level(logging.WARNING, logger="langchain_budgetguard.stores.redis"):
                assert store.reserve([Counter("{ev}:k", 100)], Hold(call_id(), 1, 30)).ok
                assert (await store.areserve([Counter("{ev}:k", 100)], Hold(call_id(), 1, 30))).ok
            assert "maxmemory-policy allkeys-lru" in caplog.text
            caplog.clear()
            await store.aclose()
        with pytest.raises(ValueError, match="evicting_policy"):
            RedisStore(evicting.url, evicting_policy="ignore")
    finally:
        evicting.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_the_async_client_checks_the_policy_too(tmp_path: Path) -> None:
    evicting = RedisServer(tmp_path, None, "--maxmemory-policy", "allkeys-lfu").start()
    try:
        store = RedisStore(evicting.url, prefix=fresh_prefix(), retry=FAST_FAIL)
        with pytest.raises(BudgetStoreUnavailableError, match="noeviction"):
            await store.areserve([Counter("{ev}:k", 100)], Hold(call_id(), 1, 30))
        await store.aclose()
    finally:
        evicting.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_async_every_reply_lost_releases_before_raising(proxy: ReplyDroppingProxy) -> None:
    store = RedisStore(proxy.url, prefix=fresh_prefix(), retry=FAST_FAIL)
    tenant, platform = two_tags()
    hold = Hold(call_id(), 100, 30, charge_on_expiry=100)
    warm_id = call_id()
    await store.areserve([Counter("{warm}:k", 10)], Hold(warm_id, 1, 30))
    await store.asettle(warm_id, ["{warm}:k"], 0)
    await store.arelease(call_id(), ["{warm}:k"], Hold("x", 1, 30))
    proxy.drop_script_replies = -1
    with pytest.raises(BudgetStoreUnavailableError):
        await store.areserve([tenant, platform], hold)
    proxy.drop_script_replies = 0
    settled_everywhere(store)
    assert await store.aread([tenant.key, platform.key]) == [CounterState(0, 0)] * 2
    assert (await store.areserve([tenant, platform], hold)).reused
    await store.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_an_async_reserve_on_a_sync_client_cancelled_mid_way_leaves_no_hold(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store given only a sync client reserves in a worker thread, which a cancelled caller
    cannot stop: what the reserve placed is released once it returns."""
    client = redis.Redis(port=server.port)
    store = RedisStore(client, prefix=fresh_prefix(), retry=FAST_FAIL)
    tenant, platform = two_tags()
    keys = [tenant.key, platform.key]
    warm(store)
    real = store._attempt

    def slow_second_step(call):  # type: ignore[no-untyped-def]
        if call.script == "reserve" and any(platform.key in k for k in call.keys):
            time.sleep(0.3)
        return real(call)

    monkeypatch.setattr(store, "_attempt", slow_second_step)
    hold = Hold(call_id(), 100, 30, charge_on_expiry=100)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.areserve([tenant, platform], hold), timeout=0.1)
    deadline = time.monotonic() + 5
    while await store.aread(keys) != [CounterState(0, 0)] * 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await store.aread(keys) == [CounterState(0, 0)] * 2
    with redis.Redis(port=server.port) as check:
        for key in keys:
            assert check.get(store.record_key(hold.call_id, key)) == b"r"
    store.close()
    client.close()
