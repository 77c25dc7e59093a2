"""The guard on a real 3-node Redis Cluster: tenants spread over the nodes share a platform cap.

Limits per tenant and per user (the tenant tree, one hash tag per tenant) and a platform-wide
global limit (the budget's own tag, reserved in a second step). Uses the cluster of
``test_redis_cluster`` (skipped without redis-server, failing in CI). One call reserves and
costs exactly $0.09.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter as Tally
from decimal import Decimal
from typing import Any

from redis.cluster import RedisCluster
from redis.crc import key_slot

from langchain_budgetguard import BudgetExceededError, BudgetGuard, Limit
from langchain_budgetguard.stores.redis import RedisStore

from .fakes import ExactEstimator
from .guard_worker import CALL_COST, PRICES, big
from .redis_support import RedisServer, fresh_prefix
from .test_redis_cluster import admin, cluster, cluster_url  # noqa: F401 - fixtures

TENANT_LIMIT = Decimal("0.30")  # three calls a tenant ($0.27)
GLOBAL_LIMIT = Decimal("1.00")  # eleven calls in all ($0.99), fewer than six tenants x three


def config(tenant: str, user: str) -> dict[str, Any]:
    return {"configurable": {"tenant_id": tenant, "user_id": user}}


def by_scope(guard: BudgetGuard, tenant: str, user: str) -> dict[str, Any]:
    return {s.scope: s for s in guard.status(config(tenant, user))}


def node_of(admin: RedisCluster, redis_key: str) -> str:  # noqa: F811
    return admin.get_node_from_key(redis_key).name


def call_records(admin: RedisCluster, store: RedisStore, tag: str) -> list[bytes]:  # noqa: F811
    """The call records (``<prefix>c:{tag}:<call_id>``) on one hash tag."""
    return sorted(admin.scan_iter(match=f"{store.prefix}c:{tag}:*", target_nodes=RedisCluster.ALL_NODES))


def tag_in(store: RedisStore, key: str) -> str:
    """``{tag}`` as it appears in the Redis names of a counter's keys."""
    return store.redis_keys(key)[0][len(store.prefix):].split("}")[0] + "}"


def tenants_on_every_node(
    policy: BudgetGuard, store: RedisStore, admin: RedisCluster, per_node: int  # noqa: F811
) -> list[str]:
    """Tenant ids whose counters live on each of the three masters, ``per_node`` on each."""
    picked: dict[str, list[str]] = {}
    for i in range(2_000):
        tenant = f"tenant-{i}"
        tenant_key = by_scope(policy, tenant, "u")["tenant"].key
        node = node_of(admin, store.redis_keys(tenant_key)[0])
        if len(picked.setdefault(node, [])) < per_node:
            picked[node].append(tenant)
        if len(picked) == 3 and all(len(v) == per_node for v in picked.values()):
            break
    assert len(picked) == 3, "the cluster should have three masters"
    return [t for ts in picked.values() for t in ts]


def test_tenants_on_every_node_stay_within_their_limits_and_the_platform_cap(
    cluster: list[RedisServer], admin: RedisCluster  # noqa: F811
) -> None:
    store = RedisStore.from_url(cluster_url(cluster), prefix=fresh_prefix())
    limits = [Limit(usd=TENANT_LIMIT, per="tenant"), Limit(usd=10, per="user"), Limit(usd=GLOBAL_LIMIT)]
    policy = BudgetGuard(limits=limits, store=store, name=f"platform-{uuid.uuid4().hex[:8]}", prices=PRICES,
                         estimator=ExactEstimator(1000))
    tenants = tenants_on_every_node(policy, store, admin, per_node=2)

    # Every counter of one tenant shares one slot; the platform counter has its own.
    for tenant in tenants:
        statuses = by_scope(policy, tenant, "u")
        tree = {key_slot(store.redis_keys(statuses[s].key)[0].encode()) for s in ("tenant", "user")}
        assert len(tree) == 1
    assert len({node_of(admin, store.redis_keys(by_scope(policy, t, "u")["tenant"].key)[0]) for t in tenants}) == 3

    llm = big(delay=0.02)
    guard = policy.wrap(llm)
    served: Tally[str] = Tally()
    refused_by: Tally[str] = Tally()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(tenant: str, user: str) -> None:
        for _ in range(10):
            try:
                guard.invoke("hi", config=config(tenant, user))
            except BudgetExceededError as exc:
                with lock:
                    refused_by[exc.scope] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    served[tenant] += 1

    threads = [threading.Thread(target=work, args=(t, f"user-{n}")) for t in tenants for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sum(served.values()) + sum(refused_by.values()) == len(threads) * 10

    total = sum(served.values())
    assert llm.calls == total
    for tenant in tenants:
        users = [by_scope(policy, tenant, f"user-{n}") for n in range(2)]
        tenant_status = users[0]["tenant"]
        assert tenant_status.spent == served[tenant] * CALL_COST <= TENANT_LIMIT, tenant
        assert tenant_status.held == 0 and all(u["user"].held == 0 for u in users), tenant
        assert sum((u["user"].spent for u in users), Decimal(0)) == tenant_status.spent
        # One record per served call on the tenant's tag: refused calls left none behind.
        assert len(call_records(admin, store, tag_in(store, tenant_status.key))) == served[tenant], tenant
    platform = by_scope(policy, tenants[0], "u")["global"]
    assert platform.spent == total * CALL_COST <= GLOBAL_LIMIT and platform.held == 0
    assert GLOBAL_LIMIT - platform.spent < CALL_COST
    assert total == 11 and refused_by["global"] > 0, (total, refused_by)

    # Tenants with room left under their own limit are stopped by the platform cap, and the
    # refused call leaves nothing held on (or recorded in) its tenant's counters.
    with_room = [t for t in tenants if served[t] * CALL_COST + CALL_COST <= TENANT_LIMIT]
    assert with_room
    for tenant in with_room:
        before = by_scope(policy, tenant, "user-0")
        tag = tag_in(store, before["tenant"].key)
        records = call_records(admin, store, tag)
        try:
            guard.invoke("hi", config=config(tenant, "user-0"))
        except BudgetExceededError as exc:
            assert exc.scope == "global"
        else:
            raise AssertionError(f"{tenant} was served past the platform cap")
        after = by_scope(policy, tenant, "user-0")
        for scope in ("tenant", "user"):
            assert (after[scope].spent, after[scope].held) == (before[scope].spent, 0)
            counter, leases = store.redis_keys(after[scope].key)
            assert set(admin.hgetall(counter)) <= {b"s", b"h"}, "a hold field was left on the tenant's counter"
            assert admin.exists(leases) == 0
        assert call_records(admin, store, tag) == records, "the refused call left a record on its tenant's tag"
    assert llm.calls == total
    store.close()


def test_a_per_model_limit_is_one_counter_across_tenants_on_every_node(
    cluster: list[RedisServer], admin: RedisCluster  # noqa: F811
) -> None:
    store = RedisStore.from_url(cluster_url(cluster), prefix=fresh_prefix())
    name = f"models-{uuid.uuid4().hex[:8]}"
    limits = [Limit(usd=10, per="tenant"), Limit(usd=10, per="user"), Limit(usd="0.30", per="model")]  # 3 calls
    policy = BudgetGuard(limits=limits, store=store, name=name, prices=PRICES, estimator=ExactEstimator(1000))
    tenants = tenants_on_every_node(policy, store, admin, per_node=1)
    llm = big()
    guard = policy.wrap(llm)
    served: Tally[str] = Tally()
    for _ in range(2):
        for tenant in tenants:
            try:
                guard.invoke("hi", config=config(tenant, "u"))
                served[tenant] += 1
            except BudgetExceededError as exc:
                assert exc.scope == "model"
    assert sum(served.values()) == llm.calls == 3  # the model's cap, whichever tenants called
    statuses = {t: {s.scope: s for s in policy.status(config(t, "u"), model_id="big")} for t in tenants}
    (model_key,) = {s["model"].key for s in statuses.values()}  # one counter, under the budget's own tag
    assert tag_in(store, model_key) == "{" + name + "}"
    model_status = statuses[tenants[0]]["model"]
    assert (model_status.spent, model_status.held) == (3 * CALL_COST, 0)
    for tenant in tenants:  # a call the model's counter refused (second step) left nothing on its tenant's tag
        tenant_status = statuses[tenant]["tenant"]
        assert (tenant_status.spent, tenant_status.held) == (served[tenant] * CALL_COST, 0), tenant
        assert len(call_records(admin, store, tag_in(store, tenant_status.key))) == served[tenant], tenant
    store.close()
