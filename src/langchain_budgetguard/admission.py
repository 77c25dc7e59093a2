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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import BudgetExceededError, BudgetStoreUnavailableError, CallIdReusedError, Refusal
from .money import nano_to_usd
from .pricing import ModelRef, RateCard
from .stores.base import Counter, Hold, ReserveResult

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


@dataclass(slots=True)
class Admitted:
    """A reservation that went through: which candidate, what is held, under which call id."""

    candidate: Any
    estimate: Estimate
    index: int
    call_id: str
    keys: tuple[str, ...]
    held: bool = True  # the store placed the hold (False: admitted fail-open while it was unreachable)
    local_store: MemoryStore | None = None  # the outage's allowance it was held on


def admit(policy: BudgetPolicy, plan: CounterPlan, ladder: Sequence[Any], estimate: Callable[[Any], Estimate],
          call_id: str, refusals: list[Refusal], *, shrink: bool = True
          ) -> Generator[Request, ReserveResult | Exception, Admitted]:
    """Try each candidate of ``ladder``; yield reservations for the driver to carry out.

    ``estimate(candidate)`` prices the call on a candidate; ``refusals`` collects why each was refused.
    """
    last = len(ladder) - 1
    refused: list[tuple[int, Any, Estimate, ReserveResult]] = []
    for index, candidate in enumerate(ladder):
        rung_id = call_id if index == 0 else f"{call_id}.{index}"
        admitted = yield from _try(policy, plan, candidate, estimate(candidate), index, last, rung_id, refusals,
                                   refused)
        if admitted is not None:
            return admitted
    for index, candidate, full, result in refused if shrink else ():
        counters = plan.counters(policy.degrade_at if index < last else None)
        if len(result.states) != len(counters):
            continue
        room = min(c.limit - s.spent - s.held for c, s in zip(counters, result.states))
        clamped = shrink_to_fit(policy, full, room)
        if clamped is None:
            continue
        admitted = yield from _try(policy, plan, candidate, clamped, index, last, f"{call_id}.c{index}", refusals,
                                   None)
        if admitted is not None:
            return admitted
    raise BudgetExceededError(refusals)


def shrink_to_fit(policy: BudgetPolicy, estimate: Estimate, room: int) -> Estimate | None:
    """``estimate`` with the largest output cap whose hold fits in ``room`` nano-USD, if that cap is at
    least ``min_output_tokens``; None when even that does not fit (or shrinking is off)."""
    least = policy.min_output_tokens
    if not least or estimate.output_tokens <= least or estimate.cap_kwarg is None:
        return None  # shrinking is off, or the cap is small already, or it cannot be sent
    low = fitting_output_tokens(policy, estimate, room)
    if low < least:
        return None
    strict = policy.estimator.mode == "strict"
    reserve, input_cost = estimate.card.hold_nano(estimate.input_tokens, low, dearer_cache_write=strict)
    return Estimate(estimate.card, estimate.input_tokens, reserve + estimate.extra, input_cost, low, True, True,
                    estimate.extra, estimate.refs, estimate.cap_kwarg, estimate.cap_source)


def fitting_output_tokens(policy: BudgetPolicy, estimate: Estimate, room: int) -> int:
    """The largest output cap below ``estimate``'s whose hold fits in ``room`` nano-USD (0: none does)."""
    strict = policy.estimator.mode == "strict"
    room -= estimate.extra

    def fits(cap: int) -> bool:
        return estimate.card.hold_nano(estimate.input_tokens, cap, dearer_cache_write=strict)[0] <= room

    if not fits(1):
        return 0
    low, high = 1, max(estimate.output_tokens - 1, 1)  # fits(low): find the largest cap that does
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _try(policy: BudgetPolicy, plan: CounterPlan, candidate: Any, estimate: Estimate, index: int, last: int,
         call_id: str, refusals: list[Refusal], refused: list[Any] | None
         ) -> Generator[Request, ReserveResult | Exception, Admitted | None]:
    """Reserve ``estimate`` for ``candidate``: the admitted call, or None (the refusal is recorded)."""
    fraction = policy.degrade_at if index < last else None
    expired_hold = policy.expired_hold
    on_expiry = (estimate.input_cost if expired_hold == "charge_input"
                 else estimate.reserve if expired_hold == "charge_reserved" else 0)
    hold = Hold(call_id, estimate.reserve, policy.lease_seconds, on_expiry)
    result = yield ("reserve", plan.counters(fraction), hold)
    admitted = Admitted(candidate, estimate, index, call_id, plan.keys)
    if isinstance(result, Exception):
        if policy.on_store_error == "fail_closed":
            raise result
        admitted.held = False
        yield from _fail_open(policy, admitted)
        return admitted
    if result.ok:
        return admitted
    if result.reused:  # never a refusal to degrade from: this call id already named another call
        raise CallIdReusedError(call_id)
    blocked = result.blocked or 0
    state = result.states[blocked]
    room = plan.counters(fraction)[blocked].limit - state.spent - state.held
    refusals.append(plan.refusal(
        blocked, state, estimate.reserve, candidate.label,
        input_estimate=nano_to_usd(estimate.input_cost),
        output_estimate=nano_to_usd(estimate.reserve - estimate.input_cost),
        output_tokens=estimate.output_tokens, output_cap_source=estimate.cap_source,
        fitting_output_tokens=fitting_output_tokens(policy, estimate, room),
    ))
    if refused is not None:
        refused.append((index, candidate, estimate, result))
    return None


def _fail_open(policy: BudgetPolicy, admitted: Admitted) -> Generator[Request, ReserveResult | Exception, None]:
    """The store is down and the policy is fail_open: serve, bounded by a per-process allowance."""
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
