"""A server that answers each POST with the next canned provider body, byte for byte as given.

For provider shapes the scripted servers do not produce (Responses API items, Anthropic server
tools, DeepSeek reasoning streams): the test writes the provider's JSON, the real client parses
it. A body is a JSON-able mapping (sent as ``application/json``) or a list of SSE events (each a
mapping sent as ``data: <json>``, or a ready string such as ``"[DONE]"``), optionally with an
``event:`` name as ``(name, data)``. A mapping body with ``"__delay_seconds__": s`` is sent
``s`` seconds late, without that key (a provider still working when the client gives up).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

__all__ = ["CannedServer"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = raw.decode("utf-8", "replace")
        owner = self.server.owner
        with owner.lock:
            owner.requests.append({"path": self.path, "body": body})
            reply = owner.queue.popleft() if owner.queue else {"error": {"message": "no canned reply left"}}
        if isinstance(reply, list):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for event in reply:
                name, data = event if isinstance(event, tuple) else (None, event)
                text = data if isinstance(data, str) else json.dumps(data)
                chunk = (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
                payload = chunk.encode()
                self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        if "__delay_seconds__" in reply:
            reply = dict(reply)
            time.sleep(reply.pop("__delay_seconds__"))
        payload = json.dumps(reply).encode()
        self.send_response(500 if "error" in reply and len(reply) == 1 else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: CannedServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client that gave up
            super().handle_error(request, client_address)


class CannedServer:
    """``with CannedServer() as s: s.push(body); ChatX(base_url=s.url + "/v1")...``"""

    def __init__(self) -> None:
        self.queue: deque[Any] = deque()
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def netloc(self) -> str:
        return self.url.split("//", 1)[1]

    def push(self, *bodies: Any) -> Self:
        with self.lock:
            self.queue.extend(bodies)
        return self

    def reset(self) -> None:
        with self.lock:
            self.queue.clear()
            self.requests.clear()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
