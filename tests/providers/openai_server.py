"""A scripted OpenAI Chat Completions server (``POST /v1/chat/completions``)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

from .common import (
    PDF_PAGE_SIZE,
    URL_IMAGE_SIZE,
    PromptView,
    Reply,
    ScriptedServer,
    count_prompt_tokens,
    data_url_bytes,
    image_size,
    pdf_pages,
    sse,
)

__all__ = ["OpenAIServer"]

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: test."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 1ms."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


_REASONING_MODELS = ("o1", "o3", "o4", "gpt-5")


def _completions(body: Any) -> int:
    """``n``: how many completions the request asks for (each billed; the prompt once)."""
    n = body.get("n") if isinstance(body, Mapping) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return ""


class OpenAIServer(ScriptedServer):
    """Answers like api.openai.com/v1 for ``ChatOpenAI(base_url=server.base_url)``.

    Note: with a custom ``base_url`` ChatOpenAI does *not* ask for stream usage
    unless ``stream_usage=True`` is given; the stream then has no usage chunk.
    """

    api_path = "/v1/chat/completions"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def chat_model(self, **kwargs: Any) -> Any:
        """A ``ChatOpenAI`` pointed here, ``max_retries=0`` and model "gpt-4o-mini" unless overridden."""
        from langchain_openai import ChatOpenAI

        params: dict[str, Any] = {"model": "gpt-4o-mini", "api_key": "test", "max_retries": 0}
        params.update(kwargs)
        return ChatOpenAI(base_url=self.base_url, **params)

    def prompt_view(self, body: Mapping[str, Any]) -> PromptView:
        messages = [m for m in body.get("messages") or [] if isinstance(m, Mapping)]
        users = [m for m in messages if m.get("role") == "user"]
        tools = tuple(
            (t["function"]["name"], t["function"].get("parameters") or {})
            for t in body.get("tools") or []
            if t.get("type") == "function"
        )
        choice = body.get("tool_choice")
        if isinstance(choice, Mapping):
            choice = (choice.get("function") or {}).get("name")
        elif choice == "required":
            choice = "any"
        fmt = body.get("response_format") or {}
        stop = body.get("stop") or ()
        model = str(body.get("model", ""))
        reasoning = bool(body.get("reasoning_effort")) or model.startswith(_REASONING_MODELS)
        # Automatic prompt caching: prompts of 1024+ tokens, cached in 128-token steps.
        tokens = count_prompt_tokens(body)
        cached = 1024 + (tokens - 1024) // 128 * 128 if tokens >= 1024 else 0
        key = json.dumps([model, messages, body.get("tools")], sort_keys=True)
        return PromptView(
            last_user_text=_text(users[-1].get("content")) if users else "",
            after_tool_result=bool(messages) and messages[-1].get("role") == "tool",
            tools=tools,
            tool_choice=choice,
            response_schema=(fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None,
            json_mode=fmt.get("type") == "json_object",
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            reasoning=reasoning,
            cache=(key, cached) if cached else None,
        )

    def media_tokens(self, body: Mapping[str, Any]) -> int:
        """Images: OpenAI's tile rule (fit in 2048x2048, shortest side to 768, base + a price per
        512px tile; gpt-4o-mini's base and tile are inflated to keep gpt-4o's price). PDFs: an image
        of each page (the servers' PDFs have no text)."""
        base, tile = (2833, 5667) if str(body.get("model", "")).startswith("gpt-4o-mini") else (85, 170)

        def image(size: tuple[int, int], detail: str | None) -> int:
            if detail == "low":
                return base
            w, h = size
            scale = min(1.0, 2048 / max(w, h))
            w, h = w * scale, h * scale
            scale = min(1.0, 768 / min(w, h))
            w, h = w * scale, h * scale
            return base + tile * math.ceil(w / 512) * math.ceil(h / 512)

        tokens = 0
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, Mapping) else None
            for part in content if isinstance(content, list) else []:
                kind = part.get("type")
                if kind == "image_url":
                    spec = part.get("image_url") or {}
                    data = data_url_bytes(spec.get("url", ""))
                    tokens += image(image_size(data) if data else URL_IMAGE_SIZE, spec.get("detail"))
                elif kind == "file":
                    data = data_url_bytes((part.get("file") or {}).get("file_data", ""))
                    tokens += pdf_pages(data or b"") * image(PDF_PAGE_SIZE, None)
        return tokens

    def _error_body(self, reply: Reply) -> dict[str, Any]:
        type_, code, message = _ERRORS.get(reply.error or 500, ("server_error", None, "Error."))
        return {"error": {"message": reply.error_message or message, "type": type_, "param": None, "code": code}}

    def _usage(self, reply: Reply, body: Any) -> dict[str, int]:
        usage = super()._usage(reply, body)
        n = _completions(body)
        if n > 1:  # the scripted output is one completion's: each of the n is billed
            output = usage["output_tokens"] * n
            usage = {**usage, "output_tokens": output, "reasoning": usage["reasoning"] * n,
                     "total_tokens": usage["input_tokens"] + output}
        return usage

    @staticmethod
    def _wire_usage(usage: dict[str, int]) -> dict[str, Any]:
        prompt_details: dict[str, int] = {"cached_tokens": usage["cache_read"], "audio_tokens": 0}
        if usage["cache_creation"]:
            # Not sent by OpenAI itself; some compatible servers do, and langchain-openai
            # maps it to input_token_details.cache_creation.
            prompt_details["cache_write_tokens"] = usage["cache_creation"]
        return {
            "prompt_tokens": usage["input_tokens"],
            "completion_tokens": usage["output_tokens"],
            "total_tokens": usage["total_tokens"],
            "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {
                "reasoning_tokens": usage["reasoning"],
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    @staticmethod
    def _tool_calls(reply: Reply, index: int) -> list[dict[str, Any]]:
        return [
            {
                "id": tc.id or f"call_{index}_{i}",
                "type": "function",
                "function": {"name": tc.name, "arguments": json.dumps(dict(tc.args))},
            }
            for i, tc in enumerate(reply.tool_calls)
        ]

    def _finish_reason(self, reply: Reply) -> str:
        return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")

    def _completion(self, reply: Reply, body: Any, model: str, usage: dict[str, int], index: int) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text if reply.text or not reply.tool_calls else None,
            "refusal": None,
            "annotations": [],
        }
        if reply.tool_calls:
            message["tool_calls"] = self._tool_calls(reply, index)
        payload: dict[str, Any] = {
            "id": f"chatcmpl-test{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": self._finish_reason(reply)}
                for i in range(_completions(body))
            ],
            "service_tier": "default",
            "system_fingerprint": "fp_test",
        }
        if not reply.omit_usage:
            payload["usage"] = self._wire_usage(usage)
        return payload

    def _stream_events(
        self, reply: Reply, body: Any, model: str, usage: dict[str, int], index: int
    ) -> Iterator[tuple[bytes, bool]]:
        include_usage = bool(((body or {}).get("stream_options") or {}).get("include_usage"))
        base = {
            "id": f"chatcmpl-test{index}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_test",
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            data = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if include_usage:
                data["usage"] = None
            return sse(data)

        text_chunks = reply.text_chunks()
        yield chunk({"role": "assistant", "content": "" if text_chunks else None, "refusal": None}), False
        for piece in text_chunks:
            yield chunk({"content": piece}), False
        for i, call in enumerate(self._tool_calls(reply, index)):
            name_delta = {"index": i, "id": call["id"], "type": "function"}
            yield chunk({"tool_calls": [{**name_delta, "function": {"name": call["function"]["name"], "arguments": ""}}]}), False
            args = call["function"]["arguments"]
            for start in range(0, len(args), 8):
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": args[start : start + 8]}}]}), False
        yield chunk({}, self._finish_reason(reply)), False
        if include_usage and not reply.omit_usage:
            yield sse({**base, "choices": [], "usage": self._wire_usage(usage)}), True
        yield sse("[DONE]"), False

    def _stream_error_event(self, reply: Reply) -> bytes:
        return sse(self._error_body(reply if reply.error is not None else Reply(error=500, error_message=reply.error_message)))
