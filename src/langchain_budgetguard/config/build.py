"""A guard (or a model-less policy) from a config file."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .deployment import DeploymentConfig
from .reader import load_config

__all__ = ["guard_from_config"]


def guard_from_config(
    llm: Any,
    path_or_config: str | os.PathLike[str] | DeploymentConfig,
    degrade_to: Sequence[Any] | None = None,
    models: Mapping[str, Any] | Callable[[str], Any] | None = None,
    *,
    store: Any = None,
    policy: Any = None,
) -> Any:
    """A ``BudgetGuard`` around ``llm`` as the config file describes (``llm=None``: a policy).

    ``degrade_to`` wins over the file's ``[degrade]`` ladder; otherwise the ladder of ``llm``'s
    model name is built from ``models``: a mapping ``{"gpt-4o-mini": ChatOpenAI(model="gpt-4o-mini")}``
    or a factory called with each name (``models=init_chat_model``). ``store`` replaces the
    configured store (tests); ``policy`` (a ``BudgetPolicy`` or a guard) reuses one already built
    from the same file, so that several models draw on one budget in one process.
    """
    from ..guard import BudgetGuard

    config = path_or_config if isinstance(path_or_config, DeploymentConfig) else load_config(path_or_config)
    if policy is not None:
        policy = getattr(policy, "policy", policy)
    else:
        policy = config.policy(store=store)
    if llm is None:
        if degrade_to:
            raise TypeError("degrade_to needs a model to degrade from: guard_from_config(llm, path, degrade_to=[...]).")
        return BudgetGuard(policy=policy)
    ladder = list(degrade_to) if degrade_to is not None else config.degrade_models(llm, models)
    return BudgetGuard(llm, degrade_to=ladder, policy=policy)
