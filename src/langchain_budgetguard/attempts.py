"""The requests a model's SDK sends for one call: its own retries may each have been billed.

The OpenAI and Anthropic SDKs resend a request that timed out or whose connection broke before the
answer came (``max_retries``, 2 by default), and so do a ``with_retry`` or a ``with_fallbacks``
inside the guarded model; only the attempt that answered reaches LangChain.
The provider may have answered, and billed, every attempt it received. The guard counts a call's
attempts on the SDK's httpx client: a request hook and a response hook, which count only inside a
guarded call (a ``ContextVar``), so the client's other users are not affected. An attempt that got
no response after its request began to go out (httpcore's ``trace`` extension tells) may have been
billed in full; one that got a response (an error status, a retry-after) was not, nor one whose
connection was refused or timed out before anything was sent.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from contextvars import ContextVar, Token
from typing import Any

__all__ = ["Attempts", "Counting", "watch", "counted", "acounted", "count_here", "finish"]


class _Attempt:
    """One request the SDK sent: whether any of it left the client, and whether it was answered."""

    __slots__ = ("traced", "sent", "answered", "status")

    def __init__(self) -> None:
        self.traced = False  # the transport reports its steps (httpcore's ``trace`` extension)
        self.sent = False  # the request's headers began to go out: the provider may have received it
        self.answered = False
        self.status = 0  # the response's HTTP status, once answered

    @property
    def maybe_billed(self) -> bool:
        """Unanswered and possibly received. A transport that does not report its steps is taken
        at its worst: its request may have reached the provider."""
        return not self.answered and (self.sent or not self.traced)

    def step(self, name: str) -> None:
        self.traced = True
        if name.endswith(".send_request_headers.started"):
            self.sent = True


class Attempts:
    """The requests the SDK sent inside one guarded call; it counts none once ``closed``."""

    __slots__ = ("requests", "closed")

    def __init__(self) -> None:
        self.requests: list[_Attempt] = []
        self.closed = False

    @property
    def sent(self) -> int:
        return len(self.requests)

    @property
    def unanswered(self) -> int:
        """Requests that may have reached the provider and got no response: each may have been
        billed in full. A connection refused or timing out before the request went out is not."""
        return sum(attempt.maybe_billed for attempt in self.requests)

    @property
    def billable(self) -> int:
        """Requests the provider may have billed, for a call whose outcome was never seen: those
        ``unanswered``, and those it answered with a success (the answer that did not reach us)."""
        return self.unanswered + sum(a.answered and 200 <= a.status < 300 for a in self.requests)


# Every count a request made here belongs to: a guarded call inside an ``enforce_budget`` block on
# another budget is counted by both (each charges its own budget for a lost attempt).
_current: ContextVar[tuple[Attempts, ...]] = ContextVar("budgetguard_attempts", default=())
_KEY = "budgetguard.attempt"  # the request's extension holding its _Attempt


def _live() -> tuple[Attempts, ...]:
    counts = _current.get()
    return counts if not any(a.closed for a in counts) else tuple(a for a in counts if not a.closed)


def _begin(request: Any) -> tuple[_Attempt, Any] | None:
    counts = _live()
    extensions = getattr(request, "extensions", None)
    if not counts or not isinstance(extensions, dict):
        return None
    attempt = _Attempt()
    for attempts in counts:
        attempts.requests.append(attempt)
    extensions[_KEY] = attempt
    return attempt, extensions.get("trace")


_here: ContextVar[Attempts | None] = ContextVar("budgetguard_attempts_here", default=None)


def count_here(attempts: Attempts) -> None:
    """Count the requests sent from this context (and the threads and tasks it starts) in
    ``attempts`` until ``finish``: for a call whose start and end are separate callbacks. It
    takes over from the previous such count of this context: a call whose start another handler
    aborted gets no end, and must not be charged for the requests of the calls after it."""
    previous = _here.get()
    _here.set(attempts)
    _current.set((*(a for a in _live() if a is not previous), attempts))


def finish(attempts: Attempts) -> None:
    """Stop counting in ``attempts``, wherever ``count_here`` began it."""
    attempts.closed = True
    live = _live()
    if live is not _current.get():
        _current.set(live)


def _request(request: Any) -> None:
    begun = _begin(request)
    if begun is None:
        return
    attempt, theirs = begun

    def trace(name: str, info: dict[str, Any]) -> None:
        attempt.step(name)
        if theirs is not None:
            theirs(name, info)

    request.extensions["trace"] = trace


async def _arequest(request: Any) -> None:
    begun = _begin(request)
    if begun is None:
        return
    attempt, theirs = begun

    async def trace(name: str, info: dict[str, Any]) -> None:
        attempt.step(name)
        if theirs is not None:
            await theirs(name, info)

    request.extensions["trace"] = trace


def _response(response: Any) -> None:
    attempt = getattr(getattr(response, "request", None), "extensions", {}).get(_KEY)
    if isinstance(attempt, _Attempt):
        attempt.answered = True
        status = getattr(response, "status_code", 0)
        attempt.status = status if isinstance(status, int) else 0


async def _aresponse(response: Any) -> None:
    _response(response)


_hooked: weakref.WeakSet[Any] = weakref.WeakSet()  # httpx clients with our hooks (shared between models)

# Where LangChain's integrations keep their SDK clients: langchain-openai's root clients,
# langchain-anthropic's (built on first use).
_SDK_CLIENTS = ("root_client", "root_async_client", "_client", "_async_client")


def watch(model: Any) -> bool:
    """Hook the httpx clients of the SDKs under ``model`` (its bindings, fallbacks and chain steps
    included); whether there is any. Idempotent. Every SDK client is watched, whatever its
    ``max_retries``: a ``with_retry`` or a fallback inside the guarded model resends too."""
    found = False
    for sdk in _sdk_clients(model):
        http = getattr(sdk, "_client", None)
        hooks = getattr(http, "event_hooks", None)
        if not isinstance(hooks, dict) or not isinstance(hooks.get("request"), list) \
                or not isinstance(hooks.get("response"), list):
            continue
        if http not in _hooked:
            is_async = inspect.iscoroutinefunction(getattr(type(http), "send", None))
            hooks["request"].append(_arequest if is_async else _request)
            hooks["response"].append(_aresponse if is_async else _response)
            _hooked.add(http)
        found = True
    return found


def _sdk_clients(model: Any, depth: int = 0) -> Iterator[Any]:
    if model is None or depth > 8:
        return
    for step in (getattr(model, "bound", None), getattr(model, "runnable", None),
                 *(getattr(model, "fallbacks", None) or ()), *_steps(model)):
        if step is not None and step is not model:
            yield from _sdk_clients(step, depth + 1)
    fields = getattr(type(model), "model_fields", None)
    if not isinstance(fields, dict) or "model_name" not in fields and "model" not in fields:
        return  # not a chat model: nothing of its is an SDK client
    for name in _SDK_CLIENTS:
        try:
            sdk = getattr(model, name, None)
        except Exception:  # noqa: BLE001 - a client that cannot be built is not watched
            continue
        if sdk is not None and hasattr(sdk, "max_retries"):  # an SDK client (OpenAI's, Anthropic's)
            yield sdk


def _steps(model: Any) -> tuple[Any, ...]:
    steps = getattr(model, "steps", None) if type(model).__name__ == "RunnableSequence" else None
    return tuple(steps) if isinstance(steps, list) else ()


class Counting:
    """``with`` / ``async with``: count the SDK's attempts made inside the block in ``attempts``."""

    __slots__ = ("attempts", "_token")

    def __init__(self) -> None:
        self.attempts = Attempts()
        self._token: Token[tuple[Attempts, ...]] | None = None

    def __enter__(self) -> Attempts:
        self._token = _current.set((*_live(), self.attempts))
        return self.attempts

    def __exit__(self, *exc: Any) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)
        self.attempts.closed = True

    async def __aenter__(self) -> Attempts:
        return self.__enter__()

    async def __aexit__(self, *exc: Any) -> None:
        self.__exit__()


def counted(chunks: Iterable[Any], attempts: Attempts) -> Iterator[Any]:
    """``chunks`` (a stream), counting the requests its SDK sends while each chunk is read. The
    count is on only while the stream is read, never while its consumer runs between chunks."""
    iterator = iter(chunks)
    try:
        while True:
            token = _current.set((*_live(), attempts))
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            finally:
                _current.reset(token)
            yield chunk
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


async def acounted(chunks: AsyncIterator[Any], attempts: Attempts) -> AsyncIterator[Any]:
    """The async twin of ``counted``."""
    try:
        while True:
            token = _current.set((*_live(), attempts))
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            finally:
                _current.reset(token)
            yield chunk
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
