"""Leased budget slices (RedisStore(lease_slices=True), stores.slices)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis

from langchain_budgetguard.stores.redis import RedisStore

from .redis_support import fresh_prefix, redis_url  # noqa: F401 - fixtures
from .store_contract import StoreContract, StoreEnv
from .test_store_redis import expiry_reader


@pytest.mark.redis
class TestSlicedRedisContract(StoreContract):
    """The whole store contract with every counter admitted from slices from its first reserve."""

    @pytest_asyncio.fixture
    async def env(self, redis_url: str) -> AsyncIterator[StoreEnv]:  # noqa: F811
        store = RedisStore(redis_url, prefix=fresh_prefix(), lease_slices=True)
        store._book.hot_hits = 1
        admin = redis.Redis.from_url(redis_url)
        try:
            yield StoreEnv(store=store, sleep=asyncio.sleep, expiry_of=expiry_reader(admin, store))
        finally:
            await store.aclose()
            admin.close()
