"""Limits, scopes, windows and the names of their counters.

A counter is one (budget name, scope, id, window instance). The window
instance is part of the counter's key, so a new day simply starts a new
counter: nothing has to be reset.

Windows and daylight saving time (``Limit.tz``):

- ``hour`` is a range of instants: the 3600 s that begin at a local full hour. DST never
  merges or splits an hour: on America/New_York's fall-back night 01:30 EDT and 01:30 EST are
  two windows, ``2026-11-01T01`` and ``2026-11-01T01-0500`` (the repeated wall hour carries its
  UTC offset; every other hour keeps its plain local label), each resetting 3600 s after it
  began; on the spring-forward night 01:00 EST is followed by 03:00 EDT, one hour later. (Where
  a shift is not a whole hour or not on a full hour, as on Lord Howe Island and the Chatham
  Islands, the hour it cuts ends at the shift and the next begins there: still no overlap.)
- ``day``, ``week`` and ``month`` follow the local calendar: a day runs from local midnight to
  the next, so a DST day is 23 or 25 hours long, and weeks and months likewise.
- ``total`` never resets.

Window bounds (``WindowInstance.starts_at`` / ``resets_at``) are aware datetimes in the fixed
UTC offset in force at that instant, so they print as local time and subtract exactly.

Input bounds, checked before anything reaches a store: ``check_seconds`` for durations
(``MIN_LEASE_SECONDS`` .. ``MAX_LEASE_SECONDS``, ``MAX_RETENTION_SECONDS``), ``check_id`` for
the ids of scopes (at most ``MAX_ID_LENGTH`` characters of valid Unicode) and
``check_call_id`` for call ids (at most ``MAX_CALL_ID_LENGTH``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import IdentityError
from .money import nano_to_usd, show_value, to_decimal, usd_to_nano

__all__ = [
    "Limit",
    "WindowInstance",
    "Identity",
    "resolve_identity",
    "escape_id",
    "counter_key",
    "counter_tag",
    "TENANT_LOCAL",
    "check_seconds",
    "check_id",
    "check_call_id",
    "text_problem",
    "WINDOWS",
    "UNITS",
    "GLOBAL",
    "MODEL",
    "MIN_LEASE_SECONDS",
    "MAX_LEASE_SECONDS",
    "MAX_RETENTION_SECONDS",
    "MAX_REFRESH_SECONDS",
    "MAX_ID_LENGTH",
    "MAX_CALL_ID_LENGTH",
]

WINDOWS = ("minute", "hour", "day", "week", "month", "total")
GLOBAL = "global"
MODEL = "model"
"""The scope whose id is the model that serves the call (``Limit(per="model")``): one counter per model."""
TENANT_LOCAL = frozenset({"tenant", "user", "project"})
"""The scopes whose counters live inside their tenant when a budget has a ``per="tenant"`` limit
(user and project ids are tenant-local). Every other scope (global, model, any other name) has one
counter per id across tenants, under the budget's own hash tag."""
UNITS = ("usd", "tokens", "requests")
MAX_COUNT = 2**62
"""The largest ``tokens`` or ``requests`` limit (the stores' bound)."""
MAX_ALERTS = 16
_SCOPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

MIN_LEASE_SECONDS = 0.01
"""The shortest lease a hold may have (the lease keeper renews at a third of it)."""
MAX_LEASE_SECONDS = 86_400.0
"""The longest lease (a day): how long a crashed process's hold can block a budget. Live calls
are renewed in the background (``leases``), so a long call never needs a long lease."""
MAX_RETENTION_SECONDS = 3_660 * 86_400
"""The longest a counter is kept after its window ends (about ten years)."""
MAX_REFRESH_SECONDS = 86_400.0
"""The longest interval between two reads of the store's live overrides."""
MAX_ID_LENGTH = 65_536
"""The longest scope id (``user_id``...), in characters; longer ids are refused, not truncated."""
MAX_CALL_ID_LENGTH = 256
"""The longest call id, in characters (the library's own are 32 hex digits, plus a short suffix)."""


def check_seconds(value: object, what: str, *, minimum: float = 0.0, maximum: float) -> float:
    """``value`` as float seconds if it is a real number in ``[minimum, maximum]``.

    Anything else (a string such as ``'10'``, a bool, NaN, infinity, a negative or absurd
    duration) is a ``ValueError`` that names the value and the allowed range.
    """
    allowed = f"a number of seconds from {minimum:g} to {maximum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ValueError(f"{what}: expected {allowed}, got {type(value).__name__} {show_value(value)}")
    if isinstance(value, int) and value.bit_length() > 64:
        raise ValueError(f"{what}: expected {allowed}, got {show_value(value)}")
    try:
        seconds = float(value)
    except (OverflowError, ValueError):
        raise ValueError(f"{what}: expected {allowed}, got {show_value(value)}") from None
    if not math.isfinite(seconds) or not minimum <= seconds <= maximum:
        raise ValueError(f"{what}: expected {allowed}, got {show_value(value)}")
    return seconds


def text_problem(value: object, max_length: int) -> str | None:
    """Why ``value`` cannot be an id or a name (None when it can): not a non-empty string, longer
    than ``max_length``, or not valid Unicode (a lone surrogate). O(1) for ASCII text."""
    if not isinstance(value, str):
        return f"must be a non-empty string, got {type(value).__name__} {show_value(value)}"
    if not value:
        return "must be a non-empty string, got ''"
    if len(value) > max_length:
        return f"must be at most {max_length} characters, got {len(value)} ({show_value(value, 40)})"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"must be valid Unicode text, but {show_value(value)} holds a lone surrogate "
                f"{value[exc.start]!r} at position {exc.start} (decode bytes with errors='strict' "
                "or 'replace' before using them as an id)"
            )
    return None


def check_id(value: object, what: str = "id") -> str:
    """``value`` if it can be a scope id: a non-empty string of at most ``MAX_ID_LENGTH``
    characters of valid Unicode (no lone surrogates such as ``'\\ud800'``). Else ``IdentityError``."""
    problem = text_problem(value, MAX_ID_LENGTH)
    if problem is not None:
        raise IdentityError(f"{what} {problem}.")
    return value  # type: ignore[return-value]


def check_call_id(value: object, what: str = "call_id") -> str:
    """``value`` if it can be a call id: a non-empty string of at most ``MAX_CALL_ID_LENGTH``
    characters of valid Unicode. Else ``ValueError``. (Ids must also be unique per call: the
    store refuses a reused one, ``CallIdReusedError``.)"""
    problem = text_problem(value, MAX_CALL_ID_LENGTH)
    if problem is not None:
        raise ValueError(
            f"{what} {problem}. Leave call_id out and the library derives a random 128-bit id per call."
        )
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class WindowInstance:
    """One concrete window: its label (part of the counter key) and its bounds.

    ``starts_at`` / ``resets_at`` are aware datetimes (None for ``total``) in the fixed UTC offset
    in force at that instant; the window holds the instants ``starts_at <= t < resets_at``.
    """

    label: str
    starts_at: datetime | None
    resets_at: datetime | None


_HOUR_LABEL = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2})(?:([+-])(\d{2})(\d{2})(\d{2})?)?$")
_MINUTE_LABEL = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2})(?:([+-])(\d{2})(\d{2})(\d{2})?)?$")
_WEEK_LABEL = re.compile(r"^(\d{4})-W(\d{2})$")
_LABEL_FORMATS = {"minute": "%Y-%m-%dT%H:%M", "hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}
_LABEL_EXAMPLES = {"minute": "2026-11-22T09:05", "hour": "2026-11-22T09", "day": "2026-11-22", "week": "2026-W47", "month": "2026-11"}


@dataclass(frozen=True)
class Limit:
    """A limit of one kind per ``per`` scope per ``window``: ``usd`` dollars, ``tokens`` (input plus
    output tokens) or ``requests`` (model calls). Give exactly one of the three.

    ``per`` is ``"global"`` (one budget for every call), ``"user"``, ``"project"``,
    ``"tenant"``, ``"model"`` (one counter per model that serves the call, degrades included) or
    any other lowercase name; the id of a scope ``x`` comes from ``x_id`` in the run's
    ``configurable``, then its ``metadata``. With a ``per="tenant"`` limit beside it, user and
    project ids are the tenant's own (``TENANT_LOCAL``); every other scope's counter is one per id
    across tenants.
    ``window`` is ``"minute"``, ``"hour"``, ``"day"``, ``"week"`` (ISO, Monday first), ``"month"``
    or ``"total"``; ``tz`` is the IANA time zone the window boundaries follow. A minute and an hour
    are real time even across a DST shift; a day, week or month follows the local calendar (a DST
    day has 23 or 25 hours). ``usd`` is at most ``money.MAX_USD``.

    ``alerts`` are fractions of the limit (``[0.5, 0.8, 1.0]``): when a counter's spend first
    reaches one in its window, one alert fires across every process (see ``alerts``).
    """

    usd: Decimal | None = None
    per: str = GLOBAL
    window: str = "total"
    tz: str = "UTC"
    tokens: int | None = None
    requests: int | None = None
    alerts: tuple[Decimal, ...] = ()
    _zone: Any = field(init=False, repr=False, compare=False)
    amount: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [unit for unit in UNITS if getattr(self, unit) is not None]
        if len(given) != 1:
            raise ValueError(
                "Limit: give exactly one of usd= (dollars), tokens= (input + output tokens) or requests= "
                f"(model calls), got {' and '.join(given) if given else 'none'}; e.g. Limit(usd=5, per='user')"
            )
        if self.usd is not None:
            usd = to_decimal(self.usd, what="Limit.usd")
            amount = usd_to_nano(usd)
            if Decimal(amount) != usd * 1_000_000_000:  # finer than a nano-dollar: enforced rounded
                usd = nano_to_usd(amount)  # down, and so shown (status, refusals, remaining)
            object.__setattr__(self, "usd", usd)
            object.__setattr__(self, "amount", amount)
        else:
            unit = given[0]
            value = getattr(self, unit)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
                raise ValueError(
                    f"Limit.{unit}: expected a whole number of {unit} from 0 to 2**62, got {show_value(value)}"
                )
            object.__setattr__(self, "amount", value)
        if not isinstance(self.per, str) or not _SCOPE_NAME.match(self.per):
            raise ValueError(
                f"Limit.per: expected 'global', 'user', 'project', 'tenant', 'model' or another lowercase "
                f"name (letters, digits, '_'), got {show_value(self.per)}"
            )
        if not isinstance(self.window, str) or self.window not in WINDOWS:
            raise ValueError(f"Limit.window: expected one of {', '.join(WINDOWS)}, got {show_value(self.window)}")
        object.__setattr__(self, "alerts", _check_alerts(self.alerts))
        if self.tz in ("UTC", "utc", "Z"):
            zone: Any = timezone.utc
        else:
            problem = text_problem(self.tz, 255)
            try:
                if problem is not None:
                    raise ValueError(problem)
                zone = ZoneInfo(self.tz)
            except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
                raise ValueError(
                    f"Limit.tz: expected an IANA time zone such as 'Europe/Paris', got {show_value(self.tz)}"
                ) from None
        object.__setattr__(self, "_zone", zone)

    @property
    def unit(self) -> str:
        """``"usd"``, ``"tokens"`` or ``"requests"``: what the limit counts."""
        return "usd" if self.usd is not None else "tokens" if self.tokens is not None else "requests"

    @property
    def nano(self) -> int:
        """The limit in the stores' integer unit: nano-USD for a dollar limit, else tokens or requests."""
        return self.amount

    @property
    def value(self) -> Decimal:
        """The limit in its unit (Decimal dollars, tokens or requests)."""
        return self.usd if self.usd is not None else Decimal(self.amount)

    def show(self, amount: int) -> Decimal:
        """A store amount of this limit's unit in that unit (nano-USD -> Decimal USD; tokens as is)."""
        return nano_to_usd(amount) if self.usd is not None else Decimal(amount)

    def thresholds(self, cap: int) -> tuple[int, ...]:
        """The store amounts at which ``alerts`` fire for a counter whose limit in force is ``cap``."""
        return tuple(sorted({_threshold(cap, fraction) for fraction in self.alerts}))

    def fraction_of(self, threshold: int, cap: int) -> Decimal:
        """The ``alerts`` fraction whose threshold on a limit of ``cap`` is ``threshold`` (or, when the
        limit in force changed since the threshold was set, ``threshold / cap``)."""
        for fraction in self.alerts:
            if _threshold(cap, fraction) == threshold:
                return fraction
        return Decimal(threshold) / Decimal(cap) if cap else Decimal(1)

    @property
    def id_field(self) -> str | None:
        """The config key that names this scope's id (``user_id``), or None for global."""
        return None if self.per == GLOBAL else f"{self.per}_id"

    @property
    def slug(self) -> str:
        """The limit's part of a counter key (its amount is not part of it: see ``counter_key``).
        A tokens or requests limit's counters are apart from the dollar ones: ``user:day+tokens``."""
        tz = "" if self._zone is timezone.utc else f"@{escape_id(self.tz)}"
        unit = "" if self.usd is not None else f"+{self.unit}"
        return f"{self.per}:{self.window}{tz}{unit}"

    def window_at(self, now: datetime) -> WindowInstance:
        """The window instance that contains ``now`` (an aware datetime)."""
        if self.window == "total":
            return WindowInstance("all", None, None)
        zone = self._zone
        if self.window == "hour":
            return _hour_window(zone, now.timestamp())
        if self.window == "minute":
            return _minute_window(zone, now.timestamp())
        day = now.astimezone(zone).date()
        if self.window == "day":
            first, after = day, day + timedelta(days=1)
            label = first.isoformat()
        elif self.window == "week":
            first = day - timedelta(days=day.weekday())
            after = first + timedelta(days=7)
            iso = first.isocalendar()
            label = f"{iso.year}-W{iso.week:02d}"
        else:  # month
            first = day.replace(day=1)
            after = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
            label = first.strftime("%Y-%m")
        return WindowInstance(label, _midnight(first, zone), _midnight(after, zone))

    def window_named(self, label: str) -> WindowInstance:
        """The window instance whose label is ``label`` (``2026-11``, ``2026-11-22``, ``2026-W47``,
        ``2026-11-22T09``, ``2026-11-01T01-0500``, ``all``). ``ValueError`` for a label of another
        shape or one this limit's windows never carry."""
        if not isinstance(label, str) or len(label) > 40:
            raise ValueError(f"window label: expected a string such as 'all' or '2026-11-22', got {show_value(label)}")
        if self.window == "total":
            if label != "all":
                raise ValueError(f"a total limit has one window, 'all'; got {label!r}")
            return WindowInstance("all", None, None)
        probes: list[float] = []
        try:
            if self.window in ("hour", "minute"):
                match = (_HOUR_LABEL if self.window == "hour" else _MINUTE_LABEL).match(label)
                if match is None:
                    raise ValueError(label)
                wall = datetime.strptime(match[1], _LABEL_FORMATS[self.window])
                if match[2] is None:  # a plain label: the first reading of that wall hour
                    base = wall.replace(tzinfo=self._zone).timestamp()
                else:
                    sign = -1 if match[2] == "-" else 1
                    offset = sign * (int(match[3]) * 3600 + int(match[4]) * 60 + int(match[5] or 0))
                    base = wall.replace(tzinfo=timezone.utc).timestamp() - offset
                span = 3600 if self.window == "hour" else 60
                probes = [base + span // 2, base, base + span - 1]
            elif self.window == "week":
                match = _WEEK_LABEL.match(label)
                if match is None:
                    raise ValueError(label)
                first = date.fromisocalendar(int(match[1]), int(match[2]), 1)
                probes = [_midnight(first, self._zone).timestamp() + 43_200]
            else:
                first = datetime.strptime(label, _LABEL_FORMATS[self.window]).date()
                # Noon of the window's first day is inside the window whatever the DST shifts of that day.
                probes = [_midnight(first, self._zone).timestamp() + 43_200]
        except ValueError:
            raise ValueError(
                f"window label {label!r} does not name a {self.window}: expected e.g. {_LABEL_EXAMPLES[self.window]}"
            ) from None
        window = None
        for probe in probes:
            window = self.window_at(datetime.fromtimestamp(probe, timezone.utc))
            if window.label == label:
                return window
        raise ValueError(
            f"window label {label!r} is not a {self.window} of this limit (did you mean {window.label}?)"  # type: ignore[union-attr]
        )


# -- windows -----------------------------------------------------------------------------------

_OFFSETS: dict[int, timezone] = {}


def _fixed(offset: int) -> timezone:
    """A fixed-offset tzinfo (cached): datetimes in it subtract and compare as instants."""
    tz = _OFFSETS.get(offset)
    if tz is None:
        tz = _OFFSETS[offset] = timezone.utc if offset == 0 else timezone(timedelta(seconds=offset))
    return tz


def _offset_at(zone: Any, ts: float) -> int:
    """The zone's UTC offset (seconds) at the instant ``ts``."""
    return int(datetime.fromtimestamp(ts, zone).utcoffset().total_seconds())  # type: ignore[union-attr]


def _instant(ts: float, zone: Any) -> datetime:
    """The instant ``ts`` as local time in the fixed offset the zone has then."""
    return datetime.fromtimestamp(ts, _fixed(_offset_at(zone, ts)))


def _midnight(day: date, zone: Any) -> datetime:
    """The first instant of local date ``day`` (the instant the clock jumps, if midnight is skipped)."""
    ts = datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()  # fold=0: the earlier reading
    return _instant(ts, zone)


def _first_where(zone: Any, lo: int, hi: int, offset: int, equal: bool) -> int:
    """The first second in ``(lo, hi]`` where the zone's offset is (``equal``) or is not ``offset``;
    ``hi`` is such a second. One shift lies between: bisection, at most 12 steps in an hour."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (_offset_at(zone, mid) == offset) == equal:
            hi = mid
        else:
            lo = mid
    return hi


def _offset_label(offset: int) -> str:
    sign = "-" if offset < 0 else "+"
    hours, rest = divmod(abs(offset), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{sign}{hours:02d}{minutes:02d}" + (f"{seconds:02d}" if seconds else "")


def _minute_window(zone: Any, now: float) -> WindowInstance:
    """The minute window containing ``now``: the 60 s that begin at a local full minute, labelled
    ``2026-12-01T09:05`` (the repeated minutes of a fall-back hour carry their UTC offset, as hours do)."""
    t = math.floor(now)
    offset = 0 if zone is timezone.utc else _offset_at(zone, t)
    start = t - (t + offset) % 60
    wall = datetime.fromtimestamp(start + offset, timezone.utc).replace(tzinfo=None)
    label = wall.strftime("%Y-%m-%dT%H:%M")
    if zone is not timezone.utc:
        first_reading = wall.replace(tzinfo=zone).utcoffset()  # fold=0
        if first_reading is None or int(first_reading.total_seconds()) != offset:
            label += _offset_label(offset)
    tz = _fixed(offset)
    return WindowInstance(label, datetime.fromtimestamp(start, tz), _instant(start + 60, zone))


def _threshold(cap: int, fraction: Decimal) -> int:
    """The whole amount at which ``fraction`` of ``cap`` is reached (spent >= fraction * cap)."""
    num, den = fraction.as_integer_ratio()
    return max(1, -(-cap * num // den))


def _check_alerts(alerts: Any) -> tuple[Decimal, ...]:
    """``Limit.alerts`` as sorted Decimal fractions in (0, 1]; ValueError says what was wrong."""
    if isinstance(alerts, (str, bytes)) or not isinstance(alerts, (list, tuple)):
        raise ValueError(f"Limit.alerts: expected a list of fractions of the limit such as [0.5, 0.8, 1.0], "
                         f"got {show_value(alerts)}")
    if len(alerts) > MAX_ALERTS:
        raise ValueError(f"Limit.alerts: at most {MAX_ALERTS} thresholds, got {len(alerts)}")
    out = set()
    for item in alerts:
        fraction = to_decimal(item, what="Limit.alerts")
        if not Decimal(0) < fraction <= Decimal(1):
            raise ValueError(f"Limit.alerts: each threshold is a fraction of the limit in (0, 1] such as 0.8, "
                             f"got {show_value(item)}")
        out.add(fraction)
    return tuple(sorted(out))


def _hour_window(zone: Any, now: float) -> WindowInstance:
    """The hour window (a range of instants) containing ``now``: see the module docstring."""
    t = math.floor(now)
    if zone is timezone.utc:
        start = t - t % 3600
        begins = datetime.fromtimestamp(start, timezone.utc)
        return WindowInstance(begins.strftime("%Y-%m-%dT%H"), begins, datetime.fromtimestamp(start + 3600, timezone.utc))
    offset = _offset_at(zone, t)
    nominal = t - (t + offset) % 3600  # the local full hour, read in the offset in force now
    start, end = nominal, nominal + 3600
    if _offset_at(zone, start) != offset:  # a shift inside this hour, before now: start there
        start = _first_where(zone, start, t, offset, equal=True)
    if _offset_at(zone, end - 1) != offset:  # a shift inside this hour, after now: end there
        end = _first_where(zone, t, end - 1, offset, equal=False)
    wall = datetime.fromtimestamp(nominal + offset, timezone.utc).replace(tzinfo=None)
    label = wall.strftime("%Y-%m-%dT%H")
    first_reading = wall.replace(tzinfo=zone).utcoffset()  # fold=0
    if first_reading is None or int(first_reading.total_seconds()) != offset:
        label += _offset_label(offset)  # the second reading of a repeated wall hour
    return WindowInstance(label, datetime.fromtimestamp(start, _fixed(offset)), _instant(end, zone))


@dataclass(frozen=True)
class Identity:
    """Whose budget a call draws on: scope -> id, for each per-scope limit."""

    ids: Mapping[str, str]

    def id_for(self, limit: Limit, model: str | None = None) -> str | None:
        """The id of ``limit``'s scope for this call; a ``per="model"`` limit's is ``model``."""
        if limit.per == MODEL:
            return model if model is not None else self.ids[MODEL]
        return None if limit.per == GLOBAL else self.ids[limit.per]


def resolve_identity(config: Mapping[str, Any] | None, limits: Sequence[Limit], **explicit: Any) -> Identity:
    """Read each per-scope limit's id from ``explicit``, ``configurable``, then ``metadata``.

    Raises ``IdentityError`` when a per-scope limit has no id, or the id is not a non-empty string
    of valid Unicode of at most ``MAX_ID_LENGTH`` characters: such a call is never pooled with others.
    """
    config = config or {}
    configurable = config.get("configurable") or {}
    metadata = config.get("metadata") or {}
    ids: dict[str, str] = {}
    for limit in limits:
        key = limit.id_field
        if key is None or limit.per in ids:
            continue
        if limit.per == MODEL:  # the serving model is the id; an explicit model_id names one (status)
            value = explicit.get(key, configurable.get(key))
            if value is not None:
                ids[MODEL] = check_id(value, key)
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
        ids[limit.per] = check_id(value, key)
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
    if not value.isascii():
        problem = text_problem(value, len(value))
        if problem is not None:
            raise IdentityError(f"id {problem}.")
    if len(value) > _MAX_ESCAPED:  # escaping never shortens: hash at once, in time linear in the id
        return "~" + hashlib.sha256(value.encode("utf-8")).hexdigest()
    out = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in value)
    if len(out) > _MAX_ESCAPED:
        return "~" + hashlib.sha256(value.encode("utf-8")).hexdigest()
    return out


def counter_tag(name_tag: str, per: str, tenant: str | None) -> str:
    """The hash tag of a counter of scope ``per``: its tenant's for a ``TENANT_LOCAL`` scope when
    ``tenant`` (the raw id; None when the budget has no ``per="tenant"`` limit) is given, else the
    budget's own (``name_tag``: the escaped budget name). On Redis Cluster the counters under the
    budget's tag are reserved in a second step, after the tenant's (released if it refuses)."""
    if tenant is None or per not in TENANT_LOCAL:
        return name_tag
    return f"{name_tag}.t.{escape_id(tenant)}"


def counter_key(name: str, tag: str, limit: Limit, scope_id: str | None, window_label: str) -> str:
    """The store-agnostic name of one counter: ``{tag}:name:per:id:window@tz:label``.

    ``tag`` groups the counters one call touches (Redis Cluster hash tag); it must already be
    escaped. The limit's dollar amount is not in the key: guards of the same name that share a
    scope and window share the counter, each enforcing its own amount.
    """
    sid = "-" if scope_id is None else escape_id(scope_id)
    return f"{{{tag}}}:{escape_id(name)}:{limit.per}:{sid}:{limit.slug}:{window_label}"
