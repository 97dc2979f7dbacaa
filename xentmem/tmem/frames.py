"""The 4 KiB frames of the arena's data segments: which are in use, and runs of them.

Both allocators take their memory here, as the kernel's take pages from the page allocator:
zbud one frame at a time, zsmalloc a run of up to 8 for one zspage.  A zspage's frames are
contiguous within one segment, so an object that straddles two of them is one slice of the
map.  The map is one byte per frame (what holds it), kept in this process only: it is rebuilt
from the index when the arena is reopened.
"""

from __future__ import annotations

import mmap

from xentmem.tmem.segments import PAGE, ArenaFile, Kind

#: What holds a frame (one byte per frame).
FREE = 0
ZBUD = 1
HUGE = 2
ZSPAGE_HEAD = 3
ZSPAGE_TAIL = 4
#: The longest run one allocation takes (the kernel's CONFIG_ZSMALLOC_CHAIN_SIZE default).
MAX_RUN = 8


class Frames:
    """Frame allocation over the data segments of one :class:`ArenaFile`."""

    def __init__(self, file: ArenaFile) -> None:
        self.file = file
        #: Frames in a segment: its first page is the segment's header.
        self.per_segment = file.segment_size // PAGE - 1
        self.maps = file.maps[Kind.DATA]
        self.state = bytearray(len(self.maps) * self.per_segment)
        self.used = 0
        #: No free run of length n starts before ``_hints[n]``.
        self._hints = [0] * (MAX_RUN + 1)

    def where(self, frame: int) -> tuple[mmap.mmap, int]:
        """The map holding ``frame`` and the frame's offset in it."""
        seg, rest = divmod(frame, self.per_segment)
        return self.maps[seg], PAGE + rest * PAGE

    def alloc(self, n: int, tag: int) -> int:
        """The first frame of a free run of ``n`` in one segment, now marked ``tag``.

        ArenaError when the file cannot grow.
        """
        state = self.state
        per = self.per_segment
        zeros = bytes(n)
        start = self._hints[n]
        while True:
            frame = state.find(zeros, start)
            if frame < 0:  # none before the end: a new segment (runs never cross one)
                start = len(state)
                self.file.add_segment(Kind.DATA)
                state.extend(bytes(per))
                continue
            offset = frame % per
            if offset + n > per:  # the run would cross into the next segment
                start = frame - offset + per
                continue
            break
        self._hints[n] = frame
        self._mark(frame, n, tag)
        return frame

    def _mark(self, frame: int, n: int, tag: int) -> None:
        if tag == ZSPAGE_HEAD:
            self.state[frame : frame + n] = bytes((ZSPAGE_HEAD,)) + bytes((ZSPAGE_TAIL,)) * (n - 1)
        else:
            self.state[frame : frame + n] = bytes((tag,)) * n
        self.used += n

    def claim(self, frame: int, n: int, tag: int) -> bool:
        """Mark a run found in use when the arena is reopened; False if it is not free."""
        per = self.per_segment
        if frame < 0 or frame + n > len(self.state) or frame % per + n > per:
            return False
        if self.state[frame : frame + n] != bytes(n):
            return False
        self._mark(frame, n, tag)
        return True

    def free(self, frame: int, n: int) -> None:
        self.state[frame : frame + n] = bytes(n)
        self.used -= n
        hints = self._hints
        for k in range(1, MAX_RUN + 1):
            low = frame - k + 1
            if low < hints[k]:
                hints[k] = max(0, low)

    def total(self) -> int:
        return len(self.state)
