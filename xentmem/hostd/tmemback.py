"""The host half of the tmem split driver (as blkback is of the block one), one per guest.

:class:`TmemBack` does for the host service what a Linux xenbus backend driver does for a PV
device, and what the toolstack does when it attaches one: :meth:`TmemBack.setup` creates both
areas in one transaction (a guest may not create ``device/...`` itself: EACCES on a real
domU), :meth:`TmemBack.frontend_changed` follows the guest's state (``otherend_changed``), and
:meth:`TmemBack.request` serves one message.  A request is untrusted until parsed and bounded;
a malformed one gets an error reply (or, with no usable sequence number, is dropped), never an
exception out of the service.  The guest's domid comes from *where* the request was found,
never from what it says, so a guest only ever reaches its own pages.

Only the guest may write what the host serves: every node a message's name or text comes
from is checked against xenstore's permission rule (:mod:`xentmem.xenbus.perms`; read,
or known from the watch on ``req/`` since the last read), and a message must carry the MAC
of this session's key, which only the guest and dom0 can read.  A message that fails either
is never run (``docs/protocol.md``, Who may write a request).
"""

from __future__ import annotations

import contextlib
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
    BE_SESSION_KEY,
    BE_VERSIONS,
    FE_BACKEND,
    FE_BACKEND_ID,
    FE_STATE_MAC,
    FE_VERSION,
    REQ_DATA_DIR,
    REQ_DIR,
    REQ_NAMES,
    RSP_DATA_DIR,
    RSP_DIR,
    backend_path,
    frontend_path,
    parse_uint,
)
from xentmem.xenbus.body import (
    SUPPORTED_VERSIONS,
    OpRecord,
    ResultRecord,
    WireError,
    decode_request,
    encode_reply,
    reply_size_bound,
)
from xentmem.xenbus.device import ERROR_NODE, STATE, XenbusDevice
from xentmem.xenbus.framing import (
    MAX_CHUNK_BYTES,
    MAX_INLINE_BYTES,
    MAX_REPLY_INLINE_BYTES,
    NAME_OVERHEAD,
    Envelope,
    Framed,
    Limits,
    Part,
    frame,
    is_part_name,
    parse_name,
    parse_part,
    unframe,
)
from xentmem.xenbus.perms import Access, Perms, PermsError, holders
from xentmem.xenbus.session_key import TAG_CHARS, SessionKey
from xentmem.xenbus.xs import XsError, XsSession, XsTimeout

log = logging.getLogger(__name__)

#: Replies left in ``rsp/`` before it is cleared (dom0's own area: no quota applies).
REPLIES_KEPT = 32
#: Request nodes that do not authenticate (malformed, torn, forged) a guest may write at
#: once, and how many more per second after that; past it, the host stops watching the
#: guest's ``req/`` for ``UNAUTHENTIC_PAUSE_S``, then serves what it finds there.  An honest
#: guest writes almost none (a message torn by a refused write, one abandoned after a
#: timeout): a flood of them costs the host an event each, and a spilled one reads.
UNAUTHENTIC_BURST = 16
UNAUTHENTIC_PER_S = 1.0
UNAUTHENTIC_PAUSE_S = 10.0
_LEADING_SEQ = re.compile(r"(0|[1-9][0-9]{0,18})@")
#: Frontend states that end a session (its pools are dropped) while the host is in one of
#: the session's states (a device the host closed keeps its pools until the guest says so).
_ENDING_STATES = frozenset({XenbusState.INITIALISING, XenbusState.CLOSING, XenbusState.CLOSED})
_SESSION_STATES = frozenset({XenbusState.CONNECTED, XenbusState.CLOSING})
#: Why a guest still Connected to an earlier instance of the service is closed (ESTALE).
STALE_SESSION = ("the tmem host restarted and lost this guest's pools; load the backend "
                 "again to reconnect")


#: A frontend state meaning a handshake is under way (Initialising, Initialised), as read.
_HANDSHAKING = {str(int(XenbusState.INITIALISING)).encode(),
                str(int(XenbusState.INITIALISED)).encode()}


@dataclass
class TmemBackCounters:
    messages: int = 0
    ops: int = 0
    inline_requests: int = 0
    parted_requests: int = 0
    spilled_requests: int = 0
    malformed: int = 0
    replies_parted: int = 0
    replies_spilled: int = 0
    sessions: int = 0
    #: Messages refused because another domain may write one of their nodes.
    foreign: int = 0
    #: Messages dropped because they do not authenticate (torn, or written without the key).
    unauthentic: int = 0
    #: Messages whose nodes' permissions were read (the others' were known: see
    #: :meth:`TmemBack.request`).
    perm_checks: int = 0
    #: Times the guest's ``req/`` went unwatched for its unauthentic requests.
    pauses: int = 0


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
        #: Request names (directories) the guest made in ``req/`` since it was last removed.
        self._req_names = 0
        self._replies_kept = 0
        #: Name parts received for the next message, by part number, with their paths.
        self._parts: dict[int, tuple[Part, str]] = {}
        self._watching = False
        #: This session's key (a new one with every InitWait).
        self.key = SessionKey.new()
        #: The permissions of every node the guest makes in its area (the host's own at
        #: set-up): nothing to parse when a node has them.
        self._own_perms = [f"n{domid}".encode(), f"r{backend_domid}".encode()]
        #: Whether a request node the guest creates now, in a fresh directory below ``req/``,
        #: may be written by the guest and dom0 only, as checked at the last message and
        #: unchanged since: no event but fresh requests' nodes has come from ``req/`` since.
        self._perms_known = False
        #: Unauthentic request nodes still allowed now (``UNAUTHENTIC_BURST`` at most), as
        #: counted at ``_allowance_at``.
        self._allowance = float(UNAUTHENTIC_BURST)
        self._allowance_at = conn.clock.monotonic()
        #: While the guest's ``req/`` is not watched (too many unauthentic requests): until
        #: when, on ``conn``'s clock.
        self.paused_until: float | None = None
        self.pause_s = UNAUTHENTIC_PAUSE_S

    # -- set-up and tear-down -------------------------------------------------------------------

    def setup(self) -> None:
        """Create both areas (as a toolstack attaching a device would), then watch the guest."""
        d, b = self.domid, self.backend_domid
        guest_reads = [f"n{b}", f"r{d}"]
        host_reads = [f"n{d}", f"r{b}"]
        limits = self.limits
        fresh = SessionKey.new()
        left_connected = False

        def body(tx: int) -> None:
            nonlocal left_connected
            conn = self.conn
            self.key = fresh
            for path in (f"{self.home}/device", f"{self.home}/device/tmem"):
                if conn.read_optional(path, tx=tx) is None:
                    conn.write(path, b"", tx=tx)
                    conn.set_perms(path, guest_reads, tx=tx)
            fe = self.otherend
            # A guest still Connected here was connected to an earlier instance of this
            # service, whose store (its pools) is gone: the device is published Closed (no
            # session: nothing left to end, so the guest's next Initialising needs no
            # signature), with why, in this same transaction.  Published InitWait first, a
            # guest reloading its backend at this moment could take that InitWait for its
            # own and be closed halfway through its handshake when the stale session is
            # noticed.
            untrusted_state = conn.read_optional(f"{fe}/{STATE}", tx=tx)
            left_connected = untrusted_state == str(int(XenbusState.CONNECTED)).encode()
            if untrusted_state in _HANDSHAKING:
                # An earlier instance died in the middle of this guest's handshake: the guest
                # may have read that instance's key (written by dom0 alone) and will use it
                # once Connected, so the handshake goes on with it, not with a fresh one.
                published = conn.read_optional(f"{self.nodename}/{BE_SESSION_KEY}", tx=tx)
                if published is not None:  # not a key: the fresh one (the guest's load fails)
                    with contextlib.suppress(WireError):
                        self.key = SessionKey.parse(published)
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
                BE_SESSION_KEY: self.key.encode(),
                STATE: b"%d" % (XenbusState.CLOSED if left_connected else XenbusState.INIT_WAIT),
            }
            if left_connected:
                nodes[ERROR_NODE] = f"{errno.ESTALE} {STALE_SESSION}".encode()
            for node, value in nodes.items():
                path = f"{be}/{node}" if node else be
                conn.write(path, value, tx=tx)
                conn.set_perms(path, guest_reads, tx=tx)

        self.conn.transaction(body)
        self.state = XenbusState.CLOSED if left_connected else XenbusState.INIT_WAIT
        if left_connected:
            log.error("%s: %s", self.nodename, STALE_SESSION)
        self.last_seq = 0
        self.last_reply = None
        self._watch_otherend()
        log.info("tmem device for domain %d: %s <-> %s", self.domid, self.otherend, self.nodename)

    def resume(self, key: SessionKey, seq: int, reply: bytes, vm: str,
               run: Callable[[int, OpRecord], ResultRecord]) -> str:
        """Take up the session a crashed instance of the service left (its key, its last
        message and reply, kept in the run directory): "" when resumed, else why not.

        Resumed only if both ends are still Connected with that very key in the backend
        area, and the domain is the same one (its ``vm`` node): the guest then goes on
        without a new handshake.  The last reply is written again (the guest may be waiting
        for it: it is answered from the record, never run twice), requests the guest wrote
        meanwhile are served, and the backend's ``state`` is written again, which fires the
        guest's watch on it: the sign that the host is back (``docs/protocol.md``, §10).
        """
        conn = self.conn
        untrusted_key = conn.read_optional(f"{self.nodename}/{BE_SESSION_KEY}") or b""
        untrusted_vm = (conn.read_optional(f"{self.home}/vm") or b"").decode("ascii", "replace")
        own_state = self.read_state(self.nodename)
        frontend = self.read_otherend_state()
        if untrusted_key.rstrip(b"\x00") != key.encode():
            return "its backend area holds another session key"
        if untrusted_vm != vm:
            return f"domain {self.domid} is another domain now (vm {untrusted_vm!a})"
        if own_state != XenbusState.CONNECTED or frontend != XenbusState.CONNECTED:
            return (f"the device is {own_state.strstate()}/{frontend.strstate()}, "
                    "not Connected on both ends")
        self.key = key
        self.state = XenbusState.CONNECTED
        self.last_seq = seq
        self.last_reply = None
        # req/ may still hold up to REQ_NAMES directories of served messages (more if the
        # crash came before the removal reached xenstore), uncounted now: the first message
        # served clears it, before its reply.
        self._req_names = REQ_NAMES
        self._replies_kept = 0
        self._parts.clear()
        self._watch_otherend()
        try:
            if seq:
                self._reply(seq, frame(seq, reply, self._reply_limits(), reply=True, key=key))
            self._serve_waiting(run)
            self.writer.settle()
            self.conn.write(f"{self.nodename}/{STATE}", str(int(XenbusState.CONNECTED)).encode())
        except BaseException:
            # Cut short (xenstore slow or busy): the service keeps the session and tries
            # again with a new device, which must be able to watch the guest.
            self._unwatch_otherend()
            raise
        log.info("tmem device of domain %d resumed after a restart of the service "
                 "(last message %d)", self.domid, seq)
        return ""

    def _serve_waiting(self, run: Callable[[int, OpRecord], ResultRecord]) -> None:
        """Serve the requests in ``req/`` that no watch event will announce again (written
        while the service was down): name parts first, then messages by seq."""
        conn = self.conn
        req = f"{self.otherend}/{REQ_DIR}"
        try:
            untrusted_slots = conn.directory(req)
        except XsError:
            return
        waiting: list[tuple[int, bool, bytes]] = []  # seq, is the message, path
        for untrusted_slot in untrusted_slots[:REQ_NAMES * 8]:
            slot = untrusted_slot.decode("ascii", "replace")
            try:
                untrusted_names = conn.directory(f"{req}/{slot}")
            except XsError:
                continue
            for untrusted_name in untrusted_names[:8]:
                name = untrusted_name.decode("ascii", "replace")
                match = _LEADING_SEQ.match(name)
                if match is not None and int(match[1]) > self.last_seq:
                    waiting.append((int(match[1]), not is_part_name(name),
                                    f"{req}/{slot}/{name}".encode()))
        for _, _, path in sorted(waiting):  # a message's parts before the message
            self.request(path, run)

    def _watch_otherend(self) -> None:
        """Watch the guest's ``state`` and ``req/``: both or neither, since a watch left
        registered by a failed set-up makes every later one of this domain fail ("already
        watched") and the guest could never be served again."""
        try:
            self._watch(f"{self.otherend}/{STATE}", self.state_token)
            self._watch(f"{self.otherend}/{REQ_DIR}", self.req_token)
        except BaseException:
            self._unwatch_otherend()
            raise
        self._watching = True

    def _watch(self, path: str, token: bytes) -> None:
        """Watch ``path``; if xenstore still holds a watch of ours with this token (a watch
        or unwatch whose answer timed out), remove it and watch again, or every later try
        would be refused (EEXIST) and the guest never served."""
        try:
            self.conn.watch(path, token)
        except XsError as exc:
            if exc.name != "EEXIST":
                raise
            log.info("domain %d: %s was still watched; watched again", self.domid, path)
            self.conn.unwatch(token, path)
            self.conn.watch(path, token)

    def _unwatch_otherend(self) -> None:
        """Remove both watches, as far as xenstore lets us (a failure is only logged)."""
        for token in (self.state_token, self.req_token):
            try:
                self.conn.unwatch(token)
            except (XsError, XsTimeout):
                log.debug("unwatch %r failed", token, exc_info=True)
        self._watching = False

    def teardown(self, *, remove_areas: bool) -> None:
        """The guest is gone (or the service stops): drop its pages, optionally its areas."""
        self._settle_writes()
        dropped = self.store.destroy_client(self.domid)
        if self._watching:
            self._unwatch_otherend()
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
        if frontend != XenbusState.UNKNOWN:
            # The state decides whether the guest's pages live: only the guest's word counts.
            why = self._foreign_writers([f"{self.otherend}/{STATE}"])
            if why:
                self.otherend_state = previous
                log.warning("domain %d: state %s ignored: %s", self.domid,
                            frontend.strstate(), why)
                if self.state != XenbusState.CLOSING:
                    self.dev_fatal(errno.EACCES, f"{why}; refusing to serve it")
                return
            if frontend in _ENDING_STATES and self.state in _SESSION_STATES:
                # Pages would go: believed only when signed with the session key, which no
                # other domain has (whoever could write the node at some moment).
                untrusted_mac = self.conn.read_optional(f"{self.otherend}/{FE_STATE_MAC}")
                if not self.key.check_state_mac(untrusted_mac or b"", int(frontend)):
                    self.otherend_state = previous
                    log.warning("domain %d: state %s ignored: not signed with the session key",
                                self.domid, frontend.strstate())
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
                self.dev_fatal(errno.ESTALE, STALE_SESSION)
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
        if self.state in _SESSION_STATES:
            self.store.drop_pools(self.domid)
        for stale in (RSP_DIR, RSP_DATA_DIR, ERROR_NODE):
            try:
                self.conn.rm(f"{self.nodename}/{stale}")
            except XsError as exc:
                if exc.name != "ENOENT":
                    raise
        self.last_seq = 0
        self.last_reply = None
        self._req_names = self._replies_kept = 0
        self._parts.clear()
        self._perms_known = False
        # A fresh key before InitWait: the guest reads it once it sees InitWait.
        self.key = SessionKey.new()
        key_path = f"{self.nodename}/{BE_SESSION_KEY}"
        self.conn.write(key_path, self.key.encode())
        self.conn.set_perms(key_path, [f"n{self.backend_domid}", f"r{self.domid}"])
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
        fe = self.otherend
        why = self._foreign_writers([fe, f"{fe}/{REQ_DIR}", f"{fe}/{REQ_DATA_DIR}",
                                     f"{fe}/{STATE}", f"{fe}/{FE_VERSION}"], missing_ok=True)
        if why:
            self.dev_fatal(errno.EACCES, f"{why}; refusing to serve it")
            return
        self.last_seq = 0
        self.last_reply = None
        self._req_names = self._replies_kept = 0
        self._parts.clear()
        self._perms_known = False
        self.counters.sessions += 1
        vm = self.conn.read_optional(f"{self.home}/vm") or b""
        self.store.open_session(self.domid, self.key, vm.decode("ascii", "replace"))
        self.switch_state(XenbusState.CONNECTED)
        log.info("tmem device of domain %d connected (version %d)", self.domid, version)

    def _foreign_writers(self, paths: list[str], *, missing_ok: bool = False) -> str:
        """Why some domain other than the guest and the host may write one of ``paths``
        (or "" if none may); their permissions are read now, in one round trip."""
        conn = self.conn
        ids = [(path, conn.post_get_perms(path)) for path in paths]
        deadline = conn.clock.monotonic() + conn.timeout
        why = ""
        for path, req_id in ids:  # every answer is collected, whatever the first says
            try:
                untrusted = conn.collect_perms(req_id, what=f"get-perms {path}",
                                               deadline=deadline)
            except XsError as exc:
                if not (missing_ok and exc.name == "ENOENT"):
                    why = why or f"the permissions of {path} are unreadable ({exc.name})"
                continue
            why = why or self.foreign_writers_of(path, untrusted)
        return why

    def foreign_writers_of(self, path: str, untrusted_perms: list[bytes]) -> str:
        """Why ``path`` with these permissions is writable by another domain, or ""."""
        if untrusted_perms == self._own_perms:
            return ""
        try:
            perms = Perms.parse(untrusted_perms)
        except PermsError as exc:
            return f"{path} has unusable permissions ({exc})"
        foreign = holders(perms, Access.WRITE).besides((self.domid, self.backend_domid))
        return f"{path} is writable by {foreign}" if foreign else ""

    def _close_session(self) -> None:
        dropped = self.store.drop_pools(self.domid)
        self.switch_state(XenbusState.CLOSED)
        log.info("tmem device of domain %d closed (%d pools dropped)", self.domid, dropped)

    # -- requests -------------------------------------------------------------------------------

    def request(self, untrusted_path: bytes, run: Callable[[int, OpRecord], ResultRecord]) -> None:
        """A watch event under the guest's ``req/``: serve the message it names, if new.

        A node takes its directory's permissions when it is created, and xenstore fires the
        watch on ``req/`` for every change below it, permissions included.  So while only
        fresh requests' nodes arrive, the next request's permissions are those the last check
        found, and are not read again (``docs/protocol.md`` §9, What the host checks).
        """
        perms_known, self._perms_known = self._perms_known, False
        if (self.state != XenbusState.CONNECTED or self.paused_until is not None
                or not untrusted_path.startswith(self._req_prefix)):
            return
        untrusted_rest = untrusted_path[len(self._req_prefix) :].decode("ascii", "replace")
        untrusted_slot, sep, untrusted_name = untrusted_rest.partition("/")
        if not sep or "/" in untrusted_name:
            return  # the directory itself, a slot directory, or something deeper
        # A name below a slot: counted as a directory of req/ (an event for a node already
        # counted, a change of its permissions, only brings the next removal earlier).
        self._req_names += 1
        if is_part_name(untrusted_name):
            if self._part(untrusted_slot, untrusted_name, untrusted_path):
                self._perms_known = perms_known
            return
        try:
            envelope = parse_name(untrusted_name, self.limits, reply=False)
        except WireError as exc:
            self._malformed(untrusted_name, exc)
            return
        if envelope.seq <= self.last_seq:
            return  # our own removal of a consumed request, or a replay
        if untrusted_slot != self.key.slot(envelope.seq, reply=False):
            self._malformed(untrusted_name, WireError(
                f"message {envelope.seq} in directory {untrusted_slot[:20]!a}, not its own"))
            return
        counters = self.counters
        message_path = untrusted_path.decode("ascii", "replace")
        # Parts left from another message (one never completed) are not this one's.
        parts = [self._parts[k] for k in sorted(self._parts)
                 if self._parts[k][0].seq == envelope.seq]
        self._parts.clear()
        try:
            body, foreign = self._body(envelope, message_path, parts, perms_known)
        except (WireError, XsError, XsTimeout) as exc:
            # Not authenticated: a torn message, or one written without the key.  Nobody is
            # answered, and the sequence does not move (it is not the guest's word).
            counters.unauthentic += 1
            self._consumed(unauthentic=True)
            log.warning("domain %d message %d dropped: %s", self.domid, envelope.seq, exc)
            self._distrust()
            return
        self.last_seq = envelope.seq
        counters.messages += 1
        status = 0
        results: list[ResultRecord] = []
        if foreign:
            counters.foreign += 1
            log.warning("domain %d message %d refused: %s", self.domid, envelope.seq, foreign)
            status = -errno.EACCES
        else:
            try:
                ops = decode_request(body, max_ops=self.limits.max_ops)
            except WireError as exc:
                counters.malformed += 1
                log.warning("domain %d message %d rejected: %s", self.domid, envelope.seq, exc)
                status = -errno.EINVAL
            else:
                counters.ops += len(ops)
                if reply_size_bound(ops) > self._reply_limits().body_capacity(reply=True):
                    # Sized before anything runs: a refused message changes nothing (its
                    # exclusive gets would have taken pages no reply could carry).
                    log.warning("domain %d message %d refused: its reply could outgrow the "
                                "reply limit", self.domid, envelope.seq)
                    status = -errno.E2BIG
                else:
                    results = [run(self.domid, op) for op in ops]
        self._consumed()
        body, framed = self._framed_reply(envelope.seq, results, status)
        self.store.commit(self.domid, envelope.seq, body)  # before it is sent: see resume()
        self._reply(envelope.seq, framed)

    def _consumed(self, *, unauthentic: bool = False) -> None:
        """Remove served requests in bulk, before the guest can add the next one.

        Each name of a request sits in a directory of its own; one removal of ``req/`` (one
        request, one watch event back) clears them all, once the guest's next message (at
        most ``max_parts`` names) could take ``req/`` past :data:`REQ_NAMES` directories.
        It happens before the reply is written, so the guest, waiting for that reply, cannot
        have added a new request in between.

        A node that did not authenticate counts as a message of ``max_parts`` names: forged
        nodes are then cleared at least once per ``REQ_NAMES // max_parts`` of them, not left
        in ``req/`` to be served (and distrusted) again when a pause ends.
        """
        if unauthentic:
            self._req_names += self.limits.max_parts - 1
        if self._req_names + self.limits.max_parts > REQ_NAMES:
            self.writer.post_rm(f"{self.otherend}/{REQ_DIR}")
            self._req_names = 0

    def _part(self, untrusted_slot: str, untrusted_name: str, untrusted_path: bytes) -> bool:
        """A name part of the next message: kept until its message node arrives (True).

        A malformed part is counted and dropped: its message then lacks it and does not
        authenticate.  Parts of messages already served (a replay) are ignored.
        """
        try:
            part = parse_part(untrusted_name, self.limits, reply=False)
            if part.seq > self.last_seq and untrusted_slot != self.key.slot(
                    part.seq, part.k, reply=False):
                raise WireError(f"part {part.k} of message {part.seq} in directory "
                                f"{untrusted_slot[:20]!a}, not its own")
        except WireError as exc:
            self.counters.malformed += 1
            log.warning("domain %d: malformed request part %r: %s", self.domid,
                        untrusted_name[:60], exc)
            self._distrust()
            return False
        if part.seq <= self.last_seq:
            return False
        self._parts[part.k] = (part, untrusted_path.decode("ascii", "replace"))
        return True

    def _body(self, envelope: Envelope, message_path: str, parts: list[tuple[Part, str]],
              perms_known: bool) -> tuple[bytes, str]:
        """The message's body (authenticated), and why another domain may write one of its
        nodes ("" if none may).  A message in names is authenticated before anything is
        asked of xenstore, so a forged or torn one costs the host no request; a spilled one
        has its values and permissions read in one round trip first.  The permissions of
        nodes below ``req/`` are read only when not ``perms_known``."""
        conn = self.conn
        counters = self.counters
        paths = [message_path, *(path for _, path in parts)]
        slots = {path.rsplit("/", 2)[-2] for path in paths}
        reads: list[int] = []
        chunk_paths: list[str] = []
        body: bytes | None = None
        if envelope.chunks:
            counters.spilled_requests += 1
            chunk_paths = [f"{self.otherend}/{REQ_DATA_DIR}/{self.key.chunk(i, reply=False)}"
                           for i in range(1, envelope.chunks)]
            reads = [conn.post_read(path) for path in (message_path, *chunk_paths)]
        else:
            if envelope.parts:
                counters.parted_requests += 1
            else:
                counters.inline_requests += 1
            body = unframe(envelope, None, (), self.limits, reply=False, key=self.key,
                           untrusted_parts=[part for part, _ in parts])
        req_dir = f"{self.otherend}/{REQ_DIR}"
        req_ids: tuple[int, int] | None = None
        if perms_known:
            paths = chunk_paths  # data/ is not watched: its chunks are read each time
        else:
            counters.perm_checks += 1
            paths += chunk_paths
            req_ids = (conn.post_get_perms(req_dir), conn.post_directory(req_dir))
        perm_ids = [conn.post_get_perms(path) for path in paths]
        deadline = conn.clock.monotonic() + conn.timeout
        failure: XsError | XsTimeout | None = None
        untrusted: list[str] = []
        for req_id in reads:  # every answer is collected, whatever the first says
            try:
                untrusted.append(conn.collect(req_id, what=f"read chunk of message "
                                              f"{envelope.seq}", deadline=deadline)
                                 .decode("ascii", "replace"))
            except (XsError, XsTimeout) as exc:
                failure = failure or exc
        foreign = ""
        for path, req_id in zip(paths, perm_ids, strict=True):
            try:
                untrusted_perms = conn.collect_perms(req_id, what=f"get-perms {path}",
                                                     deadline=deadline)
            except (XsError, XsTimeout) as exc:
                failure = failure or exc
                continue
            foreign = foreign or self.foreign_writers_of(path, untrusted_perms)
        if req_ids is not None:
            perms_known = self._only_own_below(req_dir, *req_ids, slots, deadline)
        if failure is not None:
            raise failure
        if body is None:
            body = unframe(envelope, untrusted[0], untrusted[1:], self.limits, reply=False,
                           key=self.key)
        self._perms_known = perms_known and not foreign
        return body, foreign

    def _only_own_below(self, req_dir: str, perms_id: int, listing_id: int, slots: set[str],
                        deadline: float) -> bool:
        """Whether the nodes the guest creates next below ``req_dir`` may be written by the
        guest and dom0 only: ``req_dir`` may be, and it holds no directory but ``slots`` (this
        message's), so no directory made before with other permissions awaits a request."""
        conn = self.conn
        untrusted_perms: list[bytes] | None = None
        untrusted_children: list[bytes] | None = None
        with contextlib.suppress(XsError, XsTimeout):  # both answers are collected
            untrusted_perms = conn.collect_perms(perms_id, what=f"get-perms {req_dir}",
                                                 deadline=deadline)
        with contextlib.suppress(XsError, XsTimeout):
            untrusted_children = conn.collect_directory(listing_id, what=f"list {req_dir}",
                                                        deadline=deadline)
        if untrusted_perms is None or untrusted_children is None:
            return False
        return not self.foreign_writers_of(req_dir, untrusted_perms) and {
            child.decode("ascii", "replace") for child in untrusted_children} == slots

    def _framed_reply(self, seq: int, results: list[ResultRecord],
                      status: int) -> tuple[bytes, Framed]:
        """The reply's body, and its nodes' names and values."""
        limits = self._reply_limits()
        try:
            body = encode_reply(results, status=status)
            return body, frame(seq, body, limits, reply=True, key=self.key)
        except WireError as exc:
            log.warning("domain %d message %d: reply does not fit (%s)", self.domid, seq, exc)
            body = encode_reply([], status=-errno.E2BIG)
            return body, frame(seq, body, limits, reply=True, key=self.key)

    def _reply(self, seq: int, framed: Framed) -> None:
        key = self.key
        if self._replies_kept >= REPLIES_KEPT:
            # Every earlier reply has been read: the guest sent a new request since.
            self.writer.post_rm(f"{self.nodename}/{RSP_DIR}")
            self._replies_kept = 0
        rsp = f"{self.nodename}/{RSP_DIR}"
        for i, value in framed.chunks:
            self.writer.post_write(
                f"{self.nodename}/{RSP_DATA_DIR}/{key.chunk(i, reply=True)}", value.encode())
        for part in framed.parts:
            self.writer.post_write(f"{rsp}/{key.slot(seq, part.k, reply=True)}/{part.name}", b"")
        name = framed.envelope.name
        self.writer.post_write(f"{rsp}/{key.slot(seq, reply=True)}/{name}",
                               framed.value.encode())
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
        """A request node that is not a message: logged, counted and never answered (its
        name is not authenticated, so its sequence number is nobody's word).

        The node is left for the next bulk removal of ``req/`` (counted as served).
        """
        match = _LEADING_SEQ.match(untrusted_name)
        if match is not None and int(match[1]) <= self.last_seq:
            return  # a node seen before (its removal), or a replay
        self.counters.malformed += 1
        log.warning("domain %d: request node %r is not a message: %s", self.domid,
                    untrusted_name[:60], exc)
        self._consumed(unauthentic=True)
        self._distrust()

    def _distrust(self) -> None:
        """One more request node that did not authenticate: past the allowance, the guest's
        ``req/`` goes unwatched for :attr:`pause_s` (its events queued so far dropped with
        the watch), and :meth:`tick` takes it up again."""
        now = self.conn.clock.monotonic()
        self._allowance = min(float(UNAUTHENTIC_BURST), self._allowance
                              + (now - self._allowance_at) * UNAUTHENTIC_PER_S) - 1
        self._allowance_at = now
        if self._allowance >= 0 or self.paused_until is not None:
            return
        self.paused_until = now + self.pause_s
        self.counters.pauses += 1
        self._parts.clear()
        log.warning("domain %d: too many requests that do not authenticate; its %s/ is not "
                    "served for %gs", self.domid, REQ_DIR, self.pause_s)
        try:
            self.conn.unwatch(self.req_token)
        except (XsError, XsTimeout) as exc:  # its events are still ignored while paused
            log.warning("domain %d: unwatch of %s/: %s", self.domid, REQ_DIR, exc)

    def tick(self, run: Callable[[int, OpRecord], ResultRecord]) -> None:
        """Called by the service about once a second: once a pause is over, watch ``req/``
        again and serve what the guest wrote meanwhile (as after a restart)."""
        if self.paused_until is None or self.conn.clock.monotonic() < self.paused_until:
            return
        self._perms_known = False
        if not self._watching:  # torn down meanwhile
            self.paused_until = None
            return
        if not self.conn.watching(self.req_token):  # raises: still paused, tried next tick
            self._watch(f"{self.otherend}/{REQ_DIR}", self.req_token)
        self.paused_until = None
        log.info("domain %d: its %s/ is served again", self.domid, REQ_DIR)
        if self.state == XenbusState.CONNECTED:
            self._serve_waiting(run)

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
    slot = "7" * TAG_CHARS  # as long as a reply's directory name
    for inline in (MAX_REPLY_INLINE_BYTES, 1400):
        if inline <= reply_inline:
            break
        try:
            conn.write(f"{scratch}/0/{RSP_DIR}/{slot}/{'9' * (NAME_OVERHEAD + inline)}", b"x")
        except XsError:
            continue
        reply_inline = inline
        break
    reply_chunk = base.reply_chunk_bytes
    try:
        conn.write(f"{scratch}/0/{RSP_DIR}/{slot}/{'8' * (NAME_OVERHEAD + MAX_INLINE_BYTES)}",
                   b"x" * MAX_CHUNK_BYTES)
        reply_chunk = max(reply_chunk, MAX_CHUNK_BYTES)
    except XsError:
        pass
    try:
        conn.rm(scratch)
    except XsError:
        log.debug("removing %s failed", scratch, exc_info=True)
    return replace(base, reply_inline_bytes=reply_inline, reply_chunk_bytes=reply_chunk)
