"""The dashboard's server under hostile requests: Host headers of a DNS-rebinding page, slow or
too many connections, absurd query parameters, and the text of its error messages."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from langchain_budgetguard.dashboard import DashboardData, make_server
from langchain_budgetguard.dashboard.server import REQUEST_TIMEOUT
from langchain_budgetguard.overrides import BudgetAdmin

from langchain_budgetguard.stores.memory import MemoryStore
from langchain_budgetguard.stores.redis import RedisStore

from .redis_support import fresh_prefix, redis_url  # noqa: F401 - fixture
from .test_dashboard import TOKEN, _spend, make_guard


def _serve(token: str | None = None, **kw: Any) -> Any:
    guard = make_guard()
    _spend(guard, {"secret-customer-42": 1})
    server = make_server(DashboardData(BudgetAdmin(guard.policy), cache_seconds=0), port=0, token=token, **kw)
    server.serve_in_thread()
    return server


@pytest.fixture(scope="module")
def tokenless() -> Iterator[Any]:
    server = _serve()
    yield server
    server.shutdown()
    server.server_close()


def _get(server: Any, path: str, host: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


# -- DNS rebinding: without a token, only loopback names in Host ---------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "localhost", "LocalHost:{port}", "localhost:9000",
                                  "[::1]", "[::1]:{port}", "localhost."])
def test_tokenless_answers_loopback_host_names(tokenless, host):
    code, body = _get(tokenless, "/api/scope/user", host.format(port=tokenless.server_address[1]))
    assert code == 200 and "secret-customer-42" in body


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "127.0.0.1.attacker.example",
                                  "localhost.attacker.example:{port}", "[::2]:{port}", "0.0.0.0:{port}", ""])
@pytest.mark.parametrize("path", ["/api/scope/user", "/scope/user", "/", "/api/limits", "/events"])
def test_tokenless_refuses_any_other_host_and_shows_no_figures(tokenless, host, path):
    code, body = _get(tokenless, path, host.format(port=tokenless.server_address[1]))
    assert code == 421, body
    assert "secret-customer-42" not in body and "loopback" in body


def test_with_a_token_any_host_still_gets_in_with_the_token():
    server = _serve(TOKEN)
    try:
        assert _get(server, "/api/scope/user", "dash.example.com")[0] == 401
        code, body = _get(server, "/api/scope/user", "dash.example.com", {"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and "secret-customer-42" in body
    finally:
        server.shutdown()
        server.server_close()


# -- slow and too many connections -------------------------------------------------------------


def _wait_closed(sock: socket.socket) -> bytes:
    """What the server sent before closing ``sock`` (the client waits up to 30 s)."""
    sock.settimeout(30)
    got = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def _served_again(server) -> None:
    """A request is answered 200 within 30 s: the connections that held the slots gave them back."""
    deadline = time.monotonic() + 30
    while True:
        code, body = _get(server, "/api/limits", headers={"Authorization": f"Bearer {TOKEN}"})
        if code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert code == 200, body


def test_a_half_sent_request_is_dropped_after_the_request_timeout():
    assert 0 < REQUEST_TIMEOUT <= 60
    server = _serve(TOKEN, request_timeout=0.5)
    try:
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)
        with sock:
            sock.sendall(b"GET /api/limits HTT")
            assert _wait_closed(sock) == b""  # closed by the server, long before the client's 30 s
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("trickle", [b"GET /api/limits HTTP/1.0\r\nX-Slow: " + b"a" * 400,
                                     b"GET /api/limits?" + b"b" * 400])
def test_a_client_trickling_its_request_is_dropped_and_its_slot_comes_back(trickle):
    """A byte every 0.2 s never let the 0.5 s socket timeout fire: the connection (one of the
    max_connections slots) was held for as long as the client went on."""
    server = _serve(TOKEN, request_timeout=0.5, max_connections=1)
    try:
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)
        started, dropped = time.monotonic(), None
        with sock:
            for byte in trickle:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    dropped = time.monotonic()
                    break
                sock.settimeout(0.2)
                try:
                    if sock.recv(4096) == b"":
                        dropped = time.monotonic()
                        break
                except socket.timeout:
                    pass
                except OSError:
                    dropped = time.monotonic()
                    break
        assert dropped is not None and dropped - started < 5, "the trickling client was never dropped"
        _served_again(server)  # its slot (the only one) serves the next client
    finally:
        server.shutdown()
        server.server_close()


def test_the_default_request_timeout_is_set(tokenless):
    assert tokenless.request_timeout == REQUEST_TIMEOUT


def test_connections_beyond_the_cap_are_answered_503_and_the_slots_come_back():
    server = _serve(TOKEN, max_connections=2)
    port = server.server_address[1]
    try:
        slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
        for sock in slow:
            sock.sendall(b"GET /api/limits HTT")
        # Accepted in order: both slots are taken before the third connection is accepted.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as third:
            reply = _wait_closed(third)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 503 ") and b"too many connections" in body
        assert f"Content-Length: {len(body)}".encode() in head
        for sock in slow:
            sock.close()
        _served_again(server)  # the handlers see the close and give their slots back
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kw", [{"request_timeout": 0}, {"request_timeout": -1}, {"max_connections": 0}])
def test_bad_limits_of_the_server_are_refused(kw):
    guard = make_guard()
    with pytest.raises(ValueError, match=next(iter(kw))):
        make_server(DashboardData(BudgetAdmin(guard.policy)), port=0, **kw)


# -- absurd page and n: the last page, every id; never the store's error -------------------------

HUGE = ["99999999999999999", "184467440737095516", str(10**40)]


@pytest.fixture(params=["memory", "redis"])
def spent_store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
        return
    with RedisStore(request.getfixturevalue("redis_url"), prefix=fresh_prefix()) as store:
        yield store


@pytest.mark.parametrize("page", HUGE)
def test_a_huge_page_is_the_last_page_not_a_store_outage(spent_store, page):
    guard = make_guard(spent_store)
    _spend(guard, {"alice": 1, "bob": 2})
    server = make_server(DashboardData(BudgetAdmin(guard.policy), cache_seconds=0), port=0)
    server.serve_in_thread()
    try:
        code, body = _get(server, f"/api/scope/user?page={page}")
        assert code == 200, body
        reply = json.loads(body)
        assert (reply["page"], reply["pages"]) == (1, 1)
        assert sorted(r["id"] for r in reply["rows"]) == ["alice", "bob"]
        code, body = _get(server, f"/scope/user?page={page}")
        assert code == 200 and "alice" in body
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("n", [5 * 10**18, 10**40])
def test_top_with_a_huge_n_is_every_id(spent_store, n):
    guard = make_guard(spent_store)
    _spend(guard, {"alice": 1, "bob": 2})
    rows = BudgetAdmin(guard.policy).top("user", n=n)
    assert [r.scope_id for r in rows] == ["bob", "alice"]



@pytest.mark.parametrize("n", [0, -1, 2.5, True, "3"])
def test_top_of_no_ids_or_a_non_number_is_a_clear_error(spent_store, n):
    """top(n=-1) used to drop the last id, n=0 gave nothing, n="3" a TypeError from deep inside."""
    guard = make_guard(spent_store)
    _spend(guard, {"alice": 1})
    with pytest.raises(ValueError, match=r"top: n must be a whole number of ids >= 1 \(None: every id\), got"):
        BudgetAdmin(guard.policy).top("user", n=n)

# -- error messages are shown whole ----------------------------------------------------------


def test_an_error_message_keeps_its_closing_quote(tokenless):
    code, body = _get(tokenless, "/api/scope/user?sort=bogus")
    assert code == 400 and json.loads(body)["error"].endswith("got 'bogus'")
    code, body = _get(tokenless, "/scope/user?sort=bogus")  # the HTML page: the same message, escaped
    assert code == 400 and ("got &#x27;bogus&#x27;" in body or "got 'bogus'" in body)
    code, body = _get(tokenless, "/api/scope/nosuch")
    assert code == 404 and "'nosuch'" in json.loads(body)["error"]


def test_a_key_error_is_shown_without_the_quotes_its_str_adds():
    class Missing(DashboardData):
        def events_page(self) -> Any:
            raise KeyError("no events for 'x'")

    guard = make_guard()
    server = make_server(Missing(BudgetAdmin(guard.policy)), port=0)
    server.serve_in_thread()
    try:
        code, body = _get(server, "/api/events")
        assert code == 404 and json.loads(body)["error"] == "no events for 'x'"
    finally:
        server.shutdown()
        server.server_close()
