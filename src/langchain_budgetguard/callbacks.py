"""``get_cost_callback()``: track the tokens and exact cost of every chat model call in a block.

A tracker, not a guard: it never refuses or breaks a call. A model it cannot
price is still counted (tokens, requests) and reported as unpriced, with a
warning. Same attribute names as LangChain's OpenAI callback.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult
from langchain_core.tracers.context import register_configure_hook

from .errors import UnknownModelPriceError
from .estimate import get_estimator
from .messages import to_messages
from .money import format_usd
from .pricing import ModelRef, Pricer, default_pricer, model_ref_from_run
from .usage import TokenUsage, answered_from_cache, usage_from_llm_result

__all__ = ["CostCallbackHandler", "ModelTotals", "get_cost_callback"]


@dataclass
class ModelTotals:
    """Per-model totals of one tracker."""

    model: str
    requests: int = 0
    usage: TokenUsage = TokenUsage()
    cost: Decimal | None = Decimal(0)  # None: this model could not be priced

    @property
    def priced(self) -> bool:
        return self.cost is not None


class CostCallbackHandler(BaseCallbackHandler):
    """Counts tokens, requests and exact Decimal cost per model. Thread-safe."""

    raise_error = False
    run_inline = True

    def __init__(self, pricer: Pricer | None = None) -> None:
        super().__init__()
        self.pricer = pricer if pricer is not None else default_pricer()
        self.by_model: dict[str, ModelTotals] = {}
        self.total_tokens = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prompt_tokens_cached = 0
        self.reasoning_tokens = 0
        self.successful_requests = 0
        self.total_cost = Decimal(0)
        self.unpriced_models: set[str] = set()
        self.estimated_requests = 0
        self._runs: dict[UUID, tuple[ModelRef, Any]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        lines = [
            f"Tokens Used: {self.total_tokens}",
            f"\tPrompt Tokens: {self.prompt_tokens}",
            f"\tCompletion Tokens: {self.completion_tokens}",
            f"Successful Requests: {self.successful_requests}",
            f"Total Cost (USD): {format_usd(self.total_cost)}",
        ]
        if self.unpriced_models:
            lines.append(f"Unpriced models (not in Total Cost): {', '.join(sorted(self.unpriced_models))}")
        return "\n".join(lines)

    __str__ = __repr__

    @property
    def always_verbose(self) -> bool:
        return True

    # -- callback events -------------------------------------------------------------------

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        ref = model_ref_from_run(serialized, kwargs.get("invocation_params"), metadata)
        with self._lock:
            self._runs[run_id] = (ref, messages)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        ref = model_ref_from_run(serialized, kwargs.get("invocation_params"), metadata)
        with self._lock:
            self._runs[run_id] = (ref, prompts)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        # A stream that broke off after its first chunk was billed: LangChain passes what it produced.
        response = kwargs.get("response")
        if any(getattr(g, "text", "") or getattr(getattr(g, "message", None), "usage_metadata", None)
               for gens in getattr(response, "generations", None) or () for g in gens):
            self.on_llm_end(response, run_id=run_id)
            return
        with self._lock:
            self._runs.pop(run_id, None)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        # One run is one request, whatever its number of choices (the parser reports the request's
        # usage once and zeros for the other choices of an n>1 request).
        with self._lock:
            ref, prompt = self._runs.pop(run_id, (ModelRef(None), None))
        messages = [getattr(g, "message", None) for gens in response.generations for g in gens]
        if messages and all(answered_from_cache(m) for m in messages):
            return  # LangChain's cache answered: no request was sent
        reported = [(u, m) for u, m in usage_from_llm_result(response) if u is not None]
        usage = sum((u for u, _ in reported), TokenUsage())
        if usage.total_tokens == 0:
            usage = _estimate_usage(prompt, response)
        reported_model = next((m for _, m in reported if m), None)
        # The model the reply names served the call (a router's, a provider's own choice).
        self._record(ModelRef(reported_model or ref.name, ref.provider), usage, ref.name)

    # -- accounting ------------------------------------------------------------------------

    def _record(self, ref: ModelRef, usage: TokenUsage, asked: str | None = None) -> None:
        cost: Decimal | None
        try:
            cost = self.pricer.rate_card(ref).cost(usage) if ref.name else None
        except UnknownModelPriceError:
            cost = None
        if cost is None and asked and asked != ref.name:  # a reply's name nothing prices: the model asked for
            ref = ModelRef(asked, ref.provider)
            try:
                cost = self.pricer.rate_card(ref).cost(usage)
            except UnknownModelPriceError:
                cost = None
        label = ref.name or "unknown model"
        with self._lock:
            totals = self.by_model.get(label)
            if totals is None:
                totals = self.by_model[label] = ModelTotals(label)
            totals.requests += 1
            totals.usage = totals.usage + usage
            self.successful_requests += 1
            self.prompt_tokens += usage.input_tokens
            self.completion_tokens += usage.output_tokens
            self.total_tokens += usage.total_tokens
            self.prompt_tokens_cached += usage.cache_read_tokens
            self.reasoning_tokens += usage.reasoning_tokens
            self.estimated_requests += usage.estimated
            if cost is None:
                totals.cost = None
                first = label not in self.unpriced_models
                self.unpriced_models.add(label)
            else:
                if totals.cost is not None:
                    totals.cost += cost
                self.total_cost += cost
                first = False
        if first:
            warnings.warn(
                f"get_cost_callback: no price for model {label!r}; its tokens are counted but its cost is not "
                "in total_cost. Add a price with get_cost_callback(prices={...}).",
                stacklevel=2,
            )


def _estimate_usage(prompt: Any, response: LLMResult) -> TokenUsage:
    """A provider that reported no usage (a stream without usage): count what was sent and received."""
    estimator = _TYPICAL
    messages = [m for item in prompt or () for m in to_messages(item)]  # chat runs: lists; LLM runs: strings
    text = "".join(g.text for gens in response.generations for g in gens)
    return TokenUsage(
        input_tokens=estimator.input_tokens(messages) if messages else 0,
        output_tokens=estimator.output_tokens(text) if text else 0,
        estimated=True,
    )


_TYPICAL = get_estimator("typical")


_context_handler: ContextVar[CostCallbackHandler | None] = ContextVar("budgetguard_cost_callback", default=None)
register_configure_hook(_context_handler, inheritable=True)
_process_handlers: list[CostCallbackHandler] = []
_process_lock = threading.Lock()
_PROCESS_ENV = "LANGCHAIN_BUDGETGUARD_TRACK_PROCESS"


class _ProcessFanout(BaseCallbackHandler):
    """Added to every callback manager while a ``scope="process"`` tracker is open (any thread)."""

    raise_error = False
    run_inline = True

    def _each(self, event: str, *args: Any, **kwargs: Any) -> None:
        for handler in tuple(_process_handlers):
            getattr(handler, event)(*args, **kwargs)

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self._each("on_chat_model_start", *args, **kwargs)

    def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        self._each("on_llm_start", *args, **kwargs)

    def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        self._each("on_llm_end", *args, **kwargs)

    def on_llm_error(self, *args: Any, **kwargs: Any) -> None:
        self._each("on_llm_error", *args, **kwargs)


# LangChain builds a hook's handler in every thread when the hook's environment variable is set:
# that is the one switch all threads see, so a process-wide tracker turns it on while it is open.
register_configure_hook(
    ContextVar("budgetguard_process_fanout", default=None), True, _ProcessFanout, _PROCESS_ENV
)


@contextmanager
def get_cost_callback(
    *, prices: dict[str, Any] | None = None, fallback_price: Any = None, tool_fees: dict[str, Any] | None = None,
    scope: Literal["context", "process"] = "context",
) -> Iterator[CostCallbackHandler]:
    """Track every chat model call made inside the ``with`` block; yields the running totals.

    ``scope="context"`` (default) sees calls in this context: chains, agents, streams, async tasks
    and LangChain's own thread pools (they copy the context). Code that starts plain threads should
    run them with ``contextvars.copy_context().run``, or use ``scope="process"`` to see every call
    made anywhere in the process while the block is open. ``prices``, ``fallback_price`` and
    ``tool_fees`` are ``Pricer``'s.
    """
    handler = CostCallbackHandler(
        Pricer(prices, fallback_price, tool_fees=tool_fees) if prices or fallback_price or tool_fees else None)
    if scope == "process":
        with _process_lock:
            _process_handlers.append(handler)
            os.environ[_PROCESS_ENV] = "1"
        try:
            yield handler
        finally:
            with _process_lock:
                _process_handlers.remove(handler)
                if not _process_handlers:
                    os.environ.pop(_PROCESS_ENV, None)
        return
    if scope != "context":
        raise ValueError(f"scope: expected 'context' or 'process', got {scope!r}")
    token = _context_handler.set(handler)
    try:
        yield handler
    finally:
        _context_handler.reset(token)
