"""What a guarded stream has produced, and what it costs when it ends or breaks off."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessageChunk

from .messages import text_of
from .usage import TokenUsage, usage_from_message, usage_from_usage_metadata

if TYPE_CHECKING:
    from .guard import BudgetGuard, CallCost, _Admitted

__all__ = ["StreamTracker"]


class StreamTracker:
    """Collects a stream's chunks; knows what to charge when it ends or breaks off.

    The chunks are added together once, when the sum is needed (a run's output, a usage spread over
    several chunks): adding each chunk as it comes builds a new message per chunk (~10 µs each).
    """

    def __init__(self, guard: BudgetGuard, admitted: _Admitted) -> None:
        self.guard = guard
        self.admitted = admitted
        self._chunks: list[Any] = []
        self._sum: tuple[int, Any] = (0, None)  # (chunks added, their sum)
        self._text: list[str] = []
        self._next_renew = time.monotonic() + guard.policy.lease_seconds / 3

    def add(self, chunk: Any) -> None:
        self._chunks.append(chunk)
        text = text_of(chunk)
        if text:
            self._text.append(text)

    @property
    def output(self) -> Any:
        """The chunks added together (a chunk that cannot be added replaces what came before it)."""
        chunks = self._chunks
        if self._sum[0] == len(chunks):
            return self._sum[1]
        total: Any = None
        if len(chunks) > 1 and all(type(c) is AIMessageChunk for c in chunks):
            total = chunks[0] + chunks[1:]  # one merge of all, equal to adding them one by one
        else:
            for chunk in chunks:
                try:
                    total = chunk if total is None else total + chunk
                except TypeError:
                    total = chunk
        self._sum = (len(chunks), total)
        return total

    def _usage(self) -> TokenUsage | None:
        """The sum's usage; without summing when one chunk carries all of it (the usual last chunk)."""
        carriers = [c for c in self._chunks if getattr(c, "usage_metadata", None) is not None]
        if len(carriers) == 1 and all(type(c) is AIMessageChunk for c in self._chunks):
            usage = usage_from_usage_metadata(carriers[0].usage_metadata)
            if usage is not None and usage.total_tokens:
                return usage
        output = self.output
        return usage_from_message(output) if output is not None else None

    def renew_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_renew:
            return False
        self._next_renew = now + self.guard.policy.lease_seconds / 3
        return True

    def finish(self) -> CallCost:
        return self.guard._cost(self.admitted, None, "".join(self._text), self._usage())

    def interrupted_charge(self) -> int:
        """Input plus output so far: once a stream has begun the provider bills the prompt."""
        if not self._chunks:
            return 0
        return self.finish().charged_nano
