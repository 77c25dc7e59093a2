"""The in-process store: one budget for one process, thread- and asyncio-safe."""

from __future__ import annotations

import heapq
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .base import (
    Counter,
    CounterState,
    Hold,
    OverridesSnapshot,
    ReserveResult,
    SettleResult,
    glob_regex,
)

__all__ = ["MemoryStore"]

# How long a call's record outlives its lease, so a late settle or a retried reserve
# is still recognised; once settled, a record only has to catch a repeated settle.
RECORD_TTL_SECONDS = 24 * 3600
SETTLED_RECORD_SECONDS = 3600


@dataclass(slots=True)
class _Counter:
    spent: int = 0
    held: int = 0
    expires_at: int | None = None
    holds: dict[str, tuple[int, float, int]] = field(default_factory=dict)  # call_id -> (amount, deadline, on_expiry)
    next_deadline: float = float("inf")  # earliest lease deadline: reaping is free until then


@dataclass(slots=True)
class _Record:
    state: str  # "held", "expired", "settled"
    keys: tuple[str, ...]
    charged: int  # what expiry charged, for a late settle to replace
    forget_at: float


def _state(counter: _Counter | None) -> CounterState:
    return CounterState(counter.spent, counter.held) if counter is not None else CounterState()


class MemoryStore:
    """Counters in a dict behind one lock. Operations are short and never await while locked."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counters: dict[str, _Counter] = {}
        self._records: dict[str, _Record] = {}
        # When records and counters may be forgotten, as heaps: a sweep pops only what is due, so its
        # work follows the rate of expiries, not the size of the store. An entry whose record or
        # counter was given more time since is skipped; a newer entry stands for it.
        self._record_expiry: list[tuple[float, str]] = []
        self._counter_expiry: list[tuple[int, str]] = []
        self._next_sweep = 0.0
        self._overrides: dict[str, dict[str, int]] = {}  # budget name -> field -> nano-USD
        self._override_versions: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._counters)} counters)"

    # -- internals (called with the lock held) --------------------------------------------

    def _reap(self, counter: _Counter, now: float) -> None:
        if now < counter.next_deadline:
            return
        expired = [cid for cid, (_, deadline, _) in counter.holds.items() if deadline <= now]
        for cid in expired:
            amount, _, on_expiry = counter.holds.pop(cid)
            counter.held -= amount
            counter.spent += on_expiry
            record = self._records.get(cid)
            if record is not None and record.state == "held":
                record.state = "expired"
                record.charged = on_expiry
        counter.next_deadline = min((d for _, d, _ in counter.holds.values()), default=float("inf"))

    def _remember(self, call_id: str, record: _Record) -> None:
        self._records[call_id] = record
        heapq.heappush(self._record_expiry, (record.forget_at, call_id))

    def _sweep(self, now: float) -> None:
        """Drop counters past their retention and records past their lifetime (at most once a second)."""
        self._next_sweep = now + 1
        records, counters = self._record_expiry, self._counter_expiry
        while records and records[0][0] <= now:
            _, cid = heapq.heappop(records)
            record = self._records.get(cid)
            if record is not None and record.forget_at <= now:
                del self._records[cid]
        while counters and counters[0][0] <= now:
            expires_at, key = heapq.heappop(counters)
            counter = self._counters.get(key)
            if counter is None or counter.expires_at != expires_at:
                continue
            self._reap(counter, now)
            if counter.holds:  # a call still in flight: look again when its lease ends
                heapq.heappush(counters, (int(counter.next_deadline) + 1, key))
                counter.expires_at = int(counter.next_deadline) + 1
            else:
                del self._counters[key]

    def _get(self, key: str, now: float) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is not None:
            self._reap(counter, now)
        return counter

    # -- sync API --------------------------------------------------------------------------

    def reserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        call_id, amount = hold.call_id, hold.amount
        with self._lock:
            now = self._clock()
            if now >= self._next_sweep:
                self._sweep(now)
            # A key listed twice is one counter: checked against each limit, held once.
            found: dict[str, _Counter | None] = {}
            for spec in counters:
                if spec.key not in found:
                    found[spec.key] = self._get(spec.key, now)
            states = tuple([_state(found[c.key]) for c in counters])
            if call_id in self._records:
                return ReserveResult(ok=True, states=states, duplicate=True)
            for index, (spec, state) in enumerate(zip(counters, states)):
                if state.spent + state.held + amount > spec.limit:
                    return ReserveResult(ok=False, states=states, blocked=index)
            deadline = now + hold.lease_seconds
            entry = (amount, deadline, hold.charge_on_expiry)
            for spec in counters:
                counter = found[spec.key]
                if counter is None:
                    counter = found[spec.key] = self._counters[spec.key] = _Counter()
                if spec.expires_at is not None and spec.expires_at > (counter.expires_at or 0):
                    counter.expires_at = spec.expires_at
                    heapq.heappush(self._counter_expiry, (spec.expires_at, spec.key))
                if call_id in counter.holds:
                    continue
                counter.held += amount
                counter.holds[call_id] = entry
                if deadline < counter.next_deadline:
                    counter.next_deadline = deadline
            self._remember(call_id, _Record("held", tuple(found), 0, deadline + RECORD_TTL_SECONDS))
            return ReserveResult(ok=True, states=tuple([_state(found[c.key]) for c in counters]))

    def settle(self, call_id: str, keys: Sequence[str], amount: int) -> SettleResult:
        if len(keys) > 1:
            keys = list(dict.fromkeys(keys))
        with self._lock:
            now = self._clock()
            record = self._records.get(call_id)
            if record is not None and record.state == "settled":
                return SettleResult(applied=False)
            charged_before = 0
            for key in keys:
                counter = self._get(key, now)
                if counter is None:
                    counter = self._counters[key] = _Counter()
                held = counter.holds.pop(call_id, None)
                if held is not None:
                    counter.held -= held[0]
            if record is not None and record.state == "expired":
                charged_before = record.charged
            for key in keys:
                self._counters[key].spent += amount - charged_before
            self._remember(call_id, _Record("settled", tuple(keys), amount, now + SETTLED_RECORD_SECONDS))
            return SettleResult(applied=True, charged=amount)

    def renew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool:
        with self._lock:
            now = self._clock()
            renewed = False
            for key in keys:
                counter = self._get(key, now)
                if counter is not None and call_id in counter.holds:
                    amount, _, on_expiry = counter.holds[call_id]
                    counter.holds[call_id] = (amount, now + lease_seconds, on_expiry)
                    renewed = True
            record = self._records.get(call_id)
            if renewed and record is not None:
                record.forget_at = now + lease_seconds + RECORD_TTL_SECONDS
                heapq.heappush(self._record_expiry, (record.forget_at, call_id))
            return renewed

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
        if nano is not None and (isinstance(nano, bool) or not isinstance(nano, int) or nano < 0):
            raise ValueError(f"an override is a non-negative integer of nano-USD, got {nano!r}")
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

    def reset_counter(self, key: str) -> CounterState:
        """Zero the counter's spent (live holds stay); returns its state before."""
        with self._lock:
            counter = self._get(key, self._clock())
            if counter is None:
                return CounterState()
            before = _state(counter)
            counter.spent = 0
            return before

    # -- async twins: the work is a few dict operations under a lock, so they run inline -----

    async def areserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        return self.reserve(counters, hold)

    async def asettle(self, call_id: str, keys: Sequence[str], amount: int) -> SettleResult:
        return self.settle(call_id, keys, amount)

    async def arenew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool:
        return self.renew(call_id, keys, lease_seconds)

    async def aread(self, keys: Sequence[str]) -> list[CounterState]:
        return self.read(keys)

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
