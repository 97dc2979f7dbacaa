"""A plain in-memory tmem backend that records every call, for testing the frontends.

It follows Xen's rules closely enough for the frontends (exclusive gets on private ephemeral
pools, 1/0/-errno returns) and can be told to fail puts or gets, so a test can show what the
frontends do when a backend refuses or loses a page.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from xentmem.guest.backend import Backend, GetResult
from xentmem.params import Param, ParamSet
from xentmem.tmem.abi import TMEM_DONE, TMEM_NOT_FOUND, Oid, PoolFlags, PoolUuid


class RecordingBackend(Backend):
    name: ClassVar[str] = "recording"
    summary: ClassVar[str] = "in-memory store that records calls (tests only)"
    params: ClassVar[ParamSet] = ParamSet(
        Param("max_pools", int, 16, "pools before -EPERM", min=1, max=64),
        Param("label", str, "rec", "a free-form label", writable=True),
    )

    def __init__(self, values: Any, **kw: Any) -> None:
        super().__init__(values, **kw)
        self.calls: list[tuple[Any, ...]] = []
        self.pool_flags: dict[int, int] = {}
        self.pool_uuids: dict[int, PoolUuid] = {}
        self.pages: dict[tuple[int, Oid, int], bytes] = {}
        self.fail_puts = False
        self.fail_gets = False
        self.connected = False
        self.removed = False
        self._next_id = 0

    def connect(self) -> None:
        self.connected = True

    def remove(self) -> None:
        self.removed = True
        self.pages.clear()
        self.pool_flags.clear()

    def new_pool(self, uuid: PoolUuid, flags: int) -> int:
        self.calls.append(("new_pool", uuid, flags))
        if len(self.pool_flags) >= self.values["max_pools"]:
            return -errno.EPERM
        pool_id = self._next_id
        self._next_id += 1
        self.pool_flags[pool_id] = flags
        self.pool_uuids[pool_id] = uuid
        return pool_id

    def destroy_pool(self, pool_id: int) -> int:
        self.calls.append(("destroy_pool", pool_id))
        if pool_id not in self.pool_flags:
            return 0
        del self.pool_flags[pool_id]
        for key in [k for k in self.pages if k[0] == pool_id]:
            del self.pages[key]
        return TMEM_DONE

    def put_page(self, pool_id: int, oid: Oid, index: int, page: bytes) -> int:
        self.calls.append(("put_page", pool_id, oid, index))
        if pool_id not in self.pool_flags:
            return -errno.ENODEV
        if self.fail_puts:
            self.pages.pop((pool_id, oid, index), None)
            return -errno.ENOMEM
        self.pages[(pool_id, oid, index)] = bytes(page)
        return TMEM_DONE

    def get_page(self, pool_id: int, oid: Oid, index: int) -> GetResult:
        self.calls.append(("get_page", pool_id, oid, index))
        if pool_id not in self.pool_flags:
            return -errno.ENODEV, None
        if self.fail_gets:
            return -errno.EIO, None
        key = (pool_id, oid, index)
        if key not in self.pages:
            return TMEM_NOT_FOUND, None
        flags = PoolFlags.decode(self.pool_flags[pool_id])
        data = self.pages[key]
        if not flags.persistent and not flags.shared:
            del self.pages[key]
        return TMEM_DONE, data

    def flush_page(self, pool_id: int, oid: Oid, index: int) -> int:
        self.calls.append(("flush_page", pool_id, oid, index))
        return TMEM_DONE if self.pages.pop((pool_id, oid, index), None) is not None else 0

    def flush_object(self, pool_id: int, oid: Oid) -> int:
        self.calls.append(("flush_object", pool_id, oid))
        keys = [k for k in self.pages if k[0] == pool_id and k[1] == oid]
        for key in keys:
            del self.pages[key]
        return TMEM_DONE if keys else 0

    def stats(self) -> dict[str, int]:
        return {"pages": len(self.pages), "pools": len(self.pool_flags)}


class OtherBackend(RecordingBackend):
    """A second backend class, to show unload of one and load of another."""

    name: ClassVar[str] = "other"
