"""Lazy start: the worker starts and stops with the shim's backend, as the flags say."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sb_fakes import FakeShim, GuestTree, RecordingPublisher, StepClock

from xentmem.clock import FakeClock
from xentmem_selfballoon.knobs import KnobStore
from xentmem_selfballoon.service import SelfballoonService


@pytest.fixture
def tree(tmp_path: Path) -> GuestTree:
    t = GuestTree(tmp_path)
    t.set_target_kb(2097152)
    t.write(mem_total_kb=2030676, committed_kb=1048576, current_kb=2097152)
    return t


def service(clock: StepClock | None = None, **kw: object) -> SelfballoonService:
    return SelfballoonService(clock=clock or StepClock(), join_timeout_s=5.0, **kw)  # type: ignore[arg-type]


def test_default_flags_start_both_jobs_and_unload_stops(tree: GuestTree) -> None:
    clock = StepClock()
    svc = service(clock)
    shim = FakeShim(tree.roots)
    shim.add_listener(svc)
    assert not svc.running
    shim.load()
    try:
        assert svc.running
        assert svc.running_jobs() == ("selfballooning", "frontswap_selfshrinking")
        # reserved_mb's automatic value was measured at start: 507669 // 10 >> 8
        assert svc.knobs.snapshot().auto_reserved_mb == 198
        clock.wait_entered(1)
        clock.step()  # one tick
        last = svc.last()
        assert last is not None and last.error is None and last.target_kb == 2001936
    finally:
        shim.unload()
    assert not svc.running
    assert svc.status()["not_running_because"] == "no backend loaded"
    # the history survives the stop, for `xentmem balloon`
    assert len(svc.history()) == 1


@pytest.mark.parametrize(
    ("flags", "dom0", "reason"),
    [
        ({"frontswap": False}, False, "frontswap is off"),
        ({"selfballooning_at_load": False, "selfshrinking": False}, False, "flags are off"),
        ({}, True, "domain0"),
        ({"selfballooning_at_load": False}, True, "domain0"),  # not even self-shrinking in dom0
    ],
)
def test_flags_that_keep_the_worker_off(
    tmp_path: Path, flags: dict[str, bool], dom0: bool, reason: str
) -> None:
    t = GuestTree(tmp_path, dom0=dom0)
    t.write(mem_total_kb=2030676, committed_kb=1048576, current_kb=2097152)
    svc = service()
    shim = FakeShim(t.roots, flags)
    shim.add_listener(svc)
    shim.load()
    assert not svc.running
    assert reason in svc.status()["not_running_because"]
    shim.unload()


@pytest.mark.parametrize(
    ("flags", "jobs"),
    [
        ({"selfshrinking": False}, ("selfballooning",)),
        ({"selfballooning_at_load": False}, ("frontswap_selfshrinking",)),
    ],
)
def test_one_job_only(tree: GuestTree, flags: dict[str, bool], jobs: tuple[str, ...]) -> None:
    svc = service()
    shim = FakeShim(tree.roots, flags)
    shim.add_listener(svc)
    shim.load()
    try:
        assert svc.running_jobs() == jobs
        knobs = svc.knobs.snapshot()
        assert (knobs.selfballooning, knobs.frontswap_selfshrinking) == (
            "selfballooning" in jobs, "frontswap_selfshrinking" in jobs)
    finally:
        shim.unload()


def test_reload_after_a_refused_unload_restarts(tree: GuestTree) -> None:
    clock = StepClock()
    svc = service(clock)
    shim = FakeShim(tree.roots)
    shim.add_listener(svc)
    shim.load()
    shim.unload()
    shim.load()  # what the shim does when an unload is refused
    try:
        assert svc.running
    finally:
        assert svc.stop()
    assert not svc.running


def test_the_automatic_reserve_is_measured_at_the_first_start_only(tree: GuestTree) -> None:
    """xen_selfballoon_init sets reserved_mb once per boot; measured again at each load,
    from the RAM ballooned down since, the reserve shrank with every unload/load."""
    svc = service()
    shim = FakeShim(tree.roots)
    shim.add_listener(svc)
    shim.load()
    shim.unload()
    assert svc.knobs.show("selfballoon_reserved_mb") == "auto (198)"  # 507669 // 10 >> 8
    tree.write(mem_total_kb=600 * 1024, committed_kb=300000, current_kb=600 * 1024)
    shim.load()
    try:
        assert svc.running
        assert svc.knobs.show("selfballoon_reserved_mb") == "auto (198)"  # not 60
    finally:
        shim.unload()


def test_knob_set_while_running_reaches_the_next_tick(tree: GuestTree) -> None:
    clock = StepClock()
    pub = RecordingPublisher()
    svc = service(clock, publisher=pub, knobs=KnobStore({"selfballoon_interval": "3"}))
    shim = FakeShim(tree.roots, {"selfshrinking": False})
    shim.add_listener(svc)
    shim.load()
    try:
        clock.wait_entered(1)
        clock.step()
        first = svc.last()
        svc.knobs.set("selfballoon_downhysteresis", "1")
        clock.step()
        second = svc.last()
    finally:
        shim.unload()
    assert first is not None and second is not None
    assert first.balloon is not None and second.balloon is not None
    # the files did not change; only the divisor did: down 8 then down 1 (straight to goal)
    assert first.balloon.target_pages == 483865
    assert second.balloon.target_pages == second.balloon.goal_pages == 317232
    assert clock.waits[:2] == [3.0, 3.0]  # the interval set before start was kept
    assert pub.latest()["data/selfballoon/goal_kb"] == str(317232 * 4)


def test_unreadable_meminfo_at_start_does_not_start(tmp_path: Path) -> None:
    t = GuestTree(tmp_path)  # no meminfo written
    svc = service()
    shim = FakeShim(t.roots)
    shim.add_listener(svc)
    shim.load()
    assert not svc.running
    assert "reserved_mb" in svc.status()["not_running_because"]


def test_status_is_plain_data(tree: GuestTree) -> None:
    import json

    clock = StepClock()
    svc = service(clock)
    shim = FakeShim(tree.roots)
    shim.add_listener(svc)
    shim.load()
    try:
        clock.wait_entered(1)
        clock.step()
        status = svc.status()
    finally:
        shim.unload()
    assert status["running"] is True
    assert status["knobs"]["selfballoon_reserved_mb"] == "auto (198)"
    assert status["last"]["target_kb"] == 2001936
    assert status["report_only"] is False
    json.dumps(status)


def test_with_the_real_shim(tree: GuestTree) -> None:
    shim_mod = pytest.importorskip("xentmem.guest.shim")
    backend_mod = pytest.importorskip("fakes.recording_backend")
    cmdline = pytest.importorskip("xentmem.guest.cmdline")
    clock = StepClock()
    svc = service(clock)
    shim = shim_mod.Shim(roots=tree.roots, boot=cmdline.BootParams())
    shim.add_listener(svc)
    shim.load(backend_mod.RecordingBackend, {"frontswap": True})
    try:
        assert svc.running_jobs() == ("selfballooning", "frontswap_selfshrinking")
        clock.wait_entered(1)
        clock.step()
        last = svc.last()
        assert last is not None and last.error is None and last.shrink is not None
        assert last.shrink.reason == "empty"  # nothing in frontswap yet
    finally:
        shim.unload()
    assert not svc.running
    shim.load(backend_mod.RecordingBackend, {"frontswap": False})
    assert not svc.running and "frontswap is off" in svc.status()["not_running_because"]
    shim.unload()


def test_the_knobs_follow_the_flags_at_every_load(tree: GuestTree) -> None:
    """xen_selfballoon_init(): each load sets the two job knobs from the shim's flags, so a
    knob switched off at run time is on again after an unload and a load with the flag on."""
    svc = service(knobs=KnobStore({"selfballooning": "0"}))
    shim = FakeShim(tree.roots)
    shim.add_listener(svc)
    shim.load()
    assert svc.knobs.get("selfballooning") is True
    svc.knobs.update({"selfballooning": "0", "frontswap_selfshrinking": "0"})
    shim.unload()
    shim.load()
    try:
        assert (svc.knobs.get("selfballooning"), svc.knobs.get("frontswap_selfshrinking")) == (
            True, True)
        assert svc.running_jobs() == ("selfballooning", "frontswap_selfshrinking")
    finally:
        shim.unload()


def test_a_knob_switched_off_by_a_flag_comes_back_with_the_flag(tree: GuestTree) -> None:
    svc = service()
    off = FakeShim(tree.roots, {"selfballooning_at_load": False})
    off.add_listener(svc)
    off.load()
    assert svc.knobs.get("selfballooning") is False
    off.unload()
    on = FakeShim(tree.roots)
    on.add_listener(svc)
    on.load()
    try:
        assert svc.running_jobs() == ("selfballooning", "frontswap_selfshrinking")
    finally:
        on.unload()


class StuckFirstWorker(FakeClock):
    """The first worker's first wait blocks until :attr:`release` is set (a tick that takes
    longer than the stop timeout), ignoring its stop event; later waits end with ``stop``.
    Every real wait is bounded, so a broken test fails instead of hanging."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.first_entered = threading.Event()
        self.first: threading.Thread | None = None

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        if self.first is None:
            self.first = threading.current_thread()
            self.first_entered.set()
            self.release.wait(10.0)
            return stop.is_set()
        return stop.wait(10.0)


def test_start_after_a_stop_that_timed_out_runs_a_fresh_worker(tree: GuestTree) -> None:
    clock = StuckFirstWorker()
    svc = SelfballoonService(clock=clock, join_timeout_s=0.05)
    shim = FakeShim(tree.roots)
    shim.add_listener(svc)
    shim.load()
    assert clock.first_entered.wait(5.0)
    old = clock.first
    assert old is not None

    shim.unload()  # the worker is stuck: stop() times out
    assert old.is_alive()
    assert not svc.running  # told to stop: not running, whatever the thread does
    assert "stopping" in svc.status()["not_running_because"]

    shim.load()  # a new backend: a new worker, not "already running"
    assert svc.running
    clock.release.set()  # the old worker ends its tick and sees its stop
    old.join(5.0)
    assert not old.is_alive()
    assert svc.running  # the fresh worker still runs
    assert svc.status()["not_running_because"] is None

    shim.unload()
    assert not svc.running
    assert svc.status()["not_running_because"] == "no backend loaded"
    assert svc.stop(10.0)  # generous: a busy machine wakes a thread late


def test_stop_joins_a_retired_worker_too(tree: GuestTree) -> None:
    clock = StuckFirstWorker()
    svc = SelfballoonService(clock=clock, join_timeout_s=0.05)
    shim = FakeShim(tree.roots)
    shim.add_listener(svc)
    shim.load()
    assert clock.first_entered.wait(5.0)
    shim.unload()
    shim.load()  # the stuck one is retired beside the new one
    assert not svc.stop(0.05)  # the retired worker is still in its tick
    clock.release.set()
    assert svc.stop(5.0)
    assert clock.first is not None and not clock.first.is_alive()


def test_figures_history_limit_and_the_publisher_closed_at_stop(tree: GuestTree) -> None:
    clock = StepClock()
    pub = RecordingPublisher()
    svc = service(clock, publisher=pub)
    assert svc.figures() == {"running": False, "report_only": None, "counters": {}}
    shim = FakeShim(tree.roots)
    shim.add_listener(svc)
    shim.load()
    try:
        clock.wait_entered(1)
        clock.step()
        clock.step()
        figures = svc.figures()
        status = svc.status(limit=1)
    finally:
        shim.unload()
    assert figures["running"] is True and figures["written"] is True
    assert figures["target_kb"] == svc.history()[-1].target_kb
    assert figures["counters"]["ticks"] == 2
    assert [r["seq"] for r in status["history"]] == [2]
    assert status["figures"]["goal_pages"] == figures["goal_pages"]
    assert svc.status(limit=0)["history"] == [] and len(svc.status()["history"]) == 2
    assert pub.closes == 1  # the connection goes with the worker; the next write reopens it
