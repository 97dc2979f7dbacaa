"""The zcache store's tmem semantics, through the public Backend interface only.

Sizes are chosen so capacity arithmetic is exact: a noise page is stored raw (4096 bytes), so
it costs 4096 + the pool kind's per-page overhead, which the store publishes.
"""

from __future__ import annotations

import errno
import random
import threading

import pytest

from xentmem.guest.backends.zcache import (
    EPHEMERAL_PAGE_OVERHEAD,
    OBJECT_OVERHEAD,
    PERSISTENT_PAGE_OVERHEAD,
    ZcacheBackend,
)
from xentmem.tmem.abi import (
    EEMPTY,
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    POOL_SHARED_EPHEMERAL,
    PRIVATE_UUID,
    WILDCARD_UUID,
    ZERO_PAGE,
    Oid,
    PoolUuid,
    TmemControl,
)

MIB = 1 << 20
GIB = 1 << 30
UUID_A = PoolUuid.from_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
UUID_B = PoolUuid.from_uuid("11111111-2222-3333-4444-555555555555")
EPH_RAW_COST = PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD
PERS_RAW_COST = PAGE_SIZE + PERSISTENT_PAGE_OVERHEAD


def text_page(seed: int) -> bytes:
    rng = random.Random(seed)
    words = " ".join(f"word{rng.randrange(400)}" for _ in range(1200))
    return words.encode()[:PAGE_SIZE]


def noise_page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


def make_store(capacity: str = "64M", **values: object) -> ZcacheBackend:
    return ZcacheBackend({"capacity": capacity, **values}, total_ram=lambda: GIB)


@pytest.fixture
def store() -> ZcacheBackend:
    return make_store()


def private_eph(store: ZcacheBackend) -> int:
    return store.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)


def persistent(store: ZcacheBackend) -> int:
    return store.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)


# -- pools -------------------------------------------------------------------------------------


def test_pool_ids_are_the_lowest_free_slots(store: ZcacheBackend) -> None:
    assert [private_eph(store), persistent(store), private_eph(store)] == [0, 1, 2]
    assert store.destroy_pool(1) == 1
    assert persistent(store) == 1
    assert private_eph(store) == 3


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (0x00000000, "spec version 0"),
        (0x02000000, "spec version 2"),
        (0x01000003, "shared and persistent"),
        (0x01000010, "8 KiB pages"),
        (0x01000004, "precompressed"),
        (0x01000100, "a reserved bit"),
        (0x01800000 | 0x00010000, "a reserved bit, high"),
    ],
)
def test_new_pool_refuses_bad_flag_words_with_eperm(
    store: ZcacheBackend, flags: int, why: str
) -> None:
    assert store.new_pool(PRIVATE_UUID, flags) == -errno.EPERM, why
    assert store.pools() == []


@pytest.mark.parametrize("flags", [-1, 1 << 32, "0x01000000", None])
def test_new_pool_refuses_a_word_that_is_not_u32_with_einval(
    store: ZcacheBackend, flags: object
) -> None:
    assert store.new_pool(PRIVATE_UUID, flags) == -errno.EINVAL  # type: ignore[arg-type]
    assert store.pools() == []


def test_new_pool_refuses_a_bad_uuid(store: ZcacheBackend) -> None:
    assert store.new_pool((1, -2), POOL_SHARED_EPHEMERAL) == -errno.EINVAL  # type: ignore[arg-type]
    assert store.new_pool((1,), POOL_SHARED_EPHEMERAL) == -errno.EINVAL  # type: ignore[arg-type]


def test_no_free_slot_is_eperm_until_one_is_destroyed() -> None:
    store = make_store(max_pools=2)
    assert private_eph(store) == 0
    assert persistent(store) == 1
    assert private_eph(store) == -errno.EPERM
    store.destroy_pool(0)
    assert private_eph(store) == 0


def test_destroy_of_a_bad_or_empty_slot_returns_0(store: ZcacheBackend) -> None:
    pool = private_eph(store)
    assert store.destroy_pool(pool) == 1
    assert store.destroy_pool(pool) == 0
    assert store.destroy_pool(7) == 0
    assert store.destroy_pool(-1) == 0


def test_destroy_frees_the_pages_and_their_room() -> None:
    store = make_store("1M")
    pool = private_eph(store)
    for i in range(10):
        assert store.put_page(pool, Oid(i), 0, noise_page(i)) == 1
    store.destroy_pool(pool)
    assert store.stats()["pages"] == 0
    assert store.stats()["used_bytes"] == 0
    again = private_eph(store)
    assert store.get_page(again, Oid(0), 0) == (-EEMPTY, None)


@pytest.mark.parametrize("bad_id", [5, -1, 1000])
def test_ops_on_an_uncreated_pool_are_enodev(store: ZcacheBackend, bad_id: int) -> None:
    private_eph(store)
    page = text_page(1)
    assert store.put_page(bad_id, Oid(1), 0, page) == -errno.ENODEV
    assert store.get_page(bad_id, Oid(1), 0) == (-errno.ENODEV, None)
    assert store.flush_page(bad_id, Oid(1), 0) == -errno.ENODEV
    assert store.flush_object(bad_id, Oid(1)) == -errno.ENODEV


def test_ops_on_a_destroyed_pool_are_enodev(store: ZcacheBackend) -> None:
    pool = persistent(store)
    store.put_page(pool, Oid(1), 0, text_page(1))
    store.destroy_pool(pool)
    assert store.get_page(pool, Oid(1), 0) == (-errno.ENODEV, None)
    assert store.put_page(pool, Oid(1), 0, text_page(1)) == -errno.ENODEV


# -- shared pools ------------------------------------------------------------------------------


def test_same_uuid_joins_the_same_pool_under_a_second_id(store: ZcacheBackend) -> None:
    first = store.new_pool(UUID_A, POOL_SHARED_EPHEMERAL)
    second = store.new_pool(UUID_A, POOL_SHARED_EPHEMERAL)
    other = store.new_pool(UUID_B, POOL_SHARED_EPHEMERAL)
    assert len({first, second, other}) == 3
    page = text_page(3)
    assert store.put_page(first, Oid(9), 4, page) == 1
    assert store.get_page(second, Oid(9), 4) == (1, page)
    assert store.get_page(other, Oid(9), 4) == (-EEMPTY, None)
    rows = {row["pool_id"]: row for row in store.pools()}
    assert rows[first]["kind"] == rows[second]["kind"] == "shared-ephemeral"
    assert rows[first]["ids"] == 2
    assert rows[first]["uuid"] == str(UUID_A)
    assert rows[first]["pages"] == rows[second]["pages"] == 1


def test_a_shared_pool_lives_until_its_last_id_is_destroyed(store: ZcacheBackend) -> None:
    first = store.new_pool(UUID_A, POOL_SHARED_EPHEMERAL)
    second = store.new_pool(UUID_A, POOL_SHARED_EPHEMERAL)
    page = text_page(4)
    store.put_page(first, Oid(1), 1, page)
    assert store.destroy_pool(first) == 1
    assert store.get_page(second, Oid(1), 1) == (1, page)
    assert store.destroy_pool(second) == 1
    assert store.stats()["pages"] == 0
    fresh = store.new_pool(UUID_A, POOL_SHARED_EPHEMERAL)
    assert store.get_page(fresh, Oid(1), 1) == (-EEMPTY, None)


def test_wildcard_uuid_silently_gives_a_private_pool(store: ZcacheBackend) -> None:
    pool = store.new_pool(WILDCARD_UUID, POOL_SHARED_EPHEMERAL)
    again = store.new_pool(WILDCARD_UUID, POOL_SHARED_EPHEMERAL)
    assert pool >= 0 and again >= 0
    (row,) = [r for r in store.pools() if r["pool_id"] == pool]
    assert row["kind"] == "private-ephemeral"
    assert row["flags"] == f"{POOL_PRIVATE_EPHEMERAL:#010x}" and not row["persistent"]
    page = text_page(5)
    store.put_page(pool, Oid(1), 0, page)
    assert store.get_page(again, Oid(1), 0) == (-EEMPTY, None)  # not joined
    assert store.get_page(pool, Oid(1), 0) == (1, page)
    assert store.get_page(pool, Oid(1), 0) == (-EEMPTY, None)  # private: exclusive


# -- gets --------------------------------------------------------------------------------------


def test_private_ephemeral_gets_are_exclusive(store: ZcacheBackend) -> None:
    pool = private_eph(store)
    page_a, page_b = text_page(1), text_page(2)
    store.put_page(pool, Oid(1), 0, page_a)
    store.put_page(pool, Oid(1), 1, page_b)
    assert store.get_page(pool, Oid(1), 0) == (1, page_a)
    assert store.get_page(pool, Oid(1), 0) == (0, None)
    assert store.get_page(pool, Oid(1), 1) == (1, page_b)
    assert store.get_page(pool, Oid(1), 1) == (-EEMPTY, None)
    assert store.stats()["pages"] == 0
    assert store.stats()["used_bytes"] == 0


def test_shared_ephemeral_and_persistent_gets_are_not_exclusive(store: ZcacheBackend) -> None:
    for pool in (store.new_pool(UUID_A, POOL_SHARED_EPHEMERAL), persistent(store)):
        page = text_page(pool)
        store.put_page(pool, Oid(2), 7, page)
        assert store.get_page(pool, Oid(2), 7) == (1, page)
        assert store.get_page(pool, Oid(2), 7) == (1, page)
    assert store.stats()["pages"] == 2


def test_get_of_a_missing_page_is_0_and_of_an_empty_pool_eempty(store: ZcacheBackend) -> None:
    pool = persistent(store)
    assert store.get_page(pool, Oid(1), 0) == (-EEMPTY, None)
    store.put_page(pool, Oid(1), 0, text_page(1))
    assert store.get_page(pool, Oid(1), 1) == (0, None)
    assert store.get_page(pool, Oid(2), 0) == (0, None)


# -- the three storage paths -------------------------------------------------------------------


@pytest.mark.parametrize("flags", [POOL_PRIVATE_EPHEMERAL, POOL_PRIVATE_PERSISTENT])
def test_text_noise_and_zero_pages_round_trip_byte_exact(store: ZcacheBackend, flags: int) -> None:
    pool = store.new_pool(PRIVATE_UUID, flags)
    pages = {0: text_page(10), 1: noise_page(11), 2: ZERO_PAGE, 3: b"\0" * 4095 + b"\1"}
    for index, page in pages.items():
        assert store.put_page(pool, Oid(5, 6, 7), index, page) == 1
    stats = store.stats()
    assert stats["zero_pages"] == 1
    # The noise page is stored raw, the zero page without data, the others compressed.
    assert PAGE_SIZE < stats["zbytes"] < 2 * PAGE_SIZE
    for index, page in pages.items():
        rc, data = store.get_page(pool, Oid(5, 6, 7), index)
        assert rc == 1
        assert data == page
        assert isinstance(data, bytes) and len(data) == PAGE_SIZE


def test_the_zero_page_costs_only_its_bookkeeping(store: ZcacheBackend) -> None:
    pool = persistent(store)
    store.put_page(pool, Oid(1), 0, ZERO_PAGE)
    stats = store.stats()
    assert (stats["zbytes"], stats["zero_pages"]) == (0, 1)
    assert stats["used_bytes"] == PERSISTENT_PAGE_OVERHEAD + OBJECT_OVERHEAD  # and its object


def test_an_incompressible_page_is_stored_raw(store: ZcacheBackend) -> None:
    pool = persistent(store)
    store.put_page(pool, Oid(1), 0, noise_page(1))
    assert store.stats()["zbytes"] == PAGE_SIZE
    assert store.pools()[0]["zbytes"] == PAGE_SIZE


def test_a_mutable_page_is_copied_on_put(store: ZcacheBackend) -> None:
    pool = persistent(store)
    for index, original in enumerate((noise_page(2), text_page(2))):
        buffer = bytearray(original)
        assert store.put_page(pool, Oid(1), index, buffer) == 1  # type: ignore[arg-type]
        buffer[:16] = b"X" * 16
        assert store.get_page(pool, Oid(1), index) == (1, original)


@pytest.mark.parametrize("size", [0, 1, PAGE_SIZE - 1, PAGE_SIZE + 1, 2 * PAGE_SIZE])
def test_a_page_that_is_not_4096_bytes_is_einval(store: ZcacheBackend, size: int) -> None:
    pool = persistent(store)
    assert store.put_page(pool, Oid(1), 0, b"a" * size) == -errno.EINVAL
    assert store.get_page(pool, Oid(1), 0) == (-EEMPTY, None)
    assert store.stats()["failed_pers_puts"] == 1


# -- duplicates and flushes --------------------------------------------------------------------


@pytest.mark.parametrize("flags", [POOL_PRIVATE_EPHEMERAL, POOL_PRIVATE_PERSISTENT])
def test_a_duplicate_put_replaces_the_page(store: ZcacheBackend, flags: int) -> None:
    pool = store.new_pool(PRIVATE_UUID, flags)
    store.put_page(pool, Oid(1), 0, text_page(1))
    assert store.put_page(pool, Oid(1), 0, noise_page(2)) == 1
    assert store.stats()["pages"] == 1
    assert store.stats()["zbytes"] == PAGE_SIZE
    assert store.get_page(pool, Oid(1), 0) == (1, noise_page(2))


def test_a_failed_duplicate_put_drops_the_old_copy_with_enospc() -> None:
    store = make_store("1M")
    pool = persistent(store)
    fill = (1 * MIB) // PERS_RAW_COST
    for i in range(fill):
        assert store.put_page(pool, Oid(1), i, noise_page(i)) == 1
    assert store.put_page(pool, Oid(2), 0, ZERO_PAGE) == 1  # fits in the last few bytes
    assert store.put_page(pool, Oid(2), 0, noise_page(99)) == -errno.ENOSPC
    assert store.get_page(pool, Oid(2), 0) == (0, None)  # no stale copy left behind
    stats = store.stats()
    assert (stats["pers_pages"], stats["zero_pages"], stats["failed_pers_puts"]) == (fill, 0, 1)


def test_a_bad_duplicate_put_drops_the_old_copy_too(store: ZcacheBackend) -> None:
    pool = private_eph(store)
    store.put_page(pool, Oid(1), 0, text_page(1))
    assert store.put_page(pool, Oid(1), 0, b"short") == -errno.EINVAL
    assert store.get_page(pool, Oid(1), 0) == (-EEMPTY, None)
    assert store.stats()["used_bytes"] == 0


def test_flush_page_says_whether_it_flushed(store: ZcacheBackend) -> None:
    pool = private_eph(store)
    store.put_page(pool, Oid(1), 0, text_page(1))
    store.put_page(pool, Oid(1), 1, text_page(2))
    assert store.flush_page(pool, Oid(1), 0) == 1
    assert store.flush_page(pool, Oid(1), 0) == 0
    assert store.flush_page(pool, Oid(3), 0) == 0
    assert store.get_page(pool, Oid(1), 0) == (0, None)
    assert store.get_page(pool, Oid(1), 1) == (1, text_page(2))


def test_flush_object_drops_every_page_of_that_object_only(store: ZcacheBackend) -> None:
    pool = private_eph(store)
    for index in range(5):
        store.put_page(pool, Oid(1, 2, 3), index, text_page(index))
    store.put_page(pool, Oid(4), 0, ZERO_PAGE)
    assert store.flush_object(pool, Oid(1, 2, 3)) == 1
    assert store.flush_object(pool, Oid(1, 2, 3)) == 0
    assert all(store.get_page(pool, Oid(1, 2, 3), i) == (0, None) for i in range(5))
    stats = store.stats()
    assert (stats["pages"], stats["zero_pages"]) == (1, 1)
    assert stats["used_bytes"] == EPHEMERAL_PAGE_OVERHEAD + OBJECT_OVERHEAD


# -- capacity, eviction ------------------------------------------------------------------------


def test_ephemeral_pages_are_evicted_oldest_first_across_pools() -> None:
    store = make_store("1M")
    pool_a, pool_b = private_eph(store), store.new_pool(UUID_A, POOL_SHARED_EPHEMERAL)
    fit = MIB // EPH_RAW_COST
    for i in range(fit):
        assert store.put_page((pool_a, pool_b)[i % 2], Oid(1), i, noise_page(i)) == 1
    assert store.stats()["evictions"] == 0
    for i in range(fit, fit + 3):
        assert store.put_page(pool_a, Oid(1), i, noise_page(i)) == 1
    assert store.stats()["evictions"] == 3
    # Pages 0 (pool a), 1 (pool b) and 2 (pool a) were the oldest.
    assert store.get_page(pool_a, Oid(1), 0) == (0, None)
    assert store.get_page(pool_b, Oid(1), 1) == (0, None)
    assert store.get_page(pool_a, Oid(1), 2) == (0, None)
    assert store.get_page(pool_b, Oid(1), 3) == (1, noise_page(3))
    assert store.stats()["eph_pages"] == fit  # 3 evicted, 3 put; the shared get kept its page


def test_a_shared_get_makes_the_page_most_recently_used() -> None:
    store = make_store("1M")
    pool = store.new_pool(UUID_A, POOL_SHARED_EPHEMERAL)
    fit = MIB // EPH_RAW_COST
    for i in range(fit):
        store.put_page(pool, Oid(1), i, noise_page(i))
    assert store.get_page(pool, Oid(1), 0)[0] == 1  # page 0 becomes the newest
    store.put_page(pool, Oid(1), fit, noise_page(fit))
    assert store.get_page(pool, Oid(1), 0) == (1, noise_page(0))
    assert store.get_page(pool, Oid(1), 1) == (0, None)  # evicted instead


def test_persistent_pages_are_never_evicted_and_a_full_store_is_enomem() -> None:
    store = make_store("1M")
    eph, pers = private_eph(store), persistent(store)
    for i in range(20):
        store.put_page(eph, Oid(1), i, noise_page(i))
    fit = MIB // PERS_RAW_COST
    for i in range(fit):
        assert store.put_page(pers, Oid(2), i, noise_page(1000 + i)) == 1
    # The persistent puts ate every ephemeral page they needed, never a persistent one.
    stats = store.stats()
    assert stats["pers_pages"] == fit
    assert stats["eph_pages"] == 0
    assert stats["evictions"] == 20
    assert store.put_page(pers, Oid(2), fit, noise_page(7)) == -errno.ENOMEM
    assert store.put_page(eph, Oid(1), 0, noise_page(7)) == -errno.ENOMEM
    stats = store.stats()
    assert (stats["failed_pers_puts"], stats["failed_eph_puts"], stats["failed_puts"]) == (1, 1, 2)
    assert all(store.get_page(pers, Oid(2), i) == (1, noise_page(1000 + i)) for i in range(fit))


def test_an_object_emptied_by_eviction_can_be_put_into_again() -> None:
    store = make_store("1M")
    pool = private_eph(store)
    fit = MIB // EPH_RAW_COST
    for i in range(fit):
        store.put_page(pool, Oid(i), 0, noise_page(i))
    # Putting into object 0 evicts object 0's only page first.
    assert store.put_page(pool, Oid(0), 1, noise_page(500)) == 1
    assert store.get_page(pool, Oid(0), 0) == (0, None)
    assert store.get_page(pool, Oid(0), 1) == (1, noise_page(500))


# -- control -----------------------------------------------------------------------------------


def test_control_flush_evicts_ephemeral_pages_only(store: ZcacheBackend) -> None:
    eph, pers = private_eph(store), persistent(store)
    for i in range(4):
        store.put_page(eph, Oid(1), i, noise_page(i))
        store.put_page(pers, Oid(1), i, noise_page(10 + i))
    assert store.control(TmemControl.QUERY_FREEABLE_MB) == 0
    assert store.control(TmemControl.FLUSH, 4) == EPH_RAW_COST // 1024
    assert store.stats()["eph_pages"] == 3
    assert store.control(TmemControl.FLUSH) == 3 * EPH_RAW_COST // 1024
    assert store.stats()["eph_pages"] == 0
    assert store.stats()["pers_pages"] == 4
    assert store.control(TmemControl.FLUSH, -3) == -errno.EINVAL
    assert store.control(TmemControl.FREEZE) == -errno.ENOSYS


# -- concurrency -------------------------------------------------------------------------------


def test_concurrent_callers_keep_the_accounting_exact() -> None:
    store = make_store("2M")
    pools = [private_eph(store), persistent(store), store.new_pool(UUID_A, POOL_SHARED_EPHEMERAL)]
    pages = [text_page(i) for i in range(8)] + [noise_page(1), ZERO_PAGE]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(1500):
                pool, oid, index = rng.choice(pools), Oid(rng.randrange(4)), rng.randrange(64)
                action = rng.randrange(4)
                if action == 0:
                    store.put_page(pool, oid, index, rng.choice(pages))
                elif action == 1:
                    rc, data = store.get_page(pool, oid, index)
                    assert rc != 1 or data in pages
                elif action == 2:
                    store.flush_page(pool, oid, index)
                else:
                    store.set_param("capacity", rng.choice(["1M", "2M"]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert errors == []
    rows, stats = store.pools(), store.stats()
    assert stats["pages"] == sum(row["pages"] for row in rows)
    assert stats["zbytes"] == sum(row["zbytes"] for row in rows)
    overheads = {"persistent": PERSISTENT_PAGE_OVERHEAD}
    assert stats["used_bytes"] == sum(
        row["zbytes"] + row["pages"] * overheads.get(row["kind"], EPHEMERAL_PAGE_OVERHEAD)
        + row["objects"] * OBJECT_OVERHEAD
        for row in rows
    )
