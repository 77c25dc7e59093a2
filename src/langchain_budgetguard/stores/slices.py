"""Leased budget slices: a process admits calls on a hot counter against a slice of its budget.

``RedisStore(lease_slices=True)``. A counter that this process reserves on often (``HOT_HITS``
reserves within ``HOT_SECONDS``: a tenant, a project, the global limit) gets a slice: one script
call (``lua/slice.lua``) leases part of what is left of it, sized by Redis (at most
1/(``div`` + 4 per other process's slice of it) of the room left, so slices shrink as the budget runs out, down to none near the limit: then calls
are admitted one by one in Redis, exactly as without slices). Calls that fit in the slice are
admitted here, exactly, with no round trip; their settles are reported with the slice's next
report (a refill, at most ``REPORT_SECONDS`` later by the next reserve or the store's timer, or
after ``MAX_REPORTED`` settles), which charges them, writes their ledger rows and sizes the slice
again. A slice unused for ``IDLE_SECONDS`` is returned, as every slice is on ``close()`` and at
exit (a store dropped without ``close()`` lives on until its timer returned its slices and
reported its settles). ``close()`` keeps of a slice what its calls in flight hold; the store's
timer stops, so the settle, release or renewal of such a call reports its slice itself, at once.
Counters reserved rarely (a user seen once an hour) stay admitted per call in Redis.

Never overspend: in Redis, spent + holds + slices <= limit (a slice counts whole against the
limit); here, what the slice's calls hold plus what they settled and was not reported yet stays
within the slice (a settle above its hold, as elsewhere, is charged in full).

A slice has a lease (``SLICE_LEASE_SECONDS``, renewed by the timer while it holds calls in
flight; the slice admits nothing once two thirds of it passed without a renewal). If the process
dies, Redis drops the slice when its lease ends and charges all of it: the calls it admitted
may have been served and their settles never reported, so each is charged its full reservation,
never an input estimate (``expired_hold`` applies to holds in Redis, not to slices); at most a
slice's worth (1/20 of the room left when it was sized, plus what its calls in flight held). A
late report from a process that was only paused replaces that charge with what it reports, once
(a report that had applied before the lease ended, its reply lost, replaces it when sent again).

Call ids: a call admitted here is known here for its lease and the store's retry window after
it ends, as a Redis record would be: a reserve of that id in this process is refused
(``reused``), a repeated settle changes nothing, a settle after the call's lease ended here
(the store's timer charged its ``charge_on_expiry``) replaces that charge, and a release then
(by the attempt that reserved it) refunds it, as ``release.lua`` does. The slice's next report
records each call it admitted in Redis (its call record, ``h:<token>``, for its lease and the
retry window, as a reserve does: a reserve of that id elsewhere is refused from then on, not
before) and marks each call it settles settled there. A settle sent by another store (another
process, or a second store here) therefore charges the call once: it finds the record (or none,
before the report) and charges the call, keeping the record as long as the call's lease here
(``settle.lua``); the report then skips that call (its settle, late settle or expiry charge here,
and its ledger row). An expiry charge reported here is remembered as a reaped hold's is, so a
settle from another store after it replaces it. A slice's part of a call is never journaled: a
report that cannot reach Redis is kept and sent again as it was.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .base import CounterHold, CounterState

__all__ = [
    "HOT_HITS",
    "HOT_SECONDS",
    "REPORT_SECONDS",
    "IDLE_SECONDS",
    "SLICE_LEASE_SECONDS",
    "MAX_REPORTED",
    "SLICE_CALLS",
    "DEFAULT_SLICE_DIV",
    "Reported",
    "Report",
    "Slice",
    "LocalCall",
    "SETTLED_BEFORE",
    "Taking",
    "SliceBook",
]

HOT_HITS = 3  # reserves on one counter within HOT_SECONDS that make it hot here
HOT_SECONDS = 1.0
REPORT_SECONDS = 0.5  # settles made from a slice reach Redis within about this long
IDLE_SECONDS = 1.0  # a slice unused this long is returned
SLICE_LEASE_SECONDS = 30.0
MAX_REPORTED = 256  # settles one report carries at most
SLICE_CALLS = 256  # a refill asks for room for this many calls like the one that asked
DEFAULT_SLICE_DIV = 20  # a slice is at most 1/(20 + 4 per other slice) of the room left when sized
DRY_SECONDS = 0.2  # after a refill that granted nothing, calls go to Redis directly this long
BROKEN_SECONDS = 1.0  # after a report that failed, calls go to Redis directly this long


@dataclass(slots=True)
class Reported:
    """A settle made from a slice, waiting for the slice's next report."""

    call_id: str
    amount: int  # on this counter; below 0 for a late settle below what expiry charged, or a release after it
    row_amount: int = 0
    row: Any = None  # the call's LedgerRow (with one counter of the call only), encoded when reported
    # SETTLE, EXPIRED (its charge_on_expiry), LATE (a settle after that: the difference) or
    # REFUND (a release after that); a report skips one the call's record in Redis shows settled
    # by another store, and marks what it applies there (see lua/slice.lua).
    kind: str = "s"
    own: bool = False  # the call's own settle on this tag (its counters in Redis) marks its record


SETTLE, EXPIRED, LATE, REFUND = "s", "e", "l", "r"  # Reported.kind


@dataclass(slots=True)
class Report:
    """One report of a slice: its arguments are fixed when it is built, so that a retry (its
    reply was lost, or Redis was away) sends the very same report, which applies once."""

    slice: Slice
    sent_at: float  # (monotonic) no later than Redis starts the slice's lease
    seq: int
    batch: list[Reported]
    total: int  # what the batch costs on this counter together
    kept: int  # granted whatever the room (its calls in flight, its unreported settles, maybe its free part)
    want: int
    need: int
    limit: int
    expires_at: int | None
    alerts: tuple[int, ...]
    keep_free: bool = False  # keeps the slice's free part (calls are admitted from it meanwhile)
    # calls admitted from the slice since the last report: (call id, token, ms their lease has left)
    admitted: list[tuple[str, str, int]] | None = None
    taken_admitted: int = 0  # how many of the slice's admitted this report took


class Slice:
    """This process's slice of one counter (all amounts in the counter's unit)."""

    __slots__ = ("key", "sid", "limit", "expires_at", "alerts", "grant", "used",
                 "unreported", "unreported_sum", "seq", "pending", "busy", "reported_at",
                 "last_used", "dry_until", "broken_until", "lease_until", "state", "open", "admitted")

    def __init__(self, key: str, plan: CounterHold, now: float) -> None:
        self.key = key
        self.sid = secrets.token_hex(8)
        self.limit, self.expires_at, self.alerts = plan.limit, plan.expires_at, plan.alerts
        self.grant = 0  # what Redis leased to this slice
        self.used = 0  # held by its calls in flight
        self.unreported: list[Reported] = []
        self.unreported_sum = 0
        self.admitted: list[tuple[str, str, float]] = []  # (call id, token, lease end) not reported yet
        self.seq = 0  # the last report applied
        self.pending: Report | None = None  # a report whose outcome is unknown (Redis away)
        self.busy = False  # a report is in flight: nothing is admitted from the slice meanwhile
        self.reported_at = now
        self.last_used = now
        self.dry_until = 0.0
        self.broken_until = 0.0
        self.lease_until = 0.0  # admits nothing from here on (before its lease in Redis can end)
        self.open = False  # the report in flight keeps the free part: calls are admitted from it meanwhile
        self.state = CounterState()  # the counter as the last report saw it

    @property
    def free(self) -> int:
        return self.grant - self.used - self.unreported_sum


@dataclass(slots=True)
class LocalCall:
    """A call admitted (at least in part) from slices: what it took from each, and which of its
    counters were reserved in Redis the usual way."""

    token: str
    taken: tuple[tuple[Slice, int, int], ...]  # (slice, amount, charge_on_expiry)
    cold: tuple[str, ...]
    lease_ends: float


SETTLED_BEFORE = LocalCall("", (), (), 0.0)  # what settle returns for a call that ended here before


class Taking:
    """What ``SliceBook.take`` decided for one reserve: what it ``taken`` from slices, the
    ``refills`` to send first (one round trip each), the ``cold`` keys reserved in Redis per
    call; ``duplicate`` / ``reused`` for a call id this book knows."""

    __slots__ = ("taken", "refills", "cold", "duplicate", "reused")

    def __init__(self) -> None:
        self.taken: list[tuple[Slice, int, int]] = []
        self.refills: list[Report] = []
        self.cold: list[str] = []
        self.duplicate = self.reused = False


class SliceBook:
    """The slices and slice-admitted calls of one store (thread-safe; no I/O: the store sends
    the reports this hands out and gives back their replies)."""

    def __init__(self, retry_window_seconds: float, div: int = DEFAULT_SLICE_DIV,
                 lease_seconds: float = SLICE_LEASE_SECONDS) -> None:
        self.lock = threading.Lock()
        self.div = div
        self.lease_seconds = lease_seconds
        self.retry_window_seconds = retry_window_seconds
        self.hot_hits = HOT_HITS
        self.slices: dict[str, Slice] = {}
        self.calls: dict[str, LocalCall] = {}
        # Calls admitted here that ended (settled, released, expired), for the retry window: their
        # ids admit nothing more here; an expired one's late settle replaces what expiry charged.
        self.ended: dict[str, tuple[float, LocalCall | None]] = {}
        self._hits: dict[str, tuple[float, int]] = {}
        self.slot_of: Any = lambda key: key  # a counter key -> its hash tag's part of Redis names (the store's)

    def __len__(self) -> int:
        return len(self.slices)

    # -- admission -------------------------------------------------------------------------------

    def _hot(self, key: str, now: float) -> bool:
        start, count = self._hits.get(key, (now, 0))
        if now - start > HOT_SECONDS:
            start, count = now, 0
        count += 1
        if len(self._hits) >= 100_000:
            self._hits.clear()
        self._hits[key] = (start, count)
        return count >= self.hot_hits

    def take(self, call_id: str, token: str, plans: Mapping[str, CounterHold], now: float) -> Taking:
        """Admit what fits in slices now; hand out refills for hot counters whose slice is short
        (the store sends them, then calls ``take_refilled``); the rest is reserved in Redis."""
        out = Taking()
        with self.lock:
            known = self.calls.get(call_id)
            if known is not None:
                out.duplicate, out.reused = known.token == token, known.token != token
                return out
            if call_id in self.ended:
                self._forget(now)
                if call_id in self.ended:
                    out.reused = True
                    return out
            for key, plan in plans.items():
                found = self.slices.get(key)
                if found is None:
                    if not self._hot(key, now) or plan.amount <= 0:
                        out.cold.append(key)
                        continue
                    found = self.slices[key] = Slice(key, plan, now)
                if found.busy and not found.open or found.pending is not None and now < found.broken_until:
                    out.cold.append(key)
                elif self._fits(found, plan, now):
                    self._take(found, plan, now, out)
                elif found.busy or now < found.dry_until:  # a report in flight; near the limit: in Redis
                    out.cold.append(key)
                else:
                    out.refills.append(self._report(found, now, want=plan.amount * SLICE_CALLS, need=plan.amount,
                                                    plan=plan))
        return out

    def _fits(self, found: Slice, plan: CounterHold, now: float) -> bool:
        amount = plan.amount
        return (found.grant - found.used - found.unreported_sum >= amount and now < found.lease_until
                and found.limit == plan.limit and found.expires_at == plan.expires_at and found.alerts == plan.alerts
                and found.pending is None and len(found.unreported) < MAX_REPORTED
                and len(found.admitted) < MAX_REPORTED)

    def _take(self, found: Slice, plan: CounterHold, now: float, out: Taking) -> None:
        found.used += plan.amount
        found.last_used = now
        out.taken.append((found, plan.amount, plan.charge_on_expiry))

    def take_refilled(self, report: Report, plan: CounterHold, now: float, out: Taking) -> None:
        """After a refill's reply: admit the call from the slice if it fits now, else in Redis."""
        with self.lock:
            found = report.slice
            if (not found.busy or found.open) and self._fits(found, plan, now):
                self._take(found, plan, now, out)
            else:
                out.cold.append(found.key)

    def commit(self, call_id: str, token: str, out: Taking, lease_ends: float) -> None:
        with self.lock:
            self.calls[call_id] = LocalCall(token, tuple(out.taken), tuple(out.cold), lease_ends)
            for found, _, _ in out.taken:  # recorded in Redis with the slice's next report
                found.admitted.append((call_id, token, lease_ends))

    def undo(self, taken: list[tuple[Slice, int, int]]) -> None:
        """Give back what a reserve took (its Redis part was refused or failed)."""
        with self.lock:
            for found, amount, _ in taken:
                found.used -= amount

    # -- settle, release, renew --------------------------------------------------------------------

    def _forget(self, now: float) -> None:
        ended = self.ended
        while ended:
            call_id, (until, _) = next(iter(ended.items()))
            if until > now:
                return
            del ended[call_id]

    def _end(self, call_id: str, call: LocalCall | None, now: float) -> None:
        self.ended[call_id] = (now + self.retry_window_seconds, call)
        if len(self.ended) % 1024 == 0:
            self._forget(now)

    def settle(self, call_id: str, charges: Mapping[str, int], row_amount: int, row: Any,
               now: float) -> LocalCall | None:
        """The settle of a call admitted here: its slices' parts wait for their reports (the
        ledger row goes with the first, unless the call has counters in Redis, whose settle
        carries it). A call whose lease ended here is charged what it cost instead of what
        expiry charged. A repeated settle changes nothing. None: not a call of this book."""
        with self.lock:
            call = self.calls.pop(call_id, None)
            expired = False
            if call is None:
                ended = self.ended.get(call_id)
                if ended is None:
                    return None
                if ended[1] is None:  # settled or released before: nothing changes
                    return SETTLED_BEFORE
                call, expired = ended[1], True
            fields = None if call.cold else row
            cold_slots = {self.slot_of(k) for k in call.cold} if call.cold else ()
            for found, amount, charge in call.taken:
                charged = charges.get(found.key, amount)
                if expired:
                    charged -= charge  # expiry reported its charge already
                    found = self.slices.setdefault(found.key, found)  # (its slice may be returned since)
                else:
                    found.used -= amount
                own = bool(cold_slots) and self.slot_of(found.key) in cold_slots
                found.unreported.append(Reported(call_id, charged, row_amount, fields, LATE if expired else SETTLE,
                                                 own))
                found.unreported_sum += charged
                fields = None
            self._end(call_id, None, now)
            return call

    def burn(self, call_id: str, now: float) -> None:
        """A call id settled in Redis without a slice: it admits nothing here either."""
        with self.lock:
            if call_id not in self.calls:
                self._end(call_id, None, now)

    def release(self, call_id: str, token: str, now: float) -> LocalCall | None:
        """Release a call admitted here (only by the attempt that reserved it; one whose lease
        ended here gets back what expiry charged, as in Redis); SETTLED_BEFORE for a call that
        was settled or released, or belongs to another attempt (nothing changes)."""
        with self.lock:
            call = self.calls.get(call_id)
            if call is None:
                ended = self.ended.get(call_id)
                if ended is None:
                    return None
                call = ended[1]
                if call is None or call.token != token:
                    return SETTLED_BEFORE
                for found, _, charge in call.taken:
                    found = self.slices.setdefault(found.key, found)  # (its slice may be returned since)
                    found.unreported.append(Reported(call_id, -charge, kind=REFUND))
                    found.unreported_sum -= charge
                del self.ended[call_id]
                self._end(call_id, None, now)
                return call
            if call.token != token:
                return SETTLED_BEFORE
            del self.calls[call_id]
            for found, amount, _ in call.taken:
                found.used -= amount
            self._end(call_id, None, now)
            return call

    def expire(self, now: float) -> None:
        """Calls here whose lease ended (never settled nor renewed) are charged their
        charge_on_expiry, as a store charges a hold whose lease ran out."""
        with self.lock:
            for call_id in [c for c, call in self.calls.items() if call.lease_ends <= now]:
                call = self.calls.pop(call_id)
                for found, amount, charge in call.taken:
                    found.used -= amount
                    found.unreported.append(Reported(call_id, charge, kind=EXPIRED))
                    found.unreported_sum += charge
                self._end(call_id, call, now)

    def renew(self, call_id: str, lease_ends: float) -> LocalCall | None:
        with self.lock:
            call = self.calls.get(call_id)
            if call is not None:
                call.lease_ends = max(call.lease_ends, lease_ends)
            return call

    # -- reports -----------------------------------------------------------------------------------

    def _report(self, found: Slice, now: float, want: int, need: int, plan: CounterHold | None = None,
                keep_free: bool = False) -> Report:
        """A report of ``found`` (marks it busy); a pending one is sent again as it was.
        ``keep_free``: the slice keeps its free part (Redis grants it again whatever the room:
        it is this slice's own), and calls go on being admitted from it while the report is in
        flight; else the free part goes back and nothing is admitted from the slice meanwhile."""
        found.busy = True
        if found.pending is not None:
            found.open = found.pending.keep_free
            return found.pending
        if plan is not None:
            found.limit, found.expires_at, found.alerts = plan.limit, plan.expires_at, plan.alerts
        batch = found.unreported[:MAX_REPORTED]
        total = sum(r.amount for r in batch)
        kept = found.used + found.unreported_sum - total
        if keep_free:
            kept += max(0, found.free)
        found.open = keep_free
        taken = found.admitted[:MAX_REPORTED]
        settled = {r.call_id for r in batch if r.kind == SETTLE}  # (recorded settled by the batch itself)
        admitted = [(c, t, max(1, int((ends - now) * 1000))) for c, t, ends in taken if c not in settled]
        return Report(found, now, found.seq + 1, batch, total, kept, want, need, found.limit, found.expires_at,
                      found.alerts, keep_free, admitted, len(taken))

    def reported(self, report: Report, grant: int, state: CounterState, now: float) -> None:
        """A report applied (or had applied before: a lost reply)."""
        with self.lock:
            found = report.slice
            found.pending = None
            found.busy = found.open = False
            found.seq = report.seq
            del found.unreported[: len(report.batch)]
            del found.admitted[: report.taken_admitted]
            found.unreported_sum -= report.total
            found.grant = grant
            found.reported_at = now
            # A third of the lease short of it: the timer renews after a third; if it cannot,
            # admission from the slice stops well before Redis may hand its room to others.
            found.lease_until = report.sent_at + self.lease_seconds * 2 / 3
            found.state = state
            if report.need and grant - report.kept < report.need:
                found.dry_until = now + DRY_SECONDS
            if (not grant and not found.used and not found.unreported and not found.admitted
                    and self.slices.get(found.key) is found):
                del self.slices[found.key]  # returned: a new slice starts afresh when it is hot again

    def failed(self, report: Report, now: float) -> None:
        """A report whose outcome is unknown: kept, and sent again as it was before any other."""
        with self.lock:
            report.slice.pending = report
            report.slice.busy = report.slice.open = False
            report.slice.broken_until = now + BROKEN_SECONDS

    def due(self, now: float, final: bool = False) -> list[Report]:
        """Reports the timer sends now: settles waiting longer than REPORT_SECONDS, slices idle
        for IDLE_SECONDS (returned), leases to renew, reports to retry; ``final``: every slice
        returned (close, exit)."""
        if self.calls:
            self.expire(now)
        out = []
        with self.lock:
            for found in list(self.slices.values()):
                if found.busy:
                    continue
                idle = now - found.last_used >= IDLE_SECONDS
                if final or found.pending is not None or (idle and found.free > 0):
                    out.append(self._report(found, now, want=0, need=0))
                    continue
                # Keeping the free part is safe only while the lease surely holds in Redis.
                alive = now < found.lease_until
                if (found.unreported or found.admitted) and now - found.reported_at >= REPORT_SECONDS:
                    out.append(self._report(found, now, want=0, need=0, keep_free=alive))
                elif (found.used or found.grant) and now - found.reported_at >= self.lease_seconds / 3:
                    out.append(self._report(found, now, want=0, need=0, keep_free=alive))
        return out

    def waiting(self, keys: Any, now: float, give_back: bool = False) -> list[Report]:
        """Reports of the slices of ``keys`` (None: all) that have settles not reported yet, so
        that a read sees every settle of this process; ``give_back``: of every slice of
        ``keys``, returning what its calls in flight do not hold (a read of a counter then
        shows this process's holds as they are)."""
        out = []
        with self.lock:
            chosen = self.slices.values() if keys is None else [self.slices.get(k) for k in dict.fromkeys(keys)]
            for found in list(chosen):
                if found is None or found.busy:
                    continue
                if give_back:
                    if found.grant or found.unreported or found.pending is not None:
                        out.append(self._report(found, now, want=0, need=0))
                elif found.unreported or found.pending is not None:
                    out.append(self._report(found, now, want=max(0, found.free), need=0))
        return out

    def reporting(self, keys: Any) -> bool:
        """Is a report of a slice of ``keys`` (None: any) in flight?"""
        with self.lock:
            if keys is None:
                return any(found.busy for found in self.slices.values())
            return any((found := self.slices.get(k)) is not None and found.busy for k in keys)

    def give_back(self, key: str, now: float) -> Report | None:
        """A report returning the free part of the slice of ``key`` (a call refused in Redis may
        fit once it is back), or None when there is none to return."""
        with self.lock:
            found = self.slices.get(key)
            if found is None or found.busy or found.free <= 0:
                return None
            return self._report(found, now, want=0, need=0)

    def holdings(self) -> dict[str, tuple[int, int, int]]:
        """key -> (grant, held by calls in flight, settled and not reported yet), for tools."""
        with self.lock:
            return {k: (s.grant, s.used, s.unreported_sum) for k, s in self.slices.items()}

    def forked(self) -> None:
        """In a forked child: the parent's slices and calls are the parent's."""
        self.lock = threading.Lock()
        self.slices, self.calls, self.ended, self._hits = {}, {}, {}, {}


def slice_states(taken: Any) -> dict[str, CounterState]:
    """The counters of slices a call drew on, as their last reports saw them."""
    return {found.key: found.state for found, _, _ in taken}
