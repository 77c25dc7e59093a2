"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright), on real Redis.

A scripted run (a few users spending through ``BudgetGuard`` and ``UsageChat``, one refused, and
10k more ids with one call each) is served by ``budgetguard dashboard`` in a child process; the
browser checks that the tables show the run's exact figures (the same as ``budgetguard status
--json``), that search finds one id among 10k, that sorting and paging work, and that the token
is enforced. A screenshot of each page is kept under ``.artifacts/dashboard/`` (not committed);
``UPDATE_DOCS_SCREENSHOT=1`` also rewrites ``docs/dashboard.png`` for the README.

Without chromium (or Playwright) the tests skip, except with ``CI=true``, where they must run.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from langchain_budgetguard.cli import main
from langchain_budgetguard.config import guard_from_config
from langchain_budgetguard.errors import BudgetExceededError
from langchain_budgetguard.limits import Identity
from langchain_budgetguard.stores.base import Hold
from langchain_budgetguard.stores.redis import RedisStore

from .fakes import UsageChat
from .redis_support import IN_CI, fresh_prefix, free_port, redis_url  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / ".artifacts" / "dashboard"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CALL_USD = Decimal("0.00045")  # gpt-4o-mini, 1000 tokens in and 500 out
FILLER = 10_000
FILLER_NANO = 1_000  # $0.000001 each
TOKEN = secrets.token_urlsafe(24)
SPEND = {"alice": 3, "bob": 5, "carol": 1, "dave<&>": 2}

pytestmark = pytest.mark.redis


def unavailable(reason: str) -> None:
    """Skip, or fail with CI=true, where the browser tests must run (.ci/run installs chromium)."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the dashboard's browser tests must run in CI)", pytrace=False)
    pytest.skip(reason)


def _need_browser() -> Any:
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        unavailable(f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    return sync_playwright


def _model() -> UsageChat:
    return UsageChat(model_name="gpt-4o-mini", input_tokens=1000, output_tokens=500, max_tokens=500)


async def _fill(store: RedisStore, policy: Any, n: int) -> None:
    """One call of FILLER_NANO for each of n ids ``u-00000``..., through the store's own API."""
    base = uuid.uuid4().hex[:8]
    sem = asyncio.Semaphore(50)  # below the pool's 100 connections: no task waits on the pool (2 s) on a busy machine

    async def one(i: int) -> None:
        plan = policy.plan(Identity({"user": f"u-{i:05d}"}))
        async with sem:
            assert (await store.areserve(plan.counters(), Hold(f"{base}{i}", FILLER_NANO, 600.0, 0))).ok
            await store.asettle(f"{base}{i}", plan.keys, FILLER_NANO)

    await asyncio.gather(*(one(i) for i in range(n)))
    await store.aclose()


@pytest.fixture(scope="module")
def run(redis_url, tmp_path_factory) -> Iterator[dict[str, Any]]:  # noqa: F811
    """The scripted run on Redis and its config file; the keys are deleted by redis_url at the end."""
    tmp = tmp_path_factory.mktemp("dash")
    name = f"dash-{uuid.uuid4().hex[:8]}"
    path = tmp / "deploy.toml"
    path.write_text(f"""
[budget]
name = "{name}"

[store]
url = "{redis_url}"
prefix = "{fresh_prefix()}"
override_refresh_seconds = 0.5

[[limits]]
per = "global"
window = "month"
usd = 100

[[limits]]
per = "user"
window = "day"
usd = "0.002"

[[overrides]]
per = "user"
id = "bob"
usd = "0.01"

[[overrides]]
per = "user"
id = "erin"
usd = 0
""")
    guard = guard_from_config(_model(), path)
    calls = 0
    for who, n in SPEND.items():
        for _ in range(n):
            guard.invoke("hi", config={"configurable": {"user_id": who}})
            calls += 1
    with pytest.raises(BudgetExceededError):  # erin gets nothing: refused before any model call
        guard.invoke("hi", config={"configurable": {"user_id": "erin"}})
    asyncio.run(_fill(guard.policy.store, guard.policy, FILLER))
    yield {"path": path, "guard": guard, "name": name, "calls": calls}
    guard.policy.store.close()


def _status_json(capsys: Any, path: Path, *args: str) -> dict[str, Any]:
    code = main(["status", *args, "--json", "--config", str(path)])
    out, _ = capsys.readouterr()
    assert code in (0, 1)
    return json.loads(out)


@pytest.fixture(scope="module")
def dashboard(run) -> Iterator[str]:
    """``budgetguard dashboard`` in a child process, with a token, on a free port; its base URL."""
    port = free_port()
    env = {**os.environ, "BUDGETGUARD_DASHBOARD_TOKEN": TOKEN}
    child = subprocess.Popen([sys.executable, "-m", "langchain_budgetguard", "dashboard", "--config", str(run["path"]),
                              "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/static/dashboard.css", timeout=1)
            except urllib.error.HTTPError:
                break  # it answers (401: the token)
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the dashboard did not start: {child.stderr.read()}") from None
                time.sleep(0.1)
        yield url
    finally:
        child.terminate()
        child.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(dashboard) -> Iterator[Any]:
    sync_playwright = _need_browser()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, dashboard) -> Iterator[Any]:
    """A page whose browser has opened ``/?token=`` once (the cookie carries the token)."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    tab = context.new_page()
    tab.goto(f"{dashboard}/?token={TOKEN}")
    yield tab
    context.close()


def _shot(tab: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _table(tab: Any, selector: str) -> list[dict[str, str]]:
    headers = [h.strip(" ▲▼") for h in tab.locator(f"{selector} thead th").all_inner_texts()]
    out = []
    for row in tab.locator(f"{selector} tbody tr").all():
        out.append(dict(zip(headers, [c.strip() for c in row.locator("td").all_inner_texts()])))
    return out


def _usd(text: str | None) -> str:
    return "-" if text is None else "$" + text


# -- the figures -------------------------------------------------------------------------------


def test_scope_table_shows_the_exact_figures_of_the_run(page, dashboard, run, capsys):
    expected = {s["id"]: s for s in _status_json(capsys, run["path"], "user")["statuses"]}
    assert len(expected) == len(SPEND) + FILLER
    page.goto(f"{dashboard}/scope/user")
    _shot(page, "scope")
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":  # the README's picture: the top of the page
        page.set_viewport_size({"width": 960, "height": 420})
        (ROOT / "docs").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "docs" / "dashboard.png"))
        page.set_viewport_size({"width": 1100, "height": 720})
    rows = _table(page, "#scope")
    assert len(rows) == 50  # the first page of 10,004
    assert f"{len(SPEND) + FILLER} of {len(SPEND) + FILLER} user ids" in page.inner_text("#summary")
    # Sorted by % used, heaviest first (ties: by id): alice, dave, then bob and carol at 22.5%.
    heaviest = sorted(expected.values(), key=lambda s: (-Decimal(s["used_percent"]), s["id"]))
    assert [r["id"] for r in rows] == [s["id"] for s in heaviest[:50]]
    assert [r["id"] for r in rows[:4]] == ["alice", "dave<&>", "bob", "carol"]
    for row in rows:
        want = expected[row["id"]]
        assert (row["limit"], row["spent"], row["held"], row["remaining"]) == (
            _usd(want["limit"]), _usd(want["spent"]), _usd(want["held"]), _usd(want["remaining"]))
        assert row["resets at"] == want["resets_at"]
    alice = rows[0]
    assert (alice["spent"], alice["used"], alice["remaining"]) == (f"${3 * CALL_USD}", "67.5%", "$0.00065")
    assert (rows[2]["id"], rows[2]["limit"], rows[2]["used"]) == ("bob", "$0.01", "22.5%")  # the config's override
    # The JSON twin serves the same rows.
    api = page.request.get(f"{dashboard}/api/scope/user").json()
    assert [r["id"] for r in api["rows"]] == [r["id"] for r in rows]
    assert all(r == expected[r["id"]] for r in api["rows"])


def test_one_id_shows_every_limit_and_its_calls_from_the_real_ledger(page, dashboard, run, capsys):
    page.goto(f"{dashboard}/scope/user?q=dave")
    with page.expect_navigation():
        page.click("#scope tbody tr >> text=dave<&>")  # the link from the scope page
    _shot(page, "id")
    rows = _table(page, "#counters")
    user = _status_json(capsys, run["path"], "user", "--id", "dave<&>")["statuses"][0]
    total = _status_json(capsys, run["path"], "global")["statuses"][0]
    assert [(r["scope"], r["id"], r["spent"], r["remaining"], r["limit"]) for r in rows] == [
        ("user", "dave<&>", _usd(user["spent"]), _usd(user["remaining"]), _usd(user["limit"])),
        ("global", "-", _usd(total["spent"]), _usd(total["remaining"]), _usd(total["limit"])),
    ]
    assert Decimal(total["spent"]) == run["calls"] * CALL_USD + FILLER * Decimal("0.000001")
    # The RedisStore's own ledger (issue 14): dave's calls, each at its exact cost, and the chart.
    calls = _table(page, "#calls")
    assert len(calls) == SPEND["dave<&>"] and all(c["cost"] == _usd(str(CALL_USD)) for c in calls)
    assert page.locator("#no-ledger").count() == 0 and page.locator("svg.chart").count() == 1


def test_events_page_reads_the_real_ledger(page, dashboard):
    page.goto(f"{dashboard}/events")
    _shot(page, "events")
    assert page.locator("#no-ledger").count() == 0
    # erin's refusal (the guard writes a refusal row) is among the recent events, at $0
    events = _table(page, "#events")
    refusals = [e for e in events if e.get("kind") == "refusal"]
    assert refusals and any("erin" in " ".join(e.values()) for e in refusals), events


def test_limits_page_matches_limit_get(page, dashboard, run, capsys):
    page.goto(f"{dashboard}/")
    _shot(page, "limits")
    assert main(["limit", "get", "--json", "--config", str(run["path"])]) == 0
    limits = json.loads(capsys.readouterr()[0])["limits"]
    rows = _table(page, "#limits")
    assert [(r["scope"], r["in force"], r["from"]) for r in rows] == [
        (x["scope"], _usd(x["effective"]), x["source"]) for x in limits]
    assert ("user", "bob", "$0.01", "config override") in {(r["scope"], r["id"], r["in force"], r["from"]) for r in rows}


# -- search, sort, pages -----------------------------------------------------------------------


def test_search_finds_one_id_among_10k(page, dashboard):
    page.goto(f"{dashboard}/scope/user")
    page.fill("input[type=search]", "u-07342")
    with page.expect_navigation():
        page.press("input[type=search]", "Enter")
    assert "q=u-07342" in page.url
    rows = _table(page, "#scope")
    assert [r["id"] for r in rows] == ["u-07342"]
    assert rows[0]["spent"] == "$0.000001" and rows[0]["remaining"] == "$0.001999"
    assert "1 of 10004 user ids" in page.inner_text("#summary")
    page.fill("input[type=search]", "no-such-user")
    with page.expect_navigation():
        page.press("input[type=search]", "Enter")
    assert page.locator("#empty").count() == 1


def _click(tab: Any, selector: str) -> None:
    with tab.expect_navigation():
        tab.click(selector)


def test_sorting_and_paging(page, dashboard, run, capsys):
    expected = _status_json(capsys, run["path"], "user")["statuses"]
    page.goto(f"{dashboard}/scope/user")
    _click(page, "th a[data-sort=id]")  # first click on id: ascending
    ids = [r["id"] for r in _table(page, "#scope")]
    assert "sort=id" in page.url and ids == sorted(ids) and ids[0] == "alice"
    _click(page, "th a[data-sort=id]")  # again: descending
    assert [r["id"] for r in _table(page, "#scope")][:2] == ["u-09999", "u-09998"]
    _click(page, "th a[data-sort=spent]")  # spent, heaviest first
    by_spent = sorted(expected, key=lambda s: (-Decimal(s["spent"]), s["id"]))
    assert [r["id"] for r in _table(page, "#scope")][:5] == [s["id"] for s in by_spent[:5]]
    _click(page, "th a[data-sort=remaining]")  # remaining, most first: bob has $0.00775 left
    assert _table(page, "#scope")[0]["id"] == "bob"
    page.goto(f"{dashboard}/scope/user?sort=id&order=asc")
    with page.expect_navigation():
        page.select_option("select[name=per_page]", "100")  # the script submits the form on change
    assert "per_page=100" in page.url
    first = [r["id"] for r in _table(page, "#scope")]
    assert len(first) == 100
    _click(page, "a[rel=next]")
    second = [r["id"] for r in _table(page, "#scope")]
    assert "page=2" in page.url
    assert len(second) == 100 and second[0] > first[-1] and not set(first) & set(second)
    _click(page, "a[rel=last]")
    assert "page=101" in page.url
    assert len(_table(page, "#scope")) == 4  # 10,004 ids, 100 a page
    assert "page 101 of 101" in page.inner_text(".pager")


def test_tables_work_without_javascript(browser, dashboard):
    context = browser.new_context(java_script_enabled=False)
    tab = context.new_page()
    tab.goto(f"{dashboard}/scope/user?token={TOKEN}&q=carol")
    assert [r["id"] for r in _table(tab, "#scope")] == ["carol"]
    _click(tab, "th a[data-sort=id]")
    assert _table(tab, "#scope")[0]["spent"] == f"${CALL_USD}"
    context.close()


# -- the token ---------------------------------------------------------------------------------


def test_the_token_is_enforced(browser, dashboard):
    context = browser.new_context()
    tab = context.new_page()
    reply = tab.goto(f"{dashboard}/scope/user")
    assert reply.status == 401 and "bearer token is required" in tab.inner_text("body")
    assert tab.goto(f"{dashboard}/scope/user?token=wrong-{TOKEN}").status == 401
    assert tab.request.get(f"{dashboard}/api/scope/user").status == 401
    assert tab.request.get(f"{dashboard}/api/scope/user", headers={"Authorization": f"Bearer {TOKEN}x"}).status == 401
    assert tab.request.get(f"{dashboard}/api/limits", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
    reply = tab.goto(f"{dashboard}/scope/user?token={TOKEN}&q=carol")  # sets the cookie, drops the token
    assert reply.status == 200 and "token=" not in tab.url and "q=carol" in tab.url
    assert tab.goto(f"{dashboard}/events").status == 200  # the cookie carries it
    context.close()
    for method in ("POST", "PUT", "DELETE"):
        request = urllib.request.Request(f"{dashboard}/api/limits", method=method,
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=5)
        assert failed.value.code == 405  # read-only


def test_a_non_loopback_bind_without_a_token_is_refused(run):
    env = {k: v for k, v in os.environ.items() if k != "BUDGETGUARD_DASHBOARD_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "langchain_budgetguard", "dashboard", "--config", str(run["path"]),
                           "--host", "0.0.0.0", "--port", str(free_port())], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert "refusing to serve the dashboard on 0.0.0.0 without a token" in done.stderr


def test_chromium_is_there_in_ci():
    if IN_CI:
        assert shutil.which("chromium") or os.path.exists(CHROMIUM), "CI must have Debian's chromium"


def test_with_a_ledger_the_chart_and_last_calls_render_in_the_browser(browser):
    """No store keeps a ledger yet (issue 14): a store that offers the ``read_ledger`` protocol the
    dashboard documents shows what the page does once one does."""
    from langchain_budgetguard.dashboard import DashboardData, make_server
    from langchain_budgetguard.overrides import BudgetAdmin

    from .test_dashboard import LedgerStore, ledger_rows, make_guard

    server = make_server(DashboardData(BudgetAdmin(make_guard(LedgerStore(ledger_rows(datetime.now(timezone.utc))))
                                                   .policy), cache_seconds=0), port=0)
    server.serve_in_thread()
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    try:
        tab = context.new_page()
        tab.goto(f"{server.url}/id/user?id=alice")
        chart = tab.locator("svg.chart")
        box = chart.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 100
        assert chart.locator("circle.call").count() == 2 and chart.locator("path.spend").count() == 1
        assert "$0.00045001 spent" in chart.get_attribute("aria-label")
        calls = _table(tab, "#calls")
        assert [(c["kind"], c["cost"]) for c in calls] == [("refusal", "$0"), ("call", "$0.00000001"),
                                                         ("call", "$0.00045")]
        assert "degraded" in calls[1]["flags"] and "clamped" in calls[1]["flags"]
        _shot(tab, "id-with-ledger")
        tab.goto(f"{server.url}/events")
        assert [e["kind"] for e in _table(tab, "#events")] == ["alert", "refusal", "call"]
        _shot(tab, "events-with-ledger")
    finally:
        context.close()
        server.shutdown()
        server.server_close()
