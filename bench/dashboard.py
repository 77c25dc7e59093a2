"""Section 7: the dashboard's scope page with 100k ids in Redis.

100k users each make one call under a per-user daily limit (reserve + settle through the store's
public async API, so the keys are the real ones: counter hash, lease set, per-call record, spend
index). Then the dashboard is served on a free port and its scope page (``/scope/user``, HTML, and
``/api/scope/user``) is fetched over HTTP, each time from a new ``DashboardData`` (nothing cached),
as when an operator opens the page, in interleaved rounds:

- now: the default order (% used, highest first) reads the head of the spend index (the page,
  a margin and the ids with their own limit) and those counters only;
- before: every id of the index and every counter read, then sorted (what the page did before,
  and what it still does for a search or a sort by held, remaining, limit, id or reset time);
- again after 300k unrelated keys are added to the database: the cost must not move.

Also: page 2 of the default order, and page 2 sorted by id within the data's cache time.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import urllib.request
from typing import Any

from langchain_budgetguard import BudgetGuard, Limit
from langchain_budgetguard.dashboard import DashboardData, make_server
from langchain_budgetguard.limits import Identity
from langchain_budgetguard.overrides import BudgetAdmin
from langchain_budgetguard.stores.base import Hold

from .common import Results, Row, delete_prefix, median, redis_url
from .fakes import UsageChat

IDS = 100_000
GOAL_MS = 200.0
CONCURRENCY = 200
OTHER_KEYS = 300_000


def _user(i: int) -> str:
    return f"user-{i:010d}"


async def populate(store: Any, policy: Any, ids: int, amount: int = 6_600) -> float:
    """One reserve + settle of ``amount`` nano-USD per id, ``CONCURRENCY`` at a time. Returns seconds."""
    started = time.monotonic()
    base = secrets.token_hex(6)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        plan = policy.plan(Identity({"user": _user(i)}))
        call_id = f"{base}{i:x}"
        async with sem:
            result = await store.areserve(plan.counters(), Hold(call_id, amount * 2, 600.0, amount))
            assert result.ok, "a reserve was refused while populating"
            await store.asettle(call_id, plan.keys, amount)

    for start in range(0, ids, 5_000):
        await asyncio.gather(*(one(i) for i in range(start, min(ids, start + 5_000))))
    await store.aclose()
    return time.monotonic() - started


def _get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as reply:
        body = reply.read()
    return (time.perf_counter() - t0) * 1000, len(body)


class _EveryCounter(DashboardData):
    """The scope page as it was before it read the index's head: every counter, then sorted."""

    def ranked_page(self, *args: Any, **kwargs: Any) -> None:
        return None


def _first(data: DashboardData, path: str) -> tuple[float, int]:
    server = make_server(data, port=0)
    server.serve_in_thread()
    try:
        return _get(server.url + path)
    finally:
        server.shutdown()
        server.server_close()


def run(results: Results, client: Any | None, quick: bool) -> None:
    if client is None:
        results.notes.append("section 7 skipped: no Redis")
        return
    from langchain_budgetguard.stores.redis import RedisStore

    ids, others = (10_000, 30_000) if quick else (IDS, OTHER_KEYS)
    prefix = f"bgd{secrets.token_hex(3)}:"
    junk = f"bgj{secrets.token_hex(3)}:"
    store = RedisStore(redis_url(), prefix=prefix)
    guard = BudgetGuard(UsageChat(), limits=[Limit(usd=5, per="user", window="day")], store=store, name="dash")
    try:
        seconds = asyncio.run(populate(store, guard.policy, ids))
        admin = BudgetAdmin(guard.policy)
        rounds = 3 if quick else 5
        m: dict[str, list[float]] = {k: [] for k in ("html", "api", "before", "html_junk", "api_junk",
                                                     "before_junk", "next", "by_id")}
        size = 0
        keys = {}
        for phase in ("", "_junk"):
            if phase:
                pipe = client.pipeline(transaction=False)
                for i in range(others):
                    pipe.set(f"{junk}{i}", "x")
                    if i % 10_000 == 9_999:
                        pipe.execute()
                pipe.execute()
            keys[phase] = client.dbsize()
            for r in range(rounds):
                order = ["html", "api", "before"]
                for what in order[r % 3:] + order[:r % 3]:  # rotate, so that no variant always goes first
                    if what == "before":
                        ms, _ = _first(_EveryCounter(admin, cache_seconds=60.0), "/scope/user")
                    else:
                        ms, n = _first(DashboardData(admin, cache_seconds=60.0),
                                       "/scope/user" if what == "html" else "/api/scope/user")
                        size = n if what == "html" else size
                    m[what + phase].append(ms)
            if not phase:
                data = DashboardData(admin, cache_seconds=60.0)
                server = make_server(data, port=0)
                server.serve_in_thread()
                try:
                    _get(server.url + "/scope/user?sort=id&order=asc")  # fills the cache of every id
                    for _ in range(rounds):
                        m["next"].append(_get(server.url + "/scope/user?page=2")[0])
                        m["by_id"].append(_get(server.url + "/scope/user?page=2&sort=id&order=asc")[0])
                finally:
                    server.shutdown()
                    server.server_close()
        first, junked, before = median(m["html"]), median(m["html_junk"]), median(m["before"])
        ratio = junked / first if first else float("inf")
        results.add(Row(
            "7", f"dashboard scope page, first response, {ids // 1000}k ids", f"{first:,.0f} ms",
            detail=(f"HTML {first:,.0f} ms ({size:,} B), JSON {median(m['api']):,.0f} ms; before (every counter "
                    f"read, same run): {before:,.0f} ms (x{before / first:,.0f}); {keys['']:,} keys in the db; "
                    f"populated in {seconds:.1f} s"),
            goal=f"< {GOAL_MS:.0f} ms", ok=first < GOAL_MS,
            data={"ids": ids, "first_html_ms": m["html"], "first_api_ms": m["api"], "before_ms": m["before"],
                  "keys": keys[""]},
        ))
        results.add(Row(
            "7", f"dashboard scope page, first response, {ids // 1000}k ids + {others // 1000}k other keys",
            f"{junked:,.0f} ms",
            detail=(f"HTML {junked:,.0f} ms (x{ratio:.2f} of without them), JSON {median(m['api_junk']):,.0f} ms; "
                    f"before: {median(m['before_junk']):,.0f} ms; {keys['_junk']:,} keys in the db"),
            goal=f"< {GOAL_MS:.0f} ms, x < 1.5", ok=junked < GOAL_MS and ratio < 1.5,
            data={"first_html_ms": m["html_junk"], "first_api_ms": m["api_junk"], "before_ms": m["before_junk"],
                  "keys": keys["_junk"]},
        ))
        results.add(Row(
            "7", "dashboard scope page, page 2 by % used; page 2 by id (cached ids)",
            f"{median(m['next']):,.0f} ms; {median(m['by_id']):,.0f} ms",
            detail=("page 2 of the default order reads the index's head again; a sort by id (or a search) reads "
                    "every counter once, then pages from the data's cache"),
            data={"next_ms": m["next"], "by_id_ms": m["by_id"]},
        ))
    finally:
        store.close()
        delete_prefix(client, prefix)
        delete_prefix(client, junk)
