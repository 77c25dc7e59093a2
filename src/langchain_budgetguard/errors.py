"""Errors the guard raises. Each says what was wrong and what to do."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from .money import format_usd

__all__ = [
    "BudgetGuardError",
    "BudgetExceededError",
    "IdentityError",
    "UnknownModelPriceError",
    "BudgetStoreUnavailableError",
    "GuardMisuseError",
    "CallIdReusedError",
    "Refusal",
]


class BudgetGuardError(Exception):
    """Base class of every error this library raises."""


@dataclass(frozen=True)
class Refusal:
    """Why one limit refused one model's reservation."""

    scope: str
    scope_id: str | None
    window: str
    limit: Decimal
    spent: Decimal
    held: Decimal
    estimate: Decimal
    model: str
    resets_at: datetime | None
    # What the estimate is made of, and what would have fitted (None when not known).
    input_estimate: Decimal | None = None
    output_estimate: Decimal | None = None
    output_tokens: int | None = None  # the output cap the estimate reserves for
    output_cap_source: str | None = None  # who set it: call, binding, model, integration_default, none
    fitting_output_tokens: int | None = None  # the largest output cap that would fit (0: not even input)
    unit: str = "usd"  # what the limit counts: "usd" (limit, spent, held, estimate in USD), "tokens", "requests"
    completions: int = 1  # the call asks for this many completions (n), each reserved up to output_tokens
    input_tokens: int | None = None  # the prompt tokens the estimate holds
    unsized_inputs: int = 0  # documents of unreadable size (by URL / file id), held at the model's input limit
    stored_context: str | None = None  # the parameter continuing provider-stored context (previous_response_id)
    thinking: int = 0  # of output_tokens, those the call lets the model think with (Anthropic's budget_tokens)

    @property
    def _output(self) -> str:
        if self.completions > 1:
            return f"{self.completions} completions of up to {self.output_tokens:,} tokens each"
        return f"{self.output_tokens:,} tokens"

    @property
    def dominant(self) -> str | None:
        """``"input"`` or ``"output"``: the larger part of the estimate."""
        if self.input_estimate is None or self.output_estimate is None:
            return None
        return "output" if self.output_estimate >= self.input_estimate else "input"

    def amount(self, value: Decimal | None) -> str:
        """``value`` in this limit's unit, as the messages show it ($0.50, 5,000 tokens, 10 requests)."""
        if self.unit == "usd":
            return format_usd(value)
        return f"{int(value or 0):,} {self.unit if value != 1 else self.unit[:-1]}"

    def describe(self) -> str:
        who = f"{self.scope} {self.scope_id!r}" if self.scope_id is not None else self.scope
        resets = f"; resets at {self.resets_at.isoformat()}" if self.resets_at else "; never resets (total)"
        if self.unit != "usd":
            return (
                f"{who}, window {self.window}: limit {self.amount(self.limit)}, used {self.amount(self.spent)}, "
                f"held by calls in flight {self.amount(self.held)}, this call on {self.model} needs "
                f"{self.amount(self.estimate)}{resets}"
            )
        parts = ""
        if self.dominant is not None:
            parts = (f" (input {format_usd(self.input_estimate)}, output {format_usd(self.output_estimate)} for "
                     f"{self._output})")
        return (
            f"{who}, window {self.window}: limit {format_usd(self.limit)}, spent {format_usd(self.spent)}, "
            f"held by calls in flight {format_usd(self.held)}, this call's estimate on {self.model} "
            f"{format_usd(self.estimate)}{parts}{resets}"
        )

    def _beyond_thinking(self, cap: int) -> str:
        """How far ``cap`` is above the call's thinking budget ('' without one), which it must exceed."""
        return f", {cap - self.thinking:,} beyond the thinking budget (it must stay above it)" if self.thinking else ""

    def fix(self) -> str:
        """What would make this call fit, from what dominated its estimate."""
        if self.unit == "requests":
            return "The limit counts calls: wait for the window to reset, or raise the limit."
        fewer = f" (or ask for fewer than {self.completions} completions)" if self.completions > 1 else ""
        if self.unit == "tokens" and self.thinking and (self.fitting_output_tokens or 0) <= self.thinking:
            return (f"The limit counts tokens: what is left holds at most {self.fitting_output_tokens or 0:,} output "
                    f"tokens, not the thinking budget ({self.thinking:,}, thinking.budget_tokens) and an answer: "
                    "lower the budget, wait for the window to reset, or raise the limit.")
        if self.unit == "tokens" and self.fitting_output_tokens:
            return (f"The limit counts tokens: a max_tokens of at most {self.fitting_output_tokens:,} would "
                    f"fit{fewer}{self._beyond_thinking(self.fitting_output_tokens)}, or wait for the window to "
                    "reset, or raise the limit.")
        if self.unit == "tokens":
            return "The limit counts tokens: shorten the prompt, wait for the window to reset, or raise the limit."
        if self.dominant == "output" and self.thinking:
            room, budget = self.fitting_output_tokens or 0, f"{self.thinking:,}"
            what = f"The output cap dominates: {self._output}, {budget} of them to think (thinking.budget_tokens)."
            if room > self.thinking:
                return (f"{what} A max_tokens of at most {room:,} would fit{fewer}{self._beyond_thinking(room)}; "
                        "or lower the budget, or degrade to a cheaper model.")
            return (f"{what} What is left holds at most {room:,} output tokens, not the budget and an answer: "
                    "lower the thinking budget (and max_tokens, above it), degrade to a cheaper model, or raise "
                    "the limit.")
        if self.dominant == "output" and self.fitting_output_tokens:
            source = {"integration_default": " (the integration's default: its full output limit)",
                      "none": " (the guard's default_max_output_tokens)"}.get(self.output_cap_source or "", "")
            return (f"The output cap dominates: {self._output}{source}. A max_tokens of at most "
                    f"{self.fitting_output_tokens:,} would fit{fewer} (or lower min_output_tokens so the guard "
                    "shrinks the cap to fit), or degrade to a cheaper model.")
        if self.dominant == "output":
            return (f"The output cap dominates ({self._output}), but what is left does not hold "
                    "even the prompt: raise the limit, wait for the reset, or add a cheaper model to degrade_to.")
        if self.dominant == "input" and self.stored_context:
            held = f" ({self.input_tokens:,} tokens)" if self.input_tokens else ""
            return (f"The prompt dominates: the call continues context the provider stores ({self.stored_context}), "
                    "billed again as input and not in the request, so it is held at the model's whole input "
                    f"limit{held}. Send the history with the call instead (ChatOpenAI(use_previous_response_id="
                    "True) keeps it counted), or use estimator='typical'; or add a cheaper model to degrade_to, "
                    "or raise the limit.")
        if self.dominant == "input" and self.unsized_inputs:
            what = "document" if self.unsized_inputs == 1 else f"{self.unsized_inputs} documents"
            held = f" ({self.input_tokens:,} tokens)" if self.input_tokens else ""
            return (f"The prompt dominates: it sends {what} whose size cannot be read before the call (by URL "
                    f"or file id, or a PDF with compressed pages), so it is held at the model's whole input "
                    f"limit{held}. Send files inline (base64, uncompressed PDF pages) so the guard counts them, or "
                    "vouch for their size with StrictEstimator(url_media_tokens=...); or add a cheaper model to "
                    "degrade_to, or raise the limit.")
        if self.dominant == "input":
            return ("The prompt dominates: shorten it (trim the history, fewer or smaller documents), or add a "
                    "cheaper model to degrade_to; or raise the limit, or wait for the window to reset.")
        return "Raise the limit, wait for the window to reset, or add a cheaper model to degrade_to."


class BudgetExceededError(BudgetGuardError):
    """No model of the ladder fits every limit that applies to this call.

    ``refusal`` is the limit that refused the last model tried; ``refusals`` has one entry per
    model tried, in order. The attributes of ``refusal`` are also on the error itself.
    """

    def __init__(self, refusals: list[Refusal]) -> None:
        self.refusals = list(refusals)
        self.refusal = self.refusals[-1]
        r = self.refusal
        self.scope, self.scope_id, self.window = r.scope, r.scope_id, r.window
        self.limit, self.spent, self.held, self.estimate = r.limit, r.spent, r.held, r.estimate
        self.model, self.resets_at = r.model, r.resets_at
        tried = ", ".join(dict.fromkeys(x.model for x in self.refusals))
        super().__init__(f"Budget exceeded for {r.describe()}. Models tried: {tried}. {r.fix()}")


class IdentityError(BudgetGuardError, ValueError):
    """A per-scope limit applies but the call does not say whose budget it is."""


class UnknownModelPriceError(BudgetGuardError, LookupError):
    """The guard cannot price a model, and will not pretend it costs $0."""


class BudgetStoreUnavailableError(BudgetGuardError):
    """The budget store could not be reached and the guard's policy is fail-closed."""


class GuardMisuseError(BudgetGuardError, TypeError):
    """The guard was placed where it cannot guard anything (for example after the model)."""


class CallIdReusedError(BudgetGuardError, ValueError):
    """A call id that already reserved (or settled) was given to admit another call.

    A call id names exactly one call: once it has held money it can never admit a second call,
    or a settled call id would make every later call with it free. ``call_id`` is the id and
    ``state`` what the store knows of it (``"held"``, ``"expired"``, ``"settled"``, or None).
    """

    def __init__(self, call_id: str, state: str | None = None) -> None:
        self.call_id = call_id
        self.state = state
        known = {
            "held": "is held by a call in flight",
            "expired": "belonged to a call whose hold expired",
            "settled": "belonged to a call that is already settled",
        }.get(state or "", "was already used by another call")
        shown = call_id if len(call_id) <= 80 else call_id[:80] + "..."
        super().__init__(
            f"Call id {shown!r} {known}; call ids must be unique per call, so this call is refused "
            "rather than served free. Leave call_id out and the library derives a random 128-bit id "
            "for each call (os.urandom(16).hex()), or pass a fresh one per call (uuid.uuid4().hex), "
            "never a request or LangChain run_id that callers may repeat."
        )

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        return (type(self), (self.call_id, self.state))
