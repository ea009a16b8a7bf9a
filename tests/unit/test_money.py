"""Exact money: a million tiny costs sum exactly, markup rounds half-even per row."""

from __future__ import annotations

from decimal import Decimal

from streams.money import scale_nano, to_nano


def test_a_million_micro_dollars_sum_to_exactly_one_dollar() -> None:
    total = sum(to_nano("0.000001") for _ in range(1_000_000))
    assert total == 1_000_000_000
    assert scale_nano(total, Decimal("1.3")) == 1_300_000_000
    # the float way is not exact, which is why the pipeline never uses it
    assert sum(0.000001 for _ in range(1_000_000)) != 1.0


def test_scale_rounds_half_even() -> None:
    assert scale_nano(5, Decimal("0.5")) == 2  # 2.5 -> 2
    assert scale_nano(7, Decimal("0.5")) == 4  # 3.5 -> 4
    assert scale_nano(218_700, Decimal("3.6376")) == 795_543  # 795543.12
