"""Hard means hard: a call never costs more than it reserved, even when nothing caps its output.

The scripted server answers like a reasoning model that would write 20,000 output tokens unless the
request caps it (it honours ``max_completion_tokens`` / ``max_tokens`` as OpenAI does, ending with
``finish_reason="length"``). With no cap anywhere, the guard sends the cap it reserved for.
"""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from langchain_core.messages import AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk

from langchain_budgetguard import BudgetExceededError, BudgetGuard

from .fakes import UsageChat
from .providers import Reply

WOULD_WRITE = 20_000  # what the model writes when nothing caps it: $0.16 of o3 output alone


def capped_reply(request) -> Reply:
    body = request.body
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or WOULD_WRITE
    # input as the server counts the prompt (never more than the strict bound of what was sent)
    return Reply(text="word " * 50, output_tokens=min(cap, WOULD_WRITE))


def spent_and_held(guard) -> tuple[Decimal, Decimal]:
    (status,) = guard.status()
    return status.spent, status.held


@pytest.mark.parametrize("mode", ["invoke", "stream"])
@pytest.mark.parametrize("workers", [1, 8])
def test_an_uncapped_o3_never_spends_past_the_limit(openai_server, billed, mode, workers):
    openai_server.set_default(capped_reply)
    llm = openai_server.chat_model(model="o3")
    assert llm.max_tokens is None  # no cap on the model, none in the calls
    guard = BudgetGuard(llm, limit="0.10")
    served, refused, errors = [], [], []

    def work() -> None:
        for _ in range(6):
            try:
                if mode == "invoke":
                    served.append(guard.invoke("Think hard."))
                else:
                    served.append(list(guard.stream("Think hard."))[-1])
            except BudgetExceededError:
                refused.append(1)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    spent, held = spent_and_held(guard)
    assert held == 0 and spent == billed(openai_server)
    assert 0 < spent <= Decimal("0.10")
    assert served and refused
    # every request carried the cap that was reserved for it, and no reply was billed past it
    for request in openai_server.calls:
        cap = request.body["max_completion_tokens"]
        assert request.usage["output_tokens"] <= cap <= 4096
    metadata = [m.response_metadata["budgetguard"] for m in served]
    assert all(m["output_cap"] == r.body["max_completion_tokens"] for m, r in zip(
        sorted(metadata, key=lambda m: m["output_cap"]),
        sorted(openai_server.calls, key=lambda r: r.body["max_completion_tokens"])))


def test_a_call_with_its_own_cap_is_sent_as_it_is(openai_server):
    openai_server.set_default(capped_reply)
    guard = BudgetGuard(openai_server.chat_model(model="o3", max_completion_tokens=300), limit="0.10")
    reply = guard.invoke("Think.")
    assert openai_server.last.body["max_completion_tokens"] == 300
    assert reply.response_metadata["budgetguard"]["output_cap"] is None  # the guard sent nothing of its own
    guard.invoke("Think.", max_completion_tokens=100)
    assert openai_server.last.body["max_completion_tokens"] == 100


def test_shrink_to_fit_serves_a_shorter_reply_instead_of_refusing(openai_server, billed):
    openai_server.set_default(capped_reply)
    guard = BudgetGuard(openai_server.chat_model(model="o3"), limit="0.04")
    first = guard.invoke("Think.")  # 4096 tokens reserved ($0.033), fits
    second = guard.invoke("Think.")  # $0.007 left: 4096 no longer fits, a smaller cap does
    assert first.response_metadata["budgetguard"]["clamped"] is False
    meta = second.response_metadata["budgetguard"]
    assert meta["clamped"] is True and 256 <= meta["output_cap"] < 4096
    assert openai_server.last.body["max_completion_tokens"] == meta["output_cap"]
    spent, held = spent_and_held(guard)
    assert held == 0 and spent == billed(openai_server) <= Decimal("0.04")
    with pytest.raises(BudgetExceededError):  # what is left no longer holds even 256 output tokens
        for _ in range(10):
            guard.invoke("Think.")
    assert spent_and_held(guard)[0] <= Decimal("0.04")


class IgnoresCaps(UsageChat):
    """A server that streams 300 pieces whatever cap it is sent, and no usage (a local server)."""

    closed: bool = False

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        try:
            for i in range(300):
                yield ChatGenerationChunk(message=AIMessageChunk(content=f" w{i}"))
        finally:
            object.__setattr__(self, "closed", True)

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs):
        try:
            for i in range(300):
                yield ChatGenerationChunk(message=AIMessageChunk(content=f" w{i}"))
        finally:
            object.__setattr__(self, "closed", True)


def _sum(chunks):
    return "".join(c.content for c in chunks)


def test_a_stream_that_ignores_its_cap_is_stopped_at_the_cap():
    llm = IgnoresCaps(max_tokens=50, report_usage=False)
    guard = BudgetGuard(llm, limit=1)
    chunks = list(guard.stream("hi"))
    assert len(_sum(chunks).split()) == 51 and llm.closed  # stopped once it passed 50 pieces
    (status,) = guard.status()
    assert status.held == 0 and status.spent == chunks[-1].response_metadata["budgetguard"]["cost_usd"] > 0


async def test_an_async_stream_that_ignores_its_cap_is_stopped_and_closed():
    llm = IgnoresCaps(max_tokens=50, report_usage=False)
    guard = BudgetGuard(llm, limit=1)
    chunks = [c async for c in guard.astream("hi")]
    assert len(_sum(chunks).split()) == 51 and llm.closed
    (status,) = guard.status()
    assert status.held == 0 and status.spent > 0
