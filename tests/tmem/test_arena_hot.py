"""The C loops (``xentmem/tmem/_hot.c``) given damaged records: checked as the Python was.

Every field of a record comes from the file and is untrusted: a length over a page, bytes
outside the data region or the map, an object slot that is not one, a second record for a
key, two records over the same bytes.  Each is dropped, counted and reported missing on a
reopen, or dropped on the get that meets it, never served and never read outside the map
(``docs/page-arena.md``, "Reopening").  And each C function refuses arguments that would
take it outside the buffers it is given.
"""

from __future__ import annotations

import logging
from array import array
from pathlib import Path

import pytest

from xentmem.tmem import _hot
from xentmem.tmem.arena import Arena
from xentmem.tmem.arenafile import MIN_SEGMENT, PAGE
from xentmem.tmem.index import PAGE_ALL, PAGE_FIELDS, PAGE_RECORD

KEY = (3, (1, 2, 3), 9)
OTHER = (3, (1, 2, 3), 10)
ALLOCATORS = ["zbud", "zsmalloc"]


def small(path: Path, allocator: str) -> Arena:
    return Arena.open(path, allocator=allocator, segment_size=MIN_SEGMENT,
                      max_bytes=16 * MIN_SEGMENT)


def filled(path: Path, allocator: str) -> None:
    with small(path, allocator) as arena:
        arena.put(KEY, b"A" * 1500)
        arena.put(OTHER, b"B" * 700)


def edit_record(path: Path, allocator: str, slot: int, **fields: int) -> None:
    """Rewrite fields of page record ``slot`` in the closed file, its commit word kept
    (``commit=True``: made right for the new fields, as a writer that meant it would)."""
    names = ("obj", "index", "where", "length", "sub")
    with small(path, allocator) as arena:
        off = arena._index.pages.offset(slot)
        rec = dict(zip(names, PAGE_FIELDS.unpack_from(arena._mm, off)))
        offset_bytes = arena._mm[off:off + PAGE_RECORD]
    remake = fields.pop("commit", False)
    rec.update(fields)
    raw = bytearray(offset_bytes)
    PAGE_FIELDS.pack_into(raw, 0, *(rec[n] for n in names))
    if remake:
        with small(path, allocator) as arena:
            data = bytes(arena._mm[arena._data + rec["where"] * 16:][: rec["length"]])
        commit = _hot.page_commit(data, *(rec[n] for n in names))
        raw[PAGE_FIELDS.size:] = commit.to_bytes(4, "little")
    with path.open("r+b") as f:
        f.seek(off)
        f.write(raw)


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_a_record_longer_than_a_page_is_dropped_on_reopen(
    tmp_path: Path, allocator: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "arena"
    filled(path, allocator)
    edit_record(path, allocator, 0, length=0xFFFF)
    with caplog.at_level(logging.ERROR), small(path, allocator) as arena:
        assert arena.report.dropped_records == 1 and len(arena) == 1
        assert arena.report.lost == [KEY]
        assert arena.get(KEY) is None
        assert arena.get(OTHER) == b"B" * 700
    assert "more than a page" in caplog.text


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_a_record_naming_no_object_is_dropped_on_reopen(tmp_path: Path, allocator: str) -> None:
    path = tmp_path / "arena"
    filled(path, allocator)
    edit_record(path, allocator, 1, obj=0xFFFFFFFF)
    with small(path, allocator) as arena:
        assert arena.report.dropped_records == 1 and len(arena) == 1
        assert arena.report.lost == [("object slot", 0xFFFFFFFF)]
        assert arena.get(KEY) == b"A" * 1500


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_a_second_record_for_a_key_is_dropped_on_reopen(tmp_path: Path, allocator: str) -> None:
    path = tmp_path / "arena"
    filled(path, allocator)
    edit_record(path, allocator, 1, index=KEY[2], commit=True)  # OTHER's record, now KEY's
    with small(path, allocator) as arena:
        assert arena.report.dropped_records == 1 and len(arena) == 1
        assert arena.get(KEY) == b"A" * 1500  # the first record stands
        assert arena.get(OTHER) is None


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_two_records_over_the_same_bytes_keep_one(
    tmp_path: Path, allocator: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "arena"
    filled(path, allocator)
    with small(path, allocator) as arena:
        _, first, _ = arena._index.find_page(arena._object((3, 1, 2, 3), False), 9)
    # OTHER's record over KEY's bytes, with a commit word that matches them: the allocator
    # cannot claim them twice.
    edit_record(path, allocator, 1, where=first[2], length=first[3], sub=first[4],
                commit=True)
    with caplog.at_level(logging.ERROR), small(path, allocator) as arena:
        assert arena.report.dropped_records == 1 and len(arena) == 1
        assert arena.get(KEY) == b"A" * 1500
        assert arena.get(OTHER) is None
        arena.put(OTHER, b"C" * 900)  # the dropped slot and bytes are usable again
        assert arena.get(OTHER) == b"C" * 900 and arena.get(KEY) == b"A" * 1500
    assert "overlap" in caplog.text
    with small(path, allocator) as arena:
        assert arena.report.dropped_records == 0 and len(arena) == 2


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("field,value", [("where", 0xFFFFFFFF), ("length", 0xFFFF)])
@pytest.mark.parametrize("exclusive", [False, True])
def test_a_record_damaged_while_open_is_never_read_outside_the_map(
    tmp_path: Path, allocator: str, field: str, value: int, exclusive: bool
) -> None:
    path = tmp_path / "arena"
    filled(path, allocator)
    with small(path, allocator) as arena:
        slot, _, _ = arena._index.find_page(arena._object((3, 1, 2, 3), False), 9)
        at = arena._index.pages.offset(slot) + {"where": 8, "length": 12}[field]
        size = 4 if field == "where" else 2
        arena._mm[at:at + size] = value.to_bytes(size, "little")
        read = arena.take if exclusive else arena.get
        assert read(KEY) is None
        assert arena.checksum_failures == 1 and len(arena) == 1
        assert arena.get(KEY) is None
        assert arena.get(OTHER) == b"B" * 700
        arena.put(KEY, b"D" * 1200)  # the allocator was not misled into freeing elsewhere
        assert arena.get(KEY) == b"D" * 1200 and arena.get(OTHER) == b"B" * 700
    with small(path, allocator) as arena:
        assert arena.report.dropped_records == arena.report.checksum_failures == 0
        assert arena.get(KEY) == b"D" * 1200 and arena.get(OTHER) == b"B" * 700


# -- the C functions' own guards ----------------------------------------------------------------


def test_the_c_functions_refuse_to_reach_outside_their_buffers() -> None:
    mm = bytearray(4096)
    full = array("I", [10_000] * 16)  # every bucket names a slot far beyond the map
    for tag in range(32):  # whatever the key's tag, its bucket's is one of these
        full[tag % 16] = (tag << 27) | 10_000
    with pytest.raises(ValueError, match="outside the arena"):
        for obj in range(64):  # some key's tag matches a bucket's: its record is read
            _hot.find_page(full, mm, 0, obj, 2)
    with pytest.raises(ValueError, match="records beyond the arena"):
        _hot.rehash_records(array("I", bytes(64)), mm, 0, 1000)
    with pytest.raises(ValueError, match="outside the arena"):
        _hot.rehash_pages(array("I", bytes(64)), mm, 0, array("I", [10_000]))
    with pytest.raises(ValueError, match="outside the arena"):
        _hot.rehash_pages(array("I", bytes(64)), mm, 0, array("I", [1 << 27]))  # slot -1
    with pytest.raises(ValueError, match="does not fit"):
        _hot.copy_page(mm, 4000, b"x" * 200, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        _hot.link_free(mm, 4000, 64, bytes(8))
    with pytest.raises(IndexError, match="out of range"):
        nxt = array("I", bytes(4))
        _hot.add_page(mm, 0, 5, 0, 0, 0, 0, 0, 1, array("I", bytes(64)), 0, 0, nxt, nxt,
                      nxt, nxt)
    links = array("I", bytes(40))
    with pytest.raises(ValueError, match="out of range"):
        _hot.scan_pages(mm, 0, 10_000, 0, bytearray(), bytearray(1), array("I", bytes(64)), links,
                        links, links, links)
    cycle = array("I", [2, 1])  # slot 0 -> slot 1 -> slot 0 ...
    with pytest.raises(ValueError, match="page list is broken"):
        _hot.object_pages(cycle, 1)
    with pytest.raises(ValueError, match="page list is broken"):
        _hot.object_sizes(mm, 0, array("I", [9]), 1)  # names slot 8 of a 1-slot list
    with pytest.raises(ValueError, match="outside the arena"):
        _hot.object_sizes(mm, 4090, array("I", [0]), 1)
    with pytest.raises(OverflowError):
        _hot.page_commit(b"", 1 << 32, 0, 0, 0, 0)
    assert mm == bytearray(4096)  # nothing written by a refused call


def test_page_sound_and_zs_chain_has_stay_inside_the_map() -> None:
    """What a delete checks before it frees: a record outside the map, with no commit word,
    naming bytes past the map or failing its commit word is not sound; a free chain that
    loops, names an object past its zspage's or a link past the map is broken (-1)."""
    mm = bytearray(4096)
    data = b"P" * 100
    mm[1024:1124] = data
    commit = _hot.page_commit(data, 1, 2, 64, 100, 0)  # where 64: byte 1024
    PAGE_ALL.pack_into(mm, 0, 1, 2, 64, 100, 0, commit)
    assert _hot.page_sound(mm, 0, 0, 0) is True
    assert _hot.page_sound(mm, 0, 0, 300) is False  # the record is past the map
    assert _hot.page_sound(mm, 0, 4000, 0) is False  # its bytes are past the map
    mm[1024] ^= 1
    assert _hot.page_sound(mm, 0, 0, 0) is False
    mm[1024] ^= 1
    PAGE_ALL.pack_into(mm, 20, 1, 2, 64, 100, 0, 0)
    assert _hot.page_sound(mm, 0, 0, 1) is False  # no commit word
    zspage = bytearray(4096)
    for i, nxt in enumerate([2, 0xFFFF, 3, 1]):  # 0 -> 2 -> 3 -> 1, end
        zspage[i * 64 : i * 64 + 2] = nxt.to_bytes(2, "little")
    assert [_hot.zs_chain_has(zspage, 0, 64, 8, 0, i) for i in range(5)] == [1, 1, 1, 1, 0]
    assert _hot.zs_chain_has(zspage, 0, 64, 8, 0xFFFF, 0) == 0  # no free object
    zspage[64:66] = (0).to_bytes(2, "little")  # ... 1 -> 0: a loop
    assert _hot.zs_chain_has(zspage, 0, 64, 8, 0, 7) == -1
    zspage[64:66] = (9).to_bytes(2, "little")  # ... 1 -> 9, past the 8 objects
    assert _hot.zs_chain_has(zspage, 0, 64, 8, 0, 7) == -1
    assert _hot.zs_chain_has(zspage, 4000, 64, 8, 0, 7) == -1  # a link past the map


def test_the_commit_word_is_xxh3_seeded_by_the_record() -> None:
    import xxhash

    data = b"some page bytes"
    obj, index, where, length, sub = 7, 9, 123, len(data), 2
    seed = ((obj << 32) | index) ^ (
        (((where << 32) | (sub << 16) | length) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
    expected = (xxhash.xxh3_64_intdigest(data, seed) & 0xFFFFFFFF) or 1
    assert _hot.page_commit(data, obj, index, where, length, sub) == expected


# -- the rebuild's claims (``claim_zbud``, ``claim_zsmalloc``, ``link_zspages``) ---------------


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("field,value", [("sub", 999), ("where", 1), ("where", 0x0FFFFFFF)])
def test_a_record_naming_no_allocation_of_its_size_is_dropped_on_reopen(
    tmp_path: Path, allocator: str, field: str, value: int
) -> None:
    """A record whose checksum was made right for a handle the allocator cannot hold (an
    object index past its class's, bytes not where its allocator puts them, a frame past
    the reserved ones) is refused by the C claims (a frame whose memory was given back, by
    the pass before them): dropped, reported, the rest served."""
    path = tmp_path / "arena"
    filled(path, allocator)
    with small(path, allocator) as arena:
        data_end = arena._frames.total() * PAGE
    if field == "where" and value > 1:
        value = (data_end - 720) // 16  # inside the data, where neither puts 700 bytes
    edit_record(path, allocator, 1, commit=True, **{field: value})
    with small(path, allocator) as arena:
        assert arena.report.dropped_records == 1 and len(arena) == 1
        assert arena.report.lost == [OTHER]
        assert arena.get(KEY) == b"A" * 1500 and arena.get(OTHER) is None
        arena.put(OTHER, b"E" * 2000)
        assert arena.get(OTHER) == b"E" * 2000 and arena.get(KEY) == b"A" * 1500


def records(*handles: tuple[int, int, int]) -> bytearray:
    """Page records naming handles (where, length, sub), slots 0, 1, ..."""
    out = bytearray()
    for where, length, sub in handles:
        out += PAGE_ALL.pack(0, 0, where, length, sub, 1)
    return out


def test_claim_zbud_refuses_what_no_frame_can_hold() -> None:
    recs = records(
        (4, 100, 0),          # a first buddy of frame 0: claimed
        (4, 100, 0),          # the same again: refused (overlap)
        (256 - 4, 30, 0),     # frame 0's last buddy (1 chunk at the frame's end): claimed
        (256 + 5, 100, 0),    # not where a buddy starts: refused
        (256 + 4, 100, 1),    # zbud has no sub: refused
        (512, 4000, 0),       # frame 2, a page of its own: claimed
        (768, 100, 0),        # offset 0 of a frame, but a buddy's size: refused
        (4 + 256 * 8, 100, 0),  # frame 8, past the frame map: refused
        (0, 0, 0),            # a zero page: nothing to claim, not refused
    )
    state, first, last = bytearray(4), bytearray(4), bytearray(4)
    slots = array("I", [*range(9), 10_000])  # and a slot past the map: refused
    refused, zbud, huge = _hot.claim_zbud(recs, 0, slots, state, first, last)
    assert array("I", refused).tolist() == [1, 3, 4, 6, 7, 10_000]
    assert (zbud, huge) == (1, 1)
    assert list(state) == [1, 0, 2, 0] and first[0] == 2 and last[0] == 1


def zs_tables(size: int, pages: int, objs: int) -> tuple[array, ...]:
    """zsmalloc class tables with one class (id 0) for every size."""
    by_size = array("H", bytes(2 * 4097))
    sizes, npages, nobjs = (array("H", bytes(2 * _hot.ZS_CLASSES)) for _ in range(3))
    sizes[0], npages[0], nobjs[0] = size, pages, objs
    return by_size, sizes, npages, nobjs


def test_claim_zsmalloc_refuses_what_no_zspage_can_hold() -> None:
    by_size, sizes, npages, nobjs = zs_tables(64, 1, 64)
    recs = records(
        (4, 50, 1),           # object 1 of the zspage at frame 0: claimed
        (4, 50, 1),           # the same object again: refused
        (8, 50, 1),           # object 1 of a zspage that starts mid-frame: refused
        (4, 50, 70),          # object 70 of a 64-object class: refused
        (0, 50, 1),           # a zspage before the data region: refused
        (256 * 6, 50, 0),     # frame 6, past the arrays: refused
        (0, 0, 0),            # a zero page: not refused
    )
    state = bytearray(4)
    class_of, inuse, freehead = (array("H", bytes(8)) for _ in range(3))
    used = bytearray(4 * 4096 // 16 // 8)
    counts = array("I", bytes(8 * _hot.ZS_CLASSES))
    slots = array("I", [*range(7), 1 << 31])
    refused, frames = _hot.claim_zsmalloc(recs, 0, slots, state, class_of, inuse, used,
                                          by_size, sizes, npages, nobjs, counts)
    assert array("I", refused).tolist() == [1, 2, 3, 4, 5, 1 << 31]
    assert frames == 1 and list(state) == [3, 0, 0, 0]
    assert class_of[0] == 1 and inuse[0] == 1 and counts[:2].tolist() == [1, 1]
    mm = bytearray(4 * 4096)
    assert _hot.link_zspages(mm, 0, class_of, used, sizes, nobjs, freehead) == 1
    assert freehead[0] == 0 and mm[0:2] == (2).to_bytes(2, "little")  # 0 -> 2: 1 is used
    assert mm[63 * 64:63 * 64 + 2] == b"\xff\xff"
    with pytest.raises(ValueError, match="too short"):
        _hot.claim_zsmalloc(recs, 0, slots, state, class_of, inuse, used, array("H", [0]),
                            sizes, npages, nobjs, counts)
    with pytest.raises(ValueError, match="does not fit"):  # a zspage past the map
        _hot.link_zspages(bytearray(100), 0, class_of, used, sizes, nobjs, freehead)
    with pytest.raises(ValueError, match="does not fit"):  # a class of no size
        _hot.link_zspages(mm, 0, array("H", [2]), used, sizes, nobjs, freehead)


def one_page(data: bytes, where: int = 2) -> tuple[bytearray, array, list[array]]:
    """A map with page (obj 0, index 5) of ``data`` at ``16 * where`` of a data region at
    1024, its record in slot 0, and its table and links, as the arena would have them."""
    mm = bytearray(4096)
    mm[1024 + 16 * where : 1024 + 16 * where + len(data)] = data
    table = array("I", bytes(64))
    links = [array("I", bytes(4)) for _ in range(4)]  # next, prev, obj_head, obj_pages
    _, tag, bucket = _hot.find_page(table, mm, 0, 0, 5)
    commit = _hot.page_commit(data, 0, 5, where, len(data), 0)
    _hot.add_page(mm, 0, 0, 0, 5, where, len(data), 0, commit, table, bucket, tag, *links)
    return mm, table, links


def test_take_page_drops_a_sound_page_and_refuses_a_damaged_one() -> None:
    mm, table, links = one_page(b"page bytes")
    got = _hot.take_page(table, mm, 0, 1024, 0, 5, *links)
    assert got == (b"page bytes", 0, 2, 10, 0, 0)
    assert mm[16:20] == bytes(4) and 0xFFFFFFFF in table  # commit word zeroed, bucket removed
    assert links[2][0] == 0 and links[3][0] == 0  # the object's list and count
    assert _hot.take_page(table, mm, 0, 1024, 0, 5, *links) is None
    # Bytes changed, or a record naming bytes past the map: (slot, bucket), nothing changed.
    for damage in ("bytes", "where", "length"):
        mm, table, links = one_page(b"page bytes")
        if damage == "bytes":
            mm[1024 + 32] ^= 1
        else:
            at, size = {"where": (8, 4), "length": (12, 2)}[damage]
            mm[at:at + size] = b"\xff" * size
        before, table_before = bytes(mm), table.tobytes()
        got = _hot.take_page(table, mm, 0, 1024, 0, 5, *links)
        assert len(got) == 2 and got[0] == 0
        assert bytes(mm) == before and table.tobytes() == table_before
    # A slot or object past the arrays, or a list naming a slot past them: refused before
    # anything is written.
    mm, table, links = one_page(b"page bytes")
    before = bytes(mm)
    with pytest.raises(IndexError, match="out of range"):
        _hot.take_page(table, mm, 0, 1024, 0, 5, array("I"), *links[1:])
    with pytest.raises(IndexError, match="out of range"):
        _hot.take_page(table, mm, 0, 1024, 0, 5, *links[:2], array("I"), links[3])
    links[0][0] = 99
    with pytest.raises(ValueError, match="page list is broken"):
        _hot.take_page(table, mm, 0, 1024, 0, 5, *links)
    assert bytes(mm) == before
