"""The cleancache frontend: clean file pages into ephemeral tmem pools, with lazy init.

Follows ``mm/cleancache.c`` (3.11-4.2) and the cleancache half of ``drivers/xen/tmem.c``
(``docs/tmem-semantics.md``, "cleancache").
Each filesystem gets a *fake* pool id when it is mounted; while no backend is loaded the
fake id maps to "no backend" and the filesystem is recorded.  When a backend registers,
every recorded filesystem gets a real pool, in mount order, and the data path starts.

Two departures from 3.x, both deliberate: there is no 32-filesystem limit (4.3 removed it
too), and fake ids are never reused, so a stale id can never reach another filesystem's pool.
Counters keep the debugfs names but count what happened: a put with no backend is not a put.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from xentmem.errors import AbiError, BackendError
from xentmem.guest.backend import Backend
from xentmem.guest.frontends.guarded import Guarded
from xentmem.guest.frontends.keys import FileKey, filekey_oid
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_SHARED_EPHEMERAL,
    PRIVATE_UUID,
    TMEM_DONE,
    U32_MAX,
    U64_MAX,
    Oid,
    PoolUuid,
    rc_name,
)

log = logging.getLogger(__name__)

#: Builds an Oid without NamedTuple's argument parsing (the words are already checked).
_new_oid = tuple.__new__

FAKE_FS_POOLID_OFFSET = 1000
FS_NO_BACKEND = -1


@dataclass
class _Filesystem:
    fake_id: int
    uuid: PoolUuid | None  # None: private pool (init_fs); else shared (init_shared_fs)
    real_id: int = FS_NO_BACKEND

    @property
    def flags(self) -> int:
        return POOL_PRIVATE_EPHEMERAL if self.uuid is None else POOL_SHARED_EPHEMERAL


class Cleancache(Guarded):
    """Cleancache.  Thread-safe: one lock guards the fs map and backend calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # never taken twice: no method calls another under it
        self._ops: Backend | None = None
        self._filesystems: dict[int, _Filesystem] = {}
        self._next_fake_id = FAKE_FS_POOLID_OFFSET
        # debugfs names (/sys/kernel/debug/cleancache/) plus failed_puts.
        self.succ_gets = 0
        self.failed_gets = 0
        self.puts = 0
        self.invalidates = 0
        self.failed_puts = 0
        self.backend_errors = 0

    # -- registration -----------------------------------------------------------------------

    @property
    def ops(self) -> Backend | None:
        return self._ops

    def register_ops(self, ops: Backend) -> None:
        """``cleancache_register_ops``: give each recorded filesystem a real pool, in order.

        All or nothing: if the backend raises part way, the pools made so far are destroyed
        and every filesystem stays "recorded", so no fs keeps an id from a backend that
        never loaded (it could name another pool of the next one).
        """
        with self._lock:
            if self._ops is not None:
                raise BackendError(f"cleancache already has a backend ({self._ops.name})")
            replayed: list[_Filesystem] = []
            try:
                for fs in self._filesystems.values():
                    if fs.real_id == FS_NO_BACKEND:
                        replayed.append(fs)
                        fs.real_id = self._new_pool(ops, fs)
            except Exception:
                for fs in replayed:
                    if fs.real_id >= 0:
                        self.quietly("destroy_pool", ops.destroy_pool, fs.real_id)
                    fs.real_id = FS_NO_BACKEND
                raise
            self._ops = ops

    def unregister_ops(self) -> int:
        """Drop every ephemeral pool; the filesystems go back to "recorded, to be replayed".

        Returns the number of pools dropped.  Clean pages are only a cache, so nothing is lost.
        """
        with self._lock:
            ops = self._ops
            if ops is None:
                return 0
            dropped = 0
            for fs in self._filesystems.values():
                if fs.real_id >= 0:
                    self.quietly("destroy_pool", ops.destroy_pool, fs.real_id)
                    dropped += 1
                fs.real_id = FS_NO_BACKEND
            self._ops = None
            return dropped

    def _disable(self, ops: Backend, fs: _Filesystem) -> None:
        """A flush failed: the pool may hold a stale page, so this fs stops using it, and so
        does every fs of this guest that shares it (same uuid): the pool goes with the last
        of them, the stale page with it."""
        log.error("cleancache: fs %d: a flush failed; its pool %d is dropped so no stale page "
                  "can be returned", fs.fake_id, fs.real_id)
        members = [fs]
        if fs.uuid is not None:
            members += [other for other in self._filesystems.values()
                        if other is not fs and other.uuid == fs.uuid and other.real_id >= 0]
        for member in members:
            self.quietly("destroy_pool", ops.destroy_pool, member.real_id)
            member.real_id = FS_NO_BACKEND

    @staticmethod
    def _new_pool(ops: Backend, fs: _Filesystem) -> int:
        rc = ops.new_pool(fs.uuid or PRIVATE_UUID, fs.flags)
        if rc < 0:
            log.warning("cleancache: backend %s refused a pool for fs %d: %s",
                        ops.name, fs.fake_id, rc_name(rc))
        return rc

    # -- filesystems --------------------------------------------------------------------------

    def init_fs(self) -> int:
        """A filesystem was mounted: its (fake) pool id."""
        return self._init(None)

    def init_shared_fs(self, uuid: PoolUuid) -> int:
        """A clustered filesystem (ocfs2) was mounted: a shared pool named by its uuid
        (AbiError for one that is not two u64 words: nothing is recorded)."""
        try:
            lo, hi = uuid
        except (TypeError, ValueError):
            raise AbiError(f"a pool uuid is two u64 words, got {uuid!r}") from None
        return self._init(PoolUuid.checked(lo, hi))

    def _init(self, uuid: PoolUuid | None) -> int:
        with self._lock:
            fs = _Filesystem(self._next_fake_id, uuid)
            self._next_fake_id += 1
            if self._ops is not None:
                fs.real_id = self._new_pool(self._ops, fs)
            self._filesystems[fs.fake_id] = fs
            return fs.fake_id

    def real_pool_id(self, fake_id: int) -> int:
        """The backend's pool id behind a fake id (-1 while no backend or if refused)."""
        with self._lock:
            return self._fs(fake_id).real_id

    def _fs(self, fake_id: int) -> _Filesystem:
        try:
            return self._filesystems[fake_id]
        except KeyError:
            raise AbiError(f"no cleancache filesystem with pool id {fake_id}") from None

    # -- data path ----------------------------------------------------------------------------

    def get_page(self, fake_id: int, key: FileKey, index: int) -> bytes | None:
        """The clean page, or None for a miss (never stale data).  A hot path: kept flat."""
        if type(key) is int and 0 <= key <= U64_MAX:  # an inode number: filekey_oid, inlined
            oid = _new_oid(Oid, (key, 0, 0))
        else:
            oid = filekey_oid(key)
        lock = self._lock
        lock.acquire()
        try:
            fs = self._filesystems.get(fake_id)
            if fs is None:
                raise AbiError(f"no cleancache filesystem with pool id {fake_id}")
            real_id = fs.real_id
            ops = self._ops
            if ops is not None and real_id >= 0 and 0 <= index <= U32_MAX:
                try:
                    rc, data = ops.get_page(real_id, oid, index)
                except Exception:  # a miss is always a correct answer from a cache
                    self.backend_errors += 1
                    log.exception("cleancache: backend get_page failed")
                    rc, data = 0, None
                if rc == TMEM_DONE:
                    self.succ_gets += 1
                    return data
            self.failed_gets += 1
            return None
        finally:
            lock.release()

    def put_page(self, fake_id: int, key: FileKey, index: int, page: bytes) -> bool:
        """Offer a clean page; True if the backend kept it (the kernel ignores the answer)."""
        if len(page) != PAGE_SIZE:
            raise AbiError(f"a page is {PAGE_SIZE} bytes, got {len(page)}")
        if type(key) is int and 0 <= key <= U64_MAX:  # as in get_page
            oid = _new_oid(Oid, (key, 0, 0))
        else:
            oid = filekey_oid(key)
        lock = self._lock
        lock.acquire()
        try:
            fs = self._filesystems.get(fake_id)
            if fs is None:
                raise AbiError(f"no cleancache filesystem with pool id {fake_id}")
            real_id = fs.real_id
            ops = self._ops
            if ops is None or real_id < 0 or not 0 <= index <= U32_MAX:
                return False
            self.puts += 1
            try:
                if ops.put_page(real_id, oid, index, page) == TMEM_DONE:
                    return True
            except Exception:  # the old copy may still be there: it must go
                self.backend_errors += 1
                log.exception("cleancache: backend put_page failed")
                if self.quietly("flush_page", ops.flush_page, real_id, oid, index) is None:
                    self._disable(ops, fs)
            self.failed_puts += 1
            return False
        finally:
            lock.release()

    def invalidate_page(self, fake_id: int, key: FileKey, index: int) -> None:
        """The page changed or went away: the cached copy must not be returned again."""
        oid = filekey_oid(key)
        with self._lock:
            fs = self._fs(fake_id)
            ops = self._ops
            if ops is not None and fs.real_id >= 0 and 0 <= index <= U32_MAX:
                if self.quietly("flush_page", ops.flush_page, fs.real_id, oid, index) is None:
                    self._disable(ops, fs)
                self.invalidates += 1

    def invalidate_inode(self, fake_id: int, key: FileKey) -> None:
        """The file was truncated or deleted: flush its whole object (not counted, as 3.x)."""
        oid = filekey_oid(key)
        with self._lock:
            fs = self._fs(fake_id)
            ops = self._ops
            if (ops is not None and fs.real_id >= 0
                    and self.quietly("flush_object", ops.flush_object, fs.real_id, oid) is None):
                self._disable(ops, fs)

    def invalidate_fs(self, fake_id: int) -> None:
        """The filesystem was unmounted: destroy its pool and forget its id."""
        with self._lock:
            fs = self._fs(fake_id)
            del self._filesystems[fake_id]
            if self._ops is not None and fs.real_id >= 0:
                self.quietly("destroy_pool", self._ops.destroy_pool, fs.real_id)

    # -- reporting ----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "succ_gets": self.succ_gets,
            "failed_gets": self.failed_gets,
            "puts": self.puts,
            "invalidates": self.invalidates,
            "failed_puts": self.failed_puts,
            "backend_errors": self.backend_errors,
        }

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "registered": self._ops is not None,
                "filesystems": [
                    {
                        "fake_id": fs.fake_id,
                        "real_id": fs.real_id,
                        "shared": fs.uuid is not None,
                        "uuid": str(fs.uuid) if fs.uuid is not None else None,
                        "flags": f"{fs.flags:#010x}",
                    }
                    for fs in self._filesystems.values()
                ],
            }
