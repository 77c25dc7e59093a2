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

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import GenerateJsonSchema

from ..limits import MAX_COUNT, UNITS, WINDOWS
from .problems import bad
from .values import (
    Bounded, Choice, Flag, Fraction, Fractions, Ladder, Money, Pattern, StoreUrl, Text, TimeZone, WebUrl,
)

# The kinds of value, by what they mean here.
Dollars = Annotated[Decimal, Money("dollars")]
PricePerMillion = Annotated[Decimal, Money("dollars per million tokens", places=None)]
PricePerThousand = Annotated[Decimal, Money("dollars per 1,000 searches", places=None)]
DegradeAt = Annotated[Decimal, Fraction()]
Window = Annotated[str, Choice(*WINDOWS)]
ExpiredHold = Annotated[str, Choice("charge_input", "release", "charge_reserved")]
Mode = Annotated[str, Choice("enforce", "shadow")]
Tokens = Annotated[int, Bounded("tokens", MAX_COUNT, "2**62", integer=True, positive=False)]
Requests = Annotated[int, Bounded("requests", MAX_COUNT, "2**62", integer=True, positive=False)]
AlertAt = Annotated[tuple[Decimal, ...], Fractions()]
WebhookUrl = Annotated[str, WebUrl()]
WebhookTimeout = Annotated[float, Bounded("seconds", 60, "a minute")]
Attempts = Annotated[int, Bounded("attempts", 10, "ten", integer=True)]
DecisionSeconds = Annotated[float, Bounded("seconds", 86_400, "a day", positive=False)]
OnStoreError = Annotated[str, Choice("fail_closed", "fail_open")]
EstimateMode = Annotated[str, Choice("strict", "typical")]
LeaseSeconds = Annotated[float, Bounded("seconds", 86_400, "a day")]
RetentionSeconds = Annotated[int, Bounded("seconds", 3650 * 86_400, "ten years", integer=True)]
RefreshSeconds = Annotated[float, Bounded("seconds", 3600, "an hour", positive=False)]
OutputTokens = Annotated[int, Bounded("tokens", 10_000_000, "ten million", integer=True)]
BudgetName = Annotated[str, Text("a non-empty string")]
ScopeId = Annotated[str, Text("the id of one user, tenant, ...")]
Scope = Annotated[str, Pattern(r"^[a-z][a-z0-9_]{0,31}$", 'expected "global", "user", "project", "tenant", '
                               '"model" or another lowercase scope name (letters, digits, _)',
                               ("global", "user", "project", "tenant", "model"))]
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
    """The budget: its name, enforce or shadow, when to degrade, how long a crashed call holds its reservation."""

    name: BudgetName = Field(
        description="the budget's name (guards with the same name and store share counters)")
    mode: Mode | None = optional(
        '"enforce" refuses and degrades; "shadow" counts and alerts exactly but never refuses or degrades '
        "(for rolling a budget out)", "enforce")
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
    """One limit per scope id per window: usd dollars, tokens (input + output) or requests (model calls)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": [unit]} for unit in UNITS]})

    per: Scope = Field("global", description='the scope: "global", "user", "project", "tenant", "model" (one '
                                             "counter per serving model) or any lowercase name (its id comes from "
                                             "<name>_id in the run's config)")
    window: Window = Field("total", description="the window the limit applies to (minute and hour: real time; "
                                                "day, week, month: the calendar in tz)")
    usd: Dollars | None = optional("the limit in dollars (give one of usd, tokens, requests)")
    tokens: Tokens | None = optional("the limit in tokens, input plus output (give one of usd, tokens, requests)")
    requests: Requests | None = optional("the limit in model calls (give one of usd, tokens, requests)")
    tz: Zone = Field("UTC", description="the IANA time zone the window boundaries follow")
    alerts: AlertAt | None = optional(
        "fractions of the limit that alert once per window when a counter reaches them, such as [0.5, 0.8, 1.0]")

    @model_validator(mode="before")
    @classmethod
    def _one_unit(cls, value: Any) -> Any:
        if isinstance(value, dict):
            given = [unit for unit in UNITS if unit in value]
            if len(given) != 1:
                raise bad("give exactly one of usd (dollars), tokens (input + output tokens) or requests "
                          f"(model calls), got {' and '.join(given) if given else 'none'}")
        return value


class OverrideTable(Table):
    """One id's own limit instead of its scope's (window/tz pick the limit when the scope has several)."""

    per: Scope = Field(description="the scope of the limit it overrides")
    id: ScopeId = Field(description="whose limit it is")
    usd: Dollars = Field(description="the limit in dollars")
    window: Window | None = optional("the window of the limit it overrides (when the scope has several)")
    tz: Zone | None = optional("the time zone of the limit it overrides (when the scope has several)")


_HAS_WEBHOOK = {"anyOf": [{"required": ["webhook_url"]}, {"required": ["webhook_url_env"]}]}


class AlertsTable(Table):
    """Where alerts go: a webhook that receives each alert as JSON (POST), and how often decisions alert."""

    model_config = ConfigDict(json_schema_extra={
        "not": {"required": ["webhook_url", "webhook_url_env"]},  # one of them, or neither
        "dependentSchemas": {key: _HAS_WEBHOOK for key in ("webhook_headers_env", "timeout_seconds", "attempts")},
    })

    webhook_url: WebhookUrl | None = optional("the http(s) URL each alert is POSTed to as JSON")
    webhook_url_env: EnvName | None = optional(
        "instead of webhook_url: the environment variable that holds it (keeps a secret URL out of the file)")
    webhook_headers_env: EnvName | None = optional(
        'the environment variable holding a JSON object of headers to send, such as {"Authorization": "Bearer ..."}')
    timeout_seconds: WebhookTimeout | None = optional("each webhook try gives up after this long", 5)
    attempts: Attempts | None = optional(
        "tries per alert (connection errors, timeouts and 5xx answers are retried; 4xx are not)", 3)
    decision_seconds: DecisionSeconds | None = optional(
        "refusal and degrade alerts: at most one per scope id per this many seconds in each process "
        "(0: no refusal or degrade alerts; threshold alerts always fire)", 60)


class PriceTable(Table):
    """A model's price in USD per million tokens."""

    table_example: ClassVar[str | None] = '{ input = "0.50", output = "1.50" } (USD per million tokens)'

    input: PricePerMillion = Field(description="USD per million tokens (input)")
    output: PricePerMillion = Field(description="USD per million tokens (output)")
    cache_read: PricePerMillion | None = optional("USD per million cached input tokens read (default: input)")
    cache_write: PricePerMillion | None = optional("USD per million input tokens written to the cache (default: input)")
    reasoning: PricePerMillion | None = optional("USD per million reasoning tokens (default: output)")
    web_search: PricePerThousand | None = optional("USD per 1,000 server-side web searches (default: not priced)")
    file_search: PricePerThousand | None = optional("USD per 1,000 file-store searches (default: not priced)")


class ToolFeesTable(Table):
    """Per-use fees of server tools genai-prices has no price for (USD each)."""

    table_example: ClassVar[str | None] = '{ code_interpreter = "0.03" } (USD per use)'

    code_interpreter: Dollars | None = optional("USD per code container a reply ran in (OpenAI code_interpreter)")
    image_generation: Dollars | None = optional(
        "USD per image the image_generation tool made (the dearest size and quality you ask for)")


class ConfigFile(Table):
    """A langchain-budgetguard deployment: one budget, its limits, and where its counters live."""

    model_config = ConfigDict(title="langchain-budgetguard config")

    budget: BudgetTable = Field(
        description="the budget: name (required), mode, degrade_at, lease_seconds, expired_hold")
    store: StoreTable = Field(default_factory=StoreTable, description="where the counters live")
    estimate: EstimateTable = Field(default_factory=EstimateTable, description="how calls are estimated")
    alerts: AlertsTable = Field(default_factory=AlertsTable, description="where alerts go (a webhook)")
    limits: list[LimitTable] = Field(
        min_length=1, description="at least one [[limits]] table (per, window, and usd, tokens or requests)")
    overrides: list[OverrideTable] = Field(default_factory=list, description="ids with their own limit")
    prices: dict[str, PriceTable] = Field(
        default_factory=dict, description="prices of models genai-prices does not know (model name -> price)")
    fallback_price: PriceTable | None = optional("a price for every model nothing else prices")
    tool_fees: ToolFeesTable = Field(
        default_factory=ToolFeesTable, description="per-use fees of server tools genai-prices does not price")
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
