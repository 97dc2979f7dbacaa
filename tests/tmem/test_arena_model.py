"""The page arena against a dict, with "crash and reopen" among the operations.

A crash is simulated by abandoning the arena without closing it (only its file descriptor
goes, as the kernel would close it) and opening the file again; a crash in the middle of a
put raises a BaseException at one of the put's steps, which no cleanup catches, as a
``kill -9`` runs none.  The promise checked: every put that returned is there with exactly
its bytes after any crash; the put a crash interrupted left its key holding the old bytes,
the new ones or nothing, never anything else; nothing is stale after a delete.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from xentmem.tmem.arena import Arena
from xentmem.tmem.arenafile import MIN_SEGMENT

POOLS = st.integers(0, 2)
OIDS = st.sampled_from([(0, 0, 0), (1, 0, 0), (2**64 - 1, 5, 7)])
INDEXES = st.integers(0, 5)
KEYS = st.tuples(POOLS, OIDS, INDEXES)
DATA = st.one_of(
    st.binary(max_size=80),
    st.binary(min_size=1900, max_size=2200),
    st.binary(min_size=3900, max_size=4096),
    st.tuples(st.integers(0, 4096), st.integers(0, 255)).map(lambda t: bytes([t[1]]) * t[0]),
)
#: Where a put is cut short: before its bytes go in (a replaced page is already gone), after
#: its bytes but before its record, after the record's fields but before its commit word,
#: after the commit word but before the put returns.
STAGES = ("alloc", "record", "commit", "return")


class SimulatedCrash(BaseException):
    """Stops a put where a kill -9 could; no ``except Exception`` cleanup catches it."""


class ArenaMachine(RuleBasedStateMachine):
    allocator = "zsmalloc"

    @initialize()
    def start(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="arena-model-", dir="/dev/shm")
        self.path = Path(self.tmp.name) / "arena"
        # A small arena: the regions grow a segment at a time as the test runs.
        self.arena = Arena.open(self.path, allocator=self.allocator,
                                segment_size=MIN_SEGMENT, max_bytes=64 * MIN_SEGMENT)
        self.model: dict[Any, bytes] = {}

    def teardown(self) -> None:
        if hasattr(self, "arena"):
            self.arena.close()
            self.tmp.cleanup()

    # -- the ops -----------------------------------------------------------------------------

    @rule(key=KEYS, data=DATA)
    def put(self, key: Any, data: bytes) -> None:
        self.arena.put(key, data)
        self.model[key] = data

    @rule(key=KEYS)
    def get(self, key: Any) -> None:
        assert self.arena.get(key) == self.model.get(key)

    @rule(key=KEYS)
    def take(self, key: Any) -> None:
        assert self.arena.take(key) == self.model.pop(key, None)

    @rule(key=KEYS)
    def delete(self, key: Any) -> None:
        assert self.arena.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(pool=POOLS, oid=OIDS)
    def delete_object(self, pool: int, oid: Any) -> None:
        gone = [k for k in self.model if k[0] == pool and k[1] == oid]
        assert self.arena.delete_object(pool, oid) == len(gone)
        for k in gone:
            del self.model[k]

    @rule(pool=POOLS)
    def delete_pool(self, pool: int) -> None:
        gone = [k for k in self.model if k[0] == pool]
        assert self.arena.delete_pool(pool) == len(gone)
        for k in gone:
            del self.model[k]

    @rule()
    def reopen(self) -> None:
        self.arena.close()
        self._open()

    @rule()
    def crash_and_reopen(self) -> None:
        self._crash()

    @precondition(lambda self: True)
    @rule(key=KEYS, data=DATA, stage=st.sampled_from(STAGES))
    def crash_mid_put(self, key: Any, data: bytes, stage: str) -> None:
        old = self.model.get(key)
        arena = self.arena
        idx = arena._index

        def crash_before(real: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any) -> Any:
                raise SimulatedCrash
            return wrapper

        def crash_after(real: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any) -> Any:
                real(*args)
                raise SimulatedCrash
            return wrapper

        def fields_only(real: Callable[..., Any]) -> Callable[..., Any]:
            # The commit word is add_page's 6th argument, write_page's 7th: never written.
            at = 5 if real.__name__ == "add_page" else 6

            def wrapper(*args: Any) -> Any:
                real(*args[:at], 0, *args[at + 1 :])
                raise SimulatedCrash
            return wrapper

        if stage == "alloc":
            arena._alloc.alloc = crash_before(arena._alloc.alloc)  # type: ignore[method-assign]
            idx.add_page = crash_before(idx.add_page)  # type: ignore[method-assign]
            idx.write_page = crash_before(idx.write_page)  # type: ignore[method-assign]
        else:
            wrap = {"record": crash_before, "commit": fields_only, "return": crash_after}[stage]
            idx.add_page = wrap(idx.add_page)  # type: ignore[method-assign]
            idx.write_page = wrap(idx.write_page)  # type: ignore[method-assign]
        try:
            arena.put(key, data)
        except SimulatedCrash:
            pass
        else:
            raise AssertionError("the crash did not happen")
        self._crash()
        got = self.arena.get(key)
        allowed = [old, None] + ([data] if stage == "return" else [])
        assert got in allowed, f"after a crash at {stage}: {got!r:.60}"
        if got is None:
            self.model.pop(key, None)
        else:
            self.model[key] = got

    def _crash(self) -> None:
        self.arena._file.close()  # the kernel closes a killed process's files; nothing else
        self._open()

    def _open(self) -> None:
        self.arena = Arena.open(self.path, allocator=self.allocator)
        report = self.arena.report
        assert report.how == "reopened"
        assert report.checksum_failures == 0 and report.dropped_records == 0, report

    # -- always ------------------------------------------------------------------------------

    @invariant()
    def holds_what_the_model_holds(self) -> None:
        if not hasattr(self, "arena"):
            return
        assert len(self.arena) == len(self.model)
        assert self.arena.stats()["stored_bytes"] == sum(map(len, self.model.values()))

    @invariant()
    def every_page_exact(self) -> None:
        if not hasattr(self, "arena"):
            return
        assert sorted(self.arena.keys()) == sorted(self.model)
        for key, data in self.model.items():
            assert self.arena.get(key) == data


class ZbudArenaMachine(ArenaMachine):
    allocator = "zbud"


_SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestZsmallocArena = ArenaMachine.TestCase
TestZsmallocArena.settings = _SETTINGS
TestZbudArena = ZbudArenaMachine.TestCase
TestZbudArena.settings = _SETTINGS


def test_tables_that_grow_and_shrink_keep_every_page(tmp_path: Path) -> None:
    """Thousands of pages: the lookup tables double and are rebuilt with removed buckets
    dropped, through puts, replacements, deletes and reopens."""
    import random

    rng = random.Random(5)
    path = tmp_path / "arena"
    model: dict[Any, bytes] = {}
    arena = Arena.open(path, segment_size=MIN_SEGMENT, max_bytes=1024 * MIN_SEGMENT)
    try:
        for round_ in range(3):
            for i in range(3000):
                key = (i % 3, (i % 7, round_, 0), i)
                model[key] = data = bytes([i % 256]) * rng.randrange(0, 300)
                arena.put(key, data)
            for key in rng.sample(sorted(model), 1500):
                if rng.random() < 0.5:
                    assert arena.delete(key)
                    del model[key]
                else:
                    model[key] = b"again" * rng.randrange(1, 50)
                    arena.put(key, model[key])
            arena.close()
            arena = Arena.open(path)
            assert len(arena) == len(model)
            for key, data in model.items():
                assert arena.get(key) == data
    finally:
        arena.close()
