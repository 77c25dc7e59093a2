"""Scripted replies, the request log and the HTTP plumbing shared by the fake provider servers.

A test queues :class:`Reply` objects on a server; each request to the provider's
generation endpoint takes the next one (or the default reply when the queue is
empty) and answers in that provider's wire format, streaming or not.

Token conventions are LangChain's ``UsageMetadata`` ones, so a scripted reply
reads the same for both providers: ``input_tokens`` is the whole prompt
*including* cache reads and writes, ``output_tokens`` the whole completion
*including* reasoning. Each server translates to its own wire shape (Anthropic's
``input_tokens`` field excludes cached tokens, for instance).

The SDKs retry 429, 5xx and dropped connections (``max_retries`` defaults to 2 in
both ChatOpenAI and ChatAnthropic). Build models with ``max_retries=0`` (as
``server.chat_model()`` does) when a test counts requests; otherwise one scripted
error can produce up to three requests and consume up to three queued replies.
Error replies carry ``retry-after-ms: 1`` by default so tests that *do* exercise
retries stay fast.

``server.respond_like_a_model()`` replaces the default reply with one that depends on the
request (see ``answer``): tool calls, JSON-schema and JSON-mode output, stop sequences,
reasoning tokens, prompt-cache reads/writes, and prompt tokens for images and PDFs billed as
the provider bills them. Code written for the real API (LangChain's standard suites) runs on it
unscripted.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

__all__ = [
    "DEFAULT_TEXT",
    "MODEL_TEXT",
    "PromptView",
    "RecordedRequest",
    "Reply",
    "ScriptedServer",
    "ToolCall",
    "answer",
    "count_output_tokens",
    "count_prompt_tokens",
    "fill_schema",
]


@dataclass(frozen=True)
class ToolCall:
    """One tool call the model "decides" to make."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None
    """None: the server makes one up (``call_<req>_<i>`` / ``toolu_<req>_<i>``)."""


DEFAULT_TEXT = "Hello from the test server."


@dataclass(frozen=True)
class Reply:
    """One scripted answer. Token counts left as None are computed from the request/reply."""

    text: str = None  # type: ignore[assignment]
    """None: the chunks joined, else "" for a tool-call reply, else ``DEFAULT_TEXT``."""
    tool_calls: tuple[ToolCall, ...] = ()
    input_tokens: int | None = None
    """Whole prompt incl. cached tokens; None: ``count_prompt_tokens(body)``."""
    output_tokens: int | None = None
    """Whole completion incl. reasoning; None: ``count_output_tokens(reply)``."""
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_creation_1h_tokens: int = 0
    """Part of ``cache_creation_tokens`` written with the 1h TTL (Anthropic breakdown only)."""
    cache_ttl_breakdown: bool = False
    """Anthropic: also send ``usage.cache_creation`` {ephemeral_5m/1h_input_tokens}."""
    reasoning_tokens: int = 0
    finish_reason: str | None = None
    """Raw provider value; None: stop/tool_calls (OpenAI), end_turn/tool_use (Anthropic)."""
    omit_usage: bool = False
    """OpenAI only: no ``usage`` in the body and no usage chunk, as some compatible servers do."""
    delta_usage: str = "full"
    """Anthropic stream: "full" (cumulative input+cache+output, today's API) or "output_only" (older API)."""
    chunks: tuple[str, ...] | None = None
    """Streamed text pieces; None: ``text`` split after each whitespace run. Must join to ``text``."""
    error: int | None = None
    """HTTP status to fail with, using the provider's JSON error body."""
    error_message: str | None = None
    error_body: Mapping[str, Any] | None = None
    """Replaces the provider-shaped error body entirely."""
    stream_error_after: int | None = None
    """Streaming: after this many SSE events send the provider's in-stream error event, then end."""
    cut_after: int | None = None
    """Streaming: drop the connection after this many SSE events (role/message_start count
    as one), so the body is truncated and no usage arrives. Non-streaming: drop the
    connection before any response (the SDK sees a connection error and retries it)."""
    delay: float = 0.0
    """Seconds to wait before answering."""
    chunk_delay: float = 0.0
    """Seconds to wait between SSE events."""
    headers: Mapping[str, str] | None = None
    """Extra response headers; for errors they replace the default ``retry-after-ms: 1``."""
    thinking: str = ""
    """Anthropic: a thinking block (with a signature) before the text; OpenAI keeps reasoning hidden."""
    stop_sequence: str | None = None
    """The stop sequence that ended the text (Anthropic reports it, stop_reason "stop_sequence")."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tool_calls", tuple(self.tool_calls))
        if self.chunks is not None:
            object.__setattr__(self, "chunks", tuple(self.chunks))
        if self.text is None:
            if self.chunks is not None:
                text = "".join(self.chunks)
            else:
                text = "" if self.tool_calls else DEFAULT_TEXT
            object.__setattr__(self, "text", text)
        elif self.chunks is not None and "".join(self.chunks) != self.text:
            raise ValueError("Reply.chunks must join to Reply.text")
        if self.cache_creation_1h_tokens > self.cache_creation_tokens:
            raise ValueError("cache_creation_1h_tokens is part of cache_creation_tokens")

    def text_chunks(self) -> list[str]:
        """The pieces the text is streamed in (no pieces for empty text)."""
        if self.chunks is not None:
            return [c for c in self.chunks if c]
        return re.findall(r"\s*\S+\s*", self.text) or ([self.text] if self.text else [])


ReplyLike = Reply | str | Mapping[str, Any] | Callable[["RecordedRequest"], "Reply | str | Mapping[str, Any]"]


def _as_reply(value: Reply | str | Mapping[str, Any]) -> Reply:
    if isinstance(value, Reply):
        return value
    if isinstance(value, str):
        return Reply(text=value)
    data = dict(value)
    if "tool_calls" in data:
        data["tool_calls"] = tuple(tc if isinstance(tc, ToolCall) else ToolCall(**tc) for tc in data["tool_calls"])
    return Reply(**data)


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_chars(value[k]) for k in ("text", "content") if k in value)
    return 0


def count_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Default prompt size: characters of message text (and Anthropic ``system``) // 4 + 1.

    Only ``content`` strings and ``text``/``content`` fields of content parts count;
    tool schemas, tool-call arguments and roles do not.
    """
    chars = _text_chars(body.get("system", ""))
    for message in body.get("messages") or []:
        if isinstance(message, Mapping):
            chars += _text_chars(message.get("content"))
    return chars // 4 + 1


def count_output_tokens(reply: Reply) -> int:
    """Default completion size: characters of text plus JSON tool arguments // 4 + 1."""
    chars = len(reply.text) + sum(len(json.dumps(dict(tc.args))) for tc in reply.tool_calls)
    return chars // 4 + 1


@dataclass
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased header names."""
    body: Any
    """Parsed JSON body (None when absent or not JSON)."""
    reply: Reply | None = None
    """The scripted reply that answered it (None for auxiliary endpoints)."""
    usage: dict[str, int] | None = None
    """What the server reported, LangChain-style: input_tokens, output_tokens, total_tokens,
    cache_read, cache_creation, reasoning. None for errors, omitted usage, or when the
    stream was cut/errored before the usage was sent."""

    @property
    def stream(self) -> bool:
        return bool(isinstance(self.body, Mapping) and self.body.get("stream"))


class _Dropped(Exception):
    """The handler decided to drop the connection."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self.server.owner._dispatch(self, None)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.server.owner._dispatch(self, body)

    # -- response helpers used by the providers --

    def send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_sse(self, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        # Chunked, so a dropped connection is a truncated body the client notices,
        # not an ordinary close-delimited end of stream.
        self.send_header("transfer-encoding", "chunked")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def drop(self) -> None:
        """Close the socket now, mid-response if need be."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: ScriptedServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients closing pooled keep-alive connections is routine, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ScriptedServer:
    """A provider look-alike on 127.0.0.1 with a reply queue and a request log."""

    api_path: ClassVar[str]
    """The generation endpoint; requests there consume scripted replies."""

    def __init__(self, default: Reply | str | None = None) -> None:
        self._lock = threading.Lock()
        self._queue: deque[ReplyLike] = deque()
        self._requests: list[RecordedRequest] = []
        self._initial_default = _as_reply(default) if default is not None else Reply()
        self._default: ReplyLike = self._initial_default
        self.errors: list[Exception] = []
        """Exceptions from bad scripts (each was answered with a bare HTTP 500)."""
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._cached_prompts: set[str] = set()

    # -- lifecycle --

    def start(self) -> Self:
        if self._httpd is None:
            httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
            httpd.owner = self
            self._httpd = httpd
            self._thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name=type(self).__name__
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no path)."""
        if self._httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def base_url(self) -> str:
        """What to pass as ``base_url`` to the LangChain model."""
        raise NotImplementedError

    # -- scripting --

    def script(self, *replies: ReplyLike) -> Self:
        """Queue replies for the next requests, in order.

        Each item is a :class:`Reply`, a str (text reply), a dict of Reply fields, or a
        callable taking the :class:`RecordedRequest` and returning one of those.
        """
        with self._lock:
            self._queue.extend(replies)
        return self

    def set_default(self, reply: ReplyLike) -> Self:
        """The reply used when the queue is empty (until :meth:`reset`)."""
        with self._lock:
            self._default = reply
        return self

    def reset(self) -> None:
        """Forget queued replies, the request log and any custom default."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()
            self.errors.clear()
            self._default = self._initial_default
            self._cached_prompts.clear()

    cache_min_tokens: ClassVar[int] = 1024
    """The shortest prompt prefix the provider caches."""
    reports_cache_writes: ClassVar[bool] = False

    def respond_like_a_model(self) -> Self:
        """Answer unscripted requests as a model would (see ``answer``), until :meth:`reset`."""
        return self.set_default(self.model_answer)

    def model_answer(self, request: RecordedRequest) -> Reply:
        """The reply a model would give to this request (usable as a scripted item too)."""
        body = request.body if isinstance(request.body, Mapping) else {}
        with self._lock:
            return answer(
                self.prompt_view(body),
                self._cached_prompts,
                count_prompt_tokens(body) + self.media_tokens(body),
                cache_min_tokens=self.cache_min_tokens,
                reports_cache_writes=self.reports_cache_writes,
            )

    def prompt_view(self, body: Mapping[str, Any]) -> PromptView:
        """What a model would read in this provider's request body."""
        raise NotImplementedError

    def media_tokens(self, body: Mapping[str, Any]) -> int:
        """Prompt tokens of the images and documents in the request, as this provider bills them."""
        return 0

    @property
    def pending(self) -> int:
        """Queued replies not yet used."""
        with self._lock:
            return len(self._queue)

    # -- the log --

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far (a copy), oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def calls(self) -> list[RecordedRequest]:
        """Requests to the generation endpoint only."""
        return [r for r in self.requests if r.path == self.api_path]

    @property
    def last(self) -> RecordedRequest:
        calls = self.calls
        if not calls:
            raise AssertionError(f"{type(self).__name__} got no {self.api_path} request")
        return calls[-1]

    # -- request handling --

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            item = self._queue.popleft() if self._queue else self._default
        if callable(item) and not isinstance(item, Reply):
            item = item(request)
        return _as_reply(item)

    def _dispatch(self, handler: _Handler, body: Any) -> None:
        path = handler.path.split("?", 1)[0]
        request = RecordedRequest(
            method=handler.command,
            path=path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
        )
        with self._lock:
            self._requests.append(request)
            index = len(self._requests)
        try:
            if path == self.api_path and handler.command == "POST":
                reply = self._next_reply(request)
                request.reply = reply
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.cut_after is not None and not request.stream:
                    handler.drop()
                if reply.error is not None:
                    handler.send_json(
                        reply.error,
                        dict(reply.error_body) if reply.error_body is not None else self._error_body(reply),
                        reply.headers if reply.headers is not None else {"retry-after-ms": "1"},
                    )
                    return
                model = body.get("model", "unknown") if isinstance(body, Mapping) else "unknown"
                usage = self._usage(reply, body)
                self._validate(reply, usage)
                if request.stream:
                    handler.start_sse(reply.headers)
                    sent = 0
                    for event, usage_sent in self._stream_events(reply, body, model, usage, index):
                        if reply.cut_after is not None and sent >= reply.cut_after:
                            handler.drop()
                        if reply.stream_error_after is not None and sent >= reply.stream_error_after:
                            handler.write_chunk(self._stream_error_event(reply))
                            break
                        if sent and reply.chunk_delay:
                            time.sleep(reply.chunk_delay)
                        if usage_sent:
                            request.usage = usage
                        handler.write_chunk(event)
                        sent += 1
                    handler.end_chunks()
                else:
                    payload = self._completion(reply, body, model, usage, index)
                    if not reply.omit_usage:
                        request.usage = usage  # before sending: the test may look as soon as it has the reply
                    handler.send_json(200, payload, reply.headers)
            else:
                self._other(handler, request)
        except _Dropped:
            pass
        except (BrokenPipeError, ConnectionResetError):
            # The client went away mid-stream (e.g. it stopped iterating).
            handler.close_connection = True
        except Exception as exc:  # a bad script: answer 500 and keep it for the test to see
            with self._lock:
                self.errors.append(exc)
            try:
                handler.send_json(500, {"error": {"message": f"test server script error: {exc!r}"}})
            except OSError:
                pass
            handler.close_connection = True

    def _usage(self, reply: Reply, body: Any) -> dict[str, int]:
        input_tokens = reply.input_tokens if reply.input_tokens is not None else count_prompt_tokens(body or {})
        output_tokens = reply.output_tokens if reply.output_tokens is not None else count_output_tokens(reply)
        return {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "cache_read": reply.cache_read_tokens,
            "cache_creation": reply.cache_creation_tokens,
            "reasoning": reply.reasoning_tokens,
        }

    # -- provider specifics --

    def _validate(self, reply: Reply, usage: dict[str, int]) -> None:
        """Raise ValueError for a reply this provider cannot express."""

    def _error_body(self, reply: Reply) -> dict[str, Any]:
        raise NotImplementedError

    def _completion(self, reply: Reply, body: Any, model: str, usage: dict[str, int], index: int) -> dict[str, Any]:
        raise NotImplementedError

    def _stream_events(
        self, reply: Reply, body: Any, model: str, usage: dict[str, int], index: int
    ) -> Iterator[tuple[bytes, bool]]:
        """Yield (SSE event bytes, whether this event carries the final usage)."""
        raise NotImplementedError

    def _stream_error_event(self, reply: Reply) -> bytes:
        raise NotImplementedError

    def _other(self, handler: _Handler, request: RecordedRequest) -> None:
        handler.send_json(404, self._error_body(Reply(error=404, error_message=f"Unknown path {request.path}")))


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()



# -- answering like a model --------------------------------------------------------------------
#
# ``server.respond_like_a_model()`` makes the server's default reply depend on the request, the
# way a real model's does, so code written for the real API (LangChain's standard chat-model
# suites, agents) runs unscripted: it calls a tool when one is forced or the prompt is about
# one, fills the tool's arguments and any JSON schema from the prompt, answers JSON in JSON mode,
# honours stop sequences, reports reasoning tokens for reasoning models and cache reads/writes
# for prompts a cache would serve. Each server reads its own wire format into a ``PromptView``.

MODEL_TEXT = "Hello! I am the test model; how can I help you today?"
REASONING_TOKENS = 64
"""Reasoning tokens a reasoning model "spends" on each answer (part of output_tokens)."""


@dataclass(frozen=True)
class PromptView:
    """What a model would read in one generation request, independent of the wire format."""

    last_user_text: str
    after_tool_result: bool = False
    """The conversation ends with a tool's result (the model answers it in text)."""
    tools: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    """(name, JSON schema of the arguments) of each tool offered."""
    tool_choice: str | None = None
    """None/"auto": the model decides; "any": some tool; "none": no tool; else that tool's name."""
    response_schema: Mapping[str, Any] | None = None
    """A JSON schema the answer must follow (structured output)."""
    json_mode: bool = False
    stop: tuple[str, ...] = ()
    reasoning: bool = False
    """A reasoning model (or thinking enabled): reasoning tokens are spent and reported."""
    cache: tuple[str, int] | None = None
    """(key, tokens) of the prompt prefix a provider cache would store, or None."""


def _words(name: str) -> list[str]:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return [w.lower() for w in re.split(r"[\s_\-]+", spaced) if len(w) >= 4]


def _mentions(text: str, tool: str) -> bool:
    lowered = text.lower()
    return tool.lower() in lowered or any(w in lowered for w in _words(tool))


class _Filler:
    """Values for a JSON schema taken from the prompt: numbers in order, then quoted strings."""

    def __init__(self, prompt: str, defs: Mapping[str, Any]) -> None:
        self.prompt = prompt
        self.defs = defs
        self.numbers = [int(n) for n in re.findall(r"(?<![\w.])-?\d+(?![\w.])", prompt)]
        self.quoted = re.findall(r"'([^']+)'|\"([^\"]+)\"", prompt)
        self.quoted = [a or b for a, b in self.quoted]
        place = re.search(r"\bin ([A-Z][^?.!]*)", prompt)
        self.place = place.group(1).strip() if place else None

    def value(self, schema: Mapping[str, Any], name: str) -> Any:
        if "$ref" in schema:
            return self.value(self.defs[schema["$ref"].rsplit("/", 1)[-1]], name)
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
                return self.value(options[0], name)
        if "enum" in schema:
            return schema["enum"][0]
        if "const" in schema:
            return schema["const"]
        kind = schema.get("type", "object" if "properties" in schema else "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            props = schema.get("properties") or {}
            return {k: self.value(v, k) for k, v in props.items()}
        if kind == "array":
            return [self.value(schema.get("items") or {}, name)]
        if kind in ("integer", "number"):
            low = schema.get("exclusiveMinimum", schema.get("minimum"))
            n = self.numbers.pop(0) if self.numbers else (int(low) + 1 if low is not None else 1)
            return n
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        if self.quoted:
            return self.quoted.pop(0)
        if name in ("location", "city", "place") and self.place:
            return self.place
        description = schema.get("description") or name.replace("_", " ")
        return f"{description} ({self.prompt[:40].strip()})"


def fill_schema(schema: Mapping[str, Any], prompt: str) -> Any:
    """An instance of ``schema`` built from what ``prompt`` mentions (numbers, quoted names, places)."""
    defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    return _Filler(prompt, defs).value(schema, "value")


def _apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, str | None]:
    cut, hit = len(text), None
    for s in stop:
        at = text.find(s) if s else -1
        if 0 <= at < cut:
            cut, hit = at, s
    return text[:cut], hit


def answer(
    view: PromptView, seen: set[str], input_tokens: int, *, cache_min_tokens: int, reports_cache_writes: bool
) -> Reply:
    """The reply a model would give to ``view``, with its usage.

    ``seen`` holds the cache keys of earlier prompts (this updates it): a prompt prefix of at
    least ``cache_min_tokens`` is written to the cache on first sight (reported as a cache write
    when the provider reports those) and read from it after.
    """
    tool_calls: tuple[ToolCall, ...] = ()
    text = MODEL_TEXT
    names = [n for n, _ in view.tools]
    wanted = None
    if view.tools and view.tool_choice != "none":
        if view.tool_choice in names:
            wanted = view.tool_choice
        else:
            mentioned = [n for n in names if _mentions(view.last_user_text, n)]
            forced = view.tool_choice == "any"
            about_tools = bool(mentioned) or "tool" in view.last_user_text.lower()
            if forced or (about_tools and not view.after_tool_result):
                wanted = (mentioned or names)[0]
    if wanted is not None:
        schema = dict(view.tools)[wanted]
        tool_calls = (ToolCall(wanted, fill_schema(schema, view.last_user_text)),)
        text = ""
    elif view.response_schema is not None:
        text = json.dumps(fill_schema(view.response_schema, view.last_user_text), ensure_ascii=False)
    elif view.json_mode:
        keys = re.findall(r"'(\w+)'", view.last_user_text) or ["answer"]
        text = json.dumps({k: f"{k} ({view.last_user_text[:30].strip()})" for k in keys})
    elif view.after_tool_result:
        text = "The tool answered; here is what it says."
    hit = None
    if text and not tool_calls:
        text, hit = _apply_stop(text, view.stop)
    probe = Reply(text=text, tool_calls=tool_calls)
    output = count_output_tokens(probe)
    reasoning = REASONING_TOKENS if view.reasoning else 0
    cache_read = cache_write = 0
    if view.cache is not None:
        key, tokens = view.cache
        tokens = min(tokens, input_tokens)
        if tokens >= cache_min_tokens:
            if key in seen:
                cache_read = tokens
            else:
                cache_write = tokens if reports_cache_writes else 0
                seen.add(key)
    reply = Reply(
        text=text,
        tool_calls=tool_calls,
        input_tokens=input_tokens,
        output_tokens=output + reasoning,
        reasoning_tokens=reasoning,
        cache_read_tokens=cache_read,
        cache_creation_tokens=cache_write,
        thinking="Let me think about that." if view.reasoning else "",
        stop_sequence=hit,
    )
    return reply


# -- media sizes -------------------------------------------------------------------------------

URL_IMAGE_SIZE = (1024, 768)
"""The size the servers assume for an image given by URL (they never fetch it: tests run offline)."""
PDF_PAGE_SIZE = (612, 792)
"""A PDF page (US letter, in points), rendered as an image of this size."""


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG (or, for other formats, ``URL_IMAGE_SIZE``)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    return URL_IMAGE_SIZE


def data_url_bytes(url: str) -> bytes | None:
    """The bytes of a ``data:...;base64,`` URL, None for any other URL."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    return base64.b64decode(url.split(";base64,", 1)[1])


def pdf_pages(data: bytes) -> int:
    """Page objects in a PDF (at least 1)."""
    return max(1, len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data)))
