"""A flood of puts into a real ``xentmemd`` with zcache at ``capacity=64M``: whatever the mix
(incompressible, zero, compressible; frontswap's persistent and cleancache's ephemeral
pages; the same keys put again), the daemon's RSS, the arena's tmpfs pages included, stays
within ``(capacity + idle RSS) * 1.1`` (``docs/page-arena.md``, "Memory given back").

The pages go over the control socket, many requests written before their answers are read
(the server reads a connection's lines in order), so the flood is about a minute on a busy
machine.  Nothing is timed: the RSS is sampled between batches and at the end of each phase.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path
from typing import Any

from fakes.flood import CAPACITY, MIB, Pages, Watch

#: Frontswap offsets (the swap area's size: its persistent pages stay under the capacity, so
#: none goes to the file, which would only slow the flood) and cleancache indexes per inode.
AREA = 6_000
PER_INODE = 1024
#: Requests written before their answers are read (well under the server's line limit).
BATCH = 8
ARGS = ("-o", "tmem.selfballooning_at_load=0", "-o", "tmem.selfshrinking=0",
        "-o", "backend=zcache", "-o", f"zcache.capacity={CAPACITY // MIB}M")
#: (kind, puts): half frontswap (persistent), half cleancache (ephemeral).  Incompressible
#: pages fill the capacity first; zero and text pages then replace them (duplicates on the
#: same offsets) and come on top of them.
PHASES = (("random", 20_000), ("zero", 24_000), ("text", 8_000), ("random", 8_000))


class Pipe:
    """The control socket with requests pipelined ``BATCH`` at a time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")
        self.next_id = 0

    def calls(self, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        lines = []
        for op, args in requests:
            self.next_id += 1
            lines.append(json.dumps({"v": 1, "id": self.next_id, "op": op, "args": args}))
        self.sock.sendall(("\n".join(lines) + "\n").encode())
        results = []
        for _ in requests:
            answer = json.loads(self.reader.readline())
            assert answer.get("ok"), answer
            results.append(answer["result"])
        return results

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def test_a_flood_of_any_mix_keeps_xentmemd_within_its_capacity(
        tmp_path: Path, fake_root: Path, start_daemon: Any) -> None:
    daemon = start_daemon(fake_root, None, *ARGS)
    pipe = Pipe(daemon.socket)
    try:
        (area,) = pipe.calls([("frontswap.init", {"pages": AREA, "backing": "file"})])
        (fs,) = pipe.calls([("cleancache.init_fs", {})])
        watch = Watch(daemon.proc.pid)
        watch.start()
        pages = Pages(20261203)
        seq = 0
        took = []
        for kind, count in PHASES:
            began = time.monotonic()
            for start in range(0, count, BATCH):
                batch = []
                for n in range(start, min(count, start + BATCH)):
                    data = base64.b64encode(pages.page(kind)).decode()
                    seq += 1
                    if n % 2:
                        batch.append(("frontswap.store", {"type": area["type"],
                                                          "offset": seq % AREA, "data": data}))
                    else:
                        batch.append(("cleancache.put_page", {
                            "pool_id": fs["pool_id"], "key": seq // PER_INODE,
                            "index": seq % PER_INODE, "data": data}))
                pipe.calls(batch)
                if start % 4096 == 0:
                    assert watch.sample(kind) <= watch.bound, watch.report()
            assert watch.sample(f"{kind} done") <= watch.bound, watch.report()
            took.append(f"{kind} {count} puts {time.monotonic() - began:.1f}s")
        (stats,) = pipe.calls([("stats", {})])
    finally:
        pipe.close()
    backend = stats["backend"]
    assert backend["evictions"] > 0, backend  # the capacity was reached
    assert backend["memory_bytes"] <= CAPACITY + (64 << 10), backend
    print(watch.report(), took)
