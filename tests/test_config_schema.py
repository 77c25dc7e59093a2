"""The shipped JSON Schema: generated from the models (it cannot drift), every example validates
against it, and it agrees with the loader on what a value may be. Exact money, bounded durations."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest

from langchain_budgetguard.config import ConfigError, ConfigFile, json_schema, json_schema_text, parse_config
from langchain_budgetguard.config.schema import Table
from langchain_budgetguard.policy import BudgetPolicy
from langchain_budgetguard.stores.memory import MemoryStore

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "budgetguard.schema.json"
EXAMPLES = sorted((ROOT / "config").glob("*.toml"))

MINIMAL = '[budget]\nname = "x"\n\n[[limits]]\nper = "user"\nwindow = "day"\nusd = 2\n'


def schema_errors(text: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(json_schema())
    return [e.message for e in validator.iter_errors(tomllib.loads(text))]


def loader_problems(text: str) -> list[str]:
    try:
        parse_config(text, "f.toml")
    except ConfigError as exc:
        return [f"{key}: {what}" for key, what in exc.problems]
    return []


def test_the_shipped_schema_is_what_the_models_generate():
    assert SHIPPED.read_text("utf-8") == json_schema_text(), (
        "config/budgetguard.schema.json is stale: python -m langchain_budgetguard.config --schema "
        "> config/budgetguard.schema.json")
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_the_module_prints_the_schema():
    out = subprocess.run([sys.executable, "-m", "langchain_budgetguard.config", "--schema"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout == SHIPPED.read_text("utf-8")
    usage = subprocess.run([sys.executable, "-m", "langchain_budgetguard.config"], capture_output=True, text=True)
    assert usage.returncode == 2 and "--schema" in usage.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_against_the_schema_and_points_editors_at_it(path):
    text = path.read_text("utf-8")
    assert text.splitlines()[0] == "#:schema ./budgetguard.schema.json"  # taplo / Even Better TOML
    assert schema_errors(text) == []
    assert loader_problems(text) == []


TAPLO = shutil.which("taplo") or shutil.which("taplo", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TAPLO is None, reason="no taplo (pip install taplo: the test extra has it)")
def test_an_editor_reads_the_schema_from_the_examples(tmp_path):
    """taplo (the engine of Even Better TOML) follows each example's #:schema line and finds it
    valid, and points at the key of a bad value in a file that follows the same line."""
    check = subprocess.run([TAPLO, "check", *map(str, EXAMPLES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    shutil.copy(SHIPPED, tmp_path / SHIPPED.name)  # a user's file beside the schema
    bad = tmp_path / "deploy.toml"
    bad.write_text("#:schema ./budgetguard.schema.json\n" + MINIMAL.replace("usd = 2", 'usd = "five"'), "utf-8")
    check = subprocess.run([TAPLO, "check", str(bad)], capture_output=True, text=True)
    assert check.returncode != 0 and "deploy.toml:8:7" in check.stderr and '"five"' in check.stderr, check.stderr


def test_every_key_is_documented_for_editors():
    tables = Table.__subclasses__()
    assert ConfigFile in tables and len(tables) >= 7
    for table in tables:
        assert table.__doc__, table
        for name, field in table.model_fields.items():
            assert field.description, f"{table.__name__}.{name} has no description"


# A value the schema and the loader must judge alike: (snippet added to MINIMAL or replacing it, valid?).
AGREE = [
    (MINIMAL.replace("usd = 2", 'usd = "0.10"'), True),
    (MINIMAL.replace("usd = 2", 'usd = "$5"'), True),
    (MINIMAL.replace("usd = 2", "usd = 0"), True),
    (MINIMAL.replace("usd = 2", "usd = 1000000000"), True),
    (MINIMAL.replace("usd = 2", "usd = 1000000001"), False),
    (MINIMAL.replace("usd = 2", 'usd = "five"'), False),
    (MINIMAL.replace("usd = 2", "usd = -1"), False),
    (MINIMAL.replace("usd = 2", 'usd = "-1"'), False),
    (MINIMAL.replace("usd = 2", "usd = true"), False),
    (MINIMAL.replace("usd = 2", 'usd = "0.0000000001"'), False),
    (MINIMAL.replace("usd = 2", 'usd = "0.000000001"'), True),
    (MINIMAL.replace("usd = 2", "usd = 2\nwat = 1"), False),
    (MINIMAL.replace('window = "day"', 'window = "monthly"'), False),
    (MINIMAL.replace('per = "user"', 'per = "User"'), False),
    (MINIMAL.replace('name = "x"', 'name = ""'), False),
    (MINIMAL.replace('name = "x"', 'name = "x"\ndegrade_at = 0.8'), True),
    (MINIMAL.replace('name = "x"', 'name = "x"\ndegrade_at = 0'), False),
    (MINIMAL.replace('name = "x"', 'name = "x"\ndegrade_at = 1.5'), False),
    (MINIMAL.replace('name = "x"', 'name = "x"\nlease_seconds = 0.5'), True),
    (MINIMAL.replace('name = "x"', 'name = "x"\nlease_seconds = 0'), False),
    (MINIMAL.replace('name = "x"', 'name = "x"\nlease_seconds = 86401'), False),
    (MINIMAL.replace('name = "x"', 'name = "x"\nexpired_hold = "keep"'), False),
    (MINIMAL + "[store]\nretention_seconds = 86400\n", True),
    (MINIMAL + "[store]\nretention_seconds = 86400.0\n", True),  # JSON Schema: 86400.0 is an integer
    (MINIMAL + "[store]\nretention_seconds = 86400.5\n", False),
    (MINIMAL + "[store]\noverride_refresh_seconds = 0\n", True),
    (MINIMAL + "[store]\noverride_refresh_seconds = -1\n", False),
    (MINIMAL + "[store]\nlive_overrides = 'yes'\n", False),
    (MINIMAL + "[store]\nprefix = '{x}'\n", False),
    (MINIMAL + "[store]\nurl_env = 'not a name'\n", False),
    (MINIMAL + "[store]\non_error = 'fail_open'\nfail_open_allowance = '2.50'\n", True),
    (MINIMAL + "[estimate]\ndefault_max_output_tokens = 1.5\n", False),
    (MINIMAL + "[estimate]\ndefault_max_output_tokens = 100000000\n", False),
    (MINIMAL + "[estimate]\nmode = 'typical'\n", True),
    (MINIMAL + '[prices."m"]\ninput = "0.000000000001"\noutput = 1\n', True),  # prices: any precision
    (MINIMAL + '[prices."m"]\ninput = 1\n', False),
    (MINIMAL + '[prices."m"]\ninput = 1\noutput = 1\noutptu = 1\n', False),
    (MINIMAL + "[fallback_price]\ninput = 5\noutput = 15\n", True),
    (MINIMAL + '[degrade]\n"gpt-4o" = "gpt-4o-mini"\n', True),
    (MINIMAL + '[degrade]\n"gpt-4o" = []\n', False),
    (MINIMAL + '[degrade]\n"gpt-4o" = ["a", "a"]\n', False),
    (MINIMAL + "[[overrides]]\nper = 'user'\nid = 'alice'\nusd = 1\n", True),
    (MINIMAL + "[[overrides]]\nper = 'user'\nusd = 1\n", False),
    ('[budget]\nname = "x"\n', False),
    ('limits = []\n[budget]\nname = "x"\n', False),
    ("[[limits]]\nusd = 1\n", False),
    (MINIMAL + "wat = 1\n", False),
]


@pytest.mark.parametrize(("text", "valid"), AGREE)
def test_the_schema_and_the_loader_agree(text, valid):
    assert (schema_errors(text) == []) is valid, schema_errors(text)
    assert (loader_problems(text) == []) is valid, loader_problems(text)


# -- exact money ---------------------------------------------------------------------------------------


def test_amounts_are_read_exactly_as_written_never_through_a_float():
    text = MINIMAL.replace("usd = 2", "usd = 0.1") + "[[limits]]\nper = 'tenant'\nusd = 1234567.123456789\n"
    text += '[store]\nfail_open_allowance = 0.3\n[prices."m"]\ninput = 0.15\noutput = 0.6\ncache_read = 0.075\n'
    config = parse_config(text)
    assert [x.usd for x in config.limits] == [Decimal("0.1"), Decimal("1234567.123456789")]
    assert [x.nano for x in config.limits] == [100_000_000, 1_234_567_123_456_789]
    assert config.fail_open_allowance == Decimal("0.3")
    price = config.prices["m"]
    assert (price.input, price.output, price.cache_read) == (Decimal("0.15"), Decimal("0.6"), Decimal("0.075"))
    policy = config.policy(store=MemoryStore())
    assert isinstance(policy, BudgetPolicy) and policy.fail_open_allowance == 300_000_000


@pytest.mark.parametrize(("usd", "message"), [
    # a float that is not what was written would be rounded: refused, not silently changed
    ("0.30000000000000004", "with at most 9 decimal places (the stores count whole nano-dollars), "
                            "got 0.30000000000000004"),
    # below a nano-dollar: would round the limit down to $0 without a word
    ('"0.0000000001"', 'with at most 9 decimal places'),
    # beyond the 64-bit counters: refused before it reaches a store
    ("1e12", "no larger than 1000000000, got 1e12"),
    ("inf", "expected a number of dollars, got inf"),
    ("nan", "expected a number of dollars, got nan"),
    ('"1e3"', 'expected a number of dollars, got "1e3"'),
    ('"1_000"', 'expected a number of dollars, got "1_000"'),
    ('"-0.5"', 'expected a number of dollars (0 or more), got "-0.5"'),
])
def test_amounts_that_cannot_be_counted_exactly_are_refused(usd, message):
    lines = loader_problems(MINIMAL.replace("usd = 2", f"usd = {usd}"))
    assert len(lines) == 1 and lines[0].startswith("limits[0].usd: expected a number of dollars"), lines
    assert message in lines[0]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lease_seconds", "inf", "expected a positive number of seconds, got inf"),
    ("lease_seconds", "nan", "expected a positive number of seconds, got nan"),
    ("lease_seconds", "-5", "expected a positive number of seconds, got -5"),
    ("lease_seconds", "1e9", "expected at most 86400 seconds (a day), got 1e9"),
    ("lease_seconds", '"600"', 'expected a positive number of seconds, got "600"'),
])
def test_durations_are_finite_positive_and_bounded(key, value, message):
    text = MINIMAL.replace('name = "x"', f'name = "x"\n{key} = {value}')
    assert loader_problems(text) == [f"budget.{key}: {message}"]


def test_bounded_store_durations():
    text = MINIMAL + "[store]\nretention_seconds = 999999999999\noverride_refresh_seconds = 86400\n"
    assert loader_problems(text) == [
        "store.retention_seconds: expected at most 315360000 seconds (ten years), got 999999999999",
        "store.override_refresh_seconds: expected at most 3600 seconds (an hour), got 86400",
    ]
    config = parse_config(MINIMAL.replace('name = "x"', 'name = "x"\nlease_seconds = 1.5')
                          + "[store]\noverride_refresh_seconds = 0\n")
    assert config.lease_seconds == 1.5 and isinstance(config.lease_seconds, float)
    assert config.override_refresh_seconds == 0.0


# -- messages a person can act on --------------------------------------------------------------------


def test_a_key_in_the_wrong_table_says_where_it_belongs():
    text = MINIMAL + "[store]\nlease_seconds = 5\n"
    assert loader_problems(text) == [
        "store.lease_seconds: unknown key (expected one of: url, url_env, prefix, on_error, fail_open_allowance, "
        "retention_seconds, live_overrides, override_refresh_seconds); did you mean [budget] lease_seconds?"]


def test_a_missing_budget_table_names_the_key_it_needs():
    assert loader_problems("[[limits]]\nusd = 1\n") == [
        "budget.name: required: the budget's name (guards with the same name and store share counters)"]


def test_tables_where_values_should_be_and_values_where_tables_should_be():
    text = "budget = 3\nlimits = { usd = 1 }\noverrides = [1]\nprices = []\ndegrade = 3\n[fallback_price]\n"
    assert loader_problems(text) == [
        "budget: expected a table ([budget]), got 3",
        "limits: expected tables ([[limits]] ...), got a table",
        "overrides[0]: expected a table ([[overrides]]), got 1",
        "prices: expected a table ([prices]), got []",
        "degrade: expected a table ([degrade]), got 3",
        "fallback_price.input: required: USD per million tokens (input)",
        "fallback_price.output: required: USD per million tokens (output)",
    ]
    assert loader_problems(MINIMAL + "[prices]\nm = 3\n") == [
        'prices.m: expected a table such as { input = "0.50", output = "1.50" } (USD per million tokens), got 3']
    assert loader_problems('limits = []\n[budget]\nname = "x"\n') == [
        "limits: expected at least one [[limits]] table, got none"]


def test_problems_come_in_the_order_of_the_file():
    text = ('[estimate]\nmode = "x"\n[[limits]]\nusd = "y"\n[budget]\nname = "n"\nlease_seconds = 0\n'
            "[[overrides]]\nper = 'user'\nid = 'a'\nusd = 1\n")
    keys = [line.split(":", 1)[0] for line in loader_problems(text)]
    assert keys == ["estimate.mode", "limits[0].usd", "budget.lease_seconds", "overrides[0].per"]
