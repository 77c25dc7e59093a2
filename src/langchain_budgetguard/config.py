"""Deployment config files (TOML): one file describes one budget as it is deployed.

    from langchain_budgetguard.config import guard_from_config, load_config
    guarded = guard_from_config(ChatOpenAI(model="gpt-4o"), "config/saas.toml",
                                models={"gpt-4o-mini": ChatOpenAI(model="gpt-4o-mini")})

Schema (every key but ``budget.name`` and ``[[limits]]`` is optional; see config/*.toml)::

    [budget]
    name = "support-bot"            # guards with the same name and store share counters
    degrade_at = 0.8                # degrade once 80% of a limit would be used
    lease_seconds = 600             # a crashed call's hold ends after this
    expired_hold = "charge_input"   # what an expired hold costs: "charge_input", "release", "charge_reserved"

    [store]
    url = "redis://127.0.0.1:6379/0"    # or "memory" (default: one process); or instead:
    url_env = "BUDGETGUARD_REDIS_URL"   # the environment variable that holds the URL
    prefix = "bg:"                      # Redis key prefix
    on_error = "fail_closed"            # store unreachable: "fail_closed" refuses, "fail_open" serves
    fail_open_allowance = 1.00          # USD each process may spend unreserved while fail_open
    retention_seconds = 604800          # counters are kept this long after their window ends
    live_overrides = true               # read limit overrides set with `budgetguard limit set`
    override_refresh_seconds = 5        # ... at most this old

    [estimate]
    mode = "strict"                     # "strict" (an upper bound) or "typical"
    default_max_output_tokens = 4096    # output reserved for calls without max_tokens

    [[limits]]                          # one table per limit
    per = "tenant"                      # "global", "user", "project", "tenant", or any scope name
    window = "month"                    # "hour", "day", "week", "month", "total"
    usd = 200
    tz = "UTC"                          # IANA zone the window boundaries follow

    [[overrides]]                       # one id's own limit (window/tz: when the scope has several)
    per = "tenant"
    id = "acme"
    usd = 1000

    [prices."ft:gpt-4o-mini:acme"]      # USD per million tokens; cache_read, cache_write, reasoning
    input = "0.30"                      # default to input, input, output
    output = "1.20"

    [fallback_price]                    # a price for every model nothing else prices
    input = 5
    output = 15

    [degrade]                           # model name -> cheaper models, tried in order
    "gpt-4o" = ["gpt-4o-mini"]

A file that does not fit raises ``ConfigError``, which names the file, the key and what was
expected (``config/saas.toml: limits[1].usd: expected a number of dollars, got "five"``); every
problem of the file is listed, unknown keys included.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from .errors import BudgetGuardError
from .limits import GLOBAL, WINDOWS, Limit
from .money import to_decimal
from .overrides import DEFAULT_REFRESH_SECONDS, Override, find_limit
from .pricing import ModelPrice

__all__ = ["ConfigError", "DeploymentConfig", "load_config", "parse_config", "guard_from_config", "CONFIG_ENV"]

CONFIG_ENV = "BUDGETGUARD_CONFIG"

_PRICE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning")
_SECTIONS: dict[str, tuple[str, ...]] = {
    "budget": ("name", "degrade_at", "lease_seconds", "expired_hold"),
    "store": ("url", "url_env", "prefix", "on_error", "fail_open_allowance", "retention_seconds",
              "live_overrides", "override_refresh_seconds"),
    "estimate": ("mode", "default_max_output_tokens"),
}
_TABLE_LISTS: dict[str, tuple[str, ...]] = {
    "limits": ("per", "window", "usd", "tz"),
    "overrides": ("per", "id", "usd", "window", "tz"),
}
_TOP = (*_SECTIONS, *_TABLE_LISTS, "prices", "fallback_price", "degrade")
# Keys people put where the first example file had them, or by their BudgetPolicy name.
_MOVED = {
    "estimator": "[estimate] mode",
    "store": "[store] url",
    "on_store_error": "[store] on_error",
    "limit": "a [[limits]] table",
    "degrade_to": "[degrade] (model name -> cheaper models)",
}
_SCOPE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(BudgetGuardError, ValueError):
    """A config file that cannot be used. ``problems`` lists ``(key path, what is wrong)``;
    the message has one line per problem: ``<file>: <key>: <what was expected, got what>``."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {key}: {what}" if key else f"{source}: {what}"
                                   for key, what in self.problems))


def _show(value: Any) -> str:
    """A value as it would be written in TOML: ``"five"``, ``5``, ``true``, ``[1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]" if len(value) < 6 else "an array"
    return str(value)


def _key(part: str) -> str:
    """A TOML key as it appears in a key path: bare when it can be, quoted otherwise."""
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part, ensure_ascii=False)


class _Checker:
    """Collects every problem of one file (key path, message) instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[tuple[str, str]] = []

    def bad(self, key: str, what: str) -> None:
        self.problems.append((key, what))

    def table(self, value: Any, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(key, f"expected a table ([{key}]), got {_show(value)}")
            return {}
        return value

    def known(self, table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
        for name in table:
            if name in allowed:
                continue
            path = f"{where}.{_key(name)}" if where else _key(name)
            hint = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
            if hint:
                suggestion = f"; did you mean {hint[0]!r}?"
            elif name in _MOVED:
                suggestion = f"; did you mean {_MOVED[name]}?"
            else:
                homes = [s for s, keys in _SECTIONS.items() if name in keys and s != where]
                suggestion = f"; did you mean [{homes[0]}] {name}?" if homes else ""
            expected = ", ".join(allowed)
            self.bad(path, f"unknown key (expected one of: {expected}){suggestion}")

    # -- values ------------------------------------------------------------------------------

    def dollars(self, value: Any, key: str, unit: str = "dollars") -> Decimal | None:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            self.bad(key, f"expected a number of {unit}, got {_show(value)}")
            return None
        try:
            amount = to_decimal(value, what=key)
        except (TypeError, ValueError):
            negative = isinstance(value, (int, float)) and value < 0 or (
                isinstance(value, str) and value.strip().startswith("-"))
            what = f"expected a number of {unit} (0 or more)" if negative else f"expected a number of {unit}"
            self.bad(key, f"{what}, got {_show(value)}")
            return None
        return amount

    def string(self, value: Any, key: str, what: str = "a string") -> str | None:
        if not isinstance(value, str) or not value.strip():
            self.bad(key, f"expected {what}, got {_show(value)}")
            return None
        return value

    def choice(self, value: Any, key: str, choices: Sequence[str]) -> str | None:
        if value not in choices:
            options = ", ".join(json.dumps(c) for c in choices)
            self.bad(key, f"expected one of {options}, got {_show(value)}")
            return None
        return value

    def number(self, value: Any, key: str, *, positive: bool = True, integer: bool = False,
               unit: str = "seconds") -> float | int | None:
        ok_type = (int,) if integer else (int, float)
        bound = "a positive" if positive else "a"
        what = f"{bound} {'whole ' if integer else ''}number of {unit}" + ("" if positive else " (0 or more)")
        if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value) or (
                value <= 0 if positive else value < 0):
            self.bad(key, f"expected {what}, got {_show(value)}")
            return None
        return value

    def boolean(self, value: Any, key: str) -> bool | None:
        if not isinstance(value, bool):
            self.bad(key, f"expected true or false, got {_show(value)}")
            return None
        return value


@dataclass(frozen=True)
class DeploymentConfig:
    """One deployment's budget, as read from a config file (see the module docstring).

    ``policy()`` builds the ``BudgetPolicy`` (and its store); ``guard_from_config`` a guard.
    Reading and checking a file never touches the store.
    """

    name: str
    limits: tuple[Limit, ...]
    source: str = "<config>"
    store_url: str | None = None
    store_url_env: str | None = None
    prefix: str | None = None
    on_store_error: str = "fail_closed"
    fail_open_allowance: Decimal | None = None
    retention_seconds: int | None = None
    live_overrides: bool = True
    override_refresh_seconds: float = DEFAULT_REFRESH_SECONDS
    degrade_at: Decimal | None = None
    lease_seconds: float | None = None
    expired_hold: str = "charge_input"
    estimator: str = "strict"
    default_max_output_tokens: int | None = None
    overrides: tuple[Override, ...] = ()
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    fallback_price: ModelPrice | None = None
    degrade: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    # -- the store -----------------------------------------------------------------------------

    def resolve_store_url(self, environ: Mapping[str, str] | None = None) -> str:
        """The store URL: ``store.url``, or the value of ``store.url_env`` now; ``"memory"`` if neither."""
        if self.store_url_env is not None:
            env = os.environ if environ is None else environ
            url = env.get(self.store_url_env, "").strip()
            if not url:
                raise ConfigError(self.source, [(
                    "store.url_env",
                    f"the environment variable {self.store_url_env} is not set (it should hold the store URL, "
                    "e.g. redis://host:6379/0)",
                )])
            return url
        return self.store_url or "memory"

    def describe_store(self) -> str:
        """Where the counters live, without contacting the store (and without a password)."""
        if self.store_url_env is not None:
            return f"the URL in ${self.store_url_env}"
        url = self.store_url or "memory"
        if url in ("memory", "memory://"):
            return "memory (in-process: every process has its own budget)"
        from .stores.redis import _describe_url

        return _describe_url(url)

    def make_store(self, environ: Mapping[str, str] | None = None) -> Any:
        url = self.resolve_store_url(environ)
        if url in ("memory", "memory://"):
            from .stores.memory import MemoryStore

            return MemoryStore()
        from .stores.redis import RedisStore

        options: dict[str, Any] = {}
        if self.prefix is not None:
            options["prefix"] = self.prefix
        if self.retention_seconds is not None:
            options["retention_seconds"] = self.retention_seconds
        try:
            return RedisStore.from_url(url, **options)
        except ValueError as exc:
            key = "store.url_env" if self.store_url_env else "store.url"
            raise ConfigError(self.source, [(key, str(exc))]) from None

    # -- the policy ----------------------------------------------------------------------------

    def policy_options(self) -> dict[str, Any]:
        """Keyword arguments for ``BudgetPolicy`` (all but the store)."""
        options: dict[str, Any] = {
            "limits": list(self.limits),
            "name": self.name,
            "estimator": self.estimator,
            "expired_hold": self.expired_hold,
            "on_store_error": self.on_store_error,
            "overrides": list(self.overrides),
            "override_refresh_seconds": self.override_refresh_seconds if self.live_overrides else None,
        }
        if self.prices:
            options["prices"] = dict(self.prices)
        if self.fallback_price is not None:
            options["fallback_price"] = self.fallback_price
        if self.degrade_at is not None:
            options["degrade_at"] = self.degrade_at
        if self.default_max_output_tokens is not None:
            options["default_max_output_tokens"] = self.default_max_output_tokens
        if self.lease_seconds is not None:
            options["lease_seconds"] = self.lease_seconds
        if self.retention_seconds is not None:
            options["retention_seconds"] = self.retention_seconds
        if self.fail_open_allowance is not None:
            options["fail_open_allowance"] = self.fail_open_allowance
        return options

    def policy(self, store: Any = None) -> Any:
        """A ``BudgetPolicy`` for this deployment, on ``store`` (default: the configured one)."""
        from .policy import BudgetPolicy

        return BudgetPolicy(store=self.make_store() if store is None else store, **self.policy_options())

    # -- degrade ladders -----------------------------------------------------------------------

    def ladder(self, model: str | None) -> tuple[str, ...]:
        """The cheaper models ``model`` degrades to (exact name, then case-insensitive)."""
        if not model:
            return ()
        if model in self.degrade:
            return self.degrade[model]
        lowered = {k.lower(): v for k, v in self.degrade.items()}
        return lowered.get(model.lower(), ())

    def degrade_models(self, llm: Any, models: Mapping[str, Any] | Callable[[str], Any] | None) -> list[Any]:
        """The chat models of ``llm``'s ladder, from ``models`` (a name -> model mapping or a factory)."""
        from .pricing import model_ref

        name = model_ref(llm).name
        ladder = self.ladder(name)
        if not ladder:
            return []
        key = f"degrade.{_key(name or '')}"
        if models is None:
            raise ConfigError(self.source, [(key, (
                f"{name} degrades to {', '.join(ladder)}: pass the chat models, e.g. "
                f'guard_from_config(llm, path, models={{"{ladder[0]}": ChatOpenAI(model="{ladder[0]}")}}) '
                "or a factory such as models=langchain.chat_models.init_chat_model"
            ))])
        out = []
        for target in ladder:
            if callable(models) and not isinstance(models, Mapping):
                model = models(target)
            elif target in models:
                model = models[target]
            else:
                raise ConfigError(self.source, [(key, (
                    f"{name} degrades to {target!r}, which is not among the models given "
                    f"({', '.join(map(repr, models)) or 'none'})"
                ))])
            out.append(model)
        return out

    # -- for people and scripts ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (amounts as strings, no secrets)."""
        def price(p: ModelPrice) -> dict[str, str]:
            return {k: str(getattr(p, k)) for k in _PRICE_KEYS if getattr(p, k) is not None}

        return {
            "source": self.source,
            "name": self.name,
            "store": self.describe_store(),
            "prefix": self.prefix,
            "on_store_error": self.on_store_error,
            "fail_open_allowance": None if self.fail_open_allowance is None else str(self.fail_open_allowance),
            "live_overrides": self.live_overrides,
            "override_refresh_seconds": self.override_refresh_seconds,
            "estimator": self.estimator,
            "default_max_output_tokens": self.default_max_output_tokens,
            "degrade_at": None if self.degrade_at is None else str(self.degrade_at),
            "lease_seconds": self.lease_seconds,
            "expired_hold": self.expired_hold,
            "limits": [{"per": x.per, "window": x.window, "usd": str(x.usd), "tz": x.tz} for x in self.limits],
            "overrides": [{"per": o.per, "id": o.id, "usd": str(o.usd), "window": o.window, "tz": o.tz}
                          for o in self.overrides],
            "prices": {k: price(v) for k, v in self.prices.items()},
            "fallback_price": None if self.fallback_price is None else price(self.fallback_price),
            "degrade": {k: list(v) for k, v in self.degrade.items()},
        }


def load_config(path: str | os.PathLike[str]) -> DeploymentConfig:
    """Read and check a TOML config file; ``ConfigError`` lists every problem, naming the file."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read the config file: {exc.strerror or exc}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [("", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    return parse_config(text, source)


def parse_config(text: str, source: str = "<config>") -> DeploymentConfig:
    """Check TOML text (``source`` names it in errors) and build its ``DeploymentConfig``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [("", f"invalid TOML: {exc}")]) from None
    check = _Checker(source)
    options = _parse(raw, check)
    if check.problems:
        raise ConfigError(source, check.problems)
    return DeploymentConfig(source=source, **options)


def _parse(raw: dict[str, Any], check: _Checker) -> dict[str, Any]:
    check.known(raw, _TOP, "")
    out: dict[str, Any] = {}
    budget = check.table(raw.get("budget"), "budget")
    store = check.table(raw.get("store"), "store")
    estimate = check.table(raw.get("estimate"), "estimate")
    for section, table in (("budget", budget), ("store", store), ("estimate", estimate)):
        check.known(table, _SECTIONS[section], section)

    # [budget]
    if "name" not in budget:
        check.bad("budget.name", "required: the budget's name (guards with the same name and store share counters)")
        out["name"] = "default"
    else:
        out["name"] = check.string(budget["name"], "budget.name", "a non-empty string") or "default"
    if "degrade_at" in budget:
        value = check.dollars(budget["degrade_at"], "budget.degrade_at", unit="a fraction")
        if value is not None and not Decimal(0) < value <= Decimal(1):
            got = _show(budget["degrade_at"])
            check.bad("budget.degrade_at", f"expected a fraction in (0, 1], such as 0.8, got {got}")
        elif value is not None:
            out["degrade_at"] = value
    if "lease_seconds" in budget:
        out["lease_seconds"] = check.number(budget["lease_seconds"], "budget.lease_seconds")
    if "expired_hold" in budget:
        out["expired_hold"] = check.choice(budget["expired_hold"], "budget.expired_hold",
                                           ("charge_input", "release", "charge_reserved"))

    # [store]
    _parse_store(store, check, out)

    # [estimate]
    if "mode" in estimate:
        out["estimator"] = check.choice(estimate["mode"], "estimate.mode", ("strict", "typical"))
    if "default_max_output_tokens" in estimate:
        out["default_max_output_tokens"] = check.number(
            estimate["default_max_output_tokens"], "estimate.default_max_output_tokens", integer=True, unit="tokens")

    # [[limits]], [[overrides]]
    limits = _parse_limits(raw.get("limits"), check)
    out["limits"] = tuple(limits)
    out["overrides"] = tuple(_parse_overrides(raw.get("overrides"), limits, check))

    # prices, fallback_price, degrade
    prices = {}
    for model, table in check.table(raw.get("prices"), "prices").items():
        price = _parse_price(table, f"prices.{_key(model)}", check)
        if price is not None:
            prices[model] = price
    out["prices"] = prices
    if "fallback_price" in raw:
        out["fallback_price"] = _parse_price(raw["fallback_price"], "fallback_price", check)
    out["degrade"] = _parse_degrade(raw.get("degrade"), check)
    return {k: v for k, v in out.items() if v is not None}


def _parse_store(store: dict[str, Any], check: _Checker, out: dict[str, Any]) -> None:
    if "url" in store and "url_env" in store:
        check.bad("store.url_env", "give store.url or store.url_env, not both")
    if "url" in store:
        url = check.string(store["url"], "store.url", 'a store URL ("memory" or redis://...)')
        if url is not None and url not in ("memory", "memory://"):
            from .stores.redis import _parse_url

            try:
                _parse_url(url)
            except (ValueError, TypeError) as exc:
                check.bad("store.url", f'expected "memory" or a Redis URL: {exc}')
                url = None
        out["store_url"] = url
    if "url_env" in store:
        name = store["url_env"]
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            check.bad("store.url_env", f"expected the name of an environment variable, such as "
                                       f'"BUDGETGUARD_REDIS_URL", got {_show(name)}')
        else:
            out["store_url_env"] = name
    if "prefix" in store:
        prefix = store["prefix"]
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            check.bad("store.prefix", f"expected a string without '{{' or '}}', such as \"bg:\", got {_show(prefix)}")
        else:
            out["prefix"] = prefix
    if "on_error" in store:
        out["on_store_error"] = check.choice(store["on_error"], "store.on_error", ("fail_closed", "fail_open"))
    if "fail_open_allowance" in store:
        out["fail_open_allowance"] = check.dollars(store["fail_open_allowance"], "store.fail_open_allowance")
    if "retention_seconds" in store:
        out["retention_seconds"] = check.number(store["retention_seconds"], "store.retention_seconds", integer=True)
    if "live_overrides" in store:
        out["live_overrides"] = check.boolean(store["live_overrides"], "store.live_overrides")
    if "override_refresh_seconds" in store:
        out["override_refresh_seconds"] = check.number(
            store["override_refresh_seconds"], "store.override_refresh_seconds", positive=False)


def _table_list(value: Any, key: str, check: _Checker) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        check.bad(key, f"expected tables ([[{key}]] ...), got {_show(value)}")
        return []
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            check.bad(f"{key}[{i}]", f"expected a table ([[{key}]]), got {_show(item)}")
            item = {}
        out.append(item)
    return out


def _scope(value: Any, key: str, check: _Checker) -> str | None:
    if not isinstance(value, str) or not _SCOPE.match(value):
        check.bad(key, f'expected "global", "user", "project", "tenant" or another lowercase scope name '
                       f"(letters, digits, _), got {_show(value)}")
        return None
    return value


def _tz(value: Any, key: str, check: _Checker) -> str | None:
    try:
        Limit(usd=0, tz=value)
    except (ValueError, TypeError):
        check.bad(key, f'expected an IANA time zone such as "Europe/Paris" or "UTC", got {_show(value)}')
        return None
    return value


def _parse_limits(value: Any, check: _Checker) -> list[Limit]:
    tables = _table_list(value, "limits", check)
    if not tables and value is None:
        check.bad("limits", "required: at least one [[limits]] table (per, window, usd)")
    limits: list[Limit] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, table in enumerate(tables):
        where = f"limits[{i}]"
        check.known(table, _TABLE_LISTS["limits"], where)
        if "usd" not in table:
            check.bad(f"{where}.usd", "required: the limit in dollars")
        usd = check.dollars(table["usd"], f"{where}.usd") if "usd" in table else None
        per = _scope(table.get("per", GLOBAL), f"{where}.per", check)
        window = table.get("window", "total")
        if window not in WINDOWS:
            check.bad(f"{where}.window", f"expected one of {', '.join(map(json.dumps, WINDOWS))}, got {_show(window)}")
            window = None
        tz = _tz(table.get("tz", "UTC"), f"{where}.tz", check)
        if None in (usd, per, window, tz):
            continue
        limit = Limit(usd=usd, per=per, window=window, tz=tz)
        slug = (per, window, tz)
        if slug in seen:
            check.bad(where, f"limits[{seen[slug]}] is per {per} per {window} ({tz}) too; they would share one "
                             "counter: keep the stricter one")
            continue
        seen[slug] = i
        limits.append(limit)
    return limits


def _parse_overrides(value: Any, limits: Sequence[Limit], check: _Checker) -> list[Override]:
    out: list[Override] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, table in enumerate(_table_list(value, "overrides", check)):
        where = f"overrides[{i}]"
        check.known(table, _TABLE_LISTS["overrides"], where)
        for required in ("per", "id", "usd"):
            if required not in table:
                check.bad(f"{where}.{required}", "required" + {
                    "per": ": the scope of the limit it overrides", "id": ": whose limit it is",
                    "usd": ": the limit in dollars"}[required])
        per = _scope(table["per"], f"{where}.per", check) if "per" in table else None
        usd = check.dollars(table["usd"], f"{where}.usd") if "usd" in table else None
        sid = check.string(table["id"], f"{where}.id", "the id of one user, tenant, ...") if "id" in table else None
        window = table.get("window")
        if window is not None and window not in WINDOWS:
            check.bad(f"{where}.window", f"expected one of {', '.join(map(json.dumps, WINDOWS))}, got {_show(window)}")
            continue
        tz = _tz(table["tz"], f"{where}.tz", check) if "tz" in table else None
        if None in (per, usd, sid) or ("tz" in table and tz is None):
            continue
        if per == GLOBAL:
            check.bad(f"{where}.per", "a global limit has no ids to override; change the limit's usd instead")
            continue
        if sid == "*":
            check.bad(f"{where}.id", f'"*" would be every {per}: change the limit\'s usd instead')
            continue
        try:
            limit = find_limit(limits, per, window, tz)
        except ValueError as exc:
            check.bad(f"{where}.window" if window is None and "several" in str(exc) else f"{where}.per", str(exc))
            continue
        slug = (limit.slug, sid, "")
        if slug in seen:
            check.bad(where, f"overrides[{seen[slug]}] already sets {per} {sid!r} on the same limit")
            continue
        seen[slug] = i
        out.append(Override(per=per, id=sid, usd=usd, window=limit.window, tz=limit.tz))
    return out


def _parse_price(value: Any, where: str, check: _Checker) -> ModelPrice | None:
    if not isinstance(value, dict):
        check.bad(where, f'expected a table such as {{ input = "0.50", output = "1.50" }} (USD per million '
                         f"tokens), got {_show(value)}")
        return None
    check.known(value, _PRICE_KEYS, where)
    amounts: dict[str, Decimal] = {}
    ok = True
    for name in _PRICE_KEYS:
        if name not in value:
            if name in ("input", "output"):
                check.bad(f"{where}.{name}", "required: USD per million tokens")
                ok = False
            continue
        amount = check.dollars(value[name], f"{where}.{name}", unit="dollars per million tokens")
        if amount is None:
            ok = False
        else:
            amounts[name] = amount
    return ModelPrice(**amounts) if ok and not set(value) - set(_PRICE_KEYS) else None


def _parse_degrade(value: Any, check: _Checker) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for model, ladder in check.table(value, "degrade").items():
        where = f"degrade.{_key(model)}"
        if isinstance(ladder, str):
            ladder = [ladder]
        if not isinstance(ladder, list) or not ladder or not all(isinstance(m, str) and m.strip() for m in ladder):
            check.bad(where, f'expected a list of cheaper model names, such as ["gpt-4o-mini"], got {_show(ladder)}')
            continue
        if model in ladder:
            check.bad(where, f"{model!r} cannot degrade to itself")
            continue
        if len(set(ladder)) != len(ladder):
            check.bad(where, f"a model is listed twice in {_show(ladder)}")
            continue
        out[model] = tuple(ladder)
    return out


def guard_from_config(
    llm: Any,
    path_or_config: str | os.PathLike[str] | DeploymentConfig,
    degrade_to: Sequence[Any] | None = None,
    models: Mapping[str, Any] | Callable[[str], Any] | None = None,
    *,
    store: Any = None,
    policy: Any = None,
) -> Any:
    """A ``BudgetGuard`` around ``llm`` as the config file describes (``llm=None``: a policy).

    ``degrade_to`` wins over the file's ``[degrade]`` ladder; otherwise the ladder of ``llm``'s
    model name is built from ``models``: a mapping ``{"gpt-4o-mini": ChatOpenAI(model="gpt-4o-mini")}``
    or a factory called with each name (``models=init_chat_model``). ``store`` replaces the
    configured store (tests); ``policy`` (a ``BudgetPolicy`` or a guard) reuses one already built
    from the same file, so that several models draw on one budget in one process.
    """
    from .guard import BudgetGuard

    config = path_or_config if isinstance(path_or_config, DeploymentConfig) else load_config(path_or_config)
    if policy is not None:
        policy = getattr(policy, "policy", policy)
    else:
        policy = config.policy(store=store)
    if llm is None:
        if degrade_to:
            raise TypeError("degrade_to needs a model to degrade from: guard_from_config(llm, path, degrade_to=[...]).")
        return BudgetGuard(policy=policy)
    ladder = list(degrade_to) if degrade_to is not None else config.degrade_models(llm, models)
    return BudgetGuard(llm, degrade_to=ladder, policy=policy)
