"""Script calls to one Redis server, packed in one pass and sent on a connection of the client's pool.

redis-py's ``Script`` call encodes every argument through its generic encoder and runs the command
through ``Redis.execute_command`` (its retries, observability hooks, response callbacks): for a
reserve's ~50 arguments that is ~40 µs of Python on a small machine, a third of a loopback round
trip. The store retries by its own ``RetryPolicy`` and reads script replies as they come, so for
a plain ``redis.Redis`` / ``redis.asyncio.Redis`` client (one server or Sentinel's master; not a
cluster, not a single-connection client, the default utf-8 encoding) ``direct_scripts`` wraps
each registered script in a ``DirectScript``: the ``EVALSHA`` is packed here and written and
read on a connection borrowed from the client's own pool and given back after. redis-py's
connection disconnects itself on any error while writing or reading (a timeout, a reset, a
cancelled task), so the pool never hands out a connection with a reply still pending. A server
that lost its scripts (``NOSCRIPT``) gets the script loaded and the call sent once more, as
redis-py's ``Script`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import DataError, NoScriptError

__all__ = ["DirectScript", "AsyncDirectScript", "direct_scripts", "wire_command"]

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


def direct_scripts(client: Any, scripts: dict[str, Any]) -> dict[str, Any]:
    """``scripts`` (name -> redis-py ``Script``), each wrapped in a direct caller when ``client`` allows."""
    if _direct(client, redis):
        return {name: DirectScript(client, script) for name, script in scripts.items()}
    if _direct(client, redis.asyncio):
        return {name: AsyncDirectScript(client, script) for name, script in scripts.items()}
    return scripts


class DirectScript:
    """A registered script, called like redis-py's ``Script``: ``script(keys=..., args=...)``."""

    __slots__ = ("client", "script")

    def __init__(self, client: Any, script: Any) -> None:
        self.client, self.script = client, script

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        script = self.script
        try:
            return self._send(wire_command(_EVALSHA, script.sha, len(keys), *keys, *args))
        except NoScriptError:  # the server lost its scripts (a restart, SCRIPT FLUSH): load it, once
            script.sha = self.client.script_load(script.script)
            return self._send(wire_command(_EVALSHA, script.sha, len(keys), *keys, *args))

    def _send(self, command: bytes) -> Any:
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([command])
            return connection.read_response()
        finally:
            pool.release(connection)


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
        pool = self.client.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command([command])
            return await connection.read_response()
        finally:
            await pool.release(connection)
