"""Price at the host that serves the call, and only there (issue 11, "another host's price")."""

from __future__ import annotations

from decimal import Decimal

import pytest
from genai_prices.data_snapshot import get_snapshot

from langchain_budgetguard import pricing
from langchain_budgetguard.errors import UnknownModelPriceError
from langchain_budgetguard.pricing import (
    LOCAL,
    ModelRef,
    Pricer,
    host_provider,
    model_ref,
    price_host_as,
)
from langchain_budgetguard.usage import TokenUsage

DEEPSEEK_OWN = Pricer().rate_card(ModelRef("deepseek-reasoner", "deepseek"))


@pytest.mark.parametrize(
    ("url", "provider"),
    [
        ("https://api.openai.com/v1", "openai"),
        ("https://my-res.openai.azure.com/", "azure"),
        ("https://my-res.services.ai.azure.com/models", "azure"),
        ("https://api.together.xyz/v1", "together"),
        ("https://api.together.ai/v1", "together"),
        ("https://api.fireworks.ai/inference/v1", "fireworks"),
        ("https://openrouter.ai/api/v1", "openrouter"),
        ("https://api.deepseek.com", "deepseek"),
        ("https://api.groq.com/openai/v1", "groq"),
        ("https://api.deepinfra.com/v1/openai", "deepinfra"),
        ("https://api.mistral.ai/v1", "mistral"),
        ("https://api.x.ai/v1", "x-ai"),
        ("https://bedrock-runtime.us-east-1.amazonaws.com", "aws"),
        ("https://generativelanguage.googleapis.com/v1beta", "google"),
        ("https://router.huggingface.co/together/v1", "huggingface_together"),
        ("http://localhost:11434/v1", LOCAL),  # Ollama
        ("http://127.0.0.1:8000/v1", LOCAL),  # vLLM
        ("http://0.0.0.0:1234/v1", LOCAL),  # LM Studio
        ("http://192.168.1.20:8080/v1", LOCAL),
        ("http://[::1]:8000/v1", LOCAL),
        ("http://vllm:8000/v1", LOCAL),  # a container on the compose network
        ("http://host.docker.internal:11434", LOCAL),
        ("https://llm-gateway.example.com/v1", "llm-gateway.example.com"),
    ],
)
def test_host_provider(url: str, provider: str) -> None:
    assert host_provider(url)[0] == provider


def test_openai_clients_pointed_elsewhere_are_not_openai() -> None:
    from langchain_openai import ChatOpenAI

    assert model_ref(ChatOpenAI(model="gpt-4o-mini", api_key="t")) == ModelRef("gpt-4o-mini", "openai")
    together = model_ref(ChatOpenAI(model="meta-llama/Llama-3-70b", base_url="https://api.together.xyz/v1",
                                    api_key="t"))
    assert together == ModelRef("meta-llama/Llama-3-70b", "together", "api.together.xyz")
    local = model_ref(ChatOpenAI(model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key="t"))
    assert (local.provider, local.host) == (LOCAL, "127.0.0.1:9")
    # A local server answering as "gpt-4o-mini" is not OpenAI: unknown unless priced.
    with pytest.raises(UnknownModelPriceError, match="local server"):
        Pricer().rate_card(local)


def test_base_url_from_the_environment_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_openai import ChatOpenAI

    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.fireworks.ai/inference/v1")
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    assert model_ref(ChatOpenAI(model="gpt-4o", api_key="t")).provider == "fireworks"


def test_deepseek_r1_at_together_is_never_priced_as_deepseeks_own_api() -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url="https://api.together.xyz/v1", model="deepseek-ai/DeepSeek-R1-0528", api_key="t")
    ref = model_ref(llm)
    assert ref.provider == "together"
    try:
        card = Pricer().rate_card(ref)
    except UnknownModelPriceError as err:
        assert "deepseek-ai/DeepSeek-R1-0528" in str(err) and "together" in str(err)
        assert "prices=" in str(err)  # says how to add a price
    else:  # genai-prices learnt Together's price: it must be Together's entry
        assert card.priced_as.startswith("together/")
        assert card.prices != DEEPSEEK_OWN.prices
    fallback = Pricer(fallback={"input": 7, "output": 7}).rate_card(ref)
    assert fallback.source == "fallback" and fallback.prices["input"] == 7


def test_deepseek_r1_at_fireworks_is_never_priced_as_deepseeks_own_api() -> None:
    fireworks = pytest.importorskip("langchain_fireworks")
    llm = fireworks.ChatFireworks(model="accounts/fireworks/models/deepseek-r1", api_key="t")
    ref = model_ref(llm)
    assert ref.provider == "fireworks"
    try:
        card = Pricer().rate_card(ref)
    except UnknownModelPriceError as err:
        assert "fireworks" in str(err)
    else:
        assert card.priced_as.startswith("fireworks/") and card.prices != DEEPSEEK_OWN.prices
    # A Fireworks model genai-prices does list there is priced at Fireworks' price.
    listed = Pricer().rate_card(model_ref(fireworks.ChatFireworks(
        model="accounts/fireworks/models/deepseek-r1-0528", api_key="t")))
    assert listed.priced_as == "fireworks/deepseek-r1-0528"
    assert listed.prices["output"] != DEEPSEEK_OWN.prices["output"]


def test_deepseek_client_is_priced_at_deepseek() -> None:
    deepseek = pytest.importorskip("langchain_deepseek")
    ref = model_ref(deepseek.ChatDeepSeek(model="deepseek-reasoner", api_key="t"))
    assert ref == ModelRef("deepseek-reasoner", "deepseek")
    assert Pricer().rate_card(ref).priced_as == "deepseek/deepseek-reasoner"


def test_no_lookup_ever_takes_another_hosts_entry() -> None:
    """Attack: ask every provider for models of every other provider; any price found must be its own."""
    snapshot = get_snapshot()
    pricer = Pricer()
    names = sorted({m.id for p in snapshot.providers for m in p.models[:25]})
    checked = 0
    for provider in snapshot.providers:
        allowed = {provider.id, *pricing._RESELLERS.get(provider.id, ())}
        for name in names[::7]:
            try:
                card = pricer.rate_card(ModelRef(name, provider.id))
            except UnknownModelPriceError:
                continue
            checked += 1
            assert card.priced_as.split("/", 1)[0] in allowed, (provider.id, name, card.priced_as)
    assert checked > 100


def test_bedrock_claude_v2_seed_figure_and_resale_is_reported() -> None:
    card = Pricer().rate_card(ModelRef("anthropic.claude-v2", "aws"))
    assert card.cost(TokenUsage(26, 70)) == Decimal("0.001888")
    assert card.provider == "aws" and card.priced_as.startswith("anthropic/")  # resold at Anthropic's list price
    # A non-Anthropic model genai-prices lacks at Bedrock is not priced from any vendor.
    with pytest.raises(UnknownModelPriceError):
        Pricer().rate_card(ModelRef("zz.made-up-model-v9", "aws"))


def test_azure_resells_openai_only() -> None:
    card = Pricer().rate_card(ModelRef("gpt-4o", "azure"))
    assert card.priced_as.split("/")[0] in ("azure", "openai")
    for name in ("deepseek-reasoner", "kimi-k2-made-up"):  # genai-prices' own Azure fallbacks are not taken
        try:
            other = Pricer().rate_card(ModelRef(name, "azure"))
        except UnknownModelPriceError:
            continue
        assert other.priced_as.split("/")[0] in ("azure", "openai")


def test_local_servers_are_unknown_until_priced() -> None:
    from langchain_openai import ChatOpenAI

    ref = model_ref(ChatOpenAI(model="llama3", base_url="http://localhost:11434/v1", api_key="t"))
    with pytest.raises(UnknownModelPriceError, match='prices=\\{"llama3": 0\\}'):
        Pricer().rate_card(ref)
    free = Pricer({"local:llama3": 0}).rate_card(ref)
    assert free.source == "override" and free.cost(TokenUsage(10_000, 10_000, web_searches=3)) == 0
    ollama = pytest.importorskip("langchain_ollama", reason="langchain-ollama not installed")
    assert model_ref(ollama.ChatOllama(model="llama3")).provider == LOCAL


def test_gateways_are_priced_as_declared() -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-4o-mini", base_url="https://llm-gateway.corp.example/v1", api_key="t")
    ref = model_ref(llm)
    assert ref.provider == "llm-gateway.corp.example"
    with pytest.raises(UnknownModelPriceError, match="price_host_as"):
        Pricer().rate_card(ref)
    openai_card = Pricer().rate_card(ModelRef("gpt-4o-mini", "openai"))
    via_pricer = Pricer(hosts={"llm-gateway.corp.example": "openai"}).rate_card(ref)
    assert via_pricer.prices == openai_card.prices
    try:
        price_host_as("https://llm-gateway.corp.example/v1", "openai")
        declared = model_ref(llm)
        assert declared.provider == "openai"
        assert Pricer().rate_card(declared).prices == openai_card.prices
    finally:
        pricing._registered_hosts.clear()
    with pytest.raises(ValueError):
        price_host_as("", "openai")
    with pytest.raises(ValueError):
        Pricer(hosts={"x": ""})


def test_a_callback_run_keeps_the_clients_host() -> None:
    """get_cost_callback sees runs, not runnables: the serialized constructor still names the host."""
    from langchain_core.load import dumpd
    from langchain_openai import ChatOpenAI

    from langchain_budgetguard.pricing import model_ref_from_run

    llm = ChatOpenAI(model="deepseek-ai/DeepSeek-R1-0528", base_url="https://api.together.xyz/v1", api_key="t")
    ref = model_ref_from_run(dumpd(llm), {"model": "deepseek-ai/DeepSeek-R1-0528"}, {"ls_provider": "openai"})
    assert ref.provider == "together"
    plain = ChatOpenAI(model="gpt-4o-mini", api_key="t")
    assert model_ref_from_run(dumpd(plain), {"model": "gpt-4o-mini"}, {"ls_provider": "openai"}) == ModelRef(
        "gpt-4o-mini", "openai"
    )


def test_a_host_declared_after_a_guard_was_used_is_priced_by_that_guard() -> None:
    from langchain_openai import ChatOpenAI

    from langchain_budgetguard import BudgetGuard

    llm = ChatOpenAI(model="gpt-4o", base_url="https://late-gateway.corp.example/v1", api_key="sk-test")
    guard = BudgetGuard(llm, limit=10)
    with pytest.raises(UnknownModelPriceError):
        guard.reserve("hi")
    price_host_as("late-gateway.corp.example", "openai")
    reservation = guard.reserve("hi")
    try:
        assert reservation.admitted.estimate.refs[0].provider == "openai"
    finally:
        reservation.settle()
