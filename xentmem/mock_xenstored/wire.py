"""The xenstore wire protocol: packet header, op codes, error names, argument packing.

One place knows the bytes of ``xen/include/public/io/xs_wire.h`` so that our own server
(:mod:`xentmem.mock_xenstored.server`), the tests' raw-socket probes and any client code agree on
them.  A packet is a 16-byte header of four little-endian u32 (``type``, ``req_id``,
``tx_id``, ``len``) followed by ``len`` bytes of payload, at most
:data:`XENSTORE_PAYLOAD_MAX`.  Arguments in a payload are NUL-terminated strings; a WRITE's
value is the raw rest of the payload.  Errors travel as an ``ERROR`` packet whose payload is
the errno *name* (``b"EACCES\\0"``), and watch events as ``WATCH_EVENT`` with
``path\\0token\\0``.

Nothing here touches a socket: :class:`PacketReader` turns an untrusted byte stream into
packets and refuses a header that announces more than the limit, so the caller decides what
to do with a peer that tries to feed it too much (C xenstored drops it; oxenstored answers
``E2BIG``).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum

from xentmem.errors import XenStoreError

#: Largest payload either Xen daemon accepts or sends (``XENSTORE_PAYLOAD_MAX``).
XENSTORE_PAYLOAD_MAX = 4096
#: Longest absolute path (``XENSTORE_ABS_PATH_MAX``).
XENSTORE_ABS_PATH_MAX = 3072
#: Longest path below a domain's home, ``/local/domain/<id>/`` (``XENSTORE_REL_PATH_MAX``).
XENSTORE_REL_PATH_MAX = 2048

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size
U32_MAX = (1 << 32) - 1

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


DEBUG = XsOp.CONTROL

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


@dataclass(frozen=True)
class Header:
    """The four u32 of ``struct xsd_sockmsg``.  ``op`` stays an int: it may be unknown."""

    op: int
    req_id: int
    tx_id: int
    length: int

    @classmethod
    def decode(cls, untrusted_raw: bytes) -> Header:
        if len(untrusted_raw) != HEADER_SIZE:
            raise MalformedPacket(f"a header is {HEADER_SIZE} bytes, got {len(untrusted_raw)}")
        return cls(*HEADER.unpack(untrusted_raw))


@dataclass(frozen=True)
class Packet:
    """One xenstore message.  ``op`` is an int so unknown requests can be answered ENOSYS."""

    op: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self, *, limit: int = XENSTORE_PAYLOAD_MAX) -> bytes:
        """Header plus payload; refuses what no daemon would accept."""
        return encode_packet(self.op, self.req_id, self.tx_id, self.payload, limit=limit)

    @property
    def op_name(self) -> str:
        return op_name(self.op)


#: ``XsOp`` names by plain int, so naming an op needs no enum lookup.
_OP_NAMES: dict[int, str] = {op.value: op.name for op in XsOp}


def op_name(op: int) -> str:
    """``"READ"`` for 2; ``"op99"`` for an op code no daemon knows."""
    name = _OP_NAMES.get(op)
    return name if name is not None else f"op{op}"


def encode_packet(
    op: int, req_id: int, tx_id: int, payload: bytes, *, limit: int = XENSTORE_PAYLOAD_MAX
) -> bytes:
    """What :meth:`Packet.encode` gives, without building a :class:`Packet` first."""
    if len(payload) > limit:
        raise MalformedPacket(f"payload of {len(payload)} bytes exceeds {limit}")
    if not (0 <= op <= U32_MAX and 0 <= req_id <= U32_MAX and 0 <= tx_id <= U32_MAX):
        for field_name, value in (("op", op), ("req_id", req_id), ("tx_id", tx_id)):
            if not 0 <= value <= U32_MAX:
                raise MalformedPacket(f"{field_name} {value} is not a u32")
    return HEADER.pack(op, req_id, tx_id, len(payload)) + payload


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


#: A packet as :meth:`PacketReader.feed_raw` returns it: ``(op, req_id, tx_id, payload)``.
RawPacket = tuple[int, int, int, bytes]


class PacketReader:
    """Reassembles packets from a byte stream (a socket may hand them over in any pieces).

    ``feed`` returns, in stream order, each complete :class:`Packet` and, for a header that
    announces more than ``limit`` bytes, an :class:`OversizedPacket` (returned, not raised).
    With ``skip_oversized`` the reader then discards exactly that many payload bytes and
    goes on (oxenstored answers ``E2BIG`` and keeps the connection); without it the reader
    stops for good (C xenstored drops such a client), so nothing after the bad header is
    ever parsed as a packet.  ``feed_raw`` does the same with plain tuples (a server's hot
    path).
    """

    def __init__(self, *, limit: int = XENSTORE_PAYLOAD_MAX, skip_oversized: bool = False) -> None:
        self.limit = limit
        self.skip_oversized = skip_oversized
        self.broken = False
        # Bytes of the stream not yet returned: a partial header, or a whole header and
        # part of its payload.  Empty while skipping an oversized payload.
        self._buffer = bytearray()
        self._skip = 0

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a packet (a complete header is not counted)."""
        held = len(self._buffer)
        return held - HEADER_SIZE if held >= HEADER_SIZE else held

    def feed(self, untrusted_data: bytes) -> list[Packet | OversizedPacket]:
        return [
            item if isinstance(item, OversizedPacket) else Packet(*item)
            for item in self.feed_raw(untrusted_data)
        ]

    def feed_raw(self, untrusted_data: bytes) -> list[RawPacket | OversizedPacket]:
        """:meth:`feed`, with each packet as a :data:`RawPacket` tuple."""
        if self.broken:
            return []
        data = bytes(untrusted_data) if type(untrusted_data) is not bytes else untrusted_data
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            if self._skip:
                return []
            data = data[n:]
        buffer = self._buffer
        if buffer:
            buffer += data
            held = len(buffer)
            # Copy the buffer out only once it holds a whole packet (or an oversized
            # header): a peer that sends a byte at a time costs a length check per byte,
            # not a copy of all it sent so far.
            if held < HEADER_SIZE:
                return []
            length = HEADER.unpack_from(buffer)[3]
            if length <= self.limit and held < HEADER_SIZE + length:
                return []
            data = bytes(buffer)
            buffer.clear()
        items: list[RawPacket | OversizedPacket] = []
        pos = 0
        end = len(data)
        limit = self.limit
        unpack_from = HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            op, req_id, tx_id, length = unpack_from(data, pos)
            if length > limit:
                items.append(OversizedPacket(Header(op, req_id, tx_id, length), limit))
                pos += HEADER_SIZE
                if not self.skip_oversized:
                    self.broken = True
                    return items
                skipped = min(length, end - pos)
                pos += skipped
                if skipped < length:
                    self._skip = length - skipped
                    return items
                continue
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            items.append((op, req_id, tx_id, data[start:stop]))
            pos = stop
        if pos < end:
            buffer += data[pos:] if pos else data
        return items
