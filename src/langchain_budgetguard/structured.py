"""``with_structured_output`` for guarded models.

Each provider builds structured output its own way (a bound response format,
a forced tool, a parser, a parallel map for ``include_raw``). Rather than
re-implement them, ask the wrapped model for its runnable and put the guard
around the model step inside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableParallel,
    RunnableSequence,
)

from .models import innermost

if TYPE_CHECKING:
    from .guard import BudgetGuard


def _is_model_step(node: Runnable) -> bool:
    while isinstance(node, RunnableBinding):
        node = node.bound
    return isinstance(node, BaseChatModel)


def _find_model_step(node: Runnable) -> Runnable | None:
    if _is_model_step(node):
        return node
    if isinstance(node, RunnableSequence):
        for step in node.steps:
            if (found := _find_model_step(step)) is not None:
                return found
    elif isinstance(node, RunnableParallel):
        for step in node.steps__.values():
            if (found := _find_model_step(step)) is not None:
                return found
    return None


def _replace(node: Runnable, target: Runnable, replacement: Runnable) -> Runnable:
    if node is target:
        return replacement
    if isinstance(node, RunnableSequence):
        steps = [_replace(step, target, replacement) for step in node.steps]
        return RunnableSequence(*steps, name=node.name)
    if isinstance(node, RunnableParallel):
        return RunnableParallel({k: _replace(v, target, replacement) for k, v in node.steps__.items()})
    return node


def guarded_structured_output(guard: BudgetGuard, schema: Any, **kwargs: Any) -> Runnable:
    """``guard.llm.with_structured_output(...)`` with its model step (and each degrade model's) guarded."""

    structured = guard.llm.with_structured_output(schema, **kwargs)
    primary = _find_model_step(structured)
    if primary is None:
        raise TypeError(
            f"Cannot guard {type(guard.llm).__name__}.with_structured_output: no chat model step was found in "
            "the runnable it returned. Guard the structured runnable's model yourself."
        )
    fallbacks = []
    for model in guard.degrade_to:
        if type(innermost(model)) is not type(innermost(guard.llm)):
            raise TypeError(
                "with_structured_output on a guard whose degrade_to models are of another class "
                f"({type(innermost(model)).__name__} vs {type(innermost(guard.llm)).__name__}) is not "
                "supported: their replies need different parsers. Use models of one provider class."
            )
        step = _find_model_step(model.with_structured_output(schema, **kwargs))
        if step is None:
            raise TypeError(f"{type(model).__name__}.with_structured_output has no chat model step to guard.")
        fallbacks.append(step)
    replacement = guard.wrap(primary, degrade_to=fallbacks)
    return _replace(structured, primary, replacement)
