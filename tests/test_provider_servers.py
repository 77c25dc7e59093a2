"""The fake provider servers speak well enough for the real LangChain clients.

Some tests pin client behaviour the budget guard depends on (marked "client
behaviour"); if one breaks after a client upgrade, the guard's assumptions need a look.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from pydantic import BaseModel

try:
    from providers import Reply, ToolCall, count_output_tokens, count_prompt_tokens
    from providers.fixtures import anthropic_server, anthropic_server_session, openai_server, openai_server_session
except ImportError:  # tests/ is a package and only the rootdir is importable
    from tests.providers import Reply, ToolCall, count_output_tokens, count_prompt_tokens
    from tests.providers.fixtures import (
        anthropic_server,
        anthropic_server_session,
        openai_server,
        openai_server_session,
    )

__all__ = ["anthropic_server", "anthropic_server_session", "openai_server", "openai_server_session"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _sum(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def _with_usage(chunks: list[AIMessageChunk]) -> list[AIMessageChunk]:
    return [c for c in chunks if c.usage_metadata]


# ---------------------------------------------------------------- OpenAI


def test_openai_invoke_reports_scripted_usage(openai_server):
    openai_server.script(
        Reply(text="Paris.", input_tokens=120, output_tokens=30, cache_read_tokens=100, reasoning_tokens=12)
    )
    msg = openai_server.chat_model().invoke([SystemMessage("Be brief."), HumanMessage("Capital of France?")])

    assert msg.content == "Paris."
    assert msg.usage_metadata == {
        "input_tokens": 120,
        "output_tokens": 30,
        "total_tokens": 150,
        "input_token_details": {"audio": 0, "cache_read": 100},
        "output_token_details": {"audio": 0, "reasoning": 12},
    }
    assert msg.response_metadata["model_name"] == "gpt-4o-mini"
    assert msg.response_metadata["finish_reason"] == "stop"
    (req,) = openai_server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer test"
    assert req.body["model"] == "gpt-4o-mini"
    assert [m["role"] for m in req.body["messages"]] == ["system", "user"]
    assert not req.stream
    assert req.usage["input_tokens"] == 120


def test_openai_default_usage_is_computed_from_the_request(openai_server):
    msg = openai_server.chat_model(model="gpt-4.1").invoke("x" * 40)

    req = openai_server.last
    assert req.body["model"] == "gpt-4.1"
    assert msg.response_metadata["model_name"] == "gpt-4.1"
    assert msg.content == Reply().text
    assert msg.usage_metadata["input_tokens"] == count_prompt_tokens(req.body) == 11
    assert msg.usage_metadata["output_tokens"] == count_output_tokens(Reply())
    assert msg.usage_metadata["input_tokens"] == req.usage["input_tokens"]


def test_openai_cache_write_tokens_map_to_cache_creation(openai_server):
    openai_server.script(Reply(input_tokens=50, cache_creation_tokens=20))
    msg = openai_server.chat_model().invoke("hi")
    assert msg.usage_metadata["input_token_details"]["cache_creation"] == 20


def test_openai_stream_with_usage(openai_server):
    openai_server.script(Reply(text="one two three", input_tokens=40, output_tokens=9, cache_read_tokens=8, reasoning_tokens=2))
    chunks = list(openai_server.chat_model(stream_usage=True).stream("count"))

    assert "".join(c.content for c in chunks) == "one two three"
    (usage_chunk,) = _with_usage(chunks)
    assert usage_chunk.content == ""
    total = _sum(chunks)
    assert total.usage_metadata == {
        "input_tokens": 40,
        "output_tokens": 9,
        "total_tokens": 49,
        "input_token_details": {"audio": 0, "cache_read": 8},
        "output_token_details": {"audio": 0, "reasoning": 2},
    }
    assert total.response_metadata["finish_reason"] == "stop"
    assert openai_server.last.body["stream_options"] == {"include_usage": True}
    assert openai_server.last.usage["output_tokens"] == 9


def test_explicit_chunks(openai_server, anthropic_server):
    for server in (openai_server, anthropic_server):
        server.script(Reply(chunks=("Hel", "lo", " there")))
        pieces = [c.content for c in server.chat_model().stream("hi") if c.content]
        assert pieces == ["Hel", "lo", " there"]


def test_openai_custom_base_url_streams_without_usage_by_default(openai_server):
    """Client behaviour: a custom base_url turns stream_usage off unless asked for."""
    model = openai_server.chat_model()
    assert not model.stream_usage

    chunks = list(model.stream("hi"))

    assert "stream_options" not in openai_server.last.body
    assert _with_usage(chunks) == []
    assert _sum(chunks).usage_metadata is None
    assert openai_server.last.usage is None  # nothing was reported

    list(model.stream("hi", stream_usage=True))  # per call
    assert openai_server.last.body["stream_options"] == {"include_usage": True}


def test_openai_tool_calls(openai_server):
    call = ToolCall("get_weather", {"city": "Oslo"}, id="call_abc")
    openai_server.script(Reply(tool_calls=(call,)), Reply(tool_calls=(call,)))
    model = openai_server.chat_model().bind_tools([WEATHER])

    msg = model.invoke("Weather in Oslo?")
    assert msg.tool_calls == [{"name": "get_weather", "args": {"city": "Oslo"}, "id": "call_abc", "type": "tool_call"}]
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    assert openai_server.last.body["tools"][0]["function"]["name"] == "get_weather"

    streamed = _sum(list(model.stream("Weather in Oslo?")))
    assert streamed.tool_calls == msg.tool_calls


def test_openai_structured_output(openai_server):
    class City(BaseModel):
        name: str
        population: int

    openai_server.script(Reply(text=json.dumps({"name": "Oslo", "population": 700000})))
    result = openai_server.chat_model().with_structured_output(City).invoke("Oslo?")

    assert result == City(name="Oslo", population=700000)
    assert openai_server.last.body["response_format"]["type"] == "json_schema"


async def test_openai_async(openai_server):
    openai_server.script(
        Reply(text="async hello", input_tokens=10, output_tokens=3),
        Reply(text="async stream", input_tokens=11, output_tokens=4),
    )
    model = openai_server.chat_model(stream_usage=True)

    msg = await model.ainvoke("hi")
    assert msg.content == "async hello"
    assert msg.usage_metadata["input_tokens"] == 10

    chunks = [c async for c in model.astream("hi")]
    total = _sum(chunks)
    assert total.content == "async stream"
    assert (total.usage_metadata["input_tokens"], total.usage_metadata["output_tokens"]) == (11, 4)
    assert len(openai_server.calls) == 2


@pytest.mark.parametrize(
    ("status", "error"), [(500, openai.InternalServerError), (429, openai.RateLimitError)]
)
def test_openai_error_without_retries(openai_server, status, error):
    openai_server.script(Reply(error=status))
    with pytest.raises(error) as info:
        openai_server.chat_model().invoke("hi")
    assert info.value.status_code == status
    assert len(openai_server.calls) == 1
    assert openai_server.last.usage is None


def test_openai_client_retries_by_default(openai_server):
    """Client behaviour: max_retries defaults to 2, so one scripted error is retried."""
    openai_server.script(Reply(error=429), Reply(error=500), "finally")
    model = openai_server.chat_model(max_retries=None)
    assert model.invoke("hi").content == "finally"
    assert len(openai_server.calls) == 3


def test_openai_cut_stream_raises(openai_server):
    openai_server.script(Reply(text="a b c d e f", cut_after=3))
    seen: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in openai_server.chat_model(stream_usage=True).stream("hi"):
            seen.append(chunk)
    assert "".join(c.content for c in seen) == "a b "
    assert _with_usage(seen) == []
    assert openai_server.last.usage is None


def test_openai_error_event_mid_stream(openai_server):
    openai_server.script(Reply(text="a b c d", stream_error_after=2))
    with pytest.raises(openai.APIError, match="server had an error"):
        list(openai_server.chat_model(stream_usage=True).stream("hi"))


def test_openai_omitted_usage(openai_server):
    openai_server.script(Reply(omit_usage=True), Reply(omit_usage=True))
    model = openai_server.chat_model(stream_usage=True)
    assert model.invoke("hi").usage_metadata is None
    assert _sum(list(model.stream("hi"))).usage_metadata is None


# ---------------------------------------------------------------- Anthropic


def test_anthropic_invoke_reports_scripted_usage(anthropic_server):
    anthropic_server.script(
        Reply(text="Bonjour.", input_tokens=500, output_tokens=40, cache_read_tokens=300, cache_creation_tokens=150)
    )
    msg = anthropic_server.chat_model().invoke([SystemMessage("Be brief."), HumanMessage("Say hello in French")])

    assert msg.content == "Bonjour."
    assert msg.usage_metadata == {
        "input_tokens": 500,
        "output_tokens": 40,
        "total_tokens": 540,
        "input_token_details": {"cache_read": 300, "cache_creation": 150},
    }
    # On the wire, Anthropic's input_tokens excludes cached tokens.
    assert msg.response_metadata["usage"]["input_tokens"] == 50
    assert msg.response_metadata["stop_reason"] == "end_turn"
    (req,) = anthropic_server.requests
    assert req.path == "/v1/messages"
    # This anthropic SDK sends the key as a bearer token; older ones used x-api-key.
    assert req.headers.get("x-api-key") == "test" or req.headers.get("authorization") == "Bearer test"
    assert req.body["system"] == "Be brief."
    assert req.body["model"] == "claude-sonnet-4-6"
    assert msg.response_metadata["model_name"] == "claude-sonnet-4-6"


def test_anthropic_stream_usage(anthropic_server):
    anthropic_server.script(
        Reply(text="one two three", input_tokens=60, output_tokens=7, cache_read_tokens=20, cache_creation_tokens=10)
    )
    chunks = list(anthropic_server.chat_model().stream("count"))

    assert "".join(c.content for c in chunks) == "one two three"
    (usage_chunk,) = _with_usage(chunks)
    assert usage_chunk.response_metadata["stop_reason"] == "end_turn"
    assert _sum(chunks).usage_metadata == {
        "input_tokens": 60,
        "output_tokens": 7,
        "total_tokens": 67,
        "input_token_details": {"cache_read": 20, "cache_creation": 10},
    }
    assert anthropic_server.last.stream


def test_anthropic_reasoning_tokens(anthropic_server):
    anthropic_server.script(Reply(output_tokens=50, reasoning_tokens=30), Reply(output_tokens=50, reasoning_tokens=30))
    model = anthropic_server.chat_model()
    assert model.invoke("hi").usage_metadata["output_token_details"] == {"reasoning": 30}
    assert _sum(list(model.stream("hi"))).usage_metadata["output_token_details"] == {"reasoning": 30}


def test_anthropic_tool_use(anthropic_server):
    call = ToolCall("get_weather", {"city": "Oslo"}, id="toolu_1")
    anthropic_server.script(
        Reply(text="Let me check.", tool_calls=(call,), input_tokens=80, output_tokens=25),
        Reply(text="Let me check.", tool_calls=(call,), input_tokens=80, output_tokens=25),
    )
    model = anthropic_server.chat_model().bind_tools([WEATHER])

    msg = model.invoke("Weather in Oslo?")
    expected = [{"name": "get_weather", "args": {"city": "Oslo"}, "id": "toolu_1", "type": "tool_call"}]
    assert msg.tool_calls == expected
    assert msg.response_metadata["stop_reason"] == "tool_use"
    assert anthropic_server.last.body["tools"][0]["name"] == "get_weather"

    streamed = _sum(list(model.stream("Weather in Oslo?")))
    assert streamed.tool_calls == expected
    assert streamed.usage_metadata["output_tokens"] == 25


async def test_anthropic_async(anthropic_server):
    anthropic_server.script(
        Reply(text="async hello", input_tokens=10, output_tokens=3),
        Reply(text="async stream", input_tokens=11, output_tokens=4),
    )
    model = anthropic_server.chat_model()

    msg = await model.ainvoke("hi")
    assert msg.content == "async hello"
    assert msg.usage_metadata["input_tokens"] == 10

    total = _sum([c async for c in model.astream("hi")])
    assert total.content == "async stream"
    assert (total.usage_metadata["input_tokens"], total.usage_metadata["output_tokens"]) == (11, 4)
    assert len(anthropic_server.calls) == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, anthropic.InternalServerError), (429, anthropic.RateLimitError), (529, anthropic.APIStatusError)],
)
def test_anthropic_error_without_retries(anthropic_server, status, error):
    anthropic_server.script(Reply(error=status))
    with pytest.raises(error) as info:
        anthropic_server.chat_model().invoke("hi")
    assert info.value.status_code == status
    assert len(anthropic_server.calls) == 1


def test_anthropic_cut_stream_raises(anthropic_server):
    """Client behaviour: the truncated body surfaces as a raw httpx2 error, not an anthropic one."""
    anthropic_server.script(Reply(text="a b c d e f", cut_after=5))
    seen: list[Any] = []
    with pytest.raises(Exception) as info:  # noqa: PT011
        for chunk in anthropic_server.chat_model().stream("hi"):
            seen.append(chunk)
    assert "incomplete chunked read" in str(info.value)
    assert "".join(c.content for c in seen) == "a b "
    assert _with_usage(seen) == []
    assert anthropic_server.last.usage is None


def test_anthropic_error_event_mid_stream(anthropic_server):
    anthropic_server.script(Reply(text="a b c d", stream_error_after=4))
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        list(anthropic_server.chat_model().stream("hi"))


def test_anthropic_output_only_delta_usage_loses_input_tokens(anthropic_server):
    """Client behaviour: langchain-anthropic takes stream usage from message_delta only."""
    anthropic_server.script(Reply(input_tokens=100, output_tokens=5, delta_usage="output_only"))
    usage = _sum(list(anthropic_server.chat_model().stream("hi"))).usage_metadata
    assert (usage["input_tokens"], usage["output_tokens"]) == (0, 5)


def test_anthropic_cache_ttl_breakdown(anthropic_server):
    """Client behaviour: with the TTL breakdown, invoke zeroes the generic cache_creation; stream cannot see it."""
    reply = Reply(input_tokens=100, cache_creation_tokens=60, cache_creation_1h_tokens=15, cache_ttl_breakdown=True)
    anthropic_server.script(reply, reply)
    model = anthropic_server.chat_model()

    invoked = model.invoke("hi").usage_metadata
    assert invoked["input_tokens"] == 100
    assert invoked["input_token_details"] == {
        "cache_read": 0,
        "cache_creation": 0,
        "ephemeral_5m_input_tokens": 45,
        "ephemeral_1h_input_tokens": 15,
    }
    streamed = _sum(list(model.stream("hi"))).usage_metadata
    assert streamed["input_tokens"] == 100
    assert streamed["input_token_details"] == {"cache_read": 0, "cache_creation": 60}


def test_anthropic_count_tokens_endpoint(anthropic_server):
    model = anthropic_server.chat_model()
    messages = [HumanMessage("y" * 80)]
    assert model.get_num_tokens_from_messages(messages) == 21
    anthropic_server.count_tokens_value = 7
    assert model.get_num_tokens_from_messages(messages) == 7
    assert [r.path for r in anthropic_server.requests] == ["/v1/messages/count_tokens"] * 2
    assert anthropic_server.calls == []


def test_anthropic_rejects_impossible_cache_split(anthropic_server):
    anthropic_server.script(Reply(input_tokens=10, cache_read_tokens=20))
    with pytest.raises(anthropic.InternalServerError, match="script error"):
        anthropic_server.chat_model().invoke("hi")
    assert len(anthropic_server.errors) == 1


# ---------------------------------------------------------------- scripting


def test_queue_default_callable_and_reset(openai_server):
    model = openai_server.chat_model()
    openai_server.set_default("fallback")
    openai_server.script("first", {"text": "second", "output_tokens": 2}, lambda req: f"echo {req.body['messages'][-1]['content']}")
    assert openai_server.pending == 3

    assert [model.invoke("ping").content for _ in range(4)] == ["first", "second", "echo ping", "fallback"]
    assert openai_server.requests[1].usage["output_tokens"] == 2
    assert openai_server.pending == 0

    openai_server.script("left over")
    openai_server.reset()
    assert (openai_server.requests, openai_server.pending) == ([], 0)
    assert model.invoke("ping").content == Reply().text


def test_servers_are_session_scoped(openai_server, openai_server_session, anthropic_server, anthropic_server_session):
    assert openai_server is openai_server_session
    assert anthropic_server is anthropic_server_session
    assert openai_server.base_url.endswith("/v1")
    assert not anthropic_server.base_url.endswith("/v1")


def test_unknown_path_is_404(openai_server):
    client = openai.OpenAI(base_url=openai_server.base_url, api_key="test", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert openai_server.requests[0].path == "/v1/embeddings"
    assert openai_server.calls == []
