"""Decimal prices from genai-prices (bundled, offline), with overrides, cached per model.

A model's price is resolved once into a ``RateCard``: genai-prices (or an override) is
probed at resolve time and compiled into integer coefficients, one per ``TokenUsage``
field, so that pricing a call is a handful of integer multiplications and never calls
genai-prices on the hot path. Tests check the compiled cost against
``genai_prices.calc_price`` for equality, to the last digit.
"""

from __future__ import annotations

import inspect
import ipaddress
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from urllib.parse import urlsplit
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from .caps import extra_body_of
from .errors import UnknownModelPriceError
from .money import to_decimal
from .usage import TokenUsage

__all__ = [
    "ItemBound",
    "ModelRef",
    "ModelPrice",
    "RateCard",
    "Pricer",
    "call_price_context",
    "candidate_refs",
    "host_provider",
    "item_bound",
    "TOOL_FEES",
    "check_tool_fees",
    "model_ref",
    "model_ref_from_run",
    "hosts_version",
    "price_host_as",
    "served_ref",
    "model_ref_from_response",
    "canonical_provider",
    "default_pricer",
]


# --------------------------------------------------------------------------------------
# Which model is it?
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """Which model a runnable or a callback run is: its name, its provider and, when set, its host.

    ``provider`` is a canonical provider id (see ``canonical_provider``): the genai-prices
    id where genai-prices knows the provider (``"openai"``, ``"azure"``, ``"anthropic"``,
    ``"google"``, ``"aws"`` for Bedrock, ``"mistral"``, ...), else LangChain's name lowercased.
    For a client pointed at another host (``ChatOpenAI(base_url=...)``) it is that host's
    provider (``"together"``, ``"fireworks"``, ...), ``"local"`` for a server on this machine or
    network, or the host name itself for a host genai-prices does not know. ``host`` is the
    ``base_url``'s ``host[:port]`` when the client was given one.
    """

    name: str | None
    provider: str | None = None
    host: str | None = None

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


# --------------------------------------------------------------------------------------
# Which host serves it?
# --------------------------------------------------------------------------------------

LOCAL = "local"
"""The provider id of a server on this machine or a private network (Ollama, vLLM, LM Studio, ...)."""

# Hosts genai-prices has no ``api_pattern`` for (or spells differently), by host name suffix.
_HOST_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("api.openai.com", "openai"),
    ("openai.azure.com", "azure"),
    ("cognitiveservices.azure.com", "azure"),
    ("services.ai.azure.com", "azure"),
    ("inference.ai.azure.com", "azure"),
    ("models.ai.azure.com", "azure"),
    ("azure-api.net", "azure"),
    ("api.anthropic.com", "anthropic"),
    ("googleapis.com", "google"),
    ("amazonaws.com", "aws"),
    ("api.together.xyz", "together"),
    ("api.together.ai", "together"),
    ("api.fireworks.ai", "fireworks"),
    ("openrouter.ai", "openrouter"),
    ("api.deepseek.com", "deepseek"),
    ("api.groq.com", "groq"),
    ("api.deepinfra.com", "deepinfra"),
    ("api.mistral.ai", "mistral"),
    ("api.x.ai", "x-ai"),
    ("api.perplexity.ai", "perplexity"),
    ("api.cerebras.ai", "cerebras"),
    ("api.moonshot.ai", "moonshotai"),
    ("api.moonshot.cn", "moonshotai"),
    ("open.bigmodel.cn", "zhipuai"),
    ("api.z.ai", "zai"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
)
_LOCAL_NAMES = frozenset({"localhost", "host.docker.internal", "gateway.docker.internal", "ip6-localhost"})
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa")
# A client class that talks to a local server when no URL is given.
_LOCAL_CLASSES = frozenset({"ChatOllama", "ChatLlamaCpp", "ChatLlamafile"})
# Fields that hold a client's base URL, in LangChain integrations.
_URL_ATTRS = (
    "openai_api_base", "base_url", "api_base", "anthropic_api_url", "azure_endpoint", "fireworks_api_base",
    "xai_api_base", "groq_api_base", "together_api_base", "endpoint_url", "endpoint", "api_url",
)

_registered_hosts: dict[str, str] = {}
_hosts_version = [0]


def _host_key(host: str) -> str:
    host = host.strip().lower()
    if "//" not in host:
        host = "//" + host
    return urlsplit(host).netloc or host.strip("/")


def price_host_as(host: str, provider: str) -> None:
    """Declare that ``host`` (``"gateway.corp"``, ``"127.0.0.1:8080"`` or a URL) bills as ``provider``.

    For a proxy or gateway that forwards to a vendor at its list price: models reached through
    it are then priced as ``provider``'s (e.g. ``price_host_as("llm-gateway.corp", "openai")``).
    Process-wide; a ``Pricer(hosts=...)`` does the same for one pricer. Without it, a host
    genai-prices does not know prices nothing: its models are unknown models.
    """
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"price_host_as: host must be a non-empty string, got {host!r}")
    if not isinstance(provider, str) or not provider.strip():
        raise ValueError(f"price_host_as: provider must be a non-empty string, got {provider!r}")
    _registered_hosts[_host_key(host)] = canonical_provider(provider) or provider
    _hosts_version[0] += 1


def hosts_version() -> int:
    """A number that changes whenever ``price_host_as`` declares a host (what was resolved from
    the hosts before is then resolved again)."""
    return _hosts_version[0]


def _is_local(hostname: str) -> bool:
    if hostname in _LOCAL_NAMES or hostname.endswith(_LOCAL_SUFFIXES):
        return True
    try:
        ip = ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        return "." not in hostname  # a bare name ("ollama", "vllm"): a container or LAN host
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified


def host_provider(url: str) -> tuple[str, str]:
    """``(provider, host)`` of an API base URL: who bills calls sent there.

    A host declared with ``price_host_as`` is that provider; a known API host is its provider
    (``api.together.xyz`` -> ``"together"``); a server on this machine or a private network is
    ``"local"``; any other host is its own name (genai-prices has no price there).
    """
    text = url.strip()
    parts = urlsplit(text if "//" in text else "//" + text)
    netloc = (parts.netloc or "").lower()
    hostname = (parts.hostname or netloc).lower()
    for key in (netloc, hostname):
        if key in _registered_hosts:
            return _registered_hosts[key], netloc
    for suffix, provider in _HOST_SUFFIXES:
        if hostname == suffix or hostname.endswith("." + suffix):
            return provider, netloc
    if _is_local(hostname):
        return LOCAL, netloc
    https = f"https://{netloc}{parts.path}"
    for genai_provider in _snapshot().providers:
        pattern = getattr(genai_provider, "api_pattern", None)
        if pattern and re.match(pattern, https):
            return genai_provider.id, netloc
    return hostname, netloc


def _base_url(obj: Any) -> str | None:
    """The base URL a chat model was pointed at (its field, else its SDK client's), if any."""
    for attr in _URL_ATTRS:
        value = _str(inspect.getattr_static(obj, attr, None))
        if value and (value.startswith(("http://", "https://")) or "." in value or ":" in value):
            return value
    for attr in ("root_client", "client"):
        client = inspect.getattr_static(obj, attr, None)
        url = getattr(client, "base_url", None) if client is not None and not isinstance(client, str) else None
        if url is not None and not isinstance(url, (int, float)):
            value = _str(str(url))
            if value and value.startswith(("http://", "https://")):
                return value
    return None


# --------------------------------------------------------------------------------------
# Which model serves the call?
# --------------------------------------------------------------------------------------


def _resolve(runnable: Any, kwargs: Mapping[str, Any] | None, config: Any) -> list[tuple[Any, dict[str, Any]]]:
    """The chat models a call on ``runnable`` may reach, each with the call kwargs it gets.

    Peels bindings (their kwargs and config), resolves configurable fields and alternatives
    with the run's ``configurable``, and ``init_chat_model``'s configurable model; a
    ``with_fallbacks`` gives its primary then each fallback.
    """
    from langchain_core.runnables import RunnableBinding
    from langchain_core.runnables.config import merge_configs
    from langchain_core.runnables.configurable import DynamicRunnable
    from langchain_core.runnables.fallbacks import RunnableWithFallbacks

    obj, kw, cfg = runnable, dict(kwargs or {}), config
    for _ in range(32):
        if isinstance(obj, RunnableBinding):
            kw = {**obj.kwargs, **kw}  # an outer bind and the call's own kwargs override an inner bind
            if obj.config:
                cfg = merge_configs(obj.config, cfg)
            obj = obj.bound
            continue
        if isinstance(obj, DynamicRunnable):
            try:
                obj, cfg = obj.prepare(cfg)
            except Exception:  # a configurable value the runnable rejects: the call fails too
                break
            continue
        if isinstance(obj, RunnableWithFallbacks):
            out: list[tuple[Any, dict[str, Any]]] = []
            for member in obj.runnables:
                out.extend(_resolve(member, kw, cfg))
            return out
        if type(obj).__name__ == "_ConfigurableModel" and callable(getattr(type(obj), "_model", None)):
            # langchain's init_chat_model(configurable_fields=...): the model it would build for this config.
            try:
                obj = obj._model(cfg)
            except Exception:
                break
            continue
        if getattr(type(obj), "_get_ls_params", None) is not None:
            break
        inner = _wrapped(obj)
        if inner is None:
            break
        obj = inner
    return [(obj, kw)]


def _wrapped(obj: Any) -> Any:
    """The runnable a wrapper of unknown type holds (``bound``, ``llm``, ``model``, ``runnable``), or
    None. getattr_static: never run a property or ``__getattr__`` of an object we don't know."""
    for attr in ("bound", "llm", "model", "runnable"):
        value = inspect.getattr_static(obj, attr, None)
        if value is not None and not isinstance(value, str) and hasattr(value, "invoke"):
            return value
    return None


def depends_on_config(runnable: Any) -> bool:
    """Whether the model a call on ``runnable`` reaches can depend on the run's ``configurable``
    (configurable fields or alternatives, ``init_chat_model``'s configurable model), anywhere down
    its bindings and fallbacks. When it cannot, what ``_resolve`` finds is the same for every config."""
    from langchain_core.runnables import RunnableBinding
    from langchain_core.runnables.configurable import DynamicRunnable
    from langchain_core.runnables.fallbacks import RunnableWithFallbacks

    obj = runnable
    for _ in range(32):
        if isinstance(obj, DynamicRunnable) or type(obj).__name__ == "_ConfigurableModel":
            return True
        if isinstance(obj, RunnableBinding):
            obj = obj.bound
            continue
        if isinstance(obj, RunnableWithFallbacks):
            return any(depends_on_config(member) for member in obj.runnables)
        if getattr(type(obj), "_get_ls_params", None) is not None:
            return False
        inner = _wrapped(obj)
        if inner is None:
            return False
        obj = inner
    return True  # too deep to tell: resolve per call


def _ref_of(obj: Any, kwargs: Mapping[str, Any]) -> ModelRef:
    params: Mapping[str, Any] = {}
    if getattr(type(obj), "_get_ls_params", None) is not None:
        for call_kwargs in (kwargs, {}):
            try:
                params = obj._get_ls_params(**call_kwargs) or {}
                break
            except Exception:  # a third-party model that chokes on bound kwargs
                continue
    extra, _ = extra_body_of(obj, kwargs)  # sent over the named parameters: its model is the one called
    name = (_str(extra.get("model")) if extra is not None else None) or _str(kwargs.get("model")) \
        or _str(kwargs.get("model_name")) or _str(params.get("ls_model_name"))
    if name is None:
        for attr in _MODEL_ATTRS:
            if name := _str(inspect.getattr_static(obj, attr, None)) or _str(_safe_getattr(obj, attr)):
                break
    class_names = [cls.__name__ for cls in type(obj).__mro__]
    provider = _provider_from(params.get("ls_provider"), class_names)
    url = _base_url(obj)
    if url is not None:
        url_provider, host = host_provider(url)
        # The vendor's own API host adds nothing: keep refs equal however the client was built.
        return ModelRef(name, url_provider, None if url_provider == provider else host)
    if class_names[0] in _LOCAL_CLASSES:
        return ModelRef(name, LOCAL)
    return ModelRef(name, provider)


def model_ref(runnable: Any, kwargs: Mapping[str, Any] | None = None, config: Any = None) -> ModelRef:
    """The model a call on ``runnable`` with these call ``kwargs`` and run ``config`` is sent to.

    Honours ``invoke(..., model=...)``/``model_name=``, ``bind(model=...)``, configurable fields
    and alternatives (chosen by ``config["configurable"]``) and ``init_chat_model``'s
    configurable model; for ``with_fallbacks`` it is the primary (see ``candidate_refs``).
    The name comes from LangChain (``_get_ls_params``), else the attributes ``model_name`` /
    ``model`` / ``model_id`` / ``deployment_name``; the provider is the host the client is
    pointed at (``base_url``), else LangChain's ``ls_provider``, else the class name.
    """
    obj, kw = _resolve(runnable, kwargs, config)[0]
    return _ref_of(obj, kw)


def candidate_refs(runnable: Any, kwargs: Mapping[str, Any] | None = None, config: Any = None) -> list[ModelRef]:
    """Every model that may serve the call, in the order tried (a ``with_fallbacks``: primary first)."""
    out: list[ModelRef] = []
    for obj, kw in _resolve(runnable, kwargs, config):
        ref = _ref_of(obj, kw)
        if ref not in out:
            out.append(ref)
    return out


def served_ref(ref: ModelRef, message: Any, candidates: Iterable[ModelRef] = ()) -> ModelRef:
    """The model that answered, as the reply reports it (``response_metadata`` model name).

    ``ref`` is the model the call was reserved for, ``candidates`` every model that could have
    served it (``candidate_refs``: an inner ``with_fallbacks``). The reply's name picks the
    candidate it names (exactly, or as a dated form of it: ``gpt-4o-2024-08-06`` is ``gpt-4o``)
    and its host; a name no candidate has is priced at ``ref``'s host. A reply can say which
    model served, never move the call to a host it was not sent to. ``ref`` itself when the
    reply names no model or the same one.
    """
    meta = message if isinstance(message, Mapping) else getattr(message, "response_metadata", None)
    if type(meta) is dict and ref.name:  # the usual reply: it names the model it was sent to
        named = meta.get("model_name")
        if type(named) is str and named.strip().lower() == ref.name.lower():
            return ref
    reported = model_ref_from_response(meta)
    if reported is None or not reported.name:
        return ref
    name = reported.name.lower()
    if ref.name and name == ref.name.lower():
        return ref
    pool = [ref, *(c for c in candidates if c != ref)]
    for candidate in pool:
        if candidate.name and candidate.name.lower() == name:
            return candidate
    forms = _name_candidates(reported.name)
    for candidate in pool:
        if candidate.name and _base_name(candidate.name) in forms:
            return ModelRef(reported.name, candidate.provider, candidate.host)
    return ModelRef(reported.name, ref.provider, ref.host)


def _base_name(name: str) -> str:
    base = _name_candidates(name)[-1]
    return base[: -len("-latest")] if base.endswith("-latest") else base


_STANDARD_TIERS = frozenset({"default", "standard", "auto", "on_demand"})
_CHEAPER_TIERS = frozenset({"flex", "batch"})


def _context_value(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip().lower()
    return None if value in _STANDARD_TIERS else value


def call_price_context(runnable: Any, kwargs: Mapping[str, Any] | None = None, config: Any = None) -> dict[str, str]:
    """The priced variant a call asks for: ``{"service_tier": ..., "speed": ...}`` (only those set).

    Read from the request's ``extra_body``, the call kwargs, the binding, ``model_kwargs`` and the
    model's own fields (ChatOpenAI ``service_tier="priority"``, ChatAnthropic ``speed="fast"``). A
    standard tier (``default``, ``auto``, ``standard``) is left out. Reserve with ``card.variant(**context)``.
    """
    obj, kw = _resolve(runnable, kwargs, config)[0]
    model_kwargs = inspect.getattr_static(obj, "model_kwargs", None)
    model_kwargs = model_kwargs if isinstance(model_kwargs, Mapping) else {}
    extra = extra_body_of(obj, kw)[0] or {}  # sent over the named parameters
    out: dict[str, str] = {}
    for key in ("service_tier", "speed"):
        for source in (extra, kw, model_kwargs):
            if key in source:
                value = _context_value(source[key])
                break
        else:
            value = _context_value(inspect.getattr_static(obj, key, None))
        if value:
            out[key] = value
    return out


@dataclass(frozen=True)
class ItemBound:
    """What a call may bill besides tokens, bounded before it runs.

    ``web_searches``: the most server-side web searches it can make (a tool's ``max_uses``, or
    ``default_uses`` per search tool without one); ``file_searches``: the same for OpenAI's
    ``file_search`` tool (billed per call); ``containers``: one per OpenAI ``code_interpreter``
    tool (billed per container); ``generated_images``: ``default_uses`` per ``image_generation``
    tool. ``max_calls``: OpenAI's ``max_tool_calls``, which caps all of them together (None: no
    cap); under it each tool it caps counts ``max_calls`` uses. ``unbounded`` names the tools whose
    use the tool itself does not cap (no ``max_uses``). ``send_max_calls``: the ``max_tool_calls``
    the guard sends with the call (the call sets none, and langchain-openai sends it to the
    Responses API), equal to ``max_calls``. ``uncapped``: OpenAI built-in tools nothing caps (the
    integration takes no ``max_tool_calls``, or an ``extra_body`` voids it): no count holds them.
    """

    web_searches: int = 0
    unbounded: tuple[str, ...] = ()
    file_searches: int = 0
    containers: int = 0
    generated_images: int = 0
    max_calls: int | None = None
    send_max_calls: int | None = None
    uncapped: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.web_searches or self.file_searches or self.containers or self.generated_images
                    or self.uncapped)

    def hold_nano(self, card: RateCard) -> int:
        """What these items can cost on ``card`` (``card.item_hold_nano`` of them), 0 when there are none."""
        if not self:
            return 0
        return card.item_hold_nano(web_searches=self.web_searches, file_searches=self.file_searches,
                                   containers=self.containers, generated_images=self.generated_images,
                                   max_calls=self.max_calls)

    def uncapped_error(self) -> UnknownModelPriceError:
        """Why a strict guard refuses a call with ``uncapped`` tools: nothing bounds what they bill."""
        names = ", ".join(dict.fromkeys(self.uncapped))
        return UnknownModelPriceError(
            f"The call binds OpenAI's {names} tool and nothing caps how many times it runs: the request "
            "carries no max_tool_calls the provider honours (only langchain-openai's models on the "
            "Responses API send one, and an extra_body max_tool_calls of null voids it), and OpenAI "
            "documents no most. No hold can bound what it bills, so the call is refused before it is sent. "
            "Set max_tool_calls (a whole number) with the call, or call the tool through langchain-openai's "
            "ChatOpenAI on the Responses API (the guard then sends max_tool_calls itself)."
        )


_NO_ITEMS = ItemBound()
_WEB_SEARCH_TYPES = re.compile(r"^(?:web_search(?:_preview)?(?:_\d{4}_\d{2}_\d{2})?|web_search_\d{8})$")
# OpenAI's own search tools (web_search, web_search_preview, dated forms): not Anthropic's web_search_YYYYMMDD
_OPENAI_SEARCH_TYPES = re.compile(r"^web_search(?:_preview)?(?:_\d{4}_\d{2}_\d{2})?$")
# Gemini grounding tools billed per grounded prompt (Google Maps' is read from the reply as a search too)
_GEMINI_SEARCH_KEYS = ("google_search", "google_search_retrieval", "googleSearch", "googleSearchRetrieval",
                       "google_maps", "googleMaps")


def item_bound(
    runnable: Any, kwargs: Mapping[str, Any] | None = None, config: Any = None, *, default_uses: int = 10
) -> ItemBound:
    """How many billed server-tool requests a call can make, from the tools bound to it (the
    request's ``extra_body``, else the call's kwargs and bindings, else the model's ``model_kwargs``).

    Anthropic ``{"type": "web_search_20250305", "max_uses": 5}`` counts 5; an Anthropic search
    tool without ``max_uses`` and Gemini ``google_search`` (which the requests cannot cap) count
    ``default_uses`` each and are listed in ``unbounded``. OpenAI ``{"type": "code_interpreter"}``
    counts one container. OpenAI ``{"type": "web_search"}``, ``{"type": "file_search"}`` and
    ``{"type": "image_generation"}`` are capped together by the call's ``max_tool_calls`` (its
    ``extra_body``'s first, which the SDK sends over the named parameters): each counts that many
    uses. A langchain-openai call on the Responses API that sets none is sent
    ``max_tool_calls=default_uses`` by the guard (``send_max_calls``). Where none can be sent (another
    integration, an ``extra_body`` ``max_tool_calls`` of null) they count ``default_uses`` each and are listed in
    ``uncapped``: nothing bounds them (a strict guard refuses the call). Reserve
    ``bound.hold_nano(card)`` on top of the token hold.
    """
    if isinstance(default_uses, bool) or not isinstance(default_uses, int) or default_uses < 0:
        raise ValueError(f"item_bound: default_uses must be a whole number >= 0, got {default_uses!r}")
    resolved = _resolve(runnable, kwargs, config)
    obj, kw = resolved[0]
    extra = extra_body_of(obj, kw)[0]  # sent over the named parameters: its tools replace theirs
    tools = extra["tools"] if extra and isinstance(extra.get("tools"), (list, tuple)) else kw.get("tools")
    if not tools:  # tools in model_kwargs are sent in the request too (under the call's and bindings')
        model_kwargs = _safe_getattr(obj, "model_kwargs")
        tools = model_kwargs.get("tools") if isinstance(model_kwargs, Mapping) else None
    if not tools:  # the usual call: no tools (an early exit, on the hot path)
        return _NO_ITEMS
    searches, files, containers, images, unbounded, openai = 0, 0, 0, 0, [], []
    for tool in tools if isinstance(tools, (list, tuple)) else ():
        if not isinstance(tool, Mapping):
            continue
        kind = tool.get("type")
        if kind == "file_search":
            files += default_uses
            unbounded.append(kind)
            openai.append(kind)
        elif kind == "code_interpreter":
            containers += 1  # one container per call, made for it or named by the tool
        elif kind == "image_generation":
            images += default_uses
            unbounded.append(kind)
            openai.append(kind)
        elif isinstance(kind, str) and _WEB_SEARCH_TYPES.match(kind):
            uses = tool.get("max_uses")
            if type(uses) is int and uses >= 0:
                searches += uses
            else:
                searches += default_uses
                unbounded.append(kind)
                if _OPENAI_SEARCH_TYPES.match(kind):
                    openai.append(kind)
        elif any(key in tool for key in _GEMINI_SEARCH_KEYS):
            searches += default_uses
            unbounded.append(next(key for key in _GEMINI_SEARCH_KEYS if key in tool))
    if not (searches or files or containers or images or openai):
        return _NO_ITEMS
    cap, sendable = _max_tool_calls(obj, kw, extra)
    if sendable and len(resolved) > 1:  # a with_fallbacks: every model it may call must take the cap
        sendable = all(_max_tool_calls(o, k, extra_body_of(o, k)[0])[1] for o, k in resolved[1:])
    send = None
    if cap is None and sendable and openai:
        cap = send = default_uses  # the guard sends the cap it holds for
    if cap is not None:  # OpenAI honours it: each tool it caps may be used up to it
        searches = cap if searches else 0
        files = cap if files else 0
        images = cap if images else 0
        openai = []
    return ItemBound(searches, tuple(unbounded), files, containers, images, cap, send, tuple(openai))


def _max_tool_calls(obj: Any, kw: Mapping[str, Any], extra: Mapping[str, Any] | None) -> tuple[int | None, bool]:
    """OpenAI Responses ``max_tool_calls`` (the request's ``extra_body``, which the SDK sends over the
    named parameters, then call kwargs and bindings, then ``model_kwargs``), None when unset; and
    whether the guard can send one of its own (langchain-openai on the Responses API, and no
    ``extra_body`` entry that would replace it).

    Read for langchain-openai's models only: another client may drop a parameter it does not know,
    and its provider would not honour the cap the hold counted on."""
    if not type(obj).__module__.startswith("langchain_openai."):
        return None, False
    if extra and "max_tool_calls" in extra:  # what the request runs with, whatever the kwargs say
        value = extra["max_tool_calls"]  # null or a value the API refuses: no cap, and none can be added
        return (value, False) if type(value) is int and value >= 0 else (None, False)
    model_kwargs = _safe_getattr(obj, "model_kwargs")
    model_kwargs = model_kwargs if isinstance(model_kwargs, Mapping) else {}
    for source in (kw, model_kwargs):
        value = source.get("max_tool_calls")
        if type(value) is int and value >= 0:
            return value, False
    uses_responses = getattr(obj, "_use_responses_api", None)
    try:
        sendable = bool(callable(uses_responses) and uses_responses({**model_kwargs, **kw}))
    except Exception:  # a model whose routing we cannot read: send nothing it may refuse
        sendable = False
    return None, sendable


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
    provider = _provider_from(metadata.get("ls_provider"), [c for c in class_names if isinstance(c, str)])
    for attr in _URL_ATTRS:  # the serialized constructor keeps a base_url the client was given
        url = _str(ctor.get(attr)) if isinstance(ctor, Mapping) else None
        if url and url.startswith(("http://", "https://")):
            url_provider, host = host_provider(url)
            return ModelRef(name, url_provider, None if url_provider == provider else host)
    return ModelRef(name, provider)


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

_PRICE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning", "web_search", "file_search")


def _dollars_per_mtok(value: Any, key: str, what: str) -> Decimal:
    try:
        return to_decimal(value, what=what)
    except (TypeError, ValueError):
        if _is_negative(value):
            raise ValueError(f"{what}: {key!r} must not be negative, got {value!r}") from None
        raise ValueError(f"{what}: {key!r} must be a number of dollars per million tokens, got {value!r}") from None


def _is_zero(value: Any) -> bool:
    try:
        return Decimal(str(value).strip()) == 0
    except ArithmeticError:
        return False


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
    web_search: Decimal | None = None
    """USD per 1,000 server-side web searches; None: web searches are not priced (a reply billing one is refused)."""
    file_search: Decimal | None = None
    """USD per 1,000 file-store searches (OpenAI ``file_search``); None: not priced (a reply billing one is refused)."""

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
        if not isinstance(value, bool) and isinstance(value, (int, str, Decimal)) and _is_zero(value):
            return cls(input=Decimal(0), output=Decimal(0), web_search=Decimal(0),  # explicitly free
                       file_search=Decimal(0))
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
    ("input_image_tokens", "input_image_tokens", ("input_tokens",)),
    ("output_image_tokens", "output_image_tokens", ("output_tokens",)),
    ("input_video_tokens", "input_video_tokens", ("input_tokens",)),
    ("web_searches", "web_searches", ()),
    ("file_searches", "storage_searches", ()),
    ("containers", None, ()),  # tool fees genai-prices does not list: priced by Pricer(tool_fees=...)
    ("generated_images", None, ()),
)
# Billed items that are not tokens: genai-prices prices them apart or not at all (then a reply that
# bills one cannot be priced), never as some share of the tokens.
_ITEM_FIELDS = ("web_searches", "file_searches", "containers", "generated_images")
_ITEM_PRICE_KEYS = {"web_searches": "web_searches_kcount", "file_searches": "storage_searches_kcount"}
_ITEM_NAMES = {"web_searches": ("web searches", "web_search"), "file_searches": ("file searches", "file_search"),
               "containers": ("code containers", "code_interpreter"),
               "generated_images": ("generated images", "image_generation")}
TOOL_FEES = {"code_interpreter": "containers", "image_generation": "generated_images"}
"""The server tools whose fee ``Pricer(tool_fees=...)`` takes (USD per use), and the ``TokenUsage``
field each is billed by: OpenAI's ``code_interpreter`` per container, ``image_generation`` per image."""
_FIELD_NAMES = tuple(f for f, _, _ in _FIELDS)
_DETAIL_FIELDS = _FIELD_NAMES[2:]
# Output a model may bill above its text rate (audio, images; reasoning where priced apart).
_OUTPUT_DETAILS = ("reasoning_tokens", "output_audio_tokens", "output_image_tokens")
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
    web_search: int
    details: tuple[tuple[str, int], ...]  # the other fields with a non-zero coefficient


class RateCard:
    """A model's prices, resolved once; ``cost`` is a few integer multiplications.

    Built by ``Pricer.rate_card`` or ``RateCard.from_price``; the constructor compiles any
    ``price_of(counts)`` (counts: a mapping of ``TokenUsage`` field -> tokens) that is affine
    within each input-token tier, as genai-prices' prices are. ``prices`` shows what a token of each kind costs, in USD per
    million tokens (first tier, for display); ``tiers`` lists the input sizes above which a
    dearer tier applies; ``valid_until`` is set when the price is scheduled to change (an
    off-peak window, a new price date), after which ``Pricer.rate_card`` resolves it again.
    ``context_window``: the most tokens the model reads (genai-prices' figure), or None when unknown.
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
        priced_items: Iterable[str] | None = None,
        variants: Callable[[Mapping[str, str]], RateCard | None] | None = None,
        context_window: int | None = None,
        tool_fees: Mapping[str, Decimal] | None = None,
    ) -> None:
        fees = {TOOL_FEES[tool]: Decimal(fee) for tool, fee in (tool_fees or {}).items()}
        if fees:  # per-use fees of server tools, on top of the model's own price
            token_price = price_of

            def price_of(counts: Mapping[str, int]) -> Decimal:
                return token_price(counts) + sum(fee * counts[f] for f, fee in fees.items())

        self.model = model
        self.context_window = context_window if isinstance(context_window, int) and context_window > 0 else None
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
            "input_image": first["input_tokens"] + first["input_image_tokens"],
            "output_image": first["output_tokens"] + first["output_image_tokens"],
            "input_video": first["input_tokens"] + first["input_video_tokens"],
        }
        self.prices: dict[str, Decimal] = {k: _plain(v * _MTOK) for k, v in effective.items()}
        if first["web_searches"]:
            self.prices["web_search_per_1k"] = _plain(first["web_searches"] * 1000)
        if first["file_searches"]:
            self.prices["file_search_per_1k"] = _plain(first["file_searches"] * 1000)
        for tool, field in TOOL_FEES.items():
            if field in fees:
                self.prices[f"{tool}_each"] = _plain(first[field])
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
                web_search=_mantissa(seg["web_searches"], self._exp),
                details=tuple(
                    (f, _mantissa(seg[f], self._exp))
                    for f in _DETAIL_FIELDS
                    if f not in ("cache_write_tokens", "web_searches") and seg[f]
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
        self._in_extra = tuple(f for f in ("input_image_tokens", "input_video_tokens") if f in nonzero)
        self._out_extra = ("output_image_tokens",) if "output_image_tokens" in nonzero else ()
        priced = (set(priced_items) if priced_items is not None else nonzero) | set(fees)
        self._unpriced = tuple(f for f in _ITEM_FIELDS if f not in priced)
        self._web_unpriced = "web_searches" in self._unpriced
        self._detail_unpriced = tuple(f for f in self._unpriced if f != "web_searches")  # priced ones: in details
        # What one billed item costs at its dearest tier (held before the call, whatever its size).
        self._item_rate = {
            "web_searches": max(seg.web_search for seg in self._segments),
            **{f: max(dict(seg.details).get(f, 0) for seg in self._segments) for f in _ITEM_FIELDS[1:]},
        }
        self._variants_of = variants
        self._variants: dict[tuple[str | None, str | None], RateCard] = {}
        self._nano_shift = self._exp + 9  # scaled units -> nano-USD: multiply by 10**shift
        # Per segment, what a prompt token costs when the whole prompt is written to a 1-hour cache
        # (input + cache write + 1h-write coefficients): the dearest way a prompt can be billed.
        self._cache_write_input = tuple(
            seg.input + seg.cache_write + dict(seg.details).get("cache_write_1h_tokens", 0) for seg in self._segments
        )
        # Per segment, what an output token costs above the text rate at the dearest kind the model
        # bills (gpt-audio's audio 6.4x, gemini-2.5-flash-image's images 12x): nothing before the
        # reply says which kind it will be.
        self._dearest_output_extra = tuple(
            max([0, *(m for f, m in seg.details if f in _OUTPUT_DETAILS)]) for seg in self._segments
        )

    @classmethod
    def from_price(
        cls, price: ModelPrice, *, model: str, provider: str | None = None, source: str = "override",
        tool_fees: Mapping[str, Decimal] | None = None,
    ) -> RateCard:
        """A card for a price you set, with the same semantics as genai-prices' own prices."""
        from genai_prices.types import ModelPrice as GenaiModelPrice

        genai_price = GenaiModelPrice(
            input_mtok=price.input,
            output_mtok=price.output,
            cache_read_mtok=price.cache_read,
            cache_write_mtok=price.cache_write,
            output_reasoning_mtok=price.reasoning,
            web_searches_kcount=price.web_search,
            storage_searches_kcount=price.file_search,
        )
        priced = [f for f, key in (("web_searches", price.web_search), ("file_searches", price.file_search))
                  if key is not None]
        return cls(_genai_price_fn(genai_price), model=model, provider=provider, source=source, priced_items=priced,
                   tool_fees=tool_fees)

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
        if self._in_extra:  # image / video input priced apart (rare: no loop for the others)
            for field in self._in_extra:
                floor += getattr(usage, field)
        if floor > inp:
            inp = floor
        floor = (usage.reasoning_tokens if self._out_reasoning else 0) + (
            usage.output_audio_tokens if self._out_audio else 0
        )
        if self._out_extra:
            floor += usage.output_image_tokens
        if floor > out:
            out = floor
        segments = self._segments
        seg = segments[bisect_left(self.tiers, inp)] if len(segments) > 1 else segments[0]
        total = seg.const + seg.input * inp + seg.output * out + seg.cache_write * cw
        for field, m in seg.details:
            total += m * getattr(usage, field)
        searches = usage.web_searches
        if searches:
            if self._web_unpriced:
                raise self._unpriced_error("web_searches", searches)
            total += seg.web_search * searches
        if (usage.file_searches or usage.containers or usage.generated_images) and self._detail_unpriced:
            for field in self._detail_unpriced:
                if getattr(usage, field):
                    raise self._unpriced_error(field, getattr(usage, field))
        return total if total > 0 else 0

    def _nano(self, scaled: int) -> int:
        if scaled <= 0:
            return 0
        shift = self._nano_shift
        return scaled * 10**shift if shift >= 0 else -(-scaled // 10**-shift)

    def hold_nano(self, input_tokens: int, output_tokens: int, *, dearer_cache_write: bool = False,
                  dearest_output: bool = False) -> tuple[int, int]:
        """What a pre-call estimate holds, in whole nano-USD rounded up: ``(reserve, input_cost)``.

        ``reserve`` is ``cost_nano(TokenUsage(input_tokens=..., output_tokens=...))`` and ``input_cost``
        is ``cost_nano(TokenUsage(input_tokens=...))``. With ``dearer_cache_write``, both grow by what
        billing the whole prompt as 1-hour cache writes would add, when that is dearer. With
        ``dearest_output``, every output token is held at the dearest output rate the model bills
        (audio or image output, for a model that produces them). The same integers as those
        ``cost_nano`` calls, without building the usages (this runs on every call).
        """
        index = bisect_left(self.tiers, input_tokens) if len(self._segments) > 1 else 0
        seg = self._segments[index]
        base = seg.const + seg.input * input_tokens
        input_cost = self._nano(base)
        rate = seg.output + self._dearest_output_extra[index] if dearest_output else seg.output
        reserve = self._nano(base + rate * output_tokens)
        if dearer_cache_write:
            extra = self._nano(seg.const + self._cache_write_input[index] * input_tokens) - input_cost
            if extra > 0:
                reserve += extra
                input_cost += extra
        return reserve, input_cost

    def cost(self, usage: TokenUsage) -> Decimal:
        """Exact cost of ``usage`` in USD (at the variant its ``service_tier`` / ``speed`` names)."""
        card = self if usage.service_tier is None and usage.speed is None else self.variant(
            service_tier=usage.service_tier, speed=usage.speed
        )
        scaled, exp = card._scaled(usage), card._exp
        if not scaled:
            return Decimal(0)
        while exp < 0 and scaled % 10 == 0:
            scaled //= 10
            exp += 1
        return Decimal(f"{scaled}E{exp}")

    def cost_nano(self, usage: TokenUsage) -> int:
        """Cost in whole nano-USD, rounded up (``money.ceil_nano(self.cost(usage))``).

        Raises ``UnknownModelPriceError`` when ``usage`` bills an item (a web search, a service
        tier) this price does not cover: such a call is never priced as if the item were free.
        """
        if usage.service_tier is None and usage.speed is None:
            scaled, shift = self._scaled(usage), self._nano_shift
        else:
            card = self.variant(service_tier=usage.service_tier, speed=usage.speed)
            scaled, shift = card._scaled(usage), card._nano_shift
        if shift >= 0:
            return scaled * 10**shift
        return -(-scaled // 10**-shift)

    def priced_part_nano(self, usage: TokenUsage) -> int:
        """What the part of ``usage`` this card can price costs, in nano-USD rounded up: billed items it
        has no price for left out, a tier it has no price for at the standard rate. The least a call
        that billed ``usage`` can cost (``cost_nano`` raises for such a usage instead)."""
        if self._unpriced:
            usage = replace(usage, **dict.fromkeys(self._unpriced, 0))
        try:
            return self.cost_nano(usage)
        except UnknownModelPriceError:
            return self.cost_nano(replace(usage, service_tier=None, speed=None))

    def variant(self, service_tier: str | None = None, speed: str | None = None) -> RateCard:
        """This model's card at a service tier (``"priority"``, ``"flex"``) and/or speed (``"fast"``).

        The standard tier (``None``, ``"default"``, ``"standard"``, ``"auto"``) is this card. A
        cheaper tier genai-prices has no price for (``"flex"``, ``"batch"``) is priced at the
        standard rate (never less); any other tier it has no price for raises
        ``UnknownModelPriceError``, as an unknown model does.
        """
        tier, fast = _context_value(service_tier), _context_value(speed)
        if tier is None and fast is None:
            return self
        key = (tier, fast)
        card = self._variants.get(key)
        if card is not None:
            return card
        context = {k: v for k, v in (("service_tier", tier), ("speed", fast)) if v is not None}
        card = self._variants_of(context) if self._variants_of is not None else None
        if card is None:
            if all(v in _CHEAPER_TIERS for v in context.values()):
                card = self
            else:
                shown = ", ".join(f"{k}={v!r}" for k, v in context.items())
                err = UnknownModelPriceError(
                    f"No price is known for {self.model!r} ({self.provider or 'any provider'}) at {shown}: "
                    f"genai-prices has none, and the guard will not charge it at the standard rate. Add the "
                    f"price as an override for this model (prices={{...}}) or avoid {shown} for it."
                )
                err.model, err.provider = self.model, self.provider  # type: ignore[attr-defined]
                raise err
        self._variants[key] = card
        return card

    def item_hold_nano(self, *, web_searches: int = 0, file_searches: int = 0, containers: int = 0,
                       generated_images: int = 0, max_calls: int | None = None) -> int:
        """What ``web_searches`` server-side web searches, ``file_searches`` file-store searches,
        ``containers`` code containers and ``generated_images`` tool-made images can cost, in nano-USD
        rounded up (for a hold). ``max_calls`` caps them together (OpenAI ``max_tool_calls``): the
        dearest items are held first.

        Raises ``UnknownModelPriceError`` when items are asked for but this price has none.
        """
        counts = []
        for field, count in (("web_searches", web_searches), ("file_searches", file_searches),
                             ("containers", containers), ("generated_images", generated_images)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"item_hold_nano: {field} must be a whole number >= 0, got {count!r}")
            if not count:
                continue
            if field in self._unpriced:
                raise self._unpriced_error(field, count)
            counts.append((self._item_rate[field], count))
        if max_calls is not None:
            if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 0:
                raise ValueError(f"item_hold_nano: max_calls must be None or a whole number >= 0, got {max_calls!r}")
            left, capped = max_calls, []
            for rate, count in sorted(counts, reverse=True):
                capped.append((rate, min(count, left)))
                left -= capped[-1][1]
            counts = capped
        return self._nano(sum(rate * count for rate, count in counts))

    def _unpriced_error(self, field: str, count: int) -> UnknownModelPriceError:
        what, key = _ITEM_NAMES.get(field, (field, field))
        if key in TOOL_FEES:
            fix = (f"Add the fee you are billed per use, e.g. tool_fees={{\"{key}\": \"0.03\"}} (USD each; "
                   "0 if it is billed elsewhere), or do not bind the tool.")
        else:
            fix = (f'Add a price for them, e.g. prices={{"{self.model}": {{"input": ..., "output": ..., '
                   f'"{key}": "10"}}}} (USD per 1,000), or do not bind the tool for this model.')
        err = UnknownModelPriceError(
            f"The call bills {count} {what}, and no price is known for {what} on {self.model!r} "
            f"({self.provider or 'any provider'}; priced by {self.source}{' as ' + self.priced_as if self.priced_as else ''}): "
            f"the guard will not count them as $0. {fix}"
        )
        err.model, err.provider = self.model, self.provider  # type: ignore[attr-defined]
        return err

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


# Clouds that resell a vendor's models at the vendor's list price: when genai-prices has no entry
# for the model at the cloud, the vendor's entry prices it (and the card says so in priced_as).
_RESELLERS: dict[str, tuple[str, ...]] = {"aws": ("anthropic",), "google": ("anthropic",), "azure": ("openai",)}


def _token_priced(model: Any, now: datetime) -> Any:
    price = model.get_prices(now)
    # Priced only per character, image, ...: no token price means we cannot price a chat call.
    return None if price.input_mtok is None and price.output_mtok is None else price


def _find_genai_model(name: str, provider: str | None, now: datetime) -> tuple[Any, Any, Any, Any] | None:
    """(genai provider, model info, its price now, the provider whose entry it is), or None.

    Only ``provider``'s own entries count (and, for a cloud reselling a vendor, the vendor's):
    never another host's. With no provider at all genai-prices picks the provider by model name.
    """
    snapshot = _snapshot()
    candidates = _name_candidates(name)
    if provider is None:
        for candidate in candidates:
            try:
                genai_provider, model = snapshot.find_provider_model(candidate, None, None, None)
            except LookupError:
                continue
            price = _token_priced(model, now)
            if price is not None:
                return genai_provider, model, price, genai_provider
        return None
    try:
        genai_provider = snapshot.find_provider(None, provider, None)
    except LookupError:
        return None  # a host genai-prices does not know: nothing there is priced
    for entry_provider in (genai_provider, *_resellers(snapshot, genai_provider.id)):
        for candidate in candidates:
            # No all_providers: genai-prices' own fallbacks (e.g. Azure -> DeepSeek) are not ours to take.
            model = entry_provider.find_model(candidate)
            if model is None:
                continue
            price = _token_priced(model, now)
            if price is not None:
                return genai_provider, model, price, entry_provider
    return None


def _resellers(snapshot: Any, provider_id: str) -> list[Any]:
    out = []
    for vendor in _RESELLERS.get(provider_id, ()):
        try:
            out.append(snapshot.find_provider(None, vendor, None))
        except LookupError:
            continue
    return out


def _genai_price_fn(model_price: Any) -> PriceFn:
    from genai_prices import Usage

    def price_of(counts: Mapping[str, int]) -> Decimal:
        usage = Usage(**{key: counts[field] for field, key, _ in _FIELDS if key})
        return model_price.calc_price(usage)["total_price"]

    return price_of


def _genai_card(model_info: Any, model_price: Any, now: datetime, *, model: str, provider: str | None,
                entry_provider: Any, context: Mapping[str, str] | None = None,
                tool_fees: Mapping[str, Decimal] | None = None) -> RateCard:
    """A card for genai-prices' price of ``model_info`` (at a price variant when ``context`` is set)."""
    priced_as = f"{entry_provider.id}/{model_info.id}"
    if context:
        priced_as += " (" + ", ".join(f"{k}={v}" for k, v in context.items()) + ")"

    def variants(ctx: Mapping[str, str]) -> RateCard | None:
        if not _has_variant(model_info, ctx, _now()):
            return None
        at = _now()
        return _genai_card(model_info, model_info.get_prices(at, dict(ctx)), at, model=model, provider=provider,
                           entry_provider=entry_provider, context=ctx, tool_fees=tool_fees)

    return RateCard(
        _genai_price_fn(model_price),
        model=model,
        provider=provider,
        source="genai-prices",
        tiers=_tier_starts(model_price),
        priced_as=priced_as,
        valid_until=_next_price_change(model_info, now),
        priced_items=[f for f, key in _ITEM_PRICE_KEYS.items() if getattr(model_price, key, None) is not None],
        variants=None if context else variants,
        context_window=model_info.context_window,
        tool_fees=tool_fees,
    )


def _has_variant(model_info: Any, context: Mapping[str, str], now: datetime) -> bool:
    """Whether genai-prices prices ``model_info`` apart for every key of ``context`` (service_tier, speed)."""
    matched: set[str] = set()
    for variant in model_info.price_variants or ():
        if variant.constraint is not None and not variant.constraint.active(now):
            continue
        when = variant.when
        if when and all(context.get(k) == v for k, v in when.items()):
            matched.update(when)
    return all(k in matched for k in context)


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

    constraints = [c.constraint for c in model_info.prices] if isinstance(model_info.prices, list) else []
    constraints += [v.constraint for v in model_info.price_variants or ()]
    changes: list[datetime] = []
    for constraint in constraints:
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
    elif ref.provider == LOCAL:
        what = (
            f"No price is known for model {ref.name!r} on the local server {ref.host or ''}".rstrip()
            + ": a local server is priced only as you price it (its calls may be free: say so with "
            f'prices={{"{ref.name}": 0}})'
        )
        example = ref.name
    else:
        at = f" at {ref.provider!r}" if ref.provider else ""
        host = f" (host {ref.host})" if ref.host else ""
        what = (
            f"No price is known for model {ref.name!r}{at}{host}: genai-prices has no entry for it there, "
            "and another host's price is not this one's"
        )
        if ref.host and ref.provider == ref.host.rsplit(":", 1)[0]:  # a host genai-prices does not know
            what += (
                f" (if {ref.host} forwards to a vendor at its list price, declare it: "
                f'price_host_as("{ref.host}", "openai"))'
            )
        example = ref.name
    return (
        f"{what}, and the guard will not count it as $0. Add its price in USD per million tokens, "
        f'e.g. BudgetGuard(..., prices={{"{example}": {{"input": "0.50", "output": "1.50"}}}}) '
        '(optionally also "cache_read", "cache_write", "reasoning"), or set a price for every model '
        'without one: BudgetGuard(..., fallback_price={"input": ..., "output": ...}).'
    )


def check_tool_fees(tool_fees: Mapping[str, Any] | None) -> dict[str, Decimal]:
    """``{"code_interpreter": "0.03"}`` -> ``{"code_interpreter": Decimal("0.03")}``, or a ``ValueError``
    that says which tool or amount is wrong."""
    if tool_fees is None:
        return {}
    if not isinstance(tool_fees, Mapping):
        raise ValueError(f'tool_fees: expected a mapping like {{"code_interpreter": "0.03"}} (USD per use), '
                         f"got {tool_fees!r}")
    out: dict[str, Decimal] = {}
    for tool, fee in tool_fees.items():
        if tool not in TOOL_FEES:
            raise ValueError(f"tool_fees: unknown tool {tool!r}; the tools priced per use are "
                             f"{', '.join(map(repr, TOOL_FEES))} (genai-prices prices the others)")
        try:
            out[tool] = to_decimal(fee, what=f"tool_fees[{tool!r}]")
        except (TypeError, ValueError):
            raise ValueError(f"tool_fees[{tool!r}]: expected an amount of USD per use >= 0, such as \"0.03\", "
                             f"got {fee!r}") from None
    return out


_MAX_CARDS = 4096  # rate cards a Pricer keeps (one per provider and model name asked about)


class Pricer:
    """Resolves a ``ModelRef`` to a ``RateCard``: override, then genai-prices, then fallback.

    ``overrides`` maps a model name (case-insensitive, exact) or ``"provider:model"`` to a
    ``ModelPrice`` or a mapping like ``{"input": "0.5", "output": "1.5", "cache_read": "0.05"}``
    in USD per million tokens (``0`` prices a model as free, e.g. a local server's). ``fallback``
    prices any model nothing else prices. ``hosts`` maps a host (``"gateway.corp"``,
    ``"127.0.0.1:8080"``) to the provider it bills as (see ``price_host_as``). Cards are cached
    per (provider, model); the cache is safe to share between threads.

    A model is priced at its host only: a model genai-prices does not list at that host is
    unknown (``UnknownModelPriceError``, or ``fallback``), never another host's entry. The one
    exception is a cloud reselling a vendor at list price (Bedrock or Vertex AI serving an
    Anthropic model, Azure serving an OpenAI model) when genai-prices has no entry at the cloud:
    the vendor's entry prices it, and ``card.priced_as`` names that entry.

    ``tool_fees`` prices server tools genai-prices has no price for, in USD per use, on every
    model: ``{"code_interpreter": "0.03"}`` per code container a reply ran in, ``{"image_generation":
    "0.17"}`` per image the tool made (give the dearest size and quality you ask for). Without one,
    a call that binds such a tool is refused and a reply that bills it is charged its whole hold:
    never $0. ``0`` says the fee is billed elsewhere.
    """

    def __init__(
        self, overrides: Mapping[str, Any] | None = None, fallback: Any = None, hosts: Mapping[str, str] | None = None,
        tool_fees: Mapping[str, Any] | None = None,
    ) -> None:
        if hosts is not None and not isinstance(hosts, Mapping):
            raise ValueError(f"hosts: expected a mapping of host -> provider, got {hosts!r}")
        self._hosts: dict[str, str] = {}
        for host, provider in (hosts or {}).items():
            if not isinstance(host, str) or not host.strip() or not isinstance(provider, str) or not provider.strip():
                raise ValueError(f"hosts: expected host -> provider strings, got {host!r}: {provider!r}")
            self._hosts[_host_key(host)] = canonical_provider(provider) or provider
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ValueError(f"prices: expected a mapping of model name -> price, got {overrides!r}")
        self._overrides: dict[str, ModelPrice] = {}
        for key, value in (overrides or {}).items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"prices: model names must be non-empty strings, got {key!r}")
            self._overrides[self._override_key(key)] = ModelPrice.coerce(value, what=f"price override {key!r}")
        self._fallback = None if fallback is None else ModelPrice.coerce(fallback, what="fallback price")
        self.tool_fees = check_tool_fees(tool_fees)
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
        ref_host = getattr(ref, "host", None)  # duck-typed refs (name, provider) are fine too
        if self._hosts and ref_host:
            host = ref_host.lower()
            provider = self._hosts.get(host) or self._hosts.get(host.rsplit(":", 1)[0]) or provider
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
                    if len(self._cards) >= _MAX_CARDS:  # names can come from callers: keep the newer half
                        self._cards = dict(list(self._cards.items())[_MAX_CARDS // 2:])
                    card = self._cards[key] = self._resolve(ModelRef(ref.name, provider, ref_host))
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

    def settle_card(
        self, served: ModelRef, candidates: Iterable[ModelRef] = (), usage: TokenUsage | None = None
    ) -> RateCard:
        """The card to charge a finished call with: the serving model's, else the dearest candidate's.

        ``served`` is ``served_ref(reserved_ref, reply)``. When nothing prices it, the candidate
        (``candidate_refs`` of the call) that charges ``usage`` the most (without ``usage``: the
        dearest output token) prices it, never $0 and never the cheaper default; compare
        ``card.model`` with ``served.name`` to report it. Raises ``UnknownModelPriceError`` for
        ``served`` when no candidate is priced either.
        """
        try:
            return self.rate_card(served)
        except UnknownModelPriceError as unknown:
            best: tuple[tuple[int, Decimal], RateCard] | None = None
            for ref in candidates:
                if ref == served:
                    continue
                try:
                    card = self.rate_card(ref)
                    rank = (card.cost_nano(usage) if usage is not None else 0,
                            card.prices["output"] + card.prices["input"])
                except UnknownModelPriceError:
                    continue
                if best is None or rank > best[0]:
                    best = (rank, card)
            if best is None:
                raise unknown
            return best[1]

    def _resolve(self, ref: ModelRef) -> RateCard | _Unknown:
        name = ref.name.strip() if ref.name else None
        if name:
            lowered = name.lower()
            keys = ([f"{ref.provider}:{lowered}"] if ref.provider else []) + [lowered]
            for k in keys:
                if k in self._overrides:
                    return RateCard.from_price(self._overrides[k], model=name, provider=ref.provider,
                                               tool_fees=self.tool_fees)
            now = _now()
            found = _find_genai_model(name, ref.provider, now)
            if found is not None:
                genai_provider, model_info, model_price, entry_provider = found
                return _genai_card(model_info, model_price, now, model=name, provider=ref.provider or genai_provider.id,
                                   entry_provider=entry_provider, tool_fees=self.tool_fees)
        if self._fallback is not None:
            return RateCard.from_price(
                self._fallback, model=name or "unknown model", provider=ref.provider, source="fallback",
                tool_fees=self.tool_fees,
            )
        return _Unknown(_unknown_message(ref))


_default: Pricer | None = None


def default_pricer() -> Pricer:
    """A process-wide ``Pricer`` with no overrides (genai-prices only), shared so cards compile once."""
    global _default
    if _default is None:
        _default = Pricer()
    return _default
