"""zbud and zsmalloc as the kernel's, and both against a model of what is allocated.

The model is a set of live byte ranges in the data region: an allocation never overlaps a
live one, stays inside the reserved region, and a zspage or frame goes back when its last
object does.  "Reopen" claims every live handle into a fresh allocator over the same file,
as :meth:`Arena.open` does, and allocation goes on without overlapping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xentmem.tmem.arenafile import MIN_SEGMENT, PAGE, ArenaFile
from xentmem.tmem.frames import Frames
from xentmem.tmem.zbud import MAX_BUDDY, NCHUNKS, ZHDR_SIZE, Zbud, size_to_chunks
from xentmem.tmem.zsmalloc import (
    ZS_SIZE_CLASSES,
    Zsmalloc,
    chain_size,
    class_index,
    size_classes,
)

ALLOCATORS = {"zbud": Zbud, "zsmalloc": Zsmalloc}


def open_frames(tmp: Path, allocator: str, name: str = "arena") -> tuple[ArenaFile, Frames]:
    path = tmp / name
    if not path.exists():
        ArenaFile.create(path, allocator=allocator, segment_size=MIN_SEGMENT,
                         data_bytes=64 * MIN_SEGMENT)
    file = ArenaFile.open(path)
    return file, Frames(file)


# -- zbud, as mm/zbud.c --------------------------------------------------------------------


def test_zbud_geometry_is_the_kernels(tmp_path: Path) -> None:
    assert (ZHDR_SIZE, NCHUNKS, MAX_BUDDY) == (64, 63, 3968)
    assert [size_to_chunks(s) for s in (1, 64, 65, 3968)] == [1, 1, 2, 62]


def test_zbud_two_buddies_share_a_frame_first_after_header_last_at_end(tmp_path: Path) -> None:
    file, frames = open_frames(tmp_path, "zbud")
    zbud = Zbud(frames)
    a, _ = zbud.alloc(1000)  # 16 chunks, a new frame: the first buddy
    b, _ = zbud.alloc(2000)  # 32 chunks: fits the 47 free chunks, the last buddy
    assert a == ZHDR_SIZE
    assert b == PAGE - 32 * 64
    assert zbud.stats()["zbud_frames"] == 1
    assert zbud.stats()["buddied_frames"] == 1
    c, _ = zbud.alloc(100)  # the frame is buddied: a new one
    assert c == PAGE + ZHDR_SIZE
    file.close()


def test_zbud_first_fit_takes_the_lowest_unbuddied_list_that_fits(tmp_path: Path) -> None:
    file, frames = open_frames(tmp_path, "zbud")
    zbud = Zbud(frames)
    big, _ = zbud.alloc(60 * 64)  # frame 0, 3 chunks left
    mid, _ = zbud.alloc(40 * 64)  # frame 1, 23 chunks left
    assert (big // PAGE, mid // PAGE) == (0, 1)
    small, _ = zbud.alloc(2 * 64)  # lists 3..62: list 3 (frame 0) comes first
    assert small // PAGE == 0
    other, _ = zbud.alloc(10 * 64)  # frame 0 is buddied now: frame 1 (list 23)
    assert other // PAGE == 1
    file.close()


def test_zbud_freeing_the_last_buddy_frees_the_frame(tmp_path: Path) -> None:
    file, frames = open_frames(tmp_path, "zbud")
    zbud = Zbud(frames)
    a, _ = zbud.alloc(500)
    b, _ = zbud.alloc(500)
    zbud.free(a, 0, 500)
    assert frames.used == 1
    assert zbud.stats()["unbuddied_frames"] == 1
    again, _ = zbud.alloc(500)  # the freed first buddy is reused
    assert again == a
    zbud.free(again, 0, 500)
    zbud.free(b, 0, 500)
    assert frames.used == 0
    assert zbud.stats()["zbud_frames"] == 0
    file.close()


def test_zbud_a_page_longer_than_a_buddy_takes_a_frame_of_its_own(tmp_path: Path) -> None:
    file, frames = open_frames(tmp_path, "zbud")
    zbud = Zbud(frames)
    whole, _ = zbud.alloc(MAX_BUDDY + 1)
    assert whole % PAGE == 0
    assert zbud.stats()["huge_frames"] == 1
    zbud.free(whole, 0, MAX_BUDDY + 1)
    assert frames.used == 0
    file.close()


# -- zsmalloc, as mm/zsmalloc.c ------------------------------------------------------------


def test_zsmalloc_size_classes_are_the_kernels() -> None:
    assert ZS_SIZE_CLASSES == 255
    assert [class_index(s) for s in (1, 32, 33, 48, 49, 4096)] == [0, 0, 1, 1, 2, 254]
    assert chain_size(32) == 1  # a power of two: one page
    assert chain_size(48) == 3  # 3 pages of 48-byte objects waste nothing
    assert chain_size(4096) == 1
    table = size_classes()
    assert len(table) == ZS_SIZE_CLASSES
    # Classes with the same pages and objects per zspage are merged into the largest.
    for cls in {id(c): c for c in table}.values():
        members = [i for i, c in enumerate(table) if c is cls]
        assert cls.id == max(members)
        assert cls.objs == cls.pages * PAGE // cls.size
    assert table[-1].size == 4096 and table[-1].objs == 1


def test_zsmalloc_packs_objects_across_the_pages_of_a_zspage(tmp_path: Path) -> None:
    file, frames = open_frames(tmp_path, "zsmalloc")
    zs = Zsmalloc(frames)
    cls = zs.size_class[class_index(1500)]
    assert cls.pages > 1
    handles = [zs.alloc(1500) for _ in range(cls.objs)]
    offsets = sorted(o for o, _ in handles)
    assert offsets == [i * cls.size for i in range(cls.objs)]
    assert any(o // PAGE != (o + 1499) // PAGE for o in offsets)  # one straddles pages
    assert frames.used == cls.pages
    for offset, idx in handles:
        zs.free(offset, idx, 1500)
    assert frames.used == 0
    assert zs.stats()["zspages"] == 0
    file.close()


def test_zsmalloc_allocates_from_the_fullest_zspage(tmp_path: Path) -> None:
    file, frames = open_frames(tmp_path, "zsmalloc")
    zs = Zsmalloc(frames)
    cls = zs.size_class[class_index(1000)]
    first = [zs.alloc(1000) for _ in range(cls.objs)]
    second = [zs.alloc(1000) for _ in range(cls.objs)]
    heads = {o // PAGE // cls.pages for o, _ in first}, {o // PAGE // cls.pages for o, _ in second}
    assert len(heads[0]) == len(heads[1]) == 1 and heads[0] != heads[1]
    # Empty the first zspage to one object and the second by one: the second is fuller.
    for offset, idx in first[1:]:
        zs.free(offset, idx, 1000)
    zs.free(*second[0][:2], 1000)
    offset, _ = zs.alloc(1000)
    assert offset == second[0][0]
    file.close()


def test_zsmalloc_leaves_its_current_zspage_once_frees_empty_it_below_another(
    tmp_path: Path
) -> None:
    """The zspage allocated from last was kept as the class's current one (the fast path)
    even after frees from it left another zspage fuller: find_get_zspage takes that one."""
    file, frames = open_frames(tmp_path, "zsmalloc")
    zs = Zsmalloc(frames)
    cls = zs.size_class[class_index(1000)]
    half = cls.objs // 2
    first = [zs.alloc(1000) for _ in range(cls.objs)]  # full
    second = [zs.alloc(1000) for _ in range(half + 1)]  # the current zspage
    for handle in first[:half]:  # the first half full
        zs.free(*handle, 1000)
    for handle in second[1:]:  # the current one down to one object: the emptier
        zs.free(*handle, 1000)
    assert cls.group(zs.inuse[first[0][0] // PAGE]) > cls.group(1)
    offset, _ = zs.alloc(1000)
    assert offset // PAGE // cls.pages == first[0][0] // PAGE // cls.pages
    file.close()


def test_zsmalloc_holds_no_object_on_its_free_chain(tmp_path: Path) -> None:
    """holds() once asked only that the zspage was in use: a freed object of a live zspage
    passed, and a damaged record freeing it again broke the zspage's free chain."""
    file, frames = open_frames(tmp_path, "zsmalloc")
    zs = Zsmalloc(frames)
    a, b, c = (zs.alloc(1000) for _ in range(3))
    assert all(zs.holds(*h, 1000) for h in (a, b, c))
    zs.free(*b, 1000)
    assert not zs.holds(*b, 1000) and zs.holds(*a, 1000) and zs.holds(*c, 1000)
    zs.free(*a, 1000)
    assert not zs.holds(*a, 1000) and not zs.holds(*b, 1000) and zs.holds(*c, 1000)
    assert not zs.holds(c[0], c[1], 2000)  # another class
    file.close()


def test_zsmalloc_allocates_nothing_from_a_zspage_whose_free_chain_is_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The free chain lives in the data region: a link damaged in place (to an index past
    the zspage) once made the next allocation write outside its zspage, or raise
    struct.error; the zspage is now left alone (logged) and its live objects stay."""
    file, frames = open_frames(tmp_path, "zsmalloc")
    zs = Zsmalloc(frames)
    cls = zs.size_class[class_index(1000)]
    live = [zs.alloc(1000) for _ in range(2)]
    head = live[0][0] // PAGE
    first_free = head * PAGE + zs.freehead[head] * cls.size
    zs.mm[zs.base + first_free:zs.base + first_free + 2] = (cls.objs + 7).to_bytes(2, "little")
    with caplog.at_level("ERROR"):
        handles = [zs.alloc(1000) for _ in range(cls.objs)]
    assert "free chain is damaged" in caplog.text and head in zs.broken
    others = [h for h in handles if h[0] // PAGE // cls.pages != head // cls.pages]
    assert len(others) == cls.objs - 1  # one came from the zspage before the damaged link
    assert all(0 <= idx < cls.objs for _offset, idx in handles)
    assert all(zs.holds(*h, 1000) for h in others)
    # (its own objects' chain cannot be read: holds() says no, so a delete keeps their
    # bytes until a reopen rather than free them into a chain it cannot check)
    for h in live + [h for h in handles if h not in others]:
        zs.free(*h, 1000)
    assert head not in zs.broken  # its last object freed: the zspage went back
    file.close()


# -- both, against a model ------------------------------------------------------------------

SIZES = st.one_of(st.integers(1, 200), st.integers(1, PAGE), st.sampled_from([32, 3968, 3969]))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), SIZES),
        st.tuples(st.just("free"), st.integers(0, 10_000)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=120,
)


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_allocations_never_overlap_and_survive_a_reopen(
    name: str, ops: list[tuple[str, int]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp(name)
    file, frames = open_frames(tmp, name)
    alloc = ALLOCATORS[name](frames)
    live: dict[tuple[int, int], int] = {}  # handle -> size
    try:
        for op, arg in ops:
            if op == "alloc":
                offset, sub = alloc.alloc(arg)
                for (o, _), size in live.items():
                    assert offset + arg <= o or o + size <= offset, "overlap"
                assert offset + arg <= frames.total() * PAGE
                live[(offset, sub)] = arg
            elif op == "free" and live:
                handle = sorted(live)[arg % len(live)]
                alloc.free(*handle, live.pop(handle))
            elif op == "reopen":
                file.close()
                file, frames = open_frames(tmp, name)
                alloc = ALLOCATORS[name](frames)
                for (offset, sub), size in live.items():
                    assert alloc.claim(offset, sub, size)
                alloc.finish_claims()
            if not live:
                assert frames.used == 0
        # Claiming a live handle twice is refused (an index pointing twice at one place).
        if live:
            (offset, sub), size = next(iter(live.items()))
            fresh_file, fresh_frames = open_frames(tmp, name, "fresh")
            fresh = ALLOCATORS[name](fresh_frames)
            assert fresh.claim(offset, sub, size)
            assert not fresh.claim(offset, sub, size)
            fresh_file.close()
    finally:
        file.close()


@pytest.mark.parametrize("name", list(ALLOCATORS))
def test_a_single_claim_refuses_what_names_no_allocation(name: str, tmp_path: Path) -> None:
    file, frames = open_frames(tmp_path, name)
    try:
        alloc = ALLOCATORS[name](frames)
        assert not alloc.claim(64, 0, 0)  # no bytes
        assert not alloc.claim(72, 0, 100)  # not on a 16-byte boundary
        assert not alloc.claim(-64, 0, 100)
        assert frames.used == 0
    finally:
        file.close()
