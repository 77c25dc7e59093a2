"""Strict holds price output at the dearest kind the model bills (audio, images), not at its text rate.

gemini-2.5-flash-image bills image output at $30 per million tokens and text at $2.50; gpt-audio
audio at $64 and text at $10. Nothing before the reply says which kind the output will be, so a
hold at the text rate let one such call spend 6-12x what it reserved, past the limit.
"""

from __future__ import annotations

from decimal import Decimal

import genai_prices
import pytest

from langchain_budgetguard import BudgetExceededError, BudgetGuard
from langchain_budgetguard.estimate import TypicalEstimator
from langchain_budgetguard.pricing import ModelRef, Pricer

from .fakes import UsageChat


class MediaChat(UsageChat):
    """Reports its output tokens as ``kind`` output (``usage_metadata.output_token_details``)."""

    kind: str = "image"

    def _usage(self) -> dict:
        return {**super()._usage(), "output_token_details": {self.kind: self.output_tokens}}


def _list_price(model: str, provider: str, **usage: int) -> Decimal:
    return genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id=provider).total_price


@pytest.mark.parametrize(("model", "provider", "kind"), [
    ("gemini-2.5-flash-image", "google", "output_image_tokens"),
    ("gpt-audio", "openai", "output_audio_tokens"),
])
def test_the_strict_hold_is_the_dearest_output_and_the_text_hold_is_not(model, provider, kind):
    card = Pricer().rate_card(ModelRef(model, provider))
    dearest = _list_price(model, provider, input_tokens=100, output_tokens=1000, **{kind: 1000})
    text = _list_price(model, provider, input_tokens=100, output_tokens=1000)
    assert dearest > 5 * (text - _list_price(model, provider, input_tokens=100))  # media output: 6x and more
    assert card.hold_nano(100, 1000, dearest_output=True)[0] == int(dearest * 10**9)
    assert card.hold_nano(100, 1000)[0] == int(text * 10**9)


def test_a_model_without_dearer_output_holds_the_same_either_way():
    card = Pricer().rate_card(ModelRef("gpt-4o-mini", "openai"))
    assert card.hold_nano(100, 1000, dearest_output=True) == card.hold_nano(100, 1000)


def test_an_image_reply_cannot_spend_past_the_limit():
    """$0.01 left: 1,000 output tokens hold $0.0025 at the text rate, but as an image they cost $0.03."""
    model = MediaChat(model_name="gemini-2.5-flash-image", provider="google", input_tokens=10, output_tokens=1000)
    guard = BudgetGuard(model, limit=Decimal("0.01"), min_output_tokens=None)
    with pytest.raises(BudgetExceededError):
        guard.invoke("draw a cat", max_tokens=1000)
    assert model.calls == 0
    roomy = BudgetGuard(model, limit=1)
    reply = roomy.invoke("draw a cat", max_tokens=1000)
    cost = reply.response_metadata["budgetguard"]
    assert cost["cost_usd"] == _list_price("gemini-2.5-flash-image", "google", input_tokens=10, output_tokens=1000,
                                           output_image_tokens=1000) <= cost["reserved_usd"]


def test_shrink_to_fit_sizes_the_cap_at_the_dearest_output_rate():
    model = MediaChat(model_name="gpt-audio", provider="openai", kind="audio", input_tokens=10, output_tokens=100_000)
    limit = Decimal("0.05")
    guard = BudgetGuard(model, limit=limit)  # shrinks the default 4,096 cap to fit what is left
    reply = guard.invoke("say hi")
    cap = reply.response_metadata["budgetguard"]["output_cap"]
    assert reply.response_metadata["budgetguard"]["clamped"] and cap * Decimal("64") / 1_000_000 <= limit
    assert cap * Decimal("64") / 1_000_000 > limit * Decimal("0.9")  # held at $64 per million, not $10


def test_typical_mode_holds_the_text_rate():
    """Typical mode trades the bound for fewer refusals: output is held at the text rate there."""
    model = MediaChat(model_name="gpt-audio", provider="openai", kind="audio", input_tokens=10, output_tokens=10)
    strict = BudgetGuard(model, limit=1).invoke("hi", max_tokens=1000).response_metadata["budgetguard"]
    typical = BudgetGuard(model, limit=1, estimator=TypicalEstimator()).invoke(
        "hi", max_tokens=1000).response_metadata["budgetguard"]
    assert strict["reserved_usd"] - typical["reserved_usd"] > Decimal("0.05")  # 1,000 x ($64 - $10) per million
