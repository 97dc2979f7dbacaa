"""``xentmem-hostd``: the host's tmem service (what the hypervisor's tmem did, in dom0).

It finds guests, gives each one a tmem device (:class:`~xentmem.hostd.tmemback.TmemBack`),
serves their messages from one :class:`~xentmem.hostd.store.HostStore`, and answers the control
commands that mirror ``xl tmem-*`` (:mod:`xentmem.hostd.control`).  Everything happens on one
thread, in :meth:`HostService.run`'s loop: xenstore events (through
:class:`~xentmem.xenbus.xs.XsSession`, no router thread), control clients, and a stop request.

Guests are found as a toolstack's guests are: ``@introduceDomain`` (and start-up) lists
``/local/domain`` and sets up a device for each guest home not yet known; ``@releaseDomain``
tears down the devices of domains that are gone (their pages are dropped, their areas
removed).  ``--domain N`` restricts the service to the listed guests.

``xentmem-hostd demo --dir DIR`` runs our own xenstore server (:mod:`xentmem.mock_xenstored.server`)
with guest homes, plus this service, so a guest on the same machine can use the ``xen``
backend through ``XENSTORED_PATH=DIR/domain-N.sock``: the mocked hypervisor, by hand.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import psutil

from xentmem.clock import SystemClock
from xentmem.hostd.control import (
    BAD_ARGS,
    DEFAULT_SOCKET,
    NOT_FOUND,
    UNKNOWN_OP,
    ControlError,
    ControlServer,
    HostControlClient,
    parse_bool,
    parse_pool_uuid,
    parse_target,
)
from xentmem.hostd.store import HostStore
from xentmem.hostd.tmemback import TmemBack, probe_reply_limits
from xentmem.tmem.abi import TmemOp
from xentmem.tmem.capacity import ACCEPTED as CAPACITY_ACCEPTED
from xentmem.tmem.capacity import capacity_bytes, parse_capacity
from xentmem.xenbus.area import parse_domid
from xentmem.xenbus.body import OpRecord, ResultRecord, WireError
from xentmem.xenbus.framing import Limits
from xentmem.xenbus.probe import default_xenstore_path
from xentmem.xenbus.xs import XsConnectionLost, XsError, XsSession, XsTimeout

log = logging.getLogger("xentmem.hostd")

INTRODUCE_TOKEN = b"xentmem-hostd-introduce"
RELEASE_TOKEN = b"xentmem-hostd-release"
DEFAULT_CAPACITY = "256M"
#: Longest the loop sleeps when nothing happens (it also wakes for the watchdog).
IDLE_S = 1.0
#: The answers to replies written are read once this many wait, or when the loop is idle.
DRAIN_AT = 16


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
    ) -> None:
        self.store = store
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
            ControlServer(control_path, self.handle_control) if control_path is not None else None
        )
        self.devices: dict[int, TmemBack] = {}
        self._seen_introduced: set[int] = set()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._by_token: dict[bytes, tuple[TmemBack, str]] = {}
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

    def close(self) -> None:
        """Tell every guest the device is closed (its pages go with us), then disconnect."""
        for device in list(self.devices.values()):
            try:
                device.store.destroy_client(device.domid)
                device.switch_state(device.state.CLOSED)
            except (XsError, XsTimeout, XsConnectionLost):
                log.debug("closing device of domain %d", device.domid, exc_info=True)
        self.devices.clear()
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
        while not self._stop.is_set():
            fds = [self.conn.fileno(), self._wake_r]
            if self.control is not None:
                fds += self.control.filenos()
            timeout = 0.0 if self.conn.events else IDLE_S
            readable, _, _ = select.select(fds, [], [], timeout)
            if self.conn.fileno() in readable:
                self.conn.receive()
            while self.conn.events and not self._stop.is_set():
                path, token = self.conn.events.popleft()
                self._dispatch(path, token)
                self.writer.flush()
                self.conn.flush()
            if self.writer.outstanding >= DRAIN_AT or not readable:
                self.writer.drain()
            if self.control is not None:
                for fd in readable:
                    if fd in self.control.filenos():
                        self.control.ready(fd)
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
            if on_idle is not None:
                on_idle()

    # -- events ---------------------------------------------------------------------------------

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
        for untrusted_name in untrusted_names:
            try:
                domid = parse_domid(untrusted_name.decode("ascii", "replace"))
            except WireError:
                continue
            if domid == self.backend_domid or domid in self.devices:
                continue
            if self.only is not None and domid not in self.only:
                continue
            device = TmemBack(
                self.conn, self.store, domid, backend_domid=self.backend_domid, limits=self.limits,
                writer=self.writer,
            )
            try:
                device.setup()
            except (XsError, XsTimeout) as exc:
                log.warning("cannot set up a tmem device for domain %d: %s", domid, exc)
                continue
            self.devices[domid] = device
            self._by_token[device.state_token] = (device, "state")
            self._by_token[device.req_token] = (device, "req")
        for domid in self.devices:
            if self.conn.is_domain_introduced(domid):
                self._seen_introduced.add(domid)

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
            rc, page = store.get_page(domid, op.pool_id, op.oid, op.index)
            if rc == 1 and page is not None:
                return ResultRecord.with_page(page)
            return ResultRecord(rc)
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

    # -- control --------------------------------------------------------------------------------

    def handle_control(self, op: str, untrusted_args: dict[str, Any]) -> Any:
        """One control request (see :mod:`xentmem.hostd.control`); ControlError if refused."""
        handler = getattr(self, "_control_" + op.replace("-", "_"), None)
        if handler is None or op.startswith("_"):
            raise ControlError(
                UNKNOWN_OP,
                f"unknown op {op!r}; ops: hello, list, freeze, thaw, set, shared-auth, freeable",
            )
        return handler(untrusted_args)

    @staticmethod
    def _only(untrusted_args: dict[str, Any], allowed: set[str], required: set[str]) -> None:
        unknown = set(untrusted_args) - allowed
        if unknown:
            raise ControlError(BAD_ARGS, f"unknown arguments {sorted(unknown)}")
        missing = required - set(untrusted_args)
        if missing:
            raise ControlError(BAD_ARGS, f"missing arguments {sorted(missing)}")

    def _domids(self, untrusted: Any) -> list[int]:
        target = parse_target(untrusted)
        if target.all:
            return sorted(set(self.store.clients) | set(self.devices))
        return [target.domid]  # type: ignore[list-item]

    def _control_hello(self, untrusted_args: dict[str, Any]) -> dict[str, Any]:
        self._only(untrusted_args, set(), set())
        return {"service": "xentmem-hostd", "protocol": 1, "guests": sorted(self.devices)}

    def _control_list(self, untrusted_args: dict[str, Any]) -> dict[str, Any]:
        self._only(untrusted_args, {"domid"}, set())
        domid = untrusted_args.get("domid", "all")
        target = parse_target(domid)
        if (
            not target.all
            and target.domid not in self.store.clients
            and target.domid not in self.devices
        ):
            raise ControlError(NOT_FOUND, f"domain {target.domid} has no tmem client")
        listing = self.store.describe(target.domid)
        listing["devices"] = [
            d.describe() for k, d in sorted(self.devices.items()) if target.all or k == target.domid
        ]
        return listing

    def _control_freeze(self, untrusted_args: dict[str, Any], frozen: bool = True) -> dict:
        self._only(untrusted_args, {"domid"}, {"domid"})
        domids = self._domids(untrusted_args["domid"])
        for domid in domids:
            self.store.freeze(domid, frozen)
        return {"domids": domids, "frozen": frozen}

    def _control_thaw(self, untrusted_args: dict[str, Any]) -> dict:
        return self._control_freeze(untrusted_args, frozen=False)

    def _control_set(self, untrusted_args: dict[str, Any]) -> dict:
        self._only(untrusted_args, {"domid", "weight", "compress"}, {"domid"})
        weight = untrusted_args.get("weight")
        compress = untrusted_args.get("compress")
        if weight is None and compress is None:
            raise ControlError(BAD_ARGS, "set needs weight and/or compress")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000
        ):
            raise ControlError(BAD_ARGS, f"weight must be 0..1000000, got {weight!r}")
        compress_flag = None if compress is None else parse_bool(compress, "compress")
        domids = self._domids(untrusted_args["domid"])
        for domid in domids:
            if weight is not None:
                self.store.set_weight(domid, weight)
            if compress_flag is not None:
                self.store.set_compress(domid, compress_flag)
        return {"domids": domids, "weight": weight, "compress": compress_flag}

    def _control_shared_auth(self, untrusted_args: dict[str, Any]) -> dict:
        self._only(untrusted_args, {"domid", "uuid", "auth"}, {"domid", "auth"})
        auth = parse_bool(untrusted_args["auth"], "auth")
        target = parse_target(untrusted_args["domid"])
        if target.all:
            self.store.shared_auth = auth
            return {"shared_auth": auth}
        if "uuid" not in untrusted_args:
            raise ControlError(BAD_ARGS, "shared-auth for one domain needs a uuid")
        uuid = parse_pool_uuid(untrusted_args["uuid"])
        rc = self.store.authorise(target.domid, uuid, auth)  # type: ignore[arg-type]
        if rc < 0:
            raise ControlError(
                BAD_ARGS, f"domain {target.domid} already has the most authorised uuids (16)"
            )
        return {"domid": target.domid, "uuid": untrusted_args["uuid"], "auth": auth}

    def _control_freeable(self, untrusted_args: dict[str, Any]) -> dict:
        self._only(untrusted_args, set(), set())
        return {"freeable_mb": self.store.freeable_mb()}


# -- the command line ---------------------------------------------------------------------------


def _capacity(text: str) -> int:
    try:
        spec = parse_capacity(text)
    except ValueError as exc:
        raise click.BadParameter(f"{exc}; accepted: {CAPACITY_ACCEPTED}") from None
    return capacity_bytes(spec, psutil.virtual_memory().total)


class _App:
    def __init__(self, control_path: str, timeout: float) -> None:
        self.control_path = control_path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        try:
            with HostControlClient(self.control_path, timeout=self.timeout) as client:
                return client.call(op, **args)
        except ControlError as exc:
            click.echo(f"xentmem-hostd: {exc.message or exc.code}", err=True)
            sys.exit(1)


def _target(text: str) -> Any:
    if text == "all":
        return "all"
    try:
        return parse_domid(text)
    except WireError:
        raise click.BadParameter(f"{text!r} is not a domid or 'all'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--control",
    "control_path",
    envvar="XENTMEM_HOSTD_SOCKET",
    default=DEFAULT_SOCKET,
    show_default=True,
    help="the service's control socket",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="seconds to wait for the service",
)
@click.pass_context
def cli(ctx: click.Context, control_path: str, timeout: float) -> None:
    """The host's tmem service (run in dom0) and its control commands (xl tmem-*)."""
    ctx.obj = _App(control_path, timeout)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@cli.command()
@click.option(
    "--xenstore",
    "xenstore_path",
    envvar="XENSTORED_PATH",
    help="xenstored's socket [default: /var/run/xenstored/socket, else the xenbus device]",
)
@click.option(
    "--xenbus",
    "xenbus_path",
    default=None,
    help="use this xenbus device instead of a socket (e.g. /dev/xen/xenbus)",
)
@click.option(
    "--capacity",
    default=DEFAULT_CAPACITY,
    show_default=True,
    help="host-wide tmem capacity: 256M, 2G or 10%% of RAM",
)
@click.option(
    "--domain",
    "domains",
    type=int,
    multiple=True,
    help="serve only this guest (repeatable; default: every guest)",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.pass_obj
def run(
    app: _App,
    xenstore_path: str | None,
    xenbus_path: str | None,
    capacity: str,
    domains: tuple[int, ...],
    log_level: str,
) -> None:
    """Serve guests' tmem until SIGTERM."""
    from xentmem.notify import Notifier

    _configure_logging(log_level)
    if xenbus_path:
        kind, where = "device", xenbus_path
    elif xenstore_path:
        kind, where = "socket", xenstore_path
    else:
        kind, where = default_xenstore_path()
    log.info("xenstore: %s %s", kind, where)
    service = HostService(
        xenstore=where,
        device=kind == "device",
        store=HostStore(_capacity(capacity)),
        control_path=app.control_path,
        domains=domains,
    )
    notifier = Notifier.from_env()
    _serve(service, notifier)


def _serve(service: HostService, notifier: Any = None) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: service.stop())
    try:
        service.open()
    except (XsError, XsTimeout, XsConnectionLost, OSError) as exc:
        click.echo(f"xentmem-hostd: cannot start: {exc}", err=True)
        sys.exit(1)
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

    try:
        service.run(on_idle=on_idle)
    except XsConnectionLost as exc:
        click.echo(f"xentmem-hostd: lost xenstore: {exc}", err=True)
        service.close()
        sys.exit(1)
    service.close()
    log.info("xentmem-hostd stopped")


@cli.command(name="list")
@click.argument("domid", required=False, default="all")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_obj
def list_cmd(app: _App, domid: str, as_json: bool) -> None:
    """Pools and pages per guest (xl tmem-list -l)."""
    listing = app.call("list", domid=_target(domid))
    if as_json:
        click.echo(json.dumps(listing, indent=2, sort_keys=True))
        return
    click.echo(
        f"host: {listing['used_bytes'] >> 10} KiB used of "
        f"{listing['capacity_bytes'] >> 10} KiB, {listing['ephemeral_pages']} ephemeral "
        f"pages, {listing['evictions']} evictions, shared_auth="
        f"{int(listing['shared_auth'])}, freeable {listing['freeable_mb']} MiB"
    )
    states = {d["domid"]: d["state"] for d in listing.get("devices", [])}
    for client in listing["clients"]:
        click.echo(
            f"domain {client['domid']}: weight={client['weight']} "
            f"compress={int(client['compress'])} frozen={int(client['frozen'])} "
            f"device={states.get(client['domid'], '-')} "
            f"eph={client['ephemeral_pages']} pers={client['persistent_pages']}"
        )
        for pool in client["pools"]:
            kind = "persistent" if pool["persistent"] else "ephemeral"
            shared = " shared " + pool["uuid"] if pool["shared"] else ""
            click.echo(
                f"  pool {pool['pool_id']}: {kind}{shared} pages={pool['pages']} "
                f"objects={pool['objects']}"
            )


@cli.command()
@click.argument("domid")
@click.pass_obj
def freeze(app: _App, domid: str) -> None:
    """New puts fail with -EFROZEN (xl tmem-freeze); DOMID or 'all'."""
    click.echo(json.dumps(app.call("freeze", domid=_target(domid))))


@cli.command()
@click.argument("domid")
@click.pass_obj
def thaw(app: _App, domid: str) -> None:
    """Undo freeze (xl tmem-thaw); DOMID or 'all'."""
    click.echo(json.dumps(app.call("thaw", domid=_target(domid))))


@cli.command(name="set")
@click.argument("domid")
@click.option("--weight", "-w", type=click.IntRange(0, 1_000_000), help="eviction weight")
@click.option("--compress/--no-compress", "-p", default=None, help="compress stored pages")
@click.pass_obj
def set_cmd(app: _App, domid: str, weight: int | None, compress: bool | None) -> None:
    """Weight and compression of a guest's client (xl tmem-set)."""
    args: dict[str, Any] = {"domid": _target(domid)}
    if weight is not None:
        args["weight"] = weight
    if compress is not None:
        args["compress"] = compress
    if len(args) == 1:
        raise click.UsageError("give --weight and/or --compress/--no-compress")
    click.echo(json.dumps(app.call("set", **args)))


@cli.command(name="shared-auth")
@click.argument("domid")
@click.option("--uuid", "-u", "pool_uuid", help="the shared pool's uuid")
@click.option(
    "--auth",
    "-A",
    type=click.IntRange(0, 1),
    required=True,
    help="1 = authorise, 0 = revoke (with 'all': switch the check on/off)",
)
@click.pass_obj
def shared_auth(app: _App, domid: str, pool_uuid: str | None, auth: int) -> None:
    """Authorise a guest for a shared pool uuid (xl tmem-shared-auth)."""
    args: dict[str, Any] = {"domid": _target(domid), "auth": bool(auth)}
    if pool_uuid is not None:
        args["uuid"] = pool_uuid
    click.echo(json.dumps(app.call("shared-auth", **args)))


@cli.command()
@click.pass_obj
def freeable(app: _App) -> None:
    """MiB of tmem the host could take back at once (xl tmem-freeable)."""
    click.echo(app.call("freeable")["freeable_mb"])


@cli.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="where the sockets go",
)
@click.option(
    "--guest",
    "guests",
    type=click.IntRange(1, 0x7FEF),
    multiple=True,
    help="guest domid to create (repeatable; default: 1)",
)
@click.option(
    "--flavour",
    type=click.Choice(["c-xenstored", "oxenstored"]),
    default="c-xenstored",
    show_default=True,
    help="whose xenstore limits to apply",
)
@click.option("--capacity", default=DEFAULT_CAPACITY, show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def demo(
    directory: Path, guests: tuple[int, ...], flavour: str, capacity: str, log_level: str
) -> None:
    """A local mocked Xen host: our xenstore server plus this service."""
    from xentmem.mock_xenstored.server import XsServer
    from xentmem.mock_xenstored.store import Limits as XsLimits

    _configure_logging(log_level)
    limits = XsLimits.oxenstored() if flavour == "oxenstored" else XsLimits.c_xenstored()
    with XsServer(directory, limits=limits) as server:
        sockets = {g: server.prepare_domain(g) for g in (guests or (1,))}
        control = directory / "hostd.sock"
        service = HostService(
            xenstore=server.dom0_socket, store=HostStore(_capacity(capacity)), control_path=control
        )
        click.echo(f"XENSTORED_PATH={server.dom0_socket}   # dom0")
        click.echo(f"XENTMEM_HOSTD_SOCKET={control}   # xentmem-hostd list/freeze/...")
        for domid, path in sockets.items():
            click.echo(f"guest {domid}: XENSTORED_PATH={path} xentmemd --backend xen ...")
        sys.stdout.flush()
        _serve(service)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="xentmem-hostd")


if __name__ == "__main__":  # pragma: no cover
    main()
