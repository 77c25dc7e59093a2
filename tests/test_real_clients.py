"""Exact accounting through the real ChatOpenAI / ChatAnthropic clients, against the scripted servers.

Every expected amount is computed independently: ``genai_prices.calc_price`` on the usage the
server reported (its own log), never from what the guard says.
"""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage
from pydantic import BaseModel

from langchain_budgetguard import BudgetExceededError, BudgetGuard, TokenUsage, get_cost_callback
from langchain_budgetguard.estimate import estimate_output_tokens

from .providers import Reply, ToolCall

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class City(BaseModel):
    name: str
    population: int


def spent(guard, **ids) -> Decimal:
    (status,) = guard.status(**ids)
    assert status.held == 0, "nothing may stay held once calls are over"
    return status.spent


def _sum(chunks):
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


# ---------------------------------------------------------------- OpenAI


def test_openai_invoke_prices_cache_and_reasoning_at_their_own_rates(openai_server, billed):
    openai_server.script(
        Reply(text="Paris.", input_tokens=1200, output_tokens=300, cache_read_tokens=1000, reasoning_tokens=120)
    )
    guard = BudgetGuard(openai_server.chat_model(), limit=1)
    with get_cost_callback() as cb:
        msg = guard.invoke("Capital of France?")

    # By hand: 200 uncached x $0.15 + 1000 cached x $0.075 + 300 out x $0.60 per MTok.
    assert billed(openai_server) == Decimal("0.000285")
    assert spent(guard) == cb.total_cost == msg.response_metadata["budgetguard"]["cost_usd"] == Decimal("0.000285")
    assert msg.response_metadata["budgetguard"]["estimated"] is False


def test_openai_batch_charges_each_request(openai_server, billed):
    openai_server.script(*(Reply(text=f"answer {i}", input_tokens=100 * i, output_tokens=10 * i) for i in (1, 2, 3)))
    guard = BudgetGuard(openai_server.chat_model(model="gpt-4.1"), limit=1)
    with get_cost_callback() as cb:
        out = guard.batch(["a", "b", "c"])
    assert len(out) == len(openai_server.calls) == 3
    assert spent(guard) == cb.total_cost == billed(openai_server) > 0


def test_openai_custom_base_url_stream_is_still_asked_for_usage(openai_server, billed):
    openai_server.script(Reply(text="one two three", input_tokens=40, output_tokens=9, cache_read_tokens=8))
    model = openai_server.chat_model()
    assert not model.stream_usage  # the client's default with a custom base_url
    guard = BudgetGuard(model, limit=1)
    chunks = list(guard.stream("count"))
    assert openai_server.last.body.get("stream_options") == {"include_usage": True}
    assert chunks[-1].response_metadata["budgetguard"]["estimated"] is False
    assert spent(guard) == billed(openai_server)


def test_openai_stream_is_charged_exactly(openai_server, billed):
    openai_server.script(
        Reply(text="one two three", input_tokens=40, output_tokens=9, cache_read_tokens=8, reasoning_tokens=2)
    )
    guard = BudgetGuard(openai_server.chat_model(stream_usage=True), limit=1)
    with get_cost_callback() as cb:
        chunks = list(guard.stream("count"))
    assert "".join(c.content for c in chunks) == "one two three"
    tail = chunks[-1].response_metadata["budgetguard"]
    assert tail["estimated"] is False and tail["cost_usd"] == billed(openai_server)
    assert spent(guard) == cb.total_cost == billed(openai_server)


async def test_openai_ainvoke_and_astream_are_charged_exactly(openai_server, billed):
    openai_server.script(
        Reply(text="async hello", input_tokens=300, output_tokens=20, cache_read_tokens=100),
        Reply(text="four five", input_tokens=30, output_tokens=7, reasoning_tokens=3),
    )
    guard = BudgetGuard(openai_server.chat_model(stream_usage=True), limit=1)
    with get_cost_callback() as cb:
        await guard.ainvoke("hi")
        chunks = [c async for c in guard.astream("more")]
    assert _sum(chunks).content == "four five"
    assert len(openai_server.calls) == 2
    assert spent(guard) == cb.total_cost == billed(openai_server)


def test_openai_tool_calls_invoke_and_stream(openai_server, billed):
    call = ToolCall("get_weather", {"city": "Oslo"}, id="call_1")
    openai_server.script(Reply(tool_calls=(call,), input_tokens=90, output_tokens=17), Reply(tool_calls=(call,)))
    guard = BudgetGuard(openai_server.chat_model(stream_usage=True), limit=1).bind_tools([WEATHER])
    with get_cost_callback() as cb:
        msg = guard.invoke("Weather in Oslo?")
        streamed = _sum(list(guard.stream("Weather in Oslo?")))
    assert msg.tool_calls[0]["args"] == streamed.tool_calls[0]["args"] == {"city": "Oslo"}
    assert openai_server.last.body["tools"][0]["function"]["name"] == "get_weather"
    assert spent(guard) == cb.total_cost == billed(openai_server)


def test_openai_structured_output(openai_server, billed):
    openai_server.script(Reply(text=json.dumps({"name": "Oslo", "population": 700000}), input_tokens=64))
    guard = BudgetGuard(openai_server.chat_model(), limit=1)
    with get_cost_callback() as cb:
        result = guard.with_structured_output(City).invoke("Oslo?")
    assert result == City(name="Oslo", population=700000)
    assert openai_server.last.body["response_format"]["type"] == "json_schema"
    assert spent(guard) == cb.total_cost == billed(openai_server)


# ---------------------------------------------------------------- Anthropic


def test_anthropic_invoke_prices_cache_reads_and_writes(anthropic_server, billed):
    anthropic_server.script(
        Reply(text="Bonjour.", input_tokens=5000, output_tokens=400, cache_read_tokens=3000,
              cache_creation_tokens=1500, reasoning_tokens=100)
    )
    guard = BudgetGuard(anthropic_server.chat_model(), limit=10)
    with get_cost_callback() as cb:
        guard.invoke("Say hello in French")
    # By hand: 500 x $3 + 3000 x $0.30 + 1500 x $3.75 + 400 x $15 per MTok.
    assert billed(anthropic_server) == Decimal("0.014025")
    assert spent(guard) == cb.total_cost == Decimal("0.014025")


def test_anthropic_batch_stream_and_tools(anthropic_server, billed):
    call = ToolCall("get_weather", {"city": "Oslo"}, id="toolu_1")
    anthropic_server.script(
        Reply(text="a", input_tokens=100, output_tokens=5),
        Reply(text="b", input_tokens=200, output_tokens=6, cache_read_tokens=50),
        Reply(text="one two three", input_tokens=60, output_tokens=7, cache_read_tokens=20, cache_creation_tokens=10),
        Reply(text="Let me check.", tool_calls=(call,), input_tokens=80, output_tokens=25),
    )
    guard = BudgetGuard(anthropic_server.chat_model(model="claude-haiku-4-5"), limit=1)
    with get_cost_callback() as cb:
        guard.batch(["x", "y"])
        chunks = list(guard.stream("count"))
        msg = guard.bind_tools([WEATHER]).invoke("Weather in Oslo?")
    assert chunks[-1].response_metadata["budgetguard"]["estimated"] is False
    assert msg.tool_calls[0]["name"] == "get_weather"
    assert len(anthropic_server.calls) == 4
    assert spent(guard) == cb.total_cost == billed(anthropic_server)


async def test_anthropic_async_stream_and_structured_output(anthropic_server, billed):
    anthropic_server.script(
        Reply(text="async stream", input_tokens=110, output_tokens=40, reasoning_tokens=30),
        Reply(tool_calls=(ToolCall("City", {"name": "Oslo", "population": 700000}),), input_tokens=70),
    )
    guard = BudgetGuard(anthropic_server.chat_model(), limit=10)
    with get_cost_callback() as cb:
        chunks = [c async for c in guard.astream("hi")]
        result = await guard.with_structured_output(City).ainvoke("Oslo?")
    assert _sum(chunks).content == "async stream"
    assert result == City(name="Oslo", population=700000)
    assert spent(guard) == cb.total_cost == billed(anthropic_server)


# ---------------------------------------------------------------- refusals and broken streams


@pytest.mark.parametrize("server_name", ["openai_server", "anthropic_server"])
async def test_a_refused_call_sends_no_request(request, server_name):
    server = request.getfixturevalue(server_name)
    guard = BudgetGuard(server.chat_model(), limit="0.000001")
    with pytest.raises(BudgetExceededError):
        guard.invoke("hi")
    with pytest.raises(BudgetExceededError):
        list(guard.stream("hi"))
    with pytest.raises(BudgetExceededError):
        await guard.ainvoke("hi")
    with pytest.raises(BudgetExceededError):
        guard.batch(["a", "b"])
    assert server.requests == []
    assert spent(guard) == 0


def _interrupted_cost(guard, prompt: str, text: str) -> Decimal:
    """What the guard charges a stream cut after ``text``: its input estimate plus the output so far."""
    policy = guard.policy
    model = guard._ladder()[0].runnable  # as the guard estimates: with the model (its exact tokenizer)
    usage = TokenUsage(input_tokens=policy.estimator.input_tokens([HumanMessage(prompt)], [], model=model),
                       output_tokens=estimate_output_tokens(policy.estimator, text, model))
    return policy.pricer.rate_card(guard._ladder()[0].ref).cost(usage)


@pytest.mark.parametrize("server_name", ["openai_server", "anthropic_server"])
@pytest.mark.parametrize("how", ["cut", "error_event"])
def test_a_stream_broken_midway_is_charged_and_holds_nothing(request, server_name, how):
    server = request.getfixturevalue(server_name)
    events = 3 if server_name == "openai_server" else 5  # each server's events before "a b " is out
    server.script(Reply(text="a b c d e f", **({"cut_after": events} if how == "cut" else
                                               {"stream_error_after": events})))
    guard = BudgetGuard(server.chat_model(stream_usage=True), limit=10)
    seen = []
    with pytest.raises(Exception):  # noqa: B017, PT011 - each client raises its own error type
        for chunk in guard.stream("hi"):
            seen.append(chunk)
    assert "".join(c.content for c in seen) == "a b "
    assert server.last.usage is None  # the server never reported usage
    assert spent(guard) == _interrupted_cost(guard, "hi", "a b ") > 0


async def test_an_astream_cut_midway_is_charged_and_holds_nothing(openai_server):
    openai_server.script(Reply(text="a b c d e f", cut_after=3))
    guard = BudgetGuard(openai_server.chat_model(stream_usage=True), limit=1)
    with pytest.raises(Exception):  # noqa: B017, PT011
        async with contextlib.aclosing(guard.astream("hi")) as stream:
            async for _ in stream:
                pass
    assert spent(guard) == _interrupted_cost(guard, "hi", "a b ") > 0


def test_an_abandoned_stream_is_charged_for_what_it_streamed(openai_server):
    openai_server.script(Reply(text="a b c d e f", input_tokens=50))
    guard = BudgetGuard(openai_server.chat_model(stream_usage=True), limit=1)
    stream = guard.stream("hi")
    first = [next(stream), next(stream)]
    stream.close()
    assert isinstance(first[-1], AIMessageChunk)
    (status,) = guard.status()
    assert status.held == 0 and status.spent > 0
