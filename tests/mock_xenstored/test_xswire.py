"""The wire codec: packets survive any chunking, oversized headers are caught, arguments parse."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xentmem.mock_xenstored.wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    MalformedPacket,
    OversizedPacket,
    Packet,
    PacketReader,
    XsOp,
    errno_of,
    error_reply,
    one_arg,
    pack_args,
    request,
    split_args,
    split_write,
    watch_event,
)

u32 = st.integers(0, (1 << 32) - 1)
packets = st.builds(Packet, op=u32, req_id=u32, tx_id=u32, payload=st.binary(max_size=300))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def test_header_layout_is_four_little_endian_u32() -> None:
    raw = Packet(int(XsOp.WRITE), 0x01020304, 5, b"/a\0v").encode()
    assert raw[:HEADER_SIZE] == bytes([11, 0, 0, 0, 4, 3, 2, 1, 5, 0, 0, 0, 4, 0, 0, 0])
    assert raw[HEADER_SIZE:] == b"/a\0v"


@given(st.lists(packets, max_size=6), st.lists(st.integers(0, 5000), max_size=12))
def test_any_chunking_gives_back_the_same_packets(sent: list[Packet], cuts: list[int]) -> None:
    stream = b"".join(p.encode() for p in sent)
    reader = PacketReader()
    got = [item for chunk in chunked(stream, cuts) for item in reader.feed(chunk)]
    assert got == sent
    assert reader.pending == 0


def oversized_header(length: int, req_id: int = 9) -> bytes:
    return Packet(int(XsOp.READ), req_id, 0, b"").encode()[:12] + length.to_bytes(4, "little")


def test_oversized_header_stops_a_dropping_reader() -> None:
    reader = PacketReader()
    good = Packet(int(XsOp.READ), 1, 0, b"/a\0").encode()
    items = reader.feed(good + oversized_header(4097) + b"x" * 4097 + good)
    assert items[0] == Packet(int(XsOp.READ), 1, 0, b"/a\0")
    assert isinstance(items[1], OversizedPacket)
    assert items[1].header.length == 4097 and items[1].header.req_id == 9
    assert len(items) == 2, "nothing after the bad header is parsed"
    assert reader.broken and reader.feed(good) == []


@given(st.integers(XENSTORE_PAYLOAD_MAX + 1, 20000), st.lists(st.integers(0, 30000), max_size=8))
def test_skipping_reader_resynchronises_after_the_oversized_payload(
    length: int, cuts: list[int]
) -> None:
    follow = Packet(int(XsOp.GET_DOMAIN_PATH), 2, 0, b"3\0")
    stream = oversized_header(length) + b"y" * length + follow.encode()
    reader = PacketReader(skip_oversized=True)
    items = [i for chunk in chunked(stream, cuts) for i in reader.feed(chunk)]
    assert len(items) == 2
    assert isinstance(items[0], OversizedPacket)
    assert items[1] == follow


def test_exactly_the_limit_is_accepted() -> None:
    packet = Packet(int(XsOp.WRITE), 1, 0, b"/a\0" + b"v" * (XENSTORE_PAYLOAD_MAX - 3))
    assert PacketReader().feed(packet.encode()) == [packet]


def test_encode_refuses_what_no_daemon_accepts() -> None:
    with pytest.raises(MalformedPacket):
        Packet(2, 0, 0, b"x" * (XENSTORE_PAYLOAD_MAX + 1)).encode()
    for op, req_id, tx_id in ((2, 1 << 32, 0), (-1, 0, 0), (2, 0, -1), (1 << 32, 0, 0)):
        with pytest.raises(MalformedPacket):
            Packet(op, req_id, tx_id, b"").encode()
    with pytest.raises(ValueError):
        pack_args(b"a\0b")


def test_arguments() -> None:
    assert split_args(b"a\0b\0") == [b"a", b"b"]
    assert split_args(b"a\0b") == [b"a"], "bytes after the last NUL are not an argument"
    assert split_args(b"") == []
    assert one_arg(b"/a\0") == b"/a"
    assert one_arg(b"/a") is None and one_arg(b"/a\0b\0") is None and one_arg(b"") is None
    assert split_write(b"/a\0v\0w\0") == (b"/a", b"v\0w\0"), "a value keeps its NULs"
    assert split_write(b"/a") is None
    assert request(XsOp.WRITE, b"/a", value=b"v", req_id=3).payload == b"/a\0v"


def test_errors_and_events() -> None:
    assert error_reply("EACCES", 4, 2) == Packet(int(XsOp.ERROR), 4, 2, b"EACCES\0")
    assert error_reply("EQUOTA", 1, 0).payload == b"EQUOTA\0"
    with pytest.raises(ValueError):
        error_reply("EWHATEVER", 1, 0)
    assert errno_of("EAGAIN") == errno.EAGAIN and errno_of("EQUOTA") is None
    assert watch_event(b"/p", b"tok") == Packet(int(XsOp.WATCH_EVENT), 0, 0, b"/p\0tok\0")
    assert Packet(99, 0, 0, b"").op_name == "op99" and Packet(2, 0, 0, b"").op_name == "READ"
