"""The alert webhook against hostile or misconfigured endpoints (local servers on 127.0.0.1):
a redirect is never followed (neither the alert nor its secret headers go anywhere but the
configured URL), and ``timeout_seconds`` bounds each try end to end, however slowly the
endpoint answers."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from langchain_budgetguard.alerts import Alert, AlertSink, Webhook

SECRET = "Bearer hook-secret"
SLACK = 1.5  # what a try may take beyond its timeout on a loaded machine; the old code took 10 s+


def alert(i: int = 0) -> Alert:
    return Alert(kind="threshold", budget="b", scope="user", scope_id=f"u{i}", window="day",
                 window_label="2026-12-03", unit="usd", limit=Decimal(5), spent=Decimal(4),
                 threshold=Decimal("0.8"), at=datetime.now(timezone.utc))


# -- redirects ---------------------------------------------------------------------------------


class Recording(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.redirect_to = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Recorder(BaseHTTPRequestHandler):
    server: Recording

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        if self.path.startswith("/moved/"):  # /moved/<status>
            self.send_response(int(self.path.rsplit("/", 1)[1]))
            self.send_header("Location", self.server.redirect_to)
            self.send_header("Content-Length", "0")
        else:
            self.send_response(200)
            self.send_header("Content-Length", "2")
        self.end_headers()
        if not self.path.startswith("/moved/"):
            self.wfile.write(b"ok")

    do_GET = do_POST = _answer  # noqa: N815 (http.server's names)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Recording, Recording]]:
    """The webhook's server and another one (another port: another origin) that a redirect names."""
    pair = (Recording(), Recording())
    for s in pair:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield pair
    for s in pair:
        s.shutdown()
        s.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_delivery_and_nothing_reaches_its_target(
        servers: tuple[Recording, Recording], status: int, caplog: pytest.LogCaptureFixture) -> None:
    hook_server, other = servers
    hook_server.seen.clear()
    other.seen.clear()
    hook_server.redirect_to = f"{other.base}/new?token=elsewhere-secret"
    sink = AlertSink(webhook=Webhook(f"{hook_server.base}/moved/{status}", headers={"Authorization": SECRET},
                                     attempts=3, backoff_seconds=0.01))
    with caplog.at_level(logging.WARNING, logger="langchain_budgetguard.alerts"):
        sink.emit(alert())
        assert sink.flush(10)
    assert (sink.delivered, sink.failed) == (0, 1)
    assert other.seen == [], "neither the alert nor the secret header may reach the redirect's target"
    assert hook_server.seen == [("POST", f"/moved/{status}", SECRET)], "a redirect is final: not retried"
    assert f"answered {status}, a redirect to {other.base}/..." in caplog.text
    assert "configure the final URL" in caplog.text and "after 1 attempt:" in caplog.text
    assert "elsewhere-secret" not in caplog.text, "the redirect's query may hold a secret"
    sink.close()


def test_a_relative_redirect_names_the_webhooks_own_host(servers: tuple[Recording, Recording]) -> None:
    hook_server, _ = servers
    hook_server.redirect_to = "/elsewhere"
    with pytest.raises(Exception, match=f"answered 302, a redirect to {hook_server.base}/...; redirects are not"):
        Webhook(f"{hook_server.base}/moved/302", attempts=1).post(alert().to_json())


def test_a_200_with_a_body_is_delivered(servers: tuple[Recording, Recording]) -> None:
    hook_server, _ = servers
    Webhook(f"{hook_server.base}/hook", attempts=1).post(alert().to_json())  # reads "ok" through the deadline


# -- timeout_seconds is per try, end to end ----------------------------------------------------


class Trickler:
    """A raw TCP server that answers each connection one byte every ``pause`` seconds: the status
    line and headers (``mode="head"``), or fast headers then the body (``"body"``), or never a
    byte (``"silent"``). Every byte comes well within any per-read timeout."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = conn.recv(65536)
                path = request.split(b" ", 2)[1] if b" " in request else b"/"
                if path.startswith(b"/silent"):
                    self.stopped.wait(30)
                    return
                fast, slow = (b"", b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200 + b"\r\nContent-Length: 0\r\n\r\n")
                if path.startswith(b"/body"):
                    fast, slow = b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n", b"b" * 200
                conn.sendall(fast)
                for byte in slow:
                    if self.stopped.wait(0.05):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return  # the client gave up: what the test wants

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()


@pytest.fixture(scope="module")
def trickler() -> Iterator[Trickler]:
    server = Trickler()
    yield server
    server.stop()


@pytest.mark.parametrize(("path", "scheme"), [("/head", "http"), ("/body", "http"), ("/silent", "https")])
def test_a_try_ends_within_its_timeout_however_slowly_the_webhook_answers(
        trickler: Trickler, path: str, scheme: str) -> None:
    hook = Webhook(trickler.url(path, scheme), timeout_seconds=0.5, attempts=1)
    start = time.monotonic()
    with pytest.raises(OSError):  # socket.timeout / TimeoutError: a retryable failure
        hook.post(alert().to_json())
    took = time.monotonic() - start
    assert took < 0.5 + SLACK, f"a 0.5 s try took {took:.1f} s"


def test_a_trickling_webhook_does_not_hold_the_alerts_behind_it(trickler: Trickler) -> None:
    sink = AlertSink(webhook=Webhook(trickler.url("/head"), timeout_seconds=0.3, attempts=2, backoff_seconds=0.01))
    start = time.monotonic()
    for i in range(3):
        sink.emit(alert(i))
    assert sink.flush(3 * 2 * (0.3 + SLACK)), "every try gave up at its deadline"
    assert (sink.delivered, sink.failed) == (0, 3)
    assert time.monotonic() - start < 3 * 2 * (0.3 + SLACK)
    sink.close()
