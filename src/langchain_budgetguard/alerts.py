"""Delivering budget alerts: a threshold crossed, a call refused, a call degraded.

The stores decide *whether* an alert fires (a threshold crossing fires once across every
process); this module only delivers it. ``AlertSink.emit`` never blocks the caller: alerts are
queued to one daemon worker thread that calls ``on_alert`` (a sync or async function) and POSTs
``Alert.to_json()`` to a webhook (stdlib urllib, retried with exponential backoff on connection
errors, timeouts and 5xx answers; a 4xx answer is final). A failing callable or webhook is logged
(logger ``langchain_budgetguard.alerts``) and counted in ``sink.failed``, never raised.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import io
import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from http.client import HTTPConnection, HTTPException, HTTPResponse, HTTPSConnection
from types import MappingProxyType
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .limits import UNITS, check_seconds
from .money import format_usd, show_value

__all__ = ["Alert", "Webhook", "WebhookRedirectError", "AlertSink", "webhook_of", "KINDS", "MAX_QUEUE",
           "MAX_WEBHOOK_TIMEOUT"]

logger = logging.getLogger("langchain_budgetguard.alerts")

KINDS = ("threshold", "refusal", "degrade")
MAX_QUEUE = 10_000
"""Alerts waiting for the worker; more are dropped (with a warning, counted in ``sink.dropped``)."""
MAX_WEBHOOK_TIMEOUT = 60.0
MAX_ATTEMPTS = 10
MAX_DECISION_KEYS = 100_000  # (kind, scope, id) entries remembered for the decision rate limit
EXIT_FLUSH_SECONDS = 5.0  # what interpreter exit waits, at most, for every sink's queue


def _aware(value: Any, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"Alert.{what}: expected an aware datetime (with a time zone), got {show_value(value)}")
    return value


def _amount(value: Any, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or not Decimal(value).is_finite():
        raise ValueError(f"Alert.{what}: expected a Decimal amount in the limit's unit, got {show_value(value)}")
    return Decimal(value)


@dataclass(frozen=True, kw_only=True)
class Alert:
    """One alert. ``limit`` and ``spent`` are in ``unit`` (dollars, tokens or requests);
    ``threshold`` is the fraction of the limit that was reached (threshold alerts only).
    ``shadow``: decided in shadow mode (the call was served; enforce mode would have refused or
    degraded it). ``message`` is one human sentence; left empty, one is written from the fields."""

    kind: str
    budget: str
    scope: str
    scope_id: str | None
    window: str
    window_label: str
    unit: str
    limit: Decimal
    spent: Decimal
    at: datetime
    threshold: Decimal | None = None
    resets_at: datetime | None = None
    model: str | None = None
    shadow: bool = False
    message: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Alert.kind: expected one of {', '.join(KINDS)}, got {show_value(self.kind)}")
        if self.unit not in UNITS:
            raise ValueError(f"Alert.unit: expected one of {', '.join(UNITS)}, got {show_value(self.unit)}")
        object.__setattr__(self, "limit", _amount(self.limit, "limit"))
        object.__setattr__(self, "spent", _amount(self.spent, "spent"))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", _amount(self.threshold, "threshold"))
        elif self.kind == "threshold":
            raise ValueError("Alert.threshold: a threshold alert needs the fraction it reached, such as Decimal('0.8')")
        _aware(self.at, "at")
        if self.resets_at is not None:
            _aware(self.resets_at, "resets_at")
        if not self.message:
            object.__setattr__(self, "message", self._sentence())

    def _show(self, amount: Decimal) -> str:
        return format_usd(amount) if self.unit == "usd" else f"{amount:,} {self.unit}"

    def _sentence(self) -> str:
        who = "all calls" if self.scope_id is None else f"{self.scope} {self.scope_id}"
        of = f"{self._show(self.spent)} of {self._show(self.limit)} per {self.window} ({self.window_label})"
        tail = "" if self.resets_at is None else f"; resets at {self.resets_at.isoformat()}"
        model = f" on {self.model}" if self.model else ""
        if self.kind == "threshold":
            percent = f"{format(((self.threshold or 0) * 100).normalize(), 'f')}%"
            return f"Budget {self.budget!r}: {who} reached {percent} of its limit, {of}{tail}."
        verb = {"refusal": "refused", "degrade": "degraded"}[self.kind]
        if self.shadow:
            verb = f"would have {verb} (shadow mode: served)"
        return f"Budget {self.budget!r} {verb} a call{model} for {who}: {of}{tail}."

    def to_json(self) -> dict[str, Any]:
        """The alert as JSON values (Decimals as strings, datetimes ISO 8601): the webhook's body."""
        return {
            "kind": self.kind,
            "budget": self.budget,
            "scope": self.scope,
            "scope_id": self.scope_id,
            "window": self.window,
            "window_label": self.window_label,
            "unit": self.unit,
            "limit": str(self.limit),
            "spent": str(self.spent),
            "threshold": None if self.threshold is None else str(self.threshold),
            "resets_at": None if self.resets_at is None else self.resets_at.isoformat(),
            "at": self.at.isoformat(),
            "model": self.model,
            "shadow": self.shadow,
            "message": self.message,
        }


@dataclass(frozen=True, repr=False)
class Webhook:
    """Where alerts are POSTed as JSON: an http(s) ``url`` (redirects are not followed), each try
    bounded end to end (connect, send, the whole answer) by ``timeout_seconds``,
    ``attempts`` tries in all (exponential backoff from ``backoff_seconds``), ``headers`` sent with
    each (``{"Authorization": "Bearer ..."}``). ``repr`` shows neither the URL's path nor header values."""

    url: str
    timeout_seconds: float = 5.0
    attempts: int = 3
    headers: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)
    backoff_seconds: float = 0.5

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"Webhook.url: expected an http:// or https:// URL such as 'https://hooks.example.com/budget', "
                f"got {show_value(self.url)}"
            )
        object.__setattr__(self, "timeout_seconds", check_seconds(
            self.timeout_seconds, "Webhook.timeout_seconds", minimum=0.01, maximum=MAX_WEBHOOK_TIMEOUT))
        object.__setattr__(self, "backoff_seconds", check_seconds(
            self.backoff_seconds, "Webhook.backoff_seconds", maximum=MAX_WEBHOOK_TIMEOUT))
        attempts = self.attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= MAX_ATTEMPTS:
            raise ValueError(f"Webhook.attempts: expected a whole number from 1 to {MAX_ATTEMPTS}, "
                             f"got {show_value(self.attempts)}")
        if not isinstance(self.headers, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.headers.items()):
            raise TypeError("Webhook.headers: expected a mapping of header names to string values, "
                            "such as {'Authorization': 'Bearer ...'}")
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))

    def __repr__(self) -> str:  # the URL's path and query may hold a secret (Slack's do)
        return (f"Webhook({self.where + '/...'!r}, timeout_seconds={self.timeout_seconds!r}, "
                f"attempts={self.attempts!r}, headers=[{', '.join(map(repr, self.headers))}])")

    @property
    def where(self) -> str:
        """The URL without its path, query or credentials: what logs show."""
        parts = urllib.parse.urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"

    def post(self, body: Mapping[str, Any]) -> None:
        """POST ``body`` as JSON, retrying as the class says; raises the last error if every try fails.

        Each try ends within ``timeout_seconds`` from connecting to the last byte of the answer read,
        however slowly the webhook answers. A redirect (3xx) is not followed: it fails at once
        (``WebhookRedirectError``), so the body and headers only ever go to ``url``."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": "langchain-budgetguard", **self.headers}

        tries = 0

        def once() -> None:
            nonlocal tries
            tries += 1
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=self.timeout_seconds) as response:
                    response.read()
            except urllib.error.HTTPError as exc:
                exc.close()
                if 300 <= exc.code < 400:
                    raise WebhookRedirectError(self.url, exc.code, exc.headers.get("Location")) from None
                raise

        retrying = Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=self.backoff_seconds, max=max(self.backoff_seconds * 8, 0.0)),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        try:
            retrying(once)
        except Exception as exc:
            exc.webhook_attempts = tries  # type: ignore[attr-defined] (what the sink's log says)
            raise


class WebhookRedirectError(Exception):
    """The webhook answered a redirect, which is not followed (it would resend the alert, and its
    secret headers, somewhere else): configure the final URL. The message shows the redirect's
    target without its path or query (they may hold a secret)."""

    def __init__(self, url: str, status: int, location: str | None) -> None:
        self.status = status
        target = "an unnamed location"
        if location:
            parts = urllib.parse.urlsplit(urllib.parse.urljoin(url, location))
            try:
                port = f":{parts.port}" if parts.port else ""
            except ValueError:
                port = ""
            target = f"{parts.scheme}://{parts.hostname}{port}{'/...' if parts.path.strip('/') or parts.query else ''}"
        super().__init__(f"the webhook answered {status}, a redirect to {target}; redirects are not followed "
                         f"(they would send the alert and its headers elsewhere): configure the final URL")


class _DeadlineReader(io.RawIOBase):
    """Reads a socket, each read given what is left of the attempt's deadline (so a peer that
    trickles its answer a byte at a time still runs out of time)."""

    def __init__(self, sock: socket.socket, left: Callable[[], float], sock_file: Any) -> None:
        self._sock = sock
        self._left = left
        self._sock_file = sock_file  # holds the socket open (as http.client's file does) until closed

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._sock_file.close()
        super().close()

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(self._left())
        return self._sock.recv_into(buffer)


class _DeadlineResponse(HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, left: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_DeadlineReader(sock, left, self.fp))


class _Deadline:
    """What every connection step of one try may still take: ``timeout`` from the try's start."""

    timeout: Any
    sock: Any

    def _start_deadline(self) -> None:
        self._deadline = time.monotonic() + self.timeout
        self.response_class = functools.partial(_DeadlineResponse, left=self._left)

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the webhook did not answer within timeout_seconds")
        return left

    def _deadline_connection(self, address: Any, timeout: Any, source_address: Any = None) -> socket.socket:
        """``socket.create_connection``, each address given what is left (not the whole timeout)."""
        host, port = address
        error: OSError = OSError(f"no address found for {host}")
        for family, kind, proto, _, where in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self._left())
                if source_address:
                    sock.bind(source_address)
                sock.connect(where)
                sock.settimeout(self._left())  # what is left for the TLS handshake (one deadline in ssl)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error

    def send(self, data: Any) -> None:
        if self.sock is not None:
            self.sock.settimeout(self._left())
        super().send(data)  # type: ignore[misc]


class _DeadlineHTTPConnection(_Deadline, HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_deadline()
        self._create_connection = self._deadline_connection


class _DeadlineHTTPSConnection(_Deadline, HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_deadline()
        self._create_connection = self._deadline_connection


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_DeadlineHTTPConnection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_DeadlineHTTPSConnection, req)


def _opener() -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment as before) without a redirect handler: a 3xx
    answer raises ``HTTPError``; each connection's try is bounded as a whole by its timeout."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _DeadlineHTTPHandler(),
                    _DeadlineHTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


_OPENER = _opener()


def _retryable(exc: BaseException) -> bool:
    """Connection errors, timeouts and 5xx answers are worth another try; 4xx answers and redirects
    (the same URL would answer the same) are not."""
    if isinstance(exc, WebhookRedirectError):
        return False
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500
    return isinstance(exc, (urllib.error.URLError, OSError, HTTPException))


def webhook_of(value: Any) -> Webhook | None:
    """``None`` -> None, a URL string -> ``Webhook(url)``, a ``Webhook`` as is; else ``TypeError``."""
    if value is None or isinstance(value, Webhook):
        return value
    if isinstance(value, str):
        return Webhook(value)
    raise TypeError(f"alert_webhook: expected an http(s) URL or a Webhook(...), got {type(value).__name__}")


_SINKS: weakref.WeakSet[AlertSink] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    deadline = time.monotonic() + EXIT_FLUSH_SECONDS
    for sink in list(_SINKS):
        sink.flush(max(0.0, deadline - time.monotonic()))


class AlertSink:
    """Delivers alerts off the caller's thread (see the module docstring). Thread-safe.

    ``decision_seconds``: refusal and degrade alerts (``decision``) fire at most once per
    (kind, scope, scope id) per that many seconds in this process; None turns them off.
    """

    def __init__(self, on_alert: Callable[[Alert], Any] | None = None, webhook: Webhook | str | None = None, *,
                 decision_seconds: float | None = 60.0, max_queue: int = MAX_QUEUE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if on_alert is not None and not callable(on_alert):
            raise TypeError("on_alert: expected a function (sync or async) taking an Alert, "
                            f"got {type(on_alert).__name__}")
        self.on_alert = on_alert
        self.webhook = webhook_of(webhook)
        if decision_seconds is not None:
            decision_seconds = check_seconds(decision_seconds, "decision_seconds", maximum=86_400.0)
        self.decision_seconds = decision_seconds
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or not 0 < max_queue <= 1_000_000:
            raise ValueError(f"max_queue: expected a whole number from 1 to 1000000, got {show_value(max_queue)}")
        self._clock = clock
        self._queue: queue.Queue[Alert | None] = queue.Queue(max_queue)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # queued or being delivered
        self._last: dict[tuple[str, str, str | None], float] = {}
        self._worker: threading.Thread | None = None
        self._closed = False
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    def __repr__(self) -> str:
        return (f"AlertSink(on_alert={self.on_alert!r}, webhook={self.webhook!r}, "
                f"decision_seconds={self.decision_seconds!r})")

    @property
    def active(self) -> bool:
        """True when alerts go somewhere (a callable or a webhook)."""
        return self.on_alert is not None or self.webhook is not None

    def emit(self, alert: Alert) -> None:
        """Queue ``alert`` for delivery and return at once."""
        if not isinstance(alert, Alert):
            raise TypeError(f"emit: expected an Alert, got {type(alert).__name__}")
        if not self.active:
            return
        with self._lock:
            if self._closed:
                self.dropped += 1
                logger.warning("alert dropped: the sink is closed (%s)", alert.message)
                return
            self._start()
            try:
                self._queue.put_nowait(alert)
            except queue.Full:
                self.dropped += 1
                logger.warning("alert dropped: %d alerts are already waiting for delivery (%s)",
                               self._queue.maxsize, alert.message)
                return
            self._pending += 1

    def decision(self, alert: Alert) -> bool:
        """Emit a refusal or degrade alert unless one of the same (kind, scope, scope id) was emitted
        less than ``decision_seconds`` ago; True when it was emitted."""
        if alert.kind == "threshold":
            raise ValueError("decision: expected a refusal or degrade alert; emit threshold alerts with emit()")
        if self.decision_seconds is None or not self.active:
            return False
        key = (alert.kind, alert.scope, alert.scope_id)
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.decision_seconds:
                return False
            if len(self._last) >= MAX_DECISION_KEYS:
                self._last = {k: t for k, t in self._last.items() if now - t < self.decision_seconds}
                if len(self._last) >= MAX_DECISION_KEYS:
                    self._last.clear()
            self._last[key] = now
        self.emit(alert)
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued alert was delivered (or failed); False if ``timeout`` passed first."""
        deadline = time.monotonic() + check_seconds(timeout, "flush timeout", maximum=86_400.0)
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush (at most ``timeout``), then stop the worker; later alerts are dropped. True if drained."""
        drained = self.flush(timeout)
        with self._lock:
            self._closed = True
            worker = self._worker
        if worker is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass  # not drained: the daemon worker ends with the process
            if drained:
                worker.join(timeout)
        return drained

    # -- the worker ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="budgetguard-alerts", daemon=True)
            self._worker.start()
            _SINKS.add(self)

    def _run(self) -> None:
        loop: asyncio.AbstractEventLoop | None = None
        try:
            while True:
                alert = self._queue.get()
                if alert is None:
                    return
                ok = True
                if self.on_alert is not None:
                    try:
                        result = self.on_alert(alert)
                        if inspect.isawaitable(result):
                            if loop is None:
                                loop = asyncio.new_event_loop()
                            loop.run_until_complete(result)
                    except Exception:
                        ok = False
                        logger.exception("on_alert raised on %s alert (%s)", alert.kind, alert.message)
                if self.webhook is not None:
                    try:
                        self.webhook.post(alert.to_json())
                    except Exception as exc:
                        ok = False
                        tries = getattr(exc, "webhook_attempts", self.webhook.attempts)
                        logger.warning("alert webhook %s failed after %d attempt%s: %s (%s)", self.webhook.where,
                                       tries, "" if tries == 1 else "s", exc, alert.message)
                with self._idle:
                    if ok:
                        self.delivered += 1
                    else:
                        self.failed += 1
                    self._pending -= 1
                    self._idle.notify_all()
        finally:
            if loop is not None:
                loop.close()
