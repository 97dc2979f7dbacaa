"""A guest for tests: a fake guest root and ``xentmemd`` as a subprocess on it.

Shared by the daemon's tests and the CLI's, so both start the daemon the same way.  Every
wait has a timeout; nothing sleeps to wait for a loop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0

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


def make_root(base: Path, cmdline: str = "ro quiet") -> Path:
    """``base/root`` with /proc/meminfo, zoneinfo and cmdline: a 2 GiB domU, no Xen, no balloon."""
    root = base / "root"
    proc = root / "proc"
    proc.mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "zoneinfo").write_text(ZONEINFO)
    (proc / "cmdline").write_text(cmdline + "\n")
    return root


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
