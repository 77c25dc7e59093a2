"""What a model call that raised may have cost.

A provider bills a request it received and answered, whether or not the answer reached the caller.
A call that raised before its request went out (a refused connection, no free connection in the
pool) or that the provider refused (an HTTP error status) was not billed. One that timed out while
waiting for the answer, lost its connection mid-answer, or was cancelled (an ``asyncio`` task
cancelled by a timeout, ``KeyboardInterrupt``) may have been billed in full: nothing tells. Such a
call is charged its whole reservation, the most it can cost.

Some errors carry the provider's answer: the OpenAI SDK raises ``LengthFinishReasonError`` /
``ContentFilterFinishReasonError`` when it cannot parse a structured reply (the output hit its cap,
or was filtered), with the billed completion and its usage attached. Such a call is charged that
usage (``reply_in_error``).

A callback handler with ``raise_error`` set that raises in ``on_llm_end`` ends a call the provider
answered in an exception; LangChain raises it while delivering the reply to its handlers, so the
reply is still in the traceback (``llm_ends_in``) and the call is charged for it. One that raises in
``on_llm_error`` leaves the call's error, and what a stream got before it, there too (``llm_errors_in``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

__all__ = ["billed_unknown", "llm_ends_in", "llm_errors_in", "reply_in_error"]

# Names, not classes: httpx, openai, anthropic and requests name these alike, and none is a dependency.
_NOT_SENT = frozenset({"ConnectTimeout", "ConnectError", "PoolTimeout", "ProxyError", "SSLError",
                       "UnsupportedProtocol", "LocalProtocolError", "InvalidURL"})
_MAYBE_BILLED = frozenset({"ReadTimeout", "ReadError", "RemoteProtocolError", "APITimeoutError", "Timeout",
                           "ConnectionResetError", "IncompleteRead", "ChunkedEncodingError"})


def billed_unknown(error: BaseException | None) -> bool:
    """Whether a model call that raised ``error`` may have been billed without its answer reaching
    us: it timed out or was cancelled waiting for the answer, or its connection broke mid-answer.
    False for errors before the request went out (anywhere in the chain of causes) and for all other
    errors (the provider's refusals, the caller's bugs)."""
    if error is None:
        return False
    chain = _chain(error)
    if any(_llm_ends(e) for e in chain):  # raised while LangChain delivered the answer: billed
        return True
    if any(type(e).__name__ in _NOT_SENT for e in chain):
        return False
    return any(isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, TimeoutError))
               or type(e).__name__ in _MAYBE_BILLED for e in chain)


def _chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(chain) < 16:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


_MANAGER = "langchain_core.callbacks.manager"


def llm_ends_in(error: BaseException | None) -> list[tuple[Any, Any]]:
    """``(run id, LLMResult)`` of each model run whose ``on_llm_end`` was being delivered when
    ``error`` (or an error in its chain of causes) was raised: a handler with ``raise_error`` set
    failed on a reply the provider had already billed. Read from the traceback's frames of
    langchain-core's run managers; one entry per run."""
    if error is None:
        return []
    found: dict[Any, Any] = {}
    for e in _chain(error):
        for run_id, response in _llm_ends(e):
            found.setdefault(run_id, response)
    return list(found.items())


def llm_errors_in(error: BaseException | None) -> list[tuple[Any, BaseException, Any]]:
    """``(run id, the run's error, LLMResult or None)`` of each model run whose ``on_llm_error`` was
    being delivered when ``error`` (or an error in its chain of causes) was raised: a handler with
    ``raise_error`` set failed on it. Read from the traceback's frames of langchain-core's run
    managers; one entry per run."""
    if error is None:
        return []
    found: dict[Any, tuple[Any, BaseException, Any]] = {}
    for e in _chain(error):
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name == "on_llm_error" and frame.f_globals.get("__name__") == _MANAGER:
                local = frame.f_locals
                failure, kwargs = local.get("error"), local.get("kwargs")
                run_id = getattr(local.get("self"), "run_id", None)
                if isinstance(failure, BaseException) and run_id is not None:
                    response = kwargs.get("response") if isinstance(kwargs, Mapping) else None
                    found.setdefault(run_id, (run_id, failure, response))
            tb = tb.tb_next
    return list(found.values())


def _llm_ends(error: BaseException) -> list[tuple[Any, Any]]:
    ends = []
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "on_llm_end" and frame.f_globals.get("__name__") == _MANAGER:
            local = frame.f_locals
            response = local.get("response")
            if response is not None:
                ends.append((getattr(local.get("self"), "run_id", None), response))
        tb = tb.tb_next
    return ends


def reply_in_error(error: BaseException | None) -> Any:
    """The provider's billed answer an error carries (its ``completion`` with ``usage``), as an
    ``AIMessage`` whose metadata holds that usage and the model that answered, or the reply it was
    raised while delivering (``llm_ends_in``); None without one."""
    if error is None:
        return None
    for _, response in llm_ends_in(error)[:1]:
        try:
            return response.generations[0][0].message
        except (AttributeError, IndexError, TypeError):
            return None  # billed (billed_unknown says so), but nothing says how much
    for e in _chain(error):
        completion = getattr(e, "completion", None)
        usage = getattr(completion, "usage", None)
        if usage is None:
            continue
        dump = getattr(usage, "model_dump", None)
        usage = dump() if callable(dump) else usage
        if not isinstance(usage, Mapping):
            continue
        from langchain_core.messages import AIMessage

        metadata: dict[str, Any] = {"token_usage": dict(usage)}
        model = getattr(completion, "model", None)
        if isinstance(model, str) and model:
            metadata["model_name"] = model
        return AIMessage(content="", response_metadata=metadata)
    return None
