"""Framing: a message body as xenstore node names and values, within negotiated limits.

The body travels as base64url text (legal in a value and in a node name).  A message is one
node whose *name* is its envelope ``<seq>@<chunks>@<mac>@<text>``, so a watch event alone
delivers a short message; a longer one is split over a few *name parts*, and only a long one
*spills* into values the receiver reads.  The MAC (:class:`~xentmem.xenbus.session_key.
SessionKey`) covers the whole text: a torn, mixed or forged message does not authenticate.
Each end advertises its :class:`Limits` and both use the smaller.  Why these sizes:
``docs/protocol.md`` (Messages, Limits).
"""

from __future__ import annotations

import binascii
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from xentmem.xenbus.body import MAX_OPS_LIMIT, WireError
from xentmem.xenbus.session_key import TAG_CHARS, TAG_RE, SessionKey

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
#: writer's home (measured): ``backend/tmem/<domid>/0/rsp/<slot>/`` is at most 43 of them,
#: then the envelope (:data:`NAME_OVERHEAD`) and this much text.
MAX_INLINE_BYTES = 928
DEFAULT_INLINE_BYTES = 900
#: The longest text in a request's name where the daemon takes long paths (C xenstored: 2048
#: bytes below the home).  C xenstored counts a directory's child names against a guest's
#: 2048-byte record quota (a 24-byte header, 8 bytes a permission, each name and its NUL),
#: and every request slot directory holds one name: 1952 + 40 leaves room for three
#: permissions.  The guest tries it once when it connects (:data:`PROBE_DIR`).
MAX_REQUEST_INLINE_BYTES = 1952
#: The longest text a reply may carry in its name alone, where the daemon allows long paths
#: (C xenstored: 2048 bytes below dom0's home, and ``backend/tmem/<domid>/0/rsp/<slot>/`` is
#: at most 43 of them); the event that carries it (path, token) stays well within 4096 bytes.
MAX_REPLY_INLINE_BYTES = 1960
#: ``<seq>@<chunks>@<mac>@``: at most 19 + 1 + 2 + 1 + 16 + 1 characters (a part's
#: ``<seq>@p<k>@`` is shorter).
NAME_OVERHEAD = 24 + TAG_CHARS
#: Most names one message may be split over (its message node included).  Each part costs the
#: receiver one watch event and saves it a read round trip, which costs more; a text longer
#: than this many names spills into values instead.
MAX_NAME_PARTS = 4
#: What a peer may advertise (``max-parts``); 1 means no name parts.
MAX_NAME_PARTS_LIMIT = 8
#: Sequence numbers run 1 .. MAX_SEQ (a name's 19 digits could say more: refused).
MAX_SEQ = (1 << 63) - 1

#: ``<seq>@`` before a chunk, at the largest sequence number.
_SEQ_PREFIX = len(str(MAX_SEQ)) + 1
#: A message name's and a part name's header; the text after it is checked by _check_text.
_NAME_RE = re.compile(r"(0|[1-9][0-9]{0,18})@(0|[1-9][0-9]?|p[2-9])@(" + TAG_RE + ")@")
_PART_RE = re.compile(r"(0|[1-9][0-9]{0,18})@p([1-8])@")
_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TO_STD_B64 = bytes.maketrans(b"-_", b"+/")
_TO_URL_B64 = bytes.maketrans(b"+/", b"-_")


def to_text(body: bytes) -> str:
    """base64url without padding: printable, newline-free, and legal in a node name."""
    return binascii.b2a_base64(body, newline=False).translate(_TO_URL_B64).rstrip(b"=").decode()


def from_text(untrusted_text: str) -> bytes:
    """Strict inverse of :func:`to_text`: any other character or a bad length is refused."""
    raw = untrusted_text.encode("ascii", "replace")
    _check_text(raw)
    return _decode_text(raw)


def _check_text(untrusted_raw: bytes, refusal: str = "message text is not base64url") -> None:
    """Every byte in the base64url alphabet (one pass in C: what is left after deleting the
    alphabet must be nothing), else WireError(``refusal``)."""
    if untrusted_raw.translate(None, _B64URL_ALPHABET):
        raise WireError(refusal)


def _decode_text(raw: bytes) -> bytes:
    """The body of a text whose characters :func:`_check_text` has checked."""
    if len(raw) % 4 == 1:
        raise WireError("message text is not base64url")
    padded = raw.translate(_TO_STD_B64) + b"=" * (-len(raw) % 4)
    try:
        return binascii.a2b_base64(padded)
    except binascii.Error as exc:  # pragma: no cover - excluded by _check_text and the length
        raise WireError(f"message text is not base64url: {exc}") from None


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
        chunk = self.chunk_for(reply=reply)
        return (self.spill_inline_for(reply=reply) + chunk
                + (self.max_chunks - 1) * (chunk - _SEQ_PREFIX))

    def body_capacity(self, *, reply: bool) -> int:
        """The largest body that fits, in bytes (asked once per message: kept)."""
        return self._body_capacity[reply]

    @functools.cached_property
    def _body_capacity(self) -> dict[bool, int]:
        return {reply: self.text_capacity(reply=reply) * 3 // 4 for reply in (False, True)}


def check_seq(seq: int) -> int:
    """A sequence number in 1 .. :data:`MAX_SEQ`, or WireError saying so."""
    if not 1 <= seq <= MAX_SEQ:
        raise WireError(f"sequence number {seq} is outside 1..{MAX_SEQ}")
    return seq


@dataclass(frozen=True)
class Envelope:
    """What a message node's name says: sequence, chunk count, MAC and the inline text.

    ``chunks == 0``: the whole text is in names: ``inline`` alone, or (``parts`` = n >= 2)
    the texts of parts 1 .. n-1 followed by ``inline``.  Otherwise the text is ``inline``,
    then the node's value, then ``data/1`` .. ``data/<chunks-1>`` (without their ``<seq>@``).
    """

    seq: int
    chunks: int
    mac: str
    inline: str
    #: Names the text is split over, this one included (0: not split).
    parts: int = 0

    @property
    def shape(self) -> str:
        return f"p{self.parts}" if self.parts else str(self.chunks)

    @property
    def name(self) -> str:
        return f"{self.seq}@{self.shape}@{self.mac}@{self.inline}"


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
    match = _NAME_RE.match(untrusted_name)
    if match is None:
        raise WireError(f"{untrusted_name[:40]!a} is not a message name")
    inline = untrusted_name[match.end():]
    _check_text(inline.encode("ascii", "replace"),
                f"{untrusted_name[:40]!a} is not a message name")
    seq, mac = check_seq(int(match[1])), match[3]
    if match[2].startswith("p"):
        parts = int(match[2][1:])
        if parts > limits.max_parts:
            raise WireError(f"message split over {parts} names; at most {limits.max_parts}")
        if not inline:
            raise WireError("a message's last part is empty")
        return Envelope(seq, 0, mac, inline, parts)
    chunks = int(match[2])
    if chunks > limits.max_chunks:
        raise WireError(f"message of {chunks} chunks; at most {limits.max_chunks}")
    if chunks:
        inline_limit = limits.spill_inline_for(reply=reply)
    if len(inline) > inline_limit:
        raise WireError(f"inline text of {len(inline)} characters; at most {inline_limit}")
    if not chunks and not inline:
        raise WireError("an inline message with no text")
    return Envelope(seq, chunks, mac, inline)


def parse_part(untrusted_name: str, limits: Limits, *, reply: bool) -> Part:
    """Check a part node's name against the grammar and the limits."""
    inline_limit = limits.inline_for(reply=reply)
    if len(untrusted_name) > NAME_OVERHEAD + inline_limit:
        raise WireError(f"part name of {len(untrusted_name)} characters is too long")
    match = _PART_RE.match(untrusted_name)
    text = untrusted_name[match.end():] if match is not None else ""
    if match is None or not text:
        raise WireError(f"{untrusted_name[:40]!a} is not a message part")
    _check_text(text.encode("ascii", "replace"), f"{untrusted_name[:40]!a} is not a message part")
    part = Part(check_seq(int(match[1])), int(match[2]), text)
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


def frame(seq: int, body: bytes, limits: Limits, *, reply: bool, key: SessionKey) -> Framed:
    """Lay a body out as nodes: all in the name if it fits, else spilled into values."""
    check_seq(seq)
    text = to_text(body)
    raw = text.encode()
    inline_limit = limits.inline_for(reply=reply)
    if len(text) <= inline_limit:
        return Framed(Envelope(seq, 0, key.mac(seq, "0", raw, reply=reply), text), "", ())
    if inline_limit and len(text) <= inline_limit * limits.max_parts:
        count = -(-len(text) // inline_limit)
        step = -(-len(text) // count)  # even pieces: no name much longer than it must be
        pieces = [text[pos:pos + step] for pos in range(0, len(text), step)]
        parts = tuple(Part(seq, k, piece) for k, piece in enumerate(pieces[:-1], start=1))
        mac = key.mac(seq, f"p{len(pieces)}", raw, reply=reply)
        return Framed(Envelope(seq, 0, mac, pieces[-1], len(pieces)), "", (), parts)
    spill_inline = limits.spill_inline_for(reply=reply)
    chunk = limits.chunk_for(reply=reply)
    prefix = f"{seq}@"
    step = chunk - len(prefix)
    # As few nodes as with the longest name, and as little of the text in the name as that
    # count allows: the name travels again in the watch event and in the receiver's read.
    beyond = len(text) - spill_inline - chunk
    spread = -(-beyond // step) * step if beyond > 0 else 0
    inline_length = max(0, len(text) - chunk - spread)
    inline, rest = text[:inline_length], text[inline_length:]
    first, rest = rest[:chunk], rest[chunk:]
    chunks = tuple((i + 1, prefix + rest[pos:pos + step])
                   for i, pos in enumerate(range(0, len(rest), step)))
    count = 1 + len(chunks)
    if count > limits.max_chunks:
        raise WireError(f"message of {len(body)} bytes needs {count} chunks; "
                        f"at most {limits.max_chunks}")
    mac = key.mac(seq, str(count), raw, reply=reply)
    return Framed(Envelope(seq, count, mac, inline), first, chunks)


def unframe(envelope: Envelope, untrusted_value: str | None,
            untrusted_chunks: Sequence[str], limits: Limits, *, reply: bool, key: SessionKey,
            untrusted_parts: Sequence[Part] = ()) -> bytes:
    """The body of a message from its envelope and its parts or (when spilled) chunk values.

    ``untrusted_value`` is the message node's value and ``untrusted_chunks`` the values of
    ``data/1`` .. ``data/<chunks-1>``; both are ignored for a message in names.
    ``envelope`` and ``untrusted_parts`` (the parts received for the message) come from
    :func:`parse_name` and :func:`parse_part`, which checked their texts: only the values
    are checked here, so every character is checked once.  Then the MAC over the whole text:
    a message that does not authenticate was torn, mixed, or written without ``key``.
    """
    if envelope.parts:
        wanted = list(range(1, envelope.parts))
        if [p.k for p in untrusted_parts] != wanted or any(
                p.seq != envelope.seq for p in untrusted_parts):
            raise WireError(f"message {envelope.seq}: expected parts {wanted}, got "
                            f"{[(p.seq, p.k) for p in untrusted_parts]}")
        raw = ("".join(p.text for p in untrusted_parts) + envelope.inline).encode()
    elif not envelope.chunks:
        raw = envelope.inline.encode()
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
        spilled = "".join(pieces).encode("ascii", "replace")
        _check_text(spilled)  # the names' texts were checked when they were parsed
        raw = envelope.inline.encode() + spilled
    if not key.check_mac(envelope.mac, envelope.seq, envelope.shape, raw, reply=reply):
        raise WireError(f"message {envelope.seq}: its MAC does not match (torn, mixed, or not "
                        "written with this session's key)")
    return _decode_text(raw)
