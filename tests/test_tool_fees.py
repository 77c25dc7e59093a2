"""Server tools that bill a fee genai-prices has no price for: OpenAI's code_interpreter and image_generation.

A Responses call that runs code pays for a container (OpenAI: $0.03 for the default 1 GB, more for
larger ones), and one that makes an image pays the image model for each picture (about $0.01-0.25):
dozens of times the tokens of a short call. genai-prices lists neither, so the guard held and
charged the tokens only, and a budget paid for none of it. Now such a fee is priced by
``tool_fees={"code_interpreter": ..., "image_generation": ...}`` (USD per use), held before the
call and charged from the reply's own items; without a fee the call is refused, never counted as $0.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from langchain_budgetguard import BudgetExceededError, BudgetGuard, get_cost_callback
from langchain_budgetguard.errors import UnknownModelPriceError
from langchain_budgetguard.pricing import ModelRef, Pricer, item_bound
from langchain_budgetguard.usage import TokenUsage, usage_from_message

from tests.providers.canned_server import CannedServer

from .test_billed_items import canned, chat_openai, genai, responses_body, server  # noqa: F401 - fixtures

MODEL = "gpt-4.1-mini"
CODE = {"type": "code_interpreter", "container": {"type": "auto"}}
IMAGES = {"type": "image_generation", "quality": "low"}
USAGE = {"input_tokens": 500, "output_tokens": 40, "total_tokens": 540,
         "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
TOKENS = {"input_tokens": 500, "output_tokens": 40}
ANSWER = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
          "content": [{"type": "output_text", "text": "done", "annotations": []}]}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def code_run(i: int, container: str) -> dict[str, Any]:
    return {"type": "code_interpreter_call", "id": f"ci_{i}", "status": "completed", "code": f"print({i})",
            "container_id": container, "outputs": [{"type": "logs", "logs": str(i)}]}


def image_call(i: int) -> dict[str, Any]:
    return {"type": "image_generation_call", "id": f"ig_{i}", "status": "completed", "result": PNG,
            "output_format": "png", "quality": "low", "size": "1024x1024", "revised_prompt": "a cat"}


def reply(*items: dict[str, Any]) -> dict[str, Any]:
    body = responses_body(MODEL, [*items, ANSWER], USAGE)
    body["tools"] = [CODE, IMAGES]
    return body


def tokens_usd() -> Decimal:
    return genai(TOKENS, MODEL, "openai")


def pricer(**fees: str) -> Pricer:
    return Pricer(hosts={"127.0.0.1": "openai"}, tool_fees=fees or None)  # the local server bills as OpenAI


@pytest.mark.parametrize("output_version", [None, "responses/v1", "v1"])
def test_a_reply_counts_its_code_containers_and_generated_images(
    server: CannedServer, output_version: str | None
) -> None:
    # three runs in two containers (the fee is per container), two images
    server.push(reply(code_run(1, "cntr_a"), code_run(2, "cntr_a"), code_run(3, "cntr_b"),
                      image_call(1), image_call(2)))
    extra = {"output_version": output_version} if output_version else {}
    message = chat_openai(server, MODEL, use_responses_api=True, **extra).bind_tools([CODE, IMAGES]).invoke("go")
    usage = usage_from_message(message)
    assert usage is not None
    assert (usage.containers, usage.generated_images) == (2, 2)
    assert (usage.input_tokens, usage.output_tokens) == (500, 40)


def test_fees_are_priced_per_use_on_top_of_the_tokens() -> None:
    card = Pricer(tool_fees={"code_interpreter": "0.03", "image_generation": Decimal("0.011")}).rate_card(
        ModelRef(MODEL, "openai"))
    plain = TokenUsage(500, 40)
    assert card.cost(plain) == tokens_usd()
    assert card.cost(TokenUsage(500, 40, containers=2, generated_images=3)) == tokens_usd() + Decimal("0.093")
    assert card.prices["code_interpreter_each"] == Decimal("0.03")
    assert card.prices["image_generation_each"] == Decimal("0.011")
    # a priority-tier variant keeps the fees
    assert card.variant(service_tier="priority").cost(TokenUsage(0, 0, containers=1)) == Decimal("0.03")
    # the dearest items are held first under a max_tool_calls cap
    assert card.item_hold_nano(containers=1, generated_images=10) == 140_000_000
    assert card.item_hold_nano(containers=1, generated_images=10, max_calls=2) == 41_000_000
    assert card.item_hold_nano(containers=1, generated_images=10, max_calls=0) == 0
    free = Pricer(tool_fees={"code_interpreter": 0}).rate_card(ModelRef(MODEL, "openai"))
    assert free.cost(TokenUsage(500, 40, containers=4)) == tokens_usd()  # billed elsewhere, said so


def test_without_a_fee_a_container_or_image_is_refused_never_free() -> None:
    card = Pricer().rate_card(ModelRef(MODEL, "openai"))
    for usage, what in ((TokenUsage(1, 1, containers=1), "code containers.*code_interpreter"),
                        (TokenUsage(1, 1, generated_images=1), "generated images.*image_generation")):
        with pytest.raises(UnknownModelPriceError, match=what):
            card.cost_nano(usage)
    with pytest.raises(UnknownModelPriceError, match='tool_fees=\\{"code_interpreter": "0.03"\\}'):
        card.item_hold_nano(containers=1)
    overridden = Pricer({"my-model": {"input": 1, "output": 1}}).rate_card(ModelRef("my-model"))
    with pytest.raises(UnknownModelPriceError):
        overridden.cost_nano(TokenUsage(1, 1, generated_images=1))
    assert Pricer({"my-model": {"input": 1, "output": 1}}, tool_fees={"image_generation": "0.2"}).rate_card(
        ModelRef("my-model")).cost(TokenUsage(0, 0, generated_images=1)) == Decimal("0.2")


def test_a_guarded_code_run_without_a_fee_is_refused_before_the_call(server: CannedServer) -> None:
    llm = chat_openai(server, MODEL, use_responses_api=True).bind_tools([CODE])
    with pytest.raises(UnknownModelPriceError, match="code_interpreter"):
        BudgetGuard(llm, limit=5, pricer=pricer()).invoke("plot it", max_tokens=100)
    assert server.requests == []


def test_a_guarded_code_run_is_held_and_charged_for_its_container(server: CannedServer) -> None:
    """The attack: the tokens of a short code run cost $0.0003 and its container $0.03. Held and charged
    as tokens only, a $0.02 budget served it and paid for none of the container."""
    llm = chat_openai(server, MODEL, use_responses_api=True).bind_tools([CODE])
    with pytest.raises(BudgetExceededError):
        BudgetGuard(llm, limit=Decimal("0.02"), pricer=pricer(code_interpreter="0.03")).invoke("plot it",
                                                                                             max_tokens=100)
    assert server.requests == []
    guard = BudgetGuard(llm, limit=Decimal("0.05"), pricer=pricer(code_interpreter="0.03"))
    server.push(reply(code_run(1, "cntr_a"), code_run(2, "cntr_a")))
    meta = guard.invoke("plot it", max_tokens=100).response_metadata["budgetguard"]
    assert meta["reserved_usd"] >= Decimal("0.03")
    (status,) = guard.status()
    assert status.held == 0
    assert status.spent == meta["cost_usd"] == tokens_usd() + Decimal("0.03")


def test_generated_images_are_held_per_image_and_max_tool_calls_lowers_the_hold(server: CannedServer) -> None:
    llm = chat_openai(server, MODEL, use_responses_api=True).bind_tools([IMAGES])
    fees = pricer(image_generation="0.02")
    # the tool's use is not capped: ten images ($0.20) do not fit in $0.10
    with pytest.raises(BudgetExceededError):
        BudgetGuard(llm, limit=Decimal("0.10"), pricer=fees).invoke("draw a cat", max_tokens=100)
    assert server.requests == []
    guard = BudgetGuard(llm, limit=Decimal("0.10"), pricer=fees)
    server.push(reply(image_call(1), image_call(2)))
    meta = guard.invoke("draw a cat", max_tokens=100, max_tool_calls=2).response_metadata["budgetguard"]
    assert server.requests[0]["body"]["max_tool_calls"] == 2  # the cap the hold counted on was sent
    assert Decimal("0.04") <= meta["reserved_usd"] < Decimal("0.05")
    (status,) = guard.status()
    assert status.held == 0 and status.spent == tokens_usd() + Decimal("0.04")


def test_a_reply_billing_a_fee_nothing_prices_is_charged_its_whole_hold(server: CannedServer) -> None:
    """A reply that bills a container no bound tool announced (a gateway that adds tools): it cannot be
    priced, so the call is charged its hold, never the tokens alone."""
    llm = chat_openai(server, MODEL, use_responses_api=True)
    guard = BudgetGuard(llm, limit=1, pricer=pricer())
    server.push(reply(code_run(1, "cntr_a")))
    meta = guard.invoke("plot it", max_tokens=100).response_metadata["budgetguard"]
    (status,) = guard.status()
    assert status.held == 0
    # the reply's tokens alone cost more than the small hold: at least they are charged
    assert status.spent == meta["cost_usd"] == tokens_usd() > meta["reserved_usd"]
    assert meta["problem"] and "code containers" in meta["problem"]
    guard = BudgetGuard(llm, limit=1, pricer=pricer())
    server.push(reply(code_run(1, "cntr_a")))
    meta = guard.invoke("plot it " * 2000, max_tokens=100).response_metadata["budgetguard"]
    assert guard.status()[0].spent == meta["reserved_usd"] > tokens_usd()  # else the whole hold


def test_item_bound_counts_code_and_image_tools_and_reads_max_tool_calls() -> None:
    from langchain_anthropic import ChatAnthropic
    from langchain_openai import ChatOpenAI

    gpt = ChatOpenAI(model=MODEL, api_key="test", use_responses_api=True)
    bound = item_bound(gpt.bind_tools([CODE, IMAGES, {"type": "web_search"}]), default_uses=4)
    # nothing the call sets caps the images and searches: the guard sends max_tool_calls=4, and holds for it
    assert (bound.containers, bound.generated_images, bound.web_searches, bound.max_calls) == (1, 4, 4, 4)
    assert bound.send_max_calls == 4 and bound.uncapped == ()
    assert "image_generation" in bound.unbounded and "code_interpreter" not in bound.unbounded
    assert item_bound(gpt.bind_tools([CODE])).send_max_calls is None  # one container, whatever it runs
    assert item_bound(gpt.bind_tools([CODE]), {"max_tool_calls": 3}).max_calls == 3
    assert item_bound(gpt.bind_tools([CODE], max_tool_calls=1)).max_calls == 1
    assert item_bound(ChatOpenAI(model=MODEL, api_key="t", model_kwargs={"max_tool_calls": 2}).bind_tools(
        [CODE])).max_calls == 2
    # another client may drop a parameter it does not know: its cap is not counted on
    claude = ChatAnthropic(model="claude-sonnet-4-5", api_key="test").bind_tools(
        [{"type": "web_search_20250305", "name": "web_search"}])
    assert item_bound(claude, {"max_tool_calls": 0}).max_calls is None
    assert not item_bound(gpt)


@pytest.mark.parametrize("fees, problem", [
    ({"code_execution": "0.05"}, "unknown tool 'code_execution'"),
    ({"code_interpreter": "-0.03"}, "code_interpreter"),
    ({"code_interpreter": True}, "code_interpreter"),
    ({"image_generation": "lots"}, "image_generation"),
    (["code_interpreter"], "expected a mapping"),
])
def test_bad_tool_fees_say_what_is_wrong(fees: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Pricer(tool_fees=fees)
    with pytest.raises(ValueError, match=problem):
        BudgetGuard(limit=1, tool_fees=fees)


def test_tool_fees_and_a_pricer_are_not_both_taken() -> None:
    with pytest.raises(ValueError, match="tool_fees"):
        BudgetGuard(limit=1, pricer=Pricer(), tool_fees={"code_interpreter": "0.03"})


def test_tool_fees_reach_the_guard_from_its_options_config_and_cost_callback(tmp_path: Any) -> None:
    from langchain_core.load import dumpd, load
    from langchain_openai import ChatOpenAI

    # A store URL (never connected here): a guard on the in-process store is not serialized.
    guard = BudgetGuard(ChatOpenAI(model=MODEL, api_key="test"), limit=1, tool_fees={"code_interpreter": "0.03"},
                        store="redis://127.0.0.1:6379/0")
    ref = ModelRef(MODEL, "openai")
    assert guard.policy.pricer.rate_card(ref).cost(TokenUsage(0, 0, containers=1)) == Decimal("0.03")
    copy = load(dumpd(guard), allowed_objects=[BudgetGuard, ChatOpenAI], valid_namespaces=["langchain_budgetguard"],
                secrets_map={"OPENAI_API_KEY": "test"})
    assert copy.policy.pricer.tool_fees == {"code_interpreter": Decimal("0.03")}

    path = tmp_path / "budget.toml"
    path.write_text('[budget]\nname = "t"\n\n[[limits]]\nusd = 5\nper = "global"\nwindow = "day"\n\n'
                    '[tool_fees]\nimage_generation = "0.04"\n\n'
                    '[prices."my-model"]\ninput = 1\noutput = 2\nweb_search = "10"\nfile_search = "2.5"\n')
    from_file = BudgetGuard.from_config(None, path)
    assert from_file.policy.pricer.tool_fees == {"image_generation": Decimal("0.04")}
    mine = from_file.policy.pricer.rate_card(ModelRef("my-model"))
    assert mine.cost(TokenUsage(0, 0, web_searches=1, file_searches=2, generated_images=1)) == Decimal("0.055")
    path.write_text('[budget]\nname = "t"\n\n[[limits]]\nusd = 5\nper = "global"\nwindow = "day"\n\n'
                    '[tool_fees]\ncode_execution = "0.05"\n')
    from langchain_budgetguard.config import ConfigError

    with pytest.raises(ConfigError, match="code_execution"):
        BudgetGuard.from_config(None, path)

    with get_cost_callback(tool_fees={"code_interpreter": "0.03"}) as cb:
        assert cb is not None


def test_gemini_grounding_tools_are_held_as_the_searches_their_replies_are_charged() -> None:
    """A grounded reply (Google Search or Google Maps) is charged as a web search; a Maps tool was not
    held for, so its fee ($25 per 1,000) was spent past the hold."""
    from tests.fakes import UsageChat

    for tool in ({"google_search": {}}, {"google_maps": {}}, {"googleMaps": {"enableWidget": True}}):
        bound = item_bound(UsageChat().bind(tools=[tool]), default_uses=3)
        assert bound.web_searches == 3 and bound.unbounded == (next(iter(tool)),)
    assert not item_bound(UsageChat().bind(tools=[{"code_execution": {}}]))  # tokens only


def test_an_image_tool_nothing_caps_is_sent_the_max_tool_calls_it_is_held_for(server: CannedServer) -> None:
    """The attack: the hold counted ten images and nothing capped the call at ten. A reply of 25 images
    ($0.50) was charged past a $0.25 strict limit. Now the guard sends max_tool_calls=10, which the
    Responses API honours, and the reply's metadata says so."""
    llm = chat_openai(server, MODEL, use_responses_api=True).bind_tools([IMAGES])
    guard = BudgetGuard(llm, limit=Decimal("0.25"), pricer=pricer(image_generation="0.02"))
    server.push(reply(*[image_call(i) for i in range(10)]))
    meta = guard.invoke("draw cats", max_tokens=100).response_metadata["budgetguard"]
    assert server.requests[0]["body"]["max_tool_calls"] == 10
    assert meta["max_tool_calls"] == 10
    assert Decimal("0.20") < meta["reserved_usd"] < Decimal("0.21")
    (status,) = guard.status()
    assert status.held == 0 and status.spent == meta["cost_usd"] == tokens_usd() + Decimal("0.20")
    assert status.spent <= meta["reserved_usd"]
    # an async call is sent it too; a call's own max_tool_calls is sent as it is, none added
    import asyncio

    guard = BudgetGuard(llm, limit=1, pricer=pricer(image_generation="0.02"))
    server.push(reply(image_call(1)))
    asyncio.run(guard.ainvoke("draw a cat", max_tokens=100))
    assert server.requests[1]["body"]["max_tool_calls"] == 10
    server.push(reply(image_call(1)))
    meta = guard.invoke("draw a cat", max_tokens=100, max_tool_calls=1).response_metadata["budgetguard"]
    assert server.requests[2]["body"]["max_tool_calls"] == 1 and "max_tool_calls" not in meta


def test_a_max_tool_calls_above_ten_holds_every_image_it_allows(server: CannedServer) -> None:
    """max_tool_calls=25 lets the model make 25 images: the hold counted ten, and 25 ($0.50) went past a
    $0.25 limit. Each tool the cap covers is now held up to it."""
    llm = chat_openai(server, MODEL, use_responses_api=True).bind_tools([IMAGES])
    guard = BudgetGuard(llm, limit=Decimal("0.25"), pricer=pricer(image_generation="0.02"))
    with pytest.raises(BudgetExceededError):
        guard.invoke("draw cats", max_tokens=100, max_tool_calls=25)
    assert server.requests == []
    bound = item_bound(llm, {"max_tool_calls": 25})
    assert (bound.generated_images, bound.max_calls, bound.send_max_calls) == (25, 25, None)
    # images and searches under one cap: the dearest ten are held (ten images), never twenty uses
    both = item_bound(chat_openai(server, MODEL, use_responses_api=True).bind_tools([IMAGES, {"type": "web_search"}]))
    assert (both.generated_images, both.web_searches, both.max_calls, both.send_max_calls) == (10, 10, 10, 10)


def test_an_openai_tool_on_an_integration_that_takes_no_max_tool_calls_is_refused_in_strict_mode() -> None:
    """Nothing caps the images another client's call makes (it may drop max_tool_calls, and OpenAI
    documents no most): strict mode refuses the call before it is sent; typical mode holds ten."""
    from tests.fakes import UsageChat

    for tool in (IMAGES, {"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}):
        llm = UsageChat()
        guard = BudgetGuard(llm.bind(tools=[tool]), limit=5, tool_fees={"image_generation": "0.02"})
        with pytest.raises(UnknownModelPriceError, match="nothing caps how many times it runs"):
            guard.invoke("draw a cat", max_tokens=100)
        assert llm.calls == 0
        assert item_bound(llm.bind(tools=[tool])).uncapped == (tool["type"],)
    typical = BudgetGuard(UsageChat().bind(tools=[IMAGES]), limit=5, estimator="typical",
                          tool_fees={"image_generation": "0.02"})
    meta = typical.invoke("draw a cat", max_tokens=100).response_metadata["budgetguard"]
    assert meta["reserved_usd"] >= Decimal("0.20") and "max_tool_calls" not in meta
    # Anthropic's search tool caps itself (max_uses) and Gemini's grounding is unchanged: held, not refused
    assert item_bound(UsageChat().bind(tools=[{"type": "web_search_20250305", "max_uses": 3}])).uncapped == ()


def test_tools_in_model_kwargs_are_held_as_bound_ones(server: CannedServer) -> None:
    """The attack: ChatOpenAI(model_kwargs={"tools": [image_generation]}) sends the tool, but the hold
    read only call kwargs, bindings and extra_body: four images ($0.08) were charged past a $0.05
    limit the same tool bound with bind_tools is refused by."""
    from langchain_budgetguard.estimate import tools_of

    llm = chat_openai(server, MODEL, use_responses_api=True, model_kwargs={"tools": [IMAGES]})
    assert tools_of(llm) == [IMAGES]  # its schema is counted in the prompt too
    assert item_bound(llm).generated_images == 10
    with pytest.raises(BudgetExceededError):
        BudgetGuard(llm, limit=Decimal("0.05"), pricer=pricer(image_generation="0.02")).invoke("draw", max_tokens=100)
    assert server.requests == []
    guard = BudgetGuard(llm, limit=1, pricer=pricer(image_generation="0.02"))
    server.push(reply(*[image_call(i) for i in range(4)]))
    meta = guard.invoke("draw", max_tokens=100).response_metadata["budgetguard"]
    body = server.requests[0]["body"]
    assert body["tools"] == [IMAGES] and body["max_tool_calls"] == 10
    assert meta["reserved_usd"] > Decimal("0.20") and meta["cost_usd"] == tokens_usd() + Decimal("0.08")
    # the call's own tools are sent over them: those are what is held
    assert tools_of(llm, {"tools": [CODE]}) == [CODE]
    assert item_bound(llm, {"tools": [CODE]}).generated_images == 0


def test_a_max_tool_calls_in_extra_body_is_the_one_held(server: CannedServer) -> None:
    """The attack: max_tool_calls=2 with the call and 25 in extra_body, which the SDK sends over the
    named parameters: the provider was allowed 25 images ($0.50) while the hold counted two ($0.04)."""
    llm = chat_openai(server, MODEL, use_responses_api=True).bind_tools([IMAGES])
    fees = pricer(image_generation="0.02")
    with pytest.raises(BudgetExceededError):
        BudgetGuard(llm, limit=Decimal("0.10"), pricer=fees).invoke(
            "draw", max_tokens=100, max_tool_calls=2, extra_body={"max_tool_calls": 25})
    assert server.requests == []
    bound = item_bound(llm, {"max_tool_calls": 2, "extra_body": {"max_tool_calls": 25}})
    assert (bound.generated_images, bound.max_calls, bound.send_max_calls) == (25, 25, None)
    # a lower one there caps the hold, and the guard adds none of its own
    guard = BudgetGuard(llm, limit=Decimal("0.10"), pricer=fees)
    server.push(reply(image_call(1), image_call(2)))
    meta = guard.invoke("draw", max_tokens=100, extra_body={"max_tool_calls": 2}).response_metadata["budgetguard"]
    body = server.requests[0]["body"]
    assert body["max_tool_calls"] == 2 and "max_tool_calls" not in meta
    assert Decimal("0.04") < meta["reserved_usd"] < Decimal("0.05")
    # null there leaves the tool uncapped, and no cap the guard sends would be read: refused in strict mode
    with pytest.raises(UnknownModelPriceError, match="nothing caps"):
        guard.invoke("draw", max_tokens=100, extra_body={"max_tool_calls": None})
    assert len(server.requests) == 1
    # a model's own extra_body is read too
    own = chat_openai(server, MODEL, use_responses_api=True, extra_body={"max_tool_calls": 30}).bind_tools([IMAGES])
    assert item_bound(own, {"max_tool_calls": 1}).generated_images == 30
