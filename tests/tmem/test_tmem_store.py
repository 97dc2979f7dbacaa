"""The tmem store's rules, op by op (docs/tmem-semantics.md, "The store").

Pages go in as stored forms; a raw page (4096 bytes) makes capacity arithmetic exact.
"""

from __future__ import annotations

import errno
import random
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lz4.block import compress

from xentmem.tmem.abi import (
    EEMPTY,
    EFROZEN,
    MAX_POOLS_PER_DOMAIN,
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    POOL_SHARED_EPHEMERAL,
    PRIVATE_UUID,
    WILDCARD_UUID,
    ZERO_PAGE,
    Oid,
    PoolUuid,
    pool_flags,
)
from xentmem.tmem.arenafile import DATA_STEP
from xentmem.tmem.store import (
    EPHEMERAL_PAGE_OVERHEAD,
    OBJECT_OVERHEAD,
    PERSISTENT_PAGE_OVERHEAD,
    ArenaPages,
    MemoryPages,
    PageKey,
    PageStorage,
    PageStorageFull,
    TmemStore,
    pack_page,
    unpack_page,
)

RAW = random.Random(7).randbytes(PAGE_SIZE)
RAW2 = random.Random(8).randbytes(PAGE_SIZE)
TEXT = pack_page((b"struct tmem_pool *pool; " * 200)[:PAGE_SIZE])
EPH = PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD
PERS = PAGE_SIZE + PERSISTENT_PAGE_OVERHEAD
UUID = PoolUuid(0x1234, 0x5678)


def eph_pool(store: TmemStore, cid: int) -> int:
    return store.new_pool(cid, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)


def pers_pool(store: TmemStore, cid: int) -> int:
    return store.new_pool(cid, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)


# -- stored forms ------------------------------------------------------------------------------


def test_stored_forms_are_told_apart_by_length() -> None:
    text = (b"zcache " * 700)[:PAGE_SIZE]
    assert pack_page(ZERO_PAGE) == b"" and unpack_page(b"") == ZERO_PAGE
    assert pack_page(RAW) is RAW and unpack_page(RAW) is RAW
    assert 0 < len(pack_page(text)) < PAGE_SIZE and unpack_page(pack_page(text)) == text
    assert pack_page(bytearray(RAW)) == RAW  # a mutable page is copied


def test_an_lz4_block_that_decodes_to_less_than_a_page_is_refused() -> None:
    """Fails before: ``uncompressed_size`` only bounds lz4's output, so a block of 100
    bytes' worth came back as a 'page' of 100 bytes (a shared pool's value, written by
    another host, reached get_page so)."""
    with pytest.raises(ValueError, match="decodes to 100 bytes, not 4096"):
        unpack_page(compress(b"z" * 100, store_size=False))
    with pytest.raises(ValueError, match="decodes to 4095 bytes"):
        unpack_page(compress(b"z" * (PAGE_SIZE - 1), store_size=False))


# -- pools -------------------------------------------------------------------------------------


def test_sixteen_pools_a_client_by_default_lowest_free_slot() -> None:
    store = TmemStore(1 << 20)
    assert [eph_pool(store, 1) for _ in range(17)] == [*range(16), -errno.EPERM]
    assert MAX_POOLS_PER_DOMAIN == 16
    assert store.destroy_pool(1, 4) == 1 and store.destroy_pool(1, 4) == 0
    assert store.destroy_pool(1, 99) == 0 and store.destroy_pool(1, -1) == 0
    assert pers_pool(store, 1) == 4
    assert eph_pool(store, 2) == 0  # per client
    assert eph_pool(TmemStore(1 << 20, max_pools=1024), 1) == 0


@pytest.mark.parametrize("flags", [0, pool_flags(persistent=True, shared=True),
                                   pool_flags(persistent=False, page_size=8192),
                                   POOL_PRIVATE_EPHEMERAL | 4, POOL_PRIVATE_EPHEMERAL | 0x100])
def test_refused_flag_words_are_eperm_and_still_make_the_client(flags: int) -> None:
    store = TmemStore(1 << 20)
    assert store.new_pool(3, PRIVATE_UUID, flags) == -errno.EPERM
    assert list(store.clients) == [3] and store.pool_rows(3) == []


@pytest.mark.parametrize(("uuid", "flags"), [(PRIVATE_UUID, -1), (PRIVATE_UUID, 1 << 32),
                                             ((1, -2), POOL_SHARED_EPHEMERAL)])
def test_what_is_not_a_u32_word_or_a_uuid_is_einval(uuid: tuple[int, int], flags: int) -> None:
    store = TmemStore(1 << 20)
    assert store.new_pool(3, uuid, flags) == -errno.EINVAL
    assert store.pool_rows(3) == []


def test_shared_pools_need_an_authorised_uuid_while_shared_auth_is_on() -> None:
    store = TmemStore(1 << 20)
    private = store.new_pool(1, UUID, POOL_SHARED_EPHEMERAL)
    assert store.pool_rows(1)[0]["kind"] == "private-ephemeral"
    assert store.pool_rows(1)[0]["flags"] == f"{POOL_PRIVATE_EPHEMERAL:#010x}"
    store.authorise(1, UUID, True)
    store.authorise(2, UUID, True)
    s1 = store.new_pool(1, UUID, POOL_SHARED_EPHEMERAL)
    s2 = store.new_pool(2, UUID, POOL_SHARED_EPHEMERAL)
    assert store.put_page(1, s1, Oid(1), 0, TEXT) == 1
    assert store.get_page(2, s2, Oid(1), 0) == (1, TEXT)
    assert store.get_page(1, private, Oid(1), 0) == (-EEMPTY, None)
    assert store.new_pool(1, WILDCARD_UUID, POOL_SHARED_EPHEMERAL) >= 0
    assert len(store.shared_pools) == 1  # (-1, -1) is always private
    store.authorise(3, UUID, False)
    assert store.pool_rows(3) == [] and store.new_pool(3, UUID, POOL_SHARED_EPHEMERAL) == 0
    assert store.pool_rows(3)[0]["shared"] is False


def test_the_host_holds_at_most_so_many_shared_pools() -> None:
    store = TmemStore(1 << 20, shared_auth=False, max_shared_pools=2)
    assert store.new_pool(1, PoolUuid(1, 1), POOL_SHARED_EPHEMERAL) == 0
    assert store.new_pool(1, PoolUuid(2, 2), POOL_SHARED_EPHEMERAL) == 1
    assert store.new_pool(2, PoolUuid(1, 1), POOL_SHARED_EPHEMERAL) == 0  # joining is fine
    assert store.new_pool(1, PoolUuid(3, 3), POOL_SHARED_EPHEMERAL) == -errno.EPERM


def test_a_shared_pools_pages_go_to_the_next_member_when_their_putter_leaves() -> None:
    store = TmemStore(1 << 20, shared_auth=False)
    s1 = store.new_pool(1, UUID, POOL_SHARED_EPHEMERAL)
    s2 = store.new_pool(2, UUID, POOL_SHARED_EPHEMERAL)
    assert store.put_page(1, s1, Oid(1), 0, RAW) == 1
    assert store.put_page(2, s2, Oid(1), 1, RAW) == 1
    assert (store.clients[1].eph_bytes, store.clients[2].eph_bytes) == (EPH, EPH)
    assert store.destroy_client(1) == 1
    assert store.clients[2].eph_bytes == 2 * EPH and store.clients[2].eph_pages == 2
    assert store.get_page(2, s2, Oid(1), 0) == (1, RAW)
    assert store.destroy_pool(2, s2) == 1
    assert store.used_bytes == 0 and store.shared_pools == {}
    assert list(store.pages.keys()) == []


# -- pages -------------------------------------------------------------------------------------


def test_gets_exclusive_from_private_ephemeral_pools_only() -> None:
    store = TmemStore(1 << 20, shared_auth=False)
    pools = {"eph": eph_pool(store, 1), "pers": pers_pool(store, 1),
             "shared": store.new_pool(1, UUID, POOL_SHARED_EPHEMERAL)}
    for pool in pools.values():
        assert store.get_page(1, pool, Oid(1), 0) == (-EEMPTY, None)
        assert store.put_page(1, pool, Oid(1), 0, TEXT) == 1
        assert store.put_page(1, pool, Oid(1), 1, b"") == 1
        assert store.get_page(1, pool, Oid(1), 0) == (1, TEXT)
        assert store.get_page(1, pool, Oid(2), 0) == (0, None)
    assert store.get_page(1, pools["eph"], Oid(1), 0) == (0, None)
    assert store.get_page(1, pools["pers"], Oid(1), 0) == (1, TEXT)
    assert store.get_page(1, pools["shared"], Oid(1), 0) == (1, TEXT)
    assert store.get_page(1, 9, Oid(1), 0) == (-errno.ENODEV, None)
    assert store.put_page(1, 9, Oid(1), 0, RAW) == -errno.ENODEV
    assert store.flush_page(1, 9, Oid(1), 0) == store.flush_object(1, 9, Oid(1)) == -errno.ENODEV


def test_a_duplicate_put_replaces_and_a_failed_one_leaves_no_stale_copy() -> None:
    store = TmemStore(PERS + 2 * (len(TEXT) + PERSISTENT_PAGE_OVERHEAD) + OBJECT_OVERHEAD)
    pool = pers_pool(store, 1)
    assert store.put_page(1, pool, Oid(1), 0, TEXT) == 1
    assert store.put_page(1, pool, Oid(1), 1, TEXT) == 1
    assert store.put_page(1, pool, Oid(1), 0, b"") == 1  # replaced
    assert store.get_page(1, pool, Oid(1), 0) == (1, b"")
    assert store.put_page(1, pool, Oid(1), 1, RAW) == 1  # fits once its old copy is gone
    assert store.put_page(1, pool, Oid(1), 0, RAW) == -errno.ENOSPC  # too big: old one dropped
    assert store.get_page(1, pool, Oid(1), 0) == (0, None)
    assert store.refuse_put(1, pool, Oid(1), 1, -errno.EINVAL) == -errno.EINVAL
    assert store.get_page(1, pool, Oid(1), 1) == (-EEMPTY, None)
    counters = store.clients[1].counters
    assert (counters.put_to_flush, counters.failed_pers_puts) == (2, 2)
    assert store.used_bytes == 0


def test_flushes_say_whether_they_flushed() -> None:
    store = TmemStore(1 << 20)
    pool = eph_pool(store, 1)
    for index in range(3):
        store.put_page(1, pool, Oid(1, 2, 3), index, TEXT)
    assert store.flush_page(1, pool, Oid(1, 2, 3), 0) == 1
    assert store.flush_page(1, pool, Oid(1, 2, 3), 0) == 0
    assert store.flush_object(1, pool, Oid(1, 2, 3)) == 1
    assert store.flush_object(1, pool, Oid(1, 2, 3)) == 0
    assert store.used_bytes == 0 and store.obj_count == 0


def test_freeze_refuses_new_puts_allows_duplicates_and_flushes_say_efrozen() -> None:
    store = TmemStore(1 << 20)
    pool = pers_pool(store, 1)
    assert store.put_page(1, pool, Oid(1), 0, TEXT) == 1
    store.freeze(1)
    assert store.put_page(1, pool, Oid(1), 1, TEXT) == -EFROZEN
    assert store.put_page(1, pool, Oid(1), 0, RAW) == 1
    assert store.get_page(1, pool, Oid(1), 0) == (1, RAW)
    assert store.flush_page(1, pool, Oid(1), 0) == -EFROZEN
    assert store.get_page(1, pool, Oid(1), 0) == (-EEMPTY, None)  # flushed all the same
    store.freeze(1, False)
    assert store.put_page(1, pool, Oid(1), 1, TEXT) == 1


# -- capacity, eviction, weights, caps ---------------------------------------------------------


def test_the_oldest_ephemeral_page_goes_and_persistent_pages_never_do() -> None:
    store = TmemStore(2 * EPH + 2 * PERS + 2 * OBJECT_OVERHEAD)  # one object a pool
    eph, pers = eph_pool(store, 1), pers_pool(store, 2)
    assert store.put_page(1, eph, Oid(1), 0, RAW) == 1
    assert store.put_page(1, eph, Oid(1), 1, RAW) == 1
    assert store.put_page(2, pers, Oid(1), 0, RAW) == 1
    assert store.put_page(2, pers, Oid(1), 1, RAW) == 1
    assert store.put_page(1, eph, Oid(1), 2, RAW) == 1
    assert store.get_page(1, eph, Oid(1), 0) == (0, None)  # the oldest
    assert store.evictions == 1 and store.clients[1].counters.evicted == 1
    assert store.put_page(2, pers, Oid(1), 2, RAW) == 1  # a persistent put evicts ephemeral
    assert store.put_page(1, eph, Oid(1), 3, RAW) == 1
    assert store.put_page(1, eph, Oid(1), 4, RAW) == 1  # only its own page left to go
    assert store.put_page(1, pers_pool(store, 1), Oid(1), 0, RAW) == 1
    # One guest cannot push out another guest's persistent pages:
    assert store.put_page(1, 1, Oid(1), 1, RAW) == -errno.ENOMEM
    assert store.put_page(1, eph, Oid(1), 5, RAW) == -errno.ENOMEM
    assert all(store.get_page(2, pers, Oid(1), i) == (1, RAW) for i in range(3))


def test_a_shared_get_makes_the_page_most_recently_used() -> None:
    store = TmemStore(3 * EPH + OBJECT_OVERHEAD, shared_auth=False)
    pool = store.new_pool(1, UUID, POOL_SHARED_EPHEMERAL)
    for index in range(3):
        store.put_page(1, pool, Oid(1), index, RAW)
    assert store.get_page(1, pool, Oid(1), 0) == (1, RAW)
    store.put_page(1, pool, Oid(1), 3, RAW)
    assert store.get_page(1, pool, Oid(1), 1) == (0, None)
    assert store.get_page(1, pool, Oid(1), 0) == (1, RAW)


def test_without_weights_the_hosts_oldest_page_goes_whoever_holds_it() -> None:
    store = TmemStore(4 * EPH)
    pools = {cid: eph_pool(store, cid) for cid in (1, 2)}
    for index in range(2):
        for cid in (1, 2):
            store.put_page(cid, pools[cid], Oid(1), index, RAW)
    store.put_page(2, pools[2], Oid(1), 2, RAW)
    assert store.get_page(1, pools[1], Oid(1), 0) == (0, None)  # client 1's was the oldest


def test_with_weights_the_client_most_over_its_share_pays() -> None:
    store = TmemStore(6 * EPH + 3 * OBJECT_OVERHEAD)
    pools = {cid: eph_pool(store, cid) for cid in (1, 2, 3)}
    for cid, weight in ((1, 1), (2, 1), (3, 2)):
        store.set_weight(cid, weight)
    for cid, count in ((3, 1), (1, 2), (2, 3)):  # shares 1/6, 2/6, 3/6 of weights 2/4, 1/4, 1/4
        for index in range(count):
            assert store.put_page(cid, pools[cid], Oid(1), index, RAW) == 1
    assert store.put_page(3, pools[3], Oid(1), 9, RAW) == 1
    assert store.clients[2].eph_pages == 2  # 3/6 held for a 1/4 share: the most over
    assert store.clients[3].eph_pages == 2  # its page 0, the host's oldest, stayed
    assert store.put_page(1, pools[1], Oid(1), 9, RAW) == 1  # 1 now holds 2/6 for 1/4: its own
    assert (store.clients[1].eph_pages, store.clients[2].eph_pages) == (2, 2)
    with pytest.raises(ValueError, match="weight"):
        store.set_weight(1, -1)


def test_a_cap_bounds_a_client_evicting_its_own_pages_only() -> None:
    store = TmemStore(1 << 20)
    eph1, pers1, eph2 = eph_pool(store, 1), pers_pool(store, 1), eph_pool(store, 2)
    assert store.put_page(2, eph2, Oid(1), 0, RAW) == 1
    for index in range(3):
        assert store.put_page(1, eph1, Oid(1), index, RAW) == 1
    assert store.set_cap(1, 2 * EPH) == 1  # lowered below what it holds: its oldest goes
    assert store.get_page(1, eph1, Oid(1), 0) == (0, None)
    assert store.put_page(1, pers1, Oid(1), 0, RAW) == 1  # evicted its own page 1
    assert store.put_page(1, pers1, Oid(1), 1, RAW) == 1  # and page 2
    assert store.clients[1].charged == 2 * PERS <= 2 * EPH
    assert store.put_page(1, pers1, Oid(1), 2, RAW) == -errno.ENOMEM  # only persistent left
    assert store.get_page(2, eph2, Oid(1), 0) == (1, RAW)  # never another client's page
    with pytest.raises(ValueError, match="cap"):
        store.set_cap(1, -1)


def test_a_smaller_capacity_evicts_ephemeral_pages_and_keeps_persistent_ones() -> None:
    store = TmemStore(4 * EPH + PERS + 2 * OBJECT_OVERHEAD)
    eph, pers = eph_pool(store, 1), pers_pool(store, 1)
    store.put_page(1, pers, Oid(1), 0, RAW)
    for index in range(4):
        store.put_page(1, eph, Oid(1), index, RAW)
    assert store.set_capacity(PERS // 2) == 4
    assert store.used_bytes == PERS + OBJECT_OVERHEAD  # the ephemeral object went too
    assert store.put_page(1, eph, Oid(1), 0, b"") == -errno.ENOMEM
    assert store.get_page(1, pers, Oid(1), 0) == (1, RAW)


def test_tmemc_flush_and_freeable_count_ephemeral_bytes_only() -> None:
    store = TmemStore(1 << 20)
    eph, pers = eph_pool(store, 1), pers_pool(store, 1)
    for index in range(3):
        store.put_page(1, eph, Oid(1), index, RAW)
        store.put_page(1, pers, Oid(1), index, RAW)
    assert store.freeable_bytes() == 3 * EPH
    assert store.flush_ephemeral(1) == EPH
    assert store.flush_ephemeral() == 2 * EPH + OBJECT_OVERHEAD  # the object with its last
    assert store.flush_ephemeral() == 0 and store.clients[1].pers_pages == 3


# -- the storage under the store ---------------------------------------------------------------

def _arena_pages(directory: Path) -> ArenaPages:
    directory.mkdir(exist_ok=True)
    return ArenaPages.open(directory / "arena", max_bytes=64 << 20, segment_size=1 << 20)


#: Every PageStorage the store may run on, made in a test's own directory.
STORAGES: list[Callable[[Path], PageStorage]] = [lambda _: MemoryPages(), _arena_pages]


@pytest.mark.parametrize("make", STORAGES, ids=["memory", "arena"])
def test_a_page_storage_keeps_what_it_is_given_by_key(
        make: Callable[[Path], PageStorage], tmp_path: Path) -> None:
    pages = make(tmp_path)
    assert isinstance(pages, PageStorage)
    first, second = (3, 1, 2, (1 << 64) - 1, 0), (3, 1, 2, 3, (1 << 32) - 1)
    assert pages.get(first) is None
    pages.put(first, TEXT)
    pages.put(second, b"")
    assert (pages.get(first), pages.get(second)) == (TEXT, b"")
    assert sorted(pages.keys()) == sorted([first, second])
    pages.delete(first)
    assert pages.get(first) is None and list(pages.keys()) == [second]
    assert all(isinstance(v, int) for v in pages.counters().values())


@pytest.mark.parametrize("make", STORAGES, ids=["memory", "arena"])
def test_the_store_runs_on_each_storage(
        make: Callable[[Path], PageStorage], tmp_path: Path) -> None:
    """What the storage takes beyond the pages (an arena's tables, its free frames) counts
    against the capacity too: the memory bound holds whatever the storage (give or take an
    arena's one growth step, given back at the next put)."""
    store = TmemStore(8 * EPH + (64 << 10), pages=make(tmp_path))
    pool = eph_pool(store, 1)
    for index in range(40):
        assert store.put_page(1, pool, Oid(index), index, RAW) == 1
        assert store.memory_bytes() <= store.capacity_bytes + DATA_STEP
    assert store.evictions > 0
    assert store.get_page(1, pool, Oid(0), 0) == (0, None)  # evicted
    assert store.get_page(1, pool, Oid(39), 39) == (1, RAW)
    assert len(list(store.pages.keys())) == store.clients[1].eph_pages


class LossyPages(MemoryPages):
    """Storage that loses the pages it is told to, and is full when told."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.held: dict[PageKey, bytes] = {}
        self.put = self._put  # type: ignore[method-assign]
        self.get = self.held.get  # type: ignore[method-assign]
        self.delete = self.held.__delitem__  # type: ignore[method-assign]

    def _put(self, key: PageKey, data: bytes) -> None:
        if self.full:
            raise PageStorageFull
        self.held[key] = data

    def keys(self) -> Iterator[PageKey]:
        return iter(list(self.held))


def test_a_page_the_storage_lost_is_never_served_and_counted() -> None:
    pages = LossyPages()
    store = TmemStore(1 << 20, pages=pages)
    pool = pers_pool(store, 1)
    assert store.put_page(1, pool, Oid(1), 0, TEXT) == 1
    assert store.put_page(1, pool, Oid(1), 1, TEXT) == 1
    (lost,) = [key for key in pages.held if key[-1] == 0]
    del pages.held[lost]
    assert store.get_page(1, pool, Oid(1), 0) == (0, None)
    assert store.clients[1].counters.lost_pages == 1
    assert store.clients[1].pers_pages == 1 and store.get_page(1, pool, Oid(1), 1) == (1, TEXT)


def test_a_full_storage_fails_the_put_and_changes_nothing_else() -> None:
    pages = LossyPages()
    store = TmemStore(1 << 20, pages=pages)
    pool = eph_pool(store, 1)
    pages.full = True
    assert store.put_page(1, pool, Oid(1), 0, TEXT) == -errno.ENOMEM
    assert store.used_bytes == 0 and store.obj_count == 0 and store.clients[1].lru == {}


def test_page_keys_name_the_pool_oid_words_and_index() -> None:
    store = TmemStore(1 << 20)
    pool = pers_pool(store, 1)
    store.put_page(1, pool, Oid(7, 8, 9), 10, TEXT)
    gid = store.clients[1].slots[pool].gid  # type: ignore[union-attr]
    assert list(store.pages.keys()) == [(gid, 7, 8, 9, 10)]
    assert store.pages.counters() == {"storage_pages": 1, "storage_bytes": len(TEXT)}


@pytest.mark.parametrize(("flags", "charged"), [
    (POOL_PRIVATE_EPHEMERAL, EPHEMERAL_PAGE_OVERHEAD),
    (POOL_PRIVATE_PERSISTENT, PERSISTENT_PAGE_OVERHEAD),
])
def test_the_charged_overhead_covers_what_the_bookkeeping_takes(flags: int, charged: int) -> None:
    """The figure charged per page is at least what tracemalloc sees the store allocate for
    it, beyond the data (which the caller made): its key, index, storage and LRU entries.
    22000 pages: the dicts have just grown, the dearest moment per page."""
    store = TmemStore(1 << 40)
    pool = store.new_pool(1, PRIVATE_UUID, flags)
    count = 22_000
    blocks = [i.to_bytes(4, "little") * 25 for i in range(count)]
    oids = [Oid(1000 + i) for i in range(16)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, block in enumerate(blocks):
            store.put_page(1, pool, oids[i % 16], 300 + i // 16, block)
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    bytes_header = sys.getsizeof(b"")  # a stored page's ``bytes`` header, charged too
    assert taken / count + bytes_header <= charged


@pytest.mark.parametrize(("flags", "charged"), [
    (POOL_PRIVATE_EPHEMERAL, EPHEMERAL_PAGE_OVERHEAD),
    (POOL_PRIVATE_PERSISTENT, PERSISTENT_PAGE_OVERHEAD),
])
def test_an_object_of_one_page_is_charged_what_it_takes(flags: int, charged: int) -> None:
    """A guest that puts every page in an object of its own, with oid words and indexes as
    large as the ABI allows (as a request decodes them: fresh ints each), is charged at least
    what the store allocates for it; it once held twice what it was charged.  The charge
    goes with the object's last page."""
    store = TmemStore(1 << 40)
    pool = store.new_pool(1, PRIVATE_UUID, flags)
    count = 22_000
    rnd = random.Random(1)
    top = 1 << 63
    words = [(rnd.getrandbits(64) | top, rnd.getrandbits(64) | top, rnd.getrandbits(64) | top,
              rnd.getrandbits(32) | 1 << 31) for _ in range(count)]
    blocks = [i.to_bytes(4, "little") * 25 for i in range(count)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for (w0, w1, w2, index), block in zip(words, blocks, strict=True):
            oid = Oid(int(str(w0)), int(str(w1)), int(str(w2)))  # fresh, as decoded
            assert store.put_page(1, pool, oid, int(str(index)), block) == 1
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert taken / count + sys.getsizeof(b"") <= charged + OBJECT_OVERHEAD
    data = sum(map(len, blocks))
    assert store.used_bytes == data + count * (charged + OBJECT_OVERHEAD)
    for w0, w1, w2, _index in words[: count // 2]:
        assert store.flush_object(1, pool, Oid(w0, w1, w2)) == 1
    assert store.used_bytes == (count - count // 2) * (charged + OBJECT_OVERHEAD) + sum(
        map(len, blocks[count // 2:]))
    store.destroy_pool(1, pool)
    assert store.used_bytes == 0 and store.obj_count == 0


def test_pages_handed_over_from_a_leaver_keep_the_heir_within_its_cap() -> None:
    """Regression (found by the model): a guest leaving a shared pool handed its pages to the
    next member beyond that member's cap; the heir's own oldest pages now go, as when its cap
    is lowered."""
    store = TmemStore(1 << 20, shared_auth=False)
    heir = store.new_pool(2, UUID, POOL_SHARED_EPHEMERAL)
    leaver = store.new_pool(3, UUID, POOL_SHARED_EPHEMERAL)
    store.set_cap(2, EPH)
    for index in range(4):
        assert store.put_page(3, leaver, Oid(1), index, RAW) == 1
    assert store.destroy_client(3) == 1
    assert store.clients[2].charged == EPH and store.clients[2].counters.evicted == 3
    assert store.get_page(2, heir, Oid(1), 3) == (1, RAW)  # the newest stayed


def test_an_arena_storage_dropped_without_close_lets_go_of_its_file(tmp_path: Path) -> None:
    """The arena holds its file as a plain fd: a backend never removed (a test, a failed
    load) must not keep it, its lock and its map for the rest of the process."""
    import gc
    import os

    before = len(os.listdir("/proc/self/fd"))
    for n in range(5):
        pages = _arena_pages(tmp_path / str(n))
        pages.put((0, 1, 2, 3, 4), TEXT)
        del pages
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    again = _arena_pages(tmp_path / "0")  # its lock was released too
    assert again.get((0, 1, 2, 3, 4)) == TEXT
    again.close()


@pytest.mark.parametrize("make", STORAGES, ids=["memory", "arena"])
def test_a_flood_evicts_by_weight_and_never_another_clients_persistent_pages(
        make: Callable[[Path], PageStorage], tmp_path: Path) -> None:
    """Client 6 floods, client 5 puts a third as often; weights 1 and 3: at capacity each
    keeps about its weight's share of the ephemeral bytes, and client 5's persistent pages
    all stay, on either storage (an arena's free frames count until given back)."""
    store = TmemStore(2 << 20, pages=make(tmp_path))
    pers5, eph5, eph6, pers6 = (pers_pool(store, 5), eph_pool(store, 5), eph_pool(store, 6),
                                pers_pool(store, 6))
    store.set_weight(5, 1)
    store.set_weight(6, 3)
    kept = [random.Random(i).randbytes(PAGE_SIZE) for i in range(64)]
    for index, page in enumerate(kept):
        assert store.put_page(5, pers5, Oid(1), index, page) == 1
    for n in range(3000):
        store.put_page(6, eph6, Oid(2), n, RAW if n % 2 else TEXT)
        store.put_page(6, pers6, Oid(3), n % 16, RAW2)  # duplicates on 16 keys
        if n % 3 == 0:
            store.put_page(5, eph5, Oid(2), n, RAW)
    five, six = store.clients[5], store.clients[6]
    assert store.evictions > 1000 and five.eph_pages and six.eph_pages
    assert 2 <= six.eph_bytes / five.eph_bytes <= 4, (six.eph_bytes, five.eph_bytes)
    assert store.memory_bytes() <= store.capacity_bytes + DATA_STEP
    assert all(store.get_page(5, pers5, Oid(1), i) == (1, page) for i, page in enumerate(kept))
