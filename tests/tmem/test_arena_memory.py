"""The memory an arena and a store hold follows what they hold now, not their peak: free
frames give their memory back to tmpfs (``docs/page-arena.md``, "Memory given back"), and
the store's tables do not stay sized for a flood that is gone.  Found by the flood tests
(``tests/guestd/test_flood_zcache.py``): incompressible pages, then zero pages in their
place, left the arena's tmpfs pages resident beside the zero pages' bookkeeping."""

from __future__ import annotations

import os
import random
import struct
import sys
from pathlib import Path

import pytest

from xentmem.tmem.abi import PAGE_SIZE, POOL_PRIVATE_EPHEMERAL, PRIVATE_UUID, Oid
from xentmem.tmem.arena import ALLOCATORS, Arena
from xentmem.tmem.arenafile import DATA, MIN_SEGMENT, OBJECTS
from xentmem.tmem.arenafile import PAGES as PAGE_RECORDS
from xentmem.tmem.frames import IDLE_FRAMES, IDLE_SHARE, UNBACKED
from xentmem.tmem.store import TmemStore

MIB = 1 << 20
PAGES = 2048  # 8 MiB of incompressible pages: a frame each


def allocated(path: Path) -> int:
    """Bytes of the file tmpfs really holds (holes are free)."""
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("allocator", list(ALLOCATORS))
def test_free_frames_give_their_memory_back_and_take_it_again(tmp_path: Path,
                                                              allocator: str) -> None:
    rng = random.Random(7)
    path = tmp_path / "arena"
    arena = Arena.open(path, allocator=allocator)
    pages = {(1, (i, 0, 0), 0): rng.randbytes(PAGE_SIZE) for i in range(PAGES)}
    for key, page in pages.items():
        arena.put(key, page)
    full = allocated(path)
    assert full >= PAGES * PAGE_SIZE and arena.footprint() >= PAGES * PAGE_SIZE
    for key in list(pages)[: PAGES - 16]:
        assert arena.delete(key)
    left = (IDLE_FRAMES + 16 + 16) * PAGE_SIZE  # kept free frames, pages held, a step
    assert allocated(path) < 2 * MIB + left, (allocated(path), full)
    assert arena.footprint() < MIB + left
    assert arena.trim() >= 0 and arena.stats()["frames_resident"] == 16
    for key in list(pages)[: PAGES - 16]:  # the frames are taken, and reserved, again
        arena.put(key, pages[key])
    assert allocated(path) >= PAGES * PAGE_SIZE
    assert all(arena.get(key) == page for key, page in pages.items())
    arena.close()
    reopened = Arena.open(path, allocator=allocator)
    assert all(reopened.get(key) == page for key, page in pages.items())
    reopened.discard()


def test_a_store_s_tables_shrink_after_a_flood() -> None:
    store = TmemStore(256 * MIB)
    pool = store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    for index in range(1 << 15):
        assert store.put_page(1, pool, Oid(1), index, b"") == 1
    lru_peak = sys.getsizeof(store.clients[1].lru)
    objects = store.clients[1].slots[pool].objects  # type: ignore[union-attr]
    object_peak = sys.getsizeof(objects[Oid(1)])
    for index in range(1 << 15):  # exclusive gets take them
        assert store.get_page(1, pool, Oid(1), index)[0] == 1 or index >= (1 << 15) - 100
        if index == (1 << 15) - 1000:
            break
    assert sys.getsizeof(store.clients[1].lru) < lru_peak / 8
    assert sys.getsizeof(objects[Oid(1)]) < object_peak / 8
    assert store.flush_ephemeral() > 0


def test_a_pool_s_object_table_shrinks_when_exclusive_gets_empty_its_objects() -> None:
    """An exclusive get that takes an object's last page drops the object as a flush does,
    the pool's table of objects compacted with it (the get once kept the flood's table)."""
    store = TmemStore(256 * MIB)
    pool = store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    for n in range(1 << 14):
        assert store.put_page(1, pool, Oid(n), 0, b"") == 1
    slot = store.clients[1].slots[pool]
    assert slot is not None
    peak = sys.getsizeof(slot.objects)
    for n in range((1 << 14) - 100):
        assert store.get_page(1, pool, Oid(n), 0) == (1, b"")
    assert len(slot.objects) == 100 and store.obj_count == 100
    assert sys.getsizeof(slot.objects) < peak / 8


def test_a_trim_after_a_free_looks_at_what_was_freed(tmp_path: Path) -> None:
    """Frees give memory back once the idle frames pass the allowance (the larger of
    IDLE_FRAMES and a 64th of the frames), from the frames freed since the last trim; and
    frees that churn below it keep a bounded list of them."""
    arena = Arena.open(tmp_path / "arena", allocator="zbud")
    frames = arena._frames
    rng = random.Random(3)
    pages = {(1, (i, 0, 0), 0): rng.randbytes(PAGE_SIZE) for i in range(PAGES)}
    for key, page in pages.items():
        arena.put(key, page)
    assert frames.idle_allowance == max(IDLE_FRAMES, frames.total() // IDLE_SHARE)
    keys = list(pages)
    rng.shuffle(keys)
    for key in keys[: PAGES // 2]:  # scattered frees: many runs, some adjacent
        assert arena.delete(key)
        assert frames.idle() <= frames.idle_allowance
    assert frames.state.count(UNBACKED) >= PAGES // 2 - frames.idle_allowance
    for _ in range(20 * frames.idle_allowance):  # churn under the allowance
        key = keys[rng.randrange(PAGES // 2, PAGES)]
        assert arena.delete(key)
        arena.put(key, pages[key])
    assert len(frames._freed) <= 4 * frames.idle_allowance + 1
    assert all(arena.get(key) == pages[key] for key in keys[PAGES // 2:])
    arena.discard()


# -- a reopen holds what the file held, whatever its marks say --------------------------------

SMALL = {"segment_size": MIN_SEGMENT, "max_bytes": 256 * MIN_SEGMENT}  # 16 MiB of frames


def opened_counting_reservations(monkeypatch: pytest.MonkeyPatch, path: Path,
                                 allocator: str) -> tuple[Arena, int]:
    """The arena at ``path`` opened, and the bytes it asked tmpfs to reserve meanwhile."""
    asked = []
    real = os.posix_fallocate

    def counting(fd: int, offset: int, length: int) -> None:
        asked.append(length)
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", counting)
    try:
        return Arena.open(path, allocator=allocator, **SMALL), sum(asked)  # type: ignore[arg-type]
    finally:
        monkeypatch.undo()


def set_mark(path: Path, region: int, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(PAGE_SIZE + 8 * region)
        f.write(struct.pack("<Q", value))


@pytest.mark.parametrize("allocator", list(ALLOCATORS))
def test_a_reopen_reserves_no_frame_the_file_does_not_hold(
    tmp_path: Path, allocator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reopen reserved the data region up to its all-time high-water mark, then gave the
    free frames back: for a moment, memory the capacity never allowed for (8 MiB here,
    for one page held)."""
    path = tmp_path / "arena"
    rng = random.Random(3)
    with Arena.open(path, allocator=allocator, **SMALL) as arena:  # type: ignore[arg-type]
        for i in range(2000):
            arena.put((1, (1, 1, 1), i), rng.randbytes(4000))
        for i in range(2000):
            arena.delete((1, (1, 1, 1), i))
        arena.put((1, (1, 1, 1), 0), b"x" * 100)
        arena.trim()
        held = allocated(path)
    arena, asked = opened_counting_reservations(monkeypatch, path, allocator)
    with arena:
        assert asked < MIB and allocated(path) <= held
        assert arena.get((1, (1, 1, 1), 0)) == b"x" * 100 and len(arena) == 1
        stats = arena.stats()
        assert arena.footprint() < MIB and stats["frames_resident"] == stats["frames_used"]


@pytest.mark.parametrize("allocator", list(ALLOCATORS))
@pytest.mark.parametrize(("region", "value"), [
    (DATA, (1 << 64) - 1), (DATA, 0), (OBJECTS, (1 << 64) - 1), (PAGE_RECORDS, (1 << 64) - 1)])
def test_a_damaged_mark_neither_loses_pages_nor_reserves_its_region(
    tmp_path: Path, allocator: str, region: int, value: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marks page has no checksum: a data mark raised by damage had a reopen reserve the
    whole data region (the machine's RAM by default), a records mark its records region;
    one lowered dropped every page whose bytes lay past it."""
    path = tmp_path / "arena"
    pages = {(1, (2, 3, 4), i): bytes([i]) * (500 + 300 * i) for i in range(8)}
    with Arena.open(path, allocator=allocator, **SMALL) as arena:  # type: ignore[arg-type]
        for key, data in pages.items():
            arena.put(key, data)
    set_mark(path, region, value)
    arena, asked = opened_counting_reservations(monkeypatch, path, allocator)
    with arena:
        assert asked < MIB
        assert arena.report.dropped_records == arena.report.checksum_failures == 0
        assert all(arena.get(key) == data for key, data in pages.items())
        assert arena._frames.total() <= 64 and arena._file.reserved_bytes() < MIB
        assert arena.footprint() < MIB
        arena.put((1, (2, 3, 4), 99), b"y" * 3000)  # the frames are taken, and reserved, again
    with Arena.open(path, allocator=allocator, **SMALL) as arena:  # type: ignore[arg-type]
        assert len(arena) == len(pages) + 1 and arena.get((1, (2, 3, 4), 99)) == b"y" * 3000
