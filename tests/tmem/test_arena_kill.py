"""A real ``kill -9`` of a process in the middle of its puts, again and again.

A child process applies a deterministic sequence of puts and deletes to an arena and
acknowledges each one on stdout once it returned.  The parent kills it with SIGKILL after a
random number of acknowledgements (the child is then anywhere in its loop: inside a put,
between the bytes and the record, in the middle of a copy), reads every acknowledgement
the child managed to write, reopens the arena and checks: every acknowledged op is there
exactly, the one op in flight took effect whole or not at all (a put over a page may have
dropped the old page: it was not acknowledged, as a failed duplicate put in Xen), nothing
else changed, no record was damaged.  Then a new child goes on from there, on the same file.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from xentmem.tmem.arena import Arena
from xentmem.tmem.arenafile import MIN_SEGMENT

KILLS = 10
#: Ops a child would do if never killed (it always is, long before).
RUN = 100_000

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from tmem.test_arena_kill import op
    from xentmem.tmem.arena import Arena
    arena = Arena.open({path!r}, allocator={allocator!r}, segment_size={segment},
                       max_bytes={max_bytes})
    out = sys.stdout
    for i in range({start}, {start} + {run}):
        kind, key, data = op(i)
        if kind == "put":
            arena.put(key, data)
        else:
            arena.delete(key)
        out.write(f"{{i}}\\n")
        out.flush()
    """
)


def op(i: int) -> tuple[str, Any, bytes]:
    """The i-th op of the sequence: same in the child and the parent."""
    rng = random.Random(i * 1_000_003 + 7)
    key = (rng.randrange(2), (rng.randrange(4), 0, 0), rng.randrange(48))
    if rng.random() < 0.2:
        return "delete", key, b""
    size = rng.choice([0, rng.randrange(1, 200), rng.randrange(1000, 3000), 4096])
    stamp = i.to_bytes(4, "little")
    return "put", key, (stamp * (size // 4 + 1))[:size]


def apply(model: dict[Any, bytes], i: int) -> None:
    kind, key, data = op(i)
    if kind == "put":
        model[key] = data
    else:
        model.pop(key, None)


@pytest.mark.parametrize("allocator", ["zbud", "zsmalloc"])
def test_every_acknowledged_op_survives_kill_9(allocator: str, tmp_path: Path) -> None:
    rng = random.Random(f"kill-{allocator}")
    path = tmp_path / "arena"
    tests = str(Path(__file__).resolve().parents[1])
    model: dict[Any, bytes] = {}
    start = 0
    for kill in range(KILLS):
        script = CHILD.format(tests=tests, path=str(path), allocator=allocator,
                              segment=MIN_SEGMENT, max_bytes=256 * MIN_SEGMENT,
                              start=start, run=RUN)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stderr is not None
        wanted = rng.randrange(1, 400)
        acked = start - 1
        for _ in range(wanted):
            line = child.stdout.readline()
            if not line:
                child.wait(timeout=60)
                pytest.fail(f"child {kill} ended early: {child.stderr.read()}")
            acked = int(line)
        os.kill(child.pid, signal.SIGKILL)
        for line in child.stdout.read().split():  # what it acknowledged before it died
            acked = int(line)
        assert child.wait(timeout=60) == -signal.SIGKILL
        child.stdout.close()
        child.stderr.close()
        for i in range(start, acked + 1):
            apply(model, i)
        in_flight = acked + 1
        with_it = dict(model)
        apply(with_it, in_flight)

        arena = Arena.open(path, allocator=allocator)
        try:
            report = arena.report
            assert report.checksum_failures == 0 and report.dropped_records == 0, report
            held = {key: arena.get(key) for key in arena.keys()}  # noqa: SIM118 (not a dict)
            _, flying, _ = op(in_flight)
            # The op in flight: done, not done, or (a put over a page) the old page gone.
            assert held.get(flying) in (model.get(flying), with_it.get(flying), None), kill
            others = {k: v for k, v in held.items() if k != flying}
            assert others == {k: v for k, v in model.items() if k != flying}, kill
        finally:
            arena.close()
        model = {k: v for k, v in held.items() if v is not None}
        start = in_flight + 1
