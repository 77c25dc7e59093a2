"""A budget policy: limits, store, prices and estimates, shared by every model it guards.

The policy knows how to turn one call (its identity, its messages, a candidate
model) into counters and an amount to hold, and how to read the counters back
as ``LimitStatus`` snapshots. It does no model calls itself.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Literal

from .alerts import Alert, AlertSink, webhook_of
from .errors import Refusal
from .estimate import DEFAULT_MAX_OUTPUT_TOKENS, Estimator, get_estimator
from .limits import (
    MAX_LEASE_SECONDS,
    MAX_REFRESH_SECONDS,
    MAX_RETENTION_SECONDS,
    MIN_LEASE_SECONDS,
    MODEL,
    TENANT_LOCAL,
    Identity,
    Limit,
    WindowInstance,
    check_seconds,
    counter_key,
    counter_tag,
    escape_id,
    resolve_identity,
    text_problem,
)
from .money import show_value, to_decimal, usd_to_nano
from .overrides import DEFAULT_REFRESH_SECONDS, LiveOverrides, Override, resolve_cap, resolve_config_overrides
from .pricing import Pricer
from .stores.base import Counter, CounterState, Store
from .stores.bounds import MAX_NANO
from .stores.ledger import key_parts
from .stores.memory import MemoryStore

__all__ = [
    "BudgetPolicy",
    "LimitStatus",
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_RETENTION_SECONDS",
    "MAX_DEFAULT_OUTPUT_TOKENS",
    "MAX_NAME_LENGTH",
]

DEFAULT_LEASE_SECONDS = 600.0
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600
MAX_DEFAULT_OUTPUT_TOKENS = 10_000_000
"""The largest ``default_max_output_tokens`` (models answer in at most a few hundred thousand)."""
MAX_NAME_LENGTH = 256
"""The longest budget ``name``, in characters."""
_PLAN_CACHE_SIZE = 4096

OutputCapPolicy = Literal["hard", "model", "trust"]
DEFAULT_MIN_OUTPUT_TOKENS = 256
"""A call whose full output cap does not fit is served with a smaller one, down to this many tokens."""
ExpiredHold = Literal["release", "charge_input", "charge_reserved"]
StoreErrorPolicy = Literal["fail_closed", "fail_open"]
Mode = Literal["enforce", "shadow"]
DEFAULT_DECISION_ALERT_SECONDS = 60.0
"""At most one refusal (or degrade) alert per scope id per this many seconds, per process."""
OUTAGE_OVER_SECONDS = 60.0
"""A store outage is over, and the next one starts with a fresh ``fail_open_allowance``, once the
store has answered with no reserve failing for this many seconds and its settle journal is empty."""


@dataclass(frozen=True)
class LimitStatus:
    """One limit as seen by one identity now, in the limit's unit (``unit``: Decimal USD for
    ``"usd"``; whole tokens or requests, as Decimal, for ``"tokens"`` / ``"requests"``)."""

    scope: str
    scope_id: str | None
    window: str
    window_label: str
    limit: Decimal
    spent: Decimal
    held: Decimal
    remaining: Decimal
    resets_at: datetime | None
    key: str
    unit: str = "usd"
    sliced: Decimal = Decimal(0)  # of held: budget slices leased to processes (RedisStore(lease_slices=True))

    @property
    def used_fraction(self) -> Decimal:
        return (self.spent + self.held) / self.limit if self.limit else Decimal(1)


@dataclass(frozen=True)
class CounterPlan:
    """The counters one call draws on, each with its limit and window.

    ``caps`` is the limit in force on each counter (in the limit's unit: nano-USD, tokens or
    requests), live and config overrides applied (see ``overrides``); None means each limit's own
    amount. ``thresholds`` are each counter's alert amounts (``Limit.alerts`` of its cap).
    ``counted`` is True when a limit counts tokens or requests: its counters hold amounts of their own.
    ``models``: for a call that more than one model may serve (an inner fallback) under
    ``per="model"`` limits, the model of each counter (None: a counter of every model's); the call
    holds on every model's counters, and its settle charges the model that served it.
    """

    limits: tuple[Limit, ...]
    scope_ids: tuple[str | None, ...]
    windows: tuple[WindowInstance, ...]
    keys: tuple[str, ...]
    expires_at: tuple[int | None, ...]
    caps: tuple[int, ...] | None = None
    thresholds: tuple[tuple[int, ...], ...] = ()
    counted: bool = False
    models: tuple[str | None, ...] = ()
    # (fraction, shadow) -> counters, for a plan whose counters hold no amount of their own
    _counters: dict[Any, tuple[Counter, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def cap(self, index: int) -> int:
        return self.limits[index].amount if self.caps is None else self.caps[index]

    def limit_usd(self, index: int) -> Decimal:
        """The limit in force on counter ``index``, in its unit (USD for a dollar limit)."""
        cap = self.cap(index)
        limit = self.limits[index]
        return limit.value if cap == limit.amount else limit.show(cap)

    def counters(self, fraction: Decimal | None = None, estimate: Any = None, expired_hold: str = "charge_input",
                 shadow: bool = False) -> tuple[Counter, ...]:
        """Counters for a reservation; ``fraction`` (degrade_at) lowers each limit. ``estimate`` (an
        ``admission.Estimate``) sizes the holds of token and request counters; ``shadow`` lifts every
        limit to the store's maximum (the call always fits; alerts still fire at the real limit).
        Made once per (fraction, shadow) when every limit is in dollars (nothing depends on the call)."""
        if self.counted:
            return self._make_counters(fraction, estimate, expired_hold, shadow)
        made = self._counters.get((fraction, shadow))
        if made is None:
            made = self._counters[(fraction, shadow)] = self._make_counters(fraction, None, expired_hold, shadow)
        return made

    def _make_counters(self, fraction: Decimal | None, estimate: Any, expired_hold: str, shadow: bool
                       ) -> tuple[Counter, ...]:
        out = []
        caps = self.caps if self.caps is not None else [limit.amount for limit in self.limits]
        thresholds = self.thresholds
        for index, (nano, key, exp) in enumerate(zip(caps, self.keys, self.expires_at)):
            cap = MAX_NANO if shadow else nano if fraction is None else int(nano * fraction)
            extra: dict[str, Any] = {}
            if thresholds and thresholds[index]:
                extra["alerts"] = thresholds[index]
            if self.counted and self.limits[index].unit != "usd":
                amount, charge = _unit_hold(self.limits[index].unit, estimate, expired_hold)
                extra["amount"], extra["charge_on_expiry"] = amount, charge
            out.append(Counter(key, cap, exp, **extra) if extra else Counter(key, cap, exp))
        return tuple(out)

    def amounts(self, charged: int, tokens: int, requests: int, served: str | None = None) -> list[int] | None:
        """What a settle charges each counter: ``charged`` nano-USD on dollar counters, ``tokens`` and
        ``requests`` on the others; None when every counter is in dollars (one amount for all).
        ``served``: the model that answered; the counters of the other ``models`` are charged nothing
        (a model not among them, or none known: every model's counters are charged)."""
        if not self.counted and not self.models:
            return None
        models = self.models if served is not None and served in self.models else ()
        return [0 if models and models[i] is not None and models[i] != served
                else charged if x.unit == "usd" else tokens if x.unit == "tokens" else requests
                for i, x in enumerate(self.limits)]

    def refusal(self, index: int, state: CounterState, estimate: int, model: str, **explained: Any) -> Refusal:
        """Why counter ``index`` refused; ``explained`` adds what the estimate is made of (Refusal's fields)."""
        limit = self.limits[index]
        return Refusal(
            scope=limit.per,
            scope_id=self.scope_ids[index],
            window=f"{limit.window} {self.windows[index].label}",
            limit=self.limit_usd(index),
            spent=limit.show(state.spent),
            held=limit.show(state.held),
            estimate=limit.show(estimate),
            model=model,
            resets_at=self.windows[index].resets_at,
            **explained,
            **({} if limit.unit == "usd" else {"unit": limit.unit}),
        )

    def statuses(self, states: Sequence[CounterState]) -> list[LimitStatus]:
        out = []
        for index, (limit, sid, window, key, state) in enumerate(
            zip(self.limits, self.scope_ids, self.windows, self.keys, states)
        ):
            spent, held = limit.show(state.spent), limit.show(state.held)
            usd = self.limit_usd(index)
            out.append(
                LimitStatus(
                    scope=limit.per,
                    scope_id=sid,
                    window=limit.window,
                    window_label=window.label,
                    limit=usd,
                    spent=spent,
                    held=held,
                    remaining=max(usd - spent - held, Decimal(0)),
                    resets_at=window.resets_at,
                    key=key,
                    unit=limit.unit,
                    sliced=limit.show(state.sliced),
                )
            )
        return out


def _unit_hold(unit: str, estimate: Any, expired_hold: str) -> tuple[int, int]:
    """The hold of a tokens or requests counter for one call, and what its expiry charges."""
    if unit == "requests":
        return 1, 0 if expired_hold == "release" else 1
    if estimate is None:
        raise ValueError("a tokens limit needs the call's estimate to size its hold")
    amount = min(estimate.input_tokens + estimate.held_output_tokens, MAX_NANO)  # above it: fits no limit
    charge = (estimate.input_tokens if expired_hold == "charge_input"
              else amount if expired_hold == "charge_reserved" else 0)
    return amount, min(charge, MAX_NANO)


def _parse_limits(limit: Any, limits: Sequence[Limit] | None) -> tuple[Limit, ...]:
    out: list[Limit] = []
    if limit is not None:
        out.append(limit if isinstance(limit, Limit) else Limit(usd=to_decimal(limit, what="limit")))
    for item in limits or ():
        if not isinstance(item, Limit):
            raise TypeError(f"limits: expected Limit(...) items, got {type(item).__name__} {item!r}")
        out.append(item)
    if not out:
        raise ValueError("BudgetGuard needs a limit: pass limit=5.0 (USD in total) or limits=[Limit(...), ...].")
    # Global limits last, and with a tenant limit every limit not inside the tenant (global, model,
    # any scope but user and project) after those that are: on Redis Cluster they live under the
    # budget's own hash tag and are reserved in a second step, after the tenant's counters
    # (released again if that step refuses).
    tenant_scoped = any(item.per == "tenant" for item in out)
    out.sort(key=lambda item: (tenant_scoped and item.per not in TENANT_LOCAL, item.per == "global"))
    seen = set()
    for item in out:
        if item.slug in seen:
            raise ValueError(
                f"Two limits share scope {item.per!r} and window {item.window!r} (tz {item.tz}); "
                "they would share one counter. Keep the stricter one."
            )
        seen.add(item.slug)
    return tuple(out)


def resolve_store(store: Any) -> Store:
    """``None`` -> a new in-process store; a ``redis://`` URL -> a RedisStore; a store or redis client as is."""
    if store is None:
        return MemoryStore()
    if isinstance(store, str):
        if store in ("memory", "memory://"):
            return MemoryStore()
        from .stores.redis import RedisStore

        return RedisStore.from_url(store)
    if hasattr(store, "reserve") and hasattr(store, "areserve"):
        return store
    module = type(store).__module__
    if module.startswith("redis") or module.startswith("fakeredis"):
        from .stores.redis import RedisStore

        return RedisStore(store)
    raise TypeError(
        f"store: expected a redis:// URL, a redis-py client or a store object, got {type(store).__name__}"
    )


class BudgetPolicy:
    """Limits + store + pricer + estimator: the part of a guard that model copies share."""

    def __init__(
        self,
        *,
        limit: Any = None,
        limits: Sequence[Limit] | None = None,
        store: Any = None,
        name: str = "default",
        estimator: str | Estimator = "strict",
        prices: Mapping[str, Any] | None = None,
        fallback_price: Any = None,
        tool_fees: Mapping[str, Any] | None = None,
        pricer: Pricer | None = None,
        degrade_at: float | Decimal | None = None,
        default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
        output_cap: OutputCapPolicy = "hard",
        min_output_tokens: int | None = DEFAULT_MIN_OUTPUT_TOKENS,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        expired_hold: ExpiredHold = "charge_input",
        on_store_error: StoreErrorPolicy = "fail_closed",
        fail_open_allowance: Any = None,
        overrides: Sequence[Override] | None = None,
        override_refresh_seconds: float | None = DEFAULT_REFRESH_SECONDS,
        mode: Mode = "enforce",
        on_alert: Any = None,
        alert_webhook: Any = None,
        decision_alert_seconds: float | None = DEFAULT_DECISION_ALERT_SECONDS,
    ) -> None:
        problem = text_problem(name, MAX_NAME_LENGTH)
        if problem is not None:
            raise ValueError(f"name {problem}.")
        self.name = name
        self.limits = _parse_limits(limit, limits)
        self.store = resolve_store(store)
        self.estimator = get_estimator(estimator)
        if pricer is not None and (prices or fallback_price is not None or tool_fees):
            raise ValueError("Pass prices, fallback_price and tool_fees to the Pricer you give as pricer=, "
                             "or give them here without pricer=: one of the two would be ignored.")
        self.pricer = pricer if pricer is not None else Pricer(prices, fallback_price, tool_fees=tool_fees)
        if degrade_at is not None:
            degrade_at = to_decimal(degrade_at, what="degrade_at")
            if not Decimal(0) < degrade_at <= Decimal(1):
                raise ValueError(f"degrade_at: expected a fraction in (0, 1], such as 0.8, got {show_value(degrade_at)}")
        self.degrade_at: Decimal | None = degrade_at
        if (isinstance(default_max_output_tokens, bool) or not isinstance(default_max_output_tokens, int)
                or not 0 < default_max_output_tokens <= MAX_DEFAULT_OUTPUT_TOKENS):
            raise ValueError(
                f"default_max_output_tokens: expected a whole number of tokens from 1 to {MAX_DEFAULT_OUTPUT_TOKENS}, "
                f"got {show_value(default_max_output_tokens)}"
            )
        self.default_max_output_tokens = default_max_output_tokens
        if not isinstance(output_cap, str) or output_cap not in ("hard", "model", "trust"):
            raise ValueError(
                f"output_cap: expected 'hard' (send the cap reserved when a call sets none), 'model' (reserve the "
                f"model's full output limit) or 'trust' (reserve the default, send nothing), got {show_value(output_cap)}"
            )
        self.output_cap: OutputCapPolicy = output_cap
        if min_output_tokens is not None and (isinstance(min_output_tokens, bool) or not isinstance(
                min_output_tokens, int) or not 0 < min_output_tokens <= MAX_DEFAULT_OUTPUT_TOKENS):
            raise ValueError(
                f"min_output_tokens: expected None (never shrink a call's cap to fit) or a whole number of tokens "
                f"from 1 to {MAX_DEFAULT_OUTPUT_TOKENS}, got {show_value(min_output_tokens)}"
            )
        self.min_output_tokens = min_output_tokens
        self.lease_seconds = check_seconds(lease_seconds, "lease_seconds", minimum=MIN_LEASE_SECONDS,
                                           maximum=MAX_LEASE_SECONDS)
        self.retention_seconds = math.ceil(check_seconds(retention_seconds, "retention_seconds",
                                                         maximum=MAX_RETENTION_SECONDS))
        if not isinstance(expired_hold, str) or expired_hold not in ("release", "charge_input", "charge_reserved"):
            raise ValueError(
                f"expired_hold: expected 'release', 'charge_input' or 'charge_reserved', got {show_value(expired_hold)}"
            )
        self.expired_hold = expired_hold
        if not isinstance(on_store_error, str) or on_store_error not in ("fail_closed", "fail_open"):
            raise ValueError(
                f"on_store_error: expected 'fail_closed' or 'fail_open', got {show_value(on_store_error)}"
            )
        self.on_store_error = on_store_error
        self.fail_open_allowance = (
            None if fail_open_allowance is None else usd_to_nano(fail_open_allowance, what="fail_open_allowance")
        )
        if override_refresh_seconds is not None:
            override_refresh_seconds = check_seconds(override_refresh_seconds, "override_refresh_seconds",
                                                     maximum=MAX_REFRESH_SECONDS)
        if not isinstance(mode, str) or mode not in ("enforce", "shadow"):
            raise ValueError(
                f"mode: expected 'enforce' (refuse and degrade) or 'shadow' (reserve and record exactly, never "
                f"refuse or degrade: for rolling out a budget), got {show_value(mode)}"
            )
        self.mode: Mode = mode
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"on_alert: expected a function (sync or async) taking an Alert, got {type(on_alert).__name__}")
        self.on_alert = on_alert
        self.alert_webhook = alert_webhook
        if decision_alert_seconds is not None:
            decision_alert_seconds = check_seconds(decision_alert_seconds, "decision_alert_seconds",
                                                   maximum=MAX_REFRESH_SECONDS)
        self.decision_alert_seconds = decision_alert_seconds
        self.alerts: Any = None  # the AlertSink that delivers alerts (None: nobody listens)
        if on_alert is not None or alert_webhook is not None:
            self.alerts = AlertSink(on_alert, None if alert_webhook is None else webhook_of(alert_webhook),
                                    decision_seconds=decision_alert_seconds)
            # Settles the store sends later (a journal replayed after an outage, settles carried by the
            # next reserve) report their crossings to hooks: their alerts go out too.
            if getattr(self.store, "on_replay_crossed", False) is None:
                self.store.on_replay_crossed = self._replayed
            if getattr(self.store, "on_carried_crossed", False) is None:
                self.store.on_carried_crossed = self._carried
        # The fail-open allowance of the current store outage (None: no outage seen), and when a
        # reserve last failed. One allowance per policy, however many tags or servers are down.
        self.outage: MemoryStore | None = None
        self.outage_over_seconds = OUTAGE_OVER_SECONDS
        self._store_failed_at = 0.0
        self._outage_lock = threading.Lock()
        # Cluster hash tag: with a tenant scope, the tenant's own counters and its users' and
        # projects' share the tenant's tag (limits.counter_tag).
        self._tenant_scoped = any(x.per == "tenant" for x in self.limits)
        self.per_model = any(x.per == MODEL for x in self.limits)  # counters that depend on the serving model
        self.counted = any(x.unit != "usd" for x in self.limits)  # token or request limits hold their own amounts
        self._name_tag = escape_id(name)
        # Limit overrides: the config's (field -> nano-USD) and the store's live ones, which every
        # process re-reads at most every override_refresh_seconds (None: never read the store's).
        self.config_overrides: dict[str, int] = resolve_config_overrides(self.limits, overrides)
        self.live_overrides: LiveOverrides | None = None
        if override_refresh_seconds is not None and callable(getattr(self.store, "read_overrides", None)):
            self.live_overrides = LiveOverrides(self.store, name, override_refresh_seconds)
        # identity -> (plan, when a window turns, overrides generation it was built with)
        self._plans: dict[tuple[tuple[str, str], ...], tuple[CounterPlan, float, int]] = {}
        # Per limit, its current window and the counter's expiry: the same for every identity.
        self._windows: list[tuple[WindowInstance, int | None] | None] = [None] * len(self.limits)

    def __repr__(self) -> str:
        return f"BudgetPolicy(name={self.name!r}, limits={list(self.limits)!r}, store={self.store!r})"

    def outage_store(self) -> MemoryStore:
        """Where this process counts its fail-open allowance during the current store outage."""
        outage = self.outage
        if outage is None:
            with self._outage_lock:
                if self.outage is None:
                    self.outage = MemoryStore()
                outage = self.outage
        return outage

    def store_failed(self) -> None:
        """A reserve could not reach the store: the outage (if any) goes on."""
        self._store_failed_at = time.monotonic()

    def store_answered(self) -> None:
        """A reserve got the store's answer while an outage's allowance is out (the guard calls it
        only then). The outage is over only once no reserve has failed for ``outage_over_seconds``
        and the store's settle journal is empty (every call served fail-open has reached it): an
        answer on another tag of a cluster with a master down, or from a flapping server, is no end
        of the outage, and hands out no fresh allowance."""
        now = time.monotonic()
        journal = getattr(self.store, "journal", None)
        if journal is not None and hasattr(journal, "__len__") and len(journal):
            self._store_failed_at = now  # settles served fail-open still wait: healthy from their replay on
            return
        if now - self._store_failed_at >= self.outage_over_seconds:
            self.end_outage()

    def end_outage(self) -> None:
        """The outage is over: the next one starts with a fresh allowance."""
        self.outage = None

    def identity(self, config: Mapping[str, Any] | None, **ids: Any) -> Identity:
        return resolve_identity(config, self.limits, **ids)

    def plan(self, identity: Identity, now: datetime | None = None, model: str | None = None) -> CounterPlan:
        """The counters a call by ``identity`` at ``now`` draws on (cached until a window turns or
        the live overrides change). ``model`` is the serving model, the id of ``per="model"`` limits
        (without it and without ``model_id`` in the identity, those limits are left out)."""
        live = self.live_overrides
        if live is not None and live.due():
            live.refresh()
        generation = live.generation if live is not None else 0
        if not self.per_model:
            model = None
        if now is not None:
            return self._plan(identity, now, model)
        key = (*identity.ids.items(), model)
        cached = self._plans.get(key)
        if cached is not None and cached[2] == generation and time.time() < cached[1]:
            return cached[0]
        plan = self._plan(identity, datetime.now(timezone.utc), model)
        turns = [w.resets_at.timestamp() for w in plan.windows if w.resets_at is not None]
        if len(self._plans) >= _PLAN_CACHE_SIZE:
            self._plans.clear()
        self._plans[key] = (plan, min(turns, default=float("inf")), generation)
        return plan

    def plan_for_models(self, identity: Identity, models: Sequence[str]) -> CounterPlan:
        """``plan`` for a call any of ``models`` may serve: every model's ``per="model"`` counters,
        and the other limits' counters once (``CounterPlan.models`` says whose each is)."""
        plans = [(model, self.plan(identity, model=model)) for model in dict.fromkeys(models)]
        if len(plans) == 1 or not self.per_model:
            return plans[0][1]
        parts: dict[str, tuple[Any, ...]] = {}
        for model, plan in plans:
            for i, key in enumerate(plan.keys):
                if key not in parts:
                    parts[key] = (plan.limits[i], plan.scope_ids[i], plan.windows[i], plan.expires_at[i], plan.cap(i),
                                  plan.thresholds[i] if plan.thresholds else (),
                                  model if plan.limits[i].per == MODEL else None)
        rows = list(parts.values())
        thresholds = tuple(r[5] for r in rows)
        return CounterPlan(tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows),
                           tuple(parts), tuple(r[3] for r in rows), tuple(r[4] for r in rows),
                           thresholds if any(thresholds) else (), self.counted, tuple(r[6] for r in rows))

    def limit_nano(self, limit: Limit, scope_id: str | None) -> int:
        """The limit in force on ``limit``'s counter for ``scope_id`` (nano-USD), overrides applied."""
        live = self.live_overrides.values if self.live_overrides is not None else {}
        if not live and not self.config_overrides:
            return limit.nano
        return resolve_cap(limit, scope_id, live, self.config_overrides)[0]

    def _plan(self, identity: Identity, now: datetime, model: str | None = None) -> CounterPlan:
        tenant = identity.ids.get("tenant") if self._tenant_scoped else None
        tenant_tag = counter_tag(self._name_tag, "tenant", tenant)
        scope_ids, windows, keys, expires, caps, limits, thresholds = [], [], [], [], [], [], []
        for index, limit in enumerate(self.limits):
            if limit.per == MODEL and model is None and MODEL not in identity.ids:
                continue  # a status without a model: the per-model limits are not among its counters
            sid = identity.id_for(limit, model)
            window, expires_at = self._window(index, limit, now)
            # What a tenant owns (its own counters, its users' and projects') shares the tenant's
            # tag; a limit across tenants (global, per model, any other scope) the budget's own.
            tag = tenant_tag if limit.per in TENANT_LOCAL else self._name_tag
            scope_ids.append(sid)
            windows.append(window)
            keys.append(counter_key(self.name, tag, limit, sid, window.label))
            expires.append(expires_at)
            cap = self.limit_nano(limit, sid)
            caps.append(cap)
            limits.append(limit)
            thresholds.append(limit.thresholds(cap) if limit.alerts else ())
        return CounterPlan(tuple(limits), tuple(scope_ids), tuple(windows), tuple(keys), tuple(expires), tuple(caps),
                           tuple(thresholds) if any(thresholds) else (), self.counted)

    def _window(self, index: int, limit: Limit, now: datetime) -> tuple[WindowInstance, int | None]:
        """``limit.window_at(now)`` and its counter's expiry, reused while ``now`` is in that window."""
        cached = self._windows[index]
        if cached is not None:
            window = cached[0]
            if window.starts_at is None or window.starts_at <= now < window.resets_at:  # type: ignore[operator]
                return cached
        window = limit.window_at(now)
        expires = None if window.resets_at is None else int(window.resets_at.timestamp()) + self.retention_seconds
        self._windows[index] = cached = (window, expires)
        return cached

    def threshold_alerts(self, plan: CounterPlan | None, crossed: Sequence[Any], model: str | None = None) -> None:
        """Send one alert per threshold a store step crossed (``stores.base.Crossing``): the store
        decided it, atomically, so each fires once across every process."""
        if self.alerts is None or plan is None:
            return
        now = datetime.now(timezone.utc)
        for crossing in crossed:
            index = crossing.index
            if not 0 <= index < len(plan.keys) or plan.keys[index] != crossing.key:
                continue
            limit, window, cap = plan.limits[index], plan.windows[index], plan.cap(index)
            fraction = limit.fraction_of(crossing.threshold, cap)
            self.alerts.emit(Alert(
                kind="threshold", budget=self.name, scope=limit.per, scope_id=plan.scope_ids[index],
                window=limit.window, window_label=window.label, unit=limit.unit, limit=plan.limit_usd(index),
                spent=limit.show(crossing.spent), threshold=fraction, resets_at=window.resets_at, at=now,
                model=model, shadow=self.mode == "shadow",
            ))

    def _carried(self, call_id: str, crossed: Sequence[Any]) -> None:
        self._replayed(None, crossed)

    def _replayed(self, pending: Any, crossed: Sequence[Any]) -> None:
        """Alerts of a settle the store sent later (a journal replay, a carried settle): its counters
        are read off their keys, as the call's plan is gone."""
        by_slug = {limit.slug: limit for limit in self.limits}
        for crossing in crossed:
            found = key_parts(crossing.key)
            limit = by_slug.get(found[2]) if found is not None else None
            if limit is None:
                continue
            scope_id, label = found[1], found[3]  # type: ignore[index]
            cap = self.limit_nano(limit, scope_id)
            plan = CounterPlan((limit,), (scope_id,), (limit.window_named(label),), (crossing.key,), (None,), (cap,),
                               (limit.thresholds(cap),))
            self.threshold_alerts(plan, [dataclasses.replace(crossing, index=0)])

    def decision_alert(self, kind: str, refusal: Refusal, *, shadow: bool = False) -> None:
        """A refusal or degrade alert (at most one per scope id per ``decision_alert_seconds``)."""
        if self.alerts is None:
            return
        window, _, label = refusal.window.partition(" ")
        self.alerts.decision(Alert(
            kind=kind, budget=self.name, scope=refusal.scope, scope_id=refusal.scope_id, window=window,
            window_label=label, unit=refusal.unit, limit=refusal.limit, spent=refusal.spent,
            resets_at=refusal.resets_at, at=datetime.now(timezone.utc), model=refusal.model, shadow=shadow,
        ))

    def close(self) -> None:
        """Deliver the alerts still queued (bounded wait)."""
        if self.alerts is not None:
            self.alerts.flush()

    def status(self, config: Mapping[str, Any] | None = None, **ids: Any) -> list[LimitStatus]:
        """Each limit that applies to this identity: limit, spent, held, remaining, resets_at."""
        plan = self.plan(self.identity(config, **ids))
        return plan.statuses(self.store.read(plan.keys))

    async def astatus(self, config: Mapping[str, Any] | None = None, **ids: Any) -> list[LimitStatus]:
        plan = self.plan(self.identity(config, **ids))
        return plan.statuses(await self.store.aread(plan.keys))
