"""RedisStore: the store contract over fakeredis and a real Redis, and what only Redis does.

Tests marked ``redis`` need the server at REDIS_URL (skipped without it, failing in CI); the
outage and Sentinel tests start their own redis-server on a free port.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import pytest
import pytest_asyncio
import redis
import redis.asyncio
from redis.crc import key_slot

from langchain_budgetguard.errors import BudgetStoreUnavailableError
from langchain_budgetguard.limits import Limit, counter_key, escape_id
from langchain_budgetguard.stores.base import Counter, CounterState, Hold
from langchain_budgetguard.stores.redis import PendingSettle, RedisStore, RetryPolicy
from langchain_budgetguard.stores.redis_client import parse_url as _parse_url

from .redis_support import (  # noqa: F401 - fixtures
    RedisServer,
    SentinelServer,
    fresh_prefix,
    redis_url,
    script_calls,
)
from .store_contract import StoreContract, StoreEnv

FAST_FAIL = RetryPolicy(attempts=3, deadline_seconds=0.5, first_wait=0.01, max_wait=0.05)


def expiry_reader(admin: redis.Redis, store: RedisStore):
    def expiry_of(key: str) -> float | None:
        at = admin.expiretime(store.redis_keys(key)[0])
        assert at != -2, f"no counter {key!r} in Redis"
        return None if at == -1 else at

    return expiry_of


def call_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def fake_store() -> tuple[RedisStore, fakeredis.FakeRedis]:
    """A RedisStore over one fakeredis server (sync and asyncio clients), and an admin client."""
    server = fakeredis.FakeServer()
    store = RedisStore(
        fakeredis.FakeRedis(server=server), async_client=fakeredis.FakeAsyncRedis(server=server, max_connections=500)
    )
    return store, fakeredis.FakeRedis(server=server)


class TestFakeRedisContract(StoreContract):
    """The very same Lua scripts, run by fakeredis (lupa)."""

    @pytest.fixture
    def env(self, fake_store: tuple[RedisStore, fakeredis.FakeRedis]) -> StoreEnv:
        store, admin = fake_store
        return StoreEnv(store=store, sleep=asyncio.sleep, expiry_of=expiry_reader(admin, store))


@pytest.mark.redis
class TestRealRedisContract(StoreContract):
    sliced = False  # True: every counter admitted from a leased slice from its first reserve

    @pytest_asyncio.fixture
    async def env(self, redis_url: str) -> AsyncIterator[StoreEnv]:  # noqa: F811
        store = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=self.sliced)
        if self.sliced:
            store._book.hot_hits = 1
        admin = redis.Redis.from_url(redis_url)
        try:
            yield StoreEnv(store=store, sleep=asyncio.sleep, expiry_of=expiry_reader(admin, store))
        finally:
            await store.aclose()
            admin.close()


# -- scripts ----------------------------------------------------------------------------------


async def _reserve_after_flush(store: RedisStore, admin: redis.Redis) -> None:
    key = "{flush}:k"
    assert store.reserve([Counter(key, 100)], Hold(call_id(), 10, 30)).ok
    assert (await store.areserve([Counter(key, 100)], Hold(call_id(), 10, 30))).ok
    admin.script_flush()
    assert store.reserve([Counter(key, 100)], Hold(call_id(), 10, 30)).ok
    assert (await store.areserve([Counter(key, 100)], Hold(call_id(), 10, 30))).ok
    assert store.read([key]) == [CounterState(0, 40)]


@pytest.mark.asyncio(loop_scope="session")
async def test_scripts_are_reloaded_after_script_flush_fakeredis(fake_store) -> None:
    await _reserve_after_flush(*fake_store)


@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_scripts_are_reloaded_after_script_flush(redis_url: str) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix())
    with redis.Redis.from_url(redis_url) as admin:
        await _reserve_after_flush(store, admin)
    await store.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_every_script_call_stays_in_one_slot(fake_store, script_calls) -> None:  # noqa: F811
    store, _ = fake_store
    tenant = [Counter("{acme}:u:alice", 1_000), Counter("{acme}:p:web", 1_000)]
    platform = Counter("{platform}:all", 150)
    untagged = Counter("plain-key", 1_000)
    everything = [*tenant, platform, untagged]
    keys = [c.key for c in everything]
    cid = call_id()
    assert store.reserve(everything, Hold(cid, 100, 30)).ok
    assert store.renew(cid, keys, 30)
    assert not (await store.areserve(everything, Hold(call_id(), 100, 30))).ok  # platform refuses
    store.settle(cid, keys, 60)
    await store.aread(keys)
    assert len(script_calls) >= 10
    for call in script_calls:
        slots = {key_slot(k.encode()) for k in call}
        assert len(slots) == 1, call
        assert all(k.startswith("bg:") for k in call)


def test_key_layout_and_ttls(fake_store) -> None:
    store, admin = fake_store
    key = "{acme}:default:user:alice:day:2026-11-22"
    expires = int(time.time()) + 3_600
    cid = "call-1"
    store.reserve([Counter(key, 1_000, expires)], Hold(cid, 100, 60, charge_on_expiry=7, token="t1"))
    index = b"bg:x:{acme}:default:user:day:2026-11-22"  # the spend index of (user, day) on tag acme
    assert set(admin.keys("*")) == {
        b"bg:" + key.encode(),
        b"bg:l:" + key.encode(),
        b"bg:c:{acme}:call-1",
        index,
        b"bg:tags",
    }
    assert admin.smembers("bg:tags") == {b"{acme}"}
    assert admin.zrange(index, 0, -1, withscores=True) == [(b"alice", 0.0)]
    assert admin.expiretime(index) == expires  # the index lives as long as its counters
    assert admin.hgetall(f"bg:{key}") == {b"h": b"100", b"@call-1": b"100:7"}
    assert admin.get("bg:c:{acme}:call-1") == b"h:t1"
    assert admin.expiretime(f"bg:{key}") == expires
    assert expires <= admin.expiretime(f"bg:l:{key}") <= expires + 1  # outlives its counter
    assert 300 + 50 < admin.ttl("bg:c:{acme}:call-1") <= 300 + 60  # lease + the 5-minute retry window
    store.settle(cid, [key], 42)
    assert set(admin.keys("*")) == {b"bg:" + key.encode(), b"bg:c:{acme}:call-1", index, b"bg:tags"}  # no lease set
    assert admin.zscore(index, "alice") == 42
    assert admin.hgetall(f"bg:{key}") == {b"s": b"42", b"h": b"0"}
    assert admin.get("bg:c:{acme}:call-1") == b"s"
    assert 290 < admin.ttl("bg:c:{acme}:call-1") <= 300  # a settled record: the retry window only


def test_a_key_without_tag_is_its_own_tag(fake_store) -> None:
    store, admin = fake_store
    store.reserve([Counter("plain", 100), Counter("{plain}", 100)], Hold("c", 5, 30))
    assert store.redis_keys("plain") == ("bg:~{plain}", "bg:l:~{plain}")
    assert store.read(["plain", "{plain}"]) == [CounterState(0, 5), CounterState(0, 5)]
    assert admin.exists("bg:~{plain}", "bg:{plain}") == 2


def test_prefix_may_not_move_the_hash_tag() -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisStore(fakeredis.FakeRedis(), prefix="bg:{x}:")


def test_amounts_must_be_non_negative_integers(fake_store) -> None:
    store, _ = fake_store
    with pytest.raises(ValueError, match="Hold.amount"):
        store.reserve([Counter("{t}:k", 100)], Hold("c", -1, 30))
    with pytest.raises(ValueError, match="Hold.amount"):
        store.reserve([Counter("{t}:k", 100)], Hold("c", 1.5, 30))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="settle amount"):
        store.settle("c", ["{t}:k"], -3)


# -- clients ----------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_sync_client_alone_serves_the_async_api_too() -> None:
    store = RedisStore(fakeredis.FakeRedis())
    assert (await store.areserve([Counter("{t}:k", 100)], Hold("c", 10, 30))).ok
    assert await store.aread(["{t}:k"]) == [CounterState(0, 10)]


@pytest.mark.asyncio(loop_scope="session")
async def test_an_async_client_alone_refuses_sync_calls_clearly() -> None:
    store = RedisStore(fakeredis.FakeAsyncRedis())
    assert (await store.areserve([Counter("{t}:k", 100)], Hold("c", 10, 30))).ok
    with pytest.raises(TypeError, match="asyncio client"):
        store.read(["{t}:k"])


def test_url_forms() -> None:
    plain = _parse_url("redis://:pw@example:6380/2?socket_timeout=3")
    assert (plain.kind, plain.hosts) == ("server", (("example", 6380),))
    assert plain.url == "redis://:pw@example:6380/2?socket_timeout=3"
    cluster = _parse_url("redis+cluster://u:pw@a:7000,b:7001,[::1]:7002")
    assert cluster.kind == "cluster" and cluster.hosts == (("a", 7000), ("b", 7001), ("::1", 7002))
    assert _parse_url("rediss://a:7000/0?cluster=true").kind == "cluster"
    assert _parse_url("rediss://a:7000/0?cluster=true").url == "rediss://a:7000"
    sentinel = _parse_url("redis+sentinel://:pw@s1,s2:26380/mymaster/3?sentinel_password=spw")
    assert sentinel.kind == "sentinel" and sentinel.service == "mymaster"
    assert sentinel.hosts == (("s1", 26379), ("s2", 26380))
    assert sentinel.sentinel_kwargs == {"password": "spw"}
    assert sentinel.url == "redis://:pw@s1/3"
    with pytest.raises(ValueError, match="service"):
        _parse_url("redis+sentinel://s1:26379")
    with pytest.raises(ValueError, match="scheme"):
        _parse_url("http://example")
    with pytest.raises(ValueError, match="database 0"):
        _parse_url("redis+cluster://a:7000/3")
    store = RedisStore.from_url("redis+cluster://user:secret@a:7000,b:7001")  # connects on first use only
    assert "secret" not in repr(store) and "user@a:7000,b:7001" in repr(store)


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_dead_store_raises_unavailable_after_bounded_retries() -> None:
    store = RedisStore("redis://:hunter2@127.0.0.1:1/0", retry=FAST_FAIL)
    counters = [Counter("{t}:k", 100)]
    for attempt in (lambda: store.reserve(counters, Hold("c", 1, 30)), lambda: store.read(["{t}:k"])):
        started = time.monotonic()
        with pytest.raises(BudgetStoreUnavailableError) as caught:
            attempt()
        assert time.monotonic() - started < 2
        message = str(caught.value)
        assert "127.0.0.1:1" in message and "hunter2" not in message
        assert "3 attempt(s)" in message and "running and reachable" in message
    with pytest.raises(BudgetStoreUnavailableError, match="renew failed"):
        await store.arenew("c", ["{t}:k"], 30)
    await store.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_settle_that_cannot_reach_redis_is_journaled() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", retry=FAST_FAIL)
    result = store.settle("c1", ["{t}:k"], 50)
    assert result.pending and not result.applied and result.charged == 50
    assert (await store.asettle("c2", ["{t}:k"], 60)).pending
    assert [(p.call_id, p.keys, p.amount) for p in store.pending_journal] == [
        ("c1", ("{t}:k",), 50),
        ("c2", ("{t}:k",), 60),
    ]
    assert store.flush_journal() == 0 and await store.aflush_journal() == 0
    assert len(store.pending_journal) == 2
    await store.aclose()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.asyncio(loop_scope="session")
async def test_journal_replays_after_an_outage_exactly_once(tmp_path: Path, use_async: bool) -> None:
    server = RedisServer(tmp_path, None, "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        store = RedisStore(server.url, retry=FAST_FAIL)
        key, other = "{acme}:user:alice", "{platform}:all"
        counters = [Counter(key, 1_000), Counter(other, 1_000)]
        cid = call_id()
        assert store.reserve(counters, Hold(cid, 400, 60)).ok
        server.stop()
        result = (await store.asettle(cid, [key, other], 150)) if use_async else store.settle(cid, [key, other], 150)
        assert result.pending and len(store.pending_journal) == 1
        server.start()  # same port, same append-only file: the hold is still there
        states = (await store.aread([key, other])) if use_async else store.read([key, other])
        # read, then the journal is replayed (unless the background thread was quicker)
        assert states in ([CounterState(0, 400)] * 2, [CounterState(150, 0)] * 2)
        assert store.pending_journal == ()  # replayed right after that read at the latest
        assert store.read([key, other]) == [CounterState(150, 0)] * 2
        store.journal.append(cid, (key, other), 150)
        assert store.flush_journal() == 1  # a replay of a settle that already landed changes nothing
        assert store.read([key, other]) == [CounterState(150, 0)] * 2
        await store.aclose()
        store.close()
    finally:
        server.stop()


# -- keys and memory --------------------------------------------------------------------------

HOSTILE_IDS = [
    "alice",
    "{acme}",
    "}{",
    "a:b",
    "a%3Ab",
    "a%253Ab",
    "*",
    "a*",
    "?[]",
    "line\nbreak",
    "tab\there",
    "ünïcødé",
    "日本",
    "😀",
    "~" + "0" * 64,
    "x" * 10_240,
    "x" * 10_239 + "y",
    " ",
    "",
    "-",
]


@pytest.mark.redis
def test_hostile_ids_each_get_their_own_counter(redis_url: str) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix())
    limit = Limit(usd=1, per="user", window="day")
    tag = escape_id("{evil}:tenant")
    keys = [counter_key("default", tag, limit, sid, "2026-11-22") for sid in HOSTILE_IDS]
    assert len(set(keys)) == len(keys)
    for index, key in enumerate(keys):
        assert store.reserve([Counter(key, 10**9)], Hold(call_id(), index + 1, 60)).ok
    assert store.read(keys) == [CounterState(0, i + 1) for i in range(len(keys))]
    with redis.Redis.from_url(redis_url) as admin:
        found = list(admin.scan_iter(match=store.prefix + "*", count=1000))
        counters = [k for k in found if k.startswith(store.prefix.encode() + b"{")]
        assert len(counters) == len(keys)
        assert {key_slot(k) for k in counters} == {key_slot(tag.encode())}
    store.close()


@pytest.mark.redis
def test_an_idle_counter_takes_at_most_256_bytes(redis_url: str) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix())
    key = counter_key("default", "acme", Limit(usd=5, per="user", window="day"), "alice@example.com", "2026-11-22")
    cid = call_id()
    store.reserve([Counter(key, 5 * 10**9, int(time.time()) + 8 * 86_400)], Hold(cid, 123_456_789, 60))
    store.settle(cid, [key], 98_765_432)
    counter, leases = store.redis_keys(key)
    with redis.Redis.from_url(redis_url) as admin:
        assert not admin.exists(leases)
        used = admin.memory_usage(counter, samples=0)
        assert used is not None and used <= 256, f"{used} bytes for {counter!r}"
    store.close()


# -- Sentinel ---------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_sentinel_url_finds_the_master(tmp_path: Path) -> None:
    master = RedisServer(tmp_path / "master").start()
    sentinel = SentinelServer(tmp_path / "sentinel", master.port, "budget")
    try:
        sentinel.start()
        store = RedisStore.from_url(f"redis+sentinel://127.0.0.1:{sentinel.port}/budget", prefix=fresh_prefix())
        assert store.reserve([Counter("{s}:k", 100)], Hold("c", 30, 30)).ok
        assert (await store.asettle("c", ["{s}:k"], 20)).applied
        assert store.read(["{s}:k"]) == [CounterState(20, 0)]
        with redis.Redis(port=master.port) as admin:
            assert admin.hget(store.redis_keys("{s}:k")[0], "s") == b"20"
        await store.aclose()
        store.close()
    finally:
        sentinel.stop()
        master.stop()


# -- scripts check their arguments before their first write -------------------------------------------


@pytest.mark.parametrize(
    "script, args",
    [
        # reserve: call_id, lease_ms, retry_ms, token, (limit, expires_at, amount, charge, alerts), member
        ("reserve", ["c", "1000", "300000", "tok", "1000", "", str(2**64 - 1), "0", "", ""]),
        ("reserve", ["c", "1e20", "300000", "tok", "1000", "", "10", "0", "", ""]),
        ("reserve", ["c", "1000", "300000", "tok", str(10**19), "", "10", "0", "", ""]),
        ("reserve", ["c", "1000", "300000", "a:b", "1000", "", "10", "0", "", ""]),
        ("reserve", ["c", "1000", "300000", "tok", "1000", "", "10", "-1", "", ""]),  # charge_on_expiry
        ("reserve", ["c", "1000", "300000", "tok", "1000", "", "10", "0", "0,5", ""]),  # a threshold of 0
        ("reserve", ["c", "1000", "300000", "tok", "1000", "", "10", "0", "5,,9", ""]),  # an empty threshold
        ("reserve", ["c", "1000", "300000", "tok", "1000", "", "10", "0", str(2**63), ""]),  # above 2^62
        # settle: call_id, amount, retry_ms, seq, mark_ttl, max rows, retention, attempt, per-counter
        # amount, member[, row fields]
        ("settle", ["c", str(2**63), "300000", "", "", "100", "1000", "w", "5", ""]),
        ("settle", ["c", "-5", "300000", "", "", "100", "1000", "w", "5", ""]),
        ("settle", ["c", "5", "300000", "", "", "1e9", "1000", "w", "5", ""]),  # ledger max rows
        ("settle", ["c", "5", "300000", "", "", "100", "1000", "w", "5", "", "k"]),  # a row field without a value
        ("settle", ["c", "5", "300000", "", "", "100", "1000", "w", str(2**63), ""]),  # a counter's amount
        ("settle", ["c", "5", "300000", "", "", "100", "1000", "a:b", "5", ""]),  # attempt
        ("renew", ["c", "inf", "300000"]),
        ("read", ["0"]),
        # slice: sid, seq, limit, expires_at, alerts, member, kept, want, need, div, lease_ms,
        # retry_ms, max rows, retention, n, total, row count, rows (JSON array), shared (JSON object)
        ("slice", ['s1', '1', '9223372036854775808', '', '', '', '0', '10', '1', '20', '30000', '300000', '100', '1000', '0', '0', '0', '', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '0', '30000', '300000', '100', '1000', '0', '0', '0', '', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '20', '30000', '300000', '100', '1000', 'x', '0', '0', '', '']),
        ("slice", ['a:b', '1', '1000', '', '', '', '0', '10', '1', '20', '30000', '300000', '100', '1000', '0', '0', '0', '', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '-1', '10', '1', '20', '30000', '300000', '100', '1000', '0', '0', '0', '', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '20', '0', '300000', '100', '1000', '0', '0', '0', '', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '20', '30000', '300000', '1e9', '1000', '0', '0', '0', '', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '20', '30000', '300000', '100', '1000', '0', '0', '1', '', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '20', '30000', '300000', '100', '1000', '0', '0', '0', '[{}]', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '20', '30000', '300000', '100', '1000', '0', '-x', '0', '', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '20', '30000', '300000', '100', '1000', '0', '9223372036854775808', '0', '', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '20', '30000', '300000', '100', '1000', '0', '0', '0', '']),
        ("slice", ['s1', '1', '1000', '', '', '', '0', '10', '1', '20', '30000', '300000', '100', '1000', '1', '5', '1', '[{}]', '']),
    ],
)
@pytest.mark.redis
def test_a_script_with_bad_arguments_fails_before_writing(redis_url: str, script: str, args: list[str]) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix())
    key = "{argv}:k"
    store.reserve([Counter(key, 1_000)], Hold("expired", 100, 0.05, charge_on_expiry=60))
    time.sleep(0.1)  # a reap is due: any script that got as far as reaping would write
    counter, leases = store.redis_keys(key)
    with redis.Redis.from_url(redis_url) as admin:
        before = (admin.hgetall(counter), admin.zrange(leases, 0, -1))
        record = f"{store.prefix}c:{{argv}}:c"
        mark = f"{store.prefix}j:{{argv}}:x"
        stream = f"{store.prefix}ledger:{{argv}}"
        keys = {"read": [counter, leases], "settle": [record, mark, stream, counter, leases, counter],
                "reserve": [record, counter, leases, counter],
                "slice": [counter, leases, counter, stream, f"{store.prefix}sl:{{argv}}:s1"]}.get(
                    script, [record, counter, leases])
        with pytest.raises(redis.exceptions.ResponseError, match="budgetguard"):
            store._sync_backend().scripts[script](keys=keys, args=args)  # test-only reach: bypass the Python checks
        assert (admin.hgetall(counter), admin.zrange(leases, 0, -1)) == before
        assert not admin.exists(record)
        assert not admin.exists(stream)
    store.close()


@pytest.mark.parametrize("url", ["redis://:Tr0ub4dor/x9Qz@127.0.0.1:6379/12", "redis://default:Tr0ub4dor#x9@h:6379/0",
                                 "redis://:Tr0ub4dor?x@h/0"])
def test_a_url_whose_password_was_not_encoded_is_refused_without_showing_it(url):
    with pytest.raises(ValueError) as bad:
        _parse_url(url)
    assert "Tr0ub4dor" not in str(bad.value) and "percent-encode" in str(bad.value)
