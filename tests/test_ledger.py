"""The per-call ledger: one row per settled call, written with the settle, never twice.

A scripted multi-user run (plain calls, degrades, refusals, streams, a stream cut by its reader,
async calls) runs on the in-process store, a real Redis, a Redis whose replies get lost (settles
retried and journaled), and a 3-node Redis Cluster. After each: the ledger has exactly one row
per settled call, and on every counter the costs of the rows charged to it sum to its spent,
to the nano-USD. ``budgetguard ledger --csv`` parses back to the same rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from langchain_budgetguard import BudgetExceededError, BudgetGuard, Limit
from langchain_budgetguard.cli import main
from langchain_budgetguard.config import guard_from_config
from langchain_budgetguard.overrides import BudgetAdmin
from langchain_budgetguard.stores.base import Counter, Hold, LedgerRow
from langchain_budgetguard.stores.ledger import call_row, rows_from_csv, rows_to_csv
from langchain_budgetguard.stores.memory import MemoryStore
from langchain_budgetguard.stores.redis import RedisStore, RetryPolicy

from .fakes import ExactEstimator, UsageChat
from .redis_support import RedisServer, ReplyDroppingProxy, fresh_prefix, redis_url, start_cluster  # noqa: F401

PRICES = {"big": {"input": "40", "output": "50"}, "mini": {"input": "4", "output": "5"}}
USERS = ("alice", "bob", "carol")


def big(**kw: Any) -> UsageChat:
    return UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000, **kw)


def mini(**kw: Any) -> UsageChat:
    return UsageChat(model_name="mini", input_tokens=1000, output_tokens=1000, max_tokens=1000, **kw)


def make_guard(store: Any, name: str | None = None, per: str = "user") -> BudgetGuard:
    return BudgetGuard(big(), limits=[Limit(usd="0.5", per=per, window="day"), Limit(usd=100, per="global")],
                       degrade_to=[mini()], store=store, name=name or f"ledger-{uuid.uuid4().hex[:8]}",
                       prices=PRICES, estimator=ExactEstimator(1000))


def scripted_run(guard: BudgetGuard, per: str = "user", between: Any = None) -> int:
    """Calls that settle (plain, degraded, streamed, a stream cut after its first chunk, async),
    and refusals that do not; returns how many calls were admitted (each settles once)."""
    admitted = 0
    field = f"{per}_id"
    for round_ in range(8):
        for who in USERS[: 1 + round_ % 3]:
            config = {"configurable": {field: who}}
            if between is not None:
                between(admitted)
            try:
                if round_ % 4 == 1:
                    list(guard.stream("hi", config=config))
                elif round_ % 4 == 2:
                    chunks = guard.stream("hi", config=config)
                    next(chunks)
                    chunks.close()  # the reader stops: charged what came
                elif round_ % 4 == 3:
                    asyncio.run(guard.ainvoke("hi", config=config))
                else:
                    guard.invoke("hi", config=config)
                admitted += 1
            except BudgetExceededError:
                pass  # refused before anything was held: no settle, no row
    return admitted


def check_ledger(guard: BudgetGuard, admitted: int, per: str = "user") -> list[LedgerRow]:
    admin = BudgetAdmin(guard.policy)
    rows = admin.read_ledger(limit=10_000)
    assert len(rows) == admitted, "one row per settled call"
    assert len({r.call_id for r in rows}) == admitted, "no call twice"
    assert [r.at for r in rows] == sorted((r.at for r in rows), reverse=True), "newest first"
    statuses = [*admin.statuses(per), *admin.statuses("global")]
    assert {s.scope_id for s in statuses if s.scope == per} == set(USERS)
    for status in statuses:  # every counter's spent is the sum of its rows, exactly
        charged = [r for r in rows if status.key in r.keys]
        assert sum((r.cost for r in charged), Decimal(0)) == status.spent, status
        if status.scope == per:
            assert all(r.scopes[per] == status.scope_id for r in charged)
            assert admin.read_ledger(scope=per, scope_id=status.scope_id, limit=10_000) == charged
    assert any(r.degraded and r.model == "mini" for r in rows), "the run degrades"
    assert any(not r.degraded and r.model == "big" for r in rows)
    # The cut stream is charged what came (its input and the one chunk read), less than it held.
    assert any(r.model == "big" and r.estimated and r.cost_nano < r.reserved_nano for r in rows)
    assert all(r.reserved_nano is not None and r.reserved_nano > 0 for r in rows)
    assert admin.read_ledger(kinds=("degrade",), limit=10_000) == [r for r in rows if r.degraded]
    assert admin.read_ledger(model="mini", limit=10_000) == [r for r in rows if r.model == "mini"]
    assert rows_from_csv(rows_to_csv(rows)) == rows
    return rows


# -- in-process --------------------------------------------------------------------------------


def test_memory_store_ledger_after_a_scripted_run() -> None:
    guard = make_guard(MemoryStore())
    check_ledger(guard, scripted_run(guard))


def test_memory_ledger_is_bounded_by_rows_and_by_time() -> None:
    now = [1_000_000.0]
    store = MemoryStore(clock=lambda: now[0], ledger_max_rows=3, ledger_retention_seconds=60)
    key = "{t}:b:user:u:day:2026-12-01"
    for i in range(5):
        store.settle(f"c{i}", [key], 10, row=LedgerRow(budget="b", call_id=f"c{i}", keys=(key,)))
    assert [r.call_id for r in store.read_ledger("b")] == ["c4", "c3", "c2"]
    now[0] += 61
    assert store.read_ledger("b") == []
    assert store.read([key])[0].spent == 50  # trimming the ledger never touches a counter
    off = MemoryStore(ledger_max_rows=0)
    off.settle("c", [key], 10, row=LedgerRow(budget="b", call_id="c", keys=(key,)))
    assert off.read_ledger("b") == [] and off.read([key])[0].spent == 10


def test_a_settle_that_changes_nothing_writes_no_row() -> None:
    store = MemoryStore()
    key = "{t}:b:user:u:day:2026-12-01"
    assert store.reserve([Counter(key, 1000)], Hold("c", 100, 30)).ok
    row = LedgerRow(budget="b", call_id="c", keys=(key,))
    assert store.settle("c", [key], 40, row=row).applied
    for _ in range(3):  # retries of a settle already applied, with a bigger amount: no row, no charge
        assert not store.settle("c", [key], 99, row=row).applied
    (only,) = store.read_ledger("b")
    assert only.cost_nano == 40 == store.read([key])[0].spent


@pytest.mark.parametrize("bad, match", [
    ({"kind": "free"}, "kind"), ({"model": "m" * 513}, "model"), ({"tokens": {"input": -1}}, "tokens"),
    ({"tokens": {"input": 1.5}}, "tokens"), ({"cost_nano": -1}, "cost_nano"), ({"reserved_nano": 2**63}, "reserved"),
    ({"call_id": ""}, "call_id"), ({"budget": ""}, "budget"), ({"scopes": {"user": 5}}, "scopes"),
    ({"at": datetime(2026, 1, 1)}, "aware"), ({"estimated": "yes"}, "estimated"),
])
def test_a_row_is_validated_before_it_reaches_a_store(bad: dict[str, Any], match: str) -> None:
    fields = {"budget": "b", "call_id": "c", **bad}
    with pytest.raises((ValueError, TypeError), match=match):
        LedgerRow(**fields)


def test_call_row_clips_what_is_too_long_so_a_row_never_stops_a_settle() -> None:
    row = call_row("b" * 600, "c", ["{t}:b:user:%F0%9F%98%80:day:2026-12-01"], model="m" * 10_000, host="h" * 600,
                   detail="d" * 10_000)
    assert len(row.model) == 512 and len(row.host) == 512 and len(row.detail) == 2000
    assert row.scopes == {"user": "\N{GRINNING FACE}"} and row.estimated  # no usage: estimated


def test_call_row_records_tokens_by_kind_from_the_calls_usage() -> None:
    from langchain_budgetguard.usage import TokenUsage

    usage = TokenUsage(input_tokens=1200, output_tokens=300, cache_read_tokens=1000, cache_write_tokens=50,
                       reasoning_tokens=120, web_searches=2, input_audio_tokens=7)
    row = call_row("b", "c", ["{t}:b:user:alice:day:2026-12-01", "{t}:b:global:-:month:2026-12"], model="gpt-4o",
                   host="api.openai.com", usage=usage, reserved_nano=5, clamped=True)
    assert row.tokens == {"input": 1200, "cached": 1000, "cache_write": 50, "output": 300, "reasoning": 120,
                          "web_searches": 2, "input_audio": 7}
    assert row.scopes == {"user": "alice", "global": "-"} and not row.estimated and row.clamped


def test_exact_decimal_amounts_in_csv_and_back() -> None:
    at = datetime(2026, 12, 1, 9, 30, 0, 123000, tzinfo=timezone.utc)
    rows = [LedgerRow(budget="b,\"q\"", call_id="c1", scopes={"user": "a;b=c", "global": "-"},
                      keys=("{t}:b:user:a%3Bb%3Dc:day:2026-12-01",), model="gpt-4o", host="api.openai.com",
                      tokens={"input": 10, "cached": 4, "output": 3, "reasoning": 2, "web_searches": 1,
                              "input_audio": 7}, cost_nano=1, reserved_nano=2**62, degraded=True,
                      detail="line one\nline, two", at=at)]
    text = rows_to_csv(rows)
    assert text.splitlines()[0].startswith("at,budget,kind,call_id,model,host,scopes,cost_usd,reserved_usd")
    assert ",0.000000001," in text and ",4611686018.427387904," in text  # exact, never 1E-9
    assert rows_from_csv(text) == rows


# -- Redis ---------------------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_ledger_after_a_scripted_run(redis_url: str) -> None:  # noqa: F811
    with RedisStore(redis_url, prefix=fresh_prefix()) as store:
        guard = make_guard(store)
        check_ledger(guard, scripted_run(guard))


@pytest.mark.redis
def test_redis_ledger_is_trimmed_by_rows_and_by_time(redis_url: str) -> None:  # noqa: F811
    url = redis_url + ("&" if "?" in redis_url else "?") + "ledger_max_rows=5&ledger_retention_seconds=3600"
    with RedisStore(url, prefix=fresh_prefix()) as store, redis.Redis.from_url(redis_url) as admin:
        assert (store.ledger_max_rows, store.ledger_retention_seconds) == (5, 3600)
        key = "{t}:b:user:u:day:2026-12-01"
        for i in range(2000):
            store.settle(f"c{i}", [key], 1, row=LedgerRow(budget="b", call_id=f"c{i}", keys=(key,)))
        assert store.read([key])[0].spent == 2000
        assert admin.xlen(store.ledger_key(key)) < 200  # MAXLEN ~ trims whole nodes: near 5, never all 2000
        assert store.read_ledger("b", limit=3)[0].call_id == "c1999"
        other = "{t2}:b:user:u:day:2026-12-01"
        old = int((datetime.now(timezone.utc) - timedelta(hours=2)).timestamp() * 1000)
        for i in range(300):  # entries from two hours ago, then one settle trims them by time
            admin.xadd(store.ledger_key(other), {"b": "b", "c": f"old{i}", "k": "call", "x": "1"}, id=f"{old}-{i + 1}")
        assert admin.xlen(store.ledger_key(other)) == 300
        store.settle("late", [other], 1, row=LedgerRow(budget="b", call_id="late", keys=(other,)))
        left = admin.xrange(store.ledger_key(other))
        assert [e[1][b"c"] for e in left] == [b"late"] or len(left) < 150  # MINID ~ trims whole nodes
    with pytest.raises(ValueError, match="ledger_max_rows"):
        RedisStore(redis_url, ledger_max_rows=-1)
    with pytest.raises(ValueError, match="ledger_retention_seconds"):
        RedisStore(redis_url + "?ledger_retention_seconds=0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-ledger")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[ReplyDroppingProxy]:
    proxy = ReplyDroppingProxy(server.port)
    try:
        yield proxy
    finally:
        proxy.close()


FAST = RetryPolicy(attempts=3, deadline_seconds=1.0, first_wait=0.01, max_wait=0.05)


def test_lost_settle_replies_and_journal_replays_add_no_row(proxy: ReplyDroppingProxy) -> None:
    store = RedisStore(proxy.url, prefix=fresh_prefix(), retry=FAST)
    key = "{t}:b:user:u:day:2026-12-01"
    store.read([key])  # scripts loaded before replies get lost
    row = lambda cid: LedgerRow(budget="b", call_id=cid, keys=(key,), model="m")  # noqa: E731
    assert store.reserve([Counter(key, 10**9)], Hold("lost-once", 100, 30)).ok
    proxy.drop_script_replies = 1  # Redis applies the settle, its reply is lost, the store retries
    store.settle("lost-once", [key], 40, row=row("lost-once"))
    assert proxy.lost == 1
    assert store.reserve([Counter(key, 10**9)], Hold("journaled", 100, 30)).ok
    proxy.drop_script_replies = -1  # every reply lost: the settle ran in Redis and is journaled too
    result = store.settle("journaled", [key], 50, row=row("journaled"))
    assert result.pending
    proxy.drop_script_replies = 0
    assert store.flush_journal() == 1  # the replay finds the call settled: no second row
    rows = store.read_ledger("b")
    assert sorted(r.call_id for r in rows) == ["journaled", "lost-once"]
    assert sum(r.cost_nano for r in rows) == 90 == store.read([key])[0].spent
    store.close()


def test_a_settle_that_never_reached_redis_is_replayed_with_its_row(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    store = RedisStore(server.url, prefix=fresh_prefix(), retry=FAST)
    key = "{t}:b:user:u:day:2026-12-01"
    try:
        assert store.reserve([Counter(key, 10**9)], Hold("c", 100, 30)).ok
        server.stop()
        result = store.settle("c", [key], 70, row=LedgerRow(budget="b", call_id="c", keys=(key,), model="gpt"))
        assert result.pending
        server.start()
        assert store.flush_journal() == 1
        (row,) = store.read_ledger("b")
        assert (row.call_id, row.cost_nano, row.model) == ("c", 70, "gpt")  # the journaled row, with its details
        assert store.read([key])[0].spent == 70
    finally:
        store.close()
        server.stop()


@pytest.mark.redis
def test_guard_run_with_lost_replies_has_one_row_per_call(proxy: ReplyDroppingProxy) -> None:
    store = RedisStore(proxy.url, prefix=fresh_prefix(), retry=FAST)
    guard = make_guard(store)

    def lose_some(n: int) -> None:
        if n % 3 == 1:
            proxy.drop_script_replies = 1  # the next script reply (a reserve's or a settle's) is lost

    admitted = scripted_run(guard, between=lose_some)
    proxy.drop_script_replies = 0
    store.flush_journal()
    assert proxy.lost >= 5
    check_ledger(guard, admitted)
    store.close()


# -- Redis Cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    servers = start_cluster(tmp_path_factory.mktemp("redis-cluster-ledger"))
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_cluster_ledger_after_a_scripted_run_over_tenant_tags(cluster: list[RedisServer]) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in cluster[:2])
    from langchain_budgetguard.limits import Identity

    client = RedisCluster(host="127.0.0.1", port=cluster[0].port)
    with RedisStore(url, prefix=fresh_prefix()) as store:
        for attempt in range(100):  # every tenant has its own hash tag: pick a budget name that spreads them
            guard = make_guard(store, name=f"ledger-cluster-{attempt}", per="tenant")
            first_keys = [guard.policy.plan(Identity({"tenant": who})).keys[0] for who in USERS]
            if len({client.get_node_from_key(store.ledger_key(k)).name for k in first_keys}) >= 2:
                break
        rows = check_ledger(guard, scripted_run(guard, per="tenant"), per="tenant")
        try:
            streams = {store.ledger_key(k) for r in rows for k in r.keys[:1]}
            nodes = {client.get_node_from_key(s).name for s in streams}
            assert len(streams) == 3 and len(nodes) >= 2  # rows on several nodes, merged by the reader
            assert sum(client.xlen(s) for s in streams) == len(rows)
        finally:
            client.close()


# -- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def deployment(redis_url: str, tmp_path: Path) -> Iterator[tuple[Path, BudgetGuard]]:  # noqa: F811
    path = tmp_path / "deploy.toml"
    path.write_text(f"""
[budget]
name = "cli-ledger-{uuid.uuid4().hex[:8]}"

[store]
url = "{redis_url}"
prefix = "{fresh_prefix()}"

[[limits]]
per = "global"
window = "month"
usd = 100

[[limits]]
per = "user"
window = "day"
usd = "0.5"
""")
    guard = guard_from_config(UsageChat(model_name="gpt-4o-mini", input_tokens=1000, output_tokens=500,
                                        max_tokens=500), path)
    yield path, guard
    guard.policy.store.close()


@pytest.mark.redis
def test_cli_ledger_csv_parses_back_to_the_same_rows(capsys: pytest.CaptureFixture[str], deployment: Any) -> None:
    path, guard = deployment
    for who, n in {"alice": 3, "bob": 2}.items():
        for _ in range(n):
            guard.invoke("hi", config={"configurable": {"user_id": who}})
    rows = BudgetAdmin(guard.policy).read_ledger()
    assert len(rows) == 5
    assert main(["ledger", "--csv", "--config", str(path)]) == 0
    assert rows_from_csv(capsys.readouterr().out) == rows
    assert main(["ledger", "user", "--id", "alice", "--since", "1h", "--csv", "--config", str(path)]) == 0
    alice = rows_from_csv(capsys.readouterr().out)
    assert len(alice) == 3 and all(r.scopes["user"] == "alice" for r in alice)
    assert sum(r.cost for r in alice) == Decimal("0.00135")  # gpt-4o-mini, 1000 in + 500 out, three times
    assert main(["ledger", "--model", "gpt-4o-mini", "--json", "--config", str(path)]) == 0
    import json

    assert len(json.loads(capsys.readouterr().out)["rows"]) == 5
    assert main(["ledger", "--since", "2999-01-01", "--config", str(path)]) == 0
    assert "no ledger rows" in capsys.readouterr().out
    assert main(["ledger", "--since", "yesterday", "--config", str(path)]) == 2
    assert "--since" in capsys.readouterr().err
    assert main(["ledger", "-n", "2", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gpt-4o-mini" in out and "$0.00045" in out and len(out.splitlines()) == 4  # header, 2 rows, legend


@pytest.mark.parametrize("how", ["invoke", "stream", "cut stream"])
def test_a_guarded_call_writes_its_model_tokens_and_cost_to_the_ledger(how):
    from langchain_budgetguard.overrides import BudgetAdmin

    from .fakes import UsageChat as Fake

    llm = Fake(fail_after=2) if how == "cut stream" else Fake()
    guard = BudgetGuard(llm, limit=1)
    if how == "invoke":
        guard.invoke("hi", {"configurable": {}})
    elif how == "stream":
        list(guard.stream("hi"))
    else:
        with pytest.raises(ConnectionError):
            list(guard.stream("hi"))
    (row,) = BudgetAdmin(guard.policy).read_ledger()
    (status,) = guard.status()
    assert row.model == "gpt-4o-mini" and row.cost == status.spent > 0
    if how == "cut stream":
        assert row.estimated and row.tokens["output"] > 0  # charged from what was seen
    else:
        assert row.tokens["input"] == 8 and row.tokens["output"] == 9 and not row.estimated


def test_a_refused_call_is_a_refusal_row_that_charges_nothing():
    from langchain_budgetguard import BudgetExceededError
    from langchain_budgetguard.overrides import BudgetAdmin

    from .fakes import UsageChat as Fake

    guard = BudgetGuard(Fake(), limit="0.000001", min_output_tokens=None)
    with pytest.raises(BudgetExceededError):
        guard.invoke("hi", {"configurable": {}})
    (row,) = BudgetAdmin(guard.policy).read_ledger(kinds=["refusal"])
    assert row.kind == "refusal" and row.refused and row.cost == 0 and row.model == "gpt-4o-mini"
    assert "limit $0.000001" in row.detail
    (status,) = guard.status()
    assert status.spent == 0 and status.held == 0


def test_a_batch_entry_keeps_every_row_as_it_was() -> None:
    """A slice report's rows share one entry: what the first row has is written once (C), each
    row only what differs (J), with an explicit null where it has none of a shared field."""
    at = datetime(2026, 12, 2, 6, 30, tzinfo=timezone.utc)
    first = LedgerRow(budget="acme", call_id="a1", scopes={"user": "é"}, keys=("{acme}:u",), model="gpt-4o-mini",
                      host="openai", tokens={"input": 8, "output": 9}, reserved_nano=2460150)
    rows = [
        first,
        dataclasses.replace(first, call_id="a2", tokens={"input": 1}, reserved_nano=None),
        dataclasses.replace(first, call_id="a3", model=None, host=None, scopes={}, keys=(), detail="no usage",
                            estimated=True, degraded=True),
        LedgerRow(budget="other", call_id="b1", kind="refusal", refused=True, clamped=True),
        dataclasses.replace(first, call_id="a4"),
    ]
    common, packed = LedgerRow.packed_batch([(row, 10 + i) for i, row in enumerate(rows)])
    assert json.loads(common)["b"] == "acme" and "b" not in json.loads(packed)[1]
    read = LedgerRow.rows_of_entry(int(at.timestamp() * 1000), {"n": "5", "J": packed, "C": common})
    assert read == [dataclasses.replace(row, at=at, cost_nano=10 + i) for i, row in enumerate(rows)]
    assert len(packed) < len(json.dumps([row.packed(10) for row in rows])) * 0.7  # the shared part is written once
    assert LedgerRow.packed_batch([]) == ("", "")


def test_a_batch_entry_without_shared_fields_reads_as_before() -> None:
    at = datetime(2026, 12, 2, 6, 30, tzinfo=timezone.utc)
    row = LedgerRow(budget="acme", call_id="a1", model="m", tokens={"input": 3})
    old = json.dumps([row.packed(7)])  # what reports wrote before the shared field C
    assert LedgerRow.rows_of_entry(int(at.timestamp() * 1000), {"n": "1", "J": old}) == [
        dataclasses.replace(row, at=at, cost_nano=7)]


# -- filtered reads: tested in Redis, exact in Python -------------------------------------------

ODD_IDS = ("alice", 'ali"ce', "é", "a:b", "x,y", "back\\slash", "carol")


def _filtered_ledger(store: RedisStore, admin: redis.Redis) -> list[str]:
    """Rows of two budgets on one tag: single entries (calls, degraded calls, refusals) and batch
    entries (a slice report's J and C fields); returns the counter keys written."""
    keys = [f"{{t}}:b:user:{u}:user:day:2026-12-01" for u in ODD_IDS]
    other = "{t}:b2:user:alice:user:day:2026-12-01"
    for i in range(140):
        key = keys[i % len(keys)]
        store.settle(f"c{i}", [key], 1 + i, row=LedgerRow(
            budget="b", call_id=f"c{i}", scopes={"user": ODD_IDS[i % len(ODD_IDS)], "global": "-"}, keys=(key,),
            model="big" if i % 2 else "mini", degraded=i % 11 == 0))
        if i % 20 == 0:
            store.settle(f"o{i}", [other], 1, row=LedgerRow(budget="b2", call_id=f"o{i}", scopes={"user": "alice"},
                                                             keys=(other,)))
        if i % 30 == 0:
            store.append_ledger(LedgerRow(budget="b", call_id=f"r{i}", kind="refusal", refused=True,
                                          scopes={"user": ODD_IDS[(i + 3) % len(ODD_IDS)]}, keys=(keys[0],)))
    first = LedgerRow(budget="b", call_id="s1", scopes={"user": "é"}, keys=(keys[2],), model="mini")
    batches = [
        [first, dataclasses.replace(first, call_id="s2", degraded=True),
         dataclasses.replace(first, call_id="s3", scopes={"user": "carol"})],
        [dataclasses.replace(first, call_id="s4", budget="b2"), dataclasses.replace(first, call_id="s5", kind="degrade")],
        [LedgerRow(budget="b2", call_id="s6", scopes={"user": "alice"}),
         LedgerRow(budget="b", call_id="s7", scopes={"user": 'ali"ce'}, refused=True)],
    ]
    for batch in batches:
        common, packed = LedgerRow.packed_batch([(row, 5) for row in batch])
        admin.xadd(store.ledger_key(keys[0]), {"n": str(len(batch)), "J": packed, "C": common})
    return keys


@pytest.mark.redis
def test_a_filtered_ledger_read_returns_what_reading_every_row_does(redis_url: str) -> None:  # noqa: F811
    """Filters by scope, id and kind are tested in Redis (lua/ledger_scan.lua) before rows reach
    Python; what comes back is exactly what filtering every row in Python gives."""
    from langchain_budgetguard.stores.ledger import row_matches

    with RedisStore(redis_url, prefix=fresh_prefix()) as store, redis.Redis.from_url(redis_url) as admin:
        _filtered_ledger(store, admin)
        for name in ("b", "b2"):
            every = store.read_ledger(name, limit=10_000)  # no filter: every entry read (the plain XREVRANGE)
            assert len(every) > (100 if name == "b" else 5)
            since = every[len(every) // 2].at
            filters: list[dict[str, Any]] = [{"kinds": ("refusal", "degrade", "alert")}, {"kinds": ("call",)},
                                             {"kinds": ("degrade",)}, {"kinds": ("refusal",)}, {"scope": "global"},
                                             {"scope": "tenant"}, {"scope_id": "-"}, {"scope_id": 'ali"ce'},
                                             {"scope": "user", "scope_id": "é", "kinds": ("degrade",)}]
            filters += [{"scope": "user", "scope_id": u} for u in ODD_IDS]
            filters += [{**f, "since": since} for f in filters[:4]]
            for f in filters:
                want = [r for r in every if row_matches(r, **f)]
                assert store.read_ledger(name, limit=10_000, **f) == want, f
                assert store.read_ledger(name, limit=3, **f) == want[:3], f


@pytest.mark.redis
def test_a_filtered_ledger_read_parses_only_the_rows_that_match(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """One id's rows and the events among 1,500 rows: the entries parsed in Python are about the
    rows asked for, not every row of the stream (Redis skips the rest)."""
    parsed: list[int] = []
    original = LedgerRow.rows_of_entry.__func__  # type: ignore[attr-defined]

    def counting(cls: type[LedgerRow], at_ms: int, values: Any) -> list[LedgerRow]:
        parsed.append(at_ms)
        return original(cls, at_ms, values)

    with RedisStore(redis_url, prefix=fresh_prefix()) as store:
        key = "{{t}}:b:user:u{}:user:day:2026-12-01"
        for i in range(1500):
            user = f"u{i % 500}"
            store.settle(f"c{i}", [key.format(i % 500)], 1, row=LedgerRow(
                budget="b", call_id=f"c{i}", scopes={"user": user}, keys=(key.format(i % 500),), degraded=i == 700))
        monkeypatch.setattr(LedgerRow, "rows_of_entry", classmethod(counting))
        rows = store.read_ledger("b", scope="user", scope_id="u7", limit=10_000)
        assert [r.call_id for r in rows] == ["c1007", "c507", "c7"]
        assert len(parsed) <= 10, f"{len(parsed)} entries parsed for 3 rows"
        parsed.clear()
        rows = store.read_ledger("b", kinds=("refusal", "degrade", "alert"), limit=100)
        assert [r.call_id for r in rows] == ["c700"] and len(parsed) <= 10
