"""The store protocol: what every budget store (in-process, Redis) does.

Amounts are integer nano-USD. A call reserves ``Hold.amount`` on every
counter it draws on, all or none; when it ends it settles: the hold is
replaced by the actual cost. Holds carry a lease: a hold whose lease ran out
(its process crashed) is reaped by the store on its next touch, and
``Hold.charge_on_expiry`` is added to spent. Both reserve and settle are
idempotent per ``call_id``; a settle that arrives after its lease expired
still charges the actual cost (replacing what expiry charged).

Stores use their own clock for leases (Redis: server ``TIME``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Counter", "Hold", "CounterState", "ReserveResult", "SettleResult", "Store", "tag_of"]


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter a call draws on, and the limit it must stay within (nano-USD).

    ``expires_at`` (epoch seconds) is when the counter may be dropped: its window's end plus
    retention; None keeps it forever (``total`` windows).
    """

    key: str
    limit: int
    expires_at: int | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation: ``amount`` held under ``call_id`` for ``lease_seconds``.

    If the lease runs out before a settle, the store charges ``charge_on_expiry`` (0 releases
    the hold for free) and drops the hold.
    """

    call_id: str
    amount: int
    lease_seconds: float
    charge_on_expiry: int = 0


@dataclass(frozen=True, slots=True)
class CounterState:
    spent: int = 0
    held: int = 0


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """``ok``: the hold was placed on every counter (or already was, for a retried call_id).

    When refused, ``blocked`` is the index of the first counter that could not take the hold;
    ``states`` is every counter's state as the store saw it.
    """

    ok: bool
    states: tuple[CounterState, ...]
    blocked: int | None = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class SettleResult:
    """``applied`` is False when this call_id was settled before (nothing changed).

    ``pending`` is True when the store could not be reached and keeps the settle to replay it
    later (``applied`` is then False and ``charged`` is what the replay will charge).
    """

    applied: bool
    charged: int = 0
    pending: bool = False


@runtime_checkable
class Store(Protocol):
    """Sync and async twins of the same five operations."""

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
