"""What a provider would report as prompt tokens, computed independently of the estimators.

* OpenAI: messages converted by langchain-openai itself (``_convert_message_to_dict``), counted
  as OpenAI's cookbook does (3 tokens a message + its fields, 1 more for a name, 3 to prime the
  reply), tool calls and tools as hmarr/openai-chat-tokens renders them (measured against the
  API), images by OpenAI's published tile formula for their real size.
* Mistral: ``mistral-common``'s own ``encode_chat_completion`` (the exact request tokens).

Used by the tests and by ``bench/estimation.py``.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_budgetguard.tokenizers import exact_family

from .estimation_corpus import CorpusRequest

__all__ = ["mistral_reference", "openai_reference", "reference_count"]


# -- OpenAI -----------------------------------------------------------------------------------

def _hmarr_type(param: dict[str, Any], indent: int) -> str:
    kind = param.get("type")
    if kind == "string":
        return " | ".join(f'"{v}"' for v in param["enum"]) if param.get("enum") else "string"
    if kind in ("number", "integer"):
        return " | ".join(str(v) for v in param["enum"]) if param.get("enum") else "number"
    if kind == "boolean":
        return "boolean"
    if kind == "null":
        return "null"
    if kind == "object":
        return "\n".join(["{", _hmarr_properties(param, indent + 2), "}"])
    if kind == "array":
        return f"{_hmarr_type(param['items'], indent)}[]" if param.get("items") else "any[]"
    return ""


def _hmarr_properties(obj: dict[str, Any], indent: int) -> str:
    lines = []
    for name, param in (obj.get("properties") or {}).items():
        if param.get("description") and indent < 2:
            lines.append(f"// {param['description']}")
        if name in (obj.get("required") or []):
            lines.append(f"{name}: {_hmarr_type(param, indent)},")
        else:
            lines.append(f"{name}?: {_hmarr_type(param, indent)},")
    return "\n".join(" " * indent + line for line in lines)


def _hmarr_functions(functions: list[dict[str, Any]]) -> str:
    lines = ["namespace functions {", ""]
    for f in functions:
        if f.get("description"):
            lines.append(f"// {f['description']}")
        if (f.get("parameters") or {}).get("properties"):
            lines += [f"type {f['name']} = (_: {{", _hmarr_properties(f["parameters"], 0), "}) => any;"]
        else:
            lines.append(f"type {f['name']} = () => any;")
        lines.append("")
    lines.append("} // namespace functions")
    return "\n".join(lines)


def _tiles(w: float, h: float) -> int:
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return math.ceil(w / 512) * math.ceil(h / 512)


def openai_image(model: str, width: int, height: int, detail: str) -> int:
    base, per_tile = (2833, 5667) if "mini" in model else (85, 170)
    return base if detail == "low" else base + per_tile * _tiles(width, height)


def openai_reference(req: CorpusRequest, model: str) -> int:
    from langchain_openai.chat_models.base import _convert_message_to_dict

    family = exact_family(model)
    assert family is not None and family.provider == "openai", model
    count = family.count
    images = iter(req.images)
    has_system = any(isinstance(m, SystemMessage) for m in req.messages)
    padded = False
    total = 3  # reply priming
    for message in req.messages:
        d = _convert_message_to_dict(message)
        total += 3 + count(d["role"])
        content = d.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    total += count(part["text"])
                elif part.get("type") == "image_url":
                    w, h, detail, _ = next(images)
                    total += openai_image(model, w, h, detail)
        elif isinstance(content, str):
            if d["role"] == "system" and req.tools and not padded:
                content += "\n"
                padded = True
            total += count(content)
        if d.get("name"):
            total += count(d["name"]) + 1
        for call in d.get("tool_calls") or []:
            total += count(call["function"]["name"]) + count(call["function"]["arguments"]) + 3
    if req.tools:
        total += count(_hmarr_functions([t["function"] for t in req.tools])) + 9
        if has_system:
            total -= 4
    return total


# -- Mistral ----------------------------------------------------------------------------------

def _mistral_tokenizer(version: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    return {
        "v1": MistralTokenizer.v1, "v2": MistralTokenizer.v2, "v3": MistralTokenizer.v3,
        "v3-tekken": lambda: MistralTokenizer.v3(is_tekken=True),
        "v7": MistralTokenizer.v7,
    }[version]()


_MISTRAL_TOKENIZERS: dict[str, Any] = {}


def mistral_reference(req: CorpusRequest, version: str) -> int | None:
    """Mistral's own count of the request, or None if mistral-common rejects it (images...)."""
    from mistral_common.protocol.instruct.messages import (AssistantMessage, SystemMessage as MSystem,
                                                           ToolMessage as MTool, UserMessage)
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    if version not in _MISTRAL_TOKENIZERS:
        _MISTRAL_TOKENIZERS[version] = _mistral_tokenizer(version)
    tokenizer = _MISTRAL_TOKENIZERS[version]
    out: list[Any] = []
    for m in req.messages:
        if not isinstance(m.content, str):
            return None
        if isinstance(m, SystemMessage):
            out.append(MSystem(content=m.content))
        elif isinstance(m, HumanMessage):
            out.append(UserMessage(content=m.content))
        elif isinstance(m, AIMessage):
            calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=json.dumps(c["args"])))
                     for c in m.tool_calls]
            out.append(AssistantMessage(content=m.content or None, tool_calls=calls or None))
        elif isinstance(m, ToolMessage):
            out.append(MTool(content=m.content, tool_call_id=m.tool_call_id))
    tools = [Tool(function=Function(**t["function"])) for t in req.tools] or None
    try:
        encoded = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=out, tools=tools))
    except Exception:  # names Mistral rejects (non-ASCII function names), role orders it refuses
        return None
    return len(encoded.tokens)


_MEMO: dict[tuple[int, str], tuple[CorpusRequest, int | None]] = {}


def reference_count(req: CorpusRequest, model: str) -> int | None:
    """The provider's prompt tokens for ``req`` on ``model`` (remembered: several tests ask)."""
    hit = _MEMO.get((id(req), model))
    if hit is not None and hit[0] is req:
        return hit[1]
    count = _reference_count(req, model)
    _MEMO[(id(req), model)] = (req, count)  # holding req keeps its id from being reused
    return count


def _reference_count(req: CorpusRequest, model: str) -> int | None:
    family = exact_family(model)
    if family is None:
        raise ValueError(f"no exact tokenizer for {model}")
    if family.provider == "openai":
        return openai_reference(req, model)
    return mistral_reference(req, family.name.split(":", 1)[1])

