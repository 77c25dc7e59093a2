"""Each request an SDK resends after it got no answer may have been billed: it is charged.

The OpenAI and Anthropic SDKs resend a request that timed out (``max_retries``, 2 by default); so
do a ``with_retry`` or a ``with_fallbacks`` inside the guarded model. The provider may answer, and
bill, every attempt it received, and only the answer of the last one reached the guard: with a
client timeout shorter than the answer takes, each call got up to ``max_retries`` full answers
free. The guard now counts the requests on the SDK's httpx client and charges each one that got no
response its reservation; one answered with an error status (a 429, a 500) is not billed.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from langchain_budgetguard import BudgetGuard
from langchain_budgetguard.pricing import Pricer

from tests.providers.canned_server import CannedServer

from .test_billed_items import canned, server  # noqa: F401 - the canned server's fixtures
from .test_tool_fees import MODEL, TOKENS, genai, reply
from .test_unknown_outcome import reservation_of

PRICER = Pricer(hosts={"127.0.0.1": "openai"})
SLOW = 1.0  # seconds the server takes over an answer the client gives up on
TIMEOUT = 0.25


def openai(server: CannedServer, max_retries: int, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="test", use_responses_api=True,
                      timeout=TIMEOUT, max_retries=max_retries, **kwargs)


def late() -> dict[str, Any]:
    return {**reply(), "__delay_seconds__": SLOW}


def spent(guard: BudgetGuard) -> Decimal:
    (status,) = guard.status()
    assert status.held == 0
    return status.spent


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "batch", "generate"])
def test_a_resent_request_that_got_no_answer_is_charged_its_reservation(server: CannedServer, how: str) -> None:
    guard = BudgetGuard(openai(server, max_retries=1), limit=1, pricer=PRICER)
    one = reservation_of(guard, max_tokens=100)
    server.push(late(), reply())
    if how == "invoke":
        guard.invoke("hello", max_tokens=100)
    elif how == "ainvoke":
        asyncio.run(guard.ainvoke("hello", max_tokens=100))
    elif how == "batch":
        guard.batch(["hello"], max_tokens=100)
    else:
        from langchain_core.messages import HumanMessage

        guard.generate([[HumanMessage("hello")]], max_tokens=100)
    assert len(server.requests) == 2  # the provider took (and may bill) both
    assert spent(guard) == genai(TOKENS, MODEL, "openai") + one


def test_every_attempt_timing_out_is_charged_a_reservation_each(server: CannedServer) -> None:
    guard = BudgetGuard(openai(server, max_retries=1), limit=1, pricer=PRICER)
    one = reservation_of(guard, max_tokens=100)
    server.push(late(), late())
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        guard.invoke("hello", max_tokens=100)
    assert len(server.requests) == 2
    assert spent(guard) == 2 * one


def test_a_request_answered_with_an_error_status_and_resent_costs_nothing_more(server: CannedServer) -> None:
    guard = BudgetGuard(openai(server, max_retries=1), limit=1, pricer=PRICER)
    server.push({"error": {"message": "overloaded"}}, reply())  # a 500: the provider billed nothing
    guard.invoke("hello", max_tokens=100)
    assert len(server.requests) == 2
    assert spent(guard) == genai(TOKENS, MODEL, "openai")


def test_langchains_own_retry_inside_the_guarded_model_is_counted_too(server: CannedServer) -> None:
    guard = BudgetGuard(openai(server, max_retries=0).with_retry(stop_after_attempt=2, wait_exponential_jitter=False),
                        limit=1, pricer=PRICER)
    one = reservation_of(guard, max_tokens=100)
    server.push(late(), reply())
    guard.invoke("hello", max_tokens=100)
    assert len(server.requests) == 2
    assert spent(guard) == genai(TOKENS, MODEL, "openai") + one


def test_anthropics_sdk_is_counted(server: CannedServer) -> None:
    from langchain_anthropic import ChatAnthropic

    from .test_billed_items import anthropic_body

    model = "claude-sonnet-4-5"
    llm = ChatAnthropic(model=model, base_url=server.url, api_key="test", timeout=TIMEOUT, max_retries=1)
    guard = BudgetGuard(llm, limit=1, pricer=Pricer(hosts={"127.0.0.1": "anthropic"}))
    one = reservation_of(guard, max_tokens=100)
    usage = {"input_tokens": 300, "output_tokens": 20}
    body = anthropic_body(model, usage)
    server.push({**body, "__delay_seconds__": SLOW}, body)
    guard.invoke("hello", max_tokens=100)
    assert len(server.requests) == 2
    assert spent(guard) == genai(usage, model, "anthropic") + one


def test_the_clients_other_users_are_not_counted_and_hooks_are_added_once(server: CannedServer) -> None:
    """The SDK's default httpx client is shared by every model of the same settings: the hooks
    count only inside a guarded call, and a second guard does not add them again."""
    llm = openai(server, max_retries=1)
    other = openai(server, max_retries=1)
    http = llm.root_client._client
    assert other.root_client._client is http  # langchain-openai shares its default client
    guard = BudgetGuard(llm, limit=1, pricer=PRICER)
    BudgetGuard(other, limit=1, pricer=PRICER)
    assert len(http.event_hooks["request"]) == len(http.event_hooks["response"]) == 1
    server.push(late(), reply())
    other.invoke("hello", max_tokens=100)  # unguarded: its lost attempt is nobody's to charge here
    server.push(reply())
    guard.invoke("hello", max_tokens=100)
    assert spent(guard) == genai(TOKENS, MODEL, "openai")


@pytest.mark.parametrize("how", ["stream", "astream", "astream_events"])
def test_a_stream_resent_after_it_got_no_answer_is_charged_too(openai_server: Any, how: str) -> None:
    from tests.conftest import list_price
    from tests.providers import Reply

    guard = BudgetGuard(openai_server.chat_model(timeout=TIMEOUT, max_retries=1), limit=1)
    one = reservation_of(guard)
    openai_server.script(Reply(text="late", delay=SLOW), Reply(text="a b c"))

    async def drain() -> None:
        if how == "astream":
            async for _ in guard.astream("hello"):
                pass
        else:
            async for _ in guard.astream_events("hello", version="v2"):
                pass

    if how == "stream":
        assert "".join(c.content for c in guard.stream("hello")) == "a b c"
    else:
        asyncio.run(drain())
    lost, answered = openai_server.calls
    assert spent(guard) == list_price(answered) + one


def test_a_stream_that_times_out_before_its_first_chunk_is_charged_its_reservation(openai_server: Any) -> None:
    """As invoke: the provider may have answered a request whose client gave up waiting."""
    from tests.providers import Reply

    guard = BudgetGuard(openai_server.chat_model(timeout=TIMEOUT), limit=1)
    one = reservation_of(guard)
    openai_server.script(Reply(text="late", delay=SLOW))
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        list(guard.stream("hello"))
    assert spent(guard) == one


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # a port nobody listens on


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
def test_requests_whose_connection_was_refused_cost_nothing_however_often_resent(how: str) -> None:
    """Nothing went out: the provider cannot have billed it (the request hook alone would count it)."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"http://127.0.0.1:{_closed_port()}/v1", api_key="test",
                     use_responses_api=True, max_retries=2)
    guard = BudgetGuard(llm, limit=1, pricer=PRICER)
    with pytest.raises(Exception, match="(?i)connect"):
        if how == "invoke":
            guard.invoke("hello", max_tokens=100)
        else:
            asyncio.run(guard.ainvoke("hello", max_tokens=100))
    assert spent(guard) == 0


def test_an_attempt_on_a_transport_that_reports_no_steps_is_taken_as_sent() -> None:
    """A custom httpx transport does not say whether a request went out: a lost attempt is charged."""
    import httpx
    from langchain_openai import ChatOpenAI

    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if len(sent) == 1:
            raise httpx.ReadTimeout("no answer", request=request)
        return httpx.Response(200, json=reply())

    llm = ChatOpenAI(model=MODEL, base_url="http://127.0.0.1:9/v1", api_key="test", use_responses_api=True,
                     max_retries=1, http_client=httpx.Client(transport=httpx.MockTransport(handle)))
    guard = BudgetGuard(llm, limit=1, pricer=PRICER)
    one = reservation_of(guard, max_tokens=100)
    guard.invoke("hello", max_tokens=100)
    assert len(sent) == 2
    assert spent(guard) == genai(TOKENS, MODEL, "openai") + one


def test_a_lost_attempt_before_an_error_status_is_charged_once_and_said_once(server: CannedServer) -> None:
    """The first attempt timed out, the resent one was refused with a 500: the call costs its one
    lost attempt, and the cost says why once."""
    llm = openai(server, max_retries=1)
    guard = BudgetGuard(llm, limit=1, pricer=PRICER)
    reservation = guard.reserve(["hello"], kwargs={"max_tokens": 100})
    server.push(late(), {"error": {"message": "overloaded"}})
    with pytest.raises(Exception, match="overloaded") as failed:
        with reservation.keep_alive():
            reservation.model.invoke("hello", max_tokens=100)
    cost = reservation.settle_error(failed.value)
    assert len(server.requests) == 2
    assert cost is not None and cost.charged_nano == reservation.admitted.estimate.reserve
    assert cost.problem.count("got no answer") == 1
    assert spent(guard) == Decimal(reservation.admitted.estimate.reserve) / 10**9
