"""sd_notify, the journald log format, and the main loop on a fake clock."""

from __future__ import annotations

import io
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from xentmem.clock import FakeClock
from xentmem.guestd.app import Application, Schedule, overrides_of, parse_args
from xentmem.guestd.logs import setup_logging
from xentmem.guestd.signals import SignalFlags
from xentmem.notify import Notifier
from xentmem.roots import Roots


def datagram_listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_to_a_path(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    listener = datagram_listener(str(path))
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
        assert notifier.ready("backend zcache")
        assert listener.recv(4096).decode().splitlines() == [
            "READY=1", "STATUS=backend zcache", f"MAINPID={os.getpid()}"]
        assert notifier.watchdog()
        assert listener.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping("bye")
        assert listener.recv(4096) == b"STOPPING=1\nSTATUS=bye"
        notifier.close()
        # A STATUS line from a task still running at exit goes nowhere (no new socket).
        assert not notifier.status("late")
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.recv(4096)
    finally:
        listener.close()


def test_notify_to_the_abstract_namespace() -> None:
    name = f"xentmem-test-{os.getpid()}"
    listener = datagram_listener(b"\0" + name.encode())
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("hello")
        assert listener.recv(4096) == b"STATUS=hello"
    finally:
        listener.close()


def test_notify_without_systemd_is_a_no_op_and_failures_do_not_raise(tmp_path: Path) -> None:
    assert Notifier.from_env({}).ready("x") is False
    broken = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert broken.enabled and broken.ready("x") is False


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # someone else's
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
        ({"WATCHDOG_USEC": "garbage"}, None),
        ({"WATCHDOG_USEC": "\uff12\uff10\uff10\uff10\uff10"}, None),  # fullwidth digits
        ({"WATCHDOG_USEC": "\u00b2"}, None),  # a digit to isdigit, not to int: no crash
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "\u00b9"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(env: dict[str, str], interval: Any) -> None:
    assert Notifier.from_env(env).watchdog_interval_s == interval


def test_journald_format_has_priorities_and_no_timestamps() -> None:
    stream = io.StringIO()
    setup_logging("debug", stream=stream, env={"JOURNAL_STREAM": "8:123"})
    log = logging.getLogger("xentmem.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("e")
    lines = stream.getvalue().splitlines()
    assert lines[:4] == ["<7>xentmem.test: d", "<6>xentmem.test: i", "<4>xentmem.test: w",
                         "<3>xentmem.test: e"]
    assert all(line.startswith("<3>") for line in lines[3:])  # the traceback too
    setup_logging("info", stream=io.StringIO(), env={})
    plain = io.StringIO()
    setup_logging("info", stream=plain, env={})
    log.info("x")
    assert " INFO xentmem.test: x" in plain.getvalue()


def test_schedule_runs_tasks_when_due() -> None:
    clock = FakeClock(100.0)
    schedule = Schedule(clock)
    ran: list[str] = []
    schedule.every("fast", 2.0, lambda: ran.append("fast"))
    schedule.every("slow", 5.0, lambda: ran.append("slow"))
    schedule.every("never", None, lambda: ran.append("never"))
    assert schedule.names() == ["fast", "slow"]
    assert schedule.timeout(60) == 2.0
    clock.advance(2.0)
    assert schedule.run_due() == ["fast"]
    clock.advance(3.0)
    assert sorted(schedule.run_due()) == ["fast", "slow"]
    schedule.every("fast", None, lambda: None)
    assert schedule.names() == ["slow"]

    def boom() -> None:
        raise OSError("disk full")

    schedule.every("failing", 1.0, boom)
    clock.advance(1.0)
    assert schedule.run_due() == ["failing"]  # logged, still scheduled
    assert "failing" in schedule.names()


class RecordingNotifier(Notifier):
    def __init__(self, watchdog_usec: int | None) -> None:
        super().__init__(None, watchdog_usec)
        self.sent: list[tuple[str, ...]] = []

    def send(self, *lines: str) -> bool:
        self.sent.append(lines)
        return True


def test_main_loop_pings_the_watchdog_writes_metrics_and_reloads(tmp_path: Path,
                                                                  fake_root: Path) -> None:
    textfile = tmp_path / "xentmem.prom"
    config = tmp_path / "xentmem.conf"
    config.write_text(f"options xentmemd metrics_textfile={textfile} metrics_interval=30\n"
                      "options tmem selfballooning_at_load=0 selfshrinking=0\n")
    clock = FakeClock(0.0)
    notifier = RecordingNotifier(watchdog_usec=20_000_000)
    signals = SignalFlags()
    app = Application(roots=Roots(root=fake_root, run_dir=tmp_path / "run"),
                      config_path=config, config_missing_ok=False, clock=clock,
                      notifier=notifier, signals=signals)
    app.start()
    try:
        assert notifier.sent[0][0] == "READY=1"
        assert app.schedule.names() == ["metrics", "status", "watchdog"]
        pings = 0

        def count_and_stop() -> None:
            nonlocal pings
            pings += 1
            if pings == 3:  # a SIGHUP arrives, then a SIGTERM
                signals.request_reload()
            if pings == 7:
                signals.request_terminate()
        app.schedule.every("watchdog", 10.0, count_and_stop)
        app.run()
        assert pings == 7
        assert clock.now == pytest.approx(70.0)
        # The textfile and the STATUS line are written off the main thread: wait for them.
        assert app.metrics_task.join(10.0) and app.status_task.join(10.0)
        assert "xentmem_backend_loaded" in textfile.read_text()
        assert ("RELOADING=1", "STATUS=reloading the configuration") in notifier.sent
        assert any(lines[0].startswith("STATUS=backend zcache") for lines in notifier.sent)
    finally:
        assert app.shutdown() == 0
    assert notifier.sent[-1][0] == "STOPPING=1"
    assert not (tmp_path / "run" / "control.sock").exists()


def test_flags_become_overrides() -> None:
    args = parse_args(["--backend", "zcache", "--log-level", "debug",
                       "--control-group", "adm", "-o", "capacity=8M", "-o", "daemon.backend=xen"])
    assert overrides_of(args) == ["daemon.backend=zcache", "daemon.log_level=debug",
                                  "daemon.control_group=adm", "capacity=8M",
                                  "daemon.backend=xen"]


@pytest.mark.parametrize(("knob_line", "overrides"), [
    ('selfballoon_min_usable_mb = "auto"\n', []),  # docs/configuration.md's example
    ("", ["selfballoon_reserved_mb=auto"]),
])
def test_an_auto_knob_from_the_file_or_from_o_starts_the_daemon(
        tmp_path: Path, fake_root: Path, knob_line: str, overrides: list[str]) -> None:
    """``auto`` is read as None, the automatic value, which the knob store takes again (it
    once refused to start with "None is not an integer", after --check-config said ok)."""
    config = tmp_path / "xentmem.toml"
    config.write_text("[tmem]\nselfballooning_at_load = false\nselfshrinking = false\n"
                      "[selfballoon]\n" + knob_line)
    signals = SignalFlags()
    app = Application(roots=Roots(root=fake_root, run_dir=tmp_path / "run"),
                      config_path=config, config_missing_ok=False, clock=FakeClock(0.0),
                      notifier=RecordingNotifier(watchdog_usec=None), signals=signals,
                      overrides=overrides)
    try:
        app.start()
        assert app.daemon is not None
        knobs = app.daemon.balloon.knobs
        assert knobs.get("selfballoon_min_usable_mb") is None
        assert knobs.get("selfballoon_reserved_mb") is None
    finally:
        assert app.shutdown() == 0
        signals.close()
