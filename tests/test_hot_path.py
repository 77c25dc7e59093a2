"""What the guard does once per model, not once per call: a call whose run config carries only
scope ids (``configurable: {"user_id": ...}``) does not resolve its model again, unless the model
can be chosen by that config (configurable fields or alternatives, init_chat_model)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.runnables import ConfigurableField

from langchain_budgetguard import BudgetGuard, Limit
from langchain_budgetguard import guard as guard_module
from langchain_budgetguard.pricing import depends_on_config

from .fakes import UsageChat


@pytest.fixture
def resolutions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    real = guard_module.candidate_refs

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(guard_module, "candidate_refs", counting)
    return seen


def test_scope_ids_in_the_config_do_not_resolve_the_model_again(resolutions: list[Any]) -> None:
    guard = BudgetGuard(UsageChat(), limits=[Limit(usd=100, per="user")])
    guard.invoke("hi", {"configurable": {"user_id": "alice"}})
    before = len(resolutions)
    for who in ("alice", "bob", "carol"):
        guard.invoke("hi", {"configurable": {"user_id": who}})
    assert len(resolutions) == before


def test_a_model_the_config_can_choose_is_resolved_per_call(resolutions: list[Any]) -> None:
    model = UsageChat().configurable_fields(model_name=ConfigurableField(id="model_name"))
    guard = BudgetGuard(model, limits=[Limit(usd=100, per="user")], prices={"other": {"input": 1, "output": 1}})
    guard.invoke("hi", {"configurable": {"user_id": "alice"}})
    before = len(resolutions)
    reply = guard.invoke("hi", {"configurable": {"user_id": "alice", "model_name": "other"}})
    assert len(resolutions) > before
    assert reply.response_metadata["budgetguard"]["model"] == "other"


def test_depends_on_config_sees_through_bindings_and_fallbacks() -> None:
    plain = UsageChat()
    chosen = UsageChat().configurable_fields(model_name=ConfigurableField(id="m"))
    assert not depends_on_config(plain) and not depends_on_config(plain.bind(stop=["x"]))
    assert depends_on_config(chosen) and depends_on_config(chosen.bind(stop=["x"]))
    assert depends_on_config(plain.with_fallbacks([chosen])) and not depends_on_config(plain.with_fallbacks([plain]))
