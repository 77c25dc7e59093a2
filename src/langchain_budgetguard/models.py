"""The models a guard wraps: the chat model under bindings, and calling its model step directly.

A guard reaches its model through its public API (``invoke``, ``stream``, ``generate``); only inside
LangChain's own machinery (a run already open for the call: ``stream_events(version="v3")``) does it
call the model step (``_generate`` / ``_stream``), as ``BaseChatModel`` does itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import (
    RunnableBinding,
    RunnableConfig,
    RunnableGenerator,
    RunnableLambda,
    RunnableParallel,
    RunnableSequence,
)
from langchain_core.runnables.config import merge_configs

__all__ = ["innermost", "chat_model_of", "bound_config", "with_stop", "as_chunk", "model_chunks",
           "amodel_chunks", "streams_natively", "runs_after_model"]


def innermost(model: Any) -> Any:
    while isinstance(model, RunnableBinding):
        model = model.bound
    return model


def runs_after_model(model: Any) -> bool:
    """Whether the runnable a guard wraps may raise after its model answered, whatever the call's
    config: it runs steps of its own after the model (a chain, a lambda), or carries a handler
    with ``raise_error`` set in the model's own ``callbacks`` (one in a binding's config is merged
    ahead of the call's, so no tap can precede it)."""
    model = innermost(model)
    own = getattr(model, "callbacks", None)
    handlers = getattr(own, "handlers", own)
    if isinstance(handlers, list) and any(getattr(h, "raise_error", False) for h in handlers):
        return True
    return isinstance(model, (RunnableSequence, RunnableLambda, RunnableParallel, RunnableGenerator))


def chat_model_of(model: Any, kwargs: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The chat model under a model's bindings, and the call's kwargs with the bound ones under them."""
    merged = dict(kwargs)
    while isinstance(model, RunnableBinding):
        merged = {**model.kwargs, **merged}
        model = model.bound
    return model, merged


def bound_config(model: Any, config: RunnableConfig) -> RunnableConfig:
    """``config`` as the model's bindings hand it to the chat model under them (``with_config``'s
    callbacks, tags, metadata), for a caller that calls that chat model itself."""
    while isinstance(model, RunnableBinding):
        if model.config or model.config_factories:
            config = merge_configs(model.config, config)
            for factory in model.config_factories:
                config = merge_configs(config, factory(config))
        model = model.bound
    return config


def with_stop(kwargs: dict[str, Any], stop: list[str] | None) -> dict[str, Any]:
    return kwargs if stop is None else {**kwargs, "stop": stop}


def as_chunk(message: BaseMessage) -> ChatGenerationChunk:
    """A whole reply as one stream chunk (for a model that cannot stream)."""
    tool_chunks = [
        {"name": c["name"], "args": json.dumps(c["args"]), "id": c.get("id"), "index": i, "type": "tool_call_chunk"}
        for i, c in enumerate(getattr(message, "tool_calls", None) or ())
    ]
    return ChatGenerationChunk(message=AIMessageChunk(
        content=message.content, additional_kwargs=message.additional_kwargs,
        response_metadata=message.response_metadata, usage_metadata=getattr(message, "usage_metadata", None),
        id=message.id, tool_call_chunks=tool_chunks,
    ))


def streams_natively(chat: Any) -> bool:
    return isinstance(chat, BaseChatModel) and type(chat)._stream is not BaseChatModel._stream


def model_chunks(model: Any, messages: list[BaseMessage], stop: list[str] | None, run_manager: Any,
                  config: RunnableConfig, kwargs: dict[str, Any]) -> Iterator[ChatGenerationChunk]:
    chat, chat_kwargs = chat_model_of(model, kwargs)
    if streams_natively(chat):
        yield from chat._stream(messages, stop=stop, run_manager=run_manager, **chat_kwargs)
    elif isinstance(chat, BaseChatModel):
        yield as_chunk(chat._generate(messages, stop=stop, run_manager=run_manager, **chat_kwargs).generations[0]
                        .message)
    else:
        for chunk in model.stream(messages, config, **with_stop(kwargs, stop)):
            yield ChatGenerationChunk(message=chunk)


async def amodel_chunks(model: Any, messages: list[BaseMessage], stop: list[str] | None, run_manager: Any,
                         config: RunnableConfig, kwargs: dict[str, Any]) -> AsyncIterator[ChatGenerationChunk]:
    chat, chat_kwargs = chat_model_of(model, kwargs)
    if isinstance(chat, BaseChatModel) and (streams_natively(chat) or type(chat)._astream is not
                                            BaseChatModel._astream):
        async for chunk in chat._astream(messages, stop=stop, run_manager=run_manager, **chat_kwargs):
            yield chunk
    elif isinstance(chat, BaseChatModel):
        result = await chat._agenerate(messages, stop=stop, run_manager=run_manager, **chat_kwargs)
        yield as_chunk(result.generations[0].message)
    else:
        async for chunk in model.astream(messages, config, **with_stop(kwargs, stop)):
            yield ChatGenerationChunk(message=chunk)
