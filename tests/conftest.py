"""Shared fixtures: the scripted OpenAI/Anthropic servers for the real LangChain clients, and list prices."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import genai_prices
import pytest

from langchain_budgetguard.pricing import price_host_as
from tests.providers.anthropic_server import AnthropicServer
from tests.providers.fixtures import anthropic_server_session, openai_server_session  # noqa: F401
from tests.providers.openai_server import OpenAIServer


def _fresh_async_clients() -> None:
    # langchain-openai/-anthropic cache one httpx AsyncClient per base_url for the whole process;
    # pytest-asyncio gives each test its own event loop, and a client kept from a closed loop fails
    # with "Event loop is closed". Test-only reach into private helpers, hence getattr.
    import langchain_anthropic._client_utils as anthropic_utils
    import langchain_openai.chat_models._client_utils as openai_utils

    for module in (openai_utils, anthropic_utils):
        for name in dir(module):
            cached = getattr(module, name)
            if "async" in name and callable(getattr(cached, "cache_clear", None)):
                cached.cache_clear()


@pytest.fixture
def openai_server(openai_server_session: OpenAIServer) -> OpenAIServer:
    """The session's OpenAI server, with an empty queue and request log."""
    _fresh_async_clients()
    openai_server_session.reset()
    price_host_as(openai_server_session.url, "openai")  # a local server: priced only as declared
    return openai_server_session


@pytest.fixture
def anthropic_server(anthropic_server_session: AnthropicServer) -> AnthropicServer:
    """The session's Anthropic server, with an empty queue and request log."""
    _fresh_async_clients()
    anthropic_server_session.reset()
    price_host_as(anthropic_server_session.url, "anthropic")
    return anthropic_server_session


def list_price(request) -> Decimal:
    """What one server request costs at list price (genai-prices), from the usage the server reported."""
    u = request.usage
    assert u is not None, "the server reported no usage for this request"
    usage = genai_prices.Usage(
        input_tokens=u["input_tokens"],  # genai-prices, like the servers, counts cache inside input
        output_tokens=u["output_tokens"],  # reasoning is part of output, billed at the output rate
        cache_read_tokens=u["cache_read"],
        cache_write_tokens=u["cache_creation"],
    )
    model = request.body["model"]
    provider = "anthropic" if model.startswith("claude") else "openai"
    return genai_prices.calc_price(usage, model, provider_id=provider).total_price


@pytest.fixture
def billed() -> Callable[..., Decimal]:
    """``billed(server)``: the list price of every generation request the server answered."""
    return lambda server: sum((list_price(r) for r in server.calls), Decimal(0))
