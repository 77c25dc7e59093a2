"""Decimal prices from genai-prices (bundled, offline), with overrides, cached per model.

A model's price is resolved once into a ``RateCard``: genai-prices (or an override) is
probed at resolve time and compiled into integer coefficients, one per ``TokenUsage``
field, so that pricing a call is a handful of integer multiplications and never calls
genai-prices on the hot path. Tests check the compiled cost against
``genai_prices.calc_price`` for equality, to the last digit.
"""

from __future__ import annotations

import inspect
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from .errors import UnknownModelPriceError
from .money import to_decimal
from .usage import TokenUsage

__all__ = [
    "ModelRef",
    "ModelPrice",
    "RateCard",
    "Pricer",
    "model_ref",
    "model_ref_from_run",
    "model_ref_from_response",
    "canonical_provider",
    "default_pricer",
]


# --------------------------------------------------------------------------------------
# Which model is it?
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """Which model a runnable or a callback run is: its name and, when known, its provider.

    ``provider`` is a canonical provider id (see ``canonical_provider``): the genai-prices
    id where genai-prices knows the provider (``"openai"``, ``"azure"``, ``"anthropic"``,
    ``"google"``, ``"aws"`` for Bedrock, ``"mistral"``, ...), else LangChain's name lowercased.
    """

    name: str | None
    provider: str | None = None

    def __str__(self) -> str:
        name = self.name or "unknown model"
        return f"{self.provider}/{name}" if self.provider else name


# LangChain's ``ls_provider`` values (and class-derived defaults) -> genai-prices provider ids.
_PROVIDER_ALIASES: dict[str, str] = {
    "openai": "openai",
    "azure": "azure",
    "azure_openai": "azure",
    "azureopenai": "azure",
    "azure_ai": "azure",
    "anthropic": "anthropic",
    "google": "google",
    "google_genai": "google",
    "google_vertexai": "google",
    "google_anthropic_vertex": "google",
    "googlegenerativeai": "google",
    "vertexai": "google",
    "vertex_ai": "google",
    "anthropicvertex": "google",
    "gemini": "google",
    "aws": "aws",
    "bedrock": "aws",
    "amazon_bedrock": "aws",
    "bedrockconverse": "aws",
    "bedrock_converse": "aws",
    "mistral": "mistral",
    "mistralai": "mistral",
    "groq": "groq",
    "together": "together",
    "togetherai": "together",
    "together_ai": "together",
    "together-ai": "together",
    "fireworks": "fireworks",
    "fireworks_ai": "fireworks",
    "fireworks-ai": "fireworks",
    "deepseek": "deepseek",
    "xai": "x-ai",
    "x-ai": "x-ai",
    "x_ai": "x-ai",
    "cohere": "cohere",
    "perplexity": "perplexity",
    "cerebras": "cerebras",
    "openrouter": "openrouter",
    "moonshot": "moonshotai",
    "moonshotai": "moonshotai",
    "zhipuai": "zhipuai",
    "databricks": "databricks",
}

# Chat model class names -> canonical provider, for objects that do not say (or say it badly).
_CLASS_PROVIDERS: dict[str, str] = {
    "ChatOpenAI": "openai",
    "BaseChatOpenAI": "openai",
    "AzureChatOpenAI": "azure",
    "AzureAIChatCompletionsModel": "azure",
    "ChatAnthropic": "anthropic",
    "ChatAnthropicMessages": "anthropic",
    "ChatAnthropicVertex": "google",
    "ChatVertexAI": "google",
    "ChatGoogleGenerativeAI": "google",
    "ChatBedrock": "aws",
    "ChatBedrockConverse": "aws",
    "BedrockChat": "aws",
    "ChatMistralAI": "mistral",
    "ChatGroq": "groq",
    "ChatTogether": "together",
    "ChatFireworks": "fireworks",
    "ChatDeepSeek": "deepseek",
    "ChatXAI": "x-ai",
    "ChatCohere": "cohere",
    "ChatPerplexity": "perplexity",
    "ChatCerebras": "cerebras",
    "ChatOpenRouter": "openrouter",
    "ChatDatabricks": "databricks",
    "ChatOllama": "ollama",
    "ChatHuggingFace": "huggingface",
}

_MODEL_ATTRS = ("model_name", "model", "model_id", "deployment_name")


def canonical_provider(provider: str | None) -> str | None:
    """A provider name as LangChain or a user spells it -> the id this library uses.

    ``"google_vertexai"`` and ``"google_genai"`` -> ``"google"``, ``"amazon_bedrock"`` ->
    ``"aws"``, ``"xai"`` -> ``"x-ai"``; names it does not know are lowercased and kept.
    """
    if not provider:
        return None
    key = provider.strip().lower()
    return _PROVIDER_ALIASES.get(key, key) or None


def _str(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _provider_from(reported: Any, class_names: Iterable[str]) -> str | None:
    """A known reported provider wins; else the first known class name; else what was reported."""
    reported = _str(reported)
    if reported and reported.lower() in _PROVIDER_ALIASES:
        return canonical_provider(reported)
    for class_name in class_names:
        if class_name in _CLASS_PROVIDERS:
            return _CLASS_PROVIDERS[class_name]
    return canonical_provider(reported)


def _unwrap(runnable: Any) -> tuple[Any, dict[str, Any]]:
    """Peel bindings and thin wrappers off a chat model; collect the bound call kwargs."""
    from langchain_core.runnables import RunnableBinding

    obj, kwargs = runnable, {}
    for _ in range(32):
        if isinstance(obj, RunnableBinding):
            kwargs = {**obj.kwargs, **kwargs}  # an outer bind overrides an inner one
            obj = obj.bound
            continue
        if getattr(type(obj), "_get_ls_params", None) is not None:
            break
        # getattr_static: never run a property or __getattr__ of an object we don't know.
        inner = None
        for attr in ("bound", "llm", "model", "runnable"):
            value = inspect.getattr_static(obj, attr, None)
            if value is not None and not isinstance(value, str) and hasattr(value, "invoke"):
                inner = value
                break
        if inner is None:
            break
        obj = inner
    return obj, kwargs


def model_ref(runnable: Any) -> ModelRef:
    """The model behind a chat model, or a ``RunnableBinding`` (``bind``, ``bind_tools``) around one.

    Asks LangChain first (``_get_ls_params``: ``ls_provider``, ``ls_model_name``, honouring a
    bound ``model=``), then the attributes ``model_name`` / ``model`` / ``model_id`` /
    ``deployment_name``; the provider falls back to the class name (``ChatOpenAI`` -> openai).
    """
    obj, kwargs = _unwrap(runnable)
    params: Mapping[str, Any] = {}
    if getattr(type(obj), "_get_ls_params", None) is not None:
        for call_kwargs in (kwargs, {}):
            try:
                params = obj._get_ls_params(**call_kwargs) or {}
                break
            except Exception:  # a third-party model that chokes on bound kwargs
                continue
    name = _str(params.get("ls_model_name")) or _str(kwargs.get("model"))
    if name is None:
        for attr in _MODEL_ATTRS:
            if name := _str(inspect.getattr_static(obj, attr, None)) or _str(_safe_getattr(obj, attr)):
                break
    class_names = [cls.__name__ for cls in type(obj).__mro__]
    return ModelRef(name, _provider_from(params.get("ls_provider"), class_names))


def _safe_getattr(obj: Any, attr: str) -> Any:
    try:
        return getattr(obj, attr, None)
    except Exception:
        return None


def model_ref_from_run(
    serialized: Mapping[str, Any] | None,
    invocation_params: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
) -> ModelRef:
    """The model of a callback run (``on_chat_model_start`` / ``on_llm_start`` arguments).

    LangChain puts ``ls_provider`` / ``ls_model_name`` in the run's ``metadata``; the
    ``invocation_params`` carry ``model`` / ``model_name``; ``serialized["id"]`` is the class path.
    """
    metadata = metadata or {}
    params = invocation_params or {}
    serialized = serialized or {}
    ctor = serialized.get("kwargs") if isinstance(serialized.get("kwargs"), Mapping) else {}
    name = _str(metadata.get("ls_model_name"))
    for source in (params, ctor):
        for key in (*_MODEL_ATTRS, "azure_deployment"):
            name = name or _str(source.get(key))
    class_path = serialized.get("id")
    class_names = [class_path[-1]] if isinstance(class_path, list) and class_path else []
    return ModelRef(name, _provider_from(metadata.get("ls_provider"), [c for c in class_names if isinstance(c, str)]))


def model_ref_from_response(message: Any) -> ModelRef | None:
    """The model a provider says answered (``response_metadata`` ``model_name``/``model``/``model_id``).

    Takes an ``AIMessage`` or its ``response_metadata`` mapping; None when it names no model.
    """
    meta = message if isinstance(message, Mapping) else getattr(message, "response_metadata", None)
    if not isinstance(meta, Mapping):
        return None
    name = _str(meta.get("model_name")) or _str(meta.get("model")) or _str(meta.get("model_id"))
    if name is None:
        return None
    return ModelRef(name, canonical_provider(_str(meta.get("model_provider"))))


# --------------------------------------------------------------------------------------
# Prices you set
# --------------------------------------------------------------------------------------

_PRICE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning")


def _dollars_per_mtok(value: Any, key: str, what: str) -> Decimal:
    try:
        return to_decimal(value, what=what)
    except (TypeError, ValueError):
        if _is_negative(value):
            raise ValueError(f"{what}: {key!r} must not be negative, got {value!r}") from None
        raise ValueError(f"{what}: {key!r} must be a number of dollars per million tokens, got {value!r}") from None


def _is_negative(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        return False
    try:
        return Decimal(str(value).strip().lstrip("$")) < 0
    except ArithmeticError:
        return False


@dataclass(frozen=True)
class ModelPrice:
    """A price you set in code or config, in USD per million tokens.

    ``cache_read`` / ``cache_write`` / ``reasoning`` default to ``input`` / ``input`` / ``output``.
    Numbers may be given as ``Decimal``, ``str``, ``int`` or ``float``; they are kept as ``Decimal``.
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name in ("input", "output"):
                object.__setattr__(self, f.name, _dollars_per_mtok(value, f.name, "ModelPrice"))

    @classmethod
    def coerce(cls, value: Any, *, what: str = "price") -> ModelPrice:
        """A ``ModelPrice`` or a mapping such as ``{"input": "0.5", "output": "1.5"}`` -> ``ModelPrice``."""
        if isinstance(value, ModelPrice):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f'{what}: expected a ModelPrice or a mapping like {{"input": "0.50", "output": "1.50"}} '
                f"(USD per million tokens), got {value!r}"
            )
        unknown = sorted(str(k) for k in value if k not in _PRICE_KEYS)
        if unknown:
            raise ValueError(
                f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(_PRICE_KEYS)}"
            )
        missing = [k for k in ("input", "output") if value.get(k) is None]
        if missing:
            raise ValueError(f"{what}: {missing[0]!r} is required (dollars per million tokens)")
        return cls(**{k: _dollars_per_mtok(v, k, what) for k, v in value.items() if v is not None})


# --------------------------------------------------------------------------------------
# Rate cards: a price compiled for the hot path
# --------------------------------------------------------------------------------------

# (TokenUsage field, genai-prices usage key, TokenUsage fields that must cover it)
_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("input_tokens", "input_tokens", ()),
    ("output_tokens", "output_tokens", ()),
    ("cache_read_tokens", "cache_read_tokens", ("input_tokens",)),
    ("cache_write_tokens", "cache_write_tokens", ("input_tokens",)),
    ("cache_write_5m_tokens", "cache_write_5m_tokens", ("input_tokens", "cache_write_tokens")),
    ("cache_write_1h_tokens", "cache_write_1h_tokens", ("input_tokens", "cache_write_tokens")),
    ("input_audio_tokens", "input_audio_tokens", ("input_tokens",)),
    ("output_audio_tokens", "output_audio_tokens", ("output_tokens",)),
    ("reasoning_tokens", "output_reasoning_tokens", ("output_tokens",)),
)
_FIELD_NAMES = tuple(f for f, _, _ in _FIELDS)
_DETAIL_FIELDS = _FIELD_NAMES[2:]
_MTOK = Decimal(1_000_000)

PriceFn = Callable[[Mapping[str, int]], Decimal]


def _probe_segment(price_of: PriceFn, lo: int, hi: int | None) -> dict[str, Decimal]:
    """Linear coefficients of ``price_of`` while ``lo <= input_tokens <= hi``; key "" is the constant.

    Within one input-token tier the price is affine in the usage counts (genai-prices splits
    totals into disjoint leaves and prices each leaf), so one unit step per field measures it.
    """
    b = lo if lo >= 1 else (1 if hi is None or hi >= 1 else 0)
    base = dict.fromkeys(_FIELD_NAMES, 0)
    base["input_tokens"] = b
    at_base = price_of(base)
    coef: dict[str, Decimal] = {}
    if hi is None or b + 1 <= hi:
        coef["input_tokens"] = price_of({**base, "input_tokens": b + 1}) - at_base
    elif b - 1 >= lo:
        coef["input_tokens"] = at_base - price_of({**base, "input_tokens": b - 1})
    else:  # a tier of one input size: its input cost is all in the constant
        coef["input_tokens"] = Decimal(0)
    for field, _, parents in _FIELDS[1:]:
        if "input_tokens" in parents and b == 0:
            coef[field] = Decimal(0)  # this tier holds only empty prompts
            continue
        point = {**base, **{p: 1 for p in parents if p != "input_tokens"}}
        coef[field] = price_of({**point, field: 1}) - price_of(point)
    coef[""] = at_base - coef["input_tokens"] * b
    return coef


def _plain(value: Decimal) -> Decimal:
    """``Decimal('30.000')`` -> ``Decimal('30')`` (not ``3E+1``)."""
    value = value.normalize()
    return value.quantize(Decimal(1)) if value.as_tuple().exponent > 0 else value  # type: ignore[operator]


def _mantissa(value: Decimal, exponent: int) -> int:
    sign, digits, exp = value.as_tuple()
    m = int("".join(map(str, digits)) or "0") * 10 ** (int(exp) - exponent)
    return -m if sign else m


@dataclass(frozen=True, slots=True)
class _Segment:
    const: int
    input: int
    output: int
    cache_write: int
    details: tuple[tuple[str, int], ...]  # the other fields with a non-zero coefficient


class RateCard:
    """A model's prices, resolved once; ``cost`` is a few integer multiplications.

    Built by ``Pricer.rate_card`` or ``RateCard.from_price``; the constructor compiles any
    ``price_of(counts)`` (counts: a mapping of ``TokenUsage`` field -> tokens) that is affine
    within each input-token tier, as genai-prices' prices are. ``prices`` shows what a token of each kind costs, in USD per
    million tokens (first tier, for display); ``tiers`` lists the input sizes above which a
    dearer tier applies; ``valid_until`` is set when the price is scheduled to change (an
    off-peak window, a new price date), after which ``Pricer.rate_card`` resolves it again.
    """

    model: str
    provider: str | None
    source: str  # "genai-prices", "override" or "fallback"

    def __init__(
        self,
        price_of: PriceFn,
        *,
        model: str,
        provider: str | None,
        source: str,
        tiers: Iterable[int] = (),
        priced_as: str | None = None,
        valid_until: datetime | None = None,
    ) -> None:
        self.model = model
        self.provider = provider
        self.source = source
        self.priced_as = priced_as
        self.valid_until = valid_until
        self.tiers: tuple[int, ...] = tuple(sorted({int(t) for t in tiers}))
        bounds = [(0, self.tiers[0] if self.tiers else None)]
        bounds += [(s + 1, nxt) for s, nxt in zip(self.tiers, (*self.tiers[1:], None), strict=False)]
        coefs = [_probe_segment(price_of, lo, hi) for lo, hi in bounds]

        first = coefs[0]
        effective = {
            "input": first["input_tokens"],
            "output": first["output_tokens"],
            "cache_read": first["input_tokens"] + first["cache_read_tokens"],
            "cache_write": first["input_tokens"] + first["cache_write_tokens"],
            "cache_write_5m": first["input_tokens"] + first["cache_write_tokens"] + first["cache_write_5m_tokens"],
            "cache_write_1h": first["input_tokens"] + first["cache_write_tokens"] + first["cache_write_1h_tokens"],
            "input_audio": first["input_tokens"] + first["input_audio_tokens"],
            "output_audio": first["output_tokens"] + first["output_audio_tokens"],
            "reasoning": first["output_tokens"] + first["reasoning_tokens"],
        }
        self.prices: dict[str, Decimal] = {k: _plain(v * _MTOK) for k, v in effective.items()}
        if first[""]:
            self.prices["request"] = _plain(first[""])

        # One common power of ten makes every coefficient an exact integer.
        exps = [int(c.as_tuple().exponent) for seg in coefs for c in seg.values() if c]
        self._exp = min([0, *exps])
        self._segments = tuple(
            _Segment(
                const=_mantissa(seg[""], self._exp),
                input=_mantissa(seg["input_tokens"], self._exp),
                output=_mantissa(seg["output_tokens"], self._exp),
                cache_write=_mantissa(seg["cache_write_tokens"], self._exp),
                details=tuple(
                    (f, _mantissa(seg[f], self._exp))
                    for f in _DETAIL_FIELDS
                    if f != "cache_write_tokens" and seg[f]
                ),
            )
            for seg in coefs
        )
        # Which details the model prices apart from their totals. A usage whose details overlap
        # (cached *audio* tokens appear in both cache_read and audio) would leave the plain-input
        # leaf negative; raising the total to cover the details charges such overlap at the
        # dearer of the two rates, never less.
        nonzero = {f for seg in coefs for f in _DETAIL_FIELDS if seg[f]}
        self._in_read = "cache_read_tokens" in nonzero
        self._in_write = bool(nonzero & {"cache_write_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens"})
        self._in_audio = "input_audio_tokens" in nonzero
        self._ttl = bool(nonzero & {"cache_write_5m_tokens", "cache_write_1h_tokens"})
        self._out_reasoning = "reasoning_tokens" in nonzero
        self._out_audio = "output_audio_tokens" in nonzero
        self._nano_shift = self._exp + 9  # scaled units -> nano-USD: multiply by 10**shift
        # Per segment, what a prompt token costs when the whole prompt is written to a 1-hour cache
        # (input + cache write + 1h-write coefficients): the dearest way a prompt can be billed.
        self._cache_write_input = tuple(
            seg.input + seg.cache_write + dict(seg.details).get("cache_write_1h_tokens", 0) for seg in self._segments
        )

    @classmethod
    def from_price(
        cls, price: ModelPrice, *, model: str, provider: str | None = None, source: str = "override"
    ) -> RateCard:
        """A card for a price you set, with the same semantics as genai-prices' own prices."""
        from genai_prices.types import ModelPrice as GenaiModelPrice

        genai_price = GenaiModelPrice(
            input_mtok=price.input,
            output_mtok=price.output,
            cache_read_mtok=price.cache_read,
            cache_write_mtok=price.cache_write,
            output_reasoning_mtok=price.reasoning,
        )
        return cls(_genai_price_fn(genai_price), model=model, provider=provider, source=source)

    def _scaled(self, usage: TokenUsage) -> int:
        """Cost in units of 10**self._exp USD."""
        inp, out, cw = usage.input_tokens, usage.output_tokens, usage.cache_write_tokens
        if self._ttl:
            cw = max(cw, usage.cache_write_5m_tokens + usage.cache_write_1h_tokens)
        floor = (
            (usage.cache_read_tokens if self._in_read else 0)
            + (cw if self._in_write else 0)
            + (usage.input_audio_tokens if self._in_audio else 0)
        )
        if floor > inp:
            inp = floor
        floor = (usage.reasoning_tokens if self._out_reasoning else 0) + (
            usage.output_audio_tokens if self._out_audio else 0
        )
        if floor > out:
            out = floor
        segments = self._segments
        seg = segments[bisect_left(self.tiers, inp)] if len(segments) > 1 else segments[0]
        total = seg.const + seg.input * inp + seg.output * out + seg.cache_write * cw
        for field, m in seg.details:
            total += m * getattr(usage, field)
        return total if total > 0 else 0

    def _nano(self, scaled: int) -> int:
        if scaled <= 0:
            return 0
        shift = self._nano_shift
        return scaled * 10**shift if shift >= 0 else -(-scaled // 10**-shift)

    def hold_nano(self, input_tokens: int, output_tokens: int, *, dearer_cache_write: bool = False) -> tuple[int, int]:
        """What a pre-call estimate holds, in whole nano-USD rounded up: ``(reserve, input_cost)``.

        ``reserve`` is ``cost_nano(TokenUsage(input_tokens=..., output_tokens=...))`` and ``input_cost``
        is ``cost_nano(TokenUsage(input_tokens=...))``. With ``dearer_cache_write``, both grow by what
        billing the whole prompt as 1-hour cache writes would add, when that is dearer. The same
        integers as those ``cost_nano`` calls, without building the usages (this runs on every call).
        """
        index = bisect_left(self.tiers, input_tokens) if len(self._segments) > 1 else 0
        seg = self._segments[index]
        base = seg.const + seg.input * input_tokens
        input_cost = self._nano(base)
        reserve = self._nano(base + seg.output * output_tokens)
        if dearer_cache_write:
            extra = self._nano(seg.const + self._cache_write_input[index] * input_tokens) - input_cost
            if extra > 0:
                reserve += extra
                input_cost += extra
        return reserve, input_cost

    def cost(self, usage: TokenUsage) -> Decimal:
        """Exact cost of ``usage`` in USD."""
        scaled, exp = self._scaled(usage), self._exp
        if not scaled:
            return Decimal(0)
        while exp < 0 and scaled % 10 == 0:
            scaled //= 10
            exp += 1
        return Decimal(f"{scaled}E{exp}")

    def cost_nano(self, usage: TokenUsage) -> int:
        """Cost in whole nano-USD, rounded up (``money.ceil_nano(self.cost(usage))``)."""
        scaled, shift = self._scaled(usage), self._nano_shift
        if shift >= 0:
            return scaled * 10**shift
        return -(-scaled // 10**-shift)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}=${v}/M" for k, v in self.prices.items() if k in ("input", "output", "cache_read"))
        via = f", priced_as={self.priced_as!r}" if self.priced_as else ""
        return (
            f"RateCard(model={self.model!r}, provider={self.provider!r}, source={self.source!r}{via}, "
            f"{shown}{', tiered' if self.tiers else ''})"
        )


# --------------------------------------------------------------------------------------
# genai-prices
# --------------------------------------------------------------------------------------

_REGION_PREFIX = re.compile(r"^(?:us|eu|apac|ap|au|ca|jp|us-gov|global)\.")
_VENDOR_PREFIX = re.compile(r"^(?:anthropic|meta|amazon|mistral|cohere|ai21|deepseek|openai|qwen|writer)\.")
_PATH_PREFIX = re.compile(r"^(?:models/|(?:accounts|publishers)/[^/]+/models/)")
_DATE_SUFFIX = re.compile(r"-(?:20\d{6}|20\d{2}-\d{2}-\d{2})$")


def _name_candidates(name: str) -> list[str]:
    """``name`` and progressively stripped forms of it (path, Bedrock region/vendor/version, date)."""
    out: list[str] = []

    def add(candidate: str) -> str:
        if candidate and candidate not in out:
            out.append(candidate)
        return candidate

    n = add(name.strip().lower())
    if n.startswith("arn:"):  # Bedrock inference profile / provisioned model ARN
        n = add(n.rsplit("/", 1)[-1])
    n = add(_PATH_PREFIX.sub("", n))
    n = add(n.rsplit("/", 1)[-1])  # "mistralai/Mixtral-8x7B-Instruct-v0.1"
    n = add(_VENDOR_PREFIX.sub("", _REGION_PREFIX.sub("", n)))  # "us.anthropic.claude-..."
    n = add(re.sub(r":\d+$", "", n))  # "claude-v2:1"
    n = add(re.sub(r"(?<=\d{8})-v\d+$", "", n))  # "claude-3-haiku-20240307-v1"
    n = add(n.split("@", 1)[0])  # Vertex "claude-3-5-sonnet@20240620"
    add(_DATE_SUFFIX.sub("", n))
    return out


_get_snapshot: Any = None


def _snapshot() -> Any:
    global _get_snapshot
    if _get_snapshot is None:  # imported once: this runs on every call, to notice a price update
        from genai_prices.data_snapshot import get_snapshot

        _get_snapshot = get_snapshot
    return _get_snapshot()


def _find_genai_model(name: str, provider: str | None, now: datetime) -> tuple[Any, Any, Any] | None:
    """(genai provider, model info, its price now) for the first name form genai-prices knows."""
    snapshot = _snapshot()
    candidates = _name_candidates(name)
    hints = [provider, None] if provider else [None]
    for hint in hints:
        for candidate in candidates:
            try:
                found = snapshot.find_provider_model(candidate, None, hint, None)
            except LookupError:
                continue
            genai_provider, model = found
            price = model.get_prices(now)
            # Priced only per character, image, ...: no token price means we cannot price a chat call.
            if price.input_mtok is None and price.output_mtok is None:
                continue
            return genai_provider, model, price
    return None


def _genai_price_fn(model_price: Any) -> PriceFn:
    from genai_prices import Usage

    def price_of(counts: Mapping[str, int]) -> Decimal:
        usage = Usage(**{key: counts[field] for field, key, _ in _FIELDS})
        return model_price.calc_price(usage)["total_price"]

    return price_of


def _tier_starts(model_price: Any) -> set[int]:
    from genai_prices.types import TieredPrices

    return {
        tier.start
        for value in vars(model_price).values()
        if isinstance(value, TieredPrices)
        for tier in value.tiers
    }


def _utc_time(t: time) -> time:
    if t.tzinfo is None:
        return t.replace(tzinfo=UTC)
    return datetime.combine(date(1970, 1, 1), t).astimezone(UTC).timetz()


def _next_price_change(model_info: Any, now: datetime) -> datetime | None:
    """When the price genai-prices picks for ``now`` may change (dated and time-of-day prices)."""
    from genai_prices.types import StartDateConstraint, TimeOfDateConstraint

    if not isinstance(model_info.prices, list):
        return None
    changes: list[datetime] = []
    for conditional in model_info.prices:
        constraint = conditional.constraint
        if constraint is None:
            continue
        if isinstance(constraint, StartDateConstraint):
            start = datetime.combine(constraint.start_date, time(0), tzinfo=UTC)
            if start > now:
                changes.append(start)
        elif isinstance(constraint, TimeOfDateConstraint):
            for t in (constraint.start_time, constraint.end_time):
                at = datetime.combine(now.date(), _utc_time(t))
                changes.append(at if at > now else at + timedelta(days=1))
        else:  # a kind of condition we don't understand: look again soon
            changes.append(now + timedelta(minutes=5))
    return min(changes) if changes else None


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------
# Pricer
# --------------------------------------------------------------------------------------


class _Unknown:
    """A cached miss: genai-prices has no price (asked again when its data is updated)."""

    source = "genai-prices"
    valid_until: datetime | None = None

    def __init__(self, message: str) -> None:
        self.message = message


def _unknown_message(ref: ModelRef) -> str:
    if not ref.name:
        what = "Cannot tell which model this is (no model name on the runnable or in the run)"
        example = "my-model"
    else:
        provider = f" (provider {ref.provider!r})" if ref.provider else ""
        what = f"No price is known for model {ref.name!r}{provider}: genai-prices has no entry for it"
        example = ref.name
    return (
        f"{what}, and the guard will not count it as $0. Add its price in USD per million tokens, "
        f'e.g. BudgetGuard(..., prices={{"{example}": {{"input": "0.50", "output": "1.50"}}}}) '
        '(optionally also "cache_read", "cache_write", "reasoning"), or set a price for every model '
        'without one: BudgetGuard(..., fallback_price={"input": ..., "output": ...}).'
    )


class Pricer:
    """Resolves a ``ModelRef`` to a ``RateCard``: override, then genai-prices, then fallback.

    ``overrides`` maps a model name (case-insensitive, exact) or ``"provider:model"`` to a
    ``ModelPrice`` or a mapping like ``{"input": "0.5", "output": "1.5", "cache_read": "0.05"}``
    in USD per million tokens. ``fallback`` prices any model nothing else prices. Cards are
    cached per (provider, model); the cache is safe to share between threads.
    """

    def __init__(self, overrides: Mapping[str, Any] | None = None, fallback: Any = None) -> None:
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ValueError(f"prices: expected a mapping of model name -> price, got {overrides!r}")
        self._overrides: dict[str, ModelPrice] = {}
        for key, value in (overrides or {}).items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"prices: model names must be non-empty strings, got {key!r}")
            self._overrides[self._override_key(key)] = ModelPrice.coerce(value, what=f"price override {key!r}")
        self._fallback = None if fallback is None else ModelPrice.coerce(fallback, what="fallback price")
        self._cards: dict[tuple[str | None, str | None], RateCard | _Unknown] = {}
        self._lock = threading.Lock()
        self._snapshot: Any = None

    @staticmethod
    def _override_key(key: str) -> str:
        key = key.strip().lower()
        provider, sep, name = key.partition(":")
        if sep and name and provider in _PROVIDER_ALIASES:
            return f"{_PROVIDER_ALIASES[provider]}:{name}"
        return key

    def rate_card(self, ref: ModelRef) -> RateCard:
        """The model's ``RateCard``, resolved on first use and then cached.

        Raises ``UnknownModelPriceError`` (saying how to add a price) when nothing prices it.
        """
        provider = canonical_provider(ref.provider)
        key = (provider, ref.name.strip().lower() if ref.name else None)
        card = self._cards.get(key)
        if card is None or not self._fresh(card):
            with self._lock:
                snapshot = _snapshot()
                if snapshot is not self._snapshot:  # genai-prices data was updated: drop what came from it
                    self._cards = {k: v for k, v in self._cards.items() if v.source != "genai-prices"}
                    self._snapshot = snapshot
                card = self._cards.get(key)
                if card is None or not self._fresh(card):
                    card = self._cards[key] = self._resolve(ModelRef(ref.name, provider))
        if isinstance(card, _Unknown):
            err = UnknownModelPriceError(card.message)
            err.model, err.provider = ref.name, provider  # type: ignore[attr-defined]
            raise err
        return card

    def _fresh(self, card: RateCard | _Unknown) -> bool:
        if card.valid_until is not None and _now() >= card.valid_until:
            return False
        return card.source != "genai-prices" or _snapshot() is self._snapshot

    def cost(self, ref: ModelRef, usage: TokenUsage) -> Decimal:
        """Shorthand for ``self.rate_card(ref).cost(usage)``."""
        return self.rate_card(ref).cost(usage)

    def _resolve(self, ref: ModelRef) -> RateCard | _Unknown:
        name = ref.name.strip() if ref.name else None
        if name:
            lowered = name.lower()
            keys = ([f"{ref.provider}:{lowered}"] if ref.provider else []) + [lowered]
            for k in keys:
                if k in self._overrides:
                    return RateCard.from_price(self._overrides[k], model=name, provider=ref.provider)
            now = _now()
            found = _find_genai_model(name, ref.provider, now)
            if found is not None:
                genai_provider, model_info, model_price = found
                return RateCard(
                    _genai_price_fn(model_price),
                    model=name,
                    provider=ref.provider or genai_provider.id,
                    source="genai-prices",
                    tiers=_tier_starts(model_price),
                    priced_as=f"{genai_provider.id}/{model_info.id}",
                    valid_until=_next_price_change(model_info, now),
                )
        if self._fallback is not None:
            return RateCard.from_price(
                self._fallback, model=name or "unknown model", provider=ref.provider, source="fallback"
            )
        return _Unknown(_unknown_message(ref))


_default: Pricer | None = None


def default_pricer() -> Pricer:
    """A process-wide ``Pricer`` with no overrides (genai-prices only), shared so cards compile once."""
    global _default
    if _default is None:
        _default = Pricer()
    return _default
