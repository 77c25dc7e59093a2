"""A call that continues a conversation the provider stores is held at the model's whole input limit.

OpenAI's Responses API bills a thread's earlier turns again as input on every call that names it
(``previous_response_id=``, ``conversation=``), and Gemini bills a ``cached_content`` it reads: input
the request does not carry, so the guard cannot count it. Held as the few tokens of the new turn, one
call on a long thread spent past a hard limit. Strict mode now holds such a call at the most the
provider can bill, the model's input limit, as for a file given by id.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from langchain_budgetguard import BudgetExceededError, BudgetGuard
from langchain_budgetguard.estimate import stored_context_of
from langchain_budgetguard.pricing import Pricer

from tests.providers.canned_server import CannedServer

from .test_billed_items import canned, server  # noqa: F401 - the canned server's fixtures

THREAD_TOKENS = 80_000  # what the stored thread bills as input on each call that continues it
MINI_INPUT = Decimal("0.15") / 1_000_000


def _reply(input_tokens: int = THREAD_TOKENS) -> dict[str, Any]:
    return {
        "id": "resp_2", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-4o-mini",
        "output": [{"type": "message", "id": "msg_2", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Your name is Bob.", "annotations": []}]}],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": {"input_tokens": input_tokens, "output_tokens": 8, "total_tokens": input_tokens + 8,
                  "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
    }


def _llm(server: CannedServer, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="gpt-4o-mini", base_url=server.url + "/v1", api_key="test", max_retries=0,
                      use_responses_api=True, **kwargs)


def _guard(server: CannedServer, llm: Any, limit: str) -> BudgetGuard:
    return BudgetGuard(llm, limit=Decimal(limit), pricer=Pricer(hosts={server.url: "openai"}))


def _spent(guard: BudgetGuard) -> Decimal:
    (status,) = guard.status()
    assert status.held == 0
    return status.spent


def test_a_stored_thread_cannot_spend_past_the_limit(server: CannedServer) -> None:
    """The attack: a $0.01 budget; the thread bills 80,000 prompt tokens ($0.012). Held as the new
    turn's few tokens, the call was admitted and spent past the limit."""
    server.push(_reply())
    guard = _guard(server, _llm(server), "0.01")
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke("What is my name?", previous_response_id="resp_1", max_tokens=50)
    assert server.requests == []
    message = str(refused.value)
    assert "previous_response_id" in message and "128,000 tokens" in message
    assert "use_previous_response_id=True" in message
    assert _spent(guard) == 0


def test_a_stored_thread_that_fits_is_charged_what_was_billed(server: CannedServer) -> None:
    server.push(_reply())
    guard = _guard(server, _llm(server), "0.05")
    reply = guard.invoke("What is my name?", previous_response_id="resp_1", max_tokens=50)
    meta = reply.response_metadata["budgetguard"]
    assert meta["reserved_usd"] >= 128_000 * MINI_INPUT
    assert server.requests[0]["body"]["previous_response_id"] == "resp_1"
    assert _spent(guard) == meta["cost_usd"] == THREAD_TOKENS * MINI_INPUT + 8 * Decimal("0.60") / 1_000_000


@pytest.mark.parametrize(
    ("model", "call", "expected"),
    [
        (lambda s: _llm(s), {}, None),
        (lambda s: _llm(s), {"previous_response_id": "resp_1"}, "previous_response_id"),
        (lambda s: _llm(s).bind(previous_response_id="resp_1"), {}, "previous_response_id"),
        (lambda s: _llm(s), {"conversation": "conv_1"}, "conversation"),
        (lambda s: _llm(s), {"conversation": {"id": "conv_1"}}, "conversation"),
        (lambda s: _llm(s), {"extra_body": {"previous_response_id": "resp_1"}}, "previous_response_id"),
        (lambda s: _llm(s, model_kwargs={"conversation": "conv_1"}), {}, "conversation"),
        (lambda s: _llm(s), {"cached_content": "cachedContents/abc"}, "cached_content"),
        (lambda s: _llm(s), {"previous_response_id": None}, None),  # None, "": nothing is continued
        (lambda s: _llm(s), {"previous_response_id": ""}, None),
    ],
)
def test_where_a_stored_context_is_named(server: CannedServer, model, call, expected) -> None:
    assert stored_context_of(model(server), call) == expected


def test_a_bound_thread_is_held_on_every_call(server: CannedServer) -> None:
    guard = _guard(server, _llm(server).bind(previous_response_id="resp_1"), "0.01")
    with pytest.raises(BudgetExceededError, match="previous_response_id"):
        guard.invoke("What is my name?", max_tokens=50)
    assert server.requests == []


def test_the_history_sent_with_the_call_is_counted_not_held_at_the_window(server: CannedServer) -> None:
    """use_previous_response_id=True: the guard sees every turn (LangChain drops the old ones from the
    request and names the thread instead), so the call is counted from them."""
    server.push(_reply(input_tokens=40))
    guard = _guard(server, _llm(server, use_previous_response_id=True), "0.01")
    history = [HumanMessage("Hi, I'm Bob."),
               AIMessage("Hi Bob!", response_metadata={"id": "resp_1"}, id="resp_1"),
               HumanMessage("What is my name?")]
    reply = guard.invoke(history, max_tokens=50)
    assert reply.response_metadata["budgetguard"]["reserved_usd"] < 1_000 * MINI_INPUT + 50 * Decimal("0.60") / 1_000_000
    assert server.requests[0]["body"].get("previous_response_id") == "resp_1"


def test_typical_mode_does_not_hold_the_window(server: CannedServer) -> None:
    server.push(_reply(input_tokens=40))
    guard = BudgetGuard(_llm(server), limit=Decimal("0.01"), estimator="typical",
                        pricer=Pricer(hosts={server.url: "openai"}))
    reply = guard.invoke("What is my name?", previous_response_id="resp_1", max_tokens=50)
    assert reply.response_metadata["budgetguard"]["reserved_usd"] < 1_000 * MINI_INPUT
