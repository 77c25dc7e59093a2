"""``BudgetMiddleware``: a budget for every model step of a LangChain v1 agent.

    agent = create_agent(llm, tools, middleware=[BudgetMiddleware(limit=5.0, degrade_to=[cheaper])])

Each model step is reserved before the call (the agent's model, else the first
``degrade_to`` model that fits), served, and settled from the reply's usage. When
no model fits, the run ends cleanly with an AIMessage saying the budget is
exhausted (``on_exhausted="end"``) or raises ``BudgetExceededError`` (``"raise"``).
The same admission machinery as ``BudgetGuard``: same limits, store, prices, estimates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config
from langchain_core.tracers.context import register_configure_hook
from langgraph.types import Command

try:
    from langchain.agents.middleware.types import (
        AgentMiddleware,
        ExtendedModelResponse,
        ModelRequest,
        ModelResponse,
    )
    from langchain.agents.structured_output import OutputToolBinding, ProviderStrategy, ToolStrategy
except ImportError as exc:  # pragma: no cover - langchain is an optional dependency
    raise ImportError("BudgetMiddleware needs LangChain v1 agents: pip install 'langchain>=1.0'") from exc

from .enforce import ChargedStep, budget_token, charged_budgets, charged_steps, chat_models_in
from .errors import BudgetExceededError
from .guard import METADATA_KEY, BudgetGuard, Reservation
from .policy import BudgetPolicy
from .runs import StreamTap

__all__ = ["BudgetMiddleware"]

OnExhausted = Literal["end", "raise"]


def _default_message(error: BudgetExceededError) -> str:
    return f"I had to stop here: the budget for this run is exhausted ({error.refusal.describe()})."


class BudgetMiddleware(AgentMiddleware):
    """Reserve, degrade, settle and stop an agent's model steps within a budget.

    ``BudgetMiddleware(limit=5.0)`` or ``BudgetMiddleware(policy)`` with a ``BudgetPolicy`` or a
    model-less ``BudgetGuard`` (to share its budget). Ids for per-user/project/... limits come from
    the agent's runtime context (``context=...``, key or attribute ``user_id`` etc.), then the run's
    ``configurable`` and ``metadata``. Emits custom events ``budgetguard_degrade``,
    ``budgetguard_refusal`` and ``budgetguard_cost`` (see ``astream_events``).
    """

    def __init__(
        self,
        policy: BudgetPolicy | BudgetGuard | None = None,
        *,
        degrade_to: Sequence[Any] = (),
        on_exhausted: OnExhausted = "end",
        exhausted_message: str | Callable[[BudgetExceededError], str] = _default_message,
        **policy_options: Any,
    ) -> None:
        super().__init__()
        if policy is not None and policy_options:
            raise TypeError(f"Pass either a policy or policy options, not both: {sorted(policy_options)}")
        if isinstance(policy, BudgetGuard):
            policy = policy.policy
        if policy is not None and not isinstance(policy, BudgetPolicy):
            raise TypeError(f"policy: expected a BudgetPolicy or a BudgetGuard, got {type(policy).__name__}")
        self.policy = policy if policy is not None else BudgetPolicy(**policy_options)
        if on_exhausted not in ("end", "raise"):
            raise ValueError(f"on_exhausted: expected 'end' or 'raise', got {on_exhausted!r}")
        self.degrade_to = tuple(degrade_to)
        self.on_exhausted = on_exhausted
        self.exhausted_message = exhausted_message
        self.token = budget_token(self.policy)
        self._guards: dict[int, tuple[Any, BudgetGuard]] = {}

    # -- the decisions, shared by the sync and async hooks ---------------------------------

    def _guard_for(self, model: Any) -> BudgetGuard:
        hit = self._guards.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        # The guard's ladder asks a ChatOpenAI on a custom base_url for stream usage (a model copy),
        # so steps the agent streams are charged from the provider's usage.
        guard = BudgetGuard(model, degrade_to=self.degrade_to, policy=self.policy)
        if len(self._guards) > 64:
            self._guards.clear()
        self._guards[id(model)] = (model, guard)  # holding the model keeps its id from being reused
        return guard

    def _already_guarded(self, request: ModelRequest) -> bool:
        model = request.model
        return isinstance(model, BudgetGuard) and budget_token(model.policy) == self.token

    def _reserve_args(self, request: ModelRequest) -> tuple[BudgetGuard, list[BaseMessage], dict[str, Any],
                                                            dict[str, Any], RunnableConfig]:
        config = ensure_config()  # the agent's model node: its run is the parent of our events
        ids = _ids_from_context(getattr(request.runtime, "context", None), self.policy)
        messages: list[BaseMessage] = list(request.messages)
        if request.system_message is not None:
            messages.insert(0, request.system_message)
        call_config = {**config, "configurable": {**(config.get("configurable") or {}), **ids}}
        # Tools (and the structured-output schema) are bound by the agent after this hook: pass
        # them so their schemas count.
        bound = _structured_kwargs(request)
        kwargs = {**bound, **request.model_settings, "tools": bound["tools"]}
        return self._guard_for(request.model), messages, call_config, kwargs, config

    def _mark(self, reservation: Reservation) -> tuple[Any, Any]:
        """Tell ``enforce_budget`` the step's call is charged to this budget: the call of the model
        served, not that of any other model a middleware inside this one calls."""
        models = chat_models_in(reservation.model)  # none found: every call in the step is taken as charged
        steps = {t: m for t, m in charged_steps.get().items() if t != self.token}
        if models:
            steps[self.token] = ChargedStep(models)
        return charged_budgets.set(charged_budgets.get() | {self.token}), charged_steps.set(steps)

    def _charged_reply(self, response: Any) -> Any:
        """The step's reply to settle for: None when ``enforce_budget`` charged it already (a model
        a middleware inside this one swapped in answered: its call was not the step's model's)."""
        reply = _ai_message(response)
        step = charged_steps.get().get(self.token)
        return None if step is not None and step.was_enforced(reply) else reply

    @staticmethod
    def _unmark(marks: tuple[Any, Any]) -> None:
        charged_steps.reset(marks[1])
        charged_budgets.reset(marks[0])

    @staticmethod
    def _served(request: ModelRequest, reservation: Reservation) -> ModelRequest:
        """The request on the model that fitted, with the output cap the guard reserved for it."""
        model, settings = reservation.model, reservation.model_settings
        if model is request.model and not settings:
            return request
        return request.override(model=model, model_settings={**request.model_settings, **settings})

    def _exhausted(self, error: BudgetExceededError) -> ModelResponse:
        if self.on_exhausted == "raise":
            raise error
        text = self.exhausted_message(error) if callable(self.exhausted_message) else self.exhausted_message
        refusals = [dataclasses.asdict(r) for r in error.refusals]
        message = AIMessage(content=text, response_metadata={METADATA_KEY: {"exhausted": True, "refusals": refusals}})
        # The run ends here: an agent that waits for a structured response would otherwise ask the
        # model again (and be refused again) until its recursion limit.
        return ExtendedModelResponse(model_response=ModelResponse(result=[message]),
                                     command=Command(update={"jump_to": "end"}))

    @staticmethod
    def _failure(error: BaseException, streamed: StreamTap) -> dict[str, Any]:
        """How to settle a step that raised: a reply the agent could not parse
        (StructuredOutputValidationError) was still billed; a stream that broke off costs its input
        and the output so far; before any output, nothing (``settle_error``: unless it timed out or
        was cancelled waiting for an answer)."""
        message = getattr(error, "ai_message", None)
        if isinstance(message, AIMessage):
            return {"reply": message}
        return {"output_text": streamed.text() or None}

    # -- hooks ------------------------------------------------------------------------------

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        if self._already_guarded(request):
            return handler(request)
        guard, messages, call_config, kwargs, config = self._reserve_args(request)
        try:
            reservation = guard.reserve(messages, call_config, kwargs=kwargs, events=config)
        except BudgetExceededError as error:
            return self._exhausted(error)
        streamed = StreamTap()
        marks = self._mark(reservation), _streamed.set(streamed)
        try:
            with reservation.keep_alive():  # renews the hold while the step runs; counts resent requests
                response = handler(self._served(request, reservation))
                reply = self._charged_reply(response)
        except BaseException as error:
            reservation.settle_error(error, **self._failure(error, streamed))
            raise
        finally:
            _streamed.reset(marks[1])
            self._unmark(marks[0])
        reservation.settle(reply)
        return response

    async def awrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], Any]) -> Any:
        if self._already_guarded(request):
            return await handler(request)
        guard, messages, call_config, kwargs, config = self._reserve_args(request)
        try:
            reservation = await guard.areserve(messages, call_config, kwargs=kwargs, events=config)
        except BudgetExceededError as error:
            return self._exhausted(error)
        streamed = StreamTap()
        marks = self._mark(reservation), _streamed.set(streamed)
        try:
            async with reservation.akeep_alive():
                response = await handler(self._served(request, reservation))
                reply = self._charged_reply(response)
        except BaseException as error:
            await reservation.asettle_error(error, **self._failure(error, streamed))
            raise
        finally:
            _streamed.reset(marks[1])
            self._unmark(marks[0])
        await reservation.asettle(reply)
        return response


# -- helpers ---------------------------------------------------------------------------------


# What the model step streams, when a listener makes the agent stream (a configure hook reaches
# the model's run, which the middleware does not create).
_streamed: ContextVar[StreamTap | None] = ContextVar("budgetguard_middleware_streamed", default=None)
register_configure_hook(_streamed, inheritable=True)


def _ids_from_context(context: Any, policy: BudgetPolicy) -> dict[str, str]:
    """``user_id``/``project_id``/... for the policy's per-scope limits, from a dict or an object."""
    ids: dict[str, str] = {}
    if context is None:
        return ids
    for limit in policy.limits:
        key = limit.id_field
        if key is None or key in ids:
            continue
        value = context.get(key) if isinstance(context, Mapping) else getattr(context, key, None)
        if value is not None:
            ids[key] = value
    return ids


def _structured_kwargs(request: ModelRequest) -> dict[str, Any]:
    """The tools and kwargs the agent binds for the step: its tools, plus the response format's
    schema as the agent sends it (``ToolStrategy``: one tool per schema, tool choice "any";
    ``ProviderStrategy``: its ``response_format``). A raw schema or ``AutoStrategy`` is counted as
    tools: the agent picks provider or tool strategy per model, and the schema costs either way."""
    tools = list(request.tools)
    kwargs: dict[str, Any] = {}
    fmt = request.response_format
    if fmt is not None:
        if isinstance(fmt, ProviderStrategy):
            kwargs.update(fmt.to_model_kwargs())
        else:
            strategy = fmt if isinstance(fmt, ToolStrategy) else ToolStrategy(getattr(fmt, "schema", fmt))
            tools += [OutputToolBinding.from_schema_spec(spec).tool for spec in strategy.schema_specs]
            kwargs["tool_choice"] = "any"
    if request.tool_choice is not None and "tool_choice" not in kwargs:
        kwargs["tool_choice"] = request.tool_choice
    return {**kwargs, "tools": tools}


def _ai_message(response: Any) -> AIMessage | None:
    if isinstance(response, AIMessage):
        return response
    inner = getattr(response, "model_response", None)  # ExtendedModelResponse
    if inner is not None:
        return _ai_message(inner)
    for message in reversed(getattr(response, "result", None) or ()):
        if isinstance(message, AIMessage):
            return message
    return None
