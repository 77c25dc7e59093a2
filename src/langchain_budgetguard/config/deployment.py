"""A deployment as its config file describes it: read, checked, and turned into a policy or a guard.

    from langchain_budgetguard.config import guard_from_config, load_config
    guarded = guard_from_config(ChatOpenAI(model="gpt-4o"), "config/saas.toml",
                                models={"gpt-4o-mini": ChatOpenAI(model="gpt-4o-mini")})

``schema.py`` checks each key; ``relations`` below checks what ties tables together (two limits on
one counter, an override of a limit that does not exist, a model that degrades to itself). Every
problem of the file is reported at once, each naming the file and the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..limits import GLOBAL, Limit
from ..overrides import DEFAULT_REFRESH_SECONDS, Override, find_limit
from ..pricing import ModelPrice
from .problems import ConfigError, Problem, key_part, problems_of
from .schema import ConfigFile, LimitTable, OverrideTable, PriceTable
from .values import Ladder

__all__ = ["DeploymentConfig", "load_config", "parse_config", "guard_from_config", "CONFIG_ENV"]

CONFIG_ENV = "BUDGETGUARD_CONFIG"

_PRICE_KEYS = tuple(PriceTable.model_fields)
M = TypeVar("M", bound=BaseModel)


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
        from ..stores.redis import _describe_url

        return _describe_url(url)

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

    limits: list[Limit] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, table in enumerate(_items(raw.get("limits"))):
        checked = _valid(LimitTable, table)
        if checked is None:
            continue
        slug = (checked.per, checked.window, checked.tz)
        if slug in seen:
            problems.append((f"limits[{i}]", f"limits[{seen[slug]}] is per {checked.per} per {checked.window} "
                                             f"({checked.tz}) too; they would share one counter: keep the stricter one"))
            continue
        seen[slug] = i
        limits.append(Limit(usd=checked.usd, per=checked.per, window=checked.window, tz=checked.tz))

    overrides: list[Override] = []
    taken: dict[tuple[str, str], int] = {}
    for i, table in enumerate(_items(raw.get("overrides"))):
        where = f"overrides[{i}]"
        item = _valid(OverrideTable, table)
        if item is None:
            continue
        if item.per == GLOBAL:
            problems.append((f"{where}.per", "a global limit has no ids to override; change the limit's usd instead"))
            continue
        if item.id == "*":
            problems.append((f"{where}.id", f'"*" would be every {item.per}: change the limit\'s usd instead'))
            continue
        try:
            limit = find_limit(limits, item.per, item.window, item.tz)
        except ValueError as exc:
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


_LADDER = TypeAdapter(Ladder)


def _ladder_or_empty(value: Any) -> tuple[str, ...]:
    try:
        return _LADDER.validate_python(value)
    except ValidationError:
        return ()


def _price(table: PriceTable) -> ModelPrice:
    return ModelPrice(**{k: v for k, v in table.model_dump().items() if v is not None})


def _deployment(file: ConfigFile, limits: list[Limit], overrides: list[Override], source: str) -> DeploymentConfig:
    budget, store, estimate = file.budget, file.store, file.estimate
    options: dict[str, Any] = {
        "name": budget.name,
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
    }
    return DeploymentConfig(
        source=source, limits=tuple(limits), overrides=tuple(overrides),
        prices={model: _price(p) for model, p in file.prices.items()}, degrade=dict(file.degrade),
        **{k: v for k, v in options.items() if v is not None},
    )


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
    from ..guard import BudgetGuard

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
