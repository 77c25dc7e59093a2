"""Budget stores: where counters live. ``MemoryStore`` for one process, ``RedisStore`` for many."""

from .base import Counter, CounterState, Hold, ReserveResult, SettleResult, Store
from .memory import MemoryStore

__all__ = ["Counter", "CounterState", "Hold", "ReserveResult", "SettleResult", "Store", "MemoryStore"]
