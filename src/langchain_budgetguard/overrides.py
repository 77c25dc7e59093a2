"""Live limit overrides, and what operators do to a running budget.

A limit can be changed for one id (tenant ``acme`` gets $1000 a month, user ``ci-bot`` gets $0)
or for every id of its scope, without restarting anything. Overrides come from two places:

- the config file's ``[[overrides]]`` (``Override`` objects given to the policy): the defaults;
- the store (``budgetguard limit set ...``): a small hash per budget name, field
  ``"<per>:<window>[@tz]:<escaped id, or *>"`` -> nano-USD, read by every process.

The limit in force for one counter (limit L, scope id X) is the first that exists of:

1. the store's override for (L, X)
2. the config's override for (L, X)
3. the store's override for (L, ``*``), every id of the scope (or the global limit itself)
4. L's own amount

so an id's own deal survives a change of the scope-wide limit, and the store wins over the file.

Each process keeps the store's overrides in memory and asks the store again at most every
``refresh_seconds`` (default 5 s): one small request per budget per process (it carries the
version the process has, and the values come back only when they changed), never one per call.
A change made with ``budgetguard limit set`` is therefore enforced everywhere within
``refresh_seconds`` plus one round trip. Inside a running event loop the check after the first
runs in the background, so no call waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .limits import GLOBAL, TENANT_LOCAL, Limit, WindowInstance, counter_key, counter_tag, escape_id
from .money import MAX_LIMIT_USD, NANO_PER_USD, exact_usd_to_nano, nano_to_usd, show_value, to_decimal, usd_to_nano
from .stores.base import CounterState, OverridesSnapshot
from .stores.ledger import LedgerRow

if TYPE_CHECKING:
    from .policy import BudgetPolicy, LimitStatus

__all__ = [
    "Override",
    "LiveOverrides",
    "BudgetAdmin",
    "LimitRow",
    "CounterReset",
    "DEFAULT_REFRESH_SECONDS",
    "override_field",
    "find_limit",
    "resolve_config_overrides",
    "key_id_segment",
    "resolve_cap",
    "window_for_label",
]

log = logging.getLogger(__name__)

DEFAULT_REFRESH_SECONDS = 5.0
ALL_IDS = "*"
READ_BATCH = 1000  # counters read per store call when listing a scope from its index
TOP_MARGIN = 10  # candidates read beyond 2n for ``top(n)``
TOP_READ_MAX = 10**12  # more ids than any index holds: ``top(n)`` past it reads the whole index


@dataclass(frozen=True)
class Override:
    """A limit for one id of a scope (``id="acme"``), in USD per the limit's window.

    ``window`` (and ``tz``) pick the limit when the scope has several (per day and per month);
    leave them out when it has one.
    """

    per: str
    id: str
    usd: Decimal
    window: str | None = None
    tz: str | None = None
    nano: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "usd", to_decimal(self.usd, what="Override.usd"))
        object.__setattr__(self, "nano", usd_to_nano(self.usd))
        if not isinstance(self.id, str) or not self.id or self.id == ALL_IDS:
            raise ValueError(
                f"Override.id: expected the id of one {self.per} (a non-empty string), got {self.id!r}; "
                "to change the limit for every id, change the limit itself."
            )
        if self.per == GLOBAL:
            raise ValueError("Override.per: a global limit has no ids to override; change the limit itself.")


def override_field(limit: Limit, scope_id: str | None, escaped: str | None = None) -> str:
    """The store field of an override: ``"user:day:alice"``, ``"tenant:month:*"`` (every id).
    ``escaped``: the id as a counter key holds it, when that is what is known (a long id is kept
    there as a digest, which cannot be escaped again)."""
    if escaped is not None:
        return f"{limit.slug}:{escaped}"
    return f"{limit.slug}:{ALL_IDS if scope_id is None else escape_id(scope_id)}"


def find_limit(limits: Sequence[Limit], per: str, window: str | None = None, tz: str | None = None,
               unit: str | None = "usd") -> Limit:
    """The one limit of scope ``per`` (and ``window``/``tz`` when given) that counts ``unit`` (None:
    any); ValueError says what exists. Overrides are in dollars: they only ever name a dollar limit."""
    found = [x for x in limits if x.per == per and (window is None or x.window == window)
             and (tz is None or x.tz == tz) and (unit is None or x.unit == unit)]
    if len(found) == 1:
        return found[0]
    known = ", ".join(_describe(x) for x in limits) or "none"
    if not found:
        what = f"per {per}" + (f" per {window}" if window else "") + (f" ({tz})" if tz else "")
        if unit is not None and any(x.per == per and (window is None or x.window == window) for x in limits):
            raise ValueError(f"no {'dollar' if unit == 'usd' else unit} limit {what} (overrides and `limit set` "
                             f"are in dollars; a tokens or requests limit is changed in the config); "
                             f"the limits are: {known}")
        raise ValueError(f"no limit {what}; the limits are: {known}")
    choices = ", ".join(_describe(x) for x in found)
    raise ValueError(f"scope {per!r} has several limits ({choices}): say which window (and tz)")


def _describe(limit: Limit) -> str:
    tz = "" if limit.tz in ("UTC", "utc", "Z") else f" ({limit.tz})"
    unit = "" if limit.unit == "usd" else f" ({limit.unit})"
    return f"per {limit.per} per {limit.window}{tz}{unit}"


def resolve_config_overrides(limits: Sequence[Limit], overrides: Sequence[Override] | None) -> dict[str, int]:
    """``Override`` objects -> store-style fields (field -> nano-USD), checked against ``limits``."""
    out: dict[str, int] = {}
    for item in overrides or ():
        if not isinstance(item, Override):
            raise TypeError(f"overrides: expected Override(...) items, got {type(item).__name__} {item!r}")
        try:
            limit = find_limit(limits, item.per, item.window, item.tz)
        except ValueError as exc:
            raise ValueError(f"override for {item.per} {item.id!r}: {exc}") from None
        key = override_field(limit, item.id)
        if key in out:
            raise ValueError(f"two overrides for {item.per} {item.id!r} on the limit {_describe(limit)}")
        out[key] = item.nano
    return out


def resolve_cap(limit: Limit, scope_id: str | None, live: Mapping[str, int],
                config: Mapping[str, int], escaped: str | None = None) -> tuple[int, str]:
    """The limit in force for one counter, in nano-USD, and where it comes from.

    ``escaped``: the id as its counter key holds it (``override_field``).
    Sources: ``"store override"``, ``"config override"``, ``"store override (every id)"``, ``"limit"``.
    """
    if scope_id is not None:
        own = override_field(limit, scope_id, escaped)
        if own in live:
            return live[own], "store override"
        if own in config:
            return config[own], "config override"
    every = override_field(limit, None)
    if every in live:
        return live[every], "store override (every id)"
    return limit.nano, "limit"


class LiveOverrides:
    """One process's cached copy of a budget's overrides in the store.

    ``values`` (field -> nano-USD) is replaced, never mutated; ``generation`` grows each time it
    changes, so that plans built from older values are not served from a cache.
    """

    def __init__(self, store: Any, name: str, refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> None:
        if isinstance(refresh_seconds, bool) or not isinstance(refresh_seconds, (int, float)) or refresh_seconds < 0:
            raise ValueError(
                f"override_refresh_seconds: expected a number of seconds >= 0 (or None to not read the "
                f"store's overrides), got {refresh_seconds!r}"
            )
        self.store = store
        self.name = name
        self.refresh_seconds = float(refresh_seconds)
        self.values: Mapping[str, int] = MappingProxyType({})
        self.version: str | None = None
        self.generation = 0
        self._next = 0.0  # time.monotonic() of the next check
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        _instances.add(self)

    def _after_fork(self) -> None:
        # A worker forked while another thread was checking would inherit a held lock for good.
        self._lock = threading.Lock()
        self._task = None
        self._next = 0.0

    def __repr__(self) -> str:
        return f"LiveOverrides({self.name!r}, {len(self.values)} overrides, version={self.version!r})"

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def expire(self) -> None:
        """Check the store again on next use (after a change made by this process)."""
        self._next = 0.0

    def refresh(self) -> bool:
        """Check the store if the copy is older than ``refresh_seconds``; True when it changed.

        Never raises: a store that cannot be read keeps the last values (and the guard's own
        store-error policy decides about the call). Inside an event loop, every check after the
        first is started in the background and this call goes on with the current values.
        """
        if not self._lock.acquire(blocking=False):
            return False  # another thread is checking: use what we have
        try:
            if time.monotonic() < self._next:
                return False
            self._next = time.monotonic() + self.refresh_seconds
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None and self.version is not None:
                self._start_background(loop)
                return False
            try:
                snapshot = self.store.read_overrides(self.name, self.version)
            except TypeError:
                if loop is None:  # an asyncio-only store, used outside an event loop: nothing to do
                    return False
                self._start_background(loop)
                return False
            except Exception as exc:  # noqa: BLE001 - reported; the call goes on with the last values
                self._report(exc)
                return False
            return self._apply(snapshot)
        finally:
            self._lock.release()

    def _start_background(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._arefresh())

    async def _arefresh(self) -> None:
        try:
            snapshot = await self.store.aread_overrides(self.name, self.version)
        except Exception as exc:  # noqa: BLE001
            self._report(exc)
            return
        self._apply(snapshot)

    async def arefresh(self) -> bool:
        """Check the store now (async); True when the values changed."""
        self._next = time.monotonic() + self.refresh_seconds
        try:
            snapshot = await self.store.aread_overrides(self.name, self.version)
        except Exception as exc:  # noqa: BLE001
            self._report(exc)
            return False
        return self._apply(snapshot)

    def _report(self, exc: Exception) -> None:
        if not self._failing:
            log.warning("could not read live limit overrides of budget %r (keeping the last ones): %s",
                        self.name, exc)
        self._failing = True

    def _apply(self, snapshot: OverridesSnapshot) -> bool:
        self._failing = False
        changed = snapshot.values is not None and dict(snapshot.values) != dict(self.values)
        if changed:
            self.values = MappingProxyType(dict(snapshot.values or {}))
            self.generation += 1
        self.version = snapshot.version
        return changed


_instances: weakref.WeakSet[LiveOverrides] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for live in list(_instances):
        live._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


# -- windows by label ------------------------------------------------------------------------

def window_for_label(limit: Limit, label: str | None, now: datetime | None = None) -> WindowInstance:
    """The window instance of ``limit`` named ``label`` (``2026-11``, ``2026-11-22``, ``2026-W47``,
    ``2026-11-22T09``, ``all``); None means the current one. ValueError for a label of another shape."""
    if label is None:
        return limit.window_at(now or datetime.now(timezone.utc))
    return limit.window_named(label)


# -- the operator's API ----------------------------------------------------------------------


@dataclass(frozen=True)
class LimitRow:
    """A limit as configured and as overridden, for one id (or ``*``: every id of the scope)."""

    per: str
    window: str
    tz: str
    scope_id: str | None  # None: every id (or the global limit)
    configured: Decimal  # the limit's own amount
    config_override: Decimal | None
    store_override: Decimal | None
    effective: Decimal
    source: str
    field: str
    unit: str = "usd"  # what the amounts count: "usd" (Decimal USD), "tokens" or "requests"


@dataclass(frozen=True)
class CounterReset:
    """A counter ``reset`` zeroed, and its state before."""

    key: str
    scope_id: str | None
    window_label: str
    spent_before: Decimal
    held: Decimal


def key_id_segment(key: str) -> str:
    """The id of a counter key as the key holds it (escaped; a long id's digest ``~...``)."""
    return key.split("}:", 1)[1].split(":")[2]


def _unescape(segment: str) -> str | None:
    if segment == "-":
        return None
    return segment if segment.startswith("~") else unquote(segment)


class BudgetAdmin:
    """What an operator (or a dashboard) does to a budget: read limits, change them live, list the
    counters of a scope, find the heaviest spenders, reset a counter. The CLI is built on it."""

    def __init__(self, policy: BudgetPolicy) -> None:
        self.policy = policy
        store = policy.store
        missing = [m for m in ("read_overrides", "set_override", "scan_counters", "reset_counter")
                   if not callable(getattr(store, m, None))]
        self._missing = missing

    def _need(self, what: str) -> Any:
        if self._missing:
            raise TypeError(f"{type(self.policy.store).__name__} cannot {what}: it lacks {', '.join(self._missing)} "
                            "(see stores.base.AdminStore); MemoryStore and RedisStore have them.")
        return self.policy.store

    def limit(self, per: str, window: str | None = None, tz: str | None = None) -> Limit:
        return find_limit(self.policy.limits, per, window, tz)

    def _live(self) -> Mapping[str, int]:
        live = self.policy.live_overrides
        if live is None:
            return {}
        live.refresh()
        return live.values

    # -- limits ------------------------------------------------------------------------------

    def limit_rows(self, per: str | None = None, scope_id: str | None = None,
                   window: str | None = None) -> list[LimitRow]:
        """Every limit (of scope ``per``) for ``scope_id``, or for every id, with its overrides.

        Without ``scope_id``, also one row per id that has an override (config or store).
        """
        live = self._live()
        config = self.policy.config_overrides
        rows = []
        for limit in self.policy.limits:
            if (per is not None and limit.per != per) or (window is not None and limit.window != window):
                continue
            ids: list[tuple[str | None, str | None]] = [(scope_id if limit.per != GLOBAL else None, None)]
            if scope_id is None and limit.per != GLOBAL:
                prefix = limit.slug + ":"
                named = {f[len(prefix):] for f in (*live, *config) if f.startswith(prefix)} - {ALL_IDS}
                ids += sorted(((_unescape(x) or x), x) for x in named)
            for sid, escaped in ids:
                rows.append(self._row(limit, sid, live, config, escaped))
        return rows

    def _row(self, limit: Limit, sid: str | None, live: Mapping[str, int], config: Mapping[str, int],
             escaped: str | None = None) -> LimitRow:
        own = override_field(limit, sid, escaped)
        cap, source = resolve_cap(limit, sid, live, config, escaped)
        return LimitRow(
            per=limit.per,
            window=limit.window,
            tz=limit.tz,
            scope_id=sid,
            configured=limit.value,
            config_override=limit.show(config[own]) if own in config else None,
            store_override=limit.show(live[own]) if own in live else None,
            effective=limit.value if source == "limit" else limit.show(cap),
            source=source,
            field=own,
            unit=limit.unit,
        )

    def set_limit(self, per: str, usd: Any, scope_id: str | None = None, window: str | None = None,
                  tz: str | None = None) -> LimitRow:
        """Override a limit live, for ``scope_id`` or (None) every id of the scope; in force in every
        process within its override refresh time."""
        nano = exact_usd_to_nano(usd, what="limit")
        if nano > MAX_LIMIT_USD * NANO_PER_USD:
            raise ValueError(f"limit: at most ${MAX_LIMIT_USD} (as in a config file), got ${to_decimal(usd)}: "
                             "check the digits")
        return self._write(per, nano, scope_id, window, tz)

    def clear_limit(self, per: str, scope_id: str | None = None, window: str | None = None,
                    tz: str | None = None) -> LimitRow:
        """Drop a live override: the config's override, or the limit itself, applies again."""
        return self._write(per, None, scope_id, window, tz)

    def _write(self, per: str, nano: int | None, scope_id: str | None, window: str | None,
               tz: str | None) -> LimitRow:
        limit = self.limit(per, window, tz)
        if limit.per == GLOBAL:
            scope_id = None
        elif scope_id is not None and (not isinstance(scope_id, str) or not scope_id.strip()):
            raise ValueError(f"the id to override must be a non-empty string, got {scope_id!r}; "
                             f"leave it out to override the limit of every {limit.per}")
        store = self._need("keep live limit overrides")
        store.set_override(self.policy.name, override_field(limit, scope_id), nano)
        live = self.policy.live_overrides
        if live is not None:
            live.expire()
        return self._row(limit, scope_id, self._live(), self.policy.config_overrides)

    # -- counters ----------------------------------------------------------------------------

    def _tag(self, limit: Limit, scope_id: str | None, tenant: str | None) -> str | None:
        """The hash tag of a counter (as ``BudgetPolicy`` places it), or None when it depends on a
        tenant that was not given (then the counter is found by scanning)."""
        policy = self.policy
        if not policy._tenant_scoped or limit.per not in TENANT_LOCAL:
            return policy._name_tag
        owner = scope_id if limit.per == "tenant" else tenant
        return None if owner is None else counter_tag(policy._name_tag, limit.per, owner)

    def _counters(self, limit: Limit, scope_id: str | None, label: str,
                  tenant: str | None) -> list[tuple[str, CounterState]]:
        """Counters of ``limit`` for ``scope_id`` (None: every id that has one) in window ``label``.

        One id whose counter's place is known is read directly (a counter never used reads as
        zeros); otherwise the store is scanned for the budget's counters of that limit and window.
        """
        policy = self.policy
        if scope_id is not None or limit.per == GLOBAL:
            tag = self._tag(limit, scope_id, tenant)
            if tag is not None:
                key = counter_key(policy.name, tag, limit, scope_id, label)
                return [(key, policy.store.read([key])[0])]
        store = policy.store
        if scope_id is None and callable(getattr(store, "read_index", None)):
            return self._indexed(f"{escape_id(policy.name)}:{limit.per}:{limit.slug}:{label}", None)
        sid = ALL_IDS if scope_id is None else escape_id(scope_id)
        pattern = f"{{*}}:{escape_id(policy.name)}:{limit.per}:{sid}:{limit.slug}:{label}"
        return self._need("list counters").scan_counters(pattern)

    def _indexed(self, index: str, count: int | None) -> list[tuple[str, CounterState]]:
        """The counters of a spend index (the store's ``read_index``), read exactly, by key."""
        keys = sorted(k for k, _ in self.policy.store.read_index(index, count))
        out: list[tuple[str, CounterState]] = []
        for start in range(0, len(keys), READ_BATCH):
            batch = keys[start:start + READ_BATCH]
            out.extend(zip(batch, self.policy.store.read(batch)))
        return out

    def statuses(self, per: str | None = None, scope_id: str | None = None, window: str | None = None,
                 at: str | None = None, tenant: str | None = None) -> list[LimitStatus]:
        """Each limit (of scope ``per``, window ``window``) for ``scope_id``, or for every id that
        has a counter in the window (``at``: a window label, default the current window)."""
        out: list[LimitStatus] = []
        for limit in self.policy.limits:
            if (per is not None and limit.per != per) or (window is not None and limit.window != window):
                continue
            out.extend(self.limit_statuses(limit, scope_id, at, tenant))
        return out

    def limit_statuses(self, limit: Limit, scope_id: str | None = None, at: str | None = None,
                       tenant: str | None = None) -> list[LimitStatus]:
        """``limit``'s status for ``scope_id``, or for every id with a counter in window ``at``
        (every id: read from the store's spend index, or a SCAN for a store without one)."""
        if limit.per == GLOBAL:
            scope_id = None
        win = window_for_label(limit, at)
        return self._statuses_of(limit, win.label, self._counters(limit, scope_id, win.label, tenant))

    def _statuses_of(self, limit: Limit, label: str, found: list[tuple[str, CounterState]]) -> list[LimitStatus]:
        from .policy import LimitStatus

        win = window_for_label(limit, label)
        live, config = self._live(), self.policy.config_overrides
        out = []
        for key, state in found:
            segment = key_id_segment(key)
            sid = _unescape(segment)
            cap, source = resolve_cap(limit, sid, live, config, escaped=segment)
            usd = limit.value if source == "limit" else limit.show(cap)
            spent, held = limit.show(state.spent), limit.show(state.held)
            out.append(LimitStatus(
                scope=limit.per, scope_id=sid, window=limit.window, window_label=win.label, limit=usd,
                spent=spent, held=held, remaining=max(usd - spent - held, Decimal(0)),
                resets_at=win.resets_at, key=key, unit=limit.unit,
            ))
        return out

    def top(self, per: str, window: str | None = None, at: str | None = None, n: int | None = 10,
            tz: str | None = None) -> list[LimitStatus]:
        """The ids of scope ``per`` that spent most in a window (``at``, default the current one),
        heaviest first (ties: more held first, then by id); ``n`` of them (None: every id)."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"top: n must be a whole number of ids >= 1 (None: every id), got {show_value(n)}")
        limit = self.limit(per, window, tz)
        if n is not None and limit.per != GLOBAL and callable(getattr(self.policy.store, "read_index", None)):
            # The index ranks ids by spent as of their counter's last reserve/settle; the candidates'
            # counters are then read exactly (a margin covers ties and expiry charges since).
            label = window_for_label(limit, at).label
            index = f"{escape_id(self.policy.name)}:{limit.per}:{limit.slug}:{label}"
            count = 2 * n + TOP_MARGIN
            # A huge n means every id: read the whole index (a count past int64 makes Redis refuse).
            rows = self._statuses_of(limit, label, self._indexed(index, count if count <= TOP_READ_MAX else None))
        else:
            rows = self.limit_statuses(limit, None, at, None)
        rows.sort(key=lambda s: (-s.spent, -s.held, s.scope_id or ""))
        return rows if n is None else rows[:n]

    def read_scope_index(self, limit: Limit, window_label: str) -> list[LimitStatus]:
        """Every id of ``limit``'s scope with a counter in window ``window_label``, limits in force
        applied, from the store's spend index (``stores.ledger``; a SCAN for a store without one)."""
        return self.limit_statuses(limit, None, window_label, None)

    @property
    def read_ledger(self) -> Any:
        """``read_ledger(*, scope, scope_id, since, kinds, model, call_id, limit)`` (see
        ``_read_ledger``); absent (AttributeError) when the store keeps no ledger, so that
        ``getattr(admin, "read_ledger", None)`` tells whether there is one."""
        if not callable(getattr(self.policy.store, "read_ledger", None)):
            raise AttributeError(f"{type(self.policy.store).__name__} keeps no ledger (see stores.base.LedgerStore); "
                                 "MemoryStore and RedisStore do.")
        return self._read_ledger

    def _read_ledger(self, *, scope: str | None = None, scope_id: str | None = None, since: datetime | None = None,
                    kinds: Sequence[str] | None = None, model: str | None = None, call_id: str | None = None,
                    limit: int = 100) -> list[LedgerRow]:
        """This budget's ledger rows (``stores.ledger.LedgerRow``), newest first, merged across tags:
        only those charged to ``scope`` (``scope_id`` of it), at or after ``since`` (aware), of
        ``kinds`` (a degraded call matches ``"degrade"`` too), served by ``model``, of ``call_id``."""
        if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
            raise ValueError(f"since: expected an aware datetime, got {since!r}")
        more = {k: v for k, v in (("model", model), ("call_id", call_id)) if v is not None}  # a store's own filters
        return self.policy.store.read_ledger(self.policy.name, scope=scope, scope_id=scope_id, since=since,
                                             kinds=None if kinds is None else tuple(kinds), limit=limit, **more)

    def reset(self, per: str, scope_id: str | None = None, window: str | None = None, at: str | None = None,
              tz: str | None = None, tenant: str | None = None) -> list[CounterReset]:
        """Zero the spent of ``scope_id``'s counter(s) of the scope's limit (every window of the scope
        when ``window`` is None), in window ``at`` (default: current). Holds of calls in flight stay."""
        limits = [x for x in self.policy.limits if x.per == per and (window is None or x.window == window)
                  and (tz is None or x.tz == tz)]
        if not limits:
            self.limit(per, window, tz)  # raises, naming the limits there are
        if per != GLOBAL and scope_id is None:
            raise ValueError(f"say whose {per} counter to reset (an id)")
        store = self._need("reset counters")
        out = []
        for limit in limits:
            win = window_for_label(limit, at)
            for key, _ in self._counters(limit, None if per == GLOBAL else scope_id, win.label, tenant):
                before: CounterState = store.reset_counter(key)
                out.append(CounterReset(key, None if per == GLOBAL else scope_id, win.label,
                                        nano_to_usd(before.spent), nano_to_usd(before.held)))
        return out
