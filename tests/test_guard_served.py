"""The guard prices the model that served the call, at the host that served it.

Real ChatOpenAI against the scripted server; every expected figure is genai-prices' own price of
the usage the server reported for the model that answered.
"""

from __future__ import annotations

from decimal import Decimal

import genai_prices
import pytest
from langchain_core.runnables import ConfigurableField

from langchain_budgetguard import BudgetGuard, UnknownModelPriceError

from .providers import Reply


def price(model: str, input_tokens: int, output_tokens: int, provider: str = "openai") -> Decimal:
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return genai_prices.calc_price(usage, model, provider_id=provider).total_price


# What the server answers; the reply names the model the request asked for, as OpenAI does.
ANSWER = Reply(text="ok", input_tokens=1000, output_tokens=200)


def spent(guard) -> Decimal:
    (status,) = guard.status()
    assert status.held == 0
    return status.spent


def test_a_call_kwarg_model_is_reserved_and_charged_as_that_model(openai_server):
    openai_server.set_default(ANSWER)
    guard = BudgetGuard(openai_server.chat_model(model="gpt-4o-mini"), limit=1)
    reply = guard.invoke("hi", model="gpt-4o")
    assert openai_server.last.body["model"] == "gpt-4o"
    expected = price("gpt-4o", 1000, 200)
    assert reply.response_metadata["budgetguard"]["model"] == "gpt-4o"
    assert reply.response_metadata["budgetguard"]["cost_usd"] == expected == spent(guard)
    assert expected > 16 * price("gpt-4o-mini", 1000, 200)


def test_a_configurable_model_is_priced_as_configured(openai_server):
    openai_server.set_default(ANSWER)
    llm = openai_server.chat_model(model="gpt-4o-mini").configurable_fields(
        model_name=ConfigurableField(id="model"))
    guard = BudgetGuard(llm, limit=1)
    reply = guard.invoke("hi", {"configurable": {"model": "gpt-4o"}})
    assert openai_server.last.body["model"] == "gpt-4o"
    assert reply.response_metadata["budgetguard"]["cost_usd"] == price("gpt-4o", 1000, 200) == spent(guard)


def test_an_inner_fallback_that_answers_is_charged_at_its_own_price(openai_server):
    openai_server.script(Reply(error=500), ANSWER)
    primary = openai_server.chat_model(model="gpt-4o-mini")
    fallback = openai_server.chat_model(model="gpt-4o")
    guard = BudgetGuard(primary.with_fallbacks([fallback]), limit=1)
    reply = guard.invoke("hi")
    assert [r.body["model"] for r in openai_server.requests] == ["gpt-4o-mini", "gpt-4o"]
    meta = reply.response_metadata["budgetguard"]
    assert meta["model"] == "gpt-4o" and meta["cost_usd"] == price("gpt-4o", 1000, 200) == spent(guard)
    # the hold covered the dearer candidate
    assert meta["reserved_usd"] >= meta["cost_usd"]


def test_another_host_is_never_priced_as_the_vendor(openai_server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="deepseek-ai/DeepSeek-R1-0528", base_url="https://api.together.xyz/v1", api_key="x")
    with pytest.raises(UnknownModelPriceError):
        BudgetGuard(llm, limit=1).invoke("hi")  # refused before any request: no DeepSeek-API price


def test_bedrock_claude_v2_seed_figure_still_holds():
    from langchain_budgetguard.pricing import ModelRef, Pricer
    from langchain_budgetguard.usage import TokenUsage

    card = Pricer().rate_card(ModelRef("anthropic.claude-v2", "aws"))
    assert card.cost(TokenUsage(input_tokens=26, output_tokens=70)) == Decimal("0.001888")


def test_a_serving_model_nothing_prices_is_charged_at_a_candidate_price_and_reported():
    from .fakes import UsageChat

    class Mystery(UsageChat):
        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            result = super()._generate(messages, stop, run_manager, **kwargs)
            result.generations[0].message.response_metadata["model_name"] = "gpt-4o-mystery"
            return result

    guard = BudgetGuard(Mystery(input_tokens=1000, output_tokens=200), limit=1)
    meta = guard.invoke("hi").response_metadata["budgetguard"]
    # never $0: the model the call was reserved for prices it, and the reply says so
    assert meta["model"] == "gpt-4o-mystery" and meta["priced_as"] == "openai/gpt-4o-mini"
    assert meta["cost_usd"] == price("gpt-4o-mini", 1000, 200) == spent(guard)
