"""Config keys of issue 14: tokens and requests limits, alert thresholds, per-model limits,
[budget] mode, the [alerts] table, and what the deployment passes to BudgetPolicy."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from langchain_budgetguard.alerts import Webhook
from langchain_budgetguard.config import ConfigError, parse_config
from langchain_budgetguard.policy import BudgetPolicy
from langchain_budgetguard.stores.memory import MemoryStore

from .test_config_schema import MINIMAL, loader_problems, schema_errors

LIMIT = "[[limits]]\nper = 'user'\nwindow = 'day'\nusd = 2\n"


def with_budget(line: str) -> str:
    return MINIMAL.replace('name = "x"', f'name = "x"\n{line}')


def lines(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "config/saas.toml")
    return str(err.value).splitlines()


# -- limits of tokens and requests -----------------------------------------------------------------


def test_tokens_requests_and_model_limits_load_with_their_unit():
    text = MINIMAL + ("[[limits]]\nper = 'user'\nwindow = 'minute'\nrequests = 60\n"
                      "[[limits]]\nper = 'model'\nwindow = 'hour'\ntokens = 1_000_000\nalerts = [1.0, 0.5]\n")
    config = parse_config(text)
    assert [(x.per, x.window, x.unit, x.amount) for x in config.limits] == [
        ("user", "day", "usd", 2_000_000_000), ("user", "minute", "requests", 60),
        ("model", "hour", "tokens", 1_000_000)]
    assert config.limits[2].alerts == (Decimal("0.5"), Decimal("1.0"))
    assert config.to_dict()["limits"] == [
        {"per": "user", "window": "day", "usd": "2", "tz": "UTC", "alerts": []},
        {"per": "user", "window": "minute", "requests": "60", "tz": "UTC", "alerts": []},
        {"per": "model", "window": "hour", "tokens": "1000000", "tz": "UTC", "alerts": ["0.5", "1.0"]},
    ]
    policy = config.policy(store=MemoryStore())
    assert [x.unit for x in policy.limits] == ["usd", "requests", "tokens"]


def test_a_usd_and_a_tokens_limit_of_one_scope_and_window_coexist_but_two_of_a_unit_do_not():
    text = MINIMAL + "[[limits]]\nper = 'user'\nwindow = 'day'\ntokens = 5000\n"
    assert [x.unit for x in parse_config(text).limits] == ["usd", "tokens"]
    assert lines(text + "[[limits]]\nper = 'user'\nwindow = 'day'\ntokens = 9000\n") == [
        "config/saas.toml: limits[2]: limits[1] is a tokens limit per user per day (UTC) too; "
        "they would share one counter: keep the stricter one"]
    # another time zone is another counter
    assert len(parse_config(text + "[[limits]]\nper = 'user'\nwindow = 'day'\ntz = 'Asia/Tokyo'\ntokens = 1\n")
               .limits) == 3


@pytest.mark.parametrize(("table", "message"), [
    ("per = 'user'\nusd = 1\ntokens = 5\n",
     "limits[1]: give exactly one of usd (dollars), tokens (input + output tokens) or requests (model calls), "
     "got usd and tokens"),
    ("per = 'user'\ntokens = 5\nrequests = 5\nusd = 1\n",
     "limits[1]: give exactly one of usd (dollars), tokens (input + output tokens) or requests (model calls), "
     "got usd and tokens and requests"),
    ("per = 'user'\n",
     "limits[1]: give exactly one of usd (dollars), tokens (input + output tokens) or requests (model calls), "
     "got none"),
    ("tokens = 1.5\n", "limits[1].tokens: expected a whole number of tokens (0 or more), got 1.5"),
    ("tokens = -1\n", "limits[1].tokens: expected a whole number of tokens (0 or more), got -1"),
    ("tokens = '5'\n", 'limits[1].tokens: expected a whole number of tokens (0 or more), got "5"'),
    ("requests = true\n", "limits[1].requests: expected a whole number of requests (0 or more), got true"),
    ("requests = 9223372036854775807\n",
     "limits[1].requests: expected at most 4611686018427387904 requests (2**62), got 9223372036854775807"),
    ("usd = 1\nalerts = [0.5, 1.5]\n",
     "limits[1].alerts: expected a list of fractions of the limit in (0, 1], such as [0.5, 0.8, 1.0], got [0.5, 1.5]"),
    ("usd = 1\nalerts = [0]\n",
     "limits[1].alerts: expected a list of fractions of the limit in (0, 1], such as [0.5, 0.8, 1.0], got [0]"),
    ("usd = 1\nalerts = 0.8\n",
     "limits[1].alerts: expected a list of fractions of the limit in (0, 1], such as [0.5, 0.8, 1.0], got 0.8"),
    ("usd = 1\nalerts = [0.8, 0.8]\n", "limits[1].alerts: a fraction is listed twice in [0.8, 0.8]"),
    ("usd = 1\nalerts = [" + ", ".join(["0.5"] * 17) + "]\n",
     "limits[1].alerts: expected at most 16 fractions of the limit, got 17"),
    ("window = 'second'\nrequests = 1\n", 'limits[1].window: expected one of "minute", "hour", "day", "week", '
                                          '"month", "total", got "second"'),
])
def test_bad_limit_tables_name_file_key_and_expectation(table, message):
    assert lines(MINIMAL + "[[limits]]\n" + table) == [f"config/saas.toml: {message}"]


def test_usd_five_still_names_the_file_the_key_and_the_expectation():
    assert lines(MINIMAL + "[[limits]]\nper = 'tenant'\nusd = 'five'\n") == [
        'config/saas.toml: limits[1].usd: expected a number of dollars, got "five"']


# -- overrides stay in dollars ------------------------------------------------------------------------


def test_an_override_of_a_scope_with_only_count_limits_is_an_error():
    text = (MINIMAL + "[[limits]]\nper = 'tenant'\nwindow = 'minute'\nrequests = 100\n"
            "[[overrides]]\nper = 'tenant'\nid = 'acme'\nusd = 5\n")
    assert lines(text) == [
        "config/saas.toml: overrides[0].per: overrides are in dollars, but the limits per tenant count requests; "
        "change that limit in [[limits]] or add a usd limit per tenant"]


def test_an_override_matches_the_dollar_limit_beside_count_limits():
    text = (MINIMAL + "[[limits]]\nper = 'user'\nwindow = 'minute'\nrequests = 10\n"
            "[[limits]]\nper = 'user'\nwindow = 'day'\ntokens = 1000\n"
            "[[overrides]]\nper = 'user'\nid = 'alice'\nusd = 7\n")
    config = parse_config(text)
    assert [(o.per, o.id, o.usd, o.window) for o in config.overrides] == [("user", "alice", Decimal(7), "day")]


# -- [budget] mode --------------------------------------------------------------------------------------


def test_mode_shadow_reaches_the_policy():
    config = parse_config(with_budget('mode = "shadow"'))
    assert config.mode == "shadow" and config.to_dict()["mode"] == "shadow"
    assert config.policy(store=MemoryStore()).mode == "shadow"
    assert parse_config(MINIMAL).policy(store=MemoryStore()).mode == "enforce"


def test_a_bad_mode_says_what_it_may_be():
    assert lines(with_budget('mode = "dry-run"')) == [
        'config/saas.toml: budget.mode: expected one of "enforce", "shadow", got "dry-run"']


# -- [alerts] -----------------------------------------------------------------------------------------


def test_the_alerts_table_builds_the_webhook_the_policy_gets():
    text = MINIMAL + ('[alerts]\nwebhook_url = "https://user:pw@hooks.example.com/T0/secret"\n'
                      "timeout_seconds = 2.5\nattempts = 5\ndecision_seconds = 30\n")
    config = parse_config(text)
    assert config.webhook() == Webhook("https://user:pw@hooks.example.com/T0/secret", timeout_seconds=2.5, attempts=5)
    options = config.policy_options()
    assert options["alert_webhook"] == config.webhook() and options["decision_alert_seconds"] == 30
    policy = BudgetPolicy(store=MemoryStore(), **options)
    assert policy.decision_alert_seconds == 30 and policy.alert_webhook.attempts == 5
    described = config.to_dict()["alerts"]
    assert described == {"webhook": "https://hooks.example.com/...", "webhook_headers_env": None,
                         "timeout_seconds": 2.5, "attempts": 5, "decision_seconds": 30}
    assert "secret" not in json.dumps(config.to_dict()) and "pw" not in json.dumps(config.to_dict())


def test_no_alerts_table_means_no_webhook_and_the_default_rate():
    config = parse_config(MINIMAL)
    assert config.webhook() is None and "alert_webhook" not in config.policy_options()
    assert config.policy_options()["decision_alert_seconds"] == 60


def test_decision_seconds_zero_turns_refusal_and_degrade_alerts_off():
    config = parse_config(MINIMAL + "[alerts]\ndecision_seconds = 0\n")
    assert config.decision_alert_seconds is None
    assert config.policy(store=MemoryStore()).decision_alert_seconds is None


def test_the_webhook_url_from_the_environment_with_headers():
    text = MINIMAL + '[alerts]\nwebhook_url_env = "HOOK"\nwebhook_headers_env = "HOOK_HEADERS"\n'
    config = parse_config(text, "config/saas.toml")
    env = {"HOOK": "https://hooks.example.com/x", "HOOK_HEADERS": '{"Authorization": "Bearer t"}'}
    hook = config.webhook(env)
    assert hook is not None and hook.url == env["HOOK"] and dict(hook.headers) == {"Authorization": "Bearer t"}
    assert config.to_dict()["alerts"]["webhook"] == "the URL in $HOOK"
    with pytest.raises(ConfigError) as err:
        config.webhook({})
    assert str(err.value) == ("config/saas.toml: alerts.webhook_url_env: the environment variable HOOK is not set "
                              "(it should hold the webhook's URL, e.g. https://hooks.example.com/budget)")
    with pytest.raises(ConfigError, match=r"alerts.webhook_url_env: the environment variable HOOK does not hold an "
                                          r"http:// or https:// URL"):
        config.webhook({"HOOK": "ftp://x"})
    with pytest.raises(ConfigError, match=r"alerts.webhook_headers_env: the environment variable HOOK_HEADERS "
                                          r"should hold a JSON object"):
        config.webhook({"HOOK": "https://h", "HOOK_HEADERS": "Bearer t"})


@pytest.mark.parametrize(("table", "message"), [
    ('webhook_url = "ftp://hooks.example.com"',
     'alerts.webhook_url: expected an http:// or https:// URL such as "https://hooks.example.com/budget", '
     'got "ftp://hooks.example.com"'),
    ("webhook_url = 5", 'alerts.webhook_url: expected an http:// or https:// URL such as '
                        '"https://hooks.example.com/budget", got 5'),
    ('webhook_url = "https://a.example"\nwebhook_url_env = "HOOK"',
     "alerts.webhook_url_env: give alerts.webhook_url or alerts.webhook_url_env, not both"),
    ('webhook_url_env = "not a name"', "alerts.webhook_url_env: expected the name of an environment variable"),
    ('webhook_url_env = "H"\ntimeout_seconds = 0',
     "alerts.timeout_seconds: expected a positive number of seconds, got 0"),
    ('webhook_url_env = "H"\ntimeout_seconds = 61',
     "alerts.timeout_seconds: expected at most 60 seconds (a minute), got 61"),
    ('webhook_url_env = "H"\nattempts = 0', "alerts.attempts: expected a positive whole number of attempts, got 0"),
    ('webhook_url_env = "H"\nattempts = 11', "alerts.attempts: expected at most 10 attempts (ten), got 11"),
    ("attempts = 2", "alerts.attempts: applies to the webhook, and there is none: set alerts.webhook_url or "
                     "alerts.webhook_url_env (or remove this key)"),
    ('webhook_headers_env = "H"', "alerts.webhook_headers_env: applies to the webhook, and there is none"),
    ("decision_seconds = false", "alerts.decision_seconds: expected a number of seconds (0 or more), got false"),
    ("decision_seconds = -1", "alerts.decision_seconds: expected a number of seconds (0 or more), got -1"),
    ("webhook = 'https://a.example'", "alerts.webhook: unknown key (expected one of: webhook_url, webhook_url_env, "
                                      "webhook_headers_env, timeout_seconds, attempts, decision_seconds); "
                                      "did you mean 'webhook_url'?"),
])
def test_bad_alerts_keys_name_file_key_and_expectation(table, message):
    found = lines(MINIMAL + f"[alerts]\n{table}\n")
    assert len(found) == 1 and found[0].startswith(f"config/saas.toml: {message}"), found


# -- the schema agrees with the loader on the new keys ---------------------------------------------------


@pytest.mark.parametrize(("text", "valid"), [
    (MINIMAL.replace("usd = 2", "tokens = 5000"), True),
    (MINIMAL.replace("usd = 2", "requests = 0"), True),
    (MINIMAL.replace("usd = 2", "usd = 2\ntokens = 5"), False),
    (MINIMAL.replace("usd = 2", ""), False),
    (MINIMAL.replace("usd = 2", "tokens = 1.5"), False),
    (MINIMAL.replace("usd = 2", "requests = -1"), False),
    (MINIMAL.replace("usd = 2", "usd = 2\nalerts = [0.5, 0.8, 1.0]"), True),
    (MINIMAL.replace("usd = 2", "usd = 2\nalerts = ['0.5']"), True),
    (MINIMAL.replace("usd = 2", "usd = 2\nalerts = [1.5]"), False),
    (MINIMAL.replace("usd = 2", "usd = 2\nalerts = [0.5, 0.5]"), False),
    (MINIMAL.replace("usd = 2", "usd = 2\nalerts = 0.5"), False),
    (MINIMAL.replace("per = \"user\"", "per = \"model\"").replace('"day"', '"minute"'), True),
    (with_budget('mode = "shadow"'), True),
    (with_budget('mode = "off"'), False),
    (MINIMAL + '[alerts]\nwebhook_url = "https://h.example/x"\ntimeout_seconds = 1\nattempts = 10\n', True),
    (MINIMAL + '[alerts]\nwebhook_url = "http://127.0.0.1:8080"\n', True),
    (MINIMAL + '[alerts]\nwebhook_url = "mailto:a@b.c"\n', False),
    (MINIMAL + '[alerts]\nwebhook_url_env = "HOOK"\nwebhook_headers_env = "HOOK_HEADERS"\n', True),
    (MINIMAL + '[alerts]\nwebhook_url_env = "HOOK"\nattempts = 11\n', False),
    (MINIMAL + "[alerts]\ndecision_seconds = 0\n", True),
    (MINIMAL + "[alerts]\nattempts = 2\n", False),  # no webhook to try
    (MINIMAL + '[alerts]\nwebhook_url = "https://h"\nwebhook_url_env = "HOOK"\n', False),
    (MINIMAL + "[alerts]\ndecision_seconds = 86401\n", False),
])
def test_the_schema_and_the_loader_agree_on_the_new_keys(text, valid):
    assert (schema_errors(text) == []) is valid, schema_errors(text)
    assert (loader_problems(text) == []) is valid, loader_problems(text)


# -- check-config speaks each limit's unit ---------------------------------------------------------------


def test_check_config_prints_each_limit_in_its_unit(capsys, tmp_path):
    from langchain_budgetguard.cli import main

    path = tmp_path / "c.toml"
    path.write_text(with_budget('mode = "shadow"') + "alerts = [0.5, 1.0]\n"
                    "[[limits]]\nper = 'user'\nwindow = 'minute'\nrequests = 60\n"
                    "[[limits]]\nper = 'model'\nwindow = 'day'\ntokens = 2500000\n"
                    '[alerts]\nwebhook_url = "https://hooks.example.com/T/secret"\ndecision_seconds = 0\n', "utf-8")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  mode       shadow (counts and alerts, never refuses or degrades)\n" in out
    assert "  limit      $2 per user per day, alerts at 50%, 100%\n" in out
    assert "  limit      60 requests per user per minute\n" in out
    assert "  limit      2,500,000 tokens per model per day\n" in out
    assert "  alerts     webhook https://hooks.example.com/..., no refusal or degrade alerts\n" in out
    assert "secret" not in out
