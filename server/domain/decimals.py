"""Exact decimal strings at the edge: parsing with limits, and canonical formatting.

Quantities and money never pass through float. Inputs are checked with a strict
pattern rather than Decimal(), which would also accept exponents, NaN, infinity,
signs and surrounding white space.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Context, Decimal, Inexact, InvalidOperation, Overflow
from fractions import Fraction

from server.domain.currencies import CURRENCIES

_DECIMAL = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")  # ASCII only: \d also matches digits of other scripts

# ISO 4217 minor units of the currencies Tally accepts (server.domain.currencies). Money is rounded to these.
MINOR_UNITS: dict[str, int] = {code: currency.minor_units for code, currency in CURRENCIES.items()}

# The digits Tally accepts (README: quantities 18 + 9 digits, prices 18 + 12), the one home
# of these limits: every product and sum of such values stays exact in EXACT's 120 digits.
QUANTITY_INTEGER_DIGITS = 18
QUANTITY_FRACTION_DIGITS = 9
PRICE_INTEGER_DIGITS = 18
PRICE_FRACTION_DIGITS = 12
# A percentage (tax): up to 100, with up to 6 decimals.
PERCENT_INTEGER_DIGITS = 3
PERCENT_FRACTION_DIGITS = 6

# The one rounding rule for money: half away from zero, applied once per invoice line.
MONEY_ROUNDING = ROUND_HALF_UP

# Arithmetic on money and quantities. The default context keeps only 28 significant
# digits; sums of 27-digit quantities times 30-digit prices need more, so this context
# keeps enough for any value Tally accepts and traps (instead of rounding) if ever not.
EXACT = Context(prec=120, rounding=MONEY_ROUNDING, traps=[InvalidOperation, Overflow, Inexact])


def check_decimal(text: str, *, max_integer_digits: int, max_fraction_digits: int) -> str | None:
    """Why `text` is not an acceptable non-negative decimal, or None if it is."""
    if not text:
        return 'is required (an exact decimal string such as "1.5")'
    match = _DECIMAL.fullmatch(text)
    if match is None:
        return f'must be a plain decimal string such as "1.5" (no exponent, NaN or spaces), got {text[:40]!r}'
    sign, integer, fraction = match.groups()
    if sign:
        return "must not be negative"
    if len(integer.lstrip("0")) > max_integer_digits:
        return f"has more than {max_integer_digits} digits before the decimal point"
    if fraction is not None and len(fraction) > max_fraction_digits:
        return f"has more than {max_fraction_digits} digits after the decimal point"
    return None


def format_quantity(value: Decimal) -> str:
    """Canonical text of a quantity: no exponent, no trailing fractional zeros ("5", "1.25")."""
    if value == 0:
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def canonical_quantity(text: str) -> str:
    """format_quantity(Decimal(text)), without Decimal, of plain digits with an optional fraction.

    That is a quantity as check_decimal accepts it, or as a stored numeric prints it. The
    batch path canonicalises one quantity per UNIQUE_COUNT entry ("1.50" and "1.5" are one
    value); string operations do it in a fraction of Decimal's time.
    """
    integer, _, fraction = text.partition(".")
    integer = integer.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    return f"{integer}.{fraction}" if fraction else integer


def trim_decimal(text: str) -> str:
    """Canonical form of a plain decimal string ("3.750" -> "3.75", "5.0" -> "5")."""
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def format_price(value: Decimal, minor_digits: int) -> str:
    """A unit price with at least the currency's minor digits ("0.10"), more if it has them."""
    text = format_quantity(value)
    fraction = len(text.partition(".")[2])
    if fraction >= minor_digits:
        return text
    return format(value.quantize(Decimal(1).scaleb(-minor_digits), context=EXACT), "f")


def round_money(value: Decimal, minor_digits: int) -> Decimal:
    """Round an exact amount to the currency's minor unit with MONEY_ROUNDING."""
    rounding = EXACT.copy()
    rounding.traps[Inexact] = False  # rounding to the minor unit is the one intended loss
    return value.quantize(Decimal(1).scaleb(-minor_digits), rounding=MONEY_ROUNDING, context=rounding)


def format_money(value: Decimal, minor_digits: int) -> str:
    """An amount with exactly the currency's minor digits ("0.50", "12")."""
    return format(round_money(value, minor_digits), "f")


def round_fraction(value: Fraction, minor_digits: int) -> Decimal:
    """Round an exact rational amount (a prorated fee) to the minor unit, half away from zero.

    The same rule as round_money, for the one amount a Decimal cannot hold exactly:
    100.00 x 5/720 hours is 0.69444..., so it stays a Fraction until this single rounding.
    """
    scaled = value * 10**minor_digits
    units, remainder = divmod(abs(scaled.numerator), scaled.denominator)
    if 2 * remainder >= scaled.denominator:
        units += 1
    sign = 1 if scaled.numerator < 0 and units else 0
    return Decimal((sign, tuple(int(d) for d in str(units)), -minor_digits))


def check_exact(
    value: Decimal, *, max_integer_digits: int, max_fraction_digits: int, positive: bool = False
) -> str | None:
    """Why an already-typed Decimal is not an acceptable non-negative amount, or None if it is.

    The typed twin of check_decimal for values built in code (plans, tiers): it also
    refuses floats smuggled past the type checker, NaN and infinities, so every product
    and sum stays exact within EXACT's precision.
    """
    if not isinstance(value, Decimal):
        return f"must be an exact Decimal, not {type(value).__name__}"
    if not value.is_finite():
        return "must be a finite number"
    if value < 0 or (positive and value == 0):
        return "must be greater than 0" if positive else "must not be negative"
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    # Trailing zeros after the point (a price stored as 0.100000000000) are not precision.
    text = "".join(map(str, digits))
    fraction_digits = max(0, -exponent - (len(text) - len(text.rstrip("0")))) if value else 0
    if value and value.adjusted() >= max_integer_digits:
        return f"has more than {max_integer_digits} digits before the decimal point"
    if fraction_digits > max_fraction_digits:
        return f"has more than {max_fraction_digits} digits after the decimal point"
    return None
