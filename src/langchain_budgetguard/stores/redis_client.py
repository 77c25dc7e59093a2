"""Redis URLs and the redis-py clients the store builds from them.

URL forms:

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
  ``unix:///path/to/redis.sock?db=0``: one Redis server.
- ``redis+cluster://[[user]:password@]host1:port1[,host2:port2,...]`` (``rediss+cluster://`` for
  TLS), or any ``redis://`` / ``rediss://`` URL with ``?cluster=true``: a Redis Cluster, found
  through these seed nodes.
- ``redis+sentinel://[[user]:password@]host1:26379[,host2:26379,...]/service_name[/db]``
  (``rediss+sentinel://`` for TLS): the master of ``service_name``, found through Sentinel, which
  follows failovers. The password is the master's; add ``?sentinel_password=...`` (and
  ``sentinel_username=...``) when the sentinels require their own.

Store options in the query (``STORE_QUERY_OPTIONS``) go to ``RedisStore``; the other query
parameters are redis-py connection options (``?socket_timeout=2``). Unless the URL says
otherwise, connecting times out after 1 s and a reply after 2 s, and redis-py's own retries are
off (the store retries by its ``RetryPolicy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

__all__ = [
    "RedisTarget",
    "STORE_QUERY_OPTIONS",
    "parse_url",
    "make_client",
    "describe_url",
    "describe_client",
    "is_async_client",
    "is_sync_client",
]

def describe_url(url: str) -> str:
    """The URL without its password (and without query options that may hold one)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, hosts = netloc.rpartition("@")
        user = user.split(":", 1)[0]
        netloc = f"{user}@{hosts}" if user else hosts
    return f"{parts.scheme}://{netloc}{parts.path}"


def describe_client(client: Any) -> str:
    if isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
        nodes = list(getattr(getattr(client, "nodes_manager", None), "startup_nodes", None) or [])
        return "Redis Cluster via " + (",".join(nodes[:3]) or "a RedisCluster client")
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    if "host" in kwargs:
        return f"redis://{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    return type(client).__name__


def is_async_client(client: Any) -> bool:
    return isinstance(client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster))


def is_sync_client(client: Any) -> bool:
    return isinstance(client, (redis.Redis, redis.cluster.RedisCluster))




@dataclass(frozen=True)
class RedisTarget:
    kind: str  # "server", "cluster", "sentinel"
    url: str  # a plain redis(s):// or unix:// URL: first host, options, no store-specific query
    hosts: tuple[tuple[str, int], ...]
    service: str | None = None
    sentinel_kwargs: dict[str, Any] | None = None
    store_options: dict[str, Any] | None = None  # RedisStore options given in the query


def _split_host(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [ipv6]:port
        host, _, rest = text[1:].partition("]")
        return host, _port(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = text.rpartition(":")
    return (host, _port(port)) if sep else (text, default_port)


def _port(text: str) -> int:
    # Never shows the text: after a password with an unescaped '/', '#' or '?' it is part of the password.
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("a host's port in the Redis URL is not a number from 1 to 65535; if the password "
                         "holds '/', '#', '?' or '@', percent-encode them (%2F, %23, %3F, %40)")
    return int(text)


def _connection_options() -> frozenset[str]:
    """The query options redis-py's clients take (anything else would fail each connection)."""
    import inspect

    from redis.connection import URL_QUERY_ARGUMENT_PARSERS, AbstractConnection, Connection, SSLConnection, \
        UnixDomainSocketConnection

    names = set(URL_QUERY_ARGUMENT_PARSERS) | {"max_connections", "timeout", "db"}
    for kind in (AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection, redis.cluster.RedisCluster):
        names |= {p.name for p in inspect.signature(kind.__init__).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    return frozenset(names)


def parse_url(url: str) -> RedisTarget:
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
    store_options: dict[str, Any] = {k: query.pop(k) for k in STORE_QUERY_OPTIONS if k in query}
    for name in ("retry_window_seconds", "slice_lease_seconds"):
        if name in store_options:
            try:
                store_options[name] = float(store_options[name])
            except ValueError:
                got = store_options[name]
                raise ValueError(f"{name} in the URL must be a number of seconds, got {got!r}") from None
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    default_port = 26379 if flavour == "sentinel" else 6379
    hosts = tuple(_split_host(h, default_port) for h in hostlist.split(",") if h) if hostlist else ()
    path, service = parts.path, None
    if flavour == "sentinel":
        segments = [s for s in parts.path.split("/") if s]
        if not segments:
            raise ValueError(
                f"A Sentinel URL names its service: redis+sentinel://host:26379/mymaster, got {describe_url(url)!r}"
            )
        service = unquote(segments[0])
        path = "/" + segments[1] if len(segments) > 1 else ""
    elif flavour == "cluster" and parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0, got {describe_url(url)!r}")
    elif flavour == "cluster":
        path = ""
    if scheme != "unix" and path.strip("/") and not path.strip("/").isdigit():
        raise ValueError(f"the database in a Redis URL is a number (redis://host:6379/0), got {describe_url(url)!r}")
    unknown = sorted(set(query) - _connection_options())
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} in the Redis URL {describe_url(url)!r}: the store "
                         f"takes {', '.join(STORE_QUERY_OPTIONS)} and redis-py's connection options "
                         "(socket_timeout, socket_connect_timeout, max_connections, ...)")
    first = hostlist.split(",")[0] if hostlist else ""
    plain = f"{scheme}://{userinfo + '@' if userinfo else ''}{first}{path}"
    if query:
        plain += "?" + urlencode(query)
    return RedisTarget(flavour or "server", plain, hosts, service, sentinel_kwargs, store_options)


STORE_QUERY_OPTIONS = ("evicting_policy", "journal_path", "retry_window_seconds", "ledger_max_rows",
                       "ledger_retention_seconds", "carry_settles", "carry_window_seconds", "lease_slices",
                       "slice_lease_seconds")


# Store defaults for clients it builds; anything in the URL or given to the store wins.
_CLIENT_DEFAULTS = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0}
_POOL_DEFAULTS = {"max_connections": 100, "timeout": 2.0}  # timeout: the wait for a free connection


def _url_options(target: RedisTarget, options: dict[str, Any]) -> dict[str, Any]:
    """Connection options from the URL (password, db, TLS, query), over the store's and user's."""
    from redis.connection import SSLConnection, parse_url

    parsed = parse_url(target.url)
    for key in ("host", "port"):
        parsed.pop(key, None)
    if parsed.pop("connection_class", None) is SSLConnection:
        parsed["ssl"] = True
    return {**_CLIENT_DEFAULTS, **options, **parsed}


def make_client(target: RedisTarget, options: dict[str, Any], *, use_async: bool) -> tuple[Any, list[Any]]:
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
