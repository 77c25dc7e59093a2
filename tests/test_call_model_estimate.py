"""A call that goes to another model than the wrapped one is counted as that model.

A per-call ``model=``, a binding's ``model=``, a ``configurable`` choice, an inner fallback and
``enforce_budget``'s model-only calls are priced as the model they go to; their prompt must be
counted with that model's tokenizer and image costs too, or the hold is a fraction of the bill.
"""

from __future__ import annotations

import base64
import struct
import zlib

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.runnables import ConfigurableField

from langchain_budgetguard import BudgetExceededError, BudgetGuard, enforce_budget

from .fakes import UsageChat

langchain_openai = pytest.importorskip("langchain_openai")


def _png(width: int, height: int) -> bytes:
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\0" * 300


IMAGE = [HumanMessage(content=[
    {"type": "text", "text": "describe"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png(2048, 2048)).decode()}},
])]
HINDI = [HumanMessage("यह एक परीक्षण वाक्य है जिसमें हिंदी के कई शब्द हैं। " * 200)]


def _llm(model: str):
    return langchain_openai.ChatOpenAI(model=model, api_key="sk-test")  # never called: reserve() only


def _held(guard: BudgetGuard, messages, config=None, **kwargs) -> tuple[int, int, str]:
    reservation = guard.reserve(messages, config, kwargs=kwargs)
    try:
        estimate = reservation.admitted.estimate
        return estimate.input_tokens, estimate.reserve, estimate.refs[0].name
    finally:
        reservation.settle()  # nothing was called: releases the hold


def _reference(model: str, messages) -> tuple[int, int, str]:
    return _held(BudgetGuard(_llm(model), limit=100, default_max_output_tokens=16), messages)


def test_a_per_call_model_counts_the_image_as_that_model_bills_it():
    # gpt-4o-mini bills an image ~33x gpt-4o's tokens (the same price per image at its lower rate).
    guard = BudgetGuard(_llm("gpt-4o"), limit=100, default_max_output_tokens=16)
    held = _held(guard, IMAGE, model="gpt-4o-mini")
    assert held == _reference("gpt-4o-mini", IMAGE)
    assert held[0] > 20_000


def test_a_binding_and_a_configurable_choice_count_as_the_model_they_choose():
    reference = _reference("gpt-4o-mini", IMAGE)
    bound = BudgetGuard(_llm("gpt-4o").bind(model="gpt-4o-mini"), limit=100, default_max_output_tokens=16)
    assert _held(bound, IMAGE) == reference
    chosen = BudgetGuard(_llm("gpt-4o").configurable_fields(model_name=ConfigurableField(id="model")),
                         limit=100, default_max_output_tokens=16)
    assert _held(chosen, IMAGE, {"configurable": {"model": "gpt-4o-mini"}}) == reference


def test_a_per_call_model_uses_its_own_tokenizer():
    # cl100k (gpt-4) needs ~4x the tokens o200k (gpt-4o) needs for Hindi text.
    guard = BudgetGuard(_llm("gpt-4o"), limit=100, default_max_output_tokens=16)
    held = _held(guard, HINDI, model="gpt-4")
    assert held == _reference("gpt-4", HINDI)
    assert held[0] > 3 * _reference("gpt-4o", HINDI)[0]


def test_an_inner_fallback_is_held_for_what_it_would_bill():
    guard = BudgetGuard(_llm("gpt-4o").with_fallbacks([_llm("gpt-4o-mini")]), limit=100, default_max_output_tokens=16)
    assert _held(guard, IMAGE)[1] >= _reference("gpt-4o-mini", IMAGE)[1]


def test_the_wrapped_models_own_settings_still_count_when_the_call_keeps_its_model():
    guard = BudgetGuard(_llm("gpt-4o"), limit=100, default_max_output_tokens=16)
    assert _held(guard, HINDI, model="gpt-4o") == _reference("gpt-4o", HINDI)


def test_a_hard_limit_refuses_a_call_that_another_model_would_bill_over_it():
    guard = BudgetGuard(_llm("gpt-4o"), limit=0.001, default_max_output_tokens=16)
    with pytest.raises(BudgetExceededError):
        guard.reserve(IMAGE, kwargs={"model": "gpt-4o-mini"})


def test_enforce_budget_counts_the_model_the_call_names():
    policy = BudgetGuard(limit=100)
    with enforce_budget(policy):  # bills what OpenAI bills gpt-4o-mini for this image
        UsageChat(model_name="gpt-4o-mini", max_tokens=16, input_tokens=25_511, output_tokens=5).invoke(IMAGE)
    row = policy.policy.store.read_ledger(policy.policy.name)[0]
    assert row.reserved_nano >= row.cost_nano > 0


def test_a_stream_without_usage_is_charged_its_output_as_the_chosen_model_counts_it():
    reply = "यह एक परीक्षण वाक्य है जिसमें हिंदी के कई शब्द हैं। " * 50

    def charged(wrapped: str, **kwargs) -> int:
        guard = BudgetGuard(UsageChat(model_name=wrapped, reply=reply, report_usage=False), limit=100)
        return list(guard.stream("hi", **kwargs))[-1].response_metadata["budgetguard"]["output_tokens"]

    assert charged("gpt-4o", model="gpt-4") == charged("gpt-4") > 2 * charged("gpt-4o")


def test_output_cap_model_caps_a_call_sent_to_another_model_by_name():
    """output_cap="model" reserves the wrapped model's whole output limit (gpt-4o-mini: 16,384)
    and sends no cap; a per-call model="gpt-4.1" (32,768) was reserved at 16,384 with nothing sent,
    so its reply could cost twice its output hold. It is now capped as with "hard"."""
    guard = BudgetGuard(_llm("gpt-4o-mini"), limit=100, output_cap="model", default_max_output_tokens=2000)
    for kwargs, (tokens, sent) in (({}, (16_384, False)), ({"model": "gpt-4.1"}, (2000, True))):
        reservation = guard.reserve("hi", None, kwargs=kwargs)
        try:
            estimate = reservation.admitted.estimate
            assert (estimate.output_tokens, estimate.send_cap) == (tokens, sent)
        finally:
            reservation.settle()
    chosen = BudgetGuard(_llm("gpt-4o-mini").configurable_fields(model_name=ConfigurableField(id="model")),
                         limit=100, output_cap="model", default_max_output_tokens=2000)
    reservation = chosen.reserve("hi", {"configurable": {"model": "gpt-4.1"}})
    try:
        assert (reservation.admitted.estimate.output_tokens, reservation.admitted.estimate.send_cap) == (2000, True)
    finally:
        reservation.settle()
