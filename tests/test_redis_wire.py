"""Script calls packed and sent straight on a pooled connection (stores.redis_wire)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.connection import Connection

from langchain_budgetguard.stores.base import Counter, Hold
from langchain_budgetguard.stores.redis import RedisStore
from langchain_budgetguard.stores.redis_wire import AsyncDirectScript, DirectScript, Kept, direct_scripts, wire_command

from .redis_support import delete_prefix, fresh_prefix, redis_url  # noqa: F401 - fixture

SLOW = "local t = redis.call('TIME'); local stop = t[1] * 1000000 + t[2] + tonumber(ARGV[1]); " \
       "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop; return ARGV[2]"
ECHO = "return {KEYS[1], ARGV[1], #ARGV}"


@pytest.mark.parametrize("parts", [
    ("EVALSHA", "abc", 2, "k1", "k2", "v"),
    ("SET", "", "é€😀", b"\x00\r\n\xff", 0, -17, 10**30, 1.5, "x" * 511, "y" * 512, "é" * 300),
])
def test_wire_command_is_what_redis_py_sends(parts: tuple[Any, ...]) -> None:
    assert wire_command(*parts) == b"".join(Connection().pack_command(*parts))


@pytest.mark.parametrize("bad", [True, None, ["a"], {"a": 1}])
def test_wire_command_refuses_what_redis_py_refuses(bad: Any) -> None:
    with pytest.raises(redis.DataError, match="Invalid input of type"):
        wire_command("SET", "k", bad)


def test_only_a_plain_client_with_a_pool_gets_direct_scripts() -> None:
    def wrapped(client: Any) -> Any:
        return direct_scripts(client, {"echo": client.register_script(ECHO)})["echo"]

    assert type(wrapped(redis.Redis())) is DirectScript
    assert type(wrapped(redis.asyncio.Redis())) is AsyncDirectScript

    class Mine(redis.Redis):
        pass

    others = [Mine(), redis.Redis(single_connection_client=False, encoding="latin-1"),
              redis.Redis(encoding_errors="replace")]
    for client in others:
        assert not isinstance(wrapped(client), DirectScript)
    single = redis.Redis(host="127.0.0.1", port=1, single_connection_client=False)
    single.connection = object()  # what single_connection_client=True sets (it would connect now)
    assert not isinstance(wrapped(single), DirectScript)


def test_a_store_built_from_a_url_sends_its_scripts_directly(redis_url: str) -> None:  # noqa: F811
    prefix = fresh_prefix()
    with RedisStore(redis_url, prefix=prefix) as store:
        assert store.reserve([Counter("{t}:a", 100)], Hold("c1", 40, 30)).ok
        assert all(type(s) is DirectScript for s in store._sync_backend().scripts.values())
        assert store.settle("c1", ["{t}:a"], 30).applied
        assert store.read(["{t}:a"])[0].spent == 30
        delete_prefix(redis.Redis.from_url(redis_url), prefix)


def test_replies_come_back_as_redis_py_returns_them(redis_url: str) -> None:  # noqa: F811
    for protocol in (2, 3):
        for decode in (False, True):
            client = redis.Redis.from_url(redis_url, protocol=protocol, decode_responses=decode)
            script = client.register_script(ECHO)
            direct = DirectScript(client, script)
            assert direct(keys=["k"], args=["é", "2"]) == script(keys=["k"], args=["é", "2"])
            client.close()


def test_a_server_that_lost_its_scripts_gets_them_again(redis_url: str) -> None:  # noqa: F811
    client = redis.Redis.from_url(redis_url)
    direct = DirectScript(client, client.register_script(ECHO + " -- wire reload"))
    assert direct(keys=["k"], args=["a"]) == [b"k", b"a", 1]
    client.script_flush()
    assert direct(keys=["k"], args=["b"]) == [b"k", b"b", 1]
    client.close()


def test_a_timed_out_reply_never_answers_the_next_call(redis_url: str) -> None:  # noqa: F811
    client = redis.Redis.from_url(redis_url, socket_timeout=0.25)
    slow = DirectScript(client, client.register_script(SLOW))
    slow(args=["0", "warm"])
    with pytest.raises(redis.TimeoutError):
        slow(args=["1000000", "late"])  # 1 s of server time: the reply comes after the timeout
    time.sleep(1.0)  # the server is free again
    assert slow(args=["0", "mine"]) == b"mine"  # not "late": that connection was dropped
    client.close()


def test_a_killed_connection_is_replaced(redis_url: str) -> None:  # noqa: F811
    client = redis.Redis.from_url(redis_url)
    echo = DirectScript(client, client.register_script(ECHO))
    assert echo(keys=["k"], args=["a"]) == [b"k", b"a", 1]
    admin = redis.Redis.from_url(redis_url)
    name = f"wire-{threading.get_ident()}"
    connection = client.connection_pool.get_connection()
    connection.send_command("CLIENT", "SETNAME", name)
    assert connection.read_response() in (b"OK", "OK", True)
    client.connection_pool.release(connection)
    admin.client_kill_filter(_id=next(c["id"] for c in admin.client_list() if c["name"] == name))
    # The pool finds the dead connection when it hands it out and connects again (or the call
    # fails with ConnectionError, for the store to retry): either way no reply is lost or mixed up.
    try:
        first = echo(keys=["k"], args=["b"])
    except redis.ConnectionError:
        first = [b"k", b"b", 1]
    assert first == [b"k", b"b", 1]
    assert echo(keys=["k"], args=["c"]) == [b"k", b"c", 1]
    admin.close()
    client.close()


def test_a_cancelled_async_call_never_answers_the_next_one(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, max_connections=1)
        slow = AsyncDirectScript(client, client.register_script(SLOW))
        assert await slow(args=["0", "warm"]) == b"warm"
        task = asyncio.create_task(slow(args=["200000", "late"]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await slow(args=["0", "mine"]) == b"mine"  # the only connection: a fresh one, no stale reply
        await client.script_flush()
        assert await slow(args=["0", "reloaded"]) == b"reloaded"
        await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("keep", [False, True])
def test_many_threads_share_the_pool_and_get_their_own_replies(redis_url: str, keep: bool) -> None:  # noqa: F811
    # A pool's wait for a free connection that never comes (one kept aside) would fail in 2 s.
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=8, timeout=2)
    client = redis.Redis(connection_pool=pool)
    echo = direct_scripts(client, {"echo": client.register_script(ECHO)}, keep_connections=keep)["echo"]
    wrong: list[Any] = []

    def work(n: int) -> None:
        for i in range(200):
            reply = echo(keys=[f"k{n}"], args=[f"{n}:{i}"])
            if reply != [f"k{n}".encode(), f"{n}:{i}".encode(), 1]:
                wrong.append(reply)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]  # 16 threads, 8 connections
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    client.close()


def _kept_echo(redis_url: str) -> tuple[Any, DirectScript]:  # noqa: F811
    client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(redis_url, max_connections=8))
    scripts = direct_scripts(client, {"echo": client.register_script(ECHO)}, keep_connections=True)
    assert scripts["echo"].kept.idle == []
    return client, scripts["echo"]


def test_kept_connections_are_reused_and_replaced_when_the_server_closed_them(redis_url: str) -> None:  # noqa: F811
    client, echo = _kept_echo(redis_url)
    for i in range(20):
        assert echo(keys=["k"], args=[str(i)]) == [b"k", str(i).encode(), 1]
    assert len(echo.kept.idle) == 1 and len(client.connection_pool._connections) == 1  # one, kept
    kept = echo.kept.idle[0]
    admin = redis.Redis.from_url(redis_url)
    kept.send_command("CLIENT", "ID")
    admin.client_kill_filter(_id=kept.read_response())
    time.sleep(0.05)
    assert echo(keys=["k"], args=["after"]) == [b"k", b"after", 1]  # seen closed before the write: reconnected
    assert echo.kept.idle == [kept]
    admin.close()
    client.close()


def test_a_kept_connection_stays_with_the_process_that_made_it(redis_url: str) -> None:  # noqa: F811
    import multiprocessing

    client, echo = _kept_echo(redis_url)
    assert echo(keys=["k"], args=["parent"]) == [b"k", b"parent", 1]
    parent_connection = echo.kept.idle[0]

    def child(out: Any) -> None:
        replies = [echo(keys=["k"], args=[f"child{i}"]) for i in range(50)]
        out.put((replies == [[b"k", f"child{i}".encode(), 1] for i in range(50)], parent_connection in echo.kept.idle))

    context = multiprocessing.get_context("fork")
    out = context.Queue()
    process = context.Process(target=child, args=(out,))
    process.start()
    for i in range(50):  # the parent keeps using its connection meanwhile
        assert echo(keys=["k"], args=[f"p{i}"]) == [b"k", f"p{i}".encode(), 1]
    right, reused_parents = out.get(timeout=10)
    process.join(10)
    assert right and not reused_parents
    assert echo(keys=["k"], args=["end"]) == [b"k", b"end", 1] and echo.kept.idle == [parent_connection]
    client.close()


def test_many_async_tasks_share_kept_connections(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(redis_url, max_connections=8, timeout=2)
        client = redis.asyncio.Redis(connection_pool=pool)
        scripts = direct_scripts(client, {"echo": client.register_script(ECHO), "slow": client.register_script(SLOW)},
                                 keep_connections=True)
        echo, slow = scripts["echo"], scripts["slow"]
        assert type(echo) is AsyncDirectScript and echo.kept.idle == [] and slow.kept is echo.kept

        async def work(n: int) -> list[Any]:
            return [await echo(keys=[f"k{n}"], args=[f"{n}:{i}"]) for i in range(30)]

        got = await asyncio.gather(*(work(n) for n in range(20)))  # 20 tasks on 8 connections: none waits long
        assert got == [[[f"k{n}".encode(), f"{n}:{i}".encode(), 1] for i in range(30)] for n in range(20)]
        assert 1 <= len(echo.kept.idle) <= Kept.most
        task = asyncio.create_task(slow(args=["200000", "late"]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)  # the server is free again
        # Every kept connection answers its own call (the cancelled one was dropped, not kept with a reply due).
        got = await asyncio.gather(*(echo(keys=["k"], args=[str(i)]) for i in range(5)))
        assert got == [[b"k", str(i).encode(), 1] for i in range(5)]
        await client.aclose()

    asyncio.run(main())


def test_a_small_pool_keeps_nothing_aside() -> None:
    pool = redis.BlockingConnectionPool(max_connections=4 * Kept.most - 1)
    client = redis.Redis(connection_pool=pool)
    assert direct_scripts(client, {"echo": client.register_script(ECHO)}, keep_connections=True)["echo"].kept is None


def test_what_is_kept_leaves_the_pool_to_the_clients_other_commands(redis_url: str) -> None:  # noqa: F811
    """After many script calls at once, at most ``Kept.most`` connections stay aside: the client's
    own commands (a store reads overrides, checks the eviction policy, ... through the same pool)
    still get every other connection of the pool."""
    async def main() -> None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(redis_url, max_connections=8, timeout=0.5)
        client = redis.asyncio.Redis(connection_pool=pool)
        echo = direct_scripts(client, {"echo": client.register_script(ECHO)}, keep_connections=True)["echo"]

        async def scripts(n: int) -> None:
            for i in range(20):
                assert await echo(keys=["k"], args=[f"{n}:{i}"]) == [b"k", f"{n}:{i}".encode(), 1]

        await asyncio.gather(*(scripts(n) for n in range(20)))  # all 8 connections made and used
        assert len(echo.kept.idle) == Kept.most
        others = [await pool.get_connection() for _ in range(8 - Kept.most)]  # none waits 0.5 s
        for connection in others:
            await pool.release(connection)
        await client.aclose()

    asyncio.run(main())


def test_a_kept_connection_to_a_server_gone_connects_once_per_call(tmp_path: Any) -> None:
    """A server that went away costs each call one connect attempt (one connect timeout), not two."""
    from .redis_support import RedisServer

    server = RedisServer(tmp_path).start()
    client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(server.url, max_connections=8,
                                                                               socket_connect_timeout=0.5))
    echo = direct_scripts(client, {"echo": client.register_script(ECHO)}, keep_connections=True)["echo"]
    assert echo(keys=["k"], args=["up"]) == [b"k", b"up", 1]
    kept = echo.kept.idle[0]
    server.stop()
    connects = []
    real_connect = kept._connect  # redis-py's socket connect, under connect() and the send's own
    kept._connect = lambda: (connects.append(1), real_connect())[1]  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(redis.ConnectionError):
            echo(keys=["k"], args=["down"])
    assert len(connects) == 3 and echo.kept.idle == [kept]
    client.close()
