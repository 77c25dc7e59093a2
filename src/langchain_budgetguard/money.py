"""Money: Decimal USD at every public surface, integer nano-USD inside the stores.

One nano-USD is 1e-9 USD. gpt-4o-mini's input price of $0.15 per million
tokens is exactly 150 nano-USD a token, so list prices stay exact.

A call's cost is rounded *up* to the next whole nano-USD (``ceil_nano``):
rounding can make a call cost at most one nano-USD more, never let spend
through a limit, and a priced call never rounds to zero.

Bounds (checked before any arithmetic, so hostile input costs microseconds, never
seconds): a dollar amount is at most ``MAX_USD`` ($4,611,686,018.427387904, i.e.
``MAX_NANO`` = 2**62 nano-USD, a quarter of int64), with at most ``MAX_AMOUNT_CHARS``
characters when given as text; one call's amount (hold, charge, settle) is at most
``MAX_CALL_NANO`` = 2**60 nano-USD; a token count is at most ``MAX_TOKENS``. So a
counter's ``spent + held + amount`` at reserve time stays below 2**62 + 2**60, far
inside int64 (and inside a Lua/Redis integer), whatever the input.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

NANO_PER_USD = 1_000_000_000
_NANO = Decimal(NANO_PER_USD)

MAX_NANO = 2**62
"""The largest limit, override or allowance, in nano-USD (a quarter of int64's range)."""
MAX_USD = Decimal(MAX_NANO) / _NANO
"""``MAX_NANO`` in dollars: $4,611,686,018.427387904, the largest dollar amount accepted anywhere."""
MAX_LIMIT_USD = Decimal(1_000_000_000)
"""The largest limit an operator sets, in a config file or as a live override ($1e9): far below
``MAX_USD``, so that a typo of a few digits is an error, not a budget."""
MAX_CALL_NANO = 2**60
"""The largest amount one call may hold, be charged on expiry, or settle, in nano-USD."""
MAX_TOKENS = 2**40
"""The largest token count (about 1.1e12). Times any price up to $1,048 per million tokens it stays
within ``MAX_CALL_NANO``."""
MAX_AMOUNT_CHARS = 64
"""The longest dollar amount accepted as text (``"4611686018.427387904"`` is 20 characters)."""
MIN_USD_EXPONENT = -30
"""A non-zero dollar amount below 1e-30 is refused (no price or limit is that small; its plain
notation alone would be megabytes long for ``1e-999999999``)."""

__all__ = [
    "NANO_PER_USD",
    "MAX_NANO",
    "MAX_USD",
    "MAX_LIMIT_USD",
    "MAX_CALL_NANO",
    "MAX_TOKENS",
    "MAX_AMOUNT_CHARS",
    "to_decimal",
    "usd_to_nano",
    "exact_usd_to_nano",
    "ceil_nano",
    "nano_to_usd",
    "format_usd",
    "check_nano",
    "check_tokens",
    "show_value",
]

_ZERO = Decimal(0)
_MAX_INT_BITS = MAX_USD.adjusted() * 4 + 8  # an int with more bits is certainly above MAX_USD


def show_value(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about hostile input."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 256 else f"<int of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[:limit] + "..."


def _too_large(what: str, value: object) -> ValueError:
    return ValueError(
        f"{what}: {show_value(value)} is too large: at most {format_usd(MAX_USD)} "
        f"({MAX_NANO} nano-USD, 2**62) is accepted; use a smaller amount"
    )


def to_decimal(value: object, *, what: str = "amount") -> Decimal:
    """Turn a user-supplied dollar amount (int, float, str, Decimal) into a Decimal.

    Floats go through ``repr`` so ``5.1`` becomes ``Decimal('5.1')``, not the binary
    approximation. Negative, NaN, infinite and out-of-range amounts are refused with a
    ``ValueError`` (a ``TypeError`` for a value that is not a number at all), in constant time:
    size and exponent are checked before any arithmetic. The result is at most ``MAX_USD``;
    zero comes back as ``Decimal(0)``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected a number of dollars, got {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            if value < 0:
                raise ValueError(f"{what}: must not be negative, got {show_value(value)}")
            raise _too_large(what, value)
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what}: expected a finite number of dollars, got {value!r}")
        result = Decimal(repr(value))
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_AMOUNT_CHARS:
            raise ValueError(
                f"{what}: expected a number of dollars of at most {MAX_AMOUNT_CHARS} characters, "
                f"got {show_value(value)}"
            )
        try:
            result = Decimal(text.lstrip("$"))
        except (InvalidOperation, ValueError):
            raise ValueError(f"{what}: expected a number of dollars, got {show_value(value)}") from None
    else:
        raise TypeError(f"{what}: expected a number of dollars, got {type(value).__name__} {show_value(value)}")
    if not result.is_finite():
        raise ValueError(f"{what}: expected a finite number of dollars, got {show_value(value)}")
    if result.is_zero():
        return _ZERO  # also drops a hostile exponent: Decimal('0e-999999999')
    if result < 0:
        raise ValueError(f"{what}: must not be negative, got {show_value(value)}")
    exponent = result.adjusted()  # O(1): read before any arithmetic on a value like 1e999999999
    if exponent > MAX_USD.adjusted() or (exponent == MAX_USD.adjusted() and result > MAX_USD):
        raise _too_large(what, value)
    if exponent < MIN_USD_EXPONENT:
        raise ValueError(
            f"{what}: {show_value(value)} is too small to be a dollar amount (below 1e{MIN_USD_EXPONENT}); "
            "use 0 or a larger amount"
        )
    return result


def usd_to_nano(value: object, *, what: str = "amount") -> int:
    """A limit in dollars -> whole nano-USD, rounded down (a limit never grows by rounding).

    Exact for every accepted amount (at most ``MAX_NANO``): no context rounding before the floor.
    """
    amount = to_decimal(value, what=what)
    if not amount:
        return 0
    numerator, denominator = amount.as_integer_ratio()
    return numerator * NANO_PER_USD // denominator


def exact_usd_to_nano(value: object, *, what: str = "amount") -> int:
    """A dollar amount -> nano-USD, refusing one with more than 9 decimal places (ValueError)
    instead of rounding it: an amount an operator typed is stored as typed, or not at all."""
    amount = to_decimal(value, what=what)
    nano = usd_to_nano(amount, what=what)
    if Decimal(nano) != amount * _NANO:
        raise ValueError(f"{what}: at most 9 decimal places (the stores count whole nano-dollars), got {amount}")
    return nano


def check_nano(value: object, what: str, *, maximum: int = MAX_CALL_NANO) -> int:
    """``value`` if it is an int of nano-USD in ``[0, maximum]``; else a ``ValueError`` that names it.

    Stores and the guard call this on every amount before it reaches a script: a hold, a charge
    on expiry, a settle (``maximum=MAX_CALL_NANO``), a limit or override (``maximum=MAX_NANO``).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: expected a whole number of nano-USD, got {type(value).__name__} {show_value(value)}")
    if value < 0:
        raise ValueError(f"{what}: must not be negative, got {show_value(value)} nano-USD")
    if value > maximum:
        raise ValueError(
            f"{what}: {show_value(value)} nano-USD is more than the {maximum} (2**{maximum.bit_length() - 1}) "
            "this library accepts"
        )
    return value


def check_tokens(value: object, what: str) -> int:
    """``value`` if it is a token count in ``[0, MAX_TOKENS]``; else a ``ValueError`` that names it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: expected a whole number of tokens, got {type(value).__name__} {show_value(value)}")
    if not 0 <= value <= MAX_TOKENS:
        raise ValueError(f"{what}: expected 0 to {MAX_TOKENS} (2**40) tokens, got {show_value(value)}")
    return value


_CEIL_MAX_EXPONENT = 30  # a cost of $1e31 or more is not a cost: refused before int() builds its digits


def ceil_nano(usd: Decimal) -> int:
    """A cost in dollars -> whole nano-USD, rounded up (rounding never lets spend through).

    Exact (integer arithmetic, no context rounding). A non-finite or negative cost, or one of
    $1e31 or more, is a ``ValueError``; compare the result with ``MAX_CALL_NANO`` to bound a call.
    """
    if not usd.is_finite() or usd < 0:
        raise ValueError(f"a cost must be a finite, non-negative number of dollars, got {show_value(usd)}")
    if usd.is_zero():
        return 0
    if usd.adjusted() > _CEIL_MAX_EXPONENT:
        raise ValueError(f"a cost of {show_value(usd)} dollars is beyond any bound this library accepts")
    numerator, denominator = usd.as_integer_ratio()
    return -(-numerator * NANO_PER_USD // denominator)


def nano_to_usd(nano: int) -> Decimal:
    """Whole nano-USD -> exact Decimal dollars (``11250`` -> ``Decimal('0.00001125')``)."""
    if nano == 0:
        return Decimal(0)
    return (Decimal(nano) / _NANO).normalize() if nano % NANO_PER_USD else Decimal(nano // NANO_PER_USD)


def format_usd(amount: Decimal) -> str:
    """Plain positional notation, no exponent: ``$0.00001125``."""
    text = format(amount.normalize() if amount else Decimal(0), "f")
    return f"${text}"
