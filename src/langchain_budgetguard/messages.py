"""Chat model input and output as plain data: the messages a call sends, the text a reply holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue

__all__ = ["to_messages", "text_of", "billed_text_of", "billed_output_text"]


def to_messages(value: Any) -> list[BaseMessage]:
    """What a chat model takes (a string, messages, a prompt value) as a list of messages."""
    if isinstance(value, str):
        return [HumanMessage(value)]
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, Sequence):
        return convert_to_messages(value)
    raise TypeError(
        f"BudgetGuard input: expected a string, messages or a prompt value (what a chat model takes), "
        f"got {type(value).__name__}"
    )


def text_of(message: Any) -> str:
    """The text a reply or chunk holds: content, thinking, tool-call names and arguments."""
    if message is None:
        return ""
    content = getattr(message, "content", message)
    if isinstance(content, str):
        text = content
    else:
        parts = []
        for block in content or ():
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping):
                for key in ("text", "thinking", "partial_json", "input"):
                    value = block.get(key)
                    if isinstance(value, str):
                        parts.append(value)
        text = "".join(parts)
    for call in getattr(message, "tool_call_chunks", None) or getattr(message, "tool_calls", None) or ():
        args = call.get("args")
        text += args if isinstance(args, str) else str(args or "")
        text += call.get("name") or ""
    return text


def _reasoning_of_block(block: Mapping[str, Any]) -> str:
    """Reasoning text in a content block that ``text_of`` does not read (v1 ``reasoning``, summaries)."""
    parts = []
    value = block.get("reasoning")
    if isinstance(value, str):
        parts.append(value)
    summary = block.get("summary")
    for item in summary if isinstance(summary, list) else ():
        if isinstance(item, Mapping) and isinstance(item.get("text"), str):
            parts.append(item["text"])
    return "".join(parts)


def billed_text_of(message: Any) -> str:
    """The output text a reply or chunk was billed for: ``text_of`` plus its reasoning.

    Reasoning is billed as output even when it is not in the visible text: ChatDeepSeek's
    ``additional_kwargs["reasoning_content"]``, OpenAI's ``additional_kwargs["reasoning"]``
    summaries, and content blocks of type ``reasoning`` (``reasoning`` / ``summary``; ``thinking``
    blocks are in ``text_of`` already). Count it with the estimator when a reply has no usage.
    """
    if message is None:
        return ""
    text = text_of(message)
    content = getattr(message, "content", None)
    if isinstance(content, list):
        text += "".join(_reasoning_of_block(b) for b in content if isinstance(b, Mapping))
    extra = getattr(message, "additional_kwargs", None)
    if isinstance(extra, Mapping) and extra:
        reasoning = extra.get("reasoning_content")
        if isinstance(reasoning, str):
            text += reasoning
        reasoning = extra.get("reasoning")
        if isinstance(reasoning, Mapping):
            text += _reasoning_of_block(reasoning)
        elif isinstance(reasoning, str):
            text += reasoning
    return text


def billed_output_text(messages: Any) -> str:
    """``billed_text_of`` for a message or each chunk of a stream, joined (no chunk is merged or lost)."""
    if isinstance(messages, BaseMessage) or not isinstance(messages, Sequence) or isinstance(messages, str):
        return billed_text_of(messages) if not isinstance(messages, str) else messages
    return "".join(billed_text_of(m) for m in messages)
