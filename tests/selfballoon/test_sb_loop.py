"""The real loop on a fake root tree and a fake clock.

The expected ``target_kb`` values come from :func:`kernel_selfballoon_kb`, a line-by-line
transcription of ``selfballoon_process()`` written for this test (it does not call the policy
module), and the first ones are also pinned as literal numbers worked out by hand.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from sb_fakes import (
    MAX_PFN,
    TOTALRESERVE,
    FakeFrontswap,
    GuestTree,
    HookClock,
    RecordingPublisher,
)

from xentmem_selfballoon.knobs import KnobStore
from xentmem_selfballoon.loop import SelfballoonLoop

OFFSET = 16619  # balloon current_pages - totalram_pages in the fake guest
START_CURRENT = 524288  # 2 GiB


def kernel_selfballoon_kb(*, totalram: int, committed: int, balloon_current: int,
                          reserved_mb: int, down: int = 8, up: int = 1,
                          min_usable_mb: int = 0, frontswap: int = 0) -> int:
    """selfballoon_process() for one tick, in pages, returning target_kb (written anew)."""
    reserve, max_pfn = TOTALRESERVE, MAX_PFN
    cur_pages = totalram
    tgt_pages = cur_pages
    goal_pages = committed + reserve + reserved_mb * 256 + frontswap
    if cur_pages > goal_pages:
        tgt_pages = cur_pages - int((cur_pages - goal_pages) / down)
    elif cur_pages < goal_pages:
        tgt_pages = cur_pages + int((goal_pages - cur_pages) / up)
    useful_pages = max_pfn - reserve
    if min_usable_mb != 0:
        floor_pages = reserve + min_usable_mb * 256
    elif useful_pages < 16 * 256:
        floor_pages = max_pfn
    elif useful_pages < 64 * 256:
        floor_pages = reserve + 16 * 256 + int((useful_pages - 16 * 256) / 2)
    elif useful_pages < 512 * 256:
        floor_pages = reserve + 40 * 256 + int((useful_pages - 40 * 256) / 8)
    else:
        floor_pages = reserve + 99 * 256 + int((useful_pages - 99 * 256) / 32)
    if tgt_pages < floor_pages:
        tgt_pages = floor_pages
    return (tgt_pages + balloon_current - totalram) * 4


class KernelWorld:
    """Between ticks: the balloon reaches the target at once; committed follows a script."""

    def __init__(self, tree: GuestTree, script: list[dict[str, Any]],
                 knobs: KnobStore | None = None, frontswap: FakeFrontswap | None = None) -> None:
        self.tree = tree
        self.script = script
        self.knobs = knobs
        self.frontswap = frontswap
        self.current = START_CURRENT
        self.tick = 0
        self.expected: list[int] = []
        self.seen: list[int | None] = []
        self.reserved_mb = 198
        self.down, self.up, self.min_usable = 8, 1, 0
        tree.set_target_kb(START_CURRENT * 4)
        self._write(self.script[0]["committed_kb"])

    def _write(self, committed_kb: int) -> None:
        self.tree.write(mem_total_kb=(self.current - OFFSET) * 4, committed_kb=committed_kb,
                        current_kb=self.current * 4)

    def hook(self, clock: HookClock, stop: threading.Event) -> None:
        if self.tick:  # after a tick: record what it wrote, the balloon reaches it
            written = self.tree.target_kb()
            self.seen.append(written)
            assert written is not None
            self.current = written // 4
        if self.tick == len(self.script):
            stop.set()
            return
        step = self.script[self.tick]
        for name, value in step.get("knobs", {}).items():
            assert self.knobs is not None
            self.knobs.set(name, value)
        self.reserved_mb = step.get("ref_reserved_mb", self.reserved_mb)
        self.down = step.get("ref_down", self.down)
        self.min_usable = step.get("ref_min_usable", self.min_usable)
        if self.frontswap is not None and "frontswap" in step:
            self.frontswap.pages = step["frontswap"]
        committed_kb = step["committed_kb"]
        self._write(committed_kb)
        fs = self.frontswap.pages if self.frontswap is not None else 0
        self.expected.append(kernel_selfballoon_kb(
            totalram=self.current - OFFSET, committed=committed_kb // 4,
            balloon_current=self.current, reserved_mb=self.reserved_mb, down=self.down,
            up=self.up, min_usable_mb=self.min_usable, frontswap=fs))
        self.tick += 1


def make_loop(tree: GuestTree, world_hook: Callable[[HookClock, threading.Event], None],
              knobs: KnobStore, **kw: Any) -> tuple[SelfballoonLoop, HookClock]:
    clock = HookClock(world_hook)
    return SelfballoonLoop(tree.roots, knobs, clock=clock, **kw), clock


def test_target_kb_sequence_matches_the_kernel_step_by_step(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    knobs = KnobStore({"frontswap_selfshrinking": 0}, auto_reserved_mb=198)
    script = [
        {"committed_kb": 1048576},  # 1 GiB: shrink 1/8 of the excess per tick
        {"committed_kb": 1048576},
        {"committed_kb": 1677720},  # a rise: straight up to the goal (uphysteresis 1)
        {"committed_kb": 524288},
        # knobs change between ticks: next tick uses them
        {"committed_kb": 65536, "knobs": {"selfballoon_downhysteresis": "1",
                                          "selfballoon_reserved_mb": "1"},
         "ref_down": 1, "ref_reserved_mb": 1},  # goal below the floor: the floor wins
        {"committed_kb": 65536, "knobs": {"selfballoon_min_usable_mb": "300"},
         "ref_min_usable": 300},
        {"committed_kb": 65536, "knobs": {"selfballoon_min_usable_mb": "auto",
                                          "selfballoon_reserved_mb": "auto",
                                          "selfballoon_interval": "2"},
         "ref_min_usable": 0, "ref_reserved_mb": 198},
        {"committed_kb": 65536},
    ]
    world = KernelWorld(tree, script, knobs)
    loop, clock = make_loop(tree, world.hook, knobs)
    loop.run(threading.Event())

    assert world.seen == world.expected
    # by hand: 507669 - (507669 - 317232) // 8 = 483865, + 16619 = 500484 pages
    # then 483865 - (483865 - 317232) // 8 = 463036 -> 479655 pages
    # then goal 419430 + 4400 + 50688 = 474518 at once -> 491137 pages
    assert world.seen[:3] == [2001936, 1918620, 1964548]
    # tick 5: floor 4400 + 25344 + 15454 = 45198 beats the goal 16384 + 4400 + 256
    assert world.seen[4] == (45198 + OFFSET) * 4
    # tick 6: min_usable_mb 300 -> floor 4400 + 76800
    assert world.seen[5] == (81200 + OFFSET) * 4
    # tick 7: both auto again: goal 16384 + 4400 + 50688 = 71472, down 1
    assert world.seen[6] == (71472 + OFFSET) * 4
    # the interval changed before tick 7 takes effect for the wait after it
    assert clock.waits == [5.0] * 7 + [2.0, 2.0]
    assert loop.ticks == 8 and loop.errors == 0
    assert [r.target_kb for r in loop.history()] == world.seen


def test_frontswap_self_shrink_through_the_loop(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    fs = FakeFrontswap()
    knobs = KnobStore(auto_reserved_mb=198)
    c = 1048576
    script = [
        {"committed_kb": c, "frontswap": 0},  # empty
        {"committed_kb": c, "frontswap": 1000},  # growing: counter 3
        {"committed_kb": c},  # 2
        {"committed_kb": c},  # 1
        {"committed_kb": c},  # 0: shrink to 950
        {"committed_kb": c},  # 2
        {"committed_kb": c},  # 1
        {"committed_kb": c},  # shrink to 950 - 47 = 903
        {"committed_kb": c, "knobs": {"frontswap_inertia": "1"}},  # reset to 1: shrink, 858
        {"committed_kb": c, "knobs": {"frontswap_hysteresis": "2"}},  # 858 - 429 = 429
    ]
    world = KernelWorld(tree, script, knobs, frontswap=fs)
    loop, _ = make_loop(tree, world.hook, knobs, frontswap=fs)
    loop.run(threading.Event())
    assert fs.shrinks == [950, 903, 858, 429]
    reasons = [r.shrink.reason for r in loop.history() if r.shrink is not None]
    assert reasons == ["empty", "growing", "inertia", "inertia", "shrink", "inertia", "inertia",
                       "shrink", "shrink", "shrink"]
    # the goal counted the frontswap pages as they were at each tick
    assert world.seen == world.expected


def test_malformed_file_skips_the_tick_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = GuestTree(tmp_path)
    knobs = KnobStore({"frontswap_selfshrinking": 0}, auto_reserved_mb=198)
    ticks = {"n": 0}

    def hook(clock: HookClock, stop: threading.Event) -> None:
        ticks["n"] += 1
        if ticks["n"] == 1:
            tree.write(mem_total_kb=2030676, committed_kb=1048576, current_kb=2097152)
        elif ticks["n"] == 2:
            (tmp_path / "proc" / "meminfo").write_text("MemTotal: lots\n")
        elif ticks["n"] == 3:
            tree.write(mem_total_kb=2030676, committed_kb=1048576, current_kb=2097152)
            (tmp_path / "proc" / "zoneinfo").unlink()
        else:
            stop.set()

    tree.set_target_kb(2097152)
    loop, _ = make_loop(tree, hook, knobs)
    caplog.set_level(logging.INFO)
    loop.run(threading.Event())
    history = loop.history()
    assert [r.error is None for r in history] == [True, False, False]
    assert "meminfo" in (history[1].error or "") and "zoneinfo" in (history[2].error or "")
    assert loop.errors == 2
    assert tree.target_kb() == history[0].target_kb  # the failed ticks wrote nothing
    assert any("skipped, nothing written" in r.message and r.levelno == logging.ERROR
               for r in caplog.records)


def test_unexpected_errors_are_caught_counted_and_the_loop_goes_on(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    tree.set_target_kb(2097152)
    tree.write(mem_total_kb=2030676, committed_kb=1048576, current_kb=2097152)
    fs = FakeFrontswap(10)
    knobs = KnobStore(auto_reserved_mb=198)
    count = {"n": 0}

    def hook(clock: HookClock, stop: threading.Event) -> None:
        count["n"] += 1
        fs.fail_with = RuntimeError("boom") if count["n"] == 2 else None
        if count["n"] == 4:
            stop.set()

    loop, _ = make_loop(tree, hook, knobs, frontswap=fs)
    loop.run(threading.Event())
    assert (loop.ticks, loop.errors) == (2, 1)
    history = loop.history()
    assert [r.error for r in history][1] == "RuntimeError: boom"
    assert history[0].error is None and history[2].error is None
    assert history[2].written


def test_report_only_mode_writes_nothing(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path, balloon=False)
    tree.write(mem_total_kb=2030676, committed_kb=1048576)
    pub = RecordingPublisher()
    knobs = KnobStore(auto_reserved_mb=198)

    def hook(clock: HookClock, stop: threading.Event) -> None:
        if clock.calls > 3:
            stop.set()

    before = sorted(p for p in tmp_path.rglob("*"))
    contents = {p: p.read_bytes() for p in before if p.is_file()}
    loop, _ = make_loop(tree, hook, knobs, publisher=pub)
    loop.run(threading.Event())
    assert loop.ticks == 3 and loop.errors == 0
    assert all(r.report_only and not r.written for r in loop.history())
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert {p: p.read_bytes() for p in before if p.is_file()} == contents
    # what it would have set is published (totalram terms: no balloon to convert to)
    assert pub.latest()["data/selfballoon/target_kb"] == str(483865 * 4)
    assert pub.latest()["data/selfballoon/mode"] == "report-only"


def test_pressure_guard_grows_between_ticks(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    knobs = KnobStore({"frontswap_selfshrinking": 0, "pressure_guard": 1},
                      auto_reserved_mb=198)
    tree.set_target_kb(2097152)
    psi = {"total": 0}

    def hook(clock: HookClock, stop: threading.Event) -> None:
        # quiet until t=7, when committed jumps past the reserve; from then on the guest
        # stalls 50 % of each second (first seen in the reading at t=8)
        t = clock.now
        committed = 1792000 if t >= 7 else 1048576
        if t >= 8:
            psi["total"] += 500_000
        current = tree.target_kb() or 2097152
        tree.write(mem_total_kb=current - OFFSET * 4, committed_kb=committed,
                   current_kb=current, psi_total_us=psi["total"])
        if t >= 10:
            stop.set()

    loop, clock = make_loop(tree, hook, knobs)
    loop.run(threading.Event())
    kinds = [(r.time, r.kind) for r in loop.history()]
    # regular ticks at 5 and 10 (the stop came first at 10); guard ticks at 8 and 9: the first
    # stalled second is seen at t=8 (7 -> 8), not at the next regular tick
    assert kinds == [(5.0, "tick"), (8.0, "guard"), (9.0, "guard")]
    assert clock.waits[:5] == [1.0] * 5
    guard = loop.history()[1]
    assert guard.balloon is not None and guard.balloon.guarded
    # straight to the goal with the new committed: 448000 + 4400 + 50688 (downhysteresis or
    # the next regular tick would not matter: it is all at once, two seconds before tick 10)
    assert guard.balloon.cur_pages == 483865
    assert guard.balloon.target_pages == 503088
    assert loop.guard_ticks == 2


def test_both_jobs_off_is_idle_and_reads_nothing(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)  # no meminfo at all: a read would fail the tick
    knobs = KnobStore({"selfballooning": 0, "frontswap_selfshrinking": 0})

    def hook(clock: HookClock, stop: threading.Event) -> None:
        if clock.calls > 2:
            stop.set()

    loop, _ = make_loop(tree, hook, knobs)
    loop.run(threading.Event())
    assert [r.kind for r in loop.history()] == ["idle", "idle"] and loop.errors == 0


def test_history_is_bounded_and_one_log_line_per_tick(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = GuestTree(tmp_path)
    tree.set_target_kb(2097152)
    tree.write(mem_total_kb=2030676, committed_kb=1048576, current_kb=2097152)
    knobs = KnobStore(auto_reserved_mb=198)

    def hook(clock: HookClock, stop: threading.Event) -> None:
        if clock.calls > 5:
            stop.set()

    logger = logging.getLogger("test.selfballoon.loop")
    loop, _ = make_loop(tree, hook, knobs, history_len=3, logger=logger)
    with caplog.at_level(logging.INFO, logger="test.selfballoon.loop"):
        loop.run(threading.Event())
    assert [r.seq for r in loop.history()] == [3, 4, 5]
    assert loop.last() is not None and loop.last().seq == 5  # type: ignore[union-attr]
    lines = [r for r in caplog.records if r.name == "test.selfballoon.loop"]
    assert len(lines) == 5
    assert "target_kb=" in lines[0].getMessage()
    assert loop.history()[0].as_dict()["balloon"]["floor_rule"] == "large"


def test_writing_frontswap_inertia_restarts_the_countdown_even_unchanged(tmp_path: Path) -> None:
    # Regression: the countdown restarted only when the value changed; the kernel's
    # store_frontswap_inertia() sets frontswap_inertia_counter = val on every write.
    tree = GuestTree(tmp_path)
    fs = FakeFrontswap()
    knobs = KnobStore(auto_reserved_mb=198)
    c = 1048576
    script = [
        {"committed_kb": c, "frontswap": 0},  # empty
        {"committed_kb": c, "frontswap": 1000},  # growing: counter 3
        {"committed_kb": c},  # 2
        {"committed_kb": c, "knobs": {"frontswap_inertia": "3"}},  # the same value: 3, then 2
        {"committed_kb": c},  # 1
        {"committed_kb": c},  # 0: shrink to 950
    ]
    world = KernelWorld(tree, script, knobs, frontswap=fs)
    loop, _ = make_loop(tree, world.hook, knobs, frontswap=fs)
    loop.run(threading.Event())
    reasons = [r.shrink.reason for r in loop.history() if r.shrink is not None]
    assert reasons == ["empty", "growing", "inertia", "inertia", "inertia", "shrink"]
    assert fs.shrinks == [950]
