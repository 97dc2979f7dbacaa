"""Benchmark: tmem ops through the ``xen`` backend, against a raw xenstore round trip measured
in the same run, in ops per second and in CPU time per op summed over every process.

The host side runs as on a Xen host, a xenstored and ``xentmem-hostd run`` as processes of
their own, and this process is guest 1, against our stand-in xenstored and against Debian's
C xenstored (started without Xen by ``tests/fakes/xs_peer.py``; skipped, saying why, where
it cannot run; its guest ring's proxy is the guest kernel's work and is shown, not counted).
The baseline is a raw WRITE then READ with pyxs of a value as long as a put's request text.
Rounds are interleaved (raw, then every mode) and medians reported, so a neighbour stealing
the CPU moves both sides of a ratio.  What the figures mean: ``docs/protocol.md`` §8.

Run: ``python bench/bench_xen.py [--ops 1000] [--rounds 5] [--threads 8] [--peer both]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pyxs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real xenstored's harness (tests/fakes)

from fakes.xs_peer import RealPeer, unavailable_reason  # noqa: E402

from xentmem.guest.backends.xen import XenBackend  # noqa: E402
from xentmem.mock_xenstored.server import toolstack_nodes  # noqa: E402
from xentmem.roots import Roots  # noqa: E402
from xentmem.tmem.abi import (  # noqa: E402
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    PRIVATE_UUID,
    Oid,
)
from xentmem.xenbus.body import OpRecord, encode_request  # noqa: E402
from xentmem.xenbus.framing import DEFAULT_CHUNK_BYTES, to_text  # noqa: E402
from xentmem.xenbus.xs import XsSession  # noqa: E402

GUEST = 1
START_TIMEOUT_S = 30.0
#: The unbatched xen path's CPU per op, at most this many raw round trips' CPU.
CPU_TARGET = 2.0


def text_corpus(count: int) -> list[bytes]:
    """``count`` distinct 4 KiB slices of the standard library's sources."""
    pages: list[bytes] = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        data = Path(path).read_bytes()
        for offset in range(0, len(data) - 4096, 4096):
            pages.append(data[offset:offset + 4096])
            if len(pages) == count:
                return pages
    raise RuntimeError(f"only {len(pages)} text pages found under {stdlib}")


def put_text_length(pages: list[bytes]) -> int:
    """The median length of a put's request text (the body as it travels)."""
    return int(statistics.median(
        len(to_text(encode_request([OpRecord.put_page(0, Oid(1), i, page)])))
        for i, page in enumerate(pages)))


# -- the host side ----------------------------------------------------------------------------


class XenHost:
    """A xenstored and the host service, as processes; guest 1's socket in :attr:`guest`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.dir = Path(tempfile.mkdtemp(prefix="xen-bench-", dir="/tmp"))
        self.procs: list[subprocess.Popen[str]] = []
        self.peer: RealPeer | None = None
        #: Processes whose CPU is counted, by role.
        self.pids: dict[str, int] = {}
        #: The guest kernel's stand-in (ring proxy, multiplexer): shown, not counted.
        self.kernel_pid: int | None = None

    def __enter__(self) -> XenHost:
        try:
            if self.kind == "ours":
                self._start_ours()
            else:
                self._start_real()
            host = subprocess.Popen(
                [sys.executable, "-m", "xentmem.hostd.service", "--control",
                 str(self.dir / "hostd.sock"), "run", "--xenstore", str(self.dom0),
                 "--domain", str(GUEST), "--capacity", "1G", "--log-level", "warning"])
            self.procs.append(host)  # type: ignore[arg-type]
            self.pids["host service"] = host.pid
            self._wait_for_device()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_ours(self) -> None:
        server = subprocess.Popen(
            [sys.executable, "-m", "xentmem.mock_xenstored", "--dir", str(self.dir),
             "--domain", str(GUEST)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(server)
        assert server.stdout is not None
        for _ in range(2):  # XENSTORED_PATH=..., DOMAIN_1_SOCKET=...
            server.stdout.readline()
        self.pids["xenstored"] = server.pid
        self.dom0 = self.dir / "socket"
        self.guest = self.dir / f"domain-{GUEST}.sock"

    def _start_real(self) -> None:
        self.peer = peer = RealPeer.start("c-xenstored")
        self.pids["xenstored"] = peer.pid
        self.dom0 = peer.socket
        self.guest = self.dir / f"domain-{GUEST}.sock"
        kernel = subprocess.Popen(
            [sys.executable, __file__, "--serve-ring", str(peer.fakedir), str(GUEST),
             str(self.dir / f"domain-{GUEST}.ring"), str(self.guest)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(kernel)
        assert kernel.stdout is not None
        if kernel.stdout.readline().strip() != "ready":
            raise RuntimeError("the guest's ring proxy did not start")
        self.kernel_pid = kernel.pid
        with pyxs.Client(unix_socket_path=str(self.dom0)) as dom0:
            for path, value, perms in toolstack_nodes(GUEST):
                if value:
                    dom0.write(path.encode(), value)
                else:
                    dom0.mkdir(path.encode())
                dom0.set_perms(path.encode(), perms.encode())
            dom0.introduce_domain(GUEST, 0, 1)

    def _wait_for_device(self) -> None:
        state = f"/local/domain/0/backend/tmem/{GUEST}/0/state".encode()
        deadline = time.monotonic() + START_TIMEOUT_S
        with pyxs.Client(unix_socket_path=str(self.dom0)) as dom0:
            while time.monotonic() < deadline:
                if dom0.exists(state):
                    return
                time.sleep(0.05)
        raise RuntimeError("the host service did not set up the guest's device")

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            if proc.stdin is not None:
                proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        if self.peer is not None:
            self.peer.stop()
            self.peer = None
        shutil.rmtree(self.dir, ignore_errors=True)


def serve_ring(fakedir: str, domid: int, ring: str, socket_path: str) -> None:
    """The guest kernel's part, for the real daemon: its ring as a socket, opened many times."""
    from fakes.xenbus_mux import XenbusMux
    from fakes.xs_peer import _load_ring_proxy

    proxy = _load_ring_proxy().RingProxy(fakedir, domid, ring).start()
    mux = XenbusMux(Path(ring), Path(socket_path)).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    mux.stop()
    proxy.stop()


# -- measuring --------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds of this process and of the host's processes, every thread's, to the
    nanosecond: each process's CPU-time clock (``clock_getcpuclockid``), read with
    ``clock_gettime``; ``/proc``'s user and system times (psutil) count in 10 ms ticks, a
    tenth of an op's CPU in a round of 1000 ops."""

    def __init__(self, host: XenHost) -> None:
        self.pids = {"guest": os.getpid(), **host.pids}
        self.kernel = host.kernel_pid

    def sample(self) -> dict[str, float]:
        times = {role: process_cpu(pid) for role, pid in self.pids.items()}
        if self.kernel is not None:
            times["guest kernel (not counted)"] = process_cpu(self.kernel)
        return times


def process_cpu(pid: int) -> float:
    """CPU seconds process ``pid`` has run, all its threads (also those that ended)."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # Linux: MAKE_PROCESS_CPUCLOCK(pid, SCHED)
    except OSError:  # not Linux, or not allowed: the kernel's tick-counted times
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system


def measured(meter: CpuMeter, count: int, body: Callable[[], None]) -> dict[str, Any]:
    """Run ``body`` (``count`` ops); its rate and CPU per op, summed and by process."""
    before = meter.sample()
    start = time.perf_counter()
    body()
    elapsed = time.perf_counter() - start
    after = meter.sample()
    per_role = {role: (after[role] - before[role]) / count for role in after}
    counted = sum(v for role, v in per_role.items() if "not counted" not in role)
    return {"rate": count / elapsed, "cpu": counted, "by": per_role}


def threaded(count: int, threads: int, body: Callable[[int], None]) -> None:
    """``count`` calls of ``body`` spread over ``threads`` threads."""
    share = count // threads
    errors: list[BaseException] = []

    def worker(first: int) -> None:
        try:
            for i in range(first, first + share):
                body(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(t * share,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    if errors:
        raise errors[0]


class Modes:
    """The measured operations on one backend (one guest has one tmem device) whose ``batch``
    param is switched between modes, as an administrator would switch it."""

    def __init__(self, host: XenHost, pages: list[bytes], threads: int, value: bytes) -> None:
        self.pages = pages
        self.threads = threads
        self.value = value
        self.meter = CpuMeter(host)
        self.backend = XenBackend({}, roots=Roots(root=Path("/"), xenstore_socket=host.guest))
        self.backend.connect()
        self.pers = self.backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        self.eph = self.backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        if self.pers < 0 or self.eph < 0:
            raise RuntimeError(f"pool creation failed: {self.pers}, {self.eph}")
        self.pyxs = pyxs.Client(unix_socket_path=str(host.guest))
        self.pyxs.connect()
        self.xs = XsSession(host.guest, timeout=5.0).open()
        self.round = 0

    def close(self) -> None:
        self.backend.remove()
        self.pyxs.close()
        self.xs.close()

    def page(self, i: int) -> bytes:
        return self.pages[i % len(self.pages)]

    def run(self, count: int) -> dict[str, dict[str, Any]]:
        self.round += 1
        b, meter, value = self.backend, self.meter, self.value
        text, zeros, rand = Oid(self.round, 0), Oid(self.round, 1), Oid(self.round, 2)
        zero, noise = bytes(4096), os.urandom(4096)
        out: dict[str, dict[str, Any]] = {}

        def raw_pyxs() -> None:
            for _ in range(count):
                self.pyxs.write(b"data/bench", value)
                self.pyxs.read(b"data/bench")

        def raw_ours() -> None:
            for _ in range(count):
                self.xs.write(b"data/bench", value)
                self.xs.read(b"data/bench")

        def put(pool: int, oid: Oid, i: int, page: bytes) -> None:
            rc = b.put_page(pool, oid, i, page)
            if rc != 1:
                raise RuntimeError(f"put {oid} {i} returned {rc}")

        def get(pool: int, oid: Oid, i: int, want: bytes) -> None:
            rc, data = b.get_page(pool, oid, i)
            if rc != 1 or data != want:
                raise RuntimeError(f"get {oid} {i}: rc {rc}, "
                                   f"{'wrong data' if data else 'no data'}")

        def each(n: int, op: Callable[[int], None]) -> Callable[[], None]:
            return lambda: [op(i) for i in range(n)] and None

        def messages() -> int:
            return b.stats()["messages"]

        out["raw (pyxs)"] = measured(meter, count, raw_pyxs)
        out["raw (our client)"] = measured(meter, count, raw_ours)
        b.set_param("batch", False)
        out["unbatched put"] = measured(
            meter, count, each(count, lambda i: put(self.pers, text, i, self.page(i))))
        out["unbatched get"] = measured(
            meter, count, each(count, lambda i: get(self.pers, text, i, self.page(i))))
        b.set_param("batch", True)
        before = messages()

        def batched_puts() -> None:
            for i in range(count):
                put(self.eph, text, i, self.page(i))
            # Posted puts may still wait in the queue: the clock stops when a synchronous get
            # has carried them all to the host (and found the last one there).
            get(self.eph, text, count - 1, self.page(count - 1))

        out["batched put"] = measured(meter, count, batched_puts)
        out["batched put"]["ops_per_message"] = count / max(messages() - before, 1)
        before = messages()
        out["batched get"] = measured(meter, count, lambda: threaded(
            count, self.threads, lambda i: get(self.pers, text, i, self.page(i))))
        out["batched get"]["ops_per_message"] = count / max(messages() - before, 1)
        b.set_param("batch", False)
        out["unbatched put zero"] = measured(
            meter, count, each(count, lambda i: put(self.pers, zeros, i, zero)))
        out["unbatched get zero"] = measured(
            meter, count, each(count, lambda i: get(self.pers, zeros, i, zero)))
        small = max(count // 4, 1)
        out["unbatched put random"] = measured(
            meter, small, each(small, lambda i: put(self.pers, rand, i, noise)))
        out["unbatched get random"] = measured(
            meter, small, each(small, lambda i: get(self.pers, rand, i, noise)))
        for oid in (text, zeros, rand):
            b.flush_object(self.pers, oid)
        b.flush_object(self.eph, text)
        return out


# -- reporting --------------------------------------------------------------------------------


def median_of(rounds: list[dict[str, dict[str, Any]]], mode: str, key: str) -> float:
    return statistics.median(r[mode][key] for r in rounds)


def _ratio(value: float, base: float) -> float:
    """``value / base``; NaN when too few ops ran for the CPU clock (10 ms ticks) to move."""
    return value / base if base else float("nan")


def report(kind: str, rounds: list[dict[str, dict[str, Any]]], args: argparse.Namespace,
           value_bytes: int, load: tuple[float, float]) -> dict[str, float]:
    """Print one xenstored's figures; the ratios the SUMMARY uses."""
    base = "raw (pyxs)"
    raw_rate = median_of(rounds, base, "rate")
    raw_cpu = median_of(rounds, base, "cpu")
    print(f"\n== {kind}: raw round trip = WRITE + READ of a {value_bytes}-byte value")
    print(f"{'mode':24s} {'ops/s':>8s} {'x raw':>6s} {'CPU us/op':>10s} {'x raw':>6s}   "
          "CPU by process (us/op)")
    ratios: dict[str, float] = {}
    for mode in rounds[0]:
        rate = median_of(rounds, mode, "rate")
        cpu = median_of(rounds, mode, "cpu")
        rate_ratio = statistics.median(r[mode]["rate"] / r[base]["rate"] for r in rounds)
        cpu_ratio = statistics.median(_ratio(r[mode]["cpu"], r[base]["cpu"]) for r in rounds)
        ratios[mode] = cpu_ratio
        ratios[f"{mode} rate"] = rate_ratio
        by = {role: statistics.median(r[mode]["by"][role] for r in rounds)
              for role in rounds[0][mode]["by"]}
        split = ", ".join(f"{role} {v * 1e6:.0f}" for role, v in by.items())
        extra = ""
        if "ops_per_message" in rounds[0][mode]:
            extra = f"; {median_of(rounds, mode, 'ops_per_message'):.1f} ops/message"
        print(f"{mode:24s} {rate:8.0f} {rate_ratio:6.2f} {cpu * 1e6:10.0f} {cpu_ratio:6.2f}   "
              f"{split}{extra}")
    print(f"(raw: {raw_rate:.0f} round trips/s, {raw_cpu * 1e6:.0f} us CPU each; batched get: "
          f"{args.threads} callers; {len(rounds)} rounds of {args.ops} ops; load average "
          f"{load[0]:.1f} before, {load[1]:.1f} after: a shared machine's neighbours move "
          "every figure)")
    return ratios


def run_peer(kind: str, pages: list[bytes], args: argparse.Namespace,
             value: bytes) -> dict[str, float] | None:
    if kind != "ours":
        reason = unavailable_reason(kind)
        if reason is not None:
            print(f"\n== {kind}: skipped ({reason})")
            return None
    load_before = os.getloadavg()[0]
    with XenHost(kind) as host:
        modes = Modes(host, pages, args.threads, value)
        try:
            rounds = [modes.run(args.ops) for _ in range(args.rounds)]
        finally:
            modes.close()
    ratios = report(kind, rounds, args, len(value), (load_before, os.getloadavg()[0]))
    if args.json:
        print(json.dumps({"peer": kind, "rounds": rounds}))
    return ratios


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--serve-ring"]:
        fakedir, domid, ring, sock = sys.argv[2:6]
        serve_ring(fakedir, int(domid), ring, sock)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=1000, help="ops per mode per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8, help="callers for batched gets")
    parser.add_argument("--peer", choices=["ours", "c-xenstored", "both"], default="both")
    parser.add_argument("--json", action="store_true", help="print every round as JSON too")
    args = parser.parse_args(argv)
    pages = text_corpus(512)
    text_length = put_text_length(pages)
    value = b"x" * min(text_length, DEFAULT_CHUNK_BYTES)
    print(f"a put's request text: {text_length} characters (median); raw value "
          f"{len(value)} bytes (a guest writes at most {DEFAULT_CHUNK_BYTES} per node)")
    kinds = ["ours", "c-xenstored"] if args.peer == "both" else [args.peer]
    results = {kind: run_peer(kind, pages, args, value) for kind in kinds}
    parts = []
    verdicts = []
    for kind, ratios in results.items():
        if ratios is None:
            parts.append(f"{kind} skipped")
            continue
        worst = max(ratios["unbatched put"], ratios["unbatched get"])
        verdicts.append(worst <= CPU_TARGET)
        parts.append(f"{kind}: unbatched put {ratios['unbatched put']:.2f} get "
                     f"{ratios['unbatched get']:.2f}x raw CPU/op")
    verdict = "PASS" if verdicts and all(verdicts) else "FAIL"
    print(f"SUMMARY: {'; '.join(parts)} (target <= {CPU_TARGET:g}x, raw = pyxs WRITE+READ of "
          f"{len(value)} bytes): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
