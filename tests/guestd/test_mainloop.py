"""The main loop owns its schedule and the daemon's settings: a client's ``config.reload``
runs there (handed over with a bounded wait), and nothing the loop does waits for a lock a
long socket operation holds, so the WATCHDOG ping keeps coming."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.clock import FakeClock, readable_within
from xentmem.control import ControlClient, ControlError, protocol
from xentmem.guest.backend import GetResult
from xentmem.guestd.app import Application
from xentmem.guestd.signals import SignalFlags
from xentmem.notify import Notifier
from xentmem.roots import Roots
from xentmem.tmem.abi import Oid, PoolFlags

#: The longest real wait of any step here; a broken test fails instead of hanging.
REAL_WAIT_S = 5.0


class WakeableFakeClock(FakeClock):
    """Simulated time, but the main loop's wait on its pipe is real (bounded), so another
    thread can hand the loop work while it runs."""

    def wait_readable(self, fd: int, timeout: float) -> bool:
        if readable_within(fd, min(timeout, REAL_WAIT_S)):
            return True
        self.waits.append(timeout)
        self.now += timeout
        return False


class RecordingNotifier(Notifier):
    def __init__(self, watchdog_usec: int | None = None) -> None:
        super().__init__(None, watchdog_usec)
        self.sent: list[tuple[str, ...]] = []

    def send(self, *lines: str) -> bool:
        self.sent.append(lines)
        return True


BASE_CONFIG = "options tmem selfballooning_at_load=0 selfshrinking=0\n"


@pytest.fixture
def app(tmp_path: Path, fake_root: Path) -> Iterator[Application]:
    config = tmp_path / "xentmem.conf"
    config.write_text(BASE_CONFIG)
    made = Application(roots=Roots(root=fake_root, run_dir=tmp_path / "run"),
                       config_path=config, config_missing_ok=False, clock=WakeableFakeClock(),
                       notifier=RecordingNotifier(), signals=SignalFlags(), reload_wait_s=0.3)
    yield made
    made.shutdown()
    made.signals.close()


def run_with_client(app: Application, client_work: Any) -> dict[str, Any]:
    """Run the main loop here while ``client_work(client)`` runs on another thread; the
    loop ends when the client is done.  The client's result or ControlError comes back."""
    outcome: dict[str, Any] = {}

    def client() -> None:
        try:
            with ControlClient(app.roots.run / "control.sock", timeout=REAL_WAIT_S) as c:
                outcome["result"] = client_work(c)
        except ControlError as exc:
            outcome["error"] = exc
        finally:
            app.signals.request_terminate()

    thread = threading.Thread(target=client)
    thread.start()
    app.run()
    thread.join(REAL_WAIT_S)
    assert not thread.is_alive()
    return outcome


def test_a_client_reload_runs_on_the_main_thread(app: Application, tmp_path: Path) -> None:
    ran_on: list[threading.Thread] = []
    apply_settings = app.apply_settings

    def recording(settings: Any) -> None:
        ran_on.append(threading.current_thread())
        apply_settings(settings)

    app.apply_settings = recording  # type: ignore[method-assign]  # what start() hands on
    app.start()
    assert "metrics" not in app.schedule.names()
    textfile = tmp_path / "xentmem.prom"
    app.config_path.write_text(BASE_CONFIG + f"options xentmemd metrics_textfile={textfile}\n")

    outcome = run_with_client(app, lambda c: c.reload())

    assert outcome["result"]["applied"] == ["daemon.metrics_textfile"]
    assert ran_on == [threading.main_thread()]  # the schedule changed where it is read
    assert "metrics" in app.schedule.names()
    assert ("RELOADING=1", "STATUS=reloading the configuration") in app.notifier.sent


def test_a_client_reload_while_the_configuration_is_held_is_busy_and_changes_nothing(
        app: Application, tmp_path: Path) -> None:
    app.start()
    assert app.daemon is not None
    app.config_path.write_text(BASE_CONFIG + f"options xentmemd metrics_textfile="
                                             f"{tmp_path / 'x.prom'}\n")
    held, release = threading.Event(), threading.Event()

    def long_operation() -> None:  # as an unload repatriating for minutes would
        assert app.daemon is not None
        with app.daemon.holding_config():
            held.set()
            release.wait(REAL_WAIT_S)

    holder = threading.Thread(target=long_operation)
    holder.start()
    try:
        assert held.wait(REAL_WAIT_S)
        outcome = run_with_client(app, lambda c: c.reload())
    finally:
        release.set()
        holder.join(REAL_WAIT_S)
    error = outcome["error"]
    assert error.code == protocol.BUSY
    assert "it was not run" in error.message
    assert "metrics" not in app.schedule.names()
    assert app.daemon.config.daemon["metrics_textfile"] == ""
    assert not app.calls.pending()  # dropped: it will not run behind the client's back


class GatedBackend(RecordingBackend):
    """Repatriation gets wait at a gate: an unload that takes as long as the test says."""

    name: ClassVar[str] = "gated"
    gate = threading.Event()
    entered = threading.Event()

    def get_page(self, pool_id: int, oid: Oid, index: int) -> GetResult:
        if PoolFlags.decode(self.pool_flags.get(pool_id, 0)).persistent:
            type(self).entered.set()
            type(self).gate.wait(REAL_WAIT_S)
        return super().get_page(pool_id, oid, index)


def test_the_watchdog_keeps_pinging_while_an_unload_holds_every_lock(tmp_path: Path,
                                                                     fake_root: Path) -> None:
    GatedBackend.gate.clear()
    GatedBackend.entered.clear()
    config = tmp_path / "xentmem.conf"
    config.write_text(BASE_CONFIG + "options xentmemd backend=gated metrics_interval=15 "
                      f"metrics_textfile={tmp_path / 'x.prom'}\n")
    notifier = RecordingNotifier(watchdog_usec=20_000_000)
    app = Application(roots=Roots(root=fake_root, run_dir=tmp_path / "run"), config_path=config,
                      config_missing_ok=False, clock=FakeClock(0.0), notifier=notifier,
                      signals=SignalFlags(), resolve={"gated": GatedBackend}.__getitem__)
    unloaded: list[dict[str, Any]] = []
    unloader = threading.Thread(target=lambda: unloaded.append(app.daemon.unload()))  # type: ignore[union-attr]
    try:
        app.start()
        assert app.daemon is not None
        swap_type = app.daemon.swap.create(16)["type"]
        for offset in range(4):
            assert app.daemon.shim.frontswap.store(swap_type, offset, bytes([offset]) * 4096) == 0
        unloader.start()  # a client's backend.unload, stuck repatriating
        assert GatedBackend.entered.wait(REAL_WAIT_S)
        app.signals.request_reload()  # a SIGHUP while it runs

        while_stuck: list[bool] = []

        def ping() -> None:
            while_stuck.append(unloader.is_alive() and not GatedBackend.gate.is_set())
            if len(while_stuck) == 12:  # 120 s of pings: four times WatchdogSec
                app.signals.request_terminate()

        app.schedule.every("watchdog", 10.0, ping, first=True)
        app.run()

        assert while_stuck == [True] * 12
        assert ("RELOADING=1", "STATUS=reloading the configuration") not in notifier.sent
    finally:
        GatedBackend.gate.set()
        if unloader.is_alive() or unloader.ident is not None:
            unloader.join(REAL_WAIT_S)
        app.shutdown()
        app.signals.close()
    assert unloaded and unloaded[0]["repatriated"] == 4


def test_watchdog_runs_before_the_other_due_tasks() -> None:
    from xentmem.guestd.app import Schedule

    clock = FakeClock(0.0)
    schedule = Schedule(clock)
    ran: list[str] = []
    schedule.every("metrics", 5.0, lambda: ran.append("metrics"))
    schedule.every("status", 5.0, lambda: ran.append("status"))
    schedule.every("watchdog", 5.0, lambda: ran.append("watchdog"), first=True)
    clock.advance(5.0)
    assert schedule.run_due() == ["watchdog", "metrics", "status"]
    assert ran == ["watchdog", "metrics", "status"]


def test_a_textfile_that_cannot_be_written_is_said_once_not_a_traceback_each_interval(
        app: Application, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Under the shipped unit a textfile outside ReadWritePaths= is EROFS: the write went to
    ``log.exception`` every metrics_interval, a traceback in the journal each time."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    textfile = blocker / "xentmem.prom"  # ENOTDIR, whoever runs the test (root too)
    app.config_path.write_text(BASE_CONFIG + f"options xentmemd metrics_textfile={textfile}\n")
    app.start()
    caplog.clear()
    for _ in range(3):
        app.write_metrics()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    assert str(textfile) in errors[0].getMessage() and errors[0].exc_info is None
    blocker.unlink()
    blocker.mkdir()
    app.write_metrics()
    assert textfile.read_text().startswith("# HELP")
    assert any("written again" in r.getMessage() for r in caplog.records)
