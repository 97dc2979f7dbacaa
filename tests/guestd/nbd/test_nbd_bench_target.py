"""``bench/bench_nbd.py``'s xentmem target: it measures what the daemon serves (zcache in a
page arena) without touching the system's run directory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from xentmem.guestd.nbd.resident import NotResident

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_nbd.py"


@pytest.fixture
def bench_nbd():
    spec = importlib.util.spec_from_file_location("bench_nbd_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_bench_keeps_its_arena_in_its_own_directory(bench_nbd, short_dir: Path) -> None:
    # It used the default run directory (/run/xentmem): as root, a benchmark (and the suite's
    # run of it) left a zcache arena there, shared with any other run of it.
    ours = bench_nbd.Ours(short_dir, 16 * 4096, residency=NotResident())
    try:
        arena = ours.shim.backend.describe()["arena"]
        assert arena is not None and Path(arena).is_relative_to(short_dir)
        ours.fresh()
        assert ours.exports.get("bench").pages == 16
    finally:
        ours.close()
