from datetime import datetime, timezone
from decimal import Decimal

import pytest

from langchain_budgetguard import IdentityError, Limit
from langchain_budgetguard.limits import counter_key, escape_id, resolve_identity
from langchain_budgetguard.money import ceil_nano, format_usd, nano_to_usd, to_decimal, usd_to_nano


def test_money_round_trips_exactly():
    assert usd_to_nano(5.0) == 5_000_000_000
    assert usd_to_nano("0.1") + usd_to_nano(0.2) == usd_to_nano("0.3")
    assert nano_to_usd(11_250) == Decimal("0.00001125")
    assert nano_to_usd(1_110_000) == Decimal("0.00111")
    assert format_usd(nano_to_usd(11_250)) == "$0.00001125"
    assert format_usd(Decimal(0)) == "$0"


def test_cost_rounds_up_never_to_zero():
    assert ceil_nano(Decimal("0.0000000001")) == 1
    assert ceil_nano(Decimal("0.0000000375")) == 38
    assert ceil_nano(Decimal("0.00001125")) == 11_250
    assert ceil_nano(Decimal(0)) == 0


@pytest.mark.parametrize("bad", ["five", float("nan"), float("inf"), -1, True, None, [1]])
def test_bad_amounts_are_refused_with_a_clear_message(bad):
    with pytest.raises((TypeError, ValueError), match="dollars|negative|finite"):
        to_decimal(bad, what="limit")


def test_limit_validation():
    with pytest.raises(ValueError, match="window"):
        Limit(usd=1, window="year")
    with pytest.raises(ValueError, match="per"):
        Limit(usd=1, per="User Name")
    with pytest.raises(ValueError, match="tz"):
        Limit(usd=1, window="day", tz="Mars/Olympus")
    assert Limit(usd=5.1).usd == Decimal("5.1")


def test_windows_are_in_the_key_and_respect_time_zones():
    now = datetime(2026, 11, 22, 23, 30, tzinfo=timezone.utc)
    day_utc = Limit(usd=1, per="user", window="day").window_at(now)
    assert day_utc.label == "2026-11-22"
    assert day_utc.resets_at == datetime(2026, 11, 23, tzinfo=timezone.utc)
    day_paris = Limit(usd=1, per="user", window="day", tz="Europe/Paris").window_at(now)
    assert day_paris.label == "2026-11-23"  # 00:30 in Paris
    month = Limit(usd=1, window="month").window_at(datetime(2026, 12, 31, 12, tzinfo=timezone.utc))
    assert (month.label, month.resets_at.year, month.resets_at.month) == ("2026-12", 2027, 1)
    week = Limit(usd=1, window="week").window_at(now)
    assert week.label == "2026-W47" and week.starts_at.weekday() == 0
    assert Limit(usd=1).window_at(now).resets_at is None


def test_identity_comes_from_configurable_then_metadata():
    limits = [Limit(usd=1, per="user"), Limit(usd=1, per="project")]
    ident = resolve_identity(
        {"configurable": {"user_id": "alice"}, "metadata": {"user_id": "bob", "project_id": "acme"}}, limits
    )
    assert ident.ids == {"user": "alice", "project": "acme"}


@pytest.mark.parametrize("config", [{}, {"configurable": {"user_id": ""}}, {"configurable": {"user_id": 7}}])
def test_missing_or_bad_id_is_an_identity_error(config):
    with pytest.raises(IdentityError, match="user_id"):
        resolve_identity(config, [Limit(usd=1, per="user")])


HOSTILE = ["a{b}c", "{acme}", "a:b", "a*", "line\nbreak", "ünïcødé", "🙂", "x" * 10_000, "%41", "A", "~abc", "-"]


def test_hostile_ids_escape_injectively_and_cannot_forge_a_tag():
    escaped = [escape_id(x) for x in HOSTILE]
    assert len(set(escaped)) == len(HOSTILE)
    for e in escaped:
        assert not set(e) & set("{}:* \n") and len(e) <= 96
    limit = Limit(usd=1, per="user")
    keys = {counter_key("default", "default", limit, x, "all") for x in HOSTILE}
    assert len(keys) == len(HOSTILE)
    assert all(k.startswith("{default}:") and k.count("{") == 1 for k in keys)


def test_durations_are_floats_within_their_range():
    from langchain_budgetguard.limits import MAX_LEASE_SECONDS, check_seconds

    assert check_seconds(2, "lease_seconds", minimum=0.01, maximum=MAX_LEASE_SECONDS) == 2.0
    assert check_seconds(Decimal("0.5"), "x", maximum=1) == 0.5
    for bad in ("10", True, float("nan"), float("inf"), -1, 1e20, 10**400, None, [1]):
        with pytest.raises(ValueError, match=r"x: expected a number of seconds from 0 to 1"):
            check_seconds(bad, "x", maximum=1)


def test_identity_accepts_unicode_ids_and_refuses_broken_ones():
    limits = [Limit(usd=1, per="user")]
    assert resolve_identity({"configurable": {"user_id": "zoë 🙂"}}, limits).ids == {"user": "zoë 🙂"}
    with pytest.raises(IdentityError, match="user_id must be valid Unicode.*position 3"):
        resolve_identity({"configurable": {"user_id": "zoë\ud800"}}, limits)


def test_a_limit_finer_than_a_nano_dollar_is_shown_as_it_is_enforced():
    from langchain_budgetguard import Limit

    limit = Limit(usd="0.0000010009")
    assert (limit.usd, limit.amount) == (Decimal("0.000001"), 1000)  # rounded down, never up
    assert Limit(usd=1 / 3).usd == Decimal("0.333333333")
    assert Limit(usd="2.5").usd == Decimal("2.5") and Limit(usd=5).usd == Decimal(5)
