"""The dashboard's HTTP server: read-only, standard library only (``http.server``).

Routes (GET and HEAD; anything else is 405):

    /                 limits in force            /api/limits
    /scope/<scope>    ids by % of limit used     /api/scope/<scope>   ?window= &q= &sort= &order= &page= &per_page=
    /id/<scope>?id=   one id's counters          /api/id/<scope>?id=  (&tenant= when tenants are scoped)
    /events           refusals, degrades, alerts /api/events
    /static/...       the CSS and JS shipped with the package

With a token, every request needs ``Authorization: Bearer <token>``; a browser may open
``/?token=<token>`` once, which sets an HttpOnly cookie and redirects to the same page without it.
Binding anything but a loopback address without a token is refused (``check_bind``); without a
token, a request whose ``Host`` header names anything but a loopback address (127.0.0.1, localhost,
[::1], any port) is answered 421, so a web page that rebinds its own domain to 127.0.0.1 (DNS
rebinding) cannot read the figures.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from ..errors import BudgetStoreUnavailableError
from . import pages
from .data import DashboardData, limit_json

__all__ = ["DashboardServer", "InsecureBindError", "check_bind", "is_loopback", "make_server", "TOKEN_ENV"]

log = logging.getLogger(__name__)

TOKEN_ENV = "BUDGETGUARD_DASHBOARD_TOKEN"
_COOKIE = "budgetguard_token"
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")
_STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self'; "
                               "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class InsecureBindError(ValueError):
    """A non-loopback address without a token: the budget's figures would be open to the network."""


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback ``host`` without a token, and a token too short to be a secret."""
    if token is not None and not _TOKEN.fullmatch(token):
        raise InsecureBindError("the dashboard token must be 16 or more characters of A-Z a-z 0-9 . _ ~ + / = - "
                                "(make one: python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    if not token and not is_loopback(host):
        raise InsecureBindError(
            f"refusing to serve the dashboard on {host} without a token: anyone who can reach it would see "
            f"every id's spend. Pass --token TOKEN (or set {TOKEN_ENV}), or bind 127.0.0.1.")


@lru_cache(maxsize=None)
def _static(name: str) -> bytes:
    return files(__package__).joinpath("static", name).read_bytes()


class _Reply(Exception):
    """Stop handling and answer ``status`` with ``message`` (as HTML or JSON, as the route asks)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _host_name(header: str) -> str:
    """The host part of a ``Host`` header, lower case, without the port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    name, _, port = header.rpartition(":")
    return name if name and (port.isdigit() or not port) else header


def _message(exc: Exception) -> str:
    """An exception's message; a KeyError's without the quotes its ``str`` adds."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def _one(query: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = query.get(name)
    return values[-1] if values else default


def _int(query: dict[str, list[str]], name: str, default: int) -> int:
    text = _one(query, name)
    if text in (None, ""):
        return default
    try:
        return int(text)
    except ValueError:
        raise _Reply(HTTPStatus.BAD_REQUEST, f"{name}: expected a whole number, got {text!r}") from None


REQUEST_TIMEOUT = 15.0  # seconds to send the request, and to take each write of the reply (sendall's total)
MAX_CONNECTIONS = 64  # connections served at once; more are answered 503 and closed
_BUSY_BODY = b"503: the dashboard is serving too many connections; try again shortly\n"
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 5\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class DashboardServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` serving one budget's ``DashboardData``: one thread per connection,
    at most ``max_connections`` at once. A client has ``request_timeout`` seconds to send its
    request (one that sends a byte at a time is dropped then, its socket shut by one watcher
    thread) and as long to take each write of the reply (the socket's timeout bounds a sendall)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], data: DashboardData, token: str | None = None, *,
                 request_timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        check_bind(address[0], token)
        if not request_timeout > 0:
            raise ValueError(f"request_timeout: expected seconds above 0, got {request_timeout!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections: expected 1 or more, got {max_connections!r}")
        self.data, self.token = data, token or None
        self.request_timeout, self.max_connections = float(request_timeout), max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._warned = -1e9
        self._deadlines: dict[Any, float] = {}  # connection -> when it is shut unless its request is in
        self._watching = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            now = time.monotonic()
            if now - self._warned > 60:  # once a minute: a flood of connections must not flood the log
                self._warned = now
                log.warning("dashboard: %d connections open (the most served at once); refusing more with 503",
                            self.max_connections)
            try:
                request.setblocking(False)  # never stall the accept loop on a client that does not read
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.watch(request)  # until the request's headers are in (_Handler.parse_request)
            super().process_request_thread(request, client_address)
        finally:
            self.unwatch(request)
            self._slots.release()

    def watch(self, connection: Any) -> None:
        """Shut ``connection`` unless ``unwatch`` comes within ``request_timeout`` seconds."""
        with self._watching:
            self._deadlines[connection] = time.monotonic() + self.request_timeout
            if self._watcher is None and not self._closed.is_set():
                self._watcher = threading.Thread(target=self._watch_loop, name="budgetguard-dashboard-deadlines",
                                                 daemon=True)
                self._watcher.start()

    def unwatch(self, connection: Any) -> None:
        with self._watching:
            self._deadlines.pop(connection, None)

    def _watch_loop(self) -> None:
        step = min(0.25, self.request_timeout / 4)
        while not self._closed.wait(step):
            now = time.monotonic()
            with self._watching:
                late = [c for c, deadline in self._deadlines.items() if deadline <= now]
                for connection in late:
                    del self._deadlines[connection]
            for connection in late:
                try:  # the handler's blocked recv or send returns, and its thread ends
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def serve_in_thread(self) -> threading.Thread:
        """Serve on a daemon thread (tests, notebooks); stop with ``shutdown()`` then ``server_close()``."""
        thread = threading.Thread(target=self.serve_forever, name="budgetguard-dashboard", daemon=True)
        thread.start()
        return thread


def make_server(data: DashboardData, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, *,
                request_timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> DashboardServer:
    """A server for ``data`` on ``host:port`` (port 0: a free one); raises ``InsecureBindError``."""
    return DashboardServer((host, port), data, token, request_timeout=request_timeout,
                           max_connections=max_connections)


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "budgetguard-dashboard"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # the socket's timeout (the base class's default: none)
        super().setup()

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        self.server.unwatch(self.connection)  # the request is in: working out the reply takes what it takes
        return parsed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)

    # -- plumbing -----------------------------------------------------------------------------

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: Any, headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", headers)

    def _html(self, status: HTTPStatus, title: str, body: str, here: str, api: str) -> None:
        data = self.server.data
        page = pages.layout(title=title, body=body, budget=data.name, store=data.store, scopes=data.scopes(),
                            here=here, api=api)
        self._send(status, page.encode("utf-8"), "text/html; charset=utf-8")

    def _authorized(self, query: dict[str, list[str]]) -> bool | str:
        """True, False, or the URL to redirect to after setting the cookie from ``?token=``."""
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is no credential
            cookie = SimpleCookie()
        if _COOKIE in cookie and hmac.compare_digest(cookie[_COOKIE].value.encode(), token.encode()):
            return True
        offered = _one(query, "token")
        if offered is not None and hmac.compare_digest(offered.encode(), token.encode()):
            rest = {k: v for k, v in query.items() if k != "token"}
            path = urlsplit(self.path).path
            return path + ("?" + urlencode(rest, doseq=True) if rest else "")
        return False

    # -- requests -----------------------------------------------------------------------------

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def _host_allowed(self) -> bool:
        """With a token, any ``Host``; without one, only names of the loopback address bound (a browser
        always sends ``Host``: a request without one comes from no web page)."""
        header = self.headers.get("Host")
        if self.server.token is not None or header is None:
            return True
        name = _host_name(header).rstrip(".")
        return name in _LOOPBACK_NAMES or name == str(self.server.server_address[0]).lower()

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        api = path.startswith("/api/")
        if not self._host_allowed():
            message = (f"421: this dashboard answers only to its loopback address (127.0.0.1, localhost, [::1]), "
                       f"not Host {self.headers.get('Host')!r}; open {self.server.url}/, or serve it with a token "
                       "to reach it under another name\n")
            self._send(HTTPStatus.MISDIRECTED_REQUEST, message.encode("utf-8", "replace"),
                       "text/plain; charset=utf-8")
            return
        auth = self._authorized(query)
        if auth is False:
            headers = {"WWW-Authenticate": 'Bearer realm="budgetguard"'}
            if api:
                self._json(HTTPStatus.UNAUTHORIZED, {"error": "a bearer token is required"}, headers)
            else:
                self._send(HTTPStatus.UNAUTHORIZED, b"401: a bearer token is required "
                           b"(Authorization: Bearer TOKEN, or open /?token=TOKEN once)\n",
                           "text/plain; charset=utf-8", headers)
            return
        if isinstance(auth, str):
            cookie = f"{_COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
            self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": auth, "Set-Cookie": cookie})
            return
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            if name not in _STATIC:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
            else:
                self._send(HTTPStatus.OK, _static(name), _STATIC[name], {"Cache-Control": "max-age=300"})
            return
        route = path[len("/api"):] if api else path
        try:
            title, body_fn, data_fn, here = self._route(route, query)
            payload = data_fn()
        except _Reply as reply:
            return self._fail(api, reply.status, reply.message, route)
        except (LookupError, ValueError) as exc:
            return self._fail(api, HTTPStatus.NOT_FOUND if isinstance(exc, LookupError) else HTTPStatus.BAD_REQUEST,
                              _message(exc), route)
        except BudgetStoreUnavailableError as exc:
            return self._fail(api, HTTPStatus.SERVICE_UNAVAILABLE, f"the budget store could not be reached: {exc}",
                              route)
        except Exception as exc:  # noqa: BLE001 - answered (and logged), never a dropped connection
            log.exception("dashboard: %s failed", route)
            return self._fail(api, HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}", route)
        if api:
            self._json(HTTPStatus.OK, {"budget": self.server.data.name, **payload[0]})
        else:
            self._html(HTTPStatus.OK, title, body_fn(payload[1]), here, "/api" + (route if route != "/" else "/limits")
                       + ("?" + parts.query if parts.query else ""))

    def do_POST(self) -> None:  # noqa: N802
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"the dashboard is read-only\n", "text/plain; charset=utf-8",
                   {"Allow": "GET, HEAD"})

    do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815

    def _fail(self, api: bool, status: HTTPStatus, message: str, route: str) -> None:
        if api:
            self._json(status, {"error": message, "status": int(status)})
        else:
            self._html(status, f"{int(status)} {status.phrase}", pages.error_html(message), route, "/api" + route)

    def _route(self, route: str, query: dict[str, list[str]]) -> tuple[str, Callable[[Any], str],
                                                                       Callable[[], tuple[dict, Any]], str]:
        data = self.server.data
        if route in ("/", "/limits"):
            def limits() -> tuple[dict, Any]:
                rows = data.limit_rows()
                return {"limits": [limit_json(r) for r in rows]}, rows

            return "Limits in force", lambda rows: pages.limits_html(rows, data.source), limits, "/"
        if route.startswith("/scope/"):
            scope = unquote(route[len("/scope/"):])
            order = _one(query, "order", "desc")
            if order not in ("asc", "desc"):
                raise _Reply(HTTPStatus.BAD_REQUEST, f"order: expected asc or desc, got {order!r}")

            def scope_page() -> tuple[dict, Any]:
                page = data.scope_page(scope, window=_one(query, "window") or None, at=_one(query, "at") or None,
                                       search=_one(query, "q", "") or "", sort=_one(query, "sort", "used") or "used",
                                       descending=order == "desc", page=_int(query, "page", 1),
                                       per_page=_int(query, "per_page", 50))
                return page.as_json(), page

            return f"Per {scope}", pages.scope_html, scope_page, pages.scope_url(scope)
        if route.startswith("/id/"):
            scope = unquote(route[len("/id/"):])
            scope_id = _one(query, "id")
            if not scope_id:
                raise _Reply(HTTPStatus.BAD_REQUEST, f"say which {scope}: /id/{scope}?id=ID")

            def id_page() -> tuple[dict, Any]:
                page = data.id_page(scope, scope_id, tenant=_one(query, "tenant") or None)
                return page.as_json(), page

            return f"{scope} {scope_id}", pages.id_html, id_page, ""
        if route == "/events":
            def events() -> tuple[dict, Any]:
                page = data.events_page()
                return page.as_json(), page

            return "Recent refusals, degrades and alerts", pages.events_html, events, "/events"
        raise _Reply(HTTPStatus.NOT_FOUND, f"no page at {route}")
