"""zbud, as the kernel's ``mm/zbud.c``: at most two compressed pages ("buddies") per frame.

A frame is 64 chunks of 64 bytes; the first chunk is the kernel's ``zbud_header`` (kept here
as reserved space: the header's fields live in this process and are rebuilt from the index),
so 63 chunks hold data.  The first buddy starts right after the header, the last buddy ends
at the frame's end.  An allocation of n chunks takes, first fit, a frame from the lowest
non-empty unbuddied list i >= n, where list i holds the frames with one buddy and exactly i
free chunks (``for_each_unbuddied_list``), most recently added first; else a new frame.
Freeing one buddy of two puts the frame back on the list of its free chunks; freeing the
last gives the frame back.

Beyond the kernel: a page longer than zbud's largest buddy (3968 bytes: the kernel's
``zbud_alloc`` refuses it with -ENOSPC) takes a frame of its own, raw ("huge"), so the arena
can hold an incompressible page under either allocator.
"""

from __future__ import annotations

from array import array
from typing import Any

from xentmem.tmem._hot import ZBUD_MAX_BUDDY, ZBUD_NCHUNKS, claim_zbud
from xentmem.tmem.arenafile import PAGE
from xentmem.tmem.frames import HUGE, ZBUD, Frames, one_record

CHUNK_SHIFT = 6
CHUNK_SIZE = 1 << CHUNK_SHIFT
#: ``ZHDR_SIZE_ALIGNED``: the header's chunk.
ZHDR_SIZE = CHUNK_SIZE
#: ``NCHUNKS``: data chunks in a frame.
NCHUNKS = (PAGE - ZHDR_SIZE) >> CHUNK_SHIFT
#: The longest buddy (``zbud_alloc``: ``size > PAGE_SIZE - ZHDR_SIZE_ALIGNED - CHUNK_SIZE``).
MAX_BUDDY = PAGE - ZHDR_SIZE - CHUNK_SIZE
#: Where a buddy starts in its frame tells which it is (a last buddy is at most 62 chunks).
FIRST_AT = ZHDR_SIZE
# A reopen's claims are C (_hot.c): the same geometry, or nothing works.
if (MAX_BUDDY, NCHUNKS) != (ZBUD_MAX_BUDDY, ZBUD_NCHUNKS):  # pragma: no cover
    raise ImportError("xentmem.tmem._hot was built for another zbud geometry: rebuild it")


def size_to_chunks(size: int) -> int:
    return (size + CHUNK_SIZE - 1) >> CHUNK_SHIFT


class Zbud:
    """The zbud allocator over the arena's frames.

    A handle is the byte offset in the data region (and a sub-field, always 0): the frame
    and where in it tell a first buddy (after the header), a last one, or a whole frame.
    """

    name = "zbud"

    def __init__(self, frames: Frames) -> None:
        self.frames = frames
        #: ``first_chunks`` / ``last_chunks`` of every frame (0 for frames not zbud's).
        self.first = bytearray(frames.total())
        self.last = bytearray(frames.total())
        #: ``unbuddied[i]``: frames with one buddy and i free chunks, last pushed on top.
        #: Entries are checked when taken (a frame that changed since is skipped), so a
        #: frame never has to be found and removed from the middle of a list.
        self.unbuddied = [array("I") for _ in range(NCHUNKS)]
        #: Bit i set: ``unbuddied[i]`` may hold a frame (the first fit is its lowest bit).
        self.nonempty = 0
        self.zbud_frames = 0
        self.huge_frames = 0
        self.unbuddied_frames = 0
        self._stale_limit = 4096

    def _grow(self) -> None:
        more = self.frames.total() - len(self.first)
        self.first.extend(bytes(more))
        self.last.extend(bytes(more))

    def alloc(self, size: int) -> tuple[int, int]:
        """A handle (offset, 0) for ``size`` bytes (1..4096)."""
        if size > MAX_BUDDY:
            frame = self.frames.alloc(1, HUGE)
            self.huge_frames += 1
            return frame * PAGE, 0
        chunks = (size + CHUNK_SIZE - 1) >> CHUNK_SHIFT
        first = self.first
        last = self.last
        unbuddied = self.unbuddied
        while True:
            # The lowest list >= chunks that may hold a frame (bit i: list i not empty).
            m = self.nonempty >> chunks
            if not m:
                break
            i = chunks + (m & -m).bit_length() - 1
            stack = unbuddied[i]
            if not stack:
                self.nonempty &= ~(1 << i)
                continue
            while stack:
                frame = stack.pop()
                a = first[frame]
                b = last[frame]
                if (a == 0) == (b == 0) or NCHUNKS - a - b != i:
                    continue  # stale: the frame changed since it was pushed
                self.unbuddied_frames -= 1
                if a == 0:
                    first[frame] = chunks
                    return frame * PAGE + FIRST_AT, 0
                last[frame] = chunks
                return (frame + 1) * PAGE - (chunks << CHUNK_SHIFT), 0
            self.nonempty &= ~(1 << i)
        frame = self.frames.alloc(1, ZBUD)
        if frame >= len(first):
            self._grow()
        self.first[frame] = chunks
        self.zbud_frames += 1
        self._push(frame, NCHUNKS - chunks)
        return frame * PAGE + FIRST_AT, 0

    def _push(self, frame: int, free_chunks: int) -> None:
        self.unbuddied[free_chunks].append(frame)
        self.nonempty |= 1 << free_chunks
        self.unbuddied_frames += 1
        self._stale_limit -= 1
        if self._stale_limit <= 0:
            self._compact_lists()

    def _compact_lists(self) -> None:
        """Drop stale entries once they could outnumber the live ones."""
        entries = sum(map(len, self.unbuddied))
        if entries > 2 * self.unbuddied_frames + 4096:
            self._rebuild_lists()
        self._stale_limit = max(4096, self.unbuddied_frames)

    def _rebuild_lists(self) -> None:
        for stack in self.unbuddied:
            del stack[:]
        count = 0
        first, last = self.first, self.last
        for frame, a in enumerate(first):
            b = last[frame]
            if (a == 0) != (b == 0):
                self.unbuddied[NCHUNKS - a - b].append(frame)
                self.nonempty |= 1 << (NCHUNKS - a - b)
                count += 1
        self.unbuddied_frames = count

    def free(self, offset: int, sub: int, size: int) -> None:
        frame, at = divmod(offset, PAGE)
        if at == 0:
            self.frames.free(frame, 1)
            self.huge_frames -= 1
            return
        first, last = self.first, self.last
        was_unbuddied = not (first[frame] and last[frame])
        if at == FIRST_AT:
            first[frame] = 0
        else:
            last[frame] = 0
        if was_unbuddied:
            self.unbuddied_frames -= 1
        if first[frame] == 0 and last[frame] == 0:
            self.frames.free(frame, 1)
            self.zbud_frames -= 1
        else:
            self._push(frame, NCHUNKS - first[frame] - last[frame])

    def holds(self, offset: int, sub: int, size: int) -> bool:
        """Whether handle ``(offset, sub)`` of ``size`` bytes is an allocation this allocator
        holds: a buddy of that many chunks at that place (a frame holds at most one first
        and one last), or a huge frame.  Whose it is only the page's checksum tells: the
        arena checks both before it frees a page's bytes."""
        frame, at = divmod(offset, PAGE)
        state = self.frames.state
        if sub or not 0 < size <= PAGE or frame >= len(state):
            return False
        if at == 0:  # a huge page's frame: not in first/last, which only buddies grow
            return size > MAX_BUDDY and state[frame] == HUGE
        chunks = size_to_chunks(size)
        if size > MAX_BUDDY or state[frame] != ZBUD or frame >= len(self.first):
            return False
        if at == FIRST_AT:
            return self.first[frame] == chunks
        return at == PAGE - (chunks << CHUNK_SHIFT) and self.last[frame] == chunks

    # -- reopening ---------------------------------------------------------------------------

    def claim_pages(self, mm: Any, pbase: int, slots: array) -> array:
        """Mark the bytes of every page record in ``slots`` (at ``pbase`` of ``mm``) taken,
        in one C pass (``_hot.claim_zbud``); the slots refused (overlap, misplaced)."""
        frames = self.frames
        if len(self.first) < frames.total():
            self._grow()
        refused, zbud, huge = claim_zbud(mm, pbase, slots, frames.state, self.first, self.last)
        self.zbud_frames += zbud
        self.huge_frames += huge
        frames.claimed(zbud + huge)
        return array("I", refused)

    def claim(self, offset: int, sub: int, size: int) -> bool:
        """Mark one handle found in the index; False if it cannot be (overlap, misplaced)."""
        rec = one_record(offset, sub, size)
        if rec is None or not self.frames.cover(min(self.frames.capacity, offset // PAGE + 1)):
            return False
        return not self.claim_pages(rec, 0, array("I", [0]))

    def finish_claims(self) -> None:
        """Fill the unbuddied lists once every handle of the index is claimed."""
        if len(self.first) < self.frames.total():
            self._grow()
        self._rebuild_lists()

    # -- figures -----------------------------------------------------------------------------

    def metadata_bytes(self) -> int:
        """Bytes of bookkeeping in this process (header fields, lists); headers in frames
        are :meth:`header_bytes`."""
        return len(self.first) + len(self.last) + 4 * sum(map(len, self.unbuddied))

    def header_bytes(self) -> int:
        """The reserved header chunk of every zbud frame."""
        return self.zbud_frames * ZHDR_SIZE

    def stats(self) -> dict[str, Any]:
        return {
            "allocator": self.name,
            "zbud_frames": self.zbud_frames,
            "buddied_frames": self.zbud_frames - self.unbuddied_frames,
            "unbuddied_frames": self.unbuddied_frames,
            "huge_frames": self.huge_frames,
            "frames_used": self.zbud_frames + self.huge_frames,
        }
