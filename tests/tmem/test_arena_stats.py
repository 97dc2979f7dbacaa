"""The arena's counters, as ``stats`` and the metrics show them."""

from __future__ import annotations

from pathlib import Path

from xentmem.tmem.arena import Arena
from xentmem.tmem.arenafile import MIN_SEGMENT, PAGE
from xentmem.tmem.index import PAGE_RECORD


def test_zsmalloc_counts_pages_frames_and_each_class(tmp_path: Path) -> None:
    with Arena.open(tmp_path / "a", allocator="zsmalloc", segment_size=MIN_SEGMENT,
                    max_bytes=64 * MIN_SEGMENT) as arena:
        for i in range(40):
            arena.put((0, (1, 0, 0), i), bytes([i]) * (100 if i % 2 else 1000))
        arena.put((0, (2, 0, 0), 0), b"")  # a zero page: a record, no bytes
        st = arena.stats()
        assert st["allocator"] == "zsmalloc"
        assert st["pages"] == 41 and st["objects"] == 2
        assert st["stored_bytes"] == 20 * 100 + 20 * 1000
        classes = st["classes"]
        assert sum(c["objs_used"] for c in classes.values()) == 40
        assert set(classes) == {112, 1024}  # the merged classes 100 and 1000 bytes fall in
        assert st["frames_used"] == sum(c["zspages"] * c["pages_per_zspage"]
                                        for c in classes.values())
        assert st["metadata"]["records"] == 41 * PAGE_RECORD + 2 * 32
        assert st["used_bytes"] == st["frames_used"] * PAGE + st["metadata_bytes"]
        assert arena.footprint() >= st["frames_used"] * PAGE


def test_zbud_counts_buddied_and_unbuddied_frames(tmp_path: Path) -> None:
    with Arena.open(tmp_path / "a", allocator="zbud", segment_size=MIN_SEGMENT,
                    max_bytes=64 * MIN_SEGMENT) as arena:
        arena.put((0, (1, 0, 0), 0), b"x" * 1000)
        arena.put((0, (1, 0, 0), 1), b"y" * 1000)  # the same frame's last buddy
        arena.put((0, (1, 0, 0), 2), b"z" * 3000)  # a frame with one buddy
        arena.put((0, (1, 0, 0), 3), b"w" * 4096)  # a frame of its own
        st = arena.stats()
        assert (st["zbud_frames"], st["buddied_frames"], st["unbuddied_frames"],
                st["huge_frames"], st["frames_used"]) == (2, 1, 1, 1, 3)
        assert st["metadata"]["frame_headers"] == 2 * 64
