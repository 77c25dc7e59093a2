"""The per-call ledger and the spend indexes, as the stores keep them.

Ledger: every settled call appends one ``LedgerRow`` in the same atomic step as its settle (the
Redis settle script XADDs it to a stream per hash tag; ``MemoryStore`` appends to a bounded
in-memory log), so the ledger and the counters never disagree, and a settle that changes nothing
(a retry of a settle already applied) writes no row. The store fills in ``at`` (its own clock:
Redis ``TIME``) and ``cost_nano`` (what it charged). Rows of kind ``"refusal"`` / ``"degrade"``
may be appended on their own (``append_ledger``); they charge nothing.

Spend index: for every counter whose key has the guard's shape (``limits.counter_key``:
``{tag}:name:per:id:window:label``) the store keeps, per hash tag, a sorted set of the ids of
that (scope, window instance) by spent nano-USD, updated by the scripts that move the counter.
Readers (``BudgetAdmin.top``, ``status SCOPE``, the metrics collector, the dashboard) read it
instead of scanning the keyspace, so their cost grows with the ids asked for.
"""

from __future__ import annotations

import copy

import csv
import io
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from .bounds import MAX_NANO, check_call_id, check_nano

__all__ = [
    "LedgerRow",
    "LEDGER_KINDS",
    "TOKEN_KINDS",
    "DEFAULT_LEDGER_MAX_ROWS",
    "DEFAULT_LEDGER_RETENTION_SECONDS",
    "index_name_of",
    "scopes_of_keys",
    "rows_to_csv",
    "rows_from_csv",
    "row_matches",
    "check_ledger_options",
    "call_row",
]

LEDGER_KINDS = ("call", "refusal", "degrade")
TOKEN_KINDS = ("input", "cached", "cache_write", "output", "reasoning", "web_searches")
DEFAULT_LEDGER_MAX_ROWS = 100_000  # per hash tag (Redis) / in all (MemoryStore)
DEFAULT_LEDGER_RETENTION_SECONDS = 35 * 24 * 3600  # a month and a few days: one invoice period
MAX_TEXT = 512  # model, host, budget name
MAX_DETAIL = 2000
MAX_ENTRIES = 64  # scopes, keys, kinds of token


def _text(value: Any, what: str, limit: int = MAX_TEXT, empty: bool = True) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"LedgerRow.{what}: expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"LedgerRow.{what}: at most {limit} characters, got {len(value)}")
    if not empty and not value:
        raise ValueError(f"LedgerRow.{what}: must not be empty")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"LedgerRow.{what}: expected True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class LedgerRow:
    """One row of the ledger: a settled call (``kind="call"``), or a refusal / degrade.

    ``scopes`` maps each scope charged to its id (``{"user": "alice", "global": "-"}``); ``keys``
    are the counter keys charged. ``tokens`` maps a kind (``TOKEN_KINDS``, or any other billed
    item) to a count. ``cost_nano`` and ``reserved_nano`` are integer nano-USD; ``cost`` and
    ``reserved`` give them as exact ``Decimal`` USD. ``at`` and ``cost_nano`` are set by the
    store when it writes the row (its clock; what it charged).
    """

    budget: str
    call_id: str
    kind: str = "call"
    scopes: Mapping[str, str] = field(default_factory=dict)
    keys: tuple[str, ...] = ()
    model: str | None = None
    host: str | None = None
    tokens: Mapping[str, int] = field(default_factory=dict)
    cost_nano: int = 0
    reserved_nano: int | None = None
    estimated: bool = False
    degraded: bool = False
    clamped: bool = False
    refused: bool = False
    detail: str = ""
    at: datetime | None = None

    def __post_init__(self) -> None:
        _text(self.budget, "budget", empty=False)
        check_call_id(self.call_id, "LedgerRow.call_id")
        if self.kind not in LEDGER_KINDS:
            raise ValueError(f"LedgerRow.kind: expected one of {', '.join(LEDGER_KINDS)}, got {self.kind!r}")
        if not isinstance(self.scopes, Mapping) or len(self.scopes) > MAX_ENTRIES:
            raise ValueError(f"LedgerRow.scopes: a mapping of at most {MAX_ENTRIES} scope -> id")
        for k, v in self.scopes.items():
            _text(k, "scopes (a scope)", 64, empty=False)
            _text(v, "scopes (an id)", 256)
        object.__setattr__(self, "scopes", dict(self.scopes))
        keys = tuple(self.keys)
        if len(keys) > MAX_ENTRIES:
            raise ValueError(f"LedgerRow.keys: at most {MAX_ENTRIES} counter keys, got {len(keys)}")
        for k in keys:
            _text(k, "keys", 1024, empty=False)
        object.__setattr__(self, "keys", keys)
        _text(self.model, "model")
        _text(self.host, "host")
        _text(self.detail, "detail", MAX_DETAIL)
        if not isinstance(self.tokens, Mapping) or len(self.tokens) > MAX_ENTRIES:
            raise ValueError(f"LedgerRow.tokens: a mapping of at most {MAX_ENTRIES} kind -> count")
        for k, v in self.tokens.items():
            if k not in _KNOWN_KINDS:
                _text(k, "tokens (a kind)", 64, empty=False)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_NANO:
                raise ValueError(f"LedgerRow.tokens[{k!r}]: expected a whole count >= 0, got {v!r}")
        object.__setattr__(self, "tokens", {k: v for k, v in self.tokens.items() if v})  # 0: not billed
        check_nano(self.cost_nano, "LedgerRow.cost_nano")
        if self.reserved_nano is not None:
            check_nano(self.reserved_nano, "LedgerRow.reserved_nano")
        for name in ("estimated", "degraded", "clamped", "refused"):
            _flag(getattr(self, name), name)
        if self.at is not None and (not isinstance(self.at, datetime) or self.at.tzinfo is None):
            raise ValueError(f"LedgerRow.at: expected an aware datetime, got {self.at!r}")

    @property
    def cost(self) -> Decimal:
        """What the call was charged, exact USD."""
        return Decimal(self.cost_nano).scaleb(-9)

    @property
    def reserved(self) -> Decimal | None:
        """What was held for it, exact USD (None: not known)."""
        return None if self.reserved_nano is None else Decimal(self.reserved_nano).scaleb(-9)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def written(self, at: datetime, cost_nano: int) -> LedgerRow:
        """This row as the store wrote it: at its time, with what it charged. Only those two are
        checked again (the rest was checked when the row was made): this runs on every settle."""
        if not isinstance(at, datetime) or at.tzinfo is None:
            raise ValueError(f"LedgerRow.at: expected an aware datetime, got {at!r}")
        check_nano(cost_nano, "LedgerRow.cost_nano")
        row = copy.copy(self)
        object.__setattr__(row, "at", at)
        object.__setattr__(row, "cost_nano", cost_nano)
        return row

    # -- a flat encoding (the Redis stream's fields) --------------------------------------------

    def fields(self) -> list[str]:
        """The row as stream fields, without ``at`` and ``cost_nano`` (the script adds them)."""
        flags = "".join(c for c, on in zip("edcr", (self.estimated, self.degraded, self.clamped, self.refused)) if on)
        out = ["k", self.kind, "b", self.budget, "c", self.call_id, "f", flags]
        if self.scopes:
            out += ["s", json.dumps(self.scopes, separators=(",", ":"), sort_keys=True)]
        if self.keys:
            out += ["K", json.dumps(list(self.keys), separators=(",", ":"))]
        if self.model is not None:
            out += ["m", self.model]
        if self.host is not None:
            out += ["h", self.host]
        if self.tokens:
            out += ["t", json.dumps(self.tokens, separators=(",", ":"), sort_keys=True)]
        if self.reserved_nano is not None:
            out += ["r", str(self.reserved_nano)]
        if self.detail:
            out += ["d", self.detail]
        return out

    def _shared(self) -> dict[str, Any]:
        """The fields a slice report's rows mostly share (one budget, scopes, keys, model), None when unset."""
        flags = "".join(c for c, on in zip("edcr", (self.estimated, self.degraded, self.clamped, self.refused)) if on)
        return {"k": self.kind, "b": self.budget, "f": flags or None, "s": self.scopes or None,
                "K": self.keys or None, "m": self.model, "h": self.host, "d": self.detail or None}

    def packed(self, charged: int, common: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The row as one JSON object, ``charged`` its amount (``x``), without what it shares with
        ``common`` (an explicit null where ``common`` has a value the row has not)."""
        out: dict[str, Any] = {"c": self.call_id, "x": charged}
        if self.tokens:
            out["t"] = self.tokens
        if self.reserved_nano is not None:
            out["r"] = self.reserved_nano
        for key, value in self._shared().items():
            if common is None:
                if value is not None:
                    out[key] = value
            elif common.get(key) != value:
                out[key] = value
        return out

    @staticmethod
    def packed_batch(rows: Sequence[tuple[LedgerRow, int]]) -> tuple[str, str]:
        """Rows with their amounts as one stream entry's fields ``C`` (what they share, the first
        row's) and ``J`` (each row's own fields): a leased slice's report writes its rows so,
        many to one stream entry (``rows_of_entry`` reads them)."""
        if not rows:
            return "", ""
        common = {k: v for k, v in rows[0][0]._shared().items() if v is not None}
        packed = [row.packed(charged, common) for row, charged in rows]
        return json.dumps(common, separators=(",", ":")), json.dumps(packed, separators=(",", ":"))

    @staticmethod
    def packed_rows(rows: Sequence[tuple[LedgerRow, int]]) -> tuple[str, list[str]]:
        """``packed_batch`` with each row's JSON apart (a slice report leaves some out: their
        JSON array is ``"[" + ",".join(them) + "]"``)."""
        if not rows:
            return "", []
        common = {k: v for k, v in rows[0][0]._shared().items() if v is not None}
        return (json.dumps(common, separators=(",", ":")),
                [json.dumps(row.packed(charged, common), separators=(",", ":")) for row, charged in rows])

    @classmethod
    def rows_of_entry(cls, at_ms: int, values: Mapping[str, str]) -> list[LedgerRow]:
        """The rows of one stream entry, oldest first: one as ``fields`` wrote it, or a batch
        (field ``J``) of ``packed`` rows and what they share (field ``C``, if any)."""
        if "J" not in values:
            return [cls.from_fields(at_ms, values)]
        at = datetime.fromtimestamp(at_ms / 1000, timezone.utc)
        common = json.loads(values["C"]) if values.get("C") else {}
        out = []
        for own in json.loads(values["J"]):
            packed = {**common, **own} if common else own  # a row's own value (null: none) wins
            flags = packed.get("f") or ""
            out.append(cls(
                budget=packed["b"], call_id=packed["c"], kind=packed.get("k") or "call",
                scopes=packed.get("s") or {}, keys=tuple(packed.get("K") or ()), model=packed.get("m"),
                host=packed.get("h"), tokens=packed.get("t") or {}, cost_nano=int(packed.get("x", 0)),
                reserved_nano=packed.get("r"), estimated="e" in flags, degraded="d" in flags,
                clamped="c" in flags, refused="r" in flags, detail=packed.get("d") or "", at=at,
            ))
        return out

    @classmethod
    def from_fields(cls, at_ms: int, values: Mapping[str, str]) -> LedgerRow:
        """A row read back from its stream entry (``at_ms``: the entry id's time)."""
        flags = values.get("f", "")
        return cls(
            budget=values["b"], call_id=values["c"], kind=values.get("k", "call"),
            scopes=json.loads(values["s"]) if "s" in values else {},
            keys=tuple(json.loads(values["K"])) if "K" in values else (),
            model=values.get("m"), host=values.get("h"),
            tokens=json.loads(values["t"]) if "t" in values else {},
            cost_nano=int(values.get("x", "0")),
            reserved_nano=int(values["r"]) if "r" in values else None,
            estimated="e" in flags, degraded="d" in flags, clamped="c" in flags, refused="r" in flags,
            detail=values.get("d", ""),
            at=datetime.fromtimestamp(at_ms / 1000, timezone.utc),
        )


def _unescape(segment: str) -> str:
    return segment if segment.startswith("~") else unquote(segment)


def _split(key: str) -> tuple[str, list[str]] | None:
    """``{tag}:name:per:id:window:label`` -> (``{tag}``, [name, per, id, window:label])."""
    if not key.startswith("{"):
        return None
    end = key.find("}:")
    if end < 0:
        return None
    parts = key[end + 2 :].split(":", 3)
    return (key[: end + 1], parts) if len(parts) == 4 and all(parts) else None


def key_parts(key: str) -> tuple[str, str | None, str, str] | None:
    """A counter key's (escaped budget name, scope id or None for global, limit slug, window label):
    ``{tag}:name:user:alice:user:day:2026-12-01`` -> ``("name", "alice", "user:day", "2026-12-01")``;
    None for a key not of the guard's shape."""
    found = _split(key)
    if found is None:
        return None
    name, per, sid, rest = found[1]
    parts = rest.split(":", 2)  # the slug (per:window), then the label (a minute's has a colon)
    if len(parts) != 3 or parts[0] != per:
        return None
    return name, None if sid == "-" else _unescape(sid), f"{per}:{parts[1]}", parts[2]


def index_name_of(key: str) -> tuple[str, str] | None:
    """A counter key's spend index, tag-less (``name:per:window:label``), and its member (the
    escaped id); None for a key not of the guard's shape (not indexed)."""
    found = _split(key)
    if found is None:
        return None
    name, per, sid, rest = found[1]
    return f"{name}:{per}:{rest}", sid


def scopes_of_keys(keys: Iterable[str]) -> dict[str, str]:
    """Each scope a call's counter keys charge, and its id (``-`` for the global scope)."""
    out: dict[str, str] = {}
    for key in keys:
        found = _split(key)
        if found is not None:
            _, per, sid, _ = found[1]
            out.setdefault(per, "-" if sid == "-" else _unescape(sid))
    return out


_USAGE_KINDS = (  # TokenUsage field -> ledger token kind
    ("input_tokens", "input"), ("cache_read_tokens", "cached"), ("cache_write_tokens", "cache_write"),
    ("output_tokens", "output"), ("reasoning_tokens", "reasoning"), ("web_searches", "web_searches"),
    ("input_audio_tokens", "input_audio"), ("output_audio_tokens", "output_audio"),
    ("input_image_tokens", "input_image"), ("output_image_tokens", "output_image"),
    ("input_video_tokens", "input_video"),
)
_KNOWN_KINDS = frozenset(kind for _, kind in _USAGE_KINDS)
_USAGE_COUNTS = operator.attrgetter(*(name for name, _ in _USAGE_KINDS))  # all counts in one call


def _row_tokens(usage: Any) -> dict[str, int]:
    """The row's ``tokens``: each usage count that is not zero, clipped to [0, MAX_NANO]."""
    try:
        counts = _USAGE_COUNTS(usage)
    except AttributeError:  # a usage-like object without every field: the missing ones are 0
        counts = tuple(getattr(usage, name, 0) for name, _ in _USAGE_KINDS)
    return {kind: min(max(n, 0), MAX_NANO) for (_, kind), count in zip(_USAGE_KINDS, counts)
            if count and (n := int(count))}


def _clip(value: Any, limit: int = MAX_TEXT) -> str | None:
    return None if value is None else str(value)[:limit]


_KEYS_CACHE: dict[tuple[str, ...], tuple[tuple[str, ...], dict[str, str]]] = {}
_KEYS_CACHE_SIZE = 1024


def _keys_and_scopes(keys: Sequence[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """A row's keys (distinct, bounded, checked) and the scopes they charge, worked out once per
    distinct key list (a guard settles the same counters call after call). Do not change the dict."""
    given = tuple(keys)
    try:
        found, cacheable = _KEYS_CACHE.get(given), True
    except TypeError:  # an unhashable key: the check below says what is wrong with it
        found, cacheable = None, False
    if found is None:
        distinct = tuple(dict.fromkeys(given))[:MAX_ENTRIES]
        for key in distinct:
            _text(key, "keys", 1024, empty=False)
        found = (distinct, scopes_of_keys(distinct))
        if cacheable:
            if len(_KEYS_CACHE) >= _KEYS_CACHE_SIZE:
                _KEYS_CACHE.clear()
            _KEYS_CACHE[given] = found
    return found


def call_row(budget: str, call_id: str, keys: Sequence[str], *, model: str | None = None, host: str | None = None,
             usage: Any = None, reserved_nano: int | None = None, estimated: bool = False, degraded: bool = False,
             clamped: bool = False, detail: str | None = None) -> LedgerRow:
    """The ledger row of one settled call, from what the guard knows at settle: its counter keys
    (scopes are read off them), the model that served it, its ``TokenUsage`` (None: no usage
    report; the row is then flagged ``estimated``). Text is clipped to the row's bounds, so a
    row never stops a settle."""
    tokens = _row_tokens(usage) if usage is not None else {}
    check_call_id(call_id, "LedgerRow.call_id")
    keys, scopes = _keys_and_scopes(keys)
    # Every field is clipped, coerced or checked above: the row is built without checking it again
    # (this runs on every settle; LedgerRow(...) checks rows from anywhere else).
    row = object.__new__(LedgerRow)
    row.__dict__.update(
        budget=_clip(budget) or "-", call_id=call_id, kind="call", scopes=dict(scopes), keys=keys,
        model=_clip(model), host=_clip(host), tokens=tokens, cost_nano=0,
        reserved_nano=None if reserved_nano is None else min(max(int(reserved_nano), 0), MAX_NANO),
        estimated=bool(estimated or usage is None or getattr(usage, "estimated", False)),
        degraded=bool(degraded), clamped=bool(clamped), refused=False, detail=_clip(detail, MAX_DETAIL) or "", at=None,
    )
    return row


def row_matches(row: LedgerRow, *, scope: str | None = None, scope_id: str | None = None,
                since: datetime | None = None, kinds: Iterable[str] | None = None, model: str | None = None,
                call_id: str | None = None) -> bool:
    """Whether ``row`` passes the ledger readers' filters. A settled call flagged degraded (or
    refused, in shadow mode) matches kind ``"degrade"`` (``"refusal"``) too."""
    if since is not None and row.at is not None and row.at < since:
        return False
    if kinds is not None:
        wanted = set(kinds)
        if not (row.kind in wanted or (row.degraded and "degrade" in wanted) or (row.refused and "refusal" in wanted)):
            return False
    if model is not None and row.model != model:
        return False
    if call_id is not None and row.call_id != call_id:
        return False
    if scope is not None:
        if scope not in row.scopes:
            return False
        if scope_id is not None and row.scopes[scope] != scope_id:
            return False
    elif scope_id is not None and scope_id not in row.scopes.values():
        return False
    return True


def check_ledger_options(max_rows: Any, retention_seconds: Any) -> tuple[int, int]:
    """Validate the ledger's retention: ``max_rows`` (0: keep no ledger) and ``retention_seconds``."""
    if isinstance(max_rows, str) and max_rows.isdigit():
        max_rows = int(max_rows)
    if isinstance(retention_seconds, str) and retention_seconds.isdigit():
        retention_seconds = int(retention_seconds)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 0 <= max_rows <= 100_000_000:
        raise ValueError(f"ledger_max_rows must be a whole number of rows in [0, 100000000] (0: no ledger), got {max_rows!r}")
    if isinstance(retention_seconds, bool) or not isinstance(retention_seconds, int) or not (
        1 <= retention_seconds <= 10 * 365 * 24 * 3600
    ):
        raise ValueError(f"ledger_retention_seconds must be whole seconds between 1 and 10 years, got {retention_seconds!r}")
    return max_rows, retention_seconds


# -- CSV: what a finance person compares with the provider's invoice export ----------------------

CSV_COLUMNS = ("at", "budget", "kind", "call_id", "model", "host", "scopes", "cost_usd", "reserved_usd",
               *(f"{k}_tokens" if k != "web_searches" else k for k in TOKEN_KINDS), "other_tokens",
               "estimated", "degraded", "clamped", "refused", "keys", "detail")


def _usd(nano: int | None) -> str:
    if nano is None:
        return ""
    return format(Decimal(nano).scaleb(-9).normalize() if nano else Decimal(0), "f")


def _nano(text: str) -> int:
    value = Decimal(text) * 1_000_000_000
    if value != value.to_integral_value():
        raise ValueError(f"not a whole number of nano-USD: {text!r}")
    return int(value)


def rows_to_csv(rows: Sequence[LedgerRow]) -> str:
    """The rows as CSV: a header, one line per row, exact decimal USD, ISO-8601 UTC times."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        kinds = {(f"{k}_tokens" if k != "web_searches" else k): r.tokens.get(k, 0) for k in TOKEN_KINDS}
        other = {k: v for k, v in r.tokens.items() if k not in TOKEN_KINDS}
        writer.writerow([
            r.at.isoformat() if r.at else "", r.budget, r.kind, r.call_id, r.model or "", r.host or "",
            json.dumps(r.scopes, sort_keys=True) if r.scopes else "", _usd(r.cost_nano), _usd(r.reserved_nano),
            *kinds.values(), json.dumps(other, sort_keys=True) if other else "",
            *("true" if x else "false" for x in (r.estimated, r.degraded, r.clamped, r.refused)),
            " ".join(r.keys), r.detail,
        ])
    return out.getvalue()


def rows_from_csv(text: str) -> list[LedgerRow]:
    """``rows_to_csv``'s output read back (a round trip gives the same rows)."""
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
        raise ValueError(f"not a budgetguard ledger CSV: expected the header {','.join(CSV_COLUMNS)}")
    rows = []
    for line in reader:
        tokens: dict[str, int] = {}
        for k in TOKEN_KINDS:
            count = int(line[f"{k}_tokens" if k != "web_searches" else k])
            if count:
                tokens[k] = count
        if line["other_tokens"]:
            tokens.update({k: int(v) for k, v in json.loads(line["other_tokens"]).items()})
        scopes = json.loads(line["scopes"]) if line["scopes"] else {}
        rows.append(LedgerRow(
            budget=line["budget"], call_id=line["call_id"], kind=line["kind"], scopes=scopes,
            keys=tuple(line["keys"].split(" ")) if line["keys"] else (), model=line["model"] or None,
            host=line["host"] or None, tokens=tokens, cost_nano=_nano(line["cost_usd"]),
            reserved_nano=_nano(line["reserved_usd"]) if line["reserved_usd"] else None,
            estimated=line["estimated"] == "true", degraded=line["degraded"] == "true",
            clamped=line["clamped"] == "true", refused=line["refused"] == "true", detail=line["detail"],
            at=datetime.fromisoformat(line["at"]) if line["at"] else None,
        ))
    return rows
