"""Guards around the runpod SDK for what a job's JSON may hold.

The SDK parses the job-take response with aiohttp's `response.json()`. Python refuses to
convert an integer of more than `sys.get_int_max_str_digits()` digits (4300; the limit
protects against quadratic-time parsing), so one job holding such a number made the whole
response fail to parse: every job of that batch was taken and never answered. The guard
parses such numbers as `OversizedInteger` instead, without converting them, so the batch
parses, the limit keeps its protection, and the schema refuses that one job in a sentence.
"""

from __future__ import annotations

import json
import sys
from typing import Any


class OversizedInteger:
    """A JSON integer too long to convert; it names itself in error messages."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def parse_int(text: str) -> int | OversizedInteger:
    digits = len(text.lstrip("-"))
    limit = sys.get_int_max_str_digits()
    return OversizedInteger(digits) if limit and digits > limit else int(text)


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """`json.loads` that never raises for a long integer."""
    return json.loads(text, parse_int=parse_int, **kwargs)


def install() -> None:
    """Make the SDK's job parsing (aiohttp's `ClientResponse.json`) use `loads`."""
    import aiohttp

    aiohttp.ClientResponse.json.__kwdefaults__["loads"] = loads
