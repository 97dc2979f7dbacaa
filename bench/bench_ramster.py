"""Benchmark: RAMster's remote tier against raw pipelined SET/GET on the same Redis Cluster.

A real cluster (Debian's ``redis-server``, started and stopped here through the tests'
harness) with 3 masters, then 6, one replica each.  The pages are 4 KiB slices of the stdlib's
sources compressed with lz4, as zcache stores them.  In one process and one run, for each
cluster size:

* raw: the same compressed pages through the same cluster client, ``SET`` then ``GET`` in
  pipelines of ``--batch`` (redis-py's cluster pipeline groups them per master);
* remotify: :meth:`RemoteTier.put_many` in batches of ``--batch``, persistent (the record
  header, and ``WAIT`` for one replica per master's share) and ephemeral (a TTL, no WAIT);
* fetch: :meth:`RemoteTier.get_many` (checked records) in batches of ``--batch``.

Each figure is the best of ``--repeat`` rounds; the process's CPU time per page is printed
beside the wall time (the Redis servers' CPU is not in it).  Goal: remotify and fetch at least
0.5x raw.  The last line is the summary.

Run: ``python bench/bench_ramster.py [--pages 20000] [--batch 64] [--masters 3,6]``.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from lz4.block import compress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Redis Cluster harness (tests/fakes)

from fakes.redis_cluster import RedisClusterFixture, unavailable_reason  # noqa: E402
from redis.cluster import RedisCluster  # noqa: E402

from xentmem.guest.backends.ramster.record import RemoteKey  # noqa: E402
from xentmem.guest.backends.ramster.tier import RemoteTier, TierConfig  # noqa: E402
from xentmem.tmem.abi import PAGE_SIZE, Oid  # noqa: E402

GOAL = 0.5


def corpus(count: int) -> list[bytes]:
    """``count`` lz4-compressed 4 KiB pages of text (what zcache would hold)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    whole = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py"))[:200])
    pages = len(whole) // PAGE_SIZE
    return [compress(whole[(i % pages) * PAGE_SIZE:(i % pages + 1) * PAGE_SIZE],
                     store_size=False) for i in range(count)]


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


def run(masters: int, pages: list[bytes], batch: int, repeat: int) -> dict[str, float]:
    cluster = RedisClusterFixture(masters=masters, replicas=1).start()
    try:
        seeds = tuple(("127.0.0.1", n.port) for n in cluster.nodes[:3])
        tier = RemoteTier(TierConfig(nodes=seeds, node_id="bench", timeout_ms=5000))
        tier.connect()
        raw = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
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

        figures: dict[str, float] = {}
        for label, fn in (("raw SET", raw_set), ("raw GET", raw_get),
                          ("remotify ephemeral", remotify(False)),
                          ("remotify persistent", remotify(True)), ("fetch", fetch)):
            wall, cpu = timed(fn, repeat)
            figures[label] = wall
            print(f"  {masters} masters  {label:20s} {len(pages) / wall:9.0f} pages/s  "
                  f"{cpu / len(pages) * 1e6:6.1f} us CPU/page")
        found = tier.get_many(keys[:batch], exclusive=False)
        assert all(found.pages[k] == d for k, d in pairs[:batch]), "bench: wrong data"
        tier.close()
        raw.close()
        return figures
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--masters", default="3,6")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_ramster: {reason}")
        print("SUMMARY: not run (no Redis Cluster here)")
        return 0
    pages = corpus(args.pages)
    print(f"{len(pages)} pages, {sum(map(len, pages)) / len(pages):.0f} bytes each "
          f"compressed, batches of {args.batch}, best of {args.repeat}")
    results = {}
    for masters in (int(m) for m in args.masters.split(",")):
        results[masters] = run(masters, pages, args.batch, args.repeat)
    summary = []
    for masters, f in results.items():
        ratios = {
            "remotify": f["raw SET"] / f["remotify persistent"],
            "remotify-eph": f["raw SET"] / f["remotify ephemeral"],
            "fetch": f["raw GET"] / f["fetch"],
        }
        print(f"{masters} masters: remotify persistent {ratios['remotify']:.2f}x raw SET, "
              f"ephemeral {ratios['remotify-eph']:.2f}x, fetch {ratios['fetch']:.2f}x raw GET "
              f"(goal {GOAL}x)")
        summary.append(f"{masters}m remotify {ratios['remotify']:.2f}x fetch "
                       f"{ratios['fetch']:.2f}x")
    if len(results) > 1:
        first, last = min(results), max(results)
        scale = results[first]["remotify persistent"] / results[last]["remotify persistent"]
        print(f"scale-out {first} -> {last} masters: remotify {scale:.2f}x the throughput "
              "(one client process: the client, not the cluster, is the bound here)")
    print("SUMMARY: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
