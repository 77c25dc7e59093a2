"""Money: Decimal USD at every public surface, integer nano-USD inside the stores.

One nano-USD is 1e-9 USD. gpt-4o-mini's input price of $0.15 per million
tokens is exactly 150 nano-USD a token, so list prices stay exact.

A call's cost is rounded *up* to the next whole nano-USD (``ceil_nano``):
rounding can make a call cost at most one nano-USD more, never let spend
through a limit, and a priced call never rounds to zero.
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation

NANO_PER_USD = 1_000_000_000
_NANO = Decimal(NANO_PER_USD)

__all__ = ["NANO_PER_USD", "to_decimal", "usd_to_nano", "ceil_nano", "nano_to_usd", "format_usd"]


def to_decimal(value: object, *, what: str = "amount") -> Decimal:
    """Turn a user-supplied dollar amount (int, float, str, Decimal) into a Decimal.

    Floats go through ``repr`` so ``5.1`` becomes ``Decimal('5.1')``, not the
    binary approximation. Negative, NaN and infinite amounts are refused.
    """
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected a number of dollars, got {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what}: expected a finite number of dollars, got {value!r}")
        result = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip().lstrip("$"))
        except InvalidOperation:
            raise ValueError(f"{what}: expected a number of dollars, got {value!r}") from None
    else:
        raise TypeError(f"{what}: expected a number of dollars, got {type(value).__name__} {value!r}")
    if not result.is_finite():
        raise ValueError(f"{what}: expected a finite number of dollars, got {value!r}")
    if result < 0:
        raise ValueError(f"{what}: must not be negative, got {value!r}")
    return result


def usd_to_nano(value: object, *, what: str = "amount") -> int:
    """A limit in dollars -> whole nano-USD, rounded down (a limit never grows by rounding)."""
    return int((to_decimal(value, what=what) * _NANO).to_integral_value(rounding=ROUND_FLOOR))


def ceil_nano(usd: Decimal) -> int:
    """A cost in dollars -> whole nano-USD, rounded up (rounding never lets spend through)."""
    return int((usd * _NANO).to_integral_value(rounding=ROUND_CEILING))


def nano_to_usd(nano: int) -> Decimal:
    """Whole nano-USD -> exact Decimal dollars (``11250`` -> ``Decimal('0.00001125')``)."""
    if nano == 0:
        return Decimal(0)
    return (Decimal(nano) / _NANO).normalize() if nano % NANO_PER_USD else Decimal(nano // NANO_PER_USD)


def format_usd(amount: Decimal) -> str:
    """Plain positional notation, no exponent: ``$0.00001125``."""
    text = format(amount.normalize() if amount else Decimal(0), "f")
    return f"${text}"
