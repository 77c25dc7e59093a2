"""The in-process store: one budget for one process, thread- and asyncio-safe."""

from __future__ import annotations

import heapq
import math
from collections import deque
from datetime import datetime, timezone
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from dataclasses import dataclass, field

from .base import (
    Counter,
    CounterState,
    Crossing,
    Hold,
    IndexPage,
    OverridesSnapshot,
    ReserveResult,
    SettleResult,
    check_index_page,
    counter_holds,
    glob_regex,
    key_amounts,
)
from .ledger import (
    DEFAULT_LEDGER_MAX_ROWS,
    DEFAULT_LEDGER_RETENTION_SECONDS,
    LedgerRow,
    check_ledger_options,
    index_name_of,
    row_matches,
)
from .bounds import (
    DEFAULT_RETRY_WINDOW_SECONDS,
    MAX_NANO,
    MAX_RETRY_WINDOW_SECONDS,
    check_call_id,
    check_nano,
    check_seconds,
    check_token,
)

__all__ = ["MemoryStore", "steady_time"]

# Kept for callers of the old names: how long a record outlives its lease (now the retry window).
RECORD_TTL_SECONDS = DEFAULT_RETRY_WINDOW_SECONDS
SETTLED_RECORD_SECONDS = DEFAULT_RETRY_WINDOW_SECONDS
_CHECKED_SIZE = 1024  # distinct counter lists whose checks are remembered (see MemoryStore._holds)


@dataclass(slots=True)
class _Counter:
    spent: int = 0
    held: int = 0
    expires_at: int | None = None
    holds: dict[str, tuple[int, float, int]] = field(default_factory=dict)  # call_id -> (amount, deadline, on_expiry)
    next_deadline: float = float("inf")  # earliest lease deadline: reaping is free until then
    # call_id -> what expiry charged here since the last reset, for a late settle to replace
    expired: dict[str, int] = field(default_factory=dict)
    alerts: tuple[int, ...] = ()  # thresholds, as the latest reserve that gave some stored them
    fired: set[int] = field(default_factory=set)  # thresholds fired since the counter began or was reset


@dataclass(slots=True)
class _Record:
    state: str  # "held", "settled", "released"
    token: str
    forget_at: float  # inf while a hold of the call is live


def _state(counter: _Counter | None) -> CounterState:
    return CounterState(counter.spent, counter.held) if counter is not None else CounterState()


def _add_spent(counter: _Counter, amount: int) -> None:
    counter.spent = min(counter.spent + amount, MAX_NANO)  # saturates: a full counter, never overflow


def _fire(index: int, key: str, counter: _Counter, out: list[Crossing]) -> None:
    """Fire the counter's thresholds that its spent reached and that have not fired yet."""
    for threshold in counter.alerts:
        if threshold <= counter.spent and threshold not in counter.fired:
            counter.fired.add(threshold)
            out.append(Crossing(index, key, threshold, counter.spent))


_WALL_AT_START, _MONOTONIC_AT_START = time.time(), time.monotonic()


def steady_time() -> float:
    """Seconds since the epoch that never jump: the wall clock when this module was imported plus
    the monotonic time since. Leases here are timed against it, as the lease keeper times their
    renewals: a wall clock stepped forward (an NTP correction, a resumed VM) must not end the
    holds of calls still running."""
    return _WALL_AT_START + (time.monotonic() - _MONOTONIC_AT_START)


class MemoryStore:
    """Counters in a dict behind one lock. Operations are short and never await while locked.

    ``retry_window_seconds``: how long a call's record outlives its lease (a settled call's, its
    settle), so that retries inside it are recognised; after it, the record is forgotten.

    The ledger (``stores.ledger``) is a bounded in-memory log: at most ``ledger_max_rows`` rows
    (0: no ledger), none older than ``ledger_retention_seconds``. The spend index is a dict of
    (scope, window instance) -> its counters, kept as counters come and go.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        retry_window_seconds: float = DEFAULT_RETRY_WINDOW_SECONDS,
        ledger_max_rows: int = DEFAULT_LEDGER_MAX_ROWS,
        ledger_retention_seconds: int = DEFAULT_LEDGER_RETENTION_SECONDS,
    ) -> None:
        self.ledger_max_rows, self.ledger_retention_seconds = check_ledger_options(
            ledger_max_rows, ledger_retention_seconds)
        # (store time, amount charged, row): a row is made ``written`` only when it is read, as the
        # settle that keeps it is on every call's path and a read is rare.
        self._ledger: deque[tuple[float, int, LedgerRow]] = deque(maxlen=self.ledger_max_rows or 1)
        self._index: dict[str, dict[str, None]] = {}  # index name -> its counter keys
        self._clock = steady_time if clock is None else clock
        self.retry_window_seconds = check_seconds(
            retry_window_seconds, "retry_window_seconds", MAX_RETRY_WINDOW_SECONDS
        )
        self._lock = threading.Lock()
        self._counters: dict[str, _Counter] = {}
        self._records: dict[str, _Record] = {}
        # When records, expiry charges and counters may be forgotten, as heaps: a sweep pops only
        # what is due, so its work follows the rate of expiries, not the size of the store. An
        # entry whose record or counter was given more time since is skipped; a newer entry
        # stands for it.
        self._record_expiry: list[tuple[float, str]] = []
        # Settled calls' records are forgotten one retry window after their settle: in the order they
        # settled, so a FIFO serves them (O(1), where the heap is O(log n) in the records kept).
        # Were the clock to step back, a record behind a later one is forgotten late, never early.
        self._settled_expiry: deque[tuple[float, str]] = deque()
        self._expired_expiry: list[tuple[float, str, str]] = []  # (forget at, counter key, call_id)
        self._counter_expiry: list[tuple[int, str]] = []
        self._next_sweep = 0.0
        self._overrides: dict[str, dict[str, int]] = {}  # budget name -> field -> nano-USD
        self._override_versions: dict[str, int] = {}
        self._checked: dict[tuple[Counter, ...], dict[str, tuple[int, ...]]] = {}  # see _holds

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._counters)} counters)"

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals (called with the lock held) --------------------------------------------

    def _reap(self, key: str, counter: _Counter, now: float) -> None:
        if now < counter.next_deadline:
            return
        expired = [cid for cid, (_, deadline, _) in counter.holds.items() if deadline <= now]
        for cid in expired:
            amount, _, on_expiry = counter.holds.pop(cid)
            counter.held -= amount
            record = self._records.get(cid)
            if record is not None and record.state == "held" and record.forget_at == math.inf:
                # Its lease is over: the record waits one retry window more for a late settle.
                self._remember(cid, _Record("held", record.token, now + self.retry_window_seconds))
            if on_expiry:
                _add_spent(counter, on_expiry)
                counter.expired[cid] = on_expiry
                heapq.heappush(self._expired_expiry, (now + self.retry_window_seconds, key, cid))
        counter.next_deadline = min((d for _, d, _ in counter.holds.values()), default=float("inf"))

    def _remember(self, call_id: str, record: _Record) -> None:
        self._records[call_id] = record
        heapq.heappush(self._record_expiry, (record.forget_at, call_id))

    def _forget_if_due(self, call_id: str, now: float) -> None:
        """Forget the record of ``call_id`` if its time is up (one given more time since stays)."""
        record = self._records.get(call_id)
        if record is not None and record.forget_at <= now:
            del self._records[call_id]

    def _sweep(self, now: float) -> None:
        """Drop what outlived its use: records, expiry charges, counters past retention (at most once a second)."""
        self._next_sweep = now + 1
        records, counters, expired = self._record_expiry, self._counter_expiry, self._expired_expiry
        while records and records[0][0] <= now:
            self._forget_if_due(heapq.heappop(records)[1], now)
        settled = self._settled_expiry
        while settled and settled[0][0] <= now:
            self._forget_if_due(settled.popleft()[1], now)
        while expired and expired[0][0] <= now:
            _, key, cid = heapq.heappop(expired)
            counter = self._counters.get(key)
            if counter is not None:
                counter.expired.pop(cid, None)
        while counters and counters[0][0] <= now:
            expires_at, key = heapq.heappop(counters)
            counter = self._counters.get(key)
            if counter is None or counter.expires_at != expires_at:
                continue
            self._reap(key, counter, now)
            if counter.holds:  # a call still in flight: look again when its lease ends
                heapq.heappush(counters, (int(counter.next_deadline) + 1, key))
                counter.expires_at = int(counter.next_deadline) + 1
            else:
                self._drop_counter(key)

    def _new_counter(self, key: str) -> _Counter:
        counter = self._counters[key] = _Counter()
        found = index_name_of(key)
        if found is not None:
            self._index.setdefault(found[0], {})[key] = None
        return counter

    def _drop_counter(self, key: str) -> None:
        del self._counters[key]
        found = index_name_of(key)
        if found is not None:
            members = self._index.get(found[0])
            if members is not None:
                members.pop(key, None)
                if not members:
                    del self._index[found[0]]

    def _append(self, row: LedgerRow, now: float, charged: int) -> None:
        """Keep ``row`` as written at the store's clock ``now`` with ``charged`` (a row's own ``at`` is never kept)."""
        if not self.ledger_max_rows:
            return
        ledger = self._ledger
        ledger.append((now, charged, row))
        oldest = now - self.ledger_retention_seconds
        if ledger[0][0] < oldest:
            self._trim(now)

    def _trim(self, now: float) -> None:
        oldest = now - self.ledger_retention_seconds
        while self._ledger and self._ledger[0][0] < oldest:
            self._ledger.popleft()

    def _get(self, key: str, now: float) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is not None:
            self._reap(key, counter, now)
        return counter

    def _holds(self, counters: Sequence[Counter], hold: Hold) -> dict[str, tuple[int, int, tuple[int, ...]]]:
        """Each distinct key's (amount, charge on expiry, alerts) for ``hold`` (``counter_holds``,
        checked). Counters that all hold the hold's own amount are checked once per distinct list
        (the hold's amounts are checked by the caller): a guard reserves the same counters call
        after call."""
        if not all(c.amount is None and c.charge_on_expiry is None for c in counters):
            return {k: (h.amount, h.charge_on_expiry, h.alerts) for k, h in counter_holds(counters, hold).items()}
        specs = tuple(counters)
        try:
            alerts = self._checked.get(specs)
        except TypeError:  # a counter with an unhashable field (alerts as a list): checked every time
            return {k: (h.amount, h.charge_on_expiry, h.alerts) for k, h in counter_holds(counters, hold).items()}
        amount, on_expiry = hold.amount, hold.charge_on_expiry
        if alerts is None:
            checked = counter_holds(specs, hold)
            if len(self._checked) >= _CHECKED_SIZE:
                self._checked.clear()
            self._checked[specs] = {k: h.alerts for k, h in checked.items()}
            return {k: (h.amount, h.charge_on_expiry, h.alerts) for k, h in checked.items()}
        return {k: (amount, on_expiry, a) for k, a in alerts.items()}

    # -- sync API --------------------------------------------------------------------------

    def reserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        call_id = check_call_id(hold.call_id, "Hold.call_id")
        check_nano(hold.amount, "Hold.amount")
        check_nano(hold.charge_on_expiry, "Hold.charge_on_expiry")
        lease = check_seconds(hold.lease_seconds, "Hold.lease_seconds")
        token = check_token(hold.token)
        plans = self._holds(counters, hold)
        with self._lock:
            now = self._clock()
            if now >= self._next_sweep:
                self._sweep(now)
            # A key listed twice is one counter: checked against each limit, held once.
            found: dict[str, _Counter | None] = {}
            crossed: list[Crossing] = []  # by expiry charges reaped just now
            for index, spec in enumerate(counters):
                if spec.key not in found:
                    counter = found[spec.key] = self._get(spec.key, now)
                    if counter is not None and counter.alerts:
                        _fire(index, spec.key, counter, crossed)
            record = self._records.get(call_id)
            if record is not None:
                states = tuple([_state(found[c.key]) for c in counters])
                if record.state == "held" and record.token == token:
                    return ReserveResult(ok=True, states=states, duplicate=True, crossed=tuple(crossed))
                return ReserveResult(ok=False, states=states, reused=True, crossed=tuple(crossed))
            for index, spec in enumerate(counters):
                counter = found[spec.key]
                used = counter.spent + counter.held if counter is not None else 0
                if used + plans[spec.key][0] > spec.limit:
                    states = tuple([_state(found[c.key]) for c in counters])
                    return ReserveResult(ok=False, states=states, blocked=index, crossed=tuple(crossed))
            deadline = now + lease
            for spec in counters:
                counter = found[spec.key]
                if counter is None:
                    counter = found[spec.key] = self._new_counter(spec.key)
                if spec.expires_at is not None and spec.expires_at > (counter.expires_at or 0):
                    counter.expires_at = spec.expires_at
                    heapq.heappush(self._counter_expiry, (spec.expires_at, spec.key))
                amount, on_expiry, alerts = plans[spec.key]
                if alerts and alerts != counter.alerts:
                    counter.alerts = alerts
                if call_id in counter.holds:
                    continue
                counter.held += amount
                counter.holds[call_id] = (amount, deadline, on_expiry)
                if deadline < counter.next_deadline:
                    counter.next_deadline = deadline
            if counters:  # forgotten a retry window after its settle, or after its hold is reaped
                self._records[call_id] = _Record("held", token, math.inf)
            else:
                self._remember(call_id, _Record("held", token, now + lease + self.retry_window_seconds))
            return ReserveResult(ok=True, states=tuple([_state(found[c.key]) for c in counters]), crossed=tuple(crossed))

    def settle(self, call_id: str, keys: Sequence[str], amount: int, *, amounts: Sequence[int] | None = None,
               row: LedgerRow | None = None) -> SettleResult:
        """Replace the call's holds with ``amount`` (or ``amounts[i]`` on ``keys[i]``); when it
        applies, ``row`` goes to the ledger (at the store's time, with ``amount``) under the
        same lock. Thresholds crossed are in ``SettleResult.crossed``."""
        if type(call_id) is not str or call_id not in self._records:  # a recorded id was checked when kept
            check_call_id(call_id)
        if row is not None and not isinstance(row, LedgerRow):
            raise TypeError(f"row: expected a LedgerRow, got {type(row).__name__}")
        if isinstance(amount, int) and not isinstance(amount, bool) and amount > MAX_NANO:
            amount, capped = MAX_NANO, True
        else:
            amount, capped = check_nano(amount, "settle amount"), False
        charges, capped_one = key_amounts(keys, amount, amounts)
        capped = capped or capped_one
        with self._lock:
            now = self._clock()
            record = self._records.get(call_id)
            if record is not None and record.state == "settled":
                return SettleResult(applied=False)
            crossed: list[Crossing] = []
            for key, charge in charges.items():
                counter = self._get(key, now)
                if counter is None:
                    counter = self._new_counter(key)
                held = counter.holds.pop(call_id, None)
                if held is not None:
                    counter.held -= held[0]
                else:  # expiry charged here (since the last reset): the actual cost replaces it
                    counter.spent -= min(counter.expired.pop(call_id, 0), counter.spent)
                _add_spent(counter, charge)
                if counter.alerts:
                    _fire(list(keys).index(key), key, counter, crossed)  # the key's first position
            token = record.token if record is not None else ""
            forget_at = now + self.retry_window_seconds
            self._records[call_id] = _Record("settled", token, forget_at)
            self._settled_expiry.append((forget_at, call_id))
            if row is not None:
                self._append(row, now, amount)
            return SettleResult(applied=True, charged=amount, capped=capped, crossed=tuple(crossed))

    def release(self, call_id: str, keys: Sequence[str], hold: Hold) -> None:
        """Release a reservation whose call does not go ahead (charge nothing); the call id then
        admits nothing more for the retry window. Only ``hold``'s own attempt is released."""
        check_call_id(call_id)
        token = check_token(hold.token)
        with self._lock:
            now = self._clock()
            record = self._records.get(call_id)
            if record is not None and (record.state == "settled" or record.token != token):
                return
            for key in dict.fromkeys(keys):
                counter = self._get(key, now)
                if counter is None:
                    continue
                held = counter.holds.pop(call_id, None)
                if held is not None:
                    counter.held -= held[0]
                    counter.next_deadline = min((d for _, d, _ in counter.holds.values()), default=math.inf)
                else:
                    counter.spent -= min(counter.expired.pop(call_id, 0), counter.spent)
            lease = check_seconds(hold.lease_seconds, "Hold.lease_seconds")
            self._remember(call_id, _Record("released", token, now + lease + self.retry_window_seconds))

    def renew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool:
        lease_seconds = check_seconds(lease_seconds, "lease_seconds")
        with self._lock:
            now = self._clock()
            renewed = False
            for key in keys:
                counter = self._get(key, now)
                if counter is not None and call_id in counter.holds:
                    amount, _, on_expiry = counter.holds[call_id]
                    counter.holds[call_id] = (amount, now + lease_seconds, on_expiry)
                    renewed = True
            return renewed  # a held record is forgotten only after its settle or its reaping

    def read(self, keys: Sequence[str]) -> list[CounterState]:
        with self._lock:
            now = self._clock()
            found = [self._get(k, now) for k in keys]
            return [CounterState(c.spent, c.held) if c else CounterState() for c in found]

    def close(self) -> None:
        pass

    # -- operators: live overrides, listing and resetting counters (stores.base.AdminStore) ---

    def read_overrides(self, name: str, known_version: str | None = None) -> OverridesSnapshot:
        with self._lock:
            version = str(self._override_versions.get(name, 0))
            if version == known_version:
                return OverridesSnapshot(version, None)
            return OverridesSnapshot(version, dict(self._overrides.get(name, {})))

    def set_override(self, name: str, field: str, nano: int | None) -> str:
        """Set (``nano``) or clear (None) one override; returns the budget's new version."""
        if nano is not None:
            check_nano(nano, "override")
        with self._lock:
            values = self._overrides.setdefault(name, {})
            if nano is None:
                values.pop(field, None)
            else:
                values[field] = nano
            version = self._override_versions[name] = self._override_versions.get(name, 0) + 1
            return str(version)

    def scan_counters(self, pattern: str) -> list[tuple[str, CounterState]]:
        match = re.compile(glob_regex(pattern)).match
        with self._lock:
            now = self._clock()
            keys = sorted(k for k in self._counters if match(k))
            return [(k, _state(self._get(k, now))) for k in keys]

    # -- the ledger and the spend index (stores.ledger) ------------------------------------

    def append_ledger(self, row: LedgerRow) -> None:
        """Append a row that charges nothing (a refusal, a degrade) to the ledger."""
        if not isinstance(row, LedgerRow):
            raise TypeError(f"row: expected a LedgerRow, got {type(row).__name__}")
        with self._lock:
            now = self._clock()
            self._append(row, now, 0)

    def read_ledger(self, name: str, *, scope: str | None = None, scope_id: str | None = None,
                    since: datetime | None = None, kinds: Sequence[str] | None = None, model: str | None = None,
                    call_id: str | None = None, limit: int = 100) -> list[LedgerRow]:
        """Budget ``name``'s ledger rows, newest first, at most ``limit`` (see ``stores.ledger.row_matches``)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: expected a whole number of rows >= 1, got {limit!r}")
        with self._lock:
            self._trim(self._clock())
            kept = list(self._ledger)
        out = []
        for at, charged, row in reversed(kept):
            if row.budget != name:
                continue
            row = row.written(datetime.fromtimestamp(at, timezone.utc), charged)
            if row_matches(row, scope=scope, scope_id=scope_id, since=since, kinds=kinds, model=model,
                           call_id=call_id):
                out.append(row)
                if len(out) >= limit:
                    break
        return out

    def read_index(self, index: str, count: int | None = None) -> list[tuple[str, int]]:
        """The counters of spend index ``index`` with their spent, highest first (ties: by key)."""
        with self._lock:
            now = self._clock()
            keys = list(self._index.get(index, ()))
            found = [(k, self._get(k, now)) for k in keys]
        ranked = sorted(((k, c.spent) for k, c in found if c is not None), key=lambda x: (-x[1], x[0]))
        return ranked if count is None else ranked[:count]

    async def aread_ledger(self, name: str, **filters: Any) -> list[LedgerRow]:
        return self.read_ledger(name, **filters)

    async def aappend_ledger(self, row: LedgerRow) -> None:
        self.append_ledger(row)

    async def aread_index(self, index: str, count: int | None = None) -> list[tuple[str, int]]:
        return self.read_index(index, count)

    def read_index_page(self, index: str, count: int, *, descending: bool = True,
                        members: Sequence[str] = ()) -> IndexPage:
        """The first ``count`` counters of ``index`` by spent (ties: by member, then key), its size
        and the counters of ``members`` (see ``stores.base.IndexPageReader``)."""
        check_index_page(index, count, descending, members)
        wanted = set(members)
        with self._lock:
            now = self._clock()
            found = [(k, self._get(k, now)) for k in list(self._index.get(index, ()))]
        live = [(k, c.spent, (index_name_of(k) or ("", ""))[1]) for k, c in found if c is not None]
        live.sort(key=lambda x: (-x[1] if descending else x[1], x[2], x[0]))
        return IndexPage(len(live), [(k, sc) for k, sc, _ in live[:count]],
                         [(k, sc) for k, sc, m in live if m in wanted])

    def reset_counter(self, key: str) -> CounterState:
        """Zero the counter's spent (live holds stay); returns its state before."""
        with self._lock:
            counter = self._get(key, self._clock())
            if counter is None:
                return CounterState()
            before = _state(counter)
            counter.spent = 0
            counter.expired.clear()  # what expiry charged is gone with the reset: never undone again
            counter.fired.clear()  # the next crossing alerts again
            return before

    # -- async twins: the work is a few dict operations under a lock, so they run inline -----

    async def areserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        return self.reserve(counters, hold)

    async def asettle(self, call_id: str, keys: Sequence[str], amount: int, *, amounts: Sequence[int] | None = None,
                      row: LedgerRow | None = None) -> SettleResult:
        return self.settle(call_id, keys, amount, amounts=amounts, row=row)

    async def arenew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool:
        return self.renew(call_id, keys, lease_seconds)

    async def aread(self, keys: Sequence[str]) -> list[CounterState]:
        return self.read(keys)

    async def arelease(self, call_id: str, keys: Sequence[str], hold: Hold) -> None:
        self.release(call_id, keys, hold)

    async def aclose(self) -> None:
        pass

    async def aread_overrides(self, name: str, known_version: str | None = None) -> OverridesSnapshot:
        return self.read_overrides(name, known_version)

    async def aset_override(self, name: str, field: str, nano: int | None) -> str:
        return self.set_override(name, field, nano)

    async def ascan_counters(self, pattern: str) -> list[tuple[str, CounterState]]:
        return self.scan_counters(pattern)

    async def areset_counter(self, key: str) -> CounterState:
        return self.reset_counter(key)
