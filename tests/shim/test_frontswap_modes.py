"""Frontswap's modes and edges: failed stores, writethrough, exclusive gets, shrink, swapoff."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.errors import AbiError, BackendError
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots


def page(n: int) -> bytes:
    return n.to_bytes(4, "little") * 1024


def loaded(tmp_path: Path, **params: str) -> tuple[Shim, RecordingBackend, MemoryBacking]:
    shim = Shim(roots=Roots(root=tmp_path), boot=BootParams())
    backing = MemoryBacking(1 << 12)
    shim.frontswap.init(0, backing)
    backend = shim.load(RecordingBackend, params)
    return shim, backend, backing


def test_failed_store_goes_to_backing_and_drops_the_old_copy(tmp_path: Path) -> None:
    shim, backend, _backing = loaded(tmp_path)
    assert shim.frontswap.store(0, 5, page(1)) == 0
    backend.fail_puts = True
    assert shim.frontswap.store(0, 5, page(2)) == -1
    assert shim.frontswap.curr_pages() == 0
    assert backend.pages == {}
    assert shim.frontswap.load(0, 5) == page(2)  # never the stale page(1)
    assert shim.frontswap.stats()["failed_stores"] == 1


def test_writethrough_keeps_a_disk_copy(tmp_path: Path) -> None:
    shim, backend, backing = loaded(tmp_path, frontswap_writethrough="1")
    assert shim.frontswap.store(0, 9, page(9)) == -1  # as the kernel: report failure
    assert shim.frontswap.curr_pages() == 1 and backing.read(9) == page(9)
    backend.pages.clear()  # the backend may drop a writethrough page
    assert shim.frontswap.load(0, 9) == page(9)


def test_exclusive_gets_move_the_page_out_of_tmem(tmp_path: Path) -> None:
    shim, backend, _backing = loaded(tmp_path, frontswap_exclusive_gets="1")
    shim.frontswap.store(0, 3, page(3))
    assert shim.frontswap.load(0, 3) == page(3)
    assert shim.frontswap.curr_pages() == 0 and backend.pages == {}
    assert shim.frontswap.load(0, 3) == page(3)


def test_lost_page_is_an_error_not_silence(tmp_path: Path) -> None:
    shim, backend, _ = loaded(tmp_path)
    shim.frontswap.store(0, 3, page(3))
    backend.pages.clear()
    with pytest.raises(BackendError, match="could not return swap page 0:3"):
        shim.frontswap.load(0, 3)
    assert shim.frontswap.stats()["failed_loads"] == 1


def test_shrink_repatriates_oldest_first(tmp_path: Path) -> None:
    shim, _, backing = loaded(tmp_path)
    for off in range(40):
        shim.frontswap.store(0, off, page(off))
    assert shim.frontswap.shrink(30) == 10
    assert shim.frontswap.curr_pages() == 30
    assert backing.offsets() == list(range(10))
    assert shim.frontswap.shrink(35) == 0
    assert all(shim.frontswap.load(0, off) == page(off) for off in range(40))


def test_invalidate_page_and_area(tmp_path: Path) -> None:
    shim, backend, _backing = loaded(tmp_path)
    for off in range(20):
        shim.frontswap.store(0, off, page(off))
    shim.frontswap.invalidate_page(0, 4)
    assert shim.frontswap.load(0, 4) is None
    assert shim.frontswap.stats()["invalidates"] == 1
    shim.frontswap.invalidate_area(0)
    assert sum(1 for c in backend.calls if c[0] == "flush_object") == 16
    assert backend.pages == {} and shim.frontswap.swap_types() == []
    with pytest.raises(AbiError, match="not initialised"):
        shim.frontswap.load(0, 1)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    shim, _, _ = loaded(tmp_path)
    with pytest.raises(AbiError, match="4096 bytes"):
        shim.frontswap.store(0, 1, b"short")
    with pytest.raises(AbiError, match="outside the area"):
        shim.frontswap.store(0, 1 << 12, page(0))
    with pytest.raises(AbiError, match="already initialised"):
        shim.frontswap.init(0, MemoryBacking(4))
    assert shim.frontswap.curr_pages() == 0


def test_offsets_past_u32_never_reach_tmem(tmp_path: Path) -> None:
    shim = Shim(roots=Roots(root=tmp_path), boot=BootParams())
    shim.frontswap.init(0, MemoryBacking((1 << 32) + 2))
    shim.load(RecordingBackend)
    assert shim.frontswap.store(0, 1 << 32, page(1)) == -1
    assert shim.frontswap.load(0, 1 << 32) == page(1)
