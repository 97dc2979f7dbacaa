"""Unloading a backend loses no persistent page; loading another replays every pool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakes.recording_backend import OtherBackend, RecordingBackend

from xentmem.errors import BackendError, UnloadRefused
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import FileBacking, MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots


def page(n: int) -> bytes:
    return n.to_bytes(4, "little") * 1024


@pytest.fixture
def shim(tmp_path: Path) -> Shim:
    return Shim(roots=Roots(root=tmp_path), boot=BootParams())


def test_unload_repatriates_then_another_backend_replays(shim: Shim, tmp_path: Path) -> None:
    fs = shim.cleancache.init_fs()
    shim.frontswap.init(0, MemoryBacking(512))
    shim.frontswap.init(1, FileBacking(tmp_path / "swap1", 512))
    first = shim.load(RecordingBackend)
    for off in range(300):
        assert shim.frontswap.store(off % 2, off, page(off)) == 0
    shim.cleancache.put_page(fs, 9, 9, page(9))
    assert shim.frontswap.curr_pages() == 300

    summary = shim.unload()

    assert summary == {"backend": "recording", "repatriated": 300, "pools_dropped": 1}
    assert first.removed and first.pages == {}
    assert shim.backend is None
    assert shim.frontswap.curr_pages() == 0
    for off in range(300):  # every page readable from its backing store
        assert shim.frontswap.load(off % 2, off) == page(off)
    # The header, the index and 513 slots (one spare), however many pages it holds.
    assert os.path.getsize(tmp_path / "swap1") == 4096 + 2 * 4096 + 513 * 4096
    assert shim.cleancache.real_pool_id(fs) == -1
    assert shim.cleancache.get_page(fs, 9, 9) is None  # a miss, never stale

    second = shim.load(OtherBackend)
    assert [c[0] for c in second.calls].count("new_pool") == 2
    assert shim.cleancache.real_pool_id(fs) >= 0
    assert shim.frontswap.store(1, 7, page(70)) == 0
    assert shim.frontswap.load(1, 7) == page(70)
    assert shim.frontswap.load(0, 8) == page(8)


def test_unload_refused_when_pages_cannot_come_back(shim: Shim) -> None:
    shim.frontswap.init(0, MemoryBacking(64))
    backend = shim.load(RecordingBackend)
    for off in range(10):
        shim.frontswap.store(0, off, page(off))
    backend.fail_gets = True

    with pytest.raises(UnloadRefused, match="could not be repatriated"):
        shim.unload()

    assert shim.backend is backend and not backend.removed
    assert shim.frontswap.curr_pages() == 10
    backend.fail_gets = False
    for off in range(10):
        assert shim.frontswap.load(0, off) == page(off)
    shim.unload()
    assert [shim.frontswap.load(0, off) for off in range(10)] == [page(o) for o in range(10)]


def test_unload_refused_when_backing_store_is_full(shim: Shim, tmp_path: Path) -> None:
    class FullBacking(MemoryBacking):
        def write(self, offset: int, data: bytes) -> None:
            raise BackendError("device full")

    shim.frontswap.init(0, FullBacking(8))
    shim.load(RecordingBackend)
    assert shim.frontswap.store(0, 1, page(1)) == 0
    with pytest.raises(UnloadRefused, match="device full"):
        shim.unload()
    assert shim.frontswap.load(0, 1) == page(1)


def test_second_load_refused_while_loaded(shim: Shim) -> None:
    shim.load(RecordingBackend)
    with pytest.raises(BackendError, match="already loaded"):
        shim.load(OtherBackend)


def test_unload_without_backend_is_an_error(shim: Shim) -> None:
    with pytest.raises(BackendError, match="no backend"):
        shim.unload()


def test_listeners_hear_load_and_unload(shim: Shim) -> None:
    events: list[str] = []

    class Listener:
        def backend_loaded(self, s: Shim) -> None:
            events.append("loaded:" + s.backend.name)

        def backend_unloading(self, s: Shim) -> None:
            events.append("unloading:" + s.backend.name)

    shim.add_listener(Listener())
    shim.load(RecordingBackend)
    shim.unload()
    assert events == ["loaded:recording", "unloading:recording"]


def test_giving_back_kept_pages_is_a_quiet_frontswap_only_load_and_unload(
        tmp_path: Path) -> None:
    """zcache's pages kept across a kill, given back to their area: loaded with frontswap
    alone whatever the params say, unloaded, no listener told, the arena gone."""
    from xentmem.guest.backends.zcache import ARENA_FILE, ZcacheBackend

    roots = Roots(root=tmp_path, run_dir=tmp_path / "run")
    area = tmp_path / "swap0"
    first = Shim(roots=roots, boot=BootParams())
    first.frontswap.init(0, FileBacking(area, 64))
    kept = first.load(ZcacheBackend, {"capacity": "8M"})
    for off in range(10):
        assert first.frontswap.store(0, off, page(off)) == 0
    assert isinstance(kept, ZcacheBackend) and kept._arena is not None
    kept._arena.close()  # the kill
    assert ZcacheBackend.kept_pages_waiting(roots)

    second = Shim(roots=roots, boot=BootParams())
    second.frontswap.init(0, FileBacking.attach(area, None))
    events: list[str] = []

    class Listener:
        def backend_loaded(self, s: Shim) -> None:
            events.append("loaded")

        def backend_unloading(self, s: Shim) -> None:
            events.append("unloading")

    second.add_listener(Listener())
    done = second.give_back_kept_pages(
        ZcacheBackend, {"capacity": "8M", "frontswap": False, "cleancache": True,
                        "frontswap_writethrough": True})
    assert done == {"backend": "zcache", "repatriated": 10, "pools_dropped": 0}
    assert events == [] and second.backend is None
    assert not (roots.run / ARENA_FILE).exists() and not ZcacheBackend.kept_pages_waiting(roots)
    assert [second.frontswap.load(0, off) for off in range(10)] == [page(off) for off in range(10)]
