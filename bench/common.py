"""Shared helpers: interleaved timing, medians, the result table, Redis set-up and clean-up."""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: what was measured, its headline figure, the goal and whether it is met."""

    section: str
    name: str
    figure: str  # the headline figure, formatted (a ratio, bytes, µs...)
    detail: str = ""  # the measurements behind the figure, formatted
    goal: str = ""
    ok: bool | None = None  # None: no goal for this row
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers for --json


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # extra tables (contention)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # raw numbers behind the tables, for --json

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row

    def as_json(self, env: dict[str, Any]) -> dict[str, Any]:
        return {"env": env, "rows": [asdict(r) for r in self.rows], "tables": self.tables, "raw": self.raw,
                "notes": self.notes}


def status(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "MISSED")


def format_row(row: Row) -> str:
    goal = f"  [goal {row.goal}: {status(row.ok)}]" if row.goal else ""
    detail = f"  ({row.detail})" if row.detail else ""
    return f"  {row.section:<3} {row.name:<44} {row.figure:>14}{goal}{detail}"


def render_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- timing ----------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def interleave(variants: dict[str, Callable[[int], Any]], rounds: int, calls: int) -> dict[str, list[float]]:
    """Per-call time (µs) of each variant, per round. A variant is ``run(n)``: make n calls.

    Every round times every variant once, in an order that rotates from round to round, so that
    the machine's drift and noise fall on all of them alike. Compare variants round by round.
    """
    names = list(variants)
    out: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            run = variants[name]
            start = time.perf_counter()
            run(calls)
            out[name].append((time.perf_counter() - start) / calls * 1e6)
    return out


async def ainterleave(
    variants: dict[str, Callable[[int], Awaitable[Any]]], rounds: int, calls: int
) -> dict[str, list[float]]:
    """``interleave`` for coroutines: ``await run(n)`` makes n calls."""
    names = list(variants)
    out: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            run = variants[name]
            start = time.perf_counter()
            await run(calls)
            out[name].append((time.perf_counter() - start) / calls * 1e6)
    return out


def per_round(fn: Callable[..., float], *series: list[float]) -> list[float]:
    """fn applied round by round to several series of the same length."""
    return [fn(*vals) for vals in zip(*series)]


# -- environment -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(redis_client: Any | None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    env: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "langchain-core": v("langchain-core"),
        "redis-py": v("redis"),
        "hiredis": v("hiredis"),
        "genai-prices": v("genai-prices"),
        "budgetguard": v("langchain-budgetguard"),
    }
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        env["commit"] = commit + (" (src/ modified)" if dirty else "")
    except Exception:
        env["commit"] = "-"
    if redis_client is not None:
        info = redis_client.info("server")
        env["redis"] = info.get("redis_version")
        env["redis_url"] = redis_url_safe()
    else:
        env["redis"] = "unreachable"
    try:
        env["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return env


def redis_url_safe() -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url())
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


# -- Redis -----------------------------------------------------------------------------------------


def connect_redis() -> Any | None:
    """A redis-py client for REDIS_URL, or None (with a note) when it does not answer."""
    try:
        import redis

        client = redis.Redis.from_url(redis_url(), socket_connect_timeout=1.0, socket_timeout=30.0)
        client.ping()
        return client
    except Exception as exc:  # pragma: no cover - depends on the machine
        print(f"Redis at {redis_url_safe()} is not reachable ({type(exc).__name__}: {exc}); Redis rows are skipped.")
        return None


def unique_prefix(what: str) -> str:
    """A key prefix no one else uses: ``bgbench:<what>:<pid>.<random>:`` (no braces: they are hash tags)."""
    return f"bgbench:{what}:{os.getpid()}.{secrets.token_hex(4)}:"


def delete_prefix(client: Any, prefix: str) -> int:
    """UNLINK every key under ``prefix``; returns how many."""
    n = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            n += client.unlink(*batch)
            batch.clear()
    if batch:
        n += client.unlink(*batch)
    return n


def fmt_us(x: float) -> str:
    return f"{x:,.1f} µs" if x < 10_000 else f"{x / 1000:,.2f} ms"


def fmt_x(x: float) -> str:
    return f"{x:.2f}x"
