"""The body of a tmem message: tmem ops as records, and the records of their results.

A request body is a header, one fixed-size record per tmem op and the page data of every
put; a reply body is a header, one result record per op and the page data of every hit.
Records are fixed-size for every op code, so an op code the host does not know still parses
(and is answered ``-ENOSYS``, as the hypercall does).  Both ends import this module; it does
no I/O.  The layout is drawn in ``docs/protocol.md`` (Messages).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import lz4.block

from xentmem.errors import XentmemError
from xentmem.tmem.abi import (
    MAX_POOLS_PER_DOMAIN,
    PAGE_SIZE,
    ZERO_PAGE,
    Oid,
    PoolUuid,
    TmemOp,
)

#: Version of this wire format, negotiated through ``versions`` / ``version`` nodes.  Version
#: 3 added the session key (names derived from it, a MAC instead of a crc); version 2 added
#: name parts; version 1 (spilled values only) was never released.
WIRE_VERSION = 3
#: Versions this code speaks, newest first.
SUPPORTED_VERSIONS = (WIRE_VERSION,)
#: Most ops one message may carry (the host advertises its own, never above this).
MAX_OPS_LIMIT = 64
#: Most negative errno a reply may carry; EFROZEN (1000) and EEMPTY (1001) are below it.
MAX_ERRNO = 4095

REQUEST_HEADER = struct.Struct("<BB")  # version, number of ops
REPLY_HEADER = struct.Struct("<BBi")  # version, number of ops, message status (0 or -errno)
#: One op: cmd, pool id, three u64 words (oid, or uuid lo/hi for NEW_POOL), index, extra.
#: ``extra`` is the flag word for NEW_POOL and ``encoding << 16 | length`` for PUT_PAGE.
OP_RECORD = struct.Struct("<BiQQQII")
#: One result: the hypercall's return value and ``encoding << 16 | length`` of a get's page.
RESULT_RECORD = struct.Struct("<iI")


class WireError(XentmemError, ValueError):
    """A message could not be built, or one received is malformed; nothing was applied."""


class PageEncoding(IntEnum):
    """How a page's bytes travel: as they are, as an lz4 block, or not at all (all zero)."""

    RAW = 0
    LZ4 = 1
    ZERO = 2


def encode_page(page: bytes, *, compress: bool = True) -> tuple[PageEncoding, bytes]:
    """The smallest honest form of a 4 KiB page: zero pages cost nothing, lz4 when it saves."""
    if len(page) != PAGE_SIZE:
        raise WireError(f"a page is {PAGE_SIZE} bytes, got {len(page)}")
    if page == ZERO_PAGE:
        return PageEncoding.ZERO, b""
    if compress:
        packed = lz4.block.compress(page, store_size=False)
        if len(packed) < PAGE_SIZE:
            return PageEncoding.LZ4, packed
    return PageEncoding.RAW, bytes(page)


def decode_page(untrusted_encoding: int, untrusted_data: bytes) -> bytes:
    """Turn a page's wire form back into exactly 4096 bytes, or refuse it."""
    if untrusted_encoding == PageEncoding.ZERO:
        if untrusted_data:
            raise WireError(f"a zero page carries no data, got {len(untrusted_data)} bytes")
        return ZERO_PAGE
    if untrusted_encoding == PageEncoding.RAW:
        if len(untrusted_data) != PAGE_SIZE:
            raise WireError(f"a raw page is {PAGE_SIZE} bytes, got {len(untrusted_data)}")
        return bytes(untrusted_data)
    if untrusted_encoding == PageEncoding.LZ4:
        if not 0 < len(untrusted_data) < PAGE_SIZE:
            raise WireError(f"an lz4 page is 1..{PAGE_SIZE - 1} bytes, got {len(untrusted_data)}")
        try:
            page = lz4.block.decompress(untrusted_data, uncompressed_size=PAGE_SIZE)
        except lz4.block.LZ4BlockError as exc:
            raise WireError(f"lz4 page does not decompress: {exc}") from None
        if len(page) != PAGE_SIZE:
            raise WireError(f"lz4 page decompresses to {len(page)} bytes, not {PAGE_SIZE}")
        return page
    raise WireError(f"unknown page encoding {untrusted_encoding}")


_NO_OID = Oid(0)
_NO_UUID = PoolUuid(0, 0)
_ENCODINGS = frozenset(int(e) for e in PageEncoding)


def _pack_extra(encoding: PageEncoding, length: int) -> int:
    return (int(encoding) << 16) | length


def _unpack_extra(extra: int) -> tuple[int, int]:
    return extra >> 16, extra & 0xFFFF


# -- ops and results ------------------------------------------------------------------------


@dataclass(frozen=True)
class OpRecord:
    """One tmem op as it travels: the fields of ``struct tmem_op`` the guest fills in.

    ``data`` is the put's page in its wire form (``encoding``), already encoded, so a batch is
    encoded once and its size is known before it is sent.
    """

    cmd: int
    pool_id: int = 0
    oid: Oid = _NO_OID
    index: int = 0
    flags: int = 0
    uuid: PoolUuid = _NO_UUID
    encoding: PageEncoding = PageEncoding.ZERO
    data: bytes = b""

    @classmethod
    def new_pool(cls, uuid: PoolUuid, flags: int) -> OpRecord:
        return cls(TmemOp.NEW_POOL, uuid=uuid, flags=flags)

    @classmethod
    def destroy_pool(cls, pool_id: int) -> OpRecord:
        return cls(TmemOp.DESTROY_POOL, pool_id=pool_id)

    @classmethod
    def put_page(cls, pool_id: int, oid: Oid, index: int, page: bytes,
                 *, compress: bool = True) -> OpRecord:
        encoding, data = encode_page(page, compress=compress)
        return cls(TmemOp.PUT_PAGE, pool_id, oid, index, encoding=encoding, data=data)

    @classmethod
    def get_page(cls, pool_id: int, oid: Oid, index: int) -> OpRecord:
        return cls(TmemOp.GET_PAGE, pool_id, oid, index)

    @classmethod
    def flush_page(cls, pool_id: int, oid: Oid, index: int) -> OpRecord:
        return cls(TmemOp.FLUSH_PAGE, pool_id, oid, index)

    @classmethod
    def flush_object(cls, pool_id: int, oid: Oid) -> OpRecord:
        return cls(TmemOp.FLUSH_OBJECT, pool_id, oid)

    def page(self) -> bytes:
        """The put's 4096 bytes (decoded and checked)."""
        return decode_page(self.encoding, self.data)

    @property
    def wire_bytes(self) -> int:
        """Bytes this op adds to a request body."""
        return OP_RECORD.size + len(self.data)


@dataclass(frozen=True)
class ResultRecord:
    """The hypercall's return value for one op, plus a get's page in its wire form."""

    rc: int
    #: The page's wire form: only a successful GET_PAGE carries one.
    encoding: PageEncoding | None = None
    data: bytes = b""

    @classmethod
    def with_page(cls, page: bytes, *, compress: bool = True) -> ResultRecord:
        encoding, data = encode_page(page, compress=compress)
        return cls(1, encoding, data)

    @classmethod
    def with_encoded_page(cls, encoding: PageEncoding, data: bytes) -> ResultRecord:
        return cls(1, encoding, data)

    def page(self) -> bytes:
        if self.encoding is None:
            raise WireError(f"result {self.rc} carries no page")
        return decode_page(self.encoding, self.data)


def _check_rc(cmd: int, untrusted_rc: int) -> int:
    """A return value the hypercall could give for ``cmd``, or WireError."""
    if untrusted_rc < 0:
        if -untrusted_rc > MAX_ERRNO:
            raise WireError(f"return value {untrusted_rc} is not a -errno")
        return untrusted_rc
    if cmd == TmemOp.NEW_POOL:
        if untrusted_rc >= MAX_POOLS_PER_DOMAIN:
            raise WireError(f"NEW_POOL returned pool id {untrusted_rc}, beyond "
                            f"{MAX_POOLS_PER_DOMAIN - 1}")
        return untrusted_rc
    if untrusted_rc > 1:
        raise WireError(f"{_op_name(cmd)} returned {untrusted_rc}; only 1, 0 or -errno are valid")
    return untrusted_rc


def _op_name(cmd: int) -> str:
    try:
        return TmemOp(cmd).name
    except ValueError:
        return f"op {cmd}"

# -- bodies ---------------------------------------------------------------------------------


def encode_request(ops: Sequence[OpRecord]) -> bytes:
    """The binary body of a request carrying ``ops`` in order."""
    if not 1 <= len(ops) <= MAX_OPS_LIMIT:
        raise WireError(f"a request carries 1..{MAX_OPS_LIMIT} ops, got {len(ops)}")
    parts = [REQUEST_HEADER.pack(WIRE_VERSION, len(ops))]
    for op in ops:
        if op.cmd == TmemOp.NEW_POOL:
            w0, w1, w2, extra = op.uuid.lo, op.uuid.hi, 0, op.flags
        elif op.cmd == TmemOp.PUT_PAGE:
            w0, w1, w2 = op.oid
            extra = _pack_extra(op.encoding, len(op.data))
        else:
            w0, w1, w2 = op.oid
            extra = 0
        try:
            parts.append(OP_RECORD.pack(op.cmd, op.pool_id, w0, w1, w2, op.index, extra))
        except struct.error as exc:
            raise WireError(f"{_op_name(op.cmd)} does not fit the wire record: {exc}") from None
    parts.extend(op.data for op in ops if op.cmd == TmemOp.PUT_PAGE)
    return b"".join(parts)


def decode_request(untrusted_body: bytes, *, max_ops: int = MAX_OPS_LIMIT) -> list[OpRecord]:
    """Parse a request body.  Page data is split per put and its size checked, not decoded.

    The put's page is decoded by whoever stores it (:meth:`OpRecord.page`), so a host that keeps
    lz4 blocks can keep the one that came over the wire after checking it.
    """
    if len(untrusted_body) < REQUEST_HEADER.size:
        raise WireError("request shorter than its header")
    version, count = REQUEST_HEADER.unpack_from(untrusted_body)
    if version != WIRE_VERSION:
        raise WireError(f"request wire version {version}, expected {WIRE_VERSION}")
    if not 1 <= count <= max_ops:
        raise WireError(f"request carries {count} ops; 1..{max_ops} accepted")
    records_end = REQUEST_HEADER.size + count * OP_RECORD.size
    if len(untrusted_body) < records_end:
        raise WireError(f"request of {len(untrusted_body)} bytes is too short for {count} ops")
    ops: list[OpRecord] = []
    offset = records_end
    for i in range(count):
        cmd, pool_id, w0, w1, w2, index, extra = OP_RECORD.unpack_from(
            untrusted_body, REQUEST_HEADER.size + i * OP_RECORD.size)
        if cmd == TmemOp.NEW_POOL:
            ops.append(OpRecord(cmd, uuid=PoolUuid(w0, w1), flags=extra))
            continue
        if cmd != TmemOp.PUT_PAGE:
            ops.append(OpRecord(cmd, pool_id, Oid(w0, w1, w2), index))
            continue
        untrusted_encoding, length = _unpack_extra(extra)
        if untrusted_encoding not in _ENCODINGS:
            raise WireError(f"op {i}: unknown page encoding {untrusted_encoding}")
        encoding = PageEncoding(untrusted_encoding)
        if length > PAGE_SIZE or (encoding == PageEncoding.ZERO and length):
            raise WireError(f"op {i}: {encoding.name} page of {length} bytes")
        if offset + length > len(untrusted_body):
            raise WireError(f"op {i}: page data runs past the end of the request")
        data = untrusted_body[offset:offset + length]
        offset += length
        ops.append(OpRecord(cmd, pool_id, Oid(w0, w1, w2), index, encoding=encoding, data=data))
    if offset != len(untrusted_body):
        raise WireError(f"{len(untrusted_body) - offset} stray bytes after the request's pages")
    return ops


def encode_reply(results: Sequence[ResultRecord], *, status: int = 0) -> bytes:
    """The binary body of a reply: one result per request op, or none and a message status."""
    if status and results:
        raise WireError("a failed message carries no results")
    if status > 0 or -status > MAX_ERRNO:
        raise WireError(f"message status must be 0 or -errno, got {status}")
    if len(results) > MAX_OPS_LIMIT:
        raise WireError(f"a reply carries at most {MAX_OPS_LIMIT} results")
    parts = [REPLY_HEADER.pack(WIRE_VERSION, len(results), status)]
    for result in results:
        if result.encoding is not None and result.rc != 1:
            raise WireError(f"only a found page travels back, not with rc {result.rc}")
        extra = 0 if result.encoding is None else _pack_extra(result.encoding, len(result.data))
        try:
            parts.append(RESULT_RECORD.pack(result.rc, extra))
        except struct.error as exc:
            raise WireError(f"result {result.rc} does not fit the wire record: {exc}") from None
    parts.extend(r.data for r in results if r.encoding is not None)
    return b"".join(parts)


def decode_reply(untrusted_body: bytes, ops: Sequence[OpRecord]) -> list[ResultRecord]:
    """Parse a reply to ``ops``: every value checked against what that op may return.

    A message-level failure (the host could not parse or run the request) becomes that
    -errno for every op.  Get pages are decoded and must be exactly one page.
    """
    if len(untrusted_body) < REPLY_HEADER.size:
        raise WireError("reply shorter than its header")
    version, count, status = REPLY_HEADER.unpack_from(untrusted_body)
    if version != WIRE_VERSION:
        raise WireError(f"reply wire version {version}, expected {WIRE_VERSION}")
    if status:
        if status > 0 or -status > MAX_ERRNO or count or len(untrusted_body) != REPLY_HEADER.size:
            raise WireError(f"malformed message status {status} with {count} results")
        return [ResultRecord(status) for _ in ops]
    if count != len(ops):
        raise WireError(f"reply carries {count} results for {len(ops)} ops")
    records_end = REPLY_HEADER.size + count * RESULT_RECORD.size
    if len(untrusted_body) < records_end:
        raise WireError(f"reply of {len(untrusted_body)} bytes is too short for {count} results")
    results: list[ResultRecord] = []
    offset = records_end
    for i, op in enumerate(ops):
        untrusted_rc, extra = RESULT_RECORD.unpack_from(
            untrusted_body, REPLY_HEADER.size + i * RESULT_RECORD.size)
        rc = _check_rc(op.cmd, untrusted_rc)
        if op.cmd != TmemOp.GET_PAGE or rc != 1:
            if extra:
                raise WireError(f"result {i} ({_op_name(op.cmd)} -> {rc}) carries page data")
            results.append(ResultRecord(rc))
            continue
        untrusted_encoding, length = _unpack_extra(extra)
        if offset + length > len(untrusted_body):
            raise WireError(f"result {i}: page data runs past the end of the reply")
        page = decode_page(untrusted_encoding, untrusted_body[offset:offset + length])
        offset += length
        results.append(ResultRecord(1, PageEncoding.RAW, page))
    if offset != len(untrusted_body):
        raise WireError(f"{len(untrusted_body) - offset} stray bytes after the reply's pages")
    return results


def request_size(ops: Sequence[OpRecord]) -> int:
    """Body bytes of a request carrying ``ops``."""
    return REQUEST_HEADER.size + sum(op.wire_bytes for op in ops)


def reply_size_bound(ops: Sequence[OpRecord]) -> int:
    """The largest reply body ``ops`` can draw (every get a hit on an incompressible page)."""
    gets = sum(1 for op in ops if op.cmd == TmemOp.GET_PAGE)
    return REPLY_HEADER.size + len(ops) * RESULT_RECORD.size + gets * PAGE_SIZE
