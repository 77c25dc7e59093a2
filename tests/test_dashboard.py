"""The dashboard without a browser: its data layer, its HTTP server, the token, the bind check,
the ledger and index protocols it expects, and the ``budgetguard dashboard`` command.

The browser tests (tests/test_dashboard_browser.py) drive the same pages in Chromium on Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from langchain_budgetguard import BudgetGuard, Limit
from langchain_budgetguard.cli import main
from langchain_budgetguard.dashboard import DashboardData, InsecureBindError, check_bind, is_loopback, make_server
from langchain_budgetguard.dashboard.chart import spend_chart
from langchain_budgetguard.dashboard.data import LEDGER_MISSING, LedgerEntry, SpendPoint, as_entry
from langchain_budgetguard.limits import Identity
from langchain_budgetguard.overrides import BudgetAdmin
from langchain_budgetguard.stores.base import Hold
from langchain_budgetguard.stores.memory import MemoryStore

from .fakes import UsageChat

CALL_USD = Decimal("0.00045")  # gpt-4o-mini, 1000 tokens in and 500 out
TOKEN = "t0ken-for-the-tests-only-1234"


def _model() -> UsageChat:
    return UsageChat(model_name="gpt-4o-mini", input_tokens=1000, output_tokens=500, max_tokens=500)


def make_guard(store: Any = None) -> BudgetGuard:
    return BudgetGuard(_model(), limits=[Limit(usd="0.01", per="user", window="day"),
                                         Limit(usd=100, per="global", window="month")],
                       store=store if store is not None else MemoryStore(), name="dash-test")


def _spend(guard: BudgetGuard, calls: dict[str, int]) -> None:
    for who, n in calls.items():
        for _ in range(n):
            guard.invoke("hi", config={"configurable": {"user_id": who}})


def _charge(policy: Any, who: str, nano: int, call_id: str) -> None:
    plan = policy.plan(Identity({"user": who}))
    assert policy.store.reserve(plan.counters(), Hold(call_id, nano, 600.0, 0)).ok
    policy.store.settle(call_id, plan.keys, nano)


class Served:
    def __init__(self, data: DashboardData, token: str | None = None) -> None:
        self.server = make_server(data, port=0, token=token)
        self.server.serve_in_thread()
        self.url = self.server.url

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, str]:
        request = urllib.request.Request(self.url + path, headers=headers or {}, method=method)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=10) as reply:
                return reply.status, dict(reply.headers), reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    def json(self, path: str, **kw: Any) -> Any:
        code, _, body = self.get(path, **kw)
        assert code == 200, body
        return json.loads(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def guard() -> BudgetGuard:
    g = make_guard()
    _spend(g, {"alice": 3, "bob": 5, "carol": 1})
    return g


@pytest.fixture
def served(guard) -> Iterator[Served]:
    s = Served(DashboardData(BudgetAdmin(guard.policy), source="deploy.toml", store="memory", cache_seconds=0))
    yield s
    s.close()


# -- the figures -------------------------------------------------------------------------------


def test_scope_json_is_the_guards_own_status_exactly(served, guard):
    page = served.json("/api/scope/user")
    assert (page["total"], page["all_ids"], page["source"], page["window"]) == (3, 3, "index", "day")  # BudgetAdmin reads the spend index
    for row in page["rows"]:
        (mine,) = [s for s in guard.status({"configurable": {"user_id": row["id"]}}) if s.scope == "user"]
        assert (row["limit"], row["spent"], row["held"], row["remaining"]) == (
            str(mine.limit), str(mine.spent), str(mine.held), str(mine.remaining))
        assert row["resets_at"] == mine.resets_at.isoformat() and row["key"] == mine.key
    assert [r["id"] for r in page["rows"]] == ["bob", "alice", "carol"]
    assert page["rows"][0]["spent"] == str(5 * CALL_USD) == "0.00225"
    assert page["rows"][0]["used_percent"] == "22.5"


def test_held_money_of_calls_in_flight_is_shown_and_taken_from_remaining(served, guard):
    plan = guard.policy.plan(Identity({"user": "carol"}))
    assert guard.policy.store.reserve(plan.counters(), Hold("in-flight", 1_234_567, 600.0, 0)).ok
    (carol,) = served.json("/api/scope/user?q=carol")["rows"]
    assert (carol["spent"], carol["held"]) == ("0.00045", "0.001234567")
    assert Decimal(carol["remaining"]) == Decimal("0.01") - CALL_USD - Decimal("0.001234567")
    code, _, html = served.get("/scope/user?q=carol")
    assert code == 200 and "$0.001234567" in html and "$0.008315433" in html


def test_one_id_lists_every_limit_and_its_real_ledger_history(served, guard):
    """The dashboard reads the stores' real ledger (issue 14) through BudgetAdmin.read_ledger."""
    page = served.json("/api/id/user?id=alice")
    assert [(s["scope"], s["id"], s["spent"]) for s in page["statuses"]] == [
        ("user", "alice", "0.00135"), ("global", None, str(9 * CALL_USD))]
    assert page["ledger"] is True and page["note"] is None
    assert len(page["calls"]) == 3 and {c["cost"] for c in page["calls"]} == {str(CALL_USD)}
    assert all(c["scopes"] == {"user": "alice", "global": "-"} and c["model"] == "gpt-4o-mini" for c in page["calls"])
    assert [p["spent"] for p in page["spend_curve"]["points"]] == ["0.00045", "0.0009", "0.00135"]  # = the counter
    code, _, html = served.get("/id/user?id=alice")
    assert code == 200 and "needs the per-call ledger" not in html and "<svg" in html
    assert served.json("/api/events")["ledger"] is True
    assert served.json("/api/id/user?id=nobody")["statuses"][0]["spent"] == "0"  # an id without spend
    assert served.json("/api/id/user?id=nobody")["calls"] == []


def test_a_store_without_a_ledger_makes_no_history_up(guard):
    class Plain:  # a store that keeps counters only (no read_ledger)
        def __init__(self, inner: MemoryStore) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            if name in ("read_ledger", "read_index"):
                raise AttributeError(name)
            return getattr(self._inner, name)

    plain = make_guard(Plain(guard.policy.store))
    served = Served(DashboardData(BudgetAdmin(plain.policy), cache_seconds=0))
    try:
        page = served.json("/api/id/user?id=alice")
        assert page["statuses"][0]["spent"] == "0.00135"
        assert page["ledger"] is False and page["note"] == LEDGER_MISSING and page["calls"] == []
        assert served.json("/api/events")["events"] == []
    finally:
        served.close()


def test_limits_page_shows_config_and_live_overrides_and_where_each_comes_from(served, guard):
    admin = BudgetAdmin(guard.policy)
    admin.set_limit("user", "0.5", "bob")
    admin.set_limit("user", "0.02")
    rows = {(r["scope"], r["id"]): (r["effective"], r["source"]) for r in served.json("/api/limits")["limits"]}
    assert rows == {("user", None): ("0.02", "store override (every id)"), ("user", "bob"): ("0.5", "store override"),
                    ("global", None): ("100", "limit")}
    by_id = {r["id"]: r for r in served.json("/api/scope/user")["rows"]}
    assert (by_id["bob"]["limit"], by_id["alice"]["limit"]) == ("0.5", "0.02")  # the limit in force per id
    code, _, html = served.get("/")
    assert code == 200 and "store override (every id)" in html and "$0.5" in html


def test_ids_are_escaped_everywhere(guard):
    evil = '<script>alert("x")</script>&'
    _spend(guard, {evil: 1})
    s = Served(DashboardData(BudgetAdmin(guard.policy), cache_seconds=0))
    try:
        for path in ("/scope/user", "/scope/user?q=%3Cscript", "/id/user?id=" + urllib.request.quote(evil)):
            code, headers, html = s.get(path)
            assert code == 200 and "<script>alert" not in html and "&lt;script&gt;alert" in html
            assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert s.json("/api/id/user?id=" + urllib.request.quote(evil))["statuses"][0]["id"] == evil
    finally:
        s.close()


# -- sort, search, pages -----------------------------------------------------------------------


@pytest.fixture
def many() -> DashboardData:
    guard = make_guard()
    for i in range(230):  # spends 1..230 nano-USD * 1000; a few ties
        _charge(guard.policy, f"user-{i:03d}", 1000 * (i % 117 + 1), f"c{i}")
    plan = guard.policy.plan(Identity({"user": "user-005"}))
    assert guard.policy.store.reserve(plan.counters(), Hold("held", 7_000_000, 600.0, 0)).ok
    return DashboardData(BudgetAdmin(guard.policy), cache_seconds=0)


@pytest.mark.parametrize("sort", ["used", "spent", "held", "remaining", "limit", "id", "resets"])
@pytest.mark.parametrize("descending", [True, False])
def test_every_sort_orders_every_page_with_ties_by_id(many, sort, descending):
    rows = []
    for n in range(1, 6):
        page = many.scope_page("user", sort=sort, descending=descending, page=n, per_page=50)
        assert page.pages == 5 and page.total == 230 and page.page == n
        rows.extend(page.rows)
    assert len(rows) == 230 and len({r.scope_id for r in rows}) == 230
    key = {"used": lambda s: s.spent + s.held, "spent": lambda s: s.spent, "held": lambda s: s.held,
           "remaining": lambda s: s.remaining, "limit": lambda s: s.limit, "id": lambda s: s.scope_id,
           "resets": lambda s: s.resets_at}[sort]
    expected = sorted(rows, key=lambda s: s.scope_id)
    expected.sort(key=key, reverse=descending)
    assert [r.scope_id for r in rows] == [r.scope_id for r in expected]
    if sort == "used" and descending:
        assert rows[0].scope_id == "user-005"  # $0.007 held beats the heaviest spender


def test_search_is_a_substring_on_the_id_and_pages_clamp(many):
    page = many.scope_page("user", search="USER-2", per_page=50)
    assert page.total == 30 and all("user-2" in r.scope_id for r in page.rows)
    assert [r.scope_id for r in many.scope_page("user", search="-117").rows] == ["user-117"]
    assert many.scope_page("user", search="nobody").rows == ()
    last = many.scope_page("user", page=99, per_page=100)
    assert (last.page, last.pages, len(last.rows)) == (3, 3, 30)
    for bad in ({"per_page": 10}, {"page": 0}, {"sort": "cost"}):
        with pytest.raises(ValueError):
            many.scope_page("user", **bad)
    with pytest.raises(LookupError, match="has no limit per 'team'"):
        many.scope_page("team")


def test_bad_query_parameters_are_a_400_that_says_what_to_do(many):
    s = Served(many)
    try:
        for path, text in (("/api/scope/user?per_page=7", "expected 50 or 100"), ("/api/scope/user?page=x", "whole"),
                           ("/api/scope/user?order=up", "asc or desc"), ("/api/scope/user?sort=cost", "sort:"),
                           ("/api/scope/user?window=month", "no limit per user per month"),
                           ("/api/id/user", "say which user")):
            code, _, body = s.get(path)
            assert code == 400 and text in json.loads(body)["error"], (path, body)
        assert s.get("/api/scope/team")[0] == 404 and s.get("/nowhere")[0] == 404
        assert s.get("/static/../data.py")[0] == 404
    finally:
        s.close()


def test_paging_and_sorting_reuse_the_ids_within_the_cache_time():
    guard = make_guard()
    _spend(guard, {"alice": 1})
    calls = []
    admin = BudgetAdmin(guard.policy)
    real = admin.limit_statuses

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    admin.limit_statuses = counting  # type: ignore[method-assign]
    now = [0.0]
    data = DashboardData(admin, cache_seconds=2.0, clock=lambda: now[0])
    data.scope_page("user")
    data.scope_page("user", sort="id", descending=False, search="a")
    assert len(calls) == 1
    now[0] = 2.5
    data.scope_page("user")
    assert len(calls) == 2


def test_a_scope_index_replaces_the_scan_when_the_admin_has_one():
    guard = make_guard()
    _spend(guard, {"alice": 1, "bob": 2})

    class IndexedAdmin(BudgetAdmin):
        def read_scope_index(self, limit: Limit, window_label: str) -> list[Any]:
            self.asked = (limit.per, limit.window, window_label)
            return [s for s in self.statuses("user", "alice") + self.statuses("user", "bob")]

    store = guard.policy.store
    store.scan_counters = lambda pattern: pytest.fail("scanned although an index exists")  # type: ignore[method-assign]
    admin = IndexedAdmin(guard.policy)
    page = DashboardData(admin, cache_seconds=0).scope_page("user")
    assert page.source == "index" and [r.scope_id for r in page.rows] == ["bob", "alice"]
    assert admin.asked[:2] == ("user", "day")


# -- the ledger protocol -----------------------------------------------------------------------


class LedgerStore(MemoryStore):
    """A store with a ledger, as issue 14 will give one (rows as mappings, amounts as exact strings)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__()
        self.rows, self.asked = rows, []

    def read_ledger(self, name: str, *, scope=None, scope_id=None, since=None, kinds=None, limit=100):
        self.asked.append({"name": name, "scope": scope, "scope_id": scope_id, "since": since, "kinds": kinds,
                           "limit": limit})
        out = [r for r in self.rows if (scope is None or r["scopes"].get(scope) == scope_id)
               and (since is None or r["at"] >= since)
               and (kinds is None or r["kind"] in kinds or (r.get("degraded") and "degrade" in kinds))]
        return out[-limit:]


def ledger_rows(now: datetime) -> list[dict[str, Any]]:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return [
        {"at": start - timedelta(hours=1), "kind": "call", "scopes": {"user": "alice"}, "model": "gpt-4o",
         "tokens": {"input": 10, "output": 5}, "cost": "0.5"},  # yesterday: not in today's curve
        {"at": start + timedelta(seconds=10), "kind": "call", "scopes": {"user": "alice"}, "model": "gpt-4o",
         "tokens": {"input": 1000, "output": 500}, "cost": "0.00045", "reserved": "0.0009"},
        {"at": start + timedelta(seconds=20), "kind": "call", "scopes": {"user": "alice"}, "model": "gpt-4o-mini",
         "tokens": {"input": 1000, "output": 200}, "cost": Decimal("0.00000001"), "degraded": True, "clamped": True},
        {"at": start + timedelta(seconds=30), "kind": "refusal", "scopes": {"user": "alice"}, "model": "gpt-4o",
         "cost": "0", "detail": "user alice: $0.01 per day, $0.00045001 spent"},
        {"at": start + timedelta(seconds=40), "kind": "alert", "scopes": {"user": "bob"}, "detail": "80% of $5"},
    ]


def test_with_a_ledger_the_id_page_charts_exact_spend_and_lists_the_last_calls():
    now = datetime.now(timezone.utc)
    store = LedgerStore(ledger_rows(now))
    data = DashboardData(BudgetAdmin(make_guard(store).policy), cache_seconds=0)
    s = Served(data)
    try:
        page = s.json("/api/id/user?id=alice")
        assert page["ledger"] is True and page["note"] is None
        assert [p["spent"] for p in page["spend_curve"]["points"]] == ["0.00045", "0.00045001"]  # exact, cumulative
        assert [c["kind"] for c in page["calls"]] == ["refusal", "call", "call"]  # newest first, today only
        assert page["calls"][1]["degraded"] is True and page["calls"][1]["cost"] == "0.00000001"
        assert store.asked[-1]["name"] == "dash-test" and store.asked[-1]["scope_id"] == "alice"
        code, _, html = s.get("/id/user?id=alice")
        assert code == 200 and "<svg" in html and "$0.00045001 spent" in html and "clamped" in html
        assert LEDGER_MISSING not in html
        events = s.json("/api/events")["events"]
        assert [(e["kind"], e["scopes"]) for e in events] == [
            ("alert", {"user": "bob"}), ("refusal", {"user": "alice"}), ("call", {"user": "alice"})]
        assert set(store.asked[-1]["kinds"]) == {"refusal", "degrade", "alert"}
        code, _, html = s.get("/events")
        assert code == 200 and "80% of $5" in html and "Not available" not in html
    finally:
        s.close()


def test_a_float_amount_in_a_ledger_row_is_refused_not_shown():
    with pytest.raises(TypeError, match="never a float"):
        as_entry({"at": datetime.now(timezone.utc), "cost": 0.1})
    now = datetime.now(timezone.utc)
    rows = ledger_rows(now)
    rows[1]["cost"] = 0.00045
    s = Served(DashboardData(BudgetAdmin(make_guard(LedgerStore(rows)).policy), cache_seconds=0))
    try:
        code, _, body = s.get("/api/id/user?id=alice")
        assert code == 500 and "never a float" in json.loads(body)["error"]
    finally:
        s.close()


def test_the_chart_is_exact_svg_with_no_float_noise():
    since = datetime(2026, 11, 1, tzinfo=timezone.utc)
    points = [SpendPoint(since + timedelta(days=1), Decimal("0.1")),
              SpendPoint(since + timedelta(days=2), Decimal("0.30000001"))]
    svg = spend_chart(points, since, since + timedelta(days=30), Decimal("1"))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "$0.30000001 spent" in svg and "limit $1" in svg and "e-" not in svg and "E-" not in svg
    assert "<path" in svg and svg.count("<circle") == 2
    assert "<svg" in spend_chart([], since, since + timedelta(days=1))  # an empty window draws an axis


def test_ledger_entry_total_tokens():
    assert LedgerEntry(at=datetime.now(timezone.utc), tokens={"input": 3, "output": 4}).total_tokens == 7


# -- the token and the bind ----------------------------------------------------------------------


def test_the_token_is_required_on_every_route(guard):
    s = Served(DashboardData(BudgetAdmin(guard.policy), cache_seconds=0), token=TOKEN)
    try:
        for path in ("/", "/scope/user", "/api/scope/user", "/api/limits", "/id/user?id=alice", "/events",
                     "/static/dashboard.css"):
            code, headers, body = s.get(path)
            assert code == 401 and "alice" not in body and headers["WWW-Authenticate"].startswith("Bearer")
            assert s.get(path, headers={"Authorization": f"Bearer {TOKEN[:-1]}"})[0] == 401
            assert s.get(path, headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
            assert s.get(path, headers={"Cookie": f"budgetguard_token={TOKEN}x"})[0] == 401
            assert s.get(path, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        code, headers, _ = s.get(f"/scope/user?q=al&token={TOKEN}")
        assert code == 303 and headers["Location"] == "/scope/user?q=al"
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        assert s.get("/scope/user?q=al", headers={"Cookie": headers["Set-Cookie"].split(";")[0]})[0] == 200
        assert s.get("/", headers={"Cookie": '"; garbage=\\x'})[0] == 401
        assert s.get("/?token=nope")[0] == 401
        code, _, body = s.get("/api/limits", headers={"Authorization": f"Bearer {TOKEN}"}, method="POST")
        assert code == 405 and "read-only" in body
        assert s.get("/api/limits", headers={"Authorization": f"Bearer {TOKEN}"}, method="HEAD")[0] == 200
    finally:
        s.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.1", "no-such-host.invalid"])
def test_a_non_loopback_address_needs_a_token(host):
    assert not is_loopback(host)
    with pytest.raises(InsecureBindError, match="without a token"):
        check_bind(host, None)
    check_bind(host, TOKEN)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_needs_no_token(host):
    assert is_loopback(host)
    check_bind(host, None)


def test_a_weak_or_unsafe_token_is_refused():
    for token in ("short", "x" * 15, "a" * 20 + ";b", "a" * 20 + " b", "ä" * 20):
        with pytest.raises(InsecureBindError, match="16 or more characters"):
            check_bind("127.0.0.1", token)
    with pytest.raises(InsecureBindError):
        make_server(DashboardData(BudgetAdmin(make_guard().policy)), host="0.0.0.0", port=0)


# -- the command -------------------------------------------------------------------------------


def _config(tmp_path: Path, url: str = "memory") -> Path:
    path = tmp_path / "deploy.toml"
    path.write_text(f'[budget]\nname = "cmd"\n[store]\nurl = "{url}"\n[[limits]]\nper = "user"\nwindow = "day"\n'
                    'usd = 3\n[[overrides]]\nper = "user"\nid = "ci-bot"\nusd = 0\n')
    return path


def test_the_command_refuses_a_non_loopback_bind_without_a_token(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("BUDGETGUARD_DASHBOARD_TOKEN", raising=False)
    path = _config(tmp_path)
    assert main(["dashboard", "--config", str(path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve the dashboard on 0.0.0.0 without a token" in err and "--token" in err
    assert main(["dashboard", "--config", str(path), "--token", "short"]) == 2
    assert main(["dashboard", "--config", str(path), "--port", "70000"]) == 2
    monkeypatch.delenv("BUDGETGUARD_CONFIG", raising=False)
    assert main(["dashboard"]) == 2 and "no config file" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "dashboard" in capsys.readouterr().out


def test_the_command_serves_the_config_and_takes_the_token_from_the_environment(tmp_path):
    path = _config(tmp_path)
    env = {**os.environ, "BUDGETGUARD_DASHBOARD_TOKEN": TOKEN}
    child = subprocess.Popen([sys.executable, "-m", "langchain_budgetguard", "dashboard", "--config", str(path),
                              "--port", "0"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stderr.readline()
        assert "dashboard of budget cmd on http://127.0.0.1:" in line and "bearer token required" in line
        url = line.split(" on ", 1)[1].split("/ ", 1)[0]
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(url + "/api/limits", timeout=10)
        assert failed.value.code == 401
        request = urllib.request.Request(url + "/api/limits", headers={"Authorization": f"Bearer {TOKEN}"})
        limits = json.loads(urllib.request.urlopen(request, timeout=10).read())["limits"]
        assert [(r["id"], r["effective"], r["source"]) for r in limits] == [
            (None, "3", "limit"), ("ci-bot", "0", "config override")]
    finally:
        child.terminate()
        child.wait(timeout=10)


def test_an_unreachable_store_is_a_503_page_not_a_crash(tmp_path):
    from langchain_budgetguard.config import load_config

    config = load_config(_config(tmp_path, "redis://127.0.0.1:1/0"))
    s = Served(DashboardData(BudgetAdmin(config.policy()), cache_seconds=0))
    try:
        started = time.monotonic()
        code, _, body = s.get("/api/scope/user")
        assert code == 503 and "could not be reached" in json.loads(body)["error"]
        assert time.monotonic() - started < 10
        code, _, html = s.get("/id/user?id=alice")
        assert code == 503 and "could not be reached" in html
    finally:
        s.close()


def test_concurrent_requests_are_served(served):
    codes: list[int] = []

    def hit() -> None:
        codes.append(served.get("/api/scope/user")[0])

    threads = [threading.Thread(target=hit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 8
