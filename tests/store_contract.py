"""The store contract: what every budget store does, whatever keeps its counters.

Subclass ``StoreContract`` in a test module (its name must start with ``Test``) and give it an
``env`` fixture that yields a ``StoreEnv``. Every test then runs on a fresh store, through its
sync API and its async API (the ``api`` fixture), except the concurrency tests, which use one
API each on purpose (threads: sync; ``asyncio.gather``: async).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from langchain_budgetguard.stores.base import Counter, CounterState, Hold, ReserveResult, SettleResult
from langchain_budgetguard.stores.bounds import MAX_NANO

__all__ = ["StoreContract", "StoreEnv", "Api"]


@dataclass
class StoreEnv:
    """A store under test and what the tests need to know about it."""

    store: Any
    sleep: Callable[[float], Awaitable[None]]  # let the store's clock move on (leases)
    expiry_of: Callable[[str], float | None]  # when the store drops a counter (epoch s); None: never
    tags: Sequence[str] = ("t0", "t1", "t2")  # hash tags for keys; at least three distinct
    lease: float = 0.3  # a lease short enough to wait out in a test

    def key(self, name: str, tag: int = 0) -> str:
        return "{" + self.tags[tag] + "}:" + name


class Api:
    """The store's sync or async API behind one awaitable face, so each test serves both."""

    def __init__(self, store: Any, use_async: bool) -> None:
        self.store, self.use_async = store, use_async

    async def _do(self, name: str, *args: Any) -> Any:
        if self.use_async:
            return await getattr(self.store, "a" + name)(*args)
        return getattr(self.store, name)(*args)

    async def reserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        return await self._do("reserve", counters, hold)

    async def settle(self, call_id: str, keys: Sequence[str], amount: int) -> SettleResult:
        return await self._do("settle", call_id, keys, amount)

    async def renew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool:
        return await self._do("renew", call_id, keys, lease_seconds)

    async def read(self, keys: Sequence[str]) -> list[CounterState]:
        return await self._do("read", keys)

    async def release(self, call_id: str, keys: Sequence[str], hold: Hold) -> None:
        await self._do("release", call_id, keys, hold)

    async def reset(self, key: str) -> CounterState:
        return await self._do("reset_counter", key)

    async def settle_row(self, call_id: str, keys: Sequence[str], amount: int, row: Any) -> SettleResult:
        if self.use_async:
            return await self.store.asettle(call_id, keys, amount, row=row)
        return self.store.settle(call_id, keys, amount, row=row)

    async def read_ledger(self, name: str, **filters: Any) -> list[Any]:
        if self.use_async:
            return await self.store.aread_ledger(name, **filters)
        return self.store.read_ledger(name, **filters)

    async def read_index(self, index: str, count: int | None = None) -> list[tuple[str, int]]:
        if self.use_async:
            return await self.store.aread_index(index, count)
        return self.store.read_index(index, count)


def call_id() -> str:
    return uuid.uuid4().hex


def keys_of(counters: Sequence[Counter]) -> list[str]:
    return [c.key for c in counters]


@pytest.mark.asyncio(loop_scope="session")
class StoreContract:
    """Tests every store must pass. Subclasses provide the ``env`` fixture."""

    # How far below the limit many concurrent calls of at most 30 may stop: a call refused while
    # another's hold (or a slice being refilled) briefly occupied the room. Leased slices may add
    # a second such moment (the refill of a slice in flight while a call goes to Redis).
    fill_margin = 40

    @pytest.fixture
    def env(self) -> StoreEnv:
        raise NotImplementedError("a StoreContract subclass provides the env fixture")

    @pytest.fixture(params=["sync", "async"])
    def api(self, request: pytest.FixtureRequest, env: StoreEnv) -> Api:
        return Api(env.store, request.param == "async")

    # -- admission ----------------------------------------------------------------------------

    async def test_admits_up_to_the_limit_and_refuses_one_nano_more(self, env: StoreEnv, api: Api) -> None:
        counter = Counter(env.key("boundary"), limit=1_000)
        first = call_id()
        assert (await api.reserve([counter], Hold(first, 300, 30))).ok
        await api.settle(first, [counter.key], 300)
        assert (await api.reserve([counter], Hold(call_id(), 200, 30))).ok
        exact = await api.reserve([counter], Hold(call_id(), 500, 30))  # 300 + 200 + 500 == limit
        assert exact.ok and exact.states == (CounterState(spent=300, held=700),)
        over = await api.reserve([counter], Hold(call_id(), 1, 30))
        assert not over.ok and over.blocked == 0
        assert over.states == (CounterState(spent=300, held=700),)
        assert await api.read([counter.key]) == [CounterState(300, 700)]

    async def test_exact_beyond_float_precision(self, env: StoreEnv, api: Api) -> None:
        limit = 2**60 + 1  # no double can tell 2**60 + 1 from 2**60
        counter = Counter(env.key("huge"), limit=limit)
        assert not (await api.reserve([counter], Hold(call_id(), limit + 1, 30))).ok
        big = call_id()
        assert (await api.reserve([counter], Hold(big, limit, 30))).ok
        await api.settle(big, [counter.key], limit - 2)
        assert await api.read([counter.key]) == [CounterState(limit - 2, 0)]
        assert not (await api.reserve([counter], Hold(call_id(), 3, 30))).ok
        assert (await api.reserve([counter], Hold(call_id(), 2, 30))).ok

    @pytest.mark.parametrize("full", [0, 1, 2])
    async def test_all_or_nothing_across_three_counters(self, env: StoreEnv, api: Api, full: int) -> None:
        counters = [Counter(env.key(f"c{i}", tag=i), limit=100) for i in range(3)]
        filler = call_id()
        await api.settle(filler, [counters[full].key], 95)
        result = await api.reserve(counters, Hold(call_id(), 10, 30))
        assert not result.ok and result.blocked == full and not result.duplicate
        expected = [CounterState(95 if i == full else 0, 0) for i in range(3)]
        assert list(result.states) == expected
        assert await api.read(keys_of(counters)) == expected  # no hold left anywhere

    async def test_blocked_is_the_first_counter_that_cannot_take_the_hold(self, env: StoreEnv, api: Api) -> None:
        counters = [
            Counter(env.key("roomy"), 1_000),
            Counter(env.key("tight", tag=1), 50),
            Counter(env.key("tighter"), 20),
        ]
        result = await api.reserve(counters, Hold(call_id(), 60, 30))
        assert not result.ok and result.blocked == 1
        assert len(result.states) == 3

    async def test_a_refused_call_may_try_again(self, env: StoreEnv, api: Api) -> None:
        small, large = Counter(env.key("again"), 50), Counter(env.key("again", tag=1), 1_000)
        cid = call_id()
        assert not (await api.reserve([large, small], Hold(cid, 60, 30))).ok
        retried = await api.reserve([large, Counter(small.key, 100)], Hold(cid, 60, 30))
        assert retried.ok and not retried.duplicate
        assert await api.read([large.key, small.key]) == [CounterState(0, 60), CounterState(0, 60)]

    async def test_same_key_twice_is_held_once_within_the_tighter_limit(self, env: StoreEnv, api: Api) -> None:
        # Two limits of one guard that share a scope and window share one counter.
        key = env.key("shared")
        cid = call_id()
        result = await api.reserve([Counter(key, 100), Counter(key, 1_000)], Hold(cid, 80, 30))
        assert result.ok and result.states == (CounterState(0, 80), CounterState(0, 80))
        assert await api.read([key]) == [CounterState(0, 80)]
        assert not (await api.reserve([Counter(key, 1_000), Counter(key, 100)], Hold(call_id(), 30, 30))).ok
        await api.settle(cid, [key, key], 70)
        assert await api.read([key]) == [CounterState(70, 0)]

    # -- idempotency --------------------------------------------------------------------------

    async def test_reserve_is_idempotent_per_call_id(self, env: StoreEnv, api: Api) -> None:
        counters = [Counter(env.key("idem"), 1_000), Counter(env.key("idem", tag=1), 1_000)]
        cid = call_id()
        hold = Hold(cid, 100, 30)
        first = await api.reserve(counters, hold)
        again = await api.reserve(counters, hold)  # the same attempt retried (its reply was lost)
        assert first.ok and not first.duplicate and not first.reused
        assert again.ok and again.duplicate and not again.reused
        assert await api.read(keys_of(counters)) == [CounterState(0, 100)] * 2
        await api.settle(cid, keys_of(counters), 40)
        after = await api.reserve(counters, hold)  # settled: even the same attempt admits nothing
        assert not after.ok and after.reused and after.blocked is None
        assert await api.read(keys_of(counters)) == [CounterState(40, 0)] * 2

    async def test_a_call_id_never_admits_a_second_call(self, env: StoreEnv, api: Api) -> None:
        counters = [Counter(env.key("reuse"), 1_000), Counter(env.key("reuse", tag=1), 1_000)]
        cid = call_id()
        assert (await api.reserve(counters, Hold(cid, 100, 30))).ok
        while_held = await api.reserve(counters, Hold(cid, 100, 30))  # another attempt, same id
        assert not while_held.ok and while_held.reused and not while_held.duplicate
        assert await api.read(keys_of(counters)) == [CounterState(0, 100)] * 2
        await api.settle(cid, keys_of(counters), 100)
        for _ in range(5):  # the attack: one id, many calls, one charge
            again = await api.reserve(counters, Hold(cid, 100, 30))
            assert not again.ok and again.reused
        assert await api.read(keys_of(counters)) == [CounterState(100, 0)] * 2

    async def test_release_charges_nothing_and_burns_the_call_id(self, env: StoreEnv, api: Api) -> None:
        counters = [Counter(env.key("release"), 1_000), Counter(env.key("release", tag=1), 1_000)]
        hold = Hold(call_id(), 300, 30, charge_on_expiry=300)
        assert (await api.reserve(counters, hold)).ok
        await api.release(hold.call_id, keys_of(counters), hold)
        await api.release(hold.call_id, keys_of(counters), hold)  # idempotent
        assert await api.read(keys_of(counters)) == [CounterState(0, 0)] * 2
        again = await api.reserve(counters, hold)
        assert not again.ok and again.reused

    async def test_release_of_another_attempt_changes_nothing(self, env: StoreEnv, api: Api) -> None:
        counter = Counter(env.key("notmine"), 1_000)
        owner = Hold(call_id(), 300, 30)
        assert (await api.reserve([counter], owner)).ok
        intruder = Hold(owner.call_id, 300, 30)  # same call id, another token
        await api.release(owner.call_id, [counter.key], intruder)
        assert await api.read([counter.key]) == [CounterState(0, 300)]
        await api.settle(owner.call_id, [counter.key], 200)
        await api.release(owner.call_id, [counter.key], owner)  # a settled call stays settled
        assert await api.read([counter.key]) == [CounterState(200, 0)]

    async def test_release_after_expiry_undoes_the_expiry_charge(self, env: StoreEnv, api: Api) -> None:
        counter = Counter(env.key("relexp"), 1_000)
        hold = Hold(call_id(), 300, env.lease, charge_on_expiry=250)
        assert (await api.reserve([counter], hold)).ok
        await env.sleep(env.lease + 0.2)
        assert await api.read([counter.key]) == [CounterState(250, 0)]
        await api.release(hold.call_id, [counter.key], hold)  # the call never ran
        assert await api.read([counter.key]) == [CounterState(0, 0)]

    async def test_settle_without_a_reservation_burns_the_call_id(self, env: StoreEnv, api: Api) -> None:
        key = env.key("burnt")
        cid = call_id()
        assert (await api.settle(cid, [key], 5)).applied
        assert (await api.reserve([Counter(key, 1_000)], Hold(cid, 10, 30))).reused

    async def test_settle_replaces_the_hold_with_the_actual_cost(self, env: StoreEnv, api: Api) -> None:
        counters = [Counter(env.key("settle"), 1_000), Counter(env.key("settle", tag=2), 1_000)]
        cid = call_id()
        await api.reserve(counters, Hold(cid, 500, 30))
        result = await api.settle(cid, keys_of(counters), 120)
        assert result.applied and result.charged == 120
        assert await api.read(keys_of(counters)) == [CounterState(120, 0)] * 2

    async def test_a_repeated_settle_changes_nothing(self, env: StoreEnv, api: Api) -> None:
        counters = [Counter(env.key("twice"), 1_000)]
        cid = call_id()
        await api.reserve(counters, Hold(cid, 500, 30))
        assert (await api.settle(cid, keys_of(counters), 120)).applied
        repeated = await api.settle(cid, keys_of(counters), 999)
        assert not repeated.applied
        assert await api.read(keys_of(counters)) == [CounterState(120, 0)]

    async def test_settle_without_a_reservation_still_charges(self, env: StoreEnv, api: Api) -> None:
        key = env.key("unreserved")
        assert (await api.settle(call_id(), [key], 77)).applied
        assert await api.read([key]) == [CounterState(77, 0)]

    # -- leases -------------------------------------------------------------------------------

    @pytest.mark.parametrize("charge", [0, 70])
    async def test_an_expired_lease_releases_the_hold_and_charges_charge_on_expiry(
        self, env: StoreEnv, api: Api, charge: int
    ) -> None:
        counters = [Counter(env.key("lease"), 1_000), Counter(env.key("lease", tag=1), 1_000)]
        await api.reserve(counters, Hold(call_id(), 400, env.lease, charge_on_expiry=charge))
        assert await api.read(keys_of(counters)) == [CounterState(0, 400)] * 2
        await env.sleep(env.lease + 0.2)
        assert await api.read(keys_of(counters)) == [CounterState(charge, 0)] * 2
        assert (await api.reserve(counters, Hold(call_id(), 1_000 - charge, 30))).ok

    @pytest.mark.parametrize("charge", [0, 70])
    async def test_a_late_settle_charges_the_actual_cost_once(self, env: StoreEnv, api: Api, charge: int) -> None:
        counters = [Counter(env.key("late"), 1_000)]
        cid = call_id()
        await api.reserve(counters, Hold(cid, 400, env.lease, charge_on_expiry=charge))
        await env.sleep(env.lease + 0.2)
        assert await api.read(keys_of(counters)) == [CounterState(charge, 0)]
        assert (await api.settle(cid, keys_of(counters), 120)).applied
        assert await api.read(keys_of(counters)) == [CounterState(120, 0)]
        assert not (await api.settle(cid, keys_of(counters), 120)).applied
        assert await api.read(keys_of(counters)) == [CounterState(120, 0)]

    async def test_a_late_settle_replaces_expiry_even_before_the_store_noticed(self, env: StoreEnv, api: Api) -> None:
        counters = [Counter(env.key("unnoticed"), 1_000)]
        cid = call_id()
        await api.reserve(counters, Hold(cid, 400, env.lease, charge_on_expiry=70))
        await env.sleep(env.lease + 0.2)  # nothing touched the counter since it expired
        assert (await api.settle(cid, keys_of(counters), 120)).applied
        assert await api.read(keys_of(counters)) == [CounterState(120, 0)]

    async def test_expire_then_reset_then_late_settle_is_exact(self, env: StoreEnv, api: Api) -> None:
        counters = [Counter(env.key("reset"), 1_000), Counter(env.key("reset", tag=1), 1_000)]
        cid = call_id()
        await api.reserve(counters, Hold(cid, 900, env.lease, charge_on_expiry=897))
        await env.sleep(env.lease + 0.2)
        assert await api.read(keys_of(counters)) == [CounterState(897, 0)] * 2
        await api.reset(counters[0].key)  # an operator resets one of the two counters
        assert await api.read(keys_of(counters)) == [CounterState(0, 0), CounterState(897, 0)]
        assert (await api.settle(cid, keys_of(counters), 120)).applied
        # Reset counter: the late settle's amount, never negative; the other: expiry replaced.
        assert await api.read(keys_of(counters)) == [CounterState(120, 0)] * 2

    async def test_reset_while_held_then_expiry_then_late_settle(self, env: StoreEnv, api: Api) -> None:
        counter = Counter(env.key("resetheld"), 1_000)
        cid = call_id()
        await api.settle(call_id(), [counter.key], 300)
        await api.reserve([counter], Hold(cid, 500, env.lease, charge_on_expiry=400))
        await api.reset(counter.key)  # the hold stays; expiry later charges the fresh counter
        assert await api.read([counter.key]) == [CounterState(0, 500)]
        await env.sleep(env.lease + 0.2)
        assert await api.read([counter.key]) == [CounterState(400, 0)]
        assert (await api.settle(cid, [counter.key], 50)).applied
        assert await api.read([counter.key]) == [CounterState(50, 0)]

    async def test_a_late_settle_corrects_only_counters_expiry_charged(self, env: StoreEnv, api: Api) -> None:
        held, other = Counter(env.key("corr"), 1_000), Counter(env.key("corr", tag=1), 1_000)
        cid = call_id()
        await api.reserve([held], Hold(cid, 400, env.lease, charge_on_expiry=300))
        await env.sleep(env.lease + 0.2)
        assert (await api.settle(cid, [held.key, other.key], 20)).applied  # 'other' was never held
        assert await api.read([held.key, other.key]) == [CounterState(20, 0), CounterState(20, 0)]

    async def test_renew_extends_the_lease(self, env: StoreEnv, api: Api) -> None:
        counters = [Counter(env.key("renew"), 1_000), Counter(env.key("renew", tag=1), 1_000)]
        cid = call_id()
        await api.reserve(counters, Hold(cid, 400, env.lease, charge_on_expiry=400))
        await env.sleep(env.lease / 2)
        assert await api.renew(cid, keys_of(counters), env.lease + 1.0)
        await env.sleep(env.lease)  # past the first deadline, well before the renewed one
        assert await api.read(keys_of(counters)) == [CounterState(0, 400)] * 2
        assert (await api.settle(cid, keys_of(counters), 10)).applied
        assert await api.read(keys_of(counters)) == [CounterState(10, 0)] * 2

    async def test_renew_of_a_call_without_live_hold_is_false(self, env: StoreEnv, api: Api) -> None:
        counters = [Counter(env.key("norenew"), 1_000)]
        assert not await api.renew(call_id(), keys_of(counters), 30)
        cid = call_id()
        await api.reserve(counters, Hold(cid, 10, 30))
        await api.settle(cid, keys_of(counters), 10)
        assert not await api.renew(cid, keys_of(counters), 30)

    async def test_read_of_unknown_keys_is_zeros(self, env: StoreEnv, api: Api) -> None:
        keys = [env.key("never"), env.key("never", tag=1), env.key("never")]
        assert await api.read(keys) == [CounterState(0, 0)] * 3

    # -- bounds: hostile values are refused before anything is written ---------------------------

    @pytest.mark.parametrize(
        "field, value",
        [
            ("amount", 2**64 - 1),
            ("amount", -1),
            ("amount", 1.5),
            ("amount", True),
            ("amount", "10"),
            ("charge_on_expiry", 2**63),
            ("limit", 10**19),
            ("limit", -5),
            ("lease_seconds", 1e20),
            ("lease_seconds", float("inf")),
            ("lease_seconds", float("nan")),
            ("lease_seconds", 0),
            ("lease_seconds", "10"),
            ("call_id", "\ud800"),
            ("call_id", ""),
            ("call_id", "a\tb"),
            ("expires_at", float("inf")),
            ("expires_at", 10**30),
        ],
    )
    async def test_out_of_bounds_reserve_is_refused_before_any_write(
        self, env: StoreEnv, api: Api, field: str, value: Any
    ) -> None:
        key, other = env.key("bounds"), env.key("bounds", tag=1)
        hold = {"call_id": call_id(), "amount": 10, "lease_seconds": 30, "charge_on_expiry": 0}
        spec = {"limit": 1_000, "expires_at": None}
        (hold if field in hold else spec)[field] = value
        counters = [Counter(other, 1_000), Counter(key, **spec)]
        with pytest.raises(ValueError, match=field if field != "call_id" else "call_id"):
            await api.reserve(counters, Hold(**hold))
        assert await api.read([other, key]) == [CounterState(0, 0)] * 2

    @pytest.mark.parametrize("value", [-1, 1.0, None, "5", float("nan")])
    async def test_invalid_settle_amount_is_refused_and_the_hold_stays(self, env: StoreEnv, api: Api, value: Any) -> None:
        counter = Counter(env.key("badsettle"), 1_000)
        cid = call_id()
        await api.reserve([counter], Hold(cid, 100, 30, charge_on_expiry=100))
        with pytest.raises(ValueError, match="settle amount"):
            await api.settle(cid, [counter.key], value)
        assert await api.read([counter.key]) == [CounterState(0, 100)]  # expiry will charge it

    async def test_a_settle_above_the_maximum_fills_the_counter(self, env: StoreEnv, api: Api) -> None:
        counter = Counter(env.key("huge_settle"), MAX_NANO)
        cid = call_id()
        await api.reserve([counter], Hold(cid, 100, 30))
        result = await api.settle(cid, [counter.key], 2**64 - 1)  # e.g. total_tokens = 2**64 - 1
        assert result.applied and result.capped and result.charged == MAX_NANO
        assert await api.read([counter.key]) == [CounterState(MAX_NANO, 0)]
        assert (await api.settle(call_id(), [counter.key], MAX_NANO)).applied  # saturates, never overflows
        assert await api.read([counter.key]) == [CounterState(MAX_NANO, 0)]
        refused = await api.reserve([counter], Hold(call_id(), 1, 30))
        assert not refused.ok and refused.blocked == 0

    async def test_renew_with_a_bad_lease_is_refused(self, env: StoreEnv, api: Api) -> None:
        counter = Counter(env.key("badrenew"), 1_000)
        cid = call_id()
        await api.reserve([counter], Hold(cid, 100, 30))
        for bad in (1e20, float("inf"), -1, 0):
            with pytest.raises(ValueError, match="lease_seconds"):
                await api.renew(cid, [counter.key], bad)

    # -- retention ------------------------------------------------------------------------------

    async def test_counter_expiry_follows_expires_at(self, env: StoreEnv, api: Api) -> None:
        soon, later = int(time.time()) + 3_600, int(time.time()) + 7_200
        key, total = env.key("expiring"), env.key("total")
        await api.reserve([Counter(key, 1_000, soon), Counter(total, 1_000)], Hold(call_id(), 1, 30))
        assert env.expiry_of(key) == pytest.approx(soon, abs=1)
        assert env.expiry_of(total) is None
        await api.reserve([Counter(key, 1_000, later)], Hold(call_id(), 1, 30))
        assert env.expiry_of(key) == pytest.approx(later, abs=1)
        await api.reserve([Counter(key, 1_000, soon)], Hold(call_id(), 1, 30))  # never shortened
        assert env.expiry_of(key) == pytest.approx(later, abs=1)

    # -- concurrency --------------------------------------------------------------------------

    async def test_threads_never_overspend(self, env: StoreEnv) -> None:
        store, limit = env.store, 5_000
        counters = [Counter(env.key("threads"), limit), Counter(env.key("threads", tag=1), limit * 2)]
        keys = keys_of(counters)
        admitted: list[int] = []
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(50):
                    cid, amount = call_id(), rng.randint(1, 40)
                    if store.reserve(counters, Hold(cid, amount, 30)).ok:
                        store.settle(cid, keys, amount)
                        admitted.append(amount)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        spent = sum(admitted)
        assert store.read(keys) == [CounterState(spent, 0)] * 2
        assert limit - self.fill_margin < spent <= limit  # filled up to the limit, never past it

    async def test_gather_never_overspends(self, env: StoreEnv) -> None:
        store, limit = env.store, 1_000
        counters = [Counter(env.key("gather"), limit), Counter(env.key("gather", tag=2), limit)]
        keys = keys_of(counters)

        async def one(amount: int) -> int:
            cid = call_id()
            if not (await store.areserve(counters, Hold(cid, amount, 30))).ok:
                return 0
            await store.asettle(cid, keys, amount)
            return amount

        charged = await asyncio.gather(*(one(random.randint(1, 30)) for _ in range(150)))
        assert sum(charged) <= limit
        assert await store.aread(keys) == [CounterState(sum(charged), 0)] * 2
        assert sum(charged) > limit - self.fill_margin  # it did fill up: the limit, not an error, stopped it

    # -- the ledger and the spend index (stores.ledger) -------------------------------------------

    async def test_ledger_has_one_row_per_applied_settle_with_the_amount_charged(self, env: StoreEnv, api: Api) -> None:
        from langchain_budgetguard.stores.ledger import LedgerRow

        name = "lg" + call_id()[:8]
        keys = [f"{{{env.tags[0]}}}:{name}:user:alice:day:2026-12-01", f"{{{env.tags[1]}}}:{name}:global:-:day:2026-12-01"]
        cid = call_id()
        assert (await api.reserve([Counter(k, 10**6) for k in keys], Hold(cid, 500, 30))).ok
        row = LedgerRow(budget=name, call_id=cid, keys=tuple(keys), scopes={"user": "alice", "global": "-"},
                        model="m", tokens={"input": 3}, reserved_nano=500, cost_nano=123456)  # the store sets the cost
        assert (await api.settle_row(cid, keys, 321, row)).applied
        assert not (await api.settle_row(cid, keys, 999, row)).applied  # a retry: no row, no charge
        (written,) = await api.read_ledger(name)
        assert written.cost_nano == 321 and written.at is not None and written.tokens == {"input": 3}
        assert [s.spent for s in await api.read(keys)] == [321, 321]
        assert await api.read_ledger(name, scope="user", scope_id="bob") == []
        assert await api.read_ledger("another-budget") == []

    async def test_spend_index_ranks_the_ids_of_a_scope_and_window_across_tags(self, env: StoreEnv, api: Api) -> None:
        name = "ix" + call_id()[:8]
        spent = {"a": 30, "b": 10, "c": 20}
        for i, (who, nano) in enumerate(spent.items()):
            key = f"{{{env.tags[i % 3]}}}:{name}:user:{who}:day:2026-12-01"
            cid = call_id()
            assert (await api.reserve([Counter(key, 10**6)], Hold(cid, nano, 30))).ok
            await api.settle(cid, [key], nano)
        other = f"{{{env.tags[0]}}}:{name}:user:z:day:2026-12-02"  # another window: another index
        assert (await api.reserve([Counter(other, 10**6)], Hold(call_id(), 5, 30))).ok
        ranked = await api.read_index(f"{name}:user:day:2026-12-01")
        assert [(k.split(":")[3], n) for k, n in ranked] == [("a", 30), ("c", 20), ("b", 10)]
        assert [k.split(":")[3] for k, _ in await api.read_index(f"{name}:user:day:2026-12-01", 1)] == ["a"]
        assert [k for k, _ in await api.read_index(f"{name}:user:day:2026-12-02")] == [other]
        assert await api.read_index(f"{name}:user:day:2026-11-30") == []
