"""A guard as JSON (``dumpd``/``loads``) and pickle: its model(s) and the options its budget was built from.

A live store, estimator or pricer object cannot be written down; a guard built with one is not
serializable (``dumpd`` says ``not_implemented``) rather than revived as another budget.

A store URL that carries a password is written as a secret (``STORE_URL_SECRET``), as LangChain
writes an API key: LangChain hands ``dumpd(model)`` to every callback handler and tracer. ``store``
shows it without the password; ``loads(..., secrets_map={"BUDGETGUARD_STORE_URL": url})`` (or
``secrets_from_env=True``) gives it back, and a load without it is refused, never revived on an
in-process budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import SecretStr

from .limits import Limit

__all__ = ["options_from_json", "options_to_json", "limit_to_json", "plain_data", "STORE_URL_SECRET",
           "SECRET_STORE_URL_KEY"]

STORE_URL_SECRET = "BUDGETGUARD_STORE_URL"  # the secret's id: loads() takes the URL from secrets_map / env
SECRET_STORE_URL_KEY = "store_url"  # the kwarg dumpd writes that secret under


def options_from_json(options: dict[str, Any]) -> dict[str, Any]:
    """Options as ``dumpd`` wrote them (limits as dicts, a store URL with a password as a secret) back
    to what BudgetPolicy takes."""
    if SECRET_STORE_URL_KEY in options:
        options = dict(options)
        url = options.pop(SECRET_STORE_URL_KEY)
        if not isinstance(url, str) or not url:
            raise ValueError(
                f"This BudgetGuard's store URL ({options.get('store')}) holds a password, so it was serialized as "
                f"the secret {STORE_URL_SECRET}: give it to loads(..., secrets_map={{{STORE_URL_SECRET!r}: "
                "'redis://user:password@host:6379/0'}), or set it in the environment with secrets_from_env=True."
            )
        options["store"] = url
    if isinstance(options.get("limit"), Mapping):
        options = {**options, "limit": Limit(**options["limit"])}
    limits = options.get("limits")
    if limits and any(isinstance(item, Mapping) for item in limits):
        options = {**options, "limits": [Limit(**item) if isinstance(item, Mapping) else item for item in limits]}
    return options


def options_to_json(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The options as JSON values, or None when one of them is a live object (a store, an estimator)."""
    if options is None:
        return None
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key == "store" and isinstance(value, str) and _has_credentials(value):
            out[key], out[SECRET_STORE_URL_KEY] = _without_credentials(value), value  # lc_secrets hides the second
        elif key == "limits":
            out[key] = [limit_to_json(x) for x in value or ()]
        elif isinstance(value, Decimal):
            out[key] = str(value)
        elif isinstance(value, Limit):
            out[key] = limit_to_json(value)
        elif value is None or isinstance(value, (str, int, float, bool)) or (
                isinstance(value, Mapping) and plain_data(value)):
            out[key] = _jsonable(value)
        else:
            return None
    return out


def limit_to_json(limit: Limit) -> dict[str, Any]:
    """A ``Limit`` as JSON values that ``Limit(**...)`` takes back (Decimals as strings)."""
    out: dict[str, Any] = {limit.unit: str(limit.usd) if limit.unit == "usd" else limit.amount,
                           "per": limit.per, "window": limit.window, "tz": limit.tz}
    if limit.alerts:
        out["alerts"] = [str(x) for x in limit.alerts]
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value) if isinstance(value, Decimal) else value


def plain_data(value: Any, depth: int = 0) -> bool:
    """Settings a guard may show of its model: values, never objects that could call the model."""
    if value is None or isinstance(value, (str, int, float, Decimal, Enum, SecretStr, bytes)):
        return True
    if depth > 4:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(plain_data(item, depth + 1) for item in value)
    if isinstance(value, Mapping):
        return all(plain_data(k, depth + 1) and plain_data(v, depth + 1) for k, v in value.items())
    return False


def _has_credentials(url: str) -> bool:
    """Whether a store URL carries a password (``redis://user:pw@host``, ``?password=...``,
    ``?sentinel_password=...``)."""
    try:
        parts = urlsplit(url)
        return parts.password is not None or any(
            "password" in key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    except ValueError:  # not a URL we can read: keep it out of sight
        return True


def _without_credentials(url: str) -> str:
    """The URL to show: its password and query (which may hold one) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, hosts = netloc.rpartition("@")
        user = user.split(":", 1)[0]
        netloc = f"{user}:***@{hosts}" if parts.password is not None else f"{user}@{hosts}"
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?***" if parts.query else "")
