"""Debian's real xenstored (C or OCaml) as a test peer, without Xen.

The daemons cannot start without a hypervisor, so :meth:`RealPeer.start` builds the
LD_PRELOAD shim in ``xenstored_peer/fakexen.c`` (it stubs the few libxenctrl, evtchn and
gnttab calls and fakes dom0's ring) and starts the unmodified daemon on a socket in a
temporary directory.  A ``RingProxy`` (``xenstored_peer/xs_ring_proxy.py``) turns an emulated
guest's ring into a Unix socket, so a client connected there *is* that guest domain, with the
daemon's real permission checks.

:func:`unavailable_reason` says why a peer cannot run here (the tests skip with it);
:meth:`RealPeer.stop` kills it and removes its files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent / "xenstored_peer"
SHIM_SOURCE = HERE / "fakexen.c"
RING_PROXY = HERE / "xs_ring_proxy.py"
XEN_BIN = Path("/usr/lib/xen-4.17/bin")
BINARIES = {"c-xenstored": XEN_BIN / "xenstored", "oxenstored": XEN_BIN / "oxenstored"}
#: What the shim's event channel takes to mean VIRQ_DOM_EXC ("a domain died, look").
VIRQ_DOM_EXC_RECORD = 0xFFFFFFFF
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
STOP_POLL_S = 0.01


def unavailable_reason(kind: str) -> str | None:
    """Why the ``kind`` peer (``c-xenstored`` or ``oxenstored``) cannot run here, or None."""
    if kind not in BINARIES:
        return f"unknown xenstored kind {kind!r}"
    if not SHIM_SOURCE.is_file():
        return f"{SHIM_SOURCE} is missing (the shim the daemon runs under)"
    if not BINARIES[kind].exists():
        return f"{BINARIES[kind]} is missing (apt-get install xen-utils-4.17)"
    if shutil.which("gcc") is None:
        return "gcc is missing (the peer compiles a shim: apt-get install gcc libc6-dev)"
    if kind == "oxenstored" and os.geteuid() != 0:
        return "oxenstored needs root (its socket path is compiled in: a private mount namespace)"
    return None


def _load_ring_proxy() -> ModuleType:
    """Import ``xs_ring_proxy.py`` under a private name (no sys.path changes)."""
    path = RING_PROXY
    spec = importlib.util.spec_from_file_location("xs_ring_proxy", path)
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
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, kind: str) -> RealPeer:
        """Build the shim, start the daemon, wait (bounded) until its socket answers."""
        reason = unavailable_reason(kind)
        if reason is not None:
            raise RuntimeError(reason)
        fakedir = Path(tempfile.mkdtemp(prefix="xenstored-peer.", dir="/tmp"))
        fakedir.chmod(0o755)
        try:
            shim = fakedir / "fakexen.so"
            subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(shim),
                            str(SHIM_SOURCE), "-ldl"], check=True, capture_output=True,
                           timeout=START_TIMEOUT_S)
            env = {**os.environ, "XSFAKE_DIR": str(fakedir), "LD_PRELOAD": str(shim)}
            log = (fakedir / "xenstored.log").open("wb")
            if kind == "c-xenstored":
                socket_path = fakedir / "socket"
                env.update(XENSTORED_RUNDIR=str(fakedir), XENSTORED_PATH=str(socket_path))
                argv = [str(BINARIES[kind]), "-N", "-F", str(fakedir / "xenstored.pid")]
            else:
                socket_path = fakedir / "run" / "socket"
                argv = _oxenstored_argv(fakedir)
            process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=log, start_new_session=True)
            log.close()
            deadline = time.monotonic() + START_TIMEOUT_S
            while not socket_path.is_socket():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} did not start: "
                                       f"{(fakedir / 'xenstored.log').read_text()[-2000:]}")
                time.sleep(0.05)
        except BaseException:
            shutil.rmtree(fakedir, ignore_errors=True)
            raise
        peer = cls(kind, socket=socket_path, pid=process.pid, fakedir=fakedir)
        peer._process = process
        peer._ring_proxy = _load_ring_proxy()
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
        reaps it, so a zombie counts as stopped."""
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
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(STOP_TIMEOUT_S)
        shutil.rmtree(self.fakedir, ignore_errors=True)


def _oxenstored_argv(fakedir: Path) -> list[str]:
    """oxenstored's socket path is compiled in: it runs in a private mount namespace with
    ``<dir>/run`` over ``/var/run/xenstored`` (root only), with Debian's config plus ours."""
    run = fakedir / "run"
    run.mkdir()
    Path("/var/run/xenstored").mkdir(parents=True, exist_ok=True)
    base = Path("/etc/xen/oxenstored.conf")
    conf = (base.read_text() if base.exists() else "") + "".join(
        f"{key} = {value}\n" for key, value in (
            ("pid-file", fakedir / "xenstored.pid"),
            ("xenstored-log-file", fakedir / "oxenstored.log"),
            ("xenstored-log-level", "info"),
            ("access-log-file", fakedir / "access.log"),
            ("persistent", "false"),
            ("xenstored-kva", "/proc/xen/xsd_kva"),
            ("xenstored-port", "/proc/xen/xsd_port")))
    (fakedir / "oxenstored.conf").write_text(conf)
    # oxenstored raises RLIMIT_NOFILE to /proc/sys/fs/nr_open and dies with EPERM without
    # CAP_SYS_RESOURCE (some containers): then it is fed the current hard limit instead.
    fix = ""
    with open("/proc/self/status") as status:
        capeff = next(line.split()[1] for line in status if line.startswith("CapEff"))
    if not int(capeff, 16) >> 24 & 1:
        import resource

        (fakedir / "nr_open").write_text(f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]}\n")
        fix = f"mount --bind {fakedir}/nr_open /proc/sys/fs/nr_open && "
    return ["unshare", "-m", "sh", "-c",
            f"{fix}mount --bind {run} /var/run/xenstored && exec {BINARIES['oxenstored']} "
            f"--no-fork --config-file {fakedir}/oxenstored.conf"]
