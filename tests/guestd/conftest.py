"""Fixtures of the daemon tests: a fake guest root, a running ``xentmemd`` subprocess, and an
in-process daemon core.  Every wait here has a timeout; nothing sleeps to wait for a loop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.clock import FakeClock
from xentmem.errors import UnknownBackend
from xentmem.guest.backends.zcache import ZcacheBackend
from xentmem.guestd.balloon import make_balloon
from xentmem.guestd.config import ConfigSchema, load
from xentmem.guestd.core import Daemon
from xentmem.roots import Roots
from xentmem_selfballoon.knobs import SELFBALLOON_PARAMS

MEMINFO = """\
MemTotal:        2048000 kB
MemFree:         1024000 kB
MemAvailable:    1500000 kB
Committed_AS:     512000 kB
"""

ZONEINFO = """\
Node 0, zone      DMA
  pages free     3977
        min      33
        low      41
        high     49
        spanned  4095
        present  3998
        managed  3977
        protection: (0, 1928, 1928, 1928)
  start_pfn:           1
Node 0, zone    DMA32
  pages free     400000
        min      4000
        low      5000
        high     6000
        spanned  520192
        present  520192
        managed  500000
        protection: (0, 0, 0, 0)
  start_pfn:           4096
"""

#: Backends the in-process tests can load, by name (the daemon's registry seam).
TEST_BACKENDS = {"zcache": ZcacheBackend, "recording": RecordingBackend}
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0


def resolver(extra: dict[str, type] | None = None) -> Any:
    """The daemon's name -> backend class seam over :data:`TEST_BACKENDS` plus ``extra``."""
    table = {**TEST_BACKENDS, **(extra or {})}

    def resolve(name: str) -> type:
        try:
            return table[name]
        except KeyError:
            raise UnknownBackend(f"unknown backend {name!r}; available backends: "
                             + ", ".join(table)) from None

    return resolve


def make_root(base: Path, cmdline: str = "ro quiet") -> Path:
    """``base/root`` with /proc/meminfo, zoneinfo and cmdline: a 2 GiB domU, no Xen, no balloon."""
    root = base / "root"
    proc = root / "proc"
    proc.mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "zoneinfo").write_text(ZONEINFO)
    (proc / "cmdline").write_text(cmdline + "\n")
    return root


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


def build_daemon(tmp_path: Path, root: Path, config_text: str | None = None, *,
                 suffix: str = ".toml", overrides: tuple[str, ...] = (),
                 balloon_loops: bool = True, backends: dict[str, type] | None = None) -> Daemon:
    """An in-process daemon core (no socket, no signals) over ``root``.

    ``balloon_loops=False`` turns the tmem flags ``selfballooning`` and ``selfshrinking`` off,
    so a load starts no worker (on the FakeClock a worker would tick without pause)."""
    roots = Roots(root=root, run_dir=tmp_path / "run")
    path = tmp_path / f"xentmem{suffix}"
    if config_text is not None:
        path.write_text(config_text)
    clock = FakeClock(1000.0)
    if not balloon_loops:
        overrides = ("selfballooning=0", "selfshrinking=0", *overrides)
    resolve = resolver(backends)
    schema = ConfigSchema(SELFBALLOON_PARAMS, lambda name: resolve(name).params)
    config = load(path, schema, overrides, missing_ok=config_text is None)
    balloon = make_balloon(roots, clock, config.knobs)
    return Daemon(roots=roots, clock=clock, config=config, balloon=balloon, config_path=path,
                  overrides=overrides, config_missing_ok=config_text is None, resolve=resolve)


class NotifyListener:
    """A NOTIFY_SOCKET for a daemon under test: its datagrams, waited for with a timeout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, word: str, timeout_s: float = START_TIMEOUT_S,
                 proc: subprocess.Popen | None = None) -> str:
        """The first datagram (from now on) with the line ``word``; fails on timeout or exit."""
        self.sock.settimeout(0.5)
        waited = 0.0
        while waited < timeout_s:
            try:
                message = self.sock.recv(65536).decode()
            except socket.timeout:
                waited += 0.5
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(
                        f"xentmemd exited ({proc.returncode}) before {word}") from None
                continue
            self.messages.append(message)
            if word in message.splitlines():
                return message
        raise AssertionError(f"no {word} from xentmemd within {timeout_s}s: {self.messages}")

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    """``xentmemd`` as a subprocess on a temp run dir and a fake root."""

    def __init__(self, tmp_path: Path, root: Path, config: Path | None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.run_dir = tmp_path / "run"
        self.state_dir = tmp_path / "state"
        self.socket = self.run_dir / "control.sock"
        self.log_path = tmp_path / "xentmemd.log"
        self.notify = NotifyListener(tmp_path / "notify.sock")
        args = [sys.executable, "-m", "xentmem.guestd.app", "--root", str(root),
                "--run-dir", str(self.run_dir), "--state-dir", str(self.state_dir)]
        if config is not None:
            args += ["--config", str(config)]
        args += list(extra_args)
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("JOURNAL_STREAM", "INVOCATION_ID", "WATCHDOG_USEC",
                                 "WATCHDOG_PID", "XENTMEM_ROOT", "XENSTORED_PATH",
                                 "STATE_DIRECTORY")}
        full_env["NOTIFY_SOCKET"] = str(self.notify.path)
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env)

    def wait_ready(self) -> str:
        return self.notify.wait_for("READY=1", proc=self.proc)

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int | None = signal.SIGTERM) -> int:
        """Send ``signum`` (None: just wait for the exit) and return the exit status."""
        if signum is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(STOP_TIMEOUT_S)
            raise AssertionError(f"xentmemd did not exit within {STOP_TIMEOUT_S}s") from None
        finally:
            self._log.close()
            self.notify.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """``start_daemon(root, config=None, *args)``: a started (READY) daemon, stopped at teardown.

    ``base`` (default: the test's tmp_path) holds its run dir, log and notify socket; a
    second daemon needs its own."""
    started: list[DaemonProcess] = []

    def start(root: Path, config: Path | None = None, *args: str, wait: bool = True,
              env: dict[str, str] | None = None, base: Path | None = None) -> DaemonProcess:
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        process = DaemonProcess(base or tmp_path, root, config, args, env)
        started.append(process)
        if wait:
            process.wait_ready()
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.stop()


@pytest.fixture
def make_daemon(tmp_path: Path, fake_root: Path) -> Iterator[Any]:
    """``make_daemon(config_text=None, suffix=".toml", overrides=(), balloon_loops=True,
    backends=None)``:
    an in-process daemon core over the fake root; shut down at teardown."""
    made: list[Daemon] = []

    def make(config_text: str | None = None, **kw: Any) -> Daemon:
        daemon = build_daemon(tmp_path, fake_root, config_text, **kw)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        if daemon.state != "stopped":
            daemon.shutdown()
