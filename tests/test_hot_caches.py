"""What the hot path works out once and reuses: each cache gives what the uncached code gave, and
nothing it remembers outlives what it was made from (a new value is a new entry, a bad value is
refused every time, a row's dicts are its own)."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from types import SimpleNamespace

import pytest
from langchain_core.messages import AIMessage

from langchain_budgetguard import BudgetGuard, Limit
from langchain_budgetguard.pricing import ModelRef, served_ref
from langchain_budgetguard.stores.base import Counter, Hold
from langchain_budgetguard.stores.ledger import call_row
from langchain_budgetguard.stores.memory import MemoryStore
from langchain_budgetguard.usage import TokenUsage, billed_extras

from .fakes import UsageChat

KEY = "{b}:b:user:alice:user:day:2026-12-01"


# -- MemoryStore: a counter list is checked once, its holds are the call's own -----------------


def test_the_same_counters_hold_each_calls_own_amount() -> None:
    store = MemoryStore()
    counters = [Counter(KEY, 100)]
    assert store.reserve(counters, Hold("a", 30, 60, 5)).ok
    assert store.reserve(counters, Hold("b", 50, 60, 7)).ok
    assert store.read([KEY])[0].held == 80
    assert not store.reserve(counters, Hold("c", 21, 60)).ok  # 80 + 21 > 100: the amounts were not cached
    store.settle("a", [KEY], 10)
    assert store.read([KEY])[0].held == 50


def test_a_counter_with_a_new_limit_is_checked_against_that_limit() -> None:
    store = MemoryStore()
    assert store.reserve([Counter(KEY, 100)], Hold("a", 60, 60)).ok
    result = store.reserve([Counter(KEY, 80)], Hold("b", 30, 60))  # same key, lower limit: a new entry
    assert not result.ok and result.blocked == 0


def test_a_bad_counter_is_refused_every_time_not_remembered_as_checked() -> None:
    store = MemoryStore()
    for call_id in ("a", "b"):
        with pytest.raises(ValueError, match="limit"):
            store.reserve([Counter(KEY, -1)], Hold(call_id, 1, 60))
    assert store.read([KEY])[0].held == 0


def test_alerts_given_as_a_list_still_reserve_and_fire() -> None:
    store = MemoryStore()
    counters = [Counter(KEY, 100, alerts=[50])]  # type: ignore[arg-type]  # unhashable: checked each time
    assert store.reserve(counters, Hold("a", 10, 60)).ok
    assert store.reserve(counters, Hold("b", 10, 60)).ok
    crossed = store.settle("a", [KEY], 60).crossed
    assert [c.threshold for c in crossed] == [50]


def test_ledger_rows_read_back_at_the_store_time_with_what_they_charged() -> None:
    now = [1_800_000_000.0]
    store = MemoryStore(clock=lambda: now[0], ledger_retention_seconds=3600)
    counters = [Counter(KEY, 10**9)]
    for i, charged in enumerate((111, 222)):
        store.reserve(counters, Hold(f"c{i}", 1000, 60))
        store.settle(f"c{i}", [KEY], charged, row=call_row("b", f"c{i}", [KEY], usage=TokenUsage(input_tokens=3)))
        now[0] += 10
    rows = store.read_ledger("b")
    assert [(r.call_id, r.cost_nano) for r in rows] == [("c1", 222), ("c0", 111)]
    assert rows[1].at == datetime.fromtimestamp(1_800_000_000, timezone.utc)
    assert rows[0].at == datetime.fromtimestamp(1_800_000_010, timezone.utc)
    assert store.read_ledger("b", since=rows[0].at)[0].call_id == "c1"
    now[0] += 3585  # c0 is now older than the retention, c1 is not
    assert [r.call_id for r in store.read_ledger("b")] == ["c1"]


# -- the ledger row: a key list's scopes are worked out once, each row has its own -------------


def test_rows_of_one_key_list_have_equal_but_separate_scopes() -> None:
    first = call_row("b", "c1", [KEY, KEY])
    first.scopes["user"] = "mallory"  # a row's dicts are its own: the next row is not changed
    second = call_row("b", "c2", [KEY, KEY])
    assert second.keys == (KEY,)
    assert second.scopes == {"user": "alice"}
    other = call_row("b", "c3", ["{b}:b:user:bob:user:day:2026-12-01"])
    assert other.scopes == {"user": "bob"}


def test_a_bad_key_is_refused_by_every_row() -> None:
    for call_id in ("c1", "c2"):
        with pytest.raises(ValueError, match="keys"):
            call_row("b", call_id, ["x" * 2000])
    with pytest.raises(TypeError):
        call_row("b", "c3", [["not", "a", "key"]])  # type: ignore[list-item]


def test_row_tokens_are_the_usage_counts_that_are_not_zero() -> None:
    row = call_row("b", "c1", [KEY], usage=TokenUsage(input_tokens=8, output_tokens=9, reasoning_tokens=2))
    assert row.tokens == {"input": 8, "output": 9, "reasoning": 2}
    partial = call_row("b", "c2", [KEY], usage=SimpleNamespace(input_tokens=3, output_tokens=2.0))
    assert partial.tokens == {"input": 3, "output": 2}  # a usage-like object: missing counts are 0


# -- CounterPlan.counters: made once per (fraction, shadow) for dollar limits ------------------


def test_dollar_counters_are_made_once_per_fraction() -> None:
    guard = BudgetGuard(UsageChat(), limit=5)
    plan = guard.policy.plan(guard.policy.identity({}))
    full = plan.counters()
    assert plan.counters() is full
    lowered = plan.counters(Decimal("0.5"))
    assert lowered[0].limit == full[0].limit // 2
    assert plan.counters(shadow=True)[0].limit > full[0].limit
    assert plan.counters() is full


def test_token_counters_are_sized_by_each_calls_estimate() -> None:
    guard = BudgetGuard(UsageChat(), limits=[Limit(tokens=10_000, per="global")])
    small, large = guard.reserve("hi"), guard.reserve("hi " * 400)
    plan = small.admitted.plan
    amounts = [plan.counters(None, r.admitted.estimate)[0].amount for r in (small, large)]
    assert amounts[0] < amounts[1]
    small.settle(usage=TokenUsage(input_tokens=1, output_tokens=1))
    large.settle(usage=TokenUsage(input_tokens=1, output_tokens=1))


# -- the settle's reading of the reply ---------------------------------------------------------


def test_served_ref_is_the_reserved_model_when_the_reply_names_it_in_any_case() -> None:
    ref = ModelRef("gpt-4o-mini", "openai", "api.openai.com")
    assert served_ref(ref, AIMessage("x", response_metadata={"model_name": " GPT-4o-mini "})) is ref
    dated = served_ref(ref, AIMessage("x", response_metadata={"model_name": "gpt-4o-mini-2024-07-18"}))
    assert (dated.name, dated.host) == ("gpt-4o-mini-2024-07-18", "api.openai.com")
    other = served_ref(ref, AIMessage("x", response_metadata={"model_name": "  ", "model": "gpt-4o"}))
    assert other.name == "gpt-4o"


def test_billed_extras_of_a_plain_reply_are_none_and_a_tier_is_still_read() -> None:
    assert billed_extras(AIMessage("x", response_metadata={"model_name": "gpt-4o", "finish_reason": "stop"})) == {}
    tiered = AIMessage("x", response_metadata={"model_name": "gpt-4o", "service_tier": "priority"})
    assert billed_extras(tiered) == {"service_tier": "priority"}
    searched = AIMessage([{"type": "web_search_call", "id": "ws"}], response_metadata={"model_name": "gpt-4o"})
    assert billed_extras(searched) == {"web_searches": 1}


def test_a_store_that_keeps_no_ledger_is_sent_no_row() -> None:
    rows: list = []

    class Counting(MemoryStore):
        def settle(self, *args, row=None, **kwargs):  # type: ignore[no-untyped-def, override]
            rows.append(row)
            return super().settle(*args, row=row, **kwargs)

    BudgetGuard(UsageChat(), limit=5, store=Counting(ledger_max_rows=0)).invoke("hi")
    BudgetGuard(UsageChat(), limit=5, store=Counting()).invoke("hi")
    assert rows[0] is None and rows[1] is not None and rows[1].call_id


# -- tool schemas: a count is remembered for what the schema says, not for the object -----------

LONG_DESCRIPTION = "Use this tool for every question about the catalogue. " * 400


def _tool_dict() -> dict:
    return {"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


def _held_input(guard: BudgetGuard, **kwargs) -> int:
    reservation = guard.reserve("hi", kwargs=kwargs)
    try:
        return reservation.admitted.estimate.input_tokens
    finally:
        reservation.settle()


MODELS = [("gpt-4o", "openai"), ("claude-sonnet-4-5", "anthropic")]  # an exact tokenizer, the byte bound


def test_a_tool_dict_edited_in_place_is_counted_as_it_is_now() -> None:
    tool = _tool_dict()
    guard = BudgetGuard(UsageChat(model_name="gpt-4o"), limit=100, default_max_output_tokens=16)
    before = _held_input(guard, tools=[tool])
    tool["function"]["description"] = LONG_DESCRIPTION
    edited = _held_input(guard, tools=[tool])
    fresh = _held_input(BudgetGuard(UsageChat(model_name="gpt-4o"), limit=100, default_max_output_tokens=16),
                        tools=[dict(tool)])
    assert edited == fresh > before + 1_000


@pytest.mark.parametrize(("model_name", "provider"), MODELS)
def test_a_tool_object_whose_description_changed_is_counted_as_it_is_now(model_name: str, provider: str) -> None:
    from langchain_core.tools import tool as make_tool

    @make_tool
    def search_docs(query: str) -> str:
        """Search the docs."""
        return ""

    guard = BudgetGuard(UsageChat(model_name=model_name, provider=provider), limit=100, default_max_output_tokens=16)
    before = _held_input(guard, tools=[search_docs])
    search_docs.description = "Search the docs. " + LONG_DESCRIPTION
    assert _held_input(guard, tools=[search_docs]) > before + 1_000


# -- caches of what callers name stay bounded --------------------------------------------------


def test_short_texts_kept_for_their_counts_stay_a_few_megabytes() -> None:
    import tracemalloc

    from langchain_budgetguard.tokenizers import exact_family

    family = exact_family("gpt-4o")
    family.count("warm")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(60_000):  # short, each new: ids, names, one-word turns
            family.count(f"t{i:06d}")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 3_000_000
    assert family.count("t000001") == family.count("t000001") > 0  # an evicted text is counted again


def test_rate_cards_of_names_callers_chose_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_budgetguard import pricing

    monkeypatch.setattr(pricing, "_MAX_CARDS", 64)
    pricer = pricing.Pricer(fallback={"input": "1", "output": "2"})
    first = pricer.rate_card(ModelRef("made-up-0", "openai"))
    assert pricer.rate_card(ModelRef("made-up-0", "openai")) is first  # cached
    for i in range(1, 300):
        pricer.rate_card(ModelRef(f"made-up-{i}", "openai"))
    last = pricer.rate_card(ModelRef("made-up-299", "openai"))
    assert pricer.rate_card(ModelRef("made-up-299", "openai")) is last  # the newest are kept
    again = pricer.rate_card(ModelRef("made-up-0", "openai"))
    assert again is not first and again.cost_nano(TokenUsage(input_tokens=10)) == first.cost_nano(TokenUsage(input_tokens=10))
