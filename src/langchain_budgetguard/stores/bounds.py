"""What a store accepts: bounds checked in Python before any counter is touched.

Counters are int64 in Redis (``HINCRBY``). Every amount and limit is at most ``MAX_NANO``
(2**62 nano-USD, about 4.6 billion USD), so that spent + held + a hold never leaves int64, and a
counter's spent saturates at ``MAX_NANO`` instead of overflowing: a counter that reached it
refuses every later call (no call is ever free). Leases are finite, positive and at most
``MAX_LEASE_SECONDS``. Call ids are printable text of at most ``MAX_CALL_ID_LENGTH`` characters.
Each check raises ``ValueError`` naming the value and what to do.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "MAX_NANO",
    "MAX_LEASE_SECONDS",
    "MAX_RETRY_WINDOW_SECONDS",
    "MAX_EXPIRES_AT",
    "MAX_CALL_ID_LENGTH",
    "DEFAULT_RETRY_WINDOW_SECONDS",
    "check_nano",
    "check_seconds",
    "check_expires_at",
    "check_call_id",
    "check_token",
    "check_alerts",
    "check_amounts",
]

MAX_NANO = 2**62
MAX_LEASE_SECONDS = 30 * 24 * 3600
MAX_RETRY_WINDOW_SECONDS = 30 * 24 * 3600
MAX_EXPIRES_AT = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_CALL_ID_LENGTH = 512
# How long a call's record outlives its lease: a retried reserve or settle inside this window is
# recognised (idempotent); later, the record is gone and memory with it.
DEFAULT_RETRY_WINDOW_SECONDS = 300


def check_nano(value: Any, what: str) -> int:
    """``value`` as an amount of nano-USD in [0, MAX_NANO]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer number of nano-USD, got {value!r} ({type(value).__name__})")
    if value < 0 or value > MAX_NANO:
        raise ValueError(
            f"{what} must be between 0 and {MAX_NANO} nano-USD (2**62, about 4.6e9 USD), got {value}: "
            "check the price, limit or usage that produced it"
        )
    return value


def check_seconds(value: Any, what: str, maximum: float = MAX_LEASE_SECONDS) -> float:
    """A finite, positive duration of at most ``maximum`` seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of seconds, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0 or value > maximum:
        raise ValueError(f"{what} must be a finite number of seconds in (0, {maximum:g}], got {value!r}")
    return float(value)


def check_expires_at(value: Any, what: str = "Counter.expires_at") -> int | None:
    """None (never) or epoch seconds in (0, MAX_EXPIRES_AT]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be None or epoch seconds, got {value!r}")
    if value <= 0 or value > MAX_EXPIRES_AT:
        raise ValueError(f"{what} must be epoch seconds between 1 and {MAX_EXPIRES_AT} (year 9999), got {value!r}")
    return math.ceil(value)


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_CALL_ID_LENGTH:
        raise ValueError(f"{what} must be at most {MAX_CALL_ID_LENGTH} characters, got {len(value)}")
    if not value.isprintable():
        raise ValueError(f"{what} must be printable text (no control characters), got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid text (no lone surrogates), got {value!r}") from None
    return value


def check_call_id(value: Any, what: str = "call_id") -> str:
    """A call id: printable, non-empty, encodable text of at most MAX_CALL_ID_LENGTH characters."""
    return _check_text(value, what)


def check_token(value: Any, what: str = "Hold.token") -> str:
    """An attempt token: like a call id, and without ':' (the store's record separator)."""
    token = _check_text(value, what)
    if ":" in token:
        raise ValueError(f"{what} must not contain ':', got {value!r}")
    return token


def check_alerts(value: Any, what: str = "Counter.alerts") -> tuple[int, ...]:
    """Alert thresholds: a tuple of integers in [1, MAX_NANO], strictly ascending."""
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{what} must be a tuple of thresholds (integers), got {value!r}")
    out = tuple(check_nano(t, f"a threshold of {what}") for t in value)
    if out and out[0] < 1:
        raise ValueError(f"{what}: thresholds must be at least 1 (0 would fire before any spend), got {out[0]}")
    if any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"{what} must be strictly ascending without repeats, got {out!r}: sort them")
    return out


def check_amounts(keys: Any, amounts: Any) -> tuple[list[int], bool]:
    """Per-key settle amounts (one per key, each an integer >= 0); one above MAX_NANO is charged
    as MAX_NANO. Returns the amounts and whether any was capped."""
    if isinstance(amounts, (str, bytes)) or not hasattr(amounts, "__len__"):
        raise ValueError(f"amounts must be a sequence of integers, one per key, got {amounts!r}")
    if len(amounts) != len(keys):
        raise ValueError(
            f"amounts must give one amount per key: got {len(amounts)} amounts for {len(keys)} keys"
        )
    out, capped = [], False
    for key, value in zip(keys, amounts):
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_NANO:
            out.append(MAX_NANO)
            capped = True
        else:
            out.append(check_nano(value, f"the settle amount of {key!r}"))
    return out, capped
