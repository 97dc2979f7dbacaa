"""``xen``: tmem ops carried over xenstore to the host's tmem service (the split driver).

Each op the frontends (cleancache, frontswap) issue becomes a record in a message that
:class:`~xentmem.guest.backends.tmemfront.TmemFront` carries to ``xentmem-hostd``; this module
decides what goes into a message and when: posted ops ride with the next synchronous one,
concurrent callers share messages, and failures degrade as tmem allows (a miss, ``-ETIMEDOUT``,
``-ENODEV``), never by waiting forever.  The rules are in ``docs/protocol.md`` (The guest's
batching, Failures).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from xentmem.clock import Clock, SystemClock
from xentmem.errors import BackendError, BackendUnsupported, XenStoreError
from xentmem.guest.backend import Backend, GetResult
from xentmem.guest.backends.tmemfront import ChannelTimeout, Disconnected, TmemFront, find_backend
from xentmem.guest.backends.tmemfront import find_domid as _find_domid
from xentmem.params import Param, ParamSet
from xentmem.roots import Roots
from xentmem.tmem.abi import (
    TMEM_DONE,
    TMEM_POOL_PERSIST,
    TMEM_POOL_SHARED,
    Oid,
    PoolUuid,
    TmemOp,
    pool_kind,
)
from xentmem.xenbus.body import OpRecord, ResultRecord, WireError, reply_size_bound, request_size
from xentmem.xenbus.device import STATE
from xentmem.xenbus.probe import running_on_xen
from xentmem.xenbus.xs import XsSession, default_xenstore

log = logging.getLogger(__name__)

#: Flushes kept for re-delivery before ephemeral pools are poisoned instead (a persistent
#: pool's flushes are all kept, see :meth:`XenBackend._bound_pending`).
MAX_PENDING_FLUSHES = 1024
#: Longest fail-fast period after repeated timeouts.
MAX_STALL_BACKOFF_S = 60.0
#: A message's wait for its reply cut to less than this share of ``timeout_ms`` (its callers
#: waited their turn) does not take the host for silent when it runs out.
CUT_SHORT = 0.9
#: Most CPU yields a sender spends letting other callers add to its batch.
GATHER_YIELDS = 8
#: The default of ``connect_timeout_ms``, which :meth:`XenBackend.probe` waits too (it runs
#: before params apply).  A handshake is a few xenstore round trips and two steps of the
#: host's service, which a loaded dom0 may take seconds each to make; Linux's frontends wait
#: up to 300 s for their backends (``wait_for_devices`` in
#: drivers/xen/xenbus/xenbus_probe_frontend.c).  A host that is not there fails at once (no
#: device, no state node), so a generous bound costs only a host that hangs.
CONNECT_TIMEOUT_MS = 30_000

_ETIMEDOUT = -errno.ETIMEDOUT
_ENODEV = -errno.ENODEV
_EIO = -errno.EIO
_INVALIDATIONS = (TmemOp.FLUSH_PAGE, TmemOp.FLUSH_OBJECT)


def _invalidation_of(op: OpRecord) -> OpRecord | None:
    """What must reach the host in place of ``op`` when ``op`` did not: an invalidation
    itself, a flush of a put's page; None for the rest."""
    if op.cmd in _INVALIDATIONS:
        return op
    if op.cmd == TmemOp.PUT_PAGE:
        return OpRecord.flush_page(op.pool_id, op.oid, op.index)
    return None


@dataclass(eq=False)
class _Slot:
    """One op waiting in the queue; ``posted`` ops have no caller waiting for the result."""

    op: OpRecord
    posted: bool
    result: ResultRecord | None = None
    #: Set when the result is in, or when this caller should send the next message; made
    #: only when the caller has to wait (a caller that finds the channel free sends itself).
    wake: threading.Event | None = None
    #: When the waiting caller's timeout runs out (the real clock's monotonic seconds): a
    #: message carrying its op waits for the reply no longer than that.
    deadline: float = math.inf


class XenBackend(Backend):
    """tmem over xenstore to ``xentmem-hostd`` (Xen's split-driver model)."""

    name: ClassVar[str] = "xen"
    summary: ClassVar[str] = "tmem ops over xenstore to the host's tmem service (xentmem-hostd)"
    params: ClassVar[ParamSet] = ParamSet(
        Param("timeout_ms", int, 2000,
              "how long an op waits for the host's reply before it fails (-ETIMEDOUT)",
              writable=True, min=10, max=600_000, unit="ms"),
        Param("connect_timeout_ms", int, CONNECT_TIMEOUT_MS,
              "how long loading waits for xenstore and for each step of the host's "
              "handshake, and unloading for the host's Closed (a loaded dom0 is slow)",
              writable=True, min=10, max=600_000, unit="ms"),
        Param("batch", bool, True,
              "post ephemeral puts and private flushes, and send several ops per message",
              writable=True),
        Param("batch_max", int, 16, "most ops in one message (the host may allow fewer)",
              writable=True, min=1, max=64),
        Param("batch_delay_ms", int, 2,
              "longest a posted op waits for company before it is sent",
              writable=True, min=0, max=1000, unit="ms"),
        Param("compress", bool, True, "lz4-compress pages on the wire (zero pages never travel)"),
        Param("stall_backoff_ms", int, 1000,
              "after a timeout, ops fail at once for this long before the host is tried "
              "again (doubles while it stays silent, up to 60 s)",
              writable=True, min=0, max=60_000, unit="ms"),
    )

    def __init__(self, values: Mapping[str, Any], *, roots: Roots | None = None,
                 clock: Clock | None = None) -> None:
        super().__init__(self.params.validate(values, owner=self.name), roots=roots, clock=clock)
        self._xs: XsSession | None = None
        self._front: TmemFront | None = None
        self._lock = threading.Lock()
        #: Someone is sending a message (the leader); the others wait on ``_progress``.
        self._sending = False
        self._progress = threading.Condition(self._lock)
        #: Real time for waits on other threads (the injected clock may be a fake one).
        self._real = SystemClock()
        self._queue: deque[_Slot] = deque()
        self._pool_flags: dict[int, int] = {}
        self._poisoned: set[int] = set()
        #: Kept flushes past which :meth:`_bound_pending` looks at them again.
        self._flush_bound = MAX_PENDING_FLUSHES
        self._stalled_until = 0.0
        self._backoff_s = 0.0
        self._last_error = ""
        #: Since when (this backend's clock) the host has been silent, or None.
        self._outage_since: float | None = None
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._flusher: threading.Thread | None = None
        self._counts = {
            "ops": 0, "posted": 0, "posted_failed": 0, "posted_dropped": 0,
            "queue_timeouts": 0, "failed_fast": 0, "rejected": 0, "redelivered_flushes": 0,
            "poisoned_pools": 0, "host_outages": 0, "host_returns": 0,
        }

    # -- life cycle -----------------------------------------------------------------------------

    @classmethod
    def probe(cls, roots: Roots) -> None:
        """Xen (or a configured xenstore socket) and a host that set up our tmem device."""
        if roots.xenstore_socket is None:
            evidence = running_on_xen(roots)
            if evidence is None:
                raise BackendUnsupported(
                    f"not a Xen guest: no xen in {roots.sys / 'hypervisor' / 'type'}, no "
                    f"{roots.proc / 'xen' / 'capabilities'}, no {roots.xenbus_dev}")
            if not roots.xenbus_dev.exists():
                raise BackendUnsupported(f"Xen guest ({evidence}) without {roots.xenbus_dev}")
        where = default_xenstore(roots.xenstore_socket, roots.xenbus_dev)
        try:
            with XsSession(timeout=CONNECT_TIMEOUT_MS / 1000.0, **where) as xs:
                domid = _find_domid(xs)
                _backend_domid, otherend = find_backend(xs, domid)
                if xs.read_optional(f"{otherend}/{STATE}".encode()) is None:
                    raise BackendUnsupported(f"tmem host area {otherend} has no state node")
        except (XenStoreError, BackendError) as exc:
            raise BackendUnsupported(f"no tmem host reachable: {exc}") from None

    def connect(self) -> None:
        """The handshake waits ``connect_timeout_ms`` per step; the ops then ``timeout_ms``."""
        where = default_xenstore(self.roots.xenstore_socket, self.roots.xenbus_dev)
        xs = XsSession(timeout=self._connect_timeout_s, **where)
        try:
            xs.open()
            front = TmemFront(xs, timeout=self._connect_timeout_s)
            front.connect()
            front.timeout = xs.timeout = self._timeout_s
        except (XenStoreError, WireError) as exc:
            xs.close()
            raise BackendError(f"xen: cannot connect to the tmem host: {exc}") from None
        except BaseException:
            xs.close()
            raise
        self._xs, self._front = xs, front
        self._stop.clear()
        self._flusher = threading.Thread(target=self._flush_loop, name="xentmem-xen-flusher",
                                         daemon=True)
        self._flusher.start()

    def remove(self) -> None:
        """Send what is posted, close the device (the host drops our pools), disconnect."""
        self._stop.set()
        self._kick.set()
        if self._flusher is not None:
            self._flusher.join(self._timeout_s * 2 + 1)
            self._flusher = None
        self._drain(posted_only=True)
        if self._front is not None:
            self._front.timeout = self._connect_timeout_s  # the host's Closed is a step too
            if self._xs is not None:
                self._xs.timeout = self._connect_timeout_s
            self._front.close()
        if self._xs is not None:
            self._xs.close()
        self._front = self._xs = None
        with self._lock:
            self._pool_flags.clear()
            self._poisoned.clear()
            self._queue.clear()
            self._flush_bound = MAX_PENDING_FLUSHES

    def describe(self) -> dict[str, Any]:
        front = self._front
        info: dict[str, Any] = {"name": self.name}
        if front is None:
            return info
        negotiated = front.negotiated
        info.update({
            "domid": front.domid,
            "frontend": front.nodename,
            "backend": front.otherend,
            "state": front.state.strstate(),
            "otherend_state": front.otherend_state.strstate(),
            "version": negotiated.version if negotiated else None,
            "limits": asdict(negotiated.limits) if negotiated else None,
            "batch": self.values["batch"],
            "batch_max": self._batch_max(),
            "stalled": self._stalled_until > self.clock.monotonic(),
            "outage": None if self._outage_since is None else {
                "for_s": round(self.clock.monotonic() - self._outage_since, 1),
                "why": self._last_error},
            "broken": front.broken,
            "last_error": self._last_error,
        })
        return info

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
            counts["queued"] = len(self._queue)
            counts["pools"] = len(self._pool_flags)
        if self._front is not None:
            counts.update(self._front.counters.as_dict())
        return counts

    def pools(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"pool_id": pid, "flags": f"{flags:#010x}",
                     "kind": pool_kind(flags),
                     "persistent": bool(flags & TMEM_POOL_PERSIST),
                     "shared": bool(flags & TMEM_POOL_SHARED),
                     "poisoned": pid in self._poisoned}
                    for pid, flags in sorted(self._pool_flags.items())]

    def apply_param(self, name: str, value: Any) -> None:
        if name == "timeout_ms":
            seconds = value / 1000.0
            if self._front is not None:
                self._front.timeout = seconds
            if self._xs is not None:
                self._xs.timeout = seconds
        elif name == "batch" and not value:
            self.values["batch"] = False
            self._drain(posted_only=True)

    @property
    def _timeout_s(self) -> float:
        return self.values["timeout_ms"] / 1000.0

    @property
    def _connect_timeout_s(self) -> float:
        return self.values["connect_timeout_ms"] / 1000.0

    def concurrency(self) -> int:
        return self._batch_max()

    def _batch_max(self) -> int:
        if not self.values["batch"]:
            return 1
        limit = self._front.limits.max_ops if self._front and self._front.negotiated else 1
        return max(1, min(self.values["batch_max"], limit))

    # -- the tmem operations --------------------------------------------------------------------

    def new_pool(self, uuid: PoolUuid, flags: int) -> int:
        return self._sync(OpRecord.new_pool(uuid, flags)).rc

    def destroy_pool(self, pool_id: int) -> int:
        return self._sync(OpRecord.destroy_pool(pool_id)).rc

    def put_page(self, pool_id: int, oid: Oid, index: int, page: bytes) -> int:
        op = OpRecord.put_page(pool_id, oid, index, page, compress=self.values["compress"])
        flags = self._pool_flags.get(pool_id)
        if self.values["batch"] and flags is not None and not flags & TMEM_POOL_PERSIST:
            return self._post(op)
        return self._sync(op).rc

    def get_page(self, pool_id: int, oid: Oid, index: int) -> GetResult:
        if pool_id in self._poisoned:
            return 0, None
        result = self._sync(OpRecord.get_page(pool_id, oid, index))
        if result.rc == TMEM_DONE:
            return TMEM_DONE, result.data
        return result.rc, None

    def flush_page(self, pool_id: int, oid: Oid, index: int) -> int:
        return self._invalidate(OpRecord.flush_page(pool_id, oid, index))

    def flush_object(self, pool_id: int, oid: Oid) -> int:
        return self._invalidate(OpRecord.flush_object(pool_id, oid))

    def _invalidate(self, op: OpRecord) -> int:
        flags = self._pool_flags.get(op.pool_id)
        if self.values["batch"] and flags is not None and not flags & TMEM_POOL_SHARED:
            return self._post(op)
        return self._sync(op).rc

    # -- queueing -------------------------------------------------------------------------------

    def _fail_fast(self) -> int:
        """The rc every op gets without trying (disconnected, stalled), or 0 to go ahead.

        Called with ``_lock`` held.
        """
        front = self._front
        if front is None or front.broken:
            return _ENODEV
        if self._stalled_until and self.clock.monotonic() < self._stalled_until:
            return _ETIMEDOUT
        return 0

    def _post(self, op: OpRecord) -> int:
        with self._lock:
            self._counts["ops"] += 1
            refusal = self._fail_fast()
            if refusal and op.cmd not in _INVALIDATIONS:
                self._counts["failed_fast"] += 1
                self._undelivered(_Slot(op, posted=True), refusal)
                return refusal
            if refusal == _ENODEV:
                return refusal
            # An invalidation while stalled is kept: it must reach the host before any get.
            self._queue.append(_Slot(op, posted=True))
            self._counts["posted"] += 1
            full = len(self._queue) >= self._batch_max()
        if full and not refusal:
            self._drain(posted_only=True)
        else:
            self._kick.set()
        return TMEM_DONE

    def _sync(self, op: OpRecord) -> ResultRecord:
        """Queue ``op`` and wait for its result; one caller at a time sends.

        Leader and followers: the caller that finds nobody sending becomes the *sender* and
        carries everything queued (its own op and other threads' ops) in the next message.
        The others wait on their own event, which is set when their result is in, or when
        the sender finishes and hands the channel to the oldest of them; so nobody wakes
        for nothing, and a finished follower does not wait behind the next message.
        """
        deadline = self._real.monotonic() + self._timeout_s
        slot = _Slot(op, posted=False, deadline=deadline)
        with self._lock:
            self._counts["ops"] += 1
            refusal = self._fail_fast()
            if refusal:
                self._counts["failed_fast"] += 1
                self._undelivered(slot, refusal)
                return ResultRecord(refusal)
            self._queue.append(slot)
            leading = not self._sending
            self._sending = True
            if not leading:
                slot.wake = threading.Event()
        while True:
            if not leading:
                remaining = deadline - self._real.monotonic()
                if remaining <= 0 or not slot.wake.wait(remaining):  # type: ignore[union-attr]
                    with self._lock:
                        if slot.result is None:
                            self._abandon_slot(slot)
                        return slot.result  # type: ignore[return-value]
                with self._lock:
                    if slot.result is not None:
                        return slot.result
                    slot.wake.clear()  # type: ignore[union-attr]
                    if self._sending:
                        continue  # someone else took the channel meanwhile
                    refusal = self._fail_fast()
                    if refusal:  # the host went silent while we queued: do not wait again
                        self._undelivered(slot, refusal)
                        self._counts["failed_fast"] += 1
                        return ResultRecord(refusal)
                    self._sending = True
            try:
                if self.values["batch"]:
                    self._gather()
                self._send_next(deadline)
            finally:
                self._hand_over()
            with self._lock:
                if slot.result is not None:
                    return slot.result
                refusal = self._fail_fast()
                if refusal:  # our op did not fit, and the host has gone silent meanwhile
                    self._undelivered(slot, refusal)
                    self._counts["failed_fast"] += 1
                    return ResultRecord(refusal)
                leading = not self._sending  # our op did not fit: send again if free
                self._sending = True
                if not leading and slot.wake is None:
                    slot.wake = threading.Event()

    def _hand_over(self) -> None:
        """The sender is done: wake the oldest waiting caller to send next (or the flusher)."""
        with self._lock:
            self._sending = False
            self._progress.notify_all()
            for waiting in self._queue:
                if not waiting.posted:
                    if waiting.wake is not None:  # else the sender's own op, which did not fit
                        waiting.wake.set()
                    return
            if self._queue:
                self._kick.set()

    def _gather(self) -> None:
        """Let callers that were just woken queue their next op before the batch is taken.

        A few yields of the CPU while the queue still grows turn a string of small messages
        into one big one; with a single caller the queue does not grow and this is one yield.
        """
        queued = len(self._queue)
        for _ in range(GATHER_YIELDS):
            os.sched_yield()
            now = len(self._queue)
            if now == queued or now >= self._batch_max():
                return
            queued = now

    def _abandon_slot(self, slot: _Slot) -> None:
        """A caller's op waited its whole timeout unsent (for the channel, or in a batch
        taken too late).  Holds ``_lock``."""
        self._undelivered(slot, _ETIMEDOUT)
        slot.result = ResultRecord(_ETIMEDOUT)
        self._counts["queue_timeouts"] += 1
        self._last_error = f"an op waited {self._timeout_s:g}s for the channel to the tmem host"

    def _undelivered(self, slot: _Slot, rc: int) -> None:
        """``slot``'s op will not reach the host now (``rc``: stalled, or its wait ran out;
        it leaves the queue).  What it would have removed on the host must still go before
        any later get of its page (``docs/protocol.md`` §5): an invalidation stays queued as
        a posted op, and a put is replaced by a posted flush of its page (as Xen's failed
        duplicate put drops the old copy).  Not when the device is gone (its pools went with
        it).  Holds ``_lock``."""
        if slot in self._queue:
            self._queue.remove(slot)
        if rc == _ENODEV:
            return
        instead = _invalidation_of(slot.op)
        if instead is None:
            return
        self._queue.append(_Slot(instead, posted=True))
        self._counts["redelivered_flushes"] += 1
        self._bound_pending()

    def _drain(self, *, posted_only: bool) -> None:
        """Send queued ops until none (or no posted one) is left; bounded by the timeout."""
        deadline = self._real.monotonic() + self._timeout_s
        with self._lock:
            while self._sending:
                remaining = deadline - self._real.monotonic()
                if remaining <= 0 or not self._progress.wait(remaining):
                    return
            self._sending = True
        try:
            while True:
                with self._lock:
                    if not self._queue or (posted_only and not any(s.posted for s in self._queue)):
                        return
                    if self._fail_fast():
                        self._drop_posted_puts()
                        return
                self._send_next()
        finally:
            self._hand_over()

    def _take(self) -> list[_Slot]:
        """Slots for the next message: the oldest first, within the ops and size limits
        (the request must fit, and so must the reply if every get finds an incompressible
        page).  Holds ``_lock``."""
        if not self._queue:
            return []
        # The oldest always goes: one op of any kind fits (checked when the device connected).
        batch = [self._queue.popleft()]
        front = self._front
        limit = self._batch_max()
        if limit == 1 or front is None or front.negotiated is None:
            return batch
        limits, first = front.limits, batch[0].op
        empty_reply = reply_size_bound([])
        request_room = limits.body_capacity(reply=False) - request_size([first])
        reply_room = limits.body_capacity(reply=True) - reply_size_bound([first])
        while self._queue and len(batch) < limit:
            op = self._queue[0].op
            request_room -= op.wire_bytes
            reply_room -= reply_size_bound([op]) - empty_reply
            if request_room < 0 or reply_room < 0:
                break
            batch.append(self._queue.popleft())
        return batch

    def _send_next(self, deadline: float = math.inf) -> None:
        """One message: take a batch, exchange it, hand out results.  Only the sender.

        The reply is awaited until the sender's own ``deadline`` (a caller that sends after
        waiting its turn has only what is left of its timeout; the flusher has none), the
        timeout at most; a wait cut short that way times out the message without taking
        the host for silent.  The other callers in it time out on their own.
        """
        with self._lock:
            batch = self._take()
            now = self._real.monotonic()
            for slot in [s for s in batch if s.deadline <= now]:  # its caller gave up: unsent
                batch.remove(slot)
                self._abandon_slot(slot)
                if slot.wake is not None:
                    slot.wake.set()
            front = self._front
        if not batch:
            return
        if front is None:
            self._settle(batch, None, _ENODEV)
            return
        left = min(deadline - now, self._timeout_s)
        # (a sender's own op is always a little short of its timeout: its queueing, gather)
        cut_short = left < CUT_SHORT * self._timeout_s
        try:
            results = front.exchange([s.op for s in batch], timeout=left)
        except ChannelTimeout as exc:
            if cut_short:
                self._last_error = str(exc)
            else:
                self._stall(str(exc))
            self._settle(batch, None, _ETIMEDOUT)
        except Disconnected as exc:
            self._last_error = str(exc)
            self._settle(batch, None, _ENODEV)
        except (WireError, XenStoreError) as exc:
            self._last_error = str(exc)
            log.error("xen: %s", exc)
            with self._lock:
                self._counts["rejected"] += 1
            self._settle(batch, None, _EIO)
        else:
            self._host_answers("answers again")
            self._settle(batch, results, 0)

    def _settle(self, batch: list[_Slot], results: list[ResultRecord] | None, failure: int) -> None:
        """Hand results to their slots; keep uncertain invalidations for redelivery."""
        with self._lock:
            for slot in batch:
                if slot.wake is not None:
                    slot.wake.set()  # read after the lock is released: results are in by then
            if results is None:
                redeliver = [] if failure == _ENODEV else [_invalidation_of(s.op) for s in batch]
                for slot in batch:
                    slot.result = ResultRecord(failure)
                    if slot.posted and slot.op.cmd == TmemOp.PUT_PAGE:
                        self._counts["posted_dropped"] += 1
                for op in reversed(redeliver):
                    if op is not None:
                        self._queue.appendleft(_Slot(op, posted=True))
                self._counts["redelivered_flushes"] += sum(op is not None for op in redeliver)
                self._bound_pending()
                return
            for slot, result in zip(batch, results):
                slot.result = result
                op = slot.op
                if op.cmd == TmemOp.NEW_POOL and result.rc >= 0:
                    self._pool_flags[result.rc] = op.flags
                    self._poisoned.discard(result.rc)
                elif op.cmd == TmemOp.DESTROY_POOL and result.rc == TMEM_DONE:
                    self._pool_flags.pop(op.pool_id, None)
                    self._poisoned.discard(op.pool_id)
                elif slot.posted and result.rc < 0:
                    self._counts["posted_failed"] += 1

    def _bound_pending(self) -> None:
        """Past ``MAX_PENDING_FLUSHES`` kept flushes, a private ephemeral pool's are given up
        for poisoning the pool (its gets miss; its pages may vanish anyway).  A persistent
        pool's are all kept: its other pages must stay, so nothing can stand in for a flush,
        and a lost one let an older page answer a later get.  So are a shared pool's: poison
        makes only this guest's gets miss, and the guests sharing it would read the pages
        this one invalidated.  Only a repeat of a kept flush with
        nothing but flushes after it is merged (flushes commute and are idempotent), so an
        outage keeps about two per page at most (the next look comes at twice what was left,
        so a long outage does not go through the queue at every op; a private ephemeral
        pool's flushes wait up to that raised bound too, until the queue drains).  A waiting
        caller's own op stays.  Holds _lock."""
        queued = len(self._queue)
        if queued <= MAX_PENDING_FLUSHES:  # drained: the next outage starts from the bound
            self._flush_bound = MAX_PENDING_FLUSHES
            return
        if queued <= self._flush_bound or sum(
                s.op.cmd in _INVALIDATIONS for s in self._queue) <= self._flush_bound:
            return  # (flushes are at most the queue: counted only past the bound)
        kept: deque[_Slot] = deque()
        later: set[tuple[int, int, Oid, int]] = set()  # flushes queued after this point
        for slot in reversed(self._queue):
            op = slot.op
            if op.cmd not in _INVALIDATIONS or not slot.posted:
                if op.cmd not in _INVALIDATIONS:
                    later.clear()  # a put or get between: an earlier flush must go before it
                kept.appendleft(slot)
                continue
            if not self._pool_flags.get(op.pool_id, 0) & (TMEM_POOL_PERSIST | TMEM_POOL_SHARED):
                if op.pool_id not in self._poisoned:
                    self._poisoned.add(op.pool_id)
                    self._counts["poisoned_pools"] += 1
                    log.error("xen: pool %d poisoned: more than %d flushes could not be "
                              "delivered; its gets miss from now on", op.pool_id,
                              MAX_PENDING_FLUSHES)
                continue
            key = (op.pool_id, op.cmd, op.oid, op.index)
            if key not in later:
                later.add(key)
                kept.appendleft(slot)
        self._queue = kept
        left = sum(s.op.cmd in _INVALIDATIONS for s in kept)
        self._flush_bound = max(MAX_PENDING_FLUSHES, 2 * left)

    def _drop_posted_puts(self) -> None:
        """While stalled, posted puts are dropped (ephemeral pages may vanish anyway), each
        for a flush of its page (an older copy on the host must not answer a later get)."""
        kept: deque[_Slot] = deque()
        for slot in self._queue:
            if slot.posted and slot.op.cmd == TmemOp.PUT_PAGE:
                self._counts["posted_dropped"] += 1
                slot = _Slot(_invalidation_of(slot.op), posted=True)  # type: ignore[arg-type]
            kept.append(slot)
        self._queue = kept

    def _host_answers(self, how: str) -> None:
        """The host answered (or said it is back): the stall and the outage are over."""
        with self._lock:
            self._stalled_until = 0.0
            self._backoff_s = 0.0
            since, self._outage_since = self._outage_since, None
            if since is not None:
                self._counts["host_returns"] += 1
            if self._queue:  # what waited out the outage (flushes) goes now
                self._kick.set()
        if since is not None:
            log.warning("xen: the tmem host %s after %.1f s; ops go through again", how,
                        self.clock.monotonic() - since)

    def _probe_host(self, wait: float = 0.0) -> None:
        """While stalled: has the host said it is back (a restarted service that resumed
        our session)?  Then the stall ends at once rather than at its backoff's end."""
        with self._lock:
            front = self._front
            if not self._stalled_until or self._sending or front is None:
                return
            self._sending = True
        try:
            back = front.host_back(wait)
        except Disconnected as exc:
            self._last_error = str(exc)
            back = False
        except (XenStoreError, WireError) as exc:
            log.debug("xen: looking for the host's return: %s", exc)
            back = False
        finally:
            self._hand_over()
        if back:
            self._host_answers("is back")

    def _stall(self, why: str) -> None:
        with self._lock:
            if self._outage_since is None:
                self._outage_since = self.clock.monotonic()
                self._counts["host_outages"] += 1
            backoff_s = self.values["stall_backoff_ms"] / 1000.0
            self._backoff_s = (min(self._backoff_s * 2, MAX_STALL_BACKOFF_S)
                               if self._backoff_s else backoff_s)
            self._stalled_until = self.clock.monotonic() + self._backoff_s
            self._last_error = why
        log.warning("xen: %s; ops fail at once for the next %.1f s", why, self._backoff_s)

    def _flush_loop(self) -> None:
        """Send posted ops that waited ``batch_delay_ms`` without a synchronous op to ride."""
        while not self._stop.is_set():
            if not self._kick.wait(timeout=1.0):
                self._probe_host()
                continue
            self._kick.clear()
            if self._stop.is_set():
                break
            delay_s = self.values["batch_delay_ms"] / 1000.0
            if delay_s and self.clock.wait(self._stop, delay_s):
                break
            try:
                self._drain(posted_only=True)
            except Exception:  # the flusher must survive anything one message does
                log.exception("xen: sending posted ops failed")
