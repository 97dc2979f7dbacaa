"""The option records parse as ``doc/proto.md`` says, and refuse what does not add up."""

from __future__ import annotations

import struct

import pytest

from xentmem.guestd.nbd import proto


def info(name: bytes, requests: tuple[int, ...], extra: bytes = b"") -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
            + struct.pack(f">{len(requests)}H", *requests) + extra)


def test_an_info_request_parses() -> None:
    parsed = proto.parse_info_request(info(b"swap0", (3, 1)))
    assert parsed == proto.InfoRequest("swap0", (3, 1))
    assert proto.parse_info_request(info(b"", ())) == proto.InfoRequest("", ())


@pytest.mark.parametrize("data", [
    b"",  # shorter than the 6 bytes of the two lengths
    b"\0\0\0\x05ab\0\0",  # a name longer than the data
    info(b"x", (3,), extra=b"\0"),  # a byte too many
    info(b"x", (3,))[:-1],  # a request cut short
    info(b"a\0b", ()),  # a NUL in a string
    info(b"\xff\xfe", ()),  # not UTF-8
    info(b"n" * 4097, ()),  # longer than a string may be
])
def test_a_malformed_info_request_is_invalid(data: bytes) -> None:
    with pytest.raises(proto.OptionInvalid):
        proto.parse_info_request(data)


def test_the_block_size_constraints_follow_the_rules() -> None:
    """Minimum a power of 2 and at most 64 KiB; preferred a power of 2, at least max(min,
    512); maximum a multiple of the minimum, at least the preferred ("Block size
    constraints")."""
    for size in (proto.MIN_BLOCK, proto.PREFERRED_BLOCK):
        assert size & (size - 1) == 0
    assert proto.MIN_BLOCK <= 65536
    assert max(proto.MIN_BLOCK, 512) <= proto.PREFERRED_BLOCK
    assert proto.MAX_BLOCK % proto.MIN_BLOCK == 0
    assert max(proto.PREFERRED_BLOCK, 1 << 20) <= proto.MAX_BLOCK
    assert proto.MAX_BLOCK < proto.DOS_PAYLOAD
    kind, minimum, preferred, maximum = struct.unpack(">HIII", proto.info_block_size())
    assert (kind, minimum, preferred, maximum) == (3, 4096, 4096, proto.MAX_BLOCK)


def test_the_transmission_flags_offer_what_is_served() -> None:
    flags = proto.TRANSMISSION_FLAGS
    for bit in (0, 2, 3, 5, 6, 8):  # HAS_FLAGS, FLUSH, FUA, TRIM, WRITE_ZEROES, MULTI_CONN
        assert flags & (1 << bit)
    for bit in (1, 4, 7, 10, 11):  # READ_ONLY, ROTATIONAL, DF, CACHE, FAST_ZERO
        assert not flags & (1 << bit)
