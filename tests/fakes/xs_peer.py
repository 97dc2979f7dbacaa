"""Debian's real xenstored (C or OCaml) as a test peer, through ``../shared/xenstored-peer``.

``../shared/xenstored-peer/xenstored-peer.sh --no-install [--oxenstored]`` builds an
LD_PRELOAD shim, starts the unmodified daemon on a temporary socket and prints
``XENSTORED_PATH``, ``XENSTORED_PID`` and ``XSFAKE_DIR``; it also writes
``xs_ring_proxy.py`` into ``XSFAKE_DIR``.  A ``RingProxy`` from that file turns an emulated
guest's ring into a Unix socket, so a pyxs client connected there *is* that guest domain,
with the daemon's real permission checks (``../shared/reference/xenstored.md`` §3).

:func:`unavailable_reason` says why a peer cannot run here (the tests skip with it);
:meth:`RealPeer.start` starts one and :meth:`RealPeer.stop` kills it and removes its files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

#: ``../shared`` next to the checkout (``/work/shared`` for ``/work/main``).
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PEER_SCRIPT = SHARED / "xenstored-peer" / "xenstored-peer.sh"
XEN_BIN = Path("/usr/lib/xen-4.17/bin")
BINARIES = {"c-xenstored": XEN_BIN / "xenstored", "oxenstored": XEN_BIN / "oxenstored"}
#: The script's own smoke test needs Debian's xenstore-utils.
XENSTORE_UTILS = Path("/usr/bin/xenstore-read")
#: What the shim's event channel takes to mean VIRQ_DOM_EXC ("a domain died, look").
VIRQ_DOM_EXC_RECORD = 0xFFFFFFFF
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
STOP_POLL_S = 0.01


def unavailable_reason(kind: str) -> str | None:
    """Why the ``kind`` peer (``c-xenstored`` or ``oxenstored``) cannot run here, or None."""
    if kind not in BINARIES:
        return f"unknown xenstored kind {kind!r}"
    if not PEER_SCRIPT.is_file():
        return f"{PEER_SCRIPT} is missing (../shared is not next to the checkout)"
    if not BINARIES[kind].exists():
        return f"{BINARIES[kind]} is missing (apt-get install xen-utils-4.17 xenstore-utils)"
    if not XENSTORE_UTILS.exists():
        return f"{XENSTORE_UTILS} is missing (apt-get install xenstore-utils)"
    if shutil.which("gcc") is None:
        return "gcc is missing (the peer compiles a shim: apt-get install gcc libc6-dev)"
    if kind == "oxenstored" and os.geteuid() != 0:
        return "oxenstored needs root (its socket path is compiled in: a private mount namespace)"
    return None


def _daemon_pid(fakedir: Path, printed_pid: int) -> int:
    """The daemon's own pid, from the pid file it writes.  The script's ``XENSTORED_PID``
    is ``setsid``'s, which may fork and exit, leaving the daemon with another pid."""
    try:
        return int((fakedir / "xenstored.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return printed_pid


def _load_ring_proxy(fakedir: Path) -> ModuleType:
    """Import the peer's ``xs_ring_proxy.py`` under a private name (no sys.path changes)."""
    path = fakedir / "xs_ring_proxy.py"
    spec = importlib.util.spec_from_file_location(f"xs_ring_proxy_{fakedir.name}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class RealPeer:
    """One running daemon."""

    kind: str
    socket: Path
    pid: int
    fakedir: Path
    _ring_proxy: ModuleType | None = field(default=None, repr=False)

    @classmethod
    def start(cls, kind: str) -> RealPeer:
        reason = unavailable_reason(kind)
        if reason is not None:
            raise RuntimeError(reason)
        argv = ["bash", str(PEER_SCRIPT), "--no-install"]
        if kind == "oxenstored":
            argv.append("--oxenstored")
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{PEER_SCRIPT.name} failed ({result.returncode}):\n{result.stderr}")
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        fakedir = Path(values["XSFAKE_DIR"])
        peer = cls(
            kind,
            socket=Path(values["XENSTORED_PATH"]),
            pid=_daemon_pid(fakedir, int(values["XENSTORED_PID"])),
            fakedir=fakedir,
        )
        peer._ring_proxy = _load_ring_proxy(peer.fakedir)
        return peer

    def alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def ring_proxy(self, domid: int, socket_path: Path) -> Any:
        """A started ``RingProxy`` for ``domid``.  Create it *before* dom0 introduces the
        domain: the proxy zeroes the ring file the daemon then maps."""
        assert self._ring_proxy is not None
        self.revive(domid)
        proxy = self._ring_proxy.RingProxy(str(self.fakedir), domid, str(socket_path))
        return proxy.start()

    def kill_domain(self, domid: int) -> None:
        """The domain dies: the shim reports it gone and fires VIRQ_DOM_EXC."""
        (self.fakedir / f"dead-{domid}").touch()
        fd = os.open(self.fakedir / "evtchn", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, VIRQ_DOM_EXC_RECORD.to_bytes(4, sys.byteorder))
        finally:
            os.close(fd)

    def revive(self, domid: int) -> None:
        """Let a dead domid live again (so a later test may introduce it anew)."""
        with contextlib.suppress(FileNotFoundError):
            (self.fakedir / f"dead-{domid}").unlink()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers.  A dead daemon stays a zombie until init
        reaps it, which can take a second here, so a zombie counts as stopped."""
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(self.pid)
            process.send_signal(signal.SIGTERM)
            pause = threading.Event()
            for _ in range(int(STOP_TIMEOUT_S / STOP_POLL_S)):
                if not self.alive():
                    break
                pause.wait(STOP_POLL_S)
            else:
                process.kill()
        shutil.rmtree(self.fakedir, ignore_errors=True)
