"""Benchmark: the stand-in xenstored's CPU per request, as a ratio of its pyxs client's.

The server runs as ``python -m xentmem.mock_xenstored`` in its own process (as in
``bench_xen.py``); this process is guest 1 and does pyxs ``write`` then ``read`` of a node
in its ``data/``, ``--ops`` times per round.  Per round trip it reports the server's CPU
time (read from ``/proc`` through psutil), the client's (pyxs and its router thread: the
baseline, Python doing the other half of the same exchange) and the wall time.  Rounds
are interleaved and the medians of the per-round ratios reported, so a neighbour stealing
the CPU moves both sides of a ratio.

``--other-tree DIR`` also runs the server from another checkout (an older commit exported
with ``git archive``) in the same rounds, to compare two versions of the server.

The last line is the summary::

    SUMMARY: server N us CPU per write+read (x.xx of the client's), wall N us[; other
    tree N us (x.xx of this tree's)]

Run: ``python bench/bench_mock_xenstored.py [--ops 2000] [--rounds 5] [--other-tree DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyxs

GUEST = 1
START_TIMEOUT_S = 30.0


class Server:
    """The stand-in xenstored as a subprocess, importing ``xentmem`` from ``tree``."""

    def __init__(self, tree: Path | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="xs-bench-", dir="/tmp"))
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree),
                                                              env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xentmem.mock_xenstored", "--dir", str(self.dir),
             "--domain", str(GUEST)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
            cwd=str(tree) if tree is not None else None)
        assert self.proc.stdout is not None
        for _ in range(2):  # XENSTORED_PATH=..., DOMAIN_1_SOCKET=...
            if not self.proc.stdout.readline():
                raise RuntimeError("the server did not start")
        self.process = psutil.Process(self.proc.pid)
        self.client = pyxs.Client(unix_socket_path=str(self.dir / f"domain-{GUEST}.sock"))
        self.client.connect()
        self.client.write(b"data/bench", b"0")

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(server: Server, ops: int) -> dict[str, float]:
    """Per write+read round trip, in microseconds: server CPU, client CPU, wall."""
    client = server.client
    server_before, client_before = server.cpu(), time.process_time()
    start = time.perf_counter()
    for i in range(ops):
        client.write(b"data/bench", str(i).encode())
        if client.read(b"data/bench") != str(i).encode():
            raise RuntimeError("read back the wrong value")
    wall = time.perf_counter() - start
    per_op = 1e6 / ops
    return {
        "server": (server.cpu() - server_before) * per_op,
        "client": (time.process_time() - client_before) * per_op,
        "wall": wall * per_op,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="round trips per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--other-tree", type=Path, help="also run the server from this checkout")
    args = parser.parse_args()
    trees: dict[str, Path | None] = {"this": None}
    if args.other_tree is not None:
        trees["other"] = args.other_tree.resolve()
    servers = {name: Server(tree) for name, tree in trees.items()}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        for server in servers.values():  # warm up
            measure(server, min(args.ops, 200))
        for round_no in range(args.rounds):
            for name, server in servers.items():
                row = measure(server, args.ops)
                rows[name].append(row)
                print(f"round {round_no + 1} {name:5}: server {row['server']:6.1f} us, "
                      f"client {row['client']:6.1f} us, wall {row['wall']:6.1f} us")
    finally:
        for server in servers.values():
            server.close()

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    ratio = statistics.median(r["server"] / r["client"] for r in rows["this"])
    summary = (f"SUMMARY: server {median('this', 'server'):.0f} us CPU per write+read "
               f"({ratio:.2f} of the client's), wall {median('this', 'wall'):.0f} us")
    if "other" in rows:
        other = statistics.median(o["server"] / t["server"]
                                  for o, t in zip(rows["other"], rows["this"]))
        summary += (f"; other tree {median('other', 'server'):.0f} us "
                    f"({other:.2f} of this tree's)")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
