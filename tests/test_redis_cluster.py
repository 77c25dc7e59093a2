"""RedisStore on a real Redis Cluster: three masters on free ports, started once per session.

Skipped when redis-server is not installed (failing in CI, where it must be).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis
import redis.asyncio.cluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from langchain_budgetguard.stores.base import Counter, CounterState, Hold
from langchain_budgetguard.stores.redis import RedisStore

from .redis_support import RedisServer, fresh_prefix, script_calls, start_cluster  # noqa: F401 - fixture
from .store_contract import StoreContract, StoreEnv


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    servers = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def admin(cluster: list[RedisServer]) -> Iterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster[0].port)
    yield client
    client.close()


def cluster_url(servers: list[RedisServer]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in servers[:2])


def tags_on_every_node(admin: RedisCluster) -> list[str]:
    """Fresh hash tags, one owned by each master, so that a test spreads over the whole cluster."""
    by_node: dict[str, str] = {}
    base = uuid.uuid4().hex[:8]
    for i in range(1_000):
        tag = f"{base}-{i}"
        by_node.setdefault(admin.get_node_from_key("{" + tag + "}").name, tag)
        if len(by_node) == 3:
            break
    return list(by_node.values())


class TestClusterContract(StoreContract):
    sliced = False

    @pytest_asyncio.fixture
    async def env(self, cluster: list[RedisServer], admin: RedisCluster) -> AsyncIterator[StoreEnv]:
        store = RedisStore.from_url(cluster_url(cluster), prefix=fresh_prefix(), lease_slices=self.sliced)
        if self.sliced:
            store._book.hot_hits = 1  # every counter admitted from a slice from its first reserve

        def expiry_of(key: str) -> float | None:
            at = admin.expiretime(store.redis_keys(key)[0])
            assert at != -2
            return None if at == -1 else at

        try:
            yield StoreEnv(store=store, sleep=asyncio.sleep, expiry_of=expiry_of, tags=tags_on_every_node(admin))
        finally:
            await store.aclose()


class TestSlicedClusterContract(TestClusterContract):
    """The contract again with leased slices: each slice report runs on its counter's node."""

    fill_margin = 80

    sliced = True


@pytest.mark.asyncio(loop_scope="session")
async def test_cross_tag_refusal_leaves_no_hold_on_the_first_tag(
    cluster: list[RedisServer], admin: RedisCluster, script_calls: list[tuple[str, ...]]  # noqa: F811
) -> None:
    tenant_tag, platform_tag, _ = tags_on_every_node(admin)
    store = RedisStore.from_url(f"redis://127.0.0.1:{cluster[2].port}/0?cluster=true", prefix=fresh_prefix())
    tenant = [Counter("{" + tenant_tag + "}:user:alice", 1_000), Counter("{" + tenant_tag + "}:project:web", 1_000)]
    platform = Counter("{" + platform_tag + "}:all", 100)
    counters = [*tenant, platform]
    keys = [c.key for c in counters]

    fits = "fits-" + uuid.uuid4().hex
    assert store.reserve(counters, Hold(fits, 60, 30)).ok
    refused = "refused-" + uuid.uuid4().hex
    result = await store.areserve(counters, Hold(refused, 60, 30))
    assert not result.ok and result.blocked == 2
    assert result.states == (CounterState(0, 60), CounterState(0, 60), CounterState(0, 60))
    assert store.read(keys) == [CounterState(0, 60)] * 3
    for key in keys:
        counter, leases = store.redis_keys(key)
        assert admin.hget(counter, "@" + refused) is None
        assert admin.zscore(leases, refused) is None
    assert not admin.exists(f"{store.prefix}c:{{{tenant_tag}}}:{refused}")

    assert (await store.asettle(fits, keys, 45)).applied
    assert store.read(keys) == [CounterState(45, 0)] * 3
    assert script_calls and all(len({key_slot(k.encode()) for k in call}) == 1 for call in script_calls)
    await store.aclose()
    store.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_store_built_from_cluster_clients(cluster: list[RedisServer], admin: RedisCluster) -> None:
    sync_client = RedisCluster(host="127.0.0.1", port=cluster[1].port)
    async_client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster[1].port)
    store = RedisStore(sync_client, async_client=async_client, prefix=fresh_prefix())
    tags = tags_on_every_node(admin)
    counters = [Counter("{" + tag + "}:k", 100) for tag in tags]
    keys = [c.key for c in counters]
    assert store.reserve(counters, Hold("a", 30, 30)).ok
    assert (await store.areserve(counters, Hold("b", 30, 30))).ok
    store.settle("a", keys, 10)
    await store.asettle("b", keys, 20)
    assert await store.aread(keys) == [CounterState(30, 0)] * 3
    assert "Redis Cluster" in store.where
    await async_client.aclose()
    sync_client.close()


def test_a_stalled_second_step_releases_the_first_and_leaves_no_hold(
    cluster: list[RedisServer], admin: RedisCluster
) -> None:
    """Tenant tag on one master, platform tag on another; the platform's master stalls (CLIENT
    PAUSE), so step 2 times out and runs late: step 1 is released, step 2's late run is refused
    by the tombstone (or released after it), and nothing stays held."""
    import threading
    import time

    import redis as redis_py

    from langchain_budgetguard.errors import BudgetStoreUnavailableError
    from langchain_budgetguard.stores.redis import RetryPolicy

    tenant_tag, platform_tag, _ = tags_on_every_node(admin)
    tenant, platform = Counter("{" + tenant_tag + "}:user:a", 1_000), Counter("{" + platform_tag + "}:all", 1_000)
    keys = [tenant.key, platform.key]
    store = RedisStore(
        cluster_url(cluster) + "?socket_timeout=0.3",
        prefix=fresh_prefix(),
        retry=RetryPolicy(attempts=2, deadline_seconds=0.4, first_wait=0.01, max_wait=0.05),
    )
    warm = uuid.uuid4().hex
    assert store.reserve([tenant, platform], Hold(warm, 1, 30)).ok  # scripts loaded on both nodes
    store.settle(warm, keys, 0)
    node = admin.get_node_from_key(platform.key)

    def pause() -> None:
        with redis_py.Redis(host=node.host, port=node.port) as direct:
            direct.execute_command("CLIENT", "PAUSE", "1500", "WRITE")

    stalling = threading.Thread(target=pause)
    stalling.start()
    stalling.join()
    hold = Hold(uuid.uuid4().hex, 100, 30, charge_on_expiry=100)
    with pytest.raises(BudgetStoreUnavailableError):
        store.reserve([tenant, platform], hold)
    assert store.read([tenant.key]) == [CounterState(0, 0)]  # step 1 released at once
    deadline = time.monotonic() + 15
    while store.pending_releases and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.6)  # the pause is over; every queued command has run
    assert store.pending_releases == 0
    assert store.read(keys) == [CounterState(0, 0)] * 2
    assert not store.reserve([tenant, platform], hold).ok  # the burnt attempt admits nothing
    store.close()


def test_an_evicting_policy_on_any_master_is_refused(cluster: list[RedisServer], admin: RedisCluster) -> None:
    import redis as redis_py

    from langchain_budgetguard.errors import BudgetStoreUnavailableError

    with redis_py.Redis(port=cluster[2].port) as one:
        one.config_set("maxmemory-policy", "allkeys-lru")
        try:
            store = RedisStore(cluster_url(cluster), prefix=fresh_prefix())
            with pytest.raises(BudgetStoreUnavailableError, match="allkeys-lru"):
                store.reserve([Counter("{ev}:k", 10)], Hold(uuid.uuid4().hex, 1, 30))
            assert store.pending_releases == 0  # refused before anything was sent: nothing to release
            store.close()
        finally:
            one.config_set("maxmemory-policy", "noeviction")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_reserve_cancelled_during_its_second_step_leaves_no_hold(
    cluster: list[RedisServer], admin: RedisCluster
) -> None:
    """The platform's master stalls (CLIENT PAUSE) while step 2 waits, and the caller gives up
    (asyncio.wait_for): step 1's hold and step 2's late run are released, tombstoned, in the
    background; nothing stays held and nothing is charged on expiry."""
    import time

    import redis as redis_py

    tenant_tag, platform_tag, _ = tags_on_every_node(admin)
    tenant, platform = Counter("{" + tenant_tag + "}:user:a", 1_000), Counter("{" + platform_tag + "}:all", 1_000)
    keys = [tenant.key, platform.key]
    store = RedisStore(cluster_url(cluster), prefix=fresh_prefix())
    warm = uuid.uuid4().hex
    assert (await store.areserve([tenant, platform], Hold(warm, 1, 30))).ok  # scripts loaded on both nodes
    await store.asettle(warm, keys, 0)
    node = admin.get_node_from_key(platform.key)
    with redis_py.Redis(host=node.host, port=node.port) as direct:
        direct.execute_command("CLIENT", "PAUSE", "800", "WRITE")
    hold = Hold(uuid.uuid4().hex, 100, 30, charge_on_expiry=100)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(store.areserve([tenant, platform], hold), timeout=0.25)
    deadline = time.monotonic() + 10
    while store.pending_releases and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.8)  # the pause is over; the stalled reserve has run (refused: tombstone)
    assert store.pending_releases == 0
    assert await store.aread(keys) == [CounterState(0, 0)] * 2
    for key in keys:
        assert admin.get(store.record_key(hold.call_id, key)) == b"r"
    await store.aclose()


def test_a_journal_entry_of_a_node_that_is_away_holds_back_only_that_node(
    cluster: list[RedisServer], admin: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Journaled settles on three tags; the first tag's node cannot be reached (connections
    refused, fault-injected): the entries of the tags on the other nodes replay at once, also a
    two-tag entry's part on a reachable tag, and the rest once the node is back, each once."""
    import redis as redis_py

    from langchain_budgetguard.stores.redis import RetryPolicy

    away_tag, up_tag, platform_tag = tags_on_every_node(admin)
    away, up, platform = ("{" + t + "}:user:a" for t in (away_tag, up_tag, platform_tag))
    store = RedisStore(cluster_url(cluster), prefix=fresh_prefix(), retry=RetryPolicy(attempts=1))
    real = store._attempt
    node = admin.get_node_from_key("{" + away_tag + "}")

    def unreachable(call):  # type: ignore[no-untyped-def]
        if any(admin.get_node_from_key(k).name == node.name for k in call.keys):
            raise redis_py.exceptions.ConnectionError("connection refused (fault injected)")
        return real(call)

    monkeypatch.setattr(store, "_attempt", unreachable)
    store.journal.append("first", (away,), 100)
    store.journal.append("both", (away, platform), 20)
    store.journal.append("healthy", (up,), 7)
    store.journal.append("platform", (platform,), 3)
    assert store.flush_journal() == 2
    assert [e.call_id for e in store.pending_journal] == ["first", "both"]
    assert store.read([up, platform]) == [CounterState(7, 0), CounterState(23, 0)]
    monkeypatch.setattr(store, "_attempt", real)
    assert store.flush_journal() == 2
    assert store.read([away, up, platform]) == [CounterState(120, 0), CounterState(7, 0), CounterState(23, 0)]
    store.close()


@pytest.fixture(scope="module")
def cluster_with_a_master_down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """Three masters, no replicas, ``cluster-require-full-coverage no`` (the others serve their
    slots while one is down); the first master is stopped. Its own cluster: the session's stays whole."""
    servers = start_cluster(tmp_path_factory.mktemp("redis-cluster-down"), 3,
                            "--cluster-require-full-coverage", "no")
    try:
        servers[0].stop()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_master_down_fails_only_the_tags_it_serves(cluster_with_a_master_down: list[RedisServer]) -> None:
    """A new process (no script cached on any node) reserves for tenants on the live masters:
    NOSCRIPT loads the script on the keys' node only (redis-py's Script loads it on every
    primary, which failed for every tenant), and maxmemory-policy is read from the masters that
    answer. Tenants on the dead master are refused as unavailable."""
    from langchain_budgetguard.errors import BudgetStoreUnavailableError
    from langchain_budgetguard.stores.redis import RetryPolicy

    dead, *live = cluster_with_a_master_down
    with RedisCluster(host="127.0.0.1", port=live[0].port) as client:
        for server in live:
            with redis.Redis(port=server.port) as node:
                node.script_flush()
        by_node: dict[int, str] = {}
        for i in range(1_000):
            by_node.setdefault(client.get_node_from_key("{" + f"t{i}" + "}").port, f"t{i}")
        assert len(by_node) == 3
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in live)
    fast = RetryPolicy(attempts=2, deadline_seconds=0.3, first_wait=0.01, max_wait=0.05)
    for use_async in (False, True):
        store = RedisStore(url, prefix=fresh_prefix(), retry=fast)
        for port, tag in by_node.items():
            counter, hold = Counter("{" + tag + "}:user:bob", 1_000), Hold(uuid.uuid4().hex, 10, 30)
            if port == dead.port:
                with pytest.raises(BudgetStoreUnavailableError):
                    await store.areserve([counter], hold) if use_async else store.reserve([counter], hold)
                continue
            result = await store.areserve([counter], hold) if use_async else store.reserve([counter], hold)
            assert result.ok, (use_async, tag)
            assert await store.aread([counter.key]) == [CounterState(0, 10)]
            await store.arelease(hold.call_id, [counter.key], hold)
        store._releases.clear()  # (the dead master's tombstones: nobody can send them)
        await store.aclose()
