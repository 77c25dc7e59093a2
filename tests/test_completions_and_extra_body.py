"""What a request really asks for is what it holds: every completion, and what ``extra_body`` says.

A call that asks for several completions (``n``; Google's ``candidate_count``) may get each up to the
output cap and the provider bills every one (the prompt once): a reservation sized for one reply let
``n=8`` spend eight times what it held, past the limit. ``extra_body`` is merged over the named
parameters by the SDK: a cap, ``n`` or ``model`` there is what the provider runs with.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from langchain_openai import ChatOpenAI

from langchain_budgetguard import BudgetExceededError, BudgetGuard, Limit
from langchain_budgetguard.caps import output_cap

from .providers import Reply
from .test_real_clients import spent  # the scope's spend, once nothing is held


def _model(**kwargs):
    return ChatOpenAI(model="gpt-4o-mini", api_key="test", **kwargs)


@pytest.mark.parametrize(
    ("model", "call", "expected"),
    [
        (lambda: _model(), None, 1),
        (lambda: _model(), {"n": 3}, 3),
        (lambda: _model().bind(n=5), None, 5),
        (lambda: _model().bind(n=5), {"n": 2}, 2),  # the call's own kwarg wins, as in the request
        (lambda: _model().bind(n=5).bind(temperature=0), None, 5),
        (lambda: _model(n=4), None, 4),
        (lambda: _model(model_kwargs={"n": 6}), None, 6),
        (lambda: _model(), {"candidate_count": 2}, 2),
        (lambda: _model(), {"generation_config": {"candidate_count": 7}}, 7),
        (lambda: _model(), {"n": 2.5}, 3),  # never fewer than could be asked for
        (lambda: _model(), {"n": "4"}, 4),
        # Not a positive count: says nothing, the next place that sets it counts (the model's 4).
        (lambda: _model(n=4), {"n": None}, 4),
        (lambda: _model(n=4), {"n": 0}, 4),
        (lambda: _model(n=4), {"n": True}, 4),
        (lambda: _model(n=4), {"n": "many"}, 4),
    ],
)
@pytest.mark.filterwarnings("ignore:Parameters {'n'} should be specified explicitly")
def test_completions_are_read_where_a_call_sets_them(model, call, expected):
    assert output_cap(model(), call).completions == expected


def _reserved(message) -> Decimal:
    return message.response_metadata["budgetguard"]["reserved_usd"]


def _request_n(request) -> int:
    return request.body.get("n") or 1


def _capped(output_tokens: int):
    """A reply of ``output_tokens`` per completion, never past the cap the request sent (as providers do)."""
    def reply(request):
        cap = request.body.get("max_completion_tokens") or request.body.get("max_tokens") or output_tokens
        return Reply(text="ok", input_tokens=20, output_tokens=min(cap, output_tokens))
    return reply


def test_a_call_with_n_holds_every_completion_and_is_charged_for_all(openai_server, billed):
    openai_server.script(*(_capped(1000) for _ in range(3)))
    guard = BudgetGuard(openai_server.chat_model(), limit=10)
    one = guard.invoke("hi", max_tokens=1000)
    two = guard.invoke("hi", max_tokens=2000)
    four = guard.invoke("hi", max_tokens=1000, n=4)
    per_thousand = _reserved(two) - _reserved(one)  # what 1,000 output tokens hold
    assert per_thousand > 0
    assert _reserved(four) == _reserved(one) + 3 * per_thousand
    assert [_request_n(r) for r in openai_server.calls] == [1, 1, 4]
    assert four.usage_metadata["output_tokens"] == 4000  # the provider reports every completion
    assert spent(guard) == billed(openai_server)
    assert four.response_metadata["budgetguard"]["cost_usd"] == billed(openai_server) - sum(
        (m.response_metadata["budgetguard"]["cost_usd"] for m in (one, two)), Decimal(0))


def test_n_cannot_spend_past_the_limit(openai_server, billed):
    """The attack: what is left fits one completion at the cap, not eight. Without its own
    completions in the hold, every call got through and the last ones overspent the limit."""
    openai_server.set_default(_capped(1000))
    limit = Decimal("0.004")
    guard = BudgetGuard(openai_server.chat_model(), limit=limit, min_output_tokens=None)
    served = 0
    with pytest.raises(BudgetExceededError) as refused:
        for _ in range(20):
            guard.invoke("hi", max_tokens=1000, n=8)
            served += 1
    assert served == len(openai_server.calls) == 0  # 8 x 1,000 tokens never fitted in $0.004
    assert "8 completions of up to 1,000 tokens each" in str(refused.value)
    assert "fewer than 8 completions" in str(refused.value)
    # One completion at the same cap fits and is served.
    guard.invoke("hi", max_tokens=1000)
    assert spent(guard) == billed(openai_server) <= limit


def test_shrink_to_fit_caps_each_completion_so_that_all_fit(openai_server, billed):
    openai_server.set_default(_capped(5000))
    limit = Decimal("0.004")
    guard = BudgetGuard(openai_server.chat_model(), limit=limit)  # shrinks to fit (min_output_tokens)
    for _ in range(10):
        try:
            guard.invoke("hi", n=4)
        except BudgetExceededError:
            break
    else:
        pytest.fail("the budget never ran out")
    caps = [r.body.get("max_completion_tokens") or r.body.get("max_tokens") for r in openai_server.calls]
    # The default cap (4,096) held four times is $0.0098: each completion was capped to fit instead.
    assert caps and all(cap < 4096 for cap in caps)
    assert all(r.usage["output_tokens"] == 4 * cap for r, cap in zip(openai_server.calls, caps))
    assert limit * Decimal("0.9") < spent(guard) == billed(openai_server) <= limit


def test_a_tokens_limit_holds_every_completion(openai_server):
    openai_server.set_default(_capped(100))
    guard = BudgetGuard(openai_server.chat_model(), limits=[Limit(tokens=1000)], min_output_tokens=None)
    guard.invoke("hi", max_tokens=200, n=3)  # about 20 in + 3 x 200 out: fits
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke("hi", max_tokens=200, n=5)  # 20 + 5 x 200 no longer fits what is left
    assert refused.value.refusal.completions == 5
    assert len(openai_server.calls) == 1
    assert spent(guard) == openai_server.calls[0].usage["total_tokens"]


def test_enforce_budget_holds_every_completion_of_a_call_it_did_not_make(openai_server, billed):
    from langchain_budgetguard import BudgetPolicy
    from langchain_budgetguard.enforce import enforce_budget

    openai_server.set_default(_capped(1000))
    limit = Decimal("0.004")
    policy = BudgetPolicy(limit=limit, min_output_tokens=None)
    llm = openai_server.chat_model(n=8, max_tokens=1000)  # third-party code's model, n set on it
    with enforce_budget(policy), pytest.raises(BudgetExceededError) as refused:
        llm.invoke("hi")
    assert refused.value.refusal.completions == 8
    assert openai_server.calls == []
    with enforce_budget(policy):
        openai_server.chat_model(max_tokens=1000).invoke("hi")
    assert spent(BudgetGuard(policy=policy)) == billed(openai_server) <= limit


# ---------------------------------------------------------------- extra_body
# The OpenAI SDK merges ``extra_body`` over the request's named parameters: a cap or ``n`` there is
# what the provider runs with, whatever cap the guard sends beside it.


def _sent(request) -> tuple[int | None, int]:
    body = request.body
    return body.get("max_completion_tokens") or body.get("max_tokens"), body.get("n") or 1


def test_a_cap_in_extra_body_is_the_one_reserved(openai_server, billed):
    openai_server.set_default(_capped(100_000))
    limit = Decimal("0.004")
    guard = BudgetGuard(openai_server.chat_model(), limit=limit)
    # The guard's own cap (4,096 tokens, $0.0025) would fit, but the request runs with 100,000.
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke("hi", extra_body={"max_completion_tokens": 100_000})
    assert "100,000 tokens" in str(refused.value)
    assert openai_server.calls == []
    reply = guard.invoke("hi", extra_body={"max_completion_tokens": 3000, "n": 2})
    assert _sent(openai_server.calls[-1]) == (3000, 2)
    assert reply.response_metadata["budgetguard"]["output_cap"] is None  # the guard sent no cap of its own
    assert spent(guard) == billed(openai_server) <= limit


def test_a_null_cap_in_extra_body_holds_the_models_whole_output_limit(openai_server):
    openai_server.set_default(_capped(100))
    guard = BudgetGuard(openai_server.chat_model(), limit=10)
    capped = guard.invoke("hi")
    uncapped = guard.invoke("hi", extra_body={"max_completion_tokens": None})
    assert _sent(openai_server.calls[-1]) == (None, 1)  # null overrides any cap: the model's own limit applies
    # gpt-4o-mini: 16,384 output tokens at most, against the 4,096 the guard sends by default.
    assert _reserved(uncapped) - _reserved(capped) == (16_384 - 4096) * Decimal("0.60") / 1_000_000


def test_the_models_extra_body_counts_unless_the_call_replaces_it(openai_server):
    openai_server.set_default(_capped(100))
    guard = BudgetGuard(openai_server.chat_model(extra_body={"max_tokens": 50_000}), limit=10)
    guard.invoke("hi")
    assert _sent(openai_server.calls[-1]) == (50_000, 1)
    assert guard.invoke("hi").response_metadata["budgetguard"]["reserved_usd"] > Decimal("0.03")
    replaced = guard.invoke("hi", extra_body={})  # a call's extra_body replaces the model's whole
    assert _sent(openai_server.calls[-1]) == (4096, 1)
    assert replaced.response_metadata["budgetguard"]["output_cap"] == 4096


def test_a_model_in_extra_body_is_the_one_priced(openai_server, billed):
    """extra_body={"model": "gpt-4"} on a gpt-4o-mini client calls gpt-4 (100x the output price):
    held at gpt-4o-mini's price, one call could spend a hundred times what it reserved."""
    openai_server.set_default(_capped(4096))
    limit = Decimal("0.05")
    guard = BudgetGuard(openai_server.chat_model(), limit=limit, min_output_tokens=None)
    with pytest.raises(BudgetExceededError) as refused:
        guard.invoke("hi", max_tokens=4096, extra_body={"model": "gpt-4"})  # $0.25 at gpt-4's price
    assert refused.value.refusal.estimate > Decimal("0.24")  # 4,096 tokens at gpt-4's $60 per million
    assert openai_server.calls == []
    reply = guard.invoke("hi", max_tokens=500, extra_body={"model": "gpt-4"})
    assert openai_server.calls[-1].body["model"] == "gpt-4"
    assert reply.response_metadata["budgetguard"]["model"] == "gpt-4"
    assert spent(guard) == billed(openai_server) <= limit


def test_a_service_tier_in_extra_body_is_held_at_its_price(openai_server):
    openai_server.set_default(_capped(100))
    guard = BudgetGuard(openai_server.chat_model(), limit=10)
    standard = guard.invoke("hi")
    priority = guard.invoke("hi", extra_body={"service_tier": "priority"})
    named = guard.invoke("hi", service_tier="priority")
    assert openai_server.calls[1].body["service_tier"] == "priority"
    assert _reserved(priority) == _reserved(named) > _reserved(standard)


# -- a prompt sent inside extra_body -------------------------------------------------------------

_BIG = "lorem ipsum dolor sit amet " * 2000  # ~10,000 tokens the scripted server bills as the prompt


def test_a_prompt_inside_extra_body_is_held_in_strict_mode_and_cannot_spend_past_the_limit(openai_server, billed):
    """The SDK sends extra_body over the named parameters: messages (or tools) there are what the
    provider reads and bills, yet the guard counted only the call's own "hi". The attack: a $0.001
    budget and a 10,000-token prompt in extra_body ($0.0015) was admitted and spent past it."""
    openai_server.set_default(Reply(text="ok"))
    sneaky = openai_server.chat_model(extra_body={"messages": [{"role": "user", "content": _BIG}]})
    with pytest.raises(BudgetExceededError):
        BudgetGuard(sneaky, limit=Decimal("0.001")).invoke("hi", max_tokens=10)
    assert openai_server.calls == []
    guard = BudgetGuard(openai_server.chat_model(), limit=Decimal("0.01"))
    reply = guard.invoke("hi", max_tokens=10, extra_body={"messages": [{"role": "user", "content": _BIG}]})
    (request,) = openai_server.calls
    assert request.usage["input_tokens"] > 9000  # the provider read the extra_body prompt
    assert _reserved(reply) >= reply.response_metadata["budgetguard"]["cost_usd"] == billed(openai_server)
    assert spent(guard) == billed(openai_server)


def test_server_tools_inside_extra_body_are_held_for(openai_server):
    from langchain_budgetguard.errors import UnknownModelPriceError
    from langchain_budgetguard.pricing import item_bound

    llm = _model(use_responses_api=True, extra_body={"tools": [{"type": "web_search"}]})
    assert item_bound(llm, default_uses=3).web_searches == 3
    # extra_body's tools replace the named ones, as in the request
    assert item_bound(_model().bind(tools=[{"type": "web_search"}]), {"extra_body": {"tools": []}}).web_searches == 0
    with pytest.raises(UnknownModelPriceError, match="code_interpreter"):
        BudgetGuard(_model(use_responses_api=True, extra_body={"tools": [{"type": "code_interpreter"}]}),
                    limit=1).invoke("plot it")
