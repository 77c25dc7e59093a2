"""A scriptable fake chat model that reports usage like a provider does."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult


_CALLS_LOCK = threading.Lock()  # one for all fakes: a fake stays picklable and deep-copyable


class UsageChat(BaseChatModel):
    """Replies ``reply`` and reports ``input_tokens``/``output_tokens`` as usage_metadata.

    ``stream_usage=False`` streams without any usage (like a provider that sends none);
    ``fail_after`` raises after that many streamed chunks; ``calls`` counts model calls.
    """

    model_name: str = "gpt-4o-mini"
    provider: str = "openai"
    reply: str = "Hello! How can I assist you today?"
    input_tokens: int = 8
    output_tokens: int = 9
    max_tokens: int | None = None
    report_usage: bool = True
    fail_after: int | None = None
    delay: float = 0.0
    tool_calls: list[dict] | None = None
    script: list[dict] | None = None  # per call, in order: {"reply": ..., "tool_calls": [...]}
    # Not a field: a model's settings stay as they were (the guard re-reads a model whose settings change).
    _calls: int = 0
    total_calls: ClassVar[int] = 0  # every fake's calls: copies of a model count here too

    @property
    def calls(self) -> int:
        return self._calls

    @property
    def _llm_type(self) -> str:
        return "usage-fake"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params = {"ls_provider": self.provider, "ls_model_name": self.model_name, "ls_model_type": "chat"}
        if self.max_tokens:
            params["ls_max_tokens"] = self.max_tokens
        return params

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        from langchain_core.utils.function_calling import convert_to_openai_tool

        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _count(self) -> None:
        with _CALLS_LOCK:
            self._calls += 1
            UsageChat.total_calls += 1

    def _usage(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        self._count()
        if self.delay:
            time.sleep(self.delay)
        step = self.script[(self.calls - 1) % len(self.script)] if self.script else {}
        message = AIMessage(
            content=step.get("reply", self.reply),
            usage_metadata=self._usage() if self.report_usage else None,
            tool_calls=step.get("tool_calls", self.tool_calls or []),
            response_metadata={"model_name": self.model_name},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                         **kwargs: Any) -> ChatResult:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._generate(messages, stop, None, **kwargs)

    def _pieces(self) -> list[str]:
        words = self.reply.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def _stream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        self._count()
        for i, piece in enumerate(self._pieces()):
            if self.fail_after is not None and i >= self.fail_after:
                raise ConnectionError("stream cut midway")
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        if self.report_usage:
            yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=self._usage()))

    async def _astream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._stream(messages, stop, None, **kwargs):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            await asyncio.sleep(0)
            yield chunk


class ExactEstimator:
    """A pluggable estimator that says exactly what the fake model will report."""

    mode = "typical"

    def __init__(self, input_tokens: int) -> None:
        self.tokens = input_tokens

    def input_tokens(self, messages: Any, tools: Any = None) -> int:
        return self.tokens

    def output_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)


class UsageUpFront(UsageChat):
    """Streams like Anthropic (``message_start``) or OpenAI with usage mid-stream: the prompt's usage
    (``input_tokens``, 1 output token) on the first chunk, the rest of the output's at the end.

    ``fail_after`` cuts the stream after that many pieces; ``fail_at_end`` raises after the final
    usage report, once the whole reply and its usage have arrived."""

    fail_at_end: bool = False

    def _stream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        self._count()
        pieces = self._pieces()
        for i, piece in enumerate(pieces):
            if self.fail_after is not None and i >= self.fail_after:
                raise ConnectionError("the connection dropped")
            usage = ({"input_tokens": self.input_tokens, "output_tokens": 1, "total_tokens": self.input_tokens + 1}
                     if i == 0 else None)
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece, usage_metadata=usage))
        rest = self.output_tokens - 1
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata={"input_tokens": 0, "output_tokens": rest, "total_tokens": rest}))
        if self.fail_at_end:
            raise ConnectionError("the connection dropped after the last chunk")
