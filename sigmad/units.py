"""Parse and format CPU (millicores) and memory (bytes) quantities.

Parsed quantities are bounded (MAX_SIZE, MAX_CPU_M): they fit the 64-bit integers that
records, cgroups and the Engine API hold."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]i?|k)?B?")
_SIZE_FACTORS = {
    None: 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}
_CPU_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(m?)")
MAX_SIZE = 1 << 60  # bytes (1 EiB)
MAX_CPU_M = 1 << 40  # millicores


def parse_size(value: object) -> int:
    """Bytes from `512Mi`, `2Gi`, `1.5G`, `1024` or a plain number; ValueError if not a size."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int) and 0 <= value <= MAX_SIZE:
        return value
    text = str(value).strip() if isinstance(value, str | int | float) else ""
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise ValueError(f'"{_cut(value)}" is not a size (use e.g. 512Mi, 2Gi, 1.5G)')
    number = Decimal(match.group(1)) * _SIZE_FACTORS[match.group(2)]
    if number > MAX_SIZE:
        raise ValueError(f'"{_cut(value)}" is too large (at most 1Ei)')
    if number != number.to_integral_value():
        raise ValueError(f'"{_cut(value)}" is not a whole number of bytes')
    return int(number)


def parse_cpu(value: object) -> int:
    """Millicores from `500m`, `2`, `0.5`; ValueError if not a CPU quantity."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a cpu quantity")
    text = str(value).strip() if isinstance(value, str | int | float) else ""
    match = _CPU_RE.fullmatch(text)
    if not match:
        raise ValueError(f'"{_cut(value)}" is not a cpu quantity (use e.g. 500m, 2, 0.5)')
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f'"{_cut(value)}" is not a cpu quantity') from exc
    millis = number if match.group(2) else number * 1000
    if millis > MAX_CPU_M:
        raise ValueError(f'"{_cut(value)}" is too large')
    if millis != millis.to_integral_value():
        raise ValueError(f'"{_cut(value)}" is finer than one millicore')
    return int(millis)


def _cut(value: object, width: int = 40) -> str:
    """`value` as an error message quotes it, cut short."""
    text = str(value)
    return text if len(text) <= width else text[:width] + "…"


def format_size(size: int) -> str:
    """Shortest exact binary form (`2Gi`, `512Mi`), else a rounded one (`1.4Gi`)."""
    if size == 0:
        return "0"
    for unit, factor in (("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size >= factor:
            if size % factor == 0:
                return f"{size // factor}{unit}"
            return f"{size / factor:.1f}{unit}"
    return str(size)


def format_cpu(millis: int) -> str:
    """`500m`, `2`, `1.5`."""
    if millis % 1000 == 0:
        return str(millis // 1000)
    if millis > 1000 and millis % 100 == 0:
        return f"{millis / 1000:g}"
    return f"{millis}m"
