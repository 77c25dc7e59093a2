"""A document given by URL or file id is held at the most the provider can bill: the model's input limit.

The guard cannot read such a file's size before the call, and the provider bills all of it as prompt
tokens (a 30-page PDF is ~90,000). Held at a guessed 20,000 tokens, one call with a file id spent past
a hard limit. Strict mode now holds the model's whole input limit (its LangChain profile, else
genai-prices' context window), unless the caller vouches for the files' size
(``StrictEstimator(url_media_tokens=N)``). A file sent inline is counted from its bytes, as before.
"""

from __future__ import annotations

import base64
import json
from decimal import Decimal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from langchain_budgetguard import BudgetExceededError, BudgetGuard
from langchain_budgetguard.caps import model_input_limit
from langchain_budgetguard.estimate import StrictEstimator, TypicalEstimator, bounded_input_tokens, \
    unsized_references

from .providers import Reply
from .test_real_clients import spent  # the scope's spend, once nothing is held

FILE_TOKENS = 90_000  # what the provider bills for the file behind the id (a ~30-page PDF)
MINI_INPUT = Decimal("0.15") / 1_000_000  # gpt-4o-mini, USD per prompt token


def _by_file_id(text: str = "Summarise this report.") -> list[HumanMessage]:
    return [HumanMessage(content=[{"type": "text", "text": text}, {"type": "file", "file": {"file_id": "file-9x"}}])]


def _reserved(message) -> Decimal:
    return message.response_metadata["budgetguard"]["reserved_usd"]


def _file_reply(request) -> Reply:
    return Reply(text="A summary.", input_tokens=FILE_TOKENS, output_tokens=40)


def test_a_file_id_cannot_spend_past_the_limit(openai_server):
    """The attack: a $0.01 budget, a file billed at 90,000 prompt tokens ($0.0135). Held at 20,000
    tokens ($0.003) the call was admitted and spent past the limit."""
    openai_server.set_default(_file_reply)
    guard = BudgetGuard(openai_server.chat_model(), limit=Decimal("0.01"))
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke(_by_file_id())
    assert openai_server.calls == []
    message = str(refused.value)
    assert "by URL or file id" in message and "128,000 tokens" in message  # gpt-4o-mini's input limit
    assert "StrictEstimator(url_media_tokens=...)" in message
    assert refused.value.refusal.unsized_inputs == 1
    assert spent(guard) == 0


def test_a_file_id_that_fits_is_held_at_the_input_limit_and_charged_what_was_billed(openai_server, billed):
    openai_server.set_default(_file_reply)
    guard = BudgetGuard(openai_server.chat_model(), limit=Decimal("0.05"))
    reply = guard.invoke(_by_file_id())
    assert _reserved(reply) >= 128_000 * MINI_INPUT
    assert spent(guard) == billed(openai_server) == reply.response_metadata["budgetguard"]["cost_usd"]
    assert openai_server.calls[0].usage["input_tokens"] == FILE_TOKENS


def test_the_same_file_inline_is_counted_from_its_bytes(openai_server):
    openai_server.set_default(_file_reply)
    guard = BudgetGuard(openai_server.chat_model(), limit=Decimal("0.05"))
    pdf = base64.b64encode(b"%PDF-1.4\n1 0 obj << /Type /Page >> endobj\n" + b"x" * 2000).decode()
    inline = [HumanMessage(content=[{"type": "text", "text": "Summarise."},
                                    {"type": "file", "file": {"filename": "r.pdf",
                                                              "file_data": f"data:application/pdf;base64,{pdf}"}}])]
    reply = guard.invoke(inline, max_tokens=100)
    # Its bytes and one page (as an image: gpt-4o-mini's image rate is inflated), not the input limit.
    assert _reserved(reply) < 64_000 * MINI_INPUT


def _pdf_block(raw: bytes) -> dict:
    data = base64.b64encode(raw).decode()
    return {"type": "file", "file": {"filename": "r.pdf", "file_data": f"data:application/pdf;base64,{data}"}}


def test_a_pdf_with_compressed_object_streams_is_held_at_the_window(openai_server):
    """PDF 1.5+ may keep its page objects in compressed object streams: one visible page object, any
    number billed (each page as text and as an image)."""
    openai_server.set_default(_file_reply)
    raw = (b"%PDF-1.5\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
           b"5 0 obj << /Type /ObjStm /N 60 /First 400 /Filter /FlateDecode >> stream\n" + b"\x78\x9c" * 800
           + b"\nendstream endobj\n")
    block = _pdf_block(raw)
    assert unsized_references(StrictEstimator(), [HumanMessage(content=[block])]) == 1
    plain = _pdf_block(raw.replace(b"/ObjStm", b"/XObject"))
    assert unsized_references(StrictEstimator(), [HumanMessage(content=[plain])]) == 0
    guard = BudgetGuard(openai_server.chat_model(), limit=Decimal("0.01"))
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke([HumanMessage(content=[{"type": "text", "text": "Summarise."}, block])])
    assert "compressed pages" in str(refused.value) and "128,000 tokens" in str(refused.value)
    assert openai_server.calls == []


def test_vouching_for_the_files_size_holds_that_instead(openai_server):
    openai_server.set_default(lambda request: Reply(text="ok", input_tokens=5_000, output_tokens=40))
    with pytest.raises(BudgetExceededError):
        BudgetGuard(openai_server.chat_model(), limit=Decimal("0.01")).invoke(_by_file_id())
    vouched = BudgetGuard(openai_server.chat_model(), limit=Decimal("0.01"),
                          estimator=StrictEstimator(url_media_tokens=10_000))
    reply = vouched.invoke(_by_file_id(), max_tokens=100)
    assert 10_000 * MINI_INPUT < _reserved(reply) < 11_000 * MINI_INPUT
    assert len(openai_server.calls) == 1


def test_a_per_call_model_is_held_at_its_own_context_window(openai_server):
    """A gpt-4o-mini client (128k) asked per call for gpt-4.1 (1M tokens, genai-prices): the file may
    be eight times larger than the client's own model could read."""
    openai_server.set_default(_file_reply)
    guard = BudgetGuard(openai_server.chat_model(), limit=10)
    reply = guard.invoke(_by_file_id(), model="gpt-4.1")
    assert openai_server.calls[0].body["model"] == "gpt-4.1"
    assert _reserved(reply) >= 1_000_000 * Decimal("2.00") / 1_000_000  # gpt-4.1: $2 per million prompt tokens


def test_an_anthropic_document_by_url_is_held_at_claudes_window(anthropic_server, billed):
    anthropic_server.set_default(lambda request: Reply(text="ok", input_tokens=60_000, output_tokens=20))
    document = [HumanMessage(content=[
        {"type": "document", "source": {"type": "url", "url": "https://example.com/annual-report.pdf"}},
        {"type": "text", "text": "What was the revenue?"},
    ])]
    llm = anthropic_server.chat_model(model="claude-sonnet-4-5", max_tokens=100)
    with pytest.raises(BudgetExceededError) as refused:  # 200,000 tokens at $3 per million: $0.60
        BudgetGuard(llm, limit=Decimal("0.5")).invoke(document)
    assert "200,000 tokens" in str(refused.value)
    guard = BudgetGuard(llm, limit=5)
    short = guard.invoke(document)
    assert _reserved(short) >= Decimal("0.60")
    # With the 1M-token context beta the same document may be five times longer (and priced above 200k).
    long = BudgetGuard(anthropic_server.chat_model(model="claude-sonnet-4-5", max_tokens=100,
                                                   betas=["context-1m-2025-08-07"]), limit=20).invoke(document)
    assert _reserved(long) >= 5 * _reserved(short)
    assert spent(guard) == billed(anthropic_server) - long.response_metadata["budgetguard"]["cost_usd"]


def test_typical_mode_keeps_its_estimate(openai_server):
    openai_server.set_default(_file_reply)
    guard = BudgetGuard(openai_server.chat_model(), limit=Decimal("0.05"), estimator="typical")
    reply = guard.invoke(_by_file_id())
    assert _reserved(reply) < 20_000 * MINI_INPUT  # a typical document (3,000 tokens): not a bound


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("plain text", 0),
        ([{"type": "text", "text": "hi"}], 0),
        ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], 0),  # bounded by its family
        ([{"type": "file", "file": {"file_id": "file-1"}}], 1),
        ([{"type": "input_file", "file_id": "file-1"}], 1),  # Responses API
        ([{"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}], 1),
        ([{"type": "document", "source": {"type": "file", "file_id": "file_01"}}], 1),  # Anthropic Files API
        ([{"type": "file", "source_type": "url", "url": "https://example.com/a.pdf", "mime_type": "application/pdf"}], 1),
        ([{"type": "audio", "source_type": "url", "url": "https://example.com/call.mp3"}], 1),
        ([{"type": "media", "mime_type": "video/mp4", "file_uri": "gs://bucket/clip.mp4"}], 1),  # Gemini
        ([{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hello"}}], 0),
        ([{"type": "file", "file": {"file_id": "a"}}, {"type": "file", "file": {"file_id": "b"}}], 2),
        # A note beside the URL is not the document: a long `context` or `title` once became the payload.
        ([{"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"},
           "context": "Our annual report; read the risk section carefully. " * 8, "title": "t" * 300}], 1),
        # langchain-anthropic sends a v1 file's URL before its bytes: any reference is unsized.
        ([{"type": "file", "url": "https://example.com/a.pdf", "mime_type": "application/pdf",
           "base64": base64.b64encode(b"%PDF-1.4\n<< /Type /Page >>" + b" " * 400).decode()}], 1),
        ([{"type": "input_file", "file_id": "file-1", "file_data": "data:application/pdf;base64," + "A" * 400}], 1),
    ],
)
def test_what_counts_as_a_file_whose_size_cannot_be_read(content, expected):
    assert unsized_references(StrictEstimator(), [HumanMessage(content=content)]) == expected


def test_files_inside_tool_results_and_histories_count_too():
    history = [
        HumanMessage("Read the contract."),
        AIMessage("", tool_calls=[{"name": "fetch", "args": {"id": 7}, "id": "c1", "type": "tool_call"}]),
        ToolMessage(content=[{"type": "document", "source": {"type": "url", "url": "https://example.com/c.pdf"}}],
                    tool_call_id="c1", name="fetch"),
        ToolMessage(json.dumps({"ok": True}), tool_call_id="c2", name="fetch"),
    ]
    assert unsized_references(StrictEstimator(), history) == 1
    assert unsized_references(StrictEstimator(url_media_tokens=5_000), history) == 0  # vouched for
    assert unsized_references(TypicalEstimator(), history) == 0  # typical estimates, it does not bound


def test_the_input_bound():
    assert bounded_input_tokens(500, 0, 128_000) == 500
    assert bounded_input_tokens(500, 1, 128_000, None) == 128_000
    assert bounded_input_tokens(500, 1, None, None) == 500  # no window known: the estimate's own count
    assert bounded_input_tokens(200_000, 1, 128_000) == 200_000  # never below what was counted


def test_input_limits_come_from_the_profile_and_the_long_context_beta(anthropic_server, openai_server):
    assert model_input_limit(openai_server.chat_model()) == 128_000
    claude = anthropic_server.chat_model(model="claude-sonnet-4-5")
    assert model_input_limit(claude) == 200_000
    assert model_input_limit(claude.bind(betas=["context-1m-2025-08-07"])) == 1_000_000
    assert model_input_limit(object()) is None


def test_url_media_tokens_is_validated():
    for bad in (-1, 1.5, "many", True):
        with pytest.raises(ValueError, match="url_media_tokens"):
            StrictEstimator(url_media_tokens=bad)


def test_enforce_budget_holds_a_file_id_at_the_models_window(openai_server, billed):
    """enforce_budget sees the request through callbacks (a model name, no chat model object): the
    window is genai-prices' context window for that name."""
    from langchain_budgetguard import BudgetPolicy
    from langchain_budgetguard.enforce import enforce_budget

    openai_server.set_default(_file_reply)
    policy = BudgetPolicy(limit=Decimal("0.01"))
    with enforce_budget(policy), pytest.raises(BudgetExceededError) as refused:
        openai_server.chat_model().invoke(_by_file_id())
    assert "128,000 tokens" in str(refused.value)
    assert openai_server.calls == []
    assert spent(BudgetGuard(policy=policy)) == 0
