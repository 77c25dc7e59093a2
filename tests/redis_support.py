"""Shared helpers and fixtures for tests that need Redis.

``redis_url`` is the server at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``): tests that
use it skip when it is unreachable, except in CI (``CI=true``), where they fail. Every test
session writes under its own key prefix and deletes those keys at the end. ``RedisServer`` and
``start_cluster`` run throwaway servers (``redis-server`` binary) on free ports.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.commands.core import AsyncScript, Script

from langchain_budgetguard.stores.redis_wire import AsyncDirectScript, DirectScript

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() == "true"
SESSION_PREFIX = f"bgtest:{uuid.uuid4().hex[:8]}:"
_prefixes = itertools.count()


def unavailable(reason: str) -> None:
    """Skip the test, or fail it in CI, where every Redis test must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: Redis tests must run in CI)", pytrace=False)
    pytest.skip(reason)


def fresh_prefix() -> str:
    """A key prefix no other test of this session uses (under the session's prefix)."""
    return f"{SESSION_PREFIX}{next(_prefixes)}:"


def delete_prefix(client: Any, prefix: str) -> int:
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for key in keys:
        client.delete(key)
    return len(keys)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of a reachable Redis; this session's keys are deleted at the end."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        unavailable(f"no Redis at {REDIS_URL} ({exc}); set REDIS_URL or start redis-server")
    try:
        yield REDIS_URL
    finally:
        delete_prefix(client, SESSION_PREFIX)
        client.close()


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the session's Redis that decodes replies (for reading keys in tests)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


# -- throwaway servers -------------------------------------------------------------------------


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        unavailable("redis-server is not installed")
    return path  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, so at most 55535."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20_000, 55_535)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


class RedisServer:
    """A redis-server child process on ``port``, writing its files under ``directory``."""

    def __init__(self, directory: Path, port: int | None = None, *args: str) -> None:
        self.directory, self.port, self.args = directory, port or free_port(), args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        return command + ["--appendonly", "no", "--dir", str(self.directory), *self.args]

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / f"redis-{self.port}.log", "ab")  # noqa: SIM115 - kept by the child
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._ping, what=f"redis-server on port {self.port}")
        return self

    def _ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} exited; see {self.directory}")
        with redis.Redis(port=self.port, socket_connect_timeout=0.2) as client:
            return bool(client.ping())

    def stop(self) -> None:
        """Shut down as Redis does on SIGTERM (saving the append-only file when it has one)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class SentinelServer(RedisServer):
    """A Sentinel on a free port that monitors the master at ``master_port`` as ``service``."""

    def __init__(self, directory: Path, master_port: int, service: str) -> None:
        super().__init__(directory)
        self.master_port, self.service = master_port, service

    def command(self) -> list[str]:
        config = self.directory / "sentinel.conf"  # Sentinel rewrites its config file: one of its own
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
        )
        return [redis_server_binary(), str(config), "--sentinel"]


def start_cluster(directory: Path, nodes: int = 3, *args: str) -> list[RedisServer]:
    """A Redis Cluster of ``nodes`` masters, no replicas (``args``: more redis-server options);
    returns once it reports cluster_state:ok."""
    servers = []
    try:
        for _ in range(nodes):
            port = free_cluster_port()
            cluster_args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", *args)
            servers.append(RedisServer(directory / str(port), port, *cluster_args).start())
        cli = shutil.which("redis-cli")
        if cli is None:
            unavailable("redis-cli is not installed")
        addresses = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def ready() -> bool:
            for s in servers:
                with redis.Redis(port=s.port) as client:
                    if client.cluster("info").get("cluster_state") != "ok":
                        return False
            return True

        wait_until(ready, timeout=30, what="cluster_state:ok")
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


# -- spying on script calls --------------------------------------------------------------------


@pytest.fixture
def script_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The key list of every Lua script call made during the test (sync and async clients)."""
    calls: list[tuple[str, ...]] = []
    sync_call, async_call = Script.__call__, AsyncScript.__call__

    def spy(self: Script, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        calls.append(tuple(keys or ()))
        return sync_call(self, keys, args, client)

    async def aspy(self: AsyncScript, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        calls.append(tuple(keys or ()))
        return await async_call(self, keys, args, client)

    direct_call, adirect_call = DirectScript.__call__, AsyncDirectScript.__call__

    def direct_spy(self: DirectScript, keys: Any = (), args: Any = ()) -> Any:
        calls.append(tuple(keys or ()))
        return direct_call(self, keys, args)

    async def adirect_spy(self: AsyncDirectScript, keys: Any = (), args: Any = ()) -> Any:
        calls.append(tuple(keys or ()))
        return await adirect_call(self, keys, args)

    from langchain_budgetguard.stores.redis import _AsyncClusterScript, _ClusterScript

    cluster_call, acluster_call = _ClusterScript.__call__, _AsyncClusterScript.__call__

    def cluster_spy(self: _ClusterScript, keys: Any = (), args: Any = ()) -> Any:
        calls.append(tuple(keys or ()))
        return cluster_call(self, keys, args)

    async def acluster_spy(self: _AsyncClusterScript, keys: Any = (), args: Any = ()) -> Any:
        calls.append(tuple(keys or ()))
        return await acluster_call(self, keys, args)

    monkeypatch.setattr(_ClusterScript, "__call__", cluster_spy)
    monkeypatch.setattr(_AsyncClusterScript, "__call__", acluster_spy)
    monkeypatch.setattr(Script, "__call__", spy)
    monkeypatch.setattr(AsyncScript, "__call__", aspy)
    monkeypatch.setattr(DirectScript, "__call__", direct_spy)
    monkeypatch.setattr(AsyncDirectScript, "__call__", adirect_spy)
    return calls


# -- a proxy that loses replies ------------------------------------------------------------------


class ReplyDroppingProxy:
    """A TCP proxy on a free port in front of a Redis server that can lose script replies.

    Requests always reach the server (it runs them); while ``drop_script_replies`` > 0 the reply
    to the next script call (EVALSHA / EVAL) on a connection is thrown away and that client
    connection closed, as when a network fails after the server answered; each loss counts the
    budget down, and ``-1`` loses every script reply until set back to 0. ``skip_script_replies``
    lets that many script replies through first. ``lost`` counts the replies thrown away.
    """

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.drop_script_replies = 0
        self.skip_script_replies = 0
        self.lost = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            # Clients wait for each reply before they send the next command, so a script request
            # seen upstream is answered by the next data downstream: that is what gets lost.
            doomed = threading.Event()
            threading.Thread(target=self._upstream, args=(client, server, doomed), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, doomed), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, doomed: Any) -> None:
        try:
            while data := client.recv(65536):
                upper = data.upper()
                if (b"EVALSHA" in upper or b"\r\nEVAL\r\n" in upper) and self._should_drop():
                    doomed.set()
                server.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _should_drop(self) -> bool:
        with self._lock:
            if self.drop_script_replies == 0:
                return False
            if self.skip_script_replies > 0:
                self.skip_script_replies -= 1
                return False
            if self.drop_script_replies > 0:
                self.drop_script_replies -= 1
            self.lost += 1
            return True

    def _downstream(self, server: socket.socket, client: socket.socket, doomed: Any) -> None:
        try:
            while data := server.recv(65536):
                if doomed.is_set():
                    return  # the finally below cuts both sides: the client sees its connection drop
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
