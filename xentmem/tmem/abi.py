"""The tmem ABI: the one place that knows op codes, flag words, oids and return values.

Numbers follow Xen's ``public/tmem.h`` (spec version 1) and Linux ``drivers/xen/tmem.c``
exactly (``docs/tmem-semantics.md``, "The ABI"), so that a request built here means the same
as the hypercall it stands for.
Everything else in xentmem imports these names instead of repeating a number.
"""

from __future__ import annotations

import errno
import sys
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from xentmem.errors import AbiError

if TYPE_CHECKING:
    import uuid as uuid_mod

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ZERO_PAGE = bytes(PAGE_SIZE)

TMEM_SPEC_VERSION = 1
HYPERVISOR_TMEM_OP = 38  # __HYPERVISOR_tmem_op, for reference and logs

#: Pool slots of one client: NEW_POOL answers 0..15 (``docs/tmem-semantics.md``, "Pool rules").
MAX_POOLS_PER_DOMAIN = 16
#: Shared pools on a whole host.
MAX_GLOBAL_SHARED_POOLS = 16

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class TmemOp(IntEnum):
    """Commands of ``struct tmem_op``; only 1, 2, 4, 5, 6 and 7 are ever used by guests."""

    CONTROL = 0
    NEW_POOL = 1
    DESTROY_POOL = 2
    NEW_PAGE = 3
    PUT_PAGE = 4
    GET_PAGE = 5
    FLUSH_PAGE = 6
    FLUSH_OBJECT = 7
    READ = 8
    WRITE = 9
    XCHG = 10


class TmemControl(IntEnum):
    """TMEMC_* sub-ops of TMEM_CONTROL (Xen up to 4.5), the ones ``xl tmem-*`` used."""

    THAW = 0
    FREEZE = 1
    FLUSH = 2
    DESTROY = 3
    LIST = 4
    SET_WEIGHT = 5
    SET_CAP = 6
    SET_COMPRESS = 7
    QUERY_FREEABLE_MB = 8


# Pool flag word bits (public/tmem.h).
TMEM_POOL_PERSIST = 1
TMEM_POOL_SHARED = 2
TMEM_POOL_PRECOMPRESSED = 4
TMEM_POOL_PAGESIZE_SHIFT = 4
TMEM_POOL_PAGESIZE_MASK = 0xF
TMEM_POOL_VERSION_SHIFT = 24
TMEM_POOL_VERSION_MASK = 0xFF
TMEM_POOL_RESERVED_BITS = 0x00FFFF00

# Client flags (TMEMC).
TMEM_CLIENT_COMPRESS = 1
TMEM_CLIENT_FROZEN = 2

# Return values.  Xen returns 1 for done/found, 0 for not found, a negative errno on error.
TMEM_DONE = 1
TMEM_NOT_FOUND = 0
EFROZEN = 1000
EEMPTY = 1001

_SPECIAL_ERRNO_NAMES = {EFROZEN: "EFROZEN", EEMPTY: "EEMPTY"}


def rc_name(rc: int) -> str:
    """Name a tmem return value for logs: ``1`` -> "done", ``-12`` -> "-ENOMEM"."""
    if rc == TMEM_DONE:
        return "done"
    if rc == TMEM_NOT_FOUND:
        return "not-found"
    if rc < 0:
        code = -rc
        name = _SPECIAL_ERRNO_NAMES.get(code) or errno.errorcode.get(code, str(code))
        return f"-{name}"
    return str(rc)


def pool_flags(*, persistent: bool, shared: bool = False, page_size: int = PAGE_SIZE) -> int:
    """The flag word ``xen_tmem_new_pool`` builds: 0x01000000 / 0x01000001 / 0x01000002 at 4 KiB."""
    page_shift = page_size.bit_length() - 1
    if page_size <= 0 or (1 << page_shift) != page_size or page_shift < PAGE_SHIFT:
        raise AbiError(f"page size must be a power of two >= {PAGE_SIZE}, got {page_size}")
    word = 0
    if persistent:
        word |= TMEM_POOL_PERSIST
    if shared:
        word |= TMEM_POOL_SHARED
    word |= (page_shift - PAGE_SHIFT) << TMEM_POOL_PAGESIZE_SHIFT
    word |= TMEM_SPEC_VERSION << TMEM_POOL_VERSION_SHIFT
    return word


def pool_kind(flags: int) -> str:
    """What listings call a pool: ``persistent``, ``shared-ephemeral`` or ``private-ephemeral``."""
    if flags & TMEM_POOL_PERSIST:
        return "persistent"
    return "shared-ephemeral" if flags & TMEM_POOL_SHARED else "private-ephemeral"


POOL_PRIVATE_EPHEMERAL = pool_flags(persistent=False)
POOL_PRIVATE_PERSISTENT = pool_flags(persistent=True)
POOL_SHARED_EPHEMERAL = pool_flags(persistent=False, shared=True)


class PoolFlags(NamedTuple):
    """A decoded pool flag word."""

    persistent: bool
    shared: bool
    precompressed: bool
    page_size: int
    version: int
    reserved: int

    @classmethod
    def decode(cls, word: int) -> PoolFlags:
        """Split a u32 flag word into its fields; reject what is not a u32."""
        if not isinstance(word, int) or not 0 <= word <= U32_MAX:
            raise AbiError(f"pool flag word must be a u32, got {word!r}")
        shift = (word >> TMEM_POOL_PAGESIZE_SHIFT) & TMEM_POOL_PAGESIZE_MASK
        return cls(
            persistent=bool(word & TMEM_POOL_PERSIST),
            shared=bool(word & TMEM_POOL_SHARED),
            precompressed=bool(word & TMEM_POOL_PRECOMPRESSED),
            page_size=PAGE_SIZE << shift,
            version=(word >> TMEM_POOL_VERSION_SHIFT) & TMEM_POOL_VERSION_MASK,
            reserved=word & TMEM_POOL_RESERVED_BITS,
        )

    def refusal(self) -> str | None:
        """Why ``do_tmem_new_pool`` would return -EPERM for these flags, or None if it would not."""
        if self.version != TMEM_SPEC_VERSION:
            return f"spec version {self.version} != {TMEM_SPEC_VERSION}"
        if self.shared and self.persistent:
            return "unable to create a shared-persistent pool"
        if self.page_size != PAGE_SIZE:
            return f"page size {self.page_size} not supported (only {PAGE_SIZE})"
        if self.precompressed:
            return "precompressed pools are not supported"
        if self.reserved:
            return f"reserved bits set: {self.reserved:#x}"
        return None


class Oid(NamedTuple):
    """``struct tmem_oid``: three u64 words naming an object within a pool."""

    w0: int
    w1: int = 0
    w2: int = 0

    @classmethod
    def checked(cls, w0: int, w1: int = 0, w2: int = 0) -> Oid:
        """Build an oid, refusing words that are not u64."""
        for word in (w0, w1, w2):
            if not isinstance(word, int) or not 0 <= word <= U64_MAX:
                raise AbiError(f"oid words must be u64, got {word!r}")
        return cls(w0, w1, w2)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Oid:
        """Bitwise copy of a 24-byte key, as tmem.c does with the cleancache filekey."""
        if len(raw) != 24:
            raise AbiError(f"an oid is 24 bytes, got {len(raw)}")
        return cls(*(int.from_bytes(raw[i : i + 8], sys.byteorder) for i in (0, 8, 16)))

    def to_bytes(self) -> bytes:
        """The 24 native-endian bytes of the oid."""
        return b"".join(w.to_bytes(8, sys.byteorder) for w in self)

    def __str__(self) -> str:
        return f"{self.w0:x}.{self.w1:x}.{self.w2:x}"


class PoolUuid(NamedTuple):
    """``struct tmem_pool_uuid``: the 128-bit name of a shared pool; {0, 0} is private."""

    lo: int
    hi: int

    @classmethod
    def from_uuid(cls, value: uuid_mod.UUID | bytes | str) -> PoolUuid:
        """Split a filesystem uuid the way tmem.c does (two native-endian u64 loads)."""
        import uuid as uuid_mod  # lazily: uuid pulls in subprocess on 3.9; the ABI stays I/O-free

        if isinstance(value, str):
            raw = uuid_mod.UUID(value).bytes
        elif isinstance(value, uuid_mod.UUID):
            raw = value.bytes
        else:
            raw = bytes(value)
        if len(raw) != 16:
            raise AbiError(f"a pool uuid is 16 bytes, got {len(raw)}")
        return cls(int.from_bytes(raw[:8], sys.byteorder), int.from_bytes(raw[8:], sys.byteorder))

    @classmethod
    def checked(cls, lo: int, hi: int) -> PoolUuid:
        for word in (lo, hi):
            if not isinstance(word, int) or not 0 <= word <= U64_MAX:
                raise AbiError(f"uuid words must be u64, got {word!r}")
        return cls(lo, hi)

    @property
    def is_private(self) -> bool:
        return self.lo == 0 and self.hi == 0

    def __str__(self) -> str:
        raw = self.lo.to_bytes(8, sys.byteorder) + self.hi.to_bytes(8, sys.byteorder)
        import uuid as uuid_mod  # lazily, as in from_uuid

        return str(uuid_mod.UUID(bytes=raw))


PRIVATE_UUID = PoolUuid(0, 0)
#: uuid (-1, -1) asks for a shared pool but the hypervisor silently makes it private.
WILDCARD_UUID = PoolUuid(U64_MAX, U64_MAX)


class XenbusState(IntEnum):
    """``enum xenbus_state`` (include/xen/interface/io/xenbus.h), stored as decimal text."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    def strstate(self) -> str:
        """The kernel's spelling (``xenbus_strstate``)."""
        return _XENBUS_STRSTATE[self]


_XENBUS_STRSTATE = {
    XenbusState.UNKNOWN: "Unknown",
    XenbusState.INITIALISING: "Initialising",
    XenbusState.INIT_WAIT: "InitWait",
    XenbusState.INITIALISED: "Initialised",
    XenbusState.CONNECTED: "Connected",
    XenbusState.CLOSING: "Closing",
    XenbusState.CLOSED: "Closed",
    XenbusState.RECONFIGURING: "Reconfiguring",
    XenbusState.RECONFIGURED: "Reconfigured",
}
