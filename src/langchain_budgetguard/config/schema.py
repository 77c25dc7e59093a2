"""The config file's tables as pydantic models: what each key may hold, and the JSON Schema editors
use for completion (``config/budgetguard.schema.json``; regenerate it with
``python -m langchain_budgetguard.config --schema > config/budgetguard.schema.json``).

A new key is one annotated field here (a value kind from ``values.py``, a description, a default);
checks that tie keys of different tables together live in ``reader.py`` (``relations``).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema

from ..limits import WINDOWS
from .values import (
    Bounded, Choice, Flag, Fraction, Ladder, Money, Pattern, StoreUrl, Text, TimeZone,
)

# The kinds of value, by what they mean here.
Dollars = Annotated[Decimal, Money("dollars")]
PricePerMillion = Annotated[Decimal, Money("dollars per million tokens", places=None)]
DegradeAt = Annotated[Decimal, Fraction()]
Window = Annotated[str, Choice(*WINDOWS)]
ExpiredHold = Annotated[str, Choice("charge_input", "release", "charge_reserved")]
OnStoreError = Annotated[str, Choice("fail_closed", "fail_open")]
EstimateMode = Annotated[str, Choice("strict", "typical")]
LeaseSeconds = Annotated[float, Bounded("seconds", 86_400, "a day")]
RetentionSeconds = Annotated[int, Bounded("seconds", 3650 * 86_400, "ten years", integer=True)]
RefreshSeconds = Annotated[float, Bounded("seconds", 3600, "an hour", positive=False)]
OutputTokens = Annotated[int, Bounded("tokens", 10_000_000, "ten million", integer=True)]
BudgetName = Annotated[str, Text("a non-empty string")]
ScopeId = Annotated[str, Text("the id of one user, tenant, ...")]
Scope = Annotated[str, Pattern(r"^[a-z][a-z0-9_]{0,31}$", 'expected "global", "user", "project", "tenant" or '
                               "another lowercase scope name (letters, digits, _)",
                               ("global", "user", "project", "tenant"))]
EnvName = Annotated[str, Pattern(r"^[A-Za-z_][A-Za-z0-9_]*$", "expected the name of an environment variable, "
                                 'such as "BUDGETGUARD_REDIS_URL"', ("BUDGETGUARD_REDIS_URL",))]
KeyPrefix = Annotated[str, Pattern(r"^[^{}]*$", "expected a string without '{' or '}', such as \"bg:\"", ("bg:",))]
Zone = Annotated[str, TimeZone()]
Url = Annotated[str, StoreUrl()]
Boolean = Annotated[bool, Flag()]
Models = Annotated[tuple[str, ...], Ladder()]


def optional(description: str, default: Any = None) -> Any:
    """A key that may be left out: ``default`` is what applies then (shown in the schema)."""
    return Field(None, description=description, json_schema_extra=None if default is None else {"default": default})


class Table(BaseModel):
    """A TOML table: unknown keys are errors (with a "did you mean")."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    table_example: ClassVar[str | None] = None  # shown when something else stands where the table should


class BudgetTable(Table):
    """The budget: its name, when to degrade, how long a crashed call holds its reservation."""

    name: BudgetName = Field(
        description="the budget's name (guards with the same name and store share counters)")
    degrade_at: DegradeAt | None = optional(
        "degrade to a cheaper model once this fraction of a limit would be used (0.8: at 80%)", 1)
    lease_seconds: LeaseSeconds | None = optional(
        "a call that crashed mid-way holds its reservation this long at most", 600)
    expired_hold: ExpiredHold | None = optional(
        'what an expired hold costs: "charge_input" (its input), "release" (nothing), "charge_reserved" (all)',
        "charge_input")


class StoreTable(Table):
    """Where the counters live: "memory" (one process) or Redis (every process and machine)."""

    url: Url | None = optional('"memory" or a Redis URL (redis://, rediss://, redis+cluster://, '
                                    'redis+sentinel://, unix://)', "memory")
    url_env: EnvName | None = optional("instead of url: the environment variable that holds the store URL")
    prefix: KeyPrefix | None = optional("Redis key prefix", "bg:")
    on_error: OnStoreError | None = optional(
        'store unreachable: "fail_closed" refuses calls, "fail_open" serves them', "fail_closed")
    fail_open_allowance: Dollars | None = optional("USD each process may spend unreserved while fail_open")
    retention_seconds: RetentionSeconds | None = optional(
        "counters are kept this long after their window ends", 604_800)
    live_overrides: Boolean | None = optional("read the limit overrides set with `budgetguard limit set`", True)
    override_refresh_seconds: RefreshSeconds | None = optional(
        "re-read the live overrides at most this often (0: before every call)", 5)


class EstimateTable(Table):
    """How a call's worst-case cost is estimated before it is reserved."""

    mode: EstimateMode | None = optional(
        '"strict": an upper bound on the prompt\'s tokens; "typical": about 4 characters a token', "strict")
    default_max_output_tokens: OutputTokens | None = optional(
        "output reserved for a call that sets no max_tokens", 4096)


class LimitTable(Table):
    """One limit: usd dollars per scope id per window."""

    per: Scope = Field("global", description='the scope: "global", "user", "project", "tenant" or any '
                                             "lowercase name (its id comes from <name>_id in the run's config)")
    window: Window = Field("total", description="the window the limit applies to (calendar, in tz)")
    usd: Dollars = Field(description="the limit in dollars")
    tz: Zone = Field("UTC", description="the IANA time zone the window boundaries follow")


class OverrideTable(Table):
    """One id's own limit instead of its scope's (window/tz pick the limit when the scope has several)."""

    per: Scope = Field(description="the scope of the limit it overrides")
    id: ScopeId = Field(description="whose limit it is")
    usd: Dollars = Field(description="the limit in dollars")
    window: Window | None = optional("the window of the limit it overrides (when the scope has several)")
    tz: Zone | None = optional("the time zone of the limit it overrides (when the scope has several)")


class PriceTable(Table):
    """A model's price in USD per million tokens."""

    table_example: ClassVar[str | None] = '{ input = "0.50", output = "1.50" } (USD per million tokens)'

    input: PricePerMillion = Field(description="USD per million tokens (input)")
    output: PricePerMillion = Field(description="USD per million tokens (output)")
    cache_read: PricePerMillion | None = optional("USD per million cached input tokens read (default: input)")
    cache_write: PricePerMillion | None = optional("USD per million input tokens written to the cache (default: input)")
    reasoning: PricePerMillion | None = optional("USD per million reasoning tokens (default: output)")


class ConfigFile(Table):
    """A langchain-budgetguard deployment: one budget, its limits, and where its counters live."""

    model_config = ConfigDict(title="langchain-budgetguard config")

    budget: BudgetTable = Field(description="the budget: name (required), degrade_at, lease_seconds, expired_hold")
    store: StoreTable = Field(default_factory=StoreTable, description="where the counters live")
    estimate: EstimateTable = Field(default_factory=EstimateTable, description="how calls are estimated")
    limits: list[LimitTable] = Field(min_length=1, description="at least one [[limits]] table (per, window, usd)")
    overrides: list[OverrideTable] = Field(default_factory=list, description="ids with their own limit")
    prices: dict[str, PriceTable] = Field(
        default_factory=dict, description="prices of models genai-prices does not know (model name -> price)")
    fallback_price: PriceTable | None = optional("a price for every model nothing else prices")
    degrade: dict[str, Models] = Field(
        default_factory=dict, description="model name -> the cheaper models it degrades to, tried in order")


class _TomlJsonSchema(GenerateJsonSchema):
    """JSON Schema for a TOML file: TOML has no null, so optional keys are just not required."""

    def nullable_schema(self, schema: Any) -> Any:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: Any) -> Any:
        if schema.get("default") is None or "default_factory" in schema:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a config file (draft 2020-12), as shipped in ``config/budgetguard.schema.json``."""
    schema = ConfigFile.model_json_schema(schema_generator=_TomlJsonSchema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def json_schema_text() -> str:
    """``json_schema()`` as the shipped file's text."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
