"""The fake chat model the benchmarks guard: a copy of tests/fakes.py ``UsageChat``.

Copied (not imported) so that the benchmark's "bare model" stays the same whatever the tests do
to their fake. ``TimedChat`` also notes when the model itself starts, so that admission latency
(guard entry -> model call) can be measured from outside the guard.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult


class UsageChat(BaseChatModel):
    """Replies ``reply`` and reports ``input_tokens``/``output_tokens`` as usage_metadata (like tests/fakes.py)."""

    model_name: str = "gpt-4o-mini"
    provider: str = "openai"
    reply: str = "Hello! How can I assist you today?"
    input_tokens: int = 8
    output_tokens: int = 9
    max_tokens: int | None = None
    report_usage: bool = True
    delay: float = 0.0
    _calls: int = 0  # not a field: a model's settings stay as they were
    _lock: Any = None

    def model_post_init(self, context: Any) -> None:
        object.__setattr__(self, "_lock", threading.Lock())

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

    def _count(self) -> None:
        with self._lock:
            self._calls += 1

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
        message = AIMessage(
            content=self.reply,
            usage_metadata=self._usage() if self.report_usage else None,
            tool_calls=[],
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
        for piece in self._pieces():
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


# When the last model call of this process started (time.perf_counter()); see TimedChat.
LAST_START = [0.0]


class TimedChat(UsageChat):
    """``UsageChat`` that notes in ``LAST_START`` when the model call itself begins."""

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        LAST_START[0] = time.perf_counter()
        return super()._generate(messages, stop, run_manager, **kwargs)
