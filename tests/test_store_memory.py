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
