"""Section 5: what pricing one call costs, with the guard's cache and without it.

Cached: ``Pricer.rate_card(ref)`` (a dict hit; the guard asks for the card on every call, since a
card can expire at a known price change) then ``RateCard.cost_nano(usage)``: a few integer
multiplications. Uncached: ``genai_prices.calc_price(usage, model, provider_id=...)``, which finds
the provider and model by matching rules and prices each usage leaf in Decimal. Interleaved,
median per-round ratio; each pair is also checked to give the same amount (rounded up to nano-USD).
"""

from __future__ import annotations

from typing import Any

import genai_prices

from langchain_budgetguard.money import ceil_nano
from langchain_budgetguard.pricing import ModelRef, Pricer
from langchain_budgetguard.usage import TokenUsage

from .common import Results, Row, fmt_us, interleave, median, per_round

MODELS = [("gpt-4o-mini", "openai"), ("claude-3-5-sonnet-20241022", "anthropic"), ("gemini-1.5-pro", "google")]
USAGE = {"input_tokens": 1_200, "output_tokens": 350, "cache_read_tokens": 1_000}


def run(results: Results, client: Any | None, quick: bool) -> None:
    rounds, calls = (7, 200) if quick else (21, 500)
    pricer = Pricer()
    usage = TokenUsage(**USAGE)
    gusage = genai_prices.Usage(**USAGE)
    for name, provider in MODELS:
        ref = ModelRef(name, provider)
        card = pricer.rate_card(ref)
        exact = genai_prices.calc_price(gusage, name, provider_id=provider).total_price
        same = card.cost_nano(usage) == ceil_nano(exact)

        def cached(n: int, ref: ModelRef = ref) -> None:
            for _ in range(n):
                pricer.rate_card(ref).cost_nano(usage)

        def uncached(n: int, name: str = name, provider: str = provider) -> None:
            for _ in range(n):
                genai_prices.calc_price(gusage, name, provider_id=provider)

        t = interleave({"cached": cached, "uncached": uncached}, rounds, calls)
        speedup = median(per_round(lambda u, c: u / c, t["uncached"], t["cached"]))
        results.add(Row(
            "5", f"price one call, {name}", fmt_us(median(t["cached"])),
            detail=(f"rate_card + cost_nano; uncached genai_prices.calc_price {fmt_us(median(t['uncached']))} "
                    f"= {speedup:.0f}x slower; same amount: {'yes' if same else 'NO'} ({ceil_nano(exact)} n$)"),
            data={"model": name, "provider": provider, "cached_us": median(t["cached"]),
                  "uncached_us": median(t["uncached"]), "speedup": speedup, "same_amount": same},
        ))
