"""zcache's remote half (remote.py) over an in-process stand-in of the tier: the index's
bookkeeping in orders of events a real cluster makes hard to produce on demand.

The real cluster's behaviour is tested in test_ramster_zcache.py and test_ramster_tier.py;
here the stand-in only answers or fails as told.
"""

from __future__ import annotations

import random
from typing import Any

from xentmem.guest.backends.ramster.record import RemoteKey, decode, encode
from xentmem.guest.backends.ramster.remote import PAUSE_S, RemotePages
from xentmem.guest.backends.ramster.tier import (
    PutResult,
    RamsterUnavailable,
    TierConfig,
)
from xentmem.tmem.abi import PAGE_SIZE, POOL_PRIVATE_PERSISTENT, PRIVATE_UUID, Oid
from xentmem.tmem.store import TmemStore


class StandInTier:
    """Values by key name; ``down`` makes every call fail as an outage does."""

    def __init__(self) -> None:
        self.config = TierConfig(nodes=(("127.0.0.1", 1),), node_id="node")
        self.values: dict[str, bytes] = {}
        self.down = False
        #: Deletes that fail (as a cluster that blinks) before deletes work again.
        self.failing_deletes = 0
        #: Called once the values are stored, before the put is acknowledged (what another
        #: thread may do while a batch is on the wire).
        self.meanwhile: list[Any] = []

    def _check(self) -> None:
        if self.down:
            raise RamsterUnavailable("ramster: stand-in cluster down")

    def put_many(self, pages: list[tuple[RemoteKey, bytes]], *, persistent: bool) -> PutResult:
        result = PutResult()
        if self.down:
            result.errors.append(RamsterUnavailable("ramster: stand-in cluster down"))
            return result
        for key, data in pages:
            self.values[key.name()] = encode(key, data, persistent=persistent)
            result.acknowledged.append(key)
        while self.meanwhile:
            self.meanwhile.pop(0)()
        return result

    def get(self, key: RemoteKey, *, exclusive: bool) -> bytes | None:
        self._check()
        value = self.values.pop(key.name()) if exclusive else self.values.get(key.name())
        return None if value is None else decode(key, value)

    def delete_names(self, names: list[str]) -> int:
        self._check()
        if self.failing_deletes:
            self.failing_deletes -= 1
            raise RamsterUnavailable("ramster: stand-in delete failed")
        return sum(self.values.pop(name, None) is not None for name in names)

    def owner_sizes(self, owner: str) -> dict[str, int]:
        self._check()
        return {n: len(v) for n, v in self.values.items() if n.startswith(f"xentmem:{{{owner}:")}

    def may_access(self, owner: str) -> bool:
        return True

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"remote_bytes": 0, "remotified": 0, "fetched": 0, "flushed": 0,
                "remote_misses": 0, "cluster_errors": 0, "refused_records": 0,
                "refused_by_acl": 0, "short_replication": 0, "reconnects": 0,
                "reachable": not self.down, "last_error": ""}


class Clock:
    now = 0.0


def setup(capacity_pages: int = 40) -> tuple[TmemStore, StandInTier, RemotePages, int, Clock]:
    store = TmemStore(capacity_pages * (PAGE_SIZE + 600))
    tier = StandInTier()
    clock = Clock()
    remote = RemotePages(store, 0, tier, ephemeral="evict",  # type: ignore[arg-type]
                         clock_now=lambda: clock.now)
    pool = store.new_pool(0, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    return store, tier, remote, pool, clock


def page(n: int) -> bytes:
    """About 2 KiB once compressed."""
    return random.Random(n).randbytes(PAGE_SIZE // 2) + bytes(PAGE_SIZE // 2)


def test_a_pending_delete_never_takes_a_newer_copy_of_the_same_page() -> None:
    """Regression: a flush whose delete failed (cluster down) left the key's name pending;
    the same page put again and moved again while the retry of that delete failed once
    more, the retry at the next remotify removed the new acknowledged copy: page lost."""
    _store, tier, remote, pool, clock = setup()
    for n in range(100):
        assert remote.put_page(pool, Oid(1), n, page(n)) == 1
    name = RemoteKey("node", pool, Oid(1), 0).name()
    assert name in tier.values  # the oldest page moved
    tier.down = True
    assert remote.flush_page(pool, Oid(1), 0) == 1
    assert name in tier.values and name in remote._stale
    tier.down = False
    clock.now += PAUSE_S
    assert remote.put_page(pool, Oid(1), 0, page(1000)) == 1
    remote._lru.move_to_end((pool, Oid(1), 0), last=False)  # make it the next to move
    tier.failing_deletes = 1  # the next remotify's retry of the pending delete fails
    for n in range(100, 300):  # remotify rounds: the first moves it, each retries deletes
        assert remote.put_page(pool, Oid(2), n, page(n)) == 1
    assert (Oid(1), 0) in remote.remote_keys(pool)
    assert remote.get_page(pool, Oid(1), 0) == (1, page(1000))


def test_the_index_follows_puts_flushes_and_gets_exactly() -> None:
    store, tier, remote, pool, _clock = setup()
    for n in range(200):
        assert remote.put_page(pool, Oid(n % 3), n, page(n)) == 1
    assert remote.put_page(pool, Oid(0), 0, page(7)) == 1  # over a remote page
    assert remote.flush_page(pool, Oid(1), 1) == 1
    assert remote.flush_object(pool, Oid(2)) == 1
    names = {n for n in tier.values}
    indexed = {RemoteKey("node", pool, oid, i).name() for oid, i in remote.remote_keys(pool)}
    assert names == indexed
    assert remote.stats()["ramster_remote_pages"] == len(names)
    for n in range(200):
        want = (1, page(7) if n == 0 else page(n))
        if n % 3 == 2 or n == 1:
            assert remote.get_page(pool, Oid(n % 3), n)[0] != 1
        else:
            assert remote.get_page(pool, Oid(n % 3), n) == want, n
    assert store.destroy_pool(0, pool) == 1
    remote.destroyed(pool)
    assert tier.values == {} and remote.stats()["ramster_remote_pages"] == 0


def test_a_page_flushed_or_put_while_it_moves_stays_as_the_guest_left_it() -> None:
    store, tier, remote, pool, _clock = setup()
    for n in range(40):
        assert remote.put_page(pool, Oid(1), n, page(n)) == 1
    first, second = (pool, Oid(1), 0), (pool, Oid(1), 1)
    remote._lru.move_to_end(first, last=False)
    remote._lru.move_to_end(second, last=False)
    # while the batch with both oldest pages is on the wire: one flushed, one put again (by
    # the store directly, as a put that needs no room does, under the books)
    tier.meanwhile.append(lambda: remote.flush_page(pool, Oid(1), 0))

    def put_again() -> None:
        with remote._books:
            assert store.put_page(0, pool, Oid(1), 1, b"new") == 1
            remote._moving.discard(second)
    tier.meanwhile.append(put_again)
    for n in range(40, 120):
        assert remote.put_page(pool, Oid(2), n, page(n)) == 1
    assert remote.get_page(pool, Oid(1), 0)[1] is None  # flushed: never back
    assert store.peek_page(0, pool, Oid(1), 1) == b"new"  # the new local copy stays
    assert (Oid(1), 0) not in remote.remote_keys(pool)
    assert (Oid(1), 1) not in remote.remote_keys(pool)
    names = set(tier.values)
    assert names == {RemoteKey("node", pool, oid, i).name() for oid, i in remote.remote_keys(pool)}
