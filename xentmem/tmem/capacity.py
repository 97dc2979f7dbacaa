"""The ``capacity`` param of a tmem store (zcache's, the host's): a size in MiB or a share of RAM.

Users write what they would write for a kernel module: ``64`` or ``64M`` (MiB), ``2G`` (GiB),
or ``10%`` of the machine's RAM.  :func:`parse_capacity` checks the text and returns it in one
canonical spelling (``"64M"``, ``"2048M"``, ``"10%"``) so the param's value stays a plain,
JSON-friendly string; :func:`capacity_bytes` turns it into bytes against a given RAM size, so
the RAM figure can be injected in tests and re-read whenever the param changes.
"""

from __future__ import annotations

from xentmem.params import split_number

MIB = 1 << 20
#: 16 TiB: beyond any RAM a guest has; a bigger number is a typo, not a wish.
MAX_CAPACITY_MIB = 16 << 20
ACCEPTED = "a size in MiB (64, 64M, 64MB, 2G) from 1M to 16T, or a share of RAM from 1% to 100%"

_MIB_PER_SUFFIX = {
    "": 1,
    "m": 1,
    "mb": 1,
    "mib": 1,
    "g": 1024,
    "gb": 1024,
    "gib": 1024,
    "t": 1024 * 1024,
    "tb": 1024 * 1024,
    "tib": 1024 * 1024,
}


def parse_capacity(text: str) -> str:
    """Check a capacity and return its canonical spelling; ValueError names what is wrong.

    The number is read as every param's is (:func:`xentmem.params.split_number`: ASCII
    digits, no sign, as memparse); the unit follows it at once (``64M``, not ``64 M``).
    """
    number, untrusted_unit = split_number(text, signs="")
    unit = untrusted_unit.lower()
    if unit == "%":
        if not 1 <= number <= 100:
            raise ValueError(f"{text!r}: a share of RAM must be from 1% to 100%")
        return f"{number}%"
    if unit not in _MIB_PER_SUFFIX:
        raise ValueError(f"{text!r} is not a size")
    mib = number * _MIB_PER_SUFFIX[unit]
    if not 1 <= mib <= MAX_CAPACITY_MIB:
        raise ValueError(f"{text!r} is out of range")
    return f"{mib}M"


def is_share_of_ram(spec: str) -> bool:
    """True for a canonical ``N%`` spelling."""
    return spec.endswith("%")


def capacity_bytes(spec: str, total_ram_bytes: int) -> int:
    """Bytes meant by a canonical capacity, given the RAM size (used only for ``N%``)."""
    canonical = parse_capacity(spec)
    if is_share_of_ram(canonical):
        return total_ram_bytes * int(canonical[:-1]) // 100
    return int(canonical[:-1]) * MIB
