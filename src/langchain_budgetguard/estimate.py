"""Pre-call token estimates, offline: no network, no downloads.

Two estimators share one walk over the messages and differ in how they count:

* ``StrictEstimator`` (mode ``"strict"``) is an upper bound on what a provider
  reports as prompt tokens. For a model whose tokenizer is public and installed
  (the ``tokenizers`` extra: OpenAI o200k/cl100k, Mistral's shipped ones; see
  ``tokenizers``) it counts exactly, in the provider's chat format (per-message
  and reply-priming tokens, tools as the larger of their JSON and OpenAI's
  TypeScript rendering), plus a margin of 1% and 8 tokens. Otherwise every
  token of a byte-level BPE (OpenAI, Anthropic, Llama 3, Mistral Tekken...)
  covers at least one UTF-8 byte, and a SentencePiece piece at least one
  character (byte fallback: one byte), so ``tokens(text) <= len(text.encode())``;
  on top come generous per-message, per-block and per-request overheads and the
  JSON of tool schemas. Images count their family's formula when their size can
  be read from an inline header (``images``), else the family's worst case.
* ``TypicalEstimator`` (mode ``"typical"``) is close to real counts: exact
  without margin where a tokenizer is installed, else ``ceil(ascii_chars / 4)``
  plus about one token per non-ASCII character; ``observe`` calibrates it per
  model from the prompt counts providers report (``calibration``). It is below
  the provider's count for about 8% of requests, by design.

``estimate_call`` puts a call's input estimate next to its output cap and where
that cap came from (``caps``), for the reservation and for a refusal's message.

What no offline estimate can bound (documented, not hidden): documents and
media given by URL or file id, and PDFs that keep their pages in compressed
object streams (``StrictEstimator.unsized_references`` finds both; the guard
holds such a call at the model's whole input limit instead), results that
provider-side tools (web search...) add to the prompt, and the output cap of a
call that sets none (see ``DEFAULT_MAX_OUTPUT_TOKENS``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import threading
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from .calibration import Calibrator
from .caps import CAP_KWARGS, OutputCap, binding_layers, extra_body_of, max_output_tokens, output_cap
from .images import image_size, image_tokens
from .tokenizers import ExactFamily, exact_family, render_openai_tool

__all__ = [
    "counted_model_name",
    "DEFAULT_IMAGE_TOKENS",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "CallEstimate",
    "Estimator",
    "OutputCap",
    "StrictEstimator",
    "TokenCount",
    "TypicalEstimator",
    "bounded_input_tokens",
    "calibration_key",
    "dominant_part",
    "estimate_call",
    "estimate_input_tokens",
    "estimate_output_tokens",
    "get_estimator",
    "max_output_tokens",
    "output_cap",
    "reserved_output",
    "stored_context_of",
    "extra_body_tokens",
    "tools_of",
    "unsized_references",
]

DEFAULT_MAX_OUTPUT_TOKENS = 4096
"""Output cap assumed for a call that sets none (no max_tokens anywhere).

Providers without a required cap (OpenAI, Gemini...) may generate more than
this, up to the model's own output limit: set ``max_tokens`` on the model for
a hard guarantee in strict mode.
"""


@runtime_checkable
class Estimator(Protocol):
    """What the guard needs from an estimator; built-ins also accept ``model=``."""

    mode: str

    def input_tokens(self, messages: Sequence[BaseMessage], tools: Sequence[Any] | None = None) -> int: ...
    def output_tokens(self, text: str) -> int: ...


# --------------------------------------------------------------------------------------
# Text counting
# --------------------------------------------------------------------------------------

_nfkc_growth_cache: tuple[re.Pattern[str], dict[str, int]] | None = None


def _nfkc_growth_table() -> tuple[re.Pattern[str], dict[str, int]]:
    """Characters whose NFKC form has more UTF-8 bytes than they do ("ﷺ" -> 33 bytes).

    Built once per process (~40 ms) from the running Python's Unicode database,
    and only when some text is not already NFKC-normalised.
    """
    global _nfkc_growth_cache
    if _nfkc_growth_cache is None:
        growth: dict[str, int] = {}
        for cp in range(0xA0, 0x30000):
            if 0xD800 <= cp < 0xE000:
                continue
            ch = chr(cp)
            if not unicodedata.decomposition(ch):
                continue
            extra = len(unicodedata.normalize("NFKC", ch).encode("utf-8")) - len(ch.encode("utf-8"))
            if extra > 0:
                growth[ch] = extra
        ranges: list[list[int]] = []
        for cp in map(ord, growth):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
        # A class of ranges, not of single characters: the regex scan is then ~10x faster.
        body = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
        pattern = re.compile(f"[{body}]") if body else re.compile("(?!)")
        _nfkc_growth_cache = (pattern, growth)
    return _nfkc_growth_cache


def _strict_text(text: str) -> int:
    """Upper bound on the tokens of ``text`` under any byte-level BPE or SentencePiece model."""
    if text.isascii():
        return len(text)
    n = len(text.encode("utf-8", "surrogatepass"))
    # Some tokenizers NFKC-normalise first (SentencePiece nmt_nfkc, Anthropic's
    # legacy one) and a few compatibility characters then grow many-fold.
    if not unicodedata.is_normalized("NFKC", text):
        pattern, growth = _nfkc_growth_table()
        n += sum(growth[c] for c in pattern.findall(text))
    return n


def _typical_text(text: str) -> int:
    """~4 ASCII characters per token, ~1 token per non-ASCII character; never 0 for non-empty text."""
    n = len(text)
    if not n:
        return 0
    if text.isascii():
        return (n + 3) // 4
    ascii_chars = len(text.encode("ascii", "ignore"))
    non_ascii_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    # max(): characters of 4 UTF-8 bytes (emoji, rare CJK) often take 2+ tokens.
    return (ascii_chars + 3) // 4 + max(n - ascii_chars, -(-non_ascii_bytes // 3))


def _dumps(value: Any, compact: bool) -> str:
    try:
        if compact:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        # ensure_ascii: "\uXXXX" escapes are never shorter than the UTF-8 they stand for.
        return json.dumps(value, default=str)
    except (TypeError, ValueError):  # circular or unsortable structures
        return str(value)


# --------------------------------------------------------------------------------------
# Images, per model family
# --------------------------------------------------------------------------------------

# (strict high, strict low, typical high, typical low) tokens per image.
# Strict: the most a provider charges for one image of any size.
# Typical: a ~1024x1024 image. "low" is OpenAI's detail="low"; families that
# ignore it charge the same either way.
_IMAGE_TOKENS: dict[str, tuple[int, int, int, int]] = {
    # gpt-4o-mini inflates image tokens to keep gpt-4o's price: base 2833, 5667 a 512px tile, <= 8 tiles.
    "gpt-4o-mini": (48_169, 2_833, 25_501, 2_833),
    # Patch-based (32px patches, <= 1536) times a per-model multiplier.
    "openai-nano": (3_779, 3_779, 2_520, 2_520),  # x2.46
    "o4-mini": (2_642, 2_642, 1_762, 1_762),  # x1.72
    "openai-mini": (2_489, 2_489, 1_659, 1_659),  # x1.62
    # Tile-based: 85 + 170 a tile (<= 8 tiles, 768x2048) = 1445; gpt-4.1 patches: <= 1536.
    "openai-tiles": (1_600, 100, 800, 85),
    "openai": (1_600, 1_600, 1_000, 1_000),
    # ~(w*h)/750; <= ~1,600 up to Claude 4.6, <= ~4,800 for models reading 2576px images.
    "claude": (5_000, 5_000, 1_600, 1_600),
    # 258 a 768px tile (Gemini 2.x), up to 1,120 an image at high media resolution (Gemini 3).
    "gemini": (5_000, 5_000, 1_100, 1_100),
    # Unknown family: strict covers all but gpt-4o-mini; a detail="low" request points to OpenAI's 85.
    "default": (5_000, 5_000, 1_100, 100),
}
DEFAULT_IMAGE_TOKENS = _IMAGE_TOKENS["default"][0]
"""Strict worst case for one image when the model's family is not known."""

_OPENAI_TILE_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4-turbo", "gpt-4-vision", "gpt-4.5", "o1", "o3", "gpt-5")
_OPENAI_PREFIXES = ("gpt-", "chatgpt", "o1", "o3", "o4", "computer-use", "codex")


@functools.lru_cache(maxsize=512)
def _family(model: str | None) -> str:
    """The image-cost family of a model name (cached: it is asked on every guarded call)."""
    if not model:
        return "default"
    low = model.lower()
    if "claude" in low:
        return "claude"
    if "gemini" in low or "gemma" in low:
        return "gemini"
    for part in re.split(r"[/:]", low):
        if not part.startswith(_OPENAI_PREFIXES):
            continue
        if part.startswith("gpt-4o-mini"):
            return "gpt-4o-mini"
        if "nano" in part:
            return "openai-nano"
        if part.startswith("o4-mini"):
            return "o4-mini"
        if "mini" in part and part.startswith("gpt-"):
            return "openai-mini"
        if part.startswith(_OPENAI_TILE_PREFIXES):
            return "openai-tiles"
        return "openai"
    return "default"


def _model_name(model: Any) -> str | None:
    """A model id from a string, a chat model or a binding around one."""
    for _ in range(16):
        if model is None or isinstance(model, str):
            return model or None
        for attr in ("model_name", "model", "model_id", "deployment_name"):
            value = getattr(model, attr, None)
            if isinstance(value, str) and value:
                return value
        model = getattr(model, "bound", None) or getattr(model, "default", None)
    return None


def counted_model_name(model: Any) -> str | None:
    """The model name the built-in estimators count ``model`` (a name or a chat model) as."""
    return _model_name(model)


# --------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------

_TEXT_BLOCKS = frozenset({"text", "input_text", "output_text", "text-plain", "refusal"})
_IMAGE_BLOCKS = frozenset({"image", "image_url", "input_image"})
_MEDIA_BLOCKS = frozenset({"file", "document", "input_file", "audio", "input_audio", "video", "media"})
_TOOL_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "function_call", "server_tool_use", "custom_tool_call"})
_RESPONSE_FORMATS = frozenset({"json_schema", "json_object", "text"})
# Keys whose values the provider does not read as prompt text.
_SKIP_KEYS = frozenset({"type", "id", "index", "cache_control", "signature", "mime_type", "media_type",
                        "source_type", "detail", "extras", "citations", "status"})
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


class _Counter:
    """One walk over messages and tools; subclasses say how text, images and files count."""

    mode = "base"
    accepts_model = True

    message_overhead: int
    request_overhead: int
    block_overhead: int
    tool_overhead: int
    tool_call_overhead: int
    tool_result_overhead: int = 0
    tools_request_overhead: int
    server_tool_tokens: int
    response_format_overhead: int
    url_media_tokens: int
    pdf_page_tokens: int
    _text: Callable[[str], int]

    def __init__(self, image_tokens: int | None = None, low_detail_image_tokens: int | None = None) -> None:
        for name, value in (("image_tokens", image_tokens), ("low_detail_image_tokens", low_detail_image_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}: expected a non-negative int or None, got {value!r}")
        self.image_tokens = image_tokens
        self.low_detail_image_tokens = low_detail_image_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_tokens={self.image_tokens!r}, " \
               f"low_detail_image_tokens={self.low_detail_image_tokens!r})"

    # -- public -------------------------------------------------------------------------

    def input_tokens(
        self,
        messages: Sequence[BaseMessage] | Any,
        tools: Sequence[Any] | None = None,
        *,
        model: Any = None,
    ) -> int:
        """Estimated prompt tokens of ``messages`` plus ``tools``.

        ``model`` (a name or a chat model) picks the image cost of its family;
        without it images count as the worst case of any family but gpt-4o-mini.
        """
        family = _family(_model_name(model))
        total = self.request_overhead
        if isinstance(messages, str):  # one human message, as a chat model reads a string; not built
            total += self.message_overhead + self._text(messages)
        else:
            for message in _as_messages(messages):
                total += self._message(message, family)
        if tools:
            total += self._tools(tools, family)
        return total

    def output_tokens(self, text: str) -> int:
        raise NotImplementedError

    # -- messages -----------------------------------------------------------------------

    def _message(self, message: BaseMessage, family: str) -> int:
        n = self.message_overhead + self._content(message.content, family)
        if message.name:
            n += self._text(message.name) + 1
        if isinstance(message, AIMessage):
            n += self._ai_extras(message)
        elif isinstance(message, ToolMessage):
            n += self._text(message.tool_call_id or "") + self.tool_result_overhead
        elif message.type == "chat":
            n += self._text(getattr(message, "role", "") or "")
        return n

    def _ai_extras(self, message: AIMessage) -> int:
        # A provider sends each tool call once, whether it sits in content blocks or tool_calls.
        seen: set[Any] = set()
        if isinstance(message.content, list):
            seen = {b.get("id") for b in message.content if isinstance(b, dict) and b.get("type") in _TOOL_CALL_BLOCKS}
        n = 0
        for call in [*message.tool_calls, *message.invalid_tool_calls]:
            if call.get("id") is None or call.get("id") not in seen:
                n += self._tool_call(call.get("name"), call.get("args"), call.get("id"))
        if not message.tool_calls and not message.invalid_tool_calls:
            legacy = message.additional_kwargs.get("function_call")
            if isinstance(legacy, Mapping):
                n += self._tool_call(legacy.get("name"), legacy.get("arguments"), None)
        return n

    def _tool_call(self, name: Any, args: Any, call_id: Any) -> int:
        n = self.tool_call_overhead
        if isinstance(name, str):
            n += self._text(name)
        if isinstance(call_id, str):
            n += self._text(call_id)
        if args is not None:
            n += self._text(args if isinstance(args, str) else self._json(args))
        return n

    def _json(self, value: Any) -> str:
        return _dumps(value, self.mode != "strict")

    def _schema_tokens(self, schema: Any) -> int:
        return self._text(self._json(schema))

    def _content(self, content: Any, family: str) -> int:
        if isinstance(content, str):
            return self._text(content)
        if isinstance(content, Mapping):
            return self._block(content, family)
        if isinstance(content, (list, tuple)):
            return sum(self._block(b, family) if isinstance(b, Mapping) else self._content(b, family)
                       for b in content) + self.block_overhead * len(content)
        return self._text(str(content)) if content is not None else 0

    def _block(self, block: Mapping[str, Any], family: str) -> int:
        kind = block.get("type")
        if kind in _TEXT_BLOCKS and isinstance(block.get("text", block.get("refusal")), str):
            return self._text(block.get("text", block.get("refusal")))
        if kind in _IMAGE_BLOCKS or (kind == "media" and str(block.get("mime_type", "")).startswith("image/")):
            return self._image(block, family)
        if kind in _MEDIA_BLOCKS:
            return self._media(block, family)
        if kind in _TOOL_CALL_BLOCKS:
            args = next((block[k] for k in ("input", "args", "arguments") if k in block), None)
            return self._tool_call(block.get("name"), args, block.get("id"))
        if kind == "thinking" and isinstance(block.get("thinking"), str):
            return self._text(block["thinking"])
        return self._fields(block, family)

    def _generic(self, value: Any, family: str) -> int:
        """Unknown shapes: every string inside counts as text, nested typed blocks by their own rules."""
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, Mapping):
            if isinstance(value.get("type"), str):
                return self._block(value, family)
            return self._fields(value, family)
        if isinstance(value, (list, tuple)):
            return sum(self._generic(v, family) for v in value)
        if value is None or isinstance(value, bool):
            return 0
        return self._text(str(value))

    def _fields(self, block: Mapping[str, Any], family: str) -> int:
        return sum(self._generic(v, family) for k, v in block.items() if k not in _SKIP_KEYS)

    def _image(self, block: Mapping[str, Any], family: str) -> int:
        low = _detail(block) == "low"
        if low and self.low_detail_image_tokens is not None:
            return self.low_detail_image_tokens
        if not low and self.image_tokens is not None:
            return self.image_tokens
        payloads = _payloads(block)
        if not payloads:  # by URL or file id (or unreadable): the family's largest image
            return self._image_table(family, low)
        row = _IMAGE_TOKENS[family]
        n = 0
        for payload in payloads:  # several inline fields: the dearest, whichever a converter sends
            size = image_size(payload)
            if size is None:
                return self._image_table(family, low)
            # the family's formula for this size, never above its worst case
            n = max(n, image_tokens(family, size[0], size[1], low, row[1] if low else row[0],
                                    bound=self.mode == "strict"))
        return n

    def _image_table(self, family: str, low: bool) -> int:
        raise NotImplementedError

    def _media(self, block: Mapping[str, Any], family: str) -> int:
        return self._media_body(block, family) + sum(self._text(v) for v in _labels(block))

    def _media_body(self, block: Mapping[str, Any], family: str) -> int:
        source = block.get("source")
        if isinstance(source, Mapping):
            if source.get("type") == "text" and isinstance(source.get("data"), str):
                return self._text(source["data"])
            if source.get("type") == "content":
                return self._content(source.get("content"), family)
        mime = block.get("mime_type") or (source.get("media_type") if isinstance(source, Mapping) else None)
        mime = mime if isinstance(mime, str) else ""
        if mime.startswith("image/"):
            return self._image(block, family)
        if mime.startswith("text/") and isinstance(block.get("text"), str):
            return self._text(block["text"])
        payloads = _payloads(block)
        if not payloads:
            return self._unsized_media()
        return max(self._media_payload(payload, family) for payload in payloads)

    def _unsized_media(self) -> int:
        """A document or recording given by URL or file id: no size to read."""
        return self.url_media_tokens

    def _media_payload(self, payload: str, family: str) -> int:
        raise NotImplementedError

    # -- tools --------------------------------------------------------------------------

    def _tools(self, tools: Sequence[Any], family: str) -> int:
        n = 0
        uses_tools = False
        for tool in tools:
            schema = _tool_dict(tool)
            kind = schema.get("type") if isinstance(schema, Mapping) else None
            if kind in _RESPONSE_FORMATS and "function" not in schema:
                n += self.response_format_overhead + self._schema_tokens(schema)
                continue
            uses_tools = True
            n += self.tool_overhead + self._schema_tokens(schema)
            if _is_server_tool(schema):
                # Provider-defined tools (web search, bash, text editor, computer use) carry
                # a hidden definition far longer than their few-field declaration.
                n += self.server_tool_tokens
        if uses_tools:
            n += self._tools_request_overhead(family)
        return n

    def _tools_request_overhead(self, family: str) -> int:
        return self.tools_request_overhead


class StrictEstimator(_Counter):
    """Upper bound on prompt tokens for any BPE/SentencePiece tokenizer (mode ``"strict"``).

    Text counts its UTF-8 bytes (after NFKC growth, for tokenizers that
    normalise); each message adds 8, each content block 2, the request 12;
    each tool its JSON plus 16 and the request 600 when tools are present
    (Anthropic's hidden tool-use system prompt is up to ~530 tokens). Images
    count the worst case of the model's family (see ``input_tokens``);
    ``image_tokens`` / ``low_detail_image_tokens`` override that table.

    A document, recording or video given by URL or file id, or a PDF that keeps its pages in
    compressed object streams, has no size the guard can read: the guard holds such a call at the
    model's whole input limit (``unsized_references``), the most the provider can bill, or adds
    20,000 tokens each where that limit is unknown. ``url_media_tokens=N`` vouches that each one
    is at most N tokens instead (then it is held at N, and nothing bounds a larger file).
    """

    mode = "strict"
    exact = True
    message_overhead = 8
    request_overhead = 12
    block_overhead = 2
    tool_overhead = 16
    tool_call_overhead = 8
    tools_request_overhead = 600
    server_tool_tokens = 1_500
    response_format_overhead = 64
    url_media_tokens = 20_000  # a document or recording behind a URL / file id: not boundable offline
    pdf_page_tokens = 5_000  # page image (<= ~4,800 on Claude) on top of the file's own bytes
    output_overhead = 4  # end-of-turn / stop tokens, SentencePiece's dummy prefix

    _text = staticmethod(_strict_text)

    def __init__(self, image_tokens: int | None = None, low_detail_image_tokens: int | None = None, *,
                 exact: bool = True, url_media_tokens: int | None = None) -> None:
        super().__init__(image_tokens, low_detail_image_tokens)
        if not isinstance(exact, bool):
            raise ValueError(f"exact: expected True or False, got {exact!r}")
        if url_media_tokens is not None and (isinstance(url_media_tokens, bool) or not isinstance(
                url_media_tokens, int) or url_media_tokens < 0):
            raise ValueError(f"url_media_tokens: expected a non-negative int (the most tokens one document or "
                             f"recording given by URL or file id can be), or None, got {url_media_tokens!r}")
        self.exact = exact
        self.vouched_url_media_tokens = url_media_tokens
        if url_media_tokens is not None:
            self.url_media_tokens = url_media_tokens
        self._exact_counters: dict[str, _Counter] = {}

    def unsized_references(self, messages: Sequence[BaseMessage] | Any) -> int:
        """How many documents, recordings or videos in ``messages`` have a size the guard cannot read
        (given by URL or file id, or a PDF with compressed object streams), so that it holds the call
        at the model's whole input limit; 0 when ``url_media_tokens`` vouches for their size."""
        if self.vouched_url_media_tokens is not None or isinstance(messages, str):
            return 0
        if type(messages) is list and all(type(getattr(m, "content", None)) is str for m in messages):
            return 0  # text turns only (the common case): a file lives in content blocks
        walk = _References()
        for message in _as_messages(messages):
            if type(message.content) is not str:
                walk._content(message.content, "")
        return walk.found

    def input_tokens(
        self,
        messages: Sequence[BaseMessage] | Any,
        tools: Sequence[Any] | None = None,
        *,
        model: Any = None,
    ) -> int:
        """Upper bound on the prompt tokens of ``messages`` plus ``tools`` on ``model``.

        For a model with a public tokenizer installed (see ``tokenizers``): its exact
        counts in its provider's chat format, plus 1% and 8 tokens. Otherwise the UTF-8
        byte bound. ``model`` (a name or a chat model) also picks the image cost of its
        family; without it images count as the worst case of any family but gpt-4o-mini.
        """
        counter = self.counter_for(model)
        if counter is self:
            return _Counter.input_tokens(self, messages, tools, model=model)
        n = counter.input_tokens(messages, tools, model=model)
        if isinstance(counter, _ExactCounter) and counter.family.provider == "mistral" and _safe_prompt(model):
            n += MISTRAL_SAFE_PROMPT_TOKENS  # Mistral prepends its guardrail system prompt
        return n

    def counter_for(self, model: Any) -> _Counter:
        """The counter this estimator uses for ``model``: an exact one, or itself (byte bound)."""
        if not self.exact:
            return self
        family = exact_family(_model_name(model))
        if family is None:
            return self
        counter = self._exact_counters.get(family.name)
        if counter is None:
            counter = self._exact_counters[family.name] = _ExactCounter(
                family, True, self.image_tokens, self.low_detail_image_tokens, self.vouched_url_media_tokens)
        return counter

    def tokenizer_for(self, model: Any) -> str | None:
        """The exact tokenizer used for ``model`` (``"o200k_base"``...), or None for the byte bound."""
        counter = self.counter_for(model)
        return counter.family.name if isinstance(counter, _ExactCounter) else None

    def output_tokens(self, text: str) -> int:
        """Upper bound on the tokens that produced ``text``: its UTF-8 bytes plus a small overhead.

        Hidden reasoning tokens are not in ``text`` and cannot be bounded from it.
        """
        return _strict_text(text) + self.output_overhead if text else 0

    def _image_table(self, family: str, low: bool) -> int:
        row = _IMAGE_TOKENS[family]
        return row[1] if low else row[0]

    def _media_payload(self, payload: str, family: str) -> int:
        # Base64 text is 4/3 of the bytes it encodes; audio and video stay well under one
        # token per byte (gpt-4o audio: 10 tokens/s, Gemini video: ~300 tokens/s).
        payload = _strip_data_url(payload)
        n = len(payload)
        pages, hidden = _pdf_pages(payload)
        # A provider may bill each page as an image as well as its text: the family's image bound
        # (gpt-4o-mini's inflated image rates make a page far dearer than on Claude).
        n += pages * max(self.pdf_page_tokens, self._image_table(family, False))
        return (n + self._unsized_media()) if hidden else n  # pages it cannot count: like a file by URL


class TokenCount(int):
    """An ``int`` of tokens from ``TypicalEstimator``, carrying what ``observe`` learns from.

    ``raw``: the uncalibrated estimate; ``features``: the request's features; ``key``: the
    calibration key (the model id). Arithmetic on it gives plain ints.
    """

    raw: int
    features: tuple[float, ...]
    key: str

    def __new__(cls, tokens: int, raw: int, features: tuple[float, ...], key: str) -> TokenCount:
        self = super().__new__(cls, tokens)
        self.raw, self.features, self.key = raw, features, key
        return self

    def __getnewargs__(self) -> tuple[int, int, tuple[float, ...], str]:  # copy and pickle
        return int(self), self.raw, self.features, self.key

    def __repr__(self) -> str:
        return f"TokenCount({int(self)}, raw={self.raw}, key={self.key!r})"


def calibration_key(model: Any) -> str:
    """The key ``TypicalEstimator`` learns under for ``model`` (a name or a chat model)."""
    return (_model_name(model) or "unknown").strip().lower()


def _byte_classes() -> bytes:
    """UTF-8 byte -> feature index + 1 (0: continuation bytes, not counted).

    A UTF-8 lead byte names its script block closely enough to tell Cyrillic (D0-D3) from
    Arabic (D8-DB), kana (E3) from CJK ideographs (E4-E9) and Hangul (EA-ED).
    """
    table = bytearray(256)
    for b in range(128):
        ch = chr(b)
        table[b] = (1 if ch.islower() else 2 if ch.isupper() else 3 if ch.isdigit() else 4 if ch == " "
                    else 5 if ch.isspace() else 6)
    for lo, hi, cls in ((0xC0, 0xCF, 7), (0xD4, 0xD7, 7), (0xDC, 0xDF, 7), (0xD0, 0xD3, 8), (0xD8, 0xDB, 9),
                        (0xE0, 0xE1, 10), (0xE2, 0xE2, 11), (0xE3, 0xE3, 12), (0xE4, 0xE9, 13), (0xEA, 0xED, 14),
                        (0xEE, 0xEF, 15), (0xF0, 0xFF, 16)):
        for b in range(lo, hi + 1):
            table[b] = cls
    return bytes(table)


_BYTE_CLASSES = _byte_classes()
_CLASS_BYTES = [bytes([k]) for k in range(1, 17)]
# ASCII lower, upper, digits, spaces, other whitespace, punctuation; 2-byte other, Cyrillic, Arabic;
# 3-byte Indic/Thai..., symbols, kana, CJK, Hangul, other; 4-byte; images; tool schemas; everything
# else (overheads, media...); a constant; o200k tokens of the text (a proxy, when installed).
_FEATURES = 21
_IMAGE_FEATURE, _TOOL_FEATURE = 16, 17  # the features that count image and tool-schema tokens
_PRIOR = (0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.34,
          1.0, 1.0, 1.0, 0.0, 0.0)
# With o200k installed the regression starts from "o200k's count" and learns per-script corrections:
# the character classes are nearly collinear with it, and the ridge decides between equal fits.
_PRIOR_PROXY = (0.0,) * 16 + (1.0, 1.0, 1.0, 0.0, 1.0)
_PROXY_MODEL = "gpt-4o"
_features = threading.local()


_SAMPLE_ABOVE = 32_768  # characters; longer texts are described by 32 evenly spread slices
_SLICES, _SLICE = 32, 512


def _add_text_features(text: str, tokens: int, acc: list[float]) -> None:
    """Add ``text`` (``tokens`` by the heuristic) to ``acc`` (long texts: a sample, scaled up)."""
    scale = 1.0
    sample = text
    if len(text) > _SAMPLE_ABOVE:
        step = len(text) // _SLICES
        sample = "".join(text[i * step:i * step + _SLICE] for i in range(_SLICES))
        scale = len(text) / len(sample)
    classes = sample.encode("utf-8", "surrogatepass").translate(_BYTE_CLASSES)
    for k, marker in enumerate(_CLASS_BYTES):
        acc[k] += classes.count(marker) * scale
    acc[18] += tokens  # taken back out of "everything else" by the caller
    proxy = exact_family(_PROXY_MODEL)
    if proxy is not None:
        acc[19] += proxy.count(sample) * scale


def _typical_text_tracked(text: str) -> int:
    n = _typical_text(text)
    acc = getattr(_features, "acc", None)
    if acc is not None and text:
        _add_text_features(text, n, acc)
    return n


class TypicalEstimator(_Counter):
    """Close to real counts, learning from reported counts; may be below them (mode ``"typical"``).

    For a model with a public tokenizer installed: its exact counts in its provider's chat
    format, without margin. Otherwise text counts ``ceil(ascii/4)`` plus ~1 token per
    non-ASCII character; each message adds 4, the request 3; tools their compact JSON
    likewise plus 8 each and, with tools present, 350 for Claude or unknown models (its
    tool-use system prompt), 30 otherwise. Images count a ~1024x1024 image of the model's
    family (or their formula, for a known size).

    ``observe(model_key, estimated, reported)`` (the guard calls it at settle with the
    provider's prompt count) calibrates the estimates of that model: once 24 requests are
    seen, an estimate is a regression on the request's features times the 0.9 quantile of
    reported / predicted over the last 256 requests (see ``calibration``): right on average,
    below the provider's count for about 10% of requests. ``calibrate=False`` turns it off;
    ``exact=False`` uses the heuristic even where a tokenizer is installed.
    """

    mode = "typical"
    message_overhead = 4
    request_overhead = 3
    block_overhead = 0
    tool_overhead = 8
    tool_call_overhead = 4
    tools_request_overhead = 30
    server_tool_tokens = 500
    response_format_overhead = 10
    url_media_tokens = 3_000
    pdf_page_tokens = 1_500

    _text = staticmethod(_typical_text_tracked)

    def __init__(self, image_tokens: int | None = None, low_detail_image_tokens: int | None = None, *,
                 exact: bool = True, calibrate: bool | Calibrator = True) -> None:
        super().__init__(image_tokens, low_detail_image_tokens)
        if not isinstance(exact, bool):
            raise ValueError(f"exact: expected True or False, got {exact!r}")
        if not isinstance(calibrate, (bool, Calibrator)):
            raise ValueError(f"calibrate: expected True, False or a Calibrator, got {calibrate!r}")
        self.exact = exact
        self.calibrator: Calibrator | None = (Calibrator() if calibrate is True else calibrate or None)
        self._exact_counters: dict[str, _Counter] = {}

    def input_tokens(
        self,
        messages: Sequence[BaseMessage] | Any,
        tools: Sequence[Any] | None = None,
        *,
        model: Any = None,
    ) -> int:
        """Estimated prompt tokens (a ``TokenCount``): calibrated once the model has been observed."""
        name = _model_name(model)
        key = (name or "unknown").strip().lower()
        family = exact_family(name) if self.exact else None
        if family is not None:
            counter = self._exact_counters.get(family.name)
            if counter is None:
                counter = self._exact_counters[family.name] = _ExactCounter(
                    family, False, self.image_tokens, self.low_detail_image_tokens)
            raw = counter.input_tokens(messages, tools, model=model)
            features: tuple[float, ...] = (float(raw),)
        elif self.calibrator is None:  # nothing will learn from features: don't compute them
            raw = _Counter.input_tokens(self, messages, tools, model=model)
            features = ()
        else:
            acc = [0.0] * (_FEATURES - 1)
            _features.acc = acc
            try:
                raw = _Counter.input_tokens(self, messages, tools, model=model)
            finally:
                _features.acc = None
            acc[18] = raw - acc[18] - acc[17] - acc[16]  # overheads, media: not text, images or tools
            proxy = acc.pop()
            features = (*acc, 1.0, proxy)
        tokens = raw
        if self.calibrator is not None:
            if len(features) > 1:
                # Tool schemas and media follow rules of their own at the provider: requests with
                # them learn apart from plain text, so neither widens the other's spread.
                key += ("|images" if features[_IMAGE_FEATURE] else "") + ("|tools" if features[_TOOL_FEATURE] else "")
            cal = self.calibrator.get(key, len(features))
            if cal is not None and cal.ready:
                tokens = cal.estimate(features, raw)
            elif len(features) > 1:
                ratio = self.calibrator.get(key, 1)  # only plain ints were observed for this model
                if ratio is not None and ratio.ready:
                    tokens = ratio.estimate((float(raw),), raw)
        return TokenCount(tokens, raw, features, key)

    def observe(self, model_key: str | None, estimated_tokens: int, reported_tokens: int) -> None:
        """Learn from one settled call: its estimate (as ``input_tokens`` returned it) and the
        prompt tokens the provider reported. Thread-safe; bounded memory; a no-op when
        calibration is off or the numbers are unusable.

        A ``TokenCount`` carries its own key and features (``model_key`` is then ignored); a
        plain int is taken as an uncalibrated estimate for ``model_key``.
        """
        if self.calibrator is None:
            return
        if isinstance(reported_tokens, bool) or not isinstance(reported_tokens, int) or reported_tokens <= 0:
            return
        if isinstance(estimated_tokens, TokenCount) and estimated_tokens.features:
            features, key = estimated_tokens.features, estimated_tokens.key
        elif isinstance(estimated_tokens, int) and not isinstance(estimated_tokens, bool) and estimated_tokens > 0:
            features, key = (float(estimated_tokens),), (model_key or "unknown").strip().lower()
        else:
            return
        if len(features) == _FEATURES:
            prior = _PRIOR_PROXY if exact_family(_PROXY_MODEL) is not None else _PRIOR
        else:
            prior = (1.0,)
        self.calibrator.observe(key, features, prior, reported_tokens)

    def output_tokens(self, text: str) -> int:
        """Estimated tokens of ``text`` at the same ratio as input text."""
        return _typical_text(text)

    def _image(self, block: Mapping[str, Any], family: str) -> int:
        n = _Counter._image(self, block, family)
        acc = getattr(_features, "acc", None)
        if acc is not None:
            acc[_IMAGE_FEATURE] += n
        return n

    def _schema_tokens(self, schema: Any) -> int:
        n = _typical_text(self._json(schema))  # not text features: schemas tokenize unlike prose
        acc = getattr(_features, "acc", None)
        if acc is not None:
            acc[_TOOL_FEATURE] += n
        return n

    def _image_table(self, family: str, low: bool) -> int:
        row = _IMAGE_TOKENS[family]
        return row[3] if low else row[2]

    def _media_payload(self, payload: str, family: str) -> int:
        payload = _strip_data_url(payload)
        pages, _ = _pdf_pages(payload)
        if pages:
            return pages * self.pdf_page_tokens
        return max(258, len(payload) // 64)  # compressed audio/video: a rough rate, not a bound

    def _tools_request_overhead(self, family: str) -> int:
        return 350 if family in ("claude", "default") else self.tools_request_overhead


class _ExactCounter(_Counter):
    """Exact tokens of one public tokenizer in its provider's chat format (see ``tokenizers``).

    ``strict``: the provider's format overheads plus the format's margin, images and media at
    the strict worst case; otherwise the same counts without margin, images of typical size.
    """

    server_tool_tokens = StrictEstimator.server_tool_tokens
    response_format_overhead = StrictEstimator.response_format_overhead

    def __init__(self, family: ExactFamily, strict: bool, image_tokens: int | None = None,
                 low_detail_image_tokens: int | None = None, url_media_tokens: int | None = None) -> None:
        super().__init__(image_tokens, low_detail_image_tokens)
        fmt = family.format
        self.family = family
        self.strict = strict
        self.mode = "strict" if strict else "typical"
        self.message_overhead = fmt.message
        self.request_overhead = fmt.request
        self.block_overhead = fmt.block
        self.tool_overhead = fmt.tool
        self.tool_call_overhead = fmt.tool_call
        self.tool_result_overhead = fmt.tool_result
        self.tools_request_overhead = fmt.tools_request
        source = StrictEstimator if strict else TypicalEstimator
        self.url_media_tokens = source.url_media_tokens if url_media_tokens is None else url_media_tokens
        self.pdf_page_tokens = source.pdf_page_tokens
        self._text = family.count  # type: ignore[assignment]
        self._schema_cache: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"_ExactCounter({self.family.name!r}, strict={self.strict})"

    def input_tokens(self, messages: Any, tools: Sequence[Any] | None = None, *, model: Any = None) -> int:
        n = _Counter.input_tokens(self, messages, tools, model=model)
        if not self.strict:
            return n
        fmt = self.family.format
        return n + math.ceil(n * fmt.margin_ratio) + fmt.margin_tokens

    def output_tokens(self, text: str) -> int:
        return self.family.count(text) + (StrictEstimator.output_overhead if self.strict else 0) if text else 0

    def _json(self, value: Any) -> str:
        if self.family.format.spaced_json:
            return _dumps_spaced(value)
        return _dumps(value, True)

    def _message(self, message: BaseMessage, family: str) -> int:
        if isinstance(message, ToolMessage) and self.family.format.spaced_json:
            # Mistral sends a tool result inside JSON: {"content": "...", "call_id": "..."}.
            content = message.content if isinstance(message.content, str) else _dumps(message.content, True)
            return (self.message_overhead + self.tool_result_overhead + self._text(_dumps_spaced(content))
                    + self._text(message.tool_call_id or ""))
        return _Counter._message(self, message, family)

    def _schema_tokens(self, schema: Any) -> int:
        text = self._json(schema)  # the key: a schema edited in place is counted as it is now
        n = self._schema_cache.get(text)
        if n is not None:
            return n
        n = self._text(text)
        if self.family.provider == "openai":
            rendered = render_openai_tool(schema)
            if rendered is not None:
                n = max(n, self._text(rendered))
        if len(self._schema_cache) > 512:
            self._schema_cache.clear()
        self._schema_cache[text] = n
        return n

    def _image_table(self, family: str, low: bool) -> int:
        row = _IMAGE_TOKENS[family]
        if self.strict:
            return row[1] if low else row[0]
        return row[3] if low else row[2]

    def _media_payload(self, payload: str, family: str) -> int:
        if self.strict:
            return StrictEstimator._media_payload(self, payload, family)  # type: ignore[arg-type]
        return TypicalEstimator._media_payload(self, payload, family)  # type: ignore[arg-type]

    def _tools_request_overhead(self, family: str) -> int:
        return self.tools_request_overhead


class _References(_Counter):
    """The walk, finding what it cannot size (``found``: media given by URL or file id); one per walk."""

    mode = "references"
    message_overhead = request_overhead = block_overhead = tool_overhead = tool_call_overhead = 0
    tools_request_overhead = server_tool_tokens = response_format_overhead = url_media_tokens = pdf_page_tokens = 0

    def __init__(self) -> None:
        self.image_tokens = self.low_detail_image_tokens = None
        self.found = 0

    @staticmethod
    def _text(text: str) -> int:
        return 0

    def _unsized_media(self) -> int:
        self.found += 1
        return 0

    def _image(self, block: Mapping[str, Any], family: str) -> int:
        return 0  # an image is bounded by its family's largest size, even by URL

    def _media_payload(self, payload: str, family: str) -> int:
        return self._unsized_media() if _pdf_pages(payload)[1] else 0


MISTRAL_SAFE_PROMPT_TOKENS = 64
"""Bound on the system prompt Mistral's API prepends with ``safe_prompt`` (ChatMistralAI ``safe_mode``)."""


def _safe_prompt(model: Any) -> bool:
    layers, inner = binding_layers(model)
    for kwargs in layers:
        if "safe_prompt" in kwargs or "safe_mode" in kwargs:
            return bool(kwargs.get("safe_prompt", kwargs.get("safe_mode")))
    return bool(getattr(inner, "safe_mode", False) or getattr(inner, "safe_prompt", False))


def _dumps_spaced(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _as_messages(messages: Any) -> Sequence[BaseMessage]:
    if hasattr(messages, "to_messages"):  # a PromptValue
        return messages.to_messages()
    if isinstance(messages, (str, BaseMessage)):
        messages = [messages]
    if all(isinstance(m, BaseMessage) for m in messages):
        return messages
    from langchain_core.messages import convert_to_messages

    return convert_to_messages(messages)


def _detail(block: Mapping[str, Any]) -> Any:
    inner = block.get("image_url")
    if isinstance(inner, Mapping) and inner.get("detail"):
        return inner["detail"]
    extras = block.get("extras")
    if isinstance(extras, Mapping) and extras.get("detail"):
        return extras["detail"]
    return block.get("detail")


_LABEL_KEYS = ("title", "context", "filename")  # notes sent beside a file, never its payload


def _labels(block: Mapping[str, Any]) -> list[str]:
    """Names and notes sent along with a file (Anthropic title/context, OpenAI filename)."""
    found = [block.get(k) for k in _LABEL_KEYS]
    inner = block.get("file")
    if isinstance(inner, Mapping):
        found.append(inner.get("filename"))
    return [v for v in found if isinstance(v, str)]


# Where the providers' converters read an image's or a file's bytes or address: LangChain's
# standard blocks (v1 "url" / "base64" / "file_id", v0 "source_type" with "url" / "data" / "id"),
# OpenAI Chat Completions ("image_url", "file": {"file_data", "file_id"}, "input_audio": {"data"}),
# Responses ("image_url", "file_data", "file_id", "file_url"), Anthropic ("source": {"data", "url",
# "file_id"}) and Gemini ("data", "file_uri"). Notes sent beside the file (title, context, filename)
# are not its payload: ``_labels`` counts them as text.
_PAYLOAD_KEYS = ("url", "base64", "data", "file_data", "image_url")
_REFERENCE_KEYS = ("file_id", "file_url", "file_uri")
_PAYLOAD_HOLDERS = ("source", "file", "input_audio", "image_url")


def _payloads(block: Mapping[str, Any]) -> tuple[str, ...]:
    """The inline payloads a provider may be sent for an image or file block; () when it may be sent
    by URL or file id instead (or carries nothing readable): its size cannot be read.

    Converters disagree on which field wins when a block has several (for a v1 file with ``url`` and
    ``base64``, langchain-anthropic sends the URL, langchain-openai the bytes), so any reference means
    unsized, and of several inline payloads the caller takes the dearest."""
    found: list[str] = []
    if block.get("source_type") in ("url", "id"):
        return ()
    for holder in (block, *(block.get(k) for k in _PAYLOAD_HOLDERS)):
        if not isinstance(holder, Mapping):
            continue
        if holder is not block and holder.get("type") in ("url", "file"):  # Anthropic source by URL / id
            return ()
        if any(holder.get(k) for k in _REFERENCE_KEYS):
            return ()
        for key in _PAYLOAD_KEYS:
            value = holder.get(key)
            if isinstance(value, str) and value:
                if _is_reference(value):
                    return ()
                found.append(value)
    if not found:  # a shape the converters above do not use: its longest string, notes aside
        payload = _longest_string({k: v for k, v in block.items() if k not in _LABEL_KEYS})
        if payload is None or _is_reference(payload):
            return ()
        found.append(payload)
    return tuple(dict.fromkeys(found))


def _longest_string(value: Any) -> str | None:
    best: str | None = None
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if best is None or len(item) > len(best):
                best = item
        elif isinstance(item, Mapping):
            stack.extend(v for k, v in item.items() if k not in _SKIP_KEYS)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return best


def _is_reference(payload: str) -> bool:
    """A URL or file id rather than inline data (short strings are ids: real payloads are longer)."""
    if payload.startswith("data:") or payload.startswith("JVBER"):  # data URL, base64 PDF
        return False
    return len(payload) < 256 or "://" in payload[:16]


def _strip_data_url(payload: str) -> str:
    return payload.split(",", 1)[-1] if payload.startswith("data:") else payload


@functools.lru_cache(maxsize=8)  # the count and the unsized-references walk both read a call's PDFs
def _pdf_pages(payload: str) -> tuple[int, bool]:
    """Visible page objects of a base64 (or data: URL) PDF (0 if not a PDF or unreadable), and whether
    it keeps objects in compressed object streams (PDF 1.5+), where any number of pages may hide."""
    data = _strip_data_url(payload)
    if not data.startswith("JVBER"):  # base64 of "%PDF"
        return 0, False
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        return 0, False
    return max(1, len(_PDF_PAGE.findall(raw))), b"/ObjStm" in raw


_tool_cache: dict[int, tuple[Any, Any, tuple[Any, ...]]] = {}


def _tool_dict(tool: Any) -> Any:
    """A tool as the dict sent to the provider (OpenAI shape for tools given as code)."""
    if isinstance(tool, Mapping):
        return tool
    # A tool's name, description and argument schema may be changed in place after it was seen.
    seen = (getattr(tool, "name", None), getattr(tool, "description", None), id(getattr(tool, "args_schema", None)))
    hit = _tool_cache.get(id(tool))
    if hit is not None and hit[0] is tool and hit[2] == seen:
        return hit[1]
    from langchain_core.utils.function_calling import convert_to_openai_tool

    try:
        schema: Any = convert_to_openai_tool(tool)
    except Exception:  # anything convert_to_openai_tool can't read still costs its text
        schema = str(tool)
    if len(_tool_cache) > 512:
        _tool_cache.clear()
    _tool_cache[id(tool)] = (tool, schema, seen)  # holding the tool keeps its id from being reused
    return schema


def _is_server_tool(schema: Any) -> bool:
    if not isinstance(schema, Mapping):
        return False
    kind = schema.get("type")
    has_schema = any(k in schema for k in ("function", "input_schema", "parameters", "functionDeclarations",
                                           "function_declarations"))
    return isinstance(kind, str) and kind not in ("function", "custom") and not has_schema


# --------------------------------------------------------------------------------------
# Choosing an estimator
# --------------------------------------------------------------------------------------

_BUILTIN: dict[str, type[_Counter]] = {"strict": StrictEstimator, "typical": TypicalEstimator}


def get_estimator(spec: str | Estimator) -> Estimator:
    """``"strict"``, ``"typical"`` or an object with ``input_tokens``, ``output_tokens`` and ``mode``."""
    if isinstance(spec, str):
        cls = _BUILTIN.get(spec.strip().lower())
        if cls is None:
            raise ValueError(f"Unknown estimator {spec!r}: expected 'strict', 'typical' or an object with "
                             "input_tokens(messages, tools), output_tokens(text) and a str mode.")
        return cls()
    if isinstance(spec, type):
        raise ValueError(f"Estimator {spec.__name__} is a class: pass an instance, e.g. {spec.__name__}(), "
                         "or 'strict' / 'typical'.")
    if (callable(getattr(spec, "input_tokens", None)) and callable(getattr(spec, "output_tokens", None))
            and isinstance(getattr(spec, "mode", None), str)):
        return spec
    raise ValueError(f"Unusable estimator {spec!r}: expected 'strict', 'typical' or an object with "
                     "input_tokens(messages, tools), output_tokens(text) and a str mode.")


def estimate_input_tokens(
    estimator: Estimator, messages: Sequence[BaseMessage], tools: Sequence[Any] | None = None, model: Any = None
) -> int:
    """``estimator.input_tokens``, passing ``model`` (name or chat model) to estimators that take it."""
    if model is not None and getattr(estimator, "accepts_model", False):
        return estimator.input_tokens(messages, tools, model=model)  # type: ignore[call-arg]
    return estimator.input_tokens(messages, tools)


def unsized_references(estimator: Estimator, messages: Any) -> int:
    """How many inputs of ``messages`` ``estimator`` counted without knowing their size (documents
    and recordings by URL or file id: ``StrictEstimator.unsized_references``); 0 for other estimators."""
    count = getattr(estimator, "unsized_references", None)
    return count(messages) if callable(count) else 0


def bounded_input_tokens(tokens: int, unsized: int, *limits: int | None) -> int:
    """The prompt tokens to hold: ``tokens``, or, when ``unsized`` inputs were counted without a size,
    the largest of the model's known input ``limits`` if that is more (the most the provider bills)."""
    if not unsized:
        return tokens
    return max((tokens, *(limit for limit in limits if limit is not None)))


def estimate_output_tokens(estimator: Estimator, text: str, model: Any = None) -> int:
    """``estimator.output_tokens(text)``, exact for a model whose tokenizer is installed (strict).

    For a reply whose usage never came (a cut stream): the text seen, as the model's tokenizer
    counts it plus strict's small overhead, instead of its UTF-8 bytes.
    """
    counter_for = getattr(estimator, "counter_for", None)
    if model is not None and callable(counter_for):
        return counter_for(model).output_tokens(text)
    return estimator.output_tokens(text)


# --------------------------------------------------------------------------------------
# What a call is bound with
# --------------------------------------------------------------------------------------

def _response_format(value: Any) -> Any:
    """A structured-output schema as a ``{"type": "json_schema", ...}`` dict, or None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if value.get("type") in _RESPONSE_FORMATS:
            return value
        return {"type": "json_schema", "json_schema": value}
    schema = _tool_dict(value)
    if isinstance(schema, Mapping) and isinstance(schema.get("function"), Mapping):
        return {"type": "json_schema", "json_schema": schema["function"]}
    return {"type": "json_schema", "json_schema": str(value)}


def tools_of(model: Any, call_kwargs: Mapping[str, Any] | None = None) -> list[Any]:
    """Tool schemas (``tools``, ``functions``) and structured-output schemas a call will send.

    Call kwargs win over bound kwargs, outer bindings over inner ones, as
    ``RunnableBinding`` merges them, and those over the model's ``model_kwargs`` (which the
    integrations send in the request too). Output schemas come back as
    ``{"type": "json_schema", ...}`` dicts, which the estimators count without
    the tool-use overhead.
    """
    layers, inner = binding_layers(model)
    if isinstance(call_kwargs, Mapping):
        layers.insert(0, call_kwargs)
    model_kwargs = getattr(inner, "model_kwargs", None)
    if isinstance(model_kwargs, Mapping) and model_kwargs:  # sent in the request, under the kwargs
        layers.append(model_kwargs)

    def resolve(key: str) -> Any:
        for kwargs in layers:
            if kwargs.get(key) is not None:
                return kwargs[key]
        return None

    found: list[Any] = []
    for key in ("tools", "functions"):
        value = resolve(key)
        if isinstance(value, (list, tuple)):
            found.extend(value)
        elif value is not None:
            found.append(value)
    fmt = _response_format(resolve("response_format"))
    if fmt is not None:
        found.append(fmt)
    config = resolve("output_config")
    if isinstance(config, Mapping) and isinstance(config.get("format"), Mapping):
        found.append(config["format"])
    return found


STORED_CONTEXT_KWARGS = ("previous_response_id", "conversation", "cached_content")
"""Request parameters that make the provider read (and bill as input) context it stores, which the
request does not carry: OpenAI Responses ``previous_response_id`` / ``conversation``, Gemini
``cached_content``."""


def stored_context_of(model: Any, call_kwargs: Mapping[str, Any] | None = None) -> str | None:
    """The parameter by which a call on ``model`` continues context the provider stores (one of
    ``STORED_CONTEXT_KWARGS``), or None: read from the call's kwargs, bindings, the request's
    ``extra_body``, the model's fields and ``model_kwargs``. An empty value continues nothing."""
    layers, inner = binding_layers(model)
    if isinstance(call_kwargs, Mapping):
        layers.insert(0, call_kwargs)
    model_kwargs = getattr(inner, "model_kwargs", None)
    places = [*layers, extra_body_of(inner, *layers)[0], model_kwargs if isinstance(model_kwargs, Mapping) else None]
    for key in STORED_CONTEXT_KWARGS:
        field = getattr(inner, key, None) if key == "cached_content" else None  # ChatGoogleGenerativeAI's field
        if any(isinstance(place, Mapping) and place.get(key) for place in places) or (
                isinstance(field, str) and field):
            return key
    return None


# Request parameters that carry no prompt (the guard reads caps, n, model and tier elsewhere).
_NOT_PROMPT = frozenset({*CAP_KWARGS, "n", "candidate_count", "model", "service_tier", "speed", "temperature",
                         "top_p", "top_k", "seed", "stream", "stream_options", "user", "store", "metadata",
                         "reasoning_effort", "logprobs", "top_logprobs", "parallel_tool_calls", "stop",
                         "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "truncation",
                         "background", "include", "frequency_penalty", "presence_penalty", "logit_bias",
                         "verbosity", "max_tool_calls"})


def extra_body_tokens(model: Any, call_kwargs: Mapping[str, Any] | None = None) -> int:
    """A strict bound of what a request's ``extra_body`` adds to the prompt: one token per UTF-8 byte
    of the JSON of what it carries besides plain parameters (the SDKs send it over the named
    parameters, so prompt text, input items or tools in it are billed, and no tokenizer emits a
    token of less than a byte). 0 without one."""
    layers, inner = binding_layers(model)
    if isinstance(call_kwargs, Mapping):
        layers.insert(0, call_kwargs)
    body = extra_body_of(inner, *layers)[0]
    if body:
        body = {k: v for k, v in body.items() if k not in _NOT_PROMPT}
    if not body:
        return 0
    try:
        text = json.dumps(body, ensure_ascii=False, default=str, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):  # a body the SDK cannot send either: its repr bounds it
        text = repr(body)
    return len(text.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------------------
# One call's estimate, explained
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CallEstimate:
    """What a call would hold, in tokens, and why.

    ``input_tokens``: the prompt estimate (a ``TokenCount`` from ``TypicalEstimator``: pass it
    to ``observe`` at settle). ``output_cap``: the cap found and who set it.
    ``reserved_output_tokens``: the output to reserve: a cap the user set, else
    ``default_max_output_tokens`` never above the model's output limit. ``send_cap``: the
    kwargs the guard must add to the call so the provider enforces that reservation (None when
    the user's own cap applies, or when the model takes no known cap keyword).
    ``tokenizer``: the exact tokenizer used (``"o200k_base"``...), None for a byte bound or
    heuristic. ``mode``: the estimator's mode.
    """

    input_tokens: int
    output_cap: OutputCap
    reserved_output_tokens: int
    send_cap: dict[str, int] | None
    tokenizer: str | None
    mode: str

    @property
    def dominant(self) -> str:
        """``"input"`` or ``"output"``: the larger part in tokens (compare costs with ``dominant_part``)."""
        return "output" if self.reserved_output_tokens >= self.input_tokens else "input"

    def describe(self) -> str:
        """One line for a refusal message: both parts, where the output cap came from."""
        how = f"exact {self.tokenizer} + margin" if self.tokenizer and self.mode == "strict" else \
            f"exact {self.tokenizer}" if self.tokenizer else \
            "UTF-8 byte bound" if self.mode == "strict" else self.mode
        cap = self.output_cap
        if cap.user_set:
            out = f"output {self.reserved_output_tokens:,} tokens ({cap.describe()})"
        else:
            found = cap.describe() if cap.tokens is not None else "no output cap set"
            sent = f", sent as {next(iter(self.send_cap))}" if self.send_cap else ""
            out = f"output {self.reserved_output_tokens:,} tokens (default cap{sent}; {found})"
        return f"input {int(self.input_tokens):,} tokens ({how}), {out}"


def dominant_part(input_cost: int, output_cost: int) -> str:
    """``"input"`` or ``"output"``: which part of a reservation costs more (any one unit)."""
    return "output" if output_cost >= input_cost else "input"


def reserved_output(cap: OutputCap, default_max_output_tokens: int) -> tuple[int, dict[str, int] | None]:
    """The output tokens to reserve for ``cap`` and the kwargs to send so the provider keeps to it."""
    if cap.user_set and cap.tokens is not None:
        return cap.tokens, None
    tokens = default_max_output_tokens + cap.thinking  # room to answer after thinking (Anthropic requires it)
    if cap.model_limit is not None:
        tokens = min(tokens, cap.model_limit)
    if cap.source == "integration_default" and cap.tokens is not None:
        tokens = min(tokens, cap.tokens)
    return tokens, ({cap.kwarg: tokens} if cap.kwarg else None)


def estimate_call(
    estimator: Estimator,
    messages: Sequence[BaseMessage] | Any,
    model: Any,
    call_kwargs: Mapping[str, Any] | None = None,
    *,
    default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
) -> CallEstimate:
    """Estimate one call on ``model`` (a chat model or binding): input, output cap, what to send."""
    if isinstance(default_max_output_tokens, bool) or not isinstance(default_max_output_tokens, int) \
            or default_max_output_tokens <= 0:
        raise ValueError(f"default_max_output_tokens: expected a positive int, got {default_max_output_tokens!r}")
    cap = output_cap(model, call_kwargs)
    tools = tools_of(model, call_kwargs)
    input_tokens = estimate_input_tokens(estimator, messages, tools, model)
    reserved, send = reserved_output(cap, default_max_output_tokens)
    tokenizer_for = getattr(estimator, "tokenizer_for", None)
    tokenizer = tokenizer_for(model) if callable(tokenizer_for) else None
    return CallEstimate(input_tokens, cap, reserved, send, tokenizer, getattr(estimator, "mode", "custom"))
