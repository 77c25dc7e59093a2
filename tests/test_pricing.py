"""Pricing: genai-prices compiled into fast, exact rate cards; overrides; fallback; model refs."""

from __future__ import annotations

import json
import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import genai_prices
import pytest
from genai_prices.data_snapshot import get_snapshot

from langchain_budgetguard import pricing
from langchain_budgetguard.errors import UnknownModelPriceError
from langchain_budgetguard.money import ceil_nano
from langchain_budgetguard.pricing import (
    ModelPrice,
    ModelRef,
    Pricer,
    RateCard,
    canonical_provider,
    model_ref,
    model_ref_from_response,
    model_ref_from_run,
)
from langchain_budgetguard.usage import TokenUsage

# A copy of ../shared/fixtures/seed_usage.json, so a fresh checkout of the repo has it.
SEED = json.loads((Path(__file__).resolve().parent / "fixtures" / "seed_usage.json").read_text())
M = Decimal(1_000_000)

GENAI_KEYS = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "cache_write_5m_tokens": "cache_write_5m_tokens",
    "cache_write_1h_tokens": "cache_write_1h_tokens",
    "input_audio_tokens": "input_audio_tokens",
    "output_audio_tokens": "output_audio_tokens",
    "reasoning_tokens": "output_reasoning_tokens",
}


def genai_usage(u: TokenUsage) -> genai_prices.Usage:
    return genai_prices.Usage(**{gk: getattr(u, f) for f, gk in GENAI_KEYS.items()})


def random_usage(rng: random.Random, tiers: tuple[int, ...] = ()) -> TokenUsage:
    """A valid usage: every total covers its details (input >= cache read + cache write + audio)."""
    edges = [v for t in tiers for v in (t - 1, t, t + 1, t + 2) if v >= 0]
    inp = rng.choice([0, 1, rng.randint(0, 50), rng.randint(0, 5_000), rng.randint(0, 400_000), *edges])
    parts = sorted(rng.randint(0, inp) for _ in range(3))
    cr, cw, audio = parts[0], parts[1] - parts[0], parts[2] - parts[1]
    c5 = rng.randint(0, cw)
    c1 = rng.randint(0, cw - c5)
    out = rng.choice([0, 1, rng.randint(0, 20_000)])
    reasoning = rng.randint(0, out)
    out_audio = rng.randint(0, out - reasoning)
    values = dict(
        cache_read_tokens=cr, cache_write_tokens=cw, cache_write_5m_tokens=c5, cache_write_1h_tokens=c1,
        input_audio_tokens=audio, output_audio_tokens=out_audio, reasoning_tokens=reasoning,
    )
    for key in list(values):  # most real calls report only some details
        if rng.random() < 0.4:
            values[key] = 0
    if not values["cache_write_tokens"]:
        values["cache_write_5m_tokens"] = values["cache_write_1h_tokens"] = 0
    return TokenUsage(input_tokens=inp, output_tokens=out, **values).consistent()


# --------------------------------------------------------------------------------------
# The fixture's cost figures
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", SEED["costs"], ids=lambda r: f"{r['model']}-{r['prompt_tokens']}")
def test_seed_costs_are_exact(row: dict) -> None:
    card = Pricer().rate_card(ModelRef(row["model"], row["provider"]))
    usage = TokenUsage(input_tokens=row["prompt_tokens"], output_tokens=row["completion_tokens"])
    assert card.cost(usage) == Decimal(row["usd"])
    assert card.cost_nano(usage) == ceil_nano(Decimal(row["usd"]))


def test_seed_costs_spelled_out() -> None:
    pricer = Pricer()
    assert pricer.cost(ModelRef("gpt-4", "openai"), TokenUsage(11, 13)) == Decimal("0.00111")
    assert pricer.cost(ModelRef("gpt-4o-mini", "openai"), TokenUsage(11, 16)) == Decimal("0.00001125")
    assert pricer.cost(ModelRef("claude-v2", "anthropic"), TokenUsage(26, 70)) == Decimal("0.001888")
    # The same Claude 2 called through Bedrock, under its Bedrock model ids.
    for bedrock_id in ("anthropic.claude-v2", "anthropic.claude-v2:1"):
        assert pricer.cost(ModelRef(bedrock_id, "aws"), TokenUsage(26, 70)) == Decimal("0.001888")


def test_fixture_copy_matches_shared_when_present() -> None:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "seed_usage.json"
    if not shared.exists():
        pytest.skip("no ../shared checkout beside the repo")
    assert json.loads(shared.read_text())["costs"] == SEED["costs"]


# --------------------------------------------------------------------------------------
# The fast path equals genai-prices, exactly
# --------------------------------------------------------------------------------------

NAMED_MODELS = [
    ("gpt-4o-mini", "openai"),
    ("gpt-4o", "openai"),
    ("gpt-4.1", "openai"),
    ("o1", "openai"),
    ("o3-mini", "openai"),
    ("gpt-4o-realtime-preview", "openai"),
    ("gpt-4o", "azure"),
    ("claude-3-5-sonnet", "anthropic"),
    ("claude-sonnet-4", "anthropic"),
    ("claude-3-haiku-20240307", "anthropic"),
    ("claude-opus-4-1-20250805", "anthropic"),
    ("gemini-2.5-pro", "google"),
    ("gemini-1.5-flash", "google"),
    ("gemini-2.0-flash", "google"),
    ("gemini-2.5-flash", "google"),
    ("us.anthropic.claude-3-7-sonnet-20250219-v1:0", "aws"),
    ("mistral-large-latest", "mistral"),
    ("llama-3.1-8b-instant", "groq"),
    ("sonar-deep-research", "perplexity"),
]


@pytest.mark.parametrize(("name", "provider"), NAMED_MODELS)
def test_fast_path_equals_genai_calc_price(name: str, provider: str) -> None:
    card = Pricer().rate_card(ModelRef(name, provider))
    assert card.source == "genai-prices"
    rng = random.Random(f"{provider}/{name}")
    compared = 0
    for _ in range(150):
        usage = random_usage(rng, card.tiers)
        try:
            expected = genai_prices.calc_price(genai_usage(usage), name, provider_id=provider).total_price
        except ValueError:  # genai-prices refuses cached audio without an explicit split
            continue
        compared += 1
        assert card.cost(usage) == expected, usage
        assert card.cost_nano(usage) == ceil_nano(expected), usage
    assert compared >= 100


def test_fast_path_equals_genai_for_every_model_it_knows() -> None:
    """Every token-priced model of the bundled snapshot, at today's price, a few usages each."""
    now = datetime.now(UTC)
    models = 0
    for provider in get_snapshot().providers:
        for model in provider.models:
            price = model.get_prices(now)
            if price.input_mtok is None and price.output_mtok is None:
                continue
            card = RateCard(
                pricing._genai_price_fn(price), model=model.id, provider=provider.id,
                source="genai-prices", tiers=pricing._tier_starts(price),
            )
            models += 1
            rng = random.Random(f"{provider.id}/{model.id}")
            for _ in range(4):
                usage = random_usage(rng, card.tiers)
                try:
                    expected = price.calc_price(genai_usage(usage))["total_price"]
                except ValueError:
                    continue
                assert card.cost(usage) == expected, (provider.id, model.id, usage)
    assert models > 1000


def test_tiered_price_switches_above_the_threshold() -> None:
    card = Pricer().rate_card(ModelRef("gemini-2.5-pro", "google"))
    assert card.tiers == (200_000,)
    # genai-prices: a tier applies when the prompt is *above* its start, to every token.
    at = card.cost(TokenUsage(input_tokens=200_000, output_tokens=1_000))
    above = card.cost(TokenUsage(input_tokens=200_001, output_tokens=1_000))
    assert at == 200_000 * Decimal("1.25") / M + 1_000 * Decimal(10) / M
    assert above == 200_001 * Decimal("2.5") / M + 1_000 * Decimal(15) / M


def test_cost_never_calls_genai_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    cards = [Pricer().rate_card(ModelRef(n, p)) for n, p in NAMED_MODELS]
    usages = [random_usage(random.Random(i), (200_000,)) for i in range(50)]

    def boom(*args, **kwargs):
        raise AssertionError("genai-prices called on the hot path")

    monkeypatch.setattr(genai_prices.types.ModelPrice, "calc_price", boom)
    monkeypatch.setattr(genai_prices.types.ModelInfo, "calc_price", boom)
    monkeypatch.setattr(genai_prices.types.ModelInfo, "get_prices", boom)
    monkeypatch.setattr(genai_prices.data_snapshot.DataSnapshot, "find_provider_model", boom)
    monkeypatch.setattr(genai_prices, "calc_price", boom)
    monkeypatch.setattr(genai_prices, "Usage", boom)
    for card in cards:
        for usage in usages:
            assert card.cost(usage) >= 0
            assert card.cost_nano(usage) >= 0


def test_cost_nano_rounds_up_to_whole_nano_usd() -> None:
    card = Pricer({"tiny": {"input": "0.0001", "output": "0"}}).rate_card(ModelRef("tiny"))
    assert card.cost(TokenUsage(input_tokens=1)) == Decimal("1E-10")
    assert card.cost_nano(TokenUsage(input_tokens=1)) == 1
    assert card.cost_nano(TokenUsage(input_tokens=10)) == 1
    assert card.cost_nano(TokenUsage(input_tokens=11)) == 2
    assert card.cost_nano(TokenUsage()) == 0
    assert card.cost(TokenUsage()) == 0
    rng = random.Random(7)
    flash = Pricer().rate_card(ModelRef("gemini-1.5-flash", "google"))  # 18.75 nano-USD a cached token
    for _ in range(300):
        usage = random_usage(rng)
        assert flash.cost_nano(usage) == ceil_nano(flash.cost(usage))


# --------------------------------------------------------------------------------------
# Detail tokens at their own rates
# --------------------------------------------------------------------------------------


def test_cache_reads_are_charged_at_the_cache_read_rate() -> None:
    card = Pricer().rate_card(ModelRef("gpt-4o-mini", "openai"))
    usage = TokenUsage(input_tokens=1000, output_tokens=0, cache_read_tokens=600)
    expected = 400 * Decimal("0.15") / M + 600 * Decimal("0.075") / M
    assert card.cost(usage) == expected == Decimal("0.000105")
    # LangChain's usage dict handed to genai-prices as-is counts only input_tokens: every token at full price.
    naive = genai_prices.calc_price(
        {"input_tokens": 1000, "output_tokens": 0, "input_token_details": {"cache_read": 600}}, "gpt-4o-mini"
    ).total_price
    assert naive == Decimal("0.00015") > card.cost(usage)


def test_claude_cache_writes_5m_and_1h() -> None:
    card = Pricer().rate_card(ModelRef("claude-sonnet-4", "anthropic"))
    assert (card.prices["input"], card.prices["cache_read"]) == (Decimal(3), Decimal("0.3"))
    assert (card.prices["cache_write_5m"], card.prices["cache_write_1h"]) == (Decimal("3.75"), Decimal(6))
    usage = TokenUsage(
        input_tokens=10_000, output_tokens=500, cache_read_tokens=2_000,
        cache_write_tokens=3_000, cache_write_5m_tokens=1_000, cache_write_1h_tokens=2_000,
    )
    expected = (5_000 * 3 + 2_000 * Decimal("0.3") + 1_000 * Decimal("3.75") + 2_000 * 6 + 500 * 15) / M
    assert card.cost(usage) == expected == Decimal("0.03885")
    # A cache write with no TTL split is a 5-minute write.
    assert card.cost(TokenUsage(input_tokens=1_000, cache_write_tokens=1_000)) == Decimal("0.00375")


def test_reasoning_tokens_priced_as_output_or_at_their_own_rate() -> None:
    pricer = Pricer()
    o1 = pricer.rate_card(ModelRef("o1", "openai"))
    usage = TokenUsage(input_tokens=100, output_tokens=1_000, reasoning_tokens=800)
    assert o1.cost(usage) == (100 * 15 + 1_000 * 60) / M
    deep = pricer.rate_card(ModelRef("sonar-deep-research", "perplexity"))  # $8 output, $3 reasoning
    assert deep.cost(usage) == (100 * 2 + 200 * 8 + 800 * 3) / M


def test_overlapping_cached_audio_is_charged_conservatively() -> None:
    """Cached audio tokens count in both cache_read and audio: genai-prices can't split them
    without an explicit cache_audio_read count; we never charge less than any honest split."""
    card = Pricer().rate_card(ModelRef("gpt-4o-realtime-preview", "openai"))
    usage = TokenUsage(input_tokens=1_000, output_tokens=10, cache_read_tokens=600, input_audio_tokens=800)
    ours = card.cost(usage)
    for cached_audio in (400, 500, 600):  # at least 400 of the 600 cached tokens must be audio
        split = genai_prices.Usage(
            input_tokens=1_000, output_tokens=10, cache_read_tokens=600, input_audio_tokens=800,
            cache_audio_read_tokens=cached_audio,
        )
        assert ours >= genai_prices.calc_price(split, "gpt-4o-realtime-preview", provider_id="openai").total_price


# --------------------------------------------------------------------------------------
# Overrides, fallback, unknown models, cache
# --------------------------------------------------------------------------------------


def test_override_beats_genai_prices() -> None:
    pricer = Pricer({"GPT-4o-mini": {"input": "1", "output": 2, "cache_read": "0.1"}})
    card = pricer.rate_card(ModelRef("gpt-4o-mini", "openai"))
    assert card.source == "override"
    assert card.cost(TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000)) == 3
    assert card.cost(TokenUsage(input_tokens=1_000_000, cache_read_tokens=1_000_000)) == Decimal("0.1")
    assert Pricer().rate_card(ModelRef("gpt-4o-mini", "openai")).source == "genai-prices"


def test_override_defaults_and_reasoning() -> None:
    card = Pricer({"ft": ModelPrice(input=Decimal(1), output=Decimal(4), reasoning="2")}).rate_card(ModelRef("ft"))
    assert card.prices["cache_read"] == card.prices["cache_write"] == 1
    usage = TokenUsage(input_tokens=10, output_tokens=100, reasoning_tokens=60, cache_read_tokens=5)
    assert card.cost(usage) == (10 * 1 + 40 * 4 + 60 * 2) / M


def test_provider_scoped_override() -> None:
    pricer = Pricer({
        "google_vertexai:gemini-pro": {"input": "9", "output": "9"},
        "ollama:llama3:8b": {"input": 0, "output": 0},
    })
    assert pricer.rate_card(ModelRef("gemini-pro", "google")).source == "override"
    assert pricer.rate_card(ModelRef("gemini-pro", "google_genai")).source == "override"
    with pytest.raises(UnknownModelPriceError):  # not Google's override, not another host's entry either
        pricer.rate_card(ModelRef("gemini-pro", "openrouter"))
    free = pricer.rate_card(ModelRef("llama3:8b", "ollama"))
    assert free.source == "override" and free.cost(TokenUsage(1000, 1000)) == 0


@pytest.mark.parametrize(
    ("price", "message"),
    [
        (
            {"input": "abc", "output": 1},
            "price override 'my-ft': 'input' must be a number of dollars per million tokens, got 'abc'",
        ),
        ({"input": 1, "output": None}, "price override 'my-ft': 'output' is required"),
        ({"input": 1}, "price override 'my-ft': 'output' is required"),
        ({"input": 1, "output": -2}, "price override 'my-ft': 'output' must not be negative, got -2"),
        ({"input": 1, "output": 1, "cache": 1}, "price override 'my-ft': unknown key(s) 'cache'"),
        ({"input": float("nan"), "output": 1}, "price override 'my-ft': 'input' must be a number"),
        ({"input": True, "output": 1}, "price override 'my-ft': 'input' must be a number"),
        (3.0, "price override 'my-ft': expected a ModelPrice or a mapping"),
    ],
)
def test_override_validation(price: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Pricer({"my-ft": price})
    assert str(info.value).startswith(message)


def test_model_price_validates_itself() -> None:
    assert ModelPrice(input=0.15, output="0.6").input == Decimal("0.15")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ModelPrice: 'output' must be a number of dollars per million tokens"):
        ModelPrice(input=Decimal(1), output="lots")  # type: ignore[arg-type]


def test_unknown_model_raises_with_how_to_fix() -> None:
    with pytest.raises(UnknownModelPriceError) as info:
        Pricer().rate_card(ModelRef("my-finetune-xyz", "ollama"))
    message = str(info.value)
    assert "'my-finetune-xyz'" in message and "'ollama'" in message
    assert 'BudgetGuard(..., prices={"my-finetune-xyz": {"input": ' in message
    assert "fallback_price" in message
    assert info.value.model == "my-finetune-xyz"  # type: ignore[attr-defined]
    assert isinstance(info.value, LookupError)


def test_unnamed_model_raises() -> None:
    with pytest.raises(UnknownModelPriceError, match="Cannot tell which model"):
        Pricer().rate_card(ModelRef(None, "openai"))


def test_fallback_prices_unknown_models_only() -> None:
    pricer = Pricer(fallback={"input": "1", "output": "2"})
    card = pricer.rate_card(ModelRef("my-finetune-xyz", "ollama"))
    assert card.source == "fallback"
    assert card.cost(TokenUsage(1_000_000, 1_000_000)) == 3
    assert pricer.rate_card(ModelRef(None)).source == "fallback"
    assert pricer.rate_card(ModelRef("gpt-4o-mini", "openai")).source == "genai-prices"
    with pytest.raises(ValueError, match="fallback price: 'input'"):
        Pricer(fallback={"input": "x", "output": 1})


def test_cache_returns_the_same_card() -> None:
    pricer = Pricer()
    card = pricer.rate_card(ModelRef("gpt-4o-mini", "openai"))
    assert pricer.rate_card(ModelRef("gpt-4o-mini", "openai")) is card
    assert pricer.rate_card(ModelRef("GPT-4o-mini", "OpenAI")) is card
    results: list[RateCard] = []
    fresh = Pricer()
    barrier = threading.Barrier(8)

    def resolve() -> None:
        barrier.wait()
        results.append(fresh.rate_card(ModelRef("claude-sonnet-4", "anthropic")))

    threads = [threading.Thread(target=resolve) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_unknown_is_cached_too() -> None:
    pricer = Pricer()
    for _ in range(2):
        with pytest.raises(UnknownModelPriceError):
            pricer.rate_card(ModelRef("no-such-model-anywhere"))


def test_time_of_day_price_is_resolved_again_when_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [datetime(2026, 11, 22, 12, 0, tzinfo=UTC)]
    monkeypatch.setattr(pricing, "_now", lambda: clock[0])
    pricer = Pricer()
    ref = ModelRef("deepseek-chat", "deepseek")
    usage = TokenUsage(input_tokens=10_000, output_tokens=2_000, cache_read_tokens=4_000)

    def genai_at(when: datetime) -> Decimal:
        return genai_prices.calc_price(
            genai_usage(usage), "deepseek-chat", provider_id="deepseek", genai_request_timestamp=when
        ).total_price

    first = pricer.rate_card(ref)
    assert first.valid_until is not None and first.valid_until > clock[0]
    assert first.cost(usage) == genai_at(clock[0])
    assert pricer.rate_card(ref) is first

    clock[0] = first.valid_until + timedelta(minutes=1)
    second = pricer.rate_card(ref)
    assert second is not first
    assert second.cost(usage) == genai_at(clock[0]) != first.cost(usage)


# --------------------------------------------------------------------------------------
# Which model is it?
# --------------------------------------------------------------------------------------


def test_model_ref_from_real_chat_models() -> None:
    from langchain_anthropic import ChatAnthropic
    from langchain_openai import AzureChatOpenAI, ChatOpenAI

    openai = ChatOpenAI(model="gpt-4o-mini", api_key="x")
    anthropic = ChatAnthropic(model="claude-3-haiku-20240307", api_key="x")
    assert model_ref(openai) == ModelRef("gpt-4o-mini", "openai")
    assert model_ref(anthropic) == ModelRef("claude-3-haiku-20240307", "anthropic")
    assert model_ref(openai.bind(max_tokens=5)) == ModelRef("gpt-4o-mini", "openai")
    assert model_ref(anthropic.bind(max_tokens=5).with_retry()) == ModelRef("claude-3-haiku-20240307", "anthropic")
    # A model bound per call wins, the outer binding over the inner.
    assert model_ref(openai.bind(model="gpt-4o").bind(stop=["x"])) == ModelRef("gpt-4o", "openai")
    assert model_ref(openai.bind(model="gpt-4o").bind(model="o1")) == ModelRef("o1", "openai")
    assert model_ref(openai.with_fallbacks([anthropic])) == ModelRef("gpt-4o-mini", "openai")
    azure = AzureChatOpenAI(
        azure_deployment="prod-4o", api_version="2024-06-01", azure_endpoint="https://x.openai.azure.com",
        api_key="x", model="gpt-4o",
    )
    assert model_ref(azure) == ModelRef("gpt-4o", "azure")
    # ...and the ref prices the model.
    assert Pricer().cost(model_ref(openai.bind(max_tokens=5)), TokenUsage(11, 16)) == Decimal("0.00001125")


def test_model_ref_from_bind_tools() -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    bound = ChatOpenAI(model="gpt-4o-mini", api_key="x").bind_tools([add]).with_config(tags=["t"])
    assert model_ref(bound) == ModelRef("gpt-4o-mini", "openai")


def test_model_ref_infers_provider_from_class_name() -> None:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    class ChatVertexAI:  # no LangChain at all: attributes and class name only
        model_name = "gemini-pro"

        def invoke(self, *a, **k): ...

    class ChatBedrockConverse(GenericFakeChatModel):  # core's default ls_provider: "bedrockconverse"
        model_id: str = "anthropic.claude-v2:1"

    class MyOpenAI(ChatVertexAI):
        pass

    class Wrapper:
        def __init__(self, llm):
            self.llm = llm

        def invoke(self, *a, **k): ...

    assert model_ref(ChatVertexAI()) == ModelRef("gemini-pro", "google")
    assert model_ref(MyOpenAI()) == ModelRef("gemini-pro", "google")
    assert model_ref(ChatBedrockConverse(messages=iter([]))) == ModelRef("anthropic.claude-v2:1", "aws")
    assert model_ref(Wrapper(ChatVertexAI())) == ModelRef("gemini-pro", "google")
    assert model_ref(object()) == ModelRef(None, None)


def test_canonical_provider() -> None:
    assert canonical_provider("google_vertexai") == canonical_provider("google_genai") == "google"
    assert canonical_provider("amazon_bedrock") == "aws"
    assert canonical_provider("xai") == "x-ai"
    assert canonical_provider("Ollama") == "ollama"
    assert canonical_provider(None) is None


def test_model_ref_from_run_metadata_shape() -> None:
    # What ChatOpenAI hands on_chat_model_start.
    serialized = {"lc": 1, "type": "constructor", "id": ["langchain", "chat_models", "openai", "ChatOpenAI"],
                  "kwargs": {"model_name": "gpt-4o-mini"}, "name": "ChatOpenAI"}
    params = {"model": "gpt-4o-mini", "model_name": "gpt-4o-mini", "stream": False, "_type": "openai-chat",
              "stop": None}
    metadata = {"user_id": "alice", "ls_provider": "openai", "ls_model_name": "gpt-4o-mini",
                "ls_model_type": "chat", "ls_temperature": None, "ls_integration": "langchain_chat_model"}
    assert model_ref_from_run(serialized, params, metadata) == ModelRef("gpt-4o-mini", "openai")
    # Without LangChain's ls_* metadata: invocation params, then constructor kwargs, class path.
    assert model_ref_from_run(serialized, params, {}) == ModelRef("gpt-4o-mini", "openai")
    assert model_ref_from_run(serialized, None, None) == ModelRef("gpt-4o-mini", "openai")
    vertex = {"id": ["langchain", "chat_models", "vertexai", "ChatVertexAI"], "kwargs": {"model_name": "gemini-pro"}}
    assert model_ref_from_run(vertex, {}, {"ls_provider": "google_vertexai"}) == ModelRef("gemini-pro", "google")
    assert model_ref_from_run(None, None, None) == ModelRef(None, None)


def test_model_ref_from_a_real_callback_run() -> None:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    class FakeOpenAI(GenericFakeChatModel):
        def _get_ls_params(self, stop=None, **kwargs):
            name = kwargs.get("model", "gpt-4o-mini")
            return {"ls_provider": "openai", "ls_model_name": name, "ls_model_type": "chat"}

    seen: list[ModelRef] = []

    class Handler(BaseCallbackHandler):
        def on_chat_model_start(self, serialized, messages, *, run_id, metadata=None, **kwargs):
            seen.append(model_ref_from_run(serialized, kwargs.get("invocation_params"), metadata))

    llm = FakeOpenAI(messages=iter([AIMessage("a"), AIMessage("b")]))
    llm.invoke("hi", config={"callbacks": [Handler()], "metadata": {"user_id": "alice"}})
    llm.bind(model="o1").invoke("hi", config={"callbacks": [Handler()]})
    assert seen == [ModelRef("gpt-4o-mini", "openai"), ModelRef("o1", "openai")]


def test_model_ref_from_response() -> None:
    from langchain_core.messages import AIMessage

    for meta, provider in SEED_RESPONSES:
        ref = model_ref_from_response(AIMessage("", response_metadata=meta))
        assert ref is not None and ref.name == (meta.get("model_name") or meta.get("model") or meta.get("model_id"))
    msg = AIMessage("", response_metadata={"model_name": "gpt-4o-mini-2024-07-18", "model_provider": "openai"})
    assert model_ref_from_response(msg) == ModelRef("gpt-4o-mini-2024-07-18", "openai")
    assert model_ref_from_response({"model_id": "anthropic.claude-v2"}) == ModelRef("anthropic.claude-v2", None)
    assert model_ref_from_response(AIMessage("", response_metadata={"finish_reason": "stop"})) is None
    assert model_ref_from_response(None) is None


SEED_RESPONSES = [
    (row["response_metadata"], row["provider"])
    for row in SEED["response_metadata"]
    if any(k in row["response_metadata"] for k in ("model_name", "model", "model_id"))
]


def test_model_names_are_normalised_for_lookup() -> None:
    pricer = Pricer()
    assert pricer.rate_card(ModelRef("models/gemini-pro", "google")).priced_as == "google/gemini-pro"
    assert pricer.rate_card(ModelRef("anthropic.claude-v2:1", "aws")).priced_as == "anthropic/claude-2"
    fireworks = ModelRef("accounts/fireworks/models/llama-v3p1-8b-instruct", "fireworks")
    assert pricer.rate_card(fireworks).priced_as == "fireworks/llama-v3p1-8b-instruct"
    assert pricer.rate_card(ModelRef("mistralai/Mixtral-8x7B-Instruct-v0.1", "together")).source == "genai-prices"
    assert pricer.rate_card(ModelRef("claude-3-5-sonnet@20240620", "google_anthropic_vertex")).priced_as.endswith(
        "claude-3-5-sonnet"
    )
    haiku = pricer.rate_card(ModelRef(
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-20241022-v1:0", "aws"
    ))
    assert haiku.priced_as is not None and "claude-3-5-haiku" in haiku.priced_as
    # A dated name that genai-prices doesn't list is priced as its undated alias.
    dated = ModelRef("claude-sonnet-4-20990101", "anthropic")
    assert pricer.rate_card(dated).priced_as == "anthropic/claude-sonnet-4-0"
    # "claude-v2:1" must not be cut down to a bare "claude".
    assert "claude" not in pricing._name_candidates("anthropic.claude-v2:1")
    assert seed_total_of(pricer) == sum(Decimal(r["usd"]) for r in SEED["costs"])


def seed_total_of(pricer: Pricer) -> Decimal:
    return sum(
        (pricer.cost(ModelRef(r["model"], r["provider"]), TokenUsage(r["prompt_tokens"], r["completion_tokens"]))
         for r in SEED["costs"]),
        Decimal(0),
    )


def test_rate_card_repr_and_prices() -> None:
    card = Pricer().rate_card(ModelRef("gpt-4", "openai"))
    assert card.prices["input"] == 30 and str(card.prices["output"]) == "60"
    assert "gpt-4" in repr(card) and "genai-prices" in repr(card)
    assert str(ModelRef("gpt-4", "openai")) == "openai/gpt-4"


# --------------------------------------------------------------------------------------
# The model that serves the call (issue 11: "the wrong model priced")
# --------------------------------------------------------------------------------------


def _mini(**kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(**{"model": "gpt-4o-mini", "api_key": "test", **kwargs})


GPT4O = ModelRef("gpt-4o", "openai")
MINI = ModelRef("gpt-4o-mini", "openai")


def test_call_kwargs_and_bindings_name_the_model() -> None:
    llm = _mini()
    assert model_ref(llm) == MINI
    assert model_ref(llm, {"model": "gpt-4o"}) == GPT4O
    assert model_ref(llm, {"model_name": "gpt-4o"}) == GPT4O
    assert model_ref(llm.bind(model="gpt-4o")) == GPT4O
    assert model_ref(llm.bind(model="gpt-4o"), {"model": "o3"}) == ModelRef("o3", "openai")  # the call wins
    assert model_ref(llm.bind(model="gpt-4o").bind(model="o1")) == ModelRef("o1", "openai")  # the outer bind wins
    assert model_ref(llm.bind_tools([]).with_retry()) == MINI


def test_configurable_fields_and_alternatives_follow_the_run_config() -> None:
    from langchain_anthropic import ChatAnthropic
    from langchain_core.runnables import ConfigurableField

    fields = _mini().configurable_fields(model_name=ConfigurableField(id="model"))
    assert model_ref(fields) == MINI
    assert model_ref(fields, config={"configurable": {"model": "gpt-4o"}}) == GPT4O
    assert model_ref(fields.with_config(configurable={"model": "gpt-4o"})) == GPT4O
    alternatives = _mini().configurable_alternatives(
        ConfigurableField(id="llm"), default_key="mini",
        claude=ChatAnthropic(model="claude-3-5-haiku-latest", api_key="test"),
    )
    assert model_ref(alternatives) == MINI
    assert model_ref(alternatives, config={"configurable": {"llm": "claude"}}) == ModelRef(
        "claude-3-5-haiku-latest", "anthropic"
    )
    assert model_ref(alternatives.bind(stop=["x"]), config={"configurable": {"llm": "claude"}}).provider == "anthropic"


def test_init_chat_model_configurable_model_is_resolved_with_its_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain.chat_models import init_chat_model

    monkeypatch.setenv("OPENAI_API_KEY", "test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    llm = init_chat_model("gpt-4o-mini", configurable_fields=("model", "model_provider", "base_url"))
    assert model_ref(llm) == MINI
    assert model_ref(llm, config={"configurable": {"model": "gpt-4o"}}) == GPT4O
    assert model_ref(llm, config={"configurable": {"model": "claude-3-5-haiku-latest"}}).provider == "anthropic"
    together = model_ref(llm, config={"configurable": {"base_url": "https://api.together.xyz/v1"}})
    assert together.provider == "together"
    prefixed = init_chat_model("gpt-4o-mini", configurable_fields="any", config_prefix="chat")
    assert model_ref(prefixed, config={"configurable": {"chat_model": "gpt-4o"}}) == GPT4O
    assert model_ref(init_chat_model(configurable_fields=("model",))).name is None  # no model yet: unknown


def test_with_fallbacks_gives_every_candidate() -> None:
    from langchain_anthropic import ChatAnthropic

    from langchain_budgetguard.pricing import candidate_refs

    claude = ChatAnthropic(model="claude-sonnet-4-5", api_key="test")
    chain = _mini().with_fallbacks([claude, _mini(model="gpt-4o")])
    assert model_ref(chain) == MINI
    assert candidate_refs(chain) == [MINI, ModelRef("claude-sonnet-4-5", "anthropic"), GPT4O]
    assert candidate_refs(chain, {"model": "o3"})[0] == ModelRef("o3", "openai")
    assert candidate_refs(_mini()) == [MINI]


def test_served_ref_picks_the_candidate_the_reply_names() -> None:
    from langchain_core.messages import AIMessage

    from langchain_budgetguard.pricing import served_ref

    claude = ModelRef("claude-sonnet-4-5", "anthropic")
    reply = AIMessage("", response_metadata={"model_name": "gpt-4o-2024-08-06"})
    assert served_ref(MINI, reply) == ModelRef("gpt-4o-2024-08-06", "openai")
    by_claude = AIMessage("", response_metadata={"model": "claude-sonnet-4-5-20250929", "model_provider": "anthropic"})
    assert served_ref(MINI, by_claude, [MINI, claude]) == ModelRef("claude-sonnet-4-5-20250929", "anthropic")
    assert served_ref(MINI, AIMessage("")) is MINI
    assert served_ref(MINI, AIMessage("", response_metadata={"model_name": "GPT-4o-mini"})) is MINI
    together = ModelRef("deepseek-ai/DeepSeek-R1-0528", "together", "api.together.xyz")
    spoof = AIMessage("", response_metadata={"model_name": "deepseek-reasoner", "model_provider": "deepseek"})
    assert served_ref(together, spoof).provider == "together"  # a reply never moves the call to another host


def test_real_chat_openai_priced_as_the_model_that_served(openai_server) -> None:
    """invoke(model=...) and an inner with_fallbacks against the real ChatOpenAI: the served model's price."""
    from langchain_budgetguard.pricing import candidate_refs, served_ref
    from tests.providers import Reply

    pricer = Pricer(hosts={openai_server.url.split("//", 1)[1]: "openai"})
    llm = openai_server.chat_model(model="gpt-4o-mini")
    openai_server.script(Reply("hi", input_tokens=1000, output_tokens=500))
    reply = llm.invoke("hi", model="gpt-4o")
    assert openai_server.last.body["model"] == "gpt-4o"
    ref = model_ref(llm, {"model": "gpt-4o"})
    card = pricer.settle_card(served_ref(ref, reply), [ref])
    usage = TokenUsage(1000, 500)
    assert card.cost(usage) == genai_prices.calc_price(genai_usage(usage), "gpt-4o", provider_id="openai").total_price
    assert card.cost(usage) > 16 * pricer.rate_card(ModelRef("gpt-4o-mini", "openai")).cost(usage)

    chain = llm.with_fallbacks([openai_server.chat_model(model="gpt-4o")])
    openai_server.script(Reply(error=500), Reply("from the fallback", input_tokens=1000, output_tokens=500))
    reply = chain.invoke("hi")
    candidates = candidate_refs(chain)
    served = served_ref(model_ref(chain), reply, candidates)
    assert served.name == "gpt-4o"
    assert pricer.settle_card(served, candidates).cost(usage) == card.cost(usage)


def test_settle_card_of_an_unpriced_served_model_is_the_dearest_candidates() -> None:
    pricer = Pricer()
    unknown = ModelRef("gpt-made-up-9000", "openai")
    usage = TokenUsage(1000, 1000)
    card = pricer.settle_card(unknown, [MINI, GPT4O], usage)
    assert card.model == "gpt-4o"  # never $0, never the cheaper default
    assert pricer.settle_card(unknown, [MINI, GPT4O]).model == "gpt-4o"
    assert pricer.settle_card(MINI, [GPT4O]).model == "gpt-4o-mini"  # a priced served model is charged as itself
    with pytest.raises(UnknownModelPriceError):
        pricer.settle_card(unknown, [ModelRef("also-made-up", "openai")])


def test_billed_items_equal_genai_for_every_model_that_prices_them() -> None:
    """Image/video tokens and web searches, on every bundled model that prices one: genai-prices' figure."""
    now = datetime.now(UTC)
    keys = ("input_image_mtok", "output_image_mtok", "input_video_mtok", "web_searches_kcount")
    models = 0
    for provider in get_snapshot().providers:
        for model in provider.models:
            price = model.get_prices(now)
            if (price.input_mtok is None and price.output_mtok is None) or not any(
                getattr(price, k, None) is not None for k in keys
            ):
                continue
            card = pricing._genai_card(model, price, now, model=model.id, provider=provider.id,
                                       entry_provider=provider)
            rng = random.Random(f"items/{provider.id}/{model.id}")
            models += 1
            for _ in range(6):
                inp, out = rng.randint(0, 300_000), rng.randint(0, 20_000)
                image_in = rng.randint(0, inp // 2)
                video_in = rng.randint(0, inp - image_in) if rng.random() < 0.5 else 0
                image_out = rng.randint(0, out)
                searches = rng.randint(0, 40) if price.web_searches_kcount is not None else 0
                usage = TokenUsage(input_tokens=inp, output_tokens=out, input_image_tokens=image_in,
                                   input_video_tokens=video_in, output_image_tokens=image_out, web_searches=searches)
                expected = price.calc_price(genai_prices.Usage(
                    input_tokens=inp, output_tokens=out, input_image_tokens=image_in, input_video_tokens=video_in,
                    output_image_tokens=image_out, web_searches=searches,
                ))["total_price"]
                assert card.cost(usage) == expected, (provider.id, model.id, usage)
                assert card.cost_nano(usage) == ceil_nano(expected)
    assert models > 50


def test_every_variant_equals_genai() -> None:
    """Every service_tier / speed variant genai-prices has today, priced through card.variant."""
    now = datetime.now(UTC)
    checked = 0
    for provider in get_snapshot().providers:
        for model in provider.models:
            base = model.get_prices(now)
            if base.input_mtok is None and base.output_mtok is None:
                continue
            for variant in model.price_variants or ():
                context = {k: v for k, v in variant.when.items() if k in ("service_tier", "speed")}
                if not context or len(context) != len(variant.when):
                    continue
                if variant.constraint is not None and not variant.constraint.active(now):
                    continue
                card = pricing._genai_card(model, base, now, model=model.id, provider=provider.id,
                                           entry_provider=provider)
                usage = TokenUsage(input_tokens=5_000, output_tokens=700, cache_read_tokens=1_000, **context)
                expected = model.get_prices(now, context).calc_price(
                    genai_prices.Usage(input_tokens=5_000, output_tokens=700, cache_read_tokens=1_000)
                )["total_price"]
                assert card.cost(usage) == expected, (provider.id, model.id, context)
                checked += 1
    assert checked > 50
