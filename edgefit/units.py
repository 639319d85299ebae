"""Parsing of human sizes ("4G", "4096MiB", "1.5T") into MiB or GiB."""

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])(?:I?B)?\s*$", re.IGNORECASE)
_MIB_PER_UNIT = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


class SizeError(ValueError):
    """A size the user gave cannot be read."""


def parse_mib(text: str) -> int:
    """'4G' -> 4096. A unit is required: a bare '4' is more likely a mistake than 4 MiB."""
    match = _SIZE.match(str(text))
    if not match:
        raise SizeError(
            f"cannot read size {text!r}: give a number with a unit, e.g. 4G, 4096M or 3.5GiB"
        )
    number, unit = float(match.group(1)), match.group(2).upper()
    mib = int(number * _MIB_PER_UNIT[unit])
    if mib <= 0:
        raise SizeError(f"size {text!r} is zero")
    return mib


def parse_gib(text: str) -> int:
    return parse_mib(text) // 1024
