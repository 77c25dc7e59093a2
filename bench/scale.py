"""Section 3: 100k ids. Redis memory per (id, window) counter, and per-call cost vs number of ids.

Memory: 100k users each make one call under a per-user daily limit; the reservations and settles
go through the store's own scripts (the exact script calls ``RedisStore`` makes, pipelined), so the
layout is the real one. Then, idle (no hold live):

- per counter: ``INFO memory`` used_memory delta over the 100k counters once the per-call records
  are deleted, and ``MEMORY USAGE`` of a sample of counters (hash + lease set, if any);
- per call record (``c:{tag}:<call_id>``, kept ``record_ttl_seconds`` = 1 day after a settle so that a
  retried settle is not counted twice): MEMORY USAGE of a sample. This is history, not per id.

Per-call cost: guarded invoke of one id over and over (a fresh counter) against guarded invokes of
random ids among the 100k (each with history), interleaved, same store; median per-call ratio.
The same for the in-process store, plus the cost of its sweep of expired counters and records.
"""

from __future__ import annotations

import random
import secrets
import time
from typing import Any

from langchain_budgetguard import BudgetGuard, Limit
from langchain_budgetguard.limits import Identity
from langchain_budgetguard.stores.base import Hold

from .common import Results, Row, delete_prefix, fmt_us, interleave, median, per_round, redis_url
from .fakes import UsageChat

IDS = 100_000
MEMORY_GOAL = 256  # bytes per idle (id, window) counter
GROWTH_GOAL = 1.1  # per-call latency, 100k ids vs 1 id (same run): "must not grow"
PROMPT = "hello"
BATCH = 1_000


def _user(i: int) -> str:
    return f"user-{i:010d}"  # 15 characters, like a short external id


def _policy_guard(model: UsageChat, store: Any) -> BudgetGuard:
    return BudgetGuard(model, limits=[Limit(usd=5, per="user", window="day")], store=store)


def _configs(ids: int, n: int, seed: int) -> tuple[list[dict], Any]:
    """Configs built ahead, so that both sides of the comparison do the same work per call:
    ``solo`` names one id (n equal dicts), ``many`` cycles through n random ids among ``ids``."""
    import itertools

    rng = random.Random(seed)
    solo = [{"configurable": {"user_id": "solo"}} for _ in range(max(n, 1000))]
    many = [{"configurable": {"user_id": _user(rng.randrange(ids))}} for _ in range(n)]
    return solo, itertools.cycle(many)


def _populate_redis(client: Any, store: Any, guard: BudgetGuard, ids: int) -> float:
    """One reserve + settle per id through the store's scripts, pipelined. Returns seconds."""
    from langchain_budgetguard.stores.redis import _lua_sources

    shas = {name: client.script_load(_lua_sources()[name]) for name in ("reserve", "settle")}
    policy = guard.policy
    # One call through the store first: it registers the budget's hash tag (the store does that
    # once per process, as the first step of its first plan), so each plan below starts with its script.
    warm = policy.plan(Identity({"user": "bench-scale-warm-up"}))
    assert store.reserve(warm.counters(), Hold("bench-scale-warm-up", 13_350, 600.0, 1_200)).ok
    store.settle("bench-scale-warm-up", warm.keys, 6_600)
    started = time.monotonic()
    pipe = client.pipeline(transaction=False)
    base = secrets.token_hex(6)
    for i in range(ids):
        plan = policy.plan(Identity({"user": _user(i)}))
        call_id = f"{base}{i:x}"
        for name, gen in (("reserve", store._reserve_plan(plan.counters(), Hold(call_id, 13_350, 600.0, 1_200))),
                          ("settle", store._settle_plan(call_id, plan.keys, 6_600))):
            call = next(gen)
            gen.close()
            assert call.script == name, f"the {name} plan began with a {call.script} call"
            pipe.evalsha(shas[name], len(call.keys), *call.keys, *call.args)
        if (i + 1) % BATCH == 0 or i + 1 == ids:
            replies = pipe.execute(raise_on_error=True)
            assert all(replies), "a reserve or settle was refused while populating"
    return time.monotonic() - started


def _used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def _memory_usage(client: Any, keys: list[str]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return [x or 0 for x in pipe.execute()]


def run(results: Results, client: Any | None, quick: bool) -> None:
    ids = 10_000 if quick else IDS
    if client is not None:
        _redis(results, client, ids, quick)
    else:
        results.notes.append("section 3 Redis rows skipped: no Redis")
    _memory(results, ids, quick)


def _redis(results: Results, client: Any, ids: int, quick: bool) -> None:
    from langchain_budgetguard.stores.redis import RedisStore

    prefix = f"bgb{secrets.token_hex(3)}:"  # short and unique: its length is part of every key
    store = RedisStore(redis_url(), prefix=prefix)
    model = UsageChat()
    guard = _policy_guard(model, store)
    try:
        before = _used_memory(client)
        seconds = _populate_redis(client, store, guard, ids)
        after_all = _used_memory(client)
        sample = random.Random(7).sample(range(ids), min(1000, ids))
        plans = [guard.policy.plan(Identity({"user": _user(i)})) for i in sample]
        counter_keys = [store.redis_keys(p.keys[0]) for p in plans]
        hashes = _memory_usage(client, [c for c, _ in counter_keys])
        leases = _memory_usage(client, [lease for _, lease in counter_keys])
        records = [k.decode() for k, _ in zip(client.scan_iter(match=f"{prefix}c:*", count=1000), range(1000))]
        record_bytes = _memory_usage(client, records)
        key_len = len(counter_keys[0][0])

        # Per-call cost: one id again and again vs random ids among the 100k, interleaved.
        rounds, calls = (5, 30) if quick else (15, 60)
        solo, many = _configs(ids, rounds * calls + 50, seed=11)
        for k in range(50):
            guard.invoke(PROMPT, config=solo[k])
            guard.invoke(PROMPT, config=next(many))

        def one_id(n: int) -> None:
            for k in range(n):
                guard.invoke(PROMPT, config=solo[k])

        def many_ids(n: int) -> None:
            for _ in range(n):
                guard.invoke(PROMPT, config=next(many))

        t = interleave({"1 id": one_id, "100k ids": many_ids}, rounds, calls)
        growth = median(per_round(lambda m, o: m / o, t["100k ids"], t["1 id"]))

        # Idle counters alone: drop the per-call records, measure again.
        records_deleted = delete_prefix(client, f"{prefix}c:")
        after_counters = _used_memory(client)
    finally:
        store.close()
        delete_prefix(client, prefix)

    per_counter_info = (after_counters - before) / ids
    per_counter_usage = median(hashes) + median(leases)
    worst = max(per_counter_info, per_counter_usage)
    results.add(Row(
        "3", f"Redis bytes per idle (id, day) counter, {ids // 1000}k ids", f"{worst:,.0f} B",
        detail=(f"used_memory delta {per_counter_info:,.0f} B/counter; MEMORY USAGE median {median(hashes):,.0f} B "
                f"hash + {median(leases):,.0f} B lease set; key {key_len} chars; populated in {seconds:.1f} s"),
        goal=f"<= {MEMORY_GOAL} B", ok=worst <= MEMORY_GOAL,
        data={"ids": ids, "used_memory_delta_per_counter": per_counter_info, "memory_usage_hash_median": median(hashes),
              "memory_usage_lease_median": median(leases), "key_chars": key_len,
              "used_memory_delta_per_id_with_record": (after_all - before) / ids},
    ))
    results.add(Row(
        "3", "Redis bytes per settled-call record (history)", f"{median(record_bytes):,.0f} B",
        detail=(f"MEMORY USAGE median of {len(record_bytes)}; kept 1 day after settle: {records_deleted:,} records "
                f"for {ids:,} calls; used_memory delta with records {(after_all - before) / ids:,.0f} B/call"),
        data={"record_bytes_median": median(record_bytes), "records": records_deleted},
    ))
    results.add(Row(
        "3", f"Redis per-call latency, {ids // 1000}k ids / 1 id", f"{growth:.2f}x",
        detail=f"guarded invoke: 1 id {fmt_us(median(t['1 id']))}, random of {ids:,} ids {fmt_us(median(t['100k ids']))}",
        goal=f"<= {GROWTH_GOAL}x", ok=growth <= GROWTH_GOAL,
        data={"ratio": growth, "one_id_us": median(t["1 id"]), "many_ids_us": median(t["100k ids"])},
    ))


def _memory(results: Results, ids: int, quick: bool) -> None:
    from langchain_budgetguard.stores.memory import MemoryStore

    model = UsageChat()
    fresh = _policy_guard(model, MemoryStore())
    store = MemoryStore()
    full = _policy_guard(model, store)
    started = time.monotonic()
    base = secrets.token_hex(6)
    for i in range(ids):
        plan = full.policy.plan(Identity({"user": _user(i)}))
        call_id = f"{base}{i:x}"
        store.reserve(plan.counters(), Hold(call_id, 13_350, 600.0, 1_200))
        store.settle(call_id, plan.keys, 6_600)
    seconds = time.monotonic() - started

    rounds, calls = (5, 100) if quick else (15, 200)
    solo, many = _configs(ids, rounds * calls + 200, seed=13)
    for k in range(200):
        fresh.invoke(PROMPT, config=solo[k])
        full.invoke(PROMPT, config=next(many))

    def one_id(n: int) -> None:
        for k in range(n):
            fresh.invoke(PROMPT, config=solo[k])

    def many_ids(n: int) -> None:
        for _ in range(n):
            full.invoke(PROMPT, config=next(many))

    t = interleave({"1 id": one_id, "100k ids": many_ids}, rounds, calls)
    growth = median(per_round(lambda m, o: m / o, t["100k ids"], t["1 id"]))
    results.add(Row(
        "3", f"in-process per-call latency, {ids // 1000}k ids / 1 id", f"{growth:.2f}x",
        detail=(f"guarded invoke: 1 id, fresh store {fmt_us(median(t['1 id']))}; random of {ids:,} ids with history "
                f"{fmt_us(median(t['100k ids']))}; populated in {seconds:.1f} s"),
        goal=f"<= {GROWTH_GOAL}x", ok=growth <= GROWTH_GOAL,
        data={"ratio": growth, "one_id_us": median(t["1 id"]), "many_ids_us": median(t["100k ids"])},
    ))

    # The store sweeps expired counters and records (at most once a second) on the call that finds it due.
    pauses = []
    plan = full.policy.plan(Identity({"user": "solo"}))
    for k in range(3):
        store._next_sweep = 0.0  # make the next call the one that sweeps
        t0 = time.perf_counter()
        store.reserve(plan.counters(), Hold(f"sweep{k}", 1, 600.0, 0))
        pauses.append((time.perf_counter() - t0) * 1e6)
        store.settle(f"sweep{k}", plan.keys, 0)
    results.add(Row(
        "3", f"in-process sweep pause, {ids // 1000}k counters + records", fmt_us(median(pauses)),
        detail="paid by the call that finds the sweep due; pops expiry heaps, so it does work only for what expired",
        data={"pause_us": median(pauses), "counters": len(store._counters), "records": len(store._records)},
    ))
