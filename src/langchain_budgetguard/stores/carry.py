"""Settles carried by the next reservation: the queue a ``RedisStore(carry_settles=True)`` keeps.

A settle on one hash tag is not sent at once: it waits here (its hold stays in Redis, so money
is only held a little longer, never spent twice or overspent) until the next reserve of this
process on the same tag sends it and the reservation in one script call (``lua/carry.lua``).
A settle that no reserve picks up within ``window`` seconds is flushed (within two windows) by
one timer thread per store (a daemon that ticks every window while settles come and sleeps once
the queue has been empty for ``LINGER``), by ``read()``, ``close()`` and at interpreter exit.
Asyncio settles too: the timer thread sends them with the store's sync client, so a settle
never depends on its event loop living on (``asyncio.run(...)`` ends the loop a few ms after
the call; a ``call_later`` timer would never fire). A store with no sync client (given only an
asyncio client) therefore queues nothing: each settle is sent at once.

If the process dies with settles queued, their holds expire at the end of their lease and are
charged all they reserved: such a call was served, and its actual cost is at most that. (A
carrying store places every hold so: it cannot tell Redis which settles wait without the round
trip it saves, so a call in flight when its process died is charged its reservation too,
whatever the guard's ``expired_hold`` says.) What may be late is at most the settles of the last
``window`` seconds (plus one round trip); none is undercharged (a settle above what its hold
charges on expiry is sent at once, never queued). ``close()`` and interpreter exit close the
queue first (a settle made from then on is sent at once) and wait for a flush of the timer
thread in flight before sending the rest.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .ledger import LedgerRow

__all__ = ["CarriedSettle", "SettleQueue", "carry_script", "carry_arguments", "DEFAULT_CARRY_WINDOW_SECONDS",
           "MAX_CARRY_WINDOW_SECONDS", "MAX_CARRIED", "check_window"]

DEFAULT_CARRY_WINDOW_SECONDS = 0.003
MAX_CARRY_WINDOW_SECONDS = 1.0
MAX_CARRIED = 32  # settles per script call: bounds the script's size and run time
LINGER = 0.1  # seconds the timer thread keeps ticking after the queue went empty


def check_window(value: Any) -> float:
    """A carry window in seconds, in (0, 1]."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"carry_window_seconds must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= MAX_CARRY_WINDOW_SECONDS):
        raise ValueError(
            f"carry_window_seconds must be seconds in (0, {MAX_CARRY_WINDOW_SECONDS}] (a few ms: a queued settle "
            f"keeps its money held that long), got {value!r}"
        )
    return float(value)


@dataclass(slots=True)
class CarriedSettle:
    """One settle waiting for a script call on its hash tag ``slot``: the settle script's
    ``keys`` and ``args`` as built for that tag, and what the caller asked for."""

    slot: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    call_id: str
    counter_keys: tuple[str, ...]
    amount: int
    amounts: tuple[int, ...] | None
    row: LedgerRow | None
    queued_at: float = field(default_factory=time.monotonic)


def carry_script(common: str, settle: str, reserve: str, driver: str) -> str:
    """The combined script: the settle and reserve scripts as functions of (KEYS, ARGV)."""
    return (f"{common}\nlocal function settle_one(KEYS, ARGV)\n{settle}\nend\n"
            f"local function reserve_one(KEYS, ARGV)\n{reserve}\nend\n{driver}")


def carry_arguments(settles: Sequence[CarriedSettle], keys: Sequence[str] = (),
                    args: Sequence[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """KEYS and ARGV of ``lua/carry.lua``: ``settles``, then a reserve's ``keys``/``args``
    (``args`` None: no reserve)."""
    head = [str(len(settles)), "0" if args is None else "1"]
    all_keys: list[str] = []
    all_args: list[str] = []
    for entry in settles:
        head += [str(len(entry.keys)), str(len(entry.args))]
        all_keys += entry.keys
        all_args += entry.args
    if args is not None:
        all_keys += keys
        all_args += args
    return tuple(all_keys), (*head, *all_args)


class SettleQueue:
    """The settles of one store waiting to be carried, and the timer thread that flushes them.

    ``flush`` is called from the timer thread with the entries whose window is over; it must
    send them or journal them. While it runs those entries are ``in_flight``: ``wait_flushed``
    waits for them (close and exit must not stop the process or its client under them). ``put``
    refuses an entry once the queue is closed (the caller sends it at once). ``hold`` is called
    when the queue stops being empty and ``let_go`` when the timer thread finds it empty again
    (both under the queue's lock): the owner keeps itself alive in between, so that settles are
    never dropped with a store nobody refers to any more.
    """

    def __init__(self, window: float, flush: Callable[[list[CarriedSettle]], None],
                 hold: Callable[[], None] | None = None, let_go: Callable[[], None] | None = None) -> None:
        self.window = window
        self._hold, self._let_go = hold, let_go
        self._flush = weakref.WeakMethod(flush) if hasattr(flush, "__self__") else (lambda: flush)
        self._cond = threading.Condition()
        self._entries: list[CarriedSettle] = []
        self._idle = False  # the timer thread waits for work (notify it on the next put)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._flushing: list[CarriedSettle] = []  # taken by the timer thread, not sent yet
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (q := ref()) is not None and q._forked())

    def _forked(self) -> None:
        """In a forked child: no timer thread yet, and the parent's settles are the parent's to send."""
        self._cond = threading.Condition()
        self._entries, self._thread, self._idle, self._flushing = [], None, False, []

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: CarriedSettle) -> bool:
        """Queue ``entry``; False (not queued) once the queue is closed."""
        with self._cond:
            if self._closed:
                return False
            if not self._entries and self._hold is not None:
                self._hold()
            self._entries.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="budgetguard-carry")
                self._thread.start()
            elif self._idle:
                self._cond.notify()
            return True

    def take(self, slot: str, limit: int = MAX_CARRIED) -> list[CarriedSettle]:
        """Up to ``limit`` queued settles of tag ``slot``, oldest first (removed from the queue)."""
        if not self._entries:  # unlocked peek: a settle queued right now waits for the timer
            return []
        with self._cond:
            taken = [e for e in self._entries if e.slot == slot][:limit]
            if taken:
                ids = set(map(id, taken))
                self._entries = [e for e in self._entries if id(e) not in ids]
            return taken

    def has_call(self, call_id: str) -> bool:
        return any(e.call_id == call_id for e in self._entries)

    def in_flight(self, call_id: str | None = None) -> bool:
        """Whether the timer thread is sending settles (of ``call_id`` when given) right now
        (never, asked from the timer thread itself: a hook it calls waits for nothing)."""
        if threading.current_thread() is self._thread:
            return False
        return any(call_id is None or e.call_id == call_id for e in self._flushing)

    def wait_flushed(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until the timer thread's flush in flight is over."""
        if threading.current_thread() is self._thread:
            return not self._flushing
        with self._cond:
            return self._cond.wait_for(lambda: not self._flushing, timeout)

    def take_call(self, call_id: str) -> list[CarriedSettle]:
        """The queued settles of ``call_id`` (removed from the queue)."""
        with self._cond:
            taken = [e for e in self._entries if e.call_id == call_id]
            if taken:
                self._entries = [e for e in self._entries if e.call_id != call_id]
            return taken

    def take_all(self, due_before: float | None = None) -> list[CarriedSettle]:
        """Every queued settle (queued before ``due_before`` when given), removed from the queue."""
        with self._cond:
            keep, taken = [], []
            for e in self._entries:
                (taken if due_before is None or e.queued_at <= due_before else keep).append(e)
            self._entries = keep
            return taken

    def put_back(self, entries: Sequence[CarriedSettle]) -> None:
        with self._cond:
            self._entries[:0] = entries

    def close(self) -> None:
        """Stop the timer thread (queued settles stay: take them first)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        # While settles come, the thread ticks every window (a settle then needs no wake-up: on
        # 2 cores, waking a thread per call costs more than the round trip it saves); after
        # LINGER seconds with nothing queued it sleeps until the next settle wakes it.
        last_busy = time.monotonic()
        while True:
            with self._cond:
                while not self._closed:
                    now = time.monotonic()
                    waiting = [e.queued_at for e in self._entries]
                    if waiting:
                        last_busy = now
                        if min(waiting) + self.window <= now:
                            break
                    if waiting or now - last_busy < LINGER:
                        self._idle = False
                        self._cond.wait(self.window)
                        continue
                    if not self._entries and self._let_go is not None:
                        self._let_go()
                    self._idle = True
                    self._cond.wait(5.0)
                    if self._entries:
                        last_busy = time.monotonic()
                    if self._flush() is None:  # the store is gone
                        return
                self._idle = False
                if self._closed:
                    return
            flush = self._flush()
            if flush is None:
                return
            with self._cond:
                due = self._flushing = self.take_all(due_before=time.monotonic() - self.window)
            try:
                if due:
                    flush(due)
            finally:
                with self._cond:
                    self._flushing = []
                    self._cond.notify_all()
            del flush
