"""What a guarded stream has produced, and what it costs when it ends or breaks off."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessageChunk

from .attempts import Attempts
from .failures import billed_unknown
from .messages import billed_text_of
from .usage import TokenUsage, UsageError, usage_from_message, usage_from_usage_metadata

if TYPE_CHECKING:
    from .admission import Admitted
    from .guard import BudgetGuard, CallCost

__all__ = ["StreamTracker", "output_after_report"]


def output_after_report(chunk: Any, text: str, before: bool) -> bool:
    """Whether a stream has output its last usage report does not cover, once ``chunk`` (whose
    billed output is ``text``) has arrived; ``before``: whether it had before this chunk. A usage
    reported early (the prompt's, at the stream's start: Anthropic's ``message_start``, OpenAI's
    usage mid-stream) does not cover the output after it, should the stream break off."""
    if getattr(chunk, "usage_metadata", None) is not None:
        return False
    return before or bool(text)


class StreamTracker:
    """Collects a stream's chunks; knows what to charge when it ends or breaks off.

    The chunks are added together once, when the sum is needed (a run's output, a usage spread over
    several chunks): adding each chunk as it comes builds a new message per chunk (~10 µs each).
    """

    def __init__(self, guard: BudgetGuard, admitted: Admitted) -> None:
        self.guard = guard
        self.admitted = admitted
        self._chunks: list[Any] = []
        self._sum: tuple[int, Any] = (0, None)  # (chunks added, their sum)
        self._text: list[str] = []  # billed output: visible text, tool calls and reasoning
        self._named: Any = None  # the last chunk that names the model that answered
        self.last: Any = None  # the provider's last chunk, held back by pass_on
        # A chunk with output carries at least one token: more such chunks than the output cap the
        # call was reserved for means the provider ignores the cap, and the stream is stopped.
        self._pieces = 0
        self.over_cap = False
        # Output came after the last chunk that reported usage: a usage reported early (the
        # prompt's, at the stream's start) does not cover it if the stream breaks off.
        self._unreported_output = False
        # The requests the SDK sends (attempts.counted): each resent one that got no answer is charged.
        self.attempts: Attempts | None = Attempts() if admitted.candidate.counts_requests else None

    def pass_on(self, chunk: Any) -> tuple[Any, ...]:
        """Add ``chunk``; return the chunks to yield now. The provider's last chunk
        (``chunk_position="last"``) is held back in ``last``, to carry the call's cost when it ends."""
        self.add(chunk)
        held, self.last = self.last, None
        if getattr(chunk, "chunk_position", None) == "last":
            self.last = chunk
            return () if held is None else (held,)
        return (chunk,) if held is None else (held, chunk)

    def add(self, chunk: Any) -> None:
        self._chunks.append(chunk)
        text = billed_text_of(chunk)
        if text:
            self._text.append(text)
            self._pieces += 1
            if self._pieces > self.admitted.estimate.held_output_tokens:
                self.over_cap = True
        self._unreported_output = output_after_report(chunk, text, self._unreported_output)
        metadata = getattr(chunk, "response_metadata", None)
        if metadata and ("model_name" in metadata or "model" in metadata):
            self._named = chunk

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

    def finish(self, interrupted: bool = False) -> CallCost:
        try:
            usage = self._usage()
        except UsageError as bad:  # a count that cannot be real is never trusted: charge the hold
            return self._with_unanswered(self.guard._charged_by_policy(self.admitted, str(bad)))
        return self._with_unanswered(self.guard._cost(self.admitted, None, "".join(self._text), usage, self._named,
                                                      interrupted))

    def interrupted(self, error: BaseException | None = None) -> tuple[int, CallCost | None]:
        """``(amount, cost)`` of a stream that broke off with ``error``: input plus output so far (once
        a stream has begun the provider bills the prompt). Before the first chunk nothing, unless it
        timed out or was cancelled waiting for its answer (``failures.billed_unknown``): then the
        whole reservation. Never raises: chunks that cannot even be added up (a junk usage shape)
        charge the whole hold."""
        if not self._chunks:
            if billed_unknown(error):
                cost = self._with_unanswered(self.guard._charged_by_policy(
                    self.admitted, f"the stream ended in {type(error).__name__} before its first chunk, while the "
                    "provider may have answered it in full: charged its reservation"), covered=1)
                return cost.charged_nano, cost
            cost = self._with_unanswered(None)
            return (cost.charged_nano, cost) if cost is not None else (0, None)
        try:
            cost = self.finish(interrupted=self._unreported_output)
        except Exception as exc:  # noqa: BLE001 - the settle must happen whatever the chunks hold
            cost = self.guard._charged_by_policy(self.admitted, f"unreadable stream: {exc!r}")
        return cost.charged_nano, cost

    def _with_unanswered(self, cost: CallCost | None, covered: int = 0) -> CallCost | None:
        return self.guard._charged_for_attempts(self.admitted, cost, self.attempts, covered)
