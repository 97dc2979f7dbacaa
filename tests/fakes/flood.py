"""Flood helpers: the pages a flood puts, and a process's memory as the kernel counts it.

The RSS bound (``docs/page-arena.md``, "Memory given back"): with ``capacity`` C, whatever a
flood puts, the process's resident memory stays within ``(C + its idle RSS) * 1.1``.  RSS
here is the kernel's: anonymous memory, mapped files and the arena's tmpfs pages
(``RssShmem``), from ``/proc/PID/status`` through psutil.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import psutil

from xentmem.tmem.abi import PAGE_SIZE, ZERO_PAGE

MIB = 1 << 20
CAPACITY = 64 * MIB
#: The bound's slack over capacity + idle RSS.
SLACK = 1.10
#: The kinds of page a flood puts.
KINDS = ("zero", "random", "text")


def rss_parts(pid: int) -> dict[str, int]:
    """VmRSS and its parts (anonymous, file, shmem: the arena's mapping), in bytes."""
    process = psutil.Process(pid)
    out = {"rss": process.memory_info().rss}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "RssShmem"):
                out[name] = int(value.split()[0]) * 1024
    return out


class Pages:
    """Pages of each kind, made from one seed (random pages are never the same twice)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seq = 0

    def page(self, kind: str) -> bytes:
        self.seq += 1
        if kind == "zero":
            return ZERO_PAGE
        if kind == "random":
            return self.rng.randbytes(PAGE_SIZE)
        return ((self.seq.to_bytes(8, "little") + b"a swapped-out text page " * 3)
                * PAGE_SIZE)[:PAGE_SIZE]


@dataclass
class Watch:
    """The highest RSS seen, and the bound it is held to."""

    pid: int
    capacity: int = CAPACITY
    idle: int = 0
    peak: dict[str, int] = field(default_factory=dict)
    seen: list[tuple[str, int]] = field(default_factory=list)

    def start(self) -> None:
        self.idle = rss_parts(self.pid)["rss"]

    @property
    def bound(self) -> int:
        return int((self.capacity + self.idle) * SLACK)

    def sample(self, label: str) -> int:
        parts = rss_parts(self.pid)
        if parts["rss"] > self.peak.get("rss", 0):
            self.peak = parts
        self.seen.append((label, parts["rss"] // MIB))
        return parts["rss"]

    def report(self) -> str:
        return (f"idle {self.idle // MIB} MiB, bound {self.bound // MIB} MiB, peak "
                + ", ".join(f"{k} {v // MIB}" for k, v in self.peak.items())
                + f" MiB; samples {self.seen}")
