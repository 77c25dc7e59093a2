"""The kinds of value a config file holds: each checks a TOML value, says what it expected, and
describes itself in the JSON Schema.

Money is exact: TOML is read with ``parse_float=Decimal``, so ``usd = 0.1`` is ``Decimal("0.1")``
as written, and strings (``"0.10"``) are read as decimals too; no amount ever passes through a float.
Durations and counts are finite, positive (or 0 where that means "always") and bounded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from decimal import ROUND_DOWN, Decimal
from typing import Annotated, Any

from pydantic import PlainValidator, WithJsonSchema

from ..limits import Limit
from .problems import bad, show

__all__ = [
    "MAX_USD", "Dollars", "PricePerMillion", "Fraction", "choice", "seconds", "whole_number", "Scope",
    "TimeZone", "text", "EnvName", "StoreUrl", "KeyPrefix", "Flag", "Ladder",
]

MAX_USD = Decimal(1_000_000_000)  # $1e9 = 1e18 nano-USD: far from the 64-bit counters' end (9.2e18)
NANO_PLACES = 9  # the stores count whole nano-USD
_DECIMAL = r"\$?(\d+(\.\d*)?|\.\d+)"
_NUMBER_TEXT = re.compile(rf"^{_DECIMAL}$")


def _typed(kind: Any, check: Callable[[Any], Any], schema: dict[str, Any]) -> Any:
    return Annotated[kind, PlainValidator(check), WithJsonSchema(schema)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


# -- money -------------------------------------------------------------------------------------------


def _money(unit: str, *, places: int | None) -> Callable[[Any], Decimal]:
    def check(value: Any) -> Decimal:
        expected = f"expected a number of {unit}"
        if isinstance(value, str):
            stripped = value.strip()
            negative = stripped.startswith("-") and bool(_NUMBER_TEXT.match(stripped[1:]))
            if negative:
                raise bad(f"{expected} (0 or more), got {show(value)}")
            if not _NUMBER_TEXT.match(stripped):
                raise bad(f"{expected}, got {show(value)}")
            amount = Decimal(stripped.lstrip("$"))
        elif _is_number(value):
            amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        else:
            raise bad(f"{expected}, got {show(value)}")
        if not amount.is_finite():
            raise bad(f"{expected}, got {show(value)}")
        if amount < 0:
            raise bad(f"{expected} (0 or more), got {show(value)}")
        if amount > MAX_USD:
            raise bad(f"{expected} no larger than {MAX_USD}, got {show(value)}")
        if places is not None and amount != amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN):
            raise bad(f"{expected} with at most {places} decimal places (the stores count whole "
                      f"nano-dollars), got {show(value)}")
        return amount

    return check


def _money_schema(description: str, places: int | None) -> dict[str, Any]:
    fraction = r"\.\d*" if places is None else rf"\.\d{{0,{places}}}"
    tail = r"\.\d+" if places is None else rf"\.\d{{1,{places}}}"
    return {
        "description": description,
        "anyOf": [
            {"type": "number", "minimum": 0, "maximum": int(MAX_USD)},
            {"type": "string", "pattern": rf"^\s*\$?(\d+({fraction})?|{tail})\s*$"},
        ],
    }


Dollars = _typed(Decimal, _money("dollars", places=NANO_PLACES), _money_schema(
    "USD: a number (5, 0.5) or a decimal string (\"0.50\") for exact cents; at most 9 decimal places", NANO_PLACES))
PricePerMillion = _typed(Decimal, _money("dollars per million tokens", places=None), _money_schema(
    "USD per million tokens: a number or a decimal string (\"0.15\")", None))


def _fraction(value: Any) -> Decimal:
    amount: Decimal | None = None
    if _is_number(value):
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    elif isinstance(value, str) and _NUMBER_TEXT.match(value.strip()) and "$" not in value:
        amount = Decimal(value.strip())
    if amount is None or not amount.is_finite() or not Decimal(0) < amount <= Decimal(1):
        raise bad(f"expected a fraction in (0, 1], such as 0.8, got {show(value)}")
    return amount


Fraction = _typed(Decimal, _fraction, {"anyOf": [
    {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    {"type": "string", "pattern": r"^\s*(0?\.\d*[1-9]\d*|1(\.0*)?)\s*$"},
]})


# -- durations and counts ------------------------------------------------------------------------------


def _bounded(*, unit: str, maximum: int, integer: bool, positive: bool, limit_text: str) -> Any:
    bound = "a positive" if positive else "a"
    expected = f"{bound} {'whole ' if integer else ''}number of {unit}" + ("" if positive else " (0 or more)")

    def check(value: Any) -> int | float:
        # A whole number may be written 86400.0 (JSON Schema calls that an integer too).
        if not _is_number(value) or not math.isfinite(value) or (integer and value != int(value)) or (
                value <= 0 if positive else value < 0):
            raise bad(f"expected {expected}, got {show(value)}")
        if value > maximum:
            raise bad(f"expected at most {maximum} {unit} ({limit_text}), got {show(value)}")
        return int(value) if integer else float(value)

    schema: dict[str, Any] = {"type": "integer" if integer else "number", "maximum": maximum}
    schema["exclusiveMinimum" if positive else "minimum"] = 0
    return _typed(int if integer else float, check, schema)


def seconds(*, maximum: int, limit_text: str, integer: bool = False, positive: bool = True) -> Any:
    """A duration in seconds: finite, positive (or 0 or more) and at most ``maximum``."""
    return _bounded(unit="seconds", maximum=maximum, integer=integer, positive=positive, limit_text=limit_text)


def whole_number(unit: str, *, maximum: int, limit_text: str) -> Any:
    """A positive whole number of ``unit`` (tokens), at most ``maximum``."""
    return _bounded(unit=unit, maximum=maximum, integer=True, positive=True, limit_text=limit_text)


# -- words ---------------------------------------------------------------------------------------------


def choice(*options: str) -> Any:
    """One of ``options`` (a TOML string)."""
    listed = ", ".join(json.dumps(c) for c in options)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise bad(f"expected one of {listed}, got {show(value)}")
        return value

    return _typed(str, check, {"enum": list(options)})


def text(what: str) -> Any:
    """A non-blank string; ``what`` says what it names in the error."""
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise bad(f"expected {what}, got {show(value)}")
        return value

    return _typed(str, check, {"type": "string", "pattern": r"\S"})


def _pattern(regex: str, message: str, schema: dict[str, Any]) -> Any:
    compiled = re.compile(regex)

    def check(value: Any) -> str:
        if not isinstance(value, str) or not compiled.match(value):
            raise bad(f"{message}, got {show(value)}")
        return value

    return _typed(str, check, {"type": "string", "pattern": regex, **schema})


Scope = _pattern(r"^[a-z][a-z0-9_]{0,31}$", 'expected "global", "user", "project", "tenant" or another lowercase '
                 "scope name (letters, digits, _)", {"examples": ["global", "user", "project", "tenant"]})
EnvName = _pattern(r"^[A-Za-z_][A-Za-z0-9_]*$", 'expected the name of an environment variable, such as '
                   '"BUDGETGUARD_REDIS_URL"', {"examples": ["BUDGETGUARD_REDIS_URL"]})
KeyPrefix = _pattern(r"^[^{}]*$", "expected a string without '{' or '}', such as \"bg:\"", {"examples": ["bg:"]})


def _time_zone(value: Any) -> str:
    try:
        Limit(usd=0, tz=value)
    except (ValueError, TypeError):
        raise bad(f'expected an IANA time zone such as "Europe/Paris" or "UTC", got {show(value)}') from None
    return value


TimeZone = _typed(str, _time_zone, {"type": "string", "examples": ["UTC", "Europe/Paris", "America/New_York"]})


def _store_url(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad(f'expected a store URL ("memory" or redis://...), got {show(value)}')
    if value not in ("memory", "memory://"):
        from ..stores.redis import _parse_url  # the Redis store's own reading of its URLs

        try:
            _parse_url(value)
        except (ValueError, TypeError) as exc:
            raise bad(f'expected "memory" or a Redis URL: {exc}') from None
    return value


StoreUrl = _typed(str, _store_url, {"type": "string", "examples": [
    "memory", "redis://127.0.0.1:6379/0", "rediss://:password@host:6380/0", "redis+cluster://host:7000",
    "redis+sentinel://host:26379/mymaster"]})


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad(f"expected true or false, got {show(value)}")
    return value


Flag = _typed(bool, _flag, {"type": "boolean"})


def _ladder(value: Any) -> tuple[str, ...]:
    models = [value] if isinstance(value, str) else value
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m.strip() for m in models):
        raise bad(f'expected a list of cheaper model names, such as ["gpt-4o-mini"], got {show(value)}')
    if len(set(models)) != len(models):
        raise bad(f"a model is listed twice in {show(value)}")
    return tuple(models)


Ladder = _typed(tuple[str, ...], _ladder, {"anyOf": [
    {"type": "string", "pattern": r"\S"},
    {"type": "array", "items": {"type": "string", "pattern": r"\S"}, "minItems": 1, "uniqueItems": True},
]})
