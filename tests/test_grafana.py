"""The shipped Grafana dashboard: importable (Grafana's dashboard JSON model), and every metric and
label its PromQL uses is one that BudgetMetrics actually exports after a scripted run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from langchain_budgetguard import BudgetExceededError, BudgetGuard, BudgetStoreUnavailableError, Limit
from langchain_budgetguard.metrics import BudgetMetrics
from langchain_budgetguard.stores.memory import MemoryStore

from .fakes import UsageChat
from .redis_support import free_port

DASHBOARD = Path(__file__).resolve().parents[1] / "config" / "grafana-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# PromQL functions and aggregations the dashboard may call, and its keywords.
FUNCTIONS = {"sum", "min", "max", "avg", "count", "topk", "bottomk", "rate", "increase", "clamp_min",
             "label_values"}
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"")
IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text("utf-8"))


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def exprs(board: dict) -> list[str]:
    """The PromQL of every panel (the variables' label_values(...) are checked on their own)."""
    return [t["expr"] for p in panels(board) for t in p.get("targets", [])]


def parse(expr: str) -> tuple[list[tuple[str | None, dict[str, tuple[str, str]]]], set[str], set[str]]:
    """(selectors as (metric name or None, {label: (op, value)}), grouping labels, bare identifiers)."""
    selectors = []
    for name, body in SELECTOR.findall(expr):
        matchers = {label: (op, value) for label, op, value in MATCHER.findall(body)}
        assert MATCHER.sub("", body).replace(",", "").strip() == "", f"unparsed matcher in {body!r}"
        selectors.append((name or None, matchers))
    rest = SELECTOR.sub(" SELECTOR ", expr)
    grouping = {label.strip() for _, labels in GROUPING.findall(rest) for label in labels.split(",") if label.strip()}
    rest = GROUPING.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # range selectors: [$__rate_interval]
    rest = re.sub(r"\b\d+(\.\d+)?\b", " ", rest)
    functions = {m.group(1) for m in re.finditer(r"([a-zA-Z_]+)\s*\(", rest)}
    assert functions <= FUNCTIONS, f"unexpected functions {functions - FUNCTIONS} in {expr}"
    bare = {w for w in IDENT.findall(rest) if w not in functions | KEYWORDS | {"SELECTOR"}}
    return selectors, grouping, bare


@pytest.fixture(scope="module")
def exported_run() -> tuple[BudgetMetrics, BudgetGuard]:
    """A scripted run that spends, degrades and is refused, watched by BudgetMetrics (ids of
    scope user as labels)."""
    kw = {"input_tokens": 1000, "output_tokens": 500, "max_tokens": 500}
    big, mini = UsageChat(model_name="gpt-4o", **kw), UsageChat(model_name="gpt-4o-mini", **kw)
    guard = BudgetGuard(big, degrade_to=[mini], name="support", degrade_at=0.6,
                        limits=[Limit(usd=1, per="global", window="month"),
                                Limit(usd="0.02", per="user", window="day")])
    metrics = BudgetMetrics(registry=CollectorRegistry(), id_labels={"user"}, min_interval=0)
    metrics.watch(guard)
    handler = metrics.callback(guard)
    with pytest.raises(BudgetExceededError):
        for _ in range(50):
            guard.invoke("hi", config={"configurable": {"user_id": "alice"}, "callbacks": [handler]})
    guard.invoke("hi", config={"configurable": {"user_id": "bob"}, "callbacks": [handler]})
    # A store outage under fail_open: served from the allowance, and counted as a store error.
    class Down(MemoryStore):
        def reserve(self, counters, hold):
            raise BudgetStoreUnavailableError("store down (scripted)")

    outage = BudgetGuard(UsageChat(model_name="gpt-4o-mini"), name="support", limit=1, store=Down(),
                         on_store_error="fail_open", fail_open_allowance=1)
    outage.invoke("hi", config={"callbacks": [metrics.callback(outage)]})
    return metrics, guard


@pytest.fixture(scope="module")
def exported(exported_run) -> dict[str, set[str]]:
    """Metric name -> its label names, from BudgetMetrics' exposition after the scripted run."""
    metrics, _guard = exported_run
    text = metrics.exposition()
    names: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names[sample.name] |= set(sample.labels)
    # The run did what the dashboard shows: spend, a degrade, a refusal, per-id rows, a store error.
    assert metrics.registry.get_sample_value("budgetguard_store_errors_total", {
        "budget": "support", "operation": "reserve", "outcome": "fail_open"}) == 1
    assert metrics.registry.get_sample_value("budgetguard_refusals_total", {
        "budget": "support", "scope": "user", "window": "day", "model": "gpt-4o"}) == 1
    assert metrics.registry.get_sample_value("budgetguard_calls_total", {
        "budget": "support", "model": "gpt-4o-mini", "degraded": "true"}) >= 1
    assert metrics.registry.get_sample_value("budgetguard_id_spent_usd", {
        "budget": "support", "scope": "user", "window": "day", "id": "bob"}) == float(Decimal("0.0075"))
    return dict(names)


def test_every_metric_and_label_of_the_dashboard_is_exported(exported):
    used = set()
    for expr in exprs(dashboard()):
        selectors, grouping, bare = parse(expr)
        assert not bare - set(exported), f"{expr}: {bare - set(exported)} not exported"
        metrics_here = set(bare)
        for name, matchers in selectors:
            if name is None:  # {__name__=~"budgetguard_.+", ...}: a pattern of names
                op, pattern = matchers.pop("__name__")
                assert op == "=~" and any(re.fullmatch(pattern, n) for n in exported), expr
                candidates = [n for n in exported if re.fullmatch(pattern, n)]
                for label in matchers:
                    assert any(label in exported[n] for n in candidates), f"{expr}: no metric has label {label}"
                continue
            assert name in exported, f"{expr}: {name} is not exported by BudgetMetrics"
            assert set(matchers) <= exported[name], f"{expr}: {name} has no label {set(matchers) - exported[name]}"
            metrics_here.add(name)
        for label in grouping:
            assert any(label in exported[n] for n in metrics_here), f"{expr}: grouping by unknown label {label}"
        used |= metrics_here
    # ...and the dashboard shows every series BudgetMetrics exports.
    shown = {n for n in exported if not n.endswith("_created")}
    assert shown - used == set(), f"exported but not on the dashboard: {shown - used}"


def test_label_values_variables_name_exported_labels(exported):
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", var["definition"])
        assert match, var["definition"]
        assert var["query"]["query"] == var["definition"]
        selector, label = match.groups()
        (name, matchers), = parse(selector)[0]
        pattern = matchers.get("__name__", ("=", name))[1]
        assert any(re.fullmatch(pattern, n) and label in labels for n, labels in exported.items()), var["name"]


def test_the_dashboard_is_importable_into_grafana():
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] and board["title"] and board["id"] is None  # Grafana assigns the id on import
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for name in ("budget", "scope", "window", "model"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DS
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        x0, y0 = grid["x"], grid["y"]
        area = {(x, y) for x in range(x0, x0 + grid["w"]) for y in range(y0, y0 + grid["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DS and panel["targets"] and panel["title"] and panel["description"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == DS and target["expr"].strip()
            # a filter by the dashboard's budget variable everywhere: one budget's figures never mix with another's
            assert 'budget=~"$budget"' in target["expr"], target["expr"]


def test_every_variable_the_queries_use_is_defined():
    board = dashboard()
    defined = {v["name"] for v in board["templating"]["list"]} | {"__rate_interval", "__range", "__all"}
    text = json.dumps(board)
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", text))
    assert used <= defined, used - defined


# -- every query against a real Prometheus scraping a real exporter (Debian: apt-get install prometheus) ----

PROMETHEUS = shutil.which("prometheus")
VARIABLES = {"$budget": "support", "$scope": ".*", "$window": ".*", "$model": ".*",
             "$__rate_interval": "1m", "$__range": "1h"}


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.load(reply)
    except urllib.error.HTTPError as exc:  # a query Prometheus cannot parse: 400 with the reason
        raise AssertionError(f"{expr}: {exc.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]["result"]


def scrapes(base: str) -> int:
    """How many scrapes of the exporter Prometheus holds (0 while it is starting)."""
    try:
        rows = query(base, 'count_over_time(budgetguard_refusals_total{budget="support"}[1h])')
    except (urllib.error.URLError, ConnectionError):
        return 0
    return int(float(rows[0]["value"][1])) if rows else 0


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, exported_run):
    """A Prometheus scraping the scripted run's exporter every 0.25 s; its base URL."""
    if PROMETHEUS is None:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus)")
    metrics, _guard = exported_run
    exporter, thread = metrics.serve(free_port(), addr="127.0.0.1")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 250ms\n  evaluation_interval: 250ms\n"
        "scrape_configs:\n  - job_name: budgetguard\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter.server_port}']\n", "utf-8")
    server = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while scrapes(base) < 2:  # ready, and every series scraped twice (rate needs two samples)
            assert time.monotonic() < deadline, "prometheus did not scrape the exporter within 30 s"
            time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)
        exporter.shutdown()


def test_every_dashboard_query_returns_data_from_a_real_prometheus(prometheus, exported_run):
    """Each panel's PromQL parses, and against the scripted run it returns series (no empty panel)."""
    board = dashboard()
    for panel in panels(board):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert query(prometheus, expr), f"{panel['title']!r}: no data for {expr}"
    # The figures are the store's: the user scope's spend is what status() says, to the float.
    _metrics, guard = exported_run
    spent = sum(s.spent for who in ("alice", "bob")
                for s in guard.status({"configurable": {"user_id": who}}) if s.scope == "user")
    (row,) = query(prometheus, 'budgetguard_spent_usd{budget="support", scope="user"}')
    assert float(row["value"][1]) == float(spent)
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", var["definition"]).groups()
            url = f"{prometheus}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
                {"match[]": selector.replace("$budget", "support")})
            with urllib.request.urlopen(url, timeout=5) as reply:
                assert json.load(reply)["data"], var["name"]
