"""Section 10: settles carried by the next reserve, Redis CPU per call, and peers on the same Redis.

One process, one Redis, interleaved rounds (common.interleave's rotation): every variant is
timed in every round, and around each block ``INFO commandstats`` is read, so that Redis CPU
per call (usec of the commands the variant sends, delta over the block) is measured in the
same rounds as the time. Variants:

- guarded ``invoke`` of the bare fake model through a ``RedisStore``, settles sent alone
  (today's path, two script calls per call), carried (``carry_settles=True``: one) and with
  leased budget slices (``lease_slices=True``: the counter every call hits is hot, so calls are
  admitted against a slice, one script call per refill of ~64 calls), and the bare model itself;
- store level, no model: ``reserve`` + ``settle`` (alone / carried / slices), the ``limits`` library's
  moving-window ``hit`` (``RedisStorage`` + ``MovingWindowRateLimiter``; the ``bench`` extra),
  the naive check-then-record's ``GET`` + ``INCRBY`` (bench/naive.py's two round trips), and
  one ``EVALSHA`` of ``return 1`` (a bare round trip).

Redis CPU counts ``evalsha``/``evalsha_ro``/``eval``/``fcall`` for script variants and
``get``/``incrby`` for the naive one (commands inside scripts are inside their script's usec).
``INFO commandstats`` is server-wide: other clients of a shared Redis add noise (hence medians).
A slice's report can be sent by its store's timer during another variant's block (settles wait
at most ~0.5 s); most go with the refills inside its own block.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from .common import Results, Row, delete_prefix, fmt_us, median, per_round, redis_url, unique_prefix

SCRIPT_COMMANDS = ("evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "fcall_ro")
NAIVE_COMMANDS = ("get", "incrby")
ROUND_TRIP_GOAL = 1.5  # issue 13: a cold counter's call adds <= 1.5x one raw EVALSHA round trip


def commandstats(client: Any) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec), as INFO commandstats reports them."""
    out = {}
    for name, stats in client.info("commandstats").items():
        if name.startswith("cmdstat_") and isinstance(stats, dict):
            out[name[len("cmdstat_"):]] = (int(stats.get("calls", 0)), int(stats.get("usec", 0)))
    return out


def usec_between(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], commands: tuple[str, ...]) -> int:
    return sum(after.get(c, (0, 0))[1] - before.get(c, (0, 0))[1] for c in commands)


def _server_cpu(client: Any) -> float:
    """Seconds of CPU the Redis process has used (user + sys, main thread and I/O threads)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(client: Any, variants: dict[str, tuple[Callable[[int], Any], tuple[str, ...]]], rounds: int,
            calls: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Per-call time (µs), Redis command CPU per call (µs, INFO commandstats) and Redis process
    CPU per call (µs, INFO cpu) of each variant, per round (rotating order)."""
    import gc

    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    process: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            run, commands = variants[name]
            before, used = commandstats(client), _server_cpu(client)
            start = time.perf_counter()
            run(calls)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
            process[name].append((_server_cpu(client) - used) / calls * 1e6)
            cpu[name].append(usec_between(before, commandstats(client), commands) / calls)
    return times, cpu, process


def _limits_hit(prefix: str) -> Callable[[int], Any] | None:
    try:
        from limits import parse
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter
    except ImportError:
        return None
    limiter = MovingWindowRateLimiter(RedisStorage(redis_url(), key_prefix=prefix + "limits"))
    item = parse("1000000000/hour")  # never refuses: the cost of a hit, not of a refusal

    def run(n: int) -> None:
        for _ in range(n):
            limiter.hit(item, "shared")

    return run


def run(results: Results, client: Any | None, quick: bool) -> None:
    if client is None:
        results.notes.append("section 10 skipped: no Redis")
        return
    from langchain_budgetguard import BudgetGuard, Limit
    from langchain_budgetguard.stores.base import Counter, Hold
    from langchain_budgetguard.stores.redis import RedisStore

    from .fakes import UsageChat
    from .redis_raw import RawScripts

    prefix = unique_prefix("peers")
    stores = {mode: RedisStore(redis_url(), prefix=f"{prefix}{mode}:", carry_settles=(mode == "carried"),
                               lease_slices=(mode == "slices"))
              for mode in ("alone", "carried", "slices")}
    model = UsageChat()
    guards = {mode: BudgetGuard(model, limits=[Limit(usd=10**6, per="user")], store=store, name="peers")
              for mode, store in stores.items()}
    config = {"configurable": {"user_id": "shared"}}
    ids = itertools.count()

    def guarded(mode: str) -> Callable[[int], Any]:
        guard, store = guards[mode], stores[mode]

        def go(n: int) -> None:
            for _ in range(n):
                guard.invoke("hello", config=config)
            store.flush_carried()  # the block's last settle counts in this block

        return go

    def bare(n: int) -> None:
        for _ in range(n):
            model.invoke("hello")

    counter = [Counter("{peers}:store:user:shared", 10**18)]
    keys = [counter[0].key]

    def store_pair(mode: str) -> Callable[[int], Any]:
        store = stores[mode]

        def go(n: int) -> None:
            for _ in range(n):
                call_id = f"p{next(ids)}"
                store.reserve(counter, Hold(call_id, 13_350, 600, 1_200))
                store.settle(call_id, keys, 6_600)
            store.flush_carried()

        return go

    naive_key = f"{prefix}naive"

    def naive(n: int) -> None:
        for _ in range(n):
            int(client.get(naive_key) or 0)
            client.incrby(naive_key, 6_600)

    raw = RawScripts(client, stores["alone"], counter, amount=13_350, charge=1_200, settle_amount=6_600)

    def trivial(n: int) -> None:
        for _ in range(n):
            raw.trivial(client)

    variants: dict[str, tuple[Callable[[int], Any], tuple[str, ...]]] = {
        "bare model": (bare, ()),
        "guard, settle alone": (guarded("alone"), SCRIPT_COMMANDS),
        "guard, settle carried": (guarded("carried"), SCRIPT_COMMANDS),
        "guard, slices (hot counter)": (guarded("slices"), SCRIPT_COMMANDS),
        "store reserve+settle alone": (store_pair("alone"), SCRIPT_COMMANDS),
        "store reserve+settle carried": (store_pair("carried"), SCRIPT_COMMANDS),
        "store reserve+settle slices": (store_pair("slices"), SCRIPT_COMMANDS),
        "naive GET+INCRBY": (naive, NAIVE_COMMANDS),
        "raw EVALSHA return 1": (trivial, SCRIPT_COMMANDS),
    }
    hit = _limits_hit(prefix)
    if hit is not None:
        variants["limits moving-window hit"] = (hit, SCRIPT_COMMANDS)
    else:
        results.notes.append("section 10: the limits library is not installed (pip install -e '.[bench]'); its row is skipped")
    try:
        for run_ in (v[0] for v in variants.values()):  # warm: scripts loaded, plans cached
            run_(20)
        rounds, calls = (5, 100) if quick else (15, 300)
        t, cpu, process = measure(client, variants, rounds, calls)
    finally:
        for store in stores.values():
            store.close()
        delete_prefix(client, prefix)

    b = t["bare model"]
    add_alone = median(per_round(lambda g, x: g - x, t["guard, settle alone"], b))
    add_carried = median(per_round(lambda g, x: g - x, t["guard, settle carried"], b))
    change = median(per_round(lambda c, a, x: (c - x) / (a - x) - 1, t["guard, settle carried"],
                              t["guard, settle alone"], b))
    rtt = median(t["raw EVALSHA return 1"])
    per_rtt = median(per_round(lambda c, x, r: (c - x) / r, t["guard, settle carried"], b, t["raw EVALSHA return 1"]))
    cpu_alone, cpu_carried = median(cpu["guard, settle alone"]), median(cpu["guard, settle carried"])
    proc_alone, proc_carried = median(process["guard, settle alone"]), median(process["guard, settle carried"])
    results.add(Row(
        "10", "guard adds per call, settle carried / alone", f"{100 * change:+.0f}%",
        detail=f"alone {fmt_us(add_alone)}, carried {fmt_us(add_carried)} over the bare model ({fmt_us(median(b))})",
        data={"added_alone_us": add_alone, "added_carried_us": add_carried, "change": change, "rounds": len(b)},
    ))
    results.add(Row(
        "10", "guard adds / one raw EVALSHA round trip, carried", f"{per_rtt:.2f}x",
        detail=f"raw EVALSHA `return 1`: {fmt_us(rtt)}; settle alone: {add_alone / rtt:.2f}x",
        goal=f"<= {ROUND_TRIP_GOAL}x", ok=per_rtt <= ROUND_TRIP_GOAL,
        data={"ratio": per_rtt, "round_trip_us": rtt},
    ))
    add_slices = median(per_round(lambda g, x: g - x, t["guard, slices (hot counter)"], b))
    slices_change = median(per_round(lambda c, a, x: (c - x) / (a - x) - 1, t["guard, slices (hot counter)"],
                                     t["guard, settle alone"], b))
    slices_rtt = median(per_round(lambda c, x, r: (c - x) / r, t["guard, slices (hot counter)"], b,
                                  t["raw EVALSHA return 1"]))
    results.add(Row(
        "10", "guard adds per call, slices / alone", f"{100 * slices_change:+.0f}%",
        detail=(f"slices {fmt_us(add_slices)} over the bare model = {slices_rtt:.2f}x one raw EVALSHA round trip; "
                f"alone {fmt_us(add_alone)}"),
        data={"added_slices_us": add_slices, "change": slices_change, "per_round_trip": slices_rtt},
    ))
    results.add(Row(
        "10", "Redis CPU per guarded call, carried / alone", f"{100 * (cpu_carried / cpu_alone - 1):+.0f}%",
        detail=f"alone {cpu_alone:.1f} µs, carried {cpu_carried:.1f} µs of script time per call (INFO commandstats)",
        data={"cpu_alone_us": cpu_alone, "cpu_carried_us": cpu_carried},
    ))
    results.add(Row(
        "10", "Redis process CPU per guarded call, carried / alone",
        f"{100 * (proc_carried / proc_alone - 1):+.0f}%",
        detail=f"alone {proc_alone:.1f} µs, carried {proc_carried:.1f} µs (INFO cpu: user + sys, network included)",
        data={"process_alone_us": proc_alone, "process_carried_us": proc_carried},
    ))
    cpu_slices, proc_slices = median(cpu["guard, slices (hot counter)"]), median(process["guard, slices (hot counter)"])
    results.add(Row(
        "10", "Redis CPU per guarded call, slices / alone", f"{100 * (cpu_slices / cpu_alone - 1):+.0f}%",
        detail=(f"slices {cpu_slices:.2f} µs of script time per call vs alone {cpu_alone:.1f} µs (INFO commandstats); "
                f"process CPU {proc_slices:.1f} vs {proc_alone:.1f} µs ({100 * (proc_slices / proc_alone - 1):+.0f}%, "
                f"INFO cpu)"),
        data={"cpu_slices_us": cpu_slices, "process_slices_us": proc_slices},
    ))
    table = []
    for name in variants:
        if name == "bare model":
            continue
        table.append({"per call": name, "client time": fmt_us(median(t[name])),
                      "Redis cmd CPU": f"{median(cpu[name]):.2f} µs",
                      "Redis process CPU": f"{median(process[name]):.1f} µs",
                      "vs guard alone": f"{median(per_round(lambda x, g: x / g, t[name], t['guard, settle alone'])):.2f}x"})
    results.tables["10. Per call on one Redis, same run (medians of %d rounds of %d calls)" % (rounds, calls)] = table
    results.raw["peers"] = {"times_us": t, "redis_command_cpu_us": cpu, "redis_process_cpu_us": process}
    results.notes.append("section 10: INFO commandstats and INFO cpu are server-wide; other clients of this Redis "
                         "add to them (give the benchmark a Redis of its own for clean CPU rows)")
