"""The settle journal: settles that could not reach the store, kept until they can be replayed.

A ``RedisStore`` appends a settle here when Redis cannot be reached (the fail-open path: calls
were served, their cost must not be lost) and replays the journal, oldest first, when Redis
answers again: after the next operation that succeeds, from a background thread while entries
are waiting, on ``store.close()`` / leaving ``with store:``, and at interpreter exit.

Every entry has a sequence number, increasing within its journal, and every journal an id. A
replay hands both to the settle script, which keeps per hash tag the highest sequence number
of this journal applied there (``<prefix>j:{tag}:<journal id>``, no TTL for a file journal): a
replay counts once however late it comes, even when a reply was lost or the process died right
after Redis applied it. Since a mark is a high-water mark, a replay never applies an entry on a tag
before an earlier entry that waits on that tag (its node down, or refused): those wait in order,
while the entries of other tags go on.

Two journals:

- ``MemoryJournal`` (default): in this process only. Entries still waiting when the process
  exits and Redis is still down are lost (logged with their total).
- ``SqliteJournal(path)``: a local SQLite file (stdlib ``sqlite3``), written before the settle
  returns, so that entries survive a crash or an exit while Redis is down; the next process that
  opens the same file replays them. Use it with ``RedisStore(..., journal_path=...)`` or
  ``?journal_path=/var/lib/app/budget-journal.sqlite`` in the URL. Processes may share one file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["PendingSettle", "SettleJournal", "MemoryJournal", "SqliteJournal", "MEMORY_MARK_TTL_SECONDS"]

# How long Redis keeps an in-process journal's marks: only replays of this process need them.
MEMORY_MARK_TTL_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class PendingSettle:
    """A settle that could not reach the store, waiting in the journal to be replayed.

    ``amounts``: what each of ``keys`` is charged (a settle with per-key amounts); None:
    ``amount`` on every key."""

    call_id: str
    keys: tuple[str, ...]
    amount: int
    seq: int = 0
    amounts: tuple[int, ...] | None = None


@runtime_checkable
class SettleJournal(Protocol):
    """Where settles wait for the store: append, list oldest first, drop once applied."""

    journal_id: str
    durable: bool  # True: entries survive the process (their marks in Redis never expire)

    def append(self, call_id: str, keys: Sequence[str], amount: int, *,
               amounts: Sequence[int] | None = None) -> PendingSettle: ...
    def pending(self) -> list[PendingSettle]: ...
    def done(self, entry: PendingSettle) -> None: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


def _amounts(keys: Sequence[str], amounts: Sequence[int] | None) -> tuple[int, ...] | None:
    if amounts is None:
        return None
    if len(amounts) != len(keys):
        raise ValueError(f"amounts must give one amount per key: got {len(amounts)} for {len(keys)} keys")
    return tuple(amounts)


class MemoryJournal:
    """The journal in a list: lost with the process."""

    durable = False

    def __init__(self) -> None:
        self.journal_id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._entries: dict[int, PendingSettle] = {}
        self._next = 1

    def append(self, call_id: str, keys: Sequence[str], amount: int, *,
               amounts: Sequence[int] | None = None) -> PendingSettle:
        with self._lock:
            entry = PendingSettle(call_id, tuple(keys), amount, self._next, _amounts(keys, amounts))
            self._entries[entry.seq] = entry
            self._next += 1
            return entry

    def pending(self) -> list[PendingSettle]:
        with self._lock:
            return list(self._entries.values())

    def done(self, entry: PendingSettle) -> None:
        with self._lock:
            self._entries.pop(entry.seq, None)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"MemoryJournal({len(self)} pending)"


class SqliteJournal:
    """The journal in a SQLite file: an entry is on disk before ``append`` returns."""

    durable = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not self.path or self.path == ":memory:":
            raise ValueError(f"SqliteJournal needs a file path, got {self.path!r}")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS settles (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "call_id TEXT NOT NULL, keys TEXT NOT NULL, amount INTEGER NOT NULL)"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(settles)")}
            if "amounts" not in columns:  # a file from before per-key amounts: NULL is `amount` everywhere
                self._db.execute("ALTER TABLE settles ADD COLUMN amounts TEXT")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('journal_id', ?)", (uuid.uuid4().hex,))
            self.journal_id = self._db.execute("SELECT v FROM meta WHERE k = 'journal_id'").fetchone()[0]
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise ValueError(
                f"cannot open the settle journal {self.path!r} ({exc}): give a writable file path "
                "(its directory must exist)"
            ) from exc
        self._count = self._db.execute("SELECT COUNT(*) FROM settles").fetchone()[0]

    def append(self, call_id: str, keys: Sequence[str], amount: int, *,
               amounts: Sequence[int] | None = None) -> PendingSettle:
        per_key = _amounts(keys, amounts)
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO settles (call_id, keys, amount, amounts) VALUES (?, ?, ?, ?)",
                (call_id, json.dumps(list(keys)), amount, None if per_key is None else json.dumps(list(per_key))),
            )
            self._count += 1
            return PendingSettle(call_id, tuple(keys), amount, int(cursor.lastrowid or 0), per_key)

    def pending(self) -> list[PendingSettle]:
        with self._lock:
            rows = self._db.execute("SELECT seq, call_id, keys, amount, amounts FROM settles ORDER BY seq").fetchall()
            self._count = len(rows)
        return [
            PendingSettle(call_id, tuple(json.loads(keys)), int(amount), int(seq),
                          None if amounts is None else tuple(int(a) for a in json.loads(amounts)))
            for seq, call_id, keys, amount, amounts in rows
        ]

    def done(self, entry: PendingSettle) -> None:
        with self._lock:
            self._db.execute("DELETE FROM settles WHERE seq = ?", (entry.seq,))
            self._count = max(0, self._count - 1)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"SqliteJournal({self.path!r}, {len(self)} pending)"
