"""Benchmark: RAMster's remote tier against raw pipelined SET/GET on the same Redis Cluster.

A real cluster (Debian's ``redis-server``, started and stopped here through the tests'
harness) with 3 masters, then 6, one replica each.  The pages are 4 KiB slices of the stdlib's
sources compressed with lz4, as zcache stores them.  In one process and one run, for each
cluster size:

* raw: the same compressed pages through the same cluster client, ``SET`` then ``GET`` in
  pipelines of ``--batch`` (redis-py's cluster pipeline groups them per master);
* remotify: :meth:`RemoteTier.put_many` in batches of ``--batch``, persistent (the record
  header, and ``WAIT`` for one replica per master's share) and ephemeral (a TTL, no WAIT);
* fetch: :meth:`RemoteTier.get_many` (checked records) in batches of ``--batch``;
* through zcache (``ramster=1``, a local capacity of ``--local-mib``, its arena in a temporary
  run directory on tmpfs, as ``/run`` is under systemd, see ``--arena-dir``): the same pages,
  uncompressed, put into a persistent pool, so zcache compresses them and remotifies the
  least recently used in batches (zcache remotify: pages moved per second spent in its
  remotify, the move itself; beside it, pages moved per second of the whole put loop, which
  also compresses and stores every put locally); then every remote page read back by
  ``get_page``, one tmem op per page, as frontswap reads: by one caller (zcache fetch, 1
  caller: one round trip per page, beside raw ``GET`` of one page per round trip, what a
  per-page op can at best do), and by ``--callers`` threads at once, each reading its share
  (zcache fetch, N callers: as the kernel's NBD connections call, their gets coalesced into
  one pipeline per master).

The access pattern of the zcache fetches: first in order (each object's remote pages by
index, objects in the order they moved: a sequential swap-in, where zcache reads an
object's next remote pages ahead in one ``MGET``; the N callers each take every Nth page of
that order, so together they read in order), then the same pages in a random order (a
shuffle with a fixed seed: where readahead cannot help and must not cost much).  The
in-order figures are the ones compared before readahead existed; the random-order ones are
printed beside them and in the summary.

Each figure is the best of ``--repeat`` rounds; the process's CPU time per page is printed
beside the wall time (the Redis servers' CPU is not in it).  Goal: remotify and fetch at least
0.5x raw.  The last line is the summary.

Run: ``python bench/bench_ramster.py [--pages 20000] [--batch 64] [--masters 3,6]``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lz4.block import compress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Redis Cluster harness (tests/fakes)

from fakes.redis_cluster import (  # noqa: E402
    ADMIN_USER,
    RedisClusterFixture,
    unavailable_reason,
)

from xentmem.guest.backends.ramster.record import RemoteKey  # noqa: E402
from xentmem.guest.backends.ramster.remote import REMOTE_ENTRY_BYTES, RemotePages  # noqa: E402
from xentmem.guest.backends.ramster.tier import RemoteTier, TierConfig  # noqa: E402
from xentmem.guest.backends.zcache import ZcacheBackend  # noqa: E402
from xentmem.roots import Roots  # noqa: E402
from xentmem.tmem.abi import PAGE_SIZE, POOL_PRIVATE_PERSISTENT, PRIVATE_UUID, Oid  # noqa: E402

GOAL = 0.5
#: zcache's arena is a file on tmpfs (``docs/zcache.md``); /tmp may be a disk.
SHM = "/dev/shm"


def corpus(count: int) -> list[bytes]:
    """``count`` 4 KiB pages of text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    whole = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py"))[:200])
    pages = len(whole) // PAGE_SIZE
    return [whole[(i % pages) * PAGE_SIZE:(i % pages + 1) * PAGE_SIZE] for i in range(count)]


def compressed(raw: list[bytes]) -> list[bytes]:
    """The pages as zcache holds them (lz4 blocks)."""
    return [compress(page, store_size=False) for page in raw]


def timed(fn: Callable[[], None], repeat: int) -> tuple[float, float]:
    """Best wall and CPU seconds of ``repeat`` runs."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run(masters: int, raw_pages: list[bytes], batch: int, repeat: int,
        local_mib: int, callers: int, arena_dir: str | None) -> dict[str, float]:
    pages = compressed(raw_pages)
    cluster = RedisClusterFixture(masters=masters, replicas=1).start()
    try:
        seeds = tuple(("127.0.0.1", n.port) for n in cluster.nodes[:3])
        # the harness's own user: the clusters' default user is off (docs/ramster.md)
        tier = RemoteTier(TierConfig(nodes=seeds, node_id="bench", timeout_ms=5000,
                                     user=ADMIN_USER,
                                     password_file=str(cluster.admin_password_file())))
        tier.connect()
        raw = cluster.admin_cluster()
        keys = [RemoteKey("bench", 1, Oid(i // 64, 0, 0), i % 64) for i in range(len(pages))]
        names = [k.name() for k in keys]
        pairs = list(zip(keys, pages))

        def raw_set() -> None:
            for chunk in batches(list(zip(names, pages)), batch):
                pipe = raw.pipeline()
                for name, data in chunk:
                    pipe.set(name, data)
                pipe.execute()

        def raw_get() -> None:
            for chunk in batches(names, batch):
                pipe = raw.pipeline()
                for name in chunk:
                    pipe.get(name)
                pipe.execute()

        def remotify(persistent: bool) -> Callable[[], None]:
            def go() -> None:
                for chunk in batches(pairs, batch):
                    done = tier.put_many(chunk, persistent=persistent)
                    if len(done.acknowledged) != len(chunk):
                        raise SystemExit(f"bench: a put was not acknowledged: {done.errors}")
            return go

        def fetch() -> None:
            for chunk in batches(keys, batch):
                found = tier.get_many(chunk, exclusive=False)
                if len(found.pages) != len(chunk):
                    raise SystemExit("bench: a fetch missed")

        def raw_get_one() -> None:
            for name in names:
                raw.get(name)

        figures: dict[str, float] = {}
        for label, fn in (("raw SET", raw_set), ("raw GET", raw_get),
                          ("raw GET one by one", raw_get_one),
                          ("remotify ephemeral", remotify(False)),
                          ("remotify persistent", remotify(True)), ("fetch", fetch)):
            wall, cpu = timed(fn, repeat)
            figures[label] = len(pages) / wall
            print(f"  {masters} masters  {label:22s} {len(pages) / wall:9.0f} pages/s  "
                  f"{cpu / len(pages) * 1e6:6.1f} us CPU/page")
        found = tier.get_many(keys[:batch], exclusive=False)
        assert all(found.pages[k] == d for k, d in pairs[:batch]), "bench: wrong data"
        tier.close()
        raw.close()
        figures.update(through_zcache(cluster, masters, raw_pages, repeat, local_mib, callers,
                                      arena_dir))
        return figures
    finally:
        cluster.stop()


def fetch_by(made: ZcacheBackend, pool: int, remote: list[tuple[Oid, int]],
             raw_pages: list[bytes], callers: int) -> float:
    """Wall seconds for ``callers`` threads to get every remote page, each its share."""
    start = threading.Barrier(callers + 1)
    failed: list[str] = []

    def share(first: int) -> None:
        start.wait()
        for oid, index in remote[first::callers]:
            n = oid[0] * 512 + index
            if made.get_page(pool, oid, index) != (1, raw_pages[n]):
                failed.append(f"bench: zcache fetch of page {n} failed")
                return

    threads = [threading.Thread(target=share, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    start.wait()
    wall = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    if failed:
        raise SystemExit(failed[0])
    return wall


def fetch_rounds(made: ZcacheBackend, pool: int, remote: list[tuple[Oid, int]],
                 raw_pages: list[bytes], callers: int, masters: int, order: str,
                 best: dict[str, float]) -> None:
    """``remote`` read back in its order by one caller, then by ``callers`` threads."""
    def read_ahead() -> tuple[int, int]:
        stats = made.stats()
        return stats.get("ramster_readahead_pages", 0), stats.get("ramster_readahead_hits", 0)

    ahead = read_ahead()
    wall, cpu = time.perf_counter(), time.process_time()
    for oid, index in remote:
        n = oid[0] * 512 + index
        if made.get_page(pool, oid, index) != (1, raw_pages[n]):
            raise SystemExit(f"bench: zcache fetch of page {n} failed")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    now = read_ahead()
    best["zcache fetch" + order] = max(best["zcache fetch" + order], len(remote) / wall)
    print(f"  {masters} masters  zcache fetch{order}, 1 caller {len(remote) / wall:9.0f} "
          f"pages/s  ({len(remote)} remote pages, {cpu / max(len(remote), 1) * 1e6:.1f}"
          f" us CPU/page, {now[0] - ahead[0]} read ahead, {now[1] - ahead[1]} served from "
          "there)")
    fetcher = made._remote.fetcher if made._remote is not None else None
    calls = fetcher.calls if fetcher is not None else 0
    ahead = now
    cpu = time.process_time()
    wall = fetch_by(made, pool, remote, raw_pages, callers)
    cpu = time.process_time() - cpu
    calls = (fetcher.calls if fetcher is not None else 0) - calls
    now = read_ahead()
    best["zcache fetch N" + order] = max(best["zcache fetch N" + order], len(remote) / wall)
    print(f"  {masters} masters  zcache fetch{order}, {callers} callers"
          f"{len(remote) / wall:8.0f} pages/s  ({cpu / max(len(remote), 1) * 1e6:.1f} us "
          f"CPU/page, {calls} calls of the fetcher, {now[0] - ahead[0]} read ahead, "
          f"{now[1] - ahead[1]} served from there)")


def local_capacity_mib(asked_mib: int, pages: int) -> int:
    """At least ``asked_mib``, and enough that the index of ``pages`` remote pages (charged
    to the local capacity, REMOTE_ENTRY_BYTES each: docs/ramster.md) takes at most a quarter:
    beyond, the local store shrinks to nothing and every put waits for a remotify of a page
    or two, which measures a full node, not remotify (20,000 pages in 4 MiB: 7811 batches
    of 2-3 pages)."""
    return max(asked_mib, -(-4 * pages * REMOTE_ENTRY_BYTES // (1 << 20)))


def remotify_clock(remote: RemotePages) -> list[float]:
    """Time every remotify of ``remote`` (wall, CPU seconds, summed into the list returned):
    the move itself (choosing the pages, reading them out of the local store, the pipelines
    and ``WAIT``, the bookkeeping), which runs inside the puts that ran short of room, as
    RAMster's remotify ran beside zswap's stores in the kernel's workqueue."""
    spent = [0.0, 0.0]
    move = remote.remotify

    def timed_remotify(cost: int = 0) -> int:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return move(cost)
        finally:
            spent[0] += time.perf_counter() - wall
            spent[1] += time.process_time() - cpu

    remote.remotify = timed_remotify  # type: ignore[method-assign]
    return spent


def through_zcache(cluster: RedisClusterFixture, masters: int, raw_pages: list[bytes],
                   repeat: int, local_mib: int, callers: int,
                   arena_dir: str | None) -> dict[str, float]:
    """zcache remotify and fetch rates (pages per second of remote pages), best of
    ``repeat`` rounds; each round a fresh pool."""
    # enough pages that most of them must move: four times what the local store holds
    enough = local_mib * (1 << 20) * 4 // max(1, sum(map(len, compressed(raw_pages[:100]))) // 100)
    raw_pages = (raw_pages * (enough // len(raw_pages) + 1))[:max(enough, len(raw_pages))]
    local_mib = local_capacity_mib(local_mib, len(raw_pages))
    run_dir = Path(tempfile.mkdtemp(prefix="bench-ramster-", dir=arena_dir))
    print(f"  {masters} masters  zcache: {len(raw_pages)} pages put, local capacity "
          f"{local_mib} MiB")
    made = ZcacheBackend({"capacity": f"{local_mib}M", "ramster": True,
                          "ramster_nodes": cluster.seeds(), "ramster_node_id": "bench-zc",
                          "ramster_user": ADMIN_USER,
                          "ramster_password_file": str(cluster.admin_password_file()),
                          "ramster_timeout_ms": 5000}, roots=Roots(run_dir=run_dir))
    best = {"zcache remotify": 0.0, "zcache puts moving": 0.0, "zcache fetch": 0.0,
            "zcache fetch N": 0.0, "zcache fetch random": 0.0, "zcache fetch N random": 0.0}
    assert made._remote is not None
    in_remotify = remotify_clock(made._remote)
    try:
        for _ in range(repeat):
            pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
            before = made.stats()["ramster_remotified"]
            in_remotify[:] = [0.0, 0.0]
            wall, cpu = time.perf_counter(), time.process_time()
            for n, page in enumerate(raw_pages):
                if made.put_page(pool, Oid(n // 512), n % 512, page) != 1:
                    raise SystemExit(f"bench: zcache put {n} failed")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            moved = made.stats()["ramster_remotified"] - before
            remote = made._remote.remote_keys(pool)
            move_wall, move_cpu = in_remotify
            best["zcache remotify"] = max(best["zcache remotify"], moved / move_wall)
            best["zcache puts moving"] = max(best["zcache puts moving"], moved / wall)
            print(f"  {masters} masters  zcache remotify        {moved / move_wall:9.0f} pages/s  "
                  f"({moved} of {len(raw_pages)} pages moved in {move_wall:.2f} s of remotify, "
                  f"{move_cpu / max(moved, 1) * 1e6:.1f} us CPU/page moved)")
            print(f"  {masters} masters  zcache puts, moving    {moved / wall:9.0f} pages/s  "
                  f"(pages moved per second of the whole put loop, the local compressing "
                  f"and storing of all {len(raw_pages)} puts included: {wall:.2f} s, "
                  f"{cpu / max(moved, 1) * 1e6:.1f} us CPU/page moved)")
            shuffled = list(remote)
            random.Random(1).shuffle(shuffled)
            for order, keys in (("", remote), (" random", shuffled)):
                fetch_rounds(made, pool, keys, raw_pages, callers, masters, order, best)
            made.destroy_pool(pool)
    finally:
        made.remove()
        shutil.rmtree(run_dir, ignore_errors=True)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--masters", default="3,6")
    parser.add_argument("--local-mib", type=int, default=4,
                        help="zcache's local capacity in the through-zcache rounds, at "
                             "least (raised so the remote index takes at most a quarter)")
    parser.add_argument("--callers", type=int, default=8,
                        help="threads getting pages at once in the N-caller zcache fetch "
                             "(the swap frontend opens up to 8 NBD connections)")
    parser.add_argument("--arena-dir", default=SHM if Path(SHM).is_dir() else None,
                        help="where zcache's run directory (its arena) is made: a tmpfs, as "
                             f"/run is under systemd (default {SHM}, else the temporary "
                             "directory)")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_ramster: {reason}")
        print("SUMMARY: not run (no Redis Cluster here)")
        return 0
    pages = corpus(args.pages)
    print(f"{len(pages)} pages, {sum(map(len, compressed(pages))) / len(pages):.0f} bytes "
          f"each compressed, batches of {args.batch}, best of {args.repeat}, zcache's arena "
          f"in {args.arena_dir or tempfile.gettempdir()}")
    results = {}
    for masters in (int(m) for m in args.masters.split(",")):
        results[masters] = run(masters, pages, args.batch, args.repeat, args.local_mib,
                               args.callers, args.arena_dir)
    summary = []
    callers = args.callers
    for masters, f in results.items():
        ratios = {
            "remotify": f["remotify persistent"] / f["raw SET"],
            "remotify-eph": f["remotify ephemeral"] / f["raw SET"],
            "fetch": f["fetch"] / f["raw GET"],
            "zc-remotify": f["zcache remotify"] / f["raw SET"],
            "zc-puts": f["zcache puts moving"] / f["raw SET"],
            "zc-fetch": f["zcache fetch"] / f["raw GET"],
            "zc-fetch-one": f["zcache fetch"] / f["raw GET one by one"],
            "zc-fetch-n": f["zcache fetch N"] / f["raw GET"],
            "zc-fetch-rnd": f["zcache fetch random"] / f["raw GET"],
            "zc-fetch-n-rnd": f["zcache fetch N random"] / f["raw GET"],
        }
        print(f"{masters} masters: tier remotify persistent {ratios['remotify']:.2f}x raw SET, "
              f"ephemeral {ratios['remotify-eph']:.2f}x, fetch {ratios['fetch']:.2f}x raw GET; "
              f"zcache remotify {ratios['zc-remotify']:.2f}x raw SET (per second of the whole put "
              f"loop {ratios['zc-puts']:.2f}x), zcache fetch by 1 "
              f"caller {ratios['zc-fetch']:.2f}x raw pipelined GET ({ratios['zc-fetch-one']:.2f}x"
              f" raw GET one by one), by {callers} callers {ratios['zc-fetch-n']:.2f}x raw "
              f"pipelined GET, in order (goal {GOAL}x); in random order by 1 caller "
              f"{ratios['zc-fetch-rnd']:.2f}x, by {callers} callers "
              f"{ratios['zc-fetch-n-rnd']:.2f}x raw pipelined GET")
        summary.append(f"{masters}m remotify {ratios['remotify']:.2f}x fetch "
                       f"{ratios['fetch']:.2f}x zcache remotify {ratios['zc-remotify']:.2f}x "
                       f"(whole put loop {ratios['zc-puts']:.2f}x) "
                       f"fetch in order 1 caller {ratios['zc-fetch']:.2f}x "
                       f"({ratios['zc-fetch-one']:.2f}x one by one) {callers} callers "
                       f"{ratios['zc-fetch-n']:.2f}x, random order 1 caller "
                       f"{ratios['zc-fetch-rnd']:.2f}x {callers} callers "
                       f"{ratios['zc-fetch-n-rnd']:.2f}x")
    if len(results) > 1:
        first, last = min(results), max(results)
        for label in ("raw SET", "remotify persistent", "zcache remotify"):
            scale = results[last][label] / results[first][label]
            print(f"scale-out {first} -> {last} masters: {label} {scale:.2f}x the throughput")
        print("(one client process on this machine: the client and the machine's cores, not "
              "the cluster, bound these figures)")
    print("SUMMARY: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
