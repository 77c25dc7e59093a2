"""The LangChain run a guard opens around its model call, and what listeners see of it.

A guard opens a run (named ``BudgetGuard``) only when something would read it: a handler that
consumes chain runs, custom events or streamed tokens (tracers, ``astream_events``, LangGraph's
stream modes), tracing, debug output or a configure hook. A handler that only reads model runs
(``UsageMetadataCallbackHandler``, ``get_cost_callback``) gets the model's run without one of ours:
a run nobody reads would only cost time.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.callbacks.base import BaseCallbackManager
from langchain_core.globals import get_debug, get_verbose
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import (
    get_async_callback_manager_for_config,
    get_callback_manager_for_config,
    patch_config,
)
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.context import _configure_hooks, _tracing_v2_is_enabled
from langchain_core.utils.env import env_var_is_set

from .messages import text_of

if TYPE_CHECKING:
    from .policy import BudgetPolicy

__all__ = ["NoRun", "ANoRun", "StreamTap", "ReplyTap", "observed", "has_handlers", "has_consumers", "consumes_runs",
           "open_run", "aopen_run", "tap", "tapped", "tap_reply"]


def open_run(name: str, input: Any, config: RunnableConfig, policy: BudgetPolicy) -> tuple[Any, RunnableConfig]:
    """``(run manager, config for the model)``; a ``NoRun`` and the same config when nobody observes."""
    if not observed(config):
        return NoRun(), config
    run_manager = get_callback_manager_for_config(config).on_chain_start(
        None, input, name=config.get("run_name") or name, run_id=config.pop("run_id", None)
    )
    return run_manager, guarded_child(config, run_manager, policy)


async def aopen_run(name: str, input: Any, config: RunnableConfig, policy: BudgetPolicy) -> tuple[Any, RunnableConfig]:
    if not observed(config):
        return ANoRun(), config
    run_manager = await get_async_callback_manager_for_config(config).on_chain_start(
        None, input, name=config.get("run_name") or name, run_id=config.pop("run_id", None)
    )
    return run_manager, guarded_child(config, run_manager, policy)


class NoRun:
    """Stands in for a run manager when nobody observes runs: opening one would cost for nothing."""

    def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
        return None

    on_chain_error = on_chain_end


class ANoRun:
    async def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
        return None

    on_chain_error = on_chain_end


def observed(config: RunnableConfig) -> bool:
    """Would anyone read a run of ours: a consuming handler, tracing, debug output or a configure hook?"""
    if has_consumers(config) or get_debug() or get_verbose() or _tracing_v2_is_enabled():
        return True
    for var, _inheritable, handler_class, env_var in _configure_hooks:
        if var.get() is not None or (handler_class is not None and env_var and env_var_is_set(env_var)):
            return True
    return False


# What a run of ours produces: chain start/end/error, custom events; and, through the stream tap,
# the tokens of a call a listener streams.
_RUN_CALLBACKS = ("on_chain_start", "on_chain_end", "on_chain_error", "on_custom_event", "on_llm_new_token")


@functools.cache
def consumes_runs(handler_class: type) -> bool:
    """Does a handler of this class read chain runs, custom events or tokens (cached per class)?"""
    if issubclass(handler_class, BaseTracer):
        return True
    return any(getattr(handler_class, name, None) is not getattr(BaseCallbackHandler, name)
               for name in _RUN_CALLBACKS)


def has_consumers(config: RunnableConfig) -> bool:
    callbacks = config.get("callbacks")
    handlers = getattr(callbacks, "handlers", callbacks)
    return bool(handlers) and any(consumes_runs(type(h)) for h in handlers)


def has_handlers(config: RunnableConfig) -> bool:
    callbacks = config.get("callbacks")
    return bool(getattr(callbacks, "handlers", callbacks))


def guarded_child(config: RunnableConfig, run_manager: Any, policy: BudgetPolicy) -> RunnableConfig:
    """Our run as parent, and a mark telling ``enforce_budget`` this call is already charged to this budget."""
    from .enforce import GUARDED_KEY, budget_token

    metadata = {**(config.get("metadata") or {}), GUARDED_KEY: budget_token(policy)}
    return patch_config({**config, "metadata": metadata}, callbacks=run_manager.get_child())


class StreamTap(BaseCallbackHandler):
    """Sees the tokens of a call that a listener streams, so a break-off can be charged."""

    run_inline = True

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.parts.append(text_of(getattr(chunk, "message", None)) or token)

    def text(self) -> str:
        return "".join(self.parts)


def tap(child: RunnableConfig) -> StreamTap | None:
    callbacks = child.get("callbacks")
    if not isinstance(callbacks, BaseCallbackManager):
        return None  # no run of ours, so no listener can stream this call
    tap = StreamTap()
    callbacks.add_handler(tap, inherit=True)
    return tap


def tap_stream(config: RunnableConfig | None) -> tuple[RunnableConfig | None, StreamTap]:
    """``config`` with a ``StreamTap`` among its handlers, for an invoke the model serves by
    streaming (``streaming=True``): what it streamed before it broke off is charged."""
    stream_tap = StreamTap()
    callbacks = config.get("callbacks") if config else None
    if isinstance(callbacks, BaseCallbackManager):
        manager: Any = callbacks.copy()
        manager.add_handler(stream_tap, inherit=True)
    else:
        manager = [*(callbacks or ()), stream_tap]
    return {**(config or {}), "callbacks": manager}, stream_tap  # type: ignore[typeddict-item]


def tapped(tap: StreamTap | None) -> str | None:
    """The output a listener saw stream before a call broke off, if any."""
    return (tap.text() or None) if tap is not None else None


class ReplyTap(BaseCallbackHandler):
    """Sees the model's reply before any other handler does.

    LangChain re-raises an error of a handler with ``raise_error`` set, so a handler that raises in
    ``on_llm_end`` makes a call the provider answered (and billed) end in an exception; the handler
    may even keep the reply. The tap keeps the reply, so that such a call is charged for it.
    """

    run_inline = True  # before the handlers an async manager gathers

    def __init__(self) -> None:
        super().__init__()
        self.message: Any = None

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        return None  # else LangChain falls back to on_llm_start, rendering every message as text first

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        if self.message is None:
            try:
                self.message = response.generations[0][0].message
            except (AttributeError, IndexError, TypeError):
                pass


def tap_reply(config: RunnableConfig | None, always: bool = False) -> tuple[RunnableConfig | None, ReplyTap | None]:
    """``config`` with a ``ReplyTap`` first among its handlers, and the tap; ``(config, None)`` when
    none of its handlers can raise (only one with ``raise_error`` set does: LangChain logs the
    others' errors) unless ``always`` (the runnable runs steps of its own after its model). Every
    handler costs each call LangChain's per-handler checks, so none is added that is not needed."""
    callbacks = config.get("callbacks") if config else None
    handlers = getattr(callbacks, "handlers", callbacks)
    if not always and not (isinstance(handlers, list) and any(getattr(h, "raise_error", False) for h in handlers)):
        return config, None
    reply = ReplyTap()
    if not callbacks:
        return {**(config or {}), "callbacks": [reply]}, reply  # type: ignore[typeddict-item]
    if isinstance(callbacks, BaseCallbackManager):
        manager: Any = callbacks.copy()
        manager.handlers.insert(0, reply)
        manager.inheritable_handlers.insert(0, reply)
    elif isinstance(callbacks, list):
        manager = [reply, *callbacks]
    else:
        return config, None
    return {**config, "callbacks": manager}, reply  # type: ignore[typeddict-item]
