"""Decimal prices from genai-prices (bundled, offline), with overrides, cached per model.

INTERFACE STUB: the pricing work fills this in. Signatures are fixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .usage import TokenUsage


@dataclass(frozen=True)
class ModelRef:
    """Which model a runnable or a callback run is: its name and, when known, its provider."""

    name: str | None
    provider: str | None = None


@dataclass(frozen=True)
class ModelPrice:
    """A price you set in code or config, in USD per million tokens.

    ``cache_read`` / ``cache_write`` / ``reasoning`` default to ``input`` / ``input`` / ``output``.
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None


class RateCard:
    """A model's prices, resolved once; ``cost`` is a few Decimal multiplications."""

    model: str
    provider: str | None
    source: str  # "genai-prices", "override" or "fallback"

    def cost(self, usage: TokenUsage) -> Decimal: ...
    def cost_nano(self, usage: TokenUsage) -> int: ...


class Pricer:
    def __init__(self, overrides: Mapping[str, Any] | None = None, fallback: Any = None) -> None: ...
    def rate_card(self, ref: ModelRef) -> RateCard: ...


def model_ref(runnable: Any) -> ModelRef: ...
