"""Random operation sequences against the frontends over ``zcache``, checked against a model.

The model is the simplest thing that is right: a dict of what each swap slot holds and a dict of
the latest clean page offered for each file page.  The invariants are the project's promises:
a persistent (swap) page is never lost while it is valid, and an ephemeral (cleancache) get
returns the latest page put or a miss — never stale data — across evictions, shrinks, unloads
and loads of backends.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots
from xentmem.tmem.abi import ZERO_PAGE, PoolUuid

SWAP_TYPES = (0, 1)
SWAP_SLOTS = 160
FILES = (11, 12)
INDEXES = 2


def make_page(kind: int, seed: int) -> bytes:
    """Pages of every compressibility: zero, text-like, and incompressible."""
    if kind == 0:
        return ZERO_PAGE
    if kind == 1:
        words = [b"tmem", b"page", b"swap", b"xen ", b"pool", str(seed).encode()]
        rng = random.Random(seed)
        return b"".join(rng.choice(words) for _ in range(2048))[:4096].ljust(4096, b".")
    return random.Random(seed).randbytes(4096)


pages = st.builds(make_page, st.integers(0, 2), st.integers(0, 7))


class FrontendsModel(RuleBasedStateMachine):
    #: Keys a put has touched, so invalidations and gets aim where data may be cached.
    put_keys = Bundle("put_keys")
    @initialize(
        capacity_mb=st.sampled_from(["1", "2"]),
        prefill=st.integers(0, 280),
        modes=st.sampled_from([(False, False), (True, False), (False, True)]),
    )
    def start(self, capacity_mb: str, prefill: int, modes: tuple[bool, bool]) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.shim = Shim(roots=Roots(root=Path(self.tmp.name)), boot=BootParams())
        self.swap: dict[tuple[int, int], bytes] = {}
        self.clean: dict[tuple[int, int, int], bytes] = {}
        for swap_type in SWAP_TYPES:
            self.shim.frontswap.init(swap_type, MemoryBacking(SWAP_SLOTS))
        self.private_fs = self.shim.cleancache.init_fs()
        self.shared_fs = self.shim.cleancache.init_shared_fs(PoolUuid(7, 7))
        self._load(capacity_mb, modes)
        # Incompressible swap pages close to (or past) a 1 MiB store, so persistent puts
        # start failing with -ENOMEM and must fall back to the backing store.
        for n in range(prefill):
            swap_type, offset = n % 2, n // 2
            page = make_page(2, n)
            self.shim.frontswap.store(swap_type, offset, page)
            self.swap[(swap_type, offset)] = page

    def _load(self, capacity_mb: str, modes: tuple[bool, bool]) -> None:
        writethrough, exclusive = modes
        self.shim.load("zcache", {
            "capacity": capacity_mb,
            "frontswap_writethrough": writethrough,
            "frontswap_exclusive_gets": exclusive,
        })
        self.loaded = True

    def teardown(self) -> None:
        if hasattr(self, "tmp"):
            self.tmp.cleanup()

    # -- backend life cycle ------------------------------------------------------------------

    @precondition(lambda self: not self.loaded)
    @rule(
        capacity_mb=st.sampled_from(["1", "2"]),
        modes=st.sampled_from([(False, False), (True, False), (False, True)]),
    )
    def load(self, capacity_mb: str, modes: tuple[bool, bool]) -> None:
        self._load(capacity_mb, modes)

    @precondition(lambda self: self.loaded)
    @rule()
    def unload(self) -> None:
        self.shim.unload()
        self.loaded = False
        self.clean.clear()  # ephemeral pools are dropped: every later get must miss

    # -- frontswap -----------------------------------------------------------------------------

    @rule(swap_type=st.sampled_from(SWAP_TYPES), offset=st.integers(0, SWAP_SLOTS - 1), page=pages)
    def store(self, swap_type: int, offset: int, page: bytes) -> None:
        self.shim.frontswap.store(swap_type, offset, page)
        self.swap[(swap_type, offset)] = page

    @rule(swap_type=st.sampled_from(SWAP_TYPES), offset=st.integers(0, SWAP_SLOTS - 1))
    def load_page(self, swap_type: int, offset: int) -> None:
        assert self.shim.frontswap.load(swap_type, offset) == self.swap.get((swap_type, offset))

    @rule(swap_type=st.sampled_from(SWAP_TYPES), offset=st.integers(0, SWAP_SLOTS - 1))
    def invalidate_swap_page(self, swap_type: int, offset: int) -> None:
        self.shim.frontswap.invalidate_page(swap_type, offset)
        self.swap.pop((swap_type, offset), None)

    @rule(swap_type=st.sampled_from(SWAP_TYPES))
    def swapoff_swapon(self, swap_type: int) -> None:
        self.shim.frontswap.invalidate_area(swap_type)
        self.shim.frontswap.init(swap_type, MemoryBacking(SWAP_SLOTS))
        for key in [k for k in self.swap if k[0] == swap_type]:
            del self.swap[key]

    @rule(target_pages=st.integers(0, 64))
    def shrink(self, target_pages: int) -> None:
        self.shim.frontswap.shrink(target_pages)
        assert self.shim.frontswap.curr_pages() <= target_pages

    # -- cleancache ----------------------------------------------------------------------------

    def _fs(self, shared: bool) -> int:
        return self.shared_fs if shared else self.private_fs

    @rule(
        target=put_keys,
        shared=st.booleans(),
        ino=st.sampled_from(FILES),
        index=st.integers(0, INDEXES),
        page=pages,
    )
    def put(self, shared: bool, ino: int, index: int, page: bytes) -> tuple[bool, int, int]:
        self.shim.cleancache.put_page(self._fs(shared), ino, index, page)
        if self.loaded:
            self.clean[(int(shared), ino, index)] = page
        return shared, ino, index

    @rule(key=put_keys)
    def get_put_key(self, key: tuple[bool, int, int]) -> None:
        self.get(*key)

    @rule(key=put_keys)
    def invalidate_put_key(self, key: tuple[bool, int, int]) -> None:
        self.invalidate_page(*key)

    @rule(shared=st.booleans(), ino=st.sampled_from(FILES), index=st.integers(0, INDEXES))
    def get(self, shared: bool, ino: int, index: int) -> None:
        got = self.shim.cleancache.get_page(self._fs(shared), ino, index)
        key = (int(shared), ino, index)
        assert got is None or got == self.clean.get(key), "stale or foreign data from cleancache"
        if got is not None and not shared:
            del self.clean[key]  # private ephemeral gets are exclusive

    @rule(shared=st.booleans(), ino=st.sampled_from(FILES), index=st.integers(0, INDEXES))
    def invalidate_page(self, shared: bool, ino: int, index: int) -> None:
        self.shim.cleancache.invalidate_page(self._fs(shared), ino, index)
        self.clean.pop((int(shared), ino, index), None)

    @rule(shared=st.booleans(), ino=st.sampled_from(FILES))
    def invalidate_inode(self, shared: bool, ino: int) -> None:
        self.shim.cleancache.invalidate_inode(self._fs(shared), ino)
        for key in [k for k in self.clean if k[:2] == (int(shared), ino)]:
            del self.clean[key]

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def swap_pages_all_there(self) -> None:
        if not hasattr(self, "shim"):
            return
        for (swap_type, offset), page in self.swap.items():
            assert self.shim.frontswap.load(swap_type, offset) == page


FrontendsModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFrontendsModel = FrontendsModel.TestCase
