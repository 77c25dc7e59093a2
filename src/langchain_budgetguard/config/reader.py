"""Reading a config file: TOML -> checked models -> ``DeploymentConfig``.

``schema.py`` checks each key; ``relations`` below checks what ties tables together (two limits on
one counter, an override of a limit that does not exist, a model that degrades to itself). Every
problem of the file is reported at once, each naming the file and the key, in the file's order.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..limits import GLOBAL, UNITS, Limit
from ..overrides import Override, find_limit
from ..pricing import ModelPrice
from .deployment import DeploymentConfig
from .problems import ConfigError, Problem, key_part, problems_of
from .schema import ConfigFile, LimitTable, Models, OverrideTable, PriceTable

__all__ = ["load_config", "parse_config", "relations"]

M = TypeVar("M", bound=BaseModel)


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
        raw = tomllib.loads(text, parse_float=Decimal)  # money stays exactly as written
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [("", f"invalid TOML: {exc}")]) from None
    problems: list[Problem] = []
    checked: ConfigFile | None = None
    try:
        checked = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        problems += problems_of(exc, ConfigFile)
    limits, overrides, related = relations(raw)
    problems += related
    if problems or checked is None:
        raise ConfigError(source, _in_file_order(problems, raw))
    return _deployment(checked, limits, overrides, source)


def _in_file_order(problems: list[Problem], raw: Mapping[str, Any]) -> list[Problem]:
    """Problems sorted by where their table is in the file (a missing one first; stable within one)."""
    order = {name: i for i, name in enumerate(raw)}

    def position(problem: Problem) -> tuple[int, int]:
        head = problem[0].split(".", 1)[0].split("[", 1)
        index = int(head[1].split("]", 1)[0]) if len(head) > 1 and head[1][:1].isdigit() else -1
        return order.get(head[0], -1), index

    return sorted(problems, key=position)


# -- what ties tables together ----------------------------------------------------------------------


def _valid(model: type[M], value: Any) -> M | None:
    """``value`` as ``model`` when it is valid (its problems are reported by the whole file's check)."""
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def relations(raw: Mapping[str, Any]) -> tuple[list[Limit], list[Override], list[Problem]]:
    """The checks between keys (on the tables that are valid on their own), and the limits and
    overrides they resolve."""
    problems: list[Problem] = []
    store = raw.get("store")
    if isinstance(store, dict) and "url" in store and "url_env" in store:
        problems.append(("store.url_env", "give store.url or store.url_env, not both"))

    alerts = raw.get("alerts")
    if isinstance(alerts, dict) and "webhook_url" in alerts and "webhook_url_env" in alerts:
        problems.append(("alerts.webhook_url_env", "give alerts.webhook_url or alerts.webhook_url_env, not both"))
    if isinstance(alerts, dict) and "webhook_url" not in alerts and "webhook_url_env" not in alerts:
        for key in ("webhook_headers_env", "timeout_seconds", "attempts"):
            if key in alerts:
                problems.append((f"alerts.{key}", "applies to the webhook, and there is none: set alerts.webhook_url "
                                 "or alerts.webhook_url_env (or remove this key)"))

    limits: list[Limit] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(_items(raw.get("limits"))):
        checked = _valid(LimitTable, table)
        if checked is None:
            continue
        unit = next(u for u in UNITS if getattr(checked, u) is not None)
        limit = Limit(per=checked.per, window=checked.window, tz=checked.tz, alerts=checked.alerts or (),
                      **{unit: getattr(checked, unit)})
        if limit.slug in seen:  # the counter's own name: "UTC", "utc" and "Z" are one time zone
            problems.append((f"limits[{i}]", f"limits[{seen[limit.slug]}] is a {unit} limit per {checked.per} per "
                             f"{checked.window} ({checked.tz}) too; they would share one counter: "
                             "keep the stricter one"))
            continue
        seen[limit.slug] = i
        limits.append(limit)

    usd_limits = [x for x in limits if x.unit == "usd"]  # an override is in dollars: only dollar limits match
    overrides: list[Override] = []
    taken: dict[tuple[str, str], int] = {}
    for i, table in enumerate(_items(raw.get("overrides"))):
        where = f"overrides[{i}]"
        item = _valid(OverrideTable, table)
        if item is None:
            continue
        if item.per == GLOBAL:
            problems.append((f"{where}.per",
                             "a global limit has no ids to override; change the limit's usd instead"))
            continue
        if item.id == "*":
            problems.append((f"{where}.id", f'"*" would be every {item.per}: change the limit\'s usd instead'))
            continue
        try:
            limit = find_limit(usd_limits, item.per, item.window, item.tz)
        except ValueError as exc:
            counted = [x for x in limits if x.unit != "usd" and x.per == item.per
                       and item.window in (None, x.window) and item.tz in (None, x.tz)]
            if counted and not any(x.per == item.per for x in usd_limits):
                units = " and ".join(sorted({x.unit for x in counted}))
                problems.append((f"{where}.per", f"overrides are in dollars, but the limits per {item.per} count "
                                 f"{units}; change that limit in [[limits]] or add a usd limit per {item.per}"))
                continue
            several = item.window is None and "several" in str(exc)
            problems.append((f"{where}.window" if several else f"{where}.per", str(exc)))
            continue
        slug = (limit.slug, item.id)
        if slug in taken:
            problems.append((where, f"overrides[{taken[slug]}] already sets {item.per} {item.id!r} on the same limit"))
            continue
        taken[slug] = i
        overrides.append(Override(per=item.per, id=item.id, usd=item.usd, window=limit.window, tz=limit.tz))

    degrade = raw.get("degrade")
    for model, ladder in (degrade.items() if isinstance(degrade, dict) else ()):
        if model in _ladder_or_empty(ladder):
            problems.append((f"degrade.{key_part(model)}", f"{model!r} cannot degrade to itself"))
    return limits, overrides, problems


_LADDER: TypeAdapter[tuple[str, ...]] = TypeAdapter(Models)


def _ladder_or_empty(value: Any) -> tuple[str, ...]:
    try:
        return _LADDER.validate_python(value)
    except ValidationError:
        return ()


def _price(table: PriceTable) -> ModelPrice:
    return ModelPrice(**{k: v for k, v in table.model_dump().items() if v is not None})


def _deployment(file: ConfigFile, limits: list[Limit], overrides: list[Override], source: str) -> DeploymentConfig:
    budget, store, estimate, alerts = file.budget, file.store, file.estimate, file.alerts
    decision = alerts.decision_seconds
    options: dict[str, Any] = {
        "name": budget.name,
        "mode": budget.mode,
        "alert_webhook_url": alerts.webhook_url,
        "alert_webhook_url_env": alerts.webhook_url_env,
        "alert_webhook_headers_env": alerts.webhook_headers_env,
        "alert_timeout_seconds": alerts.timeout_seconds,
        "alert_attempts": alerts.attempts,
        "degrade_at": budget.degrade_at,
        "lease_seconds": budget.lease_seconds,
        "expired_hold": budget.expired_hold,
        "store_url": store.url,
        "store_url_env": store.url_env,
        "prefix": store.prefix,
        "on_store_error": store.on_error,
        "fail_open_allowance": store.fail_open_allowance,
        "retention_seconds": store.retention_seconds,
        "live_overrides": store.live_overrides,
        "override_refresh_seconds": store.override_refresh_seconds,
        "estimator": estimate.mode,
        "default_max_output_tokens": estimate.default_max_output_tokens,
        "fallback_price": None if file.fallback_price is None else _price(file.fallback_price),
        "tool_fees": {k: v for k, v in file.tool_fees.model_dump().items() if v is not None} or None,
    }
    # 0 turns refusal and degrade alerts off (None in BudgetPolicy); left out, the default applies
    decisions = {} if decision is None else {"decision_alert_seconds": decision or None}
    return DeploymentConfig(
        source=source, limits=tuple(limits), overrides=tuple(overrides),
        prices={model: _price(p) for model, p in file.prices.items()}, degrade=dict(file.degrade),
        **{k: v for k, v in options.items() if v is not None}, **decisions,
    )
