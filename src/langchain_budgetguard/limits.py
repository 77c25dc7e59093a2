"""Limits, scopes, windows and the names of their counters.

A counter is one (budget name, scope, id, window instance). The window
instance is part of the counter's key, so a new day simply starts a new
counter: nothing has to be reset.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import IdentityError
from .money import to_decimal, usd_to_nano

__all__ = ["Limit", "WindowInstance", "Identity", "resolve_identity", "escape_id", "counter_key", "WINDOWS"]

WINDOWS = ("hour", "day", "week", "month", "total")
GLOBAL = "global"
_SCOPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class WindowInstance:
    """One concrete window: its label (part of the counter key) and its bounds."""

    label: str
    starts_at: datetime | None
    resets_at: datetime | None


@dataclass(frozen=True)
class Limit:
    """A spending limit: ``usd`` dollars per ``per`` scope per ``window``.

    ``per`` is ``"global"`` (one budget for every call), ``"user"``, ``"project"``,
    ``"tenant"`` or any other lowercase name; the id of a scope ``x`` comes from
    ``x_id`` in the run's ``configurable``, then its ``metadata``.
    ``window`` is ``"hour"``, ``"day"``, ``"week"`` (ISO, Monday first), ``"month"``
    or ``"total"``; ``tz`` is the IANA time zone the window boundaries follow.
    """

    usd: Decimal
    per: str = GLOBAL
    window: str = "total"
    tz: str = "UTC"
    _zone: Any = field(init=False, repr=False, compare=False)
    nano: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "usd", to_decimal(self.usd, what="Limit.usd"))
        object.__setattr__(self, "nano", usd_to_nano(self.usd))
        if not isinstance(self.per, str) or not _SCOPE_NAME.match(self.per):
            raise ValueError(
                f"Limit.per: expected 'global', 'user', 'project', 'tenant' or another lowercase "
                f"name (letters, digits, '_'), got {self.per!r}"
            )
        if self.window not in WINDOWS:
            raise ValueError(f"Limit.window: expected one of {', '.join(WINDOWS)}, got {self.window!r}")
        try:
            zone = timezone.utc if self.tz in ("UTC", "utc", "Z") else ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ValueError(f"Limit.tz: expected an IANA time zone such as 'Europe/Paris', got {self.tz!r}") from None
        object.__setattr__(self, "_zone", zone)

    @property
    def id_field(self) -> str | None:
        """The config key that names this scope's id (``user_id``), or None for global."""
        return None if self.per == GLOBAL else f"{self.per}_id"

    @property
    def slug(self) -> str:
        """The limit's part of a counter key (its usd is not part of it: see ``counter_key``)."""
        tz = "" if self._zone is timezone.utc else f"@{escape_id(self.tz)}"
        return f"{self.per}:{self.window}{tz}"

    def window_at(self, now: datetime) -> WindowInstance:
        """The window instance that contains ``now`` (an aware datetime)."""
        if self.window == "total":
            return WindowInstance("all", None, None)
        local = now.astimezone(self._zone)
        if self.window == "hour":
            start = local.replace(minute=0, second=0, microsecond=0)
            end = start + timedelta(hours=1)
            label = start.strftime("%Y-%m-%dT%H")
        elif self.window == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = _next_day(start)
            label = start.strftime("%Y-%m-%d")
        elif self.window == "week":
            day = local.replace(hour=0, minute=0, second=0, microsecond=0)
            start = _local_midnight(day.date() - timedelta(days=day.weekday()), self._zone)
            end = _local_midnight(start.date() + timedelta(days=7), self._zone)
            iso = start.isocalendar()
            label = f"{iso.year}-W{iso.week:02d}"
        else:  # month
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            first_next = (start.date().replace(day=28) + timedelta(days=4)).replace(day=1)
            end = _local_midnight(first_next, self._zone)
            label = start.strftime("%Y-%m")
        return WindowInstance(label, start, end)


def _local_midnight(day: Any, zone: Any) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone)


def _next_day(start: datetime) -> datetime:
    return _local_midnight(start.date() + timedelta(days=1), start.tzinfo)


@dataclass(frozen=True)
class Identity:
    """Whose budget a call draws on: scope -> id, for each per-scope limit."""

    ids: Mapping[str, str]

    def id_for(self, limit: Limit) -> str | None:
        return None if limit.per == GLOBAL else self.ids[limit.per]


def resolve_identity(config: Mapping[str, Any] | None, limits: Sequence[Limit], **explicit: Any) -> Identity:
    """Read each per-scope limit's id from ``explicit``, ``configurable``, then ``metadata``.

    Raises ``IdentityError`` when a per-scope limit has no id, or the id is empty or not a string:
    such a call is never pooled with others.
    """
    config = config or {}
    configurable = config.get("configurable") or {}
    metadata = config.get("metadata") or {}
    ids: dict[str, str] = {}
    for limit in limits:
        key = limit.id_field
        if key is None or limit.per in ids:
            continue
        for source in (explicit, configurable, metadata):
            if key in source:
                value = source[key]
                break
        else:
            raise IdentityError(
                f"A per-{limit.per} limit applies but the call names no {key}. Pass it as "
                f'config={{"configurable": {{"{key}": "..."}}}} (or in metadata); calls without an id '
                "are refused rather than pooled into one shared budget."
            )
        if not isinstance(value, str) or not value:
            raise IdentityError(f"{key} must be a non-empty string, got {type(value).__name__} {value!r}.")
        ids[limit.per] = value
    return Identity(ids)


_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")
_ALL_SAFE = re.compile(r"[A-Za-z0-9\-_.@]*")
_MAX_ESCAPED = 96


def escape_id(value: str) -> str:
    """Make a user-supplied id safe inside a key: no ``{ } :`` or spaces, bounded length, injective.

    Characters outside ``[A-Za-z0-9-_.@]`` are %-escaped (UTF-8). An escaped id longer than
    96 characters becomes ``~`` + its SHA-256; ``~`` is always escaped otherwise, so the two
    forms cannot collide.
    """
    if len(value) <= _MAX_ESCAPED and _ALL_SAFE.fullmatch(value):
        return value  # nothing to escape (the usual id): one regex match instead of a loop per character
    out = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in value)
    if len(out) > _MAX_ESCAPED:
        return "~" + hashlib.sha256(value.encode("utf-8")).hexdigest()
    return out


def counter_key(name: str, tag: str, limit: Limit, scope_id: str | None, window_label: str) -> str:
    """The store-agnostic name of one counter: ``{tag}:name:per:id:window@tz:label``.

    ``tag`` groups the counters one call touches (Redis Cluster hash tag); it must already be
    escaped. The limit's dollar amount is not in the key: guards of the same name that share a
    scope and window share the counter, each enforcing its own amount.
    """
    sid = "-" if scope_id is None else escape_id(scope_id)
    return f"{{{tag}}}:{escape_id(name)}:{limit.per}:{sid}:{limit.slug}:{window_label}"
