"""Run every benchmark and print one table: ``python -m bench.run [--json PATH] [--quick] [--only 1,2,...]``.

See bench/README.md for what each row measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import common  # noqa: E402

SECTIONS = {
    "1": ("Overhead per call", "bench.overhead"),
    "2": ("Contention: N processes on one budget in one Redis", "bench.contention"),
    "3": ("Scale: 100k ids", "bench.scale"),
    "4": ("Estimation", "bench.estimation"),
    "5": ("Cost of pricing", "bench.pricing_cost"),
    "6": ("Memory per call record", "bench.records_memory"),
    "7": ("Dashboard: the scope page at 100k ids; the ledger pages at 30k rows", "bench.dashboard"),
    "8": ("Refuse only what cannot fit: gpt-4o, budget 90% used", "bench.refusals"),
    "9": ("Indexes, not SCAN: top and status at 100k ids", "bench.indexes"),
    "10": ("Carried settles, Redis CPU per call, peers on the same Redis", "bench.peers"),
    "11": ("Leased slices vs the in-process guard; a cold counter vs one round trip", "bench.slices"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated sections to run (1-11); default all")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; expected some of {list(SECTIONS)}")

    import importlib

    client = common.connect_redis()
    env = common.environment(client)
    print("langchain-budgetguard benchmarks  (" + ", ".join(f"{k}={v}" for k, v in env.items()) + ")", flush=True)
    results = common.Results()
    started = time.monotonic()
    for key in only:
        title, module = SECTIONS[key]
        print(f"\n{key}. {title}", flush=True)
        t0 = time.monotonic()
        importlib.import_module(module).run(results, client, args.quick)
        print(f"   ({time.monotonic() - t0:.1f} s)", flush=True)
    env["seconds"] = round(time.monotonic() - started, 1)

    print("\n" + "=" * 100)
    print(summary(results, env))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results.as_json(env), f, indent=2, default=str)
        print(f"\nwrote {args.json}")
    return 0


def summary(results: common.Results, env: dict) -> str:
    lines = ["Summary  (" + ", ".join(f"{k}={env[k]}" for k in ("nproc", "cpu", "python", "redis", "seconds")
                                       if k in env) + ")"]
    section = None
    for row in results.rows:
        if row.section != section:
            section = row.section
            lines.append(f"\n{section}. {SECTIONS.get(section, ('',))[0]}")
        lines.append(common.format_row(row))
    for name, table in results.tables.items():
        lines.append(f"\n{name}")
        if table:
            headers = list(table[0])
            lines.append(common.render_table(headers, [[r[h] for h in headers] for r in table]))
    goals = [r for r in results.rows if r.ok is not None]
    met = sum(1 for r in goals if r.ok)
    lines.append(f"\nGoals met: {met} of {len(goals)}" + ("" if met == len(goals) else "  (missed: " + "; ".join(
        f"{r.section} {r.name}" for r in goals if not r.ok) + ")"))
    for note in results.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
