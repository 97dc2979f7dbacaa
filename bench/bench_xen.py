"""Benchmark: tmem ops through the ``xen`` backend against the mocked hypervisor, as a ratio of
the raw xenstore write+read round trip measured with pyxs in the same run.

The mocked hypervisor is our xenstore server (``python -m xentmem.mock_xenstored``, C
xenstored's limits) and the host service (``xentmem-hostd run``), each in its own process,
as xenstored and the service are separate processes in dom0.  This process is guest 1: it
talks to the server through the guest's own socket, both for the raw round trips (pyxs
``write`` then ``read`` of a node in its ``data/``) and for the backend.

Pages come from a corpus of real text (4 KiB slices of the Python standard library's
sources, the typical clean page) and every page read back is checked.  Measurements are
*interleaved*: each round measures the raw round trip and then every mode, and the ratio of a
mode is computed within its round; the medians over the rounds are reported, so a neighbour
stealing the CPU for a while moves both sides of a ratio.

Modes:

* ``unbatched put`` / ``unbatched get``: ``batch=0``, one op per message, one caller, a
  persistent pool (frontswap's kind: every put needs its answer).
* ``batched put``: ``batch=1``, one caller, an ephemeral pool: cleancache puts are posted and
  leave in messages of up to ``batch_max`` ops.
* ``batched get``: ``batch=1``, ``--threads`` callers sharing the backend (as CPUs share the
  kernel's frontswap): concurrent gets ride in the same messages (group commit).
* ``zero``/``random`` variants of the unbatched modes, for information (a zero page never
  travels; a random page does not compress and always spills).

Targets (issue 3): unbatched >= 0.5 of the raw round-trip rate, batched > 1.0.  The last
line is the summary::

    SUMMARY: unbatched put x.xx get x.xx (target >= 0.5), batched put x.xx get x.xx
    (target > 1.0) of raw N round trips/s: PASS|FAIL

Run: ``python bench/bench_xen.py [--ops 1000] [--rounds 5] [--threads 8] [--json]``.
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

import pyxs

from xentmem.guest.backends.xen import XenBackend
from xentmem.roots import Roots
from xentmem.tmem.abi import POOL_PRIVATE_EPHEMERAL, POOL_PRIVATE_PERSISTENT, PRIVATE_UUID, Oid

GUEST = 1
START_TIMEOUT_S = 30.0


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


class MockedHypervisor:
    """Our xenstore server and the host service, as two subprocesses."""

    def __init__(self, *, one_process: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="xen-bench-", dir="/tmp"))
        self.procs: list[subprocess.Popen[str]] = []
        self.one_process = one_process

    def __enter__(self) -> MockedHypervisor:
        self.dom0 = self.dir / "socket"
        self.guest = self.dir / f"domain-{GUEST}.sock"
        if self.one_process:  # `xentmem-hostd demo`: server and service in one process
            demo = subprocess.Popen(
                [sys.executable, "-m", "xentmem.hostd.service", "demo", "--dir", str(self.dir),
                 "--guest", str(GUEST), "--capacity", "1G", "--log-level", "warning"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.procs.append(demo)
            assert demo.stdout is not None
            for _ in range(3):
                demo.stdout.readline()
            self._wait_for_device()
            return self
        server = subprocess.Popen(
            [sys.executable, "-m", "xentmem.mock_xenstored", "--dir", str(self.dir),
             "--domain", str(GUEST)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(server)
        assert server.stdout is not None
        for _ in range(2):  # XENSTORED_PATH=..., DOMAIN_1_SOCKET=...
            server.stdout.readline()
        host = subprocess.Popen(
            [sys.executable, "-m", "xentmem.hostd.service", "--control",
             str(self.dir / "hostd.sock"), "run", "--xenstore", str(self.dom0),
             "--capacity", "1G", "--log-level", "warning"])
        self.procs.append(host)
        self._wait_for_device()
        return self

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
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def raw_round_trips(client: pyxs.Client, count: int) -> float:
    """pyxs write + read of one node, ``count`` times: round trips per second."""
    client.write(b"data/bench", b"0")
    start = time.perf_counter()
    for i in range(count):
        client.write(b"data/bench", str(i).encode())
        client.read(b"data/bench")
    return count / (time.perf_counter() - start)


def timed(count: int, body: Callable[[int], None]) -> float:
    start = time.perf_counter()
    for i in range(count):
        body(i)
    return count / (time.perf_counter() - start)


def threaded(count: int, threads: int, body: Callable[[int], None]) -> float:
    """``count`` calls of ``body`` spread over ``threads`` threads: calls per second."""
    share = count // threads
    errors: list[BaseException] = []

    def worker(first: int) -> None:
        try:
            for i in range(first, first + share):
                body(i)
        except BaseException as exc:  # reported below, the bench fails
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(t * share,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return share * threads / elapsed


class Modes:
    """The measured operations, on one backend (one guest has one tmem device) whose
    ``batch`` param is switched between modes, as an administrator would switch it."""

    def __init__(self, roots: Roots, pages: list[bytes], threads: int) -> None:
        self.pages = pages
        self.threads = threads
        self.backend = XenBackend({}, roots=roots)
        self.backend.connect()
        self.pers = self.backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        self.eph = self.backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        if self.pers < 0 or self.eph < 0:
            raise RuntimeError(f"pool creation failed: {self.pers}, {self.eph}")
        self.round = 0

    def close(self) -> None:
        self.backend.remove()

    def page(self, i: int) -> bytes:
        return self.pages[i % len(self.pages)]

    def run(self, count: int) -> dict[str, float]:
        self.round += 1
        b = self.backend
        text, zeros, rand = Oid(self.round, 0), Oid(self.round, 1), Oid(self.round, 2)
        zero, noise = bytes(4096), os.urandom(4096)

        def put(pool: int, oid: Oid, i: int, page: bytes) -> None:
            rc = b.put_page(pool, oid, i, page)
            if rc != 1:
                raise RuntimeError(f"put {oid} {i} returned {rc}")

        def get(pool: int, oid: Oid, i: int, want: bytes) -> None:
            rc, data = b.get_page(pool, oid, i)
            if rc != 1 or data != want:
                raise RuntimeError(f"get {oid} {i}: rc {rc}, "
                                   f"{'wrong data' if data else 'no data'}")

        rates: dict[str, float] = {}
        self.per_message: dict[str, float] = {}

        def messages() -> int:
            return b.stats()["messages"]

        b.set_param("batch", False)
        rates["unbatched put"] = timed(count, lambda i: put(self.pers, text, i, self.page(i)))
        rates["unbatched get"] = timed(count, lambda i: get(self.pers, text, i, self.page(i)))
        b.set_param("batch", True)
        before = messages()
        start = time.perf_counter()
        for i in range(count):
            put(self.eph, text, i, self.page(i))
        # Posted puts may still wait in the queue: the clock stops when a synchronous get has
        # carried them all to the host (and found the last one there).
        get(self.eph, text, count - 1, self.page(count - 1))
        rates["batched put"] = count / (time.perf_counter() - start)
        self.per_message["batched put"] = count / max(messages() - before, 1)
        before = messages()
        rates["batched get"] = threaded(
            count, self.threads, lambda i: get(self.pers, text, i, self.page(i)))
        self.per_message["batched get"] = count / max(messages() - before, 1)
        b.set_param("batch", False)
        rates["unbatched put zero"] = timed(count, lambda i: put(self.pers, zeros, i, zero))
        rates["unbatched get zero"] = timed(count, lambda i: get(self.pers, zeros, i, zero))
        small = max(count // 4, 1)
        rates["unbatched put random"] = timed(small, lambda i: put(self.pers, rand, i, noise))
        rates["unbatched get random"] = timed(small, lambda i: get(self.pers, rand, i, noise))
        for oid in (text, zeros, rand):
            b.flush_object(self.pers, oid)
        b.flush_object(self.eph, text)
        return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=1000, help="ops per mode per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8, help="callers for batched gets")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--one-process", action="store_true",
                        help="run the server and the host service in one process (the demo)")
    args = parser.parse_args(argv)
    pages = text_corpus(512)
    with MockedHypervisor(one_process=args.one_process) as hv:
        roots = Roots(root=Path("/"), xenstore_socket=hv.guest)
        modes = Modes(roots, pages, args.threads)
        raw_client = pyxs.Client(unix_socket_path=str(hv.guest))
        raw_client.connect()
        try:
            rounds: list[dict[str, Any]] = []
            for _ in range(args.rounds):
                raw = raw_round_trips(raw_client, args.ops)
                rates = modes.run(args.ops)
                rounds.append({"raw": raw, "rates": rates,
                               "ratios": {k: v / raw for k, v in rates.items()},
                               "ops_per_message": modes.per_message})
        finally:
            raw_client.close()
            modes.close()
    report(rounds, args)
    return 0


def report(rounds: list[dict[str, Any]], args: argparse.Namespace) -> None:
    raw = statistics.median(r["raw"] for r in rounds)
    names = list(rounds[0]["rates"])
    med = {n: statistics.median(r["rates"][n] for r in rounds) for n in names}
    ratio = {n: statistics.median(r["ratios"][n] for r in rounds) for n in names}
    per_round = ", ".join(f"{r['raw']:.0f}" for r in rounds)
    print(f"raw xenstore write+read round trips (pyxs, guest socket): {raw:8.0f} /s "
          f"(rounds: {per_round})")
    per_message = {n: statistics.median(r["ops_per_message"][n] for r in rounds)
                   for n in rounds[0]["ops_per_message"]}
    for n in names:
        extra = f"   {per_message[n]:4.1f} ops/message" if n in per_message else ""
        print(f"{n:24s} {med[n]:8.0f} ops/s   {ratio[n]:5.2f} x raw{extra}")
    print(f"(batched get: {args.threads} concurrent callers; pages: {len(rounds)} rounds of "
          f"{args.ops} ops of 4 KiB stdlib source text, random and zero variants as labelled)")
    unbatched_ok = min(ratio["unbatched put"], ratio["unbatched get"]) >= 0.5
    batched_ok = min(ratio["batched put"], ratio["batched get"]) > 1.0
    if args.json:
        print(json.dumps({"raw": raw, "rates": med, "ratios": ratio, "rounds": rounds}))
    print(f"SUMMARY: unbatched put {ratio['unbatched put']:.2f} get {ratio['unbatched get']:.2f}"
          f" (target >= 0.5), batched put {ratio['batched put']:.2f} get "
          f"{ratio['batched get']:.2f} (target > 1.0) of raw {raw:.0f} round trips/s: "
          f"{'PASS' if unbatched_ok and batched_ok else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
