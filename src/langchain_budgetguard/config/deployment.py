"""A deployment's budget as its config file describes it, and what it builds: the store, the
``BudgetPolicy`` and the degrade ladder. (``reader.py`` reads a file into one.)"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..alerts import Webhook
from ..limits import Limit
from ..overrides import DEFAULT_REFRESH_SECONDS, Override
from ..pricing import ModelPrice
from .problems import ConfigError, key_part

__all__ = ["DeploymentConfig", "CONFIG_ENV"]

CONFIG_ENV = "BUDGETGUARD_CONFIG"

_PRICE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning", "web_search", "file_search")


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
    tool_fees: Mapping[str, Decimal] = field(default_factory=dict)
    degrade: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mode: str = "enforce"
    alert_webhook_url: str | None = None
    alert_webhook_url_env: str | None = None
    alert_webhook_headers_env: str | None = None
    alert_timeout_seconds: float = 5.0
    alert_attempts: int = 3
    decision_alert_seconds: float | None = 60.0

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
        from ..stores.redis_client import describe_url

        return describe_url(url)

    def make_store(self, environ: Mapping[str, str] | None = None) -> Any:
        url = self.resolve_store_url(environ)
        if url in ("memory", "memory://"):
            from ..stores.memory import MemoryStore

            return MemoryStore()
        from ..stores.redis import RedisStore

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

    # -- alerts --------------------------------------------------------------------------------

    def webhook(self, environ: Mapping[str, str] | None = None) -> Webhook | None:
        """The alert webhook: ``alerts.webhook_url`` or the value of ``alerts.webhook_url_env`` now, with
        the headers of ``alerts.webhook_headers_env``; None when no webhook is configured."""
        env = os.environ if environ is None else environ
        url, key = self.alert_webhook_url, "alerts.webhook_url"
        if self.alert_webhook_url_env is not None:
            key = "alerts.webhook_url_env"
            url = env.get(self.alert_webhook_url_env, "").strip()
            if not url:
                raise ConfigError(self.source, [(key, (
                    f"the environment variable {self.alert_webhook_url_env} is not set (it should hold the "
                    "webhook's URL, e.g. https://hooks.example.com/budget)"))])
        if url is None:
            return None
        headers: Any = {}
        if self.alert_webhook_headers_env is not None:
            name = self.alert_webhook_headers_env
            try:
                headers = json.loads(env.get(name) or "{}")
            except ValueError:
                headers = None
            if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
                raise ConfigError(self.source, [("alerts.webhook_headers_env", (
                    f"the environment variable {name} should hold a JSON object of header names and string "
                    'values, such as {"Authorization": "Bearer ..."}'))])
        try:
            return Webhook(url, timeout_seconds=self.alert_timeout_seconds, attempts=self.alert_attempts,
                           headers=headers)
        except ValueError:  # the URL came from the environment (the file's was checked when read)
            raise ConfigError(self.source, [(key, (
                f"the environment variable {self.alert_webhook_url_env} does not hold an http:// or https:// "
                "URL"))]) from None

    def describe_webhook(self) -> str | None:
        """Where alerts are POSTed, without the URL's path, query or credentials (they may hold a secret)."""
        if self.alert_webhook_url_env is not None:
            return f"the URL in ${self.alert_webhook_url_env}"
        if self.alert_webhook_url is None:
            return None
        return Webhook(self.alert_webhook_url).where + "/..."

    # -- the policy ----------------------------------------------------------------------------

    def policy_options(self) -> dict[str, Any]:
        """Keyword arguments for ``BudgetPolicy`` (all but the store; the alert webhook's URL is read from
        its environment variable now)."""
        options: dict[str, Any] = {
            "limits": list(self.limits),
            "name": self.name,
            "estimator": self.estimator,
            "expired_hold": self.expired_hold,
            "on_store_error": self.on_store_error,
            "overrides": list(self.overrides),
            "override_refresh_seconds": self.override_refresh_seconds if self.live_overrides else None,
            "mode": self.mode,
            "decision_alert_seconds": self.decision_alert_seconds,
        }
        webhook = self.webhook()
        if webhook is not None:
            options["alert_webhook"] = webhook
        if self.prices:
            options["prices"] = dict(self.prices)
        if self.fallback_price is not None:
            options["fallback_price"] = self.fallback_price
        if self.tool_fees:
            options["tool_fees"] = dict(self.tool_fees)
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
        from ..policy import BudgetPolicy

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
        from ..pricing import model_ref

        name = model_ref(llm).name
        ladder = self.ladder(name)
        if not ladder:
            return []
        key = f"degrade.{key_part(name or '')}"
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
            "mode": self.mode,
            "limits": [{"per": x.per, "window": x.window, x.unit: str(x.value), "tz": x.tz,
                        "alerts": [str(a) for a in x.alerts]} for x in self.limits],
            "overrides": [{"per": o.per, "id": o.id, "usd": str(o.usd), "window": o.window, "tz": o.tz}
                          for o in self.overrides],
            "prices": {k: price(v) for k, v in self.prices.items()},
            "fallback_price": None if self.fallback_price is None else price(self.fallback_price),
            "tool_fees": {k: str(v) for k, v in self.tool_fees.items()},
            "degrade": {k: list(v) for k, v in self.degrade.items()},
            "alerts": {
                "webhook": self.describe_webhook(),
                "webhook_headers_env": self.alert_webhook_headers_env,
                "timeout_seconds": self.alert_timeout_seconds,
                "attempts": self.alert_attempts,
                "decision_seconds": self.decision_alert_seconds,
            },
        }
