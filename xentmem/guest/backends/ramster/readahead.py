"""Readahead of one object's remote pages (``docs/ramster.md``, "Readahead").

A get of a remote page is one round trip.  When the gets of an object come in index order
(a swap-in of a range, a file read through cleancache), the pages after the one missed are
likely next: one object's pages share a hash slot, so the missed page and its remote
neighbours come back in one ``MGET`` on one master, and the neighbours wait here for their
own gets.

Nothing here is ever stale.  The buffer holds only pages the index says are remote, as the
cluster returned them; the caller (:class:`.remote.RemotePages`, under its lock) drops a page
here whenever its index entry goes or changes (a put, a flush of the page, its object or its
pool, an exclusive get, a remotify's record), and a readahead on the wire when such a drop
happens brings back none of the dropped pages (:meth:`Readahead.end`).  A page is served
once from here (a get takes it out): a second get fetches again.

Readahead runs ahead of its readers, as the kernel's asynchronous readahead does: a get in
order served from here within one window of the furthest page read ahead in its object reads
the next window, while the other callers sharing the range go on through this one (they find
their pages buffered instead of each missing at the window's end).  The trigger is the
object's furthest page asked for, not a marked page as the kernel's: callers that share a
range do not keep step, and a marked page taken by a laggard comes too late.

Pages served lately (from here or fetched) are remembered and not read ahead again: callers
that share one range (a swap-in on several threads) each reset an object's run when one of
them lags, and the laggard's readahead would otherwise bring back pages the others already
had.

Not thread-safe: every method is called with the caller's lock held.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping

from xentmem.tmem.abi import Oid

#: (slot, oid, index): one page of this node's pools.
Where = tuple[int, Oid, int]

#: Most pages one readahead asks for beside the missed one (one MGET, one reply); the next
#: window is read once the readers are within this many pages of the furthest one asked
#: for.  64 rather than 32: 8 callers sharing a range fetched 0.51x raw pipelined GET
#: against 0.47x (bench_ramster.py, docs/ramster.md), one caller 0.87x against 0.80x.
READAHEAD_PAGES = 64
#: Most pages the buffer holds (compressed, as stored: at most a page each, with those on
#: the wire): a full buffer reads no more ahead until its pages are taken or go stale.
BUFFER_PAGES = 256
#: A get is in order when it is at most this many indexes from the object's furthest get so
#: far (concurrent callers reading one range arrive a little out of order).
IN_ORDER_GAP = 8
#: Gets in order in a row before a miss reads ahead: a random order seldom makes two (one
#: object of 512 remote pages: about 1 get in 4000 instead of 1 in 64).
IN_ORDER_RUN = 2
#: Objects whose last get is remembered (the oldest forgotten first).
OBJECTS_TRACKED = 1024
#: Pages served lately that no readahead asks for again (the oldest forgotten first).
SERVED_REMEMBERED = 4 * BUFFER_PAGES
#: Gets of remote pages after which a page read ahead and not asked for is given up (its
#: reader stopped, or went elsewhere), counted unused: a slow reader's pages wait this long.
STALE_GETS = 4 * BUFFER_PAGES


class Flight:
    """One readahead on the wire: the pages asked for, and those dropped meanwhile."""

    __slots__ = ("asked", "done", "dropped", "wheres")

    def __init__(self, wheres: list[Where]) -> None:
        self.wheres = wheres
        self.asked = frozenset(wheres)
        self.dropped: set[Where] = set()
        #: Set once it came back (kept or not): a get of one of its pages waits for it
        #: rather than asking the cluster a second time.
        self.done = threading.Event()


class Readahead:
    """The buffer of pages read ahead, and what says when to read ahead."""

    def __init__(self, *, pages: int = READAHEAD_PAGES, buffer: int = BUFFER_PAGES) -> None:
        self.pages = pages
        self.buffer = buffer
        #: Where -> (the page, the get count when it came), oldest first.
        self._buffered: OrderedDict[Where, tuple[bytes, int]] = OrderedDict()
        #: Gets of remote pages noted so far (the buffer's clock).
        self._gets = 0
        #: (slot, oid) -> the index of the object's last get of a remote page, and how many
        #: gets in order led to it.
        self._last: OrderedDict[tuple[int, Oid], tuple[int, int]] = OrderedDict()
        self._flights: list[Flight] = []
        #: The pages on the wire, by the readahead that asked for them.
        self._flying: dict[Where, Flight] = {}
        #: Pages served lately, oldest first (values unused: an ordered set).
        self._served: OrderedDict[Where, None] = OrderedDict()
        #: (slot, oid) -> the furthest index a readahead of the object asked for.
        self._asked_to: OrderedDict[tuple[int, Oid], int] = OrderedDict()
        self.read = 0
        self.hits = 0
        self.unused = 0

    def __len__(self) -> int:
        return len(self._buffered)

    def take(self, where: Where) -> bytes | None:
        """The buffered page (taken out: served once), or None."""
        entry = self._buffered.pop(where, None)
        if entry is None:
            return None
        self.hits += 1
        self.served(where)
        return entry[0]

    def served(self, where: Where) -> None:
        """``where`` was just served: no readahead asks for it again for a while."""
        self._served[where] = None
        self._served.move_to_end(where)
        if len(self._served) > SERVED_REMEMBERED:
            self._served.popitem(last=False)

    def begin_next(self, where: Where, remote: Mapping[int, int]) -> Flight | None:
        """For a get of buffered ``where`` within a window of the furthest page read ahead
        in its object: the readahead of the next window (as :meth:`begin`), else None.
        Called before :meth:`take` serves it."""
        if where not in self._buffered:
            return None
        slot, oid, index = where
        furthest = self._asked_to.get((slot, oid), -1)
        if index < furthest - self.pages:
            return None
        return self.begin(where, remote, after=furthest)

    def flying(self, where: Where) -> Flight | None:
        """The readahead on the wire that asked for ``where``, if any."""
        return self._flying.get(where)

    def in_order(self, where: Where) -> bool:
        """Note a get of a remote page; whether it ends a run of IN_ORDER_RUN gets in order
        in its object (each at most IN_ORDER_GAP indexes from the furthest before it) and
        goes further than any of them (a run backwards reads nothing ahead)."""
        self._gets += 1
        slot, oid, index = where
        last, run = self._last.pop((slot, oid), (None, 0))
        forward = last is None or index > last
        if last is not None and 0 < abs(index - last) <= IN_ORDER_GAP:
            run, index = run + 1, max(index, last)  # a little out of order: still a run
        else:
            run = 0
        self._last[(slot, oid)] = (index, run)
        if len(self._last) > OBJECTS_TRACKED:
            self._last.popitem(last=False)
        return run >= IN_ORDER_RUN and forward

    def begin(self, where: Where, remote: Mapping[int, int], *,
              after: int | None = None) -> Flight | None:
        """A readahead after a missed ``where`` (or, ``after`` given, after that index):
        the object's next remote pages (``remote``: its index -> size) that are not
        buffered, at most ``pages`` and as many as the buffer has room for; None when there
        are none.

        A full buffer pushes out none of its pages for a new readahead: callers that share a
        range (each takes every Nth page) leave a starved one's pages behind, and pushing
        them out before it comes reads them from the cluster again and again.
        """
        self._expire()
        room = min(self.pages, self.buffer - len(self._buffered) - len(self._flying))
        if room <= 0:
            return None
        slot, oid, index = where
        if after is not None:
            index = max(index, after)
        wanted: list[Where] = []
        behind = False  # a page ahead is buffered or on the wire: another reader is further
        for following in range(index + 1, index + 1 + self.pages):
            page = (slot, oid, following)
            if page in self._buffered or page in self._flying:
                behind = True
            elif following in remote and page not in self._served:
                wanted.append(page)
                if len(wanted) == room:
                    break
        if not wanted:
            return None
        flight = Flight(wanted)
        # The furthest page asked for: a miss at the front starts it again (what was read
        # ahead before has been served), one behind another reader leaves it.
        asked_to = self._asked_to
        furthest = asked_to.pop((slot, oid), -1)
        asked_to[(slot, oid)] = (max(furthest, wanted[-1][2]) if behind or after is not None
                                 else wanted[-1][2])
        if len(asked_to) > OBJECTS_TRACKED:
            asked_to.popitem(last=False)
        self._flights.append(flight)
        for page in wanted:
            self._flying[page] = flight
        return flight

    def end(self, flight: Flight, found: Mapping[Where, bytes]) -> None:
        """The readahead came back: keep what it found, but none of the pages dropped or
        served while it was on the wire."""
        self._flights.remove(flight)
        flight.done.set()
        for where in flight.wheres:
            del self._flying[where]
            data = found.get(where)
            if data is None or where in flight.dropped or where in self._served:
                continue
            self._buffered[where] = (data, self._gets)
            self._buffered.move_to_end(where)
            self.read += 1
        while len(self._buffered) > self.buffer:  # only if ``buffer`` was lowered meanwhile
            self._buffered.popitem(last=False)
            self.unused += 1

    def _expire(self) -> None:
        """Give up the pages that waited STALE_GETS gets of remote pages unasked."""
        stale = self._gets - STALE_GETS
        buffered = self._buffered
        while buffered and next(iter(buffered.values()))[1] <= stale:
            buffered.popitem(last=False)
            self.unused += 1

    def drop(self, where: Where) -> None:
        """``where``'s index entry goes or changes: its buffered copy goes too."""
        self._buffered.pop(where, None)
        self._served.pop(where, None)
        for flight in self._flights:
            if where in flight.asked:
                flight.dropped.add(where)

    def drop_where(self, matches: Callable[[Where], bool]) -> None:
        """Drop every page ``matches`` says (an object's, a pool's, all: any index of a
        matching object matches), and forget those objects' gets."""
        for where in [w for w in self._buffered if matches(w)]:
            del self._buffered[where]
        for where in [w for w in self._served if matches(w)]:
            del self._served[where]
        for slot, oid in [o for o in self._last if matches((*o, 0))]:  # an object's or all
            del self._last[(slot, oid)]
        for slot, oid in [o for o in self._asked_to if matches((*o, 0))]:
            del self._asked_to[(slot, oid)]
        for flight in self._flights:
            flight.dropped.update(w for w in flight.wheres if matches(w))


__all__ = ["BUFFER_PAGES", "READAHEAD_PAGES", "SERVED_REMEMBERED", "STALE_GETS", "Flight",
           "Readahead"]
