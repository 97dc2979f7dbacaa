"""Arena files that are not ours or are damaged, and pages whose checksum fails.

What the arena promises (``docs/page-arena.md``): a file that is not an arena, or a newer
version's, is refused and left untouched; an arena of ours with a damaged header, size or
region table is set aside (renamed, never read) and a new one started, saying so, or refused
with ``on_damage="refuse"`` and then unchanged; a page whose bytes or record fail their
checksum is never served: dropped, counted, logged, listed as lost.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from pathlib import Path

import pytest

from xentmem.errors import ArenaDamaged, ArenaError, ArenaRefused, ParamError
from xentmem.tmem import arena as arena_module
from xentmem.tmem.abi import POOL_PRIVATE_EPHEMERAL, PRIVATE_UUID, Oid
from xentmem.tmem.arena import ARENA_PARAMS, Arena
from xentmem.tmem.arenafile import (
    _HEADER,
    DATA,
    MIN_SEGMENT,
    OBJECTS,
    PAGE,
    PAGES,
    REGIONS_AT,
    ArenaFile,
)
from xentmem.tmem.index import PAGE_FIELDS, PAGE_RECORD, Index
from xentmem.tmem.store import ArenaPages, TmemStore

KEY = (3, (1, 2, 3), 9)
OTHER = (3, (1, 2, 3), 10)


def small(path: Path, **kw: object) -> Arena:
    return Arena.open(path, segment_size=MIN_SEGMENT, max_bytes=16 * MIN_SEGMENT, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["zbud", "zsmalloc"])
def filled(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """An arena holding two pages, closed."""
    path = tmp_path / "arena"
    with small(path, allocator=request.param) as arena:
        arena.put(KEY, b"A" * 1500)
        arena.put(OTHER, b"B" * 700)
    return path, request.param


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def page_record_offset(path: Path, slot: int) -> int:
    with small(path) as arena:
        return arena._index.pages.offset(slot)


# -- not ours: refused, untouched -------------------------------------------------------------


def test_a_file_that_is_not_an_arena_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    path.write_bytes(b"#!/bin/sh\necho important\n" * 300)
    before = path.read_bytes()
    for on_damage in ("set-aside", "refuse"):
        with pytest.raises(ArenaRefused, match=rf"{path}: not a xentmem page arena"):
            small(path, on_damage=on_damage)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["arena"]


def test_a_newer_versions_arena_is_refused_and_untouched(tmp_path: Path) -> None:
    import xxhash

    path = tmp_path / "arena"
    small(path).close()
    raw = bytearray(path.read_bytes())
    fields = list(_HEADER.unpack_from(raw))
    fields[1] = 99
    _HEADER.pack_into(raw, 0, *fields)
    raw[_HEADER.size : _HEADER.size + 8] = xxhash.xxh3_64_intdigest(
        bytes(raw[: _HEADER.size])).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ArenaRefused, match=r"format version 99 is newer"):
        small(path)
    assert path.read_bytes() == bytes(raw)


# -- ours but damaged: set aside (or refused), never read -------------------------------------


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("header", "header checksum mismatch"),
        ("short", "size .* is not the .* bytes its header says"),
        ("long", "size .* is not the .* bytes its header says"),
        ("truncated", "truncated"),
    ],
)
def test_a_damaged_arena_is_set_aside_and_a_new_one_started(
    filled: tuple[Path, str], damage: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    path, allocator = filled
    if damage == "header":
        flip(path, 40)
    elif damage == "short":
        os.truncate(path, path.stat().st_size - MIN_SEGMENT)
    elif damage == "long":
        os.truncate(path, path.stat().st_size + PAGE)
    else:
        os.truncate(path, 100)
    damaged = path.read_bytes()
    with pytest.raises(ArenaDamaged, match=rf"{path}: {why}"):
        small(path, allocator=allocator, on_damage="refuse")
    assert path.read_bytes() == damaged  # refused means unchanged
    with caplog.at_level(logging.ERROR), small(path, allocator=allocator) as arena:
        report = arena.report
        assert report.how == "set-aside"
        assert len(arena) == 0
        assert report.set_aside is not None
    assert Path(report.set_aside).read_bytes() == damaged  # kept for inspection
    assert str(path) in caplog.text and "every page it held is lost" in caplog.text


def test_an_empty_file_is_damaged(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    path.touch()
    with pytest.raises(ArenaDamaged, match="empty file"):
        small(path, on_damage="refuse")


# -- pages whose checksum fails ---------------------------------------------------------------


def test_a_page_whose_bytes_changed_is_never_served_after_a_reopen(
    filled: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    path, allocator = filled
    with small(path, allocator=allocator) as arena:
        _, rec, _ = arena._index.find_page(arena._object((3, 1, 2, 3), False), 9)
        at = arena._data + rec[2] * 16
    flip(path, at + 100)
    with caplog.at_level(logging.ERROR), small(path, allocator=allocator) as arena:
        report = arena.report
        assert report.checksum_failures == 1
        assert report.lost == [KEY]
        assert arena.get(KEY) is None
        assert arena.get(OTHER) == b"B" * 700
        assert arena.stats()["checksum_failures"] == 1
    assert "pool 3 oid 1.2.3 index 9" in caplog.text and "checksum mismatch" in caplog.text
    with small(path, allocator=allocator) as arena:  # dropped for good: counted once
        assert arena.report.checksum_failures == 0
        assert len(arena) == 1


def test_a_page_whose_bytes_change_while_open_is_never_served(
    filled: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    path, allocator = filled
    with small(path, allocator=allocator) as arena:
        _, rec, _ = arena._index.find_page(arena._object((3, 1, 2, 3), False), 9)
        at = arena._data + rec[2] * 16
        arena._mm[at] ^= 0x01
        with caplog.at_level(logging.ERROR):
            assert arena.get(KEY) is None
        assert arena.checksum_failures == 1
        assert arena.get(KEY) is None and len(arena) == 1  # gone, reported missing
        assert arena.get(OTHER) == b"B" * 700
    assert "failed its checksum" in caplog.text


@pytest.mark.parametrize("allocator", ["zbud", "zsmalloc"])
def test_a_page_that_fails_while_open_keeps_its_bytes_until_a_reopen(
    tmp_path: Path, allocator: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A page dropped for its checksum does not give its bytes back: whether its record or
    its bytes changed cannot be told, and a changed record names another page's.  The next
    reopen, which claims only what sound records name, gives them back."""
    path = tmp_path / "arena"
    with small(path, allocator=allocator) as arena:
        arena.put(KEY, os.urandom(PAGE))  # zbud: a "huge" frame of its own
        _, rec, _ = arena._index.find_page(arena._object((3, 1, 2, 3), False), 9)
        arena._mm[arena._data + rec[2] * 16] ^= 0x01
        with caplog.at_level(logging.ERROR):
            assert arena.get(KEY) is None
        assert arena.checksum_failures == 1 and len(arena) == 0
        assert arena._frames.used == 1 and "kept until the arena is reopened" in caplog.text
    with small(path, allocator=allocator) as arena:
        assert arena._frames.used == 0 and len(arena) == 0


@pytest.mark.parametrize("allocator", ["zbud", "zsmalloc"])
@pytest.mark.parametrize("how", ["get", "take"])
def test_a_page_dropped_with_its_bytes_kept_is_no_longer_counted_stored(
    tmp_path: Path, allocator: str, how: str
) -> None:
    """A page dropped for its checksum (its bytes kept until a reopen) stayed counted in
    stored_bytes: no longer the pages' lengths, and the slack a store's capacity counts
    (footprint less stored_bytes) missed the bytes kept."""
    with small(tmp_path / "arena", allocator=allocator) as arena:
        arena.put(KEY, b"A" * 1000)
        arena.put(OTHER, b"B" * 500)
        slot, rec, _ = arena._index.find_page(arena._object((3, 1, 2, 3), False), 9)
        PAGE_FIELDS.pack_into(arena._mm, arena._index.pages.offset(slot), rec[0], rec[1],
                              rec[2] + PAGE // 16, rec[3], rec[4])  # "where" a frame on
        assert (arena.get(KEY) if how == "get" else arena.take(KEY)) is None
        assert arena.stored_bytes == sum(size for *_, size in arena.sized_keys()) == 500
        pages = ArenaPages(arena)
        assert pages.slack() == arena.footprint() - 500


@pytest.mark.parametrize("allocator", ["zbud", "zsmalloc"])
@pytest.mark.parametrize("how", ["get", "take", "delete", "put-over", "delete_object"])
def test_a_record_damaged_while_open_never_frees_another_pages_bytes(
    tmp_path: Path, allocator: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A page record changed in place to name another live page's bytes (its checksum
    fails): dropping its page (a get, an exclusive get), deleting it or putting over it
    freed those bytes, since the allocator did hold an allocation there; the next puts
    went over an acknowledged page (zsmalloc then freed it twice, breaking its chain)."""
    path = tmp_path / "arena"
    a, b = (3, (1, 2, 3), 0), (3, (4, 5, 6), 0)
    with small(path, allocator=allocator) as arena:
        arena.put(a, b"a" * 1000)
        arena.put(b, b"b" * 1000)  # the same zspage, or the other buddy of a's frame
        slot_a, rec_a, _ = arena._index.find_page(arena._object((3, 1, 2, 3), False), 0)
        _, rec_b, _ = arena._index.find_page(arena._object((3, 4, 5, 6), False), 0)
        PAGE_FIELDS.pack_into(arena._mm, arena._index.pages.offset(slot_a), rec_a[0], rec_a[1],
                              rec_b[2], rec_b[3], rec_b[4])
        used = arena._frames.used
        with caplog.at_level(logging.ERROR):
            if how == "get":
                assert arena.get(a) is None
            elif how == "take":
                assert arena.take(a) is None
            elif how == "delete":
                assert arena.delete(a)
            elif how == "put-over":
                arena.put(a, b"n" * 1000)
            else:
                assert arena.delete_object(3, (1, 2, 3)) == 1
        kept = arena._frames.used >= used
        news = {(3, (7, 7, 7), i): bytes([65 + i]) * 1000 for i in range(6)}
        for key, data in news.items():
            arena.put(key, data)
        if how == "put-over":
            news[a] = b"n" * 1000
        assert arena.get(b) == b"b" * 1000
        assert all(arena.get(key) == data for key, data in news.items())
        assert kept and arena.checksum_failures == 1
        assert "kept until the arena is reopened" in caplog.text
    with small(path, allocator=allocator) as arena:
        assert arena.report.checksum_failures == arena.report.dropped_records == 0
        assert arena.get(b) == b"b" * 1000 and len(arena) == 1 + len(news)
        assert all(arena.get(key) == data for key, data in news.items())


def test_a_store_never_keeps_a_page_its_arena_dropped_for_a_checksum(tmp_path: Path) -> None:
    """A second tier's reads (peek_page, oldest_ephemeral) meet a damaged page as a get
    does: dropped from the store's index and accounting, counted lost, never handed on."""
    for reader in ("peek", "oldest"):
        pages = ArenaPages(small(tmp_path / f"arena-{reader}"))
        store = TmemStore(PAGE * 64, pages=pages)
        pool = store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        assert store.put_page(1, pool, Oid(7), 3, b"C" * 1000) == 1
        arena = pages.arena
        gid = store.clients[1].slots[pool].gid  # type: ignore[union-attr]
        _, rec, _ = arena._index.find_page(arena._object((gid, 7, 0, 0), False), 3)
        arena._mm[arena._data + rec[2] * 16] ^= 0x01
        if reader == "peek":
            assert store.peek_page(1, pool, Oid(7), 3) is None
        else:
            assert store.oldest_ephemeral(1, 4) == []
        assert store.page_keys(1, pool) == [] and store.used_bytes == 0
        assert store.clients[1].counters.lost_pages == 1
        pages.close()


def test_a_damaged_record_drops_only_its_page(filled: tuple[Path, str]) -> None:
    path, allocator = filled
    flip(path, page_record_offset(path, 0) + 8)  # the first page's "where" field
    with small(path, allocator=allocator) as arena:
        assert arena.report.checksum_failures + arena.report.dropped_records == 1
        assert len(arena) == 1
        assert arena.get(OTHER) == b"B" * 700 or arena.get(KEY) == b"A" * 1500


def test_a_record_pointing_outside_the_data_is_dropped(filled: tuple[Path, str]) -> None:
    path, allocator = filled
    with path.open("r+b") as f:
        f.seek(page_record_offset(path, 0) + 8)
        f.write((0xFFFFFFF0).to_bytes(4, "little"))
    with small(path, allocator=allocator) as arena:
        assert arena.report.dropped_records == 1
        assert len(arena) == 1


def test_a_damaged_object_record_drops_its_pages(filled: tuple[Path, str]) -> None:
    path, allocator = filled
    with small(path, allocator=allocator) as arena:
        at = arena._index.objects.offset(0)
    flip(path, at + 5)
    with small(path, allocator=allocator) as arena:
        assert len(arena) == 0
        assert arena.report.dropped_records == 3  # the object and its two pages
        assert ("object slot", 0) in arena.report.lost


# -- the marks page (no checksum: its marks are checked against the file) ---------------------


def set_mark(path: Path, region: int, value: int) -> None:
    """Write one mark of the marks page (objects, pages, data: a u64 each at 4096)."""
    with path.open("r+b") as f:
        f.seek(PAGE + 8 * region)
        f.write(struct.pack("<Q", value))


@pytest.mark.parametrize("allocator", ["zbud", "zsmalloc"])
@pytest.mark.parametrize("region", [OBJECTS, PAGES])
def test_a_lowered_records_mark_loses_no_page_and_lends_none_to_another_key(
    tmp_path: Path, allocator: str, region: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A records mark lowered to 0 once hid every record above it: the pages were lost
    without a word, their object's slot went to another object, and the next mark raised
    over the old records brought them back, after a kill, under that other object's key."""
    path = tmp_path / "arena"
    with small(path, allocator=allocator) as arena:
        arena.put(KEY, b"A" * 1500)
        arena.put(OTHER, b"")  # a zero page: no bytes, as a store keeps one
    set_mark(path, region, 0)
    new = (7, (9, 9, 9), 3)
    with caplog.at_level(logging.ERROR), small(path, allocator=allocator) as arena:
        assert len(arena) == 2 and arena.report.lost == []
        assert arena.get(KEY) == b"A" * 1500 and arena.get(OTHER) == b""
        assert "past the mark" in arena.report.note
        arena.put(new, b"C" * 50)
        arena.put(KEY, b"D" * 1000)
    assert "past the mark of 0" in caplog.text and str(path) in caplog.text
    with small(path, allocator=allocator) as arena:  # as a kill -9 leaves it
        assert sorted(arena.keys()) == sorted([KEY, OTHER, new])
        assert arena.get(KEY) == b"D" * 1000 and arena.get(new) == b"C" * 50
        assert arena.get((7, (9, 9, 9), 9)) is None and arena.get((7, (9, 9, 9), 10)) is None
        assert arena.report.checksum_failures == arena.report.dropped_records == 0


def test_a_records_mark_goes_only_over_zeroed_slots(tmp_path: Path) -> None:
    """A record left past the mark (a mark lowered in an earlier life, the records above it
    then reused) is zeroed before the mark is raised over it: it can never come back."""
    with small(tmp_path / "arena") as arena:
        arena.put(KEY, b"A" * 100)
        pages, mm = arena._index.pages, arena._mm
        assert pages.hwm == 1 and pages.mark == 256
        stale = pages.offset(300)
        mm[stale : stale + PAGE_RECORD] = mm[pages.offset(0) : pages.offset(1)]
        for i in range(256):  # slots 1..256: the mark goes from 256 to 512
            arena.put((3, (1, 2, 3), 100 + i), b"x" * 40)
        assert pages.hwm == 257 and pages.mark == 512
        assert mm[stale : stale + PAGE_RECORD] == bytes(PAGE_RECORD)


# -- the rest of the file's rules -------------------------------------------------------------


def test_an_arena_that_cannot_be_made_says_where(tmp_path: Path) -> None:
    path = tmp_path / "no-such-directory" / "arena"
    with pytest.raises(ArenaError, match=f"{path}: cannot create"):
        small(path)


def test_a_second_process_cannot_open_an_arena_in_use(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    with small(path), pytest.raises(ArenaError, match=f"{path}: in use by another process"):
        small(path)


def open_descriptors(path: Path) -> int:
    """Descriptors of this process open on ``path``."""
    return sum(1 for fd in os.listdir("/proc/self/fd")
               if os.path.realpath(f"/proc/self/fd/{fd}") == str(path))


def test_an_open_that_fails_leaves_no_descriptor_lock_or_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The arena built on an opened file failing (tmpfs full as its records are reserved
    again) left the file open and locked: a retry in the same process was told the arena
    was in use by another process."""
    path = tmp_path / "arena"
    with small(path) as arena:
        arena.put(KEY, b"A" * 500)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ArenaError, match="No space left"):
        small(path)
    monkeypatch.undo()
    assert open_descriptors(path) == 0
    with small(path) as arena:
        assert arena.get(KEY) == b"A" * 500


def test_an_empty_arena_made_again_that_fails_leaves_nothing_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same when an empty arena is made again with the allocator asked for."""
    path = tmp_path / "arena"
    small(path, allocator="zbud").close()
    made = []

    def index(file: ArenaFile) -> Index:
        made.append(file)
        if len(made) == 2:  # the arena made again
            raise ArenaError("no memory for the index (a test)")
        return Index(file)

    monkeypatch.setattr(arena_module, "Index", index)
    with pytest.raises(ArenaError, match="a test"):
        small(path, allocator="zsmalloc")
    monkeypatch.undo()
    assert len(made) == 2 and open_descriptors(path) == 0
    with small(path, allocator="zsmalloc") as arena:
        assert arena.allocator_name == "zsmalloc"


def test_an_arena_holding_pages_keeps_its_allocator(filled: tuple[Path, str]) -> None:
    path, allocator = filled
    other = "zsmalloc" if allocator == "zbud" else "zbud"
    with small(path, allocator=other) as arena:
        assert arena.allocator_name == allocator
        assert "kept" in arena.report.note
        assert arena.get(KEY) == b"A" * 1500
        arena.delete(KEY)
        arena.delete(OTHER)
    with small(path, allocator=other) as arena:  # empty now: made again as asked
        assert arena.allocator_name == other


def test_the_allocator_param_is_checked() -> None:
    assert ARENA_PARAMS.validate({})["allocator"] == "zsmalloc"
    assert ARENA_PARAMS.validate({"allocator": "zbud"})["allocator"] == "zbud"
    with pytest.raises(ParamError, match=r"allocator.*accepted: one of zbud, zsmalloc"):
        ARENA_PARAMS.validate({"allocator": "z3fold"})


def test_a_full_arena_refuses_a_put_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    with Arena.open(path, segment_size=MIN_SEGMENT, max_bytes=MIN_SEGMENT) as arena:
        stored = 0
        with pytest.raises(ArenaError, match="data region is full"):
            for i in range(10_000):
                arena.put((0, (0, 0, 0), i), os.urandom(4000))
                stored += 1
        assert len(arena) == stored
        assert arena.get((0, (0, 0, 0), stored)) is None
        assert arena.get((0, (0, 0, 0), 0)) is not None
        assert arena._file.reserved[DATA] == MIN_SEGMENT


def test_records_are_the_documented_size() -> None:
    assert PAGE_RECORD == PAGE_FIELDS.size + 4 == 20
    assert REGIONS_AT == 2 * PAGE
