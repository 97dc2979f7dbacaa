"""zcache's remote half (remote.py) over an in-process stand-in of the tier: the index's
bookkeeping in orders of events a real cluster makes hard to produce on demand.

The real cluster's behaviour is tested in test_ramster_zcache.py and test_ramster_tier.py;
here the stand-in only answers or fails as told.
"""

from __future__ import annotations

import errno
import functools
import random
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from xentmem.guest.backends.ramster.readahead import STALE_GETS, Readahead
from xentmem.guest.backends.ramster.record import RecordError, RemoteKey, decode, encode
from xentmem.guest.backends.ramster.remote import PAUSE_S, RemotePages
from xentmem.guest.backends.ramster.tier import (
    GetResult,
    PutResult,
    RamsterUnavailable,
    TierConfig,
)
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    PRIVATE_UUID,
    Oid,
)
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
        self.during_mget: list[Any] = []
        #: The keys of every MGET (a readahead), in order.
        self.mgets: list[list[RemoteKey]] = []
        self.refused_records = 0

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

    def get_object(self, keys: list[RemoteKey]) -> GetResult:
        """One MGET of one object's pages; ``during_mget`` runs while it is on the wire (what
        another thread may do meanwhile), after the values were read."""
        self._check()
        assert len({key.object_tag() for key in keys}) == 1
        self.mgets.append(keys)
        values = [self.values.get(key.name()) for key in keys]
        while self.during_mget:
            self.during_mget.pop(0)()
        found = GetResult()
        for key, value in zip(keys, values):
            if value is None:
                found.missing.append(key)
                continue
            try:
                found.pages[key] = decode(key, value)
            except RecordError as exc:
                found.refused[key] = exc
        return found

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

    def count_refused_record(self) -> None:
        self.refused_records += 1

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


def test_a_pool_opened_in_a_slot_forgets_what_the_slot_held_before() -> None:
    """Fails before: opened() returned early for a pool that is not shared, so a slot left
    cluster-wide by an earlier pool (one refused after it was opened) stayed so, and the
    private pool now in it put its pages under the shared pool's namespace."""
    _store, tier, remote, pool, _clock = setup()
    remote._shared[pool] = "shared:0123456789abcdeffedcba9876543210"  # left by a refused pool
    remote.opened(pool, PRIVATE_UUID)
    assert remote.stats()["ramster_shared_pools"] == 0
    assert remote.put_page(pool, Oid(1), 0, page(0)) == 1
    remote.remotify(1 << 30)  # whatever moves goes under this node's own keys
    assert tier.values and all(name.startswith("xentmem:{node:") for name in tier.values)


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


# -- readahead ---------------------------------------------------------------------------------


def racing(tier: StandInTier, meanwhile: Any) -> None:
    """The tier's next get first lets ``meanwhile`` run: what another thread does while a
    get fetches outside the books."""
    get = tier.get

    def first(key: RemoteKey, *, exclusive: bool) -> bytes | None:
        tier.get = get  # type: ignore[method-assign]
        meanwhile()
        return get(key, exclusive=exclusive)

    tier.get = first  # type: ignore[method-assign]


def test_a_get_racing_a_put_and_a_remotify_of_its_page_never_drops_the_new_copy() -> None:
    """The get read the index (version 1 remote), the guest put version 2 and a remotify
    moved it back out under the same key: the get's empty fetch must not take the new
    entry with it (it once did: every later get missed an acknowledged page)."""
    store, tier, remote, pool, _clock = setup()
    for n in range(100):
        assert remote.put_page(pool, Oid(1), n, page(n)) == 1
    where = (pool, Oid(1), 5)

    def put_then_move() -> None:
        assert remote.put_page(pool, Oid(1), 5, page(555)) == 1
        remote._lru.move_to_end(where, last=False)  # the oldest local page: moved first
        remote.remotify(cost=store.capacity_bytes)
        assert store.peek_page(0, pool, Oid(1), 5) is None

    racing(tier, put_then_move)
    assert remote.get_page(pool, Oid(1), 5) == (1, page(555))
    assert remote.get_page(pool, Oid(1), 5) == (1, page(555))
    assert (Oid(1), 5) in remote.remote_keys(pool)
    assert not remote._deleting and not remote._versions


@pytest.mark.parametrize("race", ["flush", "put"])
def test_a_get_racing_a_flush_misses_and_one_racing_a_put_finds_the_new_page(
        race: str) -> None:
    _store, tier, remote, pool, _clock = setup()
    for n in range(100):
        assert remote.put_page(pool, Oid(1), n, page(n)) == 1
    assert (Oid(1), 5) in remote.remote_keys(pool)
    if race == "flush":
        racing(tier, lambda: remote.flush_page(pool, Oid(1), 5))
        assert remote.get_page(pool, Oid(1), 5) == (0, None)
    else:
        racing(tier, lambda: remote.put_page(pool, Oid(1), 5, page(555)))
        assert remote.get_page(pool, Oid(1), 5) == (1, page(555))
    assert not remote._deleting and not remote._versions


def test_a_put_between_a_get_s_local_miss_and_its_index_lookup_is_found() -> None:
    store, _tier, remote, pool, _clock = setup()
    for n in range(100):
        assert remote.put_page(pool, Oid(1), n, page(n)) == 1
    assert (Oid(1), 5) in remote.remote_keys(pool)
    get_page = store.get_page

    def local_then_put(*args: Any) -> Any:
        store.get_page = get_page  # type: ignore[method-assign]
        found = get_page(*args)
        assert remote.put_page(pool, Oid(1), 5, page(555)) == 1  # another thread
        return found

    store.get_page = local_then_put  # type: ignore[method-assign]
    assert remote.get_page(pool, Oid(1), 5) == (1, page(555))


def moving_ephemeral() -> tuple[TmemStore, StandInTier, RemotePages, int]:
    """A private ephemeral pool whose pages move (``ephemeral=move``), 100 put: most moved."""
    store = TmemStore(40 * (PAGE_SIZE + 600))
    tier = StandInTier()
    remote = RemotePages(store, 0, tier, ephemeral="move",  # type: ignore[arg-type]
                         clock_now=lambda: 0.0)
    pool = store.new_pool(0, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    for n in range(100):
        assert remote.put_page(pool, Oid(1), n, page(n)) == 1
    return store, tier, remote, pool


def test_a_page_taken_by_an_exclusive_get_can_move_again() -> None:
    """An exclusive get of a remote page forgets it without a delete pending: the page,
    put again, is remotified like any other (it was once never moved again)."""
    store, _tier, remote, pool = moving_ephemeral()
    assert remote.get_page(pool, Oid(1), 0) == (1, page(0))
    assert not remote._deleting
    assert remote.put_page(pool, Oid(1), 0, page(1000)) == 1
    for n in range(100, 400):
        assert remote.put_page(pool, Oid(2), n, page(n)) == 1
    assert (Oid(1), 0) in remote.remote_keys(pool)
    assert store.peek_page(0, pool, Oid(1), 0) is None


def test_an_ephemeral_page_whose_old_copy_is_being_deleted_does_not_move() -> None:
    """While a put's delete of the page's old remote copy is on the wire, a remotify (on
    another thread) leaves the page alone: a copy it sent could be the one that delete
    takes (persistent pages were already skipped)."""
    store, tier, remote, pool = moving_ephemeral()
    assert (Oid(1), 0) in remote.remote_keys(pool)
    name = RemoteKey("node", pool, Oid(1), 0).name()
    sent: list[str] = []
    put_many, delete_names = tier.put_many, tier.delete_names

    def spy(pages: Any, *, persistent: bool) -> Any:
        sent.extend(k.name() for k, _d in pages)
        return put_many(pages, persistent=persistent)

    def deleting(names: list[str]) -> None:
        tier.delete_names = delete_names  # type: ignore[method-assign]
        remote.remotify(cost=store.capacity_bytes)  # another thread, meanwhile
        delete_names(names)

    tier.put_many = spy  # type: ignore[method-assign]
    tier.delete_names = deleting  # type: ignore[method-assign]
    assert remote.put_page(pool, Oid(1), 0, page(1000)) == 1
    assert sent and name not in sent
    assert remote.get_page(pool, Oid(1), 0) == (1, page(1000))


def remote_setup() -> tuple[TmemStore, StandInTier, RemotePages, int]:
    """Pages 0-99 of Oid(1) put, most of them moved to the stand-in cluster."""
    store, tier, remote, pool, _clock = setup()
    for n in range(100):
        assert remote.put_page(pool, Oid(1), n, page(n)) == 1
    assert (Oid(1), 0) in remote.remote_keys(pool)
    return store, tier, remote, pool


def counting_gets(tier: StandInTier) -> list[RemoteKey]:
    """Every key the fetcher's path gets from then on (one round trip each)."""
    asked: list[RemoteKey] = []
    plain = tier.get

    def get(key: RemoteKey, *, exclusive: bool) -> bytes | None:
        asked.append(key)
        return plain(key, exclusive=exclusive)
    tier.get = get  # type: ignore[method-assign]
    return asked


def test_a_cramped_remotify_is_counted_and_said_once(caplog: Any) -> None:
    """Once the remote pages' index takes half the capacity, remotify finds few local pages
    to move: each such round is counted, the first one warned about (what to raise); the
    warning comes again only after the index fell below a quarter."""
    store, _tier, remote, pool, _clock = setup(capacity_pages=40)
    caplog.set_level("WARNING", logger="xentmem.guest.backends.ramster.remote")

    def put_until_cramped(oid: Oid) -> None:
        before = remote.remotify_cramped
        for n in range(2000):
            if remote.put_page(pool, oid, n, page(n)) != 1 or remote.remotify_cramped > before:
                return
        raise AssertionError("2000 puts and no cramped remotify")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "remotify found" in r.getMessage()]

    put_until_cramped(Oid(1))
    assert 2 * remote.stats()["ramster_bookkeeping_bytes"] >= store.capacity_bytes
    for n in range(2000, 2050):  # more puts in the same state: counted, not said again
        remote.put_page(pool, Oid(1), n, page(n))
    assert remote.stats()["ramster_remotify_cramped"] > 1
    assert len(warnings()) == 1 and "raise zcache's capacity" in warnings()[0]
    assert remote.flush_object(pool, Oid(1)) == 1  # the index empties
    remote.remotify(store.capacity_bytes)  # a round that sees it small again
    put_until_cramped(Oid(2))
    assert len(warnings()) == 2


def test_gets_in_order_read_the_next_pages_ahead_in_one_mget() -> None:
    _store, tier, remote, pool = remote_setup()
    remote_indexes = sorted(i for oid, i in remote.remote_keys(pool))
    asked = counting_gets(tier)
    for n in remote_indexes[:40]:
        assert remote.get_page(pool, Oid(1), n) == (1, page(n)), n
    # the first two gets are alone; the third ends a run in order, so it reads the next pages
    # ahead; the fourth, served from them, reads the window after them, so the reader finds
    # every later page buffered instead of missing at the first window's end
    assert len(asked) == 2
    assert len(tier.mgets) == 2
    assert all(len({k.object_tag() for k in keys}) == 1 for keys in tier.mgets)
    first, second = ([k.index for k in keys] for keys in tier.mgets)
    assert first[0] == remote_indexes[2]
    assert remote_indexes.index(second[0]) == remote_indexes.index(first[-1]) + 1
    stats = remote.stats()
    assert stats["ramster_readahead_hits"] == 40 - 3
    assert stats["ramster_remote_pages"] == len(remote_indexes)  # persistent gets: still remote


def test_gets_out_of_order_read_nothing_ahead() -> None:
    _store, tier, remote, pool = remote_setup()
    remote_indexes = sorted(i for oid, i in remote.remote_keys(pool))
    asked = counting_gets(tier)
    jumps = remote_indexes[::10]  # forward, but further apart than IN_ORDER_GAP
    for n in jumps:
        assert remote.get_page(pool, Oid(1), n) == (1, page(n)), n
    assert tier.mgets == [] and len(asked) == len(jumps)
    backwards = remote_indexes[::-1]  # each get is before the previous one
    for n in backwards:
        assert remote.get_page(pool, Oid(1), n) == (1, page(n)), n
    assert tier.mgets == [] and len(asked) == len(jumps) + len(backwards)


def test_interleaved_callers_read_no_page_from_the_cluster_twice() -> None:
    """Two callers share one range: B, ahead, reads 20-40; A, behind, then reads 0-19 and
    its run starts again at 0.  A's readahead must not bring back B's pages."""
    _store, tier, remote, pool = remote_setup()
    remote_indexes = sorted(i for oid, i in remote.remote_keys(pool))
    assert set(range(45)) <= set(remote_indexes)
    asked = counting_gets(tier)
    for n in [*range(20, 41), *range(20)]:
        assert remote.get_page(pool, Oid(1), n) == (1, page(n)), n
    read = [k.index for k in asked] + [k.index for keys in tier.mgets for k in keys]
    assert len(read) == len(set(read)), sorted(read)
    assert set(range(41)) <= set(read)
    # a page served lately is fetched again when asked for again (served, not cached)
    assert remote.get_page(pool, Oid(1), 25) == (1, page(25))
    again = [k.index for k in asked] + [k.index for keys in tier.mgets for k in keys]
    assert again.count(25) == 2


def fill_buffer(ahead: Readahead, first: int, remote: dict[int, int]) -> list[tuple]:
    """One readahead from ``first`` in object 1 of slot 0, come back whole; what it read."""
    flight = ahead.begin((0, Oid(1), first), remote)
    if flight is None:
        return []
    ahead.end(flight, {w: b"page %d" % w[2] for w in flight.wheres})
    return flight.wheres


def test_a_full_buffer_reads_no_more_ahead_until_its_pages_are_taken_or_stale() -> None:
    """A starved caller's pages wait for it: no readahead pushes them out unread."""
    ahead = Readahead(pages=4, buffer=8)
    remote = dict.fromkeys(range(1000), 100)
    assert len(fill_buffer(ahead, 0, remote)) == 4
    assert len(fill_buffer(ahead, 4, remote)) == 4
    assert fill_buffer(ahead, 8, remote) == []  # full: none read, none pushed out
    assert len(ahead) == 8 and ahead.unused == 0
    assert ahead.take((0, Oid(1), 1)) == b"page 1"
    assert ahead.take((0, Oid(1), 2)) == b"page 2"
    assert len(fill_buffer(ahead, 8, remote)) == 2  # as many as there is room for
    # pages nobody asks for are given up after STALE_GETS gets of remote pages
    for n in range(STALE_GETS):
        ahead.in_order((0, Oid(2), 5000 + 100 * n))  # another object's gets, far apart
    assert len(fill_buffer(ahead, 20, remote)) == 4
    assert ahead.unused == 8 and len(ahead) == 4
    assert ahead.take((0, Oid(1), 3)) is None  # given up: a get fetches it again


def test_a_get_near_the_furthest_page_read_ahead_reads_the_next_window() -> None:
    """Asynchronous readahead: a page served within a window of the furthest page read ahead
    in its object reads the window after it; one further back reads nothing."""
    ahead = Readahead(pages=4, buffer=16)
    remote = dict.fromkeys(range(100), 100)
    assert [w[2] for w in fill_buffer(ahead, 0, remote)] == [1, 2, 3, 4]
    assert ahead.begin_next((0, Oid(1), 9), remote) is None  # not buffered: a miss's case
    flight = ahead.begin_next((0, Oid(1), 1), remote)
    assert flight is not None and [w[2] for w in flight.wheres] == [5, 6, 7, 8]
    ahead.end(flight, {w: b"page %d" % w[2] for w in flight.wheres})
    assert ahead.begin_next((0, Oid(1), 2), remote) is None  # 2 < 8 - 4: far enough ahead
    flight = ahead.begin_next((0, Oid(1), 4), remote)
    assert flight is not None and [w[2] for w in flight.wheres] == [9, 10, 11, 12]
    assert ahead.begin_next((0, Oid(1), 5), remote) is None  # 5 < 12 - 4 while on the wire


def test_the_furthest_page_read_ahead_starts_again_at_a_miss_at_the_front() -> None:
    """A miss behind another reader (pages ahead of it buffered) leaves the object's
    furthest page read ahead; a miss with nothing ahead of it (what was read ahead has been
    served: a second pass over a range) starts it again, so the pass reads ahead too."""
    ahead = Readahead(pages=4, buffer=16)
    remote = dict.fromkeys(range(100), 100)
    assert [w[2] for w in fill_buffer(ahead, 40, remote)] == [41, 42, 43, 44]
    behind = ahead.begin((0, Oid(1), 38), remote)  # a laggard: 41 on is buffered
    assert behind is not None and [w[2] for w in behind.wheres] == [39, 40]
    ahead.end(behind, {w: b"page %d" % w[2] for w in behind.wheres})
    flight = ahead.begin_next((0, Oid(1), 41), remote)
    assert flight is not None and [w[2] for w in flight.wheres] == [45, 46, 47, 48]
    ahead.end(flight, {w: b"page %d" % w[2] for w in flight.wheres})
    for n in range(39, 49):
        assert ahead.take((0, Oid(1), n)) == b"page %d" % n
    # a second pass from the start: its miss finds nothing ahead, so 48 is forgotten
    assert [w[2] for w in fill_buffer(ahead, 2, remote)] == [3, 4, 5, 6]
    flight = ahead.begin_next((0, Oid(1), 3), remote)
    assert flight is not None and [w[2] for w in flight.wheres] == [7, 8, 9, 10]


def test_a_failed_window_read_ahead_fails_no_get() -> None:
    """The next window's MGET fails (the cluster blinks): the get that started it is served
    from the buffer, and each page of that window is fetched by its own get later."""
    _store, tier, remote, pool = remote_setup()
    remote_indexes = sorted(i for oid, i in remote.remote_keys(pool))
    for n in remote_indexes[:3]:  # the third reads ahead
        assert remote.get_page(pool, Oid(1), n) == (1, page(n))
    assert len(tier.mgets) == 1

    def fail_next_mget(keys: list[RemoteKey]) -> GetResult:
        tier.get_object = plain_mget  # type: ignore[method-assign]
        raise RamsterUnavailable("ramster: stand-in cluster blinked")
    plain_mget = tier.get_object
    tier.get_object = fail_next_mget  # type: ignore[method-assign]
    n = remote_indexes[3]
    assert remote.get_page(pool, Oid(1), n) == (1, page(n))  # served; its window failed
    assert tier.get_object is plain_mget
    for n in remote_indexes[4:]:
        assert remote.get_page(pool, Oid(1), n) == (1, page(n)), n


def test_a_page_that_does_not_unpack_still_ends_the_window_it_started() -> None:
    """The get that starts the next window serves a buffered page that fails to unpack
    (checked record, bad lz4): -EIO for it, and the window is read and ended all the same,
    none of its pages left on the wire for other gets to wait for."""
    _store, tier, remote, pool = remote_setup()
    remote_indexes = sorted(i for oid, i in remote.remote_keys(pool))
    bad = remote_indexes[3]
    key = RemoteKey("node", pool, Oid(1), bad)
    tier.values[key.name()] = encode(key, b"\xff" * 100, persistent=True)
    for n in remote_indexes[:3]:  # the third reads the next pages, the bad one among them
        assert remote.get_page(pool, Oid(1), n) == (1, page(n))
    assert remote.get_page(pool, Oid(1), bad)[0] == -errno.EIO
    assert tier.refused_records == 1  # counted as a refused record
    assert len(tier.mgets) == 2
    assert remote._ahead._flights == []  # ended: no page of it waited for
    for n in remote_indexes[4:]:
        assert remote.get_page(pool, Oid(1), n) == (1, page(n)), n


def read_ahead_from(remote: RemotePages, pool: int, first: int) -> None:
    """Three gets in order from ``first``: the third reads the pages after it ahead."""
    for n in range(first, first + 3):
        assert remote.get_page(pool, Oid(1), n)[0] == 1


def test_a_put_flush_or_destroy_drops_the_page_read_ahead() -> None:
    store, _tier, remote, pool = remote_setup()
    read_ahead_from(remote, pool, 0)
    assert len(remote._ahead) > 4
    assert remote.put_page(pool, Oid(1), 2, page(1002)) == 1  # over a buffered page
    assert remote.get_page(pool, Oid(1), 2) == (1, page(1002))
    assert remote.flush_page(pool, Oid(1), 3) == 1
    assert remote.get_page(pool, Oid(1), 3)[1] is None
    assert remote.flush_object(pool, Oid(1)) == 1
    assert len(remote._ahead) == 0
    assert remote.get_page(pool, Oid(1), 4)[1] is None
    # a pool destroyed and another made in its slot: nothing of the old one is served
    for n in range(100):
        assert remote.put_page(pool, Oid(1), n, page(n)) == 1
    read_ahead_from(remote, pool, 0)
    assert len(remote._ahead) > 4
    assert store.destroy_pool(0, pool) == 1
    remote.destroyed(pool)
    assert len(remote._ahead) == 0
    again = store.new_pool(0, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert again == pool
    assert remote.get_page(pool, Oid(1), 5)[1] is None


def test_a_page_changed_while_its_readahead_is_on_the_wire_is_not_kept() -> None:
    """The MGET read the old values; a put and a flush of two of its pages happen before it
    returns: neither old value may be served afterwards."""
    _store, tier, remote, pool = remote_setup()
    assert remote.get_page(pool, Oid(1), 0)[0] == 1
    assert remote.get_page(pool, Oid(1), 1)[0] == 1
    tier.during_mget.append(lambda: remote.put_page(pool, Oid(1), 4, page(1004)))
    tier.during_mget.append(lambda: remote.flush_page(pool, Oid(1), 5))
    tier.during_mget.append(lambda: remote.flush_object(pool, Oid(9)))  # another object
    assert remote.get_page(pool, Oid(1), 2) == (1, page(2))  # reads 3.. ahead
    assert len(tier.mgets) == 1
    assert remote.get_page(pool, Oid(1), 3) == (1, page(3))  # kept: not changed
    assert remote.get_page(pool, Oid(1), 4) == (1, page(1004))
    assert remote.get_page(pool, Oid(1), 5)[1] is None
    assert remote.get_page(pool, Oid(1), 6) == (1, page(6))  # kept: not changed
    assert remote.stats()["ramster_readahead_hits"] == 2  # pages 3 and 6


def test_a_page_moved_again_while_its_readahead_is_on_the_wire_is_not_kept() -> None:
    """Put anew and moved to the cluster again before the MGET that read its old value
    returns: the index says remote again, so only the readahead's own record of what was
    dropped meanwhile keeps the old value out."""
    _store, tier, remote, pool = remote_setup()
    assert remote.get_page(pool, Oid(1), 0)[0] == 1
    assert remote.get_page(pool, Oid(1), 1)[0] == 1

    def put_and_move() -> None:
        assert remote.put_page(pool, Oid(1), 4, page(1004)) == 1
        remote.remotify(remote._store.capacity_bytes)
        assert (Oid(1), 4) in remote.remote_keys(pool)
    tier.during_mget.append(put_and_move)
    assert remote.get_page(pool, Oid(1), 2) == (1, page(2))  # reads 3.. ahead
    assert len(tier.mgets) == 1
    assert remote.get_page(pool, Oid(1), 4) == (1, page(1004))


def test_a_damaged_page_read_ahead_is_never_served() -> None:
    _store, tier, remote, pool = remote_setup()
    name = RemoteKey("node", pool, Oid(1), 3).name()
    tier.values[name] = tier.values[name][:-1] + bytes([tier.values[name][-1] ^ 1])
    for n in range(3):
        assert remote.get_page(pool, Oid(1), n) == (1, page(n))  # the third reads ahead
    assert remote.get_page(pool, Oid(1), 3)[1] is None  # refused by its checksum
    assert remote.get_page(pool, Oid(1), 4) == (1, page(4))
    assert (Oid(1), 3) not in remote.remote_keys(pool)


# -- a model: whatever the order of puts, flushes and gets, readahead serves nothing stale ----


@functools.cache
def version(n: int) -> bytes:
    return page(n)


OBJECTS = st.integers(0, 2)
INDEXES = st.integers(0, 47)


class ReadaheadModel(RuleBasedStateMachine):
    """RemotePages over the stand-in cluster against a dict of what each page must read.

    The local store holds about 40 pages, so most pages are remote and runs of gets in order
    read ahead.  Puts and flushes also happen while a readahead's MGET is on the wire (after
    the MGET read its values, before it returns), as another thread would make them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.store, self.tier, self.remote, self.pool, _clock = setup()
        self.model: dict[tuple[int, int], bytes] = {}
        self.serial = 0
        #: Actions made while an MGET was on the wire, so far.
        self.fired = 0

    def _put(self, obj: int, index: int) -> None:
        self.serial += 1
        assert self.remote.put_page(self.pool, Oid(obj), index, version(self.serial)) == 1
        self.model[(obj, index)] = version(self.serial)

    def _flush(self, obj: int, index: int) -> None:
        self.remote.flush_page(self.pool, Oid(obj), index)
        self.model.pop((obj, index), None)

    def _flush_object(self, obj: int) -> None:
        self.remote.flush_object(self.pool, Oid(obj))
        for where in [w for w in self.model if w[0] == obj]:
            del self.model[where]

    def _get(self, obj: int, index: int) -> None:
        before, fired = self.model.get((obj, index)), self.fired
        rc, data = self.remote.get_page(self.pool, Oid(obj), index)
        want = self.model.get((obj, index))
        if self.fired != fired and data == before:
            # this get's own MGET read the page before a put or flush made meanwhile: the
            # get happened first (a page read ahead, served later, gets no such leeway)
            want = before
        assert data == want, (obj, index, rc)
        assert (rc == 1) == (want is not None)

    @rule(obj=OBJECTS, first=INDEXES, count=st.integers(1, 24))
    def put_run(self, obj: int, first: int, count: int) -> None:
        for index in range(first, first + count):
            self._put(obj, index)

    @rule(obj=OBJECTS, index=INDEXES)
    def put(self, obj: int, index: int) -> None:
        self._put(obj, index)

    @rule(obj=OBJECTS, index=INDEXES)
    def flush_page(self, obj: int, index: int) -> None:
        self._flush(obj, index)

    @rule(obj=OBJECTS)
    def flush_object(self, obj: int) -> None:
        self._flush_object(obj)

    @rule(obj=OBJECTS, index=INDEXES)
    def get(self, obj: int, index: int) -> None:
        self._get(obj, index)

    @rule(obj=OBJECTS, first=INDEXES, count=st.integers(3, 40), step=st.integers(1, 3))
    def get_run(self, obj: int, first: int, count: int, step: int) -> None:
        for index in range(first, first + count * step, step):
            self._get(obj, index)

    def _move_all(self) -> None:
        """Every local page the store can spare moves to the cluster (a big remotify)."""
        self.remote.remotify(self.store.capacity_bytes)

    @rule()
    def move_all(self) -> None:
        self._move_all()

    @rule(obj=OBJECTS, index=INDEXES,
          what=st.sampled_from(["put", "flush", "flush_object", "put_and_move"]))
    def meanwhile(self, obj: int, index: int, what: str) -> None:
        """At the next readahead's MGET (if any), while it is on the wire: a put and a move
        makes the page remote again, with new data, before the readahead returns."""
        action = {"put": lambda: self._put(obj, index), "flush": lambda: self._flush(obj, index),
                  "flush_object": lambda: self._flush_object(obj),
                  "put_and_move": lambda: (self._put(obj, index), self._move_all())}[what]

        def fire() -> None:
            self.fired += 1
            action()
        self.tier.during_mget.append(fire)

    @invariant()
    def the_buffer_holds_only_remote_pages(self) -> None:
        remote = {(self.pool, oid, i) for oid, i in self.remote.remote_keys(self.pool)}
        assert set(self.remote._ahead._buffered) <= remote
        assert len(self.remote._ahead) <= self.remote._ahead.buffer
        assert not self.remote._ahead._flights and not self.remote._ahead._flying

    def teardown(self) -> None:
        self.tier.during_mget.clear()


TestReadaheadModel = ReadaheadModel.TestCase
TestReadaheadModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
