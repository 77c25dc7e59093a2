"""The guard on a real Redis: many processes on one budget, crashed processes, retried settles,
an outage under each store-error policy, hostile ids, and async calls.

Every test goes through ``BudgetGuard`` and checks what Redis holds afterwards. Tests that use
the server at REDIS_URL skip without it (and fail in CI); the outage tests start their own
redis-server on a free port. One call reserves and costs exactly $0.09 (``guard_worker.PRICES``
with an exact estimator), of which $0.04 is input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter as Counter_
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from langchain_budgetguard import BudgetExceededError, BudgetGuard, IdentityError, Limit
from langchain_budgetguard.errors import BudgetStoreUnavailableError
from langchain_budgetguard.limits import escape_id
from langchain_budgetguard.money import usd_to_nano
from langchain_budgetguard.overrides import BudgetAdmin
from langchain_budgetguard.stores.base import Counter, Hold
from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

from .fakes import ExactEstimator
from .guard_worker import CALL_COST, INPUT_COST, PRICES, big, guard_for
from .redis_support import RedisServer, admin, delete_prefix, fresh_prefix, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent
FAST_FAIL = RetryPolicy(attempts=2, deadline_seconds=0.3, first_wait=0.01, max_wait=0.05)


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def totals(statuses: list[Any]) -> tuple[Decimal, Decimal]:
    return sum((s.spent for s in statuses), Decimal(0)), sum((s.held for s in statuses), Decimal(0))



@pytest.fixture
def url_budget(redis_url: str, admin: redis.Redis) -> Iterator[str]:  # noqa: F811
    """A budget name no other test uses, for guards built from the bare URL (default ``bg:``
    prefix); its keys are deleted afterwards."""
    name = unique("bgtest")
    yield name
    delete_prefix(admin, f"bg:*{name}*")


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:  # noqa: F811
    """A RedisStore under a fresh prefix (the session deletes its keys)."""
    s = RedisStore(redis_url, prefix=fresh_prefix())
    yield s
    s.close()


# -- worker processes ------------------------------------------------------------------------


class Worker:
    """``python -m tests.guard_worker <spec>``; its stdout lines are read by a thread into a queue."""

    def __init__(self, spec: dict[str, Any], log_dir: Path) -> None:
        self.log = log_dir / f"worker-{uuid.uuid4().hex[:8]}.log"
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.guard_worker", json.dumps(spec)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")

    def message(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker {self.process.pid} said nothing in {timeout}s; {self.stderr()}") from None
        if not line:
            self.process.wait(timeout=5)
            raise AssertionError(f"worker {self.process.pid} exited ({self.process.returncode}); {self.stderr()}")
        return json.loads(line)

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stderr(self) -> str:
        return "stderr: " + self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


@contextlib.contextmanager
def workers(spec: dict[str, Any], count: int, log_dir: Path) -> Iterator[list[Worker]]:
    started = [Worker(spec, log_dir) for _ in range(count)]
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


def overlapping(spans_by_worker: list[list[list[float]]]) -> bool:
    """Did two served calls of different workers run at the same time?"""
    spans = [(t0, t1, i) for i, spans in enumerate(spans_by_worker) for t0, t1 in spans]
    return any(a0 < b1 and b0 < a1 and i != j for a0, a1, i in spans for b0, b1, j in spans)


# -- 1. many processes, one budget ------------------------------------------------------------


def test_eight_processes_never_overspend_one_budget(
    redis_url: str, url_budget: str, tmp_path: Path  # noqa: F811
) -> None:
    spec = {"mode": "spend", "url": redis_url, "name": url_budget, "limit": "1", "calls": 40, "delay": 0.05}
    with workers(spec, 8, tmp_path) as procs:
        for worker in procs:
            assert worker.message() == {"ready": True}
        for worker in procs:  # every guard is built and connected: start them together
            worker.send("go")
        reports = [worker.message(timeout=30) for worker in procs]

    assert [r["errors"] for r in reports] == [[]] * 8
    assert all(r["served"] + r["refused"] == 40 for r in reports)
    served = sum(r["served"] for r in reports)
    assert overlapping([r["spans"] for r in reports]), "the workers' calls never overlapped"

    fresh = guard_for({**spec, "limit": 1})  # a fresh guard in this process
    (status,) = fresh.status()
    fresh.policy.store.close()
    assert status.held == 0
    assert status.spent == served * CALL_COST, "Redis shows a different spend than the calls served"
    assert status.spent <= Decimal(1), f"overspent: {status.spent}"
    assert Decimal(1) - status.spent < CALL_COST, "refused calls while another still fit"
    assert served == 11  # $0.99: a twelfth call would make $1.08


# -- 2. a process killed while it holds a reservation -------------------------------------------


@pytest.mark.parametrize(("policy", "charged"), [("release", Decimal(0)), ("charge_input", INPUT_COST)])
def test_killed_process_hold_ends_with_its_lease_by_policy(
    redis_url: str, url_budget: str, admin: redis.Redis, tmp_path: Path, policy: str, charged: Decimal  # noqa: F811
) -> None:
    lease = 2.0
    spec = {"mode": "hold", "url": redis_url, "name": url_budget, "limit": "1", "lease_seconds": lease,
            "expired_hold": policy}
    watcher = guard_for(spec)  # the same budget, seen from this process

    def server_ms() -> int:
        seconds, micros = admin.time()
        return seconds * 1000 + micros // 1000

    with workers(spec, 1, tmp_path) as (worker,):
        assert worker.message() == {"ready": True}
        # Poll until the hold shows; between two reads of server TIME around them, the last read
        # without the hold and the first with it bracket the moment the worker reserved.
        deadline = time.monotonic() + 20
        reserved_after = server_ms()
        while True:
            before = server_ms()
            held = watcher.status()[0].held
            reserved_before = server_ms()
            if held:
                break
            reserved_after = before
            assert worker.process.poll() is None, worker.stderr()
            assert time.monotonic() < deadline, "the worker never reserved"
            time.sleep(0.02)
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=10)
        assert worker.process.returncode == -signal.SIGKILL

        # The lease deadline, in server time, as the store wrote it for the dead call.
        (status,) = watcher.status()
        leases = watcher.policy.store.redis_keys(status.key)[1]
        ((_, lease_end),) = admin.zrange(leases, 0, -1, withscores=True)
        killed_at = server_ms()
        assert reserved_after - 1 <= lease_end - lease * 1000 <= reserved_before + 1, "the lease is not lease_seconds"
        assert killed_at < lease_end
        assert (status.spent, status.held) == (0, CALL_COST), "the hold must outlive its process until its lease"
        while watcher.status()[0].held != 0:
            assert time.monotonic() < deadline + lease + 5, "the dead process's hold never expired"
            time.sleep(0.05)
        assert server_ms() >= lease_end, "the hold went before its lease ended"

    (status,) = watcher.status()
    assert (status.spent, status.held) == (charged, 0)
    # No lease is left; what expiry charged is remembered (for a late settle) for the retry window only.
    window_ms = watcher.policy.store.retry_window_seconds * 1000
    for member, until in admin.zrange(leases, 0, -1, withscores=True):
        assert member.startswith("\t") and until <= server_ms() + window_ms
    assert watcher.status()[0].spent == charged  # reaped once: later reads change nothing
    watcher.policy.store.close()


# -- 3. retried reserve and duplicate settle ---------------------------------------------------


def test_store_retried_reserve_and_duplicate_settle_count_once(store: RedisStore, admin: redis.Redis) -> None:
    tag = unique("t")
    counters = [Counter("{" + tag + "}:user:alice", 1_000), Counter("{" + tag + "}:project:web", 1_000),
                Counter("{" + unique("platform") + "}:all", 1_000)]
    keys = [c.key for c in counters]
    hashes = [store.redis_keys(k)[0] for k in keys]
    hold = Hold("call-1", 100, 30, 40)

    assert store.reserve(counters, hold).ok
    again = store.reserve(counters, hold)  # a retry of the same call
    assert again.ok and again.duplicate
    for h in hashes:
        assert admin.hgetall(h) == {"h": "100", "@call-1": "100:40"}

    assert store.settle("call-1", keys, 70).applied
    assert not store.settle("call-1", keys, 70).applied
    assert not store.settle("call-1", keys, 999).applied  # a different amount changes nothing either
    late = store.reserve(counters, hold)  # a reserve retried after the settle places nothing
    assert not late.ok and late.reused  # and admits nothing: a settled call id is spent
    for h in hashes:
        assert admin.hgetall(h) == {"s": "70", "h": "0"}
    assert [(s.spent, s.held) for s in store.read(keys)] == [(70, 0)] * 3


class LostReplies:
    """Run a store script for real, then lose its reply once (a ConnectionError), so that the
    store's RetryPolicy runs it again with the same call_id, as a client retry after a timeout does."""

    def __init__(self, store: RedisStore, script: str) -> None:
        self.scripts = store._sync_backend().scripts  # test-only reach: the registered Lua scripts
        self.name, self.real = script, self.scripts[script]
        self.runs = 0
        self.scripts[script] = self

    def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        self.runs += 1
        reply = self.real(keys=keys, args=args)
        if self.runs == 1:
            raise redis.exceptions.ConnectionError(f"reply of {self.name} lost")
        return reply


@pytest.mark.parametrize("script", ["reserve", "settle"])
def test_guard_call_whose_reply_was_lost_is_counted_once(store: RedisStore, admin: redis.Redis, script: str) -> None:
    llm = big()
    guard = BudgetGuard(llm, limit=1, store=store, name=unique("retry"), prices=PRICES, estimator=ExactEstimator(1000))
    lost = LostReplies(store, script)
    reply = guard.invoke("hi")
    assert lost.runs == 2, f"{script} was not retried"
    assert llm.calls == 1 and reply.response_metadata["budgetguard"]["cost_usd"] == CALL_COST
    (status,) = guard.status()
    assert (status.spent, status.held) == (CALL_COST, 0)
    assert admin.hgetall(store.redis_keys(status.key)[0]) == {"s": str(usd_to_nano(CALL_COST)), "h": "0"}
    guard.invoke("hi")  # the next call is counted normally
    assert guard.status()[0].spent == 2 * CALL_COST


# -- 4. Redis stopped mid-run ------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of our own on a free port; its append-only file survives a stop/start."""
    s = RedisServer(tmp_path, None, "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        yield s
    finally:
        s.stop()


def outage_guard(server: RedisServer, llm: Any, **options: Any) -> tuple[BudgetGuard, RedisStore]:
    store = RedisStore(server.url, prefix=fresh_prefix(), retry=FAST_FAIL)
    guard = BudgetGuard(llm, limit=1, store=store, name=unique("outage"), prices=PRICES,
                        estimator=ExactEstimator(1000), **options)
    return guard, store


async def test_fail_closed_refuses_while_redis_is_down_and_names_the_store(server: RedisServer) -> None:
    llm = big()
    guard, store = outage_guard(server, llm, on_store_error="fail_closed")
    guard.invoke("hi")
    server.stop()
    with pytest.raises(BudgetStoreUnavailableError) as info:
        guard.invoke("hi")
    message = str(info.value)
    assert f"127.0.0.1:{server.port}" in message and "reserve failed" in message
    with pytest.raises(BudgetStoreUnavailableError, match=f"127.0.0.1:{server.port}"):
        await guard.ainvoke("hi")
    assert llm.calls == 1, "a refused call must not reach the model"

    server.start()
    await guard.ainvoke("hi")
    (status,) = guard.status()
    assert (status.spent, status.held) == (2 * CALL_COST, 0)
    await store.aclose()


def test_fail_open_serves_journals_and_replays_exactly_once(server: RedisServer) -> None:
    llm = big()
    guard, store = outage_guard(server, llm, on_store_error="fail_open")
    guard.invoke("hi")  # Redis up: $0.09

    # Redis stops while a call is in flight: it reserved, its settle is journaled.
    outcome: list[Any] = []
    llm.delay = 1.0
    in_flight = threading.Thread(target=lambda: outcome.append(guard.invoke("hi")))
    in_flight.start()
    deadline = time.monotonic() + 10
    while guard.status()[0].held == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.stop()
    in_flight.join(timeout=10)
    llm.delay = 0.0
    assert len(outcome) == 1 and outcome[0].response_metadata["budgetguard"]["cost_usd"] == CALL_COST
    assert llm.calls == 2 and len(store.pending_journal) == 1

    # While Redis is down a call is served (fail_open), and its settle is journaled too.
    reply = guard.invoke("hi")
    assert llm.calls == 3 and reply.response_metadata["budgetguard"]["cost_usd"] == CALL_COST
    journal = store.pending_journal
    assert [p.amount for p in journal] == [usd_to_nano(CALL_COST)] * 2
    with pytest.raises(BudgetStoreUnavailableError):
        guard.status()

    server.start()
    assert store.flush_journal() == 2
    assert store.flush_journal() == 0
    (status,) = guard.status()
    assert (status.spent, status.held) == (3 * CALL_COST, 0)
    for entry in journal:  # replaying what already landed changes nothing
        assert not store.settle(entry.call_id, entry.keys, entry.amount).applied
    assert guard.status()[0].spent == 3 * CALL_COST
    store.close()


def test_fail_open_allowance_bounds_what_a_process_serves_while_redis_is_down(server: RedisServer) -> None:
    llm = big()
    guard, store = outage_guard(server, llm, on_store_error="fail_open", fail_open_allowance="0.2")
    server.stop()
    guard.invoke("hi")
    guard.invoke("hi")  # $0.18 of the $0.20 allowance
    with pytest.raises(BudgetStoreUnavailableError, match="allowance"):
        guard.invoke("hi")
    assert llm.calls == 2
    server.start()
    assert store.flush_journal() == 2
    assert guard.status()[0].spent == 2 * CALL_COST
    store.close()


# -- 6. hostile ids ----------------------------------------------------------------------------

HOSTILE_IDS = [
    "alice",
    "{",
    "}",
    "{acme}",
    "}{",
    "a:b",
    "a%3Ab",
    "%7B",
    "*",
    "a*",
    "?[]",
    "line\nbreak",
    "\n",
    "ünïcødé",
    "日本",
    "😀",
    "acme}:user:{alice",
    "x" * 10_240,
    "x" * 10_239 + "y",
    "é" * 10_240,
    "~" + __import__("hashlib").sha256(("x" * 10_240).encode()).hexdigest(),  # the hashed form of an id
]


@pytest.mark.parametrize("scope", ["user", "tenant"])
def test_hostile_ids_each_get_their_own_budget(store: RedisStore, admin: redis.Redis, scope: str) -> None:
    llm = big()
    guard = BudgetGuard(llm, limits=[Limit(usd=100, per=scope, window="day")], store=store, name=unique("ids"),
                        prices=PRICES, estimator=ExactEstimator(1000))
    field = f"{scope}_id"
    for count, who in enumerate(HOSTILE_IDS, start=1):  # a different number of calls for each id
        for _ in range(count):
            guard.invoke("hi", config={"configurable": {field: who}})
    for count, who in enumerate(HOSTILE_IDS, start=1):
        (status,) = guard.status(**{field: who})
        assert status.scope_id == who
        assert (status.spent, status.held) == (count * CALL_COST, 0), f"{who[:40]!r} shares a counter"

    keys = [k for k in admin.scan_iter(match=store.prefix + "*", count=1000) if k != store.tags_key]
    others = tuple(store.prefix + p for p in ("l:", "c:", "x:", "ledger:"))
    counters = [k for k in keys if not k.startswith(others)]
    assert len(counters) == len(HOSTILE_IDS)
    # The spend index and the ledger name every hostile id as itself, each once per call.
    admin_api = BudgetAdmin(guard.policy)
    # (an id too long for a key is shown in its hashed form, as ``status`` shows it)
    shown = [escape_id(w) if escape_id(w).startswith("~") else w for w in HOSTILE_IDS]
    assert sorted(s.scope_id for s in admin_api.statuses(scope)) == sorted(shown)
    rows = admin_api.read_ledger(limit=10_000)
    calls_of: Counter_[str] = Counter_()
    for n, who in enumerate(shown, start=1):
        calls_of[who] += n  # the hashed form of an id and that same text as an id look alike; their keys differ
    assert Counter_([r.scopes[scope] for r in rows]) == calls_of
    assert len({r.keys for r in rows}) == len(HOSTILE_IDS)
    assert sum(r.cost_nano for r in rows) == usd_to_nano(CALL_COST) * sum(range(1, len(HOSTILE_IDS) + 1))
    for key in keys:  # one hash tag per key, nothing an id could forge
        assert key.count("{") == 1 and key.count("}") == 1 and "\n" not in key and len(key) < 300, key


@pytest.mark.parametrize("bad", ["", None, 42, b"alice", ["alice"], {"id": "alice"}])
def test_empty_or_non_string_ids_are_identity_errors(store: RedisStore, admin: redis.Redis, bad: Any) -> None:
    llm = big()
    guard = BudgetGuard(llm, limits=[Limit(usd=1, per="user"), Limit(usd=5, per="tenant")], store=store,
                        name=unique("ids"), prices=PRICES, estimator=ExactEstimator(1000))
    for config in ({"configurable": {"user_id": bad, "tenant_id": "acme"}},
                   {"metadata": {"user_id": "alice", "tenant_id": bad}}):
        with pytest.raises(IdentityError):
            guard.invoke("hi", config=config)
    with pytest.raises(IdentityError):
        guard.status(user_id=bad, tenant_id="acme")
    assert llm.calls == 0
    assert list(admin.scan_iter(match=store.prefix + "*")) == []


# -- 7. async ----------------------------------------------------------------------------------


async def test_gather_of_twenty_ainvoke_never_overspends(redis_url: str) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix())
    llm = big(delay=0.05)
    guard = BudgetGuard(llm, limit=1, store=store, name=unique("gather"), prices=PRICES,
                        estimator=ExactEstimator(1000))
    results = await asyncio.gather(*(guard.ainvoke("hi") for _ in range(20)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, BudgetExceededError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(served) + len(refused) == 20, [r for r in results if isinstance(r, BaseException)]
    assert len(served) == 11 and llm.calls == 11
    (status,) = await guard.astatus()
    assert status.spent == 11 * CALL_COST <= 1 and status.held == 0
    await store.aclose()
    # A fresh store sees the same.
    other = RedisStore(redis_url, prefix=store.prefix)
    assert [(s.spent, s.held) for s in other.read([status.key])] == [(usd_to_nano(11 * CALL_COST), 0)]
    other.close()


async def test_astream_charges_exactly_and_holds_nothing(redis_url: str) -> None:  # noqa: F811
    store = RedisStore(redis_url, prefix=fresh_prefix())
    guard = BudgetGuard(big(), limit=1, store=store, name=unique("astream"), prices=PRICES,
                        estimator=ExactEstimator(1000))
    chunks = [chunk async for chunk in guard.astream("hi")]
    assert chunks[-1].response_metadata["budgetguard"]["cost_usd"] == CALL_COST
    assert "".join(c.content for c in chunks) == big().reply
    (status,) = await guard.astatus()
    assert (status.spent, status.held) == (CALL_COST, 0)

    # An abandoned stream is charged its input and the output so far ("Hello!": one token).
    async with contextlib.aclosing(guard.astream("hi")) as stream:
        async for _chunk in stream:
            assert (await guard.astatus())[0].held == CALL_COST
            break
    (status,) = await guard.astatus()
    assert (status.spent, status.held) == (CALL_COST + INPUT_COST + Decimal("0.00005"), 0)
    await store.aclose()
