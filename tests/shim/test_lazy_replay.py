"""Pools registered before any backend exists are replayed, in order, when one loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots
from xentmem.tmem.abi import (
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    POOL_SHARED_EPHEMERAL,
    PRIVATE_UUID,
    Oid,
    PoolUuid,
)

PAGE_A = bytes(range(256)) * 16
PAGE_B = b"B" * 4096


@pytest.fixture
def shim(tmp_path: Path) -> Shim:
    return Shim(roots=Roots(root=tmp_path), boot=BootParams())


def test_pools_recorded_before_backend_are_replayed_in_order(shim: Shim) -> None:
    uuid = PoolUuid.from_uuid("12345678-9abc-def0-1122-334455667788")
    fs1 = shim.cleancache.init_fs()
    shared = shim.cleancache.init_shared_fs(uuid)
    fs2 = shim.cleancache.init_fs()
    shim.frontswap.init(0, MemoryBacking(64))
    shim.frontswap.init(1, MemoryBacking(64))
    assert shim.cleancache.real_pool_id(fs1) == -1
    assert shim.frontswap.pool_id == -1

    backend = shim.load(RecordingBackend)

    new_pools = [c for c in backend.calls if c[0] == "new_pool"]
    # frontswap registers first (as xen_tmem_init does): one persistent pool for both types.
    assert new_pools == [
        ("new_pool", PRIVATE_UUID, POOL_PRIVATE_PERSISTENT),
        ("new_pool", PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL),
        ("new_pool", uuid, POOL_SHARED_EPHEMERAL),
        ("new_pool", PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL),
    ]
    assert (POOL_PRIVATE_EPHEMERAL, POOL_PRIVATE_PERSISTENT, POOL_SHARED_EPHEMERAL) == (
        0x01000000, 0x01000001, 0x01000002)
    # Fake ids now map to the real ids the backend handed out.
    assert shim.frontswap.pool_id == 0
    assert [shim.cleancache.real_pool_id(f) for f in (fs1, shared, fs2)] == [1, 2, 3]
    assert fs1 != 1 and fs1 >= 1000


def test_data_path_works_after_replay(shim: Shim) -> None:
    fs = shim.cleancache.init_fs()
    shim.frontswap.init(3, MemoryBacking(0x2000))
    # Before the backend: cleancache puts are not counted, gets fail; swap goes to backing.
    assert shim.cleancache.put_page(fs, 42, 7, PAGE_A) is False
    assert shim.cleancache.stats()["puts"] == 0
    assert shim.cleancache.get_page(fs, 42, 7) is None
    assert shim.frontswap.store(3, 100, PAGE_A) == -1
    assert shim.frontswap.stats()["succ_stores"] == 0

    backend = shim.load(RecordingBackend)

    assert shim.cleancache.put_page(fs, 42, 7, PAGE_B) is True
    assert shim.cleancache.get_page(fs, 42, 7) == PAGE_B
    # Private ephemeral gets are exclusive: the second get misses.
    assert shim.cleancache.get_page(fs, 42, 7) is None
    assert shim.frontswap.store(3, 0x1234, PAGE_B) == 0
    # The kernel's swizzle: oid (type << 4 | offset & 0xF), index offset >> 4.
    assert ("put_page", 0, Oid((3 << 4) | 0x4, 0, 0), 0x123) in backend.calls
    assert shim.frontswap.load(3, 0x1234) == PAGE_B
    assert shim.frontswap.load(3, 100) == PAGE_A  # stored before the backend: from backing
    assert shim.frontswap.curr_pages() == 1
    stats = shim.stats()
    assert stats["cleancache"]["puts"] == 1
    assert stats["cleancache"]["succ_gets"] == 1
    assert stats["frontswap"]["succ_stores"] == 1
    assert stats["frontswap"]["loads"] == 1


def test_pool_registered_after_load_gets_real_pool_at_once(shim: Shim) -> None:
    shim.load(RecordingBackend)
    fs = shim.cleancache.init_fs()
    assert shim.cleancache.real_pool_id(fs) >= 0
    shim.frontswap.init(0, MemoryBacking(16))
    assert shim.frontswap.pool_id >= 0


def test_no_filesystem_limit(shim: Shim) -> None:
    ids = [shim.cleancache.init_fs() for _ in range(100)]
    backend = shim.load(RecordingBackend, {"max_pools": 64})
    real = [shim.cleancache.real_pool_id(i) for i in ids]
    assert real[:64] == list(range(64))
    # Past the backend's own limit, pools are refused (negative) and that fs is uncached.
    assert all(r < 0 for r in real[64:])
    assert shim.cleancache.put_page(ids[99], 1, 0, PAGE_A) is False
    assert len(backend.pool_flags) == 64


def test_disabled_frontends_are_not_registered(shim: Shim) -> None:
    shim.cleancache.init_fs()
    shim.frontswap.init(0, MemoryBacking(16))
    backend = shim.load(RecordingBackend, {"cleancache": "0"})
    assert [c[2] for c in backend.calls if c[0] == "new_pool"] == [POOL_PRIVATE_PERSISTENT]
    assert shim.cleancache.ops is None
    assert shim.frontswap.ops is backend


def test_without_frontswap_the_loops_are_off(shim: Shim) -> None:
    shim.load(RecordingBackend, {"frontswap": "0"})
    assert shim.flags["selfballooning_at_load"] is False
    assert shim.flags["selfshrinking"] is False
