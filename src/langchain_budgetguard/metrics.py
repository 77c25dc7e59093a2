"""Prometheus metrics for budgets (optional extra: ``pip install 'langchain-budgetguard[metrics]'``).

Two sources, one ``BudgetMetrics`` object::

    from prometheus_client import REGISTRY
    from langchain_budgetguard.metrics import BudgetMetrics

    metrics = BudgetMetrics(registry=REGISTRY)        # or your own CollectorRegistry
    metrics.watch(guarded)                            # 1. the budget's counters, read from the store
    handler = metrics.callback(guarded)               # 2. what this process's calls did
    chain.invoke(..., config={"callbacks": [handler]})   # or guarded.with_config(callbacks=[handler])

1. ``watch`` adds a collector that reads the budget's counters of the current windows from the
   store when Prometheus scrapes (at most every ``min_interval`` seconds; a SCAN of the store for
   per-id scopes): limit, spent, held, remaining and how many ids are at their limit, labelled by
   ``budget``, ``scope`` and ``window``, and ``tz`` for a limit whose windows follow a time zone
   other than UTC (two limits of one scope and window in different zones are two series). Any
   process can serve them: ``budgetguard metrics --port``.
2. ``callback`` returns a LangChain callback handler that counts the guard's own events: spend
   and calls by ``model``, refusals and degrades by ``scope`` and ``model``. Only the process that
   makes the calls sees them, so it exposes them on its own registry/endpoint.

Raw ids (user ids, tenant ids) are never labels unless asked: ``BudgetMetrics(id_labels={"tenant"})``
adds ``budgetguard_id_*`` series with an ``id`` label for those scopes only (label cardinality).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from .limits import GLOBAL

__all__ = ["BudgetMetrics", "BudgetMetricsHandler"]

EVENT_DEGRADE = "budgetguard_degrade"
EVENT_REFUSAL = "budgetguard_refusal"
EVENT_COST = "budgetguard_cost"
EVENT_STORE_ERROR = "budgetguard_store_error"


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "BudgetMetrics needs prometheus-client: pip install 'langchain-budgetguard[metrics]'"
        ) from None
    return prometheus_client


def _policy_of(budget: Any) -> Any:
    """A ``BudgetPolicy`` from a policy, a guard, or a ``DeploymentConfig``."""
    from .policy import BudgetPolicy

    if isinstance(budget, BudgetPolicy):
        return budget
    policy = getattr(budget, "policy", None)
    if isinstance(policy, BudgetPolicy):
        return policy
    if callable(policy) and hasattr(budget, "policy_options"):  # DeploymentConfig
        return budget.policy()
    raise TypeError(f"expected a BudgetGuard, a BudgetPolicy or a DeploymentConfig, got {type(budget).__name__}")


def _name_of(budget: Any) -> str:
    if isinstance(budget, str):
        return budget
    name = getattr(getattr(budget, "policy", budget), "name", None)
    if not isinstance(name, str):
        raise TypeError(f"expected a budget name, a BudgetGuard or a BudgetPolicy, got {type(budget).__name__}")
    return name


def _zone_labels(limit: Any) -> dict[str, str]:
    """``{"tz": ...}`` for a limit in a zone other than UTC (as ``Limit.slug`` tells them apart), else
    nothing: the series of UTC limits keep the labels they always had."""
    return {} if limit.tz in ("UTC", "utc", "Z") else {"tz": limit.tz}


def _window_kind(window: Any) -> str:
    """A refusal's window is ``"day 2026-11-22"``: the label is the kind, not the instance."""
    return str(window).split(" ", 1)[0] if window else ""


class BudgetMetrics:
    """Prometheus metrics of one or more budgets, on ``registry`` (default: prometheus_client's).

    ``namespace`` prefixes every metric (``budgetguard_spend_usd_total``); ``id_labels`` names the
    scopes whose ids may become labels; ``min_interval`` is how long store readings are reused.
    """

    def __init__(self, registry: Any = None, *, namespace: str = "budgetguard",
                 id_labels: Iterable[str] = (), min_interval: float = 10.0) -> None:
        prom = _prometheus()
        self.registry = prom.REGISTRY if registry is None else registry
        self.namespace = namespace
        self.id_labels = frozenset(id_labels)
        self.min_interval = float(min_interval)
        self._watched: list[Any] = []
        self._lock = threading.Lock()
        self._cache: tuple[float, list[Any]] | None = None
        counter = prom.Counter
        self.spend = counter("spend_usd", "USD charged for guarded calls (actual cost, from usage)",
                             ["budget", "model"], namespace=namespace, registry=self.registry)
        self.calls = counter("calls", "Guarded calls served", ["budget", "model", "degraded"],
                             namespace=namespace, registry=self.registry)
        self.refusals = counter("refusals", "Calls refused because no model of the ladder fits a limit; "
                                "scope/window: the limit that refused the last model tried, model: the one asked for",
                                ["budget", "scope", "window", "model"], namespace=namespace, registry=self.registry)
        self.degrades = counter("degrades", "Steps down the degrade ladder, including those of calls refused in "
                                "the end (calls served by a cheaper model: calls{degraded=\"true\"})",
                                ["budget", "scope", "window", "from_model", "to_model"],
                                namespace=namespace, registry=self.registry)
        self.store_errors = counter("store_errors", "Store operations that failed during calls; outcome: what "
                                    "on_store_error did (fail_closed refused, fail_open served, allowance_exhausted "
                                    "refused once the fail-open allowance was spent)",
                                    ["budget", "operation", "outcome"], namespace=namespace, registry=self.registry)
        self.shadow_refusals = counter(
            "shadow_refusals", "Calls a budget in shadow mode served that enforce mode would have refused",
            ["budget", "scope", "window", "model"], namespace=namespace, registry=self.registry)
        self.shadow_degrades = counter(
            "shadow_degrades", "Calls a budget in shadow mode served that enforce mode would have degraded",
            ["budget", "scope", "window", "from_model", "to_model"], namespace=namespace, registry=self.registry)
        self.registry.register(_StoreCollector(self))

    # -- what this process's calls did -------------------------------------------------------

    def callback(self, budget: Any) -> BudgetMetricsHandler:
        """A callback handler that counts the guard's events for ``budget`` (a name, guard or policy)."""
        return BudgetMetricsHandler(self, _name_of(budget))

    def record(self, budget: str, name: str, data: Mapping[str, Any]) -> None:
        """Count one guard event (``budgetguard_cost`` / ``_degrade`` / ``_refusal``) of ``budget``."""
        if name == EVENT_COST:
            model = str(data.get("model") or "unknown")
            cost = data.get("cost_usd") or 0
            self.spend.labels(budget, model).inc(float(Decimal(str(cost))))
            self.calls.labels(budget, model, "true" if data.get("degraded") else "false").inc()
        elif name == EVENT_DEGRADE:
            refusal = data.get("refusal") or {}
            (self.shadow_degrades if data.get("shadow") else self.degrades).labels(budget, str(refusal.get("scope", "")), _window_kind(refusal.get("window")),
                                 str(data.get("from_model", "")), str(data.get("to_model", ""))).inc()
        elif name == EVENT_STORE_ERROR:
            self.store_errors.labels(budget, str(data.get("operation", "")), str(data.get("outcome", ""))).inc()
        elif name == EVENT_REFUSAL:
            refusals = list(data.get("refusals") or ())
            if refusals:
                last = refusals[-1]
                (self.shadow_refusals if data.get("shadow") else self.refusals).labels(budget, str(last.get("scope", "")), _window_kind(last.get("window")),
                                     str(refusals[0].get("model", ""))).inc()

    # -- the budget's counters, from the store ---------------------------------------------------

    def watch(self, budget: Any) -> None:
        """Report ``budget``'s counters (a guard, policy or DeploymentConfig) when scraped."""
        policy = _policy_of(budget)
        with self._lock:
            self._watched.append(policy)
            self._cache = None

    def _families(self) -> list[Any]:
        with self._lock:
            if self._cache is not None and time.monotonic() - self._cache[0] < self.min_interval:
                return self._cache[1]
            watched = list(self._watched)
        families = self._read(watched)
        with self._lock:
            self._cache = (time.monotonic(), families)
        return families

    def _read(self, policies: list[Any]) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from .overrides import BudgetAdmin

        ns = self.namespace
        labels = ["budget", "scope", "window"]

        names: dict[str, list[str]] = {}

        def gauge(name: str, doc: str, extra: list[str] = ()) -> Any:  # type: ignore[assignment]
            names[f"{ns}_{name}"] = [*labels, *extra]
            return GaugeMetricFamily(f"{ns}_{name}", doc, labels=names[f"{ns}_{name}"])

        def put(family: Any, values: list[str], value: float, zone: dict[str, str]) -> None:
            # add_metric takes the family's fixed label names; a limit's ``tz`` is one more, only when set
            family.add_sample(family.name, {**dict(zip(names[family.name], values)), **zone}, value)

        limit = gauge("limit_usd", "The limit of the scope per window, in USD (overrides for single ids not shown)")
        spent = gauge("spent_usd", "USD spent in the current window, summed over the scope's ids")
        held = gauge("held_usd", "USD held by calls in flight, summed over the scope's ids")
        remaining = gauge("remaining_usd", "USD left in the current window, summed over the scope's ids")
        ids = gauge("ids", "Ids of the scope with a counter in the current window")
        exhausted = gauge("ids_exhausted", "Ids of the scope with nothing left in the current window")
        up = GaugeMetricFamily(f"{ns}_store_up", "1 when the budget's store answered the last reading",
                               labels=["budget"])
        id_spent = gauge("id_spent_usd", "USD spent by one id in the current window", ["id"])
        id_held = gauge("id_held_usd", "USD held by one id's calls in flight", ["id"])
        id_remaining = gauge("id_remaining_usd", "USD left for one id in the current window", ["id"])
        id_limit = gauge("id_limit_usd", "The limit in force for one id (overrides applied)", ["id"])
        count_limit = gauge("limit_amount", "A tokens or requests limit of the scope per window", ["unit"])
        count_used = gauge("used_amount", "Tokens or requests counted in the current window, summed over the "
                           "scope's ids (held ones not included)", ["unit"])
        for policy in policies:
            admin = BudgetAdmin(policy)
            try:
                rows = {(x.per, x.window, x.tz, x.unit): (x, admin.limit_statuses(x, None, None, None))
                        for x in policy.limits}
            except Exception:  # noqa: BLE001 - a scrape reports the store down instead of failing
                up.add_metric([policy.name], 0.0)
                continue
            up.add_metric([policy.name], 1.0)
            for (per, window, _tz, unit), (lim, statuses) in rows.items():
                key, zone = [policy.name, per, window], _zone_labels(lim)
                if unit != "usd":  # the dollar gauges speak USD; other kinds have their own, with a unit label
                    put(count_limit, [*key, unit], float(lim.amount), zone)
                    put(count_used, [*key, unit], float(sum((s.spent for s in statuses), Decimal(0))), zone)
                    continue
                scope_limit = policy.limit_nano(lim, None) / 1e9
                put(limit, key, scope_limit, zone)
                put(spent, key, float(sum((s.spent for s in statuses), Decimal(0))), zone)
                put(held, key, float(sum((s.held for s in statuses), Decimal(0))), zone)
                left = sum((s.remaining for s in statuses), Decimal(0))
                put(remaining, key, float(left) if statuses or per != GLOBAL else scope_limit, zone)
                put(ids, key, float(len(statuses)), zone)
                put(exhausted, key, float(sum(1 for s in statuses if s.remaining <= 0)), zone)
                if per in self.id_labels:
                    for s in statuses:
                        who = [*key, s.scope_id or ""]
                        put(id_spent, who, float(s.spent), zone)
                        put(id_held, who, float(s.held), zone)
                        put(id_remaining, who, float(s.remaining), zone)
                        put(id_limit, who, float(s.limit), zone)
        out = [up, limit, spent, held, remaining, ids, exhausted, count_limit, count_used]
        if self.id_labels:
            out += [id_limit, id_spent, id_held, id_remaining]
        return out

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Expose the registry over HTTP on ``port`` (a daemon thread); returns the server."""
        return _prometheus().start_http_server(port, addr=addr, registry=self.registry)

    def exposition(self) -> str:
        """The registry in Prometheus' text format."""
        return _prometheus().generate_latest(self.registry).decode("utf-8")


class _StoreCollector:
    def __init__(self, metrics: BudgetMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        yield from self.metrics._families()

    def describe(self) -> list[Any]:
        return []  # read lazily: registering must not touch the store


class BudgetMetricsHandler(BaseCallbackHandler):
    """Counts a guard's custom events (cost, degrade, refusal) into ``BudgetMetrics``."""

    raise_error = False
    run_inline = True

    def __init__(self, metrics: BudgetMetrics, budget: str) -> None:
        super().__init__()
        self.metrics = metrics
        self.budget = budget

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, tags: list[str] | None = None,
                        metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if name in (EVENT_COST, EVENT_DEGRADE, EVENT_REFUSAL, EVENT_STORE_ERROR) and isinstance(data, Mapping):
            self.metrics.record(self.budget, name, data)
