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

Run: ``python bench/bench_pages.py [--pages 8000] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lz4.block import compress, decompress

from xentmem.guest.backends.zcache import POOR_COMPRESSION_LIMIT, ZcacheBackend
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    PRIVATE_UUID,
    ZERO_PAGE,
    Oid,
)

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


def timed(loop: Callable[[], Any]) -> float:
    """Seconds one run of ``loop`` takes, garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        loop()
        return time.perf_counter() - start
    finally:
        gc.enable()


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


# -- the contenders -------------------------------------------------------------------------


def raw_lz4_round(pages: list[bytes], fig: Figure) -> list[bytes]:
    blocks: list[bytes] = []

    def put() -> None:
        blocks[:] = [compress(page, store_size=False) for page in pages]

    def get() -> None:
        for block in blocks:
            decompress(block, uncompressed_size=PAGE_SIZE)

    fig.add("put", timed(put))
    fig.add("get", timed(get))
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
    if flags == POOL_PRIVATE_PERSISTENT:  # gets do not consume: time, then check
        fig.add("get", timed(get))
        got[:] = [store.get_page(pool, oid, index)[1] for oid, index in keys]
    else:  # exclusive gets: the timed pass is the only one
        results: list[tuple[int, bytes | None]] = []

        def get_keep() -> None:
            append = results.append
            for oid, index in keys:
                append(store.get_page(pool, oid, index))

        fig.add("get", timed(get_keep))
        got[:] = [data for _, data in results]
    check(pages, got, f"zcache direct (detailed_stats {detailed})")
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


# -- report ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=8000, help="pages in the corpus")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best is reported")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random pages and mix")
    args = parser.parse_args(argv)
    if args.pages < 100 or args.repeat < 1:
        parser.error("--pages must be >= 100 and --repeat >= 1")

    corpus = Corpus.build(args.pages, args.seed)
    pages = corpus.pages
    n = len(pages)
    print(
        f"corpus: {n} pages of 4 KiB = "
        + ", ".join(f"{corpus.count(k)} {k}" for k in MIX)
        + f"; python {sys.version.split()[0]}"
    )

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
        for _ in range(args.repeat):  # interleaved, so a slow spell hits every contender
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
