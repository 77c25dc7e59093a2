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
"""

from __future__ import annotations

import json
import re
import socket
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
    "RecordedRequest",
    "Reply",
    "ScriptedServer",
    "ToolCall",
    "count_output_tokens",
    "count_prompt_tokens",
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

