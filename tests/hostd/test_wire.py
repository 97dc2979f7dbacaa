"""The wire format on its own: exact layouts, every limit, and fuzzed untrusted input."""

from __future__ import annotations

import base64
import errno
import hmac
import os
import re
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentmem.tmem.abi import PAGE_SIZE, Oid, PoolUuid, TmemOp
from xentmem.xenbus.area import parse_domid, parse_uint
from xentmem.xenbus.body import (
    MAX_OPS_LIMIT,
    WIRE_VERSION,
    OpRecord,
    PageEncoding,
    ResultRecord,
    WireError,
    decode_page,
    decode_reply,
    decode_request,
    encode_page,
    encode_reply,
    encode_request,
    reply_size_bound,
    request_size,
)
from xentmem.xenbus.framing import (
    MAX_INLINE_BYTES,
    MAX_REPLY_INLINE_BYTES,
    MAX_REQUEST_INLINE_BYTES,
    MAX_SEQ,
    NAME_OVERHEAD,
    Envelope,
    Limits,
    Part,
    frame,
    from_text,
    parse_name,
    parse_part,
    to_text,
    unframe,
)
from xentmem.xenbus.session_key import TAG_CHARS, SessionKey

TEXT = (b"static int tmem_put(struct pool *p, struct oid *o, u32 index)\n{\n\treturn 0;\n}\n"
        * 60)[:PAGE_SIZE]
RANDOM = os.urandom(PAGE_SIZE)
#: About 2000 characters on the wire: more than one short name, less than four.
MIXED = (RANDOM[:1400] + TEXT)[:PAGE_SIZE]
LIMITS = Limits()
KEY = SessionKey(bytes(range(32)))
#: A well-formed MAC field (it matches nothing).
MAC = "A" * TAG_CHARS
SLOT = "x" * TAG_CHARS
NO_PARTS = Limits(max_parts=1)
# What pyxs and both daemons accept: printable ASCII without newlines; names also [A-Za-z0-9_@-].
VALUE_RE = re.compile(r"[\x20-\x7e]*")
NAME_RE = re.compile(r"[A-Za-z0-9_@-]+")


# -- pages --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("page", "encoding"), [
    (bytes(PAGE_SIZE), PageEncoding.ZERO),
    (TEXT, PageEncoding.LZ4),
    (RANDOM, PageEncoding.RAW),
])
def test_pages_take_their_smallest_honest_form(page: bytes, encoding: PageEncoding) -> None:
    got, data = encode_page(page)
    assert got == encoding
    assert decode_page(got, data) == page
    assert len(data) == {PageEncoding.ZERO: 0, PageEncoding.RAW: PAGE_SIZE}.get(got, len(data))
    assert encode_page(TEXT, compress=False) == (PageEncoding.RAW, TEXT)


@pytest.mark.parametrize(("encoding", "data", "why"), [
    (PageEncoding.ZERO, b"x", "zero page carries no data"),
    (PageEncoding.RAW, b"x" * 100, "raw page is 4096"),
    (PageEncoding.LZ4, b"\xff" * 50, "does not decompress"),
    (PageEncoding.LZ4, b"", "lz4 page is 1..4095"),
    (7, b"", "unknown page encoding"),
])
def test_bad_pages_are_refused(encoding: int, data: bytes, why: str) -> None:
    with pytest.raises(WireError, match=why):
        decode_page(encoding, data)


def test_an_lz4_block_of_the_wrong_size_is_refused() -> None:
    import lz4.block

    short = lz4.block.compress(b"a" * 1000, store_size=False)
    with pytest.raises(WireError, match="decompresses to 1000 bytes"):
        decode_page(PageEncoding.LZ4, short)


# -- bodies -------------------------------------------------------------------------------------


def test_request_layout_is_fixed_records_then_pages() -> None:
    ops = [OpRecord.new_pool(PoolUuid(1, 2), 0x01000002),
           OpRecord.put_page(3, Oid(4, 5, 6), 7, TEXT),
           OpRecord.get_page(3, Oid(4), 8),
           OpRecord.flush_object(3, Oid(9))]
    body = encode_request(ops)
    assert body[:2] == bytes([WIRE_VERSION, 4])
    assert struct.unpack_from("<BiQQQII", body, 2) == (1, 0, 1, 2, 0, 0, 0x01000002)
    cmd, pool, w0, w1, w2, index, extra = struct.unpack_from("<BiQQQII", body, 2 + 37)
    assert (cmd, pool, w0, w1, w2, index) == (4, 3, 4, 5, 6, 7)
    assert extra >> 16 == PageEncoding.LZ4 and len(body) == 2 + 4 * 37 + (extra & 0xFFFF)
    assert request_size(ops) == len(body)
    back = decode_request(body)
    assert back[0] == ops[0] and back[2:] == ops[2:]
    assert back[1].page() == TEXT


def test_reply_carries_return_values_and_found_pages() -> None:
    ops = [OpRecord.get_page(0, Oid(1), 0), OpRecord.get_page(0, Oid(1), 1),
           OpRecord.put_page(0, Oid(1), 2, TEXT), OpRecord.new_pool(PoolUuid(0, 0), 0x01000000)]
    results = [ResultRecord.with_page(TEXT), ResultRecord(0), ResultRecord(-errno.ENOMEM),
               ResultRecord(15)]
    body = encode_reply(results)
    assert len(body) <= reply_size_bound(ops)
    back = decode_reply(body, ops)
    assert [r.rc for r in back] == [1, 0, -errno.ENOMEM, 15]
    assert back[0].page() == TEXT
    assert decode_reply(encode_reply([], status=-errno.EINVAL), ops) == [
        ResultRecord(-errno.EINVAL)] * 4


@pytest.mark.parametrize(("cmd", "rc", "why"), [
    (TmemOp.NEW_POOL, 16, "beyond 15"),
    (TmemOp.PUT_PAGE, 2, "only 1, 0 or -errno"),
    (TmemOp.FLUSH_PAGE, 7, "only 1, 0 or -errno"),
    (TmemOp.GET_PAGE, -5000, "not a -errno"),
])
def test_replies_with_values_the_op_cannot_give_are_refused(cmd: int, rc: int, why: str) -> None:
    op = OpRecord(cmd, 0, Oid(1), 0)
    body = struct.pack("<BBi", WIRE_VERSION, 1, 0) + struct.pack("<iI", rc, 0)
    with pytest.raises(WireError, match=why):
        decode_reply(body, [op])


REPLY_OF_ONE = struct.pack("<BBi", WIRE_VERSION, 1, 0)


def test_replies_that_do_not_match_their_request_are_refused() -> None:
    get = OpRecord.get_page(0, Oid(1), 0)
    put = OpRecord.put_page(0, Oid(1), 0, TEXT)
    two = encode_reply([ResultRecord(0), ResultRecord(0)])
    with pytest.raises(WireError, match="2 results for 1 ops"):
        decode_reply(two, [get])
    with pytest.raises(WireError, match="carries page data"):  # a page for a put
        decode_reply(REPLY_OF_ONE + struct.pack("<iI", 1, 4) + b"abcd", [put])
    with pytest.raises(WireError, match="runs past the end"):
        decode_reply(REPLY_OF_ONE + struct.pack("<iI", 1, 4000), [get])
    with pytest.raises(WireError, match="stray bytes"):
        decode_reply(encode_reply([ResultRecord(0)]) + b"x", [get])
    with pytest.raises(WireError, match=f"wire version {WIRE_VERSION + 1}"):
        decode_reply(struct.pack("<BBi", WIRE_VERSION + 1, 0, 0), [])


def test_unknown_op_codes_still_parse_so_they_can_be_answered() -> None:
    body = struct.pack("<BB", WIRE_VERSION, 1) + struct.pack("<BiQQQII", 9, 0, 0, 0, 0, 0, 0)
    (op,) = decode_request(body)
    assert op.cmd == 9


ONE_OP = struct.pack("<BB", WIRE_VERSION, 1)


@pytest.mark.parametrize(("body", "why"), [
    (b"", "shorter than its header"),
    (struct.pack("<BB", WIRE_VERSION, 0), "carries 0 ops"),
    (struct.pack("<BB", WIRE_VERSION, MAX_OPS_LIMIT + 1), f"carries {MAX_OPS_LIMIT + 1} ops"),
    (struct.pack("<BB", WIRE_VERSION, 2) + b"\0" * 37, "too short for 2 ops"),
    (struct.pack("<BB", WIRE_VERSION, 1) + struct.pack("<BiQQQII", 4, 0, 0, 0, 0, 0, (9 << 16)),
     "unknown page encoding 9"),
    (ONE_OP + struct.pack("<BiQQQII", 4, 0, 0, 0, 0, 0, (1 << 16) | 5000),
     "LZ4 page of 5000 bytes"),
    (ONE_OP + struct.pack("<BiQQQII", 4, 0, 0, 0, 0, 0, (1 << 16) | 10),
     "runs past the end"),
])
def test_malformed_requests_are_refused(body: bytes, why: str) -> None:
    with pytest.raises(WireError, match=why):
        decode_request(body)


# -- text, names and chunks -----------------------------------------------------------------


def test_text_is_strict_base64url() -> None:
    assert from_text(to_text(b"\x00\xff\xfe")) == b"\x00\xff\xfe"
    for bad in ("AB=C", "A", "AB C", "é", "AB/C"):
        with pytest.raises(WireError):
            from_text(bad)


def test_small_messages_live_in_the_name_alone() -> None:
    framed = frame(7, encode_request([OpRecord.get_page(0, Oid(1), 2)]), LIMITS, reply=False,
                   key=KEY)
    assert framed.envelope.chunks == 0 and framed.value == "" and framed.chunks == ()
    name = framed.envelope.name
    assert NAME_RE.fullmatch(name) and name.startswith("7@0@")
    envelope = parse_name(name, LIMITS, reply=False)
    assert unframe(envelope, None, (), LIMITS, reply=False, key=KEY) == encode_request(
        [OpRecord.get_page(0, Oid(1), 2)])


@pytest.mark.parametrize("pages", [[TEXT], [RANDOM], [RANDOM] * 8, [TEXT, RANDOM] * 5])
def test_large_messages_spill_within_every_daemons_limits(pages: list[bytes]) -> None:
    ops = [OpRecord.put_page(0, Oid(1), i, p) for i, p in enumerate(pages)]
    body = encode_request(ops)
    framed = frame(123456, body, NO_PARTS, reply=False, key=KEY)
    assert framed.parts == () and framed.envelope.parts == 0
    name = framed.envelope.name
    # oxenstored: 2048-byte values and 1024-byte paths below a domain's home; pyxs: printable.
    assert len(name) <= NAME_OVERHEAD + MAX_INLINE_BYTES
    assert len(f"device/tmem/0/req/{SLOT}/{name}") <= 1024
    assert len(f"backend/tmem/32751/0/rsp/{SLOT}/{name}") <= 1024
    for value in (framed.value, *(v for _, v in framed.chunks)):
        assert len(value) <= LIMITS.chunk_bytes <= 2048 - 64 and VALUE_RE.fullmatch(value)
    assert [i for i, _ in framed.chunks] == list(range(1, framed.envelope.chunks))
    envelope = parse_name(name, LIMITS, reply=False)
    assert unframe(envelope, framed.value, [v for _, v in framed.chunks], LIMITS,
                   reply=False, key=KEY) == body


@pytest.mark.parametrize(("pages", "reply"), [
    ([RANDOM[:1500] + bytes(PAGE_SIZE - 1500)], True), ([MIXED], True), ([MIXED], False),
    ([RANDOM], True), ([RANDOM], False), ([TEXT, RANDOM] * 3, False), ([RANDOM] * 8, True)])
def test_a_spilled_name_carries_only_what_the_values_cannot(pages: list[bytes],
                                                            reply: bool) -> None:
    """The name travels three times (the write, the watch event, the receiver's read of the
    value): as few nodes as with the longest name, and of the text as little in the name."""
    limits = Limits(reply_chunk_bytes=3000, max_parts=1)
    body = encode_request([OpRecord.put_page(0, Oid(1), i, p) for i, p in enumerate(pages)])
    text = to_text(body)
    framed = frame(4321, body, limits, reply=reply, key=KEY)
    chunk, spill = limits.chunk_for(reply=reply), limits.spill_inline_for(reply=reply)
    step = chunk - len("4321@")
    fewest = 1 + max(0, -(-(len(text) - spill - chunk) // step))
    assert framed.envelope.chunks == fewest
    assert len(framed.envelope.inline) == max(0, len(text) - chunk - (fewest - 1) * step)
    if len(text) <= chunk:
        assert framed.envelope.inline == "" and framed.value == text
    envelope = parse_name(framed.envelope.name, limits, reply=reply)
    assert unframe(envelope, framed.value, [v for _, v in framed.chunks], limits,
                   reply=reply, key=KEY) == body


@pytest.mark.parametrize(("inline", "page", "count"), [
    (900, MIXED, 3), (900, RANDOM, 0), (MAX_REQUEST_INLINE_BYTES, RANDOM, 3),
    (MAX_REPLY_INLINE_BYTES, RANDOM, 3)])
def test_a_text_a_few_names_long_travels_in_name_parts(inline: int, page: bytes,
                                                       count: int) -> None:
    limits = Limits(inline_bytes=min(inline, MAX_REQUEST_INLINE_BYTES),
                    reply_inline_bytes=inline)
    reply = inline == MAX_REPLY_INLINE_BYTES
    body = encode_request([OpRecord.put_page(0, Oid(1), 0, page)])
    framed = frame(77, body, limits, reply=reply, key=KEY)
    if not count:  # longer than MAX_NAME_PARTS names: it spills into values instead
        assert framed.parts == () and framed.envelope.chunks >= 1
        return
    assert framed.envelope.parts == count and len(framed.parts) == count - 1
    assert framed.value == "" and framed.chunks == ()
    names = [p.name for p in framed.parts] + [framed.envelope.name]
    for name in names:
        assert len(name) <= NAME_OVERHEAD + inline
        where = "backend/tmem/32751/0/rsp" if reply else "device/tmem/0/req"
        assert len(f"{where}/{SLOT}/{name}") <= (1024 if inline <= 900 else 2048)
    parts = [parse_part(p.name, limits, reply=reply) for p in framed.parts]
    envelope = parse_name(framed.envelope.name, limits, reply=reply)
    assert unframe(envelope, None, (), limits, reply=reply, untrusted_parts=parts, key=KEY) == body
    assert len({len(n) for n in names[:-1]}) <= 1  # even pieces


def test_missing_foreign_or_mixed_parts_are_noticed() -> None:
    body = encode_request([OpRecord.put_page(0, Oid(1), i, TEXT) for i in range(2)])
    limits = Limits(inline_bytes=150)
    framed = frame(9, body, limits, reply=False, key=KEY)
    assert framed.envelope.parts == 3
    parts = list(framed.parts)
    envelope = framed.envelope
    with pytest.raises(WireError, match="expected parts"):
        unframe(envelope, None, (), limits, reply=False, untrusted_parts=parts[:-1], key=KEY)
    with pytest.raises(WireError, match="expected parts"):
        unframe(envelope, None, (), limits, reply=False,
                untrusted_parts=[Part(8, 1, parts[0].text), *parts[1:]], key=KEY)
    with pytest.raises(WireError, match="MAC does not match"):
        swapped = [Part(9, 1, parts[1].text), Part(9, 2, parts[0].text)]
        unframe(envelope, None, (), limits, reply=False, untrusted_parts=swapped, key=KEY)
    assert unframe(envelope, None, (), limits, reply=False, untrusted_parts=parts, key=KEY) == body


@pytest.mark.parametrize(("name", "why"), [
    ("1@p0@AAAA", "not a message part"), ("1@p1@", "not a message part"),
    ("1@p1@A A", "not a message part"), ("01@p1@AA", "not a message part"),
    ("1@p4@AAAA", "at most 3 before"), ("1@p1@" + "A" * 901, "at most 900"),
])
def test_malformed_part_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(WireError, match=why):
        parse_part(name, LIMITS, reply=False)


def test_a_message_may_not_claim_more_parts_than_agreed() -> None:
    with pytest.raises(WireError, match="split over 5 names"):
        parse_name(f"3@p5@{MAC}@AAAA", LIMITS, reply=False)
    with pytest.raises(WireError, match="split over 2 names"):
        parse_name(f"3@p2@{MAC}@AAAA", NO_PARTS, reply=False)
    assert parse_name(f"3@p2@{MAC}@AAAA", LIMITS, reply=False).parts == 2


def test_torn_or_mixed_chunks_are_noticed() -> None:
    body = encode_request([OpRecord.put_page(0, Oid(1), i, RANDOM) for i in range(3)])
    framed = frame(5, body, NO_PARTS, reply=False, key=KEY)
    chunks = [v for _, v in framed.chunks]
    envelope = framed.envelope
    with pytest.raises(WireError, match="belongs to another message"):
        unframe(envelope, framed.value, ["6@" + chunks[0][2:], *chunks[1:]], LIMITS,
                reply=False, key=KEY)
    with pytest.raises(WireError, match="MAC does not match"):
        unframe(envelope, framed.value, [chunks[1], chunks[0], *chunks[2:]], LIMITS,
                reply=False, key=KEY)
    with pytest.raises(WireError, match="expected"):
        unframe(envelope, framed.value, chunks[:-1], LIMITS, reply=False, key=KEY)


def test_a_message_too_big_for_the_limits_is_refused() -> None:
    small = Limits(chunk_bytes=256, max_chunks=2, inline_bytes=100, reply_inline_bytes=100,
                   max_parts=2)
    with pytest.raises(WireError, match="needs"):
        frame(1, encode_request([OpRecord.put_page(0, Oid(1), 0, RANDOM)]), small, reply=True,
              key=KEY)


@pytest.mark.parametrize("name", [
    "", f"1@0@{MAC[1:]}@AQ", f"01@0@{MAC}@AQ", f"1@0@{MAC}@", f"1@99@{MAC}@",
    f"1@0@{MAC}@A Q", f"1@0@{MAC[1:]}!@AQ", f"1@0@{MAC}@" + "A" * (MAX_INLINE_BYTES + 1),
    f"99999999999999999999@0@{MAC}@AQ", f"../1@0@{MAC}@AQ", "1@0@00000000@AQ",
    f"{MAX_SEQ + 1}@0@{MAC}@AQ", f"0@0@{MAC}@AQ",
])
def test_names_outside_the_grammar_are_refused(name: str) -> None:
    with pytest.raises(WireError):
        parse_name(name, LIMITS, reply=False)


def test_limits_meet_and_refuse_nonsense() -> None:
    mine = Limits(chunk_bytes=1900, inline_bytes=500, max_chunks=40, max_ops=64)
    theirs = Limits(chunk_bytes=1984, inline_bytes=900, reply_inline_bytes=300, max_chunks=16)
    assert mine.meet(theirs) == Limits(1900, 500, 300, 16, 32)
    for bad in ({"chunk_bytes": 10}, {"inline_bytes": 5000}, {"max_chunks": 0},
                {"max_ops": 65}):
        with pytest.raises(WireError):
            Limits(**bad)  # type: ignore[arg-type]


def test_node_values_are_parsed_with_bounds() -> None:
    assert parse_domid("5") == 5 and parse_domid("32751") == 32751
    assert parse_uint("1984\x00", low=64, high=4000, what="chunk-bytes") == 1984
    for bad in ("", "05", "-1", "32752", "1e3", "\uff15"):  # the last: a fullwidth five
        with pytest.raises(WireError):
            parse_domid(bad)
    with pytest.raises(WireError, match="chunk-bytes"):
        parse_uint("10", low=64, high=4000, what="chunk-bytes")



@pytest.mark.parametrize("parse", [parse_domid, lambda text: parse_uint(
    text, low=0, high=255, what="version")])
def test_a_refused_value_is_quoted_in_printable_ascii(parse: Callable[[str], int]) -> None:
    """Before, the text was quoted with repr(), which keeps non-ASCII characters: the
    message could not be written to an ``error`` node (values are printable ASCII)."""
    with pytest.raises(WireError) as refused:
        parse("\ufffd3\u00e9")
    assert "'\\ufffd3\\xe9'" in str(refused.value)
    assert str(refused.value).isascii() and str(refused.value).isprintable()

# -- fuzz: anything a peer writes is refused cleanly or understood ------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzzed_request_bodies_only_ever_raise_wire_errors(untrusted: bytes) -> None:
    try:
        ops = decode_request(untrusted)
    except WireError:
        return
    assert 1 <= len(ops) <= MAX_OPS_LIMIT


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.sampled_from([1, 2, 4, 5, 6, 7]), min_size=1,
                                         max_size=4))
def test_fuzzed_reply_bodies_only_ever_raise_wire_errors(untrusted: bytes, cmds: list[int]) -> None:
    ops = [OpRecord(cmd, 0, Oid(1), 0) for cmd in cmds]
    try:
        results = decode_reply(untrusted, ops)
    except WireError:
        return
    assert len(results) == len(ops)
    for op, result in zip(ops, results):
        if result.rc == 1 and op.cmd == TmemOp.GET_PAGE:
            assert len(result.data) == PAGE_SIZE


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_names_only_ever_raise_wire_errors(untrusted: str) -> None:
    try:
        envelope = parse_name(untrusted, LIMITS, reply=True)
    except WireError:
        return
    assert isinstance(envelope, Envelope) and envelope.name == untrusted


def _op(kind: str, pool: int, word: int, index: int, page: bytes) -> OpRecord:
    oid = Oid(word, index, 0)
    if kind == "put":
        return OpRecord.put_page(pool, oid, index, page)
    if kind == "get":
        return OpRecord.get_page(pool, oid, index)
    if kind == "flush":
        return OpRecord.flush_page(pool, oid, index)
    if kind == "flobj":
        return OpRecord.flush_object(pool, oid)
    if kind == "new":
        return OpRecord.new_pool(PoolUuid(word, index), 0x01000000)
    return OpRecord.destroy_pool(pool)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "get", "flush", "flobj", "new", "destroy"]),
                          st.integers(0, 15), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                          st.sampled_from([TEXT, RANDOM, bytes(PAGE_SIZE)])),
                min_size=1, max_size=12),
       st.integers(1, 2**40))
def test_any_batch_round_trips_through_names_and_values(batch: list[tuple], seq: int) -> None:
    ops = [_op(kind, pool, word, index, page) for kind, pool, word, index, page in batch]
    body = encode_request(ops)
    framed = frame(seq, body, LIMITS, reply=False, key=KEY)
    envelope = parse_name(framed.envelope.name, LIMITS, reply=False)
    parts = [parse_part(p.name, LIMITS, reply=False) for p in framed.parts]
    assert decode_request(unframe(envelope, framed.value, [v for _, v in framed.chunks],
                                  LIMITS, reply=False, untrusted_parts=parts, key=KEY)) == ops


# -- the session key: names a guess cannot confirm, messages only its holders can write ----------


def test_sequence_numbers_outside_1_to_2_63_are_refused_with_a_clear_error() -> None:
    """A seq of 2^63 or more used to parse (19 digits) and pushed the host's last sequence out
    of the guest's reach; now every end refuses it, saying the range."""
    body = encode_request([OpRecord.get_page(0, Oid(1), 2)])
    for seq in (0, MAX_SEQ + 1, 10**19 - 1):
        with pytest.raises(WireError, match=rf"sequence number {seq} is outside 1\.\.{MAX_SEQ}"):
            frame(seq, body, LIMITS, reply=False, key=KEY)
        with pytest.raises(WireError, match=r"is outside 1\.\."):
            parse_name(f"{seq}@0@{MAC}@AQ", LIMITS, reply=False)
        with pytest.raises(WireError, match=r"is outside 1\.\."):
            parse_part(f"{seq}@p1@AQ", LIMITS, reply=False)
    top = frame(MAX_SEQ, body, LIMITS, reply=True, key=KEY)
    assert parse_name(top.envelope.name, LIMITS, reply=True).seq == MAX_SEQ


def test_a_message_authenticates_only_with_its_key_direction_seq_and_shape() -> None:
    body = encode_request([OpRecord.put_page(0, Oid(1), 0, TEXT)])
    framed = frame(5, body, LIMITS, reply=False, key=KEY)
    envelope = parse_name(framed.envelope.name, LIMITS, reply=False)
    parts = [parse_part(p.name, LIMITS, reply=False) for p in framed.parts]
    assert unframe(envelope, None, (), LIMITS, reply=False, key=KEY,
                   untrusted_parts=parts) == body
    other = SessionKey(bytes(32))
    with pytest.raises(WireError, match="MAC does not match"):
        unframe(envelope, None, (), LIMITS, reply=False, key=other, untrusted_parts=parts)
    with pytest.raises(WireError, match="MAC does not match"):  # a request is no reply
        unframe(envelope, None, (), LIMITS, reply=True, key=KEY, untrusted_parts=parts)
    moved = Envelope(6, envelope.chunks, envelope.mac, envelope.inline, envelope.parts)
    with pytest.raises(WireError, match="MAC does not match"):  # replayed under another seq
        unframe(moved, None, (), LIMITS, reply=False, key=KEY,
                untrusted_parts=[Part(6, p.k, p.text) for p in parts])


def test_names_derive_from_the_key_so_a_guess_confirms_nothing() -> None:
    """Every directory a message's names go to, and every chunk name, depends on the key (and
    not only on the seq): without the key there is nothing to probe for."""
    other = SessionKey(bytes(32))
    for reply in (False, True):
        names = {KEY.slot(seq, part, reply=reply) for seq in range(1, 50) for part in range(4)}
        assert len(names) == 49 * 4
        assert all(re.fullmatch(r"[A-Za-z0-9_-]{16}", n) for n in names)
        assert not names & {other.slot(seq, part, reply=reply)
                            for seq in range(1, 50) for part in range(4)}
        assert KEY.chunk(1, reply=reply) != other.chunk(1, reply=reply)
    assert KEY.slot(1, reply=False) != KEY.slot(1, reply=True)
    assert KEY.chunk(1, reply=False) != KEY.chunk(1, reply=True)


@given(st.binary(min_size=32, max_size=32), st.integers(0, 2**63 - 1), st.integers(0, 255),
       st.binary(max_size=3000))
def test_names_and_macs_are_hmac_sha256_of_the_key(raw: bytes, seq: int, part: int,
                                                   text: bytes) -> None:
    """What the other end computes with any HMAC-SHA256: its first 12 bytes, base64url."""
    key = SessionKey(raw)

    def tag(data: bytes) -> str:
        digest = hmac.digest(raw, data, "sha256")[:12]
        return base64.urlsafe_b64encode(digest).decode()

    assert key.slot(seq, part, reply=False) == tag(struct.pack("<4sQB", b"req/", seq, part))
    assert key.mac(seq, "p2", text, reply=True) == tag(
        struct.pack("<4sQB", b"rsp!", seq, 0) + b"p2@" + text)


def test_the_key_travels_as_hex_and_is_never_shown() -> None:
    key = SessionKey.new()
    assert SessionKey.parse(key.encode() + b"\x00").encode() == key.encode()
    assert key.encode().decode() not in repr(key)
    for bad in (b"", b"00" * 31, b"AB" * 32, b"zz" * 32, b"00" * 33):
        with pytest.raises(WireError, match="session key"):
            SessionKey.parse(bad)
