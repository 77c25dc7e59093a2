"""Output caps: what bounds a call's reply, who set it, and the model's own output limit.

A call's cap can come from its kwargs, from a ``RunnableBinding`` (``llm.bind(max_tokens=...)``),
from a field the user set on the model, or from a value the integration filled in by itself:
``ChatAnthropic`` sets ``max_tokens`` to the model's full output limit from its profile (64,000
for Sonnet 4.5, 128,000 for Opus 4.6) when none is given, which would make every call hold the
price of a maximal reply. ``output_cap`` tells these apart so the guard can reserve (and send) a
sane cap instead.

A model field equal to the model's full output limit (``profile["max_output_tokens"]``), or
``ChatAnthropic``'s fallback of 4,096 on a model without a profile, is read as the integration's
default: LangChain does not record whether the user typed it. To make the guard honour a full
output limit, bind it (``llm.bind(max_tokens=64000)``) or pass it with the call.

A request's ``extra_body`` (merged by the OpenAI and Anthropic SDKs over the named parameters) is
read first: a cap or ``n`` there is what the provider runs with. ``n`` / ``candidate_count`` ask
for several completions, each up to the cap and each billed.

Anthropic's extended thinking (``thinking={"type": "enabled", "budget_tokens": B}``) spends up to
``B`` output tokens thinking inside the cap, and the API refuses a ``max_tokens`` that is not above
``B``: a cap the guard chooses leaves room for the thinking (``OutputCap.thinking``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CAP_KWARGS",
    "COMPLETION_KWARGS",
    "OutputCap",
    "OutputCapSource",
    "binding_layers",
    "extra_body_of",
    "innermost_model",
    "max_output_tokens",
    "model_input_limit",
    "model_output_limit",
    "output_cap",
    "output_cap_kwarg",
]

CAP_KWARGS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict", "maxTokens",
              "max_new_tokens", "max_tokens_to_sample")
"""Call / binding kwargs that set an output cap, in the order they are looked for."""

_CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict", "max_new_tokens")

COMPLETION_KWARGS = ("n", "candidate_count")
"""Call / binding kwargs and model fields that ask for several completions of one prompt (OpenAI and
compatible APIs: ``n``; Google: ``candidate_count``, also inside a call's ``generation_config``).
Each completion may run to the output cap and every one is billed: the prompt once, the outputs all."""

# Integrations that fill in a cap of their own when none is given: class name -> fallback used
# when the model has no profile (the profile's max_output_tokens otherwise).
_FILLS_DEFAULT_CAP = {"ChatAnthropic": 4096, "ChatAnthropicVertex": 4096}

OutputCapSource = Literal["call", "binding", "model", "integration_default", "none"]


@dataclass(frozen=True, slots=True)
class OutputCap:
    """A call's output cap and where it comes from.

    ``tokens``: the cap the call runs with (None when nothing sets one).
    ``source``: ``"call"`` (the call's kwargs), ``"binding"`` (``bind`` / ``bind_tools``
    kwargs), ``"model"`` (a field or ``model_kwargs`` the user set), ``"integration_default"``
    (the integration's own default, equal to the model's full output limit), or ``"none"``.
    ``kwarg``: the keyword that sets this call's cap (the one found, else the model's field).
    ``model_limit``: the model's own output limit from its LangChain profile, if known.
    ``completions``: how many completions the call asks for (``n``), each capped at ``tokens``.
    ``thinking``: the output tokens the call lets the model think with inside the cap (Anthropic's
    ``thinking.budget_tokens``; 0 for none), which a cap must exceed.
    """

    tokens: int | None
    source: OutputCapSource
    kwarg: str | None
    model_limit: int | None
    completions: int = 1
    thinking: int = 0

    @property
    def user_set(self) -> bool:
        """True when the user chose this cap (call, binding or model field)."""
        return self.source in ("call", "binding", "model")

    def describe(self) -> str:
        """A short phrase for an error message: ``"max_tokens=64,000 (ChatAnthropic's default ...)"``."""
        name = self.kwarg or "max_tokens"
        if self.tokens is None:
            return "no output cap set"
        where = {
            "call": "passed with the call",
            "binding": "bound on the model (bind)",
            "model": "set on the model",
            "integration_default": "the integration's default: the model's full output limit",
            "none": "",
        }[self.source]
        return f"{name}={self.tokens:,} ({where})" if where else f"{name}={self.tokens:,}"


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, float):
        return math.ceil(value) if math.isfinite(value) and value > 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value) or None
    return None


def _cap_in(kwargs: Any) -> tuple[int, str] | None:
    if not isinstance(kwargs, Mapping):
        return None
    for key in CAP_KWARGS:
        cap = _positive_int(kwargs.get(key))
        if cap is not None:
            return cap, key
    return None


def binding_layers(model: Any) -> tuple[list[Mapping[str, Any]], Any]:
    """Bound kwargs from the outermost ``RunnableBinding`` in, and the innermost runnable."""
    layers: list[Mapping[str, Any]] = []
    for _ in range(32):
        inner = getattr(model, "bound", None)
        if inner is not None:
            kwargs = getattr(model, "kwargs", None)
            if isinstance(kwargs, Mapping):
                layers.append(kwargs)
            model = inner
            continue
        default = getattr(model, "default", None)  # RunnableConfigurableFields / Alternatives
        if default is not None and hasattr(default, "invoke"):
            model = default
            continue
        break
    return layers, model


def innermost_model(model: Any) -> Any:
    """The chat model under any bindings / configurable wrappers."""
    return binding_layers(model)[1]


def model_output_limit(model: Any) -> int | None:
    """The model's own output limit (``profile["max_output_tokens"]``), or None when unknown."""
    return _profile_limit(model, "max_output_tokens")


_LONG_CONTEXT_BETA = "context-1m"  # Anthropic's 1M-token context window beta (context-1m-2025-08-07)


def model_input_limit(model: Any) -> int | None:
    """The most prompt tokens the model takes (``profile["max_input_tokens"]``; 1,000,000 with
    Anthropic's ``context-1m`` beta on the model or a binding), or None when unknown."""
    layers, inner = binding_layers(model)
    limit = _profile_limit(inner, "max_input_tokens")
    for betas in (*(layer.get("betas") for layer in layers), getattr(inner, "betas", None)):
        if isinstance(betas, (list, tuple)) and any(
                isinstance(beta, str) and beta.startswith(_LONG_CONTEXT_BETA) for beta in betas):
            return max(limit or 0, 1_000_000)
    return limit


def _profile_limit(model: Any, key: str) -> int | None:
    profile = getattr(innermost_model(model), "profile", None)
    return _positive_int(profile.get(key)) if isinstance(profile, Mapping) else None


def _field_cap(inner: Any) -> tuple[int, str] | None:
    for name in _CAP_FIELDS:
        cap = _positive_int(getattr(inner, name, None))
        if cap is not None:
            return cap, name
    return None


def _is_integration_default(inner: Any, cap: int, limit: int | None) -> bool:
    if limit is not None and cap == limit:
        return True
    fallback = _FILLS_DEFAULT_CAP.get(type(inner).__name__)
    return fallback is not None and limit is None and cap == fallback


def output_cap(model: Any, call_kwargs: Mapping[str, Any] | None = None) -> OutputCap:
    """The output cap a call on ``model`` runs with, who set it, the model's output limit, and how
    many completions the call asks for.

    Looks at the call's kwargs, then ``RunnableBinding`` kwargs (outer over inner), then the
    model's fields and ``model_kwargs``, then its ``ls_max_tokens``. Non-positive and
    non-numeric values are ignored.
    """
    layers, inner = binding_layers(model)
    limit = model_output_limit(inner)
    completions = _completions(layers, inner, call_kwargs)
    extra, index = extra_body_of(inner, call_kwargs, *layers)
    thinking = _thinking_budget(extra, call_kwargs, *layers, inner)
    if extra is not None:
        # The SDK merges extra_body over the named parameters: its cap is the one the request runs
        # with, and a cap the guard would send beside it is overridden (so none is sent).
        where: OutputCapSource = "call" if index == 0 else "binding" if index <= len(layers) else "model"
        completions = _completions_in(extra) or completions
        found = _cap_in(extra)
        if found is not None:
            return OutputCap(found[0], where, None, limit, completions, thinking)
        if any(key in extra for key in CAP_KWARGS):  # null (or a value the provider refuses): uncapped
            return OutputCap(limit, where if limit is not None else "none", None, limit, completions, thinking)
    tokens, source, kwarg = _cap_of(layers, inner, limit, call_kwargs)
    return OutputCap(tokens, source, kwarg, limit, completions, thinking)


def _thinking_budget(*places: Any) -> int:
    """Anthropic's ``thinking.budget_tokens`` as the request is sent: the first of ``places`` (the
    extra_body, the call's kwargs, bindings outer first, then the model: its ``thinking`` field,
    then its ``model_kwargs``) that sets ``thinking``; 0 when none does or thinking is off."""
    for place in places:
        if isinstance(place, Mapping):
            found = place.get("thinking")
        else:
            found = getattr(place, "thinking", None)
            if found is None:
                model_kwargs = getattr(place, "model_kwargs", None)
                found = model_kwargs.get("thinking") if isinstance(model_kwargs, Mapping) else None
        if found is None:
            continue
        if not isinstance(found, Mapping) or found.get("type") != "enabled":
            return 0  # disabled, adaptive (no budget: it thinks within the cap), or not a setting
        return _positive_int(found.get("budget_tokens")) or 0
    return 0


def extra_body_of(model: Any, *kwargs: Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, int]:
    """The ``extra_body`` a request on chat model ``model`` is sent with (the OpenAI and Anthropic SDKs
    merge it over the named parameters), and where it came from: the first of ``kwargs`` (the call's,
    then bindings', outer first) that has one, by its index, else the model's own (a field or in
    ``model_kwargs``), index ``len(kwargs)``. Each replaces those after it whole, as the request does."""
    for index, layer in enumerate(kwargs):
        if isinstance(layer, Mapping) and "extra_body" in layer:
            body = layer["extra_body"]
            return (body if isinstance(body, Mapping) else None), index
    body = getattr(model, "extra_body", None)
    if not isinstance(body, Mapping):
        model_kwargs = getattr(model, "model_kwargs", None)
        body = model_kwargs.get("extra_body") if isinstance(model_kwargs, Mapping) else None
    return (body if isinstance(body, Mapping) else None), len(kwargs)


def _cap_of(layers: list[Mapping[str, Any]], inner: Any, limit: int | None, call_kwargs: Mapping[str, Any] | None
            ) -> tuple[int | None, OutputCapSource, str | None]:
    found = _cap_in(call_kwargs)
    if found is not None:
        return found[0], "call", found[1]
    for kwargs in layers:
        found = _cap_in(kwargs)
        if found is not None:
            return found[0], "binding", found[1]
    field = _field_cap(inner)
    if field is not None:
        source: OutputCapSource = "integration_default" if _is_integration_default(inner, field[0], limit) \
            else "model"
        return field[0], source, output_cap_kwarg(inner) or field[1]
    found = _cap_in(getattr(inner, "model_kwargs", None))
    if found is not None:
        return found[0], "model", output_cap_kwarg(inner) or found[1]
    kwarg = output_cap_kwarg(inner)
    get_ls_params = getattr(inner, "_get_ls_params", None)
    if callable(get_ls_params):
        try:
            params = get_ls_params()
        except Exception:  # a model whose ls params need arguments we don't have
            params = None
        if isinstance(params, Mapping):
            cap = _positive_int(params.get("ls_max_tokens"))
            if cap is not None:
                return cap, "integration_default" if limit is not None and cap == limit else "model", kwarg
    return None, "none", kwarg


def _completions_in(kwargs: Any) -> int | None:
    if not isinstance(kwargs, Mapping):
        return None
    for key in COMPLETION_KWARGS:
        found = _positive_int(kwargs.get(key))
        if found is not None:
            return found
    nested = kwargs.get("generation_config")  # Google's per-call generation settings
    return _completions_in(nested) if isinstance(nested, Mapping) else None


def _completions(layers: list[Mapping[str, Any]], inner: Any, call_kwargs: Mapping[str, Any] | None) -> int:
    """How many completions a call asks for: the call's kwargs, then bindings (outer first), then the
    model's fields and ``model_kwargs``; 1 when none says. A value that is not a positive number says
    nothing here (None leaves it unset, others the provider refuses), so the next place is looked at:
    never fewer than could be asked for."""
    for kwargs in (call_kwargs, *layers):
        found = _completions_in(kwargs)
        if found is not None:
            return found
    for name in COMPLETION_KWARGS:
        found = _positive_int(getattr(inner, name, None))
        if found is not None:
            return found
    return _completions_in(getattr(inner, "model_kwargs", None)) or 1


def max_output_tokens(model: Any, call_kwargs: Mapping[str, Any] | None = None) -> int | None:
    """The output cap a call will run with, or None (then the guard's default applies)."""
    return output_cap(model, call_kwargs).tokens


def output_cap_kwarg(model: Any) -> str | None:
    """The keyword to pass with a call to set its output cap on ``model``, or None if unknown.

    The key a binding already uses (outermost), else the key the integration's own request
    defaults carry (ChatOpenAI sends a model's ``max_tokens`` as ``max_completion_tokens``,
    and on the Responses API a call's ``max_tokens`` would lose to it), else the model's cap
    field (``max_tokens`` for ChatAnthropic, ChatMistralAI...; ``max_output_tokens`` for
    Google; ``num_predict`` for Ollama), else a cap key in its ``model_kwargs``.
    """
    layers, inner = binding_layers(model)
    for kwargs in layers:
        found = _cap_in(kwargs)
        if found is not None:
            return found[1]
    try:  # the key the integration itself puts in its requests, when a cap is set on the model
        defaults = getattr(inner, "_default_params", None)
    except Exception:  # a property that needs state we don't have
        defaults = None
    found = _cap_in(defaults)
    if found is not None:
        return found[1]
    fields = getattr(type(inner), "model_fields", None)
    if isinstance(fields, Mapping):
        for name in _CAP_FIELDS:
            if name in fields:
                return name
    found = _cap_in(getattr(inner, "model_kwargs", None))
    if found is not None:
        return found[1]
    return None
