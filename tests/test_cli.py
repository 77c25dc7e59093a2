"""The ``budgetguard`` command: demo, check-config, status, top, limit, reset, prices, estimate, metrics.

Commands that read counters run against the real Redis (``redis_url``: skipped without it, failing
in CI), each test under its own key prefix and budget name.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from langchain_budgetguard.cli import main
from langchain_budgetguard.config import guard_from_config
from langchain_budgetguard.errors import BudgetExceededError

from .fakes import UsageChat
from .redis_support import fresh_prefix, redis_url  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "config").glob("*.toml"))
CALL_USD = Decimal("0.00045")  # gpt-4o-mini, 1000 tokens in and 500 out


def run(capsys, *args: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def model(**kw) -> UsageChat:
    return UsageChat(**{"model_name": "gpt-4o-mini", "input_tokens": 1000, "output_tokens": 500, "max_tokens": 500,
                        **kw})


# -- demo and help ---------------------------------------------------------------------------

NO_NETWORK = """
import socket, sys
def refuse(*a, **k):
    raise OSError("network access in the demo")
socket.socket.connect = refuse
socket.create_connection = refuse
from langchain_budgetguard.cli import main
sys.exit(main(["demo"]))
"""


def test_demo_runs_without_redis_or_network_and_shows_a_degrade_and_a_refusal():
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0", "OPENAI_API_KEY": ""}
    done = subprocess.run([sys.executable, "-c", NO_NETWORK], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "degraded to gpt-4o-mini" in done.stdout
    assert "REFUSED before any model call" in done.stdout
    script = Path(sys.executable).with_name("budgetguard")
    if script.exists():  # the console script, as installed
        done = subprocess.run([str(script), "demo"], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0 and "REFUSED" in done.stdout


def test_help_documents_commands_examples_and_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for text in ("demo", "check-config", "status", "top", "limit", "reset", "prices", "estimate", "metrics",
                 "exit codes:", "0  ok", "2  usage error", "budgetguard limit set tenant 1000 --id acme",
                 "BUDGETGUARD_CONFIG"):
        assert text in out
    code, out, _ = run(capsys, "limit", "set", "--help")
    assert code == 0 and "--id" in out


def test_usage_errors_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("BUDGETGUARD_CONFIG", raising=False)
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys)[0] == 2
    code, _, err = run(capsys, "status")
    assert code == 2 and "no config file: pass --config FILE or set BUDGETGUARD_CONFIG" in err
    example = str(ROOT / "config" / "single-app.toml")
    code, _, err = run(capsys, "top", "team", "--config", example)
    assert code == 2 and "has no limit per 'team'" in err
    code, out, _ = run(capsys, "status", "--id", "x", "--config", example, "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2
    assert run(capsys, "top", "user", "-n", "0", "--config", example)[0] == 2


# -- check-config ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_passes_check_config(capsys, monkeypatch, path):
    monkeypatch.delenv("BUDGETGUARD_REDIS_URL", raising=False)
    code, out, err = run(capsys, "check-config", str(path))
    assert code == 0, err
    assert f"{path}: ok" in out
    code, out, _ = run(capsys, "check-config", "--json", "--config", str(path))
    assert code == 0 and json.loads(out)["ok"] is True


def test_check_config_refuses_a_bad_amount_naming_file_key_and_expectation(capsys, tmp_path):
    path = tmp_path / "saas.toml"
    path.write_text('[budget]\nname = "x"\n[[limits]]\nusd = 5\n[[limits]]\nper = "user"\nwindow = "day"\n'
                    'usd = "five"\n')
    code, out, err = run(capsys, "check-config", str(path))
    assert code == 1 and out == ""
    assert f'{path}: limits[1].usd: expected a number of dollars, got "five"' in err
    code, out, _ = run(capsys, "check-config", str(path), "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert report["errors"] == [{"key": "limits[1].usd", "message": 'expected a number of dollars, got "five"',
                                 "text": f'{path}: limits[1].usd: expected a number of dollars, got "five"'}]


def test_check_config_never_touches_the_store(capsys, tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[budget]\nname = "x"\n[store]\nurl = "redis://127.0.0.1:1/0"\n[[limits]]\nusd = 5\n')
    monkeypatch.setenv("BUDGETGUARD_CONFIG", str(path))
    started = time.monotonic()
    code, out, _ = run(capsys, "check-config")
    assert code == 0 and "redis://127.0.0.1:1/0" in out and time.monotonic() - started < 1


def test_an_invalid_config_makes_every_command_exit_1(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[budget\n")
    code, _, err = run(capsys, "status", "--config", str(path))
    assert code == 1 and f"{path}: invalid TOML" in err


# -- prices and estimate ---------------------------------------------------------------------


def test_prices_show_usd_per_million_and_per_token(capsys):
    code, out, _ = run(capsys, "prices", "gpt-4o-mini", "--json")
    card = json.loads(out)
    assert code == 0 and card["source"] == "genai-prices"
    assert card["usd_per_million_tokens"] == {"input": "0.15", "output": "0.6", "cache_read": "0.075",
                                              "cache_write": "0.15", "reasoning": "0.6"}
    assert card["usd_per_token"]["input"] == "0.00000015" and card["usd_per_token"]["output"] == "0.0000006"
    code, out, _ = run(capsys, "prices", "claude-haiku-4-5")
    assert code == 0
    assert "cache write" in out and "reasoning" in out and "USD per 1M" in out and "USD per token" in out


def test_prices_use_the_configs_overrides_and_refuse_unknown_models(capsys):
    example = str(ROOT / "config" / "saas.toml")
    code, out, _ = run(capsys, "prices", "llama-3.1-70b-internal", "--config", example, "--json")
    assert code == 0 and json.loads(out)["usd_per_million_tokens"]["input"] == "0.2"
    assert json.loads(out)["source"] == "override"
    code, _, err = run(capsys, "prices", "llama-3.1-70b-internal")
    assert code == 1 and "No price is known for model 'llama-3.1-70b-internal'" in err


def test_estimate_matches_the_guards_own_reservation(capsys, tmp_path, monkeypatch):
    prompt = "Summarise the attached report in three bullet points. " * 20
    (tmp_path / "prompt.txt").write_text(prompt)
    code, out, _ = run(capsys, "estimate", "--model", "gpt-4o-mini", str(tmp_path / "prompt.txt"),
                       "--max-tokens", "300", "--json")
    report = json.loads(out)
    assert code == 0 and report["output_tokens"] == 300
    assert report["strict"]["input_tokens"] > report["typical"]["input_tokens"] > 0
    for mode in ("strict", "typical"):
        from langchain_budgetguard import BudgetGuard

        guard = BudgetGuard(model(max_tokens=300), limit=5, estimator=mode)
        reply = guard.invoke(prompt)
        assert Decimal(report[mode]["reservation_usd"]) == reply.response_metadata["budgetguard"]["reserved_usd"]
    code, out, _ = run(capsys, "estimate", "--model", "gpt-4o-mini", "--json", stdin=prompt, monkeypatch=monkeypatch)
    assert code == 0 and json.loads(out)["strict"] == report["strict"] | {
        "reservation_usd": json.loads(out)["strict"]["reservation_usd"]}
    code, out, _ = run(capsys, "estimate", "--model", "gpt-4o-mini", str(tmp_path / "prompt.txt"))
    assert code == 0 and "strict" in out and "typical" in out and "reservation USD" in out
    (tmp_path / "m.json").write_text(json.dumps([{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hi"}]))
    code, out, _ = run(capsys, "estimate", "--model", "gpt-4o", str(tmp_path / "m.json"), "--json")
    assert code == 0 and json.loads(out)["output_tokens"] == 4096
    assert run(capsys, "estimate", "--model", "no-such-model-xyz", str(tmp_path / "prompt.txt"))[0] == 1


def test_estimate_holds_an_audio_models_output_as_the_guard_does(capsys, tmp_path):
    (tmp_path / "prompt.txt").write_text("Say hello.")
    code, out, _ = run(capsys, "estimate", "--model", "gpt-audio", str(tmp_path / "prompt.txt"), "--max-tokens",
                       "1000", "--json")
    report = json.loads(out)
    from langchain_budgetguard import BudgetGuard

    for mode in ("strict", "typical"):
        guard = BudgetGuard(model(model_name="gpt-audio", max_tokens=1000), limit=5, estimator=mode)
        reply = guard.invoke("Say hello.")
        assert Decimal(report[mode]["reservation_usd"]) == reply.response_metadata["budgetguard"]["reserved_usd"]
    # strict holds the output as audio ($64 per million), typical as text ($10)
    assert Decimal(report["strict"]["reservation_usd"]) > Decimal("0.064") > Decimal(report["typical"]["reservation_usd"])


def test_estimate_holds_a_file_id_at_the_models_window_as_the_guard_does(capsys, tmp_path):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Summarise."},
                                             {"type": "file", "file": {"file_id": "file-9x"}}]}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    code, out, _ = run(capsys, "estimate", "--model", "gpt-4o-mini", str(tmp_path / "m.json"), "--max-tokens",
                       "100", "--json")
    report = json.loads(out)
    assert code == 0 and report["strict"]["input_tokens"] == 128_000  # genai-prices' context window
    from langchain_core.messages import convert_to_messages

    from langchain_budgetguard import BudgetGuard

    for mode in ("strict", "typical"):
        guard = BudgetGuard(model(max_tokens=100), limit=5, estimator=mode)
        reply = guard.invoke(convert_to_messages(messages))
        assert Decimal(report[mode]["reservation_usd"]) == reply.response_metadata["budgetguard"]["reserved_usd"]


# -- against Redis ---------------------------------------------------------------------------


@pytest.fixture
def deployment(redis_url, tmp_path):  # noqa: F811
    """A config file on the test Redis (own prefix and budget name), and a guard built from it."""
    name = f"cli-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "deploy.toml"
    path.write_text(f"""
[budget]
name = "{name}"

[store]
url = "{redis_url}"
prefix = "{fresh_prefix()}"
override_refresh_seconds = 0.5

[[limits]]
per = "global"
window = "month"
usd = 100

[[limits]]
per = "user"
window = "day"
usd = "0.01"

[[overrides]]
per = "user"
id = "ci-bot"
usd = 0
""")
    guard = guard_from_config(model(), path)
    yield path, guard
    guard.policy.store.close()


def spend(guard, calls: dict[str, int]) -> None:
    for who, n in calls.items():
        for _ in range(n):
            guard.invoke("hi", config={"configurable": {"user_id": who}})


@pytest.mark.redis
def test_status_json_reports_the_exact_spend_and_top_orders_by_spend(capsys, deployment):
    path, guard = deployment
    from langchain_budgetguard import get_cost_callback

    with get_cost_callback() as cb:
        spend(guard, {"alice": 3, "bob": 5, "carol": 1})
    code, out, _ = run(capsys, "status", "user", "--id", "alice", "--json", "--config", str(path))
    (alice,) = json.loads(out)["statuses"]
    assert code == 0
    assert (alice["id"], alice["spent"], alice["held"], alice["limit"]) == ("alice", "0.00135", "0", "0.01")
    assert Decimal(alice["remaining"]) == Decimal("0.01") - 3 * CALL_USD and alice["resets_at"]
    code, out, _ = run(capsys, "status", "--json", "--config", str(path))
    rows = {(s["scope"], s["id"]): Decimal(s["spent"]) for s in json.loads(out)["statuses"]}
    assert rows[("global", None)] == 9 * CALL_USD == cb.total_cost
    assert rows[("user", "bob")] == 5 * CALL_USD
    code, out, _ = run(capsys, "top", "--json", "--config", str(path))
    assert [s["id"] for s in json.loads(out)["top"]] == ["bob", "alice", "carol"]
    code, out, _ = run(capsys, "top", "user", "-n", "2", "--config", str(path))
    lines = out.splitlines()
    assert code == 0 and "bob" in lines[2] and "alice" in lines[3] and len(lines) == 4
    code, out, _ = run(capsys, "status", "user", "--config", str(path))
    assert code == 0 and "alice" in out and "resets at" in out


@pytest.mark.redis
def test_status_exits_1_when_a_limit_is_used_up(capsys, deployment):
    path, guard = deployment
    spend(guard, {"dave": 2})
    assert run(capsys, "status", "user", "--id", "dave", "--config", str(path))[0] == 0
    assert run(capsys, "limit", "set", "user", "0.0009", "--id", "dave", "--config", str(path))[0] == 0
    code, out, _ = run(capsys, "status", "user", "--id", "dave", "--json", "--config", str(path))
    (dave,) = json.loads(out)["statuses"]
    assert code == 1 and json.loads(out)["exhausted"] is True and dave["remaining"] == "0"
    guard.policy.live_overrides.expire()
    with pytest.raises(BudgetExceededError):
        spend(guard, {"dave": 1})
    assert run(capsys, "status", "user", "--id", "ci-bot", "--config", str(path))[0] == 1  # a $0 limit


@pytest.mark.redis
def test_limit_set_get_clear(capsys, deployment):
    path, guard = deployment
    code, out, _ = run(capsys, "limit", "set", "user", "5", "--id", "alice", "--config", str(path))
    assert code == 0 and "user alice, per day: $5 (store override)" in out and "within 0.5 s" in out
    code, out, _ = run(capsys, "limit", "get", "--json", "--config", str(path))
    limits = {(r["scope"], r["id"]): (r["effective"], r["source"]) for r in json.loads(out)["limits"]}
    assert limits == {("global", None): ("100", "limit"), ("user", None): ("0.01", "limit"),
                      ("user", "alice"): ("5", "store override"), ("user", "ci-bot"): ("0", "config override")}
    code, out, _ = run(capsys, "limit", "set", "user", "1", "--config", str(path))
    assert code == 0 and "every user, per day: $1 (store override (every id))" in out
    code, out, _ = run(capsys, "limit", "clear", "user", "--id", "alice", "--config", str(path), "--json")
    assert json.loads(out)["limit"]["effective"] == "1"
    assert run(capsys, "limit", "set", "user", "lots", "--config", str(path))[0] == 2
    assert run(capsys, "limit", "set", "user", "1", "--window", "month", "--config", str(path))[0] == 2
    assert run(capsys, "limit", "set", "global", "50", "--config", str(path))[0] == 0
    # The config file's ceiling: a few extra digits are an error, not a $4e9 budget.
    code, _, err = run(capsys, "limit", "set", "global", "4000000000", "--config", str(path))
    assert code == 2 and "at most $1000000000" in err
    code, out, _ = run(capsys, "limit", "get", "global", "--config", str(path))
    assert "$50" in out and "store override" in out


@pytest.mark.redis
def test_reset_asks_first_and_refuses_without_a_terminal(capsys, deployment, monkeypatch):
    path, guard = deployment
    spend(guard, {"bob": 2})
    code, _, err = run(capsys, "reset", "user", "--id", "bob", "--config", str(path), stdin="", monkeypatch=monkeypatch)
    assert code == 2 and "no terminal to ask on: pass --yes" in err
    assert guard.status({"configurable": {"user_id": "bob"}})[1].spent == 2 * CALL_USD

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    assert run(capsys, "reset", "user", "--id", "bob", "--config", str(path))[0] == 1
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    code, out, _ = run(capsys, "reset", "user", "--id", "bob", "--config", str(path))
    assert code == 0 and "spent was $0.0009, now $0" in out
    user, total = sorted(guard.status({"configurable": {"user_id": "bob"}}), key=lambda s: s.scope == "global")
    assert user.spent == 0 and total.spent == 2 * CALL_USD  # only bob's daily counter
    spend(guard, {"bob": 1})
    code, out, _ = run(capsys, "reset", "user", "--id", "bob", "--yes", "--json", "--config", str(path))
    assert code == 0 and json.loads(out)["reset"][0]["spent_before"] == "0.00045"
    assert run(capsys, "reset", "user", "--config", str(path), "--yes")[0] == 2  # whose?


@pytest.mark.redis
def test_metrics_once_prints_the_budgets_counters(capsys, deployment):
    path, guard = deployment
    spend(guard, {"alice": 2})
    code, out, _ = run(capsys, "metrics", "--once", "--config", str(path))
    name = guard.policy.name
    assert code == 0
    assert f'budgetguard_spent_usd{{budget="{name}",scope="user",window="day"}} 0.0009' in out
    assert f'budgetguard_store_up{{budget="{name}"}} 1.0' in out
    assert "alice" not in out  # no raw ids unless asked
    code, out, _ = run(capsys, "metrics", "--once", "--id-label", "user", "--config", str(path))
    assert f'budgetguard_id_spent_usd{{budget="{name}",id="alice",scope="user",window="day"}} 0.0009' in out


def test_commands_report_an_unreachable_store_with_exit_3(capsys, tmp_path):
    path = tmp_path / "down.toml"
    path.write_text('[budget]\nname = "x"\n[store]\nurl = "redis://127.0.0.1:1/0"\n'
                    'live_overrides = false\n[[limits]]\nper = "user"\nwindow = "day"\nusd = 5\n')
    code, _, err = run(capsys, "top", "--config", str(path))
    assert code == 3 and "unavailable" in err


# -- a live change reaches a running worker process --------------------------------------------

WORKER = """
import sys
sys.path.insert(0, sys.argv[2])
from tests.fakes import UsageChat
from langchain_budgetguard.config import guard_from_config
from langchain_budgetguard.errors import BudgetExceededError

guard = guard_from_config(UsageChat(model_name="gpt-4o-mini", input_tokens=10, output_tokens=10, max_tokens=10),
                          sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    try:
        guard.invoke("hi", config={"configurable": {"user_id": line.strip()}})
        print("ok", flush=True)
    except BudgetExceededError as exc:
        print(f"refused {exc.limit}", flush=True)
"""


@pytest.mark.redis
def test_limit_set_changes_what_a_running_worker_enforces_within_the_refresh_time(capsys, deployment):
    path, _ = deployment
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(ROOT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        assert worker.stdout.readline().strip() == "ready"

        def call(user: str) -> str:
            worker.stdin.write(user + "\n")
            worker.stdin.flush()
            return worker.stdout.readline().strip()

        def until(user: str, answer: str) -> float:
            started = time.monotonic()
            while time.monotonic() - started < 5:
                if call(user) == answer:
                    return time.monotonic() - started
                time.sleep(0.05)
            raise AssertionError(f"the worker never answered {answer!r} for {user}")

        assert call("erin") == "ok"
        assert run(capsys, "limit", "set", "user", "0", "--id", "erin", "--config", str(path))[0] == 0
        assert until("erin", "refused 0") < 0.5 + 1.0  # override_refresh_seconds + a margin
        assert call("frank") == "ok"  # only erin
        assert run(capsys, "limit", "set", "user", "0", "--config", str(path))[0] == 0  # every user
        until("frank", "refused 0")
        assert run(capsys, "limit", "clear", "user", "--config", str(path))[0] == 0
        assert run(capsys, "limit", "clear", "user", "--id", "erin", "--config", str(path))[0] == 0
        assert until("erin", "ok") < 1.5
        assert worker.poll() is None  # the same process all along
    finally:
        worker.stdin.close()
        worker.terminate()
        worker.wait(timeout=10)


# -- operator input that would change the wrong thing or nothing -------------------------------


def test_limit_set_refuses_an_amount_finer_than_a_nano_dollar_and_an_empty_id(capsys, deployment):
    path, guard = deployment
    code, _, err = run(capsys, "limit", "set", "user", "0.0000000004", "--id", "alice", "--config", str(path))
    assert code == 2 and "at most 9 decimal places" in err
    code, _, err = run(capsys, "limit", "set", "user", "1", "--id", "", "--config", str(path))
    assert code == 2 and "non-empty" in err
    from langchain_budgetguard.overrides import BudgetAdmin

    named = {row.scope_id for row in BudgetAdmin(guard.policy).limit_rows(per="user") if row.store_override is not None}
    assert named == set()  # neither refused change reached the store


def test_changes_on_an_in_process_store_are_refused_not_reported_done(capsys, monkeypatch):
    config = str(ROOT / "config" / "single-app.toml")
    code, _, err = run(capsys, "limit", "set", "user", "3", "--id", "alice", "--config", config)
    assert code == 2 and "in memory" in err and "--store" in err
    code, _, err = run(capsys, "reset", "user", "--id", "alice", "--yes", "--config", config)
    assert code == 2 and "in memory" in err


def test_the_metrics_exporter_listens_on_loopback_unless_told():
    from langchain_budgetguard import cli

    assert cli._parser().parse_args(["metrics", "--port", "1"]).addr == "127.0.0.1"
