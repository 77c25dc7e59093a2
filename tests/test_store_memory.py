"""The in-process store against the store contract, on a clock the tests move by hand."""

from __future__ import annotations

import asyncio

import pytest
from .store_contract import StoreContract, StoreEnv

from langchain_budgetguard.stores import MemoryStore


class ManualClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class TestMemoryStoreContract(StoreContract):
    @pytest.fixture
    def env(self) -> StoreEnv:
        clock = ManualClock()
        store = MemoryStore(clock=clock)

        async def sleep(seconds: float) -> None:
            clock.now += seconds
            await asyncio.sleep(0)

        def expiry_of(key: str) -> float | None:
            return store._counters[key].expires_at

        return StoreEnv(store=store, sleep=sleep, expiry_of=expiry_of)


def test_sweep_forgets_expired_counters_and_records_but_not_live_ones():
    from langchain_budgetguard.stores import Counter, Hold

    clock = ManualClock()
    store = MemoryStore(clock=clock)
    t0 = int(clock.now)
    old = Counter("old", 1000, expires_at=t0 + 100)
    busy = Counter("busy", 1000, expires_at=t0 + 100)
    keep = Counter("keep", 1000, expires_at=t0 + 10_000)
    store.reserve([old, keep], Hold("settled-call", 10, 30))
    store.settle("settled-call", ["old", "keep"], 7)
    store.reserve([busy], Hold("long-call", 10, 600))
    store.reserve([keep], Hold("renewed-call", 10, 30))
    clock.now = t0 + 101
    store.renew("renewed-call", ["keep"], 30)  # in flight: its record must outlive the first lease
    store.read(["keep"])
    store.reserve([keep], Hold("tick", 1, 30))  # an operation runs the sweep
    assert "old" not in store._counters  # past retention, nothing in flight: dropped
    assert "busy" in store._counters  # past retention but its call is still in flight
    assert store.read(["keep"])[0].spent == 7
    clock.now = t0 + 700  # the long call's lease is over: reaped, then the counter can go
    store.reserve([keep], Hold("tick2", 1, 30))
    clock.now = t0 + 702
    store.reserve([keep], Hold("tick3", 1, 30))
    assert "busy" not in store._counters


def test_records_live_for_the_retry_window_not_a_day():
    from langchain_budgetguard.stores import Counter, Hold

    clock = ManualClock()
    store = MemoryStore(clock=clock, retry_window_seconds=60)
    t0 = clock.now
    keep = Counter("keep", 10_000)
    store.reserve([keep], Hold("settled-call", 10, 30))
    store.settle("settled-call", ["keep"], 7)  # forgotten at t0 + 60
    renewed = Hold("renewed-call", 10, 30)
    store.reserve([keep], renewed)
    store.reserve([keep], Hold("expiring-call", 10, 30, charge_on_expiry=5))
    clock.now = t0 + 20
    assert store.renew("renewed-call", ["keep"], 60)  # live until t0 + 80
    clock.now = t0 + 59  # inside every window: retries are recognised; expiring-call is reaped
    assert store.reserve([keep], renewed).duplicate
    assert store.reserve([keep], Hold("settled-call", 1, 30)).reused
    assert not store.settle("settled-call", ["keep"], 7).applied
    clock.now = t0 + 61
    store.reserve([keep], Hold("tick", 1, 30))
    assert "settled-call" not in store._records
    assert {"renewed-call", "expiring-call"} <= set(store._records)
    assert store._counters["keep"].expired == {"expiring-call": 5}
    clock.now = t0 + 81  # the renewed lease ends now: its record waits one window more
    store.read(["keep"])
    clock.now = t0 + 120
    store.reserve([keep], Hold("tick2", 1, 30))
    assert "expiring-call" not in store._records and "renewed-call" in store._records
    assert store._counters["keep"].expired == {}
    clock.now = t0 + 142
    store.reserve([keep], Hold("tick3", 1, 30))
    assert "renewed-call" not in store._records
    heap_sizes = len(store._record_expiry) + len(store._expired_expiry) + len(store._settled_expiry)
    assert heap_sizes <= 6  # only the ticks' entries are left


def test_a_settled_record_is_never_forgotten_early_even_when_the_clock_steps_back():
    from langchain_budgetguard.stores import Counter, Hold

    clock = ManualClock()
    store = MemoryStore(clock=clock, retry_window_seconds=60)
    t0 = clock.now
    keep = Counter("keep", 10_000)
    store.reserve([keep], Hold("first", 10, 30))
    store.settle("first", ["keep"], 7)  # forgotten at t0 + 60
    clock.now = t0 - 50  # the clock steps back
    store.reserve([keep], Hold("second", 10, 30))
    store.settle("second", ["keep"], 7)  # forgotten at t0 + 10, queued behind "first"
    clock.now = t0 + 20
    store.reserve([keep], Hold("tick", 1, 30))
    assert not store.settle("second", ["keep"], 7).applied  # its window is over: kept longer, never less
    clock.now = t0 + 61
    store.reserve([keep], Hold("tick2", 1, 30))
    assert "first" not in store._records and "second" not in store._records
    assert store.read(["keep"])[0].spent == 14


def test_a_sustained_stream_keeps_one_window_of_records():
    from langchain_budgetguard.stores import Counter, Hold

    clock = ManualClock()
    store = MemoryStore(clock=clock, retry_window_seconds=10)
    counters = [Counter("a", 10**15), Counter("b", 10**15)]
    for n in range(4_000):  # 100 calls/s for 40 s, lease 600 s
        store.reserve(counters, Hold(f"c{n}", 5, 600, 5))
        store.settle(f"c{n}", ["a", "b"], 4)
        clock.now += 0.01
    assert len(store._records) <= 100 * 11
    assert len(store._record_expiry) + len(store._settled_expiry) <= 100 * 11
    assert store.read(["a", "b"]) == [store.read(["a"])[0]] * 2 and store.read(["a"])[0].spent == 16_000


def test_a_wall_clock_stepped_forward_does_not_end_the_holds_of_running_calls(monkeypatch) -> None:
    import time as real_time

    from langchain_budgetguard.stores.base import Counter, CounterState, Hold

    store = MemoryStore()
    counters = [Counter("{g}:budget", 1_000_000_000)]
    assert store.reserve(counters, Hold("call-a", 900_000_000, 600, charge_on_expiry=100_000_000)).ok
    stepped = real_time.time() + 700  # an NTP correction, a resumed VM: the lease keeper (monotonic) sees none
    monkeypatch.setattr(real_time, "time", lambda: stepped)
    refused = store.reserve(counters, Hold("call-b", 900_000_000, 600, charge_on_expiry=100_000_000))
    assert not refused.ok and refused.states[0] == CounterState(0, 900_000_000)
    assert store.renew("call-a", ["{g}:budget"], 600)


def test_the_stores_clock_keeps_to_the_epoch_and_ignores_wall_clock_steps(monkeypatch) -> None:
    import time as real_time

    from langchain_budgetguard.stores.memory import steady_time

    assert abs(steady_time() - real_time.time()) < 5  # epoch seconds: ledger times and counter expiries read right
    before = steady_time()
    monkeypatch.setattr(real_time, "time", lambda: before + 700)
    assert steady_time() - before < 5
