"""A cap the guard chooses leaves room for Anthropic's extended thinking.

``thinking={"type": "enabled", "budget_tokens": B}`` spends up to ``B`` output tokens thinking
inside ``max_tokens``, and Anthropic refuses a request whose ``max_tokens`` is not above ``B``.
ChatAnthropic fills in the model's whole output limit when no cap is given; the guard replaced it
with ``default_max_output_tokens`` (4,096), so every guarded call with a thinking budget above
that was refused by the provider. The guard now sends (and holds) the default plus the budget.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from langchain_budgetguard import BudgetGuard
from langchain_budgetguard.caps import output_cap
from langchain_budgetguard.estimate import DEFAULT_MAX_OUTPUT_TOKENS
from langchain_budgetguard.pricing import Pricer

from tests.providers.canned_server import CannedServer

from .test_billed_items import anthropic_body, canned, chat_anthropic, server  # noqa: F401 - fixtures

MODEL = "claude-sonnet-4-5"  # profile: 64,000 output tokens
PRICER = Pricer(hosts={"127.0.0.1": "anthropic"})
BUDGET = 8000


def thinking(budget: int = BUDGET, kind: str = "enabled") -> dict[str, Any]:
    return {"type": kind, "budget_tokens": budget} if kind == "enabled" else {"type": kind}


def sent(server: CannedServer, guard: BudgetGuard, **kwargs: Any) -> dict[str, Any]:
    server.push(anthropic_body(MODEL, {"input_tokens": 10, "output_tokens": 20}))
    guard.invoke("hello", **kwargs)
    return server.requests[-1]["body"]


def guarded(server: CannedServer, **model: Any) -> BudgetGuard:
    return BudgetGuard(chat_anthropic(server, MODEL, **model), limit=5, pricer=PRICER)


@pytest.mark.parametrize("where", ["model", "call", "bind", "extra_body"])
def test_a_chosen_cap_leaves_room_for_the_thinking_budget(server: CannedServer, where: str) -> None:
    guard = guarded(server, **({"thinking": thinking()} if where == "model" else {}))
    call: dict[str, Any] = {"thinking": thinking()} if where == "call" else \
        {"extra_body": {"thinking": thinking()}} if where == "extra_body" else {}
    if where == "bind":
        guard = BudgetGuard(chat_anthropic(server, MODEL).bind(thinking=thinking()), limit=5, pricer=PRICER)
    body = sent(server, guard, **call)
    assert body["thinking"] == thinking()  # sent as the user set it
    assert body["max_tokens"] == DEFAULT_MAX_OUTPUT_TOKENS + BUDGET  # above the budget, as Anthropic requires
    held = guard.reserve(["hello"], kwargs=call)
    try:
        assert held.admitted.estimate.output_tokens == DEFAULT_MAX_OUTPUT_TOKENS + BUDGET  # held as sent
    finally:
        held.settle()


def test_the_call_wins_over_the_model_and_extra_body_over_both(server: CannedServer) -> None:
    guard = guarded(server, thinking=thinking(20_000))
    assert sent(server, guard, thinking=thinking(2000))["max_tokens"] == DEFAULT_MAX_OUTPUT_TOKENS + 2000
    assert sent(server, guard, thinking={"type": "disabled"})["max_tokens"] == DEFAULT_MAX_OUTPUT_TOKENS
    body = sent(server, guard, thinking=thinking(2000), extra_body={"thinking": thinking(3000)})
    assert body["max_tokens"] == DEFAULT_MAX_OUTPUT_TOKENS + 3000  # the SDK sends extra_body's


@pytest.mark.parametrize("setting", [None, {"type": "disabled"}, {"type": "adaptive"},
                                     {"type": "enabled"}, {"type": "enabled", "budget_tokens": "lots"}])
def test_no_budget_no_room(server: CannedServer, setting: Any) -> None:
    guard = guarded(server, **({"thinking": setting} if setting else {}))
    assert output_cap(guard.llm).thinking == 0
    assert sent(server, guard)["max_tokens"] == DEFAULT_MAX_OUTPUT_TOKENS


def test_a_cap_the_user_set_is_sent_as_it_is(server: CannedServer) -> None:
    guard = guarded(server, thinking=thinking(), max_tokens=10_000)
    assert sent(server, guard)["max_tokens"] == 10_000
    assert sent(server, guard, max_tokens=9000)["max_tokens"] == 9000


def test_room_for_thinking_never_exceeds_the_models_output_limit(server: CannedServer) -> None:
    guard = guarded(server, thinking=thinking(62_000))
    assert sent(server, guard)["max_tokens"] == 64_000  # the model's limit: what ChatAnthropic would send


def test_a_budget_in_model_kwargs_counts() -> None:
    """A model that sends its model_kwargs as they are (ChatAnthropic moves ``thinking`` to its field)."""

    class Passthrough:
        model_kwargs = {"thinking": thinking(3000)}

    assert output_cap(Passthrough()).thinking == 3000
    assert output_cap(Passthrough(), {"thinking": thinking(1000)}).thinking == 1000


def test_thinking_turned_on_after_the_guard_was_made_counts(server: CannedServer) -> None:
    guard = guarded(server)
    assert sent(server, guard)["max_tokens"] == DEFAULT_MAX_OUTPUT_TOKENS
    guard.llm.thinking = thinking()
    assert sent(server, guard)["max_tokens"] == DEFAULT_MAX_OUTPUT_TOKENS + BUDGET


def test_shrink_to_fit_keeps_the_cap_above_the_thinking_budget(server: CannedServer) -> None:
    """Near the limit the guard lowers a call's cap to what is left (down to ``min_output_tokens``
    of answer): never to a cap Anthropic refuses, or one the thinking alone could fill."""
    from langchain_budgetguard import BudgetExceededError

    llm = chat_anthropic(server, MODEL, thinking=thinking())
    full = BudgetGuard(llm, limit=5, pricer=PRICER).reserve(["hello"])
    per_token = full.admitted.estimate.card.hold_nano(0, 1)[0]  # nano-USD per output token
    full.settle()
    room = Decimal(per_token * (BUDGET + 1000)) / 10**9  # about 1,000 tokens of answer after the thinking
    guard = BudgetGuard(llm, limit=room, pricer=PRICER)
    body = sent(server, guard)
    assert BUDGET + 256 <= body["max_tokens"] < DEFAULT_MAX_OUTPUT_TOKENS + BUDGET  # clamped, still above
    tight = BudgetGuard(llm, limit=Decimal(per_token * (BUDGET + 100)) / 10**9, pricer=PRICER)
    before = len(server.requests)
    with pytest.raises(BudgetExceededError) as refused:  # room for the thinking, not for 256 tokens of answer
        tight.invoke("hello")
    assert len(server.requests) == before
    message, fitting = str(refused.value), refused.value.refusal.fitting_output_tokens
    assert f"{BUDGET:,} of them to think" in message
    assert f"at most {fitting:,} would fit, {fitting - BUDGET:,} beyond the thinking budget" in message
    assert 0 < fitting - BUDGET < 256
    nothing = BudgetGuard(llm, limit=Decimal(per_token * (BUDGET - 100)) / 10**9, pricer=PRICER)
    with pytest.raises(BudgetExceededError) as refused:  # not even the thinking fits
        nothing.invoke("hello")
    assert "lower the thinking budget" in str(refused.value) and "A max_tokens of" not in str(refused.value)


def test_a_refusal_advises_a_cap_above_the_thinking_budget(server: CannedServer) -> None:
    from langchain_budgetguard import BudgetExceededError

    llm = chat_anthropic(server, MODEL, thinking=thinking())
    probe = BudgetGuard(llm, limit=5, pricer=PRICER).reserve(["hello"])
    per_token = probe.admitted.estimate.card.hold_nano(0, 1)[0]
    probe.settle()
    guard = BudgetGuard(llm, limit=Decimal(per_token * (BUDGET + 2000)) / 10**9, pricer=PRICER, min_output_tokens=None)
    with pytest.raises(BudgetExceededError) as refused:  # shrinking is off: refused, with advice
        guard.invoke("hello")
    fitting = refused.value.refusal.fitting_output_tokens
    assert BUDGET < fitting < BUDGET + 2000
    assert f"A max_tokens of at most {fitting:,} would fit" in str(refused.value)
    assert f"{fitting - BUDGET:,} beyond the thinking budget" in str(refused.value)


@pytest.mark.parametrize("left", [BUDGET + 1500, BUDGET - 500])
def test_a_tokens_limit_refusal_accounts_for_the_thinking_budget(server: CannedServer, left: int) -> None:
    from langchain_budgetguard import BudgetExceededError, Limit

    llm = chat_anthropic(server, MODEL, thinking=thinking())
    guard = BudgetGuard(llm, limits=[Limit(tokens=left)], pricer=PRICER, min_output_tokens=None)
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke("hello")
    message, fitting = str(refused.value), refused.value.refusal.fitting_output_tokens
    assert (fitting > BUDGET) == (left > BUDGET)
    if left > BUDGET:
        assert f"at most {fitting:,} would fit, {fitting - BUDGET:,} beyond the thinking budget" in message
    else:
        assert "not the thinking budget (8,000" in message and "max_tokens of" not in message
