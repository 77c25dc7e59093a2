"""The Redis store: one budget shared by every process and machine that uses the same Redis.

``RedisStore(url)`` / ``RedisStore.from_url(url)`` take ``redis://``, ``rediss://``,
``unix://``, ``redis+cluster://`` and ``redis+sentinel://`` URLs (``stores.redis_client``
documents each form). Store options may be given in the query too:
``evicting_policy=refuse|warn``, ``journal_path=/path/journal.sqlite``,
``retry_window_seconds=300``, ``carry_settles=1``, ``carry_window_seconds=0.003``, ``lease_slices=1``,
``slice_lease_seconds=30``; other query parameters are redis-py connection options
(``?socket_timeout=2``). Unless the URL says otherwise, connecting times out after 1 s and a reply
after 2 s, and redis-py's own retries are off: the store retries by its ``RetryPolicy``, then
raises ``BudgetStoreUnavailableError``.

Key layout (``prefix`` is ``bg:`` by default; counter keys come from ``limits.counter_key`` and
start with their ``{tag}``, the Redis Cluster hash tag)::

    bg:{acme}:default:user:alice:day:2026-11-22    counter: hash of s (spent), h (held) and, per
                                                   live hold, @<call_id> = "amount:charge_on_expiry";
                                                   per hold reaped with a charge, !<call_id> = charge
                                                   (kept for the retry window, dropped by a reset);
                                                   a = alert thresholds "t1,t2,..." (Counter.alerts)
                                                   and A<t> = 1 per threshold fired (reset clears)
                                                   with slices (stores.slices): g = what leased
                                                   slices hold, n = how many, %<slice id> =
                                                   "grant:charge" each,
                                                   !\n<slice id> = a reaped slice's charge
    bg:l:{acme}:default:user:alice:day:2026-11-22  its deadlines: sorted set call_id -> ms of server
                                                   TIME (and TAB<call_id>: when !<call_id> goes;
                                                   \n<slice id>: a slice's lease)
    bg:sl:{acme}:<slice id>                        the slice's last report applied (its seq)
    bg:c:{acme}:<call_id>                          the call's record on this tag: "h:<token>" while
                                                   held, "s" once settled ("s:<attempt>:<alerts>"
                                                   when the settle fired alerts, for a retry whose
                                                   reply was lost), "r" once released
    bg:j:{acme}:<journal id>                       highest journal entry replayed on this tag
    bg:x:{acme}:default:user:day:2026-11-22        spend index of (user, day 2026-11-22) on this tag:
                                                   sorted set escaped id -> spent nano-USD, kept by
                                                   the reserve/settle/reset scripts, same TTL as
                                                   its counters
    bg:ledger:{acme}                               ledger stream of this tag: one entry per settled
                                                   call (stores.ledger), trimmed by MAXLEN ~ and
                                                   MINID ~ (retention) in the settle script
    bg:tags                                        set of the tags above, for readers to merge
    bg:o:{default}                                 live limit overrides of budget "default": hash of
                                                   "<per>:<window>:<id or *>" -> nano-USD, #n, the
                                                   changes counted, and #v, a version new on every
                                                   change (count @ server time; never expires)

Counters expire at ``Counter.expires_at`` (the guard puts window end + retention there); ``total``
windows never expire. A call's record lives for its lease + ``retry_window_seconds`` (5 minutes),
a settled call's for the retry window after its settle: inside it, a retried reserve (same
``Hold.token``) is a duplicate, a repeated settle changes nothing, and any other reserve of that
call id is refused (``ReserveResult.reused``). After it the record is gone, memory with it. A key that does not
start with a ``{tag}`` is stored as ``bg:~{key}``, which makes the key its own tag.

Every script touches the keys of one tag only, so in a Redis Cluster each runs on one node. A call
whose counters span several tags (a platform-wide limit has its own) is reserved tag by tag, in
the order the counters come; if a later tag refuses or fails, the holds already placed are
released, so the worst case is a brief false refusal, never overspend.

Faults. A reserve whose reply was lost is retried with the same token and answers "duplicate":
that hold counts as placed. When a reserve cannot complete (every reply lost, a tag down, a
command error), every tag it may have reached is released before ``BudgetStoreUnavailableError``
is raised, and the release leaves a tombstone (for lease + retry window) so that a reserve still
queued in Redis (a client timeout while the server was stalled) is refused when it finally runs.
A reserve whose caller is cancelled or interrupted (CancelledError, KeyboardInterrupt) queues the
same tombstoned releases, for every tag placed and the one in flight, without waiting for them;
an ``areserve`` on a store with only a sync client runs in a worker thread that cannot be
stopped, so what it placed is released when it returns.
A release that cannot reach Redis is retried after each later operation and by a background
thread until it succeeds or the lease + retry window is over. Redis command errors (OOM,
READONLY, MISCONF, BUSY, LOADING, ...) become ``BudgetStoreUnavailableError``; NOSCRIPT after a
failover or restart reloads the script (on a Cluster: that call goes as EVAL, which loads it on
the keys' node only, so a master that is down fails only the tags it serves). On first use the
store reads ``maxmemory-policy`` (on a Cluster, from each master that answers): an evicting
policy (``allkeys-*``, ``volatile-*``: counters have TTLs) would silently reset budgets, so the
store refuses (``evicting_policy="refuse"``, the default) or logs a warning (``"warn"``).

Alerts (``Counter.alerts``) are fired by the reserve and settle scripts themselves, right after
they change a counter's spent (HSETNX of ``A<t>``), so each fires once however many processes
race; a read or renew that reaps an expiry charge leaves the firing to the next reserve or
settle of that counter. A retried settle whose reply was lost gets its alerts again from the
record; a reserve's (expiry reaps only) are lost with a lost reply or an outage mid-reserve.

A settle that cannot reach Redis is kept in the settle journal (``stores.journal``: in memory, or
a SQLite file with ``journal_path``) and replayed exactly once when Redis answers (see there).
A replay goes tag by tag: an entry whose tag cannot take it now (its node is down, or Redis
refuses the script: a key of the wrong type) stays, and so do the later entries' settles on that
tag (a tag counts replays by the highest entry applied there, so they wait behind it, in order);
entries and parts of entries on other tags replay at once. On one server, an unreachable Redis
ends the pass at once; on a Cluster, an unreachable node holds back that node's tags only.
Call ``close()`` (or use ``with RedisStore(...) as store:``) to flush it and close the clients;
interpreter exit flushes too.

Carried settles (``carry_settles=True``, off by default; ``stores.carry``). A settle whose keys
are all on one hash tag (that this process has used already) makes no round trip: it is queued
and sent with the next reserve of this process on that tag, in one script call
(``lua/carry.lua``: each queued settle, then the reservation, each exactly as alone). It returns
``SettleResult(applied=False, pending=True, charged=amount)`` (what it charges when it lands,
unless the call was settled before); thresholds it crosses are handed to
``on_carried_crossed(call_id, crossings)`` when it lands (logged if nobody set it). A settle
that no reserve picks up within ``carry_window_seconds`` (3 ms; at most 1 s) is sent on its own,
within two windows, by the store's timer thread with the sync client (asyncio settles too: their
event loop may end first, as ``asyncio.run`` does right after the call; so a store given only an
asyncio client carries nothing: it sends each settle at once), and ``read()``,
``reset_counter``, ``read_index``, ``read_index_page``, ``read_ledger``, ``release`` (of that
call), ``flush()``, ``close()`` and interpreter exit send the queue first (``flush``, ``close``
and exit wait up to 5 s for a flush of the timer in flight; once ``close()`` or exit has begun,
a settle is sent at once). ``renew`` of a call whose settle is queued answers False, and a
second settle of it sends the queued one first (the first settle of a call wins, as without
carrying). A settle spanning several tags is sent at once, as without carrying; so is one whose
hold this store did not place (or renew), or whose lease may end within ``CARRY_LEASE_MARGIN``
(1 s) plus two windows (a queued settle's hold is never reaped while its process lives), and
one above what its hold charges on expiry (a process killed with it queued would undercharge
it). Its hold stays in Redis until it lands, so money is held a little longer and never spent
twice: spent + held <= limit at every instant. A script call that fails, or whose caller is
interrupted or cancelled while it waits, journals the settles it carried (replayed exactly once,
as above); one the server refuses (a key of the wrong type) is sent again settle by settle, and
the reserve alone, so that one bad key fails only its own settle (journaled; a journal replay
goes on past an entry Redis refuses with the entries of other tags, see above). If the process
dies with settles queued (at most those of the last window), their holds expire with their lease
and are charged all they reserved (the calls were served): a carrying store places every hold
with an expiry charge of its full amount, whatever ``charge_on_expiry`` the hold asked for, since
it cannot tell Redis which settles wait without the round trip it saves.

Leased slices (``lease_slices=True``, off by default; ``stores.slices``, ``lua/slice.lua``). A
counter this process reserves on often is admitted against a slice of its budget leased from
Redis: no round trip per call; settles are reported with the slice's next refill or by the
store's timer thread (every 0.1 s: reports older than 0.5 s, idle slices returned, leases
renewed), and ``read()`` / ``reset_counter`` of the counter, ledger and index reads,
``flush()``, ``close()`` and exit report (and, for read, reset and close, return) them first.
Needs a URL or a sync client (the timer's). ``slice_lease_seconds`` (30) is how long a dead
process's slice outlives it. The counter's ``held`` (every read) counts slices;
``CounterState.sliced`` is their part. Reserve and release of a call admitted from slices
touch only its counters that are not sliced (none: no round trip).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import tenacity

from ..errors import BudgetStoreUnavailableError
from ..limits import escape_id
from .base import (
    Counter,
    CounterHold,
    CounterState,
    Crossing,
    Hold,
    IndexPage,
    OverridesSnapshot,
    ReserveResult,
    SettleResult,
    check_index_page,
    counter_holds,
    glob_regex,
    key_amounts,
    tag_of,
)
from .bounds import (
    DEFAULT_RETRY_WINDOW_SECONDS,
    MAX_NANO,
    MAX_RETRY_WINDOW_SECONDS,
    check_call_id,
    check_nano,
    check_seconds,
    check_token,
)
from .ledger import (
    DEFAULT_LEDGER_MAX_ROWS,
    DEFAULT_LEDGER_RETENTION_SECONDS,
    LedgerRow,
    check_ledger_options,
    index_name_of,
    row_matches,
    scopes_of_keys,
)
from .carry import (
    DEFAULT_CARRY_WINDOW_SECONDS,
    MAX_CARRIED,
    CarriedSettle,
    SettleQueue,
    carry_arguments,
    carry_script,
    check_window,
)
from .slices import SETTLED_BEFORE, SLICE_LEASE_SECONDS, Report, SliceBook, Taking
from .journal import MEMORY_MARK_TTL_SECONDS, MemoryJournal, PendingSettle, SettleJournal, SqliteJournal
from .redis_client import RedisTarget, describe_client, describe_url, is_async_client, is_sync_client, make_client, parse_url
from .redis_wire import direct_scripts

__all__ = ["RedisStore", "RetryPolicy", "PendingSettle", "DEFAULT_RETENTION_SECONDS", "EVICTING_POLICIES"]

log = logging.getLogger(__name__)

DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600
# A settle is carried only if its hold's lease outlives the queue (two windows) by this much.
CARRY_LEASE_MARGIN = 1.0
TAGS_REFRESH_SECONDS = 300.0  # registered tags are registered again after this (and after an outage)

T = TypeVar("T")

# Errors after which trying again may succeed: the server or the network, not our request.
_TRANSIENT = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError, MasterNotFoundError
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,  # a replica promoted/demoted during a failover
    ConnectionError,
    TimeoutError,
)


# Replies of a server that cannot serve now (memory full, disk errors, busy, loading, failing
# over): retried like a lost connection, then reported unavailable.
_BUSY_REPLIES = ("OOM", "MISCONF", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN", "READONLY")


def _refused_script(exc: BaseException) -> bool:
    """Whether ``exc`` (a BudgetStoreUnavailableError) is the server refusing the script itself
    (WRONGTYPE on one key, say), not a connection or a busy server: sending again won't help."""
    cause = exc.__cause__
    return isinstance(cause, redis.exceptions.ResponseError) and not _is_transient(cause)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT) or isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    if isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(_BUSY_REPLIES):
        return True
    # A cluster client that reaches no node raises this base class, not a ConnectionError.
    return isinstance(exc, redis.exceptions.RedisClusterException) and "connect" in str(exc).lower()


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the store tries before it reports Redis unavailable.

    At most ``attempts`` tries, and none started after ``deadline_seconds``; the waits between
    tries grow exponentially from ``first_wait`` up to ``max_wait``, with full jitter.
    """

    attempts: int = 4
    deadline_seconds: float = 1.5
    first_wait: float = 0.05
    max_wait: float = 0.5

    def tenacity_kwargs(self, elapsed: float = 0.0) -> dict[str, Any]:
        """Arguments for ``tenacity.Retrying``; ``elapsed``: seconds this operation has already taken."""
        stop_before = getattr(tenacity, "stop_before_delay", tenacity.stop_after_delay)  # tenacity < 8.3
        return {
            "stop": tenacity.stop_after_attempt(max(1, self.attempts)) | stop_before(self.deadline_seconds - elapsed),
            "wait": tenacity.wait_random_exponential(multiplier=self.first_wait, max=self.max_wait),
            "retry": tenacity.retry_if_exception(_is_transient),
            "reraise": True,
        }


_ONCE = RetryPolicy(attempts=1)

# What a redis-py client raises from a connection that close() / aclose() tore down under a call
# (its reader or socket gone: AttributeError, ValueError, OSError; an asyncio transport closed
# under a write: TypeError). Only for a client the store closed meanwhile is it retried (as
# _closed_under_call), on a new client; otherwise it is raised as it is.
_CLOSED_UNDER_CALL = (AttributeError, TypeError, ValueError, OSError)


def _closed_under_call(exc: BaseException) -> redis.exceptions.ConnectionError:
    return redis.exceptions.ConnectionError(f"the store's client was closed during the call: {exc!r}")


class _NotSent(BudgetStoreUnavailableError):
    """Refused before any command was sent (an evicting policy): nothing to release."""


# Every maxmemory-policy but noeviction may drop counters (they all have TTLs, or soon will).
EVICTING_POLICIES = frozenset(
    {"allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"}
)


@dataclass(slots=True)
class _PendingRelease:
    """A release that could not reach Redis, retried until ``give_up_at`` (monotonic)."""

    call: _Call
    give_up_at: float


class _HeldBack(BudgetStoreUnavailableError):
    """A journal entry's settle on a tag not sent: an earlier entry on that tag is waiting."""


class _ReplayBlocks:
    """The tags (and cluster nodes) one journal replay pass holds back: a tag whose settle
    failed (Redis refused it, or could not be reached), and every tag of a node that could not
    be reached (on one server: all of them, as when the replay stopped at the first failure)."""

    def __init__(self, client: Any) -> None:
        self._cluster = client if isinstance(client, (redis.cluster.RedisCluster,
                                                      redis.asyncio.cluster.RedisCluster)) else None
        self.tags: set[str] = set()
        self.nodes: set[str] = set()
        self._node_of: dict[str, str] = {}

    def node(self, slot: str) -> str:
        if self._cluster is None:
            return ""
        name = self._node_of.get(slot)
        if name is None:
            try:
                name = self._cluster.get_node_from_key(slot).name  # (a slot is "{tag}" or "~{key}")
            except Exception:  # noqa: BLE001 - a slot not covered now: held back by its tag alone
                name = "?" + slot
            self._node_of[slot] = name
        return name

    def holds_back(self, slot: str) -> bool:
        return slot in self.tags or (bool(self.nodes) and self.node(slot) in self.nodes)

    def holds_back_all(self, keys: Sequence[str]) -> bool:
        return (bool(self.tags) or bool(self.nodes)) and all(self.holds_back(g.slot) for g in _groups(keys))

    def fail(self, slot: str, exc: BaseException) -> None:
        self.tags.add(slot)
        if not _refused_script(exc) and not isinstance(exc, _HeldBack):
            self.nodes.add(self.node(slot))


# -- pure helpers: names, script arguments, replies ----------------------------------------------


def _load_lua(name: str) -> str:
    folder = resources.files(__package__).joinpath("lua")
    return folder.joinpath("common.lua").read_text("utf-8") + "\n" + folder.joinpath(f"{name}.lua").read_text("utf-8")


@functools.cache
def _lua_sources() -> dict[str, str]:
    names = ("reserve", "settle", "release", "renew", "read", "overrides", "override", "reset", "ledger_append", "tags",
             "slice", "ledger_scan")
    sources = {name: _load_lua(name) for name in names}
    folder = resources.files(__package__).joinpath("lua")
    own = {name: folder.joinpath(f"{name}.lua").read_text("utf-8") for name in ("common", "settle", "reserve", "carry")}
    sources["carry"] = carry_script(own["common"], own["settle"], own["reserve"], own["carry"])
    return sources


def _slot_part(key: str) -> str:
    """The part of a counter's Redis name that carries its hash tag: ``{tag}``, or ``~{key}``."""
    if not key:
        raise ValueError("counter keys must be non-empty strings")
    tag = tag_of(key)
    return "{" + tag + "}" if tag else "~{" + key + "}"


@dataclass(frozen=True, slots=True)
class _Call:
    """One script invocation; every key in it hashes to one cluster slot."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    once: bool = False  # tried once, not by the store's RetryPolicy (what fails is queued instead)


# Not a script call: a plan yields it to wait a moment (for another thread's or task's report).
_WAIT = _Call("", (), ())
_WAIT_SECONDS = 0.001
FLUSH_WAIT_SECONDS = 5.0  # how long close, exit and flush wait for the carry timer's flush in flight


@dataclass(frozen=True, slots=True)
class _Group:
    """The distinct keys of one call that share a hash tag: one script call's worth."""

    slot: str
    keys: tuple[str, ...]


def _groups(keys: Sequence[str]) -> list[_Group]:
    """Distinct keys grouped by hash tag, groups in order of first appearance."""
    return list(_groups_of(tuple(keys)))


@functools.lru_cache(maxsize=4096)
def _groups_of(keys: tuple[str, ...]) -> tuple[_Group, ...]:
    by_slot: dict[str, list[str]] = {}
    for key in dict.fromkeys(keys):
        by_slot.setdefault(_slot_part(key), []).append(key)
    return tuple(_Group(slot, tuple(ks)) for slot, ks in by_slot.items())


def _fill(states: list[CounterState], keys: Sequence[str], group: _Group, found: list[CounterState]) -> None:
    """Put a group's states at every position of the caller's list where its keys appear."""
    by_key = dict(zip(group.keys, found))
    for index, key in enumerate(keys):
        if key in by_key:
            states[index] = by_key[key]


def _states(flat: Sequence[Any]) -> list[CounterState]:
    """``[spent1, held1, spent2, held2, ...]`` (bytes or str, as the client decodes) -> states."""
    return [CounterState(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def _read_states(flat: Sequence[Any]) -> list[CounterState]:
    """The read script's ``[spent1, held1, sliced1, spent2, ...]`` -> states."""
    return [CounterState(int(flat[i]), int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]


def _crossings(flat: Sequence[Any], keys: Sequence[str], group: _Group) -> list[Crossing]:
    """``[i, threshold, spent, ...]`` of a script (i: 1-based in the group) -> crossings, each
    at the first position of its key in the caller's ``keys``."""
    out = []
    for j in range(0, len(flat) - 2, 3):
        key = group.keys[int(flat[j]) - 1]
        out.append(Crossing(keys.index(key), key, int(flat[j + 1]), int(flat[j + 2])))
    return out


def _flag(value: Any, what: str) -> bool:
    """A yes/no store option as a URL gives it."""
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{what} in the URL must be 1/true/yes/on or 0/false/no/off, got {value!r}")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _glob_escape(text: str, keep_star: bool = False) -> str:
    """Escape Redis MATCH specials (``* ? [ ] \\``), keeping ``*`` wildcards when asked."""
    specials = "?[]\\" if keep_star else "*?[]\\"
    return "".join("\\" + c if c in specials else c for c in text)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _check_amount(value: Any, what: str) -> str:
    return str(check_nano(value, what))


def _row_from_keys(call_id: str, keys: Sequence[str]) -> LedgerRow | None:
    """A ledger row for a settle known only by its call id and keys (None: keys not the guard's)."""
    key = next((k for k in keys if index_name_of(k) is not None), None)
    if key is None:
        return None
    from urllib.parse import unquote

    name = key.split("}:", 1)[1].split(":", 1)[0]
    return LedgerRow(budget=name if name.startswith("~") else unquote(name), call_id=call_id,
                     scopes=scopes_of_keys(keys), keys=tuple(dict.fromkeys(keys)),
                     detail="replayed from a settle journal; the call's token counts were not journaled")


def _decode_entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """An XREVRANGE reply as (entry id, fields)."""
    out = []
    for entry_id, values in reply or ():
        out.append((_text(entry_id), {_text(k): _text(v) for k, v in dict(values).items()}))
    return out


SCAN_CHUNK = 1000  # ledger entries one ledger_scan call reads (Redis is busy ~5 us an entry)


def _pairs(flat: Any) -> dict[str, str]:
    """A script's reply of an entry's fields (name, value, ...) as a mapping."""
    items = [_text(v) for v in flat or ()]
    return dict(zip(items[::2], items[1::2]))


def _scan_filter(name: str, scope: str | None, scope_id: str | None,
                 kinds: Sequence[str] | None) -> tuple[str, str, str, str]:
    """lua/ledger_scan.lua's filter arguments: budget, budget as JSON, the substring a row's
    scopes' JSON has (as ``LedgerRow.fields`` and ``packed_batch`` write it), the kinds."""
    if scope is not None:
        needle = json.dumps(scope) + ":" + (json.dumps(scope_id) if scope_id is not None else "")
    else:
        needle = "" if scope_id is None else ":" + json.dumps(scope_id)
    wanted = "" if kinds is None else "," + ",".join(kinds) + ","
    return name, json.dumps(name), needle, wanted


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


# -- the store --------------------------------------------------------------------------------------

# A plan is the store-independent logic of one operation: it yields the script calls it needs and
# gets their replies back, so the sync and async shells only differ in how they run a call.
Plan = Generator[_Call, Any, T]


class _ClusterScript:
    """A registered script on a sync cluster client. NOSCRIPT (a new node, a restart, a failover,
    SCRIPT FLUSH) sends that call as EVAL, which runs and caches the script on the keys' node
    only: redis-py's ``Script`` would SCRIPT LOAD it on every primary, and with one primary down
    every tenant's call would fail, not just those on that node."""

    __slots__ = ("client", "script")

    def __init__(self, client: Any, script: Any) -> None:
        self.client, self.script = client, script

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return self.client.evalsha(self.script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.client.eval(self.script.script, len(keys), *keys, *args)


class _AsyncClusterScript(_ClusterScript):
    """``_ClusterScript`` for an asyncio cluster client."""

    __slots__ = ()

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:  # type: ignore[override]
        try:
            return await self.client.evalsha(self.script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await self.client.eval(self.script.script, len(keys), *keys, *args)


class _Backend:
    """One client and its registered scripts."""

    def __init__(self, client: Any, closers: list[Any]) -> None:
        self.client = client
        self.closers = closers  # what the store built and must close; empty for a client you gave
        # redis-py Scripts; on one server, callers that pack and send them in one pass (redis_wire);
        # on a cluster, callers that load a script on the keys' node only
        registered = {name: client.register_script(src) for name, src in _lua_sources().items()}
        if isinstance(client, redis.asyncio.cluster.RedisCluster):
            self.scripts: dict[str, Any] = {n: _AsyncClusterScript(client, s) for n, s in registered.items()}
        elif isinstance(client, redis.cluster.RedisCluster):
            self.scripts = {n: _ClusterScript(client, s) for n, s in registered.items()}
        else:
            self.scripts = direct_scripts(client, registered, keep_connections=bool(closers))
        self._ready = not isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._init_lock: asyncio.Lock | None = None
        self.policy_checked = False  # maxmemory-policy read and found safe (or unreadable)
        self.policy_refused_at = -math.inf  # when an evicting policy was last found (monotonic)
        self.policy_again_at = -math.inf  # a cluster primary did not answer: read again from then

    async def aready(self) -> None:
        """Discover an asyncio cluster's topology once, before concurrent use: many first calls
        racing to initialize it fail with AttributeError inside redis-py (8.1)."""
        if self._ready:
            return
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if not self._ready:
                try:
                    await self.client.initialize()
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                    if not await self._initialize_past_a_dead_primary():
                        raise
                self._ready = True

    async def _initialize_past_a_dead_primary(self) -> bool:
        """redis-py (8.1) reads COMMAND from the first primary only, so an asyncio cluster
        client cannot start while that one master is down, and every tenant would be refused:
        read the topology again and COMMAND from the first primary that answers."""
        client = self.client
        manager, parser = getattr(client, "nodes_manager", None), getattr(client, "commands_parser", None)
        if manager is None or parser is None or getattr(client, "_initialize", None) is not True:
            return False
        await manager.initialize()  # (raises when no startup node answers)
        for node in manager.get_nodes_by_server_type(redis.cluster.PRIMARY):
            try:
                await parser.initialize(node)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                continue
            manager.default_node = node
            client._initialize = False
            log.info("asyncio cluster client started past a primary that is down (COMMAND read from %s)", node.name)
            return True
        return False


def _every_primary(client: Any) -> dict[str, Any]:
    """Arguments that send a command to every primary of a cluster client (none for a server)."""
    if isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
        return {"target_nodes": type(client).PRIMARIES}
    return {}


def _policies(reply: Any) -> list[str]:
    """maxmemory-policy values in a CONFIG GET reply (one server's dict, or a cluster's per node)."""
    if not isinstance(reply, dict):
        return []
    found = []
    for key, value in reply.items():
        if isinstance(value, dict):
            found += _policies(value)
        elif _text(key) == "maxmemory-policy":
            found.append(_text(value))
    return found


# Stores with work left (journaled settles, releases): flushed at interpreter exit.
_LIVE_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()
# Stores with carried settles queued: kept alive until they are sent (a store dropped by its
# owner still sends them, by its timer or at exit).
_CARRYING: set[RedisStore] = set()
# Stores whose slice timer runs (they hold slices, or settles to report): kept alive until they
# hold none, so that a store dropped by its owner still reports them and returns its slices.
_SLICING: set[RedisStore] = set()


@atexit.register
def _flush_at_exit() -> None:
    for store in list(_LIVE_STORES):
        if store._carry is not None:  # from now on a settle is sent at once, never left to the timer
            store._carry.close()
        try:
            store.flush(final=True)
        except Exception:  # noqa: BLE001 - exit must go on; flush logged what it could not save
            log.exception("budget store %s: flush at exit failed", store.where)


_MP_HOOKED = [0]  # the pid whose multiprocessing finalizers flush the stores at exit


def _hook_multiprocessing(*_: Any) -> None:
    """A multiprocessing child leaves by ``os._exit`` (atexit never runs) after running
    multiprocessing's own finalizers: flush there too, so that carried settles and slices do not
    wait for their leases to end."""
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is None or _MP_HOOKED[0] == os.getpid():
        return
    _MP_HOOKED[0] = os.getpid()
    mp_util.Finalize(None, _flush_at_exit, exitpriority=10)


class RedisStore:
    """Budget counters in Redis (a server, a Cluster, or a Sentinel-managed master).

    ``url_or_client`` is a URL (see the module docstring) or a redis-py client: ``redis.Redis``,
    ``redis.cluster.RedisCluster`` or their ``redis.asyncio`` twins. With a URL the store builds
    its sync and asyncio clients on first use (one asyncio client per event loop). With a sync
    client the a* methods run it in a worker thread; with an asyncio client only the a* methods
    work, unless ``async_client`` / a sync client is given too. Clients you pass stay yours to close.

    ``retention_seconds`` is how long counters are kept after their window ends; the guard reads
    it when it computes ``Counter.expires_at``, which the store applies as given.
    ``retry_window_seconds`` is how long a call's record outlives its lease or settle (retries
    inside it are exact). ``evicting_policy``: ``"refuse"`` (default) or ``"warn"`` when Redis may
    evict keys. ``journal_path``: keep journaled settles in that SQLite file (see
    ``stores.journal``), or pass ``journal=`` any ``SettleJournal``. ``carry_settles``: send
    single-tag settles with the next reserve instead of on their own (default False; see the
    module docstring), flushed after ``carry_window_seconds`` (default 0.003) at the latest.

    Use it as a context manager, or call ``close()`` / ``aclose()`` when done: journaled settles
    and pending releases are flushed, then the clients the store built are closed.
    """

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = "bg:",
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        retry: RetryPolicy | None = None,
        retry_window_seconds: float | None = None,
        record_ttl_seconds: float | None = None,
        evicting_policy: str | None = None,
        journal_path: str | None = None,
        journal: SettleJournal | None = None,
        async_client: Any = None,
        ledger_max_rows: int | None = None,
        ledger_retention_seconds: int | None = None,
        carry_settles: bool | None = None,
        carry_window_seconds: float | None = None,
        lease_slices: bool | None = None,
        slice_lease_seconds: float | None = None,
        **client_options: Any,
    ) -> None:
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a string without '{{' or '}}' (they change hash slots), got {prefix!r}")
        self._target: RedisTarget | None = None
        if isinstance(url_or_client, str):
            self._target = parse_url(url_or_client)
            query = self._target.store_options or {}
            retry_window_seconds = query.get("retry_window_seconds", retry_window_seconds)
            evicting_policy = evicting_policy or query.get("evicting_policy")
            journal_path = journal_path or query.get("journal_path")
            ledger_max_rows = query.get("ledger_max_rows", ledger_max_rows)
            ledger_retention_seconds = query.get("ledger_retention_seconds", ledger_retention_seconds)
            if carry_settles is None and "carry_settles" in query:
                carry_settles = _flag(query["carry_settles"], "carry_settles")
            carry_window_seconds = query.get("carry_window_seconds", carry_window_seconds)
            if lease_slices is None and "lease_slices" in query:
                lease_slices = _flag(query["lease_slices"], "lease_slices")
            slice_lease_seconds = query.get("slice_lease_seconds", slice_lease_seconds)
        self.ledger_max_rows, self.ledger_retention_seconds = check_ledger_options(
            DEFAULT_LEDGER_MAX_ROWS if ledger_max_rows is None else ledger_max_rows,
            DEFAULT_LEDGER_RETENTION_SECONDS if ledger_retention_seconds is None else ledger_retention_seconds)
        self._ledger_args = (str(self.ledger_max_rows), str(self.ledger_retention_seconds * 1000))
        self._known_slots: set[str] = set()  # tags this process has put in the tag registry
        self._slots_since = time.monotonic()
        self._journal_rows: dict[int, LedgerRow] = {}  # journaled settles' rows, by journal seq
        if retry_window_seconds is None:
            retry_window_seconds = record_ttl_seconds  # the former name of the same setting
        if retry_window_seconds is None:
            retry_window_seconds = DEFAULT_RETRY_WINDOW_SECONDS
        self.retry_window_seconds = check_seconds(retry_window_seconds, "retry_window_seconds", MAX_RETRY_WINDOW_SECONDS)
        if isinstance(retention_seconds, bool) or not isinstance(retention_seconds, int) or not (
            0 <= retention_seconds <= 10 * 365 * 24 * 3600
        ):
            raise ValueError(f"retention_seconds must be whole seconds between 0 and 10 years, got {retention_seconds!r}")
        self.evicting_policy = evicting_policy or "refuse"
        if self.evicting_policy not in ("refuse", "warn"):
            raise ValueError(f"evicting_policy must be 'refuse' or 'warn', got {self.evicting_policy!r}")
        if journal is not None and journal_path is not None:
            raise ValueError("give journal_path or journal, not both")
        self.prefix = prefix
        self.retention_seconds = retention_seconds
        self.retry = retry or RetryPolicy()
        self._retry_ms = str(_ms(self.retry_window_seconds))
        if journal is None:
            journal = SqliteJournal(journal_path) if journal_path else MemoryJournal()
        self.journal: SettleJournal = journal
        self._mark_ttl_ms = "" if self.journal.durable else str(MEMORY_MARK_TTL_SECONDS * 1000)
        self._options = client_options
        self._sync: _Backend | None = None
        self._async_given: _Backend | None = None
        self._async_by_loop: weakref.WeakKeyDictionary[Any, _Backend] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        # a group's counter and lease-set (and index) names, and its index members
        self._group_keys: dict[tuple[_Group, bool], tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._releases: list[_PendingRelease] = []
        self._repair_lock = threading.Lock()  # one replay at a time
        self._repairer: threading.Thread | None = None
        self._closed = False
        # close() / aclose() began: from then on no timer reports a slice, so the settle, release
        # or renewal of a call admitted from one (in flight at close) reports its slices itself.
        self._closing = False
        # Called with (entry, crossings) when a journal replay fires alert thresholds.
        self.on_replay_crossed: Callable[[PendingSettle, tuple[Crossing, ...]], None] | None = None
        # Called with (call_id, crossings) when a carried settle, sent later, fires alert thresholds.
        self.on_carried_crossed: Callable[[str, tuple[Crossing, ...]], None] | None = None
        if carry_settles is not None and not isinstance(carry_settles, bool):
            raise ValueError(f"carry_settles must be True or False, got {carry_settles!r}")
        self.carry_settles = bool(carry_settles)
        self.carry_window_seconds = check_window(
            DEFAULT_CARRY_WINDOW_SECONDS if carry_window_seconds is None else carry_window_seconds)
        self._carry: SettleQueue | None = None  # (made once the clients are known, below)
        self._lease_ends: dict[str, float] = {}  # call id -> when its lease ends at the latest (carrying)
        self._expiry_charges: dict[str, dict[str, int]] = {}  # call id -> key -> what its hold charges on expiry
        if lease_slices is not None and not isinstance(lease_slices, bool):
            raise ValueError(f"lease_slices must be True or False, got {lease_slices!r}")
        self.lease_slices = bool(lease_slices)
        self._book: SliceBook | None = None
        self._checked_specs: dict[tuple[Counter, ...], dict[str, tuple[int, int | None, tuple[int, ...]]]] = {}
        self._slice_timer: threading.Thread | None = None
        if self.lease_slices:
            if self._target is None and not (is_sync_client(url_or_client) or is_sync_client(async_client)):
                raise ValueError("lease_slices needs a URL or a sync client (its timer reports slices with it); "
                                 "pass RedisStore(sync_client, async_client=async_client, lease_slices=True)")
            lease = SLICE_LEASE_SECONDS if slice_lease_seconds is None else slice_lease_seconds
            self._book = SliceBook(self.retry_window_seconds,
                                   lease_seconds=check_seconds(lease, "slice_lease_seconds", 3600.0))
            self._book.slot_of = _slot_part
            if "multiprocessing.util" in sys.modules:
                _hook_multiprocessing()
            me = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: (store := me()) is not None and store._forked_slices())
        if self._target is not None:
            self.where = describe_url(url_or_client)
        else:
            if client_options:
                raise TypeError(f"connection options {sorted(client_options)} apply to a URL, not to a client you built")
            clients = [url_or_client] + ([async_client] if async_client is not None else [])
            for client in clients:
                if is_async_client(client):
                    self._async_given = _Backend(client, [])
                elif is_sync_client(client):
                    self._sync = _Backend(client, [])
                else:
                    raise TypeError(
                        "RedisStore takes a redis URL or a redis-py client (redis.Redis, RedisCluster or "
                        f"their redis.asyncio twins), got {type(client).__name__}"
                    )
            self.where = describe_client(url_or_client)
        if self.carry_settles and self._target is None and self._sync is None:
            # The timer thread sends what no reserve carries, with a sync client; an event loop's
            # own timer is no guarantee (the loop may end first), so such a store sends at once.
            log.warning("budget store %s: carry_settles needs a URL or a sync client; settles are sent at once",
                        self.where)
            self.carry_settles = False
        if self.carry_settles:
            me = weakref.ref(self)
            self._carry = SettleQueue(self.carry_window_seconds, self._flush_carried_due,
                                      hold=lambda: _CARRYING.add(me()), let_go=lambda: _CARRYING.discard(me()))
            if "multiprocessing.util" in sys.modules:
                _hook_multiprocessing()
                sys.modules["multiprocessing.util"].register_after_fork(self, _hook_multiprocessing)
        _LIVE_STORES.add(self)
        if len(self.journal):  # a file journal left by an earlier process: replay it soon
            self._start_repairer()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStore:
        """A store for ``url``: ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://``,
        ``redis+sentinel://`` or any of them with ``?cluster=true`` (see the module docstring)."""
        if not isinstance(url, str):
            raise TypeError(f"RedisStore.from_url takes a URL string, got {type(url).__name__}")
        return cls(url, **kwargs)

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, prefix={self.prefix!r})"

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- key names ------------------------------------------------------------------------------

    def redis_keys(self, key: str) -> tuple[str, str]:
        """The Redis names of a counter: its hash and its lease set (for tools and tests)."""
        base = key if tag_of(key) else _slot_part(key)
        return self.prefix + base, self.prefix + "l:" + base

    def overrides_key(self, name: str) -> str:
        """The Redis name of budget ``name``'s live limit overrides (a hash)."""
        return f"{self.prefix}o:{{{escape_id(name)}}}"

    def record_key(self, call_id: str, key: str) -> str:
        """The Redis name of a call's record on the tag of counter ``key`` (for tools and tests)."""
        return f"{self.prefix}c:{_slot_part(key)}:{call_id}"

    def index_key(self, key: str) -> tuple[str, str] | None:
        """The Redis name of counter ``key``'s spend index and its member there (None: not indexed)."""
        found = index_name_of(key)
        if found is None:
            return None
        return f"{self.prefix}x:{_slot_part(key)}:{found[0]}", found[1]

    def ledger_key(self, key: str) -> str:
        """The Redis name of the ledger stream of counter ``key``'s tag."""
        return f"{self.prefix}ledger:{_slot_part(key)}"

    @property
    def tags_key(self) -> str:
        """The Redis name of the set of tags that hold spend indexes and ledger streams."""
        return f"{self.prefix}tags"

    def _counter_key_of(self, redis_key: str) -> str | None:
        """The counter key a Redis name stores, or None for lease sets, records and overrides."""
        if not redis_key.startswith(self.prefix):
            return None
        rest = redis_key[len(self.prefix) :]
        if rest.startswith("{"):
            return rest
        if rest.startswith("~{") and rest.endswith("}"):
            return rest[2:-1]
        return None

    def _scan_match(self, pattern: str) -> str:
        head = _glob_escape(self.prefix)
        return head + (_glob_escape(pattern, keep_star=True) if pattern.startswith("{") else "*")

    def _call(self, script: str, group: _Group, call_id: str | None, args: Sequence[str], *extra: str,
              indexed: bool = False) -> _Call:
        """A script call on one group: the call's record on that tag (if any), ``extra`` keys of
        that tag, then each counter's keys (``indexed``: with its spend index, and the members
        appended to ``args``)."""
        cache = (group, indexed)
        known = self._group_keys.get(cache)
        if known is None:
            names: list[str] = []
            for key in group.keys:
                names += self.redis_keys(key)
                if indexed:
                    found = self.index_key(key)
                    names.append(found[0] if found else self.redis_keys(key)[0])
            known = (tuple(names), tuple(self._members(group)) if indexed else ())
            if len(self._group_keys) >= 4096:
                self._group_keys.clear()
            self._group_keys[cache] = known
        keys, members = known
        if indexed:
            args = [*args, *members]
        if call_id is not None:
            keys = (f"{self.prefix}c:{group.slot}:{call_id}", *extra, *keys)
        return _Call(script, keys, tuple(args))

    def _members(self, group: _Group) -> list[str]:
        out = []
        for key in group.keys:
            found = index_name_of(key)
            out.append(found[1] if found else "")
        return out

    def _register_plan(self, groups: Sequence[_Group]) -> Plan[None]:
        """Put tags this process has not registered yet in the tag registry (once per process,
        before the tags' first write: a reader that finds no tag finds no index or ledger there)."""
        now = time.monotonic()
        if now - self._slots_since > TAGS_REFRESH_SECONDS:  # a Redis that lost its data forgot them
            self._known_slots, self._slots_since = set(), now
        new = [g.slot for g in groups if g.slot not in self._known_slots]
        if new:
            try:  # tried once; if it fails, the next operation on these tags tries again
                yield _Call("tags", (self.tags_key,), tuple(new), once=True)
            except _NotSent:
                raise  # an evicting policy: refused before anything is sent, as every operation is
            except BudgetStoreUnavailableError:
                return
            self._known_slots.update(new)

    # -- plans: the logic of each operation, shared by the sync and async shells ----------------

    def _checked(self, counters: Sequence[Counter], hold: Hold) -> tuple[str, str, float, dict[str, CounterHold]]:
        """A reserve's checked call id, token, lease and what it holds on each distinct key (a key
        listed twice, two limits on one counter, is held once, within the tighter limit)."""
        call_id = check_call_id(hold.call_id, "Hold.call_id")
        _check_amount(hold.amount, "Hold.amount")
        _check_amount(hold.charge_on_expiry, "Hold.charge_on_expiry")
        lease_seconds = check_seconds(hold.lease_seconds, "Hold.lease_seconds")
        token = check_token(hold.token)
        if self._book is None:
            return call_id, token, lease_seconds, counter_holds(counters, hold)
        # Counters that hold the hold's own amounts are checked once per distinct list: a guard
        # reserves the same counters call after call.
        specs = tuple(counters)
        try:
            known = self._checked_specs.get(specs)
        except TypeError:  # an unhashable field (alerts as a list): checked every time
            return call_id, token, lease_seconds, counter_holds(counters, hold)
        if known is None:
            if not all(c.amount is None and c.charge_on_expiry is None for c in specs):
                return call_id, token, lease_seconds, counter_holds(counters, hold)
            plans = counter_holds(specs, hold)
            if len(self._checked_specs) >= 4096:
                self._checked_specs.clear()
            self._checked_specs[specs] = {k: (p.limit, p.expires_at, p.alerts) for k, p in plans.items()}
            return call_id, token, lease_seconds, plans
        amount, charge = hold.amount, hold.charge_on_expiry
        return call_id, token, lease_seconds, {
            k: CounterHold(limit, expires, amount, charge, alerts) for k, (limit, expires, alerts) in known.items()}

    def _reserve_plan(self, counters: Sequence[Counter], hold: Hold) -> Plan[ReserveResult]:
        call_id, token, lease_seconds, plans = self._checked(counters, hold)
        if self._book is not None:
            return (yield from self._sliced_reserve_plan(counters, plans, hold, call_id, token))
        return (yield from self._redis_reserve_plan(counters, plans, call_id, token, lease_seconds))

    def _from_slices(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult | Plan[ReserveResult]:
        """A reserve admitted wholly from slices (no round trip, no plan), or the plan of the rest."""
        book = self._book
        assert book is not None
        call_id, token, _, plans = self._checked(counters, hold)
        taking = book.take(call_id, token, plans, time.monotonic())
        if not taking.refills and not taking.cold and taking.taken:
            book.commit(call_id, token, taking, time.monotonic() + hold.lease_seconds)
            by_key = {found.key: found.state for found, _, _ in taking.taken}
            return ReserveResult(ok=True, states=tuple(by_key[c.key] for c in counters))
        return self._sliced_reserve_plan(counters, plans, hold, call_id, token, taking)

    def _sliced_reserve_plan(self, counters: Sequence[Counter], plans: dict[str, CounterHold], hold: Hold,
                             call_id: str, token: str, taking: Taking | None = None) -> Plan[ReserveResult]:
        """Hot counters from this process's slices (refilled first where short), the rest in Redis."""
        book = self._book
        assert book is not None
        keys = [c.key for c in counters]
        if taking is None:
            taking = book.take(call_id, token, plans, time.monotonic())
        if not taking.refills and not taking.cold and taking.taken:  # all from slices: no round trip
            book.commit(call_id, token, taking, time.monotonic() + hold.lease_seconds)
            by_key = {found.key: found.state for found, _, _ in taking.taken}
            return ReserveResult(ok=True, states=tuple(by_key[k] for k in keys))
        if taking.refills and (self._slice_timer is None or not self._slice_timer.is_alive()):
            self._start_slice_timer()
        if taking.duplicate or taking.reused:
            return ReserveResult(ok=taking.duplicate, states=tuple(CounterState() for _ in counters),
                                 duplicate=taking.duplicate, reused=taking.reused)
        crossed: list[Crossing] = []
        try:
            for report in taking.refills:
                yield from self._report_plan(report, keys, crossed)
                book.take_refilled(report, plans[report.slice.key], time.monotonic(), taking)
            if taking.cold:
                cold = {k: plans[k] for k in taking.cold}
                result = yield from self._redis_reserve_plan(counters, cold, call_id, token, hold.lease_seconds)
                if not result.ok and result.blocked is not None:
                    # Refused in Redis, maybe only for what this process's own slice holds: let a
                    # report of it in flight land, return what it does not need, and try again.
                    key = counters[result.blocked].key
                    waited = 0
                    while book.reporting([key]) and waited < 1000:
                        yield _WAIT
                        waited += 1
                    back = book.give_back(key, time.monotonic())
                    if back is not None and (yield from self._report_plan(back, keys, crossed)) or waited:
                        result = yield from self._redis_reserve_plan(counters, cold, call_id, token,
                                                                     hold.lease_seconds)
            else:
                result = ReserveResult(ok=True, states=tuple(CounterState() for _ in counters))
        except BaseException:
            book.undo(taking.taken)
            raise
        if not result.ok:
            book.undo(taking.taken)
            return ReserveResult(ok=False, states=result.states, blocked=result.blocked, reused=result.reused,
                                 crossed=(*crossed, *result.crossed))
        book.commit(call_id, token, taking, time.monotonic() + hold.lease_seconds)
        states = list(result.states)
        for found, amount, _ in taking.taken:
            for index, key in enumerate(keys):
                if key == found.key:
                    states[index] = found.state
        return ReserveResult(ok=True, states=tuple(states), duplicate=result.duplicate, crossed=(*crossed, *result.crossed))

    def _redis_reserve_plan(self, counters: Sequence[Counter], plans: dict[str, CounterHold], call_id: str,
                            token: str, lease_seconds: float) -> Plan[ReserveResult]:
        """The reserve in Redis of ``plans`` (every counter, or those not admitted from slices)."""
        lease_ms = str(_ms(lease_seconds))
        tombstone_ms = str(_ms(lease_seconds) + int(self._retry_ms))
        groups = _groups(list(plans))
        yield from self._register_plan(groups)
        states = [CounterState()] * len(counters)
        placed: list[tuple[_Group, list[CounterState], bool]] = []  # group, states before, was new
        keys = [c.key for c in counters]
        crossed: list[Crossing] = []
        # A settle this store carries waits in the process while its hold stays in Redis: if the
        # process dies then, the call was served, so its hold charges all it reserved on expiry.
        whole = self._carry is not None
        for number, group in enumerate(groups):
            args = [call_id, lease_ms, self._retry_ms, token]
            for key in group.keys:
                p = plans[key]
                args += [str(p.limit), "" if p.expires_at is None else str(p.expires_at), str(p.amount),
                         str(max(p.amount, p.charge_on_expiry) if whole else p.charge_on_expiry),
                         ",".join(map(str, p.alerts))]
            try:
                reply = yield from self._carrying_plan(self._call("reserve", group, call_id, args, indexed=True),
                                                       group.slot)
            except BudgetStoreUnavailableError as exc:
                # This tag may have run the reserve (a lost reply, a timeout while the server was
                # stalled): release it and every tag placed, with a tombstone against late runs.
                reached = [g for g, _, _ in placed] + ([] if isinstance(exc, _NotSent) else [group])
                yield from self._release(reached, call_id, token, tombstone_ms, lease_seconds)
                raise
            except BaseException:
                # Cancelled or interrupted while this tag's reserve was in flight (it may still run
                # once its node answers): nothing may be awaited now, so the releases of every tag
                # placed and of this one are queued, tombstoned, for the background repair.
                self._queue_releases([g for g, _, _ in placed] + [group], call_id, token, tombstone_ms,
                                     lease_seconds)
                raise
            width = 2 + 2 * len(group.keys)
            code, found = int(reply[0]), _states(reply[2:width])
            crossed += _crossings(reply[width:], keys, group)
            _fill(states, keys, group, found)
            if code == 3:
                yield from self._release([g for g, _, _ in placed], call_id, token, "", lease_seconds)
                return ReserveResult(ok=False, states=tuple(states), reused=True, crossed=tuple(crossed))
            if code == 0:
                yield from self._release([g for g, _, _ in placed], call_id, token, "", lease_seconds)
                # Read the tags not tried yet, so that the refusal shows every counter and names
                # the first one, in the caller's order, that cannot take the hold.
                for later in groups[number + 1 :]:
                    try:  # (a read reaps but fires no alerts: the next reserve or settle does)
                        read = yield self._call("read", later, None, [self._retry_ms])
                        _fill(states, keys, later, _read_states(read))
                    except BudgetStoreUnavailableError:
                        pass  # the refusal stands; those counters show zeros
                refused = keys.index(group.keys[int(reply[1]) - 1])
                too_full = (
                    i for i, (c, s) in enumerate(zip(counters, states))
                    if c.key in plans and s.spent + s.held + plans[c.key].amount > c.limit
                )
                blocked = next(too_full, refused)
                return ReserveResult(ok=False, states=tuple(states), blocked=min(blocked, refused), crossed=tuple(crossed))
            # 1: placed now; 2: placed by an earlier try of this very attempt (its reply was lost).
            placed.append((group, found, code == 1))
        for group, found, new in placed:
            if new:
                held = [CounterState(s.spent, s.held + plans[k].amount) for k, s in zip(group.keys, found)]
                _fill(states, keys, group, held)
        if whole:  # a settle above this is never queued: the expiry would undercharge it
            self._expiry_charges[call_id] = {k: max(p.amount, p.charge_on_expiry) for k, p in plans.items()}
        duplicate = bool(placed) and not any(new for _, _, new in placed)
        return ReserveResult(ok=True, states=tuple(states), duplicate=duplicate, crossed=tuple(crossed))

    def _release(
        self, groups: list[_Group], call_id: str, token: str, tombstone_ms: str, lease_seconds: float
    ) -> Plan[None]:
        """Release the call's holds on ``groups``. One that cannot reach Redis now is queued and
        retried (after later operations, and by a background thread) until the lease and the
        retry window are over, after which Redis no longer needs it (the records are gone)."""
        for number, group in enumerate(groups):
            call = self._release_call(group, call_id, token, tombstone_ms)
            try:
                yield call
            except BudgetStoreUnavailableError:
                give_up = time.monotonic() + lease_seconds + self.retry_window_seconds
                with self._lock:
                    self._releases.append(_PendingRelease(call, give_up))
                log.warning("could not release call %s on %s yet; retrying in the background", call_id, group.slot)
                self._start_repairer()
            except BaseException:  # cancelled or interrupted: this release and the rest are queued
                self._queue_releases(groups[number:], call_id, token, tombstone_ms, lease_seconds)
                raise

    def _release_call(self, group: _Group, call_id: str, token: str, tombstone_ms: str) -> _Call:
        call = self._call("release", group, call_id, [call_id, token, tombstone_ms])
        return _Call(call.script, call.keys, call.args, once=True)

    def _queue_releases(self, groups: Sequence[_Group], call_id: str, token: str, tombstone_ms: str,
                        lease_seconds: float) -> None:
        """Queue the call's releases on ``groups`` without sending them (the caller was cancelled
        or interrupted: nothing may be awaited); the repairer thread, or the store's next
        operation, sends them until the lease and the retry window are over."""
        if not groups:
            return
        give_up = time.monotonic() + lease_seconds + self.retry_window_seconds
        queued = [_PendingRelease(self._release_call(g, call_id, token, tombstone_ms), give_up) for g in groups]
        with self._lock:
            self._releases.extend(queued)
        log.warning("call %s was interrupted while reserving; its holds on %s are released in the background",
                    call_id, ", ".join(g.slot for g in groups))
        self._start_repairer()

    def release(self, call_id: str, keys: Sequence[str], hold: Hold) -> None:
        """Release a reservation whose call does not go ahead (charge nothing), leaving a
        tombstone so that the call id admits nothing more. Retried in the background if Redis
        cannot be reached."""
        self._run(self._release_plan(call_id, keys, hold))

    async def arelease(self, call_id: str, keys: Sequence[str], hold: Hold) -> None:
        await self._arun(self._release_plan(call_id, keys, hold))

    def _release_plan(self, call_id: str, keys: Sequence[str], hold: Hold) -> Plan[None]:
        check_call_id(call_id)
        lease = check_seconds(hold.lease_seconds, "Hold.lease_seconds")
        tombstone_ms = str(_ms(lease) + int(self._retry_ms))
        self._lease_ends.pop(call_id, None)
        self._expiry_charges.pop(call_id, None)
        if self._book is not None:
            local = self._book.release(call_id, check_token(hold.token), time.monotonic())
            if local is not None:
                if local is not SETTLED_BEFORE:
                    self._start_slice_timer()  # (a release after expiry has its refund to report)
                    if self._closing:  # (read after the release: see _late_reports_plan)
                        yield from self._late_reports_plan()
                if not local.cold:  # (SETTLED_BEFORE has none: nothing to release)
                    return
                keys = local.cold
        if self._carry is not None and len(self._carry):  # a settled call stays settled: send its settle first
            yield from self._flush_plan(self._carry.take_call(call_id))
        yield from self._release(_groups(keys), call_id, check_token(hold.token), tombstone_ms, lease)

    def _settle_plan(self, call_id: str, keys: Sequence[str], amount: int, seq: int = 0,
                     row: LedgerRow | None = None, amounts: Sequence[int] | None = None,
                     crossed: list[Crossing] | None = None) -> Plan[SettleResult]:
        """The settle, tag by tag; ``crossed`` (if given) collects crossings as tags answer, so
        that a settle journaled half-way still reports those of the tags it reached."""
        groups, calls, amount, capped = self._settle_calls(call_id, keys, amount, seq, row, amounts)
        yield from self._register_plan(groups)
        applied = False
        found: list[Crossing] = [] if crossed is None else crossed
        for group, call in zip(groups, calls):
            reply = yield call
            applied = bool(int(reply[0])) or applied
            found += _crossings(reply[1:], keys, group)
        return SettleResult(applied=applied, charged=amount if applied else 0, capped=capped, crossed=tuple(found))

    def _settle_calls(self, call_id: str, keys: Sequence[str], amount: int, seq: int = 0,
                      row: LedgerRow | None = None, amounts: Sequence[int] | None = None,
                      ) -> tuple[list[_Group], list[_Call], int, bool]:
        """A settle's checked script calls, one per tag (the ledger row with the first), the
        amount it charges (capped at MAX_NANO) and whether it was capped."""
        check_call_id(call_id)
        if row is not None and not isinstance(row, LedgerRow):
            raise TypeError(f"row: expected a LedgerRow, got {type(row).__name__}")
        capped = isinstance(amount, int) and not isinstance(amount, bool) and amount > MAX_NANO
        if capped:
            log.error("settle of call %s: %d nano-USD is above the maximum; charging %d", call_id, amount, MAX_NANO)
            amount = MAX_NANO
        # attempt: the same on the store's retries of this settle, so that a retry whose first
        # reply was lost gets the alerts that run fired (the record keeps them), a new settle none.
        fixed = [call_id, _check_amount(amount, "settle amount"), self._retry_ms, str(seq) if seq else "",
                 self._mark_ttl_ms, *self._ledger_args, secrets.token_hex(8)]
        charges, capped_one = key_amounts(keys, amount, amounts)
        groups = _groups(keys)
        fields = row.fields() if row is not None else []
        calls = []
        for number, group in enumerate(groups):
            mark = f"{self.prefix}j:{group.slot}:{self.journal.journal_id}"
            stream = f"{self.prefix}ledger:{group.slot}"
            args = [*fixed, *(str(charges[key]) for key in group.keys)]
            call = self._call("settle", group, call_id, args, mark, stream, indexed=True)
            if number == 0 and fields:  # the row goes with the call's first tag, once
                call = _Call(call.script, call.keys, (*call.args, *fields))
            calls.append(call)
        return groups, calls, amount, capped or capped_one

    # -- leased slices (stores.slices) ------------------------------------------------------------

    def _report_plan(self, report: Report, keys: Sequence[str] = (), crossed: list[Crossing] | None = None) -> Plan[bool]:
        """Send one slice report (``lua/slice.lua``); False when Redis could not be reached (the
        report is kept and sent again as it is). Crossings go to ``crossed`` (at the slice key's
        position in ``keys``), or to ``on_carried_crossed`` when nobody waits for them."""
        book = self._book
        assert book is not None
        found = report.slice
        group = _groups_of((found.key,))[0]
        counter, leases = self.redis_keys(found.key)
        indexed = self.index_key(found.key)
        names = [counter, leases, indexed[0] if indexed else counter, f"{self.prefix}ledger:{group.slot}",
                 f"{self.prefix}sl:{group.slot}:{found.sid}"]
        args = [found.sid, str(report.seq), str(report.limit), "" if report.expires_at is None else str(report.expires_at),
                ",".join(map(str, report.alerts)), indexed[1] if indexed else "", str(report.kept), str(report.want),
                str(report.need), str(book.div),
                str(_ms(book.lease_seconds)), self._retry_ms, *self._ledger_args, str(len(report.batch)),
                str(report.total) if report.total >= 0 else "-" + str(-report.total)]
        # Each call's record (settled elsewhere? admitted here: see lua/slice.lua), its row apart.
        record = f"{self.prefix}c:{group.slot}:"
        rows: list[tuple[LedgerRow, int]] = []
        checked: list[str] = []
        for r in report.batch:
            number = 0
            if r.row is not None:
                rows.append((r.row, r.row_amount))
                number = len(rows)
            if not r.own:
                names.append(record + r.call_id)
                checked += [r.kind, str(r.amount), r.call_id, str(number)]
        admitted = report.admitted or ()
        names += [record + call_id for call_id, _, _ in admitted]
        shared, packed = LedgerRow.packed_rows(rows)
        args += [str(len(rows)), shared, str(len(checked) // 4), str(len(admitted)), *packed, *checked]
        for _, token, left in admitted:
            args += [token, str(left)]
        try:
            yield from self._register_plan([group])
            reply = yield _Call("slice", tuple(names), tuple(args))
        except BudgetStoreUnavailableError:
            book.failed(report, time.monotonic())
            return False
        except BaseException:  # cancelled, or a bug: the outcome is unknown, so the report is kept
            book.failed(report, time.monotonic())
            raise
        book.reported(report, int(reply[1]), CounterState(int(reply[2]), int(reply[3])), time.monotonic())
        fired = reply[4:]
        if fired:
            index = keys.index(found.key) if found.key in keys else 0
            found_crossings = [Crossing(index, found.key, int(fired[j + 1]), int(fired[j + 2]))
                               for j in range(0, len(fired) - 2, 3)]
            if crossed is not None:
                crossed += found_crossings
            else:
                self._hand_crossings(report.batch[-1].call_id if report.batch else "", tuple(found_crossings))
        return True

    def _reports_plan(self, reports: Sequence[Report]) -> Plan[int]:
        sent = 0
        for report in reports:
            sent += bool((yield from self._report_plan(report)))
        return sent

    def _final_reports_plan(self) -> Plan[int]:
        """Return every slice (close, exit): a slice whose report is in flight once it lands, one
        whose kept report kept its free part once that landed; ``FINAL_REPORT_WAIT_SECONDS`` at most."""
        book = self._book
        assert book is not None
        sent, until = 0, time.monotonic() + FINAL_REPORT_WAIT_SECONDS
        while True:
            reports = book.due(time.monotonic(), final=True)
            done = yield from self._reports_plan(reports)
            sent += done
            again = done == len(reports) and any(r.keep_free for r in reports)
            if not (again or book.reporting(None)) or time.monotonic() >= until:
                return sent
            while book.reporting(None) and time.monotonic() < until:
                yield _WAIT

    def _late_reports_plan(self) -> Plan[int]:
        """After close() began, a call admitted from a slice that settles, releases or renews
        reports its slices at once (no timer does any more; close returned each slice but for what
        its calls in flight hold): the counter is charged what the call cost, not its hold. Read
        ``_closing`` after the book recorded the change: a change close's final reports did not
        see is then reported here (one they did see, or one in flight, changes nothing more)."""
        if self._book is None or not len(self._book):
            return 0
        return (yield from self._final_reports_plan())

    def _local_settle(self, call_id: str, keys: Sequence[str], amount: int, amounts: Sequence[int] | None,
                      row: LedgerRow | None) -> SettleResult | tuple[tuple[str, ...], list[int] | None] | None:
        """The settle of a call admitted from slices: its slices' part waits for their reports.
        Returns the result, or the call's counters in Redis (and their amounts) left to settle
        as usual, or None for a call this process did not admit from slices."""
        assert self._book is not None
        check_call_id(call_id)
        capped = isinstance(amount, int) and not isinstance(amount, bool) and amount > MAX_NANO
        if capped:
            log.error("settle of call %s: %d nano-USD is above the maximum; charging %d", call_id, amount, MAX_NANO)
            amount = MAX_NANO
        _check_amount(amount, "settle amount")
        if row is not None and not isinstance(row, LedgerRow):
            raise TypeError(f"row: expected a LedgerRow, got {type(row).__name__}")
        charges, capped_one = key_amounts(keys, amount, amounts)
        now = time.monotonic()
        call = self._book.settle(call_id, charges, amount, row, now)
        if call is None:
            self._book.burn(call_id, now)
            return None
        if call is SETTLED_BEFORE:
            return SettleResult(applied=False)
        self._start_slice_timer()  # (a late settle may put back a slice the timer returned and left)
        sliced = {found.key for found, _, _ in call.taken}
        rest = tuple(k for k in dict.fromkeys(keys) if k not in sliced)  # in Redis (or never held there)
        if rest:
            return rest, None if amounts is None else [charges[k] for k in rest]
        return SettleResult(applied=True, charged=amount, capped=capped or capped_one)

    def _hand_crossings(self, call_id: str, crossed: tuple[Crossing, ...]) -> None:
        hook = self.on_carried_crossed
        if hook is None:
            log.warning("settle of call %s crossed alert thresholds (no on_carried_crossed): %s", call_id, crossed)
            return
        try:
            hook(call_id, crossed)
        except Exception:  # noqa: BLE001 - a failing hook must not fail the operation that sent it
            log.exception("on_carried_crossed failed for call %s", call_id)

    def flush_slices(self, final: bool = False) -> int:
        """Send the reports that are due (``final``: return every slice, once the reports in
        flight landed, waiting ``FINAL_REPORT_WAIT_SECONDS`` at most); returns how many
        reached Redis. The store's timer calls this; ``close()`` and exit with ``final``."""
        if self._book is None or not len(self._book) or self._sync is None and self._target is None:
            return 0
        return self._run(self._final_reports_plan() if final else self._reports_plan(self._book.due(time.monotonic())))

    async def aflush_slices(self, final: bool = False) -> int:
        """Async twin of ``flush_slices``."""
        if self._book is None or not len(self._book):
            return 0
        return await self._arun(self._final_reports_plan() if final
                                else self._reports_plan(self._book.due(time.monotonic())))

    def slice_holdings(self) -> dict[str, tuple[int, int, int]]:
        """This process's slices: counter key -> (leased, held by its calls in flight, settled
        here and not reported yet)."""
        return self._book.holdings() if self._book is not None else {}

    def _report_waiting(self) -> None:
        """Before a ledger or index read: report every settle made from this process's slices."""
        if self._book is not None and len(self._book) and (self._sync is not None or self._target is not None):
            self._run(self._reports_plan(self._book.waiting(None, time.monotonic())))

    def _wait_for_reports(self, keys: Sequence[str], timeout: float = 2.0) -> None:
        """Let a report of these counters' slices that is in flight (the timer's) land first."""
        if self._book is None or not len(self._book):
            return
        until = time.monotonic() + timeout
        while self._book.reporting(keys) and time.monotonic() < until:
            time.sleep(0.001)

    async def _await_reports(self, keys: Sequence[str], timeout: float = 2.0) -> None:
        if self._book is None or not len(self._book):
            return
        until = time.monotonic() + timeout
        while self._book.reporting(keys) and time.monotonic() < until:
            await asyncio.sleep(0.001)

    def _forked_slices(self) -> None:
        """In a forked child: the parent's slices are the parent's to report and return."""
        if self._book is not None:
            self._book.forked()
        self._slice_timer = None
        _SLICING.discard(self)
        mp_util = sys.modules.get("multiprocessing.util")
        if mp_util is not None:  # a multiprocessing child: its own slices are returned when it ends
            mp_util.register_after_fork(self, _hook_multiprocessing)

    def _start_slice_timer(self) -> None:
        """Start the slice timer unless it runs (call it after the book got something to report:
        the timer, under ``_lock``, stops only when it finds the book empty)."""
        if self._closed or self._slice_timer is not None and self._slice_timer.is_alive():
            return
        with self._lock:
            if self._closed or self._slice_timer is not None and self._slice_timer.is_alive():
                return
            _SLICING.add(self)
            self._slice_timer = threading.Thread(target=_slice_loop, args=(weakref.ref(self),), daemon=True,
                                                 name="budgetguard-slices")
            self._slice_timer.start()

    # -- carried settles (stores.carry) ---------------------------------------------------------

    def _note_lease(self, call_id: str, ends: float) -> None:
        """When (monotonic, at the latest) the lease of a hold this store placed or renewed ends."""
        leases = self._lease_ends
        leases[call_id] = ends
        if len(leases) > 10_000:  # calls that never settled here (released, or settled elsewhere)
            now = time.monotonic()
            for old in [c for c, e in leases.items() if e < now]:
                leases.pop(old, None)
            for old in [c for c in self._expiry_charges if c not in leases]:
                self._expiry_charges.pop(old, None)

    def _carry_settle(self, call_id: str, keys: Sequence[str], amount: int, amounts: Sequence[int] | None,
                      row: LedgerRow | None) -> SettleResult | None:
        """Queue a settle for the next reserve on its tag; None when it must go now (several
        tags, a tag this process has not registered yet, a hold whose lease this store did not
        place or that may end before the queue is sent: it must never be reaped first, or a
        settle above what the hold charges on expiry: a process killed meanwhile would
        undercharge it)."""
        groups, calls, charged, capped = self._settle_calls(call_id, keys, amount, 0, row, amounts)
        ends = self._lease_ends.pop(call_id, None)
        charges = self._expiry_charges.pop(call_id, None)
        if ends is None or ends - time.monotonic() < CARRY_LEASE_MARGIN + 2 * self.carry_window_seconds:
            return None
        each = [amount] * len(keys) if amounts is None else amounts
        if charges is None or any(charges.get(k, -1) < a for k, a in zip(keys, each)):
            return None
        if len(groups) != 1 or groups[0].slot not in self._known_slots or self._carry is None or self._closed:
            return None
        call = calls[0]
        entry = CarriedSettle(groups[0].slot, call.keys, call.args, call_id, tuple(keys), charged,
                              None if amounts is None else tuple(amounts), row)
        if not self._carry.put(entry):  # closed meanwhile: sent at once
            return None
        return SettleResult(applied=False, charged=charged, pending=True, capped=capped)

    def _queued_first(self, call_id: str, plan: Plan[T]) -> Plan[T]:
        """``plan`` (a settle of ``call_id`` sent at once) after the call's queued settle, if any:
        the first settle of a call wins, as without carrying."""
        if self._carry is not None:
            yield from self._wait_timer_plan(call_id)
            if self._carry.has_call(call_id):
                yield from self._flush_plan(self._carry.take_call(call_id))
        return (yield from plan)

    def _wait_timer_plan(self, call_id: str | None = None) -> Plan[None]:
        """Wait (at most FLUSH_WAIT_SECONDS) while the timer thread sends settles (of ``call_id``)."""
        assert self._carry is not None
        waited = 0
        while self._carry.in_flight(call_id) and waited * _WAIT_SECONDS < FLUSH_WAIT_SECONDS:
            yield _WAIT
            waited += 1

    def _drain_plan(self) -> Plan[None]:
        """Every settle of this process in Redis: the timer's flush in flight, then the queue."""
        assert self._carry is not None
        yield from self._wait_timer_plan()
        if len(self._carry):
            yield from self._flush_plan(self._carry.take_all())

    def _carrying_plan(self, alone: _Call, slot: str) -> Plan[Any]:
        """``alone`` (a reserve on tag ``slot``) sent with the settles queued for that tag; the
        reserve's reply. A script the server refuses fails whole (one bad key: WRONGTYPE): the
        settles then go one by one (those before the bad one did apply: idempotent), and the
        reserve alone. Carried settles that cannot be sent, or whose caller is interrupted or
        cancelled meanwhile, are journaled."""
        call, carried = self._carried_call(alone, slot)
        if not carried:
            return (yield call)
        try:
            reply = yield call
        except BudgetStoreUnavailableError as exc:
            if not _refused_script(exc):
                self._carry_failed(carried, exc)
                raise
        except BaseException as exc:
            self._carry_failed(carried, exc)
            raise
        else:
            return self._carry_done(carried, reply)
        yield from self._flush_plan(carried, size=1)
        return (yield alone)

    def _carried_call(self, call: _Call, slot: str) -> tuple[_Call, list[CarriedSettle]]:
        """``call`` (a reserve on tag ``slot``) with the settles queued for that tag, if any."""
        carried = self._carry.take(slot) if self._carry is not None else []
        if not carried:
            return call, carried
        keys, args = carry_arguments(carried, call.keys, call.args)
        return _Call("carry", keys, args), carried

    def _carry_done(self, carried: Sequence[CarriedSettle], reply: Any) -> Any:
        """Hand the crossings of carried settles to ``on_carried_crossed``; returns the reserve's reply."""
        for entry, answer in zip(carried, reply[1:]):
            if not int(answer[0]):
                continue  # settled before (a retried script call whose reply was lost)
            crossed = tuple(_crossings(answer[1:], entry.counter_keys, _groups(entry.counter_keys)[0]))
            if not crossed:
                continue
            hook = self.on_carried_crossed
            if hook is None:
                log.warning("carried settle of call %s crossed alert thresholds (no on_carried_crossed): %s",
                            entry.call_id, crossed)
                continue
            try:
                hook(entry.call_id, crossed)
            except Exception:  # noqa: BLE001 - a failing hook must not fail the reserve
                log.exception("on_carried_crossed failed for call %s", entry.call_id)
        return reply[0]

    def _carry_failed(self, carried: Sequence[CarriedSettle], exc: BaseException) -> None:
        """Carried settles whose script call failed or was interrupted: journaled, replayed
        exactly once later (the settle script is idempotent by call id: one that did apply
        changes nothing the second time)."""
        for entry in carried:
            self._journal_settle(entry.call_id, entry.counter_keys, entry.amount, exc, entry.row, entry.amounts)

    def _flush_plan(self, entries: Sequence[CarriedSettle], size: int = MAX_CARRIED) -> Plan[None]:
        """Send queued settles on their own, one script call per tag (at most ``size`` each); a
        script the server refuses is sent again settle by settle, so that one bad key fails
        only its own settle."""
        by_slot: dict[str, list[CarriedSettle]] = {}
        for entry in entries:
            by_slot.setdefault(entry.slot, []).append(entry)
        chunks = [batch[start : start + size] for batch in by_slot.values() for start in range(0, len(batch), size)]
        for number, chunk in enumerate(chunks):
            keys, args = carry_arguments(chunk)
            try:
                reply = yield _Call("carry", keys, args)
            except BudgetStoreUnavailableError as exc:
                if len(chunk) == 1 or not _refused_script(exc):
                    self._carry_failed(chunk, exc)
                    continue
                reply = None
            except BaseException as exc:  # cancelled or interrupted: this chunk and the rest are journaled
                self._carry_failed([e for rest in chunks[number:] for e in rest], exc)
                raise
            if reply is not None:
                self._carry_done(chunk, reply)
                continue
            try:
                yield from self._flush_plan(chunk, size=1)
            except BaseException as exc:
                self._carry_failed([e for rest in chunks[number + 1 :] for e in rest], exc)
                raise

    def _flush_carried_due(self, entries: list[CarriedSettle]) -> None:
        """The timer thread's flush (sync client)."""
        plan = self._flush_plan(entries)
        try:
            self._run(plan)
        except BaseException as exc:
            self._flush_broke(plan, entries, exc)
            if not isinstance(exc, Exception):
                raise

    def _flush_broke(self, plan: Plan[None], entries: list[CarriedSettle], exc: BaseException) -> None:
        """A flush that raised: a plan that started journaled what it did not send; one that
        never started (its client could not be built) leaves them all to journal here."""
        if inspect.getgeneratorstate(plan) == inspect.GEN_CREATED:
            self._carry_failed(entries, exc)
        if isinstance(exc, Exception):  # a bug or a client that cannot be built: say so
            log.error("flushing carried settles of %s failed; journaled", self.where, exc_info=exc)

    def flush_carried(self) -> int:
        """Send every queued carried settle now (sync client); returns how many were queued."""
        if self._carry is None:
            return 0
        self._carry.wait_flushed(FLUSH_WAIT_SECONDS)  # (exit, close: never under the timer's flush)
        entries = self._carry.take_all()
        if entries:
            self._flush_carried_due(entries)
        return len(entries)

    async def aflush_carried(self) -> int:
        """Async twin of ``flush_carried``."""
        if self._carry is None:
            return 0
        if self._carry.in_flight():
            await asyncio.to_thread(self._carry.wait_flushed, FLUSH_WAIT_SECONDS)
        entries = self._carry.take_all()
        if not entries:
            return 0
        plan = self._flush_plan(entries)
        try:
            await self._arun(plan)
        except BaseException as exc:  # (CancelledError too: asyncio.run ending, a wait_for)
            self._flush_broke(plan, entries, exc)
            if not isinstance(exc, Exception):
                raise
        return len(entries)

    def _renew_plan(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> Plan[bool]:
        check_call_id(call_id)
        args = [call_id, str(_ms(check_seconds(lease_seconds, "lease_seconds"))), self._retry_ms]
        if self._book is not None and self._book.calls:
            local = self._book.renew(call_id, time.monotonic() + lease_seconds)
            if local is not None:  # its slices' leases are renewed by the store's timer
                if self._closing:  # (none after close: the renewal renews them)
                    yield from self._late_reports_plan()
                if not local.cold:
                    return True
                keys = local.cold
        if self._carry is not None and self._carry.has_call(call_id):
            return False  # settled (the settle is on its way): nothing to renew
        renewed = False
        for group in _groups(keys):
            renewed = bool(int((yield self._call("renew", group, call_id, args)))) or renewed
        return renewed

    def _read_plan(self, keys: Sequence[str]) -> Plan[list[CounterState]]:
        if self._carry is not None:  # a read sees every settle of this process
            yield from self._drain_plan()
        if self._book is not None and len(self._book):
            yield from self._reports_plan(self._book.waiting(keys, time.monotonic(), give_back=True))
        states = [CounterState()] * len(keys)
        for group in _groups(keys):
            _fill(states, keys, group, _read_states((yield self._call("read", group, None, [self._retry_ms]))))
        if self._book is not None and len(self._book):
            # What is left of this process's own slices holds its calls in flight: held, not sliced.
            own = self._book.holdings()
            states = [CounterState(s.spent, s.held, max(0, s.sliced - own[k][0])) if k in own and s.sliced else s
                      for k, s in zip(keys, states)]
        return states

    def _read_overrides_plan(self, name: str, known_version: str | None) -> Plan[OverridesSnapshot]:
        reply = yield _Call("overrides", (self.overrides_key(name),), (known_version or "",))
        version = _text(reply[0])
        if len(reply) < 2:
            return OverridesSnapshot(version, None)
        flat = reply[1]
        return OverridesSnapshot(version, {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)})

    def _set_override_plan(self, name: str, field: str, nano: int | None) -> Plan[str]:
        value = "" if nano is None else _check_amount(nano, "override")
        if not field or ":" not in field:
            raise ValueError(f"override field must look like 'user:day:alice', got {field!r}")
        return _text((yield _Call("override", (self.overrides_key(name),), (field, value))))

    def _reset_plan(self, key: str) -> Plan[CounterState]:
        if self._carry is not None:  # settles made before the reset count before it
            yield from self._drain_plan()
        if self._book is not None and len(self._book):
            yield from self._reports_plan(self._book.waiting([key], time.monotonic(), give_back=True))
        found = self.index_key(key)
        if found is None:
            reply = yield _Call("reset", self.redis_keys(key), (self._retry_ms,))
        else:
            reply = yield _Call("reset", (*self.redis_keys(key), found[0]), (self._retry_ms, found[1]))
        return CounterState(int(reply[0]), int(reply[1]))

    # -- errors ---------------------------------------------------------------------------------

    def _unavailable(self, call: _Call, exc: Exception, attempts: int, started: float) -> BudgetStoreUnavailableError:
        self._known_slots = set()  # Redis may come back empty (a restart without persistence): register again
        if isinstance(exc, BudgetStoreUnavailableError):
            return exc
        text = str(exc)
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or text.startswith("OOM"):
            advice = (
                "Redis is out of memory (maxmemory reached under noeviction): raise maxmemory or free memory; "
                "do not switch to an evicting policy, which would silently reset budgets."
            )
        elif text.startswith("MISCONF"):
            advice = "Redis cannot persist to disk (MISCONF): fix its disk or its save settings."
        elif text.startswith("READONLY") or isinstance(exc, redis.exceptions.ReadOnlyError):
            advice = "the store is connected to a read-only replica: point it at the primary (or use Sentinel/Cluster URLs)."
        elif _is_transient(exc):
            advice = (
                "Check that the Redis server is running and reachable from this host (address, password, TLS, "
                "firewall), or give the store a larger RetryPolicy."
            )
        else:
            advice = "Redis refused the command: check that the prefix's keys are not used by another application."
        return BudgetStoreUnavailableError(
            f"Redis budget store at {self.where} is unavailable: {call.script} failed after {attempts} "
            f"attempt(s) in {time.monotonic() - started:.1f}s ({type(exc).__name__}: {exc}). {advice} Settles are "
            "journaled and replayed once Redis answers; whether new calls go ahead meanwhile is the guard's "
            "fail-open/fail-closed policy."
        )

    def _policy_refusal(self, policy: str) -> str:
        return (
            f"Redis at {self.where} has maxmemory-policy {policy}: it may evict budget counters (they have "
            "TTLs), which silently resets budgets. Set `CONFIG SET maxmemory-policy noeviction` (and "
            "`maxmemory-policy noeviction` in redis.conf), or give the store its own Redis; "
            "RedisStore(..., evicting_policy='warn') (URL: ?evicting_policy=warn) only warns."
        )

    def _judge_policy(self, backend: _Backend, reply: Any) -> None:
        evicting = sorted(set(_policies(reply)) & EVICTING_POLICIES)
        if not evicting:
            backend.policy_checked = True
            return
        message = self._policy_refusal(",".join(evicting))
        if self.evicting_policy == "warn":
            log.warning("%s", message)
            backend.policy_checked = True
            return
        backend.policy_refused_at = time.monotonic()
        raise _NotSent(message)

    def _judge_cluster_policy(self, backend: _Backend, replies: dict[str, Any], away: int) -> None:
        """A cluster's primaries are read one by one: one that is down fails only the calls of
        its own slots (an evicting policy on any that answered is refused, as on one server);
        while any did not answer, the policy is read again every 5 s."""
        self._judge_policy(backend, replies)
        if away:
            backend.policy_checked = False
            backend.policy_again_at = time.monotonic() + 5

    def _check_policy(self, backend: _Backend) -> None:
        """Read maxmemory-policy once (again every 5 s while it is an evicting one)."""
        if backend.policy_checked:
            return
        if time.monotonic() - backend.policy_refused_at < 5:
            raise _NotSent(self._policy_refusal("(evicting)"))
        if isinstance(backend.client, redis.cluster.RedisCluster):
            if time.monotonic() >= backend.policy_again_at:
                replies, away = {}, 0
                for node in backend.client.get_primaries():
                    try:
                        replies[node.name] = backend.client.config_get("maxmemory-policy", target_nodes=node)
                    except redis.exceptions.ResponseError as exc:
                        log.info("cannot read maxmemory-policy of %s (%s); make sure it is noeviction", node.name, exc)
                    except (redis.exceptions.RedisError, OSError):
                        away += 1
                self._judge_cluster_policy(backend, replies, away)
            return
        try:
            reply = backend.client.config_get("maxmemory-policy", **_every_primary(backend.client))
        except redis.exceptions.ResponseError as exc:  # CONFIG renamed or denied (managed Redis)
            log.info("cannot read maxmemory-policy of %s (%s); make sure it is noeviction", self.where, exc)
            backend.policy_checked = True
            return
        self._judge_policy(backend, reply)

    async def _acheck_policy(self, backend: _Backend) -> None:
        if backend.policy_checked:
            return
        if time.monotonic() - backend.policy_refused_at < 5:
            raise _NotSent(self._policy_refusal("(evicting)"))
        if isinstance(backend.client, redis.asyncio.cluster.RedisCluster):
            if time.monotonic() >= backend.policy_again_at:
                replies, away = {}, 0
                for node in backend.client.get_primaries():
                    try:
                        replies[node.name] = await backend.client.config_get("maxmemory-policy", target_nodes=node)
                    except redis.exceptions.ResponseError as exc:
                        log.info("cannot read maxmemory-policy of %s (%s); make sure it is noeviction", node.name, exc)
                    except (redis.exceptions.RedisError, OSError):
                        away += 1
                self._judge_cluster_policy(backend, replies, away)
            return
        try:
            reply = await backend.client.config_get("maxmemory-policy", **_every_primary(backend.client))
        except redis.exceptions.ResponseError as exc:
            log.info("cannot read maxmemory-policy of %s (%s); make sure it is noeviction", self.where, exc)
            backend.policy_checked = True
            return
        self._judge_policy(backend, reply)

    # -- sync shell -----------------------------------------------------------------------------

    def _sync_backend(self) -> _Backend:
        if self._sync is None:
            with self._lock:
                if self._sync is None:
                    if self._target is None:
                        raise TypeError(
                            "This RedisStore was given an asyncio client: use the a* methods (areserve, asettle, "
                            "...), or pass a sync client too: RedisStore(sync_client, async_client=async_client)."
                        )
                    client, closers = make_client(self._target, self._options, use_async=False)
                    self._sync = _Backend(client, closers)
        return self._sync

    def _attempt(self, call: _Call) -> Any:
        backend = self._sync_backend()
        try:
            self._check_policy(backend)
            return backend.scripts[call.script](keys=call.keys, args=call.args)
        except _CLOSED_UNDER_CALL as exc:
            if not self._closed or backend is self._sync:
                raise
            # close() closed this client under the call (a settle racing close): retried on a new one.
            raise _closed_under_call(exc) from exc

    def _execute(self, call: _Call, policy: RetryPolicy) -> Any:
        started = time.monotonic()
        # The first attempt runs bare: a tenacity loop costs ~10 µs, so it is built once Redis fails.
        try:
            return self._attempt(call)
        except BudgetStoreUnavailableError:
            raise
        except redis.exceptions.RedisError as exc:
            if not _is_transient(exc):
                raise self._unavailable(call, exc, 1, started) from exc
            failed: Exception | None = exc
        except (ConnectionError, TimeoutError) as exc:
            failed = exc
        retrying = tenacity.Retrying(**policy.tenacity_kwargs(time.monotonic() - started))
        try:
            for attempt in retrying:
                with attempt:
                    if failed is not None:  # the bare attempt above is the loop's first
                        failed, exc = None, failed
                        raise exc
                    return self._attempt(call)
        except BudgetStoreUnavailableError:
            raise
        except (redis.exceptions.RedisError, ConnectionError, TimeoutError) as exc:
            raise self._unavailable(call, exc, retrying.statistics.get("attempt_number", 1), started) from exc

    def _run(self, plan: Plan[T], policy: RetryPolicy | None = None) -> T:
        policy = policy or self.retry
        try:
            call = next(plan)
            while True:
                try:
                    if call is _WAIT:
                        time.sleep(_WAIT_SECONDS)
                        reply = None
                    else:
                        reply = self._execute(call, _ONCE if call.once else policy)
                except BudgetStoreUnavailableError as exc:
                    call = plan.throw(exc)
                    continue
                except BaseException:
                    # Interrupted (KeyboardInterrupt, a signal's timeout) or a bug: the plan's own
                    # cleanup runs (carried settles journaled, slices freed) before it propagates.
                    plan.close()
                    raise
                call = plan.send(reply)
        except StopIteration as stop:
            return stop.value

    def _op(self, plan: Plan[T]) -> T:
        result = self._run(plan)
        if self._releases or len(self.journal):
            self._repair(_ONCE, wait=False)
        return result

    # -- repairs: pending releases and journaled settles ------------------------------------------

    def _journal_settle(self, call_id: str, keys: Sequence[str], amount: int, exc: Exception,
                        row: LedgerRow | None = None, amounts: Sequence[int] | None = None,
                        crossed: Sequence[Crossing] = ()) -> SettleResult:
        capped = amount > MAX_NANO
        if amounts is None:
            entry = self.journal.append(call_id, keys, min(amount, MAX_NANO))
        else:
            capped = capped or any(a > MAX_NANO for a in amounts)
            entry = self.journal.append(call_id, keys, min(amount, MAX_NANO),
                                        amounts=[min(a, MAX_NANO) for a in amounts])
        if row is not None:
            with self._lock:
                self._journal_rows[entry.seq] = row
        log.warning(
            "settle of call %s journaled (%d pending in %r) until Redis answers: %s", call_id, len(self.journal),
            self.journal, exc,
        )
        self._start_repairer()
        return SettleResult(applied=False, charged=entry.amount, pending=True, capped=capped, crossed=tuple(crossed))

    def _take_releases(self) -> list[_PendingRelease]:
        now = time.monotonic()
        with self._lock:
            due, self._releases = self._releases, []
        live = [r for r in due if r.give_up_at > now]
        for dropped in due:
            if dropped.give_up_at <= now:
                log.warning("gave up releasing %s: its lease and retry window are over", dropped.call.keys[0])
        return live

    def _repair(self, policy: RetryPolicy, wait: bool = True) -> int:
        """Retry pending releases, then replay the journal oldest first (``_replay_with``: what a
        tag cannot take now is kept for next time, with the later entries of that tag).
        Returns how many journal entries reached Redis."""
        if not self._repair_lock.acquire(blocking=wait, timeout=-1 if not wait else 30):
            return 0
        try:
            return self._repair_locked(policy)
        finally:
            self._repair_lock.release()

    def _repair_locked(self, policy: RetryPolicy) -> int:
        releases = self._take_releases()
        for index, release in enumerate(releases):
            try:
                self._execute(release.call, policy)
            except Exception:  # noqa: BLE001 - kept and retried; Redis is still away
                with self._lock:
                    self._releases[:0] = releases[index:]
                break
        return self._replay_with(lambda entry, blocks: self._run(self._replay_plan(entry, blocks), policy))

    def _replay_with(self, apply: Any) -> int:
        """Replay the journal, oldest first, with ``apply(entry, blocks)``; returns how many
        entries reached Redis. A tag that cannot take an entry (its node is away, or Redis
        refuses the script) holds back every later entry's settle on that tag for this pass,
        since a tag's journal mark is the highest seq applied there: a later entry landing first
        would make the earlier one count as replayed. Other tags go on (their part of a held
        entry too: each tag's part counts once). An unreachable node holds back all its tags."""
        done = 0
        try:
            client = self._sync_backend().client
        except TypeError:  # an asyncio-only store: apply fails alike and says so
            client = None
        blocks = _ReplayBlocks(client)
        for entry in self.journal.pending():
            if blocks.holds_back_all(entry.keys):
                continue  # nothing of it can be sent this pass: no round trip
            try:
                result = apply(entry, blocks)
            except Exception as exc:  # noqa: BLE001 - kept in the journal
                if not isinstance(exc, BudgetStoreUnavailableError) or _refused_script(exc):
                    log.error("replaying settle of call %s failed; kept in the journal", entry.call_id, exc_info=exc)
                if not isinstance(exc, BudgetStoreUnavailableError):
                    return done  # a bug, or no sync client: the rest wait for the next pass
                continue
            self.journal.done(entry)
            self._replayed(entry, result)
            self._journal_rows.pop(entry.seq, None)
            done += 1
        return done

    def _replayed(self, entry: PendingSettle, result: Any) -> None:
        """Hand the alerts a replayed settle fired to ``on_replay_crossed`` (nobody else sees them)."""
        crossed = getattr(result, "crossed", ())
        if not crossed:
            return
        log.warning("replayed settle of call %s crossed alert thresholds: %s", entry.call_id, crossed)
        hook = self.on_replay_crossed
        if hook is not None:
            try:
                hook(entry, crossed)
            except Exception:  # noqa: BLE001 - a failing hook must not stop the replay
                log.exception("on_replay_crossed failed for call %s", entry.call_id)

    def _replay_plan(self, entry: PendingSettle, blocks: _ReplayBlocks) -> Plan[SettleResult]:
        """A journaled settle's replay, with its ledger row (a row rebuilt from the keys when the
        entry comes from another process's file journal: budget, scopes, cost, no token counts),
        tag by tag: a tag ``blocks`` holds back is not sent, one that fails is added to it, the
        others are sent all the same; then the first failure is raised (the entry stays in the
        journal; its tags that did take it count it once, by their marks)."""
        row = self._journal_rows.get(entry.seq)
        if row is None:
            row = _row_from_keys(entry.call_id, entry.keys)
        groups, calls, amount, capped = self._settle_calls(entry.call_id, entry.keys, entry.amount, entry.seq, row,
                                                           entry.amounts)
        yield from self._register_plan(groups)
        applied = False
        found: list[Crossing] = []
        failed: BudgetStoreUnavailableError | None = None
        for group, call in zip(groups, calls):
            if blocks.holds_back(group.slot):
                failed = failed or _HeldBack(f"settle of {entry.call_id} waits behind an earlier one on {group.slot}")
                continue
            try:
                reply = yield call
            except BudgetStoreUnavailableError as exc:
                blocks.fail(group.slot, exc)
                failed = exc if failed is None or isinstance(failed, _HeldBack) else failed
                continue
            applied = bool(int(reply[0])) or applied
            found += _crossings(reply[1:], entry.keys, group)
        if failed is not None:
            raise failed
        return SettleResult(applied=applied, charged=amount if applied else 0, capped=capped, crossed=tuple(found))

    def _start_repairer(self) -> None:
        """A daemon thread that retries pending work while there is some (sync clients only)."""
        if self._closed or (self._target is None and self._sync is None):
            return
        with self._lock:
            if self._repairer is not None and self._repairer.is_alive():
                return
            thread = threading.Thread(target=_repair_loop, args=(weakref.ref(self),), daemon=True, name="budgetguard-repair")
            self._repairer = thread
        thread.start()

    @property
    def pending_journal(self) -> tuple[PendingSettle, ...]:
        """Settles that could not reach Redis yet, oldest first."""
        return tuple(self.journal.pending())

    @property
    def pending_releases(self) -> int:
        """Releases that could not reach Redis yet (retried in the background)."""
        return len(self._releases)

    def flush_journal(self) -> int:
        """Retry pending releases and replay journaled settles now; returns how many settles
        reached Redis (the rest stay)."""
        return self._repair(self.retry)

    def flush(self, final: bool = False) -> int:
        """``flush_slices`` (``final``: return them), ``flush_carried`` then ``flush_journal``;
        with ``final`` (close, exit), log what could not be flushed."""
        try:
            self.flush_slices(final=final)
        except BudgetStoreUnavailableError as exc:
            log.error("budget store %s: could not report slices (%s); they end with their lease", self.where, exc)
        self.flush_carried()
        done = self._repair(self.retry) if (self._releases or len(self.journal)) else 0
        if final and len(self.journal):
            entries = self.journal.pending()
            where = "kept in " + repr(self.journal) if self.journal.durable else "LOST with this process"
            log.error(
                "budget store %s: %d journaled settle(s) totalling %d nano-USD could not reach Redis; %s "
                "(use journal_path=... to keep them on disk)", self.where, len(entries),
                sum(e.amount for e in entries), where,
            )
        return done

    def reserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        """Hold ``hold.amount`` on every counter, or on none (see ``ReserveResult``)."""
        if self._book is not None:
            started = time.monotonic()
            got = self._from_slices(counters, hold)
            result = got if isinstance(got, ReserveResult) else self._op(got)
            if result.ok and self._carry is not None:
                self._note_lease(hold.call_id, started + hold.lease_seconds)
            return result
        if self._carry is None:
            return self._op(self._reserve_plan(counters, hold))
        started = time.monotonic()
        result = self._op(self._reserve_plan(counters, hold))
        if result.ok:
            self._note_lease(hold.call_id, started + hold.lease_seconds)
        return result

    def settle(self, call_id: str, keys: Sequence[str], amount: int, *, amounts: Sequence[int] | None = None,
               row: LedgerRow | None = None) -> SettleResult:
        """Replace the call's holds with ``amount`` (``amounts[i]`` on ``keys[i]`` when given);
        when it applies, ``row`` is appended to the ledger in the same script. If Redis cannot
        be reached, the settle (its amounts and row) is journaled and ``SettleResult.pending``
        is True."""
        if self._book is not None:
            local = self._local_settle(call_id, keys, amount, amounts, row)
            if local is not None and self._closing:
                self._run(self._late_reports_plan())
            if isinstance(local, SettleResult):
                return local
            if local is not None:  # the call's counters in Redis settle as usual
                keys, amounts = local
        if self._carry is not None:
            queued = self._carry_settle(call_id, keys, amount, amounts, row)
            if queued is not None:
                return queued
        crossed: list[Crossing] = []
        plan = self._queued_first(call_id, self._settle_plan(call_id, keys, amount, row=row, amounts=amounts,
                                                             crossed=crossed))
        try:  # bad input raises ValueError inside the plan: never journaled
            return self._op(plan)
        except BudgetStoreUnavailableError as exc:
            return self._journal_settle(call_id, keys, amount, exc, row, amounts, crossed)

    def renew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool:
        """Extend the call's lease to ``lease_seconds`` from now; False if no hold of it is live."""
        started = time.monotonic()
        renewed = self._op(self._renew_plan(call_id, keys, lease_seconds))
        if renewed and self._carry is not None:
            self._note_lease(call_id, started + lease_seconds)
        return renewed

    def read(self, keys: Sequence[str]) -> list[CounterState]:
        """Each counter's spent and held (zeros for a counter never used). This process's slices
        of them are reported and returned first, so that it reads its own settles and holds as
        they are (``CounterState.sliced``: what other processes' slices hold; this process's
        calls in flight are ``held`` only)."""
        self._wait_for_reports(keys)
        return self._op(self._read_plan(keys))

    # -- operators (stores.base.AdminStore) ------------------------------------------------------

    def read_overrides(self, name: str, known_version: str | None = None) -> OverridesSnapshot:
        """Budget ``name``'s live limit overrides; ``values`` is None if ``known_version`` is current."""
        return self._op(self._read_overrides_plan(name, known_version))

    def set_override(self, name: str, field: str, nano: int | None) -> str:
        """Set (``nano``) or clear (None) one live override; returns the budget's new version."""
        return self._op(self._set_override_plan(name, field, nano))

    def reset_counter(self, key: str) -> CounterState:
        """Zero a counter's spent (live holds stay); returns its state before."""
        self._wait_for_reports([key])
        return self._op(self._reset_plan(key))

    def scan_counters(self, pattern: str) -> list[tuple[str, CounterState]]:
        """Counters whose key matches ``pattern`` (``*`` is a wildcard), with their state.

        Walks the keyspace with SCAN ... MATCH (on every primary of a cluster), never KEYS.
        """
        match = self._scan_match(pattern)

        def scan() -> list[Any]:
            return list(self._sync_backend().client.scan_iter(match=match, count=1000))

        started = time.monotonic()
        retrying = tenacity.Retrying(**self.retry.tenacity_kwargs())
        try:
            raw = retrying(scan)
        except (redis.exceptions.RedisError, ConnectionError, TimeoutError) as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise self._unavailable(_Call("scan", (), ()), exc, attempts, started) from exc
        keys = self._scanned_keys(raw, pattern)
        return list(zip(keys, self.read(keys))) if keys else []

    def _scanned_keys(self, raw: Sequence[Any], pattern: str) -> list[str]:
        wanted = re.compile(glob_regex(pattern)).match
        found = (self._counter_key_of(_text(r)) for r in raw)
        return sorted({k for k in found if k is not None and wanted(k)})

    # -- the ledger and the spend indexes (stores.ledger) -----------------------------------------

    def _direct(self, what: str, fn: Any) -> Any:
        """Run ``fn(client)`` (plain commands, not a script) under the store's retry policy."""
        backend = self._sync_backend()
        started = time.monotonic()
        retrying = tenacity.Retrying(**self.retry.tenacity_kwargs())
        try:
            return retrying(fn, backend.client)
        except (redis.exceptions.RedisError, ConnectionError, TimeoutError) as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise self._unavailable(_Call(what, (), ()), exc, attempts, started) from exc

    def _slots(self) -> list[str]:
        return sorted(_text(t) for t in self._direct("read tags", lambda c: c.smembers(self.tags_key)))

    def read_index(self, index: str, count: int | None = None) -> list[tuple[str, int]]:
        """The counter keys of spend index ``index`` (``name:per:window:label``, tag-less) with their
        spent nano-USD as last indexed, merged across tags, highest first (ties: by key); ``count``
        (None: all) per tag, then overall. One ZREVRANGE per tag that holds counters."""
        if not isinstance(index, str) or index.count(":") < 2:
            raise ValueError(f"index must look like 'name:per:window:label', got {index!r}")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"count: expected a whole number >= 1 or None, got {count!r}")
        self.flush_carried()
        self._report_waiting()
        slots = [t for t in self._slots() if t.startswith("{")]
        if not slots:
            return []
        stop = -1 if count is None else count - 1

        def ranges(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for slot in slots:
                pipe.zrevrange(f"{self.prefix}x:{slot}:{index}", 0, stop, withscores=True)
            return pipe.execute()

        name, per, rest = index.split(":", 2)
        found = []
        for slot, members in zip(slots, self._direct("read index", ranges)):
            for member, score in members:
                found.append((f"{slot}:{name}:{per}:{_text(member)}:{rest}", int(score)))
        found.sort(key=lambda x: (-x[1], x[0]))
        return found if count is None else found[:count]

    def read_ledger(self, name: str, *, scope: str | None = None, scope_id: str | None = None,
                    since: Any = None, kinds: Sequence[str] | None = None, model: str | None = None,
                    call_id: str | None = None, limit: int = 100) -> list[LedgerRow]:
        """Budget ``name``'s ledger rows, newest first, at most ``limit``, merged across the tags'
        streams (see ``stores.ledger.row_matches`` for the filters); ``since`` bounds the read
        (XREVRANGE from now down to it). A filter by scope, id or kind is tested in Redis first
        (``lua/ledger_scan.lua``, 1,000 entries a call): only entries that may match are sent and
        parsed; every filter is then applied exactly as rows are read."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: expected a whole number of rows >= 1, got {limit!r}")
        self.flush_carried()
        self._report_waiting()
        low = "-" if since is None else str(int(since.timestamp() * 1000))
        # A filter by id or kind is tested in Redis (lua/ledger_scan.lua): only the entries that
        # may pass come back, so the rows parsed here are about the rows asked for, not the stream.
        scan = scope is not None or scope_id is not None or kinds is not None
        page = SCAN_CHUNK if scan else max(200, min(limit * 2, 5000))
        scan_args = _scan_filter(name, scope, scope_id, kinds) if scan else ()
        matched: list[tuple[tuple[int, ...], LedgerRow]] = []
        for slot in self._slots():
            stream = f"{self.prefix}ledger:{slot}"
            high, found = "+", 0
            while found < limit:
                if scan:
                    script = self._sync_backend().scripts["ledger_scan"]
                    reply = self._direct("read ledger", lambda c, h=high: script(
                        keys=(stream,), args=(h, low, str(page), *scan_args)))
                    scanned, last = int(reply[0]), _text(reply[1])
                    entries = [(_text(reply[j]), _pairs(reply[j + 1])) for j in range(2, len(reply) - 1, 2)]
                else:
                    entries = _decode_entries(self._direct(
                        "read ledger", lambda c, h=high: c.xrevrange(stream, max=h, min=low, count=page)))
                    scanned, last = len(entries), entries[-1][0] if entries else ""
                for entry_id, values in entries:
                    try:
                        rows = LedgerRow.rows_of_entry(_id_ms(entry_id), values)
                    except (KeyError, ValueError, TypeError):
                        log.warning("ledger entry %s %s is not a budgetguard row; skipped", stream, entry_id)
                        continue
                    order = tuple(int(p) for p in entry_id.split("-"))
                    for sub in range(len(rows) - 1, -1, -1):  # newest first (a batch is oldest first)
                        row = rows[sub]
                        if row.budget == name and row_matches(row, scope=scope, scope_id=scope_id, since=since,
                                                              kinds=kinds, model=model, call_id=call_id):
                            matched.append(((*order, sub), row))
                            found += 1
                            if found >= limit:
                                break
                    if found >= limit:
                        break
                if scanned < page:
                    break
                high = "(" + last
        matched.sort(key=lambda x: x[0], reverse=True)
        return [row for _, row in matched[:limit]]

    def append_ledger(self, row: LedgerRow) -> None:
        """Append a row that charges nothing (a refusal, a degrade) to its first key's tag's stream."""
        if not isinstance(row, LedgerRow):
            raise TypeError(f"row: expected a LedgerRow, got {type(row).__name__}")
        if not self.ledger_max_rows:
            return
        slot = _slot_part(row.keys[0]) if row.keys else "{" + escape_id(row.budget) + "}"
        group = _Group(slot, ())

        def plan() -> Plan[None]:
            yield from self._register_plan([group])
            yield _Call("ledger_append", (f"{self.prefix}ledger:{slot}",), (*self._ledger_args, *row.fields()))

        self._op(plan())

    async def aread_index(self, index: str, count: int | None = None) -> list[tuple[str, int]]:
        return await asyncio.to_thread(self.read_index, index, count)

    def read_index_page(self, index: str, count: int, *, descending: bool = True,
                        members: Sequence[str] = ()) -> IndexPage:
        """The first ``count`` counters of spend index ``index`` by spent (ties: by member, then key),
        its size and the counters of ``members`` (see ``stores.base.IndexPageReader``). Per tag one
        pipelined ZCARD + ZRANGE (+ ZMSCORE), and, highest first, one ZRANGEBYSCORE for the tie at
        the cut: its cost grows with ``count``, not with the index."""
        check_index_page(index, count, descending, members)
        self.flush_carried()
        self._report_waiting()
        slots = [t for t in self._slots() if t.startswith("{")]
        if not slots:
            return IndexPage(0, [], [])
        names = [f"{self.prefix}x:{slot}:{index}" for slot in slots]
        wanted = list(dict.fromkeys(members))

        def heads(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for x in names:
                pipe.zcard(x)
                if descending:
                    pipe.zrevrange(x, 0, count - 1, withscores=True)
                else:  # ZRANGE orders ties by member already
                    pipe.zrange(x, 0, count - 1, withscores=True)
                if wanted:
                    pipe.zmscore(x, wanted)
            return pipe.execute()

        step = 3 if wanted else 2
        replies = self._direct("read index", heads)
        per_tag = [[(_text(m), float(sc)) for m, sc in replies[i * step + 1]] for i in range(len(slots))]
        cut: dict[int, tuple[float, int]] = {}  # tag -> (score at the cut, how many tied ones to take)
        if descending:
            for i, got in enumerate(per_tag):
                if len(got) == count and replies[i * step] > count:
                    edge = got[-1][1]
                    above = [x for x in got if x[1] > edge]
                    per_tag[i] = above
                    cut[i] = (edge, count - len(above))
        if cut:  # ZREVRANGE orders ties by member descending: take the cut's lowest members instead
            def ties(client: Any) -> list[Any]:
                pipe = client.pipeline(transaction=False)
                for i, (edge, need) in cut.items():
                    pipe.zrangebyscore(names[i], edge, edge, start=0, num=need, withscores=True)
                return pipe.execute()

            for i, got in zip(cut, self._direct("read index", ties)):
                per_tag[i].extend((_text(m), float(sc)) for m, sc in got)
        name, per, rest = index.split(":", 2)

        def key(slot: str, member: str) -> str:
            return f"{slot}:{name}:{per}:{member}:{rest}"

        rows = [(key(slots[i], m), int(sc), m) for i, got in enumerate(per_tag) for m, sc in got]
        rows.sort(key=lambda x: (-x[1] if descending else x[1], x[2], x[0]))
        named = []
        if wanted:
            for i, slot in enumerate(slots):
                for member, sc in zip(wanted, replies[i * step + 2]):
                    if sc is not None:
                        named.append((key(slot, member), int(sc)))
        return IndexPage(sum(int(replies[i * step]) for i in range(len(slots))),
                         [(k, sc) for k, sc, _ in rows[:count]], named)

    async def aread_ledger(self, name: str, **filters: Any) -> list[LedgerRow]:
        return await asyncio.to_thread(functools.partial(self.read_ledger, name, **filters))

    async def aappend_ledger(self, row: LedgerRow) -> None:
        await asyncio.to_thread(self.append_ledger, row)

    def close(self) -> None:
        """Flush pending releases and journaled settles (as far as Redis answers), then close the
        sync client the store built (clients you passed stay open). A settle made after close
        starts is sent at once, as is the report of a call admitted from a slice that was still in
        flight (its settle, release or renewal)."""
        self._closing = True  # first: a slice's call that settles from now on reports it itself
        if self._carry is not None:
            self._carry.close()  # first: a settle from now on is not queued, so none is stranded
        try:
            self.flush(final=True)
        except TypeError:  # an asyncio-only store: aclose() flushes
            pass
        self._close_sync()

    def _close_sync(self) -> None:
        self._closed = True
        if self._carry is not None:
            self._carry.close()
            _CARRYING.discard(self)
        _SLICING.discard(self)
        if self._target is None:
            return
        with self._lock:
            backend, self._sync = self._sync, None
        if backend is not None:
            for closer in backend.closers:
                closer.close()

    # -- async shell ----------------------------------------------------------------------------

    def _async_backend(self) -> _Backend | None:
        """The asyncio client for the running loop; None when only a sync client was given."""
        if self._async_given is not None:
            return self._async_given
        if self._target is None:
            return None
        loop = asyncio.get_running_loop()
        backend = self._async_by_loop.get(loop)
        if backend is None:
            client, closers = make_client(self._target, self._options, use_async=True)
            backend = self._async_by_loop[loop] = _Backend(client, closers)
        return backend

    async def _aattempt(self, call: _Call) -> Any:
        backend = self._async_backend()
        assert backend is not None
        try:
            await backend.aready()
            await self._acheck_policy(backend)
            return await backend.scripts[call.script](keys=call.keys, args=call.args)
        except _CLOSED_UNDER_CALL as exc:
            # As in _attempt: aclose() closed this client under the call (it takes the loop's
            # client out first, then closes it): retried on a new one. A client you gave is never
            # closed by the store, and an error of the loop's live client is raised as it is.
            if backend is self._async_given or self._async_by_loop.get(asyncio.get_running_loop()) is backend:
                raise
            raise _closed_under_call(exc) from exc

    async def _aexecute(self, call: _Call, policy: RetryPolicy) -> Any:
        started = time.monotonic()
        try:
            return await self._aattempt(call)  # a bare first attempt, as in _execute
        except BudgetStoreUnavailableError:
            raise
        except redis.exceptions.RedisError as exc:
            if not _is_transient(exc):
                raise self._unavailable(call, exc, 1, started) from exc
            failed: Exception | None = exc
        except (ConnectionError, TimeoutError) as exc:
            failed = exc
        retrying = tenacity.AsyncRetrying(**policy.tenacity_kwargs(time.monotonic() - started))
        try:
            async for attempt in retrying:
                with attempt:
                    if failed is not None:
                        failed, exc = None, failed
                        raise exc
                    return await self._aattempt(call)
        except BudgetStoreUnavailableError:
            raise
        except (redis.exceptions.RedisError, ConnectionError, TimeoutError) as exc:
            raise self._unavailable(call, exc, retrying.statistics.get("attempt_number", 1), started) from exc

    async def _arun(self, plan: Plan[T], policy: RetryPolicy | None = None) -> T:
        if self._async_backend() is None:  # only a sync client: run it off the event loop
            return await asyncio.to_thread(self._run, plan, policy)
        policy = policy or self.retry
        try:
            call = next(plan)
            while True:
                try:
                    if call is _WAIT:
                        await asyncio.sleep(_WAIT_SECONDS)
                        reply = None
                    else:
                        reply = await self._aexecute(call, _ONCE if call.once else policy)
                except BudgetStoreUnavailableError as exc:
                    call = plan.throw(exc)
                    continue
                except BaseException:  # cancelled, or a bug: as in _run
                    plan.close()
                    raise
                call = plan.send(reply)
        except StopIteration as stop:
            return stop.value

    async def _aop(self, plan: Plan[T]) -> T:
        result = await self._arun(plan)
        if self._releases or len(self.journal):
            await self._arepair(_ONCE, wait=False)
        return result

    async def _arepair(self, policy: RetryPolicy, wait: bool = True) -> int:
        if self._async_backend() is None:
            return await asyncio.to_thread(self._repair, policy, wait)
        # The lock is a thread lock: never block the event loop on it.
        if not self._repair_lock.acquire(blocking=False):
            return 0
        try:
            releases = self._take_releases()
            for index, release in enumerate(releases):
                try:
                    await self._aexecute(release.call, policy)
                except Exception:  # noqa: BLE001 - kept and retried
                    with self._lock:
                        self._releases[:0] = releases[index:]
                    break
            done = 0
            backend = self._async_backend()
            assert backend is not None
            blocks = _ReplayBlocks(backend.client)
            for entry in self.journal.pending():  # as _replay_with: tags in order, blocked ones held back
                if blocks.holds_back_all(entry.keys):
                    continue
                try:
                    result = await self._arun(self._replay_plan(entry, blocks), policy)
                except Exception as exc:  # noqa: BLE001 - kept in the journal
                    if not isinstance(exc, BudgetStoreUnavailableError) or _refused_script(exc):
                        log.error("replaying settle of call %s failed; kept in the journal", entry.call_id, exc_info=exc)
                    if not isinstance(exc, BudgetStoreUnavailableError):
                        return done
                    continue
                self.journal.done(entry)
                self._replayed(entry, result)
                self._journal_rows.pop(entry.seq, None)
                done += 1
            return done
        finally:
            self._repair_lock.release()

    async def aflush_journal(self) -> int:
        """Async twin of ``flush_journal``."""
        return await self._arepair(self.retry)

    async def areserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        if self._async_given is None and self._target is None:  # only a sync client
            return await self._areserve_in_thread(counters, hold)
        if self._book is not None:
            started = time.monotonic()
            got = self._from_slices(counters, hold)
            result = got if isinstance(got, ReserveResult) else await self._aop(got)
            if result.ok and self._carry is not None:
                self._note_lease(hold.call_id, started + hold.lease_seconds)
            return result
        if self._carry is None:
            return await self._aop(self._reserve_plan(counters, hold))
        started = time.monotonic()
        result = await self._aop(self._reserve_plan(counters, hold))
        if result.ok:
            self._note_lease(hold.call_id, started + hold.lease_seconds)
        return result

    async def _areserve_in_thread(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        """``reserve`` in a worker thread (a store with only a sync client). A thread cannot be
        stopped: if the caller is cancelled meanwhile, the reserve runs on, and what it placed
        is released (tombstoned) once it returns, by another worker thread."""
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(None, self.reserve, counters, hold)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            keys = [c.key for c in counters]

            def release_if_placed(done: asyncio.Future[ReserveResult]) -> None:
                if not done.cancelled() and done.exception() is None and done.result().ok:
                    log.warning("call %s was cancelled while reserving; its holds are released", hold.call_id)
                    threading.Thread(target=self._release_quietly, args=(hold.call_id, keys, hold), daemon=True,
                                     name="budgetguard-release").start()

            running.add_done_callback(release_if_placed)
            raise

    def _release_quietly(self, call_id: str, keys: Sequence[str], hold: Hold) -> None:
        try:
            self.release(call_id, keys, hold)  # (one that cannot reach Redis is queued and retried)
        except Exception:  # noqa: BLE001 - nobody is waiting for it
            log.exception("releasing cancelled call %s failed", call_id)

    async def asettle(self, call_id: str, keys: Sequence[str], amount: int, *, amounts: Sequence[int] | None = None,
                      row: LedgerRow | None = None) -> SettleResult:
        if self._book is not None:
            local = self._local_settle(call_id, keys, amount, amounts, row)
            if local is not None and self._closing:
                await self._arun(self._late_reports_plan())
            if isinstance(local, SettleResult):
                return local
            if local is not None:
                keys, amounts = local
        if self._carry is not None:
            queued = self._carry_settle(call_id, keys, amount, amounts, row)
            if queued is not None:
                return queued
        crossed: list[Crossing] = []
        plan = self._queued_first(call_id, self._settle_plan(call_id, keys, amount, row=row, amounts=amounts,
                                                             crossed=crossed))
        try:
            return await self._aop(plan)
        except BudgetStoreUnavailableError as exc:
            return self._journal_settle(call_id, keys, amount, exc, row, amounts, crossed)

    async def arenew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool:
        started = time.monotonic()
        renewed = await self._aop(self._renew_plan(call_id, keys, lease_seconds))
        if renewed and self._carry is not None:
            self._note_lease(call_id, started + lease_seconds)
        return renewed

    async def aread(self, keys: Sequence[str]) -> list[CounterState]:
        await self._await_reports(keys)
        return await self._aop(self._read_plan(keys))

    async def aread_overrides(self, name: str, known_version: str | None = None) -> OverridesSnapshot:
        return await self._aop(self._read_overrides_plan(name, known_version))

    async def aset_override(self, name: str, field: str, nano: int | None) -> str:
        return await self._aop(self._set_override_plan(name, field, nano))

    async def areset_counter(self, key: str) -> CounterState:
        await self._await_reports([key])
        return await self._aop(self._reset_plan(key))

    async def ascan_counters(self, pattern: str) -> list[tuple[str, CounterState]]:
        backend = self._async_backend()
        if backend is None:
            return await asyncio.to_thread(self.scan_counters, pattern)
        match = self._scan_match(pattern)

        async def scan() -> list[Any]:
            await backend.aready()
            return [key async for key in backend.client.scan_iter(match=match, count=1000)]

        started = time.monotonic()
        retrying = tenacity.AsyncRetrying(**self.retry.tenacity_kwargs())
        try:
            raw = await retrying(scan)
        except (redis.exceptions.RedisError, ConnectionError, TimeoutError) as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise self._unavailable(_Call("scan", (), ()), exc, attempts, started) from exc
        keys = self._scanned_keys(raw, pattern)
        return list(zip(keys, await self.aread(keys))) if keys else []

    async def aclose(self) -> None:
        """Flush what is pending, close the asyncio client the store built for the running loop
        (and the sync one)."""
        self._closing = True  # as in close()
        if self._carry is not None:
            self._carry.close()  # as in close()
        try:
            await self.aflush_slices(final=True)
        except BudgetStoreUnavailableError as exc:
            log.error("budget store %s: could not report slices (%s); they end with their lease", self.where, exc)
        await self.aflush_carried()
        await self._arepair(self.retry)
        if len(self.journal) and self._target is not None:
            await asyncio.to_thread(self.flush, True)
        backend = self._async_by_loop.pop(asyncio.get_running_loop(), None)
        if backend is not None:
            for closer in backend.closers:
                await closer.aclose()
        self._close_sync()


SLICE_TICK_SECONDS = 0.1
FINAL_REPORT_WAIT_SECONDS = 10.0  # close and exit wait this long at most for slice reports in flight


def _slice_loop(ref: weakref.ReferenceType[RedisStore]) -> None:
    """Send a store's due slice reports (stale settles, idle slices, leases to renew) until it
    has no slice left, is closed or gone. (Refilling slices from here before calls run short
    was measured slower: the thread's turns on the GIL cost the callers more than their waits.)"""
    while True:
        time.sleep(SLICE_TICK_SECONDS)
        store = ref()
        if store is None or store._closed or store._book is None:
            _SLICING.discard(store)
            return
        try:
            with store._lock:
                if not len(store._book):
                    store._slice_timer = None
                    _SLICING.discard(store)
                    return
            store.flush_slices()
        except Exception:  # noqa: BLE001 - kept and sent again on the next tick
            log.debug("slice reports of %s failed", store.where, exc_info=True)
        finally:
            del store


def _repair_loop(ref: weakref.ReferenceType[RedisStore]) -> None:
    """Retry a store's pending work every so often until there is none (or the store is gone)."""
    wait = 0.2
    while True:
        time.sleep(wait)
        store = ref()
        if store is None or store._closed:
            return
        try:
            if not (store._releases or len(store.journal)):
                return
            store._repair(_ONCE, wait=False)
        except Exception:  # noqa: BLE001 - try again later
            log.debug("background repair of %s failed", store.where, exc_info=True)
        finally:
            del store
        wait = min(wait * 2, 5.0)
