"""The store's state machine (``test_tmem_store_model.py``) with one more op: kill and restart.

The store runs as ``xentmem-hostd`` keeps it, over the page arena in a run directory
(:class:`~xentmem.hostd.store.HostStore`), each op recorded as one message is
(``commit``); "kill and restart" closes everything without the clean stop and opens a new
store over the same directory.  Afterwards the store must hold exactly the model's pages,
byte for byte (nothing lost, nothing stale), in the same pools and slots, with the same
clients and settings, and go on answering as the model does.

Three things a restart does not keep are set aside: the eviction counter starts again (the
model's is reset with it), the ephemeral pages' LRU order is rebuilt from the arena, and a
shared page is charged to the pool's first member (the model takes the store's new order
and owners).  The model does not know the arena's slack
(its rounding and index, which the capacity counts: ``test_tmem_store.py``), so the store's
capacity here counts the pages' charges only.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_tmem_store_model import CLIENTS, RAW_EPH, SLOTS, UUIDS, Model, StoreModel

from xentmem.hostd.store import HostStore

COMMITTER = 0  # the "domain" whose message each op is, for the record (no session: none)


class RestartModel(StoreModel):
    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        self.dir = Path(tempfile.mkdtemp(prefix="store-restart-"))
        self.seq = 0
        capacity = 7 * RAW_EPH
        self._open(capacity)
        self.model = Model(capacity)
        for cid in CLIENTS:  # as the base: slot 0 private, 1 persistent, 2 shared
            self.authorise(cid, UUIDS[0], True)
            for kind in ("private", "persistent", "shared"):
                self.new_pool(cid, UUIDS[0], kind)

    def _open(self, capacity: int) -> None:
        self.host = HostStore(capacity, run_dir=self.dir, max_pools=SLOTS)
        self.store = self.host.tmem
        self.store._slack = None  # see the module docstring

    def teardown(self) -> None:
        self.host.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @invariant()
    def each_op_is_a_message(self) -> None:
        """What TmemBack does after every message: record it (the table when pools changed,
        the exclusive gets' pages deleted now)."""
        self.seq += 1
        # The rules reach the store itself, not HostStore's methods that note a change of
        # pools or settings (the resume tests go through those): the table is written
        # with every message here.
        self.host._pools_changed = True
        self.host.commit(COMMITTER, self.seq, b"")

    @rule()
    def kill_and_restart(self) -> None:
        self.host.close()  # no clean stop: the files stay as a kill leaves them
        self._open(self.model.capacity)
        store, model = self.store, self.model
        assert store.used_bytes == model.used()
        store.evictions = model.evictions = 0
        gids: dict[int, int] = {}
        for cid, mclient in model.clients.items():
            client = store.clients[cid]
            assert (client.weight, client.cap, client.frozen, client.auth) == (
                mclient.weight, mclient.cap, mclient.frozen, mclient.auth)
            for slot, mpool in enumerate(mclient.slots):
                pool = client.slots[slot]
                assert (pool is None) == (mpool is None), (cid, slot)
                if pool is not None and mpool is not None:
                    assert (pool.persistent, pool.shared) == (mpool.persistent, mpool.shared)
                    assert gids.setdefault(id(mpool), pool.gid) == pool.gid
        assert self.host.run is not None
        pages = self.host.run.pages
        stamps = {key: stamp for client in store.clients.values()
                  for key, stamp in client.lru.items()}
        keyed = []
        for page in model.pages:
            key = (gids[id(page.pool)], page.oid, 0, 0, page.index)
            assert pages.get(key) == page.data, key  # every page back, exactly
            keyed.append((key, page))
        assert len(list(pages.keys())) == len(model.pages)  # and nothing else
        # The model takes the restored LRU order (persistent pages have none).
        eph = sorted((stamps[key], page) for key, page in keyed if not page.pool.persistent)
        model.pages = [p for p in model.pages if p.pool.persistent] + [p for _, p in eph]
        assert store.shared_auth == model.shared_auth
        for key, page in keyed:  # a shared page is charged to a member again, maybe another
            pool = store._by_gid[key[0]]
            page.owner = pool.owners[key] if pool.shared else pool.owner
        # So a member may be over its cap until its next put evicts its oldest pages; the
        # model holds caps after every op, so the cap is applied at once, to both.
        for cid, mclient in model.clients.items():
            if mclient.cap:
                assert store.set_cap(cid, mclient.cap) == model.set_cap(cid, mclient.cap)


TestRestartModel = RestartModel.TestCase
TestRestartModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
