"""Budget stores: where counters live. ``MemoryStore`` for one process, ``RedisStore`` for many."""

from typing import Any

from .base import Counter, CounterState, Crossing, Hold, ReserveResult, SettleResult, Store
from .memory import MemoryStore

__all__ = [
    "Counter", "CounterState", "Crossing", "Hold", "ReserveResult", "SettleResult", "Store", "MemoryStore", "RedisStore",
]


def __getattr__(name: str) -> Any:
    # RedisStore is imported on first use, so that the in-process store never loads redis-py.
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
