"""A backend that raises instead of answering must not cost a page or leave a stale one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakes.recording_backend import OtherBackend, RecordingBackend

from xentmem.errors import BackendError, XenStoreError
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots
from xentmem.tmem.abi import Oid, PoolUuid

A, B = b"a" * 4096, b"b" * 4096


def page(n: int) -> bytes:
    return n.to_bytes(4, "little") * 1024


class FlakyBackend(RecordingBackend):
    """Raises from the operations named in ``raise_on`` (a transport error, say)."""

    name = "flaky"
    raise_on: frozenset[str] = frozenset()
    new_pool_calls_before_raise = -1

    def _maybe_raise(self, op: str) -> None:
        if op in self.raise_on:
            raise XenStoreError(f"{op}: no reply from the tmem host")

    def new_pool(self, uuid: PoolUuid, flags: int) -> int:
        if self.new_pool_calls_before_raise == 0:
            raise XenStoreError("new_pool: no reply from the tmem host")
        self.new_pool_calls_before_raise -= 1
        return super().new_pool(uuid, flags)

    def put_page(self, pool_id: int, oid: Oid, index: int, data: bytes) -> int:
        self._maybe_raise("put_page")
        return super().put_page(pool_id, oid, index, data)

    def flush_page(self, pool_id: int, oid: Oid, index: int) -> int:
        self._maybe_raise("flush_page")
        return super().flush_page(pool_id, oid, index)

    def get_page(self, pool_id: int, oid: Oid, index: int) -> Any:
        self._maybe_raise("get_page")
        return super().get_page(pool_id, oid, index)


@pytest.fixture
def shim(tmp_path: Path) -> Shim:
    return Shim(roots=Roots(root=tmp_path), boot=BootParams())


def test_a_load_that_fails_half_way_leaves_no_stale_pool_ids(shim: Shim) -> None:
    fs_a, fs_b = shim.cleancache.init_fs(), shim.cleancache.init_fs()
    shim.frontswap.init(0, MemoryBacking(64))

    class FailsOnThirdPool(FlakyBackend):
        new_pool_calls_before_raise = 2  # frontswap's pool and fs_a's, then it raises

    with pytest.raises(XenStoreError):
        shim.load(FailsOnThirdPool)
    assert shim.backend is None
    assert shim.cleancache.real_pool_id(fs_a) == shim.cleancache.real_pool_id(fs_b) == -1
    assert shim.frontswap.pool_id == -1

    other = shim.load(OtherBackend)
    # Everything was replayed on the new backend, each fs in a pool of its own.
    pools = {shim.frontswap.pool_id, *(shim.cleancache.real_pool_id(f) for f in (fs_a, fs_b))}
    assert pools == {0, 1, 2}
    shim.frontswap.store(0, 3, page(3))
    shim.cleancache.invalidate_inode(fs_a, 3)  # must not touch the swap pool
    assert shim.frontswap.load(0, 3) == page(3)
    assert len(other.pool_flags) == 3


def test_a_load_refused_while_kept_pages_are_taken_back_leaves_frontswap_as_it_was(
        shim: Shim) -> None:
    """A backend whose pages outlive it failing while frontswap takes its kept pages back
    (restored_pages raising half way) once left frontswap with the removed backend's pool
    id, its swap types forgotten and pages marked in tmem: every later load made no pool
    and every store went to the backing store."""
    shim.frontswap.init(0, MemoryBacking(64))
    before = (shim.frontswap.describe(), shim.frontswap.curr_pages())

    class KeptThenFails(RecordingBackend):
        name = "kept"
        outlives_process = True

        def restored_pages(self, pool_id: int) -> Any:
            yield Oid(0), 1  # offset 16 of swap type 0: taken back, then the read fails
            raise XenStoreError("restored_pages: the arena's index is unreadable")

    with pytest.raises(XenStoreError, match="unreadable"):
        shim.load(KeptThenFails)
    assert shim.backend is None and shim.frontswap.pool_id == -1
    # the swap type waits for the next backend, no page is marked in tmem
    assert (shim.frontswap.describe(), shim.frontswap.curr_pages()) == before
    shim.load(OtherBackend)
    assert shim.frontswap.pool_id == 0  # the swap type was replayed on the next backend
    assert shim.frontswap.store(0, 3, page(3)) == 0  # into tmem
    assert shim.frontswap.curr_pages() == 1


def test_connect_failure_tears_the_backend_down(shim: Shim) -> None:
    removed: list[bool] = []

    class NoHost(RecordingBackend):
        name = "nohost"

        def connect(self) -> None:
            raise BackendError("no tmem host answered the handshake")

        def remove(self) -> None:
            removed.append(True)

    with pytest.raises(BackendError, match="handshake"):
        shim.load(NoHost)
    assert removed == [True] and shim.backend is None


def test_raising_put_sends_the_swap_page_to_its_backing_store(shim: Shim) -> None:
    shim.frontswap.init(0, MemoryBacking(64))
    backend = shim.load(FlakyBackend)
    assert shim.frontswap.store(0, 5, page(1)) == 0
    backend.raise_on = frozenset({"put_page", "flush_page"})
    assert shim.frontswap.store(0, 5, page(2)) == -1  # the dup flush and the put both raise
    assert shim.frontswap.load(0, 5) == page(2)
    assert shim.frontswap.curr_pages() == 0
    assert shim.frontswap.stats()["backend_errors"] == 2
    backend.raise_on = frozenset()
    shim.unload()
    assert shim.frontswap.load(0, 5) == page(2)


def test_raising_cleancache_ops_never_leave_a_stale_page(shim: Shim) -> None:
    fs = shim.cleancache.init_shared_fs(PoolUuid(1, 1))
    backend = shim.load(FlakyBackend)
    shim.cleancache.put_page(fs, 7, 0, A)
    backend.raise_on = frozenset({"put_page"})
    assert shim.cleancache.put_page(fs, 7, 0, B) is False  # raised; the old copy is flushed
    backend.raise_on = frozenset()
    assert shim.cleancache.get_page(fs, 7, 0) is None

    shim.cleancache.put_page(fs, 8, 0, A)
    backend.raise_on = frozenset({"flush_page"})
    shim.cleancache.invalidate_page(fs, 8, 0)  # cannot flush: the fs gives up its pool
    backend.raise_on = frozenset()
    assert shim.cleancache.real_pool_id(fs) == -1
    assert shim.cleancache.get_page(fs, 8, 0) is None

    backend.raise_on = frozenset({"get_page"})
    fs2 = shim.cleancache.init_fs()
    assert shim.cleancache.get_page(fs2, 1, 0) is None  # a raising get is a miss
    assert shim.cleancache.stats()["backend_errors"] >= 3


def test_a_bad_boot_word_is_ignored_not_fatal(tmp_path: Path, caplog: Any) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cmdline").write_text("tmem tmem.frontswap=maybe tmem.cleancache=0\n")
    shim = Shim(roots=Roots(root=tmp_path))
    shim.load(RecordingBackend)
    assert shim.flags["frontswap"] is True and shim.flags["cleancache"] is False
    assert "kernel command line: frontswap: 'maybe' is not a boolean" in caplog.text


def test_stores_during_an_unload_go_to_the_backing_store(shim: Shim) -> None:
    """A store that lands while the unload repatriates must not go back into tmem."""
    shim.frontswap.init(0, MemoryBacking(4096))

    class StoresWhileDraining(RecordingBackend):
        name = "draining"
        during_get: list[int] = []

        def get_page(self, pool_id: int, oid: Oid, index: int) -> Any:
            for offset in self.during_get:  # another thread's store, mid-repatriation
                assert shim.frontswap.store(0, offset, page(offset)) == -1
            self.during_get = []
            return super().get_page(pool_id, oid, index)

    backend = shim.load(StoresWhileDraining)
    for off in range(600):  # more than one repatriation batch
        shim.frontswap.store(0, off, page(off))
    backend.during_get = [1000, 3]
    assert shim.unload()["repatriated"] == 599  # offset 3 was re-stored to backing meanwhile
    assert shim.frontswap.load(0, 1000) == page(1000)
    assert all(shim.frontswap.load(0, off) == page(off) for off in range(600))
