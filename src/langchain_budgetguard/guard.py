"""``BudgetGuard``: a chat model that wraps a chat model with a hard spending limit.

Data flow of one call (one path for invoke/ainvoke/stream/astream; batch and
astream_events build on them):

    identify scopes (config) -> estimate tokens -> price (cached per model)
     -> reserve on every counter, all or none --refused--> next cheaper model / raise
     -> call the model -> read usage -> price the actual usage -> settle (idempotent)

The decisions are written once, as generators that yield store requests
(``_admit``); ``_admit_sync`` and ``_admit_async`` carry those requests to the
store's sync or async API. Sync and async cannot drift apart. The run the guard
opens is in ``runs.py``, what a stream has produced in ``streaming.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import os
import sys
from collections.abc import (
    AsyncIterator,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from langchain_core.callbacks.base import BaseCallbackManager
from langchain_core.callbacks.manager import (
    AsyncCallbackManager,
    AsyncRunManager,
    CallbackManager,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.language_models import BaseChatModel, BaseLanguageModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    LLMResult,
)
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.runnables.config import ensure_config
from langchain_core.runnables.fallbacks import RunnableWithFallbacks
from langchain_core.runnables.retry import RunnableRetry
from langchain_core.runnables.utils import get_unique_config_specs
from pydantic import Field, PrivateAttr

from .admission import FAIL_OPEN_KEY, Admitted, Estimate, Request, admit
from .caps import innermost_model, model_input_limit
from .errors import (
    BudgetExceededError,
    BudgetStoreUnavailableError,
    GuardMisuseError,
    Refusal,
    UnknownModelPriceError,
)
from .estimate import (
    STORED_CONTEXT_KWARGS,
    StrictEstimator,
    TypicalEstimator,
    OutputCap,
    bounded_input_tokens,
    counted_model_name,
    estimate_input_tokens,
    estimate_output_tokens,
    extra_body_tokens,
    output_cap,
    reserved_output,
    stored_context_of,
    tools_of,
    unsized_references,
)
from .attempts import Attempts, Counting, acounted, counted
from .attempts import watch as watch_attempts
from .failures import billed_unknown, reply_in_error
from .leases import shared_keeper
from .limits import Identity, check_call_id
from .messages import billed_text_of, to_messages
from .models import (
    amodel_chunks,
    bound_config,
    chat_model_of,
    innermost,
    model_chunks,
    runs_after_model,
    with_stop,
)
from .money import nano_to_usd
from .policy import BudgetPolicy, CounterPlan, LimitStatus
from .pricing import (
    ItemBound,
    ModelRef,
    RateCard,
    call_price_context,
    candidate_refs,
    depends_on_config,
    hosts_version,
    item_bound,
    model_ref,
    served_ref,
)
from .runs import ANoRun, NoRun, aopen_run, has_handlers, open_run, tap, tap_reply, tap_stream, tapped
from .serialization import SECRET_STORE_URL_KEY, STORE_URL_SECRET, options_from_json, options_to_json, plain_data
from .snapshots import Snapshot
from .stores.base import ReserveResult, SettleResult
from .stores.ledger import LedgerRow, call_row
from .streaming import StreamTracker
from .usage import TokenUsage, UsageError, answered_from_cache, usage_from_message

__all__ = ["BudgetGuard", "CallCost", "Reservation"]

METADATA_KEY = "budgetguard"
EVENT_DEGRADE = "budgetguard_degrade"
EVENT_REFUSAL = "budgetguard_refusal"
EVENT_COST = "budgetguard_cost"
EVENT_STORE_ERROR = "budgetguard_store_error"
_WRAP_HINT = (
    "Wrap the model instead: guarded = BudgetGuard(llm, limit=5.0); chain = prompt | guarded | parser "
    "(or policy = BudgetGuard(limit=5.0); guarded = policy.wrap(llm))."
)


@dataclass(frozen=True)
class CallCost:
    """What one guarded call cost; also put on the reply as ``response_metadata["budgetguard"]``."""

    model: str
    cost_usd: Decimal
    usage: TokenUsage
    estimated: bool
    degraded: bool
    reserved_usd: Decimal
    call_id: str
    charged_nano: int = field(default=0, repr=False)
    output_cap: int | None = None  # the cap the guard sent (None: the call's own cap applied)
    clamped: bool = False  # the cap was lowered to fit what was left of the budget
    priced_as: str | None = None  # the genai-prices entry that priced it, when a cloud resells a vendor
    problem: str | None = None  # why the call was charged its whole reservation (usage or price unknown)
    max_tool_calls: int | None = None  # the max_tool_calls the guard sent (None: none sent)

    def as_metadata(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "cost_usd": self.cost_usd,
            "reserved_usd": self.reserved_usd,
            "estimated": self.estimated,
            "degraded": self.degraded,
            "call_id": self.call_id,
            "output_cap": self.output_cap,
            "clamped": self.clamped,
            "priced_as": self.priced_as,
            **({"problem": self.problem} if self.problem else {}),
            **({"max_tool_calls": self.max_tool_calls} if self.max_tool_calls is not None else {}),
            "input_tokens": self.usage.input_tokens,
            "output_tokens": self.usage.output_tokens,
        }


@dataclass
class _Candidate:
    """One model of the ladder and what is fixed about it (resolved once)."""

    runnable: Runnable
    ref: ModelRef
    output_cap: OutputCap = field(default_factory=lambda: OutputCap(None, "none", None, None))
    tools: list[Any] = field(default_factory=list)
    refs: tuple[ModelRef, ...] = ()  # every model that may serve a plain call (an inner with_fallbacks)
    context: dict[str, str] = field(default_factory=dict)  # its price variant (service tier, speed)
    items: ItemBound = field(default_factory=ItemBound)  # the server-tool requests its bound tools may bill
    configurable: bool = True  # the run's configurable may choose its model (else resolved once)
    stored_context: str | None = None  # the parameter that continues provider-stored context, if any
    steps_after: bool = False  # it runs steps of its own after its model answered (a chain)
    extra_body: int = 0  # strict's bound of the prompt its bound extra_body carries (tokens)
    counts_requests: bool = False  # its SDK's requests are counted (attempts.watch): resent ones are charged
    counted_as: str | None = None  # the model name its own settings are counted as (estimators)
    streams: bool = False  # it serves an invoke by streaming (``streaming=True``): its chunks are tapped

    @classmethod
    def of(cls, runnable: Runnable) -> _Candidate:
        runnable = _asking_for_stream_usage(runnable)
        refs = tuple(candidate_refs(runnable)) or (model_ref(runnable),)
        return cls(runnable, refs[0], output_cap(runnable), tools_of(runnable), refs,
                   call_price_context(runnable), item_bound(runnable), depends_on_config(runnable),
                   stored_context_of(runnable), runs_after_model(runnable), extra_body_tokens(runnable),
                   watch_attempts(runnable), counted_model_name(runnable),
                   getattr(innermost_model(runnable), "streaming", False) is True)

    def cap_and_tools(self, call_kwargs: dict[str, Any]) -> tuple[OutputCap, list[Any]]:
        if not call_kwargs:
            return self.output_cap, self.tools
        return output_cap(self.runnable, call_kwargs), tools_of(self.runnable, call_kwargs)

    def pricing(self, call_kwargs: dict[str, Any], config: RunnableConfig | None
                ) -> tuple[tuple[ModelRef, ...], dict[str, str], ItemBound]:
        """The models that may serve this call (call kwargs and ``configurable`` choose), their price
        variant and the billed server-tool requests: resolved once unless the call changes them."""
        if self.runnable is None or (not call_kwargs and not (self.configurable and (config or {}).get("configurable"))):
            return self.refs or (self.ref,), self.context, self.items
        refs = tuple(candidate_refs(self.runnable, call_kwargs, config)) or (self.ref,)
        return (refs, call_price_context(self.runnable, call_kwargs, config),
                item_bound(self.runnable, call_kwargs, config))

    @property
    def label(self) -> str:
        if self.ref.name:
            return self.ref.name
        return type(self.runnable).__name__ if self.runnable is not None else "unknown model"


@dataclass(slots=True)
class _Call:
    """Everything known about one guarded call before it is admitted."""

    plan: CounterPlan
    messages: list[BaseMessage] | str  # a string input stays a string until an estimator needs messages
    kwargs: dict[str, Any]
    call_id: str
    ladder: list[_Candidate] | None = None  # a model the guard does not call itself (reserve(model=...))
    refusals: list[Refusal] = field(default_factory=list)
    config: RunnableConfig | None = None
    store_errors: list[tuple[str, Exception]] = field(default_factory=list)  # (operation, error) while admitting
    identity: Identity | None = None




def _own_metadata(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """A guard's ``metadata`` to add to its model's runs: None when it is only the package versions
    LangChain seeds on every model (``lc_versions``), which the wrapped model's runs carry already;
    merging them into each call's config made every wrapped call slower."""
    if metadata and len(metadata) == 1 and "lc_versions" in metadata:
        return None
    return metadata


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()
_LADDER = "_ladder_of_candidates"  # the resolved ladder, cached in the instance dict
_KEEPER = shared_keeper()  # renews the leases of calls in flight (one thread for the process)
# BaseChatModel's own settings (callbacks, tags, cache, rate_limiter, ...); ``name`` is the budget's.
_CHAT_MODEL_FIELDS = frozenset(BaseChatModel.model_fields) - {"name"}


class _KeepsGuarding:
    """What a guard returns from ``bind``, ``with_config``, ``with_retry``, ``with_listeners``,
    ``with_types`` and ``with_fallbacks`` (and they in turn) guard the fallbacks given to their
    ``with_fallbacks`` as the guard's own does: a refusal is an exception, so an unguarded fallback
    would serve every refused call for free."""

    def bind(self, **kwargs: Any) -> Runnable:
        return _guarding(super().bind(**kwargs))  # type: ignore[misc]

    def with_config(self, config: RunnableConfig | None = None, **kwargs: Any) -> Runnable:
        return _guarding(super().with_config(config, **kwargs))  # type: ignore[misc]

    def with_listeners(self, *args: Any, **kwargs: Any) -> Runnable:
        return _guarding(super().with_listeners(*args, **kwargs))  # type: ignore[misc]

    def with_alisteners(self, *args: Any, **kwargs: Any) -> Runnable:
        return _guarding(super().with_alisteners(*args, **kwargs))  # type: ignore[misc]

    def with_types(self, *args: Any, **kwargs: Any) -> Runnable:
        return _guarding(super().with_types(*args, **kwargs))  # type: ignore[misc]

    def with_retry(self, *args: Any, **kwargs: Any) -> Runnable:
        return _guarding(super().with_retry(*args, **kwargs))  # type: ignore[misc]

    def with_fallbacks(self, fallbacks: Sequence[Runnable], *,
                       exceptions_to_handle: tuple[type[BaseException], ...] = (Exception,),
                       exception_key: str | None = None) -> Runnable:
        guard = _guard_under(self)
        return _GuardedFallbacks(runnable=self, fallbacks=[guard._guarded(f) for f in fallbacks],
                                 exceptions_to_handle=exceptions_to_handle, exception_key=exception_key)


class BudgetGuard(_KeepsGuarding, BaseChatModel):
    """Put a hard spending limit in front of a chat model; the guarded model is itself a chat model.

    ``BudgetGuard(llm, limit=5.0)`` refuses calls once $5 is spent in total. With
    ``limits=[Limit(...)]`` each limit applies per user/project/tenant and per window;
    ``store="redis://..."`` shares the counters between processes; ``degrade_to=[cheaper]``
    serves from a cheaper model when ``llm`` would not fit. Without a model,
    ``BudgetGuard(limit=5.0)`` is a reusable policy: ``policy.wrap(llm)``.

    Every way to call it (invoke, batch, stream, generate, astream_events v2/v3, and the
    runnables that ``bind_tools``, ``with_structured_output``, ``bind``, ``with_config``,
    ``configurable_fields`` ... return) goes through the budget. Attribute reads such as
    ``model_name`` or ``temperature`` show the wrapped model's values; nothing that would call
    the wrapped model is forwarded.
    """

    llm: Any = None
    degrade_to: tuple[Any, ...] = ()
    policy: Any = Field(default=None, exclude=True)

    # Kwargs that bind_tools bound for the primary model only: a degrade model has its own.
    _primary_bound: frozenset[str] = PrivateAttr(default=frozenset())
    # The options the policy was built from (None: a policy object was passed): serialization.
    _options: dict[str, Any] | None = PrivateAttr(default=None)
    # The run config of a v3 event stream, whose model step LangChain calls without it.
    _call_config: dict[str, Any] | None = PrivateAttr(default=None)

    def __init__(
        self,
        llm: Runnable | None = None,
        *,
        degrade_to: Sequence[Runnable] = (),
        policy: BudgetPolicy | None = None,
        **options: Any,
    ) -> None:
        chat_fields = {k: options.pop(k) for k in list(options) if k in _CHAT_MODEL_FIELDS}
        if policy is not None and options:
            raise TypeError(f"Pass either policy= or policy options, not both: {sorted(options)}")
        if llm is not None and not isinstance(llm, Runnable):
            raise TypeError(f"BudgetGuard(llm): expected a LangChain chat model, got {type(llm).__name__}")
        if llm is None and degrade_to:
            raise TypeError("degrade_to needs a model to degrade from: BudgetGuard(llm, degrade_to=[...]).")
        for model in degrade_to:
            if not isinstance(model, Runnable):
                raise TypeError(f"degrade_to: expected chat models, got {type(model).__name__}")
        built = policy is None
        if built:
            options = options_from_json(options)
            policy = BudgetPolicy(**options)
        inner = innermost(llm) if llm is not None else None
        for name in ("profile", "rate_limiter", "output_version"):
            # What LangChain reads off a chat model (capabilities, pacing) is the wrapped model's.
            if name not in chat_fields and isinstance(inner, BaseChatModel) and getattr(inner, name, None) is not None:
                chat_fields[name] = getattr(inner, name)
        super().__init__(llm=llm, degrade_to=tuple(degrade_to), policy=policy, **chat_fields)
        self._options = options if built else None

    # -- construction helpers --------------------------------------------------------------

    @classmethod
    def from_config(cls, llm: Runnable | None, path: Any, *, degrade_to: Sequence[Runnable] | None = None,
                    models: Any = None) -> BudgetGuard:
        """A guard as the TOML config file at ``path`` describes (see ``langchain_budgetguard.config``)."""
        from .config import guard_from_config

        return guard_from_config(llm, path, degrade_to=degrade_to, models=models)

    def wrap(self, llm: Runnable, *, degrade_to: Sequence[Runnable] = ()) -> BudgetGuard:
        """A guard around ``llm`` that draws on this guard's budget (same limits, same store)."""
        return self._sibling(llm, degrade_to)

    def _sibling(self, llm: Runnable, degrade_to: Sequence[Runnable], primary_bound: frozenset[str] = frozenset()
                 ) -> BudgetGuard:
        guard = BudgetGuard(llm, degrade_to=degrade_to, policy=self.policy)
        guard._options = self._options
        guard._primary_bound = primary_bound
        return guard

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = _UNSET, strict: Any = _UNSET,
                   parallel_tool_calls: Any = _UNSET, **kwargs: Any) -> Runnable:
        """The wrapped model's ``bind_tools``, as a binding over a guard: the tools travel with the call.

        Takes what the wrapped model's ``bind_tools`` takes (``tool_choice``, ``strict``,
        ``parallel_tool_calls``, ...); each degrade model binds the same tools its own way.
        """
        self._require_model()
        for name, value in (("tool_choice", tool_choice), ("strict", strict),
                            ("parallel_tool_calls", parallel_tool_calls)):
            if value is not _UNSET:
                kwargs[name] = value
        bound = self.llm.bind_tools(tools, **kwargs)
        degrade = [m.bind_tools(tools, **kwargs) for m in self.degrade_to]
        if isinstance(bound, RunnableBinding) and bound.bound is self.llm:
            guard = self._sibling(self.llm, degrade, frozenset(bound.kwargs))
            binding = guard.bind(**bound.kwargs)
            return binding.with_config(bound.config) if bound.config else binding
        return self._sibling(bound, degrade)

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Runnable:
        """The wrapped model's structured-output runnable (same method and parser), its model step guarded."""
        from .structured import guarded_structured_output

        self._require_model()
        return guarded_structured_output(self, schema, **kwargs)

    def with_fallbacks(self, fallbacks: Sequence[Runnable], *,
                       exceptions_to_handle: tuple[type[BaseException], ...] = (Exception,),
                       exception_key: str | None = None) -> Runnable:
        """``Runnable.with_fallbacks``, with every fallback that is a model guarded by this budget too: a
        refusal (or an outage) here must not send the call to a model nobody charges. A fallback that
        is a guard already, or not a model, is kept as it is. For a cheaper model when the budget runs
        low, ``degrade_to`` says it directly."""
        return super().with_fallbacks(fallbacks, exceptions_to_handle=exceptions_to_handle,
                                      exception_key=exception_key)

    def _guarded(self, fallback: Runnable) -> Runnable:
        """``fallback`` drawing on this budget: a model (under bindings) wrapped by a sibling guard;
        a ``with_fallbacks`` of its own with each of its members guarded so (a guard, or a step
        that is not a model, such as a canned reply, is kept as it is)."""
        if isinstance(fallback, BudgetGuard):
            return fallback
        inner = innermost_model(fallback)
        if isinstance(inner, RunnableWithFallbacks):
            if inner is not fallback:  # bindings over a with_fallbacks: one guard over the lot
                return self.wrap(fallback) if _only_models(inner) else fallback
            members = [self._guarded(m) for m in fallback.runnables]
            if all(m is o for m, o in zip(members, fallback.runnables)):
                return fallback
            return fallback.model_copy(update={"runnable": members[0], "fallbacks": members[1:]})
        if not isinstance(inner, BaseLanguageModel):
            return fallback
        return self.wrap(fallback)

    def configurable_fields(self, **kwargs: Any) -> BudgetGuard:
        """``llm.configurable_fields(...)`` under this guard: each call is priced as the model configured."""
        self._require_model()
        return self._sibling(self.llm.configurable_fields(**kwargs), self.degrade_to)

    def configurable_alternatives(self, which: Any, **kwargs: Any) -> BudgetGuard:
        """``llm.configurable_alternatives(...)`` under this guard: every alternative is guarded."""
        self._require_model()
        return self._sibling(self.llm.configurable_alternatives(which, **kwargs), self.degrade_to)

    @property
    def config_specs(self) -> list[Any]:
        return get_unique_config_specs(
            spec for model in (self.llm, *self.degrade_to) if model is not None for spec in model.config_specs
        )

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> BudgetGuard:
        """A copy of the guard (same budget). ``update`` may change guard fields (``llm``, ``degrade_to``)."""
        unknown = set(update or ()) - set(type(self).model_fields)
        if unknown:
            raise ValueError(
                f"BudgetGuard.model_copy(update=...): {sorted(unknown)} are not fields of the guard. To change "
                "the wrapped model, copy it: guard.wrap(guard.llm.model_copy(update=...))."
            )
        policy = (update or {}).get("policy", self.policy)
        if not isinstance(policy, BudgetPolicy):
            raise TypeError(
                f"BudgetGuard.model_copy(update={{'policy': ...}}): expected a BudgetPolicy, got {type(policy).__name__}. "
                "To guard the model with another budget, wrap it: other_guard.wrap(guard.llm, degrade_to=guard.degrade_to)."
            )
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop(_LADDER, None)
        copied.__dict__.pop("_serialized", None)  # BaseChatModel's cached dumpd(self), handed to callbacks
        if policy is not self.policy:
            # The options were this guard's budget's, not the new one's: pickled or dumpd, the copy would
            # revive on the old budget. Now it is a guard built from a policy object (neither takes it).
            copied._options = None
        return copied

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> BudgetGuard:
        memo = {} if memo is None else memo
        memo[id(self.policy)] = self.policy  # a copy draws on the same budget, never a new one
        copied = super().__deepcopy__(memo)
        copied.__dict__.pop(_LADDER, None)
        return copied

    def __reduce__(self) -> tuple[Any, ...]:
        return (_revive_guard, (self.llm, self.degrade_to, self._pickle_options(), self._primary_bound))

    def _pickle_options(self) -> dict[str, Any]:
        options = self._options
        if options is None:
            raise TypeError(
                "This BudgetGuard was built from a BudgetPolicy object (or a config file), so it cannot be pickled: "
                "build it with options (BudgetGuard(llm, limits=[...], store='redis://...')) to send it to a "
                "worker process."
            )
        if not _shared_store(options):
            raise TypeError(
                "A BudgetGuard on an in-process store cannot be pickled: a copy in another process would spend "
                "a budget of its own. Use a shared store: BudgetGuard(llm, ..., store='redis://host:6379/0')."
            )
        return options

    # -- serialization (dumpd / loads) ------------------------------------------------------

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["langchain_budgetguard", "guard"]

    @property
    def lc_attributes(self) -> dict[str, Any]:
        return options_to_json(self._options)

    @property
    def lc_secrets(self) -> dict[str, str]:
        # A store URL with a password: dumpd writes it as a secret (tracers are handed dumpd(model)).
        attributes = options_to_json(self._options) if self._options else None
        return {SECRET_STORE_URL_KEY: STORE_URL_SECRET} if attributes and SECRET_STORE_URL_KEY in attributes else {}

    def to_json(self) -> Any:
        # An in-process budget is not written down, as it is not pickled: a guard loads() revived
        # would spend a fresh budget of its own, beside the one this guard holds and spends.
        if self._options is None or not _shared_store(self._options) or options_to_json(self._options) is None:
            return self.to_json_not_implemented()
        return super().to_json()

    # -- what LangChain reads off a chat model: the wrapped model's --------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # pydantic's private attributes
        except AttributeError:
            pass
        llm = self.__dict__.get("llm")
        if name.startswith("_") or llm is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = getattr(innermost(llm), name)
        if not plain_data(value):
            raise AttributeError(
                f"BudgetGuard does not forward {name!r} ({type(value).__name__}) of the wrapped model: only plain "
                "settings are forwarded, never a way to call the model around the budget. Read it on guard.llm "
                "if you must."
            )
        return value

    def __repr__(self) -> str:
        inner = "no model (a policy: use .wrap(llm))" if self.llm is None else repr(self.llm)[:80]
        return f"BudgetGuard({inner}, name={self.policy.name!r}, limits={list(self.policy.limits)})"

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return super().get_name(suffix, name=name or "BudgetGuard")

    @property
    def _llm_type(self) -> str:
        inner = innermost(self.llm)
        return f"budgetguard-{inner._llm_type}" if isinstance(inner, BaseChatModel) else "budgetguard"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        inner = innermost(self.llm)
        params = dict(inner._identifying_params) if isinstance(inner, BaseChatModel) else {}
        return {**params, "budget": self.policy.name}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        inner, kwargs = chat_model_of(self.llm, kwargs)
        if isinstance(inner, BaseChatModel):
            return inner._get_ls_params(stop=stop, **kwargs)
        return super()._get_ls_params(stop=stop, **kwargs)

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        inner, kwargs = chat_model_of(self.llm, kwargs)
        if isinstance(inner, BaseChatModel):
            return inner._get_invocation_params(stop=stop, **kwargs)
        return super()._get_invocation_params(stop=stop, **kwargs)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        self._require_model()
        return innermost(self.llm).get_num_tokens_from_messages(messages, tools=tools)

    def get_token_ids(self, text: str) -> list[int]:
        self._require_model()
        return innermost(self.llm).get_token_ids(text)

    # -- reservations for calls made by other code (agent middleware, callbacks) -------------

    def reserve(self, messages: Any, config: RunnableConfig | None = None, *, kwargs: Mapping[str, Any] | None = None,
                model: ModelRef | None = None, events: RunnableConfig | None = None,
                call_id: str | None = None) -> Reservation:
        """Admit one model call that your own code makes; settle the returned ``Reservation`` once.

        The ladder (the model, then ``degrade_to``) is tried as for ``invoke``; call
        ``reservation.model``. ``model=ModelRef(...)`` prices a call the guard cannot switch (then
        a model-less guard works). ``events`` is the config whose run receives the decision events.
        Raises ``BudgetExceededError`` when nothing fits.
        """
        call = self._begin(messages, ensure_config(config), dict(kwargs or {}), model, call_id)
        return Reservation(self, self._admit_sync(call, events), events)

    async def areserve(self, messages: Any, config: RunnableConfig | None = None, *,
                       kwargs: Mapping[str, Any] | None = None, model: ModelRef | None = None,
                       events: RunnableConfig | None = None, call_id: str | None = None) -> Reservation:
        call = self._begin(messages, ensure_config(config), dict(kwargs or {}), model, call_id)
        return Reservation(self, await self._admit_async(call, events), events)

    # -- closing the store -------------------------------------------------------------------

    def close(self) -> None:
        """Close the budget's store: journaled fail-open settles and pending releases are written
        first (interpreter exit does this too), and queued alerts delivered. Guards sharing the
        policy share the store."""
        self.policy.store.close()  # first: settles it sends now (journal, carried) may fire alerts
        self.policy.close()

    async def aclose(self) -> None:
        await self.policy.store.aclose()
        await asyncio.to_thread(self.policy.close)

    def __enter__(self) -> BudgetGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> BudgetGuard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- status ----------------------------------------------------------------------------

    def status(self, config: RunnableConfig | None = None, **ids: Any) -> list[LimitStatus]:
        """For each limit that applies to this identity: limit, spent, held, remaining, resets_at."""
        return self.policy.status(config, **ids)

    async def astatus(self, config: RunnableConfig | None = None, **ids: Any) -> list[LimitStatus]:
        return await self.policy.astatus(config, **ids)

    # -- the decisions (sans I/O) ----------------------------------------------------------

    def _require_model(self, value: Any = None) -> None:
        if self.llm is not None:
            return
        if isinstance(value, (AIMessage, AIMessageChunk)):
            raise GuardMisuseError(
                "BudgetGuard received a model's reply: it was placed after the model "
                "(`llm | BudgetGuard(...)`), where the money is already spent and nothing can be guarded. "
                + _WRAP_HINT
            )
        raise GuardMisuseError("This BudgetGuard has no model to guard; it is a policy. " + _WRAP_HINT)

    def _ladder(self) -> list[_Candidate]:
        # Kept in the instance dict, not a pydantic private attribute: this runs on every call, and a
        # private attribute is read through __getattr__ (about a microsecond each time). Read again
        # when a model's settings changed since (``llm.max_tokens = None``, ``guard.llm = other``):
        # a call is reserved as it will be sent.
        cached = self.__dict__.get(_LADDER)
        if cached is not None:
            models, snapshot, hosts, ladder = cached
            degrade = self.degrade_to
            if (models[0] is self.llm and len(models) == len(degrade) + 1 and hosts == hosts_version()
                    and all(m is d for m, d in zip(models[1:], degrade)) and snapshot.unchanged()):
                return ladder
        models, hosts = (self.llm, *self.degrade_to), hosts_version()
        ladder = [_Candidate.of(m) for m in models]
        self.__dict__[_LADDER] = (models, Snapshot.of(models), hosts, ladder)  # after .of: it may build a client
        return ladder

    def _begin(self, value: Any, config: RunnableConfig, kwargs: dict[str, Any], model: ModelRef | None = None,
               call_id: str | None = None) -> _Call:
        if model is None:
            self._require_model(value)
        identity: Identity = self.policy.identity(config)
        plan = self.policy.plan(identity)  # a per-model limit's counters are planned per candidate (_admit)
        ladder = None if model is None else [_Candidate(None, model)]  # type: ignore[arg-type]
        messages = value if isinstance(value, str) else to_messages(value)
        if call_id is not None:
            check_call_id(call_id)
        # 128 random bits, as uuid4().hex gave, at a quarter of its cost.
        return _Call(plan, messages, kwargs, call_id or os.urandom(16).hex(), ladder, config=config,
                     identity=identity)

    def _estimate(self, call: _Call, candidate: _Candidate) -> Estimate:
        """What this call would hold on ``candidate`` (nano-USD), from its messages and output cap."""
        policy = self.policy
        refs, context, items = candidate.pricing(call.kwargs, call.config)
        found, tools = candidate.cap_and_tools(call.kwargs)
        messages = call.messages
        if isinstance(messages, str) and not isinstance(policy.estimator, (StrictEstimator, TypicalEstimator)):
            messages = call.messages = [HumanMessage(messages)]  # the built-ins count a string as it is
        counts: dict[str | None, int] = {}

        def counted_for(ref: ModelRef) -> int:
            # Counted as the model the call goes to: a per-call model=, a configurable choice or an
            # inner fallback has its own tokenizer and image costs, not the wrapped model's.
            model = _counting_model(candidate, ref)
            key = None if model is candidate.runnable else model  # a name, or the candidate's own model
            n = counts.get(key)
            if n is None:
                n = counts[key] = estimate_input_tokens(policy.estimator, messages, tools, model)
            return n

        # Strict: cache writes can cost more than plain input (Anthropic: 1.25x-2x), and audio or image
        # output more than text (gpt-audio 6.4x): hold the dearer.
        strict = policy.estimator.mode == "strict"
        if items and strict and items.uncapped:  # OpenAI tools nothing caps: no hold bounds them
            raise items.uncapped_error()
        if strict:  # what an extra_body sends over the named parameters (prompt, input items, tools)
            extra_body = extra_body_tokens(candidate.runnable, call.kwargs) if call.kwargs and \
                "extra_body" in call.kwargs else candidate.extra_body
        else:
            extra_body = 0
        # A document by URL or file id, or a thread the provider stores, has no size to read: held at
        # the model's whole input limit.
        unsized = 0 if isinstance(messages, str) else unsized_references(policy.estimator, messages)
        stored = candidate.stored_context if strict else None
        if strict and stored is None and call.kwargs and not _STORED_CONTEXT_KEYS.isdisjoint(call.kwargs):
            stored = stored_context_of(candidate.runnable, call.kwargs)
        own_limit = model_input_limit(candidate.runnable) if unsized or stored else None
        # "model" reserves the wrapped model's own output limit: a call routed to another model by
        # name (a per-call model=, a configurable choice) has no profile here to read, so it is capped.
        elsewhere = policy.output_cap == "model" and any(
            _counting_model(candidate, ref) is not candidate.runnable for ref in refs)
        cap, send = self._output_reservation(found, elsewhere)
        best: tuple[int, int, int, RateCard, int] | None = None
        for ref in refs:  # the dearest model that may serve the call (an inner fallback) is held for
            card = policy.pricer.rate_card(ref)
            if context:
                card = card.variant(**context)
            input_tokens = bounded_input_tokens(counted_for(ref) + extra_body, unsized + bool(stored), card.context_window,
                                                own_limit if ref == candidate.ref else None)
            extra = items.hold_nano(card) if items else 0
            reserve, input_cost = card.hold_nano(input_tokens, cap * found.completions, dearer_cache_write=strict,
                                                 dearest_output=strict)
            if best is None or reserve + extra > best[0]:
                best = (reserve + extra, input_cost, extra, card, input_tokens)
        reserve, input_cost, extra, card, input_tokens = best  # type: ignore[misc]
        return Estimate(card, input_tokens, reserve, input_cost, cap, send, False, extra, refs, cap_kwarg=found.kwarg,
                        cap_source=found.source, completions=found.completions, unsized_inputs=unsized,
                        stored_context=stored, thinking=found.thinking,
                        max_tool_calls=items.send_max_calls if items else None)

    def _output_reservation(self, cap: OutputCap, elsewhere: bool = False) -> tuple[int, bool]:
        """The output tokens to reserve for a call whose cap is ``cap``, and whether to send them.

        A cap the user set is reserved as it is. Otherwise (no cap, or an integration's default that
        is the model's whole output limit, as ChatAnthropic sends) a reply could cost far more than a
        sane reservation: ``output_cap="hard"`` reserves ``default_max_output_tokens`` (never above the
        model's limit) and sends it as the call's cap; ``"model"`` reserves the model's full output
        limit and sends nothing (``elsewhere``, a call routed to another model by name, whose limit
        is not known here: as ``"hard"``); ``"trust"`` reserves the default and sends nothing (a reply may
        overrun: it is charged in full and blocks the budget until paid).
        """
        policy = self.policy
        if cap.user_set and cap.tokens is not None:
            return cap.tokens, False
        reserved, send = reserved_output(cap, policy.default_max_output_tokens)
        if policy.output_cap == "model" and not elsewhere:
            limit = cap.model_limit or cap.tokens
            if limit is not None:
                return limit, False
        elif policy.output_cap == "trust":
            return reserved, False
        return reserved, send is not None

    def _admit(self, call: _Call) -> Generator[Request, ReserveResult | Exception, Admitted]:
        """The admission of ``call`` (see ``admission.admit``) over this guard's ladder."""
        policy = self.policy
        if policy.per_model:
            def plans(candidate: _Candidate, estimate: Estimate) -> CounterPlan:
                # Every model the call may go to (a per-call model= kwarg or configurable choice
                # included; an inner fallback's too): each one's counter must fit the call.
                names = [ref.name for ref in estimate.refs if ref.name] or [candidate.label]
                if len(names) == 1:
                    return policy.plan(call.identity, model=names[0])
                return policy.plan_for_models(call.identity, names)
        else:
            def plans(candidate: _Candidate, estimate: Estimate) -> CounterPlan:
                return call.plan
        return admit(policy, plans, call.ladder or self._ladder(), lambda c: self._estimate(call, c),
                     call.call_id, call.refusals, shrink=call.ladder is None)

    def _cost(self, admitted: Admitted, message: Any, streamed_text: str | None = None,
              usage: TokenUsage | None = None, served: Any = None, interrupted: bool = False) -> CallCost:
        """Price a finished (or interrupted) call from its usage, estimating what is missing.

        ``served`` is the reply (or the stream chunk) that names the model that answered.
        ``interrupted``: a stream that broke off after output its last usage report came before (the
        prompt's usage, reported at its start): at least the output it streamed is charged.
        """
        if served is None:
            served = message
        try:
            if usage is None and message is not None:
                usage = usage_from_message(message)
        except UsageError as bad:  # a count that cannot be real is never trusted: charge the hold
            return self._charged_by_policy(admitted, str(bad))
        if usage is None or usage.total_tokens == 0:
            text = streamed_text if streamed_text is not None else billed_text_of(message)
            usage = TokenUsage(
                input_tokens=admitted.estimate.input_tokens,
                output_tokens=estimate_output_tokens(self.policy.estimator, text, _output_model(admitted))
                if text else 0,
                estimated=True,
            )
        elif interrupted and streamed_text:
            seen = estimate_output_tokens(self.policy.estimator, streamed_text, _output_model(admitted))
            if seen > usage.output_tokens:
                usage = dataclasses.replace(usage, output_tokens=seen, estimated=True)
        return self._price(admitted, usage, served)

    def _charged_by_policy(self, admitted: Admitted, why: str, known: tuple[TokenUsage, int] | None = None
                           ) -> CallCost:
        """What a call whose cost cannot be known costs: everything it reserved (never $0), or what
        ``known`` says its priced part costs when that is more (``(usage, nano-USD)``)."""
        estimate = admitted.estimate
        if known is not None and known[1] > estimate.reserve:
            return self._priced(admitted, known[0], known[1], admitted.candidate.label, None, why)
        usage = TokenUsage(input_tokens=estimate.input_tokens, output_tokens=estimate.held_output_tokens,
                           estimated=True)
        return self._priced(admitted, usage, estimate.reserve, admitted.candidate.label, None, why)

    def _charged_for_attempts(self, admitted: Admitted, cost: CallCost | None, attempts: Attempts | None,
                              covered: int = 0) -> CallCost | None:
        """``cost`` (None: nothing) plus the whole reservation for each request the SDK sent that
        got no answer (the provider may have answered and billed each), beyond ``covered`` of them
        already charged."""
        lost = attempts.unanswered - covered if attempts is not None else 0
        if lost <= 0:
            return cost
        why = (f"the SDK resent the request after {lost} attempt{'s' if lost > 1 else ''} got no answer "
               "(timed out or cut off), each of which the provider may have billed: charged its reservation for each")
        return self._plus_reservations(admitted, cost, lost, why)

    def _plus_reservations(self, admitted: Admitted, cost: CallCost | None, count: int, why: str) -> CallCost:
        """``cost`` (None: nothing) plus ``count`` whole reservations, charged for ``why``."""
        if cost is None:
            cost = dataclasses.replace(self._charged_by_policy(admitted, why), charged_nano=0)  # its problem: why
            problem = cost.problem
        else:
            problem = f"{cost.problem}; {why}" if cost.problem else why
        charged = cost.charged_nano + count * admitted.estimate.reserve
        return dataclasses.replace(cost, charged_nano=charged, cost_usd=nano_to_usd(charged), problem=problem)

    def _price(self, admitted: Admitted, usage: TokenUsage, reply: Any = None) -> CallCost:
        estimate = admitted.estimate
        observe = getattr(self.policy.estimator, "observe", None)
        if observe is not None and not usage.estimated and usage.input_tokens:
            # typical mode learns from the provider's own prompt counts (no network, bounded memory)
            observe(_counted_name(admitted.candidate, estimate), estimate.input_tokens, usage.consistent().input_tokens)
        card, model = estimate.card, admitted.candidate.label
        refs = estimate.refs
        if refs:
            served = served_ref(refs[0], reply, refs) if reply is not None else refs[0]
            model = served.name or model
            try:
                # The card reserved with (its service tier applied) unless another model answered.
                if not (len(refs) == 1 and (served is refs[0] or served == refs[0])):
                    card = self.policy.pricer.settle_card(served, refs, usage)
            except UnknownModelPriceError as unknown:  # nothing prices the model that answered
                return self._charged_by_policy(admitted, str(unknown))
            try:
                charged = card.cost_nano(usage)
            except UnknownModelPriceError as unknown:  # an item billed that nothing prices: the hold, at least
                return self._charged_by_policy(admitted, str(unknown), (usage, card.priced_part_nano(usage)))
        else:
            charged = card.cost_nano(usage)
        return self._priced(admitted, usage, charged, model, card, None)

    def _priced(self, admitted: Admitted, usage: TokenUsage, charged: int, model: str, card: RateCard | None,
                problem: str | None) -> CallCost:
        return CallCost(
            model=model,
            cost_usd=nano_to_usd(charged),
            usage=usage,
            estimated=usage.estimated,
            degraded=admitted.index > 0,
            reserved_usd=nano_to_usd(admitted.estimate.reserve),
            call_id=admitted.call_id,
            charged_nano=charged,
            output_cap=admitted.estimate.output_tokens if admitted.estimate.send_cap else None,
            clamped=admitted.estimate.clamped,
            priced_as=_priced_as(card, model),
            problem=problem,
            max_tool_calls=admitted.estimate.max_tool_calls,
        )

    def _settlement(self, admitted: Admitted, reply: Any = None, usage: TokenUsage | None = None,
                    output_text: str | None = None, interrupted: bool = False) -> CallCost | None:
        """What a call costs: reported usage, else the reply, else its input and the output seen.

        ``interrupted``: a stream that broke off after output ``output_text`` its last usage report
        came before: at least that output is charged (``_cost``).
        None (nothing to charge) when it failed before any output: providers bill no failed request.
        """
        if usage is not None and usage.total_tokens:
            if interrupted and output_text:
                return self._cost(admitted, None, output_text, usage, reply, interrupted=True)
            return self._price(admitted, usage, reply)
        if reply is not None:
            if answered_from_cache(reply):  # LangChain's cache answered: no request was billed
                return self._price(admitted, TokenUsage(), reply)
            return self._cost(admitted, reply)
        if output_text is not None:
            return self._cost(admitted, None, output_text)
        return None

    # -- drivers: carry the planning generators' requests to the store ---------------------

    def _reserve_sync(self, request: Request) -> ReserveResult | Exception:
        op, counters, hold = request
        if op == "local_reserve":
            return self.policy.outage_store().reserve(counters, hold)
        try:
            result = self.policy.store.reserve(counters, hold)
        except BudgetStoreUnavailableError as exc:
            self.policy.store_failed()
            return exc
        if self.policy.outage is not None:  # an outage's allowance is out: is the outage over?
            self.policy.store_answered()
        return result

    async def _reserve_async(self, request: Request) -> ReserveResult | Exception:
        op, counters, hold = request
        if op == "local_reserve":
            return await self.policy.outage_store().areserve(counters, hold)
        try:
            result = await self.policy.store.areserve(counters, hold)
        except BudgetStoreUnavailableError as exc:
            self.policy.store_failed()
            return exc
        if self.policy.outage is not None:  # an outage's allowance is out: is the outage over?
            self.policy.store_answered()
        return result

    def _admit_sync(self, call: _Call, child: RunnableConfig | None = None) -> Admitted:
        steps = self._admit(call)
        admitted = None
        try:
            request = next(steps)
            while True:
                result = self._reserve_sync(request)
                if isinstance(result, Exception):
                    call.store_errors.append(("reserve", result))
                request = steps.send(result)
        except StopIteration as done:
            admitted = done.value
            self._decided(call, admitted)
            return admitted
        except BudgetExceededError as refused:
            self._decided(call, None, refused)
            row = self._refusal_row(call, refused)
            if row is not None:
                with contextlib.suppress(Exception):  # a ledger row never hides the refusal
                    self.policy.store.append_ledger(row)
            raise
        finally:
            if child is not None and _explained(call, admitted) and has_handlers(child):
                for name, data in _decision_events(call, admitted, self.policy):
                    dispatch_custom_event(name, data, config=child)

    async def _admit_async(self, call: _Call, child: RunnableConfig | None = None) -> Admitted:
        steps = self._admit(call)
        admitted = None
        try:
            request = next(steps)
            while True:
                result = await self._reserve_async(request)
                if isinstance(result, Exception):
                    call.store_errors.append(("reserve", result))
                request = steps.send(result)
        except StopIteration as done:
            admitted = done.value
            self._decided(call, admitted)
            return admitted
        except BudgetExceededError as refused:
            self._decided(call, None, refused)
            row = self._refusal_row(call, refused)
            if row is not None:
                try:
                    await self.policy.store.aappend_ledger(row)
                except Exception:  # noqa: BLE001 - a ledger row never hides the refusal
                    pass
            raise
        finally:
            if child is not None and _explained(call, admitted) and has_handlers(child):
                for name, data in _decision_events(call, admitted, self.policy):
                    await adispatch_custom_event(name, data, config=child)

    def _decided(self, call: _Call, admitted: Admitted | None, refused: BudgetExceededError | None = None) -> None:
        """Alerts of an admission: thresholds its expiry charges crossed, a refusal or a degrade
        (rate-limited), and in shadow mode what would have been refused or degraded. Never blocks."""
        policy = self.policy
        if policy.alerts is None:
            return
        if refused is not None:
            policy.decision_alert("refusal", refused.refusal)
            return
        if admitted is None:
            return
        if admitted.crossed:
            policy.threshold_alerts(admitted.plan, admitted.crossed, admitted.candidate.label)
        if admitted.shadow in ("refusal", "degrade") and admitted.would_refuse:
            policy.decision_alert(admitted.shadow, admitted.would_refuse[-1 if admitted.shadow == "refusal" else 0],
                                  shadow=True)
        elif admitted.index > 0 and call.refusals:
            policy.decision_alert("degrade", call.refusals[0])

    # A call in flight keeps its hold for as long as it runs: the shared keeper renews its lease in the
    # background (a renewal that fails never breaks the call; at worst the lease runs out and the
    # hold is charged by policy, and the settle corrects it).

    def _lease(self, admitted: Admitted) -> Any:
        store, keys = self._lease_target(admitted)
        if store is None:
            return contextlib.nullcontext()
        return _KEEPER.hold(store, admitted.call_id, keys, self.policy.lease_seconds)

    def _alease(self, admitted: Admitted) -> Any:
        store, keys = self._lease_target(admitted)
        if store is None:
            return contextlib.nullcontext()
        return _KEEPER.ahold(store, admitted.call_id, keys, self.policy.lease_seconds)

    def _lease_target(self, admitted: Admitted) -> tuple[Any, tuple[str, ...]]:
        if admitted.held:
            return self.policy.store, admitted.keys
        if admitted.local_store is not None:  # served fail-open: the allowance holds it
            return admitted.local_store, (FAIL_OPEN_KEY,)
        return None, ()

    def _report_cost(self, child: RunnableConfig, cost: CallCost) -> None:
        if has_handlers(child):
            dispatch_custom_event(EVENT_COST, cost.as_metadata(), config=child)

    async def _areport_cost(self, child: RunnableConfig, cost: CallCost) -> None:
        if has_handlers(child):
            await adispatch_custom_event(EVENT_COST, cost.as_metadata(), config=child)

    def _refusal_row(self, call: _Call, refused: BudgetExceededError) -> LedgerRow | None:
        """The ledger row of a refused call (charges nothing), for a store that keeps a ledger."""
        if not _keeps_ledger(self.policy.store, "append_ledger"):
            return None
        row = call_row(self.policy.name, call.call_id, call.plan.keys, model=refused.refusal.model,
                       detail=refused.refusal.describe())
        return dataclasses.replace(row, kind="refusal", refused=True, estimated=False)

    def _ledger_row(self, admitted: Admitted, cost: CallCost | None) -> dict[str, Any]:
        """``row=`` for a store that keeps the per-call ledger (``stores.ledger``); {} for one that does not."""
        if not _keeps_ledger(self.policy.store, "read_ledger"):
            return {}
        ref = admitted.candidate.ref
        row = call_row(
            self.policy.name, admitted.call_id, admitted.keys, model=cost.model if cost else ref.name,
            host=ref.host or ref.provider, usage=cost.usage if cost else None, reserved_nano=admitted.estimate.reserve,
            estimated=cost.estimated if cost else True, degraded=admitted.index > 0,
            clamped=cost.clamped if cost else admitted.estimate.clamped,
            detail=(cost.problem or "") if cost else "no usage report: charged from what was seen")
        if admitted.shadow is not None:  # shadow mode: the row says what enforce mode would have done
            row = dataclasses.replace(row, refused=admitted.shadow == "refusal",
                                      detail=_shadow_detail(admitted, row.detail))
        return {"row": row}

    def _settle_options(self, admitted: Admitted, amount: int, cost: CallCost | None) -> dict[str, Any]:
        """The store settle's keyword arguments: the ledger row, and each counter's own amount when a
        limit counts tokens or requests (a call answered from LangChain's cache counts no request)."""
        options = self._ledger_row(admitted, cost)
        plan = admitted.plan
        if plan is not None and (plan.counted or plan.models):
            usage = cost.usage if cost is not None else None
            tokens = usage.input_tokens + usage.output_tokens if usage is not None else 0
            cached = cost is not None and not cost.estimated and not cost.charged_nano and not tokens
            # A call charged by policy (its cost unknown) is charged on every model it may have used.
            served = cost.model if cost is not None and not cost.problem else None
            options["amounts"] = plan.amounts(amount, tokens, 0 if cached else 1, served)
        return options

    def _settle_sync(self, admitted: Admitted, amount: int, cost: CallCost | None = None) -> SettleResult:
        if admitted.local_store is not None:
            admitted.local_store.settle(admitted.call_id, (FAIL_OPEN_KEY,), amount)
        result = self.policy.store.settle(admitted.call_id, admitted.keys, amount,
                                          **self._settle_options(admitted, amount, cost))
        if result.crossed:
            self.policy.threshold_alerts(admitted.plan, result.crossed, admitted.candidate.label)
        return result

    async def _settle_async(self, admitted: Admitted, amount: int, cost: CallCost | None = None) -> SettleResult:
        if admitted.local_store is not None:
            await admitted.local_store.asettle(admitted.call_id, (FAIL_OPEN_KEY,), amount)
        result = await self.policy.store.asettle(admitted.call_id, admitted.keys, amount,
                                                 **self._settle_options(admitted, amount, cost))
        if result.crossed:
            self.policy.threshold_alerts(admitted.plan, result.crossed, admitted.candidate.label)
        return result

    # -- calls: every entry point admits, calls the model that fitted, settles ---------------

    def _configs(self, config: RunnableConfig | None) -> tuple[RunnableConfig | None, RunnableConfig]:
        """``(the config to hand the model when we open no run, the ensured config)``: the caller's
        own config as it was (the model ensures it itself, for less), unless the guard's own
        settings must be added to it."""
        if self.callbacks or self.tags or _own_metadata(self.metadata):
            config = self._with_own_settings(ensure_config(config))
            return config, config
        return config, ensure_config(config)

    def _with_own_settings(self, config: RunnableConfig) -> RunnableConfig:
        """The call's config with the guard's own ``callbacks``, ``tags`` and ``metadata`` (as a chat
        model's own settings apply to its runs: here, the wrapped model's run)."""
        own, tags, metadata = self.callbacks, self.tags, _own_metadata(self.metadata)
        if not (own or tags or metadata):
            return config
        config = dict(config)  # type: ignore[assignment]
        if own:
            handlers = own.handlers if isinstance(own, BaseCallbackManager) else list(own)
            given = config.get("callbacks")
            if given is None or isinstance(given, list):
                config["callbacks"] = [*(given or ()), *handlers]
            else:
                merged = given.copy()
                for handler in handlers:
                    merged.add_handler(handler, inherit=True)
                config["callbacks"] = merged
        if tags:
            config["tags"] = [*(config.get("tags") or ()), *tags]
        if metadata:
            config["metadata"] = {**metadata, **(config.get("metadata") or {})}
        return config

    def _serving(self, admitted: Admitted, kwargs: dict[str, Any]) -> tuple[Runnable, dict[str, Any]]:
        """The model that fitted and the kwargs it takes (a degrade model has its own bound tools)."""
        if admitted.index and self._primary_bound:
            kwargs = {k: v for k, v in kwargs.items() if k not in self._primary_bound}
        settings = _sent_settings(admitted.estimate)
        return admitted.candidate.runnable, {**kwargs, **settings} if settings else kwargs

    def invoke(self, input: Any, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
               **kwargs: Any) -> BaseMessage:
        kwargs = with_stop(kwargs, stop)
        given, config = self._configs(config)
        call = self._begin(input, config, kwargs)
        run_manager, child = open_run(self.get_name(), input, config, self.policy)
        events = None if child is config else child  # decision and cost events go to our run, if any
        streamed = tap(child)
        try:
            reservation = Reservation(self, self._admit_sync(call, events), events)
            model, model_kwargs = self._serving(reservation.admitted, kwargs)
            # No run of ours: the model gets the caller's config (it ensures it itself, for less).
            model_config, replied = tap_reply(given if child is config else child,
                                              reservation.admitted.candidate.steps_after)
            if streamed is None and reservation.admitted.candidate.streams:
                model_config, streamed = tap_stream(model_config)
            try:
                with reservation.keep_alive():
                    output = model.invoke(input, model_config, **model_kwargs)
            except BaseException as error:
                reservation.settle_error(error, replied.message if replied else None, output_text=tapped(streamed))
                raise
            reservation.settle(output)
        except BaseException as exc:
            run_manager.on_chain_error(exc)
            raise
        run_manager.on_chain_end(output)
        return output

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
                      **kwargs: Any) -> BaseMessage:
        kwargs = with_stop(kwargs, stop)
        given, config = self._configs(config)
        call = self._begin(input, config, kwargs)
        run_manager, child = await aopen_run(self.get_name(), input, config, self.policy)
        events = None if child is config else child
        streamed = tap(child)
        try:
            reservation = Reservation(self, await self._admit_async(call, events), events)
            model, model_kwargs = self._serving(reservation.admitted, kwargs)
            model_config, replied = tap_reply(given if child is config else child,
                                              reservation.admitted.candidate.steps_after)
            if streamed is None and reservation.admitted.candidate.streams:
                model_config, streamed = tap_stream(model_config)
            try:
                async with reservation.akeep_alive():
                    output = await model.ainvoke(input, model_config, **model_kwargs)
            except BaseException as error:
                await reservation.asettle_error(error, replied.message if replied else None,
                                                output_text=tapped(streamed))
                raise
            await reservation.asettle(output)
        except BaseException as exc:
            await run_manager.on_chain_error(exc)
            raise
        await run_manager.on_chain_end(output)
        return output

    def stream(self, input: Any, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
               **kwargs: Any) -> Iterator[BaseMessage]:
        kwargs = with_stop(kwargs, stop)
        given, config = self._configs(config)
        call = self._begin(input, config, kwargs)
        run_manager, child = open_run(self.get_name(), input, config, self.policy)
        events = None if child is config else child
        try:
            admitted = self._admit_sync(call, events)
        except BaseException as exc:
            run_manager.on_chain_error(exc)
            raise
        model, model_kwargs = self._serving(admitted, kwargs)
        tracker = StreamTracker(self, admitted)
        settled = False
        try:
            with self._lease(admitted):
                chunks = model.stream(input, given if child is config else child, **model_kwargs)
                for chunk in chunks if tracker.attempts is None else counted(chunks, tracker.attempts):
                    yield from tracker.pass_on(chunk)
                    if tracker.over_cap:  # the provider ignores the cap: stop, charge what came
                        break
            cost = tracker.finish()
            self._settle_sync(admitted, cost.charged_nano, cost)
            settled = True
            if events is not None:
                self._report_cost(events, cost)
            yield _with_cost(tracker.last, cost)
        except BaseException as exc:
            if not settled:
                self._settle_sync(admitted, *tracker.interrupted(exc))
            if not isinstance(exc, GeneratorExit):
                run_manager.on_chain_error(exc)
            raise
        if not isinstance(run_manager, NoRun):  # merging the chunks is for the run's output only
            run_manager.on_chain_end(tracker.output)

    async def astream(self, input: Any, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
                      **kwargs: Any) -> AsyncIterator[BaseMessage]:
        kwargs = with_stop(kwargs, stop)
        given, config = self._configs(config)
        call = self._begin(input, config, kwargs)
        run_manager, child = await aopen_run(self.get_name(), input, config, self.policy)
        events = None if child is config else child
        try:
            admitted = await self._admit_async(call, events)
        except BaseException as exc:
            await run_manager.on_chain_error(exc)
            raise
        model, model_kwargs = self._serving(admitted, kwargs)
        tracker = StreamTracker(self, admitted)
        settled = False
        try:
            async with self._alease(admitted):
                chunks = model.astream(input, given if child is config else child, **model_kwargs)
                if tracker.attempts is not None:
                    chunks = acounted(chunks, tracker.attempts)
                async with _closing(chunks):
                    async for chunk in chunks:
                        for out in tracker.pass_on(chunk):
                            yield out
                        if tracker.over_cap:
                            break
            cost = tracker.finish()
            await self._settle_async(admitted, cost.charged_nano, cost)
            settled = True
            if events is not None:
                await self._areport_cost(events, cost)
            yield _with_cost(tracker.last, cost)
        except BaseException as exc:
            if not settled:
                await self._settle_async(admitted, *tracker.interrupted(exc))
            if not isinstance(exc, GeneratorExit):
                await run_manager.on_chain_error(exc)
            raise
        if not isinstance(run_manager, ANoRun):
            await run_manager.on_chain_end(tracker.output)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        # A chat model consumes its whole input before it answers; so does the guard.
        final = None
        for chunk in input:
            final = chunk if final is None else final + chunk
        yield from self.stream(final, config, **kwargs)

    async def atransform(
        self, input: AsyncIterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        final = None
        async for chunk in input:
            final = chunk if final is None else final + chunk
        async for out in self.astream(final, config, **kwargs):
            yield out

    # generate / agenerate (and generate_prompt, which calls them): each prompt is one guarded call
    # of the serving model's own generate, so its run, callbacks, cache and llm_output stay its own.

    def generate(self, messages: list[list[BaseMessage]], stop: list[str] | None = None, callbacks: Any = None, *,
                 tags: list[str] | None = None, metadata: dict[str, Any] | None = None, run_name: str | None = None,
                 run_id: Any = None, **kwargs: Any) -> LLMResult:
        options = _generate_options(callbacks, tags, metadata, run_name, run_id, len(messages))
        return self._merge([self._generate_one(m, stop, options, kwargs) for m in messages])

    async def agenerate(self, messages: list[list[BaseMessage]], stop: list[str] | None = None, callbacks: Any = None,
                        *, tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                        run_name: str | None = None, run_id: Any = None, **kwargs: Any) -> LLMResult:
        options = _generate_options(callbacks, tags, metadata, run_name, run_id, len(messages))
        # As the model's own agenerate: every prompt's call runs to its end (and is settled) before
        # the first error is raised, so none is left running unobserved.
        results = await asyncio.gather(*(self._agenerate_one(m, stop, options, kwargs) for m in messages),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return self._merge(results)

    def _generate_one(self, messages: Any, stop: list[str] | None, options: dict[str, Any],
                      kwargs: dict[str, Any]) -> LLMResult:
        config = self._with_own_settings(_config_of(options))
        call = self._begin(messages, config, with_stop(kwargs, stop))
        run_manager, child = open_run(self.get_name(), messages, config, self.policy)
        events = None if child is config else child
        try:
            reservation = Reservation(self, self._admit_sync(call, events), events)
            model, model_kwargs = self._serving(reservation.admitted, kwargs)
            chat, chat_kwargs = chat_model_of(model, model_kwargs)
            if chat is not model and isinstance(chat, BaseChatModel):  # the bindings' own config still applies
                child = bound_config(model, child)
            child, replied = tap_reply(child, reservation.admitted.candidate.steps_after)
            try:
                with reservation.keep_alive():
                    if isinstance(chat, BaseChatModel):
                        result = chat.generate([to_messages(messages)], stop=stop, **_step_options(child, options),
                                               **chat_kwargs)
                    else:
                        reply = model.invoke(messages, child, **with_stop(model_kwargs, stop))
                        result = LLMResult(generations=[[ChatGeneration(message=reply)]])
            except BaseException as error:
                reservation.settle_error(error, replied.message if replied else None)
                raise
            reservation.settle(result.generations[0][0].message)
        except BaseException as exc:
            run_manager.on_chain_error(exc)
            raise
        run_manager.on_chain_end(result.generations[0][0].message)
        return result

    async def _agenerate_one(self, messages: Any, stop: list[str] | None, options: dict[str, Any],
                             kwargs: dict[str, Any]) -> LLMResult:
        config = self._with_own_settings(_config_of(options))
        call = self._begin(messages, config, with_stop(kwargs, stop))
        run_manager, child = await aopen_run(self.get_name(), messages, config, self.policy)
        events = None if child is config else child
        try:
            reservation = Reservation(self, await self._admit_async(call, events), events)
            model, model_kwargs = self._serving(reservation.admitted, kwargs)
            chat, chat_kwargs = chat_model_of(model, model_kwargs)
            if chat is not model and isinstance(chat, BaseChatModel):  # the bindings' own config still applies
                child = bound_config(model, child)
            child, replied = tap_reply(child, reservation.admitted.candidate.steps_after)
            try:
                async with reservation.akeep_alive():
                    if isinstance(chat, BaseChatModel):
                        result = await chat.agenerate([to_messages(messages)], stop=stop,
                                                      **_step_options(child, options), **chat_kwargs)
                    else:
                        reply = await model.ainvoke(messages, child, **with_stop(model_kwargs, stop))
                        result = LLMResult(generations=[[ChatGeneration(message=reply)]])
            except BaseException as error:
                await reservation.asettle_error(error, replied.message if replied else None)
                raise
            await reservation.asettle(result.generations[0][0].message)
        except BaseException as exc:
            await run_manager.on_chain_error(exc)
            raise
        await run_manager.on_chain_end(result.generations[0][0].message)
        return result

    def _merge(self, results: Sequence[LLMResult]) -> LLMResult:
        if len(results) == 1:
            return results[0]
        inner = innermost(self.llm)
        outputs = [r.llm_output for r in results]
        llm_output = inner._combine_llm_outputs(outputs) if isinstance(inner, BaseChatModel) else {}
        return LLMResult(
            generations=[g for r in results for g in r.generations],
            llm_output=llm_output,
            run=[info for r in results for info in (r.run or [])] or None,
        )

    # The model step of LangChain's own machinery (stream_events v3, invoke-time v2 events): the run
    # is already open (ours), so the serving model's _generate/_stream is called inside it.

    def stream_events(self, input: Any, config: RunnableConfig | None = None, *, version: str = "v2",
                      stop: list[str] | None = None, **kwargs: Any) -> Any:
        if version == "v3":
            return super(BudgetGuard, self._with_call_config(config)).stream_events(
                input, config, version=version, stop=stop, **kwargs)
        return super().stream_events(input, config, version=version, stop=stop, **kwargs)

    def astream_events(self, input: Any, config: RunnableConfig | None = None, *, version: str = "v2",
                       stop: list[str] | None = None, **kwargs: Any) -> Any:
        if version == "v3":
            return super(BudgetGuard, self._with_call_config(config)).astream_events(
                input, config, version=version, stop=stop, **kwargs)
        return super().astream_events(input, config, version=version, stop=stop, **kwargs)

    def _with_call_config(self, config: RunnableConfig | None) -> BudgetGuard:
        self._require_model()
        guard = copy.copy(self)  # shares the budget, the ladder and its price cards
        guard._call_config = dict(ensure_config(config))
        return guard

    def _step_config(self, run_manager: Any) -> RunnableConfig:
        """The config a model step runs under: the caller's (v3), else the run's metadata."""
        base = self._call_config
        if base is None:
            base = {"metadata": dict(getattr(run_manager, "metadata", None) or {})}
        base = {k: v for k, v in base.items() if k not in ("callbacks", "run_id")}
        # An LLM run has no children: a model step that is not a chat model runs without our
        # callbacks, or its usage would be reported twice.
        return ensure_config(base)

    @staticmethod
    def _step_events(run_manager: Any) -> RunnableConfig | None:
        """Where a model step's decision and cost events go: the chat-model run LangChain opened."""
        handlers = getattr(run_manager, "handlers", None)
        if not handlers:
            return None
        manager_class = AsyncCallbackManager if isinstance(run_manager, AsyncRunManager) else CallbackManager
        manager = manager_class(handlers=handlers, inheritable_handlers=run_manager.inheritable_handlers,
                                parent_run_id=run_manager.run_id)
        return {"callbacks": manager}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        config, events = self._step_config(run_manager), self._step_events(run_manager)
        call = self._begin(messages, config, with_stop(kwargs, stop))
        reservation = Reservation(self, self._admit_sync(call, events), events)
        model, model_kwargs = self._serving(reservation.admitted, kwargs)
        chat, chat_kwargs = chat_model_of(model, model_kwargs)
        try:
            with reservation.keep_alive():
                if isinstance(chat, BaseChatModel):
                    result = chat._generate(messages, stop=stop, run_manager=run_manager, **chat_kwargs)
                else:
                    result = ChatResult(generations=[ChatGeneration(
                        message=model.invoke(messages, config, **with_stop(model_kwargs, stop)))])
        except BaseException as error:
            reservation.settle_error(error)
            raise
        reservation.settle(result.generations[0].message)
        return result

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                         **kwargs: Any) -> ChatResult:
        config, events = self._step_config(run_manager), self._step_events(run_manager)
        call = self._begin(messages, config, with_stop(kwargs, stop))
        reservation = Reservation(self, await self._admit_async(call, events), events)
        model, model_kwargs = self._serving(reservation.admitted, kwargs)
        chat, chat_kwargs = chat_model_of(model, model_kwargs)
        try:
            async with reservation.akeep_alive():
                if isinstance(chat, BaseChatModel):
                    result = await chat._agenerate(messages, stop=stop, run_manager=run_manager, **chat_kwargs)
                else:
                    result = ChatResult(generations=[ChatGeneration(
                        message=await model.ainvoke(messages, config, **with_stop(model_kwargs, stop)))])
        except BaseException as error:
            await reservation.asettle_error(error)
            raise
        await reservation.asettle(result.generations[0].message)
        return result

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        config, events = self._step_config(run_manager), self._step_events(run_manager)
        admitted = self._admit_sync(self._begin(messages, config, with_stop(kwargs, stop)), events)
        model, model_kwargs = self._serving(admitted, kwargs)
        tracker = StreamTracker(self, admitted)
        settled = False
        try:
            with self._lease(admitted):
                chunks = model_chunks(model, messages, stop, run_manager, config, model_kwargs)
                for chunk in chunks if tracker.attempts is None else counted(chunks, tracker.attempts):
                    tracker.add(chunk.message)
                    yield chunk
                    if tracker.over_cap:
                        break
            cost = tracker.finish()
            self._settle_sync(admitted, cost.charged_nano, cost)
            settled = True
            if events is not None:
                self._report_cost(events, cost)
        finally:
            if not settled:
                self._settle_sync(admitted, *tracker.interrupted(sys.exc_info()[1]))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        config, events = self._step_config(run_manager), self._step_events(run_manager)
        admitted = await self._admit_async(self._begin(messages, config, with_stop(kwargs, stop)), events)
        model, model_kwargs = self._serving(admitted, kwargs)
        tracker = StreamTracker(self, admitted)
        settled = False
        try:
            async with self._alease(admitted):
                chunks = amodel_chunks(model, messages, stop, run_manager, config, model_kwargs)
                if tracker.attempts is not None:
                    chunks = acounted(chunks, tracker.attempts)
                async with _closing(chunks):
                    async for chunk in chunks:
                        tracker.add(chunk.message)
                        yield chunk
                        if tracker.over_cap:
                            break
            cost = tracker.finish()
            await self._settle_async(admitted, cost.charged_nano, cost)
            settled = True
            if events is not None:
                await self._areport_cost(events, cost)
        finally:
            if not settled:
                await self._settle_async(admitted, *tracker.interrupted(sys.exc_info()[1]))


@dataclass(slots=True)
class Reservation:
    """A call admitted under a guard's budget: call ``model``, then ``settle`` once."""

    guard: BudgetGuard
    admitted: Admitted
    events: RunnableConfig | None = None
    attempts: Attempts | None = None  # the SDK's requests for this call, when they are counted

    @property
    def model(self) -> Runnable:
        """The model to call: the guarded one, or the degrade model that fitted."""
        return self.admitted.candidate.runnable

    @property
    def model_name(self) -> str:
        return self.admitted.candidate.label

    @property
    def model_settings(self) -> dict[str, Any]:
        """Kwargs the call must be made with: the output cap the guard reserved, when the call sets none
        (or a smaller one, shrunk to fit). Empty when the call's own cap applies."""
        return _sent_settings(self.admitted.estimate)

    @property
    def degraded(self) -> bool:
        return self.admitted.index > 0

    def settle_error(self, error: BaseException, reply: Any = None, *,
                     output_text: str | None = None) -> CallCost | None:
        """Settle a call whose model step raised ``error``: for ``reply`` if the model answered (a
        step after it raised), or for the answer the error carries (OpenAI's parse errors); for
        ``output_text`` if it streamed some (a stream that broke off); else, if the request may have been billed in full without any of its answer reaching us (it
        timed out or was cancelled waiting, its connection broke), for its whole reservation, the
        most it can cost; else for nothing (it failed before the provider took it)."""
        return self._commit(self._error_cost(error, reply, output_text), reply)

    async def asettle_error(self, error: BaseException, reply: Any = None, *,
                            output_text: str | None = None) -> CallCost | None:
        return await self._acommit(self._error_cost(error, reply, output_text), reply)

    def _error_cost(self, error: BaseException, reply: Any, output_text: str | None) -> CallCost | None:
        guard, admitted = self.guard, self.admitted
        if reply is None:
            reply = reply_in_error(error)  # an SDK error that carries the billed answer (a failed parse)
        if reply is not None or output_text or not billed_unknown(error):
            return self._with_unanswered(guard._settlement(admitted, reply, None, output_text))
        # The last attempt is one of those that got no answer: the reservation charged covers it.
        cost = guard._charged_by_policy(admitted, f"the call ended in {type(error).__name__} while the "
                                        "provider may have answered it in full: charged its reservation")
        return self._with_unanswered(cost, covered=1)

    def _with_unanswered(self, cost: CallCost | None, covered: int = 0) -> CallCost | None:
        return self.guard._charged_for_attempts(self.admitted, cost, self.attempts, covered)

    def settle_unseen(self) -> CallCost | None:
        """Settle a call whose end was never seen (its run vanished: its task was cancelled, or a
        handler raised before the reply reached us): its whole reservation for each request its SDK
        sent that the provider may have billed (``count_attempts``); nothing if none went out (its
        start was aborted) or its requests were not counted."""
        billed = self.attempts.billable if self.attempts is not None else 0
        if not billed:
            return self._commit(None, None)
        why = (f"the call ended unseen after {billed} request{'s' if billed > 1 else ''} the provider may have "
               "answered and billed: charged its reservation for each")
        return self._commit(self.guard._plus_reservations(self.admitted, None, billed, why), None)

    def count_attempts(self) -> Counting:
        """A ``with`` / ``async with`` block around the model call that counts the requests its SDK
        sends: each resent request that got no answer is charged the reservation, the most it can
        cost (``keep_alive`` counts them already)."""
        counting = Counting()
        self.attempts = counting.attempts
        return counting

    def keep_alive(self) -> Any:
        """A context manager that renews this call's hold while the block runs: wrap the model call.
        It also counts the requests a retrying SDK sends (``count_attempts``)."""
        lease = self.guard._lease(self.admitted)
        return _Counted(lease, self.count_attempts()) if self.admitted.candidate.counts_requests else lease

    def akeep_alive(self) -> Any:
        """The async twin of ``keep_alive`` (``async with``)."""
        lease = self.guard._alease(self.admitted)
        return _Counted(lease, self.count_attempts()) if self.admitted.candidate.counts_requests else lease

    def settle(self, reply: Any = None, *, usage: TokenUsage | None = None,
               output_text: str | None = None, interrupted: bool = False) -> CallCost | None:
        """Replace the hold by the actual cost: ``usage`` if given, else the reply's usage, else the
        input estimate plus ``output_text`` (the call ended without a usage report); with none of
        them the call failed before any output and costs nothing. ``interrupted``: a stream that
        broke off after streaming output its last usage report came before (a report at its start):
        ``usage`` is charged with at least ``output_text``'s tokens as output."""
        return self._commit(self._with_unanswered(self.guard._settlement(self.admitted, reply, usage, output_text,
                                                                         interrupted)), reply)

    async def asettle(self, reply: Any = None, *, usage: TokenUsage | None = None,
                      output_text: str | None = None, interrupted: bool = False) -> CallCost | None:
        return await self._acommit(
            self._with_unanswered(self.guard._settlement(self.admitted, reply, usage, output_text, interrupted)),
            reply)

    def _commit(self, cost: CallCost | None, reply: Any) -> CallCost | None:
        try:
            self.guard._settle_sync(self.admitted, cost.charged_nano if cost else 0, cost)
        except BudgetStoreUnavailableError as error:
            if self.events is not None and has_handlers(self.events):
                dispatch_custom_event(EVENT_STORE_ERROR, _store_error("settle", error, self.guard.policy),
                                      config=self.events)
            raise
        if cost is not None:
            _annotate(reply, cost)
            if self.events is not None:
                self.guard._report_cost(self.events, cost)
        return cost

    async def _acommit(self, cost: CallCost | None, reply: Any) -> CallCost | None:
        try:
            await self.guard._settle_async(self.admitted, cost.charged_nano if cost else 0, cost)
        except BudgetStoreUnavailableError as error:
            if self.events is not None and has_handlers(self.events):
                await adispatch_custom_event(EVENT_STORE_ERROR, _store_error("settle", error, self.guard.policy),
                                             config=self.events)
            raise
        if cost is not None:
            _annotate(reply, cost)
            if self.events is not None:
                await self.guard._areport_cost(self.events, cost)
        return cost


class _Counted:
    """A call's lease, with the count of its SDK's requests (sync and async ``with``)."""

    __slots__ = ("lease", "counting")

    def __init__(self, lease: Any, counting: Counting) -> None:
        self.lease, self.counting = lease, counting

    def __enter__(self) -> _Counted:
        self.lease.__enter__()
        self.counting.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        self.counting.__exit__()
        return self.lease.__exit__(*exc)

    async def __aenter__(self) -> _Counted:
        await self.lease.__aenter__()
        self.counting.__enter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        self.counting.__exit__()
        return await self.lease.__aexit__(*exc)


_STORED_CONTEXT_KEYS = frozenset((*STORED_CONTEXT_KWARGS, "extra_body"))  # call kwargs that may name one


def _counting_model(candidate: _Candidate, ref: ModelRef | None) -> Any:
    """What to hand the estimator as the model a call on ``ref`` goes to: the candidate's own model
    when ``ref`` is it (its settings may matter), else the name of the model the call chose."""
    if candidate.runnable is not None and (ref is None or not ref.name or ref.name == candidate.counted_as):
        return candidate.runnable
    return (ref.name if ref is not None else None) or candidate.ref.name


def _output_model(admitted: Admitted) -> Any:
    """The model a call's output is counted as: the one it was priced for (``_counting_model``)."""
    refs = admitted.estimate.refs
    return _counting_model(admitted.candidate, refs[0] if refs else None)


def _counted_name(candidate: _Candidate, estimate: Estimate) -> str:
    """The model name a call's prompt was counted as (typical mode learns per model)."""
    model = _counting_model(candidate, estimate.refs[0] if estimate.refs else None)
    return model if isinstance(model, str) and model else candidate.label


def _keeps_ledger(store: Any, method: str) -> bool:
    """Whether ``store`` keeps a ledger: it has ``method``, and it was not built with
    ``ledger_max_rows=0`` (then no row is made: it would be dropped)."""
    return callable(getattr(store, method, None)) and getattr(store, "ledger_max_rows", None) != 0


def _annotate(output: Any, cost: CallCost) -> None:
    metadata = getattr(output, "response_metadata", None)
    if isinstance(metadata, dict):
        metadata[METADATA_KEY] = cost.as_metadata()


def _store_error(operation: str, error: Exception, policy: BudgetPolicy) -> dict[str, Any]:
    return {"operation": operation, "outcome": policy.on_store_error, "error": type(error).__name__,
            "message": str(error)[:300]}


def _explained(call: _Call, admitted: Admitted | None) -> bool:
    """Whether the admission has decision events to send (refusals, store errors, a shadow decision)."""
    return bool(call.refusals or call.store_errors or (admitted is not None and admitted.shadow))


def _shadow_detail(admitted: Admitted, detail: str) -> str:
    """A shadow call's ledger detail: what enforce mode would have done, and why."""
    why = admitted.would_refuse[-1].describe() if admitted.would_refuse else ""
    did = {"refusal": "would refuse", "degrade": f"would degrade to {admitted.would_serve}",
           "clamp": "would shrink the output cap to fit"}[admitted.shadow]  # type: ignore[index]
    return "; ".join(x for x in (f"shadow: {did}" + (f" ({why})" if why else ""), detail) if x)


def _decision_events(call: _Call, admitted: Admitted | None, policy: BudgetPolicy
                     ) -> list[tuple[str, dict[str, Any]]]:
    """Custom events that explain the guard's decision: each store error, each degrade, a final refusal;
    in shadow mode the refusal or degrade enforce mode would have made (``"shadow": True``)."""
    events: list[tuple[str, dict[str, Any]]] = []
    if admitted is not None and admitted.shadow in ("refusal", "degrade"):
        would = admitted.would_refuse or []
        if admitted.shadow == "refusal":
            events.append((EVENT_REFUSAL, {"refusals": [asdict(r) for r in would], "shadow": True}))
        elif would:
            events.append((EVENT_DEGRADE, {"from_model": would[0].model, "to_model": admitted.would_serve,
                                           "refusal": asdict(would[0]), "shadow": True}))
    for operation, error in call.store_errors:
        # fail_closed refused the call; fail_open served it, unless the allowance ran out.
        outcome = policy.on_store_error if admitted is not None or policy.on_store_error == "fail_closed" \
            else "allowance_exhausted"
        events.append((EVENT_STORE_ERROR, {**_store_error(operation, error, policy), "outcome": outcome}))
    ladder_refusals = call.refusals if admitted is not None else call.refusals[:-1]
    for i, refusal in enumerate(ladder_refusals):
        to = call.refusals[i + 1].model if i + 1 < len(call.refusals) else admitted.candidate.label
        events.append((EVENT_DEGRADE, {"from_model": refusal.model, "to_model": to, "refusal": asdict(refusal)}))
    if admitted is None and call.refusals:
        events.append((EVENT_REFUSAL, {"refusals": [asdict(r) for r in call.refusals]}))
    return events


def _asking_for_stream_usage(model: Runnable) -> Runnable:
    """ChatOpenAI on a custom base_url streams without usage: use a copy that asks for it.

    The copy also serves invokes that a listener turns into streams (``astream_events``,
    LangGraph's "messages" mode), which would otherwise end with no usage to charge.
    """
    if isinstance(model, RunnableBinding):
        inner = _asking_for_stream_usage(model.bound)
        return model if inner is model.bound else model.model_copy(update={"bound": inner})
    if "stream_usage" in getattr(type(model), "model_fields", {}) and not model.stream_usage:
        return model.model_copy(update={"stream_usage": True})
    return model



def _priced_as(card: RateCard | None, served: str) -> str | None:
    """Which price entry charged the call, when it is not the served model's own: a cloud reselling
    a vendor (``card.priced_as``), or the dearest candidate for a serving model nothing prices."""
    if card is None:
        return None
    if card.priced_as:
        return card.priced_as
    return card.model if card.model and card.model.lower() != served.lower() else None


def _closing(chunks: Any) -> Any:
    """Close an async stream we stop reading (a break does not close an async generator)."""
    return contextlib.aclosing(chunks) if hasattr(chunks, "aclose") else contextlib.nullcontext()


def _with_cost(last: Any, cost: CallCost) -> AIMessageChunk:
    """The stream's last chunk (the provider's, else a new empty one) carrying the call's cost."""
    if last is None:
        return AIMessageChunk(content="", chunk_position="last", response_metadata={METADATA_KEY: cost.as_metadata()})
    _annotate(last, cost)
    return last


def _generate_options(callbacks: Any, tags: Any, metadata: Any, run_name: Any, run_id: Any, count: int
                      ) -> dict[str, Any]:
    options: dict[str, Any] = {"callbacks": callbacks, "tags": tags, "metadata": metadata, "run_name": run_name}
    if run_id is not None and count == 1:  # a run id names one run
        options["run_id"] = run_id
    return options


def _step_options(child: RunnableConfig, options: Mapping[str, Any]) -> dict[str, Any]:
    """``generate``'s own arguments for the serving model: our run's callbacks (or the caller's), the
    tags and metadata, the run name and id the caller gave for the model's run."""
    return {"callbacks": child.get("callbacks"), "tags": child.get("tags"), "metadata": child.get("metadata"),
            "run_name": options.get("run_name"), "run_id": options.get("run_id")}


def _config_of(options: Mapping[str, Any]) -> RunnableConfig:
    return ensure_config({k: v for k, v in options.items() if v is not None and k != "run_id"})


# -- what a guard's bind / with_config / with_retry / with_fallbacks return -----------------------


class _GuardedBinding(_KeepsGuarding, RunnableBinding):
    """LangChain's ``RunnableBinding`` over a guard, whose ``with_fallbacks`` guards its fallbacks."""

    @classmethod
    def lc_id(cls) -> list[str]:
        return RunnableBinding.lc_id()  # serialized, and revived, as LangChain's own binding


class _GuardedRetry(_KeepsGuarding, RunnableRetry):
    """LangChain's ``RunnableRetry`` over a guard, whose ``with_fallbacks`` guards its fallbacks."""

    @classmethod
    def lc_id(cls) -> list[str]:
        return RunnableRetry.lc_id()


class _GuardedFallbacks(_KeepsGuarding, RunnableWithFallbacks):
    """LangChain's ``RunnableWithFallbacks`` over a guard (its fallbacks guarded already), whose own
    ``with_fallbacks`` guards the fallbacks given to it."""

    @classmethod
    def lc_id(cls) -> list[str]:
        return RunnableWithFallbacks.lc_id()


_GUARDED_TYPES: dict[type, type] = {RunnableBinding: _GuardedBinding, RunnableRetry: _GuardedRetry,
                                    RunnableWithFallbacks: _GuardedFallbacks}


def _sent_settings(estimate: Estimate) -> dict[str, Any]:
    """What the guard sends with a call: the output cap it reserved when the call sets none (or a
    smaller one, shrunk to fit), and the built-in tool uses it held for; {} for neither."""
    settings = {estimate.cap_kwarg: estimate.output_tokens} if estimate.send_cap and estimate.cap_kwarg else {}
    if estimate.max_tool_calls is not None:
        settings["max_tool_calls"] = estimate.max_tool_calls
    return settings


def _guarding(runnable: Any) -> Any:
    """``runnable`` (a wrapper LangChain built over a guard) as its ``_KeepsGuarding`` twin."""
    kind = type(runnable)
    if isinstance(runnable, _KeepsGuarding) or not kind.__module__.startswith("langchain_core."):
        return runnable
    for base, twin in _GUARDED_TYPES.items():
        if isinstance(runnable, base):  # LangChain's own, or its typed chat-model binding
            return twin(**{name: getattr(runnable, name) for name in kind.model_fields})
    return runnable


def _guard_under(runnable: Any) -> BudgetGuard:
    """The guard under a chain of LangChain wrappers (bindings, retries, fallbacks)."""
    while not isinstance(runnable, BudgetGuard):
        runnable = runnable.runnable if isinstance(runnable, RunnableWithFallbacks) else runnable.bound
    return runnable


def _only_models(runnable: Any) -> bool:
    """Whether every runnable a ``with_fallbacks`` may call is a model (under bindings), its own
    fallbacks' included: then one guard over it prices each."""
    inner = innermost_model(runnable)
    if isinstance(inner, RunnableWithFallbacks):
        return all(_only_models(m) for m in inner.runnables)
    return isinstance(inner, BaseLanguageModel)


# -- serialization: a guard is its model(s) and the options its budget was built from ------------


def _shared_store(options: Mapping[str, Any]) -> bool:
    """Whether options name a store other processes share (a URL), not the in-process one."""
    store = options.get("store")
    return isinstance(store, str) and not store.startswith("memory")


def _revive_guard(llm: Any, degrade_to: Any, options: dict[str, Any], primary_bound: frozenset[str]) -> BudgetGuard:
    guard = BudgetGuard(llm, degrade_to=degrade_to, **options)
    guard._primary_bound = primary_bound
    return guard
