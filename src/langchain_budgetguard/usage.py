"""Provider usage shapes -> one normalised ``TokenUsage``.

Conventions (the same as LangChain's ``UsageMetadata`` and genai-prices):
``input_tokens`` is the whole prompt, *including* cache reads and cache
writes; ``output_tokens`` is the whole completion, *including* reasoning
tokens. The detail fields say how much of each total is of a special kind,
so the pricer can charge those tokens at their own rates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["TokenUsage", "usage_from_message", "usage_from_usage_metadata", "usage_from_response_metadata"]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one call (or a sum of calls)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    """True when some count was estimated by the guard rather than reported by the provider."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        if not isinstance(other, TokenUsage):
            return NotImplemented
        return TokenUsage(
            *(getattr(self, f.name) + getattr(other, f.name) for f in _COUNT_FIELDS),
            estimated=self.estimated or other.estimated,
        )

    def consistent(self) -> TokenUsage:
        """Make the totals cover their details (some providers report them apart)."""
        cache_write = max(self.cache_write_tokens, self.cache_write_5m_tokens + self.cache_write_1h_tokens)
        input_tokens = max(self.input_tokens, self.cache_read_tokens + cache_write, self.input_audio_tokens)
        output_tokens = max(self.output_tokens, self.reasoning_tokens, self.output_audio_tokens)
        if (cache_write, input_tokens, output_tokens) == (
            self.cache_write_tokens,
            self.input_tokens,
            self.output_tokens,
        ):
            return self
        return TokenUsage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=cache_write,
            cache_write_5m_tokens=self.cache_write_5m_tokens,
            cache_write_1h_tokens=self.cache_write_1h_tokens,
            input_audio_tokens=self.input_audio_tokens,
            output_audio_tokens=self.output_audio_tokens,
            reasoning_tokens=self.reasoning_tokens,
            estimated=self.estimated,
        )


_COUNT_FIELDS = tuple(f for f in fields(TokenUsage) if f.name != "estimated")


def _int(value: Any) -> int:
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value == value:
        return max(int(value), 0)
    return 0


def usage_from_usage_metadata(usage: Mapping[str, Any] | None) -> TokenUsage | None:
    """LangChain's ``AIMessage.usage_metadata`` -> ``TokenUsage`` (None when absent)."""
    if not usage:
        return None
    details_in = usage.get("input_token_details") or {}
    details_out = usage.get("output_token_details") or {}
    return TokenUsage(
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        cache_read_tokens=_int(details_in.get("cache_read")),
        cache_write_tokens=_int(details_in.get("cache_creation")),
        cache_write_5m_tokens=_int(details_in.get("ephemeral_5m_input_tokens")),
        cache_write_1h_tokens=_int(details_in.get("ephemeral_1h_input_tokens")),
        input_audio_tokens=_int(details_in.get("audio")),
        output_audio_tokens=_int(details_out.get("audio")),
        reasoning_tokens=_int(details_out.get("reasoning")),
    ).consistent()


def usage_from_response_metadata(metadata: Mapping[str, Any] | None) -> TokenUsage | None:
    """A provider's own ``response_metadata`` shape -> ``TokenUsage`` (None when none is found)."""
    raise NotImplementedError  # filled in by the usage-shapes work


def model_from_response_metadata(metadata: Mapping[str, Any] | None) -> str | None:
    """The model name a provider reported in ``response_metadata``, if any."""
    raise NotImplementedError  # filled in by the usage-shapes work


def usage_from_message(message: Any) -> TokenUsage | None:
    """Usage of an ``AIMessage``/``AIMessageChunk``: ``usage_metadata`` first, then ``response_metadata``."""
    usage = usage_from_usage_metadata(getattr(message, "usage_metadata", None))
    if usage is not None and usage.total_tokens:
        return usage
    from_meta = usage_from_response_metadata(getattr(message, "response_metadata", None))
    return from_meta if from_meta is not None else usage
