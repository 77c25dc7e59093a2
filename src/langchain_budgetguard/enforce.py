"""``enforce_budget``: a budget for every chat model call in a block, including code you don't construct.

    with enforce_budget(policy, user_id="alice"):
        third_party_chain.invoke(...)      # each model call inside is reserved, then settled

A callback handler, added to every callback manager made in the block (a configure
hook on a ContextVar, as ``get_cost_callback`` does). It reserves in
``on_chat_model_start`` and raises ``BudgetExceededError`` there to abort a call
that does not fit: only a synchronous handler with ``raise_error=True`` can stop a
run, and it does so for ``ainvoke`` and streams too. It cannot switch models, so it
refuses. Calls that a ``BudgetGuard`` or ``BudgetMiddleware`` already charges to the
same budget are skipped (the middleware charges every model run inside its step).

Each call gets its own random call id (``enforce-`` + 128 random bits), never one derived
from LangChain's ``run_id``: callers set ``run_id`` (often to a request id) and may repeat
it, and a repeated call id would let the store take a second call for a retry of the first.
A ``run_id`` only pairs a call's end with its start: when several calls share one, each
end (and each streamed chunk) goes to the call whose start event its run manager fired (the
event's metadata dict is the run manager's: two streams iterated alternately in one thread or
task are told apart so), else to the one its own thread (or asyncio task) made, the oldest if none.

While a call runs, its holds are renewed in the background (``leases.shared_keeper``), so
a call that outlives ``lease_seconds`` keeps them, and the requests its model's SDK sends are
counted (``attempts``): each one it resent after it got no answer is charged the reservation, as
a guard charges it. The start event names no model object: the handler finds the model in the
frame of LangChain's ``generate`` / ``stream`` that fired it. A call that gets no end event (another handler
aborted its start after this one reserved, or its task was cancelled) is noticed when LangChain
drops its run id, at the next call the block sees or when the block ends (a run id kept past the
block, by a kept traceback, is settled by the lease keeper within a third of a lease of being
dropped): it is charged the reservation for each request its SDK sent that may have been billed,
else the chunks it streamed if it streamed (the enforcer follows each call's chunks), and released
if none went out. A handler ahead of this one that fails in ``on_llm_end`` or ``on_llm_error`` leaves
the event in the error's traceback: the error leaving the block settles the call from there.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, BaseLLM
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk, LLMResult
from langchain_core.outputs.chat_generation import merge_chat_generation_chunks
from langchain_core.runnables.config import ensure_config
from langchain_core.tracers.context import register_configure_hook

from .attempts import Attempts, count_here, finish
from .attempts import watch as watch_attempts
from .estimate import max_output_tokens
from .failures import llm_ends_in, llm_errors_in
from .leases import LeaseHold, shared_keeper
from .messages import billed_text_of
from .policy import BudgetPolicy, LimitStatus
from .pricing import model_ref_from_run
from .streaming import output_after_report
from .usage import TokenUsage, usage_from_llm_result

if TYPE_CHECKING:
    from .guard import Reservation

__all__ = ["BudgetEnforcer", "GUARDED_KEY", "budget_token", "calling_model", "charged_budgets", "enforce_budget",
           "new_call_id"]

GUARDED_KEY = "budgetguard_budget"
"""Run metadata naming the budget (``budget_token``) a guard already charges this model call to."""

charged_budgets: ContextVar[frozenset[str]] = ContextVar("budgetguard_charged_budgets", default=frozenset())
"""Budgets the model call made in this context is already charged to (set by ``BudgetMiddleware``)."""

def budget_token(policy: BudgetPolicy) -> str:
    """Names a budget's counters in this process: same name and same store object, same counters."""
    return f"{policy.name}@{id(policy.store):x}"


@dataclass(frozen=True)
class _Entry:
    policy: BudgetPolicy
    ids: Mapping[str, Any]
    token: str


def _where() -> tuple[int, Any]:
    """The thread and asyncio task a callback runs in: a call's start and end share them."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running event loop in this thread
        task = None
    return threading.get_ident(), task


@dataclass(eq=False)
class _Running:
    """One call an enforcer admitted: where it started, its reservations, the event it claimed."""

    where: tuple[int, Any]
    event: object
    key: Any
    reservations: list[Reservation] = field(default_factory=list)
    leases: list[LeaseHold] = field(default_factory=list)  # renew each hold while the call runs
    run: Any = None  # a weak reference to the run's id: LangChain's run managers hold it while it runs
    attempts: Attempts | None = None  # the requests its model's SDK sends, when they can be counted
    # It streamed output after its last usage report (``streaming.output_after_report``): a report
    # at the stream's start does not cover it if the stream breaks off.
    unreported: bool = False
    # The chunks it streamed (``on_llm_new_token``): an end that carries none of them (an invoke that
    # streams and broke off), or no end at all (a handler ahead of this one failed on it), is charged them.
    chunks: list[Any] = field(default_factory=list)

    def watch(self, run_id: UUID, orphans: deque[_Running]) -> None:
        """Note when the run is gone without an end (a later handler aborted its start): ``orphans``."""
        try:
            self.run = weakref.ref(run_id, lambda _: orphans.append(self))
        except TypeError:  # an id that takes no weak reference: the end event alone settles it
            self.run = None

    def is_running(self) -> bool:
        return self.run is None or self.run() is not None

    def keep_leases(self, ended: Callable[[], None]) -> None:
        """Renew each hold while the run lives; once it is gone without an end, ``ended`` settles it."""
        keeper = shared_keeper()
        for reservation in self.reservations:
            policy, admitted = reservation.guard.policy, reservation.admitted
            lease = keeper.hold(policy.store, admitted.call_id, admitted.keys, policy.lease_seconds,
                                alive=self.is_running, ended=ended)
            lease.__enter__()
            self.leases.append(lease)

    def end_leases(self) -> None:
        for lease in self.leases:
            lease.__exit__(None, None, None)
        self.leases.clear()

    def count_requests(self, model: Any) -> None:
        """Count the requests ``model``'s SDK sends from here until the call ends (``end``)."""
        if model is None or not watch_attempts(model):
            return
        self.attempts = Attempts()
        for reservation in self.reservations:
            reservation.attempts = self.attempts
        count_here(self.attempts)

    def end(self) -> None:
        """The call is over: its holds are no longer renewed, its requests no longer counted."""
        self.end_leases()
        if self.attempts is not None:
            finish(self.attempts)


class BudgetEnforcer(BaseCallbackHandler):
    """Reserves each chat model call on its start, settles it on its end or error. Thread-safe."""

    raise_error = True  # the only way a handler can stop a call
    run_inline = True  # run in the caller's context (ContextVars) and before the request goes out

    def __init__(self, entries: Sequence[_Entry]) -> None:
        super().__init__()
        self.entries = tuple(entries)
        self.tokens = frozenset(e.token for e in self.entries)
        # run id (its int: the enforcer keeps no reference to the id itself) -> calls in flight under it
        self._runs: dict[Any, list[_Running]] = {}
        self._orphans: deque[_Running] = deque()  # calls whose run is gone without an end event
        self._lock = threading.Lock()

    def status(self, config: Mapping[str, Any] | None = None) -> list[LimitStatus]:
        """The limits of every enforced budget, for this block's ids."""
        return [s for e in self.entries for s in e.policy.status(config, **e.ids)]

    # -- callback events ---------------------------------------------------------------------

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *,
                            run_id: UUID, metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._start(serialized, list(messages[0]) if messages else [], run_id, metadata, kwargs)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._start(serialized, [HumanMessage(p) for p in prompts[:1]], run_id, metadata, kwargs)

    def on_llm_new_token(self, token: str, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        # Whether a stream has output its last usage report does not cover: the error event of a
        # stream that broke off passes only the chunks added together, not which came after the report.
        with self._lock:
            calls = self._runs.get(_key(run_id))
            running = _this_or_oldest(calls) if calls else None
        if running is None:
            return
        running.chunks.append(chunk if chunk is not None else token)
        try:
            message = getattr(chunk, "message", None)  # a chat model's chunk; an LLM's has only text
            text = billed_text_of(message) if message is not None else (token if isinstance(token, str) else "")
            running.unreported = output_after_report(message, text, running.unreported)
        except Exception:  # noqa: BLE001 - a chunk it cannot read never breaks the stream
            running.unreported = True

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, response: Any = None, **kwargs: Any) -> None:
        # A stream that broke off passes what it got; before any output there is nothing to charge
        # (unless the call timed out or was cancelled waiting for an answer it may have been billed for).
        self._end(run_id, response, failed=True, error=error)

    # -- reserve and settle ------------------------------------------------------------------

    def _applicable(self, metadata: Mapping[str, Any]) -> list[_Entry]:
        """The entries a call is charged to: not the budgets a guard or a middleware charges it to."""
        skip = set(charged_budgets.get())
        marker = metadata.get(GUARDED_KEY)
        if isinstance(marker, str):
            skip.add(marker)
        current = _current.get()
        if current is not None and current is not self:
            # Nested blocks: the innermost enforcer of this context sees the call too, and its ids win.
            skip |= current.tokens
        return [e for e in self.entries if e.token not in skip]

    def _start(self, serialized: Any, messages: list[BaseMessage], run_id: UUID, metadata: Any,
               kwargs: Mapping[str, Any]) -> None:
        from .guard import BudgetGuard

        if self._orphans:
            self._settle_orphans()
        key = _key(run_id)
        # The event's identity: every handler of one start event gets the same metadata dict (the
        # callback manager's), and each call has its own manager; without one, the message list.
        event = metadata if isinstance(metadata, dict) else messages
        metadata = metadata if isinstance(metadata, Mapping) else {}
        entries = [e for e in self._applicable(metadata) if _claim(key, e.token, event)]
        if not entries:
            return
        model = calling_model()
        running = _Running(_where(), event, key)
        try:
            params = dict(kwargs.get("invocation_params") or {})
            if max_output_tokens(None, params) is None and metadata.get("ls_max_tokens"):
                params["max_tokens"] = metadata["ls_max_tokens"]
            ref = model_ref_from_run(serialized, params, metadata)
            context = ensure_config()  # the enclosing runnable's config: its configurable may name ids
            config = {"configurable": context.get("configurable") or {}, "metadata": metadata}
            for entry in entries:
                guard = BudgetGuard(policy=entry.policy)
                ids_config = {**config, "configurable": {**config["configurable"], **entry.ids}}
                running.reservations.append(guard.reserve(messages, ids_config, kwargs=params, model=ref,
                                                          call_id=new_call_id()))
        except BaseException:
            for reservation in running.reservations:
                reservation.settle()
            _release(key, [e.token for e in entries], event)
            raise
        running.watch(run_id, self._orphans)
        # A long call keeps its holds: renewed in the background until it ends. One whose run is gone
        # without an end after the block ended (nothing else would settle it) is settled from there.
        running.keep_leases(functools.partial(self._settle_orphan, running))
        running.count_requests(model)
        with self._lock:
            self._runs.setdefault(key, []).append(running)

    def _take(self, key: Any) -> _Running | None:
        """The call in flight under run id ``key`` that this end belongs to: the one started in this
        thread/task, else the oldest (a stream finished elsewhere)."""
        with self._lock:
            calls = self._runs.get(key)
            if not calls:
                return None
            running = _this_or_oldest(calls)
            calls.remove(running)
            if not calls:
                del self._runs[key]
            running.run = None  # it ends now: not an orphan
            return running

    def _settle_orphans(self) -> None:
        """Settle the calls whose run is gone without an end. Another handler aborted the run's
        start after this one reserved (no request went out: nothing is charged), or the call ended
        unseen: its task was cancelled (LangChain reports no error for that), or a handler ahead of
        this one raised in ``on_llm_end`` and the error was caught in the block. Each request its
        SDK sent that may have been billed is charged the reservation (``settle_unseen``)."""
        while self._orphans:
            self._settle_orphan(self._orphans.popleft())

    def _settle_orphan(self, running: _Running) -> None:
        """Settle one call whose run is gone without an end (see ``_settle_orphans``), unless it
        ended or was settled meanwhile."""
        with self._lock:
            calls = self._runs.get(running.key, [])
            if not any(c is running for c in calls):
                return
            calls.remove(running)
            if not calls:
                del self._runs[running.key]
        running.end()
        billed = running.attempts.billable if running.attempts is not None else 0
        if running.chunks and not billed:
            # It streamed, so the provider billed it: what it streamed (a request its SDK sent that may
            # have been billed is charged its whole reservation instead, the most it can cost).
            self._charge(running, None, failed=True)
            return
        try:
            for reservation in running.reservations:
                reservation.settle_unseen()
        finally:
            _release(running.key, [budget_token(r.guard.policy) for r in running.reservations], running.event)

    def answered(self, error: BaseException) -> None:
        """Settle the calls that ``error`` ended after their model answered: a handler with
        ``raise_error`` set ahead of this one failed in ``on_llm_end``, so this one never saw the
        reply; the traceback holds it (``failures.llm_ends_in``). Or it failed in ``on_llm_error``:
        the call is settled for its error and what it streamed (``failures.llm_errors_in``)."""
        for run_id, response in llm_ends_in(error):
            if run_id is not None:
                self._end(run_id, response)
        for run_id, failure, response in llm_errors_in(error):
            self._end(run_id, response, failed=True, error=failure)

    def _end(self, run_id: UUID, response: Any, failed: bool = False, error: BaseException | None = None) -> None:
        running = self._take(_key(run_id))
        if self._orphans:
            self._settle_orphans()
        if running is None:
            return
        running.end()
        self._charge(running, response, failed, error)

    def _charge(self, running: _Running, response: Any, failed: bool = False,
                error: BaseException | None = None) -> None:
        """Settle ``running`` for ``response`` (its ``LLMResult``; None: none), or, when it failed
        with no output in it, for the chunks it streamed; then give its claims back."""
        usage, text, served = _reported(response)
        if failed and usage is None and not text and running.chunks:
            usage, text, served = _reported(_streamed(running.chunks))
        # No usage reported: the input estimate plus the output seen; a failure before any output is free.
        output_text = text if (text or not failed) else None
        # A stream that broke off after output its last usage report came before (a report at its
        # start): at least that output is charged, as a guarded stream's is.
        interrupted = failed and running.unreported
        try:
            for reservation in running.reservations:
                if error is not None and usage is None:
                    reservation.settle_error(error, output_text=output_text)
                else:  # (the reply names the model that served: it is priced, not the one asked for)
                    reservation.settle(served if usage is not None else None, usage=usage, output_text=output_text,
                                       interrupted=interrupted)
        finally:
            _release(running.key, [budget_token(r.guard.policy) for r in running.reservations], running.event)


# LangChain's methods that fire a model's start event, by their code: the frame running one holds
# the model as ``self``.
_FIRING = frozenset(
    code for cls, names in ((BaseChatModel, ("generate", "agenerate", "stream", "astream", "_chat_model_stream_v3",
                                             "_achat_model_stream_v3")),
                            (BaseLLM, ("generate", "agenerate", "stream", "astream")))
    for name in names if (code := getattr(getattr(cls, name, None), "__code__", None)) is not None)


def calling_model(depth: int = 24) -> Any:
    """The model whose start event this handler runs in: ``self`` of the nearest LangChain method
    that fires it (sync frames, and the awaiting coroutines of an async one). None if not found."""
    frame = sys._getframe(1)
    while frame is not None and depth > 0:
        if frame.f_code in _FIRING:
            return frame.f_locals.get("self")
        frame, depth = frame.f_back, depth - 1
    return None


# The run managers' methods that deliver a model run's token, end and error events, by their code
# (the async end and error run in a task of their own, ``shielded``: their frames are still the
# bottom of its stack).
_DELIVERING = frozenset(
    code for cls in (CallbackManagerForLLMRun, AsyncCallbackManagerForLLMRun)
    for name in ("on_llm_new_token", "on_llm_end", "on_llm_error")
    if (code := getattr(inspect.unwrap(getattr(cls, name)), "__code__", None)) is not None)


def _delivered_event(depth: int = 16) -> Any:
    """The metadata dict of the run manager delivering this event: the one its start event was
    given (``_Running.event``). None if not found."""
    frame = sys._getframe(1)
    while frame is not None and depth > 0:
        if frame.f_code in _DELIVERING:
            return getattr(frame.f_locals.get("self"), "metadata", None)
        frame, depth = frame.f_back, depth - 1
    return None


def _this_or_oldest(calls: list[_Running]) -> _Running:
    """Of the calls in flight under one run id, the one an event belongs to: the one whose start
    its run manager fired (two streams iterated alternately in one thread or task), else the one
    started in this thread/task, else the oldest (a stream finished elsewhere)."""
    if len(calls) == 1:
        return calls[0]
    event = _delivered_event()
    if isinstance(event, dict):
        running = next((c for c in calls if c.event is event), None)
        if running is not None:
            return running
    here = _where()
    return next((c for c in calls if c.where == here), calls[0])


def _key(run_id: Any) -> Any:
    """A run id as a dict key that does not keep the id object alive (see ``_Running.watch``)."""
    return run_id.int if isinstance(run_id, UUID) else run_id


def new_call_id() -> str:
    """A fresh call id for one call ``enforce_budget`` admits: ``enforce-`` + 128 random bits."""
    return "enforce-" + os.urandom(16).hex()


def _streamed(chunks: list[Any]) -> Any:
    """The ``LLMResult`` of what a call streamed: its chunks added together (a chunk without a
    message counts its text)."""
    if all(isinstance(c, ChatGenerationChunk) for c in chunks):
        merged: Any = merge_chat_generation_chunks(chunks)
    else:
        merged = GenerationChunk(text="".join(c if isinstance(c, str) else getattr(c, "text", "") or ""
                                              for c in chunks))
    return LLMResult(generations=[[merged]] if merged is not None else [])


def _reported(response: Any) -> tuple[TokenUsage | None, str, Any]:
    """The usage a run's ``LLMResult`` reports (None when none), the text it generated and its
    first reply message (it names the model that served; None when there is none)."""
    if response is None:
        return None, "", None
    usage = TokenUsage()
    for reported, _ in usage_from_llm_result(response):
        if reported is not None:
            usage = usage + reported
    generations = [g for gens in getattr(response, "generations", None) or () for g in gens]
    # What the output was billed for: its text, tool calls and reasoning (as a guarded stream counts it).
    text = "".join((billed_text_of(m) if (m := getattr(g, "message", None)) is not None else getattr(g, "text", ""))
                   or "" for g in generations)
    served = next((m for g in generations if (m := getattr(g, "message", None)) is not None), None)
    if served is not None and isinstance(getattr(served, "response_metadata", None), dict):
        # A copy: the settle annotates what it is given, and the caller's reply stays as the model made it.
        served = served.model_copy(update={"response_metadata": dict(served.response_metadata)})
    return (usage if usage.total_tokens else None), text, served


# Which budget each running call is charged to, process-wide: two enforcers that both see a call
# (say, nested blocks whose handlers reach a thread without the ContextVar) charge it once. Keyed by
# (run_id, budget token); the value holds the claimed events themselves (compared by identity and
# kept alive while claimed, so that an id is never reused): calls that share a run_id are each claimed.
_claims: dict[tuple[Any, str], list[object]] = {}
_claims_lock = threading.Lock()


def _claim(key: Any, token: str, event: object) -> bool:
    with _claims_lock:
        taken = _claims.setdefault((key, token), [])
        if any(e is event for e in taken):
            return False
        taken.append(event)
        return True


def _release(key: Any, tokens: Sequence[str], event: object) -> None:
    with _claims_lock:
        for token in tokens:
            taken = _claims.get((key, token))
            if taken is None:
                continue
            for i, e in enumerate(taken):
                if e is event:
                    del taken[i]
                    break
            if not taken:
                del _claims[(key, token)]


_current: ContextVar[BudgetEnforcer | None] = ContextVar("budgetguard_enforcer", default=None)
register_configure_hook(_current, inheritable=True)


@contextmanager
def enforce_budget(policy: Any, **ids: Any) -> Iterator[BudgetEnforcer]:
    """Reserve and settle every chat model call made in the block against ``policy``.

    ``policy`` is a ``BudgetPolicy`` or a ``BudgetGuard`` (its budget). ``user_id=``,
    ``project_id=``... name whose budget it is; a call's own ``metadata`` (or its chain's
    ``configurable``) can name the ids not given here. Nested blocks enforce every budget
    they name, the inner ids winning for a budget both name; a call is never charged twice
    to one budget, nor when a ``BudgetGuard`` or ``BudgetMiddleware`` on that budget serves it.
    """
    policy = getattr(policy, "policy", policy)
    if not isinstance(policy, BudgetPolicy):
        raise TypeError(f"enforce_budget: expected a BudgetPolicy or a BudgetGuard, got {type(policy).__name__}")
    bad = [k for k in ids if not k.endswith("_id")]
    if bad:
        raise TypeError(f"enforce_budget: ids are given as <scope>_id=..., e.g. user_id='alice'; got {bad}")
    entry = _Entry(policy, dict(ids), budget_token(policy))
    outer = _current.get()
    entries = [e for e in (outer.entries if outer else ()) if e.token != entry.token] + [entry]
    enforcer = BudgetEnforcer(entries)
    token = _current.set(enforcer)
    try:
        yield enforcer
    except BaseException as error:
        enforcer.answered(error)
        raise
    finally:
        _current.reset(token)
        gc_pending = enforcer._orphans  # calls whose run ended without an end event: settle them now,
        if gc_pending:                  # not at a next call that may never come
            enforcer._settle_orphans()
