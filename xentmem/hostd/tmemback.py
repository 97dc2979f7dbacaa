"""The host half of the tmem split driver (as blkback is of the block one), one per guest.

:class:`TmemBack` does for the host service what a Linux xenbus backend driver does for a PV
device, and what the toolstack does when it attaches one: :meth:`TmemBack.setup` creates both
areas in one transaction (a guest may not create ``device/...`` itself: EACCES on a real
domU), :meth:`TmemBack.frontend_changed` follows the guest's state (``otherend_changed``), and
:meth:`TmemBack.request` serves one message.  A request is untrusted until parsed and bounded;
a malformed one gets an error reply (or, with no usable sequence number, is dropped), never an
exception out of the service.  The guest's domid comes from *where* the request was found,
never from what it says, so a guest only ever reaches its own pages.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from xentmem.hostd.store import HostStore
from xentmem.tmem.abi import XenbusState
from xentmem.xenbus.area import (
    BE_CHUNK_BYTES,
    BE_FEATURE_LZ4,
    BE_FRONTEND,
    BE_FRONTEND_ID,
    BE_INLINE_BYTES,
    BE_MAX_CHUNKS,
    BE_MAX_OPS,
    BE_MAX_PARTS,
    BE_REPLY_CHUNK_BYTES,
    BE_REPLY_INLINE_BYTES,
    BE_VERSIONS,
    FE_BACKEND,
    FE_BACKEND_ID,
    FE_VERSION,
    REQ_DATA_DIR,
    REQ_DIR,
    REQ_SLOTS,
    RSP_DATA_DIR,
    RSP_DIR,
    backend_path,
    frontend_path,
    parse_uint,
    request_slot,
)
from xentmem.xenbus.body import (
    SUPPORTED_VERSIONS,
    OpRecord,
    ResultRecord,
    WireError,
    decode_request,
    encode_reply,
)
from xentmem.xenbus.device import ERROR_NODE, STATE, XenbusDevice
from xentmem.xenbus.framing import (
    MAX_CHUNK_BYTES,
    MAX_INLINE_BYTES,
    MAX_REPLY_INLINE_BYTES,
    NAME_OVERHEAD,
    Envelope,
    Limits,
    Part,
    frame,
    is_part_name,
    parse_name,
    parse_part,
    unframe,
)
from xentmem.xenbus.xs import XsError, XsSession, XsTimeout

log = logging.getLogger(__name__)

#: Replies left in ``rsp/`` before it is cleared (dom0's own area: no quota applies).
REPLIES_KEPT = 32
_LEADING_SEQ = re.compile(r"(0|[1-9][0-9]{0,18})@")
_PERM_RE = re.compile(rb"([nrwb])([0-9]{1,5})")


@dataclass
class TmemBackCounters:
    messages: int = 0
    ops: int = 0
    inline_requests: int = 0
    parted_requests: int = 0
    spilled_requests: int = 0
    malformed: int = 0
    failed_messages: int = 0
    replies_parted: int = 0
    replies_spilled: int = 0
    sessions: int = 0


class TmemBack(XenbusDevice):
    """One guest's tmem device, seen from the host."""

    def __init__(
        self,
        conn: XsSession,
        store: HostStore,
        domid: int,
        *,
        backend_domid: int = 0,
        limits: Limits | None = None,
        compress_replies: bool = True,
        writer: XsSession | None = None,
        split_replies: bool = False,
    ) -> None:
        """``writer``: where replies and removals go, if not ``conn`` (the service's own, whose
        answers are read lazily).  ``split_replies``: a reply too long for one name goes in
        name parts rather than spilled into a value (measured dearer: ``docs/protocol.md``)."""
        super().__init__(conn, backend_path(backend_domid, domid), frontend_path(domid))
        self.conn = conn
        self.writer = writer or conn
        self.store = store
        self.domid = domid
        self.backend_domid = backend_domid
        self.limits = limits or Limits.for_host()
        self.compress_replies = compress_replies
        self.split_replies = split_replies
        self._unsplit: tuple[Limits | None, Limits] = (None, self.limits)
        self.home = f"/local/domain/{domid}"
        self.last_seq = 0
        self.last_reply: str | None = None
        self.counters = TmemBackCounters()
        self.state_token = f"xentmem-hostd-fe-state-{domid}".encode()
        self.req_token = f"xentmem-hostd-fe-req-{domid}".encode()
        self._req_prefix = f"{self.otherend}/{REQ_DIR}/".encode()
        self._served = 0
        self._replies_kept = 0
        #: Name parts received for the next message, by part number.
        self._parts: dict[int, Part] = {}
        self._watching = False

    # -- set-up and tear-down -------------------------------------------------------------------

    def setup(self) -> None:
        """Create both areas (as a toolstack attaching a device would), then watch the guest."""
        d, b = self.domid, self.backend_domid
        guest_reads = [f"n{b}", f"r{d}"]
        host_reads = [f"n{d}", f"r{b}"]
        limits = self.limits

        def body(tx: int) -> None:
            conn = self.conn
            for path in (f"{self.home}/device", f"{self.home}/device/tmem"):
                if conn.read_optional(path, tx=tx) is None:
                    conn.write(path, b"", tx=tx)
                    conn.set_perms(path, guest_reads, tx=tx)
            fe = self.otherend
            if conn.read_optional(fe, tx=tx) is None:
                conn.write(fe, b"", tx=tx)
                conn.write(f"{fe}/{STATE}", str(int(XenbusState.INITIALISING)).encode(), tx=tx)
                conn.write(f"{fe}/{REQ_DIR}", b"", tx=tx)
            conn.write(f"{fe}/{FE_BACKEND}", self.nodename.encode(), tx=tx)
            conn.write(f"{fe}/{FE_BACKEND_ID}", str(b).encode(), tx=tx)
            for node in ("", f"/{STATE}", f"/{REQ_DIR}", f"/{FE_BACKEND}", f"/{FE_BACKEND_ID}"):
                if conn.read_optional(fe + node, tx=tx) is not None:
                    conn.set_perms(fe + node, host_reads, tx=tx)
            parent = f"/local/domain/{b}/backend"
            for path, perms in (
                (parent, [f"n{b}"]),
                (f"{parent}/tmem", [f"n{b}"]),
                (f"{parent}/tmem/{d}", guest_reads),
            ):
                if conn.read_optional(path, tx=tx) is None:
                    conn.write(path, b"", tx=tx)
                    conn.set_perms(path, perms, tx=tx)
            be = self.nodename
            for stale in (RSP_DIR, RSP_DATA_DIR, ERROR_NODE):
                if conn.read_optional(f"{be}/{stale}", tx=tx) is not None:
                    conn.rm(f"{be}/{stale}", tx=tx)
            nodes = {
                "": b"",
                BE_FRONTEND: fe.encode(),
                BE_FRONTEND_ID: str(d).encode(),
                BE_VERSIONS: " ".join(str(v) for v in SUPPORTED_VERSIONS).encode(),
                BE_MAX_OPS: str(limits.max_ops).encode(),
                BE_MAX_CHUNKS: str(limits.max_chunks).encode(),
                BE_CHUNK_BYTES: str(limits.chunk_bytes).encode(),
                BE_INLINE_BYTES: str(limits.inline_bytes).encode(),
                BE_REPLY_INLINE_BYTES: str(limits.reply_inline_bytes).encode(),
                BE_REPLY_CHUNK_BYTES: str(limits.reply_chunk_bytes).encode(),
                BE_MAX_PARTS: str(limits.max_parts).encode(),
                BE_FEATURE_LZ4: b"1",
                STATE: str(int(XenbusState.INIT_WAIT)).encode(),
            }
            for node, value in nodes.items():
                path = f"{be}/{node}" if node else be
                conn.write(path, value, tx=tx)
                conn.set_perms(path, guest_reads, tx=tx)

        self.conn.transaction(body)
        self.state = XenbusState.INIT_WAIT
        self.last_seq = 0
        self.last_reply = None
        self.conn.watch(f"{self.otherend}/{STATE}", self.state_token)
        self.conn.watch(f"{self.otherend}/{REQ_DIR}", self.req_token)
        self._watching = True
        log.info("tmem device for domain %d: %s <-> %s", self.domid, self.otherend, self.nodename)

    def teardown(self, *, remove_areas: bool) -> None:
        """The guest is gone (or the service stops): drop its pages, optionally its areas."""
        self._settle_writes()
        dropped = self.store.destroy_client(self.domid)
        if self._watching:
            for token in (self.state_token, self.req_token):
                try:
                    self.conn.unwatch(token)
                except (XsError, XsTimeout):
                    log.debug("unwatch %r failed", token, exc_info=True)
            self._watching = False
        if remove_areas:
            for path in (
                f"/local/domain/{self.backend_domid}/backend/tmem/{self.domid}",
                f"{self.home}/device/tmem",
            ):
                try:
                    self.conn.rm(path)
                except XsError as exc:
                    if exc.name != "ENOENT":
                        log.warning("removing %s: %s", path, exc)
        self.state = XenbusState.CLOSED
        log.info("tmem device for domain %d removed (%d pools dropped)", self.domid, dropped)

    # -- the state machine ----------------------------------------------------------------------

    def switch_state(self, state: XenbusState) -> None:
        """As every xenbus device does, once the replies posted so far are in."""
        self._settle_writes()
        super().switch_state(state)

    def frontend_changed(self) -> None:
        """``otherend_changed``: follow the guest's state."""
        previous = self.otherend_state
        frontend = self.read_otherend_state()
        if frontend == previous and frontend != XenbusState.INITIALISING:
            return
        if frontend == XenbusState.INITIALISING:
            if self.state != XenbusState.INIT_WAIT:
                self._new_session()
        elif frontend == XenbusState.INITIALISED:
            if self.state == XenbusState.INIT_WAIT:
                self._connect()
        elif frontend == XenbusState.CONNECTED:
            if self.state == XenbusState.INIT_WAIT:
                # A guest connected to an earlier instance of this service: its pools are
                # gone with that instance, so it must not go on as if nothing happened.
                self.dev_fatal(
                    errno.ESTALE,
                    "the tmem host restarted and lost this guest's "
                    "pools; load the backend again to reconnect",
                )
        elif frontend in (XenbusState.CLOSING, XenbusState.CLOSED) and self.state not in (
            XenbusState.CLOSED,
            XenbusState.UNKNOWN,
        ):
            self._close_session()

    def _settle_writes(self) -> None:
        """Wait until xenstore has taken every reply and removal posted so far, so that a
        change of session or state is never overtaken by a reply of the old one."""
        if self.writer is not self.conn:
            self.writer.settle()

    def _new_session(self) -> None:
        self._settle_writes()
        if self.state == XenbusState.CONNECTED:
            self.store.destroy_client(self.domid)
        for stale in (RSP_DIR, RSP_DATA_DIR, ERROR_NODE):
            try:
                self.conn.rm(f"{self.nodename}/{stale}")
            except XsError as exc:
                if exc.name != "ENOENT":
                    raise
        self.last_seq = 0
        self.last_reply = None
        self._served = self._replies_kept = 0
        self._parts.clear()
        self.switch_state(XenbusState.INIT_WAIT)

    def _connect(self) -> None:
        untrusted_version = self.conn.read_optional(f"{self.otherend}/{FE_VERSION}")
        try:
            version = parse_uint(
                (untrusted_version or b"").decode("ascii", "replace"),
                low=0,
                high=255,
                what=FE_VERSION,
            )
        except WireError as exc:
            self.dev_fatal(errno.EPROTO, f"frontend version unusable: {exc}")
            return
        if version not in SUPPORTED_VERSIONS:
            self.dev_fatal(
                errno.EPROTONOSUPPORT,
                f"frontend asks for version {version}; this host speaks {list(SUPPORTED_VERSIONS)}",
            )
            return
        foreign = self._foreign_writers()
        if foreign:
            self.dev_fatal(
                errno.EACCES,
                f"frontend area {self.otherend} is writable by "
                f"domains {foreign}; refusing to serve it",
            )
            return
        self.last_seq = 0
        self.last_reply = None
        self._served = self._replies_kept = 0
        self._parts.clear()
        self.counters.sessions += 1
        self.switch_state(XenbusState.CONNECTED)
        log.info("tmem device of domain %d connected (version %d)", self.domid, version)

    def _foreign_writers(self) -> list[int]:
        """Domains other than the guest and the host that may write the request directory."""
        foreign: set[int] = set()
        for path in (self.otherend, f"{self.otherend}/{REQ_DIR}"):
            try:
                untrusted_perms = self.conn.get_perms(path)
            except XsError as exc:
                if exc.name == "ENOENT":
                    continue
                raise
            for i, untrusted in enumerate(untrusted_perms):
                match = _PERM_RE.fullmatch(untrusted)
                if match is None:
                    continue
                letter, domid = match[1], int(match[2])
                writer = i == 0 or letter in (b"w", b"b")  # the owner, or a writer
                if writer and domid not in (self.domid, self.backend_domid):
                    foreign.add(domid)
        return sorted(foreign)

    def _close_session(self) -> None:
        dropped = self.store.destroy_client(self.domid)
        self.switch_state(XenbusState.CLOSED)
        log.info("tmem device of domain %d closed (%d pools dropped)", self.domid, dropped)

    # -- requests -------------------------------------------------------------------------------

    def request(self, untrusted_path: bytes, run: Callable[[int, OpRecord], ResultRecord]) -> None:
        """A watch event under the guest's ``req/``: serve the message it names, if new."""
        if self.state != XenbusState.CONNECTED or not untrusted_path.startswith(self._req_prefix):
            return
        untrusted_rest = untrusted_path[len(self._req_prefix) :].decode("ascii", "replace")
        untrusted_slot, sep, untrusted_name = untrusted_rest.partition("/")
        if not sep or "/" in untrusted_name:
            return  # the directory itself, a slot directory, or something deeper
        if is_part_name(untrusted_name):
            self._part(untrusted_slot, untrusted_name)
            return
        try:
            envelope = parse_name(untrusted_name, self.limits, reply=False)
            if untrusted_slot != request_slot(envelope.seq):
                raise WireError(f"message {envelope.seq} in slot {untrusted_slot[:8]!r}")
        except WireError as exc:
            self._malformed(untrusted_name, exc)
            return
        if envelope.seq <= self.last_seq:
            return  # our own removal of a consumed request, or a replay
        self.last_seq = envelope.seq
        counters = self.counters
        counters.messages += 1
        message_path = f"{self.otherend}/{REQ_DIR}/{untrusted_slot}/{untrusted_name}"
        status = 0
        results: list[ResultRecord] = []
        parts = [self._parts[k] for k in sorted(self._parts)]
        self._parts.clear()
        try:
            body = self._body(envelope, message_path, parts)
            ops = decode_request(body, max_ops=self.limits.max_ops)
        except WireError as exc:
            counters.malformed += 1
            log.warning("domain %d message %d rejected: %s", self.domid, envelope.seq, exc)
            status = -errno.EINVAL
        except (XsError, XsTimeout) as exc:
            counters.failed_messages += 1
            log.warning("domain %d message %d unreadable: %s", self.domid, envelope.seq, exc)
            status = -errno.EIO
        else:
            counters.ops += len(ops)
            results = [run(self.domid, op) for op in ops]
        self._consumed()
        self._reply(envelope.seq, results, status)

    def _consumed(self) -> None:
        """Remove served requests in bulk, before the guest can add the next one.

        Each slot directory holds one served request; once every slot has one, one removal
        of ``req/`` (one request, one watch event back) clears :data:`REQ_SLOTS` of them.  It
        happens before the reply is written, so the guest, waiting for that reply, cannot
        have added a new request in between.
        """
        self._served += 1
        if self._served >= REQ_SLOTS:
            self.writer.post_rm(f"{self.otherend}/{REQ_DIR}")
            self._served = 0

    def _part(self, untrusted_slot: str, untrusted_name: str) -> None:
        """A name part of the next message: kept until its message node arrives.

        A malformed part is counted and dropped: its message then lacks it and is answered
        ``-EINVAL``.  Parts of messages already served (a replay) are ignored.
        """
        try:
            part = parse_part(untrusted_name, self.limits, reply=False)
            if untrusted_slot != request_slot(part.seq, part.k):
                raise WireError(f"part {part.k} of message {part.seq} in slot "
                                f"{untrusted_slot[:8]!r}")
        except WireError as exc:
            self.counters.malformed += 1
            log.warning("domain %d: malformed request part %r: %s", self.domid,
                        untrusted_name[:60], exc)
            return
        if part.seq > self.last_seq:
            self._parts[part.k] = part

    def _body(self, envelope: Envelope, message_path: str, parts: list[Part]) -> bytes:
        if not envelope.chunks:
            if envelope.parts:
                self.counters.parted_requests += 1
            else:
                self.counters.inline_requests += 1
            return unframe(envelope, None, (), self.limits, reply=False, untrusted_parts=parts)
        self.counters.spilled_requests += 1
        ids = [self.conn.post_read(message_path)]
        ids += [
            self.conn.post_read(f"{self.otherend}/{REQ_DATA_DIR}/{i}")
            for i in range(1, envelope.chunks)
        ]
        deadline = self.conn.clock.monotonic() + self.conn.timeout
        untrusted = [
            self.conn.collect(
                i, what=f"read chunk of message {envelope.seq}", deadline=deadline
            ).decode("ascii", "replace")
            for i in ids
        ]
        return unframe(envelope, untrusted[0], untrusted[1:], self.limits, reply=False)

    def _reply(self, seq: int, results: list[ResultRecord], status: int) -> None:
        limits = self._reply_limits()
        try:
            framed = frame(seq, encode_reply(results, status=status), limits, reply=True)
        except WireError as exc:
            log.warning("domain %d message %d: reply does not fit (%s)", self.domid, seq, exc)
            framed = frame(seq, encode_reply([], status=-errno.E2BIG), limits, reply=True)
        if self._replies_kept >= REPLIES_KEPT:
            # Every earlier reply has been read: the guest sent a new request since.
            self.writer.post_rm(f"{self.nodename}/{RSP_DIR}")
            self._replies_kept = 0
        for i, value in framed.chunks:
            self.writer.post_write(f"{self.nodename}/{RSP_DATA_DIR}/{i}", value.encode())
        for part in framed.parts:
            self.writer.post_write(f"{self.nodename}/{RSP_DIR}/{part.name}", b"")
        name = framed.envelope.name
        self.writer.post_write(f"{self.nodename}/{RSP_DIR}/{name}", framed.value.encode())
        self._replies_kept += 1
        if framed.envelope.chunks:
            self.counters.replies_spilled += 1
        elif framed.envelope.parts:
            self.counters.replies_parted += 1
        self.last_reply = name

    def _reply_limits(self) -> Limits:
        if self.split_replies:
            return self.limits
        if self._unsplit[0] is not self.limits:
            self._unsplit = (self.limits, replace(self.limits, max_parts=1))
        return self._unsplit[1]

    def _malformed(self, untrusted_name: str, exc: WireError) -> None:
        """A request node that is not a message: an error reply if it has a new seq.

        The node is left for the next bulk removal of ``req/`` (counted as served), so its
        removal raises no event of its own that would be reported again.
        """
        match = _LEADING_SEQ.match(untrusted_name)
        if match is None or int(match[1]) <= self.last_seq:
            if match is None:
                self.counters.malformed += 1
                log.warning("domain %d: request node %r is not a message: %s", self.domid,
                            untrusted_name[:60], exc)
                self._consumed()
            return  # a node seen before (its removal), or a replay
        self.counters.malformed += 1
        log.warning("domain %d: malformed request node %r: %s", self.domid,
                    untrusted_name[:60], exc)
        self.last_seq = int(match[1])
        self._consumed()
        self._reply(self.last_seq, [], -errno.EINVAL)

    def describe(self) -> dict[str, object]:
        return {
            "domid": self.domid,
            "frontend": self.otherend,
            "backend": self.nodename,
            "state": self.state.strstate(),
            "frontend_state": self.otherend_state.strstate(),
            "last_seq": self.last_seq,
            "counters": dict(self.counters.__dict__),
        }


def probe_reply_limits(conn: XsSession, backend_domid: int, base: Limits) -> Limits:
    """How big the host's replies may be on this xenstore: longest name, largest value.

    Guests' requests stay within what every daemon accepts from a guest, but dom0's own
    writes are limited differently: C xenstored takes paths up to 2048 bytes below dom0's
    home and values up to the 4096-byte message, oxenstored neither paths over 1024 bytes
    below a home nor values over 2048 bytes.  A reply that fits in its name costs the guest no read,
    so the host tries the largest shapes once, in a scratch corner of its own area, exactly
    as long as a reply to the highest domid would be, and keeps what xenstore accepted.
    """
    scratch = f"/local/domain/{backend_domid}/backend/tmem/probe"  # "probe": as long as 32751
    reply_inline = base.reply_inline_bytes
    for inline in (MAX_REPLY_INLINE_BYTES, 1400):
        if inline <= reply_inline:
            break
        try:
            conn.write(f"{scratch}/0/{RSP_DIR}/{'9' * (NAME_OVERHEAD + inline)}", b"x")
        except XsError:
            continue
        reply_inline = inline
        break
    reply_chunk = base.reply_chunk_bytes
    try:
        conn.write(f"{scratch}/0/{RSP_DIR}/{'8' * (NAME_OVERHEAD + MAX_INLINE_BYTES)}",
                   b"x" * MAX_CHUNK_BYTES)
        reply_chunk = max(reply_chunk, MAX_CHUNK_BYTES)
    except XsError:
        pass
    try:
        conn.rm(scratch)
    except XsError:
        log.debug("removing %s failed", scratch, exc_info=True)
    return replace(base, reply_inline_bytes=reply_inline, reply_chunk_bytes=reply_chunk)
