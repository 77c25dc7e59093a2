"""Config files: the schema, errors that name the file/key/expectation, and guards built from them."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from langchain_budgetguard import BudgetExceededError, BudgetGuard, BudgetGuardError, Limit
from langchain_budgetguard.alerts import Webhook
from langchain_budgetguard.config import ConfigError, DeploymentConfig, guard_from_config, load_config, parse_config
from langchain_budgetguard.stores.memory import MemoryStore
from langchain_budgetguard.stores.redis import RedisStore

from .fakes import UsageChat

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "config").glob("*.toml"))

MINIMAL = """
[budget]
name = "x"

[[limits]]
per = "user"
window = "day"
usd = 2
"""


def write(tmp_path: Path, text: str, name: str = "deploy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "config/saas.toml")
    assert isinstance(err.value, BudgetGuardError)
    return str(err.value).splitlines()


def test_there_are_at_least_two_examples_and_every_one_loads():
    names = {p.name for p in EXAMPLES}
    assert {"single-app.toml", "saas.toml"} <= names
    for path in EXAMPLES:
        config = load_config(path)
        assert config.name and config.limits
        assert config.to_dict()["name"] == config.name


def test_the_saas_example_describes_a_multi_tenant_deployment(monkeypatch):
    config = load_config(ROOT / "config" / "saas.toml")
    assert [(x.per, x.window, x.unit, x.value) for x in config.limits] == [
        ("global", "month", "usd", 20000), ("tenant", "month", "usd", 200), ("user", "day", "usd", 5),
        ("user", "minute", "requests", 60), ("model", "day", "tokens", 50_000_000)]
    assert config.limits[1].alerts == (Decimal("0.5"), Decimal("0.8"), Decimal("1.0"))
    assert config.mode == "enforce" and config.decision_alert_seconds == 60
    assert {(o.per, o.id): o.usd for o in config.overrides} == {
        ("tenant", "acme"): Decimal(1000), ("tenant", "trial-7f3a"): Decimal("2.50"), ("user", "ci-bot"): Decimal(0)}
    assert config.store_url_env == "BUDGETGUARD_REDIS_URL" and config.on_store_error == "fail_open"
    assert config.ladder("gpt-4o") == ("gpt-4o-mini",) and config.ladder("GPT-4O") == ("gpt-4o-mini",)
    monkeypatch.delenv("BUDGETGUARD_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match=r"saas.toml: store.url_env: the environment variable BUDGETGUARD_REDIS_URL"):
        config.make_store()
    monkeypatch.setenv("BUDGETGUARD_REDIS_URL", "redis://127.0.0.1:1/0")
    store = config.make_store()  # built, not connected
    assert isinstance(store, RedisStore) and store.prefix == "bg:"
    monkeypatch.delenv("BUDGETGUARD_ALERT_WEBHOOK", raising=False)
    with pytest.raises(ConfigError, match=r"saas.toml: alerts.webhook_url_env: the environment variable "
                                          "BUDGETGUARD_ALERT_WEBHOOK is not set"):
        config.policy(store=MemoryStore())
    monkeypatch.setenv("BUDGETGUARD_ALERT_WEBHOOK", "https://hooks.example.com/T0/B0/secret")
    policy = config.policy(store=MemoryStore())
    assert policy.alert_webhook == Webhook("https://hooks.example.com/T0/B0/secret", timeout_seconds=5, attempts=3)
    assert policy.mode == "enforce" and policy.decision_alert_seconds == 60
    assert policy.on_store_error == "fail_open" and policy.fail_open_allowance == 5_000_000_000
    assert policy.lease_seconds == 300 and policy.degrade_at == Decimal("0.9")
    assert policy.live_overrides.refresh_seconds == 5
    assert policy.pricer.rate_card(
        type("R", (), {"name": "llama-3.1-70b-internal", "provider": None})()).source == "override"


def test_a_bad_amount_names_the_file_the_key_and_the_expectation():
    text = MINIMAL + '\n[[limits]]\nper = "tenant"\nwindow = "month"\nusd = "five"\n'
    assert problems(text) == ['config/saas.toml: limits[1].usd: expected a number of dollars, got "five"']


def test_every_problem_is_listed_with_its_key_path():
    text = """
[budget]
name = "x"
estimator = "typical"

[store]
on_eror = "fail_open"
url = "http://example.com"

[[limits]]
per = "User"
window = "monthly"
usd = -1
tz = "Mars/Olympus"

[[limits]]
usd = true

[[overrides]]
per = "team"
id = "a"
usd = 1

[prices."gpt-4.1-ft"]
input = "cheap"
outptu = 1

[degrade]
"gpt-4o" = "gpt-4o"
"""
    lines = problems(text)
    expected = [
        "budget.estimator: unknown key", "did you mean [estimate] mode?",
        "store.on_eror: unknown key", "did you mean 'on_error'?",
        "store.url: expected \"memory\" or a Redis URL",
        'limits[0].per: expected "global", "user", "project", "tenant", "model" or another lowercase scope name',
        'limits[0].window: expected one of "minute", "hour", "day", "week", "month", "total", got "monthly"',
        "limits[0].usd: expected a number of dollars (0 or more), got -1",
        'limits[0].tz: expected an IANA time zone such as "Europe/Paris" or "UTC", got "Mars/Olympus"',
        "limits[1].usd: expected a number of dollars, got true",
        "overrides[0].per: no limit per team",
        'prices."gpt-4.1-ft".input: expected a number of dollars per million tokens, got "cheap"',
        "prices.\"gpt-4.1-ft\".outptu: unknown key", "did you mean 'output'?",
        'prices."gpt-4.1-ft".output: required',
        "degrade.gpt-4o: 'gpt-4o' cannot degrade to itself",
    ]
    text_out = "\n".join(lines)
    for piece in expected:
        assert piece in text_out, piece
    assert all(line.startswith("config/saas.toml: ") for line in lines)


@pytest.mark.parametrize(("text", "message"), [
    ("[budget]\n", "budget.name: required"),
    ('[budget]\nname = "x"\n', "limits: required"),
    (MINIMAL + "[[limits]]\nper = 'user'\nwindow = 'day'\nusd = 3\n",
     "limits[1]: limits[0] is a usd limit per user per day"),
    (MINIMAL + "[[overrides]]\nper = 'user'\nid = '*'\nusd = 1\n", "overrides[0].id: \"*\" would be every user"),
    (MINIMAL + "[[overrides]]\nper = 'user'\nusd = 1\n", "overrides[0].id: required"),
    (MINIMAL + "[[limits]]\nusd = 3\n[[overrides]]\nper = 'global'\nid = 'a'\nusd = 1\n",
     "overrides[0].per: a global limit has no ids"),
    (MINIMAL + "[[limits]]\nper='user'\nwindow='month'\nusd=9\n[[overrides]]\nper='user'\nid='a'\nusd=1\n",
     "overrides[0].window: scope 'user' has several limits"),
    (MINIMAL + "[store]\nurl = 'memory'\nurl_env = 'X'\n", "store.url_env: give store.url or store.url_env, not both"),
    (MINIMAL + "[store]\nurl_env = 'not a name'\n", "store.url_env: expected the name of an environment variable"),
    (MINIMAL + "[store]\nprefix = '{x}'\n", "store.prefix: expected a string without '{' or '}'"),
    (MINIMAL + "[budget.x]\n", "budget.x: unknown key"),
    (MINIMAL + "[budget]\n", "invalid TOML"),
    (MINIMAL + "per = 'tenant'\n", "invalid TOML"),
    ("limits = 3\n[budget]\nname = 'x'\n", "limits: expected tables ([[limits]] ...), got 3"),
    (MINIMAL + "[estimate]\nmode = 'exact'\n", 'estimate.mode: expected one of "strict", "typical", got "exact"'),
    (MINIMAL + "[estimate]\ndefault_max_output_tokens = 1.5\n",
     "estimate.default_max_output_tokens: expected a positive whole number of tokens, got 1.5"),
    (MINIMAL.replace('name = "x"', 'name = "x"\ndegrade_at = 1.5'), "budget.degrade_at: expected a fraction in (0, 1]"),
    (MINIMAL.replace('name = "x"', 'name = "x"\nlease_seconds = 0'),
     "budget.lease_seconds: expected a positive number of seconds, got 0"),
    (MINIMAL + "[store]\noverride_refresh_seconds = -1\n", "store.override_refresh_seconds: expected a number"),
    (MINIMAL + "[store]\nlive_overrides = 'yes'\n", 'store.live_overrides: expected true or false, got "yes"'),
    (MINIMAL + "[degrade]\nm = []\n", "degrade.m: expected a list of cheaper model names"),
    (MINIMAL + "[fallback_price]\ninput = 1\n", "fallback_price.output: required"),
    (MINIMAL + "wat = 1\n", "wat: unknown key"),
])
def test_problems(text, message):
    assert any(message in line for line in problems(text)), problems(text)


def test_unreadable_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read the config file"):
        load_config(missing)
    bad = write(tmp_path, "")
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_amounts_accept_numbers_and_decimal_strings():
    config = parse_config(MINIMAL.replace("usd = 2", 'usd = "0.10"') + "[[limits]]\nusd = 7.5\n")
    assert [x.usd for x in config.limits] == [Decimal("0.10"), Decimal("7.5")]
    assert config.limits[1].per == "global" and config.limits[1].window == "total"


def test_guard_from_config_builds_the_ladder_from_models_or_a_factory(tmp_path):
    path = write(tmp_path, MINIMAL + '[degrade]\n"gpt-4o" = ["gpt-4o-mini", "gpt-4.1-nano"]\n')
    big = UsageChat(model_name="gpt-4o")
    mini, nano = UsageChat(model_name="gpt-4o-mini"), UsageChat(model_name="gpt-4.1-nano")
    guard = guard_from_config(big, path, models={"gpt-4o-mini": mini, "gpt-4.1-nano": nano})
    assert isinstance(guard, BudgetGuard) and guard.degrade_to == (mini, nano)
    built: list[str] = []
    guard = guard_from_config(big, path, models=lambda name: built.append(name) or UsageChat(model_name=name))
    assert built == ["gpt-4o-mini", "gpt-4.1-nano"]
    assert guard_from_config(big, path, degrade_to=[mini]).degrade_to == (mini,)  # explicit wins
    with pytest.raises(ConfigError, match=r'deploy.toml: degrade.gpt-4o: gpt-4o degrades to gpt-4o-mini, '
                                          r'gpt-4.1-nano: pass the chat models'):
        guard_from_config(big, path)
    with pytest.raises(ConfigError, match="'gpt-4.1-nano', which is not among the models given"):
        guard_from_config(big, path, models={"gpt-4o-mini": mini})
    assert guard_from_config(mini, path).degrade_to == ()  # no ladder for this model
    policy = guard_from_config(None, path)
    assert policy.llm is None and policy.policy.name == "x"


def test_a_guard_from_config_enforces_limits_and_overrides(tmp_path):
    path = write(tmp_path, MINIMAL + "[[overrides]]\nper = 'user'\nid = 'ci-bot'\nusd = 0\n"
                                     "[estimate]\nmode = 'typical'\ndefault_max_output_tokens = 100\n")
    guard = guard_from_config(UsageChat(model_name="gpt-4o-mini"), path)
    assert guard.policy.estimator.mode == "typical" and guard.policy.default_max_output_tokens == 100
    guard.invoke("hi", config={"configurable": {"user_id": "alice"}})
    with pytest.raises(BudgetExceededError):
        guard.invoke("hi", config={"configurable": {"user_id": "ci-bot"}})
    # Several models on one budget in one process: reuse the first guard's policy.
    other = guard_from_config(UsageChat(model_name="gpt-4o"), path, policy=guard)
    assert other.policy is guard.policy


def test_config_objects_can_be_built_in_code():
    config = DeploymentConfig(name="code", limits=(Limit(usd=1),))
    assert config.resolve_store_url() == "memory"
    assert isinstance(config.make_store(), MemoryStore)
    guard = guard_from_config(UsageChat(), config)
    assert guard.policy.name == "code"
    assert parse_config(MINIMAL + "[store]\nlive_overrides = false\n").policy().live_overrides is None


def test_two_limits_in_utc_spelled_differently_are_one_counter_refused_at_check():
    text = """
[[limits]]
per = "user"
window = "day"
usd = 5

[[limits]]
per = "user"
window = "day"
tz = "utc"
usd = 8
"""
    with pytest.raises(ConfigError, match=r"limits\[1\].*share one counter"):
        parse_config(text, "tz.toml")


@pytest.mark.parametrize(("url", "says"), [
    ("redis://127.0.0.1:6379/l2", "database in a Redis URL is a number"),
    ("redis://127.0.0.1:6379/0?socket_timout=5", "unknown option(s) socket_timout"),
])
def test_a_store_url_typo_fails_the_config_check(url, says):
    with pytest.raises(ConfigError) as bad:
        parse_config(f'[store]\nurl = "{url}"\n\n[[limits]]\nper = "global"\nusd = 5\n', "store.toml")
    assert says in str(bad.value)
