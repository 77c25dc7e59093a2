"""Section 2: N processes on one budget in one Redis, until the budget is spent.

For N in 1, 2, 4, 8, 16, 32: N forked processes share one per-user budget worth ``CALLS_PER_PROCESS * N``
calls at their actual cost. Each process calls the guarded fake model (a small sleep stands in for
the provider) until it is refused. Measured: admitted calls per second, admission latency (guard
entry -> the model starts; p50/p99), overspend (spent - limit: must be 0) and how much of the
budget was used (after the run, and by the calls admitted before the first refusal). The guard
runs three ways: settles sent alone (today's path), carried by the next reserve
(``carry_settles=True``, a window of ``CARRY_WINDOW``), and with leased budget slices
(``lease_slices=True``: the shared counter is hot, so each process admits calls against a slice
leased from Redis). Every process closes its guard before it reports (slices returned, carried
settles sent), so the counter read after the run must hold nothing. Beside it, the naive
check-then-record baseline (naive.py) on the same workload, and the ceiling: N processes sending
the store's reserve and settle scripts as bare EVALSHA pairs.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from .common import Results, Row, delete_prefix, median, percentile, redis_url, unique_prefix

PROMPT = "hello"
PROCESSES = (1, 2, 4, 8, 16, 32)
CALLS_PER_PROCESS = 400  # budget = this many calls' worth per process, at the actual cost
MODEL_DELAY = 0.002  # seconds the fake provider takes: wide enough for check-then-act races
MAX_SECONDS = 15.0  # a row stops here even if its budget is not spent
CEILING_SECONDS = 1.0
CARRY_WINDOW = 0.02  # the carry runs' window: here a process's next call comes 5-40 ms later (2 cores)
SLICES_GOAL_N, SLICES_GOAL_RATIO, SLICES_GOAL_REFUSAL = 16, 1.5, 99.0  # issue 13's done-when for slices
MAX_TOKENS = 16  # the reply's cap: the guard holds ~2x the actual cost of a call

# One call's actual cost: gpt-4o-mini, 8 input and 9 output tokens (the fake's usage).
INPUT_TOKENS, OUTPUT_TOKENS = 8, 9


def _call_cost_nano() -> int:
    from langchain_budgetguard.pricing import ModelRef, default_pricer
    from langchain_budgetguard.usage import TokenUsage

    card = default_pricer().rate_card(ModelRef("gpt-4o-mini", "openai"))
    return card.cost_nano(TokenUsage(input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS))


def _model() -> Any:
    from .fakes import TimedChat

    return TimedChat(delay=MODEL_DELAY, max_tokens=MAX_TOKENS, input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS)


def _worker(kind: str, url: str, prefix: str, limit_nano: int, package: str, barrier: Any, queue: Any) -> None:
    """One process of a row: warm up off the budget, wait for the others, call until refused.

    ``package`` is the guard's package (``langchain_budgetguard``; bench/ab.py loads a patched copy
    under another name).
    """
    try:
        import importlib

        from .fakes import LAST_START

        model = _model()
        if kind in GUARD_KINDS:
            pkg = importlib.import_module(package)
            BudgetExceededError, BudgetGuard, Limit = pkg.BudgetExceededError, pkg.BudgetGuard, pkg.Limit
            nano_to_usd = importlib.import_module(f"{package}.money").nano_to_usd
            RedisStore = importlib.import_module(f"{package}.stores.redis").RedisStore

            store = RedisStore(url, prefix=prefix, **STORE_OPTIONS[kind])
            guard = BudgetGuard(model, limits=[Limit(usd=nano_to_usd(limit_nano), per="user")], store=store,
                                name="contention")
            for _ in range(3):
                guard.invoke(PROMPT, config={"configurable": {"user_id": f"warm-{os.getpid()}"}})
            config = {"configurable": {"user_id": "shared"}}
            refused: Any = BudgetExceededError

            def call() -> int:
                reply = guard.invoke(PROMPT, config=config)
                return int(reply.response_metadata["budgetguard"]["cost_usd"] * 1_000_000_000)

            def spent_now() -> int:
                return int(guard.status(config)[0].spent * 1_000_000_000)

            def finish() -> list[str]:
                return _close_guard(guard, store)
        else:
            import redis

            from .naive import NaiveBudget, NaiveRefused

            client = redis.Redis.from_url(url)
            warm = NaiveBudget(model, client, f"{prefix}naive-warm-{os.getpid()}", limit_nano)
            for _ in range(3):
                warm.invoke(PROMPT)
            naive = NaiveBudget(model, client, f"{prefix}naive", limit_nano)
            refused = NaiveRefused

            def call() -> int:
                return naive.invoke(PROMPT).response_metadata["naive_cost_nano"]

            def spent_now() -> int:
                return int(client.get(f"{prefix}naive") or 0)

            def finish() -> list[str]:
                client.close()
                return []

        latencies: list[float] = []
        admissions: list[tuple[float, int]] = []  # (when the model started: perf_counter, actual cost)
        charged = admitted = 0
        refused_at, refused_pc, spent_at_refusal = float("inf"), float("inf"), None
        barrier.wait()
        start = time.monotonic()
        while time.monotonic() - start < MAX_SECONDS:
            t0 = time.perf_counter()
            try:
                cost = call()
            except refused:
                refused_pc, refused_at = time.perf_counter(), time.monotonic()
                spent_at_refusal = spent_now()
                break
            latencies.append((LAST_START[0] - t0) * 1e6)
            admissions.append((LAST_START[0], cost))
            charged += cost
            admitted += 1
        end, timed_out = time.monotonic(), time.monotonic() - start >= MAX_SECONDS
        # Closed before the parent hears of it: the parent reads the counter once every process
        # has reported, so a slice still leased (or a settle still carried) would show as held.
        left = finish()
        queue.put({"admitted": admitted, "charged": charged, "latencies": latencies, "start": start,
                   "end": end, "timed_out": timed_out, "refused_at": refused_at, "refused_pc": refused_pc,
                   "spent_at_refusal": spent_at_refusal, "admissions": admissions, "left_after_close": left})
    except BaseException as exc:  # report, so that the parent does not wait forever
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _close_guard(guard: Any, store: Any) -> list[str]:
    """Close the guard (its store returns its slices, sends carried settles), wait for the
    store's slice timer to end, and say what is still held here (must be nothing)."""
    import threading

    guard.close()
    left = []
    for thread in threading.enumerate():
        if thread.name == SLICE_TIMER_THREAD:
            thread.join(timeout=2.0)
            if thread.is_alive():
                left.append(f"pid {os.getpid()}: the slice timer still runs 2 s after close()")
    holdings = store.slice_holdings() if hasattr(store, "slice_holdings") else {}
    if holdings:
        left.append(f"pid {os.getpid()}: slices after close(): {holdings}")
    return left


def _ceiling_worker(url: str, prefix: str, barrier: Any, queue: Any) -> None:
    """Raw reserve+settle EVALSHA pairs on a counter of its own, for CEILING_SECONDS."""
    try:
        import redis

        from langchain_budgetguard.stores.base import Counter
        from langchain_budgetguard.stores.redis import RedisStore

        from .redis_raw import RawScripts

        client = redis.Redis.from_url(url)
        store = RedisStore(url, prefix=prefix)
        raw = RawScripts(client, store, [Counter("{ceiling}:c", 10**18)], amount=13_350, charge=1_200,
                         settle_amount=6_600)
        for _ in range(20):
            raw.pair(client)
        barrier.wait()
        pairs = 0
        start = time.monotonic()
        while time.monotonic() - start < CEILING_SECONDS:
            for _ in range(10):
                raw.pair(client)
            pairs += 10
        queue.put({"pairs": pairs, "start": start, "end": time.monotonic()})
    except BaseException as exc:
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _run_row(target: Any, args: tuple, n: int) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, queue), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    out = []
    for _ in range(n):
        out.append(queue.get(timeout=MAX_SECONDS + 60))
    for p in procs:
        p.join(timeout=10)
    errors = [o["error"] for o in out if "error" in o]
    if errors:
        raise RuntimeError(f"a benchmark process failed: {errors[0]}")
    return out


def _summarise(out: list[dict[str, Any]]) -> dict[str, Any]:
    admitted = sum(o["admitted"] for o in out)
    wall = max(o["end"] for o in out) - min(o["start"] for o in out)
    latencies = [x for o in out for x in o["latencies"]]
    first = min(out, key=lambda o: o.get("refused_at", float("inf")))
    # What the calls admitted before the first refusal cost, whatever has reached Redis by then
    # (a slice's settles are reported up to REPORT_SECONDS later; calls in flight count too).
    refused_pc = first.get("refused_pc", float("inf"))
    admitted_by_refusal = (sum(c for o in out for t, c in o.get("admissions", ()) if t <= refused_pc)
                           if refused_pc != float("inf") else None)
    return {
        "spent_at_first_refusal": first.get("spent_at_refusal"),
        "admitted_at_first_refusal": admitted_by_refusal,
        "admitted": admitted,
        "charged_nano": sum(o["charged"] for o in out),
        "calls_per_s": admitted / wall if wall > 0 else float("nan"),
        "p50_us": percentile(latencies, 0.50),
        "p99_us": percentile(latencies, 0.99),
        "seconds": wall,
        "timed_out": any(o["timed_out"] for o in out),
        "left_after_close": [x for o in out for x in o.get("left_after_close", ())],
    }


PACKAGE = "langchain_budgetguard"
GUARD_KINDS = ("guard", "carry", "slices")
STORE_OPTIONS: dict[str, dict[str, Any]] = {
    "guard": {},
    "carry": {"carry_settles": True, "carry_window_seconds": CARRY_WINDOW},
    "slices": {"lease_slices": True},
}
SLICE_TIMER_THREAD = "budgetguard-slices"  # the thread RedisStore runs while it holds slices


def guard_row(n: int, limit: int, prefix: str, package: str = PACKAGE, kind: str = "guard",
              ) -> tuple[dict[str, Any], int, int]:
    """N processes on one guarded budget of ``limit`` nano-USD: (summary, spent, held) after the run
    (``kind`` "carry": settles carried by the next reserve; "slices": leased budget slices)."""
    import importlib

    guard = _summarise(_run_row(_worker, (kind, redis_url(), prefix, limit, package), n))
    pkg = importlib.import_module(package)
    store = importlib.import_module(f"{package}.stores.redis").RedisStore(redis_url(), prefix=prefix)
    nano_to_usd = importlib.import_module(f"{package}.money").nano_to_usd
    policy = pkg.BudgetGuard(limits=[pkg.Limit(usd=nano_to_usd(limit), per="user")], store=store, name="contention")
    state = policy.status(user_id="shared")[0]
    store.close()
    return guard, int(state.spent * 1_000_000_000), int(state.held * 1_000_000_000)


REPEATS = 3  # each row's five runs (guard, carry, slices, naive, ceiling) repeat, in rotating order; medians reported


def _one(kind: str, n: int, limit: int, cost: int, client: Any) -> dict[str, Any]:
    """One run of one kind on a fresh budget (its own key prefix, deleted after)."""
    prefix = unique_prefix(f"contention{n}")
    try:
        if kind in GUARD_KINDS:
            summary, spent, held = guard_row(n, limit, prefix, kind=kind)
            return {**summary, "spent_nano": spent, "held_nano": held, "overspend_nano": max(0, spent + held - limit)}
        if kind == "naive":
            summary = _summarise(_run_row(_worker, ("naive", redis_url(), prefix, limit, PACKAGE), n))
            spent = int(client.get(f"{prefix}naive") or 0)
            return {**summary, "spent_nano": spent, "held_nano": 0, "overspend_nano": max(0, spent - limit)}
        out = _run_row(_ceiling_worker, (redis_url(), prefix), n)
        pairs = sum(o["pairs"] for o in out)
        wall = max(o["end"] for o in out) - min(o["start"] for o in out)
        return {"evalsha_per_s": 2 * pairs / wall, "pairs_per_s": pairs / wall}
    finally:
        delete_prefix(client, prefix)


def run(results: Results, client: Any | None, quick: bool) -> None:
    if client is None:
        results.notes.append("section 2 skipped: no Redis")
        return
    from langchain_budgetguard.money import nano_to_usd

    cost = _call_cost_nano()
    processes = (1, 2, 4) if quick else PROCESSES
    if os.environ.get("BENCH_PROCESSES"):  # e.g. BENCH_PROCESSES=16,32: only these rows
        processes = tuple(int(x) for x in os.environ["BENCH_PROCESSES"].split(",") if x.strip())
    repeats = 1 if quick else REPEATS
    table: list[dict[str, Any]] = []
    slices_goal: dict[str, Any] | None = None
    overspends: list[int] = []
    inexact: list[str] = []
    for n in processes:
        calls = CALLS_PER_PROCESS * n // (4 if quick else 1)
        limit = calls * cost
        runs: dict[str, list[dict[str, Any]]] = {"guard": [], "carry": [], "slices": [], "naive": [], "ceiling": []}
        kinds = list(runs)
        for r in range(repeats):
            for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
                runs[kind].append(_one(kind, n, limit, cost, client))
        guard, carry, slices, naive, ceiling = (runs[k] for k in kinds)
        guarded = guard + carry + slices
        over = max(g["overspend_nano"] for g in guarded)
        overspends.append(over)
        for kind in GUARD_KINDS:
            for g in runs[kind]:
                if g["charged_nano"] != g["spent_nano"] or g["held_nano"] or g["left_after_close"]:
                    inexact.append(f"N={n} {kind}: charged {g['charged_nano']} vs spent {g['spent_nano']}, "
                                   f"held {g['held_nano']}" + "".join(f"; {x}" for x in g["left_after_close"]))

        def med(items: list[dict[str, Any]], key: str) -> float:
            return median([x[key] for x in items])

        naive_over = [x["overspend_nano"] for x in naive]

        def first(items: list[dict[str, Any]]) -> float | None:
            seen = [x["admitted_at_first_refusal"] for x in items if x.get("admitted_at_first_refusal") is not None]
            return 100 * min(seen) / limit if seen else None

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f}%"

        def ratio(items: list[dict[str, Any]]) -> float:
            return median([c["calls_per_s"] / g["calls_per_s"] for c, g in zip(items, guard)])

        row: dict[str, Any] = {"N": n, "budget (calls)": calls}
        for kind, items in (("guard", guard), ("carry", carry), ("slices", slices)):
            row[f"{kind} calls/s"] = f"{med(items, 'calls_per_s'):,.0f}"
            row[f"{kind} p50 adm"] = f"{med(items, 'p50_us'):,.0f} µs"
            row[f"{kind} p99 adm"] = f"{med(items, 'p99_us'):,.0f} µs"
            row[f"{kind} overspend"] = f"{max(g['overspend_nano'] for g in items)} n$"
            row[f"{kind} used"] = f"{100 * min(g['spent_nano'] for g in items) / limit:.1f}%"
            row[f"{kind} 1st refusal"] = pct(first(items))
            if kind != "guard":
                row[f"{kind}/guard calls/s"] = f"{ratio(items):.2f}x"
        row.update({
            "naive calls/s": f"{med(naive, 'calls_per_s'):,.0f}",
            "naive p50 adm": f"{med(naive, 'p50_us'):,.0f} µs",
            "naive p99 adm": f"{med(naive, 'p99_us'):,.0f} µs",
            "naive overspend": f"{median(naive_over) / cost:.0f} calls (max {max(naive_over) / cost:.0f}, "
                               f"{nano_to_usd(max(naive_over))} $)",
            "raw EVALSHA/s (pairs)": f"{med(ceiling, 'evalsha_per_s'):,.0f} ({med(ceiling, 'pairs_per_s'):,.0f})",
        })
        if n == SLICES_GOAL_N:
            slices_goal = {"ratio": ratio(slices), "overspend_nano": max(g["overspend_nano"] for g in slices),
                           "first_refusal_pct": first(slices), "guard_calls_per_s": med(guard, "calls_per_s"),
                           "slices_calls_per_s": med(slices, "calls_per_s")}
        if any(x["timed_out"] for x in guard + carry + naive):
            row["N"] = f"{n} (cut at {MAX_SECONDS:.0f} s)"
        table.append(row)
        results.tables.setdefault("2. Contention (medians of %d runs; admission latency: guard entry -> model start)"
                                  % repeats, table)
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        results.raw.setdefault("contention", []).append({
            "processes": n, "budget_calls": calls, "limit_nano": limit, "call_cost_nano": cost,
            "guard": guard, "carry": carry, "slices": slices, "naive": naive, "ceiling": ceiling,
        })
    results.add(Row(
        "2", "guard overspend, every N and run (alone, carried, slices)", f"{max(overspends)} n$",
        detail=(f"N={','.join(map(str, processes))}, {repeats} runs each, budget spent in every run; charged = spent, "
                f"nothing held after: {'yes' if not inexact else 'NO: ' + '; '.join(inexact)}; naive: table below"),
        goal="= 0", ok=max(overspends) == 0 and not inexact,
    ))
    if slices_goal is None:
        results.notes.append(f"section 2: the slices goal row needs N={SLICES_GOAL_N} (not run in --quick)")
        return
    g = slices_goal
    refusal = g["first_refusal_pct"]
    at = "-" if refusal is None else f"{refusal:.1f}"
    results.add(Row(
        "2", f"{SLICES_GOAL_N} processes: slices / guard calls/s", f"{g['ratio']:.2f}x",
        detail=(f"slices {g['slices_calls_per_s']:,.0f} vs guard {g['guard_calls_per_s']:,.0f} calls/s (medians), "
                f"slices overspend {g['overspend_nano']} n$ (max), first refusal at {at}% "
                f"of the budget (lowest run)"),
        goal=f">= {SLICES_GOAL_RATIO}x, 0 overspend, 1st refusal >= {SLICES_GOAL_REFUSAL}%",
        ok=(g["ratio"] >= SLICES_GOAL_RATIO and g["overspend_nano"] == 0 and refusal is not None
            and refusal >= SLICES_GOAL_REFUSAL),
        data=g,
    ))
