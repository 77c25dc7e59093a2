"""Admission: which model serves a call and what it holds. The sans-I/O decisions of one call.

``admit`` is a generator. It yields store requests, ``("reserve", counters, hold)`` (or
``("local_reserve", ...)`` against this process's fail-open allowance); a driver carries each one
to the store's sync or async API and sends back the ``ReserveResult``, or the exception when the
store could not be reached. It returns the ``Admitted`` call or raises ``BudgetExceededError``.
So sync and async share every decision, and nothing here knows LangChain: the models of the ladder
are opaque candidates with a ``label``, estimated by the caller.

Order of the ladder: each model with its full output cap (degrading when one does not fit); then,
when none fits, shrink to fit: each model again with the largest output cap that fits what is left,
if that is at least ``min_output_tokens``. A whole reply from a cheaper model beats a cut one.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import BudgetExceededError, BudgetStoreUnavailableError, CallIdReusedError, Refusal
from .money import nano_to_usd
from .pricing import ModelRef, RateCard
from .stores.base import Counter, CounterState, Hold, ReserveResult
from .stores.bounds import MAX_NANO

if TYPE_CHECKING:
    from .policy import BudgetPolicy, CounterPlan
    from .stores.memory import MemoryStore

__all__ = ["Estimate", "Admitted", "Request", "admit", "shrink_to_fit", "fitting_output_tokens", "FAIL_OPEN_KEY"]

FAIL_OPEN_KEY = "fail-open-allowance"
Request = tuple  # ("reserve" | "local_reserve", counters, hold)


@dataclass(slots=True)  # built on the hot path: slots, not frozen
class Estimate:
    """What one call would cost on one model: its price card, input tokens and nano-USD amounts."""

    card: RateCard
    input_tokens: int
    reserve: int
    input_cost: int
    output_tokens: int = 0  # the output cap the reservation covers
    send_cap: bool = False  # the call sets no cap: ``output_tokens`` is sent as its cap
    clamped: bool = False  # the cap was lowered to fit what is left of the budget
    extra: int = 0  # what billed items besides tokens may add (server tool requests), in ``reserve``
    refs: tuple[ModelRef, ...] = ()  # every model that may serve the call (priced at settle)
    cap_kwarg: str | None = None  # the call kwarg that caps output (sent with ``send_cap``)
    cap_source: str = "none"  # who set the cap: call, binding, model, integration_default, none
    completions: int = 1  # the call asks for this many completions (``n``), each up to ``output_tokens``
    unsized_inputs: int = 0  # documents by URL / file id: ``input_tokens`` is then the model's input limit
    stored_context: str | None = None  # the parameter continuing provider-stored context (held likewise)
    thinking: int = 0  # output tokens it may think with inside the cap (Anthropic's budget_tokens)
    max_tool_calls: int | None = None  # the max_tool_calls sent with the call (the built-in tool uses held)

    @property
    def held_output_tokens(self) -> int:
        """The output the reservation covers: every completion at the cap."""
        return self.output_tokens * self.completions


@dataclass(slots=True)
class Admitted:
    """A reservation that went through: which candidate, what is held, under which call id.

    ``plan`` is the counters it holds on (per candidate when a limit is ``per="model"``).
    In shadow mode ``shadow`` says what enforce mode would have done (``"refusal"``, ``"degrade"``,
    ``"clamp"``, or None when the call fitted) and ``would_refuse`` holds the refusals behind it.
    """

    candidate: Any
    estimate: Estimate
    index: int
    call_id: str
    keys: tuple[str, ...]
    held: bool = True  # the store placed the hold (False: admitted fail-open while it was unreachable)
    local_store: MemoryStore | None = None  # the outage's allowance it was held on
    plan: CounterPlan | None = None
    crossed: tuple[Any, ...] = ()  # alert thresholds the reservation's expiry charges crossed (stores.base.Crossing)
    shadow: str | None = None
    would_refuse: list[Refusal] | None = None
    would_serve: str | None = None  # shadow: the model enforce mode would have served (degrade)


Plans = Callable[[Any, Estimate], "CounterPlan"]  # (candidate, its estimate) -> the counters a call draws on


def admit(policy: BudgetPolicy, plans: Plans, ladder: Sequence[Any], estimate: Callable[[Any], Estimate],
          call_id: str, refusals: list[Refusal], *, shrink: bool = True
          ) -> Generator[Request, ReserveResult | Exception, Admitted]:
    """Try each candidate of ``ladder``; yield reservations for the driver to carry out.

    ``plans(candidate, estimate)`` is the counters a call on a candidate draws on (a ``per="model"``
    limit's id is the model the estimate is for); ``estimate(candidate)``
    prices the call on it; ``refusals`` collects why each was refused. In shadow mode the first
    candidate is always served and what enforce mode would have done is worked out from the
    counters as the store saw them (``Admitted.shadow``).
    """
    if policy.mode == "shadow":
        return (yield from _shadow(policy, plans, ladder, estimate, call_id, refusals, shrink))
    return (yield from _enforce(policy, plans, ladder, estimate, call_id, refusals, shrink))


def _enforce(policy: BudgetPolicy, plans: Plans, ladder: Sequence[Any], estimate: Callable[[Any], Estimate],
             call_id: str, refusals: list[Refusal], shrink: bool, shadow: bool = False
             ) -> Generator[Request, ReserveResult | Exception, Admitted]:
    last = len(ladder) - 1
    refused: list[tuple[int, Any, Estimate, ReserveResult]] = []
    for index, candidate in enumerate(ladder):
        rung_id = call_id if index == 0 else f"{call_id}.{index}"
        full = estimate(candidate)
        admitted = yield from _try(policy, plans(candidate, full), candidate, full, index, last, rung_id,
                                   refusals, refused)
        if admitted is not None:
            return admitted
    for index, candidate, full, result in refused if shrink else ():
        plan = plans(candidate, full)
        counters = plan.counters(policy.degrade_at if index < last else None, full, policy.expired_hold)
        if len(result.states) != len(counters):
            continue
        clamped = shrink_to_fit(policy, full, *_rooms(plan, counters, result.states))
        if clamped is None:
            continue
        admitted = yield from _try(policy, plan, candidate, clamped, index, last, f"{call_id}.c{index}", refusals,
                                   None)
        if admitted is not None:
            return admitted
    raise BudgetExceededError(refusals)


def _rooms(plan: CounterPlan, counters: Sequence[Counter], states: Sequence[Any]) -> tuple[int, int | None, bool]:
    """What is left on the dollar counters (nano-USD), on the token counters (tokens; None: no such
    limit), and whether a request counter is full (no smaller call fits it)."""
    room, tokens, full = None, None, False
    for limit, counter, state in zip(plan.limits, counters, states):
        left = counter.limit - state.spent - state.held
        if limit.unit == "usd":
            room = left if room is None else min(room, left)
        elif limit.unit == "tokens":
            tokens = left if tokens is None else min(tokens, left)
        elif left < 1:
            full = True
    return (room if room is not None else MAX_NANO), tokens, full


def shrink_to_fit(policy: BudgetPolicy, estimate: Estimate, room: int, token_room: int | None = None,
                  full: bool = False) -> Estimate | None:
    """``estimate`` with the largest output cap whose hold fits in ``room`` nano-USD (and in
    ``token_room`` tokens, when a tokens limit applies), if that cap is at least
    ``min_output_tokens`` (beyond the call's thinking budget: Anthropic refuses a cap not above it,
    and a cap the thinking fills leaves no answer); None when even that does not fit (or shrinking
    is off)."""
    least = policy.min_output_tokens
    if not least:
        return None  # shrinking is off
    least += estimate.thinking
    if full or estimate.output_tokens <= least or estimate.cap_kwarg is None:
        return None  # the cap is small already, or it cannot be sent
    low = fitting_output_tokens(policy, estimate, room)
    if token_room is not None:
        low = min(low, (token_room - estimate.input_tokens) // estimate.completions)
    if low < least:
        return None
    strict = policy.estimator.mode == "strict"
    reserve, input_cost = estimate.card.hold_nano(estimate.input_tokens, low * estimate.completions,
                                                  dearer_cache_write=strict, dearest_output=strict)
    return replace(estimate, reserve=reserve + estimate.extra, input_cost=input_cost, output_tokens=low,
                   send_cap=True, clamped=True)


def fitting_output_tokens(policy: BudgetPolicy, estimate: Estimate, room: int) -> int:
    """The largest output cap below ``estimate``'s whose hold fits in ``room`` nano-USD (0: none does),
    for each of the call's completions."""
    strict = policy.estimator.mode == "strict"
    room -= estimate.extra
    completions = estimate.completions

    def fits(cap: int) -> bool:
        hold = estimate.card.hold_nano(estimate.input_tokens, cap * completions, dearer_cache_write=strict,
                                       dearest_output=strict)
        return hold[0] <= room

    if not fits(1):
        return 0
    low, high = 1, max(estimate.output_tokens - 1, 1)  # fits(low): find the largest cap that does
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _hold(policy: BudgetPolicy, estimate: Estimate, call_id: str) -> Hold:
    expired_hold = policy.expired_hold
    on_expiry = (estimate.input_cost if expired_hold == "charge_input"
                 else estimate.reserve if expired_hold == "charge_reserved" else 0)
    # A counter holds at most MAX_NANO: an estimate above it (max_tokens=10**19) fits no limit, and
    # held as MAX_NANO it is refused (or shrunk to fit) like any call too dear for what is left.
    return Hold(call_id, min(estimate.reserve, MAX_NANO), policy.lease_seconds, min(on_expiry, MAX_NANO))


def _beyond_every_limit(counters: Sequence[Counter]) -> tuple[Counter, ...]:
    """``counters`` for a call whose estimate is above MAX_NANO: it is held as MAX_NANO, which would
    fit a dollar limit of exactly MAX_NANO on an empty counter; one nano-USD less refuses it there."""
    return tuple(replace(c, limit=min(c.limit, MAX_NANO - 1)) if c.amount is None else c for c in counters)


def _try(policy: BudgetPolicy, plan: CounterPlan, candidate: Any, estimate: Estimate, index: int, last: int,
         call_id: str, refusals: list[Refusal], refused: list[Any] | None
         ) -> Generator[Request, ReserveResult | Exception, Admitted | None]:
    """Reserve ``estimate`` for ``candidate``: the admitted call, or None (the refusal is recorded)."""
    fraction = policy.degrade_at if index < last else None
    counters = plan.counters(fraction, estimate, policy.expired_hold)
    if estimate.reserve > MAX_NANO:
        counters = _beyond_every_limit(counters)
    result = yield ("reserve", counters, _hold(policy, estimate, call_id))
    admitted = Admitted(candidate, estimate, index, call_id, plan.keys, plan=plan)
    if isinstance(result, Exception):
        yield from _store_down(policy, admitted, result)
        return admitted
    if result.ok:
        admitted.crossed = result.crossed
        return admitted
    if result.reused:  # never a refusal to degrade from: this call id already named another call
        raise CallIdReusedError(call_id)
    refusals.append(_refusal(policy, plan, counters, result, estimate, candidate))
    if refused is not None:
        refused.append((index, candidate, estimate, result))
    return None


def _refusal(policy: BudgetPolicy, plan: CounterPlan, counters: Sequence[Counter], result: ReserveResult,
             estimate: Estimate, candidate: Any) -> Refusal:
    """Why ``result`` refused ``estimate`` on ``candidate``, in the blocking limit's unit."""
    blocked = result.blocked or 0
    state = result.states[blocked]
    counter = counters[blocked]
    room = counter.limit - state.spent - state.held
    unit = plan.limits[blocked].unit
    if unit == "usd":
        fitting = fitting_output_tokens(policy, estimate, room)
    else:
        fitting = max(room - estimate.input_tokens, 0) // estimate.completions if unit == "tokens" else None
    amount = (estimate.reserve if counter.amount is None
              else estimate.input_tokens + estimate.held_output_tokens if unit == "tokens" else counter.amount)
    # Named as the model the call goes to (a per-call model=, a configurable choice), as it was priced.
    model = (estimate.refs[0].name if estimate.refs else None) or candidate.label
    return plan.refusal(
        blocked, state, amount, model,
        input_estimate=nano_to_usd(estimate.input_cost),
        output_estimate=nano_to_usd(estimate.reserve - estimate.input_cost),
        output_tokens=estimate.output_tokens, output_cap_source=estimate.cap_source,
        fitting_output_tokens=fitting, completions=estimate.completions,
        input_tokens=estimate.input_tokens, unsized_inputs=estimate.unsized_inputs,
        stored_context=estimate.stored_context, thinking=estimate.thinking,
    )


def _shadow(policy: BudgetPolicy, plans: Plans, ladder: Sequence[Any], estimate: Callable[[Any], Estimate],
            call_id: str, refusals: list[Refusal], shrink: bool
            ) -> Generator[Request, ReserveResult | Exception, Admitted]:
    """Shadow mode: hold the first candidate's estimate whatever the limits (counted exactly, so
    spend and alerts are as in enforce mode), then replay enforce mode's decisions against the
    counters as the store saw them, without touching the store."""
    candidate = ladder[0]
    full = estimate(candidate)
    plan = plans(candidate, full)
    counters = plan.counters(None, full, policy.expired_hold, shadow=True)
    result = yield ("reserve", counters, _hold(policy, full, call_id))
    admitted = Admitted(candidate, full, 0, call_id, plan.keys, plan=plan)
    if isinstance(result, Exception):  # an unreachable store is handled as in enforce mode (on_store_error)
        yield from _store_down(policy, admitted, result)
        return admitted
    if result.reused:
        raise CallIdReusedError(call_id)
    admitted.crossed = result.crossed
    seen = {}  # the counters as they were before this call's own hold (a placed result includes it)
    for counter, state in zip(counters, result.states):
        own = full.reserve if counter.amount is None else counter.amount
        seen[counter.key] = CounterState(state.spent, max(state.held - own, 0))
    would = _enforce(policy, plans, ladder, estimate, call_id, refusals, shrink)
    try:
        request = next(would)
        while True:
            request = would.send(_what_if(request, seen))
    except StopIteration as done:
        chosen: Admitted = done.value
        if chosen.index > 0:
            admitted.shadow, admitted.would_serve = "degrade", chosen.candidate.label
        elif chosen.estimate.clamped:
            admitted.shadow = "clamp"
    except BudgetExceededError:
        admitted.shadow = "refusal"
    admitted.would_refuse = list(refusals)
    refusals.clear()  # nothing was refused: the guard reports them as what would have been
    return admitted


def _what_if(request: Request, seen: dict[str, Any]) -> ReserveResult:
    """The store's answer to ``request`` had it come with counters as ``seen`` (counters not seen,
    of another model's ``per="model"`` limit, are taken as empty)."""
    _, counters, hold = request
    states = tuple(seen.get(c.key) or CounterState() for c in counters)
    for index, (counter, state) in enumerate(zip(counters, states)):
        amount = hold.amount if counter.amount is None else counter.amount
        if state.spent + state.held + amount > counter.limit:
            return ReserveResult(False, states, index)
    return ReserveResult(True, states)


def _store_down(policy: BudgetPolicy, admitted: Admitted, error: Exception
               ) -> Generator[Request, ReserveResult | Exception, None]:
    """The store is down: fail_closed raises ``error``; fail_open serves, unheld, bounded by a
    per-process allowance."""
    if policy.on_store_error == "fail_closed":
        raise error
    admitted.held = False
    if policy.fail_open_allowance is None:
        return
    local = [Counter(FAIL_OPEN_KEY, policy.fail_open_allowance)]
    amount = admitted.estimate.reserve
    result = yield ("local_reserve", local, Hold(admitted.call_id, amount, policy.lease_seconds, amount))
    if not isinstance(result, ReserveResult) or not result.ok:
        spent = nano_to_usd(result.states[0].spent) if isinstance(result, ReserveResult) else "?"
        raise BudgetStoreUnavailableError(
            f"The budget store is unreachable and this process has used its fail-open allowance of "
            f"{nano_to_usd(policy.fail_open_allowance)} USD (spent {spent}); refusing until the store is back."
        )
    admitted.local_store = policy.outage_store()
