"""The guest half of the tmem split driver (as blkfront is of the block one).

:class:`TmemFront` finds its own domid and the backend the host service named in
``device/tmem/0/backend``, walks the XenbusState handshake with the host's
:class:`~xentmem.hostd.tmemback.TmemBack`, and then exchanges messages:
:meth:`TmemFront.exchange` sends one batch of op records and returns the host's results.
Everything read back is untrusted: a reply's name is parsed against the grammar, its sequence
must be the one sent (a late answer to an abandoned request is counted and ignored), its MAC
(the session key's, read at the handshake) must match, and
:func:`~xentmem.xenbus.body.decode_reply` checks every value against the op it answers.
The sequence and the costs: ``docs/protocol.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from xentmem.clock import SystemClock
from xentmem.errors import BackendError, XenStoreError
from xentmem.tmem.abi import Oid, XenbusState
from xentmem.xenbus.area import (
    BE_CHUNK_BYTES,
    BE_FEATURE_LZ4,
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
    PROBE_DIR,
    REQ_DATA_DIR,
    REQ_DIR,
    RSP_DATA_DIR,
    RSP_DIR,
    backend_path,
    frontend_path,
    parse_domid,
    parse_uint,
)
from xentmem.xenbus.body import (
    MAX_OPS_LIMIT,
    SUPPORTED_VERSIONS,
    OpRecord,
    ResultRecord,
    WireError,
    decode_reply,
    encode_request,
    reply_size_bound,
)
from xentmem.xenbus.device import STATE, XenbusDevice
from xentmem.xenbus.framing import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_INLINE_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS_LIMIT,
    MAX_NAME_PARTS,
    MAX_NAME_PARTS_LIMIT,
    MAX_REPLY_INLINE_BYTES,
    MAX_REQUEST_INLINE_BYTES,
    MIN_CHUNK_BYTES,
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
from xentmem.xenbus.session_key import SessionKey
from xentmem.xenbus.xs import Watch, XsError, XsSession

log = logging.getLogger(__name__)

_STATE_TOKEN = b"xentmem-otherend-state"
#: States that end the host's session: signed (``state-mac``) before they are written.
_ENDING_STATES = frozenset({XenbusState.INITIALISING, XenbusState.CLOSING, XenbusState.CLOSED})
_RSP_TOKEN = b"xentmem-rsp"
#: How long a reply wait runs before it looks at the acks of its own writes, so a refused
#: write (quota, permissions) fails the message at once instead of after the full timeout.
_ACK_CHECK_S = 0.05
#: How often a long reply wait looks at the host's state (it may have closed meanwhile).
_STATE_CHECK_S = 0.25
#: Answers to request writes are read once this many wait (they only matter when a reply
#: does not come: then they are read at once).
_DRAIN_AT = 16


class ChannelTimeout(XenStoreError):
    """The host did not answer a message within the timeout."""


class Disconnected(XenStoreError):
    """The host left the Connected state (closing, or gone); no op can be served."""


@dataclass
class TmemFrontCounters:
    messages: int = 0
    inline_messages: int = 0
    parted_messages: int = 0
    spilled_messages: int = 0
    inline_replies: int = 0
    parted_replies: int = 0
    spilled_replies: int = 0
    text_sent: int = 0
    text_received: int = 0
    ignored_replies: int = 0
    rejected_replies: int = 0
    refused_writes: int = 0
    timeouts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Negotiated:
    version: int
    limits: Limits
    lz4: bool
    #: The session's key (names and MACs of both ends derive from it).
    key: SessionKey = field(default_factory=SessionKey.new, repr=False)
    extra: dict[str, int] = field(default_factory=dict)


def find_domid(xs: XsSession) -> int:
    """Our own domid: the ``domid`` node of our home (a relative read)."""
    untrusted = xs.read_optional(b"domid")
    if untrusted is None:
        raise BackendError("cannot find this guest's domid: no 'domid' node in its xenstore "
                           "home (is this a Xen guest with a toolstack-made home?)")
    try:
        return parse_domid(untrusted.decode("ascii", "replace"))
    except WireError as exc:
        raise BackendError(f"this guest's 'domid' node is unusable: {exc}") from None


def find_backend(xs: XsSession, domid: int) -> tuple[int, str]:
    """The backend domid and area the host named in our frontend area; checked, not trusted."""
    fe = frontend_path(domid)
    untrusted_path = xs.read_optional(f"{fe}/{FE_BACKEND}".encode())
    untrusted_id = xs.read_optional(f"{fe}/{FE_BACKEND_ID}".encode())
    if untrusted_path is None or untrusted_id is None:
        raise BackendError(f"no tmem device: {fe} has no backend; the host's tmem service "
                           "(xentmem-hostd) has not set this guest up")
    try:
        backend_domid = parse_domid(untrusted_id.decode("ascii", "replace"))
    except WireError as exc:
        raise BackendError(f"{fe}/{FE_BACKEND_ID}: {exc}") from None
    expected = backend_path(backend_domid, domid)
    if untrusted_path.rstrip(b"\x00") != expected.encode():
        raise BackendError(f"{fe}/{FE_BACKEND} names {untrusted_path[:80]!r}; expected "
                           f"{expected}")
    return backend_domid, expected


class TmemFront(XenbusDevice):
    """One tmem device of this guest, from handshake to close."""

    def __init__(self, xs: XsSession, *, timeout: float, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 inline_bytes: int | None = None) -> None:
        """``inline_bytes``: the longest text a request's name may carry; ``None`` tries
        once per connect how long a name this xenstore takes from us."""
        super().__init__(xs)
        self.timeout = timeout
        self.clock = SystemClock()
        self._probe_names = inline_bytes is None
        self.own_limits = Limits(chunk_bytes=chunk_bytes,
                                 inline_bytes=DEFAULT_INLINE_BYTES if inline_bytes is None
                                 else inline_bytes,
                                 reply_inline_bytes=MAX_REPLY_INLINE_BYTES,
                                 reply_chunk_bytes=MAX_CHUNK_BYTES,
                                 max_chunks=MAX_CHUNKS_LIMIT, max_ops=MAX_OPS_LIMIT,
                                 max_parts=MAX_NAME_PARTS)
        self.domid = -1
        self.backend_domid = -1
        self.negotiated: Negotiated | None = None
        #: Why the device stopped working (the host left Connected), or "".
        self.broken = ""
        self.counters = TmemFrontCounters()
        self._seq = 0
        self._state_watch: Watch | None = None
        #: The request writes go on a connection of their own whose answers are read when
        #: convenient (the next message, or 50 ms into a wait), so a reply costs one wakeup;
        #: the session carries the handshake, both watches and the reads of spilled replies.
        self._writer: XsSession | None = None
        #: Writes xenstore refused since the last look: (what, error name).
        self._refused: list[tuple[str, str]] = []
        #: The current message's nodes (a refusal is matched to them only when a reply is late).
        self._writing: list[str] = []
        self._rsp_prefix = b""

    # -- handshake ----------------------------------------------------------------------------

    def connect(self) -> Negotiated:
        """Initialising -> (host InitWait) -> Initialised -> (host Connected) -> Connected.

        If it fails, the writer connection is closed again (the caller closes the session).
        """
        try:
            return self._connect()
        except BaseException:
            self._close_writer()
            raise

    def _connect(self) -> Negotiated:
        self.domid = find_domid(self.xs)
        self.backend_domid, self.otherend = find_backend(self.xs, self.domid)
        self.nodename = frontend_path(self.domid)
        self._rsp_prefix = f"{self.otherend}/{RSP_DIR}/".encode()
        self._open_writer()
        self._state_watch = self.xs.watch(f"{self.otherend}/{STATE}", _STATE_TOKEN)
        self.xs.watch(f"{self.otherend}/{RSP_DIR}", _RSP_TOKEN)
        self._clean_own_messages()
        if self._probe_names:
            self.own_limits = replace(self.own_limits, inline_bytes=self._probe_request_names())
        self.broken = ""
        self.state = self.read_state(self.nodename)
        self.switch_state(XenbusState.INITIALISING)
        self.wait_otherend({XenbusState.INIT_WAIT})
        self.negotiated = self._negotiate()
        self._write(FE_VERSION, str(self.negotiated.version))
        self.switch_state(XenbusState.INITIALISED)
        self.wait_otherend({XenbusState.CONNECTED}, closed_is_fatal=True)
        self.switch_state(XenbusState.CONNECTED)
        self._seq = 0
        log.info("xen: tmem device %s connected to %s (version %d, %d ops/message)",
                 self.nodename, self.otherend, self.negotiated.version,
                 self.negotiated.limits.max_ops)
        return self.negotiated

    def switch_state(self, state: XenbusState) -> None:
        """As every xenbus device does; a state that ends the host's session is signed first
        (``state-mac``, with the host's current key), so no other domain can end it."""
        if state != self.state and state in _ENDING_STATES and self.otherend:
            untrusted_key = self.xs.read_optional(f"{self.otherend}/{BE_SESSION_KEY}")
            try:
                key = SessionKey.parse(untrusted_key or b"")
            except WireError:
                log.debug("xen: no session key at %s: %s unsigned", self.otherend,
                          state.strstate())
            else:
                self._write(FE_STATE_MAC, key.state_mac(int(state)))
        super().switch_state(state)

    def close(self) -> None:
        """Closing -> (host Closed) -> Closed; never waits past the timeout, never raises."""
        try:
            if self.state in (XenbusState.CONNECTED, XenbusState.INITIALISED,
                              XenbusState.INITIALISING):
                self.switch_state(XenbusState.CLOSING)
                try:
                    self.wait_otherend({XenbusState.CLOSED})
                except BackendError as exc:
                    log.warning("xen: host did not confirm the close: %s", exc)
                self.switch_state(XenbusState.CLOSED)
            self.xs.unwatch(_RSP_TOKEN)
            self.xs.unwatch(_STATE_TOKEN)
        except XenStoreError as exc:
            log.warning("xen: closing %s: %s", self.nodename, exc)
        self._close_writer()

    def _open_writer(self) -> None:
        """A second connection to the same xenstore as the session, for request writes."""
        self._close_writer()
        path, device = self.xs.endpoint
        self._writer = XsSession(path, device=device, timeout=self.timeout,
                                 on_error=self._on_refusal).open()

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        """Every wait of this device, the writer connection's included."""
        self._timeout = seconds
        if getattr(self, "_writer", None) is not None:
            self._writer.timeout = seconds  # type: ignore[union-attr]

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None

    def _on_refusal(self, what: str, name: str) -> None:
        self.counters.refused_writes += 1
        self._refused.append((what, name))
        log.warning("xen: xenstore refused %s: %s", what, name)

    def wait_otherend(self, wanted: set[XenbusState], *,
                      closed_is_fatal: bool = False) -> XenbusState:
        """Wait for the host's state to reach one of ``wanted``.

        With ``closed_is_fatal`` a host in Closing/Closed has refused us (its ``error`` node
        says why); otherwise that is a state left from an earlier session, which the host
        leaves once it sees our Initialising.
        """
        assert self._state_watch is not None
        deadline = self.clock.monotonic() + self.timeout
        while True:
            if self.read_otherend_state() in wanted:
                return self.otherend_state
            remaining = deadline - self.clock.monotonic()
            if closed_is_fatal and self.otherend_state in (XenbusState.CLOSING,
                                                           XenbusState.CLOSED):
                raise BackendError(f"tmem host closed the device {self.otherend}: "
                                   f"{self.read_error(self.otherend)}")
            if remaining <= 0 or self._state_watch.get(remaining) is None:
                wanted_names = "/".join(s.strstate() for s in sorted(wanted))
                said = ""
                if self.otherend_state in (XenbusState.CLOSING, XenbusState.CLOSED):
                    said = f"; its error node says: {self.read_error(self.otherend)}"
                raise BackendError(
                    f"tmem host at {self.otherend} stayed {self.otherend_state.strstate()} "
                    f"for {self.timeout:g}s (waiting for {wanted_names}); is xentmem-hostd "
                    f"running?{said}")

    def _write(self, node: str, value: str) -> None:
        self.xs.write(f"{self.nodename}/{node}", value.encode())

    def _negotiate(self) -> Negotiated:
        def node(name: str) -> str | None:
            untrusted = self.xs.read_optional(f"{self.otherend}/{name}")
            return None if untrusted is None else untrusted.decode("ascii", "replace")

        try:
            untrusted_versions = (node(BE_VERSIONS) or "").split()
            offered = {parse_uint(v, low=0, high=255, what=BE_VERSIONS)
                       for v in untrusted_versions[:16]}
            common = [v for v in SUPPORTED_VERSIONS if v in offered]
            if not common:
                raise BackendError(f"tmem host speaks versions {sorted(offered)}; this guest "
                                   f"speaks {list(SUPPORTED_VERSIONS)}")
            host = Limits(
                chunk_bytes=parse_uint(node(BE_CHUNK_BYTES) or "", low=MIN_CHUNK_BYTES,
                                       high=MAX_CHUNK_BYTES, what=BE_CHUNK_BYTES),
                inline_bytes=parse_uint(node(BE_INLINE_BYTES) or "0", low=0,
                                        high=MAX_REQUEST_INLINE_BYTES, what=BE_INLINE_BYTES),
                reply_inline_bytes=parse_uint(node(BE_REPLY_INLINE_BYTES) or "0", low=0,
                                              high=MAX_REPLY_INLINE_BYTES,
                                              what=BE_REPLY_INLINE_BYTES),
                reply_chunk_bytes=parse_uint(node(BE_REPLY_CHUNK_BYTES) or "",
                                             low=MIN_CHUNK_BYTES, high=MAX_CHUNK_BYTES,
                                             what=BE_REPLY_CHUNK_BYTES),
                max_chunks=parse_uint(node(BE_MAX_CHUNKS) or "", low=1, high=MAX_CHUNKS_LIMIT,
                                      what=BE_MAX_CHUNKS),
                max_ops=parse_uint(node(BE_MAX_OPS) or "", low=1, high=MAX_OPS_LIMIT,
                                   what=BE_MAX_OPS),
                max_parts=parse_uint(node(BE_MAX_PARTS) or "1", low=1,
                                     high=MAX_NAME_PARTS_LIMIT, what=BE_MAX_PARTS),
            )
            lz4 = node(BE_FEATURE_LZ4) == "1"
            untrusted_key = self.xs.read_optional(f"{self.otherend}/{BE_SESSION_KEY}")
            key = SessionKey.parse(untrusted_key or b"")
        except WireError as exc:
            raise BackendError(f"tmem host's features in {self.otherend} are unusable: "
                               f"{exc}") from None
        limits = self.own_limits.meet(host)
        if limits.body_capacity(reply=True) < reply_size_bound([OpRecord.get_page(0, Oid(0), 0)]):
            raise BackendError(f"tmem host's limits ({limits}) cannot carry one page")
        return Negotiated(common[0], limits, lz4, key)

    def _probe_request_names(self) -> int:
        """The longest text a request's name may carry on this xenstore.

        C xenstored takes paths up to 2048 bytes below our home, oxenstored up to 1024: one
        directory as deep as the deepest request slot, with the longest name, tells which.
        Longer names mean fewer nodes, hence fewer watch events, per request.
        """
        probe = f"{self.nodename}/{PROBE_DIR}"
        inline = MAX_REQUEST_INLINE_BYTES
        try:
            self.xs.mkdir(f"{probe}/{'9' * (NAME_OVERHEAD + inline)}".encode())
        except XsError as exc:
            log.debug("xen: xenstore refuses long request names (%s)", exc)
            inline = DEFAULT_INLINE_BYTES
        try:
            self.xs.rm(f"{self.nodename}/{PROBE_DIR.split('/')[0]}".encode())
        except XsError:
            log.debug("xen: removing the name probe failed", exc_info=True)
        return inline

    def _clean_own_messages(self) -> None:
        """Drop request nodes and chunks a previous session left behind (they are ours to
        delete; the chunks' names came from that session's key)."""
        for directory in (REQ_DIR, REQ_DATA_DIR):
            try:
                self.xs.rm(f"{self.nodename}/{directory}".encode())
            except XsError as exc:
                if exc.name != "ENOENT":
                    raise

    # -- messages -----------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        if self.negotiated is None:
            raise BackendError("tmem device not connected")
        return self.negotiated.limits

    def exchange(self, ops: Sequence[OpRecord], *,
                 timeout: float | None = None) -> list[ResultRecord]:
        """Send ``ops`` as one message; their results, or ChannelTimeout / Disconnected /
        WireError (a malformed reply) / XenStoreError (xenstore refused us).  ``timeout``:
        wait less than :attr:`timeout` for the reply (what is left of a caller's own)."""
        if self.broken or self.state != XenbusState.CONNECTED:
            raise Disconnected(self.broken or f"tmem device {self.nodename or '?'} is not "
                               "connected")
        self._check_otherend()
        limits = self.limits
        assert self.negotiated is not None
        key = self.negotiated.key
        self._seq += 1
        seq = self._seq
        framed = frame(seq, encode_request(ops), limits, reply=False, key=key)
        nodename = self.nodename
        writer = self._writer
        assert writer is not None
        if writer.outstanding >= _DRAIN_AT:
            writer.drain()  # earlier messages' answers (a refusal is logged and counted)
        self._refused.clear()
        for i, value in framed.chunks:
            writer.post_write(f"{nodename}/{REQ_DATA_DIR}/{key.chunk(i, reply=False)}",
                              value.encode())
        paths = [f"{nodename}/{REQ_DIR}/{key.slot(seq, part.k, reply=False)}/{part.name}"
                 for part in framed.parts]
        for path in paths:
            writer.post_write(path, b"")
        message_path = (f"{nodename}/{REQ_DIR}/{key.slot(seq, reply=False)}/"
                        f"{framed.envelope.name}")
        paths.append(message_path)
        writer.post_write(message_path, framed.value.encode())
        writer.flush()
        self._writing = paths
        counters = self.counters
        counters.messages += 1
        if framed.envelope.chunks:
            counters.spilled_messages += 1
        elif framed.parts:
            counters.parted_messages += 1
        else:
            counters.inline_messages += 1
        counters.text_sent += len(framed.envelope.inline) + len(framed.value) + sum(
            len(v) for _, v in framed.chunks) + sum(len(p.text) for p in framed.parts)
        wait = self.timeout if timeout is None else max(0.0, min(timeout, self.timeout))
        deadline = self.clock.monotonic() + wait
        try:
            envelope, parts, reply_path = self._await_reply(seq, limits, key, deadline, wait)
        except ChannelTimeout:
            counters.timeouts += 1
            self._abandon(paths)
            raise
        except Disconnected:
            self._abandon(paths)
            raise
        body = self._reply_body(envelope, parts, limits, key, reply_path, deadline)
        try:
            results = decode_reply(body, ops)
        except WireError as exc:
            counters.rejected_replies += 1
            raise WireError(f"reply {seq} from {self.otherend} rejected: {exc}") from None
        # The writes' answers are not awaited: the host answered, so xenstore took them (a
        # refused part or chunk makes a torn message, which the host answers -EINVAL).
        return results

    def _await_reply(self, seq: int, limits: Limits, key: SessionKey, deadline: float,
                     limit_s: float) -> tuple[Envelope, list[Part], bytes]:
        """The envelope of reply ``seq``, the name parts that came before it, and its path.

        Every name sits in the directory the session key gives it; one elsewhere is not
        the host's (only dom0 can write there, so it would be a broken host) and is refused.
        """
        xs = self.xs
        events = xs.events
        parts: dict[int, Part] = {}
        acks_checked = False
        prefix = self._rsp_prefix
        while True:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise ChannelTimeout(
                    f"no reply from the tmem host at {self.otherend} to message {seq} within "
                    f"{limit_s:g}s (is xentmem-hostd running?)")
            wait = min(remaining, _STATE_CHECK_S if acks_checked else _ACK_CHECK_S)
            if not events:
                xs.pump(wait)
            if not events:
                if not acks_checked:
                    acks_checked = True
                    self._check_writes()
                continue
            untrusted_path, token = events.popleft()
            if token == _STATE_TOKEN:
                self._otherend_changed()  # the host may have closed while we wait
                continue
            if token != _RSP_TOKEN or not untrusted_path.startswith(prefix):
                continue  # the directory itself (registration, bulk removal)
            untrusted_rest = untrusted_path[len(prefix):].decode("ascii", "replace")
            untrusted_slot, sep, untrusted_name = untrusted_rest.partition("/")
            if not sep or "/" in untrusted_name:
                continue  # a reply's directory, or something deeper
            if is_part_name(untrusted_name):
                try:
                    part = parse_part(untrusted_name, limits, reply=True)
                    if untrusted_slot != key.slot(part.seq, part.k, reply=True):
                        raise WireError(f"part {part.k} of reply {part.seq} outside its "
                                        "directory")
                except WireError as exc:
                    self.counters.rejected_replies += 1
                    log.warning("xen: ignoring malformed reply part from %s: %s",
                                self.otherend, exc)
                    continue
                if part.seq == seq:
                    parts[part.k] = part
                continue  # a part of an abandoned request's reply (or a bogus one)
            try:
                envelope = parse_name(untrusted_name, limits, reply=True)
                if untrusted_slot != key.slot(envelope.seq, reply=True):
                    raise WireError(f"reply {envelope.seq} outside its directory")
            except WireError as exc:
                self.counters.rejected_replies += 1
                log.warning("xen: ignoring malformed reply node from %s: %s", self.otherend, exc)
                continue
            if envelope.seq != seq:
                if envelope.seq > seq:
                    self.counters.rejected_replies += 1
                    log.warning("xen: reply %d from %s answers no request sent (expected %d)",
                                envelope.seq, self.otherend, seq)
                else:
                    self.counters.ignored_replies += 1
                continue
            return envelope, [parts[k] for k in sorted(parts)], untrusted_path

    def _reply_body(self, envelope: Envelope, parts: list[Part], limits: Limits,
                    key: SessionKey, path: bytes, deadline: float) -> bytes:
        counters = self.counters
        counters.text_received += len(envelope.inline)
        if envelope.parts:
            counters.parted_replies += 1
            counters.text_received += sum(len(p.text) for p in parts)
            untrusted_value, untrusted_chunks = None, []
        elif not envelope.chunks:
            counters.inline_replies += 1
            untrusted_value, untrusted_chunks = None, []
        else:
            counters.spilled_replies += 1
            otherend = self.otherend
            xs = self.xs
            reads = [xs.post_read(path)]
            reads += [xs.post_read(f"{otherend}/{RSP_DATA_DIR}/{key.chunk(i, reply=True)}")
                      for i in range(1, envelope.chunks)]
            try:
                raw = [xs.collect(r, what=f"read reply {envelope.seq}", deadline=deadline)
                       for r in reads]
            except XsError as exc:
                counters.rejected_replies += 1
                raise WireError(f"reply {envelope.seq}: reading its chunks failed: {exc}") from None
            texts = [r.decode("ascii", "replace") for r in raw]
            counters.text_received += sum(len(t) for t in texts)
            untrusted_value, untrusted_chunks = texts[0], texts[1:]
        try:
            return unframe(envelope, untrusted_value, untrusted_chunks, limits, reply=True,
                           key=key, untrusted_parts=parts)
        except WireError as exc:
            counters.rejected_replies += 1
            raise WireError(f"reply {envelope.seq} from {self.otherend} rejected: {exc}") from None

    def _check_otherend(self) -> None:
        """Notice the host leaving Connected (its state watch fired) without a read per op."""
        assert self._state_watch is not None
        if self._state_watch.get_nowait() is not None:
            self._otherend_changed()

    def _otherend_changed(self) -> None:
        """The host's state watch fired: Disconnected if it is no longer Connected."""
        assert self._state_watch is not None
        while self._state_watch.get_nowait() is not None:
            pass
        if self.read_otherend_state() == XenbusState.CONNECTED:
            return
        # The host closed or restarted: its store (our pools and pages) is gone, so the device
        # stays closed until the backend is loaded again (a fresh handshake, fresh pools).
        self.broken = (f"tmem host at {self.otherend} went {self.otherend_state.strstate()}; "
                       "the device is closed (unload and load the backend to reconnect)")
        log.error("xen: %s", self.broken)
        try:
            self.switch_state(XenbusState.CLOSED)
        except (XenStoreError, BackendError):
            log.debug("could not mark %s closed", self.nodename, exc_info=True)
        raise Disconnected(self.broken)

    def host_back(self, wait: float = 0.0) -> bool:
        """After the host went silent (an op timed out): has it said it is back?

        A host service that restarts and resumes this session writes its ``state``
        (Connected) again, which fires our watch on it (``docs/protocol.md`` §10).  Reads
        what arrives within ``wait`` seconds; only the sender calls it (it uses the session).
        Disconnected if the host came back without our session (it left Connected).
        """
        if self._state_watch is None or self.broken:
            return False
        if self._state_watch.get(wait) is None:
            return False
        self._otherend_changed()
        return True

    def _check_writes(self) -> None:
        """Fail the message at once if xenstore refused one of its writes (quota, permission),
        rather than after the whole timeout."""
        assert self._writer is not None
        self._writer.drain()
        writing = {f"write {path}" for path in self._writing}
        for what, name in self._refused:
            if what in writing:
                raise XsError(name, what)

    def _abandon(self, paths: list[str]) -> None:
        """Delete our unanswered request's nodes so they cannot pile up against our quota."""
        try:
            assert self._writer is not None
            for path in paths:
                self._writer.post_rm(path)
            self._writer.flush()
        except XenStoreError:
            log.debug("could not remove the abandoned %s", paths[-1], exc_info=True)
