"""Exact decimal strings at the edge: parsing with limits, and canonical formatting.

Quantities and money never pass through float. Inputs are checked with a strict
pattern rather than Decimal(), which would also accept exponents, NaN, infinity,
signs and surrounding white space.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Context, Decimal, Inexact, InvalidOperation, Overflow

_DECIMAL = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")  # ASCII only: \d also matches digits of other scripts

# ISO 4217 minor units of the currencies Tally accepts. Money is rounded to these.
MINOR_UNITS: dict[str, int] = {
    "USD": 2,
    "EUR": 2,
    "GBP": 2,
    "CHF": 2,
    "CAD": 2,
    "AUD": 2,
    "SEK": 2,
    "NOK": 2,
    "DKK": 2,
    "INR": 2,
    "BRL": 2,
    "MXN": 2,
    "CNY": 2,
    "SGD": 2,
    "JPY": 0,
    "KRW": 0,
    "KWD": 3,
    "BHD": 3,
}

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
