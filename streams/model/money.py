"""Exact money: integer nano-units (1e-9 of a currency unit) and Decimal, never float sums."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

NANO = Decimal(1_000_000_000)

__all__ = [
    "NANO",
    "NanoScaler",
    "nano_text",
    "nano_to_float",
    "plain_decimal_text",
    "scale_nano",
    "to_nano",
]


def to_nano(amount: Decimal | int | str) -> int:
    """``amount`` (currency units) rounded half-even to an integer number of nano-units."""
    try:
        value = Decimal(amount) * NANO
    except InvalidOperation:
        raise ValueError(f"not a decimal amount: {amount!r}") from None
    return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def plain_decimal_text(value: Decimal) -> str:
    """A Decimal as plain text, trailing zeros kept ("3.6620", "0.00000015"; never
    "1.5E-7"): rates and prices as the summary DB stores them."""
    return format(value, "f")


def scale_nano(nano: int, factor: Decimal) -> int:
    """round-half-even(nano × factor): markup and currency conversion, applied per row."""
    return int((Decimal(nano) * factor).to_integral_value(rounding=ROUND_HALF_EVEN))


def nano_text(nano: int) -> str:
    """An exact decimal string with 9 decimals from integer nano-units: ``12.345678901``
    (money in JSON and CSV: no float on the way)."""
    sign = "-" if nano < 0 else ""
    units, fraction = divmod(abs(nano), 1_000_000_000)
    return f"{sign}{units}.{fraction:09d}"


def nano_to_float(nano: int | None) -> float | None:
    """The REAL convenience columns beside the exact ``*_nano`` ones."""
    # int / int is correctly rounded, like float() of the exact Decimal quotient
    return None if nano is None else nano / 1_000_000_000


class NanoScaler:
    """``scale_nano(nano, factor)`` for one fixed factor, in integer arithmetic.

    The hot path marks up every raw point; a Decimal multiplication per event costs more
    than the rest of the point. A finite Decimal is an exact fraction ``num / den``, so
    ``nano * num`` divided by ``den`` with the remainder compared to half of ``den`` is
    the same half-even rounding, exactly (tests compare it with :func:`scale_nano`)."""

    __slots__ = ("num", "den")

    def __init__(self, factor: Decimal) -> None:
        self.num, self.den = Decimal(factor).as_integer_ratio()

    def __call__(self, nano: int) -> int:
        quotient, remainder = divmod(nano * self.num, self.den)
        twice = 2 * remainder
        if twice > self.den or (twice == self.den and quotient & 1):
            quotient += 1
        return quotient
