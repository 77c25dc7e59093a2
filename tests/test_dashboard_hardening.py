"""The dashboard's server under hostile requests: Host headers of a DNS-rebinding page, slow or
too many connections, absurd query parameters, and the text of its error messages."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from langchain_budgetguard.dashboard import DashboardData, make_server
from langchain_budgetguard.overrides import BudgetAdmin

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
