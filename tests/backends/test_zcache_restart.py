"""zcache's pages outlive the process: the arena and the pool table in the run directory.

A "crash" here is a backend dropped without ``remove()`` (its arena closed, as the kernel
closes a killed process's files); the next backend on the same run directory finds the
persistent pages again.  The daemon killed for real: tests/guestd/test_zcache_killed.py.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from xentmem.errors import BackendError
from xentmem.guest.backends.zcache import ARENA_FILE, POOLS_FILE, ZcacheBackend
from xentmem.roots import Roots
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    PRIVATE_UUID,
    ZERO_PAGE,
    Oid,
)

GIB = 1 << 30
TEXT = (b"frontswap page, " * 256)[:PAGE_SIZE]
RANDOM = random.Random(5).randbytes(PAGE_SIZE)


def backend(run: Path, **values: object) -> ZcacheBackend:
    made = ZcacheBackend({"capacity": "64M", **values}, roots=Roots(run_dir=run),
                         total_ram=lambda: GIB)
    made.connect()
    return made


def crash(made: ZcacheBackend) -> None:
    """What a kill leaves: the arena file as it is, nothing of the process."""
    assert made._arena is not None
    made._arena.close()


def pages(index: int) -> bytes:
    return (TEXT, RANDOM, ZERO_PAGE)[index % 3]


def test_persistent_pages_come_back_ephemeral_ones_do_not(tmp_path: Path) -> None:
    first = backend(tmp_path)
    eph = first.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    pers = first.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    for index in range(30):
        assert first.put_page(pers, Oid(index % 4), index, pages(index)) == 1
        assert first.put_page(eph, Oid(1), index, TEXT) == 1
    assert first.put_page(pers, Oid(0), 0, RANDOM) == 1  # a duplicate: the newer page counts
    assert first.flush_page(pers, Oid(1), 1) == 1
    crash(first)

    second = backend(tmp_path)
    assert second.restored_pools == 1 and second.outlives_process
    assert second.restart["pages_restored"] == 29 and second.restart["pages_dropped"] == 30
    assert second.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL) == eph  # a fresh one
    assert second.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == pers  # handed back
    assert second.restored_pools == 0
    assert len(second.restored_pages(pers)) == 29
    assert second.get_page(pers, Oid(0), 0) == (1, RANDOM)
    assert second.get_page(pers, Oid(1), 1) == (0, None)
    for index in range(2, 30):
        assert second.get_page(pers, Oid(index % 4), index) == (1, pages(index)), index
    assert second.get_page(eph, Oid(1), 0)[0] != 1
    assert second.stats()["pers_pages"] == 29


def test_a_clean_remove_discards_the_arena(tmp_path: Path) -> None:
    made = backend(tmp_path)
    pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert made.put_page(pool, Oid(1), 0, TEXT) == 1
    made.remove()
    assert not (tmp_path / ARENA_FILE).exists() and not (tmp_path / POOLS_FILE).exists()
    again = backend(tmp_path)
    assert again.restart["arena_how"] == "created" and again.restored_pools == 0


def test_without_a_run_directory_pages_stay_in_memory() -> None:
    made = ZcacheBackend({"capacity": "64M"}, total_ram=lambda: GIB)
    assert not made.outlives_process and made.describe()["arena"] is None


@pytest.mark.parametrize("damage", [b"", b"not ours\n", b"xentmem-zcache-pools 1\n0\n[]"])
def test_a_damaged_pool_table_drops_the_pages_and_says_so(
        tmp_path: Path, damage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    first = backend(tmp_path)
    pool = first.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert first.put_page(pool, Oid(1), 0, TEXT) == 1
    crash(first)
    (tmp_path / POOLS_FILE).write_bytes(damage)
    with caplog.at_level(logging.ERROR):
        second = backend(tmp_path)
    assert str(tmp_path / POOLS_FILE) in caplog.text
    assert second.restart["pages_restored"] == 0 and "error" in second.restart
    assert second.restored_pools == 0 and second.stats()["pages"] == 0
    assert second.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == 0
    assert second.get_page(0, Oid(1), 0)[0] != 1  # never the old page under a new pool


def test_a_pool_table_that_does_not_fit_is_refused_whole(tmp_path: Path) -> None:
    first = backend(tmp_path)
    pool = first.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert first.put_page(pool, Oid(1), 0, TEXT) == 1
    crash(first)
    second_try = ZcacheBackend  # a table naming a slot beyond max_pools
    with pytest.raises(ValueError, match="slots"):
        second_try({"max_pools": 1}, total_ram=lambda: GIB)._store.restore(
            [{"gid": 0, "flags": POOL_PRIVATE_PERSISTENT, "uuid": [0, 0], "owner": 0,
              "slots": {"0": [3]}}])


def test_a_file_that_is_not_an_arena_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / ARENA_FILE).write_bytes(b"someone else's file" * 300)
    with pytest.raises(BackendError, match=str(tmp_path / ARENA_FILE)):
        backend(tmp_path)
    assert (tmp_path / ARENA_FILE).read_bytes().startswith(b"someone else's file")


def test_a_damaged_arena_is_set_aside_and_a_new_one_made(tmp_path: Path) -> None:
    first = backend(tmp_path)
    pool = first.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert first.put_page(pool, Oid(1), 0, TEXT) == 1
    crash(first)
    with open(tmp_path / ARENA_FILE, "r+b") as f:  # the header's checksummed fields
        f.seek(40)
        f.write(b"\xff" * 8)
    second = backend(tmp_path)
    assert second.restart["arena_how"] == "set-aside"
    assert list(tmp_path.glob(ARENA_FILE + ".damaged-*"))
    assert second.restart["pages_restored"] == 0
    # the table's pool comes back empty: frontswap gets its slot, no page is served
    assert second.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == pool
    assert second.get_page(pool, Oid(1), 0)[0] != 1


def test_the_allocator_param_reaches_the_arena(tmp_path: Path) -> None:
    made = backend(tmp_path, allocator="zbud")
    assert made.describe()["allocator"] == "zbud"
    assert made._arena is not None and made._arena.arena.allocator_name == "zbud"
    pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert made.put_page(pool, Oid(1), 0, TEXT) == 1
    stats = made.stats()
    assert stats["arena_pages"] == 1 and stats["memory_bytes"] > stats["used_bytes"] - 1


def test_a_pool_table_that_cannot_be_written_refuses_the_new_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import xentmem.tmem.store.table as table_mod

    made = backend(tmp_path)
    kept = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)

    def full(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(table_mod, "write_atomically", full)
    assert made.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL) == -12
    assert [row["pool_id"] for row in made.pools()] == [kept]  # refused means unchanged
