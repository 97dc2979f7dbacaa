"""The split-driver wire format: tmem ops and their replies as xenstore nodes.

Both ends import this module (the guest's ``xen`` backend and the host's tmem service), so a
message means the same on both sides and every limit is written down once.  It does no I/O.
``docs/protocol.md`` describes the protocol as a whole; this is the byte-level part.

A *message* is one batch of tmem ops (a request) or their results (a reply):

* The **body** is binary: a small header, one fixed-size record per op, then the page data of
  every put (requests) or every successful get (replies), concatenated in op order.  Records
  are fixed-size for every op code, so an op code the host does not know still parses and is
  answered ``-ENOSYS``, as the hypercall does.
* The body travels as **base64url text without padding**: xenstore values must be printable
  ASCII without newlines for pyxs, and ``[A-Za-z0-9_-]`` is also legal in a xenstore *node
  name*.
* A message is **one node** created under the sender's message directory (``req/`` or
  ``rsp/``) whose *name* is the envelope ``<seq>@<chunks>@<crc32>@<inline>``.  A watch event
  carries the path, so when the text fits in the name (``chunks == 0``) the receiver learns
  the whole message from the event without a single read.  A text a few names long travels
  in *name parts*: nodes ``<seq>@p<k>@<text>`` written before the message node, whose
  envelope then says ``p<n>`` (n names in all); the receiver still reads nothing, since every
  part arrives in its own event.  A longer text *spills*: chunk 0 is the node's value and
  chunks 1.. are values of the fixed nodes ``data/<i>`` (``rsp-data/<i>`` for replies), each
  prefixed ``<seq>@`` so a chunk left from another message is noticed.  The crc32 covers the
  whole text.

Everything parsed here from the other side is ``untrusted_...`` until checked: lengths,
counts, op codes, return values, page encodings and sizes are all bounded, and a failure is a
:class:`WireError` whose message says what was wrong.
"""

from __future__ import annotations

import binascii
import errno
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import lz4.block

from xentmem.errors import XentmemError
from xentmem.tmem.abi import (
    PAGE_SIZE,
    ZERO_PAGE,
    Oid,
    PoolUuid,
    TmemOp,
)

#: Version of this wire format, negotiated through ``versions`` / ``version`` nodes.  Version
#: 2 added name parts; version 1 (spilled values only) was never released.
WIRE_VERSION = 2
#: Versions this code speaks, newest first.
SUPPORTED_VERSIONS = (WIRE_VERSION,)

#: Xen's MAX_POOLS_PER_DOMAIN: a NEW_POOL result >= this is not a pool id a host may give.
MAX_POOLS_PER_DOMAIN = 16
#: Most ops one message may carry (the host advertises its own, never above this).
MAX_OPS_LIMIT = 64
#: Most chunks one message may use (chunk 0 plus ``data/1`` .. ``data/<n-1>``).
MAX_CHUNKS_LIMIT = 64
#: The largest value a guest writes.  C xenstored refuses a guest's node record above 2048
#: bytes (value, permissions and child names together) and oxenstored any value above 2048
#: bytes, from anyone: 1984 leaves room for both.
DEFAULT_CHUNK_BYTES = 1984
MIN_CHUNK_BYTES = 64
#: The largest value the host writes where the daemon allows it (dom0 has no record quota in
#: C xenstored); it leaves room in one 4096-byte write for a message name of up to 1000.
MAX_CHUNK_BYTES = 3000
#: The longest text in a spilled message's name, and in a request's name wherever a guest
#: cannot write longer ones.  oxenstored refuses a path more than 1024 bytes below the
#: writer's home (measured), so such a name stays within 960 characters: the envelope
#: (:data:`NAME_OVERHEAD`) plus this much text.
MAX_INLINE_BYTES = 928
DEFAULT_INLINE_BYTES = 900
#: The longest text in a request's name where the daemon takes long paths (C xenstored: 2048
#: bytes below the home).  C xenstored counts a directory's child names against a guest's
#: 2048-byte record quota (a 24-byte header, 8 bytes a permission, each name and its NUL),
#: and every request slot directory holds one name: 1960 + 32 leaves room for three
#: permissions.  The guest tries it once when it connects (:data:`PROBE_DIR`).
MAX_REQUEST_INLINE_BYTES = 1960
#: The longest text a reply may carry in its name alone, where the daemon allows long paths
#: (C xenstored: 2048 bytes below dom0's home, and ``backend/tmem/<domid>/0/rsp/`` is at most
#: 26 of them); the event that carries it (path, token) stays well within 4096 bytes.
MAX_REPLY_INLINE_BYTES = 1990
#: ``<seq>@<chunks>@<crc>@``: at most 19 + 1 + 2 + 1 + 8 + 1 characters (a part's
#: ``<seq>@p<k>@`` is shorter).
NAME_OVERHEAD = 32
#: Most names one message may be split over (its message node included).  Each part costs the
#: receiver one watch event and saves it a read round trip, which costs more; a text longer
#: than this many names spills into values instead.
MAX_NAME_PARTS = 4
#: What a peer may advertise (``max-parts``); 1 means no name parts.
MAX_NAME_PARTS_LIMIT = 8
#: Largest sequence number accepted (decimal digits in a name are bounded by this).
MAX_SEQ = (1 << 63) - 1
#: Most negative errno a reply may carry; EFROZEN (1000) and EEMPTY (1001) are below it.
MAX_ERRNO = 4095

REQUEST_HEADER = struct.Struct("<BB")  # version, number of ops
REPLY_HEADER = struct.Struct("<BBi")  # version, number of ops, message status (0 or -errno)
#: One op: cmd, pool id, three u64 words (oid, or uuid lo/hi for NEW_POOL), index, extra.
#: ``extra`` is the flag word for NEW_POOL and ``encoding << 16 | length`` for PUT_PAGE.
OP_RECORD = struct.Struct("<BiQQQII")
#: One result: the hypercall's return value and ``encoding << 16 | length`` of a get's page.
RESULT_RECORD = struct.Struct("<iI")

_NAME_RE = re.compile(
    r"(0|[1-9][0-9]{0,18})@(0|[1-9][0-9]?|p[2-9])@([0-9a-f]{8})@([A-Za-z0-9_-]*)")
_PART_RE = re.compile(r"(0|[1-9][0-9]{0,18})@p([1-8])@([A-Za-z0-9_-]+)")
_B64URL_RE = re.compile(rb"[A-Za-z0-9_-]*")
_TO_STD_B64 = bytes.maketrans(b"-_", b"+/")
_TO_URL_B64 = bytes.maketrans(b"+/", b"-_")


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
class WireOp:
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
    def new_pool(cls, uuid: PoolUuid, flags: int) -> WireOp:
        return cls(TmemOp.NEW_POOL, uuid=uuid, flags=flags)

    @classmethod
    def destroy_pool(cls, pool_id: int) -> WireOp:
        return cls(TmemOp.DESTROY_POOL, pool_id=pool_id)

    @classmethod
    def put_page(cls, pool_id: int, oid: Oid, index: int, page: bytes,
                 *, compress: bool = True) -> WireOp:
        encoding, data = encode_page(page, compress=compress)
        return cls(TmemOp.PUT_PAGE, pool_id, oid, index, encoding=encoding, data=data)

    @classmethod
    def get_page(cls, pool_id: int, oid: Oid, index: int) -> WireOp:
        return cls(TmemOp.GET_PAGE, pool_id, oid, index)

    @classmethod
    def flush_page(cls, pool_id: int, oid: Oid, index: int) -> WireOp:
        return cls(TmemOp.FLUSH_PAGE, pool_id, oid, index)

    @classmethod
    def flush_object(cls, pool_id: int, oid: Oid) -> WireOp:
        return cls(TmemOp.FLUSH_OBJECT, pool_id, oid)

    def page(self) -> bytes:
        """The put's 4096 bytes (decoded and checked)."""
        return decode_page(self.encoding, self.data)

    @property
    def wire_bytes(self) -> int:
        """Bytes this op adds to a request body."""
        return OP_RECORD.size + len(self.data)


@dataclass(frozen=True)
class WireResult:
    """The hypercall's return value for one op, plus a get's page in its wire form."""

    rc: int
    #: The page's wire form: only a successful GET_PAGE carries one.
    encoding: PageEncoding | None = None
    data: bytes = b""

    @classmethod
    def with_page(cls, page: bytes, *, compress: bool = True) -> WireResult:
        encoding, data = encode_page(page, compress=compress)
        return cls(1, encoding, data)

    @classmethod
    def with_encoded_page(cls, encoding: PageEncoding, data: bytes) -> WireResult:
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


def encode_request(ops: Sequence[WireOp]) -> bytes:
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


def decode_request(untrusted_body: bytes, *, max_ops: int = MAX_OPS_LIMIT) -> list[WireOp]:
    """Parse a request body.  Page data is split per put and its size checked, not decoded.

    The put's page is decoded by whoever stores it (:meth:`WireOp.page`), so a host that keeps
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
    ops: list[WireOp] = []
    offset = records_end
    for i in range(count):
        cmd, pool_id, w0, w1, w2, index, extra = OP_RECORD.unpack_from(
            untrusted_body, REQUEST_HEADER.size + i * OP_RECORD.size)
        if cmd == TmemOp.NEW_POOL:
            ops.append(WireOp(cmd, uuid=PoolUuid(w0, w1), flags=extra))
            continue
        if cmd != TmemOp.PUT_PAGE:
            ops.append(WireOp(cmd, pool_id, Oid(w0, w1, w2), index))
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
        ops.append(WireOp(cmd, pool_id, Oid(w0, w1, w2), index, encoding=encoding, data=data))
    if offset != len(untrusted_body):
        raise WireError(f"{len(untrusted_body) - offset} stray bytes after the request's pages")
    return ops


def encode_reply(results: Sequence[WireResult], *, status: int = 0) -> bytes:
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


def decode_reply(untrusted_body: bytes, ops: Sequence[WireOp]) -> list[WireResult]:
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
        return [WireResult(status) for _ in ops]
    if count != len(ops):
        raise WireError(f"reply carries {count} results for {len(ops)} ops")
    records_end = REPLY_HEADER.size + count * RESULT_RECORD.size
    if len(untrusted_body) < records_end:
        raise WireError(f"reply of {len(untrusted_body)} bytes is too short for {count} results")
    results: list[WireResult] = []
    offset = records_end
    for i, op in enumerate(ops):
        untrusted_rc, extra = RESULT_RECORD.unpack_from(
            untrusted_body, REPLY_HEADER.size + i * RESULT_RECORD.size)
        rc = _check_rc(op.cmd, untrusted_rc)
        if op.cmd != TmemOp.GET_PAGE or rc != 1:
            if extra:
                raise WireError(f"result {i} ({_op_name(op.cmd)} -> {rc}) carries page data")
            results.append(WireResult(rc))
            continue
        untrusted_encoding, length = _unpack_extra(extra)
        if offset + length > len(untrusted_body):
            raise WireError(f"result {i}: page data runs past the end of the reply")
        page = decode_page(untrusted_encoding, untrusted_body[offset:offset + length])
        offset += length
        results.append(WireResult(1, PageEncoding.RAW, page))
    if offset != len(untrusted_body):
        raise WireError(f"{len(untrusted_body) - offset} stray bytes after the reply's pages")
    return results


def request_size(ops: Sequence[WireOp]) -> int:
    """Body bytes of a request carrying ``ops``."""
    return REQUEST_HEADER.size + sum(op.wire_bytes for op in ops)


def reply_size_bound(ops: Sequence[WireOp]) -> int:
    """The largest reply body ``ops`` can draw (every get a hit on an incompressible page)."""
    gets = sum(1 for op in ops if op.cmd == TmemOp.GET_PAGE)
    return REPLY_HEADER.size + len(ops) * RESULT_RECORD.size + gets * PAGE_SIZE


# -- text and envelopes ---------------------------------------------------------------------


def to_text(body: bytes) -> str:
    """base64url without padding: printable, newline-free, and legal in a node name."""
    return binascii.b2a_base64(body, newline=False).translate(_TO_URL_B64).rstrip(b"=").decode()


def from_text(untrusted_text: str) -> bytes:
    """Strict inverse of :func:`to_text`: any other character or a bad length is refused."""
    raw = untrusted_text.encode("ascii", "replace")
    if not _B64URL_RE.fullmatch(raw) or len(raw) % 4 == 1:
        raise WireError("message text is not base64url")
    padded = raw.translate(_TO_STD_B64) + b"=" * (-len(raw) % 4)
    try:
        return binascii.a2b_base64(padded)
    except binascii.Error as exc:  # pragma: no cover - excluded by the checks above
        raise WireError(f"message text is not base64url: {exc}") from None


def text_length(body_bytes: int) -> int:
    """Characters :func:`to_text` makes of ``body_bytes`` bytes."""
    return (body_bytes * 4 + 2) // 3


@dataclass(frozen=True)
class Limits:
    """How big one message may be; each end advertises its own and both use the smaller.

    Requests (guest -> host) and replies (host -> guest) have their own sizes: the host may
    write bigger values and longer names than a guest where the daemon lets dom0 do so.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: Inline text in a request's name (the guest's ``req/`` directory).
    inline_bytes: int = DEFAULT_INLINE_BYTES
    #: Inline text in a reply's name when the whole reply fits there (the host's ``rsp/``).
    reply_inline_bytes: int = DEFAULT_INLINE_BYTES
    max_chunks: int = 32
    max_ops: int = 32
    #: Values of a spilled reply.
    reply_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: Most names a message may be split over (1: none, the text spills into values).
    max_parts: int = MAX_NAME_PARTS

    def __post_init__(self) -> None:
        for what, value in (("chunk", self.chunk_bytes), ("reply chunk", self.reply_chunk_bytes)):
            if not MIN_CHUNK_BYTES <= value <= MAX_CHUNK_BYTES:
                raise WireError(f"{what} size {value} outside "
                                f"{MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
        if not 0 <= self.inline_bytes <= MAX_REQUEST_INLINE_BYTES:
            raise WireError(f"inline size {self.inline_bytes} outside "
                            f"0..{MAX_REQUEST_INLINE_BYTES}")
        if not 0 <= self.reply_inline_bytes <= MAX_REPLY_INLINE_BYTES:
            raise WireError(f"reply inline size {self.reply_inline_bytes} outside "
                            f"0..{MAX_REPLY_INLINE_BYTES}")
        if not 1 <= self.max_chunks <= MAX_CHUNKS_LIMIT:
            raise WireError(f"max chunks {self.max_chunks} outside 1..{MAX_CHUNKS_LIMIT}")
        if not 1 <= self.max_ops <= MAX_OPS_LIMIT:
            raise WireError(f"max ops {self.max_ops} outside 1..{MAX_OPS_LIMIT}")
        if not 1 <= self.max_parts <= MAX_NAME_PARTS_LIMIT:
            raise WireError(f"max parts {self.max_parts} outside 1..{MAX_NAME_PARTS_LIMIT}")

    @classmethod
    def for_host(cls) -> Limits:
        """A host's own limits before it probes its xenstore: it accepts request names as long
        as any daemon lets a guest write them (each guest finds out what its daemon takes)."""
        return cls(inline_bytes=MAX_REQUEST_INLINE_BYTES)

    def meet(self, other: Limits) -> Limits:
        return Limits(min(self.chunk_bytes, other.chunk_bytes),
                      min(self.inline_bytes, other.inline_bytes),
                      min(self.reply_inline_bytes, other.reply_inline_bytes),
                      min(self.max_chunks, other.max_chunks),
                      min(self.max_ops, other.max_ops),
                      min(self.reply_chunk_bytes, other.reply_chunk_bytes),
                      min(self.max_parts, other.max_parts))

    def inline_for(self, *, reply: bool) -> int:
        """The longest text a message's name may carry when the whole message is there."""
        return self.reply_inline_bytes if reply else self.inline_bytes

    def spill_inline_for(self, *, reply: bool) -> int:
        """The name's share of a spilled message (it shares one write with a value)."""
        return min(self.inline_for(reply=reply), MAX_INLINE_BYTES)

    def chunk_for(self, *, reply: bool) -> int:
        return self.reply_chunk_bytes if reply else self.chunk_bytes

    def text_capacity(self, *, reply: bool) -> int:
        """The longest message text that fits (chunk prefixes at the largest seq)."""
        prefix = len(str(MAX_SEQ)) + 1
        chunk = self.chunk_for(reply=reply)
        return (self.spill_inline_for(reply=reply) + chunk
                + (self.max_chunks - 1) * (chunk - prefix))

    def body_capacity(self, *, reply: bool) -> int:
        """The largest body that fits, in bytes."""
        return self.text_capacity(reply=reply) * 3 // 4


@dataclass(frozen=True)
class Envelope:
    """What a message node's name says: sequence, chunk count, crc and the inline text.

    ``chunks == 0``: the whole text is in names: ``inline`` alone, or (``parts`` = n >= 2)
    the texts of parts 1 .. n-1 followed by ``inline``.  Otherwise the text is ``inline``,
    then the node's value, then ``data/1`` .. ``data/<chunks-1>`` (without their ``<seq>@``).
    """

    seq: int
    chunks: int
    crc: int
    inline: str
    #: Names the text is split over, this one included (0: not split).
    parts: int = 0

    @property
    def name(self) -> str:
        count = f"p{self.parts}" if self.parts else str(self.chunks)
        return f"{self.seq}@{count}@{self.crc:08x}@{self.inline}"


@dataclass(frozen=True)
class Part:
    """A name part: piece ``k`` (1-based) of message ``seq``'s text, in a node of its own."""

    seq: int
    k: int
    text: str

    @property
    def name(self) -> str:
        return f"{self.seq}@p{self.k}@{self.text}"


def is_part_name(untrusted_name: str) -> bool:
    """Whether a node name has a part's shape (``<seq>@p<k>@``), valid or not."""
    return untrusted_name.count("@") == 2


def parse_name(untrusted_name: str, limits: Limits, *, reply: bool) -> Envelope:
    """Check a message node's name against the grammar and the limits."""
    inline_limit = limits.inline_for(reply=reply)
    if len(untrusted_name) > NAME_OVERHEAD + inline_limit:
        raise WireError(f"message name of {len(untrusted_name)} characters is too long")
    match = _NAME_RE.fullmatch(untrusted_name)
    if match is None:
        raise WireError(f"{untrusted_name[:40]!r} is not a message name")
    seq, crc, inline = int(match[1]), int(match[3], 16), match[4]
    if match[2].startswith("p"):
        parts = int(match[2][1:])
        if parts > limits.max_parts:
            raise WireError(f"message split over {parts} names; at most {limits.max_parts}")
        if not inline:
            raise WireError("a message's last part is empty")
        return Envelope(seq, 0, crc, inline, parts)
    chunks = int(match[2])
    if chunks > limits.max_chunks:
        raise WireError(f"message of {chunks} chunks; at most {limits.max_chunks}")
    if chunks:
        inline_limit = limits.spill_inline_for(reply=reply)
    if len(inline) > inline_limit:
        raise WireError(f"inline text of {len(inline)} characters; at most {inline_limit}")
    if not chunks and not inline:
        raise WireError("an inline message with no text")
    return Envelope(seq, chunks, crc, inline)


def parse_part(untrusted_name: str, limits: Limits, *, reply: bool) -> Part:
    """Check a part node's name against the grammar and the limits."""
    inline_limit = limits.inline_for(reply=reply)
    if len(untrusted_name) > NAME_OVERHEAD + inline_limit:
        raise WireError(f"part name of {len(untrusted_name)} characters is too long")
    match = _PART_RE.fullmatch(untrusted_name)
    if match is None:
        raise WireError(f"{untrusted_name[:40]!r} is not a message part")
    part = Part(int(match[1]), int(match[2]), match[3])
    if part.k >= limits.max_parts:
        raise WireError(f"part {part.k} of a message; at most {limits.max_parts - 1} before "
                        "the message node")
    if len(part.text) > inline_limit:
        raise WireError(f"part text of {len(part.text)} characters; at most {inline_limit}")
    return part


@dataclass(frozen=True)
class Framed:
    """A message laid out as xenstore writes: the message node, its parts and its chunks."""

    envelope: Envelope
    value: str
    #: ``(i, value)`` for ``data/<i>``, i >= 1, in order; written before the message node.
    chunks: tuple[tuple[int, str], ...]
    #: Name parts 1 .. n-1, in order; written before the message node.
    parts: tuple[Part, ...] = ()


def frame(seq: int, body: bytes, limits: Limits, *, reply: bool) -> Framed:
    """Lay a body out as nodes: all in the name if it fits, else spilled into values."""
    if not 0 <= seq <= MAX_SEQ:
        raise WireError(f"sequence number {seq} out of range")
    text = to_text(body)
    crc = zlib.crc32(text.encode())
    inline_limit = limits.inline_for(reply=reply)
    if len(text) <= inline_limit:
        return Framed(Envelope(seq, 0, crc, text), "", ())
    if inline_limit and len(text) <= inline_limit * limits.max_parts:
        count = -(-len(text) // inline_limit)
        step = -(-len(text) // count)  # even pieces: no name much longer than it must be
        pieces = [text[pos:pos + step] for pos in range(0, len(text), step)]
        parts = tuple(Part(seq, k, piece) for k, piece in enumerate(pieces[:-1], start=1))
        return Framed(Envelope(seq, 0, crc, pieces[-1], len(pieces)), "", (), parts)
    spill_inline = limits.spill_inline_for(reply=reply)
    chunk = limits.chunk_for(reply=reply)
    inline, rest = text[:spill_inline], text[spill_inline:]
    first, rest = rest[:chunk], rest[chunk:]
    prefix = f"{seq}@"
    step = chunk - len(prefix)
    chunks = tuple((i + 1, prefix + rest[pos:pos + step])
                   for i, pos in enumerate(range(0, len(rest), step)))
    count = 1 + len(chunks)
    if count > limits.max_chunks:
        raise WireError(f"message of {len(body)} bytes needs {count} chunks; "
                        f"at most {limits.max_chunks}")
    return Framed(Envelope(seq, count, crc, inline), first, chunks)


def unframe(envelope: Envelope, untrusted_value: str | None,
            untrusted_chunks: Sequence[str], limits: Limits, *, reply: bool,
            untrusted_parts: Sequence[Part] = ()) -> bytes:
    """The body of a message from its envelope and its parts or (when spilled) chunk values.

    ``untrusted_value`` is the message node's value and ``untrusted_chunks`` the values of
    ``data/1`` .. ``data/<chunks-1>``; both are ignored for a message in names.
    ``untrusted_parts`` are the parts received for the message (checked by :func:`parse_part`).
    """
    if envelope.parts:
        wanted = list(range(1, envelope.parts))
        if [p.k for p in untrusted_parts] != wanted or any(
                p.seq != envelope.seq for p in untrusted_parts):
            raise WireError(f"message {envelope.seq}: expected parts {wanted}, got "
                            f"{[(p.seq, p.k) for p in untrusted_parts]}")
        text = "".join(p.text for p in untrusted_parts) + envelope.inline
    elif not envelope.chunks:
        text = envelope.inline
    else:
        if untrusted_value is None or len(untrusted_chunks) != envelope.chunks - 1:
            raise WireError(f"message {envelope.seq}: expected {envelope.chunks} chunks")
        prefix = f"{envelope.seq}@"
        pieces = [untrusted_value]
        for i, untrusted_chunk in enumerate(untrusted_chunks, start=1):
            if not untrusted_chunk.startswith(prefix):
                raise WireError(f"message {envelope.seq}: chunk {i} belongs to another message")
            pieces.append(untrusted_chunk[len(prefix):])
        chunk = limits.chunk_for(reply=reply)
        if any(len(p) > chunk for p in pieces):
            raise WireError(f"message {envelope.seq}: a chunk exceeds {chunk}")
        text = envelope.inline + "".join(pieces)
    if zlib.crc32(text.encode("ascii", "replace")) != envelope.crc:
        raise WireError(f"message {envelope.seq}: crc mismatch (torn or mixed chunks)")
    return from_text(text)


ETIMEDOUT_RC = -errno.ETIMEDOUT
ENODEV_RC = -errno.ENODEV
EINVAL_RC = -errno.EINVAL


# -- the xenstore layout ----------------------------------------------------------------------
#
# Both areas are created by the host service, as a toolstack creates a PV device's areas.
# The frontend area is the guest's (owner = guest, dom0 may read); the backend area is the
# host's (owner = dom0, the guest may read).  Names follow Linux's split drivers.

#: Device type and instance in both paths.
DEVICE = "tmem"
DEVINST = "0"
#: Nodes of either area.
STATE = "state"
#: Message directories (watched by the other end) and their spill chunks.
REQ_DIR = "req"
REQ_DATA_DIR = "data"
#: Where a guest tries, once per connect, how long a request name its xenstore takes: a path
#: as long as the longest request slot's (``req/<slot>-<part>/``), outside the watched ``req/``.
PROBE_DIR = "probe/0-0"
RSP_DIR = "rsp"
RSP_DATA_DIR = "rsp-data"
#: Requests go to ``req/<seq % REQ_SLOTS>/<name>``: C xenstored counts a directory's child
#: names against the 2048-byte record quota when a guest adds a child, so long names are
#: spread over slot directories (one each) and the host can clear ``req/`` once per
#: ``REQ_SLOTS`` messages instead of once per message.
REQ_SLOTS = 8
#: Frontend nodes the host writes at set-up (pointers to the other end, as libxl writes).
FE_BACKEND = "backend"
FE_BACKEND_ID = "backend-id"
#: Frontend nodes the guest writes during the handshake.
FE_VERSION = "version"
#: Backend nodes the host writes.
BE_FRONTEND = "frontend"
BE_FRONTEND_ID = "frontend-id"
BE_VERSIONS = "versions"
BE_MAX_OPS = "max-ops"
BE_MAX_CHUNKS = "max-chunks"
BE_CHUNK_BYTES = "chunk-bytes"
BE_INLINE_BYTES = "inline-bytes"
BE_REPLY_INLINE_BYTES = "reply-inline-bytes"
BE_REPLY_CHUNK_BYTES = "reply-chunk-bytes"
BE_MAX_PARTS = "max-parts"
BE_FEATURE_LZ4 = "feature-lz4"
#: ``xenbus_dev_error``: ``"<errno> <message>"``.
ERROR_NODE = "error"

#: Highest domid a guest may have (DOMID_FIRST_RESERVED - 1).
MAX_DOMID = 0x7FEF
_DOMID_RE = re.compile(r"0|[1-9][0-9]{0,4}")
_UINT_RE = re.compile(r"[0-9]{1,10}")


def request_slot(seq: int, part: int = 0) -> str:
    """The slot directory of request ``seq`` (or of its name part ``part``) under ``req/``.

    Each part has a directory of its own (``<slot>-<k>``), so that every directory holds one
    long name, as the record quota wants.
    """
    slot = seq % REQ_SLOTS
    return f"{slot}-{part}" if part else str(slot)


def frontend_path(domid: int) -> str:
    return f"/local/domain/{domid}/device/{DEVICE}/{DEVINST}"


def backend_path(backend_domid: int, domid: int) -> str:
    return f"/local/domain/{backend_domid}/backend/{DEVICE}/{domid}/{DEVINST}"


def parse_domid(untrusted_text: str) -> int:
    """A domid written as decimal text, 0..0x7FEF, or WireError."""
    text = untrusted_text.strip("\x00")
    if not _DOMID_RE.fullmatch(text) or int(text) > MAX_DOMID:
        raise WireError(f"{untrusted_text[:20]!r} is not a domid")
    return int(text)


def parse_uint(untrusted_text: str, *, low: int, high: int, what: str) -> int:
    """A bounded decimal from a node, or WireError naming the node."""
    text = untrusted_text.strip("\x00")
    if not _UINT_RE.fullmatch(text) or not low <= int(text) <= high:
        raise WireError(f"{what}: {untrusted_text[:20]!r} is not an integer in {low}..{high}")
    return int(text)
