"""Before/after a patch, in one run: ``python -m bench.ab --patch bench/patches/hotpath.diff``.

Loads two copies of the package side by side in one process: ``before`` (src/ as it is, or
``--before DIR``) and ``after`` (src/ with ``--patch`` applied in a temporary copy, or ``--after DIR``);
a DIR holds a ``langchain_budgetguard/`` folder. Then times the bare fake model, the guard from
``before`` and the guard from ``after`` in the same interleaved rounds, and prints each guard's
ratio to bare (in-process) or to the raw reserve+settle floor (Redis). src/ is never modified.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench.common import ainterleave, connect_redis, delete_prefix, interleave, median, per_round, redis_url, \
    unique_prefix  # noqa: E402
from bench.fakes import UsageChat  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "langchain_budgetguard"
PROMPT = "hello"


def _copy_package(src_dir: str, dest_root: str, name: str) -> None:
    shutil.copytree(os.path.join(src_dir, PACKAGE), os.path.join(dest_root, name),
                    ignore=shutil.ignore_patterns("__pycache__"))


def load_variants(before: str | None, after: str | None, patch: str | None) -> tuple[Any, Any, str]:
    tmp = tempfile.mkdtemp(prefix="bench-ab-")
    _copy_package(before or os.path.join(ROOT, "src"), tmp, "bgab_before")
    if after:
        _copy_package(after, tmp, "bgab_after")
    else:
        if not patch:
            raise SystemExit("give --patch FILE or --after DIR")
        work = os.path.join(tmp, "patched")
        os.makedirs(os.path.join(work, "src"))
        _copy_package(os.path.join(ROOT, "src"), os.path.join(work, "src"), PACKAGE)
        subprocess.run(["git", "apply", "--unsafe-paths", f"--directory={work}", "-p1", os.path.abspath(patch)],
                       check=True, cwd=work)
        _copy_package(os.path.join(work, "src"), tmp, "bgab_after")
    sys.path.insert(0, tmp)
    return importlib.import_module("bgab_before"), importlib.import_module("bgab_after"), tmp


def _drain(iterator: Any) -> None:
    for _ in iterator:
        pass


def _loop(fn: Any) -> Any:
    def run_n(n: int) -> None:
        for _ in range(n):
            fn()
    return run_n


def in_process(before: Any, after: Any, rounds: int, calls: int) -> None:
    model = UsageChat()
    guards = {"before": before.BudgetGuard(model, limit=1_000_000), "after": after.BudgetGuard(model, limit=1_000_000)}
    for _ in range(300):
        model.invoke(PROMPT)
        for g in guards.values():
            g.invoke(PROMPT)
            _drain(g.stream(PROMPT))
    for kind in ("invoke", "stream"):
        if kind == "invoke":
            variants = {"bare": _loop(lambda: model.invoke(PROMPT))}
            variants.update({k: _loop(lambda g=g: g.invoke(PROMPT)) for k, g in guards.items()})
        else:
            variants = {"bare": _loop(lambda: _drain(model.stream(PROMPT)))}
            variants.update({k: _loop(lambda g=g: _drain(g.stream(PROMPT))) for k, g in guards.items()})
        _report_in_process(f"{kind}, in-process", interleave(variants, rounds, calls))

    async def ainvoke() -> dict[str, list[float]]:
        async def bare(n: int) -> None:
            for _ in range(n):
                await model.ainvoke(PROMPT)

        def guarded(g: Any) -> Any:
            async def run_n(n: int) -> None:
                for _ in range(n):
                    await g.ainvoke(PROMPT)
            return run_n

        variants = {"bare": bare, **{k: guarded(g) for k, g in guards.items()}}
        for fn in variants.values():
            await fn(200)
        return await ainterleave(variants, rounds, calls)

    _report_in_process("ainvoke, in-process", asyncio.run(ainvoke()))


def _report_in_process(name: str, t: dict[str, list[float]]) -> None:
    b = t["bare"]
    parts = [f"bare {median(b):.1f} µs"]
    for k in ("before", "after"):
        ratio = median(per_round(lambda g, x: g / x, t[k], b))
        added = median(per_round(lambda g, x: g - x, t[k], b))
        parts.append(f"{k} {ratio:.2f}x (+{added:.1f} µs)")
    print(f"  {name:<22} " + "   ".join(parts), flush=True)


def _print_redis(name: str, t: dict[str, list[float]]) -> None:
    trips = median(per_round(lambda f, b: f - b, t["floor"], t["bare"]))
    parts = [f"raw reserve+settle around bare +{trips:.1f} µs"]
    for k in ("before", "after"):
        ratio = median(per_round(lambda g, b, f: (g - b) / (f - b), t[k], t["bare"], t["floor"]))
        added = median(per_round(lambda g, b: g - b, t[k], t["bare"]))
        parts.append(f"{k} {ratio:.2f} of floor (+{added:.1f} µs)")
    print(f"  {name:<22} " + "   ".join(parts), flush=True)


async def _aredis(model: Any, guards: dict[str, Any], raw: Any, rounds: int, calls: int) -> dict[str, list[float]]:
    import redis.asyncio

    aclient = redis.asyncio.Redis.from_url(redis_url())
    try:
        async def bare(n: int) -> None:
            for _ in range(n):
                await model.ainvoke(PROMPT)

        async def floor(n: int) -> None:
            for _ in range(n):
                await raw.aaround(aclient, lambda: model.ainvoke(PROMPT))

        def guarded(g: Any) -> Any:
            async def run_n(n: int) -> None:
                for _ in range(n):
                    await g.ainvoke(PROMPT)
            return run_n

        variants = {"bare": bare, "floor": floor, **{k: guarded(g) for k, g in guards.items()}}
        for fn in variants.values():
            await fn(30)
        timings = await ainterleave(variants, rounds, calls)
        for g in guards.values():
            await g.policy.store.aclose()
        return timings
    finally:
        await aclient.aclose()


def redis_rows(before: Any, after: Any, client: Any, rounds: int, calls: int) -> None:
    import redis

    from .redis_raw import RawScripts

    model = UsageChat()
    prefixes = {k: unique_prefix(f"ab-{k}") for k in ("before", "after")}
    mods = {"before": before, "after": after}
    stores = {k: importlib.import_module(f"{m.__name__}.stores.redis").RedisStore(redis_url(), prefix=prefixes[k])
              for k, m in mods.items()}
    guards = {k: mods[k].BudgetGuard(model, limit=1_000_000, store=stores[k]) for k in mods}
    plain = redis.Redis.from_url(redis_url())
    try:
        counters = guards["before"].policy.plan(guards["before"].policy.identity({})).counters()
        guards["before"].invoke(PROMPT)
        raw = RawScripts(plain, stores["before"], counters, amount=2_000_000, charge=1_000, settle_amount=6_600)
        for _ in range(50):
            for g in guards.values():
                g.invoke(PROMPT)
            raw.pair(plain)
        for kind in ("invoke", "stream"):
            call = (lambda g: g.invoke(PROMPT)) if kind == "invoke" else (lambda g: _drain(g.stream(PROMPT)))
            variants = {"bare": _loop(lambda: call(model)), "floor": _loop(lambda: raw.around(plain, lambda: call(model)))}
            variants.update({k: _loop(lambda g=g: call(g)) for k, g in guards.items()})
            t = interleave(variants, rounds, calls)
            trips = median(per_round(lambda f, b: f - b, t["floor"], t["bare"]))
            parts = [f"raw reserve+settle around bare +{trips:.1f} µs"]
            for k in ("before", "after"):
                ratio = median(per_round(lambda g, b, f: (g - b) / (f - b), t[k], t["bare"], t["floor"]))
                added = median(per_round(lambda g, b: g - b, t[k], t["bare"]))
                parts.append(f"{k} {ratio:.2f} of floor (+{added:.1f} µs)")
            print(f"  {kind + ', Redis':<22} " + "   ".join(parts), flush=True)
        _print_redis("ainvoke, Redis", asyncio.run(_aredis(model, guards, raw, rounds, calls)))
    finally:
        for k, s in stores.items():
            s.close()
            delete_prefix(client, prefixes[k])
        plain.close()


def contention(client: Any, processes: tuple[int, ...]) -> None:
    """Section 2's guard rows for before and after, alternating, same budget and workload."""
    from . import contention as c

    cost = c._call_cost_nano()
    for n in processes:
        limit = c.CALLS_PER_PROCESS * n * cost
        parts = []
        for k in ("before", "after"):
            prefix = unique_prefix(f"ab-contention-{k}")
            try:
                summary, spent, held = c.guard_row(n, limit, prefix, package=f"bgab_{k}")
            finally:
                delete_prefix(client, prefix)
            parts.append(f"{k} {summary['calls_per_s']:,.0f} calls/s, p50 {summary['p50_us']:,.0f} µs, "
                         f"p99 {summary['p99_us']:,.0f} µs, overspend {max(0, spent + held - limit)} n$")
        print(f"  contention N={n:<3}       " + "   ".join(parts), flush=True)


def scale(before: Any, after: Any, ids: int, rounds: int, calls: int) -> None:
    """Section 3's in-process row for before and after: 1 id vs random ids of ``ids``, same rounds."""
    import secrets

    from .scale import _configs, _user

    model = UsageChat()
    variants = {}
    solo, many = _configs(ids, rounds * calls * 2 + 400, seed=5)
    for k, mod in (("before", before), ("after", after)):
        limits = [mod.Limit(usd=5, per="user", window="day")]
        fresh = mod.BudgetGuard(model, limits=limits)
        full = mod.BudgetGuard(model, limits=limits)
        store, base = full.policy.store, secrets.token_hex(4)
        hold = importlib.import_module(f"{mod.__name__}.stores.base").Hold
        identity = importlib.import_module(f"{mod.__name__}.limits").Identity
        for i in range(ids):
            plan = full.policy.plan(identity({"user": _user(i)}))
            store.reserve(plan.counters(), hold(f"{base}{i}", 13_350, 600.0, 1_200))
            store.settle(f"{base}{i}", plan.keys, 6_600)
        for j in range(200):
            fresh.invoke(PROMPT, config=solo[j])
            full.invoke(PROMPT, config=next(many))

        def one(n: int, g: Any = fresh) -> None:
            for j in range(n):
                g.invoke(PROMPT, config=solo[j])

        def rand(n: int, g: Any = full) -> None:
            for _ in range(n):
                g.invoke(PROMPT, config=next(many))

        variants[f"{k} 1 id"], variants[f"{k} many"] = one, rand
    t = interleave(variants, rounds, calls)
    parts = []
    for k in ("before", "after"):
        ratio = median(per_round(lambda m, o: m / o, t[f"{k} many"], t[f"{k} 1 id"]))
        parts.append(f"{k} {ratio:.2f}x ({median(t[f'{k} 1 id']):.1f} -> {median(t[f'{k} many']):.1f} µs)")
    print(f"  {f'in-process, {ids // 1000}k ids / 1 id':<22} " + "   ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--patch", help="unified diff (paths a/src/langchain_budgetguard/...) applied to the 'after' copy")
    parser.add_argument("--before", help="directory holding langchain_budgetguard/ for 'before' (default: src/)")
    parser.add_argument("--after", help="directory holding langchain_budgetguard/ for 'after' (instead of --patch)")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--contention", default="1,4,16", help="process counts for the contention rows ('' for none)")
    parser.add_argument("--scale", type=int, default=100_000, help="ids for the in-process scale row (0: skip it)")
    args = parser.parse_args(argv)
    before, after, tmp = load_variants(args.before, args.after, args.patch)
    try:
        print(f"before: {args.before or 'src/'}   after: {args.after or ('src/ + ' + str(args.patch))}")
        in_process(before, after, args.rounds, 200)
        if args.scale:
            scale(before, after, args.scale, max(9, args.rounds // 2), 200)
        client = None if args.no_redis else connect_redis()
        if client is not None:
            redis_rows(before, after, client, max(11, args.rounds * 2 // 3), 60)
            processes = tuple(int(x) for x in args.contention.split(",") if x.strip())
            if processes:
                contention(client, processes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
