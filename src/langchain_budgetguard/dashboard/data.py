"""What the dashboard shows, as plain data: one function per page, no HTML, no HTTP.

Every amount is a ``Decimal`` and is written as the CLI writes it (``exact``): the page, its JSON
twin and ``budgetguard status --json`` agree to the last digit.

Two parts of the data come from things the stores do not have yet, and plug in when they do:

- ``scope_rows``: every id of a scope with a counter in a window, from ``BudgetAdmin``'s
  ``read_scope_index`` (the spend index the scripts keep; a SCAN for a store without one). The
  first pages of a scope by % used or by spend (the default order) read only the head of the
  index instead (``IndexPageReader``): their cost grows with the page number, not with the ids.
- the per-call ledger (spend over time, last calls, refusals, degrades, alerts): read through a
  ``read_ledger`` method (see ``LedgerReader``) on the admin or the store. Without one, the pages
  say that per-call history needs the ledger; they never make data up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from ..limits import GLOBAL, Limit, WindowInstance, escape_id
from ..money import nano_to_usd
from ..overrides import BudgetAdmin, LimitRow, find_limit, key_id_segment, override_field, resolve_cap, window_for_label
from ..policy import LimitStatus
from ..stores.base import CounterState, IndexPageReader
from ..stores.ledger import scopes_of_keys

__all__ = [
    "DashboardData",
    "LedgerEntry",
    "LedgerReader",
    "ScopeIndexReader",
    "ScopePage",
    "IdPage",
    "EventsPage",
    "SORTS",
    "PAGE_SIZES",
    "LEDGER_MISSING",
    "exact",
    "used_percent",
    "status_json",
    "limit_json",
    "entry_json",
]

PAGE_SIZES = (50, 100)
SORTS = ("used", "spent", "held", "remaining", "limit", "id", "resets")
RANKED_SORTS = ("used", "spent")  # the orders the spend index gives without reading every counter
RANKED_MARGIN = 200  # counters read beyond a ranked page's end (see ``DashboardData.scope_page``)
# More ids than any index holds: a page beyond reads every counter and clamps to the last page
# (asking the store for the head would overflow Redis' int64 range end).
RANKED_READ_MAX = 10**12
READ_BATCH = 1000  # counters per store read
EVENT_KINDS = ("refusal", "degrade", "alert")
LEDGER_MISSING = ("Per-call history (spend over time, last calls, refusals, degrades and alerts) needs the "
                  "per-call ledger (issue 14), which this store does not keep yet. The counters above are exact.")


def exact(value: Decimal | None) -> str | None:
    """A Decimal in plain positional notation, as the CLI prints it (``0.00001125``, never ``1.125E-5``)."""
    if value is None:
        return None
    return format(value.normalize() if value else Decimal(0), "f")


def used_percent(status: LimitStatus) -> Decimal | None:
    """(spent + held) / limit * 100, exact; None for a $0 limit (everything is used)."""
    return (status.spent + status.held) / status.limit * 100 if status.limit else None


def status_json(s: LimitStatus) -> dict[str, Any]:
    """The same fields as ``budgetguard status --json``."""
    return {
        "scope": s.scope,
        "id": s.scope_id,
        "window": s.window,
        "window_label": s.window_label,
        "limit": exact(s.limit),
        "spent": exact(s.spent),
        "held": exact(s.held),
        "sliced": exact(s.sliced),
        "remaining": exact(s.remaining),
        "used_percent": exact(used_percent(s)),
        "resets_at": s.resets_at.isoformat() if s.resets_at else None,
        "key": s.key,
        "unit": s.unit,
    }


def limit_json(row: LimitRow) -> dict[str, Any]:
    """The same fields as ``budgetguard limit get --json``."""
    return {"scope": row.per, "id": row.scope_id, "window": row.window, "tz": row.tz,
            "configured": exact(row.configured), "config_override": exact(row.config_override),
            "store_override": exact(row.store_override), "effective": exact(row.effective), "source": row.source,
            "field": row.field, "unit": row.unit}


# -- the ledger, as the dashboard expects it --------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """One row of the per-call ledger as the dashboard reads it.

    ``kind``: ``"call"`` (a settled call), ``"refusal"``, ``"degrade"`` or ``"alert"``.
    ``scopes`` maps each scope the row was charged to (or refused on) to its id
    (``{"user": "alice", "tenant": "acme"}``). ``tokens`` maps a kind of token (``input``,
    ``cached``, ``cache_write``, ``output``, ``reasoning``...) to a count. ``cost`` and
    ``reserved`` are exact USD. ``detail`` is free text (a refusal's message, an alert's threshold).
    """

    at: datetime
    kind: str = "call"
    call_id: str | None = None
    scopes: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None
    host: str | None = None
    tokens: Mapping[str, int] = field(default_factory=dict)
    cost: Decimal = Decimal(0)
    reserved: Decimal | None = None
    estimated: bool = False
    degraded: bool = False
    clamped: bool = False
    refused: bool = False
    detail: str = ""

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())


@runtime_checkable
class LedgerReader(Protocol):
    """What the dashboard calls to read the per-call ledger (issue 14); not implemented by any store yet.

    ``BudgetAdmin`` (preferred: it knows the budget's name) or the store offers::

        read_ledger(*, scope=None, scope_id=None, since=None, kinds=None, limit=100)
            -> Sequence[LedgerEntry | Mapping]                       # on BudgetAdmin
        read_ledger(name, *, scope=None, scope_id=None, since=None, kinds=None, limit=100)
            -> Sequence[LedgerEntry | Mapping]                       # on a store: name = the budget's name

    - ``scope``/``scope_id``: only rows charged to that id of that scope (both None: every row);
    - ``since``: an aware datetime, only rows at or after it;
    - ``kinds``: a collection of ``LedgerEntry.kind`` values (None: every kind); a settled call
      flagged ``degraded`` (or ``refused``, in shadow mode) matches ``"degrade"`` (``"refusal"``) too;
    - ``limit``: at most this many rows, the NEWEST ones, in any order (the dashboard sorts).

    Rows are ``LedgerEntry`` objects or mappings (or objects) with the same field names; ``cost``
    and ``reserved`` as ``Decimal`` (or exact strings), ``at`` as an aware datetime (or epoch
    seconds). A float amount is refused (money is never a float).
    """

    def read_ledger(self, *args: Any, **kwargs: Any) -> Sequence[Any]: ...


@runtime_checkable
class ScopeIndexReader(Protocol):
    """What ``scope_rows`` reads instead of a SCAN once the scripts keep an index (issue 14).

    ``BudgetAdmin`` offers ``read_scope_index(limit, window_label) -> Sequence[LimitStatus]``: every
    id of ``limit``'s scope with a counter in that window, limits in force applied (overrides), as
    ``BudgetAdmin.limit_statuses(limit, None, at)`` returns them today.
    """

    def read_scope_index(self, limit: Limit, window_label: str) -> Sequence[LimitStatus]: ...


def _field(row: Any, name: str, default: Any = None) -> Any:
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


def _money(value: Any, what: str) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, float) or isinstance(value, bool):
        raise TypeError(f"ledger row {what}: expected a Decimal or an exact string, got {type(value).__name__} "
                        f"{value!r} (money is never a float)")
    return Decimal(str(value)) if not isinstance(value, Decimal) else value


def _when(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), timezone.utc)
    raise TypeError(f"ledger row at: expected an aware datetime or epoch seconds, got {value!r}")


def as_entry(row: Any) -> LedgerEntry:
    """A ledger row of any accepted shape (see ``LedgerReader``) as a ``LedgerEntry``."""
    if isinstance(row, LedgerEntry):
        return row
    return LedgerEntry(
        at=_when(_field(row, "at")),
        kind=str(_field(row, "kind", "call") or "call"),
        call_id=_field(row, "call_id"),
        scopes=dict(_field(row, "scopes") or {}),
        model=_field(row, "model"),
        host=_field(row, "host"),
        tokens={str(k): int(v) for k, v in dict(_field(row, "tokens") or {}).items()},
        cost=_money(_field(row, "cost", Decimal(0)), "cost") or Decimal(0),
        reserved=_money(_field(row, "reserved"), "reserved"),
        estimated=bool(_field(row, "estimated", False)),
        degraded=bool(_field(row, "degraded", False)),
        clamped=bool(_field(row, "clamped", False)),
        refused=bool(_field(row, "refused", False)),
        detail=str(_field(row, "detail", "") or ""),
    )


def entry_json(e: LedgerEntry) -> dict[str, Any]:
    return {"at": e.at.isoformat(), "kind": e.kind, "call_id": e.call_id, "scopes": dict(e.scopes),
            "model": e.model, "host": e.host, "tokens": dict(e.tokens), "cost": exact(e.cost),
            "reserved": exact(e.reserved), "estimated": e.estimated, "degraded": e.degraded,
            "clamped": e.clamped, "refused": e.refused, "detail": e.detail}


# -- pages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScopePage:
    """One page of a scope's ids, sorted and filtered, and where it sits among all of them."""

    scope: str
    window: str
    window_label: str
    limits: tuple[Limit, ...]  # the scope's limits (one per window): the choices of ``window``
    rows: tuple[LimitStatus, ...]
    total: int  # ids matching ``search``
    all_ids: int  # ids with a counter in the window
    page: int
    pages: int
    per_page: int
    sort: str
    descending: bool
    search: str
    source: str  # "scan" or "index": how the ids were found

    def as_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "window": self.window, "window_label": self.window_label,
                "windows": [x.window for x in self.limits], "total": self.total, "all_ids": self.all_ids,
                "page": self.page, "pages": self.pages, "per_page": self.per_page, "sort": self.sort,
                "order": "desc" if self.descending else "asc", "search": self.search, "source": self.source,
                "rows": [status_json(s) for s in self.rows]}


@dataclass(frozen=True)
class SpendPoint:
    """Spend of one id so far in a window, after the call at ``at`` (cumulative, exact)."""

    at: datetime
    spent: Decimal


@dataclass(frozen=True)
class IdPage:
    scope: str
    scope_id: str
    statuses: tuple[LimitStatus, ...]  # every limit that applies to the id (its scope's, and global ones)
    ledger: bool  # whether the store keeps a ledger
    calls: tuple[LedgerEntry, ...] = ()  # newest first
    curve: tuple[SpendPoint, ...] = ()  # spend over the first status's window, oldest first
    curve_since: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "id": self.scope_id, "statuses": [status_json(s) for s in self.statuses],
                "ledger": self.ledger, "note": None if self.ledger else LEDGER_MISSING,
                "calls": [entry_json(e) for e in self.calls],
                "spend_curve": {"since": self.curve_since.isoformat() if self.curve_since else None,
                                "points": [{"at": p.at.isoformat(), "spent": exact(p.spent)} for p in self.curve]}}


@dataclass(frozen=True)
class EventsPage:
    ledger: bool
    events: tuple[LedgerEntry, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"ledger": self.ledger, "note": None if self.ledger else LEDGER_MISSING,
                "events": [entry_json(e) for e in self.events]}


def _sort_key(sort: str) -> Callable[[LimitStatus], Any]:
    def used(s: LimitStatus) -> Decimal:
        percent = used_percent(s)
        return Decimal("Infinity") if percent is None else percent

    keys: dict[str, Callable[[LimitStatus], Any]] = {
        "used": used,
        "spent": lambda s: s.spent,
        "held": lambda s: s.held,
        "remaining": lambda s: s.remaining,
        "limit": lambda s: s.limit,
        "id": lambda s: s.scope_id or "",
        "resets": lambda s: s.resets_at.timestamp() if s.resets_at else float("inf"),
    }
    return keys[sort]


class DashboardData:
    """The dashboard's data for one budget, read through ``BudgetAdmin`` (as the CLI reads it).

    ``cache_seconds``: a scope's full list of ids is kept this long, so that paging, sorting and
    searching do not read the store again (0: read it on every request).
    """

    def __init__(self, admin: BudgetAdmin, *, source: str = "", store: str = "",
                 cache_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.admin = admin
        self.policy = admin.policy
        self.name = self.policy.name
        self.source = source  # the config file, for the page's header
        self.store = store  # the store, described
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[tuple[str, str, str | None], tuple[float, list[LimitStatus], str]] = {}
        self._lock = threading.Lock()

    # -- scopes and limits --------------------------------------------------------------------

    def scopes(self) -> list[str]:
        """The budget's per-id scopes (global has no ids)."""
        return [s for s in dict.fromkeys(x.per for x in self.policy.limits) if s != GLOBAL]

    def scope_limits(self, scope: str) -> tuple[Limit, ...]:
        found = tuple(x for x in self.policy.limits if x.per == scope)
        if not found:
            raise LookupError(f"budget {self.name!r} has no limit per {scope!r}; its scopes are: "
                              f"{', '.join(self.scopes()) or 'none'}")
        return found

    def limit_rows(self) -> list[LimitRow]:
        """Every limit in force, with the config's and the store's overrides and where each comes from."""
        return self.admin.limit_rows()

    # -- one scope ----------------------------------------------------------------------------

    def scope_rows(self, scope: str, window: str | None = None, at: str | None = None,
                   tz: str | None = None) -> tuple[Limit, str, list[LimitStatus], str]:
        """Every id of ``scope`` with a counter in the window (``at``: a label, default the current one).

        Returns the limit, the window label, the statuses (unsorted) and how they were found:
        ``"index"`` when the admin offers ``read_scope_index`` (issue 14), else ``"scan"``
        (``BudgetAdmin.limit_statuses``, a SCAN of the keyspace). This is the one place that finds
        all ids of a scope: replace the SCAN here.
        """
        self.scope_limits(scope)
        limit = find_limit(self.policy.limits, scope, window, tz)
        label = window_for_label(limit, at).label
        cache_key = (limit.slug, label, at)
        now = self._clock()
        with self._lock:
            cached = self._cache.get(cache_key)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return limit, label, cached[1], cached[2]
        index = getattr(self.admin, "read_scope_index", None)
        if callable(index):
            rows, how = list(index(limit, label)), "index"
        else:
            rows, how = self.admin.limit_statuses(limit, None, at), "scan"
        if self.cache_seconds > 0:
            with self._lock:
                if len(self._cache) > 32:
                    self._cache.clear()
                self._cache[cache_key] = (now, rows, how)
        return limit, label, rows, how

    def scope_page(self, scope: str, *, window: str | None = None, at: str | None = None, search: str = "",
                   sort: str = "used", descending: bool = True, page: int = 1, per_page: int = 50) -> ScopePage:
        """One page of ``scope``'s ids, sorted by ``sort`` (see ``SORTS``; ties: by id), filtered
        to ids containing ``search`` (case-insensitive).

        Sorted by ``used`` or ``spent`` without a search, on a store with a spend index, only the
        head of the index is read (``ranked_page``); otherwise every id's counter is (``scope_rows``,
        kept ``cache_seconds``). Every figure shown is read from the counter either way.
        """
        if sort not in SORTS:
            raise ValueError(f"sort: expected one of {', '.join(SORTS)}, got {sort!r}")
        if per_page not in PAGE_SIZES:
            raise ValueError(f"per_page: expected {' or '.join(map(str, PAGE_SIZES))}, got {per_page!r}")
        if page < 1:
            raise ValueError(f"page: expected 1 or more, got {page!r}")
        needle = search.strip().casefold()
        if not needle and sort in RANKED_SORTS:
            ranked = self.ranked_page(scope, window=window, at=at, sort=sort, descending=descending, page=page,
                                      per_page=per_page)
            if ranked is not None:
                return ranked
        limit, label, rows, how = self.scope_rows(scope, window, at)
        found = [s for s in rows if needle in (s.scope_id or "").casefold()] if needle else list(rows)
        found.sort(key=lambda s: s.scope_id or "")  # ties: by id, ascending
        found.sort(key=_sort_key(sort), reverse=descending)
        pages = max(1, -(-len(found) // per_page))
        page = min(page, pages)
        start = (page - 1) * per_page
        return ScopePage(scope=scope, window=limit.window, window_label=label, limits=self.scope_limits(scope),
                         rows=tuple(found[start:start + per_page]), total=len(found), all_ids=len(rows), page=page,
                         pages=pages, per_page=per_page, sort=sort, descending=descending, search=search, source=how)

    def ranked_page(self, scope: str, *, window: str | None = None, at: str | None = None, sort: str = "used",
                    descending: bool = True, page: int = 1, per_page: int = 50) -> ScopePage | None:
        """Page ``page`` of ``scope`` by ``used`` or ``spent`` read from the head of the spend index;
        None when the store has no such index, or when the page reaches into the last
        ``RANKED_MARGIN`` ids (then reading them all costs about the same and is exact).

        Reads the first ``page * per_page + RANKED_MARGIN`` counters of the index (ranked by spent
        as of each counter's last reserve or settle), plus every id with its own limit override
        (their % used is not in the index's order), then sorts those by their counters' exact
        figures. Exact unless an id beyond that head gained more than the margin's worth of rank
        since it was indexed: money held by calls in flight, or a hold's expiry charge, which the
        index learns at the id's next reserve or settle.
        """
        store = self.policy.store
        if sort not in RANKED_SORTS or not (isinstance(store, IndexPageReader)
                                            and callable(getattr(store, "read_index", None))):
            return None
        self.scope_limits(scope)
        limit = find_limit(self.policy.limits, scope, window, None)
        win = window_for_label(limit, at)
        live, config = self._overrides()
        if sort == "used" and resolve_cap(limit, None, live, config)[0] == 0:
            return None  # a $0 limit: every id is 100% used, the order is by id
        prefix = limit.slug + ":"
        own = sorted({f[len(prefix):] for f in (*live, *config) if f.startswith(prefix)}
                     - {override_field(limit, None)[len(prefix):]})
        start = (page - 1) * per_page
        want = start + per_page + RANKED_MARGIN + len(own)
        if want > RANKED_READ_MAX:
            return None
        index = f"{escape_id(self.name)}:{limit.per}:{limit.slug}:{win.label}"
        head = store.read_index_page(index, want, descending=descending, members=own)
        if head.total <= want:
            return None
        keys = list(dict.fromkeys([k for k, _ in head.rows] + [k for k, _ in head.named]))
        states: list[CounterState] = []
        for at_key in range(0, len(keys), READ_BATCH):
            states.extend(store.read(keys[at_key:at_key + READ_BATCH]))
        rows = self._statuses(limit, win, keys, states, live, config)
        rows.sort(key=lambda s: s.scope_id or "")  # ties: by id, ascending
        rows.sort(key=_sort_key(sort), reverse=descending)
        pages = -(-head.total // per_page)  # > page: head.total > want
        return ScopePage(scope=scope, window=limit.window, window_label=win.label, limits=self.scope_limits(scope),
                         rows=tuple(rows[start:start + per_page]), total=head.total, all_ids=head.total, page=page,
                         pages=pages, per_page=per_page, sort=sort, descending=descending, search="",
                         source="index")

    def _overrides(self) -> tuple[Mapping[str, int], Mapping[str, int]]:
        """The budget's live overrides (refreshed as guards refresh them) and its config's."""
        live = self.policy.live_overrides
        values: Mapping[str, int] = {}
        if live is not None:
            live.refresh()
            values = live.values
        return values, self.policy.config_overrides

    @staticmethod
    def _statuses(limit: Limit, win: WindowInstance, keys: Sequence[str], states: Sequence[CounterState],
                  live: Mapping[str, int], config: Mapping[str, int]) -> list[LimitStatus]:
        """``limit``'s status of each counter, the limit in force applied (as ``BudgetAdmin`` does)."""
        out = []
        for key, state in zip(keys, states):
            sid = scopes_of_keys([key]).get(limit.per)
            cap, source = resolve_cap(limit, sid, live, config, key_id_segment(key) if sid is not None else None)
            usd = limit.usd if source == "limit" else nano_to_usd(cap)
            spent, held = nano_to_usd(state.spent), nano_to_usd(state.held)
            out.append(LimitStatus(scope=limit.per, scope_id=sid, window=limit.window, window_label=win.label,
                                   limit=usd, spent=spent, held=held, remaining=max(usd - spent - held, Decimal(0)),
                                   resets_at=win.resets_at, key=key))
        return out

    # -- one id -------------------------------------------------------------------------------

    def id_page(self, scope: str, scope_id: str, *, tenant: str | None = None, calls: int = 50) -> IdPage:
        """Every limit that applies to ``scope_id`` of ``scope`` (the scope's limits and the global ones),
        and from the ledger, when there is one, its last calls and its spend over the window."""
        self.scope_limits(scope)
        if not isinstance(scope_id, str) or not scope_id:
            raise ValueError("id: expected the id of one " + scope)
        if scope == "tenant":
            tenant = scope_id
        statuses = [*self.admin.statuses(scope, scope_id, None, None, tenant), *self.admin.statuses(GLOBAL)]
        if not self.has_ledger():
            return IdPage(scope, scope_id, tuple(statuses), ledger=False)
        first = self.scope_limits(scope)[0]
        since = first.window_at(datetime.now(timezone.utc)).starts_at
        entries = self.read_ledger(scope=scope, scope_id=scope_id, since=since, limit=10_000)
        charged = sorted((e for e in entries if e.kind == "call"), key=lambda e: e.at)
        curve, total = [], Decimal(0)
        for e in charged:
            total += e.cost
            curve.append(SpendPoint(e.at, total))
        newest = tuple(sorted(entries, key=lambda e: e.at, reverse=True)[:calls])
        return IdPage(scope, scope_id, tuple(statuses), ledger=True, calls=newest, curve=tuple(curve),
                      curve_since=since)

    # -- the ledger ---------------------------------------------------------------------------

    def _ledger_reader(self) -> tuple[Callable[..., Sequence[Any]], bool] | None:
        reader = getattr(self.admin, "read_ledger", None)
        if callable(reader):
            return reader, False
        reader = getattr(self.policy.store, "read_ledger", None)
        if callable(reader):
            return reader, True
        return None

    def has_ledger(self) -> bool:
        return self._ledger_reader() is not None

    def read_ledger(self, *, scope: str | None = None, scope_id: str | None = None, since: datetime | None = None,
                    kinds: Collection[str] | None = None, limit: int = 100) -> list[LedgerEntry]:
        """Ledger rows (see ``LedgerReader``) as ``LedgerEntry``; [] when there is no ledger."""
        found = self._ledger_reader()
        if found is None:
            return []
        reader, needs_name = found
        kwargs = {"scope": scope, "scope_id": scope_id, "since": since,
                  "kinds": None if kinds is None else tuple(kinds), "limit": limit}
        rows = reader(self.name, **kwargs) if needs_name else reader(**kwargs)
        return [as_entry(r) for r in rows]

    def events_page(self, limit: int = 100) -> EventsPage:
        """The newest refusals, degrades and alerts, from the ledger (none without one)."""
        if not self.has_ledger():
            return EventsPage(ledger=False)
        entries = self.read_ledger(kinds=EVENT_KINDS, limit=limit)
        entries = [e for e in entries if e.kind in EVENT_KINDS or e.degraded or e.refused]
        return EventsPage(ledger=True, events=tuple(sorted(entries, key=lambda e: e.at, reverse=True)[:limit]))
