"""The scope page's default order (by % used or spend) read from the head of the spend index:
the same pages, figures, totals and order as reading every counter, with only the page's
share of counters read, on the in-process store, on Redis and on a Redis Cluster (one tag, and a tag per tenant)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from langchain_budgetguard import BudgetGuard, Limit
from langchain_budgetguard.dashboard import DashboardData
from langchain_budgetguard.dashboard.data import RANKED_MARGIN
from langchain_budgetguard.limits import Identity
from langchain_budgetguard.overrides import BudgetAdmin, Override
from langchain_budgetguard.policy import LimitStatus
from langchain_budgetguard.stores.base import Hold
from langchain_budgetguard.stores.memory import MemoryStore
from langchain_budgetguard.stores.redis import RedisStore

from .fakes import UsageChat
from .redis_support import RedisServer, fresh_prefix, redis_url, start_cluster  # noqa: F401 - fixture

IDS = 700  # > 2 pages of 100 + the margin: the first pages are read from the index's head
ODD = ["zoë", "a b", "x" * 120]  # escaped ids (%-escapes, hashed): their tie order is by id too


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    servers = start_cluster(tmp_path_factory.mktemp("redis-cluster-dash"))
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "cluster":
        nodes = request.getfixturevalue("cluster")
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in nodes[:2])
    else:
        url = request.getfixturevalue("redis_url")
    with RedisStore(url, prefix=fresh_prefix()) as s:
        yield s


def _guard(store: Any, tenants: bool) -> BudgetGuard:
    limits = [Limit(usd="0.01", per="user", window="day"), Limit(usd=100, per="global", window="month")]
    if tenants:  # a limit per tenant puts each tenant's user counters under their own hash tag
        limits.append(Limit(usd=100, per="tenant", window="day"))
    return BudgetGuard(UsageChat(), limits=limits, store=store, name=f"dash-{uuid.uuid4().hex[:6]}",
                       overrides=[Override(per="user", id="user-0007", usd="0.02")])


def _populate(guard: BudgetGuard, tenants: bool) -> list[str]:
    """IDS ids with spends from 12 values (ties across every page boundary), one call in flight."""
    policy, ids = guard.policy, [f"user-{i:04d}" for i in range(IDS - len(ODD))] + ODD
    for i, who in enumerate(ids):
        who_ids = {"user": who, **({"tenant": f"t{i % 3}"} if tenants else {})}
        plan = policy.plan(Identity(who_ids))
        nano = 1_000 * ((i * 7) % 12 + 1)
        cid = uuid.uuid4().hex
        assert policy.store.reserve(plan.counters(), Hold(cid, nano, 600.0, 0)).ok
        assert policy.store.settle(cid, plan.keys, nano).applied
    # user-0689 (spent 0.000012, the most, tied with 57 ids before it) has 0.006 held by a call in
    # flight: 60.12% used, ahead of them all. (A hold on an id beyond the index's head is not seen in
    # the order until its call settles: see DashboardData.ranked_page.)
    plan = policy.plan(Identity({"user": "user-0689", **({"tenant": "t2"} if tenants else {})}))
    assert policy.store.reserve(plan.counters(), Hold("in-flight", 6_000_000, 600.0, 0)).ok
    admin = BudgetAdmin(policy)
    admin.set_limit("user", "0.000001", scope_id="user-0011")  # live override: 600% used, spent 0.000006
    admin.set_limit("user", "1", scope_id="user-0005")  # a big live override: near 0% used, spent 0.000012
    return ids


def _expected(data: DashboardData, sort: str, descending: bool) -> list[LimitStatus]:
    """Every counter read (the full path), sorted as the page sorts."""
    rows = list(data.scope_rows("user")[2])
    assert len(rows) == IDS
    rows.sort(key=lambda s: s.scope_id or "")
    used = lambda s: (s.spent + s.held) / s.limit  # noqa: E731 - no $0 limit here
    rows.sort(key=used if sort == "used" else (lambda s: s.spent), reverse=descending)
    return rows


@pytest.mark.parametrize("tenants", [False, True], ids=["one-tag", "tag-per-tenant"])
def test_first_pages_by_used_and_spent_match_reading_every_counter(store: Any, tenants: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    guard = _guard(store, tenants)
    ids = _populate(guard, tenants)
    data = DashboardData(BudgetAdmin(guard.policy), cache_seconds=0)
    read_keys: list[int] = []
    real_read = store.read

    def counting_read(keys: Any) -> Any:
        read_keys.append(len(keys))
        return real_read(keys)

    for sort in ("used", "spent"):
        for descending in (True, False):
            expected = _expected(data, sort, descending)
            monkeypatch.setattr(store, "read", counting_read)
            read_keys.clear()
            for page in (1, 2, 3, 7):  # 1-3 from the index's head; 7 (the last) reads every counter
                got = data.scope_page("user", sort=sort, descending=descending, page=page, per_page=100)
                assert (got.total, got.all_ids, got.pages, got.page, got.source) == (IDS, IDS, 7, page, "index")
                want = expected[(page - 1) * 100:page * 100]
                assert [(r.scope_id, r.limit, r.spent, r.held, r.remaining, r.key) for r in got.rows] == [
                    (r.scope_id, r.limit, r.spent, r.held, r.remaining, r.key) for r in want], (sort, descending, page)
                if page == 1:  # the head only: the page, the margin and the ids with their own limit
                    assert sum(read_keys) <= 100 + RANKED_MARGIN + 2 * 3 < IDS  # 3 ids with their own limit
                    read_keys.clear()
            monkeypatch.setattr(store, "read", real_read)
    first = data.scope_page("user").rows
    assert [r.scope_id for r in first[:3]] == ["user-0011", "user-0689", "user-0017"]  # override; held; by id
    assert (first[0].limit, first[0].spent) == (Decimal("0.000001"), Decimal("0.000006"))
    assert (first[1].spent, first[1].held) == (Decimal("0.000012"), Decimal("0.006"))
    lowest = data.scope_page("user", descending=False).rows
    assert lowest[0].scope_id == "user-0005" and lowest[0].limit == Decimal(1)  # its $1 limit: least used
    assert any(r.scope_id == "user-0007" and r.limit == Decimal("0.02") for r in lowest)  # config override
    # search and the other sorts read every counter: still exact over all ids
    hits = data.scope_page("user", search="USER-00", sort="spent", per_page=100)
    assert hits.total == 100 and {r.scope_id for r in hits.rows} == {i for i in ids if "user-00" in i}
    odd = data.scope_page("user", search="Ë", per_page=50)
    assert [r.scope_id for r in odd.rows] == ["zoë"]
    by_id = data.scope_page("user", sort="id", descending=False, page=7, per_page=100)
    shown = sorted(r.scope_id or "" for r in data.scope_rows("user")[2])  # a hashed id shows as its hash
    assert [r.scope_id for r in by_id.rows] == shown[600:] and "zoë" in shown


def test_all_ids_tied_first_page_is_by_id(store: Any) -> None:
    """Every id spent the same (as in the benchmark): page 1 is the lowest ids, as a full sort gives."""
    guard = _guard(store, False)
    policy = guard.policy
    for i in range(IDS):
        plan = policy.plan(Identity({"user": f"u{(i * 389) % IDS:04d}"}))
        assert policy.store.reserve(plan.counters(), Hold(f"c{i}", 6_600, 600.0, 0)).ok
        policy.store.settle(f"c{i}", plan.keys, 6_600)
    data = DashboardData(BudgetAdmin(policy), cache_seconds=0)
    for descending in (True, False):
        page = data.scope_page("user", descending=descending, page=2, per_page=50)
        assert [r.scope_id for r in page.rows] == [f"u{i:04d}" for i in range(50, 100)]
        assert all(r.spent == Decimal("0.0000066") for r in page.rows)


def test_read_index_page_arguments_are_checked(store: Any) -> None:
    for bad, error in ((("x", 1), ValueError), (("a:b:c", 0), ValueError), (("a:b:c", True), ValueError)):
        with pytest.raises(error):
            store.read_index_page(*bad)
    with pytest.raises(TypeError, match="members"):
        store.read_index_page("a:b:c", 5, members="alice")
    with pytest.raises(TypeError, match="descending"):
        store.read_index_page("a:b:c", 5, descending="yes")
    page = store.read_index_page("a:b:c", 5, members=["alice"])
    assert (page.total, page.rows, page.named) == (0, [], [])


class _EveryRow(DashboardData):
    """The ledger pages as they read before: every row of the budget, filtered in Python."""

    def read_ledger(self, *, scope: Any = None, scope_id: Any = None, since: Any = None, kinds: Any = None,
                    limit: int = 100) -> list[Any]:
        from langchain_budgetguard.dashboard.data import as_entry
        from langchain_budgetguard.stores.ledger import row_matches

        rows = self.policy.store.read_ledger(self.name, limit=1_000_000)
        return [as_entry(r) for r in rows if row_matches(r, scope=scope, scope_id=scope_id, since=since,
                                                             kinds=kinds)][:limit]


@pytest.mark.parametrize("tenants", [False, True], ids=["one-tag", "tag-per-tenant"])
def test_id_and_events_pages_read_only_their_rows_and_show_what_every_row_gives(
        store: Any, tenants: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An id's page (its last calls, its spend curve) and the events page, from guarded calls of 60
    ids, refusals among them: the same as filtering every ledger row, and on Redis only the
    entries of those rows reach Python."""
    from langchain_budgetguard import BudgetExceededError
    from langchain_budgetguard.stores.base import LedgerRow

    guard = _guard(store, tenants)
    BudgetAdmin(guard.policy).set_limit("user", "0.000001", scope_id="user-0003")  # every call of it refused
    for i in range(240):
        who = {"user_id": f"user-{i % 60:04d}", **({"tenant_id": f"t{i % 3}"} if tenants else {})}
        try:
            guard.invoke("hi", config={"configurable": who})
        except BudgetExceededError:
            pass
    admin = BudgetAdmin(guard.policy)
    data, before = DashboardData(admin, cache_seconds=0), _EveryRow(admin, cache_seconds=0)
    parsed: list[int] = []
    original = LedgerRow.rows_of_entry.__func__  # type: ignore[attr-defined]

    def counting(cls: type[LedgerRow], at_ms: int, values: Any) -> list[LedgerRow]:
        parsed.append(at_ms)
        return original(cls, at_ms, values)

    for who in ("user-0007", "user-0003", "user-0059", "nobody"):
        tenant = {"tenant": "t1"} if tenants and who == "user-0007" else {}
        want = before.id_page("user", who, **tenant).as_json()
        monkeypatch.setattr(LedgerRow, "rows_of_entry", classmethod(counting))
        parsed.clear()
        got = data.id_page("user", who, **tenant).as_json()
        monkeypatch.undo()
        assert got == want, who
        if isinstance(store, RedisStore):
            assert len(parsed) <= len(want["calls"]) + 2, (who, len(parsed))
    assert len(before.id_page("user", "user-0007").calls) == 4
    assert {e["kind"] for e in before.id_page("user", "user-0003").as_json()["calls"]} == {"refusal"}
    want = before.events_page().as_json()
    monkeypatch.setattr(LedgerRow, "rows_of_entry", classmethod(counting))
    parsed.clear()
    got = data.events_page().as_json()
    monkeypatch.undo()
    assert got == want and len(want["events"]) == 4
    if isinstance(store, RedisStore):
        assert len(parsed) <= len(want["events"]) + 2
