"""The Redis store: one budget shared by every process and machine that uses the same Redis.

URL forms, for ``RedisStore(url)`` or ``RedisStore.from_url(url)``:

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
  ``unix:///path/to/redis.sock?db=0``: one Redis server.
- ``redis+cluster://[[user]:password@]host1:port1[,host2:port2,...]`` (``rediss+cluster://`` for
  TLS), or any ``redis://`` / ``rediss://`` URL with ``?cluster=true``: a Redis Cluster, found
  through these seed nodes.
- ``redis+sentinel://[[user]:password@]host1:26379[,host2:26379,...]/service_name[/db]``
  (``rediss+sentinel://`` for TLS): the master of ``service_name``, found through Sentinel, which
  follows failovers. The password is the master's; add ``?sentinel_password=...`` (and
  ``sentinel_username=...``) when the sentinels require their own.

Other query parameters are redis-py connection options (``?socket_timeout=2``). Unless the URL
says otherwise, connecting times out after 1 s and a reply after 2 s, and redis-py's own retries
are off: the store retries by its ``RetryPolicy``, then raises ``BudgetStoreUnavailableError``.

Key layout (``prefix`` is ``bg:`` by default; counter keys come from ``limits.counter_key`` and
start with their ``{tag}``, the Redis Cluster hash tag)::

    bg:{acme}:default:user:alice:day:2026-11-22    counter: hash of s (spent), h (held) and, per
                                                   live hold, @<call_id> = "amount:charge_on_expiry"
    bg:l:{acme}:default:user:alice:day:2026-11-22  its lease deadlines: sorted set call_id -> ms of
                                                   server TIME; deleted when no hold is live
    bg:c:{acme}:<call_id>                          the call's record on this tag: "h:<charge on
                                                   expiry>" while held, "s:<amount>" once settled
    bg:o:{default}                                 live limit overrides of budget "default": hash of
                                                   "<per>:<window>:<id or *>" -> nano-USD, and #v,
                                                   a version bumped on every change (never expires)

Counters expire at ``Counter.expires_at`` (the guard puts window end + retention there); ``total``
windows never expire. A record lives for its lease + ``record_ttl_seconds`` (1 day): a retried
reserve or settle of the same call_id within that time changes nothing. A key that does not
start with a ``{tag}`` is stored as ``bg:~{key}``, which makes the key its own tag.

Every script touches the keys of one tag only, so in a Redis Cluster each runs on one node. A call
whose counters span several tags (a platform-wide limit has its own) is reserved tag by tag, in
the order the counters come; if a later tag refuses or fails, the holds already placed are
released, so the worst case is a brief false refusal, never overspend.

A settle that cannot reach Redis is kept in an in-process journal and replayed after the next
operation that succeeds (or by ``flush_journal()``); settles are idempotent per call_id, so a
replay never counts twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
import tenacity
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from ..errors import BudgetStoreUnavailableError
from ..limits import escape_id
from .base import (
    Counter,
    CounterState,
    Hold,
    OverridesSnapshot,
    ReserveResult,
    SettleResult,
    glob_regex,
    tag_of,
)
from .memory import RECORD_TTL_SECONDS

__all__ = ["RedisStore", "RetryPolicy", "PendingSettle", "DEFAULT_RETENTION_SECONDS"]

log = logging.getLogger(__name__)

DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600

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


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT):
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


@dataclass(frozen=True, slots=True)
class PendingSettle:
    """A settle that could not reach Redis, waiting in the journal to be replayed."""

    call_id: str
    keys: tuple[str, ...]
    amount: int


# -- pure helpers: names, script arguments, replies ----------------------------------------------


def _load_lua(name: str) -> str:
    folder = resources.files(__package__).joinpath("lua")
    return folder.joinpath("common.lua").read_text("utf-8") + "\n" + folder.joinpath(f"{name}.lua").read_text("utf-8")


@functools.cache
def _lua_sources() -> dict[str, str]:
    names = ("reserve", "settle", "release", "renew", "read", "overrides", "override", "reset")
    return {name: _load_lua(name) for name in names}


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


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _glob_escape(text: str, keep_star: bool = False) -> str:
    """Escape Redis MATCH specials (``* ? [ ] \\``), keeping ``*`` wildcards when asked."""
    specials = "?[]\\" if keep_star else "*?[]\\"
    return "".join("\\" + c if c in specials else c for c in text)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _check_amount(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer (nano-USD), got {value!r}")
    return str(value)


def _describe_url(url: str) -> str:
    """The URL without its password (and without query options that may hold one)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, hosts = netloc.rpartition("@")
        user = user.split(":", 1)[0]
        netloc = f"{user}@{hosts}" if user else hosts
    return f"{parts.scheme}://{netloc}{parts.path}"


def _describe_client(client: Any) -> str:
    if isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
        nodes = list(getattr(getattr(client, "nodes_manager", None), "startup_nodes", None) or [])
        return "Redis Cluster via " + (",".join(nodes[:3]) or "a RedisCluster client")
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    if "host" in kwargs:
        return f"redis://{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    return type(client).__name__


def _is_async_client(client: Any) -> bool:
    return isinstance(client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster))


def _is_sync_client(client: Any) -> bool:
    return isinstance(client, (redis.Redis, redis.cluster.RedisCluster))


# -- URLs -> clients --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    kind: str  # "server", "cluster", "sentinel"
    url: str  # a plain redis(s):// or unix:// URL: first host, options, no store-specific query
    hosts: tuple[tuple[str, int], ...]
    service: str | None = None
    sentinel_kwargs: dict[str, Any] | None = None


def _split_host(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [ipv6]:port
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = text.rpartition(":")
    return (host, int(port)) if sep else (text, default_port)


def _parse_url(url: str) -> _Target:
    """Understand the URL forms in the module docstring."""
    parts = urlsplit(url)
    scheme, _, flavour = parts.scheme.lower().partition("+")
    known = flavour in ("", "cluster", "sentinel") and not (flavour and scheme == "unix")
    if scheme not in ("redis", "rediss", "unix") or not known:
        raise ValueError(
            f"Unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, unix://, "
            "redis+cluster:// or redis+sentinel:// (rediss+... for TLS)."
        )
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if query.pop("cluster", "false").lower() in ("1", "true", "yes", "on"):
        flavour = flavour or "cluster"
    sentinel_kwargs = {k: query.pop(f"sentinel_{k}") for k in ("password", "username") if f"sentinel_{k}" in query}
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    default_port = 26379 if flavour == "sentinel" else 6379
    hosts = tuple(_split_host(h, default_port) for h in hostlist.split(",") if h) if hostlist else ()
    path, service = parts.path, None
    if flavour == "sentinel":
        segments = [s for s in parts.path.split("/") if s]
        if not segments:
            raise ValueError(
                f"A Sentinel URL names its service: redis+sentinel://host:26379/mymaster, got {_describe_url(url)!r}"
            )
        service = unquote(segments[0])
        path = "/" + segments[1] if len(segments) > 1 else ""
    elif flavour == "cluster" and parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0, got {_describe_url(url)!r}")
    elif flavour == "cluster":
        path = ""
    first = hostlist.split(",")[0] if hostlist else ""
    plain = f"{scheme}://{userinfo + '@' if userinfo else ''}{first}{path}"
    if query:
        plain += "?" + urlencode(query)
    return _Target(flavour or "server", plain, hosts, service, sentinel_kwargs)


# Store defaults for clients it builds; anything in the URL or given to the store wins.
_CLIENT_DEFAULTS = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0}
_POOL_DEFAULTS = {"max_connections": 100, "timeout": 2.0}  # timeout: the wait for a free connection


def _url_options(target: _Target, options: dict[str, Any]) -> dict[str, Any]:
    """Connection options from the URL (password, db, TLS, query), over the store's and user's."""
    from redis.connection import SSLConnection, parse_url

    parsed = parse_url(target.url)
    for key in ("host", "port"):
        parsed.pop(key, None)
    if parsed.pop("connection_class", None) is SSLConnection:
        parsed["ssl"] = True
    return {**_CLIENT_DEFAULTS, **options, **parsed}


def _make_client(target: _Target, options: dict[str, Any], *, use_async: bool) -> tuple[Any, list[Any]]:
    """A client for ``target`` and everything to close with it. Cluster clients connect at once."""
    if use_async:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry
    no_retry = Retry(NoBackoff(), 0)
    if target.kind == "server":
        # A burst of calls waits for a free connection instead of failing when the pool is full.
        module = redis.asyncio if use_async else redis
        pool = module.BlockingConnectionPool.from_url(
            target.url, **{**_CLIENT_DEFAULTS, **_POOL_DEFAULTS, "retry": no_retry, **options}
        )
        client = module.Redis.from_pool(pool)
        return client, [client]
    kwargs = _url_options(target, options)
    if target.kind == "cluster":
        module = redis.asyncio.cluster if use_async else redis.cluster
        nodes = [module.ClusterNode(host, port) for host, port in target.hosts]
        # The cluster client follows slot moves and failovers by refreshing its slot map between
        # retries of its own: keep a few quick ones; the store's RetryPolicy comes on top.
        quick = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), 3)
        # Cluster node pools cannot wait for a free connection; let a burst open more instead.
        client = module.RedisCluster(startup_nodes=nodes, **{"retry": quick, "max_connections": 1_000, **kwargs})
        return client, [client]
    module = redis.asyncio.sentinel if use_async else redis.sentinel
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_") or k == "ssl"}
    sentinel_kwargs.update(target.sentinel_kwargs or {})
    sentinel = module.Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs, **kwargs)
    client = sentinel.master_for(target.service, retry=no_retry)
    return client, [client, *sentinel.sentinels]


# -- the store --------------------------------------------------------------------------------------

# A plan is the store-independent logic of one operation: it yields the script calls it needs and
# gets their replies back, so the sync and async shells only differ in how they run a call.
Plan = Generator[_Call, Any, T]


class _Backend:
    """One client and its registered scripts."""

    def __init__(self, client: Any, closers: list[Any]) -> None:
        self.client = client
        self.closers = closers  # what the store built and must close; empty for a client you gave
        self.scripts = {name: client.register_script(src) for name, src in _lua_sources().items()}
        self._ready = not isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._init_lock: asyncio.Lock | None = None

    async def aready(self) -> None:
        """Discover an asyncio cluster's topology once, before concurrent use: many first calls
        racing to initialize it fail with AttributeError inside redis-py (8.1)."""
        if self._ready:
            return
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if not self._ready:
                await self.client.initialize()
                self._ready = True


class RedisStore:
    """Budget counters in Redis (a server, a Cluster, or a Sentinel-managed master).

    ``url_or_client`` is a URL (see the module docstring) or a redis-py client: ``redis.Redis``,
    ``redis.cluster.RedisCluster`` or their ``redis.asyncio`` twins. With a URL the store builds
    its sync and asyncio clients on first use (one asyncio client per event loop). With a sync
    client the a* methods run it in a worker thread; with an asyncio client only the a* methods
    work, unless ``async_client`` / a sync client is given too. Clients you pass stay yours to close.

    ``retention_seconds`` is how long counters are kept after their window ends; the guard reads
    it when it computes ``Counter.expires_at``, which the store applies as given.
    """

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = "bg:",
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        retry: RetryPolicy | None = None,
        record_ttl_seconds: int = RECORD_TTL_SECONDS,
        async_client: Any = None,
        **client_options: Any,
    ) -> None:
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a string without '{{' or '}}' (they change hash slots), got {prefix!r}")
        self.prefix = prefix
        self.retention_seconds = retention_seconds
        self.retry = retry or RetryPolicy()
        self._record_ttl_ms = str(int(record_ttl_seconds * 1000))
        self._options = client_options
        self._target: _Target | None = None
        self._sync: _Backend | None = None
        self._async_given: _Backend | None = None
        self._async_by_loop: weakref.WeakKeyDictionary[Any, _Backend] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._journal: list[PendingSettle] = []
        self._group_keys: dict[_Group, tuple[str, ...]] = {}  # a group's counter and lease-set names
        self._journal_lock = threading.Lock()
        if isinstance(url_or_client, str):
            self._target = _parse_url(url_or_client)
            self.where = _describe_url(url_or_client)
        else:
            if client_options:
                raise TypeError(f"connection options {sorted(client_options)} apply to a URL, not to a client you built")
            clients = [url_or_client] + ([async_client] if async_client is not None else [])
            for client in clients:
                if _is_async_client(client):
                    self._async_given = _Backend(client, [])
                elif _is_sync_client(client):
                    self._sync = _Backend(client, [])
                else:
                    raise TypeError(
                        "RedisStore takes a redis URL or a redis-py client (redis.Redis, RedisCluster or "
                        f"their redis.asyncio twins), got {type(client).__name__}"
                    )
            self.where = _describe_client(url_or_client)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStore:
        """A store for ``url``: ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://``,
        ``redis+sentinel://`` or any of them with ``?cluster=true`` (see the module docstring)."""
        if not isinstance(url, str):
            raise TypeError(f"RedisStore.from_url takes a URL string, got {type(url).__name__}")
        return cls(url, **kwargs)

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, prefix={self.prefix!r})"

    # -- key names ------------------------------------------------------------------------------

    def redis_keys(self, key: str) -> tuple[str, str]:
        """The Redis names of a counter: its hash and its lease set (for tools and tests)."""
        base = key if tag_of(key) else _slot_part(key)
        return self.prefix + base, self.prefix + "l:" + base

    def overrides_key(self, name: str) -> str:
        """The Redis name of budget ``name``'s live limit overrides (a hash)."""
        return f"{self.prefix}o:{{{escape_id(name)}}}"

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

    def _call(self, script: str, group: _Group, call_id: str | None, args: Sequence[str]) -> _Call:
        """A script call on one group: the call's record on that tag (if any), then each counter's keys."""
        keys = self._group_keys.get(group)
        if keys is None:
            keys = tuple(name for key in group.keys for name in self.redis_keys(key))
            if len(self._group_keys) >= 4096:
                self._group_keys.clear()
            self._group_keys[group] = keys
        if call_id is not None:
            keys = (f"{self.prefix}c:{group.slot}:{call_id}", *keys)
        return _Call(script, keys, tuple(args))

    # -- plans: the logic of each operation, shared by the sync and async shells ----------------

    def _reserve_plan(self, counters: Sequence[Counter], hold: Hold) -> Plan[ReserveResult]:
        amount = _check_amount(hold.amount, "Hold.amount")
        charge = _check_amount(hold.charge_on_expiry, "Hold.charge_on_expiry")
        lease_ms = str(_ms(hold.lease_seconds))
        # A key listed twice (two limits on one counter) is held once, within the tighter limit.
        limits: dict[str, int] = {}
        expiries: dict[str, int | None] = {}
        for c in counters:
            limits[c.key] = min(limits.get(c.key, c.limit), c.limit)
            ends = [e for e in (expiries.get(c.key), c.expires_at) if e is not None]
            expiries[c.key] = math.ceil(max(ends)) if ends else None
        groups = _groups(list(limits))
        states = [CounterState()] * len(counters)
        placed: list[tuple[_Group, list[CounterState]]] = []
        duplicate = True
        keys = [c.key for c in counters]
        try:
            for number, group in enumerate(groups):
                args = [hold.call_id, amount, charge, lease_ms, self._record_ttl_ms]
                for key in group.keys:
                    expires = expiries[key]
                    args += [str(limits[key]), "" if expires is None else str(expires)]
                reply = yield self._call("reserve", group, hold.call_id, args)
                code, found = int(reply[0]), _states(reply[2:])
                _fill(states, keys, group, found)
                if code == 0:
                    yield from self._release([g for g, _ in placed], hold.call_id)
                    # Read the tags not tried yet, so that the refusal shows every counter and names
                    # the first one, in the caller's order, that cannot take the hold.
                    for later in groups[number + 1 :]:
                        try:
                            _fill(states, keys, later, _states((yield self._call("read", later, None, []))))
                        except BudgetStoreUnavailableError:
                            pass  # the refusal stands; those counters show zeros
                    refused = keys.index(group.keys[int(reply[1]) - 1])
                    too_full = (
                        i for i, (c, s) in enumerate(zip(counters, states)) if s.spent + s.held + hold.amount > c.limit
                    )
                    blocked = next(too_full, refused)
                    return ReserveResult(ok=False, states=tuple(states), blocked=min(blocked, refused))
                if code == 1:
                    placed.append((group, found))
                    duplicate = False
        except BudgetStoreUnavailableError:
            yield from self._release([g for g, _ in placed], hold.call_id)
            raise
        for group, found in placed:
            _fill(states, keys, group, [CounterState(s.spent, s.held + hold.amount) for s in found])
        return ReserveResult(ok=True, states=tuple(states), duplicate=duplicate and bool(groups))

    def _release(self, groups: list[_Group], call_id: str) -> Plan[None]:
        """Best effort: a hold that cannot be released now runs out with its lease."""
        for group in groups:
            try:
                yield self._call("release", group, call_id, [call_id])
            except BudgetStoreUnavailableError:
                log.warning("could not release call %s on %s; its hold ends with its lease", call_id, group.slot)

    def _settle_plan(self, call_id: str, keys: Sequence[str], amount: int) -> Plan[SettleResult]:
        args = [call_id, _check_amount(amount, "settle amount"), self._record_ttl_ms]
        applied = False
        for group in _groups(keys):
            applied = bool(int((yield self._call("settle", group, call_id, args)))) or applied
        return SettleResult(applied=applied, charged=amount if applied else 0)

    def _renew_plan(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> Plan[bool]:
        args = [call_id, str(_ms(lease_seconds)), self._record_ttl_ms]
        renewed = False
        for group in _groups(keys):
            renewed = bool(int((yield self._call("renew", group, call_id, args)))) or renewed
        return renewed

    def _read_plan(self, keys: Sequence[str]) -> Plan[list[CounterState]]:
        states = [CounterState()] * len(keys)
        for group in _groups(keys):
            _fill(states, keys, group, _states((yield self._call("read", group, None, []))))
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
        reply = yield _Call("reset", self.redis_keys(key), ())
        return CounterState(int(reply[0]), int(reply[1]))

    # -- errors ---------------------------------------------------------------------------------

    def _unavailable(self, call: _Call, exc: Exception, attempts: int, started: float) -> BudgetStoreUnavailableError:
        return BudgetStoreUnavailableError(
            f"Redis budget store at {self.where} is unavailable: {call.script} failed after {attempts} "
            f"attempt(s) in {time.monotonic() - started:.1f}s ({type(exc).__name__}: {exc}). Check that the "
            "Redis server is running and reachable from this host (address, password, TLS, firewall), or give "
            "the store a larger RetryPolicy. Settles are journaled and replayed once Redis answers; whether "
            "new calls go ahead meanwhile is the guard's fail-open/fail-closed policy."
        )

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
                    client, closers = _make_client(self._target, self._options, use_async=False)
                    self._sync = _Backend(client, closers)
        return self._sync

    def _execute(self, call: _Call, policy: RetryPolicy) -> Any:
        started = time.monotonic()
        # The first attempt runs bare: a tenacity loop costs ~10 µs, so it is built once Redis fails.
        try:
            return self._sync_backend().scripts[call.script](keys=call.keys, args=call.args)
        except Exception as exc:
            if not _is_transient(exc):
                raise
            failed: Exception | None = exc
        retrying = tenacity.Retrying(**policy.tenacity_kwargs(time.monotonic() - started))
        try:
            for attempt in retrying:
                with attempt:
                    if failed is not None:  # the bare attempt above is the loop's first
                        failed, exc = None, failed
                        raise exc
                    return self._sync_backend().scripts[call.script](keys=call.keys, args=call.args)
        except Exception as exc:
            if not _is_transient(exc):
                raise
            raise self._unavailable(call, exc, retrying.statistics.get("attempt_number", 1), started) from exc

    def _run(self, plan: Plan[T], policy: RetryPolicy | None = None) -> T:
        policy = policy or self.retry
        try:
            call = next(plan)
            while True:
                try:
                    reply = self._execute(call, policy)
                except BudgetStoreUnavailableError as exc:
                    call = plan.throw(exc)
                else:
                    call = plan.send(reply)
        except StopIteration as stop:
            return stop.value

    def _op(self, plan: Plan[T]) -> T:
        result = self._run(plan)
        if self._journal:
            self._replay(_ONCE)
        return result

    def _take_journal(self) -> list[PendingSettle]:
        with self._journal_lock:
            entries, self._journal = self._journal, []
        return entries

    def _replay_stopped(self, entries: list[PendingSettle], done: int, exc: Exception) -> int:
        """Keep what a replay could not settle; it is tried again after the next operation."""
        with self._journal_lock:
            self._journal[:0] = entries[done:]
        if not isinstance(exc, BudgetStoreUnavailableError):
            log.error("replaying settle of call %s failed; kept in the journal", entries[done].call_id, exc_info=exc)
        return done

    def _journal_settle(self, call_id: str, keys: Sequence[str], amount: int, exc: Exception) -> SettleResult:
        with self._journal_lock:
            self._journal.append(PendingSettle(call_id, tuple(keys), amount))
            pending = len(self._journal)
        log.warning("settle of call %s journaled (%d pending) until Redis answers: %s", call_id, pending, exc)
        return SettleResult(applied=False, charged=amount, pending=True)

    def _replay(self, policy: RetryPolicy) -> int:
        entries = self._take_journal()
        for done, entry in enumerate(entries):
            try:
                self._run(self._settle_plan(entry.call_id, entry.keys, entry.amount), policy)
            except Exception as exc:
                return self._replay_stopped(entries, done, exc)
        return len(entries)

    @property
    def pending_journal(self) -> tuple[PendingSettle, ...]:
        """Settles that could not reach Redis yet, oldest first."""
        with self._journal_lock:
            return tuple(self._journal)

    def flush_journal(self) -> int:
        """Replay journaled settles now; returns how many reached Redis (the rest stay)."""
        return self._replay(self.retry)

    def reserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        """Hold ``hold.amount`` on every counter, or on none (see ``ReserveResult``)."""
        return self._op(self._reserve_plan(counters, hold))

    def settle(self, call_id: str, keys: Sequence[str], amount: int) -> SettleResult:
        """Replace the call's holds with ``amount``. If Redis cannot be reached, the settle is
        journaled and ``SettleResult.pending`` is True."""
        try:
            return self._op(self._settle_plan(call_id, keys, amount))
        except BudgetStoreUnavailableError as exc:
            return self._journal_settle(call_id, keys, amount, exc)

    def renew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool:
        """Extend the call's lease to ``lease_seconds`` from now; False if no hold of it is live."""
        return self._op(self._renew_plan(call_id, keys, lease_seconds))

    def read(self, keys: Sequence[str]) -> list[CounterState]:
        """Each counter's spent and held (zeros for a counter never used)."""
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
        except Exception as exc:
            if not _is_transient(exc):
                raise
            attempts = retrying.statistics.get("attempt_number", 1)
            raise self._unavailable(_Call("scan", (), ()), exc, attempts, started) from exc
        keys = self._scanned_keys(raw, pattern)
        return list(zip(keys, self.read(keys))) if keys else []

    def _scanned_keys(self, raw: Sequence[Any], pattern: str) -> list[str]:
        wanted = re.compile(glob_regex(pattern)).match
        found = (self._counter_key_of(_text(r)) for r in raw)
        return sorted({k for k in found if k is not None and wanted(k)})

    def close(self) -> None:
        """Close the sync client the store built (clients you passed stay open)."""
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
            client, closers = _make_client(self._target, self._options, use_async=True)
            backend = self._async_by_loop[loop] = _Backend(client, closers)
        return backend

    async def _aattempt(self, call: _Call) -> Any:
        backend = self._async_backend()
        assert backend is not None
        await backend.aready()
        return await backend.scripts[call.script](keys=call.keys, args=call.args)

    async def _aexecute(self, call: _Call, policy: RetryPolicy) -> Any:
        started = time.monotonic()
        try:
            return await self._aattempt(call)  # a bare first attempt, as in _execute
        except Exception as exc:
            if not _is_transient(exc):
                raise
            failed: Exception | None = exc
        retrying = tenacity.AsyncRetrying(**policy.tenacity_kwargs(time.monotonic() - started))
        try:
            async for attempt in retrying:
                with attempt:
                    if failed is not None:
                        failed, exc = None, failed
                        raise exc
                    return await self._aattempt(call)
        except Exception as exc:
            if not _is_transient(exc):
                raise
            raise self._unavailable(call, exc, retrying.statistics.get("attempt_number", 1), started) from exc

    async def _arun(self, plan: Plan[T], policy: RetryPolicy | None = None) -> T:
        if self._async_backend() is None:  # only a sync client: run it off the event loop
            return await asyncio.to_thread(self._run, plan, policy)
        policy = policy or self.retry
        try:
            call = next(plan)
            while True:
                try:
                    reply = await self._aexecute(call, policy)
                except BudgetStoreUnavailableError as exc:
                    call = plan.throw(exc)
                else:
                    call = plan.send(reply)
        except StopIteration as stop:
            return stop.value

    async def _aop(self, plan: Plan[T]) -> T:
        result = await self._arun(plan)
        if self._journal:
            await self._areplay(_ONCE)
        return result

    async def _areplay(self, policy: RetryPolicy) -> int:
        entries = self._take_journal()
        for done, entry in enumerate(entries):
            try:
                await self._arun(self._settle_plan(entry.call_id, entry.keys, entry.amount), policy)
            except Exception as exc:
                return self._replay_stopped(entries, done, exc)
        return len(entries)

    async def aflush_journal(self) -> int:
        """Async twin of ``flush_journal``."""
        return await self._areplay(self.retry)

    async def areserve(self, counters: Sequence[Counter], hold: Hold) -> ReserveResult:
        return await self._aop(self._reserve_plan(counters, hold))

    async def asettle(self, call_id: str, keys: Sequence[str], amount: int) -> SettleResult:
        try:
            return await self._aop(self._settle_plan(call_id, keys, amount))
        except BudgetStoreUnavailableError as exc:
            return self._journal_settle(call_id, keys, amount, exc)

    async def arenew(self, call_id: str, keys: Sequence[str], lease_seconds: float) -> bool:
        return await self._aop(self._renew_plan(call_id, keys, lease_seconds))

    async def aread(self, keys: Sequence[str]) -> list[CounterState]:
        return await self._aop(self._read_plan(keys))

    async def aread_overrides(self, name: str, known_version: str | None = None) -> OverridesSnapshot:
        return await self._aop(self._read_overrides_plan(name, known_version))

    async def aset_override(self, name: str, field: str, nano: int | None) -> str:
        return await self._aop(self._set_override_plan(name, field, nano))

    async def areset_counter(self, key: str) -> CounterState:
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
        except Exception as exc:
            if not _is_transient(exc):
                raise
            attempts = retrying.statistics.get("attempt_number", 1)
            raise self._unavailable(_Call("scan", (), ()), exc, attempts, started) from exc
        keys = self._scanned_keys(raw, pattern)
        return list(zip(keys, await self.aread(keys))) if keys else []

    async def aclose(self) -> None:
        """Close the asyncio client the store built for the running loop (and the sync one)."""
        backend = self._async_by_loop.pop(asyncio.get_running_loop(), None)
        if backend is not None:
            for closer in backend.closers:
                await closer.aclose()
        self.close()
