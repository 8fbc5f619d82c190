"""Stripe's wire format: form bodies in, typed parameter readers, errors out as Stripe answers them.

Stripe takes `application/x-www-form-urlencoded` bodies (and query strings) whose keys nest with brackets;
every value arrives as a string. The readers here convert them the way Stripe does and refuse what Stripe
refuses, with Stripe's error codes, so the code under test gets the SDK exception it would get from Stripe.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

Obj = dict[str, Any]


class StripeApiError(Exception):
    """An error answered as Stripe does: `{"error": {...}}` with an HTTP status.

    `ran` marks errors raised after the request changed state (a card decline): Stripe stores those under
    the idempotency key and replays them; errors refused before running are not stored.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        ran: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.ran = ran
        self.headers = headers or {}
        self.error: Obj = {"type": type, "message": message}
        if code is not None:
            self.error["code"] = code
        if param is not None:
            self.error["param"] = param
        if decline_code is not None:
            self.error["decline_code"] = decline_code


def missing(kind: str, object_id: str, param: str = "id") -> StripeApiError:
    # An id in the URL that does not exist is 404; one passed as a parameter is 400, as at Stripe.
    status = 404 if param == "id" else 400
    return StripeApiError(status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SUBKEY = re.compile(r"\[([^\[\]]*)\]")


def parse_form(raw: str) -> Obj:
    """Parse a form-encoded body or query string into nested dicts and lists, values as strings.

    `a[b][c]=v` nests, `a[0][b]=v` and `a[]=v` make lists (metadata keys stay keys even when numeric).
    """
    root: Obj = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        match = _KEY.fullmatch(key)
        if match is None:
            raise StripeApiError(400, f"Invalid parameter name: {key}", code="parameter_unknown", param=key)
        parts = [match[1], *_SUBKEY.findall(match[2])]
        node = root
        for depth, part in enumerate(parts):
            if part == "":
                if depth != len(parts) - 1:
                    raise StripeApiError(400, f"Invalid array parameter: {key}", param=key)
                part = str(len(node))
            if depth == len(parts) - 1:
                if part in node:
                    raise StripeApiError(400, f"Parameter given twice: {key}", param=key)
                node[part] = value
            else:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise StripeApiError(400, f"Invalid parameter: {key}", param=key)
                node = child
    return _listify(root, in_metadata=False)  # type: ignore[no-any-return]


def _listify(node: Any, *, in_metadata: bool) -> Any:
    if not isinstance(node, dict):
        return node
    if not in_metadata and node and all(k.isdigit() for k in node):
        return [_listify(node[k], in_metadata=False) for k in sorted(node, key=int)]
    return {k: _listify(v, in_metadata=(k == "metadata")) for k, v in node.items()}


# Parameter readers: Stripe's form values are all strings; these check and convert them.


def check_known(params: Obj, known: Iterable[str]) -> None:
    allowed = {*known, "expand"}
    for name in params:
        if name not in allowed:
            raise StripeApiError(
                400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
            )


def read_str(params: Obj, name: str, *, required: bool = False, choices: Iterable[str] = ()) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise StripeApiError(
                400, f"Missing required param: {name}.", code="parameter_missing", param=name
            )
        return None
    if not isinstance(value, str):
        raise StripeApiError(400, f"Invalid string: {name}", code="parameter_invalid_string", param=name)
    allowed = tuple(choices)
    if allowed and value not in allowed:
        raise StripeApiError(
            400, f"Invalid {name}: must be one of {', '.join(allowed)}", code="parameter_invalid", param=name
        )
    return value


def read_int(params: Obj, name: str, *, required: bool = False, minimum: int | None = None) -> int | None:
    raw = read_str(params, name, required=required)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise StripeApiError(
            400, f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name
        ) from None
    if minimum is not None and value < minimum:
        raise StripeApiError(
            400,
            f"This value must be greater than or equal to {minimum}.",
            code="parameter_invalid_integer",
            param=name,
        )
    return value


def read_bool(params: Obj, name: str, default: bool) -> bool:
    raw = read_str(params, name)
    if raw is None:
        return default
    if raw not in ("true", "false"):
        raise StripeApiError(400, f"Invalid boolean: {raw}", code="parameter_invalid_boolean", param=name)
    return raw == "true"


def read_decimal(params: Obj, name: str) -> Decimal | None:
    raw = read_str(params, name)
    if raw is None:
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise StripeApiError(400, f"Invalid decimal: {raw}", code="parameter_invalid", param=name) from None
    if not value.is_finite():
        raise StripeApiError(400, f"Invalid decimal: {raw}", code="parameter_invalid", param=name)
    return value


def read_dict(params: Obj, name: str) -> Obj:
    value = params.get(name, {})
    if value == "":
        return {}
    if not isinstance(value, dict):
        raise StripeApiError(400, f"Invalid object: {name}", code="parameter_invalid", param=name)
    return value


def merge_metadata(current: dict[str, str], params: Obj) -> dict[str, str]:
    # An empty value unsets a key, and `metadata=` unsets them all, as at Stripe.
    if params.get("metadata") == "":
        return {}
    merged = dict(current)
    for key, value in read_dict(params, "metadata").items():
        if not isinstance(value, str):
            raise StripeApiError(400, f"Invalid metadata value for {key}", param=f"metadata[{key}]")
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    if len(merged) > 50:
        raise StripeApiError(400, "Metadata can have at most 50 keys.", param="metadata")
    return merged


def read_currency(params: Obj, name: str = "currency") -> str | None:
    value = read_str(params, name)
    if value is not None and not re.fullmatch(r"[A-Za-z]{3}", value):
        raise StripeApiError(400, f"Invalid currency: {value}", code="parameter_invalid", param=name)
    return value.lower() if value else None


def search_clauses(query: str) -> list[tuple[str, str]]:
    """Stripe's search language, the part worth having: `field:'v'` and `metadata['k']:'v'`, AND-ed."""
    clauses: list[tuple[str, str]] = []
    for clause in query.split(" AND "):
        match = re.fullmatch(r"\s*(metadata\['[^']+'\]|[a-z_]+):'([^']*)'\s*", clause)
        if match is None:
            raise StripeApiError(
                400, f"Invalid search query: {query}", code="parameter_invalid", param="query"
            )
        clauses.append((match[1], match[2]))
    return clauses


def matches_search(obj: Obj, clauses: list[tuple[str, str]]) -> bool:
    for name, wanted in clauses:
        if name.startswith("metadata["):
            actual = obj["metadata"].get(name[len("metadata['") : -2])
        else:
            actual = obj.get(name)
        if actual is None or str(actual) != wanted:
            return False
    return True
