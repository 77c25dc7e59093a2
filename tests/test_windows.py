"""Windows across DST: an hour is 3600 s of real time; a day, week or month follows the local calendar.

The fall-back night used to merge 01:30 EDT and 01:30 EST into one hour window ``T01`` that
reported resetting 7,200 s after it began. Here every window of a year is walked in several
zones (whole-hour, half-hour and 45-minute offsets, a 30-minute DST shift, shifts at midnight):
the windows must tile time with no gap or overlap, labels must name one window each, and each
label must parse back to its window.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from langchain_budgetguard import BudgetPolicy, Limit
from langchain_budgetguard.stores.base import Hold
from langchain_budgetguard.stores.memory import MemoryStore

UTC = timezone.utc
HOUR = timedelta(hours=1)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# -- the hour: a range of instants --------------------------------------------------------------


def test_fall_back_night_has_two_hours_labelled_apart_each_3600_s():
    ny = Limit(usd=1, per="user", window="hour", tz="America/New_York")
    edt = ny.window_at(at("2026-11-01T01:30:00-04:00"))
    est = ny.window_at(at("2026-11-01T01:30:00-05:00"))
    assert (edt.label, est.label) == ("2026-11-01T01", "2026-11-01T01-0500")
    assert edt.starts_at == at("2026-11-01T05:00:00+00:00") and edt.resets_at == at("2026-11-01T06:00:00+00:00")
    assert est.starts_at == edt.resets_at and est.resets_at == at("2026-11-01T07:00:00+00:00")
    for window in (edt, est):
        assert (window.resets_at - window.starts_at).total_seconds() == 3600  # was 7,200 for EST's
    assert est.resets_at.isoformat() == "2026-11-01T02:00:00-05:00"  # shown as local time
    assert ny.window_at(at("2026-11-01T02:30:00-05:00")).label == "2026-11-01T02"


def test_spring_forward_night_goes_from_one_to_three_in_one_hour():
    ny = Limit(usd=1, window="hour", tz="America/New_York")
    one = ny.window_at(at("2026-03-08T01:59:59-05:00"))
    three = ny.window_at(at("2026-03-08T03:00:00-04:00"))
    assert (one.label, three.label) == ("2026-03-08T01", "2026-03-08T03")
    assert one.resets_at == three.starts_at == at("2026-03-08T07:00:00+00:00")
    assert (one.resets_at - one.starts_at).total_seconds() == 3600
    with pytest.raises(ValueError, match="did you mean 2026-03-08T03"):
        ny.window_named("2026-03-08T02")  # that wall hour never happened


def test_utc_hours_keep_their_labels():
    window = Limit(usd=1, window="hour").window_at(at("2026-11-01T05:30:00+00:00"))
    assert window.label == "2026-11-01T05" and window.resets_at == at("2026-11-01T06:00:00+00:00")


ZONES = ["UTC", "America/New_York", "Europe/Paris", "Australia/Lord_Howe", "Asia/Kolkata", "Asia/Kathmandu",
         "America/Santiago", "America/Havana", "Pacific/Chatham", "America/St_Johns", "Africa/Casablanca"]


def walk(limit: Limit, start: datetime, end: datetime) -> list:
    """Every window from ``start`` to ``end``, each found from the previous one's end (so no gap and
    no overlap), and checked to contain its first and its last microsecond."""
    windows = []
    t = start
    while t < end:
        w = limit.window_at(t)
        assert w.starts_at == t or not windows, (limit.tz, t, w)  # no gap, no overlap with the previous
        assert limit.window_at(w.resets_at - timedelta(microseconds=1)) == w, (limit.tz, w)
        windows.append(w)
        t = w.resets_at
    return windows


CUT_HOURS = {"Australia/Lord_Howe": {1800.0}, "Pacific/Chatham": {900.0, 2700.0}}  # shifts off the full hour


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "Pacific/Chatham"])
def test_hour_windows_tile_a_year_exactly(tz):
    limit = Limit(usd=1, window="hour", tz=tz)
    windows = walk(limit, at("2026-01-01T00:00:00+00:00"), at("2027-01-01T00:00:00+00:00"))
    labels = [w.label for w in windows]
    assert len(set(labels)) == len(labels), "one label per window"
    lengths = {(w.resets_at - w.starts_at).total_seconds() for w in windows}
    assert lengths - {3600.0} == CUT_HOURS.get(tz, set())
    assert sum((w.resets_at - w.starts_at for w in windows), timedelta()) == windows[-1].resets_at - windows[0].starts_at
    for w in windows[::211] + [w for w in windows if len(w.label) > 13]:
        assert limit.window_named(w.label) == w


# -- day, week, month: the local calendar ----------------------------------------------------


def test_dst_days_are_23_and_25_hours_long():
    day = Limit(usd=1, window="day", tz="America/New_York")
    fall = day.window_at(at("2026-11-01T12:00:00+00:00"))
    spring = day.window_at(at("2026-03-08T12:00:00+00:00"))
    assert fall.label == "2026-11-01" and (fall.resets_at - fall.starts_at) == timedelta(hours=25)
    assert spring.label == "2026-03-08" and (spring.resets_at - spring.starts_at) == timedelta(hours=23)
    assert fall.starts_at.isoformat() == "2026-11-01T00:00:00-04:00"
    assert fall.resets_at.isoformat() == "2026-11-02T00:00:00-05:00"


def test_a_day_whose_midnight_is_skipped_starts_when_the_clock_jumps():
    santiago = Limit(usd=1, window="day", tz="America/Santiago")
    day = santiago.window_at(at("2026-09-06T12:00:00+00:00"))
    assert day.label == "2026-09-06" and day.starts_at.isoformat() == "2026-09-06T01:00:00-03:00"
    assert day.resets_at - day.starts_at == timedelta(hours=23)
    before = santiago.window_at(at("2026-04-05T03:30:00+00:00"))  # 23:30 on the repeated Saturday hour
    assert before.label == "2026-04-04" and before.resets_at - before.starts_at == timedelta(hours=25)


@pytest.mark.parametrize("tz", ZONES)
@pytest.mark.parametrize("window", ["day", "week", "month"])
def test_calendar_windows_tile_a_year_and_follow_local_dates(tz, window):
    limit = Limit(usd=1, window=window, tz=tz)
    windows = walk(limit, at("2026-01-01T00:00:00+00:00"), at("2027-01-01T00:00:00+00:00"))
    assert len({w.label for w in windows}) == len(windows)
    for w in windows:
        local = w.starts_at.astimezone(limit._zone)
        assert (local.hour, local.minute) in ((0, 0), (1, 0)), w  # midnight, or when a skipped one ends
        assert limit.window_named(w.label) == w
    hours = {(w.resets_at - w.starts_at) / HOUR for w in windows}
    if window == "day":
        assert hours <= {23, 23.5, 24, 24.5, 25}


# -- counters, status and resets_at follow the windows ----------------------------------------


def test_the_two_fall_back_hours_are_separate_counters_with_their_own_resets_at():
    store = MemoryStore()
    policy = BudgetPolicy(limits=[Limit(usd="0.000001", per="user", window="hour", tz="America/New_York")],
                          store=store)
    identity = policy.identity(None, user_id="alice")
    edt = policy.plan(identity, at("2026-11-01T01:59:59-04:00"))
    est = policy.plan(identity, at("2026-11-01T01:00:00-05:00"))  # one second later
    assert edt.keys != est.keys and est.keys[0].endswith(":2026-11-01T01-0500")
    # The first hour is full: the second, one second later, is a fresh window.
    assert store.reserve(edt.counters(), Hold("a", 1000, 60)).ok
    assert not store.reserve(edt.counters(), Hold("b", 1, 60)).ok
    assert store.reserve(est.counters(), Hold("c", 1000, 60)).ok
    [first], [second] = edt.statuses(store.read(edt.keys)), est.statuses(store.read(est.keys))
    assert first.window_label == "2026-11-01T01" and first.resets_at == at("2026-11-01T06:00:00+00:00")
    assert second.window_label == "2026-11-01T01-0500" and second.resets_at == at("2026-11-01T07:00:00+00:00")
    assert first.held == second.held == Decimal("0.000001")


def test_the_policys_window_cache_turns_on_the_dst_boundary():
    policy = BudgetPolicy(limits=[Limit(usd=1, window="hour", tz="America/New_York")])
    identity = policy.identity(None)
    labels = [policy.plan(identity, at("2026-11-01T05:00:00+00:00") + timedelta(seconds=s)).windows[0].label
              for s in (0, 1800, 3599, 3600, 5400, 7199, 7200)]
    assert labels == ["2026-11-01T01"] * 3 + ["2026-11-01T01-0500"] * 3 + ["2026-11-01T02"]


def test_refusal_says_when_the_repeated_hour_resets():
    policy = BudgetPolicy(limits=[Limit(usd=1, window="hour", tz="America/New_York")])
    plan = policy.plan(policy.identity(None), at("2026-11-01T01:30:00-05:00"))
    from langchain_budgetguard.stores.base import CounterState

    refusal = plan.refusal(0, CounterState(spent=10**9), 1, "m")
    assert refusal.window == "hour 2026-11-01T01-0500"
    assert refusal.resets_at.isoformat() == "2026-11-01T02:00:00-05:00"
