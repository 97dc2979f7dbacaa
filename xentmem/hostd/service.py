"""``xentmem-hostd``'s service: what the hypervisor's tmem did, in dom0, on one thread.

It finds guests, gives each one a tmem device (:class:`~xentmem.hostd.tmemback.TmemBack`),
serves their messages from one :class:`~xentmem.hostd.store.HostStore`, and answers control
requests (:mod:`xentmem.hostd.handlers`).  Everything happens in :meth:`HostService.run`'s
loop: xenstore events (through :class:`~xentmem.xenbus.xs.XsSession`, no router thread),
control clients, and a stop request; one thread, so the store needs no locks.

Guests are found as a toolstack's guests are: ``@introduceDomain`` (and start-up) lists
``/local/domain`` and sets up a device for each guest home not yet known; ``@releaseDomain``
tears down the devices of domains that are gone (their pages are dropped, their areas
removed).  ``domains`` restricts the service to the listed guests.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

from xentmem.clock import SystemClock
from xentmem.control.server import DEFAULT_IDLE_TIMEOUT_S, PolledServer, ServerError
from xentmem.errors import XentmemError
from xentmem.hostd.handlers import HostControl
from xentmem.hostd.store import HostStore
from xentmem.hostd.tmemback import TmemBack, probe_reply_limits
from xentmem.notify import Notifier
from xentmem.tmem.abi import TmemOp
from xentmem.xenbus.area import parse_domid
from xentmem.xenbus.body import OpRecord, PageEncoding, ResultRecord, WireError
from xentmem.xenbus.framing import Limits
from xentmem.xenbus.xs import XsConnectionLost, XsError, XsSession, XsTimeout

log = logging.getLogger("xentmem.hostd")

INTRODUCE_TOKEN = b"xentmem-hostd-introduce"
RELEASE_TOKEN = b"xentmem-hostd-release"
#: Longest the loop sleeps when nothing happens (it also wakes for the watchdog).
IDLE_S = 1.0
IDLE_MS = int(IDLE_S * 1000)
#: The answers to replies written are read once this many wait, or when the loop is idle.
DRAIN_AT = 16
#: Longest one turn of the loop serves events before it polls again (an event that reads
#: may take a round trip through xenstore).
BURST_S = 0.25
#: Longest wait before a domain whose set-up or resume failed is tried again (the first
#: wait is ``IDLE_S``, doubled at each failure).
RETRY_MAX_S = 60.0


class HostService:
    """The tmem host: devices for guests, one store, one loop."""

    def __init__(
        self,
        *,
        xenstore: str | os.PathLike[str],
        device: bool = False,
        store: HostStore,
        control_path: str | os.PathLike[str] | None = None,
        domains: Iterable[int] | None = None,
        backend_domid: int = 0,
        limits: Limits | None = None,
        timeout: float = 5.0,
        split_replies: bool = False,
        control_idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self.store = store
        #: Long replies in name parts rather than one spilled value (see TmemBack).
        self.split_replies = split_replies
        self.limits = limits or Limits.for_host()
        self._probe_limits = limits is None
        self.backend_domid = backend_domid
        self.only = frozenset(domains) if domains else None
        self.conn = XsSession(xenstore, device=device, timeout=timeout)
        #: Replies and removals go on a connection of their own whose answers are read when
        #: convenient (DRAIN_AT at a time, or when idle): the loop does not wake up once more
        #: per request just to hear "OK" for its reply.  Refusals are still logged.
        self.writer = XsSession(xenstore, device=device, timeout=timeout)
        self.control = (
            PolledServer(control_path, HostControl(self).handle_line, daemon="xentmem-hostd",
                         idle_timeout_s=control_idle_timeout_s)
            if control_path is not None else None
        )
        self.devices: dict[int, TmemBack] = {}
        self._seen_introduced: set[int] = set()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._by_token: dict[bytes, tuple[TmemBack, str]] = {}
        #: Domains whose set-up (or resume) failed: when to try again, and the wait after.
        self._retry: dict[int, tuple[float, float]] = {}
        self._scanned = False
        self.ready = threading.Event()

    # -- life cycle -----------------------------------------------------------------------------

    def open(self) -> HostService:
        self.conn.open()
        self.writer.open()
        if self.control is not None:
            self.control.open()
        if self._probe_limits:
            self.limits = probe_reply_limits(self.conn, self.backend_domid, self.limits)
            log.info("replies up to %d characters in a name, %d in a value",
                     self.limits.reply_inline_bytes, self.limits.reply_chunk_bytes)
        self.conn.watch("@introduceDomain", INTRODUCE_TOKEN)
        self.conn.watch("@releaseDomain", RELEASE_TOKEN)
        self.scan()
        return self

    def stop(self) -> None:
        """Ask :meth:`run` to return (from any thread or a signal handler)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self, *, clean: bool = True) -> None:
        """A clean stop: tell every guest the device is closed (its pages go with us), then
        disconnect; the run directory's arena and sessions go too.  Not clean (the service
        failed): nothing is told or dropped, the run directory is kept as a crash leaves it,
        for the next start to resume."""
        for device in list(self.devices.values()) if clean else []:
            try:
                device.store.destroy_client(device.domid)
                device.switch_state(device.state.CLOSED)
            except (XsError, XsTimeout, XsConnectionLost):
                log.debug("closing device of domain %d", device.domid, exc_info=True)
        self.devices.clear()
        if clean:
            self.store.discard()
        else:
            self.store.close()
        if self.control is not None:
            self.control.close()
        self.conn.close()
        self.writer.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def run(self, on_idle: Any = None) -> None:
        """Serve until :meth:`stop`; XsConnectionLost (xenstore went away) ends it too.

        After a stop, :meth:`run` may be called again: events that arrived meanwhile wait
        in the connection and are served then.
        """
        self.ready.set()
        try:
            self._loop(on_idle)
        finally:
            self._stop.clear()

    def _loop(self, on_idle: Any) -> None:
        """One wakeup per burst of events.  The descriptors are registered once, and the
        control socket's again only when they may have changed (a control descriptor was
        ready, the loop was idle, or ``IDLE_S`` passed, when idle clients expire): a busy
        guest's wakeups do not rebuild them (``docs/protocol.md`` §8).

        A turn serves the events queued when it begins, for ``BURST_S`` at most: those that
        arrive meanwhile (or are left) wait for the next turn, after the writer's answers,
        the control socket, the devices' :meth:`~TmemBack.tick` and ``on_idle`` (the
        watchdog), so a guest writing events faster than they are served starves none of
        them (``docs/protocol.md`` §7)."""
        conn_fd = self.conn.fileno()
        poller = select.poll()
        poller.register(conn_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        control: frozenset[int] = frozenset()
        refresh_at = -1.0  # the control descriptors are read now
        tick_at = time.monotonic() + IDLE_S
        while not self._stop.is_set():
            if self.control is not None and time.monotonic() >= refresh_at:
                control = self._register_control(poller, control)
                refresh_at = time.monotonic() + IDLE_S
            backlog = bool(self.conn.events)
            ready = poller.poll(0 if backlog else IDLE_MS)
            idle = not ready and not backlog
            readable = {fd for fd, _ in ready}
            if conn_fd in readable:
                self.conn.receive()  # XsConnectionLost if xenstore hung up
            turn_ends = time.monotonic() + BURST_S
            for _ in range(len(self.conn.events)):  # a dispatch may drop events: re-read
                if not self.conn.events or self._stop.is_set() or time.monotonic() > turn_ends:
                    break
                path, token = self.conn.events.popleft()
                self._dispatch(path, token)
                self.writer.flush()
                self.conn.flush()
            if time.monotonic() >= tick_at:
                self._tick()
                tick_at = time.monotonic() + IDLE_S
            if self.writer.outstanding >= DRAIN_AT or idle:
                self.writer.drain()
            if idle or not readable.isdisjoint(control):
                refresh_at = -1.0  # accepted, closed or idle: read the set again
                for fd in readable & control:
                    self.control.ready(fd)  # type: ignore[union-attr]
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
            if on_idle is not None:
                on_idle()

    def _register_control(self, poller: select.poll, old: frozenset[int]) -> frozenset[int]:
        """The control socket's descriptors now (idle clients expired), registered in place
        of ``old``."""
        assert self.control is not None
        new = frozenset(self.control.filenos())
        for fd in old - new:
            poller.unregister(fd)
        for fd in new - old:
            poller.register(fd, select.POLLIN)
        return new

    # -- events ---------------------------------------------------------------------------------

    def _tick(self) -> None:
        """Each device's :meth:`~TmemBack.tick` (a paused ``req/`` served again), and a scan
        when a domain whose set-up failed is due to be tried again: a transient xenstore
        error must not leave a guest unserved until the next @introduceDomain."""
        now = time.monotonic()
        if any(when <= now for when, _ in self._retry.values()):
            self._dispatch(b"@introduceDomain", INTRODUCE_TOKEN)  # a scan, its errors logged
        for device in list(self.devices.values()):
            try:
                device.tick(self.run_op)
            except XsConnectionLost:
                raise
            except (XsError, XsTimeout, WireError) as exc:
                log.warning("domain %d: %s", device.domid, exc)
            except Exception:  # one guest's device must not stop the service for all
                log.exception("domain %d: tick failed", device.domid)
        self.writer.flush()
        self.conn.flush()

    def _dispatch(self, untrusted_path: bytes, token: bytes) -> None:
        try:
            if token == INTRODUCE_TOKEN:
                self.scan()
            elif token == RELEASE_TOKEN:
                self.reap()
            else:
                entry = self._by_token.get(token)
                if entry is None:
                    return
                device, kind = entry
                if kind == "state":
                    device.frontend_changed()
                else:
                    device.request(untrusted_path, self.run_op)
        except XsConnectionLost:
            raise
        except (XsError, XsTimeout, WireError) as exc:
            log.warning("event %r on %r: %s", token, untrusted_path[:80], exc)
        except Exception:  # one guest's event must not stop the service for all
            log.exception("event %r on %r failed", token, untrusted_path[:80])

    def scan(self) -> None:
        """Set up a device for every guest home not yet served."""
        try:
            untrusted_names = self.conn.directory("/local/domain")
        except XsError as exc:
            if exc.name != "ENOENT":
                raise
            untrusted_names = []  # no guest was ever built here
        listed: set[int] = set()
        for untrusted_name in untrusted_names:
            try:
                domid = parse_domid(untrusted_name.decode("ascii", "replace"))
            except WireError:
                continue
            listed.add(domid)
            if domid == self.backend_domid or domid in self.devices:
                continue
            if self.only is not None and domid not in self.only:
                continue
            device = TmemBack(
                self.conn, self.store, domid, backend_domid=self.backend_domid, limits=self.limits,
                writer=self.writer, split_replies=self.split_replies,
            )
            try:
                if not self._resume(device):
                    device.setup()
            except XsConnectionLost:
                raise
            except Exception as exc:  # one domain must not keep the others from being set up
                self._try_later(domid, exc)
                continue
            self._retry.pop(domid, None)
            self.devices[domid] = device
            self._by_token[device.state_token] = (device, "state")
            self._by_token[device.req_token] = (device, "req")
        for domid in list(self._retry):
            if domid not in listed:
                del self._retry[domid]
        for domid in self.devices:
            if self.conn.is_domain_introduced(domid):
                self._seen_introduced.add(domid)
        if self.store.resumable or not self._scanned:
            # The first scan after a crash: sessions no device took up lose their pools,
            # but those whose resume failed on an error (xenstore slow) wait for the next try.
            self.store.drop_unresumed({d for d, dev in self.devices.items()
                                       if dev.state == dev.state.CONNECTED}, listed,
                                      waiting=set(self._retry), first=not self._scanned)
        self._scanned = True

    def _try_later(self, domid: int, exc: Exception) -> None:
        """Set-up (or resume) of ``domid`` failed: logged, and tried again after a wait
        that doubles with each failure, up to ``RETRY_MAX_S``."""
        _, wait = self._retry.get(domid, (0.0, IDLE_S / 2))
        wait = min(wait * 2, RETRY_MAX_S)
        self._retry[domid] = (time.monotonic() + wait, wait)
        waits = " (its session waits)" if domid in self.store.resumable else ""
        if isinstance(exc, (XsError, XsTimeout, WireError)):
            log.warning("cannot set up a tmem device for domain %d%s: %s; tried again in "
                        "%gs", domid, waits, exc, wait)
        else:
            log.error("cannot set up a tmem device for domain %d%s; tried again in %gs",
                      domid, waits, wait, exc_info=exc)

    def _resume(self, device: TmemBack) -> bool:
        """Take up the session a crashed instance left for this guest, if it still stands."""
        session = self.store.resumable.pop(device.domid, None)
        if session is None:
            return False
        record = session.record
        try:
            why = device.resume(session.key, record.seq, record.reply, session.vm, self.run_op)
        except BaseException:
            # Cut short: what it served is recorded (the session's record moved on), and
            # the next try resumes from there; the guest's pages must not go for that.
            self.store.resumable[device.domid] = session
            raise
        if why:
            log.warning("domain %d: session not resumed: %s; its pools are dropped",
                        device.domid, why)
            self.store.drop_pools(device.domid)
            return False
        self._by_token[device.state_token] = (device, "state")
        self._by_token[device.req_token] = (device, "req")
        return True

    def reap(self) -> None:
        """Tear down the devices of guests that are gone."""
        for domid, device in list(self.devices.items()):
            if self.conn.is_domain_introduced(domid):
                self._seen_introduced.add(domid)
                continue
            home_gone = self.conn.read_optional(device.home) is None
            if domid in self._seen_introduced or home_gone:
                device.teardown(remove_areas=True)
                del self.devices[domid]
                self._by_token.pop(device.state_token, None)
                self._by_token.pop(device.req_token, None)
                self._seen_introduced.discard(domid)

    def run_op(self, domid: int, op: OpRecord) -> ResultRecord:
        """One guest op against the store; the domid is where the request was found."""
        store = self.store
        cmd = op.cmd
        if cmd == TmemOp.PUT_PAGE:
            return ResultRecord(
                store.put_page(domid, op.pool_id, op.oid, op.index, op.encoding, op.data)
            )
        if cmd == TmemOp.GET_PAGE:
            rc, encoding, data = store.get_page_form(domid, op.pool_id, op.oid, op.index)
            if encoding is None:
                return ResultRecord(rc)
            if encoding == PageEncoding.RAW:  # kept raw (compression off, or lz4 saved little)
                return ResultRecord.with_page(data)
            return ResultRecord.with_encoded_page(encoding, data)
        if cmd == TmemOp.FLUSH_PAGE:
            return ResultRecord(store.flush_page(domid, op.pool_id, op.oid, op.index))
        if cmd == TmemOp.FLUSH_OBJECT:
            return ResultRecord(store.flush_object(domid, op.pool_id, op.oid))
        if cmd == TmemOp.NEW_POOL:
            return ResultRecord(store.new_pool(domid, op.uuid, op.flags))
        if cmd == TmemOp.DESTROY_POOL:
            return ResultRecord(store.destroy_pool(domid, op.pool_id))
        if cmd == TmemOp.CONTROL:
            return ResultRecord(-errno.EOPNOTSUPP)
        return ResultRecord(-errno.ENOSYS)


class ServiceError(XentmemError):
    """The service could not start, or lost xenstore while running; the message says which."""


def serve(service: HostService, notifier: Notifier | None = None) -> None:
    """Open, tell systemd READY, serve until SIGTERM/SIGINT, close: the life of the process.

    The WATCHDOG ping rides on the loop's idle callback, at most once per interval.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: service.stop())
    try:
        service.open()
    except (XsError, XsTimeout, XsConnectionLost, ServerError, OSError) as exc:
        raise ServiceError(f"cannot start: {exc}") from exc
    log.info(
        "serving tmem for guests %s (capacity %d MiB)",
        sorted(service.devices) or "none yet",
        service.store.capacity_bytes >> 20,
    )
    on_idle = None
    if notifier is not None:
        notifier.ready(f"serving {len(service.devices)} guests")
        interval = notifier.watchdog_interval_s
        if interval:
            clock = SystemClock()
            last = [clock.monotonic()]

            def on_idle() -> None:  # at most one ping per interval, however busy the loop
                if clock.monotonic() - last[0] >= interval:
                    notifier.send("WATCHDOG=1")
                    last[0] = clock.monotonic()

    clean = False
    try:
        service.run(on_idle=on_idle)
        clean = True
    except XsConnectionLost as exc:
        raise ServiceError(f"lost xenstore: {exc}") from exc
    finally:
        service.close(clean=clean)
    log.info("xentmem-hostd stopped")


if __name__ == "__main__":  # pragma: no cover - ``python -m xentmem.hostd.service``, as before
    from xentmem.hostd.cli import main

    main()
