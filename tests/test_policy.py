"""Schedules and retention as pure functions of a clock (blockxfer/transfer/policy.py):
names, what is due, what expires, and a simulated year of timer ticks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockxfer.errors import FormatError, UsageError
from blockxfer.transfer.policy import (
    CLASSES,
    Policy,
    due,
    expired,
    next_period,
    parse_name,
    period_key,
    period_name,
    plan,
)
from blockxfer.volume.snapshots import SNAPSHOT_NAME_RE

T0 = datetime(2026, 11, 30, 14, 7, 3, tzinfo=UTC)      # a Monday
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1),
                       timezones=st.just(UTC))
policies = st.dictionaries(st.sampled_from(CLASSES), st.integers(0, 6), min_size=1).map(Policy)


def test_names_are_the_period_in_utc_basic_iso_form() -> None:
    assert [period_name(c, T0) for c in CLASSES] == [
        "hourly.20261130T14", "daily.20261130", "weekly.2026W49", "monthly.202611",
        "yearly.2026"]
    new_york = T0.astimezone(timezone(timedelta(hours=-5)))       # 09:07 there
    assert period_name("hourly", new_york) == "hourly.20261130T14"
    assert period_key("weekly", datetime(2027, 1, 1, tzinfo=UTC)) == "2026W53"   # ISO year


def test_next_period_starts_where_the_key_changes() -> None:
    assert next_period("hourly", T0) == datetime(2026, 11, 30, 15, tzinfo=UTC)
    assert next_period("daily", T0) == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_period("weekly", T0) == datetime(2026, 12, 7, tzinfo=UTC)
    assert next_period("monthly", T0) == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_period("yearly", T0) == datetime(2027, 1, 1, tzinfo=UTC)


@given(moments, st.sampled_from(CLASSES))
def test_a_name_parses_back_takes_the_rule_and_the_period_ends_at_next_period(
        t: datetime, c: str) -> None:
    name = period_name(c, t)
    assert parse_name(name) == (c, period_key(c, t))
    assert SNAPSHOT_NAME_RE.match(name)
    nxt = next_period(c, t)
    assert nxt > t and period_key(c, nxt - timedelta(microseconds=1)) == period_key(c, t)
    assert period_key(c, nxt) > period_key(c, t)


@given(moments, moments, st.sampled_from(CLASSES))
def test_names_sort_as_time_does(a: datetime, b: datetime, c: str) -> None:
    if a <= b:
        assert period_key(c, a) <= period_key(c, b)


@pytest.mark.parametrize("name", ["daily.2026113", "daily.2026-11-30", "weekly.202611",
                                  "hourly.20261130", "june1", "daily", "daily.20261130x"])
def test_other_names_are_not_the_schedules(name: str) -> None:
    assert parse_name(name) is None


def test_policy_text_json_and_mistakes() -> None:
    p = Policy.parse(["daily=7", "hourly=24"])
    assert p.text() == "hourly=24 daily=7"
    assert p.to_json() == b'{"hourly":24,"daily":7}'
    assert Policy.from_json(p.to_json()) == p
    for words in (["daily"], ["daily=-1"], ["minutely=3"], [], ["daily=99999"]):
        with pytest.raises(UsageError):
            Policy.parse(words)
    for raw in (b"{", b"[1]", b'{"daily":"7"}', b'{"daily":true}'):
        with pytest.raises(FormatError):
            Policy.from_json(raw)


def test_due_and_expired_by_example() -> None:
    p = Policy({"hourly": 2, "daily": 1})
    assert due(p, [], T0) == ["hourly.20261130T14", "daily.20261130"]
    assert due(p, ["hourly.20261130T14", "daily.20261130", "june1"], T0) == []
    assert due(p, ["daily.20261201"], T0) == ["hourly.20261130T14"]   # clock went back
    names = ["hourly.20261130T12", "hourly.20261130T13", "hourly.20261130T14", "weekly.2026W01",
             "daily.20261129", "daily.20261130", "june1"]
    assert expired(p, names) == ["hourly.20261130T12", "daily.20261129"]
    pl = plan(p, names, {"hourly.20261130T12"}, T0)
    assert pl.take == [] and pl.prune == ["daily.20261129"]
    assert pl.kept_protected == ["hourly.20261130T12"]
    assert plan(Policy({"hourly": 0}), names, set(), T0).prune == [
        "hourly.20261130T14", "hourly.20261130T13", "hourly.20261130T12"]


def class_of(name: str) -> str:
    return (parse_name(name) or ("",))[0]


names_st = st.lists(st.one_of(
    st.builds(period_name, st.sampled_from(CLASSES), moments),
    st.sampled_from(["june1", "master", "daily.x", "weekly.2026-11"])), max_size=40,
    unique=True)


@given(policies, names_st, st.data(), moments)
def test_a_plan_prunes_only_expired_scheduled_unprotected_names(
        p: Policy, names: list[str], data: st.DataObject, now: datetime) -> None:
    protected = set(data.draw(st.lists(st.sampled_from(names)) if names else st.just([])))
    pl = plan(p, names, protected, now)
    assert not set(pl.prune) & protected
    assert not set(pl.prune) & set(pl.take)
    assert set(pl.prune) <= set(names)
    for n in pl.prune + pl.take:
        parsed = parse_name(n)
        assert parsed is not None and parsed[0] in p.keep
    after = (set(names) | set(pl.take)) - set(pl.prune)
    for c, keep in p.keep.items():
        mine = sorted((n for n in after if class_of(n) == c), reverse=True)
        free = [n for n in mine if n not in protected]
        assert len(free) <= keep
        everything = sorted(n for n in set(names) | set(pl.take) if class_of(n) == c)
        assert mine[:keep] == sorted(everything, reverse=True)[:keep]   # the newest stay
    again = plan(p, sorted(after), protected, now)          # idempotent
    assert again.take == [] and again.prune == []


@settings(max_examples=30, deadline=None)
@given(policies, st.lists(st.integers(1, 5 * 24 * 3600), min_size=1, max_size=200),
       st.sets(st.integers(0, 199), max_size=5))
def test_a_run_of_timer_ticks_keeps_each_class_bounded_and_current(
        p: Policy, gaps: list[int], hold_at: set[int]) -> None:
    """Ticks minutes to days apart; some snapshots get held for good."""
    now, names, held = T0, set[str](), set[str]()
    for i, gap in enumerate(gaps):
        now += timedelta(seconds=gap)
        pl = plan(p, names, held, now)
        names = (names - set(pl.prune)) | set(pl.take)
        if i in hold_at and pl.take:
            held.add(pl.take[0])
        for c, keep in p.keep.items():
            mine = {n for n in names if class_of(n) == c}
            assert len(mine - held) <= keep
            if keep:
                assert period_name(c, now) in mine
        assert held <= names
