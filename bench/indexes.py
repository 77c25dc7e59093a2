"""Section 9: ``top`` and ``status user`` at 100k ids read the spend index, not the keyspace.

100k users each make one call under a per-user daily limit (reserve + settle through the store,
as in section 7). Then ``BudgetAdmin.top("user", n=10)`` and ``BudgetAdmin.statuses("user")``
(every id) are timed, before and after 300k unrelated keys are added to the same database (and
again with the SCAN the admin used before the index, for comparison). With the index, ``top``
reads 30 candidates whatever the keyspace holds and ``status`` reads the ids of the scope; the
SCAN walks every key of the database.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from langchain_budgetguard import BudgetGuard, Limit
from langchain_budgetguard.overrides import BudgetAdmin

from .common import Results, Row, delete_prefix, median, redis_url
from .dashboard import populate
from .fakes import UsageChat

IDS = 100_000
OTHER_KEYS = 300_000


def _timed(fn: Any, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def run(results: Results, client: Any | None, quick: bool) -> None:
    if client is None:
        results.notes.append("section 9 skipped: no Redis")
        return
    from langchain_budgetguard.stores.redis import RedisStore

    ids, others = (10_000, 30_000) if quick else (IDS, OTHER_KEYS)
    rounds = 3 if quick else 5
    prefix = f"bgi{secrets.token_hex(3)}:"
    junk = f"bgj{secrets.token_hex(3)}:"
    store = RedisStore(redis_url(), prefix=prefix)
    guard = BudgetGuard(UsageChat(), limits=[Limit(usd=5, per="user", window="day")], store=store, name="idx")
    try:
        seconds = asyncio.run(populate(store, guard.policy, ids))
        admin = BudgetAdmin(guard.policy)

        def top() -> None:
            assert len(admin.top("user", n=10)) == 10

        def status() -> None:
            assert len(admin.statuses("user")) == ids

        class Unindexed:  # the same store without its index: BudgetAdmin falls back to SCAN, as before
            def __getattr__(self, name: str) -> Any:
                if name == "read_index":
                    raise AttributeError(name)
                return getattr(store, name)

        old = BudgetAdmin(BudgetGuard(UsageChat(), limits=[Limit(usd=5, per="user", window="day")], store=Unindexed(),
                                      name="idx").policy)

        def scan_top() -> None:  # what top and status did before the index: SCAN, read every counter
            assert len(old.top("user", n=10)) == 10

        top()  # scripts loaded
        measured: dict[str, dict[str, list[float]]] = {}
        for phase in ("before", "after"):
            if phase == "after":
                pipe = client.pipeline(transaction=False)
                for i in range(others):
                    pipe.set(f"{junk}{i}", "x")
                    if i % 10_000 == 9_999:
                        pipe.execute()
                pipe.execute()
            keys = client.dbsize()
            measured[phase] = {"top": _timed(top, rounds), "status": _timed(status, max(2, rounds // 2)),
                               "scan": _timed(scan_top, 2), "keys": [float(keys)]}
            measured[phase]["top"] = _timed(top, 10 * rounds)  # a few ms each: more rounds for a steady median
        b, a = measured["before"], measured["after"]
        for what, title in (("top", f"top user -n 10, {ids // 1000}k ids"),
                            ("status", f"status user (all {ids // 1000}k ids)")):
            before, after = median(b[what]), median(a[what])
            ratio = after / before if before else float("inf")
            results.add(Row(
                "9", title, f"{after:,.1f} ms",
                detail=(f"{int(b['keys'][0]):,} keys in the db: {before:,.1f} ms; with {others:,} other keys "
                        f"({int(a['keys'][0]):,}): {after:,.1f} ms (x{ratio:.2f}); the SCAN it replaced: "
                        f"{median(b['scan']):,.0f} ms -> {median(a['scan']):,.0f} ms; populated in {seconds:.0f} s"),
                goal="independent of other keys (x < 1.5)", ok=ratio < 1.5,
                data={"ids": ids, "before_ms": b[what], "after_ms": a[what], "scan_before_ms": b["scan"],
                      "scan_after_ms": a["scan"], "keys_before": b["keys"][0], "keys_after": a["keys"][0]},
            ))
    finally:
        store.close()
        delete_prefix(client, prefix)
        delete_prefix(client, junk)
