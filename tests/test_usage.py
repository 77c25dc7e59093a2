"""Provider usage shapes -> TokenUsage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGeneration, Generation, LLMResult

from langchain_budgetguard.usage import (
    MAX_TOKENS,
    UsageError,
    billed_extras,
    validate_usage,
    TokenUsage,
    model_from_response_metadata,
    usage_from_llm_result,
    usage_from_message,
    usage_from_response_metadata,
    usage_from_usage_metadata,
)

FIXTURES = Path(__file__).parent / "fixtures"
SHAPES = json.loads((FIXTURES / "usage_shapes.json").read_text())


def _ids(entries: list[dict[str, Any]], key: str) -> list[str]:
    return [e[key] for e in entries]


# --- the seed fixture's shapes ---------------------------------------------------------------


@pytest.mark.parametrize("entry", SHAPES["response_metadata"], ids=_ids(SHAPES["response_metadata"], "provider"))
def test_seed_response_metadata_shapes(entry: dict[str, Any]) -> None:
    expect = entry["expect"]
    usage = usage_from_response_metadata(entry["response_metadata"])
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        expect["input_tokens"],
        expect["output_tokens"],
        expect["total_tokens"],
    )
    assert usage == usage.consistent()
    assert not usage.estimated

    model = model_from_response_metadata(entry["response_metadata"])
    if "model_from_llm" in entry:
        # Vertex does not report the model; it has to come from the runnable.
        assert model is None
        model = entry["model_from_llm"]
    assert model == expect["model"]


@pytest.mark.parametrize("entry", SHAPES["response_metadata"], ids=_ids(SHAPES["response_metadata"], "provider"))
def test_seed_shapes_through_an_ai_message(entry: dict[str, Any]) -> None:
    message = AIMessage(content="hi", response_metadata=entry["response_metadata"])
    assert message.usage_metadata is None
    usage = usage_from_message(message)
    assert usage is not None
    assert usage.total_tokens == entry["expect"]["total_tokens"]


@pytest.mark.parametrize("entry", SHAPES["usage_metadata"], ids=_ids(SHAPES["usage_metadata"], "provider"))
def test_seed_usage_metadata(entry: dict[str, Any]) -> None:
    meta = entry["usage_metadata"]
    message = AIMessage(content="hi", usage_metadata=meta, response_metadata={"model_name": entry["model"]})
    usage = usage_from_message(message)
    assert usage == TokenUsage(input_tokens=meta["input_tokens"], output_tokens=meta["output_tokens"])
    assert usage.total_tokens == meta["total_tokens"]
    assert model_from_response_metadata(message.response_metadata) == entry["model"]


def test_seed_streaming_usage_on_the_last_chunk() -> None:
    stream = SHAPES["streaming"]
    final = stream["final_usage"]
    texts = stream["chunks"]
    chunks = [AIMessageChunk(content=text) for text in texts[:-2]]
    chunks.append(AIMessageChunk(content=texts[-2], response_metadata={"finish_reason": "stop"}))
    chunks.append(AIMessageChunk(content=texts[-1], usage_metadata=final))

    assert [usage_from_message(c) for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    summed = chunks[0]
    for chunk in chunks[1:]:
        summed = summed + chunk
    assert summed.content == "".join(texts)
    usage = usage_from_message(summed)
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        final["input_tokens"],
        final["output_tokens"],
        final["total_tokens"],
    )


def test_stream_without_usage_has_none() -> None:
    summed = AIMessageChunk(content="Hello") + AIMessageChunk(content="!", response_metadata={"finish_reason": "stop"})
    assert usage_from_message(summed) is None


def test_stream_with_usage_split_over_chunks_is_summed() -> None:
    # Anthropic-style: the input count comes first, the output count at the end.
    first = AIMessageChunk(content="", usage_metadata={"input_tokens": 40, "output_tokens": 0, "total_tokens": 40})
    last = AIMessageChunk(content="ok", usage_metadata={"input_tokens": 0, "output_tokens": 7, "total_tokens": 7})
    assert usage_from_message(first + last) == TokenUsage(input_tokens=40, output_tokens=7)


def test_fixture_copy_matches_the_seed() -> None:
    # The seed lives outside the repo; when it (or a copy of it in tests/fixtures) is at hand,
    # the copied sections must not drift from it.
    for seed_path in (FIXTURES / "seed_usage.json", Path("/work/shared/fixtures/seed_usage.json")):
        if seed_path.is_file():
            break
    else:
        pytest.skip("no seed_usage.json to compare with")
    seed = json.loads(seed_path.read_text())
    for section in ("response_metadata", "usage_metadata", "streaming"):
        assert SHAPES[section] == seed[section], section


# --- more provider shapes --------------------------------------------------------------------


@pytest.mark.parametrize("entry", SHAPES["extra_shapes"], ids=_ids(SHAPES["extra_shapes"], "name"))
def test_provider_shapes(entry: dict[str, Any]) -> None:
    usage = usage_from_response_metadata(entry["response_metadata"])
    assert usage == TokenUsage(**entry["expect"])
    assert model_from_response_metadata(entry["response_metadata"]) == entry["model"]


def test_openai_cached_and_reasoning_in_usage_metadata() -> None:
    message = AIMessage(
        content="",
        usage_metadata={
            "input_tokens": 1200,
            "output_tokens": 300,
            "total_tokens": 1500,
            "input_token_details": {"cache_read": 1024, "audio": 0},
            "output_token_details": {"reasoning": 192, "audio": 0},
        },
    )
    expect = TokenUsage(input_tokens=1200, output_tokens=300, cache_read_tokens=1024, reasoning_tokens=192)
    assert usage_from_message(message) == expect
    # The same call reported in the raw token_usage shape reads the same.
    raw = next(e for e in SHAPES["extra_shapes"] if e["name"] == "openai_cached_and_reasoning")
    assert usage_from_response_metadata(raw["response_metadata"]) == expect


def test_openai_service_tier_detail_keys() -> None:
    # langchain-openai prefixes detail keys with the tier for priority/flex requests.
    usage = usage_from_usage_metadata(
        {
            "input_tokens": 100,
            "output_tokens": 50,
            "total_tokens": 150,
            "input_token_details": {"priority_cache_read": 60, "priority": 40},
            "output_token_details": {"priority_reasoning": 20, "priority": 30},
        }
    )
    assert usage == TokenUsage(input_tokens=100, output_tokens=50, cache_read_tokens=60, reasoning_tokens=20)


def test_anthropic_cache_in_usage_metadata() -> None:
    # langchain-anthropic already adds the cache to input_tokens and zeroes cache_creation
    # when it reports the 5m/1h split.
    usage = usage_from_usage_metadata(
        {
            "input_tokens": 1350,
            "output_tokens": 200,
            "total_tokens": 1550,
            "input_token_details": {
                "cache_read": 1000,
                "cache_creation": 0,
                "ephemeral_5m_input_tokens": 100,
                "ephemeral_1h_input_tokens": 200,
            },
        }
    )
    assert usage == TokenUsage(
        input_tokens=1350,
        output_tokens=200,
        cache_read_tokens=1000,
        cache_write_tokens=300,
        cache_write_5m_tokens=100,
        cache_write_1h_tokens=200,
    )


def test_usage_metadata_with_cache_outside_input_is_reconciled_by_total() -> None:
    # Older langchain-aws copied Converse's inputTokens (cache excluded) into input_tokens.
    usage = usage_from_usage_metadata(
        {
            "input_tokens": 4,
            "output_tokens": 117,
            "total_tokens": 8394,
            "input_token_details": {"cache_read": 0, "cache_creation": 8273},
        }
    )
    assert usage == TokenUsage(input_tokens=8277, output_tokens=117, cache_write_tokens=8273)


def test_usage_metadata_unexplained_total_is_charged_as_output() -> None:
    usage = usage_from_usage_metadata({"input_tokens": 10, "output_tokens": 5, "total_tokens": 40})
    assert usage == TokenUsage(input_tokens=10, output_tokens=30, estimated=True)


def test_anthropic_raw_input_excludes_cache() -> None:
    usage = usage_from_response_metadata(
        {"usage": {"input_tokens": 3, "output_tokens": 10, "cache_read_input_tokens": 2000}}
    )
    assert usage == TokenUsage(input_tokens=2003, output_tokens=10, cache_read_tokens=2000)
    usage = usage_from_response_metadata(
        {"usage": {"input_tokens": 3, "output_tokens": 10, "cache_creation_input_tokens": 500}}
    )
    assert usage == TokenUsage(input_tokens=503, output_tokens=10, cache_write_tokens=500)


def test_anthropic_cache_keys_next_to_prompt_tokens_are_included() -> None:
    # Proxies (e.g. LiteLLM) keep OpenAI's prompt_tokens, which already include the cache.
    usage = usage_from_response_metadata(
        {"token_usage": {"prompt_tokens": 1020, "completion_tokens": 50, "cache_read_input_tokens": 1000}}
    )
    assert usage == TokenUsage(input_tokens=1020, output_tokens=50, cache_read_tokens=1000)


def test_a_report_with_counts_beats_an_empty_one() -> None:
    usage = usage_from_response_metadata(
        {
            "token_usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "usage": {"input_tokens": 5, "output_tokens": 2},
        }
    )
    assert usage == TokenUsage(input_tokens=5, output_tokens=2)


def test_gemini_thoughts_count_as_output() -> None:
    usage = usage_from_response_metadata(
        {"usage_metadata": {"prompt_token_count": 10, "candidates_token_count": 5, "thoughts_token_count": 90}}
    )
    assert usage == TokenUsage(input_tokens=10, output_tokens=95, reasoning_tokens=90)
    # A report whose candidates already include the thoughts (total says so) is not counted twice.
    usage = usage_from_response_metadata(
        {
            "usage_metadata": {
                "prompt_token_count": 10,
                "candidates_token_count": 95,
                "thoughts_token_count": 90,
                "total_token_count": 105,
            }
        }
    )
    assert usage == TokenUsage(input_tokens=10, output_tokens=95, reasoning_tokens=90)


def test_bedrock_converse_camel_case() -> None:
    usage = usage_from_response_metadata({"usage": {"inputTokens": 25, "outputTokens": 11, "totalTokens": 36}})
    assert usage == TokenUsage(input_tokens=25, output_tokens=11)
    assert model_from_response_metadata({"modelId": "amazon.nova-lite-v1:0"}) == "amazon.nova-lite-v1:0"


def test_response_metadata_is_used_when_usage_metadata_is_empty() -> None:
    message = AIMessage(
        content="",
        usage_metadata={"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        response_metadata={"token_usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}},
    )
    assert usage_from_message(message) == TokenUsage(input_tokens=7, output_tokens=3)


def test_usage_metadata_counts_win_over_response_metadata_counts() -> None:
    message = AIMessage(
        content="",
        usage_metadata={"input_tokens": 5, "output_tokens": 6, "total_tokens": 11},
        response_metadata={"token_usage": {"prompt_tokens": 700, "completion_tokens": 300, "total_tokens": 1000}},
    )
    assert usage_from_message(message) == TokenUsage(input_tokens=5, output_tokens=6)


def test_model_keys_in_order() -> None:
    assert model_from_response_metadata({"model": "b", "model_name": "a"}) == "a"
    assert model_from_response_metadata({"model_id": "c"}) == "c"
    assert model_from_response_metadata({"model_provider": "openai"}) is None


# --- LLMResult (callback handlers) ------------------------------------------------------------


def _gen(usage: dict[str, int] | None = None, model: str | None = None) -> ChatGeneration:
    meta = {"model_name": model} if model else {}
    return ChatGeneration(message=AIMessage(content="x", usage_metadata=usage, response_metadata=meta))


USAGE_A = {"input_tokens": 11, "output_tokens": 16, "total_tokens": 27}


def test_llm_result_from_messages() -> None:
    result = LLMResult(generations=[[_gen(USAGE_A, "gpt-4o-mini")]], llm_output={"model_name": "ignored"})
    assert usage_from_llm_result(result) == [(TokenUsage(input_tokens=11, output_tokens=16), "gpt-4o-mini")]


def test_llm_result_choices_of_one_request_count_once() -> None:
    # With n=2, langchain-openai puts the whole request's usage on every choice.
    result = LLMResult(generations=[[_gen(USAGE_A, "gpt-4o-mini"), _gen(USAGE_A, "gpt-4o-mini")]])
    entries = usage_from_llm_result(result)
    assert [model for _, model in entries] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert sum((u for u, _ in entries if u is not None), TokenUsage()) == TokenUsage(input_tokens=11, output_tokens=16)


def test_llm_result_falls_back_to_llm_output_token_usage() -> None:
    result = LLMResult(
        generations=[[_gen()]],
        llm_output={
            "token_usage": {"prompt_tokens": 1538, "completion_tokens": 137, "total_tokens": 1675},
            "model_name": "gpt-4o-mini",
        },
    )
    assert usage_from_llm_result(result) == [(TokenUsage(input_tokens=1538, output_tokens=137), "gpt-4o-mini")]


def test_llm_result_falls_back_to_llm_output_usage() -> None:
    result = LLMResult(
        generations=[[_gen()]],
        llm_output={"usage": {"input_tokens": 26, "output_tokens": 70}, "model_name": "claude-v2"},
    )
    assert usage_from_llm_result(result) == [(TokenUsage(input_tokens=26, output_tokens=70), "claude-v2")]


def test_llm_result_flattened_per_prompt_does_not_double_count() -> None:
    # generate() over two prompts: llm_output holds the sum; flatten() (what each run's
    # on_llm_end gets) keeps it on the first result only.
    result = LLMResult(
        generations=[[_gen()], [_gen()]],
        llm_output={"token_usage": {"prompt_tokens": 20, "completion_tokens": 30}, "model_name": "gpt-3.5-turbo"},
    )
    whole = usage_from_llm_result(result)
    per_prompt = [entry for part in result.flatten() for entry in usage_from_llm_result(part)]
    total = TokenUsage(input_tokens=20, output_tokens=30)
    for entries in (whole, per_prompt):
        assert sum((u for u, _ in entries if u is not None), TokenUsage()) == total
        assert [model for _, model in entries] == ["gpt-3.5-turbo", "gpt-3.5-turbo"]


def test_llm_result_without_any_usage() -> None:
    result = LLMResult(generations=[[_gen(model="m")]], llm_output=None)
    assert usage_from_llm_result(result) == [(None, "m")]


def test_llm_result_completion_model() -> None:
    result = LLMResult(
        generations=[[Generation(text="x")]],
        llm_output={"token_usage": {"prompt_tokens": 3, "completion_tokens": 4}, "model_name": "davinci-002"},
    )
    assert usage_from_llm_result(result) == [(TokenUsage(input_tokens=3, output_tokens=4), "davinci-002")]
    assert usage_from_llm_result(LLMResult(generations=[[Generation(text="x")]])) == []


# --- garbage ---------------------------------------------------------------------------------

GARBAGE: list[Any] = [None, {}, [], "", "token_usage", 42, True, object(), {"token_usage": "x"}, {"usage": [1, 2]}]


@pytest.mark.parametrize("value", GARBAGE, ids=repr)
def test_garbage_gives_none(value: Any) -> None:
    assert usage_from_response_metadata(value) is None
    assert usage_from_usage_metadata(value) in (None, TokenUsage())
    assert model_from_response_metadata(value) is None
    assert usage_from_message(value) is None
    assert usage_from_llm_result(value) == []


def test_non_numbers_without_a_usage_key_are_not_counts() -> None:
    assert model_from_response_metadata({"model": 42, "model_name": "  "}) is None
    assert usage_from_response_metadata({"model": 42, "model_name": "  "}) is None


ABSURD = [
    {"usage": {"input_tokens": "12", "output_tokens": None}},
    {"usage": {"input_tokens": True, "output_tokens": False}},
    {"usage": {"input_tokens": float("nan"), "output_tokens": 1}},
    {"usage": {"input_tokens": 1, "output_tokens": float("inf")}},
    {"usage": {"input_tokens": -5, "output_tokens": 1}},
    {"token_usage": {"prompt_tokens": -1, "completion_tokens": 0}},
    {"token_usage": {"prompt_tokens": 2.5, "completion_tokens": 0}},
    {"token_usage": {"prompt_tokens": 1, "completion_tokens": 2**64 - 1}},
    {"token_usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2**64 - 1}},
    {"usage": {"input_tokens": 0, "cache_read_input_tokens": -3}},
    {"usage_metadata": {"prompt_token_count": 3, "prompt_tokens_details": [{"modality": "AUDIO", "token_count": "9"}]}},
    {"usage": {"input_tokens": 1, "output_tokens": 1, "server_tool_use": {"web_search_requests": -1}}},
]


@pytest.mark.parametrize("metadata", ABSURD, ids=repr)
def test_absurd_counts_raise_usage_error(metadata: dict[str, Any]) -> None:
    """A count that cannot be real is refused, never read as 0 (a free call) nor sent to a store."""
    with pytest.raises(UsageError, match="not a token count"):
        usage_from_message(AIMessage(content="", response_metadata=metadata))


@pytest.mark.parametrize(
    "usage_metadata",
    [
        {"input_tokens": -3, "output_tokens": 2, "total_tokens": -1},
        {"input_tokens": 3, "output_tokens": 2.9, "total_tokens": 5},
        {"input_tokens": 3, "output_tokens": 2, "total_tokens": 2**64 - 1},  # LangChain accepts this
        {"input_tokens": 3, "output_tokens": 2, "total_tokens": "many"},
        {"input_tokens": 3, "output_tokens": 2, "output_token_details": {"reasoning": -1}},
        {"input_tokens": 2**40 + 1, "output_tokens": 2, "total_tokens": 2**40 + 3},
    ],
    ids=repr,
)
def test_absurd_usage_metadata_raises_usage_error(usage_metadata: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        usage_from_usage_metadata(usage_metadata)


def test_whole_float_counts_and_the_bound_itself_are_accepted() -> None:
    assert usage_from_response_metadata({"usage": {"input_tokens": 12.0, "output_tokens": 3}}) == TokenUsage(12, 3)
    assert usage_from_usage_metadata({"input_tokens": MAX_TOKENS, "output_tokens": 0}) == TokenUsage(MAX_TOKENS, 0)


def test_malformed_detail_containers_are_ignored() -> None:
    assert usage_from_response_metadata(
        {"token_usage": {"prompt_tokens": 4, "completion_tokens": 0, "prompt_tokens_details": "x"}}
    ) == TokenUsage(4, 0)
    assert usage_from_response_metadata(
        {"usage_metadata": {"prompt_token_count": 0, "prompt_tokens_details": [None, "x", {"modality": None}]}}
    ) == TokenUsage()
    assert usage_from_usage_metadata(
        {"input_tokens": 3, "output_tokens": 2, "input_token_details": "x", "output_token_details": {"audio": None}}
    ) == TokenUsage(3, 2)


def test_validate_usage() -> None:
    assert validate_usage(TokenUsage(1, 2)) == TokenUsage(1, 2)
    for bad in (TokenUsage(-1, 2), TokenUsage(1, 2**64), TokenUsage(1, 2.0), TokenUsage(web_searches=True)):  # type: ignore[arg-type]
        with pytest.raises(UsageError):
            validate_usage(bad)


def test_garbage_llm_results() -> None:
    class Odd:
        generations = [None, "x", [None, 3, ChatGeneration(message=AIMessage(content="x"))]]
        llm_output = ["not", "a", "mapping"]

    assert usage_from_llm_result(Odd()) == [(None, None)]


# --- agreement with the integrations' own conversion ------------------------------------------


def _private(module: str, name: str) -> Any:
    mod = pytest.importorskip(module)
    func = getattr(mod, name, None)
    if func is None:
        pytest.skip(f"{module}.{name} moved")
    return func


@pytest.mark.parametrize("tier", [None, "priority", "flex"])
def test_raw_openai_usage_agrees_with_langchain_openai(tier: str | None) -> None:
    convert = _private("langchain_openai.chat_models.base", "_create_usage_metadata")
    raw = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 7},
        "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 3},
    }
    expect = TokenUsage(
        input_tokens=1200,
        output_tokens=300,
        cache_read_tokens=1024,
        input_audio_tokens=7,
        output_audio_tokens=3,
        reasoning_tokens=192,
    )
    assert usage_from_response_metadata({"token_usage": raw}) == expect
    assert usage_from_usage_metadata(convert(raw, tier)) == expect


def test_raw_anthropic_usage_agrees_with_langchain_anthropic() -> None:
    convert = _private("langchain_anthropic.chat_models", "_create_usage_metadata")
    usage_type = pytest.importorskip("anthropic.types").Usage
    raw = {
        "input_tokens": 50,
        "output_tokens": 200,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
    }
    from_raw = usage_from_response_metadata({"usage": raw})
    assert from_raw is not None and from_raw.input_tokens == 1350
    assert usage_from_usage_metadata(convert(usage_type.model_validate(raw))) == from_raw
