"""Chat model input and output as plain data: the messages a call sends, the text a reply holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue

__all__ = ["to_messages", "text_of"]


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
