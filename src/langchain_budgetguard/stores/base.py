"""The store protocol: what every budget store (in-process, Redis) does.

Amounts are integers in each counter's unit (nano-USD for money limits; tokens or requests
for counters that count those). A call reserves ``Hold.amount`` on every counter it draws on
(or the counter's own ``Counter.amount``), all or none; when it ends it settles: the hold is
replaced by the actual cost (``settle(..., amounts=)``: per counter). Holds carry a lease: a hold whose lease ran out
(its process crashed) is reaped by the store on its next touch, and
``Hold.charge_on_expiry`` is added to spent. Both reserve and settle are
idempotent per ``call_id`` for as long as a retry can arrive (the lease plus the
store's retry window): a reserve repeated with the same ``Hold.token`` is a
duplicate; any other reserve of a call id that already reserved, settled or
was released is refused with ``ReserveResult.reused``, so a call id never
admits two calls. A settle that arrives after its lease expired still charges
the actual cost, replacing what expiry charged on each counter that expiry
charged since its last reset (never anywhere else, never below zero).

Bounds (``stores.bounds``): amounts and limits are integers in [0, 2**62],
leases finite in (0, 30 days]; a store raises ``ValueError`` for anything else
before it touches a counter. A settle above 2**62 is charged as 2**62
(``SettleResult.capped``): the counter is full, never free.

Threshold alerts (``Counter.alerts``) are decided in the same atomic step that adds to a
counter's spent (a settle, or an expiry charge reaped by a reserve or settle): each threshold
fires once per counter across every process, reported in ``SettleResult.crossed`` /
``ReserveResult.crossed`` as ``Crossing``s; ``reset_counter`` re-arms them.

Stores use their own clock for leases (Redis: server ``TIME``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from .bounds import check_alerts, check_amounts, check_expires_at, check_nano
from .ledger import LedgerRow

__all__ = [
    "Counter",
    "Crossing",
    "Hold",
    "CounterState",
    "ReserveResult",
    "SettleResult",
    "OverridesSnapshot",
    "Store",
    "AdminStore",
    "LedgerStore",
    "IndexPage",
    "IndexPageReader",
    "check_index_page",
    "LedgerRow",
    "tag_of",
    "glob_regex",
    "CounterHold",
    "counter_holds",
    "key_amounts",
]


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter a call draws on, and the limit it must stay within (in the counter's unit).

    ``expires_at`` (epoch seconds) is when the counter may be dropped: its window's end plus
    retention; None keeps it forever (``total`` windows).

    ``amount``: what this counter holds for the call (e.g. tokens beside a dollar counter);
    None holds ``Hold.amount``. ``charge_on_expiry``: what expiry charges on this counter; None
    means ``Hold.charge_on_expiry`` when ``amount`` is None too, else 0 (an own amount comes
    with its own expiry charge, never the dollar one). Both are bounded like every amount.
    A key listed twice must hold the same amount and charge on both (else ``ValueError``).

    ``alerts``: absolute thresholds in the counter's unit, strictly ascending, each in
    [1, MAX_NANO]. A reserve that gives some stores them with the counter (a reserve with none
    leaves stored ones alone), so that any later change of spent can fire them; each fires once
    per counter (a new window is a new counter) until ``reset_counter`` re-arms it.
    """

    key: str
    limit: int
    expires_at: int | None = None
    amount: int | None = None
    charge_on_expiry: int | None = None
    alerts: tuple[int, ...] = ()

    def hold_of(self, hold: Hold) -> tuple[int, int]:
        """(amount, charge on expiry) this counter holds for ``hold`` (unchecked)."""
        if self.amount is None:
            charge = hold.charge_on_expiry if self.charge_on_expiry is None else self.charge_on_expiry
            return hold.amount, charge
        return self.amount, 0 if self.charge_on_expiry is None else self.charge_on_expiry


@dataclass(frozen=True, slots=True)
class Crossing:
    """A threshold alert that fired: counter ``key`` (at ``index`` in the call's keys or counters;
    the first position when listed twice) reached ``threshold``; ``spent`` is its spent right
    after the change that crossed it. Reported once per threshold and counter, across processes."""

    index: int
    key: str
    threshold: int
    spent: int


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation: ``amount`` held under ``call_id`` for ``lease_seconds``.

    If the lease runs out before a settle, the store charges ``charge_on_expiry`` (0 releases
    the hold for free) and drops the hold.

    ``token`` names this attempt (random unless given): build one ``Hold`` per call and pass
    that same object again to retry a reserve whose reply was lost; the store answers
    ``duplicate``. A new ``Hold`` for a call id already used gets ``ReserveResult.reused``.
    """

    call_id: str
    amount: int
    lease_seconds: float
    charge_on_expiry: int = 0
    token: str = field(default_factory=lambda: secrets.token_hex(8))


@dataclass(frozen=True, slots=True)
class CounterState:
    """A counter's ``spent`` and ``held`` (what calls in flight hold, and budget slices leased
    to processes: neither is spendable by anyone else); ``sliced`` is the slices' part of
    ``held`` (``RedisStore(lease_slices=True)``; 0 elsewhere)."""

    spent: int = 0
    held: int = 0
    sliced: int = field(default=0, compare=False)  # a breakdown of held, not a third amount


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """``ok``: the hold was placed on every counter (or already was, for a retried call_id).

    When refused, ``blocked`` is the index of the first counter that could not take the hold;
    ``states`` is every counter's state as the store saw it (when placed: with this hold).
    ``reused``: refused because this call id already reserved with another token, settled, or
    was released (``blocked`` is None); the caller must use a fresh call id.
    States are each in its counter's own unit. ``crossed``: thresholds that expiry charges reaped
    by this reserve crossed (whatever the outcome; not this call's own doing).
    """

    ok: bool
    states: tuple[CounterState, ...]
    blocked: int | None = None
    duplicate: bool = False
    reused: bool = False
    crossed: tuple[Crossing, ...] = ()


@dataclass(frozen=True, slots=True)
class SettleResult:
    """``applied`` is False when this call_id was settled before (nothing changed).

    ``pending`` is True when the store could not be reached and keeps the settle to replay it
    later (``applied`` is then False and ``charged`` is what the replay will charge).
    ``capped`` is True when the amount was above ``bounds.MAX_NANO`` and that maximum was
    charged instead (the counters are full: every later call is refused); also when one of
    ``amounts`` was, and was capped the same way.
    ``charged`` is the ``amount`` argument's charge (with per-key ``amounts``, what each key got
    is in those; the ledger row carries ``amount``).
    ``crossed``: the thresholds this settle (and the expiry charges it reaped) crossed, each
    reported once across all processes; a repeated settle reports none. A pending settle reports
    those of the tags it reached before Redis went away (a replay's go to
    ``RedisStore.on_replay_crossed``).
    """

    applied: bool
    charged: int = 0
    pending: bool = False
    capped: bool = False
    crossed: tuple[Crossing, ...] = ()


@dataclass(frozen=True, slots=True)
class OverridesSnapshot:
    """A budget's live limit overrides: field -> nano-USD, and the version they were read at.

    ``values`` is None when the caller passed the current version (nothing changed since it read).
    Fields are ``"<per>:<window>[@tz]:<escaped id or *>"`` (see ``overrides.override_field``).
    """

    version: str
    values: Mapping[str, int] | None


@dataclass(frozen=True, slots=True)
class CounterHold:
    """What a reserve does on one distinct counter key (checked): the tightest limit given for
    it, its latest expiry, the amount and expiry charge it holds, its alert thresholds."""

    limit: int
    expires_at: int | None
    amount: int
    charge_on_expiry: int
    alerts: tuple[int, ...]


def counter_holds(counters: Sequence[Counter], hold: Hold) -> dict[str, CounterHold]:
    """Each distinct key of ``counters`` (in order) with what the reserve of ``hold`` does there;
    raises ``ValueError`` on any bad value, before a store touches anything."""
    out: dict[str, CounterHold] = {}
    for spec in counters:
        limit = check_nano(spec.limit, f"the limit of counter {spec.key!r}")
        expires_at = check_expires_at(spec.expires_at)
        amount, charge = spec.hold_of(hold)
        check_nano(amount, f"the amount of counter {spec.key!r}")
        check_nano(charge, f"the charge_on_expiry of counter {spec.key!r}")
        alerts = check_alerts(spec.alerts, f"the alerts of counter {spec.key!r}")
        seen = out.get(spec.key)
        if seen is not None:
            if (seen.amount, seen.charge_on_expiry) != (amount, charge):
                raise ValueError(
                    f"counter {spec.key!r} is listed twice with different amounts ({seen.amount}/"
                    f"{seen.charge_on_expiry} and {amount}/{charge}): one counter holds one amount; "
                    "give token and dollar limits their own counter keys"
                )
            limit = min(limit, seen.limit)
            ends = [e for e in (seen.expires_at, expires_at) if e is not None]
            expires_at = max(ends) if ends else None
            alerts = tuple(sorted(set(alerts) | set(seen.alerts)))
        out[spec.key] = CounterHold(limit, expires_at, amount, charge, alerts)
    return out


def key_amounts(keys: Sequence[str], amount: int, amounts: Sequence[int] | None) -> tuple[dict[str, int], bool]:
    """Each distinct key of a settle with what it is charged (``amount`` when ``amounts`` is
    None; ``amount`` must be checked already), and whether a per-key amount was capped at
    MAX_NANO. A key listed twice must be given the same amount (else ``ValueError``)."""
    if amounts is None:
        return dict.fromkeys(keys, amount), False
    values, capped = check_amounts(keys, amounts)
    out: dict[str, int] = {}
    for key, value in zip(keys, values):
        if out.setdefault(key, value) != value:
            raise ValueError(f"key {key!r} is listed twice in a settle with different amounts ({out[key]} and {value})")
    return out, capped


@runtime_checkable
class Store(Protocol):
    """Sync and async twins of the same five operations.

    Both bundled stores also have ``release(call_id, keys, hold)`` / ``arelease``: drop a
    reservation whose call does not go ahead (nothing charged; the call id is then spent), and
    are context managers; ``close()`` flushes what a store keeps for later (Redis: journaled
    settles, pending releases) before it closes its clients.

    ``settle`` / ``asettle`` of both bundled stores take ``amounts=`` (one amount per key, in
    each counter's unit; None: ``amount`` on every key) and an optional ``row=`` (a ``LedgerRow``):
    when the settle applies, the row is written to the ledger in the same atomic step (see
    ``stores.ledger``); a settle that changes nothing writes no row. Stores without a ledger
    keep the three-argument form.
    """

    def reserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult: ...
    def settle(self, call_id: str, keys: Sequence[str], amount: int) -> SettleResult: ...
    def renew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool: ...
    def read(self, keys: Sequence[str]) -> list[CounterState]: ...
    def close(self) -> None: ...

    async def areserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult: ...
    async def asettle(self, call_id: str, keys: Sequence[str], amount: int) -> SettleResult: ...
    async def arenew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool: ...
    async def aread(self, keys: Sequence[str]) -> list[CounterState]: ...
    async def aclose(self) -> None: ...


def tag_of(key: str) -> str:
    """The ``{tag}`` a counter key starts with (its Redis Cluster hash tag), without braces."""
    if key.startswith("{"):
        end = key.find("}")
        if end > 0:
            return key[1:end]
    return ""


@runtime_checkable
class AdminStore(Protocol):
    """What operators need on top of ``Store``: live limit overrides, listing and resetting counters.

    Both bundled stores implement it; a store without it still works, with config overrides only.
    Overrides are kept per budget name; every change bumps the budget's version, so that a process
    polls with ``read_overrides(name, known_version)`` and gets the values back only when they changed.
    ``scan_counters(pattern)`` lists counters whose key matches ``pattern``, where ``*`` matches any
    run of characters and every other character is literal (Redis: SCAN with MATCH, never KEYS).
    ``reset_counter`` zeroes a counter's spent; holds of calls in flight stay and settle as usual,
    and a late settle of a hold that expired before the reset charges its amount on the fresh
    counter without undoing the (already reset) expiry charge.
    """

    def read_overrides(self, name: str, known_version: str | None = None) -> OverridesSnapshot: ...
    def set_override(self, name: str, field: str, nano: int | None) -> str: ...
    def scan_counters(self, pattern: str) -> list[tuple[str, CounterState]]: ...
    def reset_counter(self, key: str) -> CounterState: ...

    async def aread_overrides(self, name: str, known_version: str | None = None) -> OverridesSnapshot: ...
    async def aset_override(self, name: str, field: str, nano: int | None) -> str: ...
    async def ascan_counters(self, pattern: str) -> list[tuple[str, CounterState]]: ...
    async def areset_counter(self, key: str) -> CounterState: ...


@runtime_checkable
class LedgerStore(Protocol):
    """A store that keeps the per-call ledger and the spend indexes (``stores.ledger``).

    ``read_ledger(name, ...)``: budget ``name``'s rows, newest first, at most ``limit``, filtered
    as ``stores.ledger.row_matches``. ``append_ledger(row)``: a row that charges nothing (a
    refusal, a degrade). ``read_index(index, count)``: the counter keys of a spend index (tag-less,
    ``stores.ledger.index_name_of``) with their spent nano-USD, merged across tags, highest first
    (``count`` None: all of them).
    """

    def read_ledger(self, name: str, *, scope: str | None = None, scope_id: str | None = None,
                    since: datetime | None = None, kinds: Sequence[str] | None = None, model: str | None = None,
                    call_id: str | None = None, limit: int = 100) -> list[LedgerRow]: ...
    def append_ledger(self, row: LedgerRow) -> None: ...
    def read_index(self, index: str, count: int | None = None) -> list[tuple[str, int]]: ...


@dataclass(frozen=True)
class IndexPage:
    """The head of a spend index (``IndexPageReader.read_index_page``): how many counters it holds
    (``total``), its first ones in order (``rows``: counter key, spent nano-USD as last indexed) and
    the counters of the members asked for by name (``named``, in no order)."""

    total: int
    rows: list[tuple[str, int]]
    named: list[tuple[str, int]]


@runtime_checkable
class IndexPageReader(Protocol):
    """A store that reads the head of a spend index without reading all of it (the dashboard's
    first page of a scope).

    ``read_index_page(index, count, descending=True, members=())``: the first ``count`` counters
    of ``index`` by spent (highest first, or lowest with ``descending=False``), ties by member
    (the escaped id) then by key, merged across tags; the number of counters in the index; and
    the counters of ``members`` (escaped ids) wherever they are in it.
    """

    def read_index_page(self, index: str, count: int, *, descending: bool = True,
                        members: Sequence[str] = ()) -> IndexPage: ...


def check_index_page(index: str, count: int, descending: bool, members: Sequence[str]) -> None:
    """Raise ValueError/TypeError for arguments ``read_index_page`` does not take."""
    if not isinstance(index, str) or index.count(":") < 2:
        raise ValueError(f"index must look like 'name:per:window:label', got {index!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count: expected a whole number >= 1, got {count!r}")
    if not isinstance(descending, bool):
        raise TypeError(f"descending: expected True or False, got {descending!r}")
    if isinstance(members, str) or not all(isinstance(m, str) and m for m in members):
        raise TypeError(f"members: expected a sequence of escaped ids (non-empty strings), got {members!r}")


def glob_regex(pattern: str) -> str:
    """A ``scan_counters`` pattern as a regular expression: ``*`` is any run, the rest literal."""
    return "".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)) + r"\Z"
