"""A scripted Anthropic Messages server (``POST /v1/messages``, plus ``/v1/messages/count_tokens``)."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

from .common import (
    PDF_PAGE_SIZE,
    URL_IMAGE_SIZE,
    PromptView,
    RecordedRequest,
    Reply,
    ScriptedServer,
    _Handler,
    count_prompt_tokens,
    image_size,
    pdf_pages,
    sse,
)

__all__ = ["AnthropicServer"]

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def _as_blocks(content: Any) -> list[Mapping[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, Mapping)]


def _block_text(content: Any) -> str:
    return " ".join(b.get("text", "") for b in _as_blocks(content) if b.get("type") == "text")


def _cache_prefix(body: Mapping[str, Any]) -> tuple[str, int] | None:
    """(key, tokens) of the prompt up to its last ``cache_control`` breakpoint, or None.

    Tokens use the ``count_prompt_tokens`` convention (text characters // 4 + 1)."""
    parts: list[Any] = [body.get("model"), body.get("tools")]
    chars, best = 0, None
    sections = [("system", body.get("system") or [])] + [
        (m.get("role"), m.get("content")) for m in body.get("messages") or [] if isinstance(m, Mapping)
    ]
    for role, content in sections:
        for block in _as_blocks(content):
            parts.append([role, block])
            chars += len(block.get("text") or "") if block.get("type") == "text" else 0
            if block.get("cache_control"):
                best = (json.dumps(parts, sort_keys=True, default=str), chars // 4 + 1)
    if any(t.get("cache_control") for t in body.get("tools") or []) and best is None:
        best = (json.dumps(parts[:2], sort_keys=True, default=str), 1)
    return best


class AnthropicServer(ScriptedServer):
    """Answers like api.anthropic.com for ``ChatAnthropic(base_url=server.base_url)``.

    ``/v1/messages/count_tokens`` answers ``count_prompt_tokens(body)`` (or
    ``count_tokens_value`` when set) and consumes no scripted reply.
    """

    api_path = "/v1/messages"
    count_tokens_path = "/v1/messages/count_tokens"
    reports_cache_writes = True

    def __init__(self, default: Reply | str | None = None) -> None:
        super().__init__(default)
        self.count_tokens_value: int | None = None

    @property
    def base_url(self) -> str:
        # The Anthropic SDK appends /v1/messages itself.
        return self.url

    def chat_model(self, **kwargs: Any) -> Any:
        """A ``ChatAnthropic`` pointed here, ``max_retries=0`` and a Claude model unless overridden."""
        from langchain_anthropic import ChatAnthropic

        params: dict[str, Any] = {"model": "claude-sonnet-4-6", "api_key": "test", "max_retries": 0}
        params.update(kwargs)
        return ChatAnthropic(base_url=self.base_url, **params)

    def reset(self) -> None:
        super().reset()
        self.count_tokens_value = None

    def _other(self, handler: _Handler, request: RecordedRequest) -> None:
        if request.path == self.count_tokens_path and request.method == "POST":
            value = self.count_tokens_value
            handler.send_json(200, {"input_tokens": value if value is not None else count_prompt_tokens(request.body or {})})
        else:
            super()._other(handler, request)

    def prompt_view(self, body: Mapping[str, Any]) -> PromptView:
        messages = [m for m in body.get("messages") or [] if isinstance(m, Mapping)]
        last = messages[-1] if messages else {}
        last_blocks = _as_blocks(last.get("content"))
        after_tool = last.get("role") == "user" and any(b.get("type") == "tool_result" for b in last_blocks)
        users = [m for m in messages if m.get("role") == "user"]
        choice = body.get("tool_choice") or {}
        kind = choice.get("type")
        fmt = (body.get("output_config") or {}).get("format") or body.get("output_format") or {}
        thinking = body.get("thinking") or {}
        return PromptView(
            last_user_text=_block_text(users[-1].get("content")) if users else "",
            after_tool_result=after_tool,
            tools=tuple((t["name"], t.get("input_schema") or {}) for t in body.get("tools") or [] if "name" in t),
            tool_choice=choice.get("name") if kind == "tool" else kind,
            response_schema=fmt.get("schema") if fmt.get("type") == "json_schema" else None,
            stop=tuple(body.get("stop_sequences") or ()),
            reasoning=thinking.get("type") in ("enabled", "adaptive"),
            cache=_cache_prefix(body),
        )

    def media_tokens(self, body: Mapping[str, Any]) -> int:
        """Images: width x height / 750 after scaling to at most 1568 px a side and 1.15 megapixels
        (about 1,600 tokens at most). PDFs: each page as an image (the servers' PDFs have no text)."""

        def image(size: tuple[int, int]) -> int:
            w, h = size
            scale = min(1.0, 1568 / max(w, h), math.sqrt(1_150_000 / (w * h)))
            return math.ceil(w * scale * h * scale / 750)

        def walk(content: Any) -> int:
            tokens = 0
            for block in _as_blocks(content):
                kind, source = block.get("type"), block.get("source") or {}
                raw = base64.b64decode(source["data"]) if source.get("type") == "base64" else None
                if kind == "image":
                    tokens += image(image_size(raw) if raw else URL_IMAGE_SIZE)
                elif kind == "document":
                    tokens += pdf_pages(raw or b"") * image(PDF_PAGE_SIZE)
                elif kind == "tool_result":
                    tokens += walk(block.get("content"))
            return tokens

        return sum(walk(m.get("content")) for m in body.get("messages") or [] if isinstance(m, Mapping))

    def _error_body(self, reply: Reply) -> dict[str, Any]:
        type_, message = _ERRORS.get(reply.error or 500, ("api_error", "Error."))
        return {
            "type": "error",
            "error": {"type": type_, "message": reply.error_message or message},
            "request_id": "req_test",
        }

    @staticmethod
    def _uncached_input(usage: dict[str, int]) -> int:
        uncached = usage["input_tokens"] - usage["cache_read"] - usage["cache_creation"]
        if uncached < 0:
            raise ValueError(
                f"scripted input_tokens={usage['input_tokens']} is less than cache read + creation "
                f"({usage['cache_read']} + {usage['cache_creation']}); input_tokens includes cached tokens"
            )
        return uncached

    def _wire_usage(self, reply: Reply, usage: dict[str, int], output_tokens: int) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "input_tokens": self._uncached_input(usage),
            "cache_creation_input_tokens": usage["cache_creation"],
            "cache_read_input_tokens": usage["cache_read"],
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }
        if reply.cache_ttl_breakdown:
            wire["cache_creation"] = {
                "ephemeral_5m_input_tokens": usage["cache_creation"] - reply.cache_creation_1h_tokens,
                "ephemeral_1h_input_tokens": reply.cache_creation_1h_tokens,
            }
        if usage["reasoning"]:
            wire["output_tokens_details"] = {"thinking_tokens": usage["reasoning"]}
        return wire

    def _validate(self, reply: Reply, usage: dict[str, int]) -> None:
        self._uncached_input(usage)
        if reply.delta_usage not in ("full", "output_only"):
            raise ValueError(f"delta_usage must be 'full' or 'output_only', not {reply.delta_usage!r}")

    def _blocks(self, reply: Reply, index: int) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if reply.thinking:
            blocks.append({"type": "thinking", "thinking": reply.thinking, "signature": f"sig_test{index}"})
        if reply.text or not reply.tool_calls:
            blocks.append({"type": "text", "text": reply.text})
        for i, tc in enumerate(reply.tool_calls):
            blocks.append({"type": "tool_use", "id": tc.id or f"toolu_{index}_{i}", "name": tc.name, "input": dict(tc.args)})
        return blocks

    def _stop_reason(self, reply: Reply) -> str:
        if reply.finish_reason:
            return reply.finish_reason
        if reply.stop_sequence is not None:
            return "stop_sequence"
        return "tool_use" if reply.tool_calls else "end_turn"

    def _completion(self, reply: Reply, body: Any, model: str, usage: dict[str, int], index: int) -> dict[str, Any]:
        return {
            "id": f"msg_test{index}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": self._blocks(reply, index),
            "stop_reason": self._stop_reason(reply),
            "stop_sequence": reply.stop_sequence,
            "usage": self._wire_usage(reply, usage, usage["output_tokens"]),
        }

    def _stream_events(
        self, reply: Reply, body: Any, model: str, usage: dict[str, int], index: int
    ) -> Iterator[tuple[bytes, bool]]:
        start_usage = self._wire_usage(reply, usage, min(1, usage["output_tokens"]))
        start_usage.pop("output_tokens_details", None)
        message = {
            "id": f"msg_test{index}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        yield sse({"type": "message_start", "message": message}, "message_start"), False
        for i, block in enumerate(self._blocks(reply, index)):
            if block["type"] == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
                yield sse({"type": "content_block_start", "index": i, "content_block": start}, "content_block_start"), False
                delta = {"type": "thinking_delta", "thinking": block["thinking"]}
                yield sse({"type": "content_block_delta", "index": i, "delta": delta}, "content_block_delta"), False
                delta = {"type": "signature_delta", "signature": block["signature"]}
                yield sse({"type": "content_block_delta", "index": i, "delta": delta}, "content_block_delta"), False
            elif block["type"] == "text":
                yield sse({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}, "content_block_start"), False
                if i == 0:
                    yield sse({"type": "ping"}, "ping"), False
                for piece in reply.text_chunks():
                    delta = {"type": "text_delta", "text": piece}
                    yield sse({"type": "content_block_delta", "index": i, "delta": delta}, "content_block_delta"), False
            else:
                start = {**block, "input": {}}
                yield sse({"type": "content_block_start", "index": i, "content_block": start}, "content_block_start"), False
                args = json.dumps(block["input"])
                for pos in range(0, len(args), 8):
                    delta = {"type": "input_json_delta", "partial_json": args[pos : pos + 8]}
                    yield sse({"type": "content_block_delta", "index": i, "delta": delta}, "content_block_delta"), False
            yield sse({"type": "content_block_stop", "index": i}, "content_block_stop"), False
        final = self._wire_usage(reply, usage, usage["output_tokens"])
        final.pop("service_tier")
        final.pop("cache_creation", None)  # not part of MessageDeltaUsage
        if reply.delta_usage == "output_only":
            final = {"output_tokens": usage["output_tokens"]}
        delta = {"stop_reason": self._stop_reason(reply), "stop_sequence": reply.stop_sequence}
        yield sse({"type": "message_delta", "delta": delta, "usage": final}, "message_delta"), True
        yield sse({"type": "message_stop"}, "message_stop"), False

    def _stream_error_event(self, reply: Reply) -> bytes:
        error = reply if reply.error is not None else Reply(error=529, error_message=reply.error_message)
        return sse(self._error_body(error), "error")
