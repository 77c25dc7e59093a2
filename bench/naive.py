"""The naive baseline: check-then-record, as many gateways enforce a budget.

Read what is spent, compare it with the limit, call the model, add what the call cost:

    spent = GET key
    if spent + estimate > limit: refuse
    reply = model.invoke(...)
    INCRBY key cost

Two Redis round trips per call, like the guard's reserve and settle, and the same estimate and the
same exact pricing as the guard, so the one difference is the gap between the check and the record:
calls that pass the check together all go ahead, and the budget is overspent by up to (concurrent
calls - 1) x their cost. (Checking ``spent < limit`` without an estimate, as some do, overspends more.)
"""

from __future__ import annotations

from typing import Any

from langchain_budgetguard.estimate import estimate_input_tokens, get_estimator, max_output_tokens
from langchain_budgetguard.pricing import default_pricer, model_ref
from langchain_budgetguard.usage import TokenUsage, usage_from_message


class NaiveRefused(Exception):
    """The naive check found the budget spent."""


class NaiveBudget:
    """Check-then-record in front of ``llm``: one integer nano-USD counter in Redis at ``key``."""

    def __init__(self, llm: Any, client: Any, key: str, limit_nano: int, estimator: str = "strict",
                 default_max_output_tokens: int = 4096) -> None:
        self.llm = llm
        self.client = client
        self.key = key
        self.limit = limit_nano
        self.estimator = get_estimator(estimator)
        self.card = default_pricer().rate_card(model_ref(llm))
        self.cap = max_output_tokens(llm) or default_max_output_tokens

    def estimate(self, prompt: Any) -> int:
        from langchain_core.messages import HumanMessage

        messages = [HumanMessage(prompt)] if isinstance(prompt, str) else prompt
        tokens = estimate_input_tokens(self.estimator, messages, None, self.llm)
        return self.card.cost_nano(TokenUsage(input_tokens=tokens, output_tokens=self.cap))

    def invoke(self, prompt: Any, config: Any = None) -> Any:
        estimate = self.estimate(prompt)
        spent = int(self.client.get(self.key) or 0)  # check ...
        if spent + estimate > self.limit:
            raise NaiveRefused(f"spent {spent} + estimate {estimate} > limit {self.limit}")
        reply = self.llm.invoke(prompt, config)  # ... act ...
        usage = usage_from_message(reply) or TokenUsage()
        cost = self.card.cost_nano(usage)
        self.client.incrby(self.key, cost)  # ... and record, too late for the calls already past the check
        reply.response_metadata["naive_cost_nano"] = cost
        return reply
