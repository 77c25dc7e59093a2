"""A callback handler that raises after the model answered must not make the call free.

LangChain re-raises an error of a handler with ``raise_error=True``. One that raises in
``on_llm_end`` turns a call the provider answered, and billed, into an exception, and it has seen
the reply (it may keep it). The guard treated every exception of the model step as a call that
failed before any output and charged $0: the attack got the reply and a free call on invoke,
ainvoke, batch and generate. The guard now sees the reply first and charges it.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler, CallbackManager
from langchain_core.messages import HumanMessage

from langchain_budgetguard import BudgetGuard
from langchain_budgetguard.pricing import Pricer

from tests.fakes import UsageChat
from tests.providers.canned_server import CannedServer

from .test_billed_items import canned, chat_openai, server  # noqa: F401 - the canned server's fixtures

ONE_CALL = Decimal("0.0000066")  # gpt-4o-mini, 8 input + 9 output tokens


class KeepsAndRaises(BaseCallbackHandler):
    raise_error = True

    def __init__(self, when: str = "end") -> None:
        super().__init__()
        self.when, self.kept = when, []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        if self.when == "start":
            raise RuntimeError("handler failed")

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.kept.append(response.generations[0][0].message)
        if self.when == "end":
            raise RuntimeError("handler failed")


class AsyncKeepsAndRaises(AsyncCallbackHandler):
    raise_error = True
    run_inline = True  # inline handlers run first, in order: the guard's tap must still see the reply

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[Any] = []

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.kept.append(response.generations[0][0].message)
        raise RuntimeError("handler failed")


def run(guard: BudgetGuard, how: str, config: dict[str, Any]) -> None:
    if how == "invoke":
        guard.invoke("hello", config)
    elif how == "ainvoke":
        asyncio.run(guard.ainvoke("hello", config))
    elif how == "batch":
        guard.batch(["hello", "hi"], config)
    elif how == "abatch":
        asyncio.run(guard.abatch(["hello", "hi"], config))
    elif how == "stream":
        list(guard.stream("hello", config))
    elif how == "astream":
        async def drain() -> None:
            async for _ in guard.astream("hello", config):
                pass
        asyncio.run(drain())
    elif how == "generate":
        guard.generate([[HumanMessage("hello")], [HumanMessage("hi")]], callbacks=config.get("callbacks"))
    else:
        asyncio.run(guard.agenerate([[HumanMessage("hello")], [HumanMessage("hi")]], callbacks=config.get("callbacks")))


CALLS = {"batch": 2, "abatch": 2, "generate": 2, "agenerate": 2}
WAYS = ["invoke", "ainvoke", "batch", "abatch", "stream", "astream", "generate", "agenerate"]


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("as_manager", [False, True], ids=["list", "manager"])
def test_a_handler_raising_after_the_reply_does_not_make_the_call_free(how: str, as_manager: bool) -> None:
    model = UsageChat()
    guard = BudgetGuard(model, limit=1)
    thief = KeepsAndRaises()
    callbacks: Any = CallbackManager(handlers=[thief], inheritable_handlers=[thief]) if as_manager else [thief]
    with pytest.raises(RuntimeError, match="handler failed"):
        run(guard, how, {"callbacks": callbacks})
    calls = CALLS.get(how, 1)
    assert model.calls >= 1 and len(thief.kept) >= 1  # the model answered, the handler has the reply
    (status,) = guard.status()
    assert status.held == 0
    assert status.spent == ONE_CALL * model.calls and model.calls <= calls


@pytest.mark.parametrize("how", ["ainvoke", "abatch", "agenerate"])
def test_an_async_inline_handler_raising_after_the_reply_does_not_make_the_call_free(how: str) -> None:
    model = UsageChat()
    guard = BudgetGuard(model, limit=1)
    thief = AsyncKeepsAndRaises()
    with pytest.raises(RuntimeError, match="handler failed"):
        run(guard, how, {"callbacks": [thief]})
    assert thief.kept
    (status,) = guard.status()
    assert status.held == 0 and status.spent == ONE_CALL * model.calls > 0


def test_a_handler_raising_before_the_request_costs_nothing() -> None:
    model = UsageChat()
    guard = BudgetGuard(model, limit=1)
    with pytest.raises(RuntimeError, match="handler failed"):
        guard.invoke("hello", {"callbacks": [KeepsAndRaises("start")]})
    assert model.calls == 0
    (status,) = guard.status()
    assert status.spent == 0 and status.held == 0


def test_handlers_still_see_one_model_run_and_the_guard_adds_none_to_the_callers_list() -> None:
    seen: list[Any] = []

    class Ends(BaseCallbackHandler):
        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            seen.append(response)

    handlers = [Ends()]
    guard = BudgetGuard(UsageChat(), limit=1)
    guard.invoke("hello", {"callbacks": handlers})
    guard.batch(["a", "b"], {"callbacks": handlers})
    assert len(seen) == 3 and len(handlers) == 1


def test_the_real_openai_client_with_a_raising_handler_is_charged_its_reply(server: CannedServer) -> None:
    from .test_tool_fees import MODEL, USAGE, TOKENS, genai, reply

    server.push(reply())
    llm = chat_openai(server, MODEL, use_responses_api=True)
    guard = BudgetGuard(llm, limit=1, pricer=Pricer(hosts={server.url: "openai"}))
    thief = KeepsAndRaises()
    with pytest.raises(RuntimeError, match="handler failed"):
        guard.invoke("hello", {"callbacks": [thief]}, max_tokens=100)
    assert thief.kept[0].usage_metadata["input_tokens"] == USAGE["input_tokens"]
    (status,) = guard.status()
    assert status.held == 0 and status.spent == genai(TOKENS, MODEL, "openai")


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "batch", "abatch", "generate", "agenerate"])
def test_a_wrapped_chain_whose_step_after_the_model_raises_is_charged_for_the_reply(how: str) -> None:
    """A guard may wrap a chain (priced by prices=/fallback_price=): a parser after the model that
    fails on the reply (a prompt that makes the model answer malformed JSON) raised after the provider
    had billed, with no handler in sight, and every such call was free."""
    from langchain_core.runnables import RunnableLambda

    def parse(_: Any) -> Any:
        raise ValueError("could not parse the reply")

    model = UsageChat()
    guard = BudgetGuard(model | RunnableLambda(parse), limit=1,
                        fallback_price={"input": "0.15", "output": "0.60"})  # gpt-4o-mini's list price
    with pytest.raises(ValueError, match="could not parse"):
        run(guard, how, {"callbacks": None})
    (status,) = guard.status()
    assert model.calls >= 1
    assert status.held == 0 and status.spent == ONE_CALL * model.calls


def test_a_plain_model_without_handlers_gets_no_tap() -> None:
    """The tap costs a callback manager: a bare model with no handler, where nothing can raise after
    its reply, is called with the caller's config untouched."""
    from langchain_budgetguard.runs import tap_reply

    config: dict[str, Any] = {"tags": ["x"]}
    assert tap_reply(config) == (config, None)
    assert tap_reply(None) == (None, None)
    # a handler whose errors LangChain only logs cannot end the call: each handler costs every
    # call LangChain's per-handler checks (a protocol isinstance), so none is added for it
    quiet = {"callbacks": [BaseCallbackHandler()]}
    assert tap_reply(quiet) == (quiet, None)
    manager = CallbackManager(handlers=[KeepsAndRaises()])
    tapped_manager, reply = tap_reply({"callbacks": manager})
    assert reply is not None and tapped_manager["callbacks"].handlers[0] is reply
    assert manager.handlers[0] is not reply  # the caller's manager is left as it was
    tapped_config, reply = tap_reply(None, always=True)
    assert reply is not None and tapped_config == {"callbacks": [reply]}


def test_a_raising_handler_the_wrapped_model_carries_does_not_make_calls_free() -> None:
    """A model's own callbacks run after the call's (LangChain's order), so the tap still comes first.
    (One bound with ``with_config(callbacks=...)`` runs before the call's: README.)"""
    thief = KeepsAndRaises()
    guard = BudgetGuard(UsageChat(callbacks=[thief]), limit=1)
    with pytest.raises(RuntimeError, match="handler failed"):
        guard.invoke("hello")
    assert thief.kept
    (status,) = guard.status()
    assert status.held == 0 and status.spent == ONE_CALL


def _structured_reply(finish_reason: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": '{"text": "aaaa'}}],
            "usage": {"prompt_tokens": 5000, "completion_tokens": 2000, "total_tokens": 7000}}


@pytest.mark.parametrize("finish_reason, error", [("length", "LengthFinishReasonError"),
                                                   ("content_filter", "ContentFilterFinishReasonError")])
@pytest.mark.parametrize("where", ["guard", "enforce_budget"])
def test_a_structured_reply_the_sdk_cannot_parse_is_charged_its_usage(
    server: CannedServer, finish_reason: str, error: str, where: str
) -> None:
    """``invoke(..., response_format=Model)``: the OpenAI SDK parses the reply itself and raises when
    the output hit its cap or was filtered, after the provider billed it. A prompt asking for a long
    structured answer made every such call free; the error carries the billed completion."""
    from pydantic import BaseModel

    from langchain_budgetguard import enforce_budget

    from .test_billed_items import genai

    class Answer(BaseModel):
        text: str

    server.push(_structured_reply(finish_reason))
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-4o-mini", base_url=server.url + "/v1", api_key="test", max_retries=0)
    pricer = Pricer(hosts={server.url: "openai"})
    if where == "guard":
        budget = BudgetGuard(llm, limit=1, pricer=pricer)
        with pytest.raises(Exception) as raised:
            budget.invoke("a long essay as JSON", response_format=Answer, max_tokens=2000)
    else:
        budget = BudgetGuard(limit=1, pricer=pricer)
        with enforce_budget(budget), pytest.raises(Exception) as raised:
            llm.invoke("a long essay as JSON", response_format=Answer, max_tokens=2000)
    assert type(raised.value).__name__ == error
    (status,) = budget.status()
    assert status.held == 0
    assert status.spent == genai({"input_tokens": 5000, "output_tokens": 2000}, "gpt-4o-mini", "openai")


class AsyncGatheredRaises(AsyncCallbackHandler):
    """Not inline: LangChain gathers it with the other async handlers, after the inline ones."""

    raise_error = True

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        raise RuntimeError("handler failed")


class ThreadedRaises(KeepsAndRaises):
    run_inline = False  # a sync handler an async manager runs in a thread


@pytest.mark.parametrize("how", WAYS)
def test_a_raising_handler_bound_inside_the_wrapped_model_does_not_make_the_call_free(how: str) -> None:
    """``llm.with_config(callbacks=[h])``: the binding's handlers are merged ahead of the call's, so
    no handler the guard adds could see the reply first. It is read from the error's traceback."""
    thief = KeepsAndRaises()
    model = UsageChat()
    guard = BudgetGuard(model.with_config(callbacks=[thief]), limit=1)
    with pytest.raises(RuntimeError, match="handler failed"):
        run(guard, how, {})
    assert thief.kept and model.calls >= 1
    (status,) = guard.status()
    assert status.held == 0 and status.spent == ONE_CALL * model.calls


@pytest.mark.parametrize("handler", [AsyncGatheredRaises, ThreadedRaises])
@pytest.mark.parametrize("how", ["ainvoke", "abatch", "astream", "agenerate"])
def test_an_async_handler_run_after_the_inline_ones_raising_is_charged(how: str, handler: type) -> None:
    model = UsageChat()
    guard = BudgetGuard(model, limit=1)
    with pytest.raises(RuntimeError, match="handler failed"):
        run(guard, how, {"callbacks": [handler()]})
    (status,) = guard.status()
    assert model.calls >= 1
    assert status.held == 0 and status.spent == ONE_CALL * model.calls


def test_a_raise_chained_from_the_handlers_error_is_still_charged() -> None:
    """A caller that turns the handler's error into its own (``raise X from e``) keeps the cause."""
    from langchain_core.runnables import RunnableLambda

    model = UsageChat(callbacks=[KeepsAndRaises()])

    def call(text: str) -> Any:
        try:
            return model.invoke(text)
        except RuntimeError as error:
            raise LookupError("wrapped") from error

    guard = BudgetGuard(RunnableLambda(call), limit=1, fallback_price={"input": "0.15", "output": "0.60"})
    with pytest.raises(LookupError):
        guard.invoke("hello")
    (status,) = guard.status()
    assert status.held == 0 and status.spent == ONE_CALL


def test_llm_ends_in_finds_only_a_reply_being_delivered() -> None:
    from langchain_budgetguard.failures import billed_unknown, llm_ends_in, reply_in_error

    model = UsageChat(callbacks=[KeepsAndRaises()])
    with pytest.raises(RuntimeError) as raised:
        model.invoke("hello")
    ((run_id, response),) = llm_ends_in(raised.value)
    assert run_id is not None and response.generations[0][0].message.usage_metadata["output_tokens"] == 9
    assert reply_in_error(raised.value) is response.generations[0][0].message
    assert billed_unknown(raised.value)
    with pytest.raises(RuntimeError) as before:
        UsageChat(callbacks=[KeepsAndRaises("start")]).invoke("hello")
    assert llm_ends_in(before.value) == [] and reply_in_error(before.value) is None
    assert not billed_unknown(before.value)


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream"])
def test_enforce_budget_charges_a_call_a_handler_ahead_of_it_failed_on(how: str) -> None:
    """The enforcer's handler comes after the caller's: a raising one keeps the reply from it, and
    the call was released uncharged. The error leaving the block holds the reply."""
    from langchain_budgetguard import enforce_budget

    model = UsageChat()
    budget = BudgetGuard(limit=1)
    with pytest.raises(RuntimeError, match="handler failed"), enforce_budget(budget, user_id="u1"):
        config = {"callbacks": [KeepsAndRaises()]}
        if how == "invoke":
            model.invoke("hello", config)
        elif how == "ainvoke":
            asyncio.run(model.ainvoke("hello", config))
        else:
            list(model.stream("hello", config))
    (status,) = budget.status(user_id="u1")
    assert model.calls >= 1
    assert status.held == 0 and status.spent == ONE_CALL * model.calls
