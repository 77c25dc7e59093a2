"""Provider usage shapes -> one normalised ``TokenUsage``.

Conventions (the same as LangChain's ``UsageMetadata`` and genai-prices):
``input_tokens`` is the whole prompt, *including* cache reads and cache
writes; ``output_tokens`` is the whole completion, *including* reasoning
tokens. The detail fields say how much of each total is of a special kind,
so the pricer can charge those tokens at their own rates. Besides tokens a call
can bill server-tool requests (``web_searches``, ``file_searches``, code ``containers``,
``generated_images``) and run at a priced variant
(``service_tier``, ``speed``); those are read too.

A count that cannot be a token count (negative, not a whole number, a string,
more than ``MAX_TOKENS``) raises ``UsageError``: the guard then charges by its
policy instead of trusting it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any

__all__ = [
    "answered_from_cache",
    "MAX_TOKENS",
    "TokenUsage",
    "UsageError",
    "billed_extras",
    "validate_usage",
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
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    input_video_tokens: int = 0
    web_searches: int = 0
    """Server-side web searches billed per request (Anthropic web search, OpenAI web_search_call, Gemini grounding)."""
    file_searches: int = 0
    """Searches of the provider's file stores billed per call (OpenAI Responses ``file_search_call``)."""
    containers: int = 0
    """Code containers the reply ran code in, billed per container (OpenAI Responses ``code_interpreter_call``)."""
    generated_images: int = 0
    """Images a server-side tool made, billed by the image model (OpenAI Responses ``image_generation_call``)."""
    estimated: bool = False
    """True when some count was estimated by the guard rather than reported by the provider."""
    service_tier: str | None = None
    """The tier the provider says served the call (OpenAI ``priority``/``flex``, Anthropic ``priority``)."""
    speed: str | None = None
    """Anthropic ``speed`` (``"fast"`` is billed at its own rate)."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        if not isinstance(other, TokenUsage):
            return NotImplemented
        # A sum of calls served at different tiers has no one tier: price each call before summing.
        return TokenUsage(
            **{name: getattr(self, name) + getattr(other, name) for name in _COUNT_NAMES},
            estimated=self.estimated or other.estimated,
            service_tier=self.service_tier if self.service_tier == other.service_tier else None,
            speed=self.speed if self.speed == other.speed else None,
        )

    def consistent(self) -> TokenUsage:
        """Make the totals cover their details (some providers report them apart)."""
        cache_write = max(self.cache_write_tokens, self.cache_write_5m_tokens + self.cache_write_1h_tokens)
        input_tokens = max(
            self.input_tokens,
            self.cache_read_tokens + cache_write,
            self.input_audio_tokens + self.input_image_tokens + self.input_video_tokens,
        )
        output_tokens = max(
            self.output_tokens, self.reasoning_tokens, self.output_audio_tokens + self.output_image_tokens
        )
        if (cache_write, input_tokens, output_tokens) == (
            self.cache_write_tokens,
            self.input_tokens,
            self.output_tokens,
        ):
            return self
        return replace(self, input_tokens=input_tokens, output_tokens=output_tokens, cache_write_tokens=cache_write)


_COUNT_NAMES = tuple(f.name for f in fields(TokenUsage) if f.type in (int, "int"))

MAX_TOKENS = 2**40
"""Above this a reported count is taken for garbage (about a trillion tokens: no call is that large)."""


class UsageError(ValueError):
    """A provider's usage report holds a count that cannot be real (negative, not whole, huge, not a number).

    The guard charges such a call by its policy (e.g. the whole reservation), never by the count.
    """


def validate_usage(usage: TokenUsage) -> TokenUsage:
    """``usage`` if every count is an ``int`` in ``0..MAX_TOKENS``, else ``UsageError`` saying which is not."""
    for name in _COUNT_NAMES:
        value = getattr(usage, name)
        if type(value) is not int or not 0 <= value <= MAX_TOKENS:
            raise UsageError(_bad_count(name, value))
    for name in ("service_tier", "speed"):
        value = getattr(usage, name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"usage {name} must be a string or None, got {value!r}")
    return usage


def _bad_count(key: str, value: Any) -> str:
    return (
        f"usage report: {key}={value!r} is not a token count (a whole number from 0 to {MAX_TOKENS}); "
        "the call is charged by the guard's policy instead of this report"
    )


def _count(value: Any, key: str = "count") -> int | None:
    """A token count; None when absent (``None``); ``UsageError`` when it cannot be a count."""
    if type(value) is int:
        if 0 <= value <= MAX_TOKENS:
            return value
        raise UsageError(_bad_count(key, value))
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(_bad_count(key, value))
    if isinstance(value, int) and 0 <= value <= MAX_TOKENS:
        return int(value)
    if isinstance(value, float) and value.is_integer() and 0 <= value <= MAX_TOKENS:
        return int(value)  # JSON decoders and protobuf give 12.0 for 12
    raise UsageError(_bad_count(key, value))


def _int(value: Any, key: str = "count") -> int:
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    return _count(value, key) or 0


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
        if type(inp) is int and type(out) is int and 0 <= inp <= MAX_TOKENS and 0 <= out <= MAX_TOKENS and (
            total is None or (type(total) is int and 0 <= total <= inp + out)
        ):
            return TokenUsage(input_tokens=inp, output_tokens=out)
    details_in = usage.get("input_token_details") or _NO_DETAILS
    details_out = usage.get("output_token_details") or _NO_DETAILS
    if type(details_in) is not dict and not isinstance(details_in, Mapping):
        details_in = _NO_DETAILS
    if type(details_out) is not dict and not isinstance(details_out, Mapping):
        details_out = _NO_DETAILS
    input_tokens = _int(usage.get("input_tokens"), "input_tokens")
    output_tokens = _int(usage.get("output_tokens"), "output_tokens")
    cache_read = _int(_tiered(details_in, "cache_read"), "cache_read")
    cache_write = _int(_tiered(details_in, "cache_creation"), "cache_creation")
    reasoning = _int(_tiered(details_out, "reasoning"), "reasoning")
    estimated = False
    total = _count(usage.get("total_tokens"), "total_tokens")
    if total is not None and total > input_tokens + output_tokens:
        input_tokens, output_tokens, estimated = _reconcile_total(
            total, input_tokens, output_tokens, cache_read + cache_write, reasoning
        )
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_5m_tokens=_int(details_in.get("ephemeral_5m_input_tokens"), "ephemeral_5m_input_tokens"),
        cache_write_1h_tokens=_int(details_in.get("ephemeral_1h_input_tokens"), "ephemeral_1h_input_tokens"),
        input_audio_tokens=_int(details_in.get("audio"), "audio"),
        output_audio_tokens=_int(details_out.get("audio"), "audio"),
        reasoning_tokens=reasoning,
        input_image_tokens=_int(details_in.get("image"), "image"),
        output_image_tokens=_int(details_out.get("image"), "image"),
        input_video_tokens=_int(details_in.get("video"), "video"),
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
        value = _count(data.get(key), key)
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
                total += _int(item.get("token_count"), "token_count")
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
    cache_read = _int(details_in.get("cached_tokens"), "cached_tokens") or _int(data.get("prompt_cache_hit_tokens"), "prompt_cache_hit_tokens")  # DeepSeek
    cache_read = max(cache_read, _int(data.get("cached_content_token_count"), "cached_content_token_count"))  # Gemini, also included
    cache_write = _int(details_in.get("cache_write_tokens"), "cache_write_tokens") or _int(details_in.get("cache_creation_tokens"), "cache_creation_tokens")
    input_audio = _int(details_in.get("audio_tokens"), "audio_tokens") or _modality_count(data.get("prompt_tokens_details"), "AUDIO")
    output_audio = _int(details_out.get("audio_tokens"), "audio_tokens") or _modality_count(
        data.get("candidates_tokens_details"), "AUDIO"
    )
    reasoning = _int(details_out.get("reasoning_tokens"), "reasoning_tokens") or _int(
        details_out.get("thinking_tokens"), "thinking_tokens"
    )
    input_image = _int(details_in.get("image_tokens"), "image_tokens") or _modality_count(
        data.get("prompt_tokens_details"), "IMAGE"
    )
    output_image = _int(details_out.get("image_tokens"), "image_tokens") or _modality_count(
        data.get("candidates_tokens_details"), "IMAGE"
    )
    input_video = _int(details_in.get("video_tokens"), "video_tokens") or _modality_count(
        data.get("prompt_tokens_details"), "VIDEO"
    )

    # Anthropic (cache_read/cache_creation_input_tokens) and Bedrock Converse (cacheRead/
    # cacheWriteInputTokens) report cache tokens apart from input_tokens. Proxies that keep
    # OpenAI's prompt_tokens (which include the cache) sometimes add the same keys, so the
    # key of the input count decides, unless a total settles it.
    apart_read = _int(data.get("cache_read_input_tokens"), "cache_read_input_tokens")
    apart_write = _int(data.get("cache_creation_input_tokens"), "cache_creation_input_tokens") or _int(data.get("cache_write_input_tokens"), "cache_write_input_tokens")
    cache_creation = _sub(data, "cache_creation")
    write_5m = _int(cache_creation.get("ephemeral_5m_input_tokens"), "ephemeral_5m_input_tokens")
    write_1h = _int(cache_creation.get("ephemeral_1h_input_tokens"), "ephemeral_1h_input_tokens")
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
    tool_prompt = _int(data.get("tool_use_prompt_token_count"), "tool_use_prompt_token_count")
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
        input_image_tokens=input_image,
        output_image_tokens=output_image,
        input_video_tokens=input_video,
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
    """Usage of an ``AIMessage``/``AIMessageChunk``: ``usage_metadata`` first, then ``response_metadata``.

    Billed items that are not tokens (web searches, the service tier, Anthropic's speed) are read
    from the message too (``billed_extras``). Raises ``UsageError`` for a count that cannot be real.
    """
    usage = usage_from_usage_metadata(getattr(message, "usage_metadata", None))
    if usage is None or not usage.total_tokens:
        from_meta = usage_from_response_metadata(getattr(message, "response_metadata", None))
        usage = from_meta if from_meta is not None else usage
    if usage is None:
        return None
    extras = billed_extras(message)
    return replace(usage, **extras) if extras else usage


_STANDARD = ("default", "standard", "auto", "on_demand")


def _tier(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip().lower()
    return None if value in _STANDARD else value


# response_metadata keys that bill nothing (most replies carry only these): nothing more to read.
_PLAIN_META = frozenset({"model_name", "model", "model_id", "model_provider", "finish_reason", "stop_reason",
                         "system_fingerprint", "id", "logprobs", "created_at", "stop_sequence", "done",
                         "done_reason"})


def billed_extras(message: Any) -> dict[str, Any]:
    """What a reply says was billed besides tokens: ``{"web_searches", "file_searches", "containers",
    "generated_images", "service_tier", "speed"}`` (only those seen).

    Reads OpenAI's ``service_tier`` and Responses ``web_search_call`` / ``file_search_call`` /
    ``code_interpreter_call`` (one container per distinct ``container_id``) / ``image_generation_call``
    items (content blocks, or ``additional_kwargs["tool_outputs"]``, or v1 ``server_tool_call`` and
    generated ``image`` blocks),
    Anthropic's ``usage.server_tool_use.web_search_requests`` / ``usage.service_tier`` /
    ``usage.speed``, and Gemini's ``grounding_metadata`` (one search per ``web_search_queries``
    entry, at least one for a grounded reply). A standard tier (``default``, ``standard``) is None.
    """
    meta = message if isinstance(message, Mapping) else getattr(message, "response_metadata", None)
    extras: dict[str, Any] = {}
    if isinstance(meta, Mapping) and meta and not _PLAIN_META.issuperset(meta):
        usage = meta.get("usage")
        usage = usage if isinstance(usage, Mapping) else _NO_DETAILS
        tier = _tier(meta.get("service_tier")) or _tier(usage.get("service_tier"))
        if tier:
            extras["service_tier"] = tier
        speed = _tier(meta.get("speed")) or _tier(usage.get("speed"))
        if speed:
            extras["speed"] = speed
        server = usage.get("server_tool_use")
        if isinstance(server, Mapping):
            searches = _int(server.get("web_search_requests"), "web_search_requests")
            if searches:
                extras["web_searches"] = searches
        grounding = meta.get("grounding_metadata")
        if isinstance(grounding, Mapping) and grounding:
            queries = grounding.get("web_search_queries")
            n = len(queries) if isinstance(queries, list) else 0
            if n or grounding.get("grounding_chunks") or grounding.get("search_entry_point"):
                extras["web_searches"] = extras.get("web_searches", 0) + max(n, 1)
    if not isinstance(message, Mapping):
        content = getattr(message, "content", None)
        calls = _server_tool_calls(content) if type(content) is not str else _NO_CALLS
        kwargs = getattr(message, "additional_kwargs", None)
        if kwargs and isinstance(kwargs, Mapping):
            outputs = _server_tool_calls(kwargs.get("tool_outputs"))
            if outputs is not _NO_CALLS:  # the same items may be in both places: count them once
                calls = tuple(max(a, b) for a, b in zip(calls, outputs, strict=True))
        if calls is not _NO_CALLS:
            for name, count in zip(_CALL_COUNTS, calls, strict=True):
                if count:
                    extras[name] = max(extras.get(name, 0), count)
    return extras


_CALL_COUNTS = ("web_searches", "file_searches", "containers", "generated_images")
_NO_CALLS = (0, 0, 0, 0)
_CODE_RUNS, _IMAGES = 2, 3
_SERVER_CALLS = {"web_search_call": 0, "file_search_call": 1, "code_interpreter_call": _CODE_RUNS,
                 "image_generation_call": _IMAGES}
_SERVER_TOOLS = {"web_search": 0, "file_search": 1, "code_interpreter": _CODE_RUNS}


def _server_tool_calls(blocks: Any) -> tuple[int, ...]:
    """OpenAI Responses server-tool items in ``blocks`` (or LangChain v1 ``server_tool_call`` and
    generated ``image`` blocks), counted in the order of ``_CALL_COUNTS``. Code runs count their
    distinct containers: the fee is per container, however many runs share one."""
    if not isinstance(blocks, list) or not blocks:
        return _NO_CALLS
    counts = [0, 0, 0, 0]
    containers: set[str] = set()
    for block in blocks:
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "server_tool_call":
            index = _SERVER_TOOLS.get(block.get("name"))
        elif kind == "image":  # v1 turns an image_generation_call into an image block that keeps its ig_ id
            ident = block.get("id")
            index = _IMAGES if isinstance(ident, str) and ident.startswith("ig_") else None
        else:
            index = _SERVER_CALLS.get(kind)
        if index == _CODE_RUNS:
            extras = block.get("extras")
            container = block.get("container_id") or (
                extras.get("container_id") if isinstance(extras, Mapping) else None)
            if isinstance(container, str) and container:
                containers.add(container)
            else:  # a run that names no container is charged one of its own
                counts[_CODE_RUNS] += 1
        elif index is not None:
            counts[index] += 1
    counts[_CODE_RUNS] += len(containers)
    return tuple(counts) if any(counts) else _NO_CALLS


def answered_from_cache(reply: Any) -> bool:
    """Whether LangChain's cache served ``reply`` (it marks one with ``usage_metadata["total_cost"] = 0``):
    no request was sent, nothing is billed."""
    usage = getattr(reply, "usage_metadata", None)
    return (type(usage) is dict or isinstance(usage, Mapping)) and usage.get("total_cost") == 0


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
