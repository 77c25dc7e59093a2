"""Memory per call: what a finished call leaves behind, and for how long.

Each call leaves a record (so that a retry inside the retry window is recognised), in
``MemoryStore`` (a dict entry and an expiry-heap entry) and in Redis (``c:{tag}:<call_id>``, one
per hash tag the call touched). Records live for the retry window (default 5 minutes) after
the settle, so memory is bounded by calls/s x window, not by calls per day.

- in-process: a sustained stream of calls on a simulated clock (``MemoryStore(clock=...)``),
  RSS measured at steady state (after more than one window), divided by the records alive then.
- Redis: ``MEMORY USAGE`` of settled and held records written by the store's own scripts, and
  their TTL.
"""

from __future__ import annotations

import gc
import os
import secrets
from typing import Any

from bench.common import Results, Row, median, redis_url

RATE = 1_000  # simulated calls per second
SLICE = 0.25  # seconds of simulated time per step


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _sustained(store: Any, clock: _Clock, seconds: float, rate: int) -> None:
    from langchain_budgetguard.stores.base import Counter, Hold

    counters = [Counter("{acme}:user:alice", 10**18), Counter("{acme}:project:web", 10**18)]
    keys = [c.key for c in counters]
    per_step = int(rate * SLICE)
    steps = int(seconds / SLICE)
    base = secrets.token_hex(4)
    n = 0
    for _ in range(steps):
        for _ in range(per_step):
            cid = f"{base}{n:x}"
            n += 1
            store.reserve(counters, Hold(cid, 1_000, 600.0, 1_000))
            store.settle(cid, keys, 900)
        clock.now += SLICE


def _memory_rows(results: Results, quick: bool) -> None:
    from langchain_budgetguard.stores.memory import MemoryStore

    window = 60.0 if quick else 300.0
    rate = 200 if quick else RATE
    clock = _Clock()
    store = MemoryStore(clock=clock, retry_window_seconds=window)
    gc.collect()
    before = _rss()
    _sustained(store, clock, window * 1.5, rate)  # past one window: records now expire as fast as they come
    gc.collect()
    steady_records = len(store._records)
    steady_rss = _rss() - before
    _sustained(store, clock, window, rate)  # another window: memory must not grow
    gc.collect()
    later_records = len(store._records)
    later_rss = _rss() - before
    heap = len(store._record_expiry)
    per_record = steady_rss / max(1, steady_records)
    bounded = later_records <= rate * (window + 2) and later_rss <= steady_rss * 1.2 + 2**20
    results.add(Row(
        "6", "in-process bytes per call (RSS / live records)", f"{per_record:,.0f} B",
        detail=(f"{rate:,} calls/s sustained on a simulated clock, retry window {window:.0f} s: "
                f"{steady_records:,} live records, RSS +{steady_rss / 2**20:.1f} MiB; one window later "
                f"{later_records:,} records, +{later_rss / 2**20:.1f} MiB, expiry heap {heap:,} entries; "
                f"at 1,000 calls/s and 5 min: {per_record * 1000 * 300 / 2**20:,.0f} MiB"),
        goal="bounded by calls/s x window", ok=bounded,
        data={"rate": rate, "window": window, "records": steady_records, "rss": steady_rss,
              "records_later": later_records, "rss_later": later_rss, "bytes_per_record": per_record},
    ))


def _redis_rows(results: Results, client: Any) -> None:
    from langchain_budgetguard.stores.base import Counter, Hold
    from langchain_budgetguard.stores.redis import RedisStore

    prefix = f"bgm{secrets.token_hex(3)}:"
    store = RedisStore(redis_url(), prefix=prefix)
    key = "{acme}:default:user:alice:day:2026-11-22"
    held, settled = [], []
    try:
        for n in range(200):
            cid = secrets.token_hex(8) + f"{n:x}"
            store.reserve([Counter(key, 10**18)], Hold(cid, 13_350, 600.0, 1_200))
            if n % 2:
                store.settle(cid, [key], 6_600)
                settled.append(store.record_key(cid, key))
            else:
                held.append(store.record_key(cid, key))
        pipe = client.pipeline(transaction=False)
        for name in settled + held:
            pipe.memory_usage(name, samples=0)
            pipe.ttl(name)
        replies = pipe.execute()
    finally:
        store.close()
        for batch in (settled, held):
            if batch:
                client.delete(*batch)
        for k in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(k)
    sizes, ttls = replies[0::2], replies[1::2]
    settled_bytes, held_bytes = median(sizes[: len(settled)]), median(sizes[len(settled):])
    settled_ttl, held_ttl = max(ttls[: len(settled)]), max(ttls[len(settled):])
    window = store.retry_window_seconds
    at_rate = settled_bytes * 4_000 * window
    results.add(Row(
        "6", "Redis bytes per settled-call record", f"{settled_bytes:,.0f} B",
        detail=(f"MEMORY USAGE median; TTL {settled_ttl} s (the retry window, {window:.0f} s); a held record "
                f"{held_bytes:,.0f} B for lease + window ({held_ttl} s); at 4,000 calls/s: "
                f"{at_rate / 2**20:,.0f} MiB per tag, steady"),
        goal="TTL <= retry window", ok=settled_ttl <= window and held_ttl <= 600 + window,
        data={"settled_bytes": settled_bytes, "held_bytes": held_bytes, "settled_ttl": settled_ttl,
              "held_ttl": held_ttl, "window": window},
    ))


def run(results: Results, client: Any | None, quick: bool) -> None:
    _memory_rows(results, quick)
    if client is not None:
        _redis_rows(results, client)
    else:
        results.notes.append("section 6 Redis row skipped: no Redis")
