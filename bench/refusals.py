"""Section 8: refuse only what cannot fit. gpt-4o on a $0.50 budget that is 90% used.

Each of the 400 requests of tests/estimation_corpus.py (English, CJK, Arabic, Russian, code, JSON,
tool schemas, images, multi-turn) meets a budget with $0.05 left (a $0.50 limit, $0.45 spent; for
admission only what is left counts). Its true cost is its real prompt count (tests/provider_reference.py:
OpenAI's counting rules) plus a reply drawn from a log-normal around 300 tokens (seeded), at gpt-4o's
list price. It "would have fitted" when that true cost is at most $0.05.

- before: the strict estimate this library had (UTF-8 byte bound) and a 4,096-token output
  reservation, no shrinking: the call is refused when that hold does not fit.
- after, exact only: today's strict estimate (exact tokenizer + margin), 4,096 tokens, no shrinking.
- after: the guard as it is (``BudgetGuard.reserve`` on a real ChatOpenAI object, in-process store):
  exact estimate, and shrink to fit (the largest cap that fits, at least 256 tokens, sent as the
  call's cap: the reply is cut there). The call is then settled with its true usage, so overspend
  (spent above the limit) would show.

The share reported is refused-but-would-have-fitted / would-have-fitted, per variant.
"""

from __future__ import annotations

import math
import random
from decimal import Decimal
from typing import Any

from langchain_budgetguard import BudgetExceededError, BudgetGuard
from langchain_budgetguard.estimate import StrictEstimator
from langchain_budgetguard.money import usd_to_nano
from langchain_budgetguard.usage import TokenUsage

from .common import Results, Row

LEFT = Decimal("0.05")  # $0.50 budget, 90% used
MODEL = "gpt-4o"
CAP = 4096
GOAL = 0.05  # at most 5% of the calls that would have fitted are refused


def _reply_tokens(rng: random.Random) -> int:
    return max(1, min(CAP, int(rng.lognormvariate(math.log(300), 1.0))))


def run(results: Results, client: Any | None, quick: bool) -> None:
    try:
        from langchain_openai import ChatOpenAI

        from tests.estimation_corpus import build_corpus
        from tests.provider_reference import reference_count
    except ImportError as exc:  # the corpus lives with the tests; the tokenizers extra is needed
        results.notes.append(f"section 8 skipped: {exc}")
        return
    llm = ChatOpenAI(model=MODEL, api_key="unused: nothing is sent")
    probe = BudgetGuard(llm, limit=1)
    card = probe.policy.pricer.rate_card(probe._ladder()[0].ref)
    left = usd_to_nano(LEFT)
    byte_bound, exact = StrictEstimator(exact=False), StrictEstimator()
    rng = random.Random(7)
    counts = {"fit": 0, "before": 0, "exact": 0, "after": 0, "clamped": 0, "overspend": 0}
    for req in build_corpus(120 if quick else 400):
        true_in = reference_count(req, MODEL)
        if true_in is None:
            continue
        out = _reply_tokens(rng)
        fits = card.cost_nano(TokenUsage(input_tokens=true_in, output_tokens=out)) <= left
        counts["fit"] += fits
        tools = req.tools or None
        old_hold = card.hold_nano(byte_bound.input_tokens(req.messages, tools), CAP)[0]
        counts["before"] += fits and old_hold > left
        exact_hold = card.hold_nano(exact.input_tokens(req.messages, tools, model=MODEL), CAP)[0]
        counts["exact"] += fits and exact_hold > left
        guard = BudgetGuard(llm, limit=LEFT)
        try:
            reservation = guard.reserve(req.messages, kwargs={"tools": req.tools} if req.tools else None)
        except BudgetExceededError:
            counts["after"] += fits
            continue
        cap = reservation.admitted.estimate.output_tokens
        counts["clamped"] += reservation.admitted.estimate.clamped
        reservation.settle(usage=TokenUsage(input_tokens=true_in, output_tokens=min(out, cap)))
        (status,) = guard.status()
        counts["overspend"] += status.spent > LEFT
    fit = max(counts["fit"], 1)
    share = {k: counts[k] / fit for k in ("before", "exact", "after")}
    detail = (f"{counts['fit']} of the corpus would have fitted in ${LEFT}: refused before {counts['before']} "
              f"({share['before']:.1%}), exact estimate only {counts['exact']} ({share['exact']:.1%}), now "
              f"{counts['after']} ({share['after']:.1%}; {counts['clamped']} served with a shrunk cap); "
              f"overspend in {counts['overspend']} calls")
    results.add(Row("8", f"refused but would have fitted, {MODEL}, budget 90% used", f"{share['after']:.1%}",
                    detail=detail, goal=f"<= {GOAL:.0%}, 0 overspend",
                    ok=share["after"] <= GOAL and counts["overspend"] == 0, data={**counts, **share}))
