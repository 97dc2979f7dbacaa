"""Keys of the two frontends, turned into tmem oids exactly as ``drivers/xen/tmem.c`` does
(``docs/tmem-semantics.md``, "The Linux shim")."""

from __future__ import annotations

from typing import Union

from xentmem.errors import AbiError
from xentmem.tmem.abi import U32_MAX, U64_MAX, Oid

#: cleancache keys: an inode number, a file handle of up to 6 u32 words (24 bytes), or an Oid.
FileKey = Union[int, bytes, Oid]

SWIZ_BITS = 4
SWIZ_MASK = (1 << SWIZ_BITS) - 1
MAX_SWAP_TYPE = (U64_MAX >> SWIZ_BITS)


def filekey_oid(key: FileKey) -> Oid:
    """``*(struct tmem_oid *)&cleancache_filekey``: inode in word 0, or the handle's bytes."""
    if type(key) is int and 0 <= key <= U64_MAX:  # the common case, kept cheap (hot path)
        return tuple.__new__(Oid, (key, 0, 0))
    if isinstance(key, Oid):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key <= U64_MAX:
            raise AbiError(f"inode number must be a u64, got {key}")
        return Oid(key, 0, 0)
    if isinstance(key, (bytes, bytearray)):
        if not 0 < len(key) <= 24 or len(key) % 4:
            raise AbiError(f"a file handle is 1 to 6 u32 words, got {len(key)} bytes")
        return Oid.from_bytes(bytes(key).ljust(24, b"\0"))
    raise AbiError(f"a cleancache key is an inode number, a file handle or an Oid, not {key!r}")


def swizzle_oids(swap_type: int) -> tuple[Oid, ...]:
    """The 16 oids one swap type is spread over: ``{(type << 4) | (offset & 0xF), 0, 0}``."""
    if not 0 <= swap_type <= MAX_SWAP_TYPE:
        raise AbiError(f"swap type out of range: {swap_type}")
    return tuple(Oid((swap_type << SWIZ_BITS) | low, 0, 0) for low in range(SWIZ_MASK + 1))


def offset_fits(offset: int) -> bool:
    """tmem.c rejects swap offsets of 2**32 and above (the index is a u32)."""
    return 0 <= offset <= U32_MAX
