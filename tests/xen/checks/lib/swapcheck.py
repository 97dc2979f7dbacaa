"""What the NBD swap checks share (``checks/domu/60-swap``, ``65-swap-killed``): xentmemd
started on the ramfs root, ``xentmem swap add|remove`` with a hang that explains itself,
the checksummed workload (``swapload.py``) driven over a pipe, and the kernel log's verdict.
See 60-swap's docstring for the choices made for this diskless guest.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xcheck import CheckReport, run, send_signal, time_left

from xentmem.control import ControlClient

BASE = Path("/var/lib/xentmem-swap-bed")  # on the ramfs root
#: The run directory on tmpfs, as the unit's RuntimeDirectory=: zcache's page arena lives
#: there and gives memory back by punching holes, which ramfs refuses (EOPNOTSUPP: the arena
#: could not start again after a kill, and never shrank).  The daemon's memory is locked, so
#: the arena's pages stay resident all the same.
RUN_DIR = Path("/run/xentmem-swap-bed")
STATE_DIR = BASE / "state"
CONFIG = BASE / "xentmem.toml"
SOCK = RUN_DIR / "control.sock"
BALLOON = Path("/sys/devices/system/xen_memory/xen_memory0")
WATERMARK = Path("/proc/sys/vm/watermark_scale_factor")
WATERMARK_SCALE = 1000
WATERMARK_DEFAULT = 10  # the kernel's
PRINTK = Path("/proc/sys/kernel/printk")
PAGE_CLUSTER = Path("/proc/sys/vm/page-cluster")
#: 65-swap-killed's swap readahead: 2^5 = 32 pages a fault (the kernel's default, 3, reads 8),
#: as in the two-domU run it passed in (2026-12-04 19:38).  60-swap keeps the kernel's
#: default: with 32 and a larger workload its xen phase's verify passes were far slower
#: (run of 19:51), and it passed with the default (19:05).
SWAP_READAHEAD_CLUSTER = 5
KEEP_EVERY = 4  # the workload keeps a quarter of its pages across swapoff
FLOOR_HEADROOM_MB = 64
MAX_XEN_TIMEOUT_MS = 600_000
PROGRESS_POLL_S = 5.0
PAGE = 4096
#: Kernel log lines that fail a phase: a hung task, an I/O error, an OOM kill, a bad swap entry.
BAD_KERNEL = re.compile(r"blocked for more than|hung_task|I/O error|Out of memory|oom-kill|"
                        r"Killed process|Bad swap|swap_info_get|Unable to handle", re.IGNORECASE)


@contextmanager
def vm_settings(page_cluster: int | None = None) -> Iterator[None]:
    """The kernel's settings for the swap checks, put back at the end: kswapd early
    (WATERMARK_SCALE), hung-task reports with their call traces on the console (printk level
    7: KERN_INFO), and swap readahead of ``page_cluster`` when given."""
    saved_watermark = WATERMARK.read_text().strip()
    saved_printk = PRINTK.read_text().split()[0]
    saved_cluster = PAGE_CLUSTER.read_text().strip()
    WATERMARK.write_text(f"{WATERMARK_SCALE}\n")
    PRINTK.write_text("7\n")
    if page_cluster is not None:
        PAGE_CLUSTER.write_text(f"{page_cluster}\n")
    try:
        yield
    finally:
        WATERMARK.write_text(saved_watermark + "\n")
        PRINTK.write_text(saved_printk + "\n")
        PAGE_CLUSTER.write_text(saved_cluster + "\n")


def say(text: str) -> None:
    """A progress line straight to the console (the script's stdout shows only at its end)."""
    line = f"swap-check: {text}"
    print(line, flush=True)
    try:
        with open("/dev/console", "w") as console:
            console.write(line + "\n")
    except OSError:
        pass


def meminfo() -> dict[str, int]:
    found = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        found[key] = int(rest.split()[0])
    return found


def vmstat(key: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def swaps() -> dict[str, int]:
    """/proc/swaps: used KiB by device."""
    lines = Path("/proc/swaps").read_text().splitlines()[1:]
    return {w[0]: int(w[3]) for w in (line.split() for line in lines) if len(w) >= 5}


def device_stat(device: str) -> str:
    try:
        words = Path(f"/sys/block/{Path(device).name}/stat").read_text().split()
    except OSError:
        return "no stat"
    return f"reads {words[0]} writes {words[4]} in-flight {words[8]}"


def kernel_log() -> list[str]:
    return run(["dmesg"]).stdout.splitlines()


def cli(*args: str) -> Any:
    answer = run(["xentmem", "--socket", str(SOCK), "--timeout", str(max(1, int(time_left()))),
                  *args, "--json"])
    if answer.returncode != 0:
        raise AssertionError(f"xentmem {' '.join(args)}: exit {answer.returncode}: "
                             f"{(answer.stderr or answer.stdout).strip()[-300:]}")
    return json.loads(answer.stdout)


def balloon_ticks() -> int:
    """The self-balloon loop's ticks so far (``xentmem balloon``'s counters)."""
    with ControlClient(SOCK, timeout=max(1.0, time_left())) as client:
        return int(client.balloon(limit=0).get("counters", {}).get("ticks", 0))


def pids_named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def task_report(pid: int, label: str) -> str:
    """The kernel's view of a process and its threads: state, wait channel, stack."""
    lines = [f"--- {label} pid {pid}"]
    try:
        tasks = sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return f"--- {label} pid {pid}: gone"
    for tid in tasks:
        base = Path(f"/proc/{pid}/task/{tid}")
        try:
            state = next(x for x in (base / "status").read_text().splitlines()
                         if x.startswith("State:"))
            wchan = (base / "wchan").read_text().strip()
            stack = (base / "stack").read_text().strip().replace("\n", " | ")
        except (OSError, StopIteration) as exc:
            lines.append(f"  tid {tid}: {exc}")
            continue
        lines.append(f"  tid {tid} {state} wchan={wchan} stack: {stack}")
    return "\n".join(lines)


# -- the workload ----------------------------------------------------------------------------


class Workload:
    """``python3 -m swapload`` with its JSON answers read line by line until the deadline."""

    def __init__(self, pages: int, seed: int) -> None:
        deadline = time.time() + time_left()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swapload", str(pages), str(seed), f"{deadline:.0f}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buffer = b""

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], time_left())
            if not ready:
                raise AssertionError("the workload did not answer by the bed's deadline")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr \
                    else ""
                raise AssertionError(f"the workload ended (status {self.proc.wait()}): "
                                     f"{err.strip()[-300:]}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def tell(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.answer()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.tell("exit")
                self.proc.wait(time_left())
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def verdict_problem(answer: dict[str, Any], expected: int) -> str:
    """"" when a verify answer checked ``expected`` pages and found none bad."""
    if answer.get("phase") != "verified":
        return f"expected a verification, got {answer}"
    if answer.get("checked") != expected or answer.get("bad"):
        return (f"round {answer.get('round')}: {answer.get('bad')} of {answer.get('checked')} "
                f"pages bad (expected {expected} checked): {answer.get('first_bad')}")
    return ""


def workload_pages(extra_mib: int) -> int:
    """What is available now plus ``extra_mib``, in pages."""
    return (meminfo()["MemAvailable"] + extra_mib * 1024) // 4


# -- the daemon ------------------------------------------------------------------------------


#: The daemon's cgroup, as systemd/xentmem.service's (MemorySwapMax=0), kept for the bed's
#: whole run as systemd keeps a unit's cgroup across Restart=.
DAEMON_CGROUP = Path("/sys/fs/cgroup/bed-xentmemd")


def daemon_cgroup() -> str:
    """The cgroup.procs of a cgroup whose memory.swap.max is 0, for xentmemd: what outlives
    a killed daemon, zcache's page arena on the tmpfs run directory, stays charged to it and
    so out of swap.  Without it the arena's pages, no longer locked once the daemon died,
    went to the very NBD device the daemon served, and the restarted daemon waited for good
    on that dead device to read its own arena (``shmem_swapin_folio``; bed run of
    2026-12-04 19:05).  init mounts cgroup2 with the memory controller (image/init)."""
    try:
        DAEMON_CGROUP.mkdir(exist_ok=True)
        (DAEMON_CGROUP / "memory.swap.max").write_text("0\n")
    except OSError as exc:
        say(f"no cgroup with memory.swap.max 0 for xentmemd ({exc}): a killed daemon's arena "
            "may be swapped out onto its own device")
        return "/dev/null"
    return str(DAEMON_CGROUP / "cgroup.procs")


class Daemon:
    def __init__(self, backend: str, label: str = "", daemon_config: str = "") -> None:
        """``daemon_config``: lines for the config's ``[daemon]`` section."""
        self.backend = backend
        self.log = Path(f"/var/log/xentmemd-swap-{backend}{label}.log")
        used_mb = (meminfo()["MemTotal"] - meminfo()["MemAvailable"]) // 1024
        for place in (RUN_DIR, STATE_DIR):
            place.mkdir(mode=0o700, parents=True, exist_ok=True)
        CONFIG.write_text(
            "# written by checks/domu/60-swap for the real-Xen bed\n"
            f"[backend.xen]\ntimeout_ms = {min(MAX_XEN_TIMEOUT_MS, int(time_left() * 1000))}\n\n"
            "[tmem]\nselfshrinking = false\n\n"
            f"[selfballoon]\nselfballoon_min_usable_mb = {used_mb + FLOOR_HEADROOM_MB}\n"
            + (f"\n[daemon]\n{daemon_config}" if daemon_config else ""))
        procs = daemon_cgroup()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["sh", "-c", 'echo $$ >"$1"; shift; exec "$@"', "sh", procs,
                 "xentmemd", "--config", str(CONFIG), "--run-dir", str(RUN_DIR),
                 "--state-dir", str(STATE_DIR), "--backend", backend, "--log-level", "info"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        DAEMON_PID_FILE.write_text(f"{self.proc.pid}\n")

    def wait_ready(self) -> dict[str, Any]:
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"xentmemd exited {self.proc.returncode}: {self.tail()}")
            if SOCK.exists():
                answer = run(["xentmem", "--socket", str(SOCK), "status", "--json"])
                if answer.returncode == 0:
                    return json.loads(answer.stdout)
            if time_left() <= 0:
                raise AssertionError(f"xentmemd not answering by the bed's deadline: {self.tail()}")
            time.sleep(1.0)

    def tail(self, count: int = 6, chars: int = 600) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-count:])[-chars:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(time_left())
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def export_of(name: str) -> dict[str, Any]:
    for export in cli("swap", "list"):
        if export["name"] == name:
            return export
    raise AssertionError(f"export {name} not in `xentmem swap list`")


def export_counts(name: str) -> dict[str, int]:
    """The export's counters (``nbd.list``): writes, pages_to_tmem, pages_to_backing..."""
    with ControlClient(SOCK, timeout=max(1.0, time_left())) as client:
        for export in client.call("nbd.list")["exports"]:
            if export["name"] == name:
                return dict(export.get("counts") or {})
    raise AssertionError(f"export {name} not in nbd.list")


def through_mib(counts: dict[str, int]) -> float:
    """MiB the kernel wrote through the export (to tmem or to its backing file)."""
    return (counts.get("pages_to_tmem", 0) + counts.get("pages_to_backing", 0)) * PAGE / 2**20


# -- the steps -------------------------------------------------------------------------------


def attach(size: str, *extra: str) -> dict[str, Any]:
    added = cli("swap", "add", "--size", size, *extra)
    device = added["device"]
    if device not in swaps():
        raise AssertionError(f"swap add said {added}, but {device} is not in /proc/swaps")
    listed = export_of(added["name"])
    if listed["device"] != device or not listed["swapon"] or listed["connections"] < 1:
        raise AssertionError(f"swap list: {listed}")
    return added


def load_and_verify(pages: int, seed: int) -> tuple[Workload, str]:
    """Write, then verify twice; the workload stays for the removal.  The detail."""
    say(f"workload of {pages} pages starts; {meminfo()['MemAvailable']} kB available")
    work = Workload(pages, seed)
    written = work.answer()
    say(f"workload: {written}")
    if written.get("phase") != "written" or written.get("pages") != pages:
        raise AssertionError(f"workload: {written}")
    rounds = [work.answer() for _ in (1, 2)]
    problems = [p for p in (verdict_problem(r, pages) for r in rounds) if p]
    if problems:
        raise AssertionError("; ".join(problems))
    return work, (f"{pages} pages ({pages // 256} MiB) written in {written['seconds']}s "
                  f"(writer waited {written['throttled_s']}s for reclaim), verified twice "
                  f"in {rounds[0]['seconds']}s and {rounds[1]['seconds']}s")


def remove(name: str, device: str, work: Workload | None, daemon: Daemon) -> str:
    """``xentmem swap remove`` with progress lines, and the kernel's view if it hangs."""
    started = time.monotonic()
    budget = time_left() / 4  # a share of what is left: more checks come after
    proc = subprocess.Popen(["xentmem", "--socket", str(SOCK), "swap", "remove", name,
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    say(f"swap remove {name} ({device}): started, budget {budget:.0f}s")
    while True:
        try:
            out, err = proc.communicate(timeout=min(PROGRESS_POLL_S, max(0.1, time_left())))
            break
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.monotonic() - started
        info = meminfo()
        say(f"swap remove +{elapsed:.0f}s: swapoff pids {pids_named('swapoff')}, "
              f"/proc/swaps {swaps()}, {device} {device_stat(device)}, MemFree "
              f"{info['MemFree']} kB, balloon current "
              f"{(BALLOON / 'info' / 'current_kb').read_text().strip()} kB")
        if elapsed > budget or time_left() <= 0:
            stuck = [task_report(pid, "swapoff") for pid in pids_named("swapoff")]
            stuck.append(task_report(proc.pid, "xentmem swap remove"))
            if work is not None:
                stuck.append(task_report(work.proc.pid, "workload"))
            stuck.append(task_report(daemon.proc.pid, "xentmemd"))
            try:
                Path("/proc/sysrq-trigger").write_text("w\n")
            except OSError as exc:
                stuck.append(f"sysrq w: {exc}")
            print("\n".join(stuck), flush=True)
            print("kernel log tail:\n" + "\n".join(kernel_log()[-60:]), flush=True)
            for pid in pids_named("swapoff"):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.communicate()
            raise AssertionError(f"swap remove still running after {elapsed:.0f}s: "
                                 f"{swaps()} {device_stat(device)}; the tasks' stacks are in "
                                 f"the script's output")
    if proc.returncode != 0:
        raise AssertionError(f"swap remove: exit {proc.returncode}: {err.strip()[-300:]}")
    seconds = time.monotonic() - started
    left = {d: u for d, u in swaps().items() if d.startswith("/dev/nbd")}
    if left:
        raise AssertionError(f"swap remove returned, but /proc/swaps still has {left}")
    if any(e["name"] == name for e in cli("swap", "list")):
        raise AssertionError(f"export {name} still listed after swap remove")
    return f"swap remove in {seconds:.1f}s ({json.loads(out) if out.strip() else ''})"


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def kernel_lines_since(since: float) -> list[str]:
    """The kernel log's lines stamped after ``since`` (seconds of uptime)."""
    found = []
    for line in kernel_log():
        match = re.match(r"\s*(?:<\d+>)?\[\s*(\d+\.\d+)\]", line)
        if match and float(match[1]) >= since:
            found.append(line.strip())
    return found


def kernel_problems(since: float) -> tuple[list[str], int]:
    """Bad lines since ``since``, and how many lines mention nbd (reported, not judged)."""
    lines = kernel_lines_since(since)
    return [x for x in lines if BAD_KERNEL.search(x)], sum("nbd" in x for x in lines)


def pressure(daemon: Daemon, name: str, extra_mib: int, need_mib: int, seed: int,
             signals: tuple[str, str] | None = None) -> tuple[Workload, str]:
    """The workload through the swap, verified twice; the judgement of the kernel's log,
    the pages through the export and the balloon's ticks.  The workload stays."""
    since, swapped0, ticks0 = uptime(), vmstat("pswpout"), balloon_ticks()
    pages = workload_pages(extra_mib)
    if signals:
        send_signal(signals[0])
    try:
        work, detail = load_and_verify(pages, seed)
    finally:
        if signals:
            send_signal(signals[1])
    through = through_mib(export_counts(name))
    swapped = (vmstat("pswpout") - swapped0) * PAGE / 2**20
    bad, nbd_lines = kernel_problems(since)
    ticked = balloon_ticks() - ticks0
    problems = []
    if through < need_mib:
        problems.append(f"only {through:.1f} MiB went through the export (pswpout "
                        f"{swapped:.1f} MiB), {need_mib} MiB wanted")
    if bad:
        problems.append(f"kernel log: {bad[:3]}")
    if ticked < 1:
        problems.append("the self-balloon loop did not tick meanwhile")
    if problems:
        work.stop()
        raise AssertionError("; ".join(problems) + f" ({detail})")
    return work, (f"{detail}; {through:.1f} MiB through the export (pswpout {swapped:.1f} "
                  f"MiB); {ticked} balloon ticks meanwhile; kernel log clean ({nbd_lines} "
                  f"nbd lines)")


def release_remove_verify(work: Workload | None, added: dict[str, Any], daemon: Daemon,
                          keep_every: int = KEEP_EVERY) -> str:
    kept = work.tell(f"release {keep_every}")["kept"] if work else 0
    # swapoff needs room for every page it brings back: the kernel's own watermarks again
    # (not the early-kswapd margin) for the removal.
    saved = WATERMARK.read_text().strip()
    WATERMARK.write_text(f"{WATERMARK_DEFAULT}\n")
    try:
        removed = remove(added["name"], added["device"], work, daemon)
    finally:
        WATERMARK.write_text(saved + "\n")
    if work is None:
        return f"{removed}; no workload to verify"
    problem = verdict_problem(work.tell("verify"), kept)
    if problem:
        raise AssertionError(f"after {removed}: {problem}")
    return f"released to {kept} pages; {removed}; all {kept} kept pages intact after"


def answer_waiting(work: Workload) -> bool:
    """The workload has written an answer (a look, no wait)."""
    if b"\n" in work._buffer:
        return True
    assert work.proc.stdout is not None
    ready, _, _ = select.select([work.proc.stdout], [], [], 0)
    return bool(ready)


MONITOR = Path(__file__).with_name("swapmonitor.sh")
DAEMON_PID_FILE = BASE / "daemon.pid"


def start_monitor() -> subprocess.Popen[bytes]:
    """swapmonitor.sh: a line on the console every 10 s for as long as this process lives,
    and the stacks of blocked tasks and of xentmemd's threads when the device stalls."""
    BASE.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["sh", str(MONITOR), str(os.getpid()), str(DAEMON_PID_FILE)],
                            stdin=subprocess.DEVNULL, start_new_session=True)


class ConsoleReport(CheckReport):
    """A CheckReport whose verdicts also go to the console at once (as ``swap-check:
    result ...``, not as check lines): the runner prints a script's check lines only when it
    ends, and these scripts run long."""

    def record(self, name: str, status: str, detail: str = "") -> None:
        super().record(name, status, detail)
        say(f"result {name} {status} {' '.join(detail.split())[:300]}")
