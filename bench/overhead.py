"""Section 1: what the guard adds to one call, against a bare call of the same fake model.

In-process store: guarded / bare, per round, median. Redis store: (guarded - bare) per round,
divided by the floor measured in the same round: the store's reserve and settle scripts sent as
two bare EVALSHA (see redis_raw.py). A trivial ``return 1`` EVALSHA is timed too, as the pure
round trip.
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler, UsageMetadataCallbackHandler

from langchain_budgetguard import BudgetGuard

from .common import Results, Row, ainterleave, delete_prefix, fmt_us, fmt_x, interleave, median, per_round, \
    redis_url, unique_prefix
from .fakes import UsageChat

PROMPT = "hello"
IN_PROCESS_GOAL, IN_PROCESS_AIM = 1.5, 1.2
REDIS_GOAL = 1.3


def _drain(iterator: Any) -> None:
    for _ in iterator:
        pass


async def _adrain(iterator: Any) -> None:
    async for _ in iterator:
        pass


def _in_process_row(results: Results, name: str, t: dict[str, list[float]], kind: str) -> None:
    bare, guarded = t["bare"], t["guarded"]
    ratio = median(per_round(lambda g, b: g / b, guarded, bare))
    added = median(per_round(lambda g, b: g - b, guarded, bare))
    results.add(Row(
        "1", name, fmt_x(ratio),
        detail=f"bare {fmt_us(median(bare))}, guarded {fmt_us(median(guarded))}, guard adds {fmt_us(added)}",
        goal=f"<= {IN_PROCESS_GOAL}x, aim {IN_PROCESS_AIM}x", ok=ratio <= IN_PROCESS_GOAL,
        data={"kind": kind, "store": "memory", "ratio": ratio, "bare_us": median(bare),
              "guarded_us": median(guarded), "added_us": added, "rounds": len(bare)},
    ))


def _redis_row(results: Results, name: str, t: dict[str, list[float]], kind: str) -> None:
    bare, guarded, floor, pair, trivial = t["bare"], t["guarded"], t["floor"], t["raw pair"], t["trivial"]
    # The guard's two round trips, at their cheapest, in the same rounds: floor minus bare.
    ratio = median(per_round(lambda g, b, f: (g - b) / (f - b), guarded, bare, floor))
    added = median(per_round(lambda g, b: g - b, guarded, bare))
    trips = median(per_round(lambda f, b: f - b, floor, bare))
    ratio_pair = median(per_round(lambda g, b, p: (g - b) / p, guarded, bare, pair))
    ratio_rtt = median(per_round(lambda g, b, r: (g - b) / (2 * r), guarded, bare, trivial))
    results.add(Row(
        "1", name, f"{ratio:.2f}",
        detail=(f"guard adds {fmt_us(added)} (bare {fmt_us(median(bare))}, guarded {fmt_us(median(guarded))}); "
                f"raw reserve+settle EVALSHA around the bare call adds {fmt_us(trips)}; "
                f"back to back they take {fmt_us(median(pair))} ({ratio_pair:.2f}x), "
                f"2x trivial EVALSHA {fmt_us(2 * median(trivial))} ({ratio_rtt:.2f}x)"),
        goal=f"<= {REDIS_GOAL} x raw reserve+settle", ok=ratio <= REDIS_GOAL,
        data={"kind": kind, "store": "redis", "ratio_to_raw_floor": ratio, "ratio_to_back_to_back_pair": ratio_pair,
              "ratio_to_2_trivial_rtt": ratio_rtt, "added_us": added, "raw_round_trips_us": trips,
              "bare_us": median(bare), "guarded_us": median(guarded), "floor_us": median(floor),
              "raw_pair_back_to_back_us": median(pair), "trivial_evalsha_us": median(trivial), "rounds": len(bare)},
    ))


def run(results: Results, client: Any | None, quick: bool) -> None:
    rounds, calls = (9, 100) if quick else (31, 200)
    model = UsageChat()
    guard = BudgetGuard(model, limit=1_000_000, name="bench-overhead")
    for _ in range(300):  # warm-up: rate card, plan cache, interpreter caches
        model.invoke(PROMPT)
        guard.invoke(PROMPT)
        _drain(guard.stream(PROMPT))

    def loop(fn: Any) -> Any:
        def run_n(n: int) -> None:
            for _ in range(n):
                fn(PROMPT)
        return run_n

    t = interleave({"bare": loop(model.invoke), "guarded": loop(guard.invoke)}, rounds, calls)
    _in_process_row(results, "invoke, in-process store (guarded/bare)", t, "invoke")
    _tracking_rows(results, model, guard, rounds, calls)
    t = interleave({"bare": loop(lambda p: _drain(model.stream(p))),
                    "guarded": loop(lambda p: _drain(guard.stream(p)))}, rounds, calls)
    _in_process_row(results, "stream, in-process store (guarded/bare)", t, "stream")

    async def ainvoke_rows() -> dict[str, list[float]]:
        async def bare(n: int) -> None:
            for _ in range(n):
                await model.ainvoke(PROMPT)

        async def guarded(n: int) -> None:
            for _ in range(n):
                await guard.ainvoke(PROMPT)

        await bare(200)
        await guarded(200)
        return await ainterleave({"bare": bare, "guarded": guarded}, rounds, calls)

    _in_process_row(results, "ainvoke, in-process store (guarded/bare)", asyncio.run(ainvoke_rows()), "ainvoke")

    if client is None:
        return
    _redis_rows(results, client, model, quick)


class _Listener(BaseCallbackHandler):
    """A handler that reads nothing the guard emits (no custom events, no chain runs)."""

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        pass


def _tracking_rows(results: Results, model: UsageChat, guard: BudgetGuard, rounds: int, calls: int) -> None:
    """Guarding against merely tracking (LangChain's UsageMetadataCallbackHandler on the bare model),
    and what a handler that consumes none of the guard's events makes the guard add."""
    tracker = UsageMetadataCallbackHandler()
    tracked = {"callbacks": [tracker]}
    listened = {"callbacks": [_Listener()]}
    for _ in range(100):
        model.invoke(PROMPT, tracked)
        guard.invoke(PROMPT, listened)
        model.invoke(PROMPT, listened)

    def loop(fn: Any, config: Any = None) -> Any:
        def run_n(n: int) -> None:
            for _ in range(n):
                fn(PROMPT, config)
        return run_n

    t = interleave({"bare": loop(model.invoke), "guarded": loop(guard.invoke), "tracked": loop(model.invoke, tracked),
                    "bare+handler": loop(model.invoke, listened), "guarded+handler": loop(guard.invoke, listened)},
                   rounds, calls)
    bare, guarded, tracked_t = t["bare"], t["guarded"], t["tracked"]
    guard_ratio = median(per_round(lambda g, b: g / b, guarded, bare))
    track_ratio = median(per_round(lambda k, b: k / b, tracked_t, bare))
    results.add(Row(
        "1", "invoke, guarded/bare vs tracked/bare", f"{guard_ratio / track_ratio:.2f}",
        detail=(f"guarded/bare {fmt_x(guard_ratio)}, bare+UsageMetadataCallbackHandler/bare {fmt_x(track_ratio)} "
                f"(guard adds {fmt_us(median(per_round(lambda g, b: g - b, guarded, bare)))}, tracking adds "
                f"{fmt_us(median(per_round(lambda k, b: k - b, tracked_t, bare)))})"),
        goal="<= 1.0 (guarding costs no more than tracking)", ok=guard_ratio <= track_ratio,
        data={"guarded_over_bare": guard_ratio, "tracked_over_bare": track_ratio, "rounds": len(bare)},
    ))
    with_handler = median(per_round(lambda g, b: g - b, t["guarded+handler"], t["bare+handler"]))
    without = median(per_round(lambda g, b: g - b, guarded, bare))
    results.add(Row(
        "1", "invoke, added with a handler / added without", f"{with_handler / without:.2f}",
        detail=(f"a handler that reads none of the guard's events: guard adds {fmt_us(with_handler)} "
                f"over bare+handler, {fmt_us(without)} over bare"),
        goal="<= 1.2", ok=with_handler <= 1.2 * without,
        data={"added_with_handler_us": with_handler, "added_without_us": without, "rounds": len(bare)},
    ))


def _redis_rows(results: Results, client: Any, model: UsageChat, quick: bool) -> None:
    import redis
    import redis.asyncio

    from langchain_budgetguard.stores.redis import RedisStore

    from .redis_raw import RawScripts

    rounds, calls = (7, 30) if quick else (21, 60)
    prefix = unique_prefix("overhead")
    store = RedisStore(redis_url(), prefix=prefix)
    guard = BudgetGuard(model, limit=1_000_000, store=store, name="bench-overhead")
    plain = redis.Redis.from_url(redis_url())
    try:
        counters = guard.policy.plan(guard.policy.identity({})).counters()
        guard.invoke(PROMPT)
        raw = RawScripts(plain, store, counters, amount=2_000_000, charge=1_000, settle_amount=6_600)
        for _ in range(50):
            guard.invoke(PROMPT)
            raw.pair(plain)
            raw.trivial(plain)

        def loop(fn: Any) -> Any:
            def run_n(n: int) -> None:
                for _ in range(n):
                    fn()
            return run_n

        variants = {
            "bare": loop(lambda: model.invoke(PROMPT)),
            "guarded": loop(lambda: guard.invoke(PROMPT)),
            "floor": loop(lambda: raw.around(plain, lambda: model.invoke(PROMPT))),
            "raw pair": loop(lambda: raw.pair(plain)),
            "trivial": loop(lambda: raw.trivial(plain)),
        }
        _redis_row(results, "invoke, Redis store (added / raw floor)", interleave(variants, rounds, calls), "invoke")
        variants["bare"] = loop(lambda: _drain(model.stream(PROMPT)))
        variants["guarded"] = loop(lambda: _drain(guard.stream(PROMPT)))
        variants["floor"] = loop(lambda: raw.around(plain, lambda: _drain(model.stream(PROMPT))))
        _redis_row(results, "stream, Redis store (added / raw floor)", interleave(variants, rounds, calls), "stream")

        async def ainvoke_rows() -> dict[str, list[float]]:
            aclient = redis.asyncio.Redis.from_url(redis_url())
            try:
                async def bare(n: int) -> None:
                    for _ in range(n):
                        await model.ainvoke(PROMPT)

                async def guarded(n: int) -> None:
                    for _ in range(n):
                        await guard.ainvoke(PROMPT)

                async def floor(n: int) -> None:
                    for _ in range(n):
                        await raw.aaround(aclient, lambda: model.ainvoke(PROMPT))

                async def pair(n: int) -> None:
                    for _ in range(n):
                        await raw.apair(aclient)

                async def trivial(n: int) -> None:
                    for _ in range(n):
                        await raw.atrivial(aclient)

                for fn in (bare, guarded, floor, pair, trivial):
                    await fn(30)
                timings = await ainterleave({"bare": bare, "guarded": guarded, "floor": floor, "raw pair": pair,
                                             "trivial": trivial}, rounds, calls)
                await store.aclose()
                return timings
            finally:
                await aclient.aclose()

        _redis_row(results, "ainvoke, Redis store (added / raw floor)", asyncio.run(ainvoke_rows()), "ainvoke")
    finally:
        store.close()
        plain.close()
        delete_prefix(client, prefix)
