"""Section 4: pre-call estimation. Time to estimate a 100k-token prompt; accuracy on fixture prompts.

Timing: one HumanMessage of ~100k tokens of English prose (~400k ASCII characters: "typical" counts
4 characters a token), and the same length with some non-ASCII text (accents, CJK, emoji) mixed
in, through ``estimate_input_tokens`` as the guard calls it (with the model, for its family).
Accuracy: the prompt tokens providers reported for one HumanMessage in LangChain's token-usage
guides (tests/fixtures/seed_usage.json), against both estimators; strict must never be below.
"""

from __future__ import annotations

import timeit
from typing import Any

from langchain_core.messages import HumanMessage

from langchain_budgetguard.estimate import StrictEstimator, TypicalEstimator, estimate_input_tokens

from .common import Results, Row, fmt_us, median

TIME_GOAL_US = 1000.0  # typical mode, 100k-token prompt
TARGET_TOKENS = 100_000

# Prompt tokens providers reported for one HumanMessage (LangChain's token-usage guides).
REPORTED = [
    ("hello", "gpt-4o-mini", 8),
    ("Tell me a joke", "gpt-4", 11),
    ("What's the oldest known example of cuneiform", "gpt-4-turbo", 17),
    ("What's the oldest known example of cuneiform", "claude-3-sonnet-20240229", 17),
    ("What's the oldest known example of cuneiform", "mistral-small", 19),
    ("What's the oldest known example of cuneiform", "mixtral-8x7b-32768", 22),
    ("What's the oldest known example of cuneiform", "gemini-pro", 10),
]

_PROSE = ("The budget guard reserves the worst-case cost of a call before the model runs, then settles "
          "the actual cost from the provider's usage report. ")
_MIXED = ("Le garde réserve le coût maximal avant l'appel, puis règle le coût réel. "
          "预算守卫在调用前预留最坏情况的成本。 Ünïcödé 🙂 text. ")


def _prompt(unit: str, chars: int) -> str:
    return (unit * (chars // len(unit) + 1))[:chars]


def _time_us(fn: Any, number: int) -> float:
    runs = timeit.repeat(fn, number=number, repeat=7)
    return median([r / number * 1e6 for r in runs])


def run(results: Results, client: Any | None, quick: bool) -> None:
    typical, strict = TypicalEstimator(), StrictEstimator()
    model = "gpt-4o-mini"
    ascii_text = _prompt(_PROSE, 4 * TARGET_TOKENS)
    mixed_text = _prompt(_MIXED, 4 * TARGET_TOKENS)
    number = 5 if quick else 20
    for label, text in (("ASCII prose", ascii_text), ("mixed non-ASCII", mixed_text)):
        messages = [HumanMessage(text)]
        tokens = estimate_input_tokens(typical, messages, None, model)
        t_typ = _time_us(lambda: estimate_input_tokens(typical, messages, None, model), number)
        t_str = _time_us(lambda: estimate_input_tokens(strict, messages, None, model), number)
        results.add(Row(
            "4", f"estimate 100k-token prompt, typical ({label})", fmt_us(t_typ),
            detail=f"{len(text):,} chars -> typical {tokens:,} tokens; strict takes {fmt_us(t_str)} "
                   f"({estimate_input_tokens(strict, messages, None, model):,} tokens)",
            goal="< 1 ms", ok=t_typ < TIME_GOAL_US,
            data={"text": label, "chars": len(text), "typical_us": t_typ, "strict_us": t_str,
                  "typical_tokens": tokens},
        ))

    # The same ~100k tokens as a conversation of 500 messages (the per-message walk, not the text, dominates).
    turns = [HumanMessage(_prompt(_PROSE, 800)) for _ in range(500)]
    t_turns = _time_us(lambda: estimate_input_tokens(typical, turns, None, model), number)
    results.add(Row(
        "4", "estimate 100k tokens as 500 messages, typical", fmt_us(t_turns),
        detail=f"strict {fmt_us(_time_us(lambda: estimate_input_tokens(strict, turns, None, model), number))}",
        goal="< 1 ms", ok=t_turns < TIME_GOAL_US,
        data={"messages": len(turns), "typical_us": t_turns},
    ))

    rows = []
    never_below = True
    for text, model_name, reported in REPORTED:
        messages = [HumanMessage(text)]
        s = estimate_input_tokens(strict, messages, None, model_name)
        t = estimate_input_tokens(typical, messages, None, model_name)
        never_below &= s >= reported
        rows.append({"prompt": text if len(text) < 20 else text[:17] + "...", "model": model_name,
                     "reported": reported, "strict": s, "strict/reported": f"{s / reported:.2f}",
                     "typical": t, "typical/reported": f"{t / reported:.2f}"})
    results.tables["4. Estimates vs provider-reported prompt tokens"] = rows
    strict_ratios = [r["strict"] / r["reported"] for r in rows]
    typical_ratios = [r["typical"] / r["reported"] for r in rows]
    results.add(Row(
        "4", "strict estimate / reported prompt tokens", f"{min(strict_ratios):.2f}-{max(strict_ratios):.2f}x",
        detail=f"{len(rows)} fixture prompts; typical {min(typical_ratios):.2f}-{max(typical_ratios):.2f}x "
               "(table below)",
        goal="strict >= reported", ok=never_below,
        data={"rows": rows},
    ))
