"""The xenstore wire codec of the stand-in server: packets, op codes, error names, arguments.

A packet is ``struct xsd_sockmsg`` (four little-endian u32: op, req_id, tx_id, length) and
its payload (``xen/include/public/io/xs_wire.h``); docs/mock-xenstored.md has the details.
Nothing here touches a socket.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum
from typing import NamedTuple

from xentmem.errors import XenStoreError

#: Largest payload either Xen daemon accepts or sends (``XENSTORE_PAYLOAD_MAX``).
XENSTORE_PAYLOAD_MAX = 4096
#: Longest absolute path (``XENSTORE_ABS_PATH_MAX``).
XENSTORE_ABS_PATH_MAX = 3072
#: Longest path below a domain's home, ``/local/domain/<id>/`` (``XENSTORE_REL_PATH_MAX``).
XENSTORE_REL_PATH_MAX = 2048

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size

NUL = b"\x00"


class XsOp(IntEnum):
    """``enum xsd_sockmsg_type`` as Xen 4.17 numbers it (20 was XS_RESTRICT, now removed)."""

    CONTROL = 0  # historically XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


#: Each op's name by its number (``XsOp(n).name`` costs more, and raises for an unknown n).
_OP_NAMES = {op.value: op.name for op in XsOp}

#: The error names C xenstored can send (``xsd_errors[]``), in its order, with their errno.
XSD_ERRORS: dict[str, int] = {
    "EINVAL": errno.EINVAL,
    "EACCES": errno.EACCES,
    "EEXIST": errno.EEXIST,
    "EISDIR": errno.EISDIR,
    "ENOENT": errno.ENOENT,
    "ENOMEM": errno.ENOMEM,
    "ENOSPC": errno.ENOSPC,
    "EIO": errno.EIO,
    "ENOTEMPTY": errno.ENOTEMPTY,
    "ENOSYS": errno.ENOSYS,
    "EROFS": errno.EROFS,
    "EBUSY": errno.EBUSY,
    "EAGAIN": errno.EAGAIN,
    "EISCONN": errno.EISCONN,
    "E2BIG": errno.E2BIG,
    "EPERM": errno.EPERM,
}
#: oxenstored's quota error.  It has no errno; pyxs turns it into ``PyXSError(0, 'Success')``.
EQUOTA = "EQUOTA"
ERROR_NAMES = frozenset([*XSD_ERRORS, EQUOTA])


def errno_of(name: str) -> int | None:
    """The errno an error name stands for, or None (``EQUOTA``, or a name no daemon sends)."""
    return XSD_ERRORS.get(name)


class MalformedPacket(XenStoreError):
    """Bytes that are not a well-formed xenstore packet (header, length or arguments)."""


class OversizedPacket(MalformedPacket):
    """A header announced a payload larger than the limit; ``header`` is what it said."""

    def __init__(self, header: Header, limit: int) -> None:
        super().__init__(f"packet announces {header.length} payload bytes, limit is {limit}")
        self.header = header
        self.limit = limit


class Header(NamedTuple):
    """The four u32 of ``struct xsd_sockmsg``.  ``op`` stays an int: it may be unknown.
    (Header and packet are NamedTuples, not frozen dataclasses: as immutable, and made
    several times per request at a third of the cost.)"""

    op: int
    req_id: int
    tx_id: int
    length: int

    @classmethod
    def decode(cls, untrusted_raw: bytes | bytearray) -> Header:
        if len(untrusted_raw) != HEADER_SIZE:
            raise MalformedPacket(f"a header is {HEADER_SIZE} bytes, got {len(untrusted_raw)}")
        return cls(*HEADER.unpack(untrusted_raw))


class Packet(NamedTuple):
    """One xenstore message.  ``op`` is an int so unknown requests can be answered ENOSYS."""

    op: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self, *, limit: int = XENSTORE_PAYLOAD_MAX) -> bytes:
        """Header plus payload; refuses what no daemon would accept."""
        if len(self.payload) > limit:
            raise MalformedPacket(f"payload of {len(self.payload)} bytes exceeds {limit}")
        try:
            header = HEADER.pack(self.op, self.req_id, self.tx_id, len(self.payload))
        except struct.error:  # a field that is not a u32
            raise MalformedPacket(
                f"op {self.op}, req_id {self.req_id}, tx_id {self.tx_id}: not all u32"
            ) from None
        return header + self.payload

    @property
    def op_name(self) -> str:
        """``"READ"`` for 2; ``"op99"`` for an op code no daemon knows."""
        name = _OP_NAMES.get(self.op)
        return name if name is not None else f"op{self.op}"


def request(op: XsOp, *args: bytes, req_id: int = 0, tx_id: int = 0, value: bytes = b"") -> Packet:
    """A request whose arguments are NUL-terminated, plus an optional raw trailing value."""
    return Packet(int(op), req_id, tx_id, pack_args(*args) + value)


def error_reply(name: str, req_id: int, tx_id: int) -> Packet:
    """An ``ERROR`` packet carrying the errno name, as both daemons send it."""
    if name not in ERROR_NAMES:
        raise ValueError(f"{name!r} is not an error name a xenstore daemon sends")
    return Packet(int(XsOp.ERROR), req_id, tx_id, name.encode("ascii") + NUL)


def watch_event(path: bytes, token: bytes) -> Packet:
    """A ``WATCH_EVENT``: request and transaction ids are always 0."""
    return Packet(int(XsOp.WATCH_EVENT), 0, 0, path + NUL + token + NUL)


def pack_args(*args: bytes) -> bytes:
    """``a\\0b\\0...``: each argument NUL-terminated; an argument may not contain a NUL."""
    for arg in args:
        if NUL in arg:
            raise ValueError(f"argument {arg!r} contains a NUL")
    return b"".join(arg + NUL for arg in args)


def split_args(untrusted_payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of a payload; bytes after the last NUL are dropped.

    This is how C xenstored's ``get_strings`` reads a request, so ``b"a\\0b"`` is one
    argument ``a``; callers that need an exact count check ``len()`` themselves.
    """
    parts = untrusted_payload.split(NUL)
    return parts[:-1]


def one_arg(untrusted_payload: bytes) -> bytes | None:
    """The single argument of a payload that must be exactly ``arg\\0``, else None."""
    if not untrusted_payload.endswith(NUL) or NUL in untrusted_payload[:-1]:
        return None
    return untrusted_payload[:-1]


def split_write(untrusted_payload: bytes) -> tuple[bytes, bytes] | None:
    """``path\\0value`` of a WRITE (the value may hold NULs), or None if there is no NUL."""
    path, sep, value = untrusted_payload.partition(NUL)
    if not sep:
        return None
    return path, value


class PacketReader:
    """Reassembles packets from a byte stream (a socket may hand them over in any pieces).

    ``feed`` returns, in stream order, each complete :class:`Packet` and, for a header that
    announces more than ``limit`` bytes, an :class:`OversizedPacket` (returned, not raised).
    With ``skip_oversized`` the reader then discards exactly that many payload bytes and
    goes on (oxenstored answers ``E2BIG`` and keeps the connection); without it the reader
    stops for good (C xenstored drops such a client), so nothing after the bad header is
    ever parsed as a packet.
    """

    def __init__(self, *, limit: int = XENSTORE_PAYLOAD_MAX, skip_oversized: bool = False) -> None:
        self.limit = limit
        self.skip_oversized = skip_oversized
        self.broken = False
        self._buffer = bytearray()
        self._header: Header | None = None  # read, its payload not yet complete
        self._skip = 0  # payload bytes of an oversized packet still to discard

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a packet (a complete header is not counted)."""
        return len(self._buffer)

    def feed(self, untrusted_data: bytes) -> list[Packet | OversizedPacket]:
        if self.broken:
            return []
        self._buffer += untrusted_data
        items: list[Packet | OversizedPacket] = []
        while True:
            if self._skip:
                n = min(self._skip, len(self._buffer))
                del self._buffer[:n]
                self._skip -= n
                if self._skip:
                    break
            if self._header is None:
                if len(self._buffer) < HEADER_SIZE:
                    break
                header = Header.decode(self._buffer[:HEADER_SIZE])
                del self._buffer[:HEADER_SIZE]
                if header.length > self.limit:
                    items.append(OversizedPacket(header, self.limit))
                    if not self.skip_oversized:
                        self.broken = True
                        self._buffer.clear()
                        break
                    self._skip = header.length
                    continue
                self._header = header
            if len(self._buffer) < self._header.length:
                break
            header, self._header = self._header, None
            payload = bytes(self._buffer[: header.length])
            del self._buffer[: header.length]
            items.append(Packet(header.op, header.req_id, header.tx_id, payload))
        return items
