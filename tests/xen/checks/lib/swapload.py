"""A workload that makes the guest kernel swap, and proves every page came back intact.

Run as ``python3 -m swapload PAGES SEED`` (``checks/lib`` is on ``PYTHONPATH`` in the
guests).  It maps PAGES anonymous pages in chunks, writes each page once with its own
checksum, then reads every page back twice and verifies it: a page holds its index, the
seed, a payload and a BLAKE2b digest of all that, so a page that came back from swap with
any other content (another page's, zeroes, a torn write) fails.  Then it waits for commands
on stdin, one a line, and answers each with one JSON line on stdout:

``release KEEP``  unmaps all chunks but every KEEP-th (so that what is left fits in RAM
                   before ``swapoff`` must bring it back) and answers how many pages it kept;
``verify``         reads the kept pages again and answers the verdict;
``exit``           ends.

Its first JSON lines report the passes (``{"phase": "written", ...}``, ``"verified"`` twice).

The payload is a short per-page pattern repeated: it compresses well, so that a backend that
compresses (``zcache``) keeps the guest's swap in a fraction of the RAM it frees.  While the
device is behind (more than ``MAX_WRITEBACK_KB`` queued for writeback), or free memory is
below ``MIN_FREE_KB`` while reclaim writes, the writer waits for the device to catch up
(see :func:`behind`): a PV guest under software emulation lets one process dirty memory far faster
than its swap device takes it (every page a trip through xenstore to dom0), and then the
kernel's last reserves go to the dirtier instead of the swap server, and the tasks that
submit swap writes (kswapd, the dirtier in direct reclaim) wait minutes on the device's
full socket: the hung-task detector reported both after 120 s in the bed before this wait
looked at the writeback queue.  The wait is bounded by ``deadline`` (seconds since the
epoch, the bed's), never by a figure.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PAGE = 4096
CHUNK_PAGES = 256  # 1 MiB: what ``release`` frees or keeps at a time
HEADER = struct.Struct("<QQ")  # index, seed
DIGEST = 16
PAYLOAD = PAGE - HEADER.size - DIGEST
MAGIC = b"xentmem-swapload"
#: Below this much free memory the writer lets reclaim catch up (see the module docstring).
MIN_FREE_KB = 12 * 1024
#: Pages queued for writeback beyond this much count as not free (see the module docstring).
MAX_WRITEBACK_KB = 1024
FREE_POLL_S = 0.05
FREE_CHECK_EVERY = 32  # pages written between two looks at /proc/meminfo


def make_page(index: int, seed: int) -> bytes:
    pattern = MAGIC + HEADER.pack(index, seed)
    body = HEADER.pack(index, seed) + (pattern * (PAYLOAD // len(pattern) + 1))[:PAYLOAD]
    return body + hashlib.blake2b(body, digest_size=DIGEST).digest()


def page_problem(data: bytes, index: int, seed: int) -> str:
    """"" when ``data`` is the page written at ``index``; else what is wrong with it."""
    body, digest = data[:-DIGEST], data[-DIGEST:]
    if hashlib.blake2b(body, digest_size=DIGEST).digest() != digest:
        if not any(data):
            return "zeroes"
        return "checksum mismatch"
    got_index, got_seed = HEADER.unpack_from(body)
    if (got_index, got_seed) != (index, seed):
        return f"intact page {got_index} of seed {got_seed} in its place"
    return ""


def memory_kb(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    """Free memory and what is under writeback (to the swap device), in kB."""
    figures = {}
    for line in meminfo.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemFree", "Writeback"):
            figures[key] = int(rest.split()[0])
    return figures.get("MemFree", 0), figures.get("Writeback", 0)


def behind(free: int, writeback: int) -> bool:
    """Should the writer wait?  While the device is behind (more than MAX_WRITEBACK_KB
    queued), or memory is low and reclaim is writing: not while memory is low and nothing
    is being written, for then only the writer's next allocation makes the kernel reclaim
    (waiting for free memory that kswapd, above its watermarks, would never make, the writer
    waited for good in the bed)."""
    return writeback > MAX_WRITEBACK_KB or (free < MIN_FREE_KB and writeback > 0)


class Load:
    """The workload's memory: chunks of anonymous pages, each page at its global index."""

    def __init__(self, pages: int, seed: int, *, deadline: float = 0.0,
                 free: Callable[[], tuple[int, int]] = memory_kb) -> None:
        self.pages, self.seed = pages, seed
        self.deadline, self.free = deadline, free
        self.chunks: dict[int, mmap.mmap] = {}
        for first in range(0, pages, CHUNK_PAGES):
            count = min(CHUNK_PAGES, pages - first)
            self.chunks[first] = mmap.mmap(-1, count * PAGE)
        self.throttled_s = 0.0

    def _pages(self) -> Iterator[tuple[mmap.mmap, int, int]]:
        for first, chunk in self.chunks.items():
            for i in range(len(chunk) // PAGE):
                yield chunk, i * PAGE, first + i

    def _let_reclaim_catch_up(self) -> None:
        started = time.monotonic()
        while behind(*self.free()) and (not self.deadline or time.time() < self.deadline):
            time.sleep(FREE_POLL_S)
        self.throttled_s += time.monotonic() - started

    def write(self) -> int:
        written = 0
        for chunk, at, index in self._pages():
            if written % FREE_CHECK_EVERY == 0:
                self._let_reclaim_catch_up()
            chunk[at:at + PAGE] = make_page(index, self.seed)
            written += 1
        return written

    def verify(self) -> dict[str, object]:
        """Every page still mapped, checked; the first few problems named."""
        checked, bad = 0, []
        for chunk, at, index in self._pages():
            problem = page_problem(chunk[at:at + PAGE], index, self.seed)
            checked += 1
            if problem:
                bad.append(f"page {index}: {problem}")
        return {"checked": checked, "bad": len(bad), "first_bad": bad[:5]}

    def release(self, keep_every: int) -> int:
        """Unmap all chunks but every ``keep_every``-th; the pages kept."""
        for n, first in enumerate(sorted(self.chunks)):
            if n % keep_every:
                self.chunks.pop(first).close()
        return sum(len(c) // PAGE for c in self.chunks.values())


def answer(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main(argv: list[str]) -> int:
    pages, seed = int(argv[0]), int(argv[1])
    deadline = float(argv[2]) if len(argv) > 2 else 0.0
    load = Load(pages, seed, deadline=deadline)
    started = time.monotonic()
    written = load.write()
    answer(phase="written", pages=written, seconds=round(time.monotonic() - started, 1),
           throttled_s=round(load.throttled_s, 1))
    for n in (1, 2):
        started = time.monotonic()
        verdict = load.verify()
        answer(phase="verified", round=n, seconds=round(time.monotonic() - started, 1),
               **verdict)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "release":
            answer(phase="released", kept=load.release(int(words[1])))
        elif words[0] == "verify":
            answer(phase="verified", round="kept", **load.verify())
        elif words[0] == "exit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
