"""A flood of puts from two guests into a real ``xentmem-hostd`` process at ``--capacity
64M``, through Debian's real C xenstored: whatever the mix (incompressible, zero,
compressible; persistent and ephemeral; the same keys put again), the service's RSS stays
within ``(capacity + idle RSS) * 1.1`` (``docs/page-arena.md``, "Memory given back"), and
guest 6's flood never pushes out guest 5's persistent pages.

Each guest is the real ``xen`` backend, its puts made from several threads so that they
travel batched.  Nothing is timed: the RSS is sampled between rounds and after each phase.
Under ``CI=true`` a missing C xenstored fails (``fakes.required``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.flood import CAPACITY, MIB, Pages, Watch
from fakes.xenstore_hosts import XenstoreHost
from xenhost import WAIT_S, wait_for_node

from xentmem.guest.backends.xen import XenBackend
from xentmem.roots import Roots
from xentmem.tmem.abi import POOL_PRIVATE_EPHEMERAL, POOL_PRIVATE_PERSISTENT, PRIVATE_UUID, Oid

THREADS = 8
#: Guest 5's persistent pages, put before the flood and read back after it.
KEPT = 512
#: Guest 6's persistent offsets (the same keys are put again: duplicates).
AREA = 4_000
#: (kind, puts) of guest 6, half persistent and half ephemeral; guest 5 puts ephemeral
#: pages beside it, a quarter as many.
PHASES = (("random", 20_000), ("zero", 12_000), ("text", 6_000), ("random", 6_000))


@pytest.fixture
def hostd(xenstore_host: XenstoreHost) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    work = Path(tempfile.mkdtemp(prefix="hostd-flood-", dir="/tmp"))
    log = open(work / "hostd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "xentmem.hostd.service", "--control", str(work / "hostd.sock"),
         "run", "--xenstore", str(xenstore_host.dom0_socket), "--capacity",
         f"{CAPACITY // MIB}M", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, work
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT_S)
        log.close()
        dom0 = xenstore_host.dom0
        if dom0.exists(b"/local/domain/0/backend/tmem"):
            dom0.delete(b"/local/domain/0/backend/tmem")
        shutil.rmtree(work, ignore_errors=True)


def guest(xs: XenstoreHost, domid: int, work: Path) -> XenBackend:
    sock = xs.introduce(domid)
    wait_for_node(xs.dom0, f"/local/domain/0/backend/tmem/{domid}/0/state".encode())
    root = work / f"guest{domid}"
    root.mkdir()
    backend = XenBackend({"timeout_ms": 30_000}, roots=Roots(root=root, xenstore_socket=sock))
    backend.connect()
    return backend


def spread(count: int, put: object) -> None:
    """``put(n)`` for n in range(count), from THREADS threads (their puts travel batched)."""

    def worker(first: int) -> None:
        for n in range(first, count, THREADS):
            put(n)  # type: ignore[operator]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("xenstore_host", ["c-xenstored"], indirect=True)
def test_a_flood_from_two_guests_keeps_hostd_within_its_capacity(
        xenstore_host: XenstoreHost, hostd: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, work = hostd
    g5, g6 = guest(xenstore_host, 5, work), guest(xenstore_host, 6, work)
    try:
        watch = Watch(proc.pid)
        watch.start()
        kept_pool = g5.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        eph5 = g5.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        pers6 = g6.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        eph6 = g6.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        pages5 = Pages(5)
        kept = [pages5.page("text") for _ in range(KEPT)]
        for index, page in enumerate(kept):
            assert g5.put_page(kept_pool, Oid(1), index, page) == 1
        pages6 = Pages(6)
        lock = threading.Lock()
        seq = 0
        took = []
        for kind, count in PHASES:
            began = time.monotonic()

            def put(n: int, kind: str = kind) -> None:
                nonlocal seq
                with lock:
                    seq += 1
                    at = seq
                    page = pages6.page(kind)
                    page5 = pages5.page(kind) if n % 4 == 0 else None
                if n % 2:
                    g6.put_page(pers6, Oid(2), at % AREA, page)
                else:
                    g6.put_page(eph6, Oid(3, at >> 16), at & 0xFFFF, page)
                if page5 is not None:
                    g5.put_page(eph5, Oid(4, at >> 16), at & 0xFFFF, page5)
                if n % 2048 == 0:
                    assert watch.sample(kind) <= watch.bound, watch.report()

            spread(count, put)
            assert watch.sample(f"{kind} done") <= watch.bound, watch.report()
            took.append(f"{kind} {count} puts {time.monotonic() - began:.1f}s")
        for index, page in enumerate(kept):  # guest 6's flood pushed none of them out
            assert g5.get_page(kept_pool, Oid(1), index) == (1, page), index
        print(watch.report(), took)
    finally:
        g5.remove()
        g6.remove()
