"""Deployment config files (TOML): one file describes one budget as it is deployed.

    from langchain_budgetguard.config import guard_from_config, load_config
    guarded = guard_from_config(ChatOpenAI(model="gpt-4o"), "config/saas.toml",
                                models={"gpt-4o-mini": ChatOpenAI(model="gpt-4o-mini")})

Schema (every key but ``budget.name`` and ``[[limits]]`` is optional; see config/*.toml, and
config/budgetguard.schema.json for editors)::

    [budget]
    name = "support-bot"            # guards with the same name and store share counters
    mode = "enforce"                # or "shadow": count and alert exactly, never refuse or degrade
    degrade_at = 0.8                # degrade once 80% of a limit would be used
    lease_seconds = 600             # a crashed call's hold ends after this (at most a day)
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

    [alerts]                            # where alerts go (also: guard(..., on_alert=fn))
    webhook_url = "https://hooks.example.com/budget"  # each alert is POSTed as JSON; or instead:
    webhook_url_env = "BUDGETGUARD_ALERT_WEBHOOK"     # the environment variable that holds the URL
    webhook_headers_env = "BUDGETGUARD_ALERT_HEADERS" # env var with a JSON object of headers to send
    timeout_seconds = 5                 # each try (at most 60); alerts never slow a call down
    attempts = 3                        # tries (1-10): connection errors, timeouts, 5xx are retried
    decision_seconds = 60               # refusal/degrade alerts: at most one per id per this long
                                        # in each process; 0 turns them off (thresholds always fire)

    [[limits]]                          # one table per limit
    per = "tenant"                      # "global", "user", "project", "tenant", "model", or any scope name
    window = "month"                    # "minute", "hour", "day", "week", "month", "total"
    usd = 200                           # or tokens = 1_000_000 (input + output), or requests = 60
    tz = "UTC"                          # IANA zone the window boundaries follow
    alerts = [0.5, 0.8, 1.0]            # alert once per window when a counter reaches these fractions

    [[overrides]]                       # one id's own dollar limit (window/tz: when the scope has several)
    per = "tenant"
    id = "acme"
    usd = 1000

    [prices."ft:gpt-4o-mini:acme"]      # USD per million tokens; cache_read, cache_write, reasoning
    input = "0.30"                      # default to input, input, output; web_search and
    output = "1.20"                     # file_search: USD per 1,000 (default: not priced)

    [fallback_price]                    # a price for every model nothing else prices
    input = 5
    output = 15

    [tool_fees]                         # USD per use of server tools genai-prices does not price
    code_interpreter = "0.03"           # per code container (OpenAI); image_generation: per image

    [degrade]                           # model name -> cheaper models, tried in order
    "gpt-4o" = ["gpt-4o-mini"]

Amounts are exact: numbers are read as written (``0.1`` is ``Decimal("0.1")``), strings such as
``"0.10"`` too; limits have at most 9 decimal places (whole nano-dollars) and are at most $1e9.
A limit counts one unit: ``usd``, ``tokens`` or ``requests`` (whole numbers); two limits share a
counter only when per, window, tz and unit are all the same, so a dollar and a token limit per user
per day live side by side. Overrides are in dollars and apply to dollar limits only.

A file that does not fit raises ``ConfigError``, which names the file, the key and what was
expected (``config/saas.toml: limits[1].usd: expected a number of dollars, got "five"``); every
problem of the file is listed, unknown keys included.
"""

from .build import guard_from_config
from .deployment import CONFIG_ENV, DeploymentConfig
from .reader import load_config, parse_config
from .problems import ConfigError
from .schema import ConfigFile, json_schema, json_schema_text

__all__ = ["ConfigError", "DeploymentConfig", "load_config", "parse_config", "guard_from_config", "CONFIG_ENV",
           "ConfigFile", "json_schema", "json_schema_text"]
