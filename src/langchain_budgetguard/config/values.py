"""The kinds of value a config file holds. Each is ``Annotated`` metadata for a pydantic field
(``usd: Annotated[Decimal, Money("dollars")]``): it checks a TOML value, says what it expected
and how to fix it, and describes itself in the JSON Schema.

Money is exact: TOML is read with ``parse_float=Decimal``, so ``usd = 0.1`` is ``Decimal("0.1")``
as written, and strings (``"0.10"``) are read as decimals too; no amount passes through a float.
Durations and counts are finite, positive (or 0 where 0 means "every time") and bounded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Any

from pydantic_core import core_schema

from ..limits import Limit
from ..money import MAX_LIMIT_USD
from .problems import bad, show

__all__ = ["MAX_USD", "NANO_PLACES", "ValueCheck", "Money", "Fraction", "Fractions", "Bounded", "Choice", "Text",
           "Pattern", "TimeZone", "StoreUrl", "WebUrl", "Flag", "Ladder"]

MAX_USD = MAX_LIMIT_USD  # as for a live override (BudgetAdmin.set_limit, `budgetguard limit set`)
NANO_PLACES = 9  # the stores count whole nano-USD
_DECIMAL_TEXT = re.compile(r"^\$?(\d+(\.\d*)?|\.\d+)$")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def _decimal(value: int | float | Decimal) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


class ValueCheck:
    """``Annotated`` metadata: ``check`` returns the value (converted) or raises ``bad(...)``."""

    def check(self, value: Any) -> Any:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.check)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        return self.schema()


@dataclass(frozen=True)
class Money(ValueCheck):
    """A number of ``unit`` (dollars): 0 or more, at most ``MAX_USD``, ``places`` decimals at most."""

    unit: str = "dollars"
    places: int | None = NANO_PLACES

    def check(self, value: Any) -> Decimal:
        expected = f"expected a number of {self.unit}"
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("-") and _DECIMAL_TEXT.match(text[1:]):
                raise bad(f"{expected} (0 or more), got {show(value)}")
            if not _DECIMAL_TEXT.match(text):
                raise bad(f"{expected}, got {show(value)}")
            amount = Decimal(text.lstrip("$"))
        elif _is_number(value):
            amount = _decimal(value)
        else:
            raise bad(f"{expected}, got {show(value)}")
        if not amount.is_finite():
            raise bad(f"{expected}, got {show(value)}")
        if amount < 0:
            raise bad(f"{expected} (0 or more), got {show(value)}")
        if amount > MAX_USD:
            raise bad(f"{expected} no larger than {MAX_USD}, got {show(value)}")
        if self.places is not None and amount != amount.quantize(Decimal(1).scaleb(-self.places), ROUND_DOWN):
            raise bad(f"{expected} with at most {self.places} decimal places (the stores count whole "
                      f"nano-dollars), got {show(value)}")
        return amount

    def schema(self) -> dict[str, Any]:
        fraction = r"\.\d*" if self.places is None else rf"\.\d{{0,{self.places}}}"
        tail = r"\.\d+" if self.places is None else rf"\.\d{{1,{self.places}}}"
        return {"anyOf": [
            {"type": "number", "minimum": 0, "maximum": int(MAX_USD)},
            {"type": "string", "pattern": rf"^\s*\$?(\d+({fraction})?|{tail})\s*$"},
    ]}


@dataclass(frozen=True)
class Fraction(ValueCheck):
    """A fraction in (0, 1], as a number or a decimal string."""

    def check(self, value: Any) -> Decimal:
        amount = None
        if _is_number(value):
            amount = _decimal(value)
        elif isinstance(value, str) and _DECIMAL_TEXT.match(value.strip()) and "$" not in value:
            amount = Decimal(value.strip())
        if amount is None or not amount.is_finite() or not Decimal(0) < amount <= Decimal(1):
            raise bad(f"expected a fraction in (0, 1], such as 0.8, got {show(value)}")
        return amount

    def schema(self) -> dict[str, Any]:
        return {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                          {"type": "string", "pattern": r"^\s*(0?\.\d*[1-9]\d*|1(\.0*)?)\s*$"}]}


@dataclass(frozen=True)
class Fractions(ValueCheck):
    """A list of fractions in (0, 1] (alert thresholds: ``[0.5, 0.8, 1.0]``), none twice, at most ``most``."""

    most: int = 16

    def check(self, value: Any) -> tuple[Decimal, ...]:
        expected = f"expected a list of fractions of the limit in (0, 1], such as [0.5, 0.8, 1.0], got {show(value)}"
        if not isinstance(value, list):
            raise bad(expected)
        if len(value) > self.most:
            raise bad(f"expected at most {self.most} fractions of the limit, got {len(value)}")
        out = []
        for item in value:
            try:
                out.append(Fraction().check(item))
            except Exception:
                raise bad(expected) from None
        if len(set(out)) != len(out):
            raise bad(f"a fraction is listed twice in {show(value)}")
        return tuple(sorted(out))

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "items": Fraction().schema(), "maxItems": self.most, "uniqueItems": True}


@dataclass(frozen=True)
class Bounded(ValueCheck):
    """A finite number of ``unit`` (seconds, tokens): positive (or 0 or more), at most ``maximum``.
    ``integer``: a whole number (``86400.0`` is one, as JSON Schema says)."""

    unit: str
    maximum: int
    maximum_text: str  # "a day"
    integer: bool = False
    positive: bool = True

    def check(self, value: Any) -> int | float:
        if not _is_number(value) or not math.isfinite(value) or (self.integer and value != int(value)) or (
                value <= 0 if self.positive else value < 0):
            bound = "a positive" if self.positive else "a"
            expected = (f"{bound} {'whole ' if self.integer else ''}number of {self.unit}"
                        + ("" if self.positive else " (0 or more)"))
            raise bad(f"expected {expected}, got {show(value)}")
        if value > self.maximum:
            raise bad(f"expected at most {self.maximum} {self.unit} ({self.maximum_text}), got {show(value)}")
        return int(value) if self.integer else float(value)

    def schema(self) -> dict[str, Any]:
        low = {"exclusiveMinimum": 0} if self.positive else {"minimum": 0}
        return {"type": "integer" if self.integer else "number", **low, "maximum": self.maximum}


class Choice(ValueCheck):
    """One of ``options``."""

    def __init__(self, *options: str) -> None:
        self.options = options

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.options:
            raise bad(f"expected one of {', '.join(json.dumps(c) for c in self.options)}, got {show(value)}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"enum": list(self.options)}


@dataclass(frozen=True)
class Text(ValueCheck):
    """A non-blank string; ``what`` is what the error says was expected."""

    what: str

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise bad(f"expected {self.what}, got {show(value)}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": r"\S"}


@dataclass(frozen=True)
class Pattern(ValueCheck):
    """A string matching ``regex``; ``expected`` is the error's text, ``examples`` the schema's."""

    regex: str
    expected: str
    examples: tuple[str, ...] = ()

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not re.match(self.regex, value):
            raise bad(f"{self.expected}, got {show(value)}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": self.regex, **({"examples": list(self.examples)} if self.examples else {})}


@dataclass(frozen=True)
class TimeZone(ValueCheck):
    """An IANA time zone (what ``Limit(tz=...)`` accepts)."""

    def check(self, value: Any) -> str:
        try:
            Limit(usd=0, tz=value)
        except (ValueError, TypeError):
            raise bad(f'expected an IANA time zone such as "Europe/Paris" or "UTC", got {show(value)}') from None
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "examples": ["UTC", "Europe/Paris", "America/New_York"]}


@dataclass(frozen=True)
class StoreUrl(ValueCheck):
    """``"memory"`` or a URL the Redis store understands."""

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise bad(f'expected a store URL ("memory" or redis://...), got {show(value)}')
        if value not in ("memory", "memory://"):
            from ..stores.redis_client import parse_url  # the Redis store's own reading of its URLs

            try:
                parse_url(value)
            except (ValueError, TypeError) as exc:
                raise bad(f'expected "memory" or a Redis URL: {exc}') from None
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "examples": ["memory", "redis://127.0.0.1:6379/0", "rediss://:password@host:6380/0",
                                               "redis+cluster://host:7000", "redis+sentinel://host:26379/mymaster"]}


@dataclass(frozen=True)
class WebUrl(ValueCheck):
    """An http:// or https:// URL (what ``alerts.Webhook`` accepts)."""

    def check(self, value: Any) -> str:
        from ..alerts import Webhook

        try:
            Webhook(value)
        except (ValueError, TypeError):
            raise bad(f'expected an http:// or https:// URL such as "https://hooks.example.com/budget", '
                      f"got {show(value)}") from None
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\s]+", "examples": [
            "https://hooks.example.com/budget"]}


@dataclass(frozen=True)
class Flag(ValueCheck):
    """``true`` or ``false``."""

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {show(value)}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Ladder(ValueCheck):
    """Cheaper model names, tried in order (one name or a list, none twice)."""

    def check(self, value: Any) -> tuple[str, ...]:
        models = [value] if isinstance(value, str) else value
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m.strip() for m in models):
            raise bad(f'expected a list of cheaper model names, such as ["gpt-4o-mini"], got {show(value)}')
        if len(set(models)) != len(models):
            raise bad(f"a model is listed twice in {show(value)}")
        return tuple(models)

    def schema(self) -> dict[str, Any]:
        name = {"type": "string", "pattern": r"\S"}
        return {"anyOf": [name, {"type": "array", "items": name, "minItems": 1, "uniqueItems": True}]}
