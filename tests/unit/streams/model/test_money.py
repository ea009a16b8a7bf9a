"""Exact money: a million tiny costs sum exactly, markup rounds half-even per row."""

from __future__ import annotations

from decimal import Decimal

from streams.model.money import scale_nano, to_nano


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


def test_nano_scaler_rounds_exactly_like_scale_nano() -> None:
    """The hot path's integer scaler agrees with the Decimal definition, ties included."""
    import random

    from streams.model.money import NanoScaler

    rng = random.Random(5)
    for factor in ("1.3", "1", "0", "0.5", "3.6581", "1.2345678901234567890123"):
        scaler = NanoScaler(Decimal(factor))
        for nano in [0, 1, 2, 3, 5, 15, 25, 35, 45, 10**15, 2**63 - 1] + [
            rng.randrange(10**16) for _ in range(2_000)
        ]:
            assert scaler(nano) == scale_nano(nano, Decimal(factor)), (factor, nano)
