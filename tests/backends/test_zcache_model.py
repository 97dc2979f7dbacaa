"""Random op sequences against zcache and a reference model (hypothesis, stateful).

The model knows every page that *should* be there.  A persistent page must come back exactly
until it is flushed or replaced; an ephemeral page may vanish (eviction) but a get must never
return anything but the latest copy; and the store's accounting must match its contents.
"""

from __future__ import annotations

import errno
import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

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
    ZERO_PAGE,
    Oid,
    PoolUuid,
)

SHARED_UUID = PoolUuid(0x1234, 0x5678)
PAGES = [
    ZERO_PAGE,
    *(random.Random(seed).randbytes(PAGE_SIZE) for seed in range(3)),
    *(((b"page %d " % seed) * 600)[:PAGE_SIZE] for seed in range(3)),
]
KINDS = ("private", "shared", "shared-alias", "persistent")
Key = tuple[str, int, int]


class ZcacheModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = ZcacheBackend({"capacity": "1M"}, total_ram=lambda: 1 << 30)
        self.ids = {
            "private": self.store.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL),
            "shared": self.store.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL),
            "shared-alias": self.store.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL),
            "persistent": self.store.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT),
        }
        #: (pool, oid, index) -> page; the two shared ids name one pool, keyed as "shared".
        self.model: dict[Key, bytes] = {}

    @staticmethod
    def _key(kind: str, oid: int, index: int) -> Key:
        return ("shared" if kind == "shared-alias" else kind, oid, index)

    @rule(
        kind=st.sampled_from(KINDS),
        oid=st.integers(0, 3),
        index=st.integers(0, 40),
        page=st.sampled_from(PAGES),
    )
    def put(self, kind: str, oid: int, index: int, page: bytes) -> None:
        key = self._key(kind, oid, index)
        rc = self.store.put_page(self.ids[kind], Oid(oid), index, page)
        if rc == 1:
            self.model[key] = page
        else:
            assert rc in (-errno.ENOMEM, -errno.ENOSPC)
            assert kind == "persistent" or self.store.stats()["eph_pages"] == 0
            self.model.pop(key, None)

    @rule(kind=st.sampled_from(KINDS), oid=st.integers(0, 3), start=st.integers(0, 1000))
    def fill(self, kind: str, oid: int, start: int) -> None:
        """Many incompressible pages at once, so capacity and eviction come into play."""
        for index in range(start, start + 60):
            self.put(kind, oid, index, PAGES[1 + index % 3])

    @rule(kind=st.sampled_from(KINDS), oid=st.integers(0, 3), index=st.integers(0, 40))
    def get(self, kind: str, oid: int, index: int) -> None:
        key = self._key(kind, oid, index)
        rc, data = self.store.get_page(self.ids[kind], Oid(oid), index)
        if kind == "persistent":
            if key in self.model:
                assert (rc, data) == (1, self.model[key])
            else:
                assert (rc, data) in ((0, None), (-EEMPTY, None))
            return
        if rc == 1:
            assert key in self.model and data == self.model[key], "stale or unknown page"
            if kind == "private":
                del self.model[key]
        else:
            assert (rc, data) in ((0, None), (-EEMPTY, None))
            self.model.pop(key, None)  # evicted

    @rule(kind=st.sampled_from(KINDS), oid=st.integers(0, 3), index=st.integers(0, 40))
    def flush_page(self, kind: str, oid: int, index: int) -> None:
        key = self._key(kind, oid, index)
        rc = self.store.flush_page(self.ids[kind], Oid(oid), index)
        if kind == "persistent":
            assert rc == (1 if key in self.model else 0)
        self.model.pop(key, None)

    @rule(kind=st.sampled_from(KINDS), oid=st.integers(0, 3))
    def flush_object(self, kind: str, oid: int) -> None:
        self.store.flush_object(self.ids[kind], Oid(oid))
        pool = self._key(kind, oid, 0)[0]
        for key in [k for k in self.model if k[0] == pool and k[1] == oid]:
            del self.model[key]

    @rule(capacity=st.sampled_from(["1M", "2M"]))
    def resize(self, capacity: str) -> None:
        self.store.set_param("capacity", capacity)

    @precondition(lambda self: self.store.stats()["eph_pages"] > 0)
    @rule()
    def nothing_evicted_while_room_is_left(self) -> None:
        stats = self.store.stats()
        # Eviction only happens under pressure: what is held fits the capacity.
        assert stats["used_bytes"] <= stats["capacity_bytes"]

    @invariant()
    def persistent_pages_are_all_there(self) -> None:
        held = {k: v for k, v in self.model.items() if k[0] == "persistent"}
        assert self.store.stats()["pers_pages"] == len(held)

    @invariant()
    def accounting_matches_contents(self) -> None:
        stats = self.store.stats()
        shared_seen: set[str] = set()
        pages = zbytes = overhead = 0
        for row in self.store.pools():
            if row["shared"]:  # two ids name the one shared pool: count it once
                if row["uuid"] in shared_seen:
                    continue
                shared_seen.add(row["uuid"])
            per_page = (
                PERSISTENT_PAGE_OVERHEAD if row["kind"] == "persistent" else EPHEMERAL_PAGE_OVERHEAD
            )
            pages += row["pages"]
            zbytes += row["zbytes"]
            overhead += row["pages"] * per_page + row["objects"] * OBJECT_OVERHEAD
        assert (stats["pages"], stats["zbytes"]) == (pages, zbytes)
        assert stats["used_bytes"] == zbytes + overhead
        assert stats["eph_pages"] <= sum(1 for k in self.model if k[0] != "persistent")


TestZcacheModel = ZcacheModel.TestCase
TestZcacheModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
