"""The currencies Tally bills in: ISO 4217 codes and their minor units.

A currency's minor unit is where money is rounded (decimals.round_money): 2 digits for
USD (cents), 0 for JPY, 3 for KWD. The table is closed: a code not listed is refused
with INVALID_ARGUMENT rather than guessed at, because a wrong minor unit misprices
every invoice. Minor units follow ISO 4217's list (e.g. HUF and IDR have 2 there, even
though cash in them rarely shows the fraction).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from server.domain.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Currency:
    """An ISO 4217 currency: its three-letter code and how many digits its minor unit has."""

    code: str
    minor_units: int


def _table(*groups: tuple[int, str]) -> Mapping[str, Currency]:
    table = {code: Currency(code, digits) for digits, codes in groups for code in codes.split()}
    return MappingProxyType(dict(sorted(table.items())))


CURRENCIES: Mapping[str, Currency] = _table(
    (0, "JPY KRW VND CLP ISK PYG UGX RWF XAF XOF XPF"),
    (
        2,
        "USD EUR GBP CHF CAD AUD NZD SEK NOK DKK PLN CZK HUF RON BGN TRY ILS AED SAR QAR "
        "INR PKR BDT LKR CNY HKD TWD SGD MYR THB IDR PHP ZAR NGN KES EGP MAD BRL MXN ARS "
        "COP PEN UYU",
    ),
    (3, "KWD BHD OMR JOD TND LYD IQD"),
)


def currency_of(code: str, *, field: str = "currency_code") -> Currency:
    """The currency with this ISO 4217 code; InvalidArgument naming `field` if Tally has none."""
    currency = CURRENCIES.get(code)
    if currency is None:
        shown = repr(code[:8]) if code else "empty"
        raise InvalidArgument.single(
            field, f"must be an ISO 4217 currency code Tally supports (e.g. USD, EUR, JPY), got {shown}"
        )
    return currency
