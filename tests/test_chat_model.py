"""A guarded model is a chat model: every way to call it goes through the budget, nothing around it.

Each entry point LangChain offers on a ``BaseChatModel`` (and on what ``bind``, ``with_config``,
``model_copy``, ``configurable_fields`` ... return) is charged exactly once per model call, and
refused before the model is called when the budget is out. Serialization and pickling keep the
budget; attribute reads show the wrapped model's settings and never a way to call it.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import multiprocessing
import pickle
import warnings
from decimal import Decimal

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.load import dumpd, dumps, loads
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.runnables import ConfigurableField, RunnableBinding, RunnableLambda

from langchain_budgetguard import BudgetExceededError, BudgetGuard, Limit

from .fakes import UsageChat
from .redis_support import fresh_prefix, redis_url  # noqa: F401

CALL = Decimal("0.0000066")  # UsageChat: 8 input + 9 output tokens of gpt-4o-mini


def spent(guard) -> Decimal:
    return sum((s.spent for s in guard.status()), Decimal(0))


def held(guard) -> Decimal:
    return sum((s.held for s in guard.status()), Decimal(0))


def _v3(guard):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = guard.stream_events("hi", version="v3")
    return stream.output


async def _av3(guard):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = await guard.astream_events("hi", version="v3")
    return await stream


async def _av2(guard):
    return [e async for e in guard.astream_events("hi", version="v2")]


# (name, call on a guard, model calls it makes)
ENTRY_POINTS = [
    ("invoke", lambda g: g.invoke("hi"), 1),
    ("ainvoke", lambda g: asyncio.run(g.ainvoke("hi")), 1),
    ("batch", lambda g: g.batch(["hi", "ho", "hu"]), 3),
    ("abatch", lambda g: asyncio.run(g.abatch(["hi", "ho"])), 2),
    ("stream", lambda g: list(g.stream("hi")), 1),
    ("astream", lambda g: asyncio.run(_collect(g.astream("hi"))), 1),
    ("generate", lambda g: g.generate([[HumanMessage("hi")], [HumanMessage("ho")]]), 2),
    ("agenerate", lambda g: asyncio.run(g.agenerate([[HumanMessage("hi")]])), 1),
    ("generate_prompt", lambda g: g.generate_prompt([ChatPromptValue(messages=[HumanMessage("hi")])]), 1),
    ("_generate", lambda g: g._generate([HumanMessage("hi")]), 1),
    ("_stream", lambda g: list(g._stream([HumanMessage("hi")])), 1),
    ("stream_events v3", _v3, 1),
    ("astream_events v3", lambda g: asyncio.run(_av3(g)), 1),
    ("astream_events v2", lambda g: asyncio.run(_av2(g)), 1),
    ("model_copy", lambda g: g.model_copy().invoke("hi"), 1),
    ("model_copy deep", lambda g: g.model_copy(deep=True).invoke("hi"), 1),
    ("copy.copy", lambda g: copy.copy(g).invoke("hi"), 1),
    ("copy.deepcopy", lambda g: copy.deepcopy(g).invoke("hi"), 1),
    ("bind", lambda g: g.bind(stop=["\n"]).invoke("hi"), 1),
    ("with_config", lambda g: g.with_config(tags=["x"]).invoke("hi"), 1),
    ("with_retry", lambda g: g.with_retry().invoke("hi"), 1),
    ("with_fallbacks", lambda g: g.with_fallbacks([g]).invoke("hi"), 1),
    ("bind_tools", lambda g: g.bind_tools([_lookup_tool()]).invoke("hi"), 1),
    ("configurable_fields", lambda g: g.configurable_fields(
        reply=ConfigurableField(id="reply")).invoke("hi", {"configurable": {"reply": "Hi there you."}}), 1),
    ("configurable_alternatives", lambda g: g.configurable_alternatives(
        ConfigurableField(id="which"), default_key="mini", other=UsageChat()).invoke(
        "hi", {"configurable": {"which": "other"}}), 1),
]


async def _collect(aiter):
    return [x async for x in aiter]


def _lookup_tool():
    from langchain_core.tools import tool

    @tool
    def lookup(city: str) -> str:
        """Look up a city."""
        return "sunny"

    return lookup


def test_a_guarded_model_is_a_chat_model():
    guard = BudgetGuard(UsageChat(), limit=1)
    assert isinstance(guard, BaseChatModel)
    assert isinstance(BudgetGuard(limit=1), BaseChatModel)  # a policy too


@pytest.mark.parametrize(("name", "call", "calls"), ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_every_entry_point_is_charged_exactly(name, call, calls):
    guard = BudgetGuard(UsageChat(), limit=1)
    before = UsageChat.total_calls  # copies of the model (deepcopy, configurable) count here too
    call(guard)
    assert UsageChat.total_calls - before == calls
    assert spent(guard) == calls * CALL, name
    assert held(guard) == 0


@pytest.mark.parametrize(("name", "call", "calls"), ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_every_entry_point_is_refused_before_the_model_when_the_budget_is_out(name, call, calls):
    guard = BudgetGuard(UsageChat(), limit="0.000001")  # less than one call's reservation
    before = UsageChat.total_calls
    with pytest.raises(BudgetExceededError):
        call(guard)
    assert UsageChat.total_calls == before
    assert spent(guard) == 0 and held(guard) == 0


def test_a_fallback_model_draws_on_the_same_budget():
    """``guard.with_fallbacks([backup])``: a refusal is an exception, so the fallback runs. Unguarded,
    every call the budget refused went to the backup for free."""
    primary, backup = UsageChat(model_name="gpt-4o"), UsageChat(model_name="gpt-4o-mini")
    guard = BudgetGuard(primary, limit=Decimal("0.00005"), min_output_tokens=None)
    chain = guard.with_fallbacks([backup])
    served = 0
    with pytest.raises(BudgetExceededError):
        for _ in range(100):
            chain.invoke("hi", max_tokens=20)
            served += 1
    assert primary.calls == 0 and served == backup.calls > 0  # gpt-4o never fitted; gpt-4o-mini did, then not
    assert spent(guard) == backup.calls * CALL <= Decimal("0.00005")
    assert all(s.held == 0 for s in guard.status())  # the refused calls and the served ones hold nothing
    # A fallback that is a guard already (any budget) or not a model at all is kept as it is.
    other = BudgetGuard(UsageChat(), limit=1)
    canned = RunnableLambda(lambda _: AIMessage("busy"))
    fallbacks = guard.with_fallbacks([other, canned]).fallbacks
    assert fallbacks[0] is other and fallbacks[1] is canned


# What a guard returns, and what that returns: each one's with_fallbacks guards its fallbacks too.
WRAPPED_GUARDS = [
    ("bind_tools", lambda g: g.bind_tools([_lookup_tool()])),
    ("bind", lambda g: g.bind(stop=["x"])),
    ("with_config", lambda g: g.with_config(tags=["t"])),
    ("with_retry", lambda g: g.with_retry(stop_after_attempt=1)),
    ("with_listeners", lambda g: g.with_listeners(on_end=lambda run: None)),
    ("with_types", lambda g: g.with_types(input_type=str)),
    ("with_retry then bind", lambda g: g.with_retry(stop_after_attempt=1).bind(stop=["x"])),
    ("bind then with_retry", lambda g: g.bind(stop=["x"]).with_retry(stop_after_attempt=1)),
    ("with_fallbacks", lambda g: g.with_fallbacks([BudgetGuard(UsageChat(model_name="gpt-4o"), limit="0.000001")])),
]
FALLBACKS = [
    ("a model", lambda backup: backup),
    ("a with_fallbacks of models", lambda backup: backup.with_fallbacks([UsageChat(model_name="gpt-4o")])),
    ("a binding over a with_fallbacks", lambda backup: backup.with_fallbacks([UsageChat()]).with_config(tags=["b"])),
]


@pytest.mark.parametrize("how", [w[0] for w in WRAPPED_GUARDS])
@pytest.mark.parametrize("fallback", [f[0] for f in FALLBACKS])
def test_a_fallback_after_a_binding_draws_on_the_same_budget(how, fallback):
    """``guard.bind_tools(...).with_fallbacks([backup])`` (bind, with_config, with_retry, ...): LangChain's
    own with_fallbacks sent every call the budget refused to a backup nobody charged; a fallback that
    is a ``with_fallbacks`` of models ran unguarded even under the guard's own with_fallbacks."""
    wrap, make = dict(WRAPPED_GUARDS)[how], dict(FALLBACKS)[fallback]
    guard = BudgetGuard(UsageChat(model_name="gpt-4o"), limit="0.000001")  # refuses any call
    backup = UsageChat(model_name="gpt-4o", input_tokens=1000, output_tokens=1000)
    chain = wrap(guard).with_fallbacks([make(backup)])
    with pytest.raises(BudgetExceededError):
        chain.invoke("hi")
    with pytest.raises(BudgetExceededError):
        asyncio.run(chain.ainvoke("hi"))
    assert backup.calls == 0 and spent(guard) == 0 and held(guard) == 0


@pytest.mark.parametrize("how", [w[0] for w in WRAPPED_GUARDS[:4]])
def test_a_fallback_after_a_binding_that_fits_is_charged(how):
    guard = BudgetGuard(UsageChat(model_name="gpt-4o"), limit="0.0002", min_output_tokens=None)
    backup = UsageChat()
    chain = dict(WRAPPED_GUARDS)[how](guard).with_fallbacks([backup.with_fallbacks([UsageChat()])])
    chain.invoke("hi", max_tokens=20)  # gpt-4o does not fit; gpt-4o-mini does
    assert backup.calls == 1 and spent(guard) == CALL and held(guard) == 0


def test_a_binding_over_a_guard_serializes_as_langchain_binding():
    from langchain_core.runnables.fallbacks import RunnableWithFallbacks
    from langchain_core.runnables.retry import RunnableRetry

    guard = BudgetGuard(UsageChat(), limit=1, store="redis://127.0.0.1:6379/0")
    assert dumpd(guard.bind(stop=["x"]))["id"][-1] == "RunnableBinding"
    assert dumpd(guard.with_retry())["id"][-1] == "RunnableRetry"
    assert dumpd(guard.with_fallbacks([UsageChat()]))["id"][-1] == "RunnableWithFallbacks"
    assert isinstance(guard.with_retry(), RunnableRetry) and isinstance(guard.bind(), RunnableBinding)
    assert isinstance(guard.with_fallbacks([UsageChat()]).with_fallbacks([UsageChat()]), RunnableWithFallbacks)


def test_attribute_reads_show_the_model_settings_but_never_a_way_to_call_it():
    llm = UsageChat(model_name="gpt-4o-mini", max_tokens=300)
    guard = BudgetGuard(llm, limit=1)
    assert guard.model_name == "gpt-4o-mini" and guard.max_tokens == 300 and guard.provider == "openai"
    assert guard._generate.__self__ is guard and guard.generate.__self__ is guard
    # Methods of the inner model that a guard does not define itself are not forwarded.
    object.__setattr__(llm, "client", lambda *a: "unguarded call")
    with pytest.raises(AttributeError, match="not forward"):
        guard.client  # noqa: B018
    with pytest.raises(AttributeError):
        guard.no_such_thing  # noqa: B018


def test_bind_tools_keeps_the_chat_model_signature_and_returns_a_binding_over_a_guard():
    parameters = inspect.signature(BudgetGuard.bind_tools).parameters
    assert {"tool_choice", "strict", "parallel_tool_calls"} <= set(parameters)
    guard = BudgetGuard(UsageChat(), degrade_to=[UsageChat(model_name="gpt-4.1-nano")], limit=1)
    bound = guard.bind_tools([_lookup_tool()], tool_choice="any")
    assert isinstance(bound, RunnableBinding) and isinstance(bound.bound, BudgetGuard)
    assert bound.kwargs["tool_choice"] == "any" and bound.kwargs["tools"][0]["function"]["name"] == "lookup"
    # the degrade model got the same tools, bound its own way
    assert isinstance(bound.bound.degrade_to[0], RunnableBinding)


def test_config_specs_show_the_inner_model_configurable_fields():
    guard = BudgetGuard(UsageChat(), limit=1).configurable_fields(reply=ConfigurableField(id="reply"))
    assert [s.id for s in guard.config_specs] == ["reply"]


def test_the_last_streamed_chunk_is_the_provider_last_chunk_with_the_cost():
    llm = UsageChat()
    bare = list(llm.stream("hi"))
    chunks = list(BudgetGuard(llm, limit=1).stream("hi"))
    assert len(chunks) == len(bare)
    assert chunks[-1].chunk_position == "last" and all(c.chunk_position != "last" for c in chunks[:-1])
    assert chunks[-1].response_metadata["budgetguard"]["cost_usd"] == CALL


async def test_the_last_async_streamed_chunk_carries_the_cost():
    chunks = [c async for c in BudgetGuard(UsageChat(), limit=1).astream("hi")]
    assert chunks[-1].chunk_position == "last" and chunks[-1].response_metadata["budgetguard"]["cost_usd"] == CALL
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert isinstance(total, AIMessageChunk) and total.usage_metadata["total_tokens"] == 17


def test_model_copy_with_an_unknown_field_says_how_to_change_the_model():
    with pytest.raises(ValueError, match="not fields of the guard"):
        BudgetGuard(UsageChat(), limit=1).model_copy(update={"model_name": "gpt-4o"})


def test_a_copy_on_another_policy_is_never_serialized_as_the_old_budget():
    """model_copy(update={"policy": p}) kept the old guard's options: in-process the copy drew on ``p``,
    pickled or dumpd it revived on the old budget; ``policy=None`` failed at call time."""
    roomy = BudgetGuard(UsageChat(), limit=1000, store="redis://127.0.0.1:6379/0", name="roomy")
    tight = BudgetGuard(limit="0.000001", name="tight")
    roomy._serialized  # noqa: B018  (BaseChatModel caches dumpd(self) for its callbacks)
    copied = roomy.model_copy(update={"policy": tight.policy})
    assert copied.policy is tight.policy and copied._serialized["type"] == "not_implemented"
    with pytest.raises(BudgetExceededError):
        copied.invoke("hi")
    with pytest.raises(TypeError, match="BudgetPolicy object"):
        pickle.dumps(copied)
    assert dumpd(copied)["type"] == "not_implemented"
    for bad in (None, "tight"):
        with pytest.raises(TypeError, match="expected a BudgetPolicy"):
            roomy.model_copy(update={"policy": bad})
    same = roomy.model_copy(update={"policy": roomy.policy})  # the same budget: still serializable
    assert dumpd(same)["type"] == "constructor" and dumpd(same)["kwargs"]["name"] == "roomy"


def test_copies_share_the_budget():
    guard = BudgetGuard(UsageChat(), limit=1)
    for clone in (guard.model_copy(), copy.deepcopy(guard), guard.model_copy(deep=True)):
        clone.invoke("hi")
    assert spent(guard) == 3 * CALL


# -- serialization and processes --------------------------------------------------------------


def test_dumpd_and_loads_round_trip_a_guard(openai_server, redis_url):  # noqa: F811
    prefix = fresh_prefix()
    guard = BudgetGuard(openai_server.chat_model(), limits=[Limit(usd="0.5", per="user", window="day")],
                        store=redis_url, name=f"{prefix}serde")
    data = dumpd(guard)
    assert data["type"] == "constructor" and data["id"][-1] == "BudgetGuard"
    from langchain_openai import ChatOpenAI

    revived = loads(dumps(guard), allowed_objects=[BudgetGuard, ChatOpenAI], valid_namespaces=["langchain_budgetguard"],
                    secrets_map={"OPENAI_API_KEY": "sk-test"})
    assert isinstance(revived, BudgetGuard) and revived.policy.name == guard.policy.name
    assert revived.policy.limits == guard.policy.limits
    openai_server.script("one", "two")
    ids = {"configurable": {"user_id": "ann"}}
    guard.invoke("hi", ids)
    revived.invoke("hi", ids)
    (a,), (b,) = guard.status(ids), revived.status(ids)
    assert a.spent == b.spent > 0 and a.key == b.key


def _with_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://default:s3cret-pass@{rest.split('@')[-1]}"  # the default user is nopass: any password works


def test_a_store_password_is_serialized_as_a_secret_never_in_plain_text(redis_url, monkeypatch):  # noqa: F811
    """dumpd(guard) carried the Redis password, and LangChain hands dumpd(model) to every callback
    handler (``on_chat_model_start(serialized=...)``): tracers saw it. It is a secret now, as an API key is."""
    from langchain_core.callbacks import BaseCallbackHandler

    url = _with_password(redis_url)
    guard = BudgetGuard(UsageChat(), limit=1, store=url, name=f"{fresh_prefix()}secret")
    data = dumpd(guard)
    assert "s3cret" not in dumps(guard)
    assert data["kwargs"]["store"].startswith(url.split("://")[0] + "://default:***@")
    assert data["kwargs"]["store_url"] == {"lc": 1, "type": "secret", "id": ["BUDGETGUARD_STORE_URL"]}
    seen = []

    class Spy(BaseCallbackHandler):
        def on_chat_model_start(self, serialized, messages, **kwargs):
            seen.append(serialized)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in guard.stream_events("hi", {"callbacks": [Spy()]}, version="v3"):
            pass
    assert seen and not any("s3cret" in str(s) for s in seen)
    # loads takes it back from secrets_map, or the environment; without it, loading is refused
    # (never revived on an in-process budget).
    from langchain_openai import ChatOpenAI

    guard = BudgetGuard(ChatOpenAI(model="gpt-4o-mini", api_key="x"), limit=1, store=url, name=guard.policy.name)
    allowed = {"allowed_objects": [BudgetGuard, ChatOpenAI], "valid_namespaces": ["langchain_budgetguard"]}
    revived = loads(dumps(guard), secrets_map={"BUDGETGUARD_STORE_URL": url, "OPENAI_API_KEY": "x"}, **allowed)
    monkeypatch.setenv("BUDGETGUARD_STORE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    from_env = loads(dumps(guard), secrets_from_env=True, **allowed)
    for copy_ in (revived, from_env):
        assert copy_._options["store"] == url and "s3cret" not in dumps(copy_)
        before = held(guard)
        reservation = copy_.reserve("hi")  # held on the same budget as the original's
        assert held(guard) > before
        reservation.settle()
    assert spent(guard) == CALL and held(guard) == 0  # the v3 stream; the copies' reservations cost nothing
    monkeypatch.delenv("BUDGETGUARD_STORE_URL")
    with pytest.raises(ValueError, match="BUDGETGUARD_STORE_URL"):
        loads(dumps(guard), secrets_from_env=True, **allowed)
    # A URL without a password stays as it is.
    assert dumpd(BudgetGuard(UsageChat(), limit=1, store=redis_url))["kwargs"]["store"] == redis_url
    query = BudgetGuard(UsageChat(), limit=1, store=redis_url + "?password=s3cret-pass")
    assert "s3cret" not in dumps(query) and dumpd(query)["kwargs"]["store"].endswith("?***")


def test_a_guard_on_a_store_object_is_not_serialized_as_if_it_were_whole():
    from langchain_budgetguard.stores.memory import MemoryStore

    assert dumpd(BudgetGuard(UsageChat(), limit=1, store=MemoryStore()))["type"] == "not_implemented"


@pytest.mark.parametrize("store", [None, "memory"])
def test_an_in_process_guard_is_not_serialized_as_a_budget_of_its_own(store):
    """dumps/loads revived a guard on the in-process store with a fresh budget: the original held
    most of its limit and refused, the revived copy admitted. It is ``not_implemented``, as pickle refuses."""
    from langchain_openai import ChatOpenAI

    guard = BudgetGuard(ChatOpenAI(model="gpt-4o-mini", api_key="x"), limit=1, **({"store": store} if store else {}))
    assert dumpd(guard)["type"] == "not_implemented"
    with pytest.raises(NotImplementedError, match="BudgetGuard"):
        loads(dumps(guard), allowed_objects=[BudgetGuard, ChatOpenAI], valid_namespaces=["langchain_budgetguard"],
              secrets_map={"OPENAI_API_KEY": "x"})


def test_pickling_an_in_process_guard_is_refused_clearly():
    with pytest.raises(TypeError, match="in-process store"):
        pickle.dumps(BudgetGuard(UsageChat(), limit=1))


def test_pickle_round_trip_on_redis_enforces_the_same_budget(redis_url):  # noqa: F811
    guard = BudgetGuard(UsageChat(), limit=1, store=redis_url, name=f"{fresh_prefix()}pickle")
    clone = pickle.loads(pickle.dumps(guard))
    assert clone is not guard and clone.policy is not guard.policy
    guard.invoke("hi")
    clone.invoke("hi")
    assert spent(guard) == spent(clone) == 2 * CALL


def _spend_in_worker(blob: bytes, calls: int) -> None:
    guard = pickle.loads(blob)
    for _ in range(calls):
        guard.invoke("hi")


def test_a_guard_sent_to_a_spawned_worker_charges_the_shared_budget(redis_url):  # noqa: F811
    guard = BudgetGuard(UsageChat(), limit=1, store=redis_url, name=f"{fresh_prefix()}spawn")
    worker = multiprocessing.get_context("spawn").Process(target=_spend_in_worker, args=(pickle.dumps(guard), 3))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0
    assert spent(guard) == 3 * CALL and held(guard) == 0


# -- LangChain code that needs a BaseChatModel ---------------------------------------------------


CAP_KEYS = ("max_tokens", "max_completion_tokens")


def _agent_bodies(server):
    """What an agent sent, less the output cap (the guard sends one where the call sets none)."""
    return [{k: v for k, v in r.body.items() if k not in CAP_KEYS} for r in server.calls]


def test_create_agent_response_format_sends_the_same_requests_as_the_bare_model(openai_server, billed):
    import json

    from langchain.agents import create_agent
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    answer = json.dumps({"name": "Oslo", "population": 709000})
    ask = {"messages": [("user", "Biggest city in Norway?")]}
    openai_server.script(answer)
    bare = create_agent(model=openai_server.chat_model(), response_format=City).invoke(ask)
    bare_bodies = _agent_bodies(openai_server)
    openai_server.reset()
    openai_server.script(answer)
    guard = BudgetGuard(openai_server.chat_model(), limit=1)
    out = create_agent(model=guard, response_format=City).invoke(ask)
    assert out["structured_response"] == bare["structured_response"] == City(name="Oslo", population=709000)
    assert _agent_bodies(openai_server) == bare_bodies
    assert all(r.body["max_completion_tokens"] == 4096 for r in openai_server.calls)  # the cap it reserved
    assert "response_format" in bare_bodies[0] and "tool_choice" not in bare_bodies[0]  # provider strategy
    assert spent(guard) == billed(openai_server) > 0 and held(guard) == 0


def test_summarization_middleware_and_tool_emulator_run_on_a_guard_and_are_charged(openai_server, billed):
    from langchain.agents import create_agent
    from langchain.agents.middleware import LLMToolEmulator, SummarizationMiddleware
    from langchain_core.tools import tool

    from .providers import Reply, ToolCall

    @tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        raise AssertionError("emulated: never run")

    guard = BudgetGuard(openai_server.chat_model(), limit=1)
    openai_server.script(
        Reply(tool_calls=(ToolCall("get_weather", {"city": "Oslo"}),), input_tokens=300, output_tokens=20),
        Reply(text="It is sunny in Oslo (emulated).", input_tokens=200, output_tokens=12),  # the emulator
        Reply(text="Summary: asked for Oslo weather.", input_tokens=400, output_tokens=10),  # the summarizer
        Reply(text="Sunny.", input_tokens=350, output_tokens=5),
    )
    agent = create_agent(model=guard, tools=[get_weather], middleware=[
        LLMToolEmulator(model=guard),
        SummarizationMiddleware(model=guard, trigger=("messages", 3), keep=("messages", 1)),
    ])
    out = agent.invoke({"messages": [("user", "Weather in Oslo?")]})
    assert out["messages"][-1].content == "Sunny."
    assert len(openai_server.calls) == 4
    assert spent(guard) == billed(openai_server) and held(guard) == 0


def test_create_react_agent_with_response_format_on_a_guard(openai_server, billed):
    import json

    from langgraph.prebuilt import create_react_agent
    from pydantic import BaseModel

    class Answer(BaseModel):
        city: str

    openai_server.script("Oslo it is.", json.dumps({"city": "Oslo"}))
    guard = BudgetGuard(openai_server.chat_model(), limit=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agent = create_react_agent(guard, tools=[_lookup_tool()], response_format=Answer)
    out = agent.invoke({"messages": [("user", "Which city?")]})
    assert out["structured_response"] == Answer(city="Oslo")
    assert len(openai_server.calls) == 2 and spent(guard) == billed(openai_server) and held(guard) == 0


def test_the_inner_model_cache_and_rate_limiter_keep_working():
    from langchain_core.caches import InMemoryCache
    from langchain_core.rate_limiters import InMemoryRateLimiter

    class CountingLimiter(InMemoryRateLimiter):
        acquired: int = 0

        def acquire(self, *, blocking: bool = True) -> bool:
            CountingLimiter.acquired += 1
            return True

    limiter = CountingLimiter(requests_per_second=1000)
    llm = UsageChat(cache=InMemoryCache(), rate_limiter=limiter)
    guard = BudgetGuard(llm, limit=1)
    first = guard.invoke("hi")
    second = guard.invoke("hi")  # the cache answers: no model call, nothing billed
    assert llm.calls == 1 and first.content == second.content
    assert second.response_metadata["budgetguard"]["cost_usd"] == 0
    assert spent(guard) == CALL and held(guard) == 0
    assert CountingLimiter.acquired == 1  # the cache hit did not wait for the limiter


def test_no_run_of_the_guard_is_opened_for_handlers_that_only_read_model_runs():
    from langchain_core.callbacks import BaseCallbackHandler, UsageMetadataCallbackHandler

    from langchain_budgetguard.runs import observed

    class ChainSpy(BaseCallbackHandler):
        def on_chain_start(self, serialized, inputs, **kwargs):
            pass

    usage = UsageMetadataCallbackHandler()
    assert not observed({"callbacks": [usage]})
    assert observed({"callbacks": [usage, ChainSpy()]})
    guard = BudgetGuard(UsageChat(), limit=1)
    guard.invoke("hi", {"callbacks": [usage]})
    guard.batch(["hi"], {"callbacks": [usage]})
    # one model run per call, usage as the model reported it: not counted twice
    assert usage.usage_metadata["gpt-4o-mini"]["total_tokens"] == 2 * 17
    assert spent(guard) == 2 * CALL


def test_the_guard_own_callbacks_tags_and_metadata_reach_the_model_run():
    from langchain_core.callbacks import BaseCallbackHandler

    seen = []

    class Spy(BaseCallbackHandler):
        def on_chat_model_start(self, serialized, messages, **kwargs):
            seen.append((kwargs.get("tags"), (kwargs.get("metadata") or {}).get("team")))

    guard = BudgetGuard(UsageChat(), limit=1, callbacks=[Spy()], tags=["guarded"], metadata={"team": "ml"})
    guard.invoke("hi")
    list(guard.stream("hi"))
    guard.generate([[HumanMessage("hi")]])
    assert len(seen) == 3 and all("guarded" in tags and team == "ml" for tags, team in seen)


def test_the_versions_langchain_seeds_on_the_guard_are_not_merged_into_each_call():
    """LangChain seeds every model's ``metadata`` with ``lc_versions``; the wrapped model's run has
    its own. Merging the guard's into each call built a new config the model then had to merge
    (slower): with no metadata of its own, the guard hands the model the caller's config as it is."""

    class Seen(UsageChat):
        def invoke(self, input, config=None, **kwargs):
            seen.append(config)
            return super().invoke(input, config, **kwargs)

    seen: list = []
    guard = BudgetGuard(Seen(), limit=1)
    assert guard.metadata == {"lc_versions": guard.metadata["lc_versions"]}  # what LangChain seeded
    given = {"tags": ["mine"]}
    guard.invoke("hi")
    guard.invoke("hi", config=given)
    assert seen[0] is None and seen[1] is given
    guard.metadata = {**guard.metadata, "team": "ml"}  # metadata of its own: merged, versions and all
    guard.invoke("hi")
    assert seen[2]["metadata"]["team"] == "ml" and "lc_versions" in seen[2]["metadata"]


def test_generate_keeps_the_wrapped_bindings_own_config():
    """``generate`` calls the chat model under the wrapped model's bindings itself: a
    ``with_config(callbacks=..., tags=...)`` binding's settings still reach the model's run, as
    invoke gives them."""
    from langchain_core.callbacks import BaseCallbackHandler

    seen = []

    class Spy(BaseCallbackHandler):
        def on_chat_model_start(self, serialized, messages, **kwargs):
            seen.append((kwargs.get("tags"), (kwargs.get("metadata") or {}).get("team")))

    guard = BudgetGuard(UsageChat().with_config(callbacks=[Spy()], tags=["bound"], metadata={"team": "ml"}),
                        limit=1)
    guard.invoke("hi")
    guard.generate([[HumanMessage("hi")]])
    asyncio.run(guard.agenerate([[HumanMessage("hi")]], tags=["call"]))
    assert [(sorted(tags), team) for tags, team in seen] == [(["bound"], "ml"), (["bound"], "ml"),
                                                             (["bound", "call"], "ml")]


@pytest.mark.parametrize("how", ["generate", "agenerate", "stream_events v3"])
def test_model_steps_and_generate_report_their_cost_event(how):
    from langchain_core.callbacks import BaseCallbackHandler

    costs = []

    class Costs(BaseCallbackHandler):
        def on_custom_event(self, name, data, **kwargs):
            if name == "budgetguard_cost":
                costs.append(data["cost_usd"])

    guard = BudgetGuard(UsageChat(), limit=1)
    handler = Costs()
    if how == "generate":
        guard.generate([[HumanMessage("hi")], [HumanMessage("ho")]], callbacks=[handler])
    elif how == "agenerate":
        asyncio.run(guard.agenerate([[HumanMessage("hi")]], callbacks=[handler]))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guard.stream_events("hi", {"callbacks": [handler]}, version="v3").output  # noqa: B018
    assert costs == [CALL] * (2 if how == "generate" else 1)
    assert spent(guard) == len(costs) * CALL


def test_agenerate_settles_every_prompts_call_before_raising_the_first_error():
    """As LangChain's own agenerate: one prompt failing does not leave the others running
    unobserved (a loop that then closes cancels them, and a cancelled call is charged its whole
    reservation)."""

    class FailsOnBoom(UsageChat):
        async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
            if messages[-1].content == "boom":
                raise ValueError("bad request")
            await asyncio.sleep(0.05)
            return self._generate(messages, stop, None, **kwargs)

    model = FailsOnBoom()
    guard = BudgetGuard(model, limit=1)

    async def go():
        with pytest.raises(ValueError, match="bad request"):
            await guard.agenerate([[HumanMessage("boom")], [HumanMessage("hi")]])
        return guard.status()[0]

    status = asyncio.run(go())
    assert model.calls == 1
    assert status.held == 0 and status.spent == CALL
