"""Items billed besides plain tokens: web searches, service tiers, speed, audio/image tokens, reasoning.

Each reply is the provider's own JSON, parsed by the real LangChain client (against a local
server that answers with it), then priced; the figure must equal genai-prices' to the digit.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk

from langchain_budgetguard.errors import UnknownModelPriceError
from langchain_budgetguard.estimate import StrictEstimator
from langchain_budgetguard.messages import billed_output_text, billed_text_of, text_of
from langchain_budgetguard.money import ceil_nano
from langchain_budgetguard.pricing import (
    ModelRef,
    Pricer,
    call_price_context,
    item_bound,
)
from langchain_budgetguard.usage import TokenUsage, billed_extras, usage_from_message, usage_from_response_metadata

from tests.providers.canned_server import CannedServer


@pytest.fixture(scope="module")
def canned() -> Iterator[CannedServer]:
    with CannedServer() as server:
        yield server


@pytest.fixture
def server(canned: CannedServer) -> CannedServer:
    canned.reset()
    return canned


def genai(usage: dict[str, Any], model: str, provider: str, **context: str) -> Decimal:
    return genai_prices.calc_price(
        genai_prices.Usage(**usage), model, provider_id=provider, price_context=context or None
    ).total_price


def anthropic_body(model: str, usage: dict[str, Any], content: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": content or [{"type": "text", "text": "answer"}],
        "stop_reason": "end_turn", "stop_sequence": None, "usage": usage,
    }


def chat_anthropic(server: CannedServer, model: str, **kwargs: Any) -> Any:
    from langchain_anthropic import ChatAnthropic

    return ChatAnthropic(model=model, base_url=server.url, api_key="test", max_retries=0, **kwargs)


def chat_openai(server: CannedServer, model: str, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=server.url + "/v1", api_key="test", max_retries=0, **kwargs)


def price(llm: Any, message: Any) -> tuple[TokenUsage, Any]:
    """Price a reply as the guard's settle does; the local server is declared to bill as the vendor."""
    from langchain_budgetguard.pricing import LOCAL, model_ref, served_ref

    usage = usage_from_message(message)
    assert usage is not None
    ref = model_ref(llm)
    assert ref.provider == LOCAL and ref.host  # a local server: priced only because we say whom it bills as
    with pytest.raises(UnknownModelPriceError):
        Pricer().rate_card(ref)
    vendor = "anthropic" if "anthropic" in type(llm).__name__.lower() else "openai"
    card = Pricer(hosts={ref.host: vendor}).rate_card(served_ref(ref, message))
    return usage, card


# --------------------------------------------------------------------------------------
# Anthropic web search: usage.server_tool_use.web_search_requests
# --------------------------------------------------------------------------------------


def test_anthropic_reply_with_five_web_searches_is_charged_for_them(server: CannedServer) -> None:
    model = "claude-sonnet-4-5-20250929"
    server.push(anthropic_body(model, {
        "input_tokens": 1000, "output_tokens": 200, "cache_read_input_tokens": 300,
        "cache_creation_input_tokens": 0, "server_tool_use": {"web_search_requests": 5}, "service_tier": "standard",
    }, [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
        {"type": "text", "text": "answer"},
    ]))
    llm = chat_anthropic(server, "claude-sonnet-4-5")
    reply = llm.invoke("search it")
    usage, card = price(llm, reply)
    assert usage == TokenUsage(input_tokens=1300, output_tokens=200, cache_read_tokens=300, web_searches=5)
    expected = genai({"input_tokens": 1300, "output_tokens": 200, "cache_read_tokens": 300, "web_searches": 5},
                     model, "anthropic")
    assert card.cost(usage) == expected
    assert card.cost_nano(usage) == ceil_nano(expected)
    # the five searches are $0.05 of it: without them the call would be charged that much less
    without = TokenUsage(input_tokens=1300, output_tokens=200, cache_read_tokens=300)
    assert card.cost(usage) - card.cost(without) == Decimal("0.05")


def test_web_searches_on_a_model_without_a_search_price_are_refused() -> None:
    card = Pricer().rate_card(ModelRef("claude-3-haiku-20240307", "anthropic"))  # genai-prices: no search price
    assert card.cost_nano(TokenUsage(10, 10)) > 0
    with pytest.raises(UnknownModelPriceError, match="web searches"):
        card.cost_nano(TokenUsage(10, 10, web_searches=1))
    with pytest.raises(UnknownModelPriceError, match="web searches"):
        card.item_hold_nano(web_searches=1)
    fallback = Pricer(fallback={"input": 1, "output": 1}).rate_card(ModelRef("my-model", "acme"))
    with pytest.raises(UnknownModelPriceError):
        fallback.cost_nano(TokenUsage(10, 10, web_searches=2))
    priced = Pricer({"my-model": {"input": 1, "output": 1, "web_search": "10"}}).rate_card(ModelRef("my-model"))
    assert priced.cost(TokenUsage(0, 0, web_searches=3)) == Decimal("0.03")


# --------------------------------------------------------------------------------------
# OpenAI Responses API: web_search_call output items
# --------------------------------------------------------------------------------------


def responses_body(model: str, output: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": model,
        "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [{"type": "web_search"}],
        "usage": usage,
    }


def web_search_call(i: int) -> dict[str, Any]:
    return {"type": "web_search_call", "id": f"ws_{i}", "status": "completed",
            "action": {"type": "search", "query": f"q{i}"}}


@pytest.mark.parametrize("output_version", [None, "responses/v1", "v1"])
def test_openai_responses_reply_with_web_search_calls_is_charged_for_them(
    server: CannedServer, output_version: str | None
) -> None:
    model = "gpt-4o-2024-08-06"
    server.push(responses_body(model, [
        web_search_call(1), web_search_call(2), web_search_call(3),
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "found it", "annotations": []}]},
    ], {"input_tokens": 3000, "output_tokens": 150, "total_tokens": 3150,
        "input_tokens_details": {"cached_tokens": 1024}, "output_tokens_details": {"reasoning_tokens": 0}}))
    extra = {"output_version": output_version} if output_version else {}
    llm = chat_openai(server, "gpt-4o", use_responses_api=True, **extra)
    reply = llm.bind_tools([{"type": "web_search"}]).invoke("search")
    usage, card = price(llm, reply)
    assert usage.web_searches == 3
    expected = genai({"input_tokens": 3000, "output_tokens": 150, "cache_read_tokens": 1024, "web_searches": 3},
                     model, "openai")
    assert card.cost(usage) == expected
    assert card.cost_nano(usage) == ceil_nano(expected)


# --------------------------------------------------------------------------------------
# OpenAI Responses API: file_search_call output items ($2.50 per 1,000 on OpenAI)
# --------------------------------------------------------------------------------------


def file_search_call(i: int) -> dict[str, Any]:
    return {"type": "file_search_call", "id": f"fs_{i}", "status": "completed", "queries": [f"q{i}"],
            "results": None}


def file_search_reply(model: str, searches: int) -> dict[str, Any]:
    body = responses_body(model, [
        *(file_search_call(i) for i in range(searches)),
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "per the handbook", "annotations": []}]},
    ], {"input_tokens": 400, "output_tokens": 30, "total_tokens": 430,
        "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}})
    body["tools"] = [{"type": "file_search", "vector_store_ids": ["vs_1"]}]
    return body


FILE_SEARCH = {"type": "file_search", "vector_store_ids": ["vs_1"]}


@pytest.mark.parametrize("output_version", [None, "responses/v1", "v1"])
def test_openai_responses_reply_with_file_search_calls_is_charged_for_them(
    server: CannedServer, output_version: str | None
) -> None:
    model = "gpt-4o-mini"
    server.push(file_search_reply(model, 3))
    extra = {"output_version": output_version} if output_version else {}
    llm = chat_openai(server, model, use_responses_api=True, **extra)
    reply = llm.bind_tools([FILE_SEARCH]).invoke("what is the leave policy?")
    usage, card = price(llm, reply)
    assert usage.file_searches == 3 and usage.web_searches == 0
    expected = genai({"input_tokens": 400, "output_tokens": 30, "storage_searches": 3}, model, "openai")
    assert card.cost(usage) == expected > Decimal("0.0075")  # three searches: $0.0075, the tokens $0.00008
    assert card.cost_nano(usage) == ceil_nano(expected)


def test_a_guarded_file_search_is_held_and_charged_for_its_searches(server: CannedServer) -> None:
    """The attack: the tokens of a file-search call cost $0.00008, its searches 30x that. Held and
    charged as tokens only, a budget of $0.01 paid for none of them."""
    from langchain_budgetguard import BudgetExceededError, BudgetGuard

    llm = chat_openai(server, "gpt-4o-mini", use_responses_api=True).bind_tools([FILE_SEARCH])
    pricer = Pricer(hosts={server.url: "openai"})  # the local server bills as OpenAI
    # Ten searches ($0.025, the tool's use is not capped) do not fit in $0.01.
    with pytest.raises(BudgetExceededError):
        BudgetGuard(llm, limit=Decimal("0.01"), pricer=pricer).invoke("what is the leave policy?", max_tokens=100)
    assert server.requests == []
    guard = BudgetGuard(llm, limit=Decimal("0.05"), pricer=pricer)
    server.push(file_search_reply("gpt-4o-mini", 3))
    reply = guard.invoke("what is the leave policy?", max_tokens=100)
    meta = reply.response_metadata["budgetguard"]
    assert meta["reserved_usd"] >= Decimal("0.025")
    (status,) = guard.status()
    assert status.held == 0
    assert status.spent == meta["cost_usd"] == genai(
        {"input_tokens": 400, "output_tokens": 30, "storage_searches": 3}, "gpt-4o-mini", "openai")


def test_file_searches_without_a_price_are_refused_not_free() -> None:
    fallback = Pricer(fallback={"input": 1, "output": 1}).rate_card(ModelRef("my-model", "acme"))
    with pytest.raises(UnknownModelPriceError, match="file searches.*\"file_search\": \"10\""):
        fallback.cost_nano(TokenUsage(10, 10, file_searches=2))
    with pytest.raises(UnknownModelPriceError, match="file searches"):
        fallback.item_hold_nano(file_searches=1)
    priced = Pricer({"my-model": {"input": 1, "output": 1, "file_search": "2.5"}}).rate_card(ModelRef("my-model"))
    assert priced.cost(TokenUsage(0, 0, file_searches=4)) == Decimal("0.01")
    assert priced.item_hold_nano(file_searches=4, web_searches=0) == 10_000_000
    card = Pricer().rate_card(ModelRef("gpt-4o-mini", "openai"))
    assert card.item_hold_nano(file_searches=10) == 25_000_000  # $2.50 per 1,000
    assert card.prices["file_search_per_1k"] == Decimal("2.5")
    with pytest.raises(ValueError, match="file_searches"):
        card.item_hold_nano(file_searches=-1)


def test_item_bound_counts_a_file_search_tool() -> None:
    from langchain_openai import ChatOpenAI

    gpt = ChatOpenAI(model="gpt-4o-mini", api_key="test", use_responses_api=True)
    bound = item_bound(gpt.bind_tools([FILE_SEARCH, {"type": "web_search"}]), default_uses=4)
    assert (bound.file_searches, bound.web_searches) == (4, 4)
    assert set(bound.unbounded) == {"file_search", "web_search"}
    assert item_bound(gpt).file_searches == 0


# --------------------------------------------------------------------------------------
# Service tier and speed
# --------------------------------------------------------------------------------------


def chat_completion(model: str, usage: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "id": "c1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": usage, **top,
    }


@pytest.mark.parametrize("tier", ["priority", "flex", "default"])
def test_openai_reply_at_a_service_tier_is_charged_at_that_tier(server: CannedServer, tier: str) -> None:
    model = "gpt-5"
    server.push(chat_completion(model, {
        "prompt_tokens": 2000, "completion_tokens": 500, "total_tokens": 2500,
        "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 256},
    }, service_tier=tier))
    llm = chat_openai(server, model, service_tier=tier)
    assert call_price_context(llm) == ({} if tier == "default" else {"service_tier": tier})
    reply = llm.invoke("hi")
    assert server.requests[-1]["body"]["service_tier"] == tier
    usage, card = price(llm, reply)
    assert usage.service_tier == (None if tier == "default" else tier)
    counts = {"input_tokens": 2000, "output_tokens": 500, "cache_read_tokens": 1024, "output_reasoning_tokens": 256}
    expected = genai(counts, model, "openai", service_tier=tier)
    assert card.cost(usage) == expected
    assert card.cost_nano(usage) == ceil_nano(expected)
    standard = genai(counts, model, "openai")
    if tier == "priority":
        assert expected > standard  # the reply's tier is what makes it dearer
    # reserving for the tier the call asks for gives the same card the settle uses
    held = card.variant(**call_price_context(llm))
    assert held.cost(TokenUsage(2000, 500, cache_read_tokens=1024, reasoning_tokens=256)) == expected


def test_a_dearer_tier_without_a_price_is_refused_a_cheaper_one_is_charged_standard() -> None:
    card = Pricer().rate_card(ModelRef("gpt-3.5-turbo", "openai"))  # no tier variants in genai-prices
    with pytest.raises(UnknownModelPriceError, match="service_tier='priority'"):
        card.cost_nano(TokenUsage(100, 10, service_tier="priority"))
    assert card.cost(TokenUsage(100, 10, service_tier="flex")) == card.cost(TokenUsage(100, 10))
    assert card.variant(service_tier="auto") is card


def test_anthropic_fast_speed_is_charged_at_the_fast_rate(server: CannedServer) -> None:
    model = "claude-opus-5"
    server.push(anthropic_body(model, {
        "input_tokens": 800, "output_tokens": 300, "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 200, "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                                              "ephemeral_1h_input_tokens": 200},
        "speed": "fast",
    }))
    llm = chat_anthropic(server, model)
    usage, card = price(llm, llm.invoke("hi"))
    assert usage.speed == "fast" and usage.cache_write_1h_tokens == 200
    counts = {"input_tokens": 1000, "output_tokens": 300, "cache_write_tokens": 200, "cache_write_1h_tokens": 200}
    expected = genai(counts, model, "anthropic", speed="fast")
    assert expected > genai(counts, model, "anthropic")
    assert card.cost(usage) == expected
    assert card.cost_nano(usage) == ceil_nano(expected)


def test_call_price_context_reads_kwargs_bindings_and_model_kwargs() -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-5", api_key="test")
    assert call_price_context(llm) == {}
    assert call_price_context(llm, {"service_tier": "priority"}) == {"service_tier": "priority"}
    assert call_price_context(llm.bind(service_tier="flex")) == {"service_tier": "flex"}
    assert call_price_context(ChatOpenAI(model="gpt-5", api_key="t", model_kwargs={"speed": "fast"})) == {
        "speed": "fast"
    }


# --------------------------------------------------------------------------------------
# Gemini: audio input, image output, grounding
# --------------------------------------------------------------------------------------

GEMINI_AUDIO = {
    "usage_metadata": {
        "promptTokenCount": 1200,
        "candidatesTokenCount": 80,
        "totalTokenCount": 1280,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 200}, {"modality": "AUDIO", "tokenCount": 1000}],
    },
    "model_name": "gemini-2.5-flash",
}


def test_gemini_reply_with_audio_input_is_charged_at_the_audio_rate() -> None:
    usage = usage_from_response_metadata(GEMINI_AUDIO)
    assert usage == TokenUsage(input_tokens=1200, output_tokens=80, input_audio_tokens=1000)
    card = Pricer().rate_card(ModelRef("gemini-2.5-flash", "google"))
    expected = genai({"input_tokens": 1200, "output_tokens": 80, "input_audio_tokens": 1000},
                     "gemini-2.5-flash", "google")
    assert card.cost(usage) == expected
    assert expected > genai({"input_tokens": 1200, "output_tokens": 80}, "gemini-2.5-flash", "google")
    # LangChain's usage_metadata form (input_token_details.audio) prices the same
    message = AIMessage("", usage_metadata={"input_tokens": 1200, "output_tokens": 80, "total_tokens": 1280,
                                            "input_token_details": {"audio": 1000}})  # type: ignore[typeddict-item]
    assert card.cost(usage_from_message(message)) == expected  # type: ignore[arg-type]


def test_gemini_image_output_and_grounding() -> None:
    meta = {
        "usage_metadata": {
            "prompt_token_count": 50, "candidates_token_count": 1400, "total_token_count": 1450,
            "candidates_tokens_details": [{"modality": "IMAGE", "token_count": 1290}, {"modality": "TEXT",
                                                                                     "token_count": 110}],
        },
        "grounding_metadata": {"web_search_queries": ["a", "b"], "grounding_chunks": [{"web": {"uri": "x"}}]},
    }
    message = AIMessage("", response_metadata=meta)
    usage = usage_from_message(message)
    assert usage is not None
    assert (usage.output_image_tokens, usage.web_searches) == (1290, 2)
    model = "gemini-3-pro-image-preview"
    card = Pricer().rate_card(ModelRef(model, "google"))
    expected = genai({"input_tokens": 50, "output_tokens": 1400, "output_image_tokens": 1290, "web_searches": 2},
                     model, "google")
    assert card.cost(usage) == expected
    assert billed_extras({"grounding_metadata": {"grounding_chunks": [{}]}}) == {"web_searches": 1}


# --------------------------------------------------------------------------------------
# Bounds before the call
# --------------------------------------------------------------------------------------


def test_item_bound_from_bound_tools_and_its_hold() -> None:
    from langchain_anthropic import ChatAnthropic
    from langchain_openai import ChatOpenAI

    claude = ChatAnthropic(model="claude-sonnet-4-5", api_key="test")
    bound = claude.bind_tools([{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}])
    assert item_bound(bound).web_searches == 5 and item_bound(bound).unbounded == ()
    assert item_bound(claude).web_searches == 0
    open_ended = claude.bind_tools([{"type": "web_search_20250305", "name": "web_search"}])
    assert item_bound(open_ended, default_uses=7) == item_bound(open_ended, default_uses=7).__class__(
        7, ("web_search_20250305",)
    )
    gpt = ChatOpenAI(model="gpt-4o", api_key="test", use_responses_api=True).bind_tools([{"type": "web_search"}])
    assert item_bound(gpt).unbounded == ("web_search",)
    card = Pricer().rate_card(ModelRef("claude-sonnet-4-5", "anthropic"))
    assert card.item_hold_nano(web_searches=5) == 50_000_000  # $10 per 1,000
    assert card.item_hold_nano(web_searches=5) == ceil_nano(card.cost(TokenUsage(web_searches=5)))
    with pytest.raises(ValueError):
        card.item_hold_nano(web_searches=-1)


def test_openai_web_searches_are_capped_at_the_ten_the_call_is_held_for(server: CannedServer) -> None:
    """The attack: an OpenAI Responses call with web_search was held for ten searches and sent nothing
    that capped them; 40 searches ($0.40) were charged past a $0.15 strict limit. The guard now sends
    max_tool_calls=10, which the Responses API honours."""
    from langchain_budgetguard import BudgetGuard

    llm = chat_openai(server, "gpt-4.1-mini", use_responses_api=True).bind_tools([{"type": "web_search"}])
    guard = BudgetGuard(llm, limit=Decimal("0.15"), pricer=Pricer(hosts={"127.0.0.1": "openai"}))
    calls = [web_search_call(i) for i in range(10)]
    server.push(responses_body("gpt-4.1-mini", [*calls, {"type": "message", "id": "m", "status": "completed",
                "role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]}],
                {"input_tokens": 50, "output_tokens": 5, "total_tokens": 55}))
    meta = guard.invoke("research", max_tokens=100).response_metadata["budgetguard"]
    assert server.requests[0]["body"]["max_tool_calls"] == 10 and meta["max_tool_calls"] == 10
    (status,) = guard.status()
    assert Decimal("0.10") < status.spent <= meta["reserved_usd"] <= status.limit


# --------------------------------------------------------------------------------------
# Streams without usage: reasoning is billed output
# --------------------------------------------------------------------------------------


def deepseek_stream(reasoning: list[str], answer: list[str]) -> list[Any]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-reasoner",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    events: list[Any] = [chunk({"role": "assistant", "content": None, "reasoning_content": ""})]
    events += [chunk({"reasoning_content": piece, "content": None}) for piece in reasoning]
    events += [chunk({"content": piece}) for piece in answer]
    events += [chunk({}, "stop"), "[DONE]"]
    return events


def test_deepseek_reasoner_stream_without_usage_bills_its_reasoning(server: CannedServer) -> None:
    deepseek = pytest.importorskip("langchain_deepseek")
    reasoning = ["Let me think. ", "The user greets me; ", "思考中 ", "so I greet back."]
    answer = ["Hello", " there!"]
    server.push(deepseek_stream(reasoning, answer))
    llm = deepseek.ChatDeepSeek(model="deepseek-reasoner", api_base=server.url + "/v1", api_key="test",
                                max_retries=0, stream_usage=False)
    chunks = list(llm.stream("hi"))
    assert all(getattr(c, "usage_metadata", None) is None for c in chunks)  # no usage came
    visible = "".join(text_of(c) for c in chunks)
    assert visible == "Hello there!"
    billed = billed_output_text(chunks)
    assert billed == "".join(reasoning) + "".join(answer)
    strict = StrictEstimator()
    # Strict: never less than an upper bound of every streamed token, reasoning included.
    assert strict.output_tokens(billed) >= len("".join(reasoning + answer).encode())
    assert strict.output_tokens(billed) > strict.output_tokens(visible)
    merged = chunks[0] + chunks[1:]
    assert billed_text_of(merged) == visible + "".join(reasoning)


def test_a_guarded_deepseek_reasoner_stream_without_usage_is_charged_its_reasoning(server: CannedServer) -> None:
    from langchain_budgetguard import BudgetGuard
    from langchain_budgetguard.pricing import price_host_as

    deepseek = pytest.importorskip("langchain_deepseek")
    reasoning = ["Let me think. ", "The user greets me; ", "思考中 ", "so I greet back."]
    answer = ["Hello", " there!"]
    server.push(deepseek_stream(reasoning, answer))
    price_host_as(server.url, "deepseek")  # the canned server stands in for api.deepseek.com
    llm = deepseek.ChatDeepSeek(model="deepseek-reasoner", api_base=server.url + "/v1", api_key="test",
                                max_retries=0, stream_usage=False)
    guard = BudgetGuard(llm, limit=1)
    chunks = list(guard.stream("hi"))
    meta = chunks[-1].response_metadata["budgetguard"]
    assert meta["estimated"] is True
    # at least every streamed byte of output, reasoning included, at deepseek-reasoner's output price
    streamed_bytes = len("".join(reasoning + answer).encode())
    assert meta["output_tokens"] >= streamed_bytes
    card = guard.policy.pricer.rate_card(guard._ladder()[0].ref)
    assert meta["cost_usd"] >= card.cost(TokenUsage(output_tokens=streamed_bytes))
    (status,) = guard.status()
    assert status.held == 0 and status.spent == meta["cost_usd"]


def test_billed_text_reads_every_reasoning_shape() -> None:
    assert billed_text_of(AIMessage("ok", additional_kwargs={"reasoning_content": "hmm "})) == "okhmm "
    v1 = AIMessage(content=[{"type": "reasoning", "reasoning": "step 1. "}, {"type": "text", "text": "done"}])
    assert billed_text_of(v1) == "donestep 1. "
    anthropic = AIMessageChunk(content=[{"type": "thinking", "thinking": "ponder "}, {"type": "text", "text": "a"}])
    assert billed_text_of(anthropic) == "ponder a"
    openai = AIMessage(content=[{"type": "reasoning", "summary": [{"type": "summary_text", "text": "sum"}]}])
    assert billed_text_of(openai) == "sum"
    legacy = AIMessage("x", additional_kwargs={"reasoning": {"summary": [{"text": "why"}]}})
    assert billed_text_of(legacy) == "xwhy"
    assert billed_output_text([AIMessageChunk("a"), AIMessageChunk("", additional_kwargs={"reasoning_content": "b"})]) == "ab"
    assert billed_text_of(None) == ""
