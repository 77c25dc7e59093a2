"""Lease renewal in the background: a call in flight keeps its hold for as long as it runs.

A hold carries a lease (``lease_seconds``) so that the hold of a crashed process ends on
its own. A live call must therefore renew its lease before it runs out, however long the
model takes (a long invoke, a stream whose first chunk is late, an agent step). Wrap the
model call::

    keeper = shared_keeper()
    with keeper.hold(store, call_id, keys, lease_seconds):
        reply = model.invoke(...)              # renewed every lease_seconds / 3 while it runs

    async with keeper.ahold(store, call_id, keys, lease_seconds):
        reply = await model.ainvoke(...)

Sync holds are renewed by ONE daemon thread per process (not a thread per call) through
``store.renew``; async holds by a timer on their own event loop through ``store.arenew``
(a task only while renewals are due, not one per call). Each renews a call at a third of
its lease: ``lease_seconds / 3`` after the hold begins, then every ``lease_seconds / 3``
after each renewal; a failed renewal is retried after ``lease_seconds / 6``, so a lease gets
several attempts before it can run out. A renewal that fails (the store is down, any store
error) is logged and never reaches the call; a renewal that finds no live hold (settled, or
already expired and charged by policy) stops renewing that call.

Cost: a call shorter than its first renewal costs one registration and one removal
(a lock and an insertion-ordered dict, O(1); about 1-2 µs together) and never wakes the
thread: the thread sleeps until the earliest renewal is due (with nothing to renew, for one
renewal interval, then until woken) and is only woken when a new hold is due before that. Calls of one lease length are due in the order they began, so
each lease length is a FIFO queue and the earliest due renewal is the head of one of them.

The keeper is fork-safe: a forked child starts with no holds, a fresh lock, and starts its
own thread when it needs one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["LeaseKeeper", "LeaseHold", "AsyncLeaseHold", "shared_keeper", "RENEW_FRACTION"]

log = logging.getLogger(__name__)

RENEW_FRACTION = 1 / 3
"""A live call's lease is renewed when this fraction of it has passed."""
_RETRY_FRACTION = 1 / 6  # after a failed renewal, try again this much of a lease later

_INF = math.inf


class _Entry:
    """One call being kept alive: what to renew, and when."""

    __slots__ = ("store", "call_id", "keys", "lease", "interval", "due", "done", "failed", "queue", "alive", "ended")

    def __init__(self, store: Any, call_id: str, keys: tuple[str, ...], lease: float,
                 alive: Callable[[], bool] | None = None, ended: Callable[[], None] | None = None) -> None:
        self.store = store
        self.alive = alive  # None: alive until the block ends
        self.ended = ended  # called once alive() says the call is over (None: its hold ends with its lease)
        self.call_id = call_id
        self.keys = keys
        self.lease = lease
        self.interval = lease * RENEW_FRACTION
        self.due = 0.0
        self.done = False  # the call ended: never renew again
        self.failed = False  # the last renewal raised: retry sooner, and log once
        self.queue: float = self.interval  # the FIFO it sits in (by delay until due)


class _Queues:
    """Calls due for renewal, one FIFO per delay: insertion order is due order within one."""

    __slots__ = ("fifos",)

    def __init__(self) -> None:
        self.fifos: dict[float, OrderedDict[_Entry, None]] = {}

    def add(self, entry: _Entry, delay: float, now: float) -> None:
        entry.due = now + delay
        entry.queue = delay
        fifo = self.fifos.get(delay)
        if fifo is None:
            fifo = self.fifos[delay] = OrderedDict()
        fifo[entry] = None

    def remove(self, entry: _Entry) -> None:
        fifo = self.fifos.get(entry.queue)
        if fifo is not None:
            fifo.pop(entry, None)
            if not fifo:
                del self.fifos[entry.queue]

    def pop_due(self, now: float) -> list[_Entry]:
        due: list[_Entry] = []
        for delay in list(self.fifos):
            fifo = self.fifos[delay]
            while fifo:
                entry = next(iter(fifo))
                if entry.due > now:
                    break
                del fifo[entry]
                due.append(entry)
            if not fifo:
                del self.fifos[delay]
        return due

    def earliest(self) -> float:
        return min((next(iter(fifo)).due for fifo in self.fifos.values()), default=_INF)

    def __len__(self) -> int:
        return sum(len(fifo) for fifo in self.fifos.values())


class LeaseHold(_Entry):
    """``with keeper.hold(...)``: the call's lease is renewed until the block ends."""

    __slots__ = ("_keeper",)

    def __init__(self, keeper: LeaseKeeper, store: Any, call_id: str, keys: tuple[str, ...], lease: float,
                 alive: Callable[[], bool] | None = None, ended: Callable[[], None] | None = None) -> None:
        _Entry.__init__(self, store, call_id, keys, lease, alive, ended)
        self._keeper = keeper

    def __enter__(self) -> LeaseHold:
        self._keeper._start(self)
        return self

    def __exit__(self, *exc: object) -> None:
        keeper = self._keeper
        with keeper._lock:  # inlined LeaseKeeper._stop: this runs once per call
            self.done = True
            fifo = keeper._queues.fifos.get(self.queue)
            if fifo is not None:
                fifo.pop(self, None)
                if not fifo:
                    del keeper._queues.fifos[self.queue]


class AsyncLeaseHold(_Entry):
    """``async with keeper.ahold(...)``: the call's lease is renewed on this event loop until the block ends."""

    __slots__ = ("_keeper", "_renewer")

    def __init__(self, keeper: LeaseKeeper, store: Any, call_id: str, keys: tuple[str, ...], lease: float,
                 alive: Callable[[], bool] | None = None, ended: Callable[[], None] | None = None) -> None:
        _Entry.__init__(self, store, call_id, keys, lease, alive, ended)
        self._keeper = keeper
        self._renewer: _LoopRenewer | None = None

    async def __aenter__(self) -> AsyncLeaseHold:
        self._renewer = self._keeper._loop_renewer()
        self._renewer.start(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._renewer is not None:
            self._renewer.stop(self)
            self._renewer = None


class _Counts:
    """What a keeper did: renewals that went through, failed, or found no live hold."""

    __slots__ = ("renewed", "failed", "lost", "abandoned")

    def __init__(self) -> None:
        self.renewed = 0
        self.failed = 0
        self.lost = 0
        self.abandoned = 0


def _abandoned(entry: _Entry, counts: _Counts) -> bool:
    """True when the call's ``alive`` check says it no longer runs: it is not renewed again."""
    if entry.alive is None or entry.done:
        return False
    try:
        alive = entry.alive()
    except Exception:  # a broken check keeps renewing: a live call must not lose its hold
        alive = True
    if alive:
        return False
    counts.abandoned += 1
    if entry.ended is None:
        log.warning("call %s no longer runs but was never settled; its lease is not renewed again, so its hold "
                    "ends with the lease (charged by the expired_hold policy)", entry.call_id)
    return True


def _split_due(due: list[_Entry], counts: _Counts) -> tuple[list[_Entry], list[_Entry]]:
    """``(the entries to renew, the abandoned ones whose owner settles them: call their ended)``."""
    renew: list[_Entry] = []
    gone: list[_Entry] = []
    for entry in due:
        if not _abandoned(entry, counts):
            renew.append(entry)
        elif entry.ended is not None:
            gone.append(entry)
    return renew, gone


def _call_ended(gone: list[_Entry]) -> None:
    """Tell each abandoned call's owner that it is over (outside the keeper's lock: it settles)."""
    for entry in gone:
        try:
            entry.ended()  # type: ignore[misc]
        except Exception:  # its hold still ends with its lease, charged by the expired_hold policy
            log.exception("could not settle call %s, which no longer runs; its hold ends with its lease "
                          "(charged by the expired_hold policy)", entry.call_id)


def _renewed(entry: _Entry, result: Any, error: BaseException | None, counts: _Counts) -> bool:
    """Book one renewal's outcome; True when the call should stay scheduled."""
    if error is not None:
        counts.failed += 1
        if not entry.failed:
            log.warning("could not renew the lease of call %s (%s: %s); retrying, its hold stays until the "
                        "lease runs out", entry.call_id, type(error).__name__, error)
        entry.failed = True
        return True
    entry.failed = False
    if result:
        counts.renewed += 1
        return True
    counts.lost += 1
    if not entry.done:
        log.warning("call %s has no live hold to renew (its lease ran out first, or it was released); "
                    "the store charged it by the expired_hold policy and its settle will correct that",
                    entry.call_id)
    return False


class _LoopRenewer:
    """The async half for one event loop: a timer at the earliest due renewal, a task while renewing.

    It holds no reference to its loop (the keeper maps loops to renewers weakly): a timer that is
    no longer wanted is not cancelled but outdated by ``generation``, and does nothing when it fires.
    """

    def __init__(self, counts: _Counts) -> None:
        self.counts = counts
        self.queues = _Queues()
        self.wake_at = _INF
        self.generation = 0
        self.renewing = False

    def start(self, entry: _Entry) -> None:
        loop = asyncio.get_running_loop()
        self.queues.add(entry, entry.interval, loop.time())
        if entry.due < self.wake_at and not self.renewing:
            self._schedule(loop, entry.due)

    def stop(self, entry: _Entry) -> None:
        entry.done = True
        self.queues.remove(entry)  # the timer stays: it finds nothing due, and sleeps again

    def _schedule(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self.generation += 1
        self.wake_at = when
        if when != _INF:
            loop.call_at(when, self._fire, self.generation)

    def _fire(self, generation: int) -> None:
        if generation != self.generation:
            return  # a later schedule replaced this timer
        loop = asyncio.get_running_loop()
        self.wake_at = _INF
        due, gone = _split_due(self.queues.pop_due(loop.time()), self.counts)
        _call_ended(gone)
        if due:
            self.renewing = True
            loop.create_task(self._renew(due), name="budgetguard-lease-renewal")
        else:
            self._schedule(loop, self.queues.earliest())

    async def _renew(self, due: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await asyncio.gather(*(_arenew(e) for e in due))
            now = loop.time()
            for entry, (result, error) in zip(due, outcomes):
                if _renewed(entry, result, error, self.counts) and not entry.done:
                    self.queues.add(entry, entry.lease * (_RETRY_FRACTION if entry.failed else RENEW_FRACTION), now)
        finally:
            self.renewing = False
            if not loop.is_closed():
                self._schedule(loop, self.queues.earliest())


async def _arenew(entry: _Entry) -> tuple[Any, BaseException | None]:
    try:
        return await entry.store.arenew(entry.call_id, entry.keys, entry.lease), None
    except Exception as exc:  # any store error: the call goes on, the lease may still run out
        return None, exc


class LeaseKeeper:
    """Renews the leases of calls in flight (see the module docstring). Thread-safe, fork-safe.

    ``hold(store, call_id, keys, lease_seconds)`` / ``ahold(...)`` return the context managers
    that keep one call's hold alive; ``live`` is how many sync holds are being kept;
    ``renewed`` / ``failed`` / ``lost`` count renewals (sync and async) that went through, raised,
    or found no live hold; ``wakeups`` counts the thread's wake-ups.
    Most code uses the process-wide ``shared_keeper()``.
    """

    def __init__(self, *, name: str = "budgetguard-lease-keeper") -> None:
        self.name = name
        self._counts = _Counts()
        self._reset()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopRenewer] = weakref.WeakKeyDictionary()
        _keepers.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues = _Queues()
        self._wake_at = _INF  # when the thread will look next; -inf while it is renewing
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wakeups = 0
        self._last_interval = 0.0  # the renewal interval of the latest hold: how long an idle thread naps

    def _after_fork(self) -> None:
        """In a forked child: no holds of the parent, a fresh lock, no thread until one is needed."""
        self._reset()
        self._loops = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"LeaseKeeper({self.name!r}, {self.live} live holds)"

    # -- the API -------------------------------------------------------------------------

    def hold(self, store: Any, call_id: str, keys: Sequence[str], lease_seconds: float, *,
             alive: Callable[[], bool] | None = None, ended: Callable[[], None] | None = None) -> LeaseHold:
        """A context manager that renews ``call_id``'s hold on ``keys`` through ``store.renew``
        every ``lease_seconds / 3`` until the block ends. Enter it right after the reservation.

        ``alive`` (optional) is asked before each renewal: once it returns False the call is taken
        to be over without a settle and is not renewed again. Then ``ended`` is called, on the
        keeper's thread, to settle it; without one its hold ends with its lease.
        """
        return LeaseHold(self, store, call_id, tuple(keys), float(lease_seconds), alive, ended)

    def ahold(self, store: Any, call_id: str, keys: Sequence[str], lease_seconds: float, *,
              alive: Callable[[], bool] | None = None, ended: Callable[[], None] | None = None) -> AsyncLeaseHold:
        """The async twin of ``hold``: renews through ``store.arenew`` on the running event loop
        (``ended`` is called there)."""
        return AsyncLeaseHold(self, store, call_id, tuple(keys), float(lease_seconds), alive, ended)

    @property
    def live(self) -> int:
        with self._lock:
            return len(self._queues)

    @property
    def wakeups(self) -> int:
        """How many times the renewal thread woke up (a timeout or a nudge), since start or fork."""
        return self._wakeups

    @property
    def abandoned(self) -> int:
        """Holds no longer renewed because their ``alive`` check said the call was over."""
        return self._counts.abandoned

    @property
    def renewed(self) -> int:
        return self._counts.renewed

    @property
    def failed(self) -> int:
        return self._counts.failed

    @property
    def lost(self) -> int:
        return self._counts.lost

    def close(self) -> None:
        """Stop the thread and forget every hold (their leases then run out in the store)."""
        with self._lock:
            self._closed = True
            self._queues = _Queues()
            thread, self._thread = self._thread, None
            self._wake.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    # -- sync: one thread for every call ------------------------------------------------

    def _start(self, entry: _Entry) -> None:
        due = entry.due = time.monotonic() + entry.interval
        entry.done, entry.queue = False, entry.interval  # a hold may be entered again after it ended
        with self._lock:
            if self._closed:
                return  # a closed keeper renews nothing; the call still runs
            fifos = self._queues.fifos
            fifo = fifos.get(entry.interval)  # inlined _Queues.add: this runs once per call
            if fifo is None:
                fifo = fifos[entry.interval] = OrderedDict()
            fifo[entry] = None
            self._last_interval = entry.interval
            if due < self._wake_at:  # due before the thread next looks (or it is idle): wake it
                self._wake_at = due
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                    self._thread.start()
                else:
                    self._wake.notify()

    def _run(self) -> None:
        lock = self._lock  # a forked child replaces the lock and never runs this thread
        napped = False  # idle for one renewal interval already: sleep until woken
        while True:
            with lock:
                while True:
                    if self._closed or self._thread is not threading.current_thread():
                        return
                    now = time.monotonic()
                    due, gone = _split_due(self._queues.pop_due(now), self._counts)
                    if due or gone:
                        self._wake_at = -_INF  # renewing: new holds need not wake us, we look again after
                        break
                    wake_at = self._queues.earliest()
                    if wake_at != _INF:
                        napped = False
                    elif not napped:
                        # Nothing to renew: look again in one interval rather than sleep until woken,
                        # so that the short calls which come and go meanwhile never have to wake us.
                        wake_at, napped = now + self._last_interval, True
                    self._wake_at = wake_at
                    self._wake.wait(None if wake_at == _INF else wake_at - now)
                    self._wakeups += 1
            _call_ended(gone)  # outside the lock: each settles through its store
            outcomes = []
            for entry in due:  # outside the lock: a renewal is a store round trip
                try:
                    outcomes.append((entry.store.renew(entry.call_id, entry.keys, entry.lease), None))
                except Exception as exc:  # any store error: the call goes on, the lease may still run out
                    outcomes.append((None, exc))
            with lock:
                now = time.monotonic()
                for entry, (result, error) in zip(due, outcomes):
                    if _renewed(entry, result, error, self._counts) and not entry.done:
                        fraction = _RETRY_FRACTION if entry.failed else RENEW_FRACTION
                        self._queues.add(entry, entry.lease * fraction, now)

    # -- async: a timer per event loop --------------------------------------------------

    def _loop_renewer(self) -> _LoopRenewer:
        loop = asyncio.get_running_loop()
        renewer = self._loops.get(loop)
        if renewer is None:
            with self._lock:
                renewer = self._loops.get(loop)
                if renewer is None:
                    renewer = self._loops[loop] = _LoopRenewer(self._counts)
        return renewer


_keepers: weakref.WeakSet[LeaseKeeper] = weakref.WeakSet()
_shared: LeaseKeeper | None = None
_shared_lock = threading.Lock()


def shared_keeper() -> LeaseKeeper:
    """The process-wide keeper every guard uses (created on first use; one thread for all calls)."""
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = LeaseKeeper()
    return _shared


def _reset_after_fork() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    for keeper in list(_keepers):
        keeper._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
