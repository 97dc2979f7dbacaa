"""One daemon per run directory: a second one stops before it loads a backend, and leaves
the first one's socket, swap maps and shutdown record alone."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.clock import FakeClock
from xentmem.console import EXIT_FAILURE
from xentmem.control import ControlClient
from xentmem.guestd.app import Application, serve
from xentmem.guestd.rundir import LOCK_NAME, RunDirBusy, RunDirLock
from xentmem.guestd.server import ControlServer, ServerError
from xentmem.guestd.signals import SignalFlags
from xentmem.notify import Notifier
from xentmem.roots import Roots


class CountingBackend(RecordingBackend):
    name: ClassVar[str] = "counting"
    connects: ClassVar[int] = 0

    def connect(self) -> None:
        type(self).connects += 1
        super().connect()


def application(tmp_path: Path, root: Path, run_dir: Path, name: str) -> Application:
    config = tmp_path / f"{name}.conf"
    config.write_text("options xentmemd backend=counting\n"
                      "options tmem selfballooning_at_load=0 selfshrinking=0\n")
    return Application(roots=Roots(root=root, run_dir=run_dir), config_path=config,
                       config_missing_ok=False, clock=FakeClock(0.0), notifier=Notifier(None),
                       signals=SignalFlags(), resolve={"counting": CountingBackend}.__getitem__)


def test_a_second_daemon_stops_before_loading_and_leaves_the_first_alone(
        tmp_path: Path, fake_root: Path) -> None:
    run = tmp_path / "run"
    first = application(tmp_path, fake_root, run, "first")
    first.start()
    try:
        assert CountingBackend.connects == 1
        second = application(tmp_path, fake_root, run, "second")
        assert serve(second) == EXIT_FAILURE  # start refused, "shutdown" of what it owns
        assert CountingBackend.connects == 1  # no second tmem client
        assert (run / "control.sock").exists()
        # The first one's record still says it runs: the second wrote nothing there.
        assert json.loads((first.state_dir / "shutdown.json").read_text())["pid"] == os.getpid()
        with ControlClient(run / "control.sock", timeout=5) as client:
            assert client.status()["state"] == "running"
            assert client.status()["pid"] == os.getpid()
        with pytest.raises(RunDirBusy, match=rf"another xentmemd \(pid {os.getpid()}\) owns"):
            RunDirLock(run).acquire()
        second.signals.close()
    finally:
        assert first.shutdown() == 0
        first.signals.close()
    record = json.loads((first.state_dir / "shutdown.json").read_text())
    assert record["clean"] is True and record["state"] == "stopped" and record["previous"] == []
    assert not (run / "control.sock").exists()
    lock = RunDirLock(run)  # released with the first daemon
    lock.acquire()
    lock.release()
    assert (run / LOCK_NAME).exists()  # the file stays; the lock is what counts


def test_two_xentmemd_processes_on_one_run_dir(tmp_path: Path, fake_root: Path,
                                               start_daemon: Any) -> None:
    first = start_daemon(fake_root)
    second = start_daemon(fake_root, None, "--run-dir", str(first.run_dir), wait=False,
                          base=tmp_path / "second")
    assert second.stop(None) == EXIT_FAILURE
    assert "another xentmemd" in second.log()
    assert first.socket.exists()
    with ControlClient(first.socket, timeout=5) as client:
        assert client.status()["state"] == "running"
    record = json.loads((first.state_dir / "shutdown.json").read_text())
    assert record["state"] == "running" and record["pid"] == first.proc.pid  # the first's
    assert first.stop(signal.SIGTERM) == 0


def test_a_second_daemon_with_its_own_run_dir_but_the_same_state_dir_is_refused(
        tmp_path: Path, fake_root: Path) -> None:
    first = application(tmp_path, fake_root, tmp_path / "run-a", "first")
    first.start()
    try:
        assert first.daemon is not None
        area = first.daemon.swap.create(8, "file")["type"]
        assert first.daemon.shim.frontswap.store(area, 1, b"\x11" * 4096) == 0
        connects = CountingBackend.connects
        second = application(tmp_path, fake_root, tmp_path / "run-b", "second")
        assert serve(second) == EXIT_FAILURE
        assert CountingBackend.connects == connects
        assert not (tmp_path / "run-b" / "control.sock").exists()
        assert first.daemon.swap.path_of(area).exists()  # its swap file untouched
        with pytest.raises(RunDirBusy, match="owns the state directory"):
            second.start()
        second.signals.close()
    finally:
        assert first.shutdown() == 0
        first.signals.close()


def test_a_server_removes_only_the_socket_it_bound(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    live = ControlServer(path, lambda line: b"")
    live.start()
    try:
        loser = ControlServer(path, lambda line: b"")
        with pytest.raises(ServerError, match="another xentmemd"):
            loser.start()
        loser.stop()  # never bound: must not unlink the live one's socket
        assert path.exists()
        with ControlClient(path, timeout=2) as client:  # still answering (with nothing)
            assert client.socket_path == str(path)
    finally:
        live.stop()
    assert not path.exists()

    replaced = ControlServer(path, lambda line: b"")
    replaced.start()
    os.unlink(path)
    path.write_text("someone else's")
    replaced.stop()
    assert path.read_text() == "someone else's"
