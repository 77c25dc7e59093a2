"""Alert delivery: the webhook (a local HTTP server of the test's own), callables, retries,
timeouts that never block the caller, and the decision-alert rate limit."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from langchain_budgetguard.alerts import Alert, AlertSink, Webhook, webhook_of

AT = datetime(2026, 11, 22, 9, 5, 30, tzinfo=timezone.utc)


def alert(**changes: Any) -> Alert:
    fields: dict[str, Any] = dict(
        kind="threshold", budget="saas-prod", scope="user", scope_id="u-42", window="day",
        window_label="2026-11-22", unit="usd", limit=Decimal("5"), spent=Decimal("4.000000001"),
        threshold=Decimal("0.8"), resets_at=AT.replace(hour=0, minute=0, second=0) + timedelta(days=1), at=AT,
        model="gpt-4o",
    )
    fields.update(changes)
    return Alert(**fields)


class Server:
    """An HTTP server on 127.0.0.1 that answers POSTs with the scripted statuses (then 200)."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.statuses = list(statuses or [])
        self.delay = delay
        self.bodies: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.bodies.append(json.loads(body))
                owner.headers.append(dict(self.headers))
                if owner.delay:
                    owner.release.wait(owner.delay)
                status = owner.statuses.pop(0) if owner.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook?token=secret"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


def hook(url: str, **options: Any) -> Webhook:
    return Webhook(url, backoff_seconds=options.pop("backoff_seconds", 0.01), **options)


# -- Alert -------------------------------------------------------------------------------------


def test_to_json_exact_figures() -> None:
    body = alert().to_json()
    assert body == {
        "kind": "threshold", "budget": "saas-prod", "scope": "user", "scope_id": "u-42", "window": "day",
        "window_label": "2026-11-22", "unit": "usd", "limit": "5", "spent": "4.000000001", "threshold": "0.8",
        "resets_at": "2026-11-23T00:00:00+00:00", "at": "2026-11-22T09:05:30+00:00", "model": "gpt-4o",
        "shadow": False, "message": body["message"],
    }
    assert json.loads(json.dumps(body)) == body
    assert body["message"] == ("Budget 'saas-prod': user u-42 reached 80% of its limit, $4.000000001 of $5 per day "
                               "(2026-11-22); resets at 2026-11-23T00:00:00+00:00.")


def test_messages_speak_the_unit_and_shadow_mode() -> None:
    tokens = alert(kind="refusal", unit="tokens", limit=Decimal(50000), spent=Decimal(49000), threshold=None,
                   scope="global", scope_id=None, resets_at=None, shadow=True)
    assert tokens.message == ("Budget 'saas-prod' would have refused (shadow mode: served) a call on gpt-4o for "
                              "all calls: 49,000 tokens of 50,000 tokens per day (2026-11-22).")
    assert tokens.to_json()["scope_id"] is None and tokens.to_json()["threshold"] is None
    assert alert(message="custom").message == "custom"
    assert "reached 100% of its limit" in alert(threshold=Decimal(1)).message


@pytest.mark.parametrize(("changes", "error"), [
    ({"kind": "warning"}, "Alert.kind: expected one of threshold, refusal, degrade"),
    ({"unit": "eur"}, "Alert.unit: expected one of usd, tokens, requests"),
    ({"limit": 5.0}, "Alert.limit: expected a Decimal amount"),
    ({"threshold": None}, "Alert.threshold: a threshold alert needs"),
    ({"at": datetime(2026, 1, 1)}, "Alert.at: expected an aware datetime"),
])
def test_alert_checks_its_fields(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        alert(**changes)


# -- Webhook -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"url": "ftp://example.com/x"}, "Webhook.url: expected an http:// or https:// URL"),
    ({"url": "https://"}, "Webhook.url: expected an http:// or https:// URL"),
    ({"url": "https://h", "timeout_seconds": 0}, "Webhook.timeout_seconds: expected a number of seconds from 0.01"),
    ({"url": "https://h", "timeout_seconds": 3600}, "Webhook.timeout_seconds"),
    ({"url": "https://h", "attempts": 0}, "Webhook.attempts: expected a whole number from 1 to 10, got 0"),
    ({"url": "https://h", "attempts": 11}, "Webhook.attempts"),
])
def test_webhook_checks_its_fields(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Webhook(**kwargs)


def test_webhook_of_and_secret_headers() -> None:
    assert webhook_of(None) is None
    assert webhook_of("https://h.example/x") == Webhook("https://h.example/x")
    w = Webhook("https://user:pw@h.example:8443/x?k=1", headers={"Authorization": "Bearer s3cret"})
    assert webhook_of(w) is w
    assert w.where == "https://h.example:8443"
    assert repr(w) == ("Webhook('https://h.example:8443/...', timeout_seconds=5.0, attempts=3, "
                       "headers=['Authorization'])")
    with pytest.raises(TypeError, match="alert_webhook: expected an http"):
        webhook_of(5)
    with pytest.raises(TypeError, match="Webhook.headers"):
        Webhook("https://h", headers={"X": 1})  # type: ignore[dict-item]


# -- delivery ----------------------------------------------------------------------------------


def test_webhook_receives_the_alert_json(server: Server) -> None:
    sink = AlertSink(webhook=hook(server.url, headers={"Authorization": "Bearer t"}))
    a = alert()
    sink.emit(a)
    assert sink.flush(5)
    assert server.bodies == [a.to_json()]
    body = server.bodies[0]
    assert Decimal(body["spent"]) == a.spent and Decimal(body["limit"]) == a.limit
    assert datetime.fromisoformat(body["at"]) == a.at and datetime.fromisoformat(body["resets_at"]) == a.resets_at
    assert server.headers[0]["Authorization"] == "Bearer t"
    assert server.headers[0]["Content-Type"] == "application/json"
    assert (sink.delivered, sink.failed) == (1, 0)
    sink.close()


def test_5xx_is_retried_until_it_succeeds() -> None:
    s = Server([500, 503])
    try:
        sink = AlertSink(webhook=hook(s.url, attempts=3))
        sink.emit(alert())
        assert sink.flush(5)
        assert len(s.bodies) == 3
        assert (sink.delivered, sink.failed) == (1, 0)
    finally:
        s.stop()


def test_5xx_every_time_fails_after_the_attempts(caplog: pytest.LogCaptureFixture) -> None:
    s = Server([500] * 5)
    try:
        sink = AlertSink(webhook=hook(s.url, attempts=2))
        with caplog.at_level(logging.WARNING, logger="langchain_budgetguard.alerts"):
            sink.emit(alert())
            assert sink.flush(5)
        assert len(s.bodies) == 2 and sink.failed == 1
        assert "failed after 2 attempts" in caplog.text
        assert "secret" not in caplog.text  # the URL's query (a token) is not logged
    finally:
        s.stop()


def test_4xx_is_not_retried() -> None:
    s = Server([400, 400])
    try:
        sink = AlertSink(webhook=hook(s.url, attempts=3))
        sink.emit(alert())
        assert sink.flush(5)
        assert len(s.bodies) == 1 and sink.failed == 1
    finally:
        s.stop()


def test_a_connection_refused_is_retried_and_counted() -> None:
    s = Server()
    url = s.url
    s.stop()  # nothing listens there now
    sink = AlertSink(webhook=hook(url, attempts=2, timeout_seconds=1))
    sink.emit(alert())
    assert sink.flush(5)
    assert sink.failed == 1


def test_a_webhook_that_never_answers_never_blocks_the_caller() -> None:
    s = Server(delay=30)
    try:
        sink = AlertSink(webhook=hook(s.url, attempts=1, timeout_seconds=0.3))
        started = time.perf_counter()
        sink.emit(alert())
        first = time.perf_counter() - started
        assert first < 0.010
        started = time.perf_counter()
        for i in range(50):
            sink.emit(alert(scope_id=f"u-{i}"))
        assert time.perf_counter() - started < 0.050
        started = time.perf_counter()
        assert sink.flush(0.2) is False  # 51 alerts at 0.3 s each: not drained in 0.2 s
        assert 0.15 < time.perf_counter() - started < 1.0
        assert sink.delivered == 0
    finally:
        s.stop()
    assert sink.flush(5)  # the server gone, the rest fail fast (connection refused)
    assert sink.delivered + sink.failed == 51


def test_a_full_queue_drops_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()
    sink = AlertSink(lambda a: gate.wait(5), max_queue=2)
    with caplog.at_level(logging.WARNING, logger="langchain_budgetguard.alerts"):
        for i in range(5):
            sink.emit(alert(scope_id=f"u-{i}"))
            time.sleep(0.02)  # the worker takes the first one off the queue, then waits on the gate
    assert sink.dropped == 2 and "alert dropped" in caplog.text
    gate.set()
    assert sink.flush(5) and sink.delivered == 3


def test_sync_and_async_callables_receive_the_alert() -> None:
    got: list[tuple[str, Alert, str]] = []

    def sync(a: Alert) -> None:
        got.append(("sync", a, threading.current_thread().name))

    async def asynchronous(a: Alert) -> None:
        import asyncio

        await asyncio.sleep(0.01)
        got.append(("async", a, threading.current_thread().name))

    a = alert()
    for fn in (sync, asynchronous):
        sink = AlertSink(fn)
        sink.emit(a)
        assert sink.flush(5)
        assert sink.close()
    assert [(k, x) for k, x, _ in got] == [("sync", a), ("async", a)]
    assert all(name == "budgetguard-alerts" for _, _, name in got)


def test_a_raising_callable_is_logged_not_raised(caplog: pytest.LogCaptureFixture, server: Server) -> None:
    def broken(a: Alert) -> None:
        raise RuntimeError("pager down")

    sink = AlertSink(broken, hook(server.url))
    with caplog.at_level(logging.ERROR, logger="langchain_budgetguard.alerts"):
        sink.emit(alert())
        assert sink.flush(5)
    assert sink.failed == 1 and "pager down" in caplog.text
    assert len(server.bodies) == 1  # the webhook is still called
    sink.emit(alert())  # the worker survived
    assert sink.flush(5) and len(server.bodies) == 2


def test_close_stops_the_worker_and_later_alerts_are_dropped() -> None:
    got: list[Alert] = []
    sink = AlertSink(got.append)
    sink.emit(alert())
    assert sink.close()
    assert sink._worker is not None and not sink._worker.is_alive()  # test-only look at the worker
    sink.emit(alert())
    assert len(got) == 1 and sink.dropped == 1


def test_no_destination_means_no_worker() -> None:
    sink = AlertSink()
    sink.emit(alert())
    assert sink.flush(0) and sink._worker is None


# -- decision alerts ---------------------------------------------------------------------------


def test_decision_alerts_are_rate_limited_per_kind_scope_and_id() -> None:
    now = [1000.0]
    got: list[Alert] = []
    sink = AlertSink(got.append, decision_seconds=60, clock=lambda: now[0])
    refusal = alert(kind="refusal", threshold=None)
    assert sink.decision(refusal) is True
    now[0] += 30
    assert sink.decision(refusal) is False  # same id within the interval
    assert sink.decision(alert(kind="refusal", threshold=None, scope_id="u-7")) is True  # another id
    assert sink.decision(alert(kind="degrade", threshold=None)) is True  # another kind
    now[0] += 30
    assert sink.decision(refusal) is True  # the interval has passed
    assert sink.flush(5)
    assert [(a.kind, a.scope_id) for a in got] == [("refusal", "u-42"), ("refusal", "u-7"), ("degrade", "u-42"),
                                                   ("refusal", "u-42")]


def test_decision_alerts_off_and_threshold_alerts_refused() -> None:
    got: list[Alert] = []
    sink = AlertSink(got.append, decision_seconds=None)
    assert sink.decision(alert(kind="refusal", threshold=None)) is False
    with pytest.raises(ValueError, match="emit threshold alerts with emit"):
        AlertSink(got.append).decision(alert())
    assert sink.flush(1) and got == []
    with pytest.raises(ValueError, match="decision_seconds: expected a number of seconds"):
        AlertSink(got.append, decision_seconds=-1)


def test_emits_from_many_threads_are_each_delivered_once() -> None:
    got: list[str | None] = []
    sink = AlertSink(lambda a: got.append(a.scope_id))
    threads = [threading.Thread(target=lambda n=n: [sink.emit(alert(scope_id=f"{n}-{i}")) for i in range(200)])
               for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sink.flush(10)
    assert sorted(got) == sorted(f"{n}-{i}" for n in range(8) for i in range(200))
    assert sink.delivered == 1600 and sink.dropped == 0


def test_pending_alerts_are_delivered_at_interpreter_exit(tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "got.txt"
    script = f"""
import time
from datetime import datetime, timezone
from decimal import Decimal
from langchain_budgetguard.alerts import Alert, AlertSink

def slow(alert):
    time.sleep(0.2)
    with open({str(out)!r}, "a") as f:
        f.write(alert.scope_id + "\\n")

sink = AlertSink(slow)
for i in range(3):
    sink.emit(Alert(kind="refusal", budget="b", scope="user", scope_id=f"u{{i}}", window="day",
                    window_label="2026-11-22", unit="requests", limit=Decimal(1), spent=Decimal(1),
                    at=datetime.now(timezone.utc)))
"""  # the script ends at once: only the exit flush can deliver the alerts
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert out.read_text().split() == ["u0", "u1", "u2"]
