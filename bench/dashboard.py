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

Then the ledger pages at 30k ledger rows (1,000 users x 30 calls under a daily limit, 10 of them
degraded, 20 refusals): one user's page (``/id/user?id=...``: its last calls and its spend curve)
and ``/events``, first response from a new ``DashboardData``, now (the store's filtered read: the
filter is tested in Redis, only matching entries come back) and before (every ledger row of the
window read with XREVRANGE and filtered in Python, as ``RedisStore.read_ledger`` did), in
interleaved rounds; the JSON of both must be the same.
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
from langchain_budgetguard.stores.ledger import LedgerRow, call_row, row_matches

from .common import Results, Row, delete_prefix, median, redis_url
from .fakes import UsageChat

IDS = 100_000
GOAL_MS = 200.0
CONCURRENCY = 200
OTHER_KEYS = 300_000
LEDGER_ROWS = 30_000
LEDGER_USERS = 1_000


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


async def populate_ledger(store: Any, policy: Any, rows: int, users: int) -> float:
    """``rows`` guarded-call-shaped settles with their ledger rows, round-robin over ``users``
    (every 3001st degraded), and 20 refusal rows. Returns seconds."""
    started = time.monotonic()
    base = secrets.token_hex(6)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        plan = policy.plan(Identity({"user": _user(i % users)}))
        call_id = f"{base}{i:x}"
        row = call_row(policy.name, call_id, plan.keys, model="gpt-4o-mini", host="api.openai.com",
                       reserved_nano=13_200, degraded=i % 3001 == 0)
        async with sem:
            result = await store.areserve(plan.counters(), Hold(call_id, 13_200, 600.0, 6_600))
            assert result.ok, "a reserve was refused while populating"
            await store.asettle(call_id, plan.keys, 6_600, row=row)

    for start in range(0, rows, 5_000):
        await asyncio.gather(*(one(i) for i in range(start, min(rows, start + 5_000))))
    for i in range(20):
        plan = policy.plan(Identity({"user": _user(i * 37 % users)}))
        await store.aappend_ledger(LedgerRow(budget=policy.name, call_id=f"{base}r{i}", kind="refusal", refused=True,
                                             scopes={"user": _user(i * 37 % users)}, keys=tuple(plan.keys),
                                             detail="over the daily limit"))
    await store.aclose()
    return time.monotonic() - started


class _EveryRow(DashboardData):
    """The ledger pages as they read before: every row of the window sent by Redis (XREVRANGE,
    pages of min(2 x limit, 5000) entries as ``RedisStore.read_ledger`` asked), parsed and
    filtered in Python."""

    def read_ledger(self, *, scope: Any = None, scope_id: Any = None, since: Any = None, kinds: Any = None,
                    limit: int = 100) -> list[Any]:
        from langchain_budgetguard.dashboard.data import as_entry

        store = self.policy.store
        low = "-" if since is None else str(int(since.timestamp() * 1000))
        page = max(200, min(limit * 2, 5000))
        client = store._sync_backend().client
        matched = []
        for slot in sorted(t.decode() if isinstance(t, bytes) else t for t in client.smembers(store.tags_key)):
            stream, high, found = f"{store.prefix}ledger:{slot}", "+", 0
            while found < limit:
                entries = client.xrevrange(stream, max=high, min=low, count=page)
                for entry_id, values in entries:
                    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                              for k, v in values.items()}
                    rows = LedgerRow.rows_of_entry(int(eid.split("-")[0]), fields)
                    order = tuple(int(p) for p in eid.split("-"))
                    for sub in range(len(rows) - 1, -1, -1):
                        row = rows[sub]
                        if row.budget == self.name and row_matches(row, scope=scope, scope_id=scope_id, since=since,
                                                                   kinds=kinds):
                            matched.append(((*order, sub), row))
                            found += 1
                if len(entries) < page:
                    break
                high = "(" + (entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0])
        matched.sort(key=lambda x: x[0], reverse=True)
        return [as_entry(row) for _, row in matched[:limit]]


def ledger_pages(results: Results, client: Any, quick: bool) -> None:
    """/id and /events first response at LEDGER_ROWS ledger rows, now and before (same run)."""
    from langchain_budgetguard.stores.redis import RedisStore

    prefix = f"bgl{secrets.token_hex(3)}:"
    store = RedisStore(redis_url(), prefix=prefix)
    guard = BudgetGuard(UsageChat(), limits=[Limit(usd=500, per="user", window="day")], store=store, name="dashl")
    try:
        seconds = asyncio.run(populate_ledger(store, guard.policy, LEDGER_ROWS, LEDGER_USERS))
        admin = BudgetAdmin(guard.policy)
        who = _user(7)
        paths = {"id": f"/id/user?id={who}", "events": "/events"}
        now, old = DashboardData(admin), _EveryRow(admin)
        for name, path in paths.items():  # the same page either way
            a = now.id_page("user", who).as_json() if name == "id" else now.events_page().as_json()
            b = old.id_page("user", who).as_json() if name == "id" else old.events_page().as_json()
            assert a == b, f"/{name}: the filtered read shows something else than reading every row"
        shown = (len(now.id_page("user", who).calls), len(now.events_page().events))
        rounds = 3 if quick else 7
        m: dict[str, list[float]] = {f"{p}_{v}": [] for p in paths for v in ("now", "api", "before")}
        for r in range(rounds):
            order = ["now", "api", "before"]
            for variant in order[r % 3:] + order[:r % 3]:
                for name, path in paths.items():
                    if variant == "before":
                        ms, _ = _first(_EveryRow(admin), path)
                    else:
                        ms, _ = _first(DashboardData(admin), path if variant == "now" else "/api" + path)
                    m[f"{name}_{variant}"].append(ms)
        for name, path, what in (("id", paths["id"], f"{shown[0]} calls shown, curve of {shown[0]}"),
                                 ("events", paths["events"], f"{shown[1]} events shown")):
            after, before = median(m[f"{name}_now"]), median(m[f"{name}_before"])
            results.add(Row(
                "7", f"dashboard {path.split('?')[0]} page, first response, {LEDGER_ROWS // 1000}k ledger rows",
                f"{after:,.0f} ms",
                detail=(f"HTML {after:,.0f} ms, JSON {median(m[f'{name}_api']):,.0f} ms ({what}); before (every row "
                        f"of the window read and filtered in Python, same run): {before:,.0f} ms "
                        f"(x{before / after:,.1f}); populated in {seconds:.1f} s; grows with the rows Redis scans "
                        f"(~3.5 us an entry)"),
                goal=f"< {GOAL_MS:.0f} ms", ok=after < GOAL_MS,
                data={"rows": LEDGER_ROWS, "first_html_ms": m[f"{name}_now"], "first_api_ms": m[f"{name}_api"],
                      "before_ms": m[f"{name}_before"]},
            ))
    finally:
        store.close()
        delete_prefix(client, prefix)


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
    ledger_pages(results, client, quick)
