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
