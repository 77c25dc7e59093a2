"""A model whose settings change after the guard read them is reserved as it will be sent.

LangChain models are mutable. The guard resolves a model once (priced model, output cap, tools)
and kept that for every later call: after ``llm.model_name = "gpt-4o"; llm.max_tokens = 100_000``
a guard built on gpt-4o-mini with ``max_tokens=10`` still reserved 8,550 n$ per call for a call that
could cost $1 (about 117,000x its hold), and ``guard.llm = other`` kept calling the old model.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from langchain_budgetguard import BudgetExceededError, BudgetGuard
from langchain_budgetguard.snapshots import Snapshot

from tests.fakes import UsageChat

from .test_billed_items import canned, chat_openai, server  # noqa: F401 - the canned server's fixtures
from .test_tool_fees import MODEL, reply
from .test_unknown_outcome import reservation_of


def fresh(model: Any) -> Decimal:
    """What a guard that never saw the model before reserves for it."""
    return reservation_of(BudgetGuard(model, limit=1000))


@pytest.mark.parametrize("change", ["max_tokens", "model_name", "both"])
def test_a_wrapped_model_changed_in_place_is_reserved_as_it_is_now(change: str) -> None:
    llm = UsageChat(model_name="gpt-4o-mini", max_tokens=10)
    guard = BudgetGuard(llm, limit=1000)
    guard.invoke("hello")
    before = reservation_of(guard)
    if change in ("max_tokens", "both"):
        llm.max_tokens = 4000
    if change in ("model_name", "both"):
        llm.model_name = "gpt-4o"
    after = reservation_of(guard)
    assert after == fresh(llm) > before


def test_a_changed_model_that_no_longer_fits_the_limit_is_refused() -> None:
    llm = UsageChat(model_name="gpt-4o-mini", max_tokens=10)
    guard = BudgetGuard(llm, limit=Decimal("0.001"))
    guard.invoke("hello")
    llm.model_name, llm.max_tokens = "gpt-4o", 100_000
    with pytest.raises(BudgetExceededError):
        guard.invoke("hello")
    assert llm.calls == 1


def test_a_bindings_kwargs_changed_in_place_are_reserved_as_they_are_now() -> None:
    bound = UsageChat(model_name="gpt-4o").bind(max_tokens=10)
    guard = BudgetGuard(bound, limit=1000)
    guard.invoke("hello")
    before = reservation_of(guard)
    bound.kwargs["max_tokens"] = 8000  # type: ignore[attr-defined]
    assert reservation_of(guard) == fresh(bound) > before


def test_a_guard_given_another_model_calls_and_prices_that_one() -> None:
    first, second = UsageChat(model_name="gpt-4o-mini"), UsageChat(model_name="gpt-4o", max_tokens=50)
    guard = BudgetGuard(first, limit=1000)
    guard.invoke("hello")
    guard.llm = second
    reply_ = guard.invoke("hello")
    assert (first.calls, second.calls) == (1, 1)
    assert reply_.response_metadata["model_name"] == "gpt-4o"
    assert reservation_of(guard) == fresh(second)


def test_a_model_given_to_degrade_to_later_is_used() -> None:
    big = UsageChat(model_name="gpt-4o", max_tokens=4000)
    small = UsageChat(model_name="gpt-4o-mini", max_tokens=10)
    guard = BudgetGuard(big, limit=Decimal("0.001"), degrade_to=[])
    with pytest.raises(BudgetExceededError):
        guard.invoke("hello")
    guard.degrade_to = (small,)
    guard.invoke("hello")
    assert (big.calls, small.calls) == (0, 1)


def test_a_model_whose_fields_move_on_every_call_keeps_working() -> None:
    from langchain_core.language_models import FakeListChatModel

    llm = FakeListChatModel(responses=["one", "two", "three"])  # its field ``i`` counts calls
    guard = BudgetGuard(llm, limit=1000, fallback_price={"input": "1", "output": "1"})
    assert [guard.invoke("hello").content for _ in range(3)] == ["one", "two", "three"]
    assert guard.status()[0].held == 0


def test_the_real_clients_keep_their_settings_across_calls(server: Any) -> None:  # noqa: F811
    """The guard re-reads a model only when its settings moved: OpenAI's and Anthropic's chat models
    do not move theirs when called, so their resolution is kept (a snapshot stays unchanged)."""
    from langchain_anthropic import ChatAnthropic

    from langchain_budgetguard.pricing import Pricer

    from .test_billed_items import anthropic_body

    llm = chat_openai(server, MODEL, use_responses_api=True)
    guard = BudgetGuard(llm, limit=1, pricer=Pricer(hosts={"127.0.0.1": "openai"}))
    server.push(reply())
    guard.invoke("hello")
    snapshot = Snapshot.of(llm)
    server.push(reply())
    asyncio.run(guard.ainvoke("hello"))
    assert snapshot.unchanged()

    claude = ChatAnthropic(model="claude-sonnet-4-5", base_url=server.url, api_key="test", max_retries=0)
    guard = BudgetGuard(claude, limit=1, pricer=Pricer(hosts={"127.0.0.1": "anthropic"}))
    body = anthropic_body("claude-sonnet-4-5", {"input_tokens": 30, "output_tokens": 5})
    server.push(body)
    guard.invoke("hello")
    snapshot = Snapshot.of(claude)
    server.push(body, body)
    guard.invoke("hello")
    asyncio.run(guard.ainvoke("hello"))
    assert snapshot.unchanged()


def test_a_snapshot_sees_changes_at_any_depth_of_the_settings() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    bound = UsageChat().bind(tools=tools).with_fallbacks([UsageChat(model_name="gpt-4o")])
    snapshot = Snapshot.of(bound)
    assert snapshot.unchanged()
    tools[0]["function"]["parameters"]["properties"]["x"] = {"type": "string"}
    assert not snapshot.unchanged()
    snapshot = Snapshot.of(bound)
    bound.fallbacks[0].max_tokens = 9  # type: ignore[attr-defined]
    assert not snapshot.unchanged()


def test_a_setting_replaced_by_a_value_that_cannot_be_compared_counts_as_changed() -> None:
    class Ambiguous:
        def __eq__(self, other: object) -> bool:
            raise ValueError("the truth value of an array is ambiguous")

        __hash__ = None  # type: ignore[assignment]

    bound = UsageChat().bind(stop=Ambiguous())
    snapshot = Snapshot.of(bound)
    assert snapshot.unchanged()  # the same object: compared by identity
    bound.kwargs["stop"] = Ambiguous()  # type: ignore[attr-defined]
    assert not snapshot.unchanged()
