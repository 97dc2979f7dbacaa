"""The 4 KiB frames of the arena's data region: which are in use, and runs of them.

Both allocators take their memory here, as the kernel's take pages from the page allocator:
zbud one frame at a time, zsmalloc a run of up to 8 for one zspage.  A zspage's frames are
contiguous, so an object that straddles two of them is one slice of the map.  The map is one
byte per frame (what holds it), kept in this process only: it is rebuilt from the index when
the arena is reopened.  The region's memory is reserved a step at a time as frames are first
needed; the memory of free frames is given back to tmpfs (a hole in the file) once more than
:data:`IDLE_FRAMES` of them hold memory, or when the store asks (:meth:`Frames.trim`), and
taken again when such a frame is reused: so the memory the arena holds is the frames in use
and a bounded few more (``docs/page-arena.md``, "Memory given back").
"""

from __future__ import annotations

import re
import struct
from array import array

from xentmem.errors import ArenaError
from xentmem.tmem import _hot
from xentmem.tmem.arenafile import DATA, DATA_STEP, PAGE, ArenaFile

#: What holds a frame (one byte per frame).
FREE = 0
ZBUD = 1
HUGE = 2
ZSPAGE_HEAD = 3
ZSPAGE_TAIL = 4
#: Free, and its memory given back to tmpfs (a hole in the file).
UNBACKED = 5
#: The longest run one allocation takes (the kernel's CONFIG_ZSMALLOC_CHAIN_SIZE default).
MAX_RUN = 8
#: Free frames that may keep their memory (1 MiB), or 1/:data:`IDLE_SHARE` of the frames
#: reserved if more: beyond, the frames freed since the last trim give it back.
IDLE_FRAMES = 256
IDLE_SHARE = 64
#: Unbacked frames taken back at once when one is reused (one reservation for several).
BACK_FRAMES = 64
# The rebuild's claims mark frames in C (_hot.c): the same tags, or nothing works.
if (ZBUD, HUGE, ZSPAGE_HEAD, ZSPAGE_TAIL, UNBACKED) != (  # pragma: no cover
        _hot.FRAME_ZBUD, _hot.FRAME_HUGE, _hot.FRAME_ZS_HEAD, _hot.FRAME_ZS_TAIL,
        _hot.FRAME_UNBACKED):
    raise ImportError("xentmem.tmem._hot was built for other frame tags: rebuild it")
_ONE_RECORD = struct.Struct("<IIIHHI")  # index.py's PAGE_ALL
_UNIT = 16  # arena.py's UNIT: a page's bytes start on a multiple of it


def one_record(offset: int, sub: int, size: int) -> bytes | None:
    """A page record naming handle ``(offset, sub)`` of ``size`` bytes (None if no record
    can, or it would name no allocation: no bytes, not on a 16-byte boundary, a field too
    wide): an allocator's single ``claim`` goes through the same C as a reopen's claims."""
    if offset < 0 or offset % _UNIT or not 0 < size <= 0xFFFF or not 0 <= sub <= 0xFFFF \
            or offset // _UNIT > 0xFFFFFFFF:
        return None
    return _ONE_RECORD.pack(0, 0, offset // _UNIT, size, sub, 1)


_FREE_RUNS = re.compile(b"\\x00+")
_UNBACKED_RUN = re.compile(b"\\x05+")
_UNBACKED = [bytes((UNBACKED,)) * n for n in range(MAX_RUN + 1)]
_UNBACKED_ANY = bytes((UNBACKED,))


class Frames:
    """Frame allocation over the data region of one :class:`ArenaFile`."""

    def __init__(self, file: ArenaFile) -> None:
        self.file = file
        self.capacity = file.sizes[DATA] // PAGE
        self.step = min(file.segment_size, DATA_STEP) // PAGE
        self.state = bytearray()
        self.used = 0
        #: Frames whose memory is held (in use, or free and not given back).
        self.resident = 0
        #: No free run of length n starts before ``_hints[n]``.
        self._hints = [0] * (MAX_RUN + 1)
        #: Runs freed since the last trim (``frame << 4 | length``): what a trim looks at
        #: first, instead of the whole map.
        self._freed = array("Q")
        #: Free frames that keep their memory before a free trims (see IDLE_SHARE).
        self.idle_allowance = IDLE_FRAMES

    def _grow(self, frames: int) -> None:
        """Reserve memory for the first ``frames`` frames (a segment at a time)."""
        want = min(self.capacity, -(-frames // self.step) * self.step)
        if want < frames:
            raise ArenaError(f"arena {self.file.path}: the data region is full "
                             f"({self.capacity} frames)")
        self.file.reserve(DATA, want * PAGE)
        self.resident += want - len(self.state)
        self.state.extend(bytes(want - len(self.state)))
        self.idle_allowance = max(IDLE_FRAMES, want // IDLE_SHARE)

    def alloc(self, n: int, tag: int) -> int:
        """The first frame of a free run of ``n``, now marked ``tag``: a run whose memory is
        held, else one whose memory was given back (taken again), else new frames.

        ArenaError when the region is full or its memory cannot be reserved.
        """
        state = self.state
        zeros = bytes(n)
        start = self._hints[n]
        frame = state.find(zeros, start)
        if frame < 0 and self.resident < len(state):
            frame = state.find(_UNBACKED[n])
            if frame >= 0:  # its memory, and that of a few unbacked frames after it
                end = _UNBACKED_RUN.match(state, frame, frame + BACK_FRAMES).end()  # type: ignore[union-attr]
                self.file.back(frame * PAGE, (end - frame) * PAGE)  # ArenaError: unchanged
                state[frame:end] = bytes(end - frame)
                self.resident += end - frame
                hints = self._hints
                for k in range(1, MAX_RUN + 1):
                    if frame + n < hints[k]:
                        hints[k] = frame + n
                self._mark(frame, n, tag)
                return frame
        while frame < 0:  # none before the end: reserve another step
            start = max(start, len(state) - n + 1, 0)
            self._grow(len(state) + 1)
            frame = state.find(zeros, start)
        self._hints[n] = frame
        self._mark(frame, n, tag)
        return frame

    def _mark(self, frame: int, n: int, tag: int) -> None:
        if tag == ZSPAGE_HEAD:
            self.state[frame : frame + n] = bytes((ZSPAGE_HEAD,)) + bytes((ZSPAGE_TAIL,)) * (n - 1)
        else:
            self.state[frame : frame + n] = bytes((tag,)) * n
        self.used += n

    def cover(self, frames: int) -> bool:
        """Reserve the first ``frames`` frames if they are not yet; False beyond the region."""
        if frames > self.capacity:
            return False
        if frames > len(self.state):
            self._grow(frames)
        return True

    def cover_held(self) -> None:
        """A reopen's frame map, before its claims, reserving no memory: a frame the file
        holds (written and not given back: ``SEEK_DATA``) is free, one it does not (a hole)
        unbacked, up to the last frame it holds; the marks page's data mark is not trusted
        for that (no checksum: a damaged one once had a reopen reserve the whole region).
        Frames that hold pages are held already; the claims take them, the rest are given
        back (:meth:`finish_claims`) or reserved when an allocation takes them.  Where the
        filesystem does not tell holes, every frame below the data mark is taken as held."""
        file = self.file
        runs = file.held_runs(DATA, 0, self.capacity * PAGE)
        if runs is None:
            runs = [(0, min(file.marks()[DATA], self.capacity * PAGE))]
        end = -(-runs[-1][1] // PAGE) if runs else 0
        state = bytearray(_UNBACKED_ANY * end)
        for start, stop in runs:
            first, last = start // PAGE, -(-stop // PAGE)
            state[first:last] = bytes(last - first)
        self.state = state
        file.reserved[DATA] = max(file.reserved[DATA], end * PAGE)
        self.idle_allowance = max(IDLE_FRAMES, end // IDLE_SHARE)

    def claimed(self, frames: int) -> None:
        """Count ``frames`` an allocator's claims marked in :attr:`state` (``_hot``'s
        ``claim_zbud`` and ``claim_zsmalloc`` mark them in C, a reopen's pages at once)."""
        self.used += frames

    def free(self, frame: int, n: int) -> None:
        self.state[frame : frame + n] = bytes(n)
        self.used -= n
        hints = self._hints
        for k in range(1, MAX_RUN + 1):
            low = frame - k + 1
            if low < hints[k]:
                hints[k] = max(0, low)
        freed = self._freed
        freed.append(frame << 4 | n)
        if self.resident - self.used > self.idle_allowance:
            self._trim_freed()
        elif len(freed) > 4 * self.idle_allowance:
            self._forget_taken()

    def idle(self) -> int:
        """Free frames whose memory is held."""
        return self.resident - self.used

    def _trim_freed(self) -> None:
        """Give back the memory of the frames freed since the last trim that are still
        free, adjacent ones in one call: a free's trim costs what was freed, not a scan of
        the whole map.  Free frames it does not know of (a step reserved ahead, frames
        taken back with one reused) are few; if they alone keep the idle frames over the
        allowance, the whole map is trimmed."""
        freed = sorted(set(self._freed))
        del self._freed[:]
        state, unback = self.state, self.file.unback
        given = start = stop = seen = 0
        for run in freed:
            for f in range(max(run >> 4, seen), (run >> 4) + (run & 15)):
                if state[f] != FREE:
                    continue  # taken again since it was freed
                if f != stop:
                    if stop > start:
                        unback(start * PAGE, (stop - start) * PAGE)
                        state[start:stop] = _UNBACKED_ANY * (stop - start)
                        given += stop - start
                    start = f
                stop = f + 1
            seen = max(seen, (run >> 4) + (run & 15))
        if stop > start:
            unback(start * PAGE, (stop - start) * PAGE)
            state[start:stop] = _UNBACKED_ANY * (stop - start)
            given += stop - start
        self.resident -= given
        if self.resident - self.used > self.idle_allowance:
            self.trim()

    def _forget_taken(self) -> None:
        """Drop the freed runs taken again since (frees and allocations that churn below
        the allowance never trim, and must not grow the list without end)."""
        state = self.state
        self._freed = array("Q", sorted({
            run for run in self._freed
            if state.find(b"\x00", run >> 4, (run >> 4) + (run & 15)) >= 0}))

    def trim(self) -> int:
        """Give the memory of every free frame back to tmpfs; how many frames gave it."""
        del self._freed[:]
        if self.resident == self.used:
            return 0
        state, unback = self.state, self.file.unback
        given = 0
        for run in _FREE_RUNS.finditer(state):
            frame, stop = run.span()
            unback(frame * PAGE, (stop - frame) * PAGE)
            state[frame:stop] = _UNBACKED_ANY * (stop - frame)
            given += stop - frame
        self.resident -= given
        return given

    def finish_claims(self) -> None:
        """After a reopen's claims: the free frames' memory given back (a crash may have
        left it held, or already given back: either way it is counted right after)."""
        self.resident = len(self.state) - self.state.count(_UNBACKED_ANY)
        self.trim()

    def total(self) -> int:
        """Frames whose memory is reserved."""
        return len(self.state)
