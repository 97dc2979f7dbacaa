"""The kernel's side of ``xentmem swap``: NBD devices, ``nbd-client``, ``mkswap``, ``swapon``.

Paths go through :class:`~xentmem.roots.Roots` (``/sys``, ``/proc``, ``/dev`` under a root)
and every command through one runner, so the tests drive it on a fake root with recorded
commands; on a real guest it runs the real tools as root.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xentmem.errors import XentmemError
from xentmem.roots import Roots
from xentmem_cli.swap_reconnect import Connected, ReconnectFailed, handshake, kernel_reconfigure

#: nbd-client's block size: one page, the export's minimum block size (docs/nbd.md).
BLOCK_SIZE = 4096
TOOL_TIMEOUT_S = 300.0
_NBD = re.compile(r"nbd(\d+)")

Runner = Callable[[Sequence[str]], str]
"""Run a command; its stdout, or SwapStepFailed naming the command and its stderr."""
Reconfigure = Callable[..., None]
"""``NBD_CMD_RECONFIGURE(index, dead_conn_timeout_s=None, fds=())``: swap_reconnect's."""
Connect = Callable[[str, str, float], Connected]
"""The handshake with an export: (Unix socket path, export name, timeout) -> a socket."""


class SwapStepFailed(XentmemError):
    """One step of attaching or detaching failed (the tool's own words)."""


def run_tool(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        raise SwapStepFailed(f"{argv[0]}: not found (apt-get install nbd-client util-linux)")
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SwapStepFailed(f"{' '.join(argv)}: no answer in {TOOL_TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        words = (done.stderr or done.stdout).strip().splitlines()
        raise SwapStepFailed(f"{' '.join(argv)}: exit {done.returncode}"
                             + (f": {words[-1]}" if words else ""))
    return done.stdout


@dataclass
class SwapEntry:
    """One line of ``/proc/swaps``."""

    device: str
    kind: str
    size_kib: int
    used_kib: int
    priority: int


@dataclass
class Kernel:
    roots: Roots = field(default_factory=Roots)
    run: Runner = run_tool
    reconfigure: Reconfigure = kernel_reconfigure
    connect: Connect = handshake

    def devices(self) -> list[str]:
        """Every ``/dev/nbdN`` the driver made, by number."""
        try:
            names = [p.name for p in self.roots.under("/sys/block").iterdir()]
        except OSError:
            return []
        numbers = sorted(int(m[1]) for n in names if (m := _NBD.fullmatch(n)))
        return [f"/dev/nbd{n}" for n in numbers]

    def load_module(self) -> None:
        """``modprobe nbd`` unless its devices are there already."""
        if not self.devices():
            self.run(["modprobe", "nbd"])
            if not self.devices():
                raise SwapStepFailed("modprobe nbd made no /sys/block/nbd* device")

    def connected(self, device: str) -> bool:
        """The driver has a connection on ``device`` (``/sys/block/nbdN/pid`` exists)."""
        return self.roots.under(f"/sys/block/{Path(device).name}/pid").exists()

    def holds(self, device: str) -> bool:
        """The kernel uses ``device``: a connection on it, or swap on it."""
        return self.connected(device) or device in self.swaps()

    def free_device(self, taken: Sequence[str] = ()) -> str:
        for device in self.devices():
            if device not in taken and not self.holds(device):
                return device
        raise SwapStepFailed("every /dev/nbd* device is in use (modprobe nbd nbds_max=N)")

    def swaps(self) -> dict[str, SwapEntry]:
        """``/proc/swaps``: the kernel's swap areas by device."""
        try:
            lines = self.roots.under("/proc/swaps").read_text().splitlines()[1:]
        except OSError:
            return {}
        entries = {}
        for line in lines:
            words = line.split()
            if len(words) >= 5:
                entries[words[0]] = SwapEntry(words[0], words[1], int(words[2]),
                                              int(words[3]), int(words[4]))
        return entries

    def attach(self, socket: str, name: str, device: str, connections: int) -> None:
        """``nbd-client`` in swap mode (it locks itself in memory) over the Unix socket."""
        self.run(["nbd-client", "-unix", socket, device, "-N", name, "-b", str(BLOCK_SIZE),
                  "-swap", "-C", str(connections)])

    def throttle_off(self, device: str) -> bool:
        """Turn the block layer's writeback throttling off on ``device``
        (``queue/wbt_lat_usec`` = 0); False where the kernel has none (no such file).

        Its latency target is for disks: an NBD device's writes, served from memory a few
        pages at a time, look slow to it, and reclaim then waits in ``wbt_wait`` to swap a
        page out while memory runs short (seen in the real-Xen bed: tasks blocked >120 s).
        """
        knob = self.roots.under(f"/sys/block/{Path(device).name}/queue/wbt_lat_usec")
        if not knob.exists():
            return False
        try:
            knob.write_text("0\n")
        except OSError as exc:
            raise SwapStepFailed(f"{device}: cannot turn writeback throttling off "
                                 f"({knob}): {exc.strerror}") from None
        return True

    def index(self, device: str) -> int:
        match = _NBD.fullmatch(Path(device).name)
        if match is None or not device.startswith("/dev/"):
            raise SwapStepFailed(f"{device} is not an NBD device (/dev/nbdN)")
        return int(match[1])

    def persist(self, device: str, seconds: int) -> None:
        """The kernel holds the device's I/O up to ``seconds`` for a new connection when
        its connection dies (``dead_conn_timeout``), instead of failing it at once."""
        try:
            self.reconfigure(self.index(device), dead_conn_timeout_s=seconds)
        except ReconnectFailed as exc:
            raise SwapStepFailed(f"{device}: dead_conn_timeout {seconds}s: {exc}") from None

    def reconnect(self, socket: str, name: str, device: str) -> None:
        """A new connection to export ``name`` replaces the device's dead one (the kernel
        keeps a connection that is alive: then this changes nothing)."""
        try:
            size = int(self.roots.under(f"/sys/block/{Path(device).name}/size")
                       .read_text().strip()) * 512
        except (OSError, ValueError) as exc:
            raise SwapStepFailed(f"{device}: no size in sysfs: {exc}") from None
        try:
            connected = self.connect(socket, name, TOOL_TIMEOUT_S)
        except ReconnectFailed as exc:
            raise SwapStepFailed(f"{device}: {exc}") from None
        with connected.sock:
            if connected.size != size:
                raise SwapStepFailed(f"{device}: export {name} has {connected.size} bytes, the "
                                     f"device {size}: not the same export")
            try:
                self.reconfigure(self.index(device), fds=[connected.sock.fileno()])
            except ReconnectFailed as exc:
                raise SwapStepFailed(f"{device}: {exc}") from None

    def detach(self, device: str) -> None:
        self.run(["nbd-client", "-d", device])

    def mkswap(self, device: str, label: str) -> None:
        self.run(["mkswap", "-L", label, device])

    def swapon(self, device: str, priority: int | None) -> None:
        """``--discard=pages``: freed swap slots reach the export as trims, so their pages
        leave tmem (docs/nbd.md)."""
        self.run(["swapon", "--discard=pages",
                  *(["-p", str(priority)] if priority is not None else []), device])

    def swapoff(self, device: str) -> None:
        """Every page comes back through the kernel first (that is what swapoff does)."""
        self.run(["swapoff", device])
