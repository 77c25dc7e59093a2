"""Pre-call token estimates: strict is an upper bound, typical is close, caps are found."""

from __future__ import annotations

import base64
import struct
import json
import unicodedata

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_budgetguard.estimate import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    StrictEstimator,
    TypicalEstimator,
    estimate_input_tokens,
    get_estimator,
    max_output_tokens,
    tools_of,
)

STRICT = StrictEstimator()
TYPICAL = TypicalEstimator()

ENGLISH = (
    "Cuneiform is a logo-syllabic script that was used to write several languages of the Ancient Near East. "
    "The script was in active use from the early Bronze Age until the beginning of the Common Era. It is named "
    "for the characteristic wedge-shaped impressions which form its signs. Cuneiform is the earliest known "
    "writing system and was originally developed to write the Sumerian language of southern Mesopotamia. "
) * 20
CJK = "楔形文字は古代メソポタミアで使われた文字です。最古の例は紀元前3200年頃のものです。" * 10
EMOJI = "I love it 😀👍🏽🎉 " * 20 + "👨‍👩‍👧‍👦" * 10
MIXED = ENGLISH[:500] + CJK[:100] + EMOJI[:60] + "Ünïcödé façade naïve résumé"
TEXTS = [pytest.param(t, id=i) for i, t in (("english", ENGLISH), ("cjk", CJK), ("emoji", EMOJI), ("mixed", MIXED))]


class GetWeather(BaseModel):
    """Get the current weather in a given location."""

    location: str = Field(description="The city and state, e.g. San Francisco, CA")
    unit: str = Field(default="celsius", description="celsius or fahrenheit")


@tool
def lookup_order(order_id: str, include_items: bool = False) -> str:
    """Look up an order by its id."""
    return order_id


def _bpe_worst_case():
    """A byte-level BPE whose vocabulary is the 256 bytes: the most tokens any such tokenizer yields."""
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding(
        name="bytes-only",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={},
    )


# -- strict is an upper bound ----------------------------------------------------------------

# Prompt tokens providers reported for one HumanMessage (LangChain's token-usage guides).
REPORTED = [
    ("hello", "gpt-4o-mini", 8),
    ("Tell me a joke", "gpt-4", 11),
    ("What's the oldest known example of cuneiform", "gpt-4-turbo", 17),
    ("What's the oldest known example of cuneiform", "claude-3-sonnet-20240229", 17),
    ("What's the oldest known example of cuneiform", "mistral-small", 19),
    ("What's the oldest known example of cuneiform", "mixtral-8x7b-32768", 22),
    ("What's the oldest known example of cuneiform", "gemini-pro", 10),
    ("What's the oldest known example of cuneiform", "anthropic.claude-v2", 19),
]


@pytest.mark.parametrize(("text", "model", "reported"), REPORTED)
def test_strict_never_below_reported_prompt_tokens(text, model, reported):
    messages = [HumanMessage(text)]
    assert STRICT.input_tokens(messages) >= reported
    assert STRICT.input_tokens(messages, model=model) >= reported


@pytest.mark.parametrize("text", TEXTS)
def test_strict_at_least_a_bytes_only_bpe(text):
    enc = _bpe_worst_case()
    worst = len(enc.encode(text))
    assert worst == len(text.encode("utf-8"))
    assert STRICT.input_tokens([HumanMessage(text)]) >= worst
    assert STRICT.output_tokens(text) >= worst


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_the_byte_bound_is_at_least_the_real_tokenizer(model, text):
    from langchain_budgetguard.tokenizers import exact_family

    family = exact_family(model)
    if family is None:
        pytest.skip("the [tokenizers] extra is not installed")
    byte_bound = StrictEstimator(exact=False)
    assert byte_bound.input_tokens([HumanMessage(text)]) >= family.count(text) + 3  # +3: OpenAI's reply priming
    assert byte_bound.output_tokens(text) >= family.count(text)
    assert STRICT.output_tokens(text) >= family.count(text)


@pytest.mark.parametrize("text", TEXTS)
def test_strict_counts_at_least_utf8_bytes(text):
    assert STRICT.input_tokens([HumanMessage(text)]) >= len(text.encode("utf-8"))


def test_strict_covers_nfkc_growth():
    # Tokenizers that NFKC-normalise first see many more bytes than were sent.
    text = "ﷺ ㍿ ¼ " * 50
    grown = len(unicodedata.normalize("NFKC", text).encode("utf-8"))
    assert grown > len(text.encode("utf-8"))
    assert STRICT.input_tokens([HumanMessage(text)]) >= grown
    assert STRICT.output_tokens(text) >= grown


def test_lone_surrogates_do_not_crash():
    text = "bad \ud800 surrogate"
    assert STRICT.input_tokens([HumanMessage(text)]) >= len(text)
    assert TYPICAL.input_tokens([HumanMessage(text)]) > 0


def _conversations():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    return [
        [HumanMessage(ENGLISH)],
        [SystemMessage("You are terse."), HumanMessage(CJK)],
        [HumanMessage(EMOJI, name="alice")],
        [HumanMessage(content=[{"type": "text", "text": "What is this?"}, image])],
        [AIMessage("", tool_calls=[{"name": "GetWeather", "args": {"location": "Paris"}, "id": "c1"}]),
         ToolMessage("22C and sunny", tool_call_id="c1")],
        [],
    ]


@pytest.mark.parametrize("messages", _conversations())
@pytest.mark.parametrize("model", [None, "gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet-latest", "gemini-2.0-flash"])
def test_strict_at_least_typical(messages, model):
    for tools in (None, [GetWeather], [lookup_order, {"type": "web_search_20250305", "name": "web_search"}]):
        assert STRICT.input_tokens(messages, tools, model=model) >= TYPICAL.input_tokens(messages, tools, model=model)
    for text in ("", "a", ENGLISH, CJK, EMOJI, MIXED):
        assert STRICT.output_tokens(text) >= TYPICAL.output_tokens(text)


# -- typical is close ------------------------------------------------------------------------


def test_typical_is_near_four_chars_per_token_on_english():
    estimate = TYPICAL.input_tokens([HumanMessage(ENGLISH)])
    assert 0.5 * len(ENGLISH) / 4 <= estimate <= 2 * len(ENGLISH) / 4
    assert 0.5 * len(ENGLISH) / 4 <= TYPICAL.output_tokens(ENGLISH) <= 2 * len(ENGLISH) / 4


def test_typical_counts_non_ascii_about_one_token_a_character():
    cjk = TYPICAL.output_tokens(CJK)
    non_ascii = sum(1 for c in CJK if ord(c) > 127)
    assert non_ascii <= cjk <= non_ascii + len(CJK) // 4 + 1
    assert TYPICAL.output_tokens("😀" * 30) >= 30


@pytest.mark.parametrize("text", ["a", "é", "日", "😀", " "])
def test_typical_never_zero_for_non_empty_text(text):
    assert TYPICAL.output_tokens(text) >= 1
    assert TYPICAL.input_tokens([HumanMessage(text)]) > TYPICAL.input_tokens([HumanMessage("")])


def test_empty_output_is_zero():
    assert STRICT.output_tokens("") == 0
    assert TYPICAL.output_tokens("") == 0


def test_large_prompt_counts_scale_linearly():
    text = ENGLISH * 200  # ~400 KB, ~100k tokens
    assert STRICT.input_tokens([HumanMessage(text)]) >= len(text)
    assert abs(TYPICAL.input_tokens([HumanMessage(text)]) - len(text) / 4) < 100


def test_accepts_strings_tuples_and_prompt_values():
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{q}")]).invoke({"q": "hello"})
    as_messages = [SystemMessage("Be brief."), HumanMessage("hello")]
    for estimator in (STRICT, TYPICAL):
        expected = estimator.input_tokens(as_messages)
        assert estimator.input_tokens(prompt) == expected
        assert estimator.input_tokens([("system", "Be brief."), ("human", "hello")]) == expected
        assert estimator.input_tokens("hello") == estimator.input_tokens([HumanMessage("hello")])


# -- images, documents -----------------------------------------------------------------------

PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 600).decode()
IMAGE_BLOCKS = [
    pytest.param({"type": "image_url", "image_url": "https://example.com/a.png"}, id="image_url-str"),
    pytest.param({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}, id="data-url"),
    pytest.param({"type": "image", "base64": PNG_B64, "mime_type": "image/png"}, id="v1-base64"),
    pytest.param({"type": "image", "url": "https://example.com/a.png"}, id="v1-url"),
    pytest.param({"type": "image", "source_type": "base64", "data": PNG_B64, "mime_type": "image/png"}, id="v0"),
    pytest.param({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                 id="anthropic"),
    pytest.param({"type": "input_image", "image_url": "https://example.com/a.png"}, id="responses"),
    pytest.param({"type": "file", "base64": PNG_B64, "mime_type": "image/png"}, id="file-image"),
]


@pytest.mark.parametrize("block", IMAGE_BLOCKS)
@pytest.mark.parametrize("estimator", [STRICT, TYPICAL], ids=["strict", "typical"])
def test_images_add_a_per_image_cost_not_their_base64_text(estimator, block):
    base = [HumanMessage(content=[{"type": "text", "text": "Describe it."}])]
    with_image = [HumanMessage(content=[{"type": "text", "text": "Describe it."}, block])]
    added = estimator.input_tokens(with_image) - estimator.input_tokens(base)
    assert added >= 800
    # The same image costs the same whether inline or linked.
    linked = [HumanMessage(content=[{"type": "text", "text": "Describe it."},
                                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])]
    assert estimator.input_tokens(with_image) - estimator.input_tokens(linked) in range(-2, 3)


def _png(width: int, height: int, pad: int = 600) -> str:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    text = b"tEXt" + b"Comment\0" + b"x" * pad
    chunk = lambda body: struct.pack(">I", len(body) - 4) + body + b"\0\0\0\0"  # noqa: E731
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(ihdr) + chunk(text) + chunk(b"IDAT")).decode()


@pytest.mark.parametrize("model", ["gpt-4.1-mini", "claude-opus-4-1", "gpt-4o"])
def test_an_image_sent_by_url_is_not_sized_from_a_thumbnail_beside_it(model):
    """A v1 image block with both `url` and `base64`: LangChain's OpenAI and Anthropic converters send
    the URL; the 16x16 thumbnail in `base64` was what got sized (23 tokens held on gpt-4.1-mini)."""
    def cost(block):
        return STRICT.input_tokens([HumanMessage(content=[block])], model=model) - STRICT.input_tokens(
            [HumanMessage(content=[])], model=model)

    url = "https://example.com/photo-4000x3000.png"
    thumb = _png(16, 16)
    by_url = cost({"type": "image", "url": url})
    assert cost({"type": "image", "base64": thumb, "mime_type": "image/png"}) < by_url
    assert cost({"type": "image", "url": url, "base64": thumb, "mime_type": "image/png"}) == by_url
    assert cost({"type": "input_image", "image_url": f"data:image/png;base64,{thumb}", "file_id": "file-1"}) == by_url
    # Two inline payloads (OpenAI's converter sends `data`, Anthropic's `base64`): the dearer one.
    both = {"type": "image", "base64": thumb, "data": _png(2000, 500), "mime_type": "image/png"}
    assert cost(both) == cost({"type": "image", "base64": _png(2000, 500), "mime_type": "image/png"}) > cost(
        {"type": "image", "base64": thumb, "mime_type": "image/png"})


def test_strict_image_worst_cases():
    def one_image(detail="auto", **kw):
        block = {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": detail}}
        return STRICT.input_tokens([HumanMessage(content=[block])], **kw) - STRICT.input_tokens(
            [HumanMessage(content=[])], **kw)

    assert one_image(model="gpt-4o") >= 1445  # 85 + 170 x 8 tiles (768x2048)
    assert one_image("low", model="gpt-4o") >= 85
    assert one_image(model="gpt-4o-mini") >= 2833 + 5667 * 8
    assert one_image("low", model="gpt-4o-mini") >= 2833
    assert one_image(model="gpt-4.1-nano") >= 3779  # 1536 patches x 2.46
    assert one_image(model="claude-3-5-sonnet-latest") >= 1600
    assert one_image("low", model="claude-3-5-sonnet-latest") >= 1600  # Claude ignores detail
    assert one_image() >= 4800  # unknown model: Claude's largest images
    assert one_image(model=None) == one_image(model="some-unknown-model")


def test_image_costs_can_be_set():
    estimator = StrictEstimator(image_tokens=10_000, low_detail_image_tokens=50)
    high = [HumanMessage(content=[{"type": "image_url", "image_url": {"url": "https://x/a.png"}}])]
    low = [HumanMessage(content=[{"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}}])]
    empty = estimator.input_tokens([HumanMessage(content=[])])
    assert estimator.input_tokens(high) - empty in range(10_000, 10_004)
    assert estimator.input_tokens(low) - empty in range(50, 54)
    with pytest.raises(ValueError, match="image_tokens"):
        StrictEstimator(image_tokens=-1)


def test_model_may_be_a_chat_model():
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-4o-mini", api_key="x")
    msgs = [HumanMessage(content=[{"type": "image_url", "image_url": {"url": "https://x/a.png"}}])]
    assert STRICT.input_tokens(msgs, model=llm) == STRICT.input_tokens(msgs, model="gpt-4o-mini")
    assert STRICT.input_tokens(msgs, model=llm.bind(max_tokens=5)) == STRICT.input_tokens(msgs, model="gpt-4o-mini")


def _pdf(pages: int) -> bytes:
    objs = b"".join(b"%d 0 obj << /Type /Page /Parent 2 0 R >> endobj\n" % (3 + i) for i in range(pages))
    return b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n2 0 obj << /Type /Pages >> endobj\n" + objs


def test_documents_count_pages_and_payload():
    def cost(estimator, block):
        return estimator.input_tokens([HumanMessage(content=[block])]) - estimator.input_tokens(
            [HumanMessage(content=[])])

    one = base64.b64encode(_pdf(1)).decode()
    ten = base64.b64encode(_pdf(10)).decode()
    for estimator in (STRICT, TYPICAL):
        anthropic_ten = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                         "data": ten}}
        v1_one = {"type": "file", "base64": one, "mime_type": "application/pdf"}
        assert cost(estimator, anthropic_ten) >= 9 * cost(estimator, v1_one) > 0
        openai_ten = {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{ten}"}}
        assert cost(estimator, anthropic_ten) <= cost(estimator, openai_ten) <= cost(estimator, anthropic_ten) + 10
        # A text document counts as its text.
        text_doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": ENGLISH}}
        assert cost(estimator, text_doc) >= len(ENGLISH) // 4
        # Behind a URL or an id: a documented flat cost.
        assert cost(estimator, {"type": "file", "url": "https://example.com/report.pdf"}) >= 3000
        assert cost(estimator, {"type": "file", "file_id": "file-abc123"}) >= 3000
    assert cost(STRICT, {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                        "data": ten}}) >= 10 * 3000


def test_audio_counts_its_payload_in_strict():
    audio = base64.b64encode(b"RIFF" + b"\1" * 4000).decode()
    block = {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}
    added = STRICT.input_tokens([HumanMessage(content=[block])]) - STRICT.input_tokens([HumanMessage(content=[])])
    assert added >= len(audio)
    assert TYPICAL.input_tokens([HumanMessage(content=[block])]) > TYPICAL.input_tokens([HumanMessage(content=[])])


# -- tools, tool calls -----------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [STRICT, TYPICAL], ids=["strict", "typical"])
@pytest.mark.parametrize("tool_spec", [GetWeather, lookup_order,
                                       {"name": "get_time", "description": "Current time in a zone",
                                        "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}}],
                         ids=["pydantic", "tool", "anthropic-dict"])
def test_tool_schemas_add_tokens(estimator, tool_spec):
    messages = [HumanMessage("What's the weather in Paris?")]
    assert estimator.input_tokens(messages, [tool_spec]) > estimator.input_tokens(messages) + 10
    assert estimator.input_tokens(messages, [tool_spec, tool_spec]) > estimator.input_tokens(messages, [tool_spec])


def test_strict_tool_schema_counts_its_json_and_tool_use_prompt():
    from langchain_core.utils.function_calling import convert_to_openai_tool

    messages = [HumanMessage("hi")]
    schema_bytes = len(json.dumps(convert_to_openai_tool(GetWeather)).encode())
    added = STRICT.input_tokens(messages, [GetWeather]) - STRICT.input_tokens(messages)
    assert added >= schema_bytes + 530  # Anthropic's hidden tool-use system prompt: up to ~530 tokens


def test_server_tools_cost_more_than_their_declaration():
    messages = [HumanMessage("search the news")]
    server = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    for estimator in (STRICT, TYPICAL):
        added = estimator.input_tokens(messages, [server]) - estimator.input_tokens(messages)
        assert added > estimator.input_tokens(messages, [{"name": "web_search", "input_schema": {}}]) - \
            estimator.input_tokens(messages)


def test_response_format_counts_without_tool_overhead():
    messages = [HumanMessage("a joke")]
    fmt = {"type": "json_schema", "json_schema": {"name": "Joke", "schema": GetWeather.model_json_schema()}}
    for estimator in (STRICT, TYPICAL):
        as_format = estimator.input_tokens(messages, [fmt]) - estimator.input_tokens(messages)
        as_tool = estimator.input_tokens(messages, [GetWeather]) - estimator.input_tokens(messages)
        assert 0 < as_format < as_tool


@pytest.mark.parametrize("estimator", [STRICT, TYPICAL], ids=["strict", "typical"])
def test_tool_calls_and_tool_results_are_counted(estimator):
    small = AIMessage("", tool_calls=[{"name": "GetWeather", "args": {"location": "Paris"}, "id": "c1"}])
    large = AIMessage("", tool_calls=[{"name": "GetWeather", "args": {"location": "Paris " * 200}, "id": "c1"}])
    empty = AIMessage("")
    assert estimator.input_tokens([small]) > estimator.input_tokens([empty])
    assert estimator.input_tokens([large]) >= estimator.input_tokens([small]) + len("Paris " * 199) // 4

    result = "The weather in Paris is 22C and sunny. " * 30
    assert estimator.input_tokens([ToolMessage(result, tool_call_id="c1")]) >= estimator.output_tokens(result)
    blocks = ToolMessage([{"type": "text", "text": result}], tool_call_id="c1")
    assert estimator.input_tokens([blocks]) >= estimator.output_tokens(result)

    legacy = AIMessage("", additional_kwargs={"function_call": {"name": "f", "arguments": json.dumps({"q": result})}})
    assert estimator.input_tokens([legacy]) >= estimator.output_tokens(result)


def test_tool_use_blocks_and_tool_calls_are_one_call():
    args = {"location": "Paris " * 100}
    block = {"type": "tool_use", "id": "toolu_1", "name": "GetWeather", "input": args}
    both = AIMessage(content=[block], tool_calls=[{"name": "GetWeather", "args": args, "id": "toolu_1"}])
    only_calls = AIMessage("", tool_calls=[{"name": "GetWeather", "args": args, "id": "toolu_1"}])
    # Anthropic's message shape carries the call twice; the provider sends it once.
    assert TYPICAL.input_tokens([both]) < 1.2 * TYPICAL.input_tokens([only_calls])
    assert STRICT.input_tokens([both]) >= STRICT.input_tokens([only_calls])


def test_thinking_and_unknown_blocks_count_their_text():
    thought = "Let me think about the weather carefully. " * 20
    msg = AIMessage(content=[{"type": "thinking", "thinking": thought, "signature": "sig"},
                             {"type": "mystery", "payload": {"note": thought}}])
    for estimator in (STRICT, TYPICAL):
        assert estimator.input_tokens([msg]) >= 2 * estimator.output_tokens(thought)


# -- output caps -----------------------------------------------------------------------------


def test_default_max_output_tokens():
    assert DEFAULT_MAX_OUTPUT_TOKENS == 4096


def test_max_output_tokens_from_model_fields_and_bindings():
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-4o-mini", api_key="x", max_tokens=100)
    assert max_output_tokens(llm) == 100
    assert max_output_tokens(llm.bind(max_tokens=5)) == 5
    assert max_output_tokens(llm.bind(max_tokens=5), {"max_tokens": 7}) == 7
    assert max_output_tokens(llm, {"max_completion_tokens": 9}) == 9
    assert max_output_tokens(llm.bind_tools([GetWeather]).bind(max_tokens=3)) == 3
    assert max_output_tokens(ChatOpenAI(model="gpt-4o-mini", api_key="x")) is None


def test_max_output_tokens_from_model_kwargs():
    class Model:
        max_tokens = None
        model_kwargs = {"max_new_tokens": 11}

    assert max_output_tokens(Model()) == 11


def test_outer_binding_wins_over_inner():
    from langchain_core.runnables import RunnableBinding
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-4o-mini", api_key="x", max_tokens=100)
    inner = RunnableBinding(bound=llm, kwargs={"max_tokens": 50})
    outer = RunnableBinding(bound=inner, kwargs={"max_tokens": 20})
    assert max_output_tokens(outer) == 20
    assert max_output_tokens(RunnableBinding(bound=inner, kwargs={"temperature": 0})) == 50


def test_max_output_tokens_from_anthropic_default():
    from langchain_anthropic import ChatAnthropic

    llm = ChatAnthropic(model="claude-3-haiku-20240307", api_key="x")
    default = llm._get_ls_params()["ls_max_tokens"]
    assert isinstance(default, int) and default > 0
    assert max_output_tokens(llm) == default


def test_max_output_tokens_from_ls_params_only():
    class Model:
        def _get_ls_params(self):
            return {"ls_max_tokens": 321}

    assert max_output_tokens(Model()) == 321


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict",
                                 "maxTokens"])
def test_max_output_tokens_call_kwarg_names(key):
    assert max_output_tokens(object(), {key: 64}) == 64


@pytest.mark.parametrize("garbage", [0, -1, -2, None, True, "lots", 1.5e400, float("nan"), [10]])
def test_garbage_caps_are_ignored(garbage):
    class Model:
        max_tokens = garbage
        num_predict = garbage

    assert max_output_tokens(Model(), {"max_tokens": garbage}) is None
    assert max_output_tokens(Model(), {"max_tokens": garbage, "num_predict": 12}) == 12


def test_non_positive_num_predict_falls_back():
    class Ollama:
        num_predict = -1  # Ollama: generate until done

        def _get_ls_params(self):
            return {"ls_max_tokens": -1}

    assert max_output_tokens(Ollama()) is None


# -- tools bound on a call -------------------------------------------------------------------


def test_tools_of_bindings_and_call_kwargs():
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-4o-mini", api_key="x")
    assert tools_of(llm) == []
    bound = llm.bind_tools([GetWeather, lookup_order])
    names = [t["function"]["name"] for t in tools_of(bound)]
    assert names == ["GetWeather", "lookup_order"]
    override = [{"type": "function", "function": {"name": "other", "parameters": {}}}]
    assert tools_of(bound, {"tools": override}) == override
    legacy = {"name": "f", "parameters": {"type": "object", "properties": {}}}
    assert tools_of(llm.bind(functions=[legacy])) == [legacy]


def test_tools_of_includes_structured_output_schemas():
    from langchain_anthropic import ChatAnthropic
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-4o-mini", api_key="x")
    binding = llm.with_structured_output(GetWeather).first  # binds response_format=GetWeather
    (fmt,) = tools_of(binding)
    assert fmt["type"] == "json_schema" and "location" in json.dumps(fmt)

    claude = ChatAnthropic(model="claude-sonnet-4-5", api_key="x")
    binding = claude.with_structured_output(GetWeather, method="json_schema").first
    (fmt,) = tools_of(binding)
    assert fmt["type"] == "json_schema" and "location" in json.dumps(fmt)

    messages = [HumanMessage("weather?")]
    assert STRICT.input_tokens(messages, tools_of(binding)) > STRICT.input_tokens(messages)


# -- choosing an estimator -------------------------------------------------------------------


def test_get_estimator_builtins():
    assert get_estimator("strict").mode == "strict"
    assert isinstance(get_estimator("strict"), StrictEstimator)
    assert isinstance(get_estimator(" Typical "), TypicalEstimator)


def test_get_estimator_accepts_pluggable_objects():
    class Flat:
        mode = "typical"

        def input_tokens(self, messages, tools=None):
            return 100

        def output_tokens(self, text):
            return 1

    flat = Flat()
    assert get_estimator(flat) is flat
    assert estimate_input_tokens(flat, [HumanMessage("hi")], None, model="gpt-4o") == 100
    msgs = [HumanMessage(content=[{"type": "image_url", "image_url": {"url": "https://x/a.png"}}])]
    assert estimate_input_tokens(STRICT, msgs, None, model="gpt-4o-mini") == STRICT.input_tokens(
        msgs, model="gpt-4o-mini")


@pytest.mark.parametrize("spec", ["fast", "", 3, None, object(), StrictEstimator])
def test_get_estimator_rejects_anything_else(spec):
    with pytest.raises(ValueError, match="strict") as info:
        get_estimator(spec)
    assert "typical" in str(info.value)


def test_get_estimator_rejects_objects_without_a_mode():
    class NoMode:
        def input_tokens(self, messages, tools=None):
            return 1

        def output_tokens(self, text):
            return 1

    with pytest.raises(ValueError, match="mode"):
        get_estimator(NoMode())


# -- output caps: who set them, the model's limit, the kwarg to send --------------------------

def _anthropic(**kwargs):
    from langchain_anthropic import ChatAnthropic

    return ChatAnthropic(api_key="x", **kwargs)


def _openai(**kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(api_key="x", **kwargs)


def test_anthropic_default_max_tokens_is_the_integration_default():
    from langchain_budgetguard.caps import model_output_limit, output_cap, output_cap_kwarg

    for model, limit in (("claude-sonnet-4-5", 64_000), ("claude-opus-4-6", 128_000)):
        llm = _anthropic(model=model)
        assert llm.max_tokens == limit  # ChatAnthropic filled it in from the profile
        cap = output_cap(llm)
        assert (cap.tokens, cap.source, cap.kwarg, cap.model_limit) == (limit, "integration_default", "max_tokens",
                                                                        limit)
        assert not cap.user_set
        assert model_output_limit(llm) == limit and output_cap_kwarg(llm) == "max_tokens"
    # A model without a profile: ChatAnthropic's fallback of 4,096 is its default too.
    cap = output_cap(_anthropic(model="claude-3-haiku-20240307"))
    assert (cap.tokens, cap.source, cap.model_limit) == (4096, "integration_default", None)


def test_anthropic_caps_the_user_set_are_theirs():
    from langchain_budgetguard.caps import output_cap

    llm = _anthropic(model="claude-opus-4-6", max_tokens=1000)
    assert (output_cap(llm).tokens, output_cap(llm).source) == (1000, "model")
    bound = llm.bind(max_tokens=200)
    assert (output_cap(bound).tokens, output_cap(bound).source, output_cap(bound).kwarg) == (200, "binding",
                                                                                           "max_tokens")
    call = output_cap(bound, {"max_tokens": 50})
    assert (call.tokens, call.source, call.model_limit) == (50, "call", 128_000)
    # Binding the full limit is how a user keeps it: bindings are never read as defaults.
    full = output_cap(_anthropic(model="claude-opus-4-6").bind(max_tokens=128_000))
    assert (full.tokens, full.source) == (128_000, "binding")
    # Tools bound on top do not hide the default.
    tooled = output_cap(_anthropic(model="claude-sonnet-4-5").bind_tools([GetWeather]))
    assert (tooled.tokens, tooled.source) == (64_000, "integration_default")


def test_openai_caps_and_kwarg():
    from langchain_budgetguard.caps import model_output_limit, output_cap, output_cap_kwarg

    plain = _openai(model="gpt-4o")
    cap = output_cap(plain)
    assert (cap.tokens, cap.source, cap.kwarg, cap.model_limit) == (None, "none", "max_tokens", 16_384)
    assert model_output_limit(_openai(model="o3-mini")) == 100_000
    assert (output_cap(_openai(model="gpt-4o", max_tokens=300)).source) == "model"
    set_via_alias = output_cap(_openai(model="gpt-5", max_completion_tokens=100))
    assert (set_via_alias.tokens, set_via_alias.source, set_via_alias.kwarg) == (100, "model", "max_completion_tokens")
    bound = _openai(model="gpt-4o").bind(max_completion_tokens=77)
    assert output_cap_kwarg(bound) == "max_completion_tokens"
    assert (output_cap(bound).tokens, output_cap(bound).source) == (77, "binding")
    assert output_cap_kwarg(object()) is None and output_cap(object()).source == "none"


@pytest.mark.parametrize("make", [lambda: _openai(model="gpt-4o", max_tokens=9000),
                                  lambda: _openai(model="gpt-4o", use_responses_api=True, max_tokens=9000),
                                  lambda: _anthropic(model="claude-opus-4-6")])
def test_the_kwarg_sets_the_cap_the_provider_receives(make):
    """The guard sends ``{output_cap_kwarg(llm): n}`` with the call: it must win over the model's own cap."""
    from langchain_budgetguard.caps import output_cap_kwarg

    llm = make()
    kwarg = output_cap_kwarg(llm)
    payload = llm._get_request_payload([HumanMessage("hi")], **{kwarg: 123})
    caps = {k: v for k, v in payload.items() if k in ("max_tokens", "max_completion_tokens", "max_output_tokens")}
    assert list(caps.values()) == [123], caps


def test_call_estimate_breakdown_names_the_dominant_part():
    from langchain_budgetguard.estimate import estimate_call

    llm = _anthropic(model="claude-opus-4-6")
    est = estimate_call(STRICT, [HumanMessage("hi")], llm, default_max_output_tokens=4096)
    assert est.output_cap.source == "integration_default" and est.output_cap.tokens == 128_000
    assert est.reserved_output_tokens == 4096 and est.send_cap == {"max_tokens": 4096}
    assert est.input_tokens < 100 and est.dominant == "output"
    assert "max_tokens=128,000" in est.describe() and "4,096" in est.describe()
    mine = estimate_call(STRICT, [HumanMessage("hi")], llm.bind(max_tokens=90_000), default_max_output_tokens=4096)
    assert mine.reserved_output_tokens == 90_000 and mine.send_cap is None and mine.output_cap.source == "binding"
    big = estimate_call(STRICT, [HumanMessage("word " * 20_000)], _openai(model="gpt-4o", max_tokens=50),
                        default_max_output_tokens=4096)
    assert big.dominant == "input" and big.reserved_output_tokens == 50 and big.send_cap is None
    # Never more than the model can produce, even when the default is larger.
    small_model = estimate_call(STRICT, [HumanMessage("hi")], _anthropic(model="claude-3-haiku-20240307"),
                                default_max_output_tokens=8192)
    # No profile: the integration's own default (4,096, claude-3-haiku's real limit) is the ceiling.
    assert small_model.reserved_output_tokens == 4096 and small_model.send_cap == {"max_tokens": 4096}
    gpt4o = estimate_call(STRICT, [HumanMessage("hi")], _openai(model="gpt-4o"), default_max_output_tokens=50_000)
    assert gpt4o.reserved_output_tokens == 16_384 and gpt4o.send_cap == {"max_tokens": 16_384}
    with pytest.raises(ValueError, match="default_max_output_tokens"):
        estimate_call(STRICT, [HumanMessage("hi")], llm, default_max_output_tokens=0)


def test_output_tokens_of_a_cut_stream_with_the_model():
    from langchain_budgetguard.estimate import estimate_output_tokens
    from langchain_budgetguard.tokenizers import exact_family

    text = "A reply that was cut off halfway through its second sentence. Привет"
    assert estimate_output_tokens(STRICT, text) == STRICT.output_tokens(text)
    family = exact_family("gpt-4o")
    if family is not None:
        exact = estimate_output_tokens(STRICT, text, "gpt-4o")
        assert family.count(text) <= exact < STRICT.output_tokens(text)
    assert estimate_output_tokens(TYPICAL, text, "gpt-4o") == TYPICAL.output_tokens(text)
    assert estimate_output_tokens(STRICT, "", "gpt-4o") == 0
