"""Benchmark: realistic 4 KiB pages through zcache, against raw lz4 on the same pages.

The corpus mixes what a guest's page cache and swap hold: text (slices of the stdlib's Python
sources), binary (slices of the shared objects this very process has mapped: libpython, libc,
libm, extension modules), zero pages and random pages.  In one process, round after round,
the benchmark times

* raw ``lz4.block.compress`` / ``decompress`` of every page (the yardstick);
* ``put_page`` / ``get_page`` on a zcache backend called directly (a persistent pool and a
  private ephemeral one), with ``detailed_stats`` off and on;
* frontswap ``store`` / ``load`` and cleancache ``put_page`` / ``get_page`` over zcache loaded
  in a :class:`~xentmem.guest.shim.Shim`, the path a page really takes (the summary is
  about these).

Each figure is the best of ``--repeat`` rounds (the machine is shared; the best round is the
one least disturbed), with the garbage collector off while a loop runs.  Every round's data is
checked byte for byte, outside the timed loops.  The last line is the summary:
``SUMMARY: put x.xx of raw lz4, get x.xx of raw lz4, ratio x.xx`` (the slower of the two
frontends for put and get; the compression ratio achieved by the store).

The arena part (``--part arena``; ``all`` runs both) times the page arena
(``xentmem/tmem/arena.py``) under each allocator, zbud and zsmalloc, the way a store drives it
(zero page -> no bytes, lz4 block, raw page when lz4 saves too little): put and get against
raw lz4 on the same pages, both in CPU time of the process (``time.process_time``: on a busy
shared machine the wall clock mostly measures the other jobs); then a memory table (metadata
and total bytes per stored page) beside the kernel's zram given the same pages, where a zram
device can be hot-added (``/sys/class/zram-control``, root; the column says why not
otherwise), and the CPU time a reopen takes to rebuild.  Its last line: ``ARENA SUMMARY:
...``.  At large ``--pages`` the corpus's
distinct pages are capped (``--distinct``) and cycled, each put under its own key.

The hostd part (``--part hostd``) times ``xentmem-hostd``'s store made again on the run
directory a crash left (two guests' persistent pages): ``HOSTD SUMMARY``, per GiB of guest
pages and per GiB stored.

Run: ``python bench/bench_pages.py [--pages 8000] [--repeat 5]
[--part all|zcache|arena|store|hostd] [--no-zram]``.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lz4.block import compress, decompress

from xentmem.guest.backend import GetResult
from xentmem.guest.backends.zcache import POOR_COMPRESSION_LIMIT, ZcacheBackend
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.hostd.store import HostStore
from xentmem.roots import Roots
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    PRIVATE_UUID,
    ZERO_PAGE,
    Oid,
)
from xentmem.tmem.arena import ALLOCATORS, DEFAULT_ALLOCATOR, Arena
from xentmem.xenbus.body import encode_page

#: Share of each kind in the corpus (text, binary, zero, random).
MIX = {"text": 0.40, "binary": 0.40, "zero": 0.10, "random": 0.10}
#: Pages per cleancache inode; frontswap spreads offsets over 16 oids by itself.
PAGES_PER_INODE = 64


# -- the corpus -----------------------------------------------------------------------------


def _slices(paths: list[Path], count: int) -> list[bytes]:
    """``count`` page-aligned 4 KiB slices spread evenly over the concatenated files."""
    blobs: list[bytes] = []
    for path in paths:
        try:
            blobs.append(path.read_bytes())
        except OSError:
            continue
    whole = b"".join(blobs)
    available = len(whole) // PAGE_SIZE
    if available == 0 or count == 0:
        return []
    step = max(1, available // count)
    starts = [(i * step) % available for i in range(count)]
    return [whole[s * PAGE_SIZE : (s + 1) * PAGE_SIZE] for s in starts]


def text_pages(count: int) -> list[bytes]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py"))
    return _slices(sources, count)


def mapped_shared_objects() -> list[Path]:
    """The ELF files this process has mapped (from /proc/self/maps), else lib-dynload."""
    found: dict[str, None] = {}
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and ".so" in parts[5]:
                found.setdefault(parts[5], None)
    except OSError:
        pass
    paths = [Path(p) for p in found]
    if not paths:
        paths = sorted(Path(sysconfig.get_paths()["platstdlib"], "lib-dynload").glob("*.so"))
    return [Path(sys.executable).resolve(), *paths]


def binary_pages(count: int) -> list[bytes]:
    return _slices(mapped_shared_objects(), count)


@dataclass
class Corpus:
    pages: list[bytes]
    kinds: list[str]

    @classmethod
    def build(cls, total: int, seed: int) -> Corpus:
        counts = {kind: int(total * share) for kind, share in MIX.items()}
        counts["text"] += total - sum(counts.values())
        rng = random.Random(seed)
        made = {
            "text": text_pages(counts["text"]),
            "binary": binary_pages(counts["binary"]),
            "zero": [ZERO_PAGE] * counts["zero"],
            "random": [rng.randbytes(PAGE_SIZE) for _ in range(counts["random"])],
        }
        pairs = [(page, kind) for kind, pages in made.items() for page in pages]
        rng.shuffle(pairs)  # kinds interleaved, as real memory is
        return cls([p for p, _ in pairs], [k for _, k in pairs])

    def count(self, kind: str) -> int:
        return self.kinds.count(kind)


# -- timing ---------------------------------------------------------------------------------


def timed(loop: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one run of ``loop`` takes, garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        start = clock()
        loop()
        return clock() - start
    finally:
        gc.enable()


def cpu_timed(loop: Callable[[], Any]) -> float:
    """CPU seconds of this process one run of ``loop`` takes (the arena part: on a shared,
    busy machine, wall time mostly measures the other jobs)."""
    return timed(loop, time.process_time)


@dataclass
class Figure:
    """Best (shortest) time per phase over the rounds."""

    pages: int
    best: dict[str, float]

    def add(self, phase: str, seconds: float) -> None:
        self.best[phase] = min(seconds, self.best.get(phase, float("inf")))

    def rate(self, phase: str) -> float:
        return self.pages / self.best[phase]


def check(expected: list[bytes], got: list[bytes | None], what: str) -> None:
    bad = sum(1 for a, b in zip(expected, got) if a != b)
    if bad or len(expected) != len(got):
        raise SystemExit(f"{what}: {bad} page(s) did not round-trip byte-exact")


#: Exclusive gets are timed this many at a time: each chunk's pages are kept, checked and
#: dropped outside the clock, so the clock does not count faulting in memory for every page
#: gotten (raw lz4's get drops each page as it comes; a timed loop that kept 500k pages
#: would mostly time the kernel handing the process 2 GiB).
GET_CHUNK = 1024


def timed_exclusive_gets(get_page: Callable[[int, Oid, int], GetResult], pool: int,
                         keys: list[tuple[Oid, int]], pages: list[bytes], what: str,
                         clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds the gets of ``keys`` from ``pool`` take, their pages checked chunk by chunk,
    off the clock: an exclusive get's page can be gotten only once, so the timed pass is
    the check."""
    seconds = 0.0
    gc.collect()
    gc.disable()
    try:
        for start in range(0, len(keys), GET_CHUNK):
            chunk = keys[start:start + GET_CHUNK]
            began = clock()
            got = [get_page(pool, oid, index) for oid, index in chunk]
            seconds += clock() - began
            check(pages[start:start + GET_CHUNK], [data for _, data in got], what)
    finally:
        gc.enable()
    return seconds


# -- the contenders -------------------------------------------------------------------------


def raw_lz4_round(pages: list[bytes], fig: Figure,
                  timer: Callable[[Callable[[], Any]], float] = timed) -> list[bytes]:
    blocks: list[bytes] = []

    def put() -> None:
        blocks[:] = [compress(page, store_size=False) for page in pages]

    def get() -> None:
        for block in blocks:
            decompress(block, uncompressed_size=PAGE_SIZE)

    fig.add("put", timer(put))
    fig.add("get", timer(get))
    check(pages, [decompress(b, uncompressed_size=PAGE_SIZE) for b in blocks], "raw lz4")
    return blocks


def stored_size(page: bytes, block: bytes) -> int:
    """What zcache keeps for a page: nothing for zeros, the page if lz4 saved too little."""
    if page == ZERO_PAGE:
        return 0
    return PAGE_SIZE if len(block) > POOR_COMPRESSION_LIMIT else len(block)


def capacity_for(pages: list[bytes]) -> str:
    """Room for the whole corpus stored raw, with bookkeeping: nothing is evicted."""
    return f"{max(64, len(pages) * (PAGE_SIZE + 512) // (1 << 20) + 16)}M"


def direct_round(pages: list[bytes], flags: int, detailed: str, fig: Figure) -> dict[str, int]:
    """Put then get every page on a fresh store; returns the store's stats after the puts.

    ``detailed``: "off", "on", or "on-off" (switched on at load, then off again: the lean
    ops must be back, at their full speed).
    """
    store = ZcacheBackend({"capacity": capacity_for(pages), "detailed_stats": detailed != "off"})
    if detailed == "on-off":
        store.set_param("detailed_stats", False)
    pool = store.new_pool(PRIVATE_UUID, flags)
    keys = [(Oid(i & 0xF), i >> 4) for i in range(len(pages))]
    work = list(zip(keys, pages))
    got: list[bytes | None] = []

    def put() -> None:
        for (oid, index), page in work:
            store.put_page(pool, oid, index, page)

    def get() -> None:
        for oid, index in keys:
            store.get_page(pool, oid, index)

    fig.add("put", timed(put))
    stats = store.stats()
    what = f"zcache direct (detailed_stats {detailed})"
    if flags == POOL_PRIVATE_PERSISTENT:  # gets do not consume: time, then check
        fig.add("get", timed(get))
        got[:] = [store.get_page(pool, oid, index)[1] for oid, index in keys]
        check(pages, got, what)
    else:  # exclusive gets: the timed pass is the only one
        fig.add("get", timed_exclusive_gets(store.get_page, pool, keys, pages, what))
    return stats


def new_shim(pages: list[bytes], tmp: Path) -> Shim:
    shim = Shim(roots=Roots(root=tmp), boot=BootParams())
    shim.frontswap.init(0, MemoryBacking(len(pages)))
    shim.load("zcache", {"capacity": capacity_for(pages)})
    return shim


def frontswap_round(pages: list[bytes], tmp: Path, fig: Figure) -> dict[str, int]:
    shim = new_shim(pages, tmp)
    frontswap = shim.frontswap
    work = list(enumerate(pages))
    offsets = range(len(pages))

    def put() -> None:
        for offset, page in work:
            frontswap.store(0, offset, page)

    def get() -> None:
        for offset in offsets:
            frontswap.load(0, offset)

    fig.add("put", timed(put))
    fig.add("get", timed(get))
    check(pages, [frontswap.load(0, o) for o in offsets], "frontswap over zcache")
    stats = shim.stats()
    if stats["frontswap"]["succ_stores"] != len(pages):
        raise SystemExit(f"frontswap: only {stats['frontswap']['succ_stores']} stores took")
    shim.unload()
    return stats["backend"]


def cleancache_round(pages: list[bytes], tmp: Path, fig: Figure) -> None:
    shim = new_shim(pages, tmp)
    cleancache = shim.cleancache
    fs = cleancache.init_fs()
    keys = [(i // PAGES_PER_INODE, i % PAGES_PER_INODE) for i in range(len(pages))]
    work = list(zip(keys, pages))
    results: list[bytes | None] = []

    def put() -> None:
        for (inode, index), page in work:
            cleancache.put_page(fs, inode, index, page)

    def get() -> None:
        append = results.append
        for inode, index in keys:
            append(cleancache.get_page(fs, inode, index))

    fig.add("put", timed(put))
    fig.add("get", timed(get))  # exclusive gets: this pass is also the check
    check(pages, results, "cleancache over zcache")
    shim.unload()


# -- the page arena -------------------------------------------------------------------------


def store_form(page: bytes) -> bytes:
    """What a store hands the arena: nothing for zeros, the page if lz4 saves too little."""
    if page == ZERO_PAGE:
        return b""
    block = compress(page, store_size=False)
    return page if len(block) > POOR_COMPRESSION_LIMIT else block


def page_form(data: bytes) -> bytes:
    """A page back from what the arena held (:func:`store_form` undone)."""
    if not data:
        return ZERO_PAGE
    if len(data) == PAGE_SIZE:
        return data
    return decompress(data, uncompressed_size=PAGE_SIZE)


def arena_round(
    pages: list[bytes], allocator: str, tmp: Path, fig: Figure, reopen: bool
) -> dict[str, Any]:
    """Put then get every page, each under its own key; the arena's stats after the puts."""
    path = tmp / f"arena-{allocator}"
    arena = Arena.open(path, allocator=allocator)
    keys = [(1, (i >> 12, 0, 0), i & 0xFFF) for i in range(len(pages))]
    work = list(zip(keys, pages))

    def put() -> None:
        store = arena.put
        for key, page in work:
            store(key, store_form(page))

    def get() -> None:  # the pages are dropped as raw lz4's are: checked in a pass of its own
        load = arena.get
        for key in keys:
            page_form(load(key))  # type: ignore[arg-type]

    fig.add("put", cpu_timed(put))
    stats = arena.stats()
    fig.add("get", cpu_timed(get))
    bad = sum(1 for key, page in work if page_form(arena.get(key)) != page)  # type: ignore[arg-type]
    if bad:
        raise SystemExit(f"arena/{allocator}: {bad} page(s) did not round-trip byte-exact")
    stats["reopen_seconds"] = None
    if reopen:
        arena.close()
        started = time.process_time()
        arena = Arena.open(path, allocator=allocator)
        stats["reopen_seconds"] = time.process_time() - started
        if len(arena) != len(pages) or arena.report.checksum_failures:
            raise SystemExit(f"arena/{allocator}: reopen found {len(arena)} pages, "
                             f"{arena.report.checksum_failures} failed checksums")
    arena.discard()
    return stats


def zram_figures(pages: list[bytes], wanted: bool) -> dict[str, Any]:
    """The kernel's zram (lz4) given the same pages: its ``mm_stat``, or why there is none."""
    if not wanted:
        return {"why": "not measured (--no-zram)"}
    control = Path("/sys/class/zram-control")
    if not control.is_dir():
        return {"why": "no /sys/class/zram-control (zram module not loaded)"}
    if os.geteuid() != 0:
        return {"why": "not root: cannot hot-add a zram device"}
    try:
        number = int((control / "hot_add").read_text())
    except (OSError, ValueError) as exc:
        return {"why": f"hot_add failed: {exc}"}
    block = Path(f"/sys/block/zram{number}")
    try:
        try:
            (block / "comp_algorithm").write_text("lz4")
        except OSError as exc:
            return {"why": f"zram{number} has no lz4: {exc}"}
        size = -(-len(pages) * PAGE_SIZE // (1 << 20)) << 20
        (block / "disksize").write_text(str(size))
        fd = os.open(f"/dev/zram{number}", os.O_WRONLY | os.O_DIRECT)
        try:
            batch = 256
            buf = mmap.mmap(-1, batch * PAGE_SIZE)  # page-aligned, as O_DIRECT needs
            for start in range(0, len(pages), batch):
                chunk = pages[start : start + batch]
                buf[: len(chunk) * PAGE_SIZE] = b"".join(chunk)
                os.pwrite(fd, memoryview(buf)[: len(chunk) * PAGE_SIZE], start * PAGE_SIZE)
        finally:
            os.close(fd)
        fields = (block / "mm_stat").read_text().split()
        names = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
                 "mem_used_max", "same_pages", "pages_compacted", "huge_pages")
        return {"device": f"zram{number}", **dict(zip(names, map(int, fields)))}
    except OSError as exc:
        return {"why": f"zram{number}: {exc}"}
    finally:
        try:
            (block / "reset").write_text("1")
            (control / "hot_remove").write_text(str(number))
        except OSError as exc:
            print(f"warning: could not remove zram{number}: {exc}", file=sys.stderr)


def arena_part(corpus: Corpus, repeat: int, distinct: int, zram_wanted: bool) -> None:
    pages = corpus.pages
    n = len(pages)
    figures = {name: Figure(n, {}) for name in ("raw lz4", *ALLOCATORS)}
    stats: dict[str, dict[str, Any]] = {}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="xentmem-arena-", dir=shm) as tmp:
        for round_ in range(repeat):  # interleaved, so a slow spell hits every contender
            raw_lz4_round(pages, figures["raw lz4"], cpu_timed)
            for allocator in ALLOCATORS:
                got = arena_round(
                    pages, allocator, Path(tmp), figures[allocator], reopen=round_ == 0
                )
                if round_ == 0:
                    stats[allocator] = got
    zram = zram_figures(pages, zram_wanted)
    raw = figures["raw lz4"]
    print(f"\narena ({n} pages, {min(n, distinct)} distinct, each under its own key; "
          f"CPU time of this process, best of {repeat} rounds)")
    # The rebuild per GiB two ways: of guest pages held (4 KiB each) and of bytes stored
    # in the arena (what the pages take compressed: the "per GiB stored").
    print(f"{'allocator':<12}{'put pages/s':>13}{'get pages/s':>13}{'put/raw':>9}{'get/raw':>9}"
          f"{'reopen s':>10}{'s/GiB pages':>13}{'s/GiB stored':>14}")
    for name in ALLOCATORS:
        fig = figures[name]
        reopen = stats[name]["reopen_seconds"]
        gib = n * PAGE_SIZE / (1 << 30)
        stored_gib = stats[name]["stored_bytes"] / (1 << 30)
        print(f"{name:<12}{fig.rate('put'):>13,.0f}{fig.rate('get'):>13,.0f}"
              f"{fig.rate('put') / raw.rate('put'):>9.2f}{fig.rate('get') / raw.rate('get'):>9.2f}"
              f"{reopen:>10.2f}{reopen / gib:>13.2f}{reopen / stored_gib:>14.2f}")
    print("\nmemory per stored page (bytes; 'total' = frames in use + metadata)")
    print(f"{'':<26}" + "".join(f"{name:>12}" for name in ALLOCATORS) + f"{'zram':>12}")
    zram_total = zram.get("mem_used_total")
    rows = [
        ("stored bytes (data)", lambda s: s["stored_bytes"] / n, zram.get("compr_data_size")),
        ("metadata", lambda s: s["metadata_bytes"] / n, None),
        ("  index records", lambda s: s["metadata"]["records"] / n, None),
        ("  lookup buckets", lambda s: s["metadata"]["buckets"] / n, None),
        ("  object page lists", lambda s: s["metadata"]["links"] / n, None),
        ("  allocator + frame map", lambda s: (s["metadata"]["allocator"]
                                              + s["metadata"]["frame_map"]) / n, None),
        ("  zbud header chunks", lambda s: s["metadata"]["frame_headers"] / n, None),
        ("frames in use", lambda s: s["frames_used"] * PAGE_SIZE / n, None),
        ("total", lambda s: s["used_bytes"] / n, zram_total),
        ("file (reserved)", lambda s: s["file_bytes"] / n, None),
    ]
    for label, of, zram_value in rows:
        zcol = f"{zram_value / n:>12.1f}" if zram_value is not None else f"{'':>12}"
        print(f"{label:<26}" + "".join(f"{of(stats[a]):>12.1f}" for a in ALLOCATORS) + zcol)
    if zram_total is None:
        print(f"zram: {zram['why']}")
    else:
        print(f"zram: {zram['device']} lz4, mem_used_total {zram_total} B "
              f"({zram['same_pages']} same-filled pages kept without data, "
              f"{zram['huge_pages']} huge); its table (per page, outside mem_used_total) "
              "is not counted")
    totals = {a: stats[a]["used_bytes"] / n for a in ALLOCATORS}
    denser = min(totals, key=totals.__getitem__)
    parts = []
    for a in ALLOCATORS:
        fig = figures[a]
        versus = (f", {totals[a] / (zram_total / n):.3f}x zram" if zram_total else
                  ", zram n/a")
        parts.append(
            f"{a} put {fig.rate('put') / raw.rate('put'):.2f} get "
            f"{fig.rate('get') / raw.rate('get'):.2f} of raw lz4, meta "
            f"{stats[a]['metadata_bytes'] / n:.1f} B/page, total {totals[a]:.0f} B/page"
            + versus
        )
    print(f"\nARENA SUMMARY: {n} pages: " + "; ".join(parts)
          + f"; denser: {denser} (default {DEFAULT_ALLOCATOR})")


# -- the store on an arena: what zcache really does -------------------------------------------


def store_round(pages: list[bytes], allocator: str, tmp: Path,
                seconds: dict[str, list[float]]) -> float | None:
    """zcache on an arena (each allocator), a private ephemeral then a persistent pool: put
    then get every page, CPU time of this process; raw lz4 on the same pages in the same
    round.  Then the restart: the arena left as a ``kill -9`` leaves it (unmapped, not
    removed) and zcache made again on it; the CPU seconds of that (reopen, rebuild, the
    store's index from the arena's records) are returned."""
    run = tmp / f"run-{allocator}"
    roots = Roots(root=tmp, run_dir=run)
    backend = ZcacheBackend({"capacity": capacity_for(pages), "allocator": allocator},
                            roots=roots)
    keys = [(Oid(i & 0xF), i >> 4) for i in range(len(pages))]
    work = list(zip(keys, pages))
    put_page, get_page = backend.put_page, backend.get_page
    # The ephemeral pool first, destroyed after: the capacity holds one pool's pages (a
    # page evicted would fail the check), and the persistent one's stay for the restart.
    for flags, kind in ((POOL_PRIVATE_EPHEMERAL, "eph"), (POOL_PRIVATE_PERSISTENT, "pers")):
        pool = backend.new_pool(PRIVATE_UUID, flags)

        def put(pool: int = pool) -> None:
            for (oid, index), page in work:
                put_page(pool, oid, index, page)

        def get_all(pool: int = pool) -> None:  # dropped as raw lz4's are, checked after
            for oid, index in keys:
                get_page(pool, oid, index)

        seconds.setdefault(f"{allocator} {kind} put", []).append(cpu_timed(put))
        what = f"zcache on {allocator}, {kind}"
        if kind == "eph":
            took = timed_exclusive_gets(get_page, pool, keys, pages, what, time.process_time)
            backend.destroy_pool(pool)
        else:
            took = cpu_timed(get_all)
            check(pages, [get_page(pool, oid, index)[1] for oid, index in keys], what)
        seconds.setdefault(f"{allocator} {kind} get", []).append(took)
    arena = backend._arena
    assert arena is not None
    seconds.setdefault(f"{allocator} stored bytes", []).append(arena.arena.stored_bytes)
    arena.close()  # as a kill -9 leaves it: the file keeps every page
    started = time.process_time()
    again = ZcacheBackend({"capacity": capacity_for(pages), "allocator": allocator},
                          roots=roots)
    restart = time.process_time() - started
    if again.restart["pages_restored"] != len(pages):
        raise SystemExit(f"zcache on {allocator}: the restart found "
                         f"{again.restart['pages_restored']} of {len(pages)} pages")
    again.remove()
    return restart


def store_part(corpus: Corpus, repeat: int) -> None:
    pages = corpus.pages
    n = len(pages)
    seconds: dict[str, list[float]] = {}
    restarts: dict[str, float] = {}
    load = os.getloadavg()[0]
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="xentmem-store-", dir=shm) as tmp:
        for round_ in range(repeat):  # interleaved, so a slow spell hits every contender
            raw = Figure(n, {})
            raw_lz4_round(pages, raw, cpu_timed)
            seconds.setdefault("raw put", []).append(raw.best["put"])
            seconds.setdefault("raw get", []).append(raw.best["get"])
            for allocator in ALLOCATORS:
                took = store_round(pages, allocator, Path(tmp), seconds)
                if round_ == 0 and took is not None:
                    restarts[allocator] = took
    load = max(load, os.getloadavg()[0])

    def ratio(name: str, op: str) -> float:
        """The median over the rounds of raw time / store time, each round's own raw."""
        return statistics.median(r / t for r, t in zip(seconds[f"raw {op}"], seconds[name]))

    gib = n * PAGE_SIZE / (1 << 30)
    print(f"\nzcache on an arena ({n} pages, {len(set(pages))} distinct; CPU time of this "
          f"process, median of {repeat} rounds of store/raw ratios; load average {load:.1f})")
    print(f"{'allocator':<12}{'pool':<6}{'put pages/s':>13}{'get pages/s':>13}{'put/raw':>9}"
          f"{'get/raw':>9}")
    parts = []
    for allocator in ALLOCATORS:
        for kind in ("pers", "eph"):
            name = f"{allocator} {kind}"
            put_s = statistics.median(seconds[f"{name} put"])
            get_s = statistics.median(seconds[f"{name} get"])
            print(f"{allocator:<12}{kind:<6}{n / put_s:>13,.0f}{n / get_s:>13,.0f}"
                  f"{ratio(name + ' put', 'put'):>9.2f}{ratio(name + ' get', 'get'):>9.2f}")
            parts.append(f"{name} put {ratio(name + ' put', 'put'):.2f} get "
                         f"{ratio(name + ' get', 'get'):.2f}")
    stored_gib = {a: seconds[f"{a} stored bytes"][0] / (1 << 30) for a in restarts}
    print("restart (the arena as a kill -9 leaves it, zcache made again on it; CPU s): "
          + ", ".join(f"{a} {t:.2f} s = {t / gib:.2f} s per GiB of pages, "
                      f"{t / stored_gib[a]:.2f} s per GiB stored" for a, t in restarts.items()))
    print(f"\nSTORE SUMMARY: {n} pages, load {load:.1f}: " + "; ".join(parts) + "; restart "
          + ", ".join(f"{a} {t / gib:.2f} s/GiB of pages, {t / stored_gib[a]:.2f} s/GiB stored"
                      for a, t in restarts.items()))


# -- xentmem-hostd's restart ------------------------------------------------------------------


def hostd_part(corpus: Corpus, repeat: int) -> None:
    """xentmem-hostd's store after a crash: two guests' persistent pools hold every page
    (zsmalloc); then, ``repeat`` times, the run directory left as a ``kill -9`` leaves it
    and ``HostStore`` made again on it (the arena's reopen, the state table, the store's
    index, the sessions): CPU seconds, per GiB of guest pages and per GiB stored."""
    pages = corpus.pages
    n = len(pages)
    capacity = n * (PAGE_SIZE + 512) + (64 << 20)
    load = os.getloadavg()[0]
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="xentmem-hostd-", dir=shm) as tmp:
        store = HostStore(capacity, run_dir=tmp)
        pools = {d: store.new_pool(d, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) for d in (1, 2)}
        store.save_state()
        for i, page in enumerate(pages):
            domid = 1 + (i & 1)
            encoding, wire = encode_page(page)
            if store.put_page(domid, pools[domid], Oid(i >> 10 & 0xF), i >> 1, encoding,
                              wire) != 1:
                raise SystemExit(f"hostd: put {i} refused")
        for _ in range(repeat):
            store.close()  # as a kill -9 leaves it: every file stays
            started = time.process_time()
            store = HostStore(capacity, run_dir=tmp)
            times.append(time.process_time() - started)
        assert store.run is not None
        arena = store.run.arena.arena
        if len(arena) != n:
            raise SystemExit(f"hostd: the restart found {len(arena)} of {n} pages")
        stored_gib = arena.stored_bytes / (1 << 30)
        store.discard()
    load = max(load, os.getloadavg()[0])
    took = statistics.median(times)
    gib = n * PAGE_SIZE / (1 << 30)
    print(f"\nxentmem-hostd restart ({n} persistent pages of two guests, {gib:.2f} GiB of "
          f"pages, {stored_gib:.3f} GiB stored; CPU s, median of {repeat}: "
          f"{', '.join(f'{t:.2f}' for t in times)}; load average {load:.1f})")
    print(f"\nHOSTD SUMMARY: {n} pages, load {load:.1f}: restart {took:.2f} s, "
          f"{took / gib:.2f} s/GiB of pages, {took / stored_gib:.2f} s/GiB stored")


# -- report ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=8000, help="pages in the corpus")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best is reported")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random pages and mix")
    parser.add_argument("--part", choices=("all", "zcache", "arena", "store", "hostd"),
                        default="all",
                        help="zcache and the frontends, the page arena, zcache on an arena "
                             "(both pool kinds, and its restart), xentmem-hostd's restart, "
                             "or all four")
    parser.add_argument("--distinct", type=int, default=50_000,
                        help="distinct pages at most; a larger corpus cycles them")
    parser.add_argument("--no-zram", dest="zram", action="store_false",
                        help="do not hot-add a zram device for the memory table")
    args = parser.parse_args(argv)
    if args.pages < 100 or args.repeat < 1 or args.distinct < 100:
        parser.error("--pages and --distinct must be >= 100 and --repeat >= 1")

    corpus = Corpus.build(min(args.pages, args.distinct), args.seed)
    if args.pages > len(corpus.pages):
        d = len(corpus.pages)
        corpus = Corpus([corpus.pages[i % d] for i in range(args.pages)],
                        [corpus.kinds[i % d] for i in range(args.pages)])
    pages = corpus.pages
    n = len(pages)
    print(
        f"corpus: {n} pages of 4 KiB = "
        + ", ".join(f"{corpus.count(k)} {k}" for k in MIX)
        + f"; python {sys.version.split()[0]}"
    )
    if args.part in ("all", "zcache"):
        zcache_part(corpus, args.repeat)
    if args.part in ("all", "arena"):
        arena_part(corpus, args.repeat, args.distinct, args.zram)
    if args.part in ("all", "store"):
        store_part(corpus, args.repeat)
    if args.part in ("all", "hostd"):
        hostd_part(corpus, args.repeat)
    return 0


def zcache_part(corpus: Corpus, repeat: int) -> None:
    pages = corpus.pages
    n = len(pages)
    figures = {
        name: Figure(n, {})
        for name in (
            "raw lz4",
            "zcache persistent",
            "zcache private-eph",
            "zcache persistent +detailed",
            "zcache persistent, det. on-off",
            "frontswap/zcache",
            "cleancache/zcache",
        )
    }
    blocks: list[bytes] = []
    direct_stats: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="xentmem-bench-") as tmp:
        for _ in range(repeat):  # interleaved, so a slow spell hits every contender
            blocks = raw_lz4_round(pages, figures["raw lz4"])
            direct_stats = direct_round(
                pages, POOL_PRIVATE_PERSISTENT, "off", figures["zcache persistent"]
            )
            direct_round(pages, POOL_PRIVATE_EPHEMERAL, "off", figures["zcache private-eph"])
            direct_round(
                pages, POOL_PRIVATE_PERSISTENT, "on", figures["zcache persistent +detailed"]
            )
            direct_round(
                pages, POOL_PRIVATE_PERSISTENT, "on-off", figures["zcache persistent, det. on-off"]
            )
            frontswap_round(pages, Path(tmp), figures["frontswap/zcache"])
            cleancache_round(pages, Path(tmp), figures["cleancache/zcache"])

    raw = figures["raw lz4"]
    print(f"\n{'path':<30}{'put pages/s':>13}{'get pages/s':>13}{'put/raw':>9}{'get/raw':>9}")
    for name, fig in figures.items():
        print(
            f"{name:<30}{fig.rate('put'):>13,.0f}{fig.rate('get'):>13,.0f}"
            f"{fig.rate('put') / raw.rate('put'):>9.2f}{fig.rate('get') / raw.rate('get'):>9.2f}"
        )

    lean = figures["zcache persistent"]
    counted = figures["zcache persistent +detailed"]
    toggled = figures["zcache persistent, det. on-off"]

    def put_cost(fig: Figure) -> str:
        extra = fig.best["put"] / lean.best["put"] - 1
        return f"{extra:+.1%} ({(fig.best['put'] - lean.best['put']) / n * 1e9:+.0f} ns/page)"

    print(
        f"\ndetailed_stats on: put {put_cost(counted)}; switched on then off: put "
        f"{put_cost(toggled)} (the lean ops themselves run; the difference is noise)"
    )

    raw_bytes = n * PAGE_SIZE
    lz4_bytes = sum(map(len, blocks))
    print("\ncompression (original bytes / stored bytes):")
    print(f"  raw lz4 blocks, every page:        {raw_bytes / lz4_bytes:.2f}")
    print(f"  zcache data (zbytes):              {raw_bytes / direct_stats['zbytes']:.2f}")
    print(f"  zcache incl. bookkeeping (used):   {raw_bytes / direct_stats['used_bytes']:.2f}")
    for kind in MIX:
        chosen = [(p, b) for p, b, k in zip(pages, blocks, corpus.kinds) if k == kind]
        if chosen:
            stored = sum(stored_size(page, block) for page, block in chosen)
            ratio = "inf (no data)" if stored == 0 else f"{len(chosen) * PAGE_SIZE / stored:.2f}"
            print(f"  {kind:<8} pages in zcache:          {ratio}")

    put_ratio = min(figures[f].rate("put") for f in ("frontswap/zcache", "cleancache/zcache"))
    get_ratio = min(figures[f].rate("get") for f in ("frontswap/zcache", "cleancache/zcache"))
    print(
        f"\nSUMMARY: put {put_ratio / raw.rate('put'):.2f} of raw lz4, "
        f"get {get_ratio / raw.rate('get'):.2f} of raw lz4, "
        f"ratio {raw_bytes / direct_stats['zbytes']:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
