"""Cleancache never returns stale data; keys map to oids as tmem.c does."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.errors import AbiError
from xentmem.guest.cmdline import BootParams
from xentmem.guest.shim import Shim
from xentmem.roots import Roots
from xentmem.tmem.abi import Oid, PoolUuid

A, B = b"a" * 4096, b"b" * 4096


@pytest.fixture
def shim(tmp_path: Path) -> Shim:
    s = Shim(roots=Roots(root=tmp_path), boot=BootParams())
    s.load(RecordingBackend)
    return s


def test_keys_become_oids(shim: Shim) -> None:
    fs = shim.cleancache.init_fs()
    shim.cleancache.put_page(fs, 77, 1, A)
    shim.cleancache.put_page(fs, b"\x01\x00\x00\x00\x02\x00\x00\x00", 1, A)
    backend = shim.backend
    puts = [c[2] for c in backend.calls if c[0] == "put_page"]
    assert puts[0] == Oid(77, 0, 0)
    assert puts[1] == Oid((2 << 32) | 1, 0, 0)
    with pytest.raises(AbiError, match="file handle"):
        shim.cleancache.put_page(fs, b"\x01" * 28, 1, A)


def test_invalidate_then_get_misses(shim: Shim) -> None:
    fs = shim.cleancache.init_shared_fs(PoolUuid(1, 2))
    shim.cleancache.put_page(fs, 5, 0, A)
    assert shim.cleancache.get_page(fs, 5, 0) == A  # shared: not exclusive
    assert shim.cleancache.get_page(fs, 5, 0) == A
    shim.cleancache.put_page(fs, 5, 0, B)
    assert shim.cleancache.get_page(fs, 5, 0) == B
    shim.cleancache.invalidate_page(fs, 5, 0)
    assert shim.cleancache.get_page(fs, 5, 0) is None
    shim.cleancache.put_page(fs, 6, 0, A)
    shim.cleancache.put_page(fs, 6, 1, A)
    shim.cleancache.invalidate_inode(fs, 6)
    assert shim.cleancache.get_page(fs, 6, 1) is None


def test_unmounted_fs_id_is_never_reused(shim: Shim) -> None:
    fs = shim.cleancache.init_fs()
    shim.cleancache.put_page(fs, 1, 1, A)
    shim.cleancache.invalidate_fs(fs)
    again = shim.cleancache.init_fs()
    assert again != fs
    with pytest.raises(AbiError, match="no cleancache filesystem"):
        shim.cleancache.get_page(fs, 1, 1)
    assert shim.cleancache.get_page(again, 1, 1) is None


def test_a_failed_flush_drops_a_shared_pool_for_every_fs_of_the_guest_that_shares_it(
        tmp_path: Path) -> None:
    """Two filesystems mounted with one uuid share one pool: a flush that fails on one
    dropped only that one's slot, so the pool and the stale page lived on, read by the
    other; every fs sharing it lets go now, and the pool goes with the page."""
    from xentmem.guest.backends.zcache import ZcacheBackend

    shim = Shim(roots=Roots(root=tmp_path), boot=BootParams())
    backend = shim.load(ZcacheBackend, {"capacity": "8M"})
    uuid = PoolUuid(0x1111, 0x2222)
    fs1, fs2 = shim.cleancache.init_shared_fs(uuid), shim.cleancache.init_shared_fs(uuid)
    private = shim.cleancache.init_fs()
    shim.cleancache.put_page(fs1, 42, 0, A)
    shim.cleancache.put_page(private, 42, 0, B)
    assert shim.cleancache.get_page(fs2, 42, 0) == A

    def fails(*_args: object) -> int:
        raise RuntimeError("flush: no reply")

    backend.flush_page = fails  # type: ignore[method-assign]
    shim.cleancache.invalidate_page(fs1, 42, 0)
    del backend.flush_page
    assert shim.cleancache.get_page(fs2, 42, 0) is None  # never the stale A
    assert shim.cleancache.real_pool_id(fs1) == shim.cleancache.real_pool_id(fs2) == -1
    assert shim.cleancache.get_page(private, 42, 0) == B  # another pool: untouched
    assert backend.pools() == [row for row in backend.pools() if not row["shared"]]
    shim.unload()


@pytest.mark.parametrize("uuid", [(-1, 0), (2**64, 0), (1, 2, 3), 5, (1.0, 2)])
def test_a_shared_fs_with_a_uuid_that_is_not_one_is_refused_and_recorded_nowhere(
        shim: Shim, uuid: object) -> None:
    before = shim.status()
    with pytest.raises(AbiError, match="u64"):
        shim.cleancache.init_shared_fs(uuid)  # type: ignore[arg-type]
    assert shim.status() == before
