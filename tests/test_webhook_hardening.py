"""The alert webhook against hostile or misconfigured endpoints (local servers on 127.0.0.1):
a redirect is never followed (neither the alert nor its secret headers go anywhere but the
configured URL)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from langchain_budgetguard.alerts import Alert, AlertSink, Webhook

SECRET = "Bearer hook-secret"


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
