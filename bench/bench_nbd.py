"""Benchmark: xentmem's NBD export against ``nbdkit memory``, the same fio job on both.

fio's ``nbd`` engine (libnbd) does 4 KiB random writes over the whole export, then 4 KiB
random reads of it, at iodepth 1 and 32, against

* **xentmem**: a swap area exported by ``xentmem/guestd/nbd`` in this process, every page
  through frontswap to the ``zcache`` backend (file backing for what zcache refuses), whose
  pages live in a page arena (checksummed, as the daemon's) in the benchmark's own temporary
  run directory, never the system's ``/run/xentmem``;
* **nbdkit**: ``nbdkit memory`` (Debian's nbdkit: a C server keeping the export in memory),
  started by this benchmark on a Unix socket of its own;
* **zram** (for reference, when one can be hot-added: root and ``/sys/class/zram-control``):
  the kernel's compressed RAM block device with lz4, through fio's ``libaio`` engine with
  ``direct=1``.  Its CPU is spent in the kernel on fio's behalf, so it has no CPU column.

Each (target, iodepth) gets a fresh export; the phases of the targets are interleaved so a
change in the machine's load hits both.  fio's buffers are 50 % compressible (a swap page
is rarely random).  Each round gives, per phase, IOPS, the server's CPU time per op (this
process's for xentmem, nbdkit's process for nbdkit) and xentmem's IOPS as a ratio of
nbdkit's in that round; reported are the medians over the rounds (the ratio's median is of
the rounds' ratios: both sides of a ratio ran under the same load), each round's iodepth-32
ratios and the load average.  The last line: ``SUMMARY: iodepth 32: write x.xx of nbdkit,
read x.xx of nbdkit (goal >= 0.50) ...``.  Exit 1 if a fio run failed; a missed goal is
reported, not an error (the machine is shared).

Run (as root for the zram column): ``python bench/bench_nbd.py [--size-mib 64] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from xentmem.guest.shim import Shim
from xentmem.guestd.nbd.exports import Exports
from xentmem.guestd.nbd.resident import NotResident, Residency, SwapUnsafe
from xentmem.guestd.nbd.server import NbdServer
from xentmem.guestd.swap import SwapAreas
from xentmem.roots import Roots

PAGE = 4096
GOAL = 0.5
ZRAM_CONTROL = Path("/sys/class/zram-control")
START_TIMEOUT_S = 60.0
FIO_TIMEOUT_S = 1800.0


@dataclass
class Phase:
    iops: float
    ops: int
    cpu_s: float | None

    @property
    def cpu_us_per_op(self) -> float | None:
        return None if self.cpu_s is None else 1e6 * self.cpu_s / max(self.ops, 1)


class FioFailed(RuntimeError):
    pass


def fio(target: list[str], rw: str, iodepth: int, size: int) -> tuple[float, int]:
    """One fio job; (IOPS, ops)."""
    args = ["fio", "--name=bench", *target, f"--rw={rw}", "--bs=4k", f"--iodepth={iodepth}",
            f"--size={size}", "--buffer_compress_percentage=50",
            "--buffer_compress_chunk=4096", "--randrepeat=1", "--output-format=terse",
            "--terse-version=3"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=FIO_TIMEOUT_S)
    lines = [line for line in result.stdout.splitlines() if line.count(";") > 50]
    if result.returncode != 0 or not lines:
        raise FioFailed(f"fio {' '.join(target)} {rw}: exit {result.returncode}: "
                        f"{result.stderr.strip()[-400:]}")
    fields = lines[-1].split(";")
    if fields[4] != "0":
        raise FioFailed(f"fio {rw}: error {fields[4]}")
    iops = float(fields[7] if rw.endswith("read") else fields[48])
    return iops, size // PAGE


class Ours:
    name = "xentmem"

    def __init__(self, directory: Path, size: int, residency: Residency | None = None) -> None:
        """``residency``: None to lock this process in memory as ``xentmemd`` serving swap
        does (not locked if refused)."""
        # zcache keeps its arena in the run directory: this benchmark's own, never the
        # system's (a daemon's, or another benchmark's).
        self.shim = Shim(roots=Roots(run_dir=directory / "run"))
        self.shim.load("zcache")
        self.swap = SwapAreas(self.shim.frontswap, directory / "swap")
        if residency is None:
            residency = Residency()
            try:
                residency.lock_memory()
            except SwapUnsafe:
                residency = NotResident()
        self.residency = residency
        self.exports = Exports(self.shim.frontswap, self.swap, self.residency)
        self.server = NbdServer(self.exports, residency=self.residency)
        self.exports.server = self.server
        self.socket = self.server.listen_unix(directory / "xentmem.sock")
        self.server.start()
        self.pages = size // PAGE
        self.exports.add(self.pages, "file", name="bench")

    def fresh(self) -> None:
        self.exports.remove("bench")
        self.exports.add(self.pages, "file", name="bench")

    def target(self) -> list[str]:
        return ["--ioengine=nbd", f"--uri=nbd+unix:///bench?socket={self.socket}"]

    def cpu_s(self) -> float | None:
        return time.process_time()  # the server's threads; the main one waits on fio

    def close(self) -> None:
        self.server.stop()
        self.swap.close()


class Nbdkit:
    name = "nbdkit"

    def __init__(self, directory: Path, size: int) -> None:
        self.socket = directory / "nbdkit.sock"
        self.size = size
        self.proc: subprocess.Popen[bytes] | None = None
        self.fresh()

    def fresh(self) -> None:
        self.close()
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U",
                                      str(self.socket), "memory", str(self.size)])
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.socket.exists():  # nbdkit creates its socket when it is ready
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise FioFailed("nbdkit did not start")
            time.sleep(0.05)
        self.ps = psutil.Process(self.proc.pid)

    def target(self) -> list[str]:
        return ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={self.socket}"]

    def cpu_s(self) -> float | None:
        times = self.ps.cpu_times()
        return times.user + times.system

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(START_TIMEOUT_S)
            self.proc = None


class Zram:
    name = "zram"

    def __init__(self, size: int) -> None:
        self.size = size
        self.device: int | None = None
        self.fresh()

    @staticmethod
    def why_not() -> str | None:
        if not (ZRAM_CONTROL / "hot_add").exists():
            return "no /sys/class/zram-control (no zram module)"
        if psutil.Process().uids().effective != 0:
            return "hot-adding a zram device needs root"
        return None

    def fresh(self) -> None:
        self.close()
        self.device = int((ZRAM_CONTROL / "hot_add").read_text())
        block = Path(f"/sys/block/zram{self.device}")
        with contextlib.suppress(OSError):  # keep the kernel's default if lz4 is not built
            (block / "comp_algorithm").write_text("lz4")
        (block / "disksize").write_text(str(self.size))
        if not Path(f"/dev/zram{self.device}").exists():
            raise OSError(f"/dev/zram{self.device} did not appear (no devtmpfs here)")

    def target(self) -> list[str]:
        return ["--ioengine=libaio", "--direct=1", f"--filename=/dev/zram{self.device}"]

    def cpu_s(self) -> float | None:
        return None

    def close(self) -> None:
        if self.device is not None:
            with contextlib.suppress(OSError):
                (ZRAM_CONTROL / "hot_remove").write_text(str(self.device))
            self.device = None


def measured(target, rw: str, iodepth: int, size: int) -> Phase:
    before = target.cpu_s()
    iops, ops = fio(target.target(), rw, iodepth, size)
    after = target.cpu_s()
    return Phase(iops, ops, None if before is None else after - before)


@contextlib.contextmanager
def targets(directory: Path, size: int, zram: bool) -> Iterator[tuple[list, str | None]]:
    made: list = []
    why = Zram.why_not() if zram else "not asked (--no-zram)"
    try:
        made.append(Ours(directory, size))
        made.append(Nbdkit(directory, size))
        if why is None:
            try:
                made.append(Zram(size))
            except OSError as exc:
                why = f"hot-add failed: {exc}"
        yield made, why
    finally:
        for target in made:
            target.close()


def median_phase(phases: list[Phase]) -> Phase:
    """The median IOPS and the median CPU time of a phase's rounds."""
    cpus = [p.cpu_s for p in phases if p.cpu_s is not None]
    return Phase(statistics.median(p.iops for p in phases), phases[0].ops,
                 statistics.median(cpus) if cpus else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64,
                        help="export size; each phase writes or reads all of it once")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds; the median of each figure is reported")
    parser.add_argument("--no-zram", action="store_true", help="skip the zram column")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"bench_nbd: {tool} is missing (apt-get install fio nbdkit)", file=sys.stderr)
            return 1
    size = args.size_mib * 1024 * 1024
    rounds: dict[tuple[str, int, str], list[Phase]] = {}
    round_ratios: list[tuple[float, float, float]] = []  # iodepth 32: write, read, load
    with tempfile.TemporaryDirectory(prefix="xtbench-") as tmp, \
            targets(Path(tmp), size, not args.no_zram) as (made, why_no_zram):
        locked = made[0].residency.locked and not isinstance(made[0].residency, NotResident)
        try:
            for _ in range(args.repeat):
                load = os.getloadavg()[0]
                for iodepth in (1, 32):
                    for target in made:
                        target.fresh()
                    for rw in ("randwrite", "randread"):
                        for target in made:
                            phase = measured(target, rw, iodepth, size)
                            rounds.setdefault((target.name, iodepth, rw), []).append(phase)
                w, r = (rounds[("xentmem", 32, rw)][-1].iops / rounds[("nbdkit", 32, rw)][-1].iops
                        for rw in ("randwrite", "randread"))
                round_ratios.append((w, r, load))
        except FioFailed as exc:
            print(f"bench_nbd: {exc}", file=sys.stderr)
            return 1
    names = [t.name for t in made]
    loads = [load for _, _, load in round_ratios]
    print(f"4 KiB random I/O over {args.size_mib} MiB, fio nbd engine; median of "
          f"{args.repeat} round(s); xentmem's memory "
          f"{'locked (mlockall)' if locked else 'not locked (mlockall refused)'}; load average "
          f"{min(loads):.2f}-{max(loads):.2f} at the rounds' starts, {os.getloadavg()[0]:.2f} "
          f"after ({os.cpu_count()} CPUs)")
    print(f"{'iodepth':>7} {'phase':>9} " + " ".join(f"{n + ' IOPS':>13}" for n in names)
          + f" {'ratio':>6} {'xentmem us/op':>14} {'nbdkit us/op':>13}")
    ratios: dict[tuple[int, str], float] = {}
    for iodepth in (1, 32):
        for rw in ("randwrite", "randread"):
            runs = [rounds[(n, iodepth, rw)] for n in names]
            row = [median_phase(phases) for phases in runs]
            ratio = statistics.median(ours.iops / theirs.iops
                                      for ours, theirs in zip(runs[0], runs[1]))
            ratios[(iodepth, rw)] = ratio
            cpu = [f"{p.cpu_us_per_op:.1f}" if p.cpu_us_per_op is not None else "n/a"
                   for p in row[:2]]
            print(f"{iodepth:>7} {rw:>9} " + " ".join(f"{p.iops:>13.0f}" for p in row)
                  + f" {ratio:>6.2f} {cpu[0]:>14} {cpu[1]:>13}")
    print("rounds at iodepth 32 (write, read ratio; load average at the start): " + ", ".join(
        f"{w:.2f}/{r:.2f} @{load:.1f}" for w, r, load in round_ratios))
    if why_no_zram:
        print(f"zram: no column ({why_no_zram})")
    w32, r32 = ratios[(32, "randwrite")], ratios[(32, "randread")]
    verdict = "met" if min(w32, r32) >= GOAL else "MISSED"
    print(f"SUMMARY: iodepth 32: write {w32:.2f} of nbdkit, read {r32:.2f} of nbdkit "
          f"(goal >= {GOAL:.2f}: {verdict}); iodepth 1: write "
          f"{ratios[(1, 'randwrite')]:.2f}, read {ratios[(1, 'randread')]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
