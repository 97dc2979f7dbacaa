"""zcache's counters: the always-on few, and the detailed zcache2 list behind a param."""

from __future__ import annotations

import random

import pytest

from xentmem.guest.backends.zcache import EPHEMERAL_PAGE_OVERHEAD, ZcacheBackend
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    PRIVATE_UUID,
    ZERO_PAGE,
    Oid,
)

MIB = 1 << 20
GIB = 1 << 30

ALWAYS_ON = {
    "pools",
    "pages",
    "eph_pages",
    "pers_pages",
    "zbytes",
    "eph_zbytes",
    "pers_zbytes",
    "zero_pages",
    "evictions",
    "failed_puts",
    "failed_eph_puts",
    "failed_pers_puts",
    "capacity_bytes",
    "used_bytes",
}
ZCACHE2_NAMES = {
    "obj_count",
    "obj_count_max",
    "flush_total",
    "flush_found",
    "flobj_total",
    "flobj_found",
    "failed_eph_puts",
    "failed_pers_puts",
    "put_to_flush",
    "compress_poor",
    "eph_ate_tail",
    "eph_ate_tail_failed",
    "pers_ate_eph",
    "pers_ate_eph_failed",
    "evicted_eph_zpages",
    "eph_zpages",
    "eph_zpages_max",
    "pers_zpages",
    "pers_zpages_max",
    "eph_zbytes",
    "eph_zbytes_max",
    "pers_zbytes",
    "pers_zbytes_max",
    "zero_filled_pages",
}


def text_page(seed: int) -> bytes:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(300)}" for _ in range(1500)).encode()[:PAGE_SIZE]


def noise_page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


def make_store(capacity: str = "64M", detailed: bool = True) -> ZcacheBackend:
    return ZcacheBackend({"capacity": capacity, "detailed_stats": detailed}, total_ram=lambda: GIB)


def test_always_on_counters() -> None:
    store = make_store(detailed=False)
    eph = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    pers = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    store.put_page(eph, Oid(1), 0, text_page(1))
    store.put_page(eph, Oid(1), 1, ZERO_PAGE)
    store.put_page(pers, Oid(1), 0, noise_page(1))
    store.put_page(pers, Oid(1), 1, b"bad")
    stats = store.stats()
    assert set(stats) == ALWAYS_ON
    assert stats["pools"] == 2
    assert (stats["eph_pages"], stats["pers_pages"], stats["pages"]) == (2, 1, 3)
    assert stats["pers_zbytes"] == PAGE_SIZE
    assert 0 < stats["eph_zbytes"] < PAGE_SIZE
    assert stats["zbytes"] == stats["eph_zbytes"] + stats["pers_zbytes"]
    assert stats["zero_pages"] == 1
    assert (stats["failed_pers_puts"], stats["failed_eph_puts"], stats["failed_puts"]) == (1, 0, 1)
    rows = {row["pool_id"]: row for row in store.pools()}
    assert rows[eph]["pages"] == 2 and rows[eph]["zbytes"] == stats["eph_zbytes"]
    assert rows[pers] == {
        "pool_id": pers,
        "flags": f"{POOL_PRIVATE_PERSISTENT:#010x}",
        "kind": "persistent",
        "persistent": True,
        "shared": False,
        "uuid": "00000000-0000-0000-0000-000000000000",
        "ids": 1,
        "objects": 1,
        "pages": 1,
        "zbytes": PAGE_SIZE,
    }


def test_detailed_stats_are_empty_while_off() -> None:
    store = make_store(detailed=False)
    assert store.detailed_stats() == {}
    assert store.describe()["detailed_stats"] is False


def test_detailed_stats_carry_the_zcache2_names() -> None:
    store = make_store()
    assert set(store.detailed_stats()) == ZCACHE2_NAMES


def test_detailed_counts_flushes_maxima_and_poor_compression() -> None:
    store = make_store()
    eph = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    pers = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    for index in range(4):
        store.put_page(eph, Oid(index), 0, text_page(index))
    store.put_page(pers, Oid(9), 0, noise_page(9))
    store.put_page(pers, Oid(9), 1, ZERO_PAGE)
    peak_eph_zbytes = store.stats()["eph_zbytes"]
    assert store.flush_page(eph, Oid(0), 0) == 1
    assert store.flush_page(eph, Oid(0), 0) == 0
    assert store.flush_object(eph, Oid(1)) == 1
    assert store.flush_object(eph, Oid(1)) == 0
    assert store.get_page(eph, Oid(2), 0)[0] == 1  # exclusive: gone
    detail = store.detailed_stats()
    assert (detail["flush_total"], detail["flush_found"]) == (2, 1)
    assert (detail["flobj_total"], detail["flobj_found"]) == (2, 1)
    assert (detail["eph_zpages"], detail["eph_zpages_max"]) == (1, 4)
    assert (detail["pers_zpages"], detail["pers_zpages_max"]) == (2, 2)
    assert detail["eph_zbytes_max"] == peak_eph_zbytes > detail["eph_zbytes"]
    assert (detail["pers_zbytes"], detail["pers_zbytes_max"]) == (PAGE_SIZE, PAGE_SIZE)
    assert (detail["obj_count"], detail["obj_count_max"]) == (2, 5)
    assert detail["compress_poor"] == 1
    assert detail["zero_filled_pages"] == 1


def test_detailed_counts_evictions_and_who_ate_whom() -> None:
    store = make_store("1M")
    eph = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    pers = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    fit = MIB // (PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD)
    for index in range(fit + 2):
        store.put_page(eph, Oid(1), index, noise_page(index))
    store.put_page(pers, Oid(1), 0, noise_page(0))
    store.put_page(eph, Oid(1), 0, noise_page(0))  # a duplicate of an evicted page: plain put
    detail = store.detailed_stats()
    assert detail["eph_ate_tail"] == 3
    assert detail["pers_ate_eph"] == 1
    assert detail["evicted_eph_zpages"] == store.stats()["evictions"] == 4
    assert detail["eph_ate_tail_failed"] == detail["pers_ate_eph_failed"] == 0
    assert detail["put_to_flush"] == 0


def test_failed_duplicate_puts_count_as_put_to_flush() -> None:
    store = make_store()
    pers = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    store.put_page(pers, Oid(1), 0, text_page(1))
    store.put_page(pers, Oid(1), 0, b"x" * 10)
    detail = store.detailed_stats()
    assert (detail["put_to_flush"], detail["failed_pers_puts"]) == (1, 1)


def test_switching_detailed_stats_swaps_the_ops_not_a_test_per_op() -> None:
    store = make_store(detailed=False)
    lean = {op: getattr(store, op).__func__ for op in ("put_page", "flush_page", "flush_object")}
    assert all(func is getattr(ZcacheBackend, op) for op, func in lean.items())
    assert store.set_param("detailed_stats", "on") is True
    assert all(getattr(store, op).__func__ is not lean[op] for op in lean)
    assert store.get_page.__func__ is ZcacheBackend.get_page  # gets have nothing detailed
    store.set_param("detailed_stats", False)
    assert all(getattr(store, op).__func__ is lean[op] for op in lean)
    assert store.detailed_stats() == {}


def test_switching_on_starts_the_high_water_marks_from_now() -> None:
    store = make_store(detailed=False)
    pool = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    for index in range(3):
        store.put_page(pool, Oid(1), index, text_page(index))
    store.get_page(pool, Oid(1), 0)
    store.flush_page(pool, Oid(1), 1)
    store.set_param("detailed_stats", True)
    detail = store.detailed_stats()
    assert (detail["eph_zpages"], detail["eph_zpages_max"]) == (1, 1)
    assert detail["flush_total"] == 0


@pytest.mark.parametrize("detailed", [False, True])
def test_remove_drops_everything(detailed: bool) -> None:
    store = make_store(detailed=detailed)
    pool = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    store.put_page(pool, Oid(1), 0, text_page(1))
    store.remove()
    assert store.pools() == []
    assert store.stats()["pages"] == store.stats()["used_bytes"] == 0
    assert "put_page" not in vars(store)
