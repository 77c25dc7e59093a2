"""Script calls to one Redis server, packed in one pass and sent on a connection of the client's pool.

redis-py's ``Script`` call encodes every argument through its generic encoder and runs the command
through ``Redis.execute_command`` (its retries, observability hooks, response callbacks): for a
reserve's ~50 arguments that is ~40 µs of Python on a small machine, a third of a loopback round
trip. The store retries by its own ``RetryPolicy`` (a client's own ``retry=`` is not applied to
its scripts) and reads script replies as they come, so for
a plain ``redis.Redis`` / ``redis.asyncio.Redis`` client (one server or Sentinel's master; not a
cluster, not a single-connection client, the default utf-8 encoding) ``direct_scripts`` wraps
each registered script in a ``DirectScript``: the ``EVALSHA`` is packed here and written and
read on a connection borrowed from the client's own pool and given back after (for a pool the
store built, ``keep_connections``: a few kept with the scripts between calls instead, ``Kept``,
which saves the pool's ~13 µs lock and bookkeeping per call; one that was closed meanwhile, or
that came from before a fork, is replaced). redis-py's connection disconnects itself on any
error while writing or reading (a timeout, a reset, a cancelled task), so the pool never hands
out a connection with a reply still pending. A server
that lost its scripts (``NOSCRIPT``) gets the script loaded and the call sent once more, as
redis-py's ``Script`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import DataError, NoScriptError

__all__ = ["DirectScript", "AsyncDirectScript", "Kept", "direct_scripts", "wire_command"]

_EVALSHA = b"EVALSHA"


def wire_command(*parts: Any) -> bytes:
    """``parts`` as one RESP array of bulk strings (str as utf-8, bytes as they are, numbers as text)."""
    out = [b"*%d\r\n" % len(parts)]
    append = out.append
    for part in parts:
        kind = type(part)
        if kind is str:
            data = part.encode()
        elif kind is bytes:
            data = part
        elif kind is int or kind is float:
            data = repr(part).encode()
        elif isinstance(part, (bytes, bytearray, memoryview)):
            data = bytes(part)
        else:  # what redis-py's encoder refuses too (bool, None, containers)
            raise DataError(f"Invalid input of type: {kind.__name__!r}. Convert to a bytes, string, int or float first.")
        size = len(data)
        append(_HEADS[size] if size < _HEADS_KEPT else b"$%d\r\n" % size)
        append(data)
        append(b"\r\n")
    return b"".join(out)


_HEADS_KEPT = 512
_HEADS = [b"$%d\r\n" % size for size in range(_HEADS_KEPT)]  # bulk string headers, made once


def _direct(client: Any, module: Any) -> bool:
    """May scripts of ``client`` go straight to its pool's connections?"""
    if type(client) is not module.Redis or getattr(client, "connection", None) is not None:
        return False  # a subclass may change how commands run; a single-connection client has no pool to borrow from
    kwargs = getattr(client.connection_pool, "connection_kwargs", None)
    if kwargs is None:
        return False
    return (kwargs.get("encoding", "utf-8").lower().replace("-", "") == "utf8"
            and kwargs.get("encoding_errors", "strict") == "strict")


def direct_scripts(client: Any, scripts: dict[str, Any], keep_connections: bool = False) -> dict[str, Any]:
    """``scripts`` (name -> redis-py ``Script``), each wrapped in a direct caller when ``client``
    allows; ``keep_connections``: the store built the client's blocking pool, so a few of its
    connections may stay with the scripts between calls."""
    for module, kind in ((redis, DirectScript), (redis.asyncio, AsyncDirectScript)):
        if _direct(client, module):
            pool = client.connection_pool
            keep = (keep_connections and type(pool) is module.BlockingConnectionPool
                    and str(pool.connection_kwargs.get("protocol") or 2) == "2"  # RESP3 may push data
                    and (pool.max_connections or 0) >= 4 * Kept.most)  # the client's other commands need the rest
            kept = Kept() if keep else None
            return {name: kind(client, script, kept) for name, script in scripts.items()}
    return scripts


class DirectScript:
    """A registered script, called like redis-py's ``Script``: ``script(keys=..., args=...)``."""

    __slots__ = ("client", "script", "kept")

    def __init__(self, client: Any, script: Any, kept: Kept | None = None) -> None:
        self.client, self.script = client, script
        self.kept = kept  # connections kept between calls (shared by a client's scripts), or None: the pool's

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        script = self.script
        try:
            return self._send(wire_command(_EVALSHA, script.sha, len(keys), *keys, *args))
        except NoScriptError:  # the server lost its scripts (a restart, SCRIPT FLUSH): load it, once
            script.sha = self.client.script_load(script.script)
            return self._send(wire_command(_EVALSHA, script.sha, len(keys), *keys, *args))

    def _send(self, command: bytes) -> Any:
        pool, kept = self.client.connection_pool, self.kept
        connection = pool.get_connection() if kept is None else kept.take(pool)
        try:
            connection.send_packed_command([command])
            return connection.read_response()
        finally:  # (an error while writing or reading has disconnected it: it connects again on next use)
            if kept is None:
                pool.release(connection)
            else:
                kept.give_back(connection, pool)


class AsyncDirectScript(DirectScript):
    """The asyncio twin: ``await script(keys=..., args=...)``."""

    __slots__ = ()

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:  # type: ignore[override]
        script = self.script
        try:
            return await self._asend(wire_command(_EVALSHA, script.sha, len(keys), *keys, *args))
        except NoScriptError:
            script.sha = await self.client.script_load(script.script)
            return await self._asend(wire_command(_EVALSHA, script.sha, len(keys), *keys, *args))

    async def _asend(self, command: bytes) -> Any:
        pool, kept = self.client.connection_pool, self.kept
        connection = await (pool.get_connection() if kept is None else kept.atake(pool))
        try:
            await connection.send_packed_command([command])
            return await connection.read_response()
        finally:
            if kept is None:
                await pool.release(connection)
            else:
                await kept.agive_back(connection, pool)


class Kept:
    """A few connections of a pool kept between script calls, and the calls waiting on the pool.

    At most ``most`` are kept (the client's other commands, and script calls beyond that many
    at once, go through the pool as usual: the pool never runs dry because of what is kept).
    ``list.append`` / ``list.pop`` are atomic, so threads share it without a lock. A call that
    finds none kept takes one from the pool (a new one, or it waits while all are out); so that
    it never waits while one sits here, a connection given back while a call waits goes to the
    pool instead (checked after it is put here, and the waiting call looks here once more after
    saying it waits: one of the two always sees the other).
    """

    most = 2  # a sync caller, or a few threads or tasks, reuse their connection; more use the pool

    __slots__ = ("idle", "waiting")

    def __init__(self) -> None:
        self.idle: list[Any] = []
        self.waiting: list[None] = []

    def _pop(self, pid: int | None) -> Any:
        """A kept connection made in process ``pid`` (None: any), or None."""
        idle = self.idle
        while idle:
            try:
                connection = idle.pop()
            except IndexError:
                return None
            if pid is None or getattr(connection, "pid", pid) == pid:
                return connection
            # made before a fork: the parent's socket, never used here (the pool has reset itself)
        return None

    def take(self, pool: Any) -> Any:
        pid = os.getpid()
        connection = self._pop(pid)
        if connection is None:
            self.waiting.append(None)
            try:
                connection = self._pop(pid)
                if connection is None:
                    return pool.get_connection()
            finally:
                self.waiting.pop()
        if connection.is_connected:  # (one an error disconnected connects again as it sends)
            try:
                stale = connection.can_read()  # the server closed it (EOF) or something is unread
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True
            if stale:
                connection.disconnect()  # start clean: it connects again as it sends
        return connection

    def give_back(self, connection: Any, pool: Any) -> None:
        idle = self.idle
        idle.append(connection)
        if self.waiting or len(idle) > self.most:  # (checked after the append: see the class docstring)
            connection = self._pop(os.getpid())
            if connection is not None:
                pool.release(connection)

    async def atake(self, pool: Any) -> Any:
        connection = self._pop(None)  # (a forked child gets no event loop of its parent's)
        if connection is None:
            self.waiting.append(None)
            try:
                connection = self._pop(None)
                if connection is None:
                    return await pool.get_connection()
            finally:
                self.waiting.pop()
        if connection.is_connected:
            try:
                stale = await connection.can_read()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True
            if stale:
                await connection.disconnect()
        return connection

    async def agive_back(self, connection: Any, pool: Any) -> None:
        idle = self.idle
        idle.append(connection)
        if self.waiting or len(idle) > self.most:
            connection = self._pop(None)
            if connection is not None:
                await pool.release(connection)
