"""``BudgetMiddleware``: a budget for every model step of a LangChain v1 agent.

    agent = create_agent(llm, tools, middleware=[BudgetMiddleware(limit=5.0, degrade_to=[cheaper])])

Each model step is reserved before the call (the agent's model, else the first
``degrade_to`` model that fits), served, and settled from the reply's usage. Every
other chat model run inside the step (a retry, a fallback, a routed model, an inner
middleware's own call) is reserved when it starts, and each run is charged for the
reply it produced (``_StepRuns``). When no model fits, the run ends cleanly with an
AIMessage saying the budget is exhausted (``on_exhausted="end"``) or raises
``BudgetExceededError`` (``"raise"``).
The same admission machinery as ``BudgetGuard``: same limits, store, prices, estimates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Literal
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.callbacks.base import BaseCallbackManager
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config, var_child_runnable_config
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

from .attempts import Attempts, count_here
from .attempts import finish as finish_attempts
from .attempts import watch as watch_attempts
from .enforce import GUARDED_KEY, budget_token, calling_model, charged_budgets
from .errors import BudgetExceededError
from .estimate import max_output_tokens
from .failures import llm_ends_in
from .guard import METADATA_KEY, BudgetGuard, Reservation
from .messages import text_of
from .models import innermost
from .policy import BudgetPolicy
from .pricing import model_ref_from_run

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

    def _side_guard(self) -> BudgetGuard:
        """A model-less guard on the budget: reserves the other model runs inside a step."""
        guard = self.__dict__.get("_side")
        if guard is None:
            guard = self.__dict__["_side"] = BudgetGuard(policy=self.policy)
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

    # -- hooks ------------------------------------------------------------------------------

    def _begin_step(self, reservation: Reservation | None, call_config: RunnableConfig, config: RunnableConfig,
                    settle_now: bool) -> tuple[_StepRuns, tuple[Any, ...]]:
        """The step's watcher, first among the handlers of every model run inside the step, and the
        marks to reset when the step ends (``_end_step``)."""
        runs = _StepRuns(self, reservation, call_config, config, settle_now)
        callbacks = config.get("callbacks")
        inner = config
        if isinstance(callbacks, BaseCallbackManager):  # first: it sees a reply before a raising handler
            manager = callbacks.copy()
            manager.handlers.insert(0, runs)
            manager.inheritable_handlers.insert(0, runs)
            inner = {**config, "callbacks": manager}
        elif isinstance(callbacks, list):
            inner = {**config, "callbacks": [runs, *callbacks]}
        marks = (charged_budgets.set(charged_budgets.get() | {self.token}), _step_runs.set(runs),
                 var_child_runnable_config.set(inner))
        return runs, marks

    @staticmethod
    def _end_step(marks: tuple[Any, ...]) -> None:
        var_child_runnable_config.reset(marks[2])
        _step_runs.reset(marks[1])
        charged_budgets.reset(marks[0])

    @staticmethod
    def _refused(runs: _StepRuns, error: BaseException) -> BudgetExceededError | None:
        """The refusal of a model run inside the step (a fallback, a router's choice, a side call)
        that ended the step, if that is why it raised."""
        return error if isinstance(error, BudgetExceededError) and any(e is error for e in runs.refusals) else None

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        if self.token in charged_budgets.get():  # an outer BudgetMiddleware on this budget charges it all
            return handler(request)
        guard, messages, call_config, kwargs, config = self._reserve_args(request)
        reservation = None
        if not self._already_guarded(request):  # else the guard charges the step's run (not the others)
            try:
                reservation = guard.reserve(messages, call_config, kwargs=kwargs, events=config)
            except BudgetExceededError as error:
                return self._exhausted(error)
            request = self._served(request, reservation)
        # The step's hold is renewed while it runs (and its SDK's requests counted).
        with reservation.keep_alive() if reservation is not None else contextlib.nullcontext():
            runs, marks = self._begin_step(reservation, call_config, config, settle_now=True)
            try:
                response = handler(request)
            except BaseException as error:
                self._end_step(marks)
                runs.settle_all(error)
                refused = self._refused(runs, error)
                if refused is None:
                    raise
                return self._exhausted(refused)
            self._end_step(marks)
            runs.settle_all(None)
        return response

    async def awrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], Any]) -> Any:
        if self.token in charged_budgets.get():
            return await handler(request)
        guard, messages, call_config, kwargs, config = self._reserve_args(request)
        reservation = None
        if not self._already_guarded(request):
            try:
                reservation = await guard.areserve(messages, call_config, kwargs=kwargs, events=config)
            except BudgetExceededError as error:
                return self._exhausted(error)
            request = self._served(request, reservation)
        async with reservation.akeep_alive() if reservation is not None else contextlib.nullcontext():
            runs, marks = self._begin_step(reservation, call_config, config, settle_now=False)
            try:
                response = await handler(request)
            except BaseException as error:
                self._end_step(marks)
                await runs.asettle_all(error)
                refused = self._refused(runs, error)
                if refused is None:
                    raise
                return self._exhausted(refused)
            self._end_step(marks)
            await runs.asettle_all(None)
        return response


class _Run:
    """One chat model run inside a step: its reservation, and how it ended."""

    __slots__ = ("reservation", "own", "lease", "attempts", "parts", "reply", "error", "ended", "settled")

    def __init__(self, reservation: Reservation, own: bool, lease: Any = None) -> None:
        self.reservation, self.own, self.lease = reservation, own, lease
        self.attempts: Attempts | None = None
        self.parts: list[str] = []
        self.reply: Any = None
        self.error: BaseException | None = None
        self.ended = self.settled = False

    def stop(self) -> None:
        """No more renewals or request counts: the run is over."""
        if self.lease is not None:
            lease, self.lease = self.lease, None
            lease.__exit__(None, None, None)
        if self.attempts is not None:
            finish_attempts(self.attempts)

    def outcome(self, step_error: BaseException | None) -> tuple[str, Any, dict[str, Any]]:
        """How to settle it: ``("settle", reply, {})``, ``("error", error, {output_text})`` or
        ``("unseen", None, {})``."""
        text = "".join(self.parts) or None
        if self.reply is not None:
            return "settle", self.reply, {}
        error = self.error if self.error is not None else step_error
        if error is not None:
            return "error", error, {"output_text": text}
        if text:
            return "settle", None, {"output_text": text}
        return "unseen", None, {}


class _StepRuns(BaseCallbackHandler):
    """Every chat model run inside one agent step, from its start to its end.

    The step's own model run is charged to the step's reservation (made before the step, where the
    middleware can still degrade). Any other model run inside the step (a retry, a fallback model,
    a router's choice, an inner middleware's own model call) is reserved when it starts, as
    ``enforce_budget`` does, and refused (``BudgetExceededError``, before its request goes out)
    when it does not fit. Each run is charged for the reply it produced, captured in
    ``on_llm_end`` ahead of the handlers and middleware that may turn it into an error.
    """

    raise_error = True  # the only way a handler can stop a call
    run_inline = True  # in the caller's context, before the request goes out

    def __init__(self, middleware: BudgetMiddleware, step: Reservation | None, call_config: RunnableConfig,
                 events: RunnableConfig, settle_now: bool) -> None:
        super().__init__()
        self.middleware, self.step, self.call_config, self.events = middleware, step, call_config, events
        self.settle_now = settle_now  # sync steps settle each run as it ends; async ones after the step
        self.served = innermost(step.model) if step is not None else None
        self.claimed = False
        self.closed = False  # the step is over: a run that starts later settles itself when it ends
        self.runs: dict[Any, _Run] = {}
        self.order: list[_Run] = []
        self.refusals: list[BudgetExceededError] = []
        self.lock = threading.Lock()

    # -- callback events -----------------------------------------------------------------------

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *,
                            run_id: UUID, metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._start(serialized, list(messages[0]) if messages else [], run_id, metadata, kwargs)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._start(serialized, [HumanMessage(p) for p in prompts[:1]], run_id, metadata, kwargs)

    def on_llm_new_token(self, token: str, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        run = self.runs.get(run_id)
        if run is not None:
            run.parts.append(text_of(getattr(chunk, "message", None)) or token)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        run = self.runs.get(run_id)
        if run is None or run.ended:
            return
        try:
            run.reply = response.generations[0][0].message
        except (AttributeError, IndexError, TypeError):
            pass
        self._ended(run)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, response: Any = None, **kwargs: Any) -> None:
        run = self.runs.get(run_id)
        if run is None or run.ended:
            return
        run.error = error
        if not run.parts:  # a stream that broke off passes what it got
            text = "".join(getattr(g, "text", "") or "" for gens in getattr(response, "generations", None) or ()
                           for g in gens)
            if text:
                run.parts.append(text)
        self._ended(run)

    # -- reserve and settle ----------------------------------------------------------------------

    def _start(self, serialized: Any, messages: list[BaseMessage], run_id: UUID, metadata: Any,
               kwargs: Mapping[str, Any]) -> None:
        metadata = metadata if isinstance(metadata, Mapping) else {}
        if metadata.get(GUARDED_KEY) == self.middleware.token:
            return  # a BudgetGuard on this budget charges it
        model = calling_model()
        params = dict(kwargs.get("invocation_params") or {})
        if max_output_tokens(None, params) is None and metadata.get("ls_max_tokens"):
            params["max_tokens"] = metadata["ls_max_tokens"]
        ref = model_ref_from_run(serialized, params, metadata)
        with self.lock:
            own = not self.claimed and self._is_served(model, ref)
            if own:
                self.claimed = True
        if own:
            run = _Run(self.step, own=True)
        else:
            try:
                reservation = self.middleware._side_guard().reserve(messages, self.call_config, kwargs=params,
                                                                    model=ref)
            except BudgetExceededError as error:
                self.refusals.append(error)
                raise
            reservation.events = self.events
            lease = reservation.keep_alive()
            lease.__enter__()
            run = _Run(reservation, own=False, lease=lease)
        if model is not None and watch_attempts(model):  # this run's own requests, resent ones charged
            run.attempts = Attempts()
            run.reservation.attempts = run.attempts
            count_here(run.attempts)
        with self.lock:
            self.runs[run_id] = run
            self.order.append(run)

    def _is_served(self, model: Any, ref: Any) -> bool:
        """Is this a run of the model the step was reserved for (by identity; by name when the
        model cannot be found)?"""
        if self.step is None:
            return False
        return model is self.served if model is not None else ref.name == self.step.model_name

    def _ended(self, run: _Run) -> None:
        run.ended = True
        run.stop()
        if self.settle_now or self.closed:  # (a run started after its step: nobody else settles it)
            self._settle(run, None)

    def _settle(self, run: _Run, step_error: BaseException | None) -> None:
        if run.settled:
            return
        run.settled = True
        run.stop()
        how, value, options = run.outcome(step_error)
        if how == "settle":
            run.reservation.settle(value, **options)
        elif how == "error":
            run.reservation.settle_error(value, **options)
        else:
            run.reservation.settle_unseen()

    async def _asettle(self, run: _Run, step_error: BaseException | None) -> None:
        if run.settled:
            return
        run.settled = True
        run.stop()
        how, value, options = run.outcome(step_error)
        if how == "settle":
            await run.reservation.asettle(value, **options)
        elif how == "error":
            await run.reservation.asettle_error(value, **options)
        else:
            await asyncio.to_thread(run.reservation.settle_unseen)

    def _pending(self, error: BaseException | None) -> list[_Run]:
        """The runs not settled yet, with the replies a raising handler ahead of us kept from us
        (read from the error's traceback); the step's reservation first if no run claimed it.
        A run that never ended is settled as unseen (another handler aborted its start, or it was
        cancelled). Ends the step: a run that starts after it settles itself at its end."""
        self.closed = True
        if error is not None:
            for run_id, response in llm_ends_in(error):
                run = self.runs.get(run_id)
                if run is not None and run.reply is None:
                    try:
                        run.reply = response.generations[0][0].message
                    except (AttributeError, IndexError, TypeError):
                        pass
        with self.lock:
            pending = [run for run in self.order if not run.settled]
        if self.step is not None and not self.claimed:
            self.claimed = True
            self.step.attempts = None  # no run of its model went out: the requests counted were others'
            pending.insert(0, _Run(self.step, own=True))
        return pending

    def settle_all(self, error: BaseException | None) -> None:
        first: BaseException | None = None
        for run in self._pending(error):
            try:
                self._settle_unclaimed(run) if run not in self.order else self._settle(run, error)
            except BaseException as failure:  # noqa: BLE001 - settle every run, then raise the first
                first = first or failure
        if first is not None:
            raise first

    async def asettle_all(self, error: BaseException | None) -> None:
        first: BaseException | None = None
        for run in self._pending(error):
            try:
                if run not in self.order:
                    await self._asettle_unclaimed(run)
                else:
                    await self._asettle(run, error)
            except BaseException as failure:  # noqa: BLE001
                first = first or failure
        if first is not None:
            raise first

    @staticmethod
    def _settle_unclaimed(run: _Run) -> None:
        run.settled = True
        run.reservation.settle()  # nothing of the step's model went out: released

    @staticmethod
    async def _asettle_unclaimed(run: _Run) -> None:
        run.settled = True
        await run.reservation.asettle()


# -- helpers ---------------------------------------------------------------------------------


# The step being run: a configure hook adds its watcher to every callback manager made inside the
# step (also those of a model called with a config of its own), as enforce_budget's does.
_step_runs: ContextVar[_StepRuns | None] = ContextVar("budgetguard_middleware_step", default=None)
register_configure_hook(_step_runs, inheritable=True)

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
