"""Byte sizes as people write them (`2GiB`, `512M`, `1.5g`, `67108864`), for options and variables alike.

The units are powers of 1024 whether or not an `i` is written: `2G`, `2GB` and `2GiB` are all 2 * 2**30,
as memory is counted. Parsed by hand (a dozen lines) rather than with a units library: one rule for every
size easel reads, with its own error text.
"""

from __future__ import annotations

import re

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_byte_size(text: str, minimum: int = 0) -> int:
    """`text` as a whole number of bytes (rounded down), at least `minimum`. The ValueError's text says
    what was expected, as a noun phrase ("a size in bytes ..."), for the caller to name the value."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError("a size in bytes (e.g. 2GiB, 512M or 67108864)")
    value = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if value < minimum:
        raise ValueError(f"a size of at least {format_byte_size(minimum)}")
    return value


def format_byte_size(n: int) -> str:
    """`n` bytes in the largest binary unit that divides it exactly (`2GiB`, `1536KiB`, `1000`)."""
    for unit in ("T", "G", "M", "K"):
        size = UNITS[unit.lower()]
        if n and n % size == 0:
            return f"{n // size}{unit}iB"
    return str(n)


def describe_byte_size(n: int) -> str:
    """`n` bytes for a person to read, to three figures in the largest binary unit it fills (`3.72 GiB`,
    `170 MiB`, `512 B`); `format_byte_size` is the exact form that options and variables read back."""
    for unit in ("T", "G", "M", "K"):
        size = UNITS[unit.lower()]
        if abs(n) >= size:
            for digits in (2, 1, 0):  # three figures, counted after rounding (9.999 is `10.0`)
                text = f"{n / size:.{digits}f}"
                if len(text.lstrip("-").partition(".")[0]) + digits <= 3 or not digits:
                    return f"{text} {unit}iB"
    return f"{n} B"
