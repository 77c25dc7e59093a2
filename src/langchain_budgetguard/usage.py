"""Provider usage shapes -> one normalised ``TokenUsage``.

Conventions (the same as LangChain's ``UsageMetadata`` and genai-prices):
``input_tokens`` is the whole prompt, *including* cache reads and cache
writes; ``output_tokens`` is the whole completion, *including* reasoning
tokens. The detail fields say how much of each total is of a special kind,
so the pricer can charge those tokens at their own rates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

__all__ = [
    "TokenUsage",
    "model_from_response_metadata",
    "usage_from_llm_result",
    "usage_from_message",
    "usage_from_response_metadata",
    "usage_from_usage_metadata",
]


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


def _count(value: Any) -> int | None:
    """A token count, or None when ``value`` is not a number (bools, strings, NaN, inf are not)."""
    if type(value) is int:
        return value if value > 0 else 0
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return max(int(value), 0)
    if isinstance(value, float) and math.isfinite(value):
        return max(int(value), 0)
    return None


def _int(value: Any) -> int:
    if type(value) is int:
        return value if value > 0 else 0
    return _count(value) or 0


def _tiered(details: Mapping[str, Any], key: str) -> Any:
    value = details.get(key)
    # langchain-openai renames detail keys for the priority/flex service tiers and then
    # also reports the tier itself (e.g. ``"priority": 40``).
    if value is None and details:
        for tier in ("priority", "flex"):
            if tier in details:
                return details.get(f"{tier}_{key}")
    return value


_NO_DETAILS: Mapping[str, Any] = {}


def usage_from_usage_metadata(usage: Mapping[str, Any] | None) -> TokenUsage | None:
    """LangChain's ``AIMessage.usage_metadata`` -> ``TokenUsage`` (None when absent)."""
    if not usage or (type(usage) is not dict and not isinstance(usage, Mapping)):
        return None
    if "input_token_details" not in usage and "output_token_details" not in usage:
        # The usual shape, {input_tokens, output_tokens, total_tokens}: nothing to split or reconcile.
        inp, out, total = usage.get("input_tokens"), usage.get("output_tokens"), usage.get("total_tokens")
        if type(inp) is int and type(out) is int and inp >= 0 and out >= 0 and (
            total is None or (type(total) is int and total <= inp + out)
        ):
            return TokenUsage(input_tokens=inp, output_tokens=out)
    details_in = usage.get("input_token_details") or _NO_DETAILS
    details_out = usage.get("output_token_details") or _NO_DETAILS
    if type(details_in) is not dict and not isinstance(details_in, Mapping):
        details_in = _NO_DETAILS
    if type(details_out) is not dict and not isinstance(details_out, Mapping):
        details_out = _NO_DETAILS
    input_tokens = _int(usage.get("input_tokens"))
    output_tokens = _int(usage.get("output_tokens"))
    cache_read = _int(_tiered(details_in, "cache_read"))
    cache_write = _int(_tiered(details_in, "cache_creation"))
    reasoning = _int(_tiered(details_out, "reasoning"))
    estimated = False
    total = _count(usage.get("total_tokens"))
    if total is not None and total > input_tokens + output_tokens:
        input_tokens, output_tokens, estimated = _reconcile_total(
            total, input_tokens, output_tokens, cache_read + cache_write, reasoning
        )
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_5m_tokens=_int(details_in.get("ephemeral_5m_input_tokens")),
        cache_write_1h_tokens=_int(details_in.get("ephemeral_1h_input_tokens")),
        input_audio_tokens=_int(details_in.get("audio")),
        output_audio_tokens=_int(details_out.get("audio")),
        reasoning_tokens=reasoning,
        estimated=estimated,
    ).consistent()


def _reconcile_total(total: int, inp: int, out: int, cache: int, reasoning: int) -> tuple[int, int, bool]:
    """Account for a reported total that exceeds input + output.

    Some reports count cache tokens (Bedrock Converse) or reasoning tokens (xAI) apart
    from the input/output they belong to; the total gives that away. Any gap left
    unexplained is charged as output, the dearer side, so a budget never under-counts.
    """
    gap = total - inp - out
    if cache and gap == cache:
        return inp + cache, out, False
    if reasoning and gap == reasoning:
        return inp, out + reasoning, False
    return inp, out + gap, True


# --- provider response_metadata shapes --------------------------------------------------------

_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


@lru_cache(maxsize=1024)
def _snake(key: str) -> str:
    return _CAMEL.sub(r"_\1", key).lower()


def _snake_keys(data: Mapping[Any, Any]) -> dict[str, Any]:
    return {_snake(k) if isinstance(k, str) else k: v for k, v in data.items()}


def _sub(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return _snake_keys(value) if isinstance(value, Mapping) else {}


def _first(data: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[int | None, str | None]:
    for key in keys:
        value = _count(data.get(key))
        if value is not None:
            return value, key
    return None, None


def _modality_count(details: Any, modality: str) -> int:
    """Gemini's ``*_tokens_details``: a list of ``{modality, token_count}``."""
    if not isinstance(details, list):
        return 0
    total = 0
    for item in details:
        if isinstance(item, Mapping):
            item = _snake_keys(item)
            if str(item.get("modality", "")).upper() == modality:
                total += _int(item.get("token_count"))
    return total


_INPUT_KEYS = ("prompt_tokens", "input_tokens", "prompt_token_count", "input_token_count", "prompt_eval_count")
_OUTPUT_KEYS = (
    "completion_tokens",
    "output_tokens",
    "candidates_token_count",
    "output_token_count",
    "eval_count",
    "response_tokens",
)
_TOTAL_KEYS = ("total_tokens", "total_token_count")


def _usage_from_counts(raw: Mapping[str, Any]) -> TokenUsage | None:
    """One flat usage report in any provider's vocabulary -> ``TokenUsage`` (None if it has no counts)."""
    data = _snake_keys(raw)
    inp, input_key = _first(data, _INPUT_KEYS)
    out, _ = _first(data, _OUTPUT_KEYS)
    total, _ = _first(data, _TOTAL_KEYS)
    thoughts, _ = _first(data, ("thoughts_token_count",))
    if inp is None and out is None and total is None and thoughts is None:
        return None
    inp = inp or 0
    out = out or 0
    thoughts = thoughts or 0

    # OpenAI chat (prompt_/completion_tokens_details) and Responses (input_/output_tokens_details):
    # the details are parts of the totals.
    details_in = _sub(data, "prompt_tokens_details") or _sub(data, "input_tokens_details")
    details_out = _sub(data, "completion_tokens_details") or _sub(data, "output_tokens_details")
    cache_read = _int(details_in.get("cached_tokens")) or _int(data.get("prompt_cache_hit_tokens"))  # DeepSeek
    cache_read = max(cache_read, _int(data.get("cached_content_token_count")))  # Gemini, also included
    cache_write = _int(details_in.get("cache_write_tokens")) or _int(details_in.get("cache_creation_tokens"))
    input_audio = _int(details_in.get("audio_tokens")) or _modality_count(data.get("prompt_tokens_details"), "AUDIO")
    output_audio = _int(details_out.get("audio_tokens")) or _modality_count(
        data.get("candidates_tokens_details"), "AUDIO"
    )
    reasoning = _int(details_out.get("reasoning_tokens")) or _int(details_out.get("thinking_tokens"))

    # Anthropic (cache_read/cache_creation_input_tokens) and Bedrock Converse (cacheRead/
    # cacheWriteInputTokens) report cache tokens apart from input_tokens. Proxies that keep
    # OpenAI's prompt_tokens (which include the cache) sometimes add the same keys, so the
    # key of the input count decides, unless a total settles it.
    apart_read = _int(data.get("cache_read_input_tokens"))
    apart_write = _int(data.get("cache_creation_input_tokens")) or _int(data.get("cache_write_input_tokens"))
    cache_creation = _sub(data, "cache_creation")
    write_5m = _int(cache_creation.get("ephemeral_5m_input_tokens"))
    write_1h = _int(cache_creation.get("ephemeral_1h_input_tokens"))
    apart_write = max(apart_write, write_5m + write_1h)
    apart = apart_read + apart_write
    if apart:
        if total is not None and total == inp + out:
            excluded = False
        elif total is not None and total == inp + out + apart:
            excluded = True
        else:
            excluded = input_key == "input_tokens"
        if excluded:
            inp += apart
        cache_read = max(cache_read, apart_read)
        cache_write = max(cache_write, apart_write)

    # Gemini counts thoughts and tool-use prompts apart from candidates and prompt.
    tool_prompt = _int(data.get("tool_use_prompt_token_count"))
    if (thoughts or tool_prompt) and not (total is not None and total == inp + out):
        inp += tool_prompt
        out += thoughts
    reasoning = max(reasoning, thoughts)

    estimated = False
    if total is not None and total > inp + out:
        inp, out, estimated = _reconcile_total(total, inp, out, 0, reasoning)
    return TokenUsage(
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_5m_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        input_audio_tokens=input_audio,
        output_audio_tokens=output_audio,
        reasoning_tokens=reasoning,
        estimated=estimated,
    ).consistent()


# Where providers nest their usage report, best first. Cohere's billed_units (what is charged)
# comes before its raw token counts.
_CONTAINERS = ("token_usage", "usage", "usage_metadata", "billed_units", "token_count", "tokens", "meta")


def _candidates(data: Mapping[str, Any], depth: int) -> Iterator[TokenUsage]:
    data = _snake_keys(data)
    for key in _CONTAINERS:
        sub = data.get(key)
        if isinstance(sub, Mapping):
            usage = _usage_from_counts(sub)
            if usage is not None:
                yield usage
            elif depth:
                yield from _candidates(sub, depth - 1)
    usage = _usage_from_counts(data)  # Ollama (prompt_eval_count/eval_count) or a bare usage dict
    if usage is not None:
        yield usage


def usage_from_response_metadata(metadata: Mapping[str, Any] | None) -> TokenUsage | None:
    """A provider's own ``response_metadata`` shape -> ``TokenUsage`` (None when none is found)."""
    if not metadata or not isinstance(metadata, Mapping):
        return None
    first = None
    for usage in _candidates(metadata, 1):
        if usage.total_tokens:
            return usage
        if first is None:
            first = usage
    return first


_MODEL_KEYS = ("model_name", "model", "model_id", "modelId", "model_version", "modelVersion")


def model_from_response_metadata(metadata: Mapping[str, Any] | None) -> str | None:
    """The model name a provider reported in ``response_metadata``, if any."""
    if not metadata or not isinstance(metadata, Mapping):
        return None
    for key in _MODEL_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def usage_from_message(message: Any) -> TokenUsage | None:
    """Usage of an ``AIMessage``/``AIMessageChunk``: ``usage_metadata`` first, then ``response_metadata``."""
    usage = usage_from_usage_metadata(getattr(message, "usage_metadata", None))
    if usage is not None and usage.total_tokens:
        return usage
    from_meta = usage_from_response_metadata(getattr(message, "response_metadata", None))
    return from_meta if from_meta is not None else usage


def usage_from_llm_result(result: Any) -> list[tuple[TokenUsage | None, str | None]]:
    """``(usage, model)`` for each chat generation of an ``LLMResult`` (as given to ``on_llm_end``).

    Each inner list of ``result.generations`` is one request, and providers report usage per
    request: with ``n > 1`` every choice carries the same whole-request usage. So a request's
    usage is counted on its first generation that reports it, and its other generations get
    zero usage. When no message reports usage, ``llm_output["token_usage"]`` / ``["usage"]``
    (older integrations) is put on the first generation, the others get zero. ``None`` means
    no usage is known. Completion-model results (no chat generations) give one entry from
    ``llm_output`` when it has usage.
    """
    llm_output = getattr(result, "llm_output", None)
    if not isinstance(llm_output, Mapping):
        llm_output = _NO_DETAILS
    fallback_model = model_from_response_metadata(llm_output)

    entries: list[tuple[TokenUsage | None, str | None]] = []
    generations = getattr(result, "generations", None)
    for choices in generations if isinstance(generations, list) else ():
        counted = False
        for generation in choices if isinstance(choices, list) else ():
            message = getattr(generation, "message", None)
            if message is None:
                continue
            model = model_from_response_metadata(getattr(message, "response_metadata", None)) or fallback_model
            if counted:
                entries.append((TokenUsage(), model))
                continue
            usage = usage_from_message(message)
            counted = usage is not None
            entries.append((usage, model))

    if any(usage is not None for usage, _ in entries):
        return entries
    fallback = usage_from_response_metadata(
        {key: llm_output[key] for key in ("token_usage", "usage") if key in llm_output}
    )
    if fallback is None:
        return entries
    if not entries:
        return [(fallback, fallback_model)]
    return [(fallback, entries[0][1])] + [(TokenUsage(), model) for _, model in entries[1:]]
