"""Section 4: pre-call estimation. Accuracy against real tokenizers, learned typical mode, time per call.

Accuracy: the 400 requests of tests/estimation_corpus.py (English, CJK, Arabic, Russian, code, JSON,
tool schemas, tool calls, images, multi-turn) counted by tests/provider_reference.py (OpenAI's counting
rules on langchain-openai's own request messages; mistral-common's encode_chat_completion), against
strict (exact tokenizer + margin) and the UTF-8 byte bound it replaces, by family, kind and language.
Typical: a stream of 600 requests estimated then observed with the provider's count (as the guard does
at settle); before = the first 150 uncalibrated, after = the 450 that follow.
Timing: ``estimate_input_tokens`` as the guard calls it (with the model), on one ~100k-token message
(~400,000 characters) seen for the first time ("cold") and re-sent ("repeat": a conversation's history),
and on a short message: before (byte bound / heuristic) and after (exact tokenizer) in the same run.
Without the [tokenizers] extra the exact rows are skipped with a note.
"""

from __future__ import annotations

import random
import statistics
import time
import timeit
from collections import defaultdict
from typing import Any

from langchain_core.messages import HumanMessage

from langchain_budgetguard.estimate import StrictEstimator, TypicalEstimator, estimate_input_tokens
from langchain_budgetguard.tokenizers import exact_family

from .common import Results, Row, fmt_us, median

TIME_GOAL_US = 1000.0  # byte bound / heuristic, 100k-token prompt
EXACT_COLD_GOAL_US = 100_000.0  # exact tokenizer, a 100k-token prompt never seen before
TARGET_TOKENS = 100_000
FAMILIES = [("o200k_base", "gpt-4o"), ("cl100k_base", "gpt-4-turbo"), ("mistral tekken", "open-mistral-nemo"),
            ("mistral SentencePiece v7", "mistral-large-2411")]

_PROSE = ("The budget guard reserves the worst-case cost of a call before the model runs, then settles "
          "the actual cost from the provider's usage report. ")
_MIXED = ("Le garde réserve le coût maximal avant l'appel, puis règle le coût réel. "
          "预算守卫在调用前预留最坏情况的成本。 Ünïcödé 🙂 text. ")


def _prompt(unit: str, chars: int) -> str:
    return (unit * (chars // len(unit) + 1))[:chars]


def _time_us(fn: Any, number: int) -> float:
    runs = timeit.repeat(fn, number=number, repeat=7)
    return median([r / number * 1e6 for r in runs])


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(results: Results, client: Any | None, quick: bool) -> None:
    try:
        from tests.estimation_corpus import build_corpus
        from tests.provider_reference import reference_count
    except ImportError:  # run from outside the repository
        results.notes.append("section 4: tests/ not importable (run from the repository root); accuracy skipped")
        build_corpus = reference_count = None  # type: ignore[assignment]
    exact = exact_family("gpt-4o") is not None
    if not exact:
        results.notes.append("section 4: the [tokenizers] extra is not installed: exact rows skipped")
    _timing(results, quick, exact)
    _reported(results)
    if build_corpus is not None and exact:
        _strict_accuracy(results, build_corpus, reference_count)
        _typical_accuracy(results, build_corpus, reference_count, quick)


# -- timing -------------------------------------------------------------------------------------

def _timing(results: Results, quick: bool, exact: bool) -> None:
    number = 5 if quick else 20
    byte_bound, strict = StrictEstimator(exact=False), StrictEstimator()
    heuristic, typical = TypicalEstimator(exact=False, calibrate=False), TypicalEstimator()
    learning = TypicalEstimator(exact=False)  # computes the calibration features as it estimates
    model = "gpt-4o-mini"
    for label, unit in (("ASCII prose", _PROSE), ("mixed non-ASCII", _MIXED)):
        text = _prompt(unit, 4 * TARGET_TOKENS)
        messages = [HumanMessage(text)]
        t_bytes = _time_us(lambda: estimate_input_tokens(byte_bound, messages, None, model), number)
        t_heur = _time_us(lambda: estimate_input_tokens(learning, messages, None, "claude-sonnet-4-5"), number)
        results.add(Row(
            "4", f"estimate 100k-token prompt, typical heuristic ({label})", fmt_us(t_heur),
            detail=f"{len(text):,} chars, with its calibration features; strict byte bound {fmt_us(t_bytes)}",
            goal="< 1 ms", ok=t_heur < TIME_GOAL_US,
            data={"text": label, "chars": len(text), "byte_bound_us": t_bytes, "heuristic_us": t_heur},
        ))
        if not exact:
            continue
        counter = iter(range(10**9))
        t_cold = _time_us(lambda: estimate_input_tokens(  # a new text each time: one character changed
            strict, [HumanMessage(f"{next(counter)}{text}")], None, model), max(1, number // 4))
        estimate_input_tokens(strict, messages, None, model)
        t_repeat = _time_us(lambda: estimate_input_tokens(strict, messages, None, model), number)
        tokens = estimate_input_tokens(strict, messages, None, model)
        results.add(Row(
            "4", f"estimate 100k-token prompt, exact o200k ({label})", fmt_us(t_cold),
            detail=f"strict = {tokens:,} tokens; first sight {fmt_us(t_cold)}, re-sent (history, counted by "
                   f"digest) {fmt_us(t_repeat)}",
            goal="< 100 ms cold", ok=t_cold < EXACT_COLD_GOAL_US,
            data={"text": label, "cold_us": t_cold, "repeat_us": t_repeat, "tokens": tokens},
        ))

    short = [HumanMessage("What's the weather like in Paris today?")]
    before = {"strict": _time_us(lambda: estimate_input_tokens(byte_bound, short, None, model), 2000),
              "typical": _time_us(lambda: estimate_input_tokens(heuristic, short, None, model), 2000)}
    learn = _time_us(lambda: estimate_input_tokens(learning, short, None, "claude-sonnet-4-5"), 2000)
    after = {"strict": _time_us(lambda: estimate_input_tokens(strict, short, None, model), 2000),
             "typical": _time_us(lambda: estimate_input_tokens(typical, short, None, model), 2000)}
    results.add(Row(
        "4", "estimate a short call (µs), before -> after", f"{before['strict']:.1f} -> {after['strict']:.1f}",
        detail=f"strict: byte bound {before['strict']:.1f} µs -> exact o200k {after['strict']:.1f} µs; typical: "
               f"heuristic {before['typical']:.1f} µs -> exact {after['typical']:.1f} µs (heuristic with "
               f"calibration features {learn:.1f} µs)"
               + ("" if exact else " (no tokenizer installed: both are the old estimators)"),
        data={"before_us": before, "after_us": after},
    ))
    if exact:
        import langchain_budgetguard.tokenizers as tk

        loads = {}
        for name, loader in (("o200k_base", lambda: tk._openai_family("o200k_base")),
                             ("mistral v3-tekken", lambda: tk._mistral_family("v3-tekken"))):
            cached = loader
            getattr(tk, "_openai_family" if "o200k" in name else "_mistral_family").cache_clear()
            t0 = time.perf_counter()
            cached()
            loads[name] = time.perf_counter() - t0
        tk.exact_family.cache_clear()
        results.add(Row(
            "4", "load a tokenizer (once per process)", f"{loads['o200k_base'] * 1e3:.0f} ms",
            detail=f"o200k {loads['o200k_base'] * 1e3:.0f} ms (hash check + ranks), Mistral Tekken "
                   f"{loads['mistral v3-tekken'] * 1e3:.0f} ms; tokenizers.preload() pays it at start-up",
            data={"seconds": loads},
        ))


# -- the prompt counts providers reported in LangChain's token-usage guides -------------------------

REPORTED = [
    ("hello", "gpt-4o-mini", 8),
    ("Tell me a joke", "gpt-4", 11),
    ("What's the oldest known example of cuneiform", "gpt-4-turbo", 17),
    ("What's the oldest known example of cuneiform", "claude-3-sonnet-20240229", 17),
    ("What's the oldest known example of cuneiform", "mistral-small", 19),
    ("What's the oldest known example of cuneiform", "mixtral-8x7b-32768", 22),
    ("What's the oldest known example of cuneiform", "gemini-pro", 10),
]


def _reported(results: Results) -> None:
    strict, typical = StrictEstimator(), TypicalEstimator(calibrate=False)
    rows, never_below = [], True
    for text, model_name, reported in REPORTED:
        messages = [HumanMessage(text)]
        s = estimate_input_tokens(strict, messages, None, model_name)
        t = estimate_input_tokens(typical, messages, None, model_name)
        never_below &= s >= reported
        rows.append({"prompt": text if len(text) < 20 else text[:17] + "...", "model": model_name,
                     "reported": reported, "strict": s, "strict/reported": f"{s / reported:.2f}",
                     "typical": int(t), "typical/reported": f"{t / reported:.2f}"})
    results.tables["4. Estimates vs provider-reported prompt tokens"] = rows
    ratios = [r["strict"] / r["reported"] for r in rows]
    results.add(Row(
        "4", "strict estimate / reported prompt tokens", f"{min(ratios):.2f}-{max(ratios):.2f}x",
        detail=f"{len(rows)} prompts from LangChain's token-usage guides (table below)",
        goal="strict >= reported", ok=never_below, data={"rows": rows},
    ))


# -- strict accuracy ---------------------------------------------------------------------------------

def _strict_accuracy(results: Results, build_corpus: Any, reference_count: Any) -> None:
    corpus = build_corpus(400)
    strict, byte_bound = StrictEstimator(), StrictEstimator(exact=False)
    by_language: dict[tuple[str, str], list[float]] = defaultdict(list)
    by_kind: dict[tuple[str, str], list[float]] = defaultdict(list)
    rows = []
    for family, model in FAMILIES:
        ratios, old, below, worst = [], [], 0, (0.0, "")
        for req in corpus:
            reference = reference_count(req, model)
            if reference is None:
                continue
            est = strict.input_tokens(req.messages, req.tools or None, model=model)
            ratio = est / reference
            below += est < reference
            ratios.append(ratio)
            old.append(byte_bound.input_tokens(req.messages, req.tools or None, model=model) / reference)
            by_language[(family, req.lang.split("+")[0] if "+" not in req.lang else "mixed")].append(ratio)
            by_kind[(family, req.kind)].append(ratio)
            worst = max(worst, (ratio, f"{req.kind}/{req.lang}"))
        med = statistics.median(ratios)
        rows.append({"family": family, "model": model, "requests": len(ratios), "below": below,
                     "median": f"{med:.3f}", "p99": f"{_q(ratios, 0.99):.2f}", "worst": f"{worst[0]:.2f} ({worst[1]})",
                     "byte bound median": f"{statistics.median(old):.2f}"})
        results.add(Row(
            "4", f"strict / real count, {family}", f"{med:.3f}x median",
            detail=f"{len(ratios)} requests on {model}: {below} below, p99 {_q(ratios, 0.99):.2f}x, worst "
                   f"{worst[0]:.2f}x ({worst[1]}); byte bound median {statistics.median(old):.2f}x",
            goal="0 below, median <= 1.10", ok=below == 0 and med <= 1.10,
            data={"median": med, "p99": _q(ratios, 0.99), "worst": worst[0], "below": below,
                  "byte_bound_median": statistics.median(old)},
        ))
    results.tables["4. Strict vs real tokenizers (corpus of 400 requests)"] = rows
    langs = sorted({lang for _, lang in by_language})
    results.tables["4. Strict / real count by language (median; p99 in brackets)"] = [
        {"family": family, **{lang: f"{statistics.median(v):.2f} ({_q(v, 0.99):.2f})"
                              if (v := by_language.get((family, lang))) else "-" for lang in langs}}
        for family, _ in FAMILIES]
    kinds = sorted({kind for _, kind in by_kind})
    results.tables["4. Strict / real count by content (median; worst in brackets)"] = [
        {"family": family, **{kind: f"{statistics.median(v):.2f} ({max(v):.2f})"
                              if (v := by_kind.get((family, kind))) else "-" for kind in kinds}}
        for family, _ in FAMILIES]


# -- typical before / after calibration ----------------------------------------------------------------

def _typical_accuracy(results: Results, build_corpus: Any, reference_count: Any, quick: bool) -> None:
    stream = build_corpus(300 if quick else 600, seed=5)
    random.Random(1).shuffle(stream)
    warm_up = 100 if quick else 150
    rows = []
    cases = [(f"{family}, exact", model, True) for family, model in FAMILIES]
    cases += [(f"{family} counts, no tokenizer", model, False) for family, model in FAMILIES[1:]]
    for label, model, use_exact in cases:
        typical = TypicalEstimator(exact=use_exact)
        before, after = [], []
        observe_s = 0.0
        for req in stream:
            reported = reference_count(req, model)
            if reported is None:
                continue
            est = typical.input_tokens(req.messages, req.tools or None, model=model)
            if len(before) < warm_up:
                before.append(est.raw / reported)
            else:
                after.append(est / reported)
            t0 = time.perf_counter()
            typical.observe(model, est, reported)
            observe_s += time.perf_counter() - t0
        p50_b, below_b = statistics.median(before), sum(r < 1 for r in before) / len(before)
        p50_a, below_a = statistics.median(after), sum(r < 1 for r in after) / len(after)
        rows.append({"case": label, "model": model, "p50 before": f"{p50_b:.3f}", "below before": f"{below_b:.0%}",
                     "p50 after": f"{p50_a:.3f}", "below after": f"{below_a:.1%}",
                     "observe": f"{observe_s / (len(before) + len(after)) * 1e6:.0f} µs"})
        results.add(Row(
            "4", f"typical after calibration, {label}", f"p50 {p50_a:.3f}, {below_a:.1%} below",
            detail=f"before (uncalibrated, {len(before)}): p50 {p50_b:.3f}, {below_b:.0%} below; after "
                   f"({len(after)} requests)",
            goal="p50 within ±10%, <= 10% below", ok=0.9 <= p50_a <= 1.1 and below_a <= 0.10,
            data={"p50_before": p50_b, "below_before": below_b, "p50_after": p50_a, "below_after": below_a},
        ))
    results.tables["4. Typical mode before / after calibration"] = rows
