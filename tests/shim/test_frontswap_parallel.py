"""Frontswap lets stores to different offsets reach the backend together (the ``xen``
backend batches what arrives together), while each offset stays consistent: many threads
storing, loading and freeing, a shrink and an unload running meanwhile, lose no page."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

from fakes.recording_backend import RecordingBackend

from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import FileBacking, MemoryBacking
from xentmem.guest.frontends.frontswap import Frontswap
from xentmem.guest.frontends.keys import swizzle_oids
from xentmem.guest.shim import Shim
from xentmem.roots import Roots
from xentmem.tmem.abi import POOL_PRIVATE_PERSISTENT, PRIVATE_UUID

PAGE = 4096
#: Every wait for another thread: bounded, generously (a busy CI machine).
WAIT_S = 60.0


def page(n: int) -> bytes:
    return n.to_bytes(8, "little") * (PAGE // 8)


def make_shim(tmp_path: Path) -> Shim:
    return Shim(roots=Roots(root=tmp_path), boot=BootParams())


class MeetingBackend(RecordingBackend):
    """Its put_page waits until ``parties`` puts are inside it at once."""

    name = "meeting"
    parties = 2

    def __init__(self, values: Any, **kw: Any) -> None:
        super().__init__(values, **kw)
        self.barrier = threading.Barrier(self.parties, timeout=WAIT_S)
        self.met = 0

    def put_page(self, pool_id: int, oid: Any, index: int, page: bytes) -> int:
        self.barrier.wait()  # BrokenBarrierError if the puts come one at a time
        self.met += 1
        return super().put_page(pool_id, oid, index, page)


def test_stores_to_different_offsets_are_in_the_backend_together(tmp_path: Path) -> None:
    """Before, one lock was held across every backend call: the second store waited for the
    first, the barrier broke, and both pages went to the backing store."""
    shim = make_shim(tmp_path)
    shim.load(MeetingBackend)
    shim.frontswap.init(0, MemoryBacking(64))
    results: dict[int, int] = {}

    def store(offset: int) -> None:
        results[offset] = shim.frontswap.store(0, offset, page(offset))

    threads = [threading.Thread(target=store, args=(o,)) for o in (3, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT_S)
    assert results == {3: 0, 40: 0}  # both went to tmem, together
    assert shim.backend.met == 2  # type: ignore[union-attr]
    assert shim.frontswap.load(0, 3) == page(3) and shim.frontswap.load(0, 40) == page(40)


def test_many_threads_a_shrink_and_an_unload_lose_no_page(tmp_path: Path) -> None:
    shim = make_shim(tmp_path)
    shim.load("zcache")
    frontswap = shim.frontswap
    frontswap.init(0, FileBacking(tmp_path / "a.swap", 512, 0))
    frontswap.init(1, MemoryBacking(512))
    threads_n, per_thread = 6, 40
    models: list[dict[tuple[int, int], bytes]] = [{} for _ in range(threads_n)]
    failures: list[str] = []
    go = threading.Barrier(threads_n + 1, timeout=WAIT_S)

    def worker(n: int) -> None:
        rng = random.Random(n)
        model = models[n]
        slots = [(t, o) for t in (0, 1) for o in range(n, 512, threads_n)][:per_thread]
        go.wait()
        for step in range(300):
            swap_type, offset = rng.choice(slots)
            action = rng.random()
            if action < 0.5:
                data = page(n * 100000 + step)
                frontswap.store(swap_type, offset, data)
                model[(swap_type, offset)] = data
            elif action < 0.8:
                got = frontswap.load(swap_type, offset)
                if got != model.get((swap_type, offset)):
                    failures.append(f"thread {n}: {swap_type}:{offset} read back wrong")
            else:
                frontswap.invalidate_page(swap_type, offset)
                model.pop((swap_type, offset), None)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    go.wait()
    frontswap.shrink(10)  # while they run
    for t in threads:
        t.join(10 * WAIT_S)
        assert not t.is_alive()
    assert not failures, failures[:5]
    shim.unload()  # every tmem page back into its backing store
    assert frontswap.curr_pages() == 0
    for model in models:
        for (swap_type, offset), data in model.items():
            assert frontswap.load(swap_type, offset) == data


class HoldingBackend(RecordingBackend):
    """Its put_page stores the page, then holds the caller until released."""

    name = "holding"

    def __init__(self, values: Any, **kw: Any) -> None:
        super().__init__(values, **kw)
        self.entered = threading.Event()
        self.release = threading.Event()

    def put_page(self, pool_id: int, oid: Any, index: int, page: bytes) -> int:
        rc = super().put_page(pool_id, oid, index, page)
        self.entered.set()
        assert self.release.wait(WAIT_S)
        return rc


def test_an_unload_waits_for_a_store_inside_the_backend(tmp_path: Path) -> None:
    """The store's page is in tmem when the unload begins, but not yet in frontswap's map:
    the unload must wait for the store and repatriate the page, not let the backend go with
    it (an unload that did not wait lost the page)."""
    shim = make_shim(tmp_path)
    shim.load(HoldingBackend)
    backend = shim.backend
    assert isinstance(backend, HoldingBackend)
    shim.frontswap.init(0, MemoryBacking(16))
    store = threading.Thread(target=shim.frontswap.store, args=(0, 5, page(5)))
    store.start()
    assert backend.entered.wait(WAIT_S)
    unload = threading.Thread(target=shim.unload)
    unload.start()
    unload.join(0.5)  # a chance for an unload that does not wait to finish first (a bug)
    backend.release.set()
    store.join(WAIT_S)
    unload.join(WAIT_S)
    assert not store.is_alive() and not unload.is_alive()
    assert shim.backend is None
    assert shim.frontswap.load(0, 5) == page(5)


class OutlivingBackend(RecordingBackend):
    """A backend whose pages outlived a crash (as zcache's arena): its pool already holds
    an old copy of a swap page when frontswap registers it."""

    name = "outliving"
    outlives_process = True
    restored_pools = 1

    def restored_pages(self, pool_id: int) -> list[tuple[Any, int]]:
        return [(oid, index) for (pool, oid, index) in self.pages if pool == pool_id]


def test_a_backend_registered_while_a_store_writes_the_backing_store_adopts_no_older_page(
        ) -> None:
    """A store that found no backend writes the backing store; a backend whose pages
    outlived a crash registers meanwhile and holds an older copy of that slot: it must not
    adopt it (it once did, and later loads served the old page)."""
    frontswap = Frontswap()
    backing = MemoryBacking(16)
    frontswap.init(0, backing)
    backend = OutlivingBackend({"max_pools": 16, "label": "x"})
    pool = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    backend.pages[(pool, swizzle_oids(0)[0], 0)] = b"O" * PAGE  # offset 0's old copy
    backend.new_pool = lambda uuid, flags: pool  # type: ignore[method-assign]
    writing, go_on = threading.Event(), threading.Event()
    write = backing.write

    def slow_write(offset: int, data: bytes) -> None:
        writing.set()
        assert go_on.wait(WAIT_S)
        write(offset, data)

    backing.write = slow_write  # type: ignore[method-assign]
    store = threading.Thread(target=frontswap.store, args=(0, 0, b"N" * PAGE))
    store.start()
    assert writing.wait(WAIT_S)
    register = threading.Thread(target=frontswap.register_ops, args=(backend,))
    register.start()
    register.join(0.5)  # a chance for a registration that does not wait to adopt first
    go_on.set()
    store.join(WAIT_S)
    register.join(WAIT_S)
    assert not store.is_alive() and not register.is_alive()
    assert frontswap.load(0, 0) == b"N" * PAGE
