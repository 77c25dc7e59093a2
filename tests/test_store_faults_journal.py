"""The fail-open settle journal across outages and processes, on throwaway redis-servers.

Calls served while Redis is down are settled into the journal; their spend must reach Redis
exactly once: when Redis is back, at a normal process exit, or (file journal) when the next
process opens the journal, however late.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import redis

from langchain_budgetguard.stores.base import Counter, CounterState, Hold
from langchain_budgetguard.stores.journal import MemoryJournal, SqliteJournal
from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

from .redis_support import RedisServer, fresh_prefix, redis_url, wait_until  # noqa: F401 - fixture

FAST_FAIL = RetryPolicy(attempts=2, deadline_seconds=0.3, first_wait=0.01, max_wait=0.05)
pytestmark = pytest.mark.redis

# A process that serves 5 calls while Redis is down (as a fail-open guard does: the reserve
# fails, the call goes ahead, its settle is journaled), then waits for a line on stdin and exits
# normally, without flushing or closing anything itself.
WORKER = textwrap.dedent(
    """
    import sys
    from langchain_budgetguard.errors import BudgetStoreUnavailableError
    from langchain_budgetguard.stores.base import Counter, Hold
    from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

    url, prefix, key, journal = sys.argv[1:5]
    options = {"journal_path": journal} if journal != "-" else {}
    store = RedisStore(url, prefix=prefix, retry=RetryPolicy(attempts=2, deadline_seconds=0.3), **options)
    print("ready", flush=True)
    sys.stdin.readline()  # the test stops Redis
    for n in range(5):
        try:
            store.reserve([Counter(key, 10**9)], Hold(f"call-{n}", 1000, 30))
            raise SystemExit("Redis was expected to be down")
        except BudgetStoreUnavailableError:
            pass
        result = store.settle(f"call-{n}", [key], 700 + n)
        assert result.pending, result
    print("served", len(store.pending_journal), flush=True)
    sys.stdin.readline()  # the test starts Redis again (or not)
    """
)


def start_worker(url: str, prefix: str, key: str, journal: str) -> subprocess.Popen[str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, url, prefix, key, journal],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def tell(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()


SERVED = sum(700 + n for n in range(5))


def read_spent(port: int, store_prefix: str, key: str) -> int:
    with redis.Redis(port=port) as admin:
        return int(admin.hget(store_prefix + key, "s") or 0)


def test_memory_journal_is_flushed_at_a_normal_exit(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    prefix, key = fresh_prefix(), "{j" + uuid.uuid4().hex[:6] + "}:user:alice"
    try:
        worker = start_worker(server.url, prefix, key, "-")
        server.stop()
        tell(worker)
        assert worker.stdout is not None and worker.stdout.readline().split() == ["served", "5"]
        server.start()
        tell(worker)  # exits at once: the exit flush replays the journal
        assert worker.wait(timeout=30) == 0, worker.stderr.read() if worker.stderr else ""
        assert read_spent(server.port, prefix, key) == SERVED
        with RedisStore(server.url, prefix=prefix) as store:
            assert store.read([key]) == [CounterState(SERVED, 0)]  # no hold left by the refused reserves
    finally:
        server.stop()


def test_file_journal_survives_the_exit_and_replays_on_the_next_start(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    prefix, key = fresh_prefix(), "{j" + uuid.uuid4().hex[:6] + "}:user:alice"
    journal = str(tmp_path / "journal.sqlite")
    try:
        worker = start_worker(server.url, prefix, key, journal)
        server.stop()
        tell(worker)
        assert worker.stdout is not None and worker.stdout.readline().split() == ["served", "5"]
        tell(worker)  # exits while Redis is still down: the entries stay on disk
        assert worker.wait(timeout=30) == 0
        assert worker.stderr is not None and "kept in SqliteJournal" in worker.stderr.read()
        assert len(SqliteJournal(journal).pending()) == 5
        server.start()
        assert read_spent(server.port, prefix, key) == 0
        # The next process that opens the journal replays it (in the background, and on close).
        store = RedisStore(server.url, prefix=prefix, journal_path=journal)
        wait_until(lambda: not store.pending_journal, timeout=10, what="the replay")
        store.close()
        assert read_spent(server.port, prefix, key) == SERVED
        with RedisStore(server.url, prefix=prefix, journal_path=journal) as again:  # and the one after: nothing
            assert again.pending_journal == ()
            assert again.read([key]) == [CounterState(SERVED, 0)]
    finally:
        server.stop()


def test_a_replay_counts_once_however_late(tmp_path: Path) -> None:
    """A process died after Redis applied a journal entry but before it was deleted from the
    file, and the next replay comes after every call record expired."""
    server = RedisServer(tmp_path).start()
    journal = str(tmp_path / "late.sqlite")
    prefix, key, other = fresh_prefix(), "{late}:user:bob", "{platform}:all"
    try:
        store = RedisStore(server.url, prefix=prefix, journal_path=journal, retry=FAST_FAIL)
        entry = store.journal.append("call-late", (key, other), 500)
        assert store.flush_journal() == 1
        assert store.read([key, other]) == [CounterState(500, 0)] * 2
        with sqlite3.connect(journal) as db:  # the entry is back, as if its delete never happened
            db.execute(
                "INSERT INTO settles (seq, call_id, keys, amount) VALUES (?, ?, ?, ?)",
                (entry.seq, entry.call_id, f'["{key}", "{other}"]', entry.amount),
            )
        with redis.Redis(port=server.port) as admin:  # the retry window is long over
            for k in (key, other):
                admin.delete(store.record_key("call-late", k))
        store.close()
        with RedisStore(server.url, prefix=prefix, journal_path=journal) as later:
            wait_until(lambda: not later.pending_journal, timeout=10, what="the replay")
            assert later.read([key, other]) == [CounterState(500, 0)] * 2
            # A new entry of the same journal is still applied.
            later.journal.append("call-next", (key,), 7)
            assert later.flush_journal() == 1
            assert later.read([key, other]) == [CounterState(507, 0), CounterState(500, 0)]
    finally:
        server.stop()


def test_memory_journal_marks_expire_file_journal_marks_do_not(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        for journal, durable in ((MemoryJournal(), False), (SqliteJournal(tmp_path / "m.sqlite"), True)):
            store = RedisStore(server.url, prefix=fresh_prefix(), journal=journal)
            store.journal.append(uuid.uuid4().hex, ("{m}:k",), 1)
            assert store.flush_journal() == 1
            mark = f"{store.prefix}j:{{m}}:{journal.journal_id}"
            with redis.Redis(port=server.port) as admin:
                assert admin.get(mark) == b"1"
                assert (admin.ttl(mark) == -1) is durable
            store.close()
    finally:
        server.stop()


def test_a_journal_needs_a_writable_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="journal"):
        SqliteJournal(tmp_path / "missing-dir" / "j.sqlite")
    with pytest.raises(ValueError, match="journal_path or journal"):
        RedisStore("redis://127.0.0.1:1/0", journal_path=str(tmp_path / "a"), journal=MemoryJournal())
    store = RedisStore(f"redis://127.0.0.1:1/0?journal_path={tmp_path / 'q.sqlite'}&retry_window_seconds=60")
    assert isinstance(store.journal, SqliteJournal) and store.retry_window_seconds == 60
    with pytest.raises(ValueError, match="retry_window_seconds"):
        RedisStore("redis://127.0.0.1:1/0?retry_window_seconds=forever")
    with pytest.raises(ValueError, match="retry_window_seconds"):
        RedisStore("redis://127.0.0.1:1/0", retry_window_seconds=float("inf"))


def test_reserve_refused_by_hold_token_after_the_journal_replayed(tmp_path: Path) -> None:
    """A call served fail-open whose settle was replayed burns its call id in Redis too."""
    server = RedisServer(tmp_path).start()
    try:
        with RedisStore(server.url, prefix=fresh_prefix()) as store:
            store.journal.append("served-open", ("{b}:k",), 5)
            store.flush_journal()
            assert store.reserve([Counter("{b}:k", 100)], Hold("served-open", 1, 30)).reused
    finally:
        server.stop()


def test_an_entry_redis_refuses_holds_back_later_entries_of_its_tag(redis_url: str) -> None:
    """A tag's journal mark is the highest seq applied there: a later entry of the tag applied
    past a refused one (a key of the wrong type) would make the refused one count as replayed,
    its charge lost, once it becomes replayable. So later entries of that tag wait behind it;
    other tags go on."""
    store = RedisStore(redis_url, prefix=fresh_prefix(), retry=FAST_FAIL)
    tag, other = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    bad, good, elsewhere = "{" + tag + "}:user:bad", "{" + tag + "}:user:good", "{" + other + "}:user:x"
    with redis.Redis.from_url(redis_url) as admin:
        admin.set(store.redis_keys(bad)[0], "not a hash")  # WRONGTYPE for the settle script
        store.journal.append("refused", (bad,), 300)
        store.journal.append("behind", (good,), 40)
        store.journal.append("other-tag", (elsewhere,), 5)
        assert store.flush_journal() == 1  # only the other tag's entry
        assert [e.call_id for e in store.pending_journal] == ["refused", "behind"]
        assert store.read([elsewhere]) == [CounterState(5, 0)]
        admin.delete(store.redis_keys(bad)[0])  # the operator fixes the key
    assert store.flush_journal() == 2
    assert store.read([bad, good]) == [CounterState(300, 0), CounterState(40, 0)]
    store.close()
