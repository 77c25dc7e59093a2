"""``budgetguard demo``: a small chain on fake models and the in-process store.

No Redis, no API key, no network: shows calls served, a degrade to a cheaper
model, a refusal, and the final usage table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TextIO

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompts import ChatPromptTemplate

from .errors import BudgetExceededError
from .guard import BudgetGuard
from .limits import Limit
from .money import format_usd


class DemoChatModel(BaseChatModel):
    """A fake chat model that answers like a provider: a reply and its token usage."""

    model_name: str
    input_tokens: int = 1200
    output_tokens: int = 400
    max_tokens: int = 400

    @property
    def _llm_type(self) -> str:
        return "budgetguard-demo"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        return {"ls_provider": "openai", "ls_model_name": self.model_name, "ls_model_type": "chat",
                "ls_max_tokens": self.max_tokens}

    def _reply(self, messages: list[BaseMessage]) -> str:
        question = messages[-1].text if messages else ""
        return f"[{self.model_name}] an answer to: {question}"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        usage = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                 "total_tokens": self.input_tokens + self.output_tokens}
        message = AIMessage(self._reply(messages), usage_metadata=usage,
                            response_metadata={"model_name": self.model_name})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for word in self._reply(messages).split(" "):
            yield ChatGenerationChunk(message=AIMessageChunk(content=word + " "))
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata={
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens}))


def run_demo(out: TextIO) -> int:
    """Run the demo, writing a readable log to ``out``; returns a process exit code."""
    from .callbacks import get_cost_callback

    big = DemoChatModel(model_name="gpt-4o")
    cheap = DemoChatModel(model_name="gpt-4o-mini")
    guard = BudgetGuard(
        big,
        limits=[Limit(usd="0.02", per="user", window="day")],
        degrade_to=[cheap],
        degrade_at=0.6,
    )
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | guard | StrOutputParser()
    alice = {"configurable": {"user_id": "alice"}}
    out.write("BudgetGuard demo: gpt-4o degrading to gpt-4o-mini, $0.02 per user per day (in-process store)\n\n")
    questions = [f"question {i}" for i in range(1, 40)]
    served: dict[str, int] = {}
    degraded = refused = False
    with get_cost_callback() as cb:
        for i, question in enumerate(questions, 1):
            try:
                text = "".join(chain.stream({"question": question}, alice)) if i == 1 else \
                    chain.invoke({"question": question}, alice)
            except BudgetExceededError as exc:
                refused = True
                out.write(f"call {i:2}: REFUSED before any model call\n  {exc}\n")
                break
            model = text.split("]")[0].lstrip("[")
            served[model] = served.get(model, 0) + 1
            if model != "gpt-4o" and not degraded:
                degraded = True
                out.write(f"call {i:2}: budget getting tight -> degraded to {model}\n")
            else:
                out.write(f"call {i:2}: served by {model}\n")
    out.write("\nUsage seen by get_cost_callback():\n")
    out.write(str(cb) + "\n")
    out.write("\n{:<14} {:>8} {:>14} {:>16}\n".format("model", "calls", "tokens", "cost (USD)"))
    for name, totals in sorted(cb.by_model.items()):
        cost = format_usd(totals.cost) if totals.cost is not None else "unpriced"
        out.write(f"{name:<14} {totals.requests:>8} {totals.usage.total_tokens:>14} {cost:>16}\n")
    out.write("\nBudget status for user alice:\n")
    for s in guard.status(alice):
        out.write(f"  per {s.scope} {s.scope_id} ({s.window} {s.window_label}): limit {format_usd(s.limit)}, "
                  f"spent {format_usd(s.spent)}, held {format_usd(s.held)}, remaining {format_usd(s.remaining)}, "
                  f"resets at {s.resets_at.isoformat() if s.resets_at else 'never'}\n")
    ok = degraded and refused and cb.total_cost == sum(s.spent for s in guard.status(alice))
    if not ok:
        out.write("\ndemo did not show a degrade, a refusal and matching totals\n")
    return 0 if ok else 1
