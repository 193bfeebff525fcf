"""Durations written back by Loom (a stored spec, `loom schema` defaults) parse to the
same value: a graph's `every: 1500ms` must not come back as `2s`."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom_common.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(milliseconds=90), "90ms"),
        (timedelta(milliseconds=1500), "1s500ms"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=2, seconds=1, milliseconds=1), "2d1s1ms"),
    ],
)
def test_durations_are_written_in_their_shortest_form(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text


@given(st.integers(min_value=0, max_value=3650 * 86400 * 1000))
def test_a_written_duration_parses_back_to_the_same_millisecond(millis: int) -> None:
    delta = timedelta(milliseconds=millis)
    assert parse_duration(format_duration(delta)) == delta
