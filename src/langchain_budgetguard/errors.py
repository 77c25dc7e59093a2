"""Errors the guard raises. Each says what was wrong and what to do."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from .money import format_usd

__all__ = [
    "BudgetGuardError",
    "BudgetExceededError",
    "IdentityError",
    "UnknownModelPriceError",
    "BudgetStoreUnavailableError",
    "GuardMisuseError",
    "Refusal",
]


class BudgetGuardError(Exception):
    """Base class of every error this library raises."""


@dataclass(frozen=True)
class Refusal:
    """Why one limit refused one model's reservation."""

    scope: str
    scope_id: str | None
    window: str
    limit: Decimal
    spent: Decimal
    held: Decimal
    estimate: Decimal
    model: str
    resets_at: datetime | None

    def describe(self) -> str:
        who = f"{self.scope} {self.scope_id!r}" if self.scope_id is not None else self.scope
        resets = f"; resets at {self.resets_at.isoformat()}" if self.resets_at else "; never resets (total)"
        return (
            f"{who}, window {self.window}: limit {format_usd(self.limit)}, spent {format_usd(self.spent)}, "
            f"held by calls in flight {format_usd(self.held)}, this call's estimate on {self.model} "
            f"{format_usd(self.estimate)}{resets}"
        )


class BudgetExceededError(BudgetGuardError):
    """No model of the ladder fits every limit that applies to this call.

    ``refusal`` is the limit that refused the last model tried; ``refusals`` has one entry per
    model tried, in order. The attributes of ``refusal`` are also on the error itself.
    """

    def __init__(self, refusals: list[Refusal]) -> None:
        self.refusals = list(refusals)
        self.refusal = self.refusals[-1]
        r = self.refusal
        self.scope, self.scope_id, self.window = r.scope, r.scope_id, r.window
        self.limit, self.spent, self.held, self.estimate = r.limit, r.spent, r.held, r.estimate
        self.model, self.resets_at = r.model, r.resets_at
        tried = ", ".join(x.model for x in self.refusals)
        super().__init__(
            f"Budget exceeded for {r.describe()}. Models tried: {tried}. "
            "Raise the limit, wait for the window to reset, or add a cheaper model to degrade_to."
        )


class IdentityError(BudgetGuardError, ValueError):
    """A per-scope limit applies but the call does not say whose budget it is."""


class UnknownModelPriceError(BudgetGuardError, LookupError):
    """The guard cannot price a model, and will not pretend it costs $0."""


class BudgetStoreUnavailableError(BudgetGuardError):
    """The budget store could not be reached and the guard's policy is fail-closed."""


class GuardMisuseError(BudgetGuardError, TypeError):
    """The guard was placed where it cannot guard anything (for example after the model)."""
