"""The memory an arena and a store hold follows what they hold now, not their peak: free
frames give their memory back to tmpfs (``docs/page-arena.md``, "Memory given back"), and
the store's tables do not stay sized for a flood that is gone.  Found by the flood tests
(``tests/guestd/test_flood_zcache.py``): incompressible pages, then zero pages in their
place, left the arena's tmpfs pages resident beside the zero pages' bookkeeping."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from xentmem.tmem.abi import PAGE_SIZE, POOL_PRIVATE_EPHEMERAL, PRIVATE_UUID, Oid
from xentmem.tmem.arena import ALLOCATORS, Arena
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
