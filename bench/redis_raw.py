"""The floor: the store's own reserve and settle scripts, sent as bare EVALSHA with redis-py.

``RawScripts`` asks ``RedisStore`` for the exact script call (keys and arguments) that a reservation
and a settle of one call make, once, and then replays them with fresh call ids: same scripts, same
key layout, same server, no guard and no store logic around them. That is the least a guard built
on these scripts can spend per call: one round trip to reserve and one to settle.

``around(client, work)`` puts the model call between the two, as a guard does: round trips that
follow a stretch of CPU work take longer than back-to-back ones (the server and the socket have
gone idle), so that is the floor a guarded call is compared with.
"""

from __future__ import annotations

import itertools
import secrets
import sys
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from langchain_budgetguard.stores.base import Counter, Hold
from langchain_budgetguard.stores.redis import RedisStore, _lua_sources

_PLACEHOLDER = "BENCHCALLID0"
TRIVIAL_SCRIPT = "return 1"


def _first(plan: Any, script: str) -> Any:
    """The first call of ``script`` that a store plan makes (past its tag registration)."""
    call = next(plan)
    while call.script != script:
        call = plan.send(1)  # the registration's reply (a count): the plan goes on
    plan.close()
    return call


class RawScripts:
    """Replays one reserve + settle of ``counters`` through ``client.evalsha`` with new call ids."""

    def __init__(self, client: Any, store: RedisStore, counters: Sequence[Counter], amount: int, charge: int,
                 settle_amount: int, lease_seconds: float = 600.0) -> None:
        # The scripts of the store's own package (bench.ab loads two versions side by side).
        sources = getattr(sys.modules.get(type(store).__module__), "_lua_sources", _lua_sources)()
        self.sources = {"reserve": sources["reserve"], "settle": sources["settle"], "trivial": TRIVIAL_SCRIPT}
        self.load(client)
        hold = Hold(_PLACEHOLDER, amount, lease_seconds, charge)
        reserve = _first(store._reserve_plan(list(counters), hold), "reserve")
        settle = _first(store._settle_plan(_PLACEHOLDER, [c.key for c in counters], settle_amount), "settle")
        self.reserve_keys, self.reserve_args = reserve.keys, reserve.args
        self.settle_keys, self.settle_args = settle.keys, settle.args
        self._sync_for_reload = client
        self._ids = itertools.count()
        self._base = secrets.token_hex(6)

    def load(self, client: Any) -> None:
        """(Re)load the scripts: someone may run SCRIPT FLUSH on a shared server."""
        self.reserve_sha = client.script_load(self.sources["reserve"])
        self.settle_sha = client.script_load(self.sources["settle"])
        self.trivial_sha = client.script_load(self.sources["trivial"])

    @staticmethod
    def _with_id(values: Sequence[str], call_id: str) -> list[str]:
        return [v.replace(_PLACEHOLDER, call_id) if _PLACEHOLDER in v else v for v in values]

    def next_call(self) -> tuple[list[str], list[str], list[str], list[str]]:
        call_id = f"{self._base}{next(self._ids):x}"
        return (self._with_id(self.reserve_keys, call_id), self._with_id(self.reserve_args, call_id),
                self._with_id(self.settle_keys, call_id), self._with_id(self.settle_args, call_id))

    def pair(self, client: Any) -> None:
        """One reserve EVALSHA and one settle EVALSHA (two round trips), back to back."""
        self.around(client, None)

    def around(self, client: Any, work: Any) -> Any:
        """Reserve EVALSHA, ``work()``, settle EVALSHA: a guard that does nothing but its two round trips."""
        rk, ra, sk, sa = self.next_call()
        try:
            client.evalsha(self.reserve_sha, len(rk), *rk, *ra)
            result = work() if work is not None else None
            client.evalsha(self.settle_sha, len(sk), *sk, *sa)
            return result
        except NoScriptError:
            self.load(client)

    async def apair(self, client: Any) -> None:
        await self.aaround(client, None)

    async def aaround(self, client: Any, work: Any) -> Any:
        rk, ra, sk, sa = self.next_call()
        try:
            await client.evalsha(self.reserve_sha, len(rk), *rk, *ra)
            result = (await work()) if work is not None else None
            await client.evalsha(self.settle_sha, len(sk), *sk, *sa)
            return result
        except NoScriptError:
            self.load(self._sync_for_reload)

    def trivial(self, client: Any) -> None:
        """One EVALSHA of ``return 1``: a bare round trip."""
        try:
            client.evalsha(self.trivial_sha, 0)
        except NoScriptError:
            self.load(client)

    async def atrivial(self, client: Any) -> None:
        try:
            await client.evalsha(self.trivial_sha, 0)
        except NoScriptError:
            self.load(self._sync_for_reload)
