"""``xentmem-hostd``: run the service (``run``), steer it as ``xl tmem-*`` did, or run the demo.

The conventions (``--json``, one error line, the exit codes) are :mod:`xentmem.console`'s.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import click
import psutil

from xentmem.console import (
    CONTEXT_SETTINGS,
    EXIT_UNREACHABLE,
    Seconds,
    abort,
    emit,
    json_option,
)
from xentmem.control.protocol import MAX_DOMID, ControlError
from xentmem.control.server import DEFAULT_IDLE_TIMEOUT_S
from xentmem.hostd.control import DEFAULT_SOCKET, MAX_CAP_MB, MAX_WEIGHT, HostControlClient
from xentmem.hostd.service import HostService, ServiceError, serve
from xentmem.hostd.store import HostStore, StoreError
from xentmem.notify import Notifier
from xentmem.tmem.capacity import ACCEPTED as CAPACITY_ACCEPTED
from xentmem.tmem.capacity import capacity_bytes, parse_capacity
from xentmem.xenbus.probe import default_xenstore_path

log = logging.getLogger("xentmem.hostd")

DEFAULT_CAPACITY = "256M"
LOG_LEVELS = ("debug", "info", "warning", "error")
SOCKET_ENV = "XENTMEM_HOSTD_SOCKET"
#: Every command that talks to the service says, in its --help, how it finds the socket.
SOCKET_EPILOG = (f"The service's control socket: `xentmem-hostd --control PATH COMMAND`, or "
                 f"${SOCKET_ENV} [default: {DEFAULT_SOCKET}].")


class App:
    """Where the service's control socket is, and how long to wait for it."""

    def __init__(self, control_path: str, timeout: float) -> None:
        self.control_path = control_path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        """The service's result for ``op``, or an abort with one clear line."""
        try:
            with HostControlClient(self.control_path, timeout=self.timeout) as client:
                return client.call(op, **args)
        except ControlError as exc:
            if exc.unreachable:
                abort(exc.message, EXIT_UNREACHABLE)
            abort(f"{exc.message} [{exc.code}]")


def capacity_of(text: str) -> int:
    """A capacity option (``256M``, ``2G``, ``10%``) in bytes of this host's RAM."""
    try:
        spec = parse_capacity(text)
    except ValueError as exc:
        raise click.BadParameter(f"{exc}; accepted: {CAPACITY_ACCEPTED}") from None
    return capacity_bytes(spec, psutil.virtual_memory().total)


def target_of(text: str) -> int | str:
    """A DOMID argument: a guest's domain id, or ``all``."""
    if text == "all":
        return text
    if text.isascii() and text.isdigit() and int(text) <= MAX_DOMID:
        return int(text)
    raise click.BadParameter(f"{text!r} is not a domid or 'all'")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def serve_or_abort(service: HostService, notifier: Notifier | None = None) -> None:
    try:
        serve(service, notifier)
    except ServiceError as exc:
        abort(str(exc))


@click.group(name="xentmem-hostd", context_settings=CONTEXT_SETTINGS)
@click.option("--control", "control_path", envvar=SOCKET_ENV,
              default=DEFAULT_SOCKET, show_default=True, show_envvar=True, metavar="PATH",
              help="The service's control socket.")
@click.option("--timeout", type=Seconds(min=0.1), default=5.0, show_default=True,
              metavar="SECONDS", help="How long to wait for the service's answer.")
@click.pass_context
def cli(ctx: click.Context, control_path: str, timeout: float) -> None:
    """The host's tmem service (run in dom0) and its control commands (xl tmem-*).

    The commands reach the service at --control, or $XENTMEM_HOSTD_SOCKET.  New here?
    `xentmem-hostd demo --dir DIR --load` runs a mocked Xen host with a guest that moves
    pages, and prints what to type next.
    """
    ctx.obj = App(control_path, timeout)


log_level_option = click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info",
                                show_default=True)


#: click prints help as written (no %-formatting): "10%", which --capacity takes.
CAPACITY_HELP = "Host-wide tmem capacity: 256M, 2G or 10% of RAM."


@cli.command(epilog=f"It serves its control socket at --control, or ${SOCKET_ENV} "
                    f"[default: {DEFAULT_SOCKET}].")
@click.option("--xenstore", "xenstore_path", envvar="XENSTORED_PATH",
              help="xenstored's socket [default: /var/run/xenstored/socket, else the xenbus "
                   "device]")
@click.option("--xenbus", "xenbus_path", default=None,
              help="Use this xenbus device instead of a socket (e.g. /dev/xen/xenbus).")
@click.option("--capacity", default=DEFAULT_CAPACITY, show_default=True,
              help=CAPACITY_HELP)
@click.option("--domain", "domains", type=click.IntRange(1, MAX_DOMID), multiple=True,
              help="Serve only this guest (repeatable; default: every guest).")
@click.option("--control-idle-timeout", "idle_timeout", type=click.IntRange(1, 3600),
              default=DEFAULT_IDLE_TIMEOUT_S, show_default=True,
              help="Seconds a control connection may stay silent before it is closed.")
@click.option("--run-dir", envvar="RUNTIME_DIRECTORY",
              help="Where the page arena and the sessions outlive a crash of the service "
                   "[default: $RUNTIME_DIRECTORY (systemd), else the control socket's "
                   "directory].")
@click.option("--in-memory", is_flag=True,
              help="Keep pages in this process only: a crash loses every guest's pages.")
@click.option("--allocator", type=click.Choice(["zsmalloc", "zbud"]), default="zsmalloc",
              show_default=True, help="How compressed pages are packed in the arena.")
@log_level_option
@click.pass_obj
def run(app: App, xenstore_path: str | None, xenbus_path: str | None, capacity: str,
        domains: tuple[int, ...], idle_timeout: int, run_dir: str | None, in_memory: bool,
        allocator: str, log_level: str) -> None:
    """Serve guests' tmem until SIGTERM (a crash leaves the pages for the next start)."""
    configure_logging(log_level)
    if in_memory:
        run_dir = None
    elif not run_dir:
        run_dir = os.path.dirname(os.path.abspath(app.control_path))
    try:
        store = HostStore(capacity_of(capacity), run_dir=run_dir, allocator=allocator)
    except StoreError as exc:
        abort(str(exc))
    if xenbus_path:
        kind, where = "device", xenbus_path
    elif xenstore_path:
        kind, where = "socket", xenstore_path
    else:
        kind, where = default_xenstore_path()
    log.info("xenstore: %s %s", kind, where)
    service = HostService(xenstore=where, device=kind == "device",
                          store=store, control_path=app.control_path, domains=domains,
                          control_idle_timeout_s=idle_timeout)
    serve_or_abort(service, Notifier.from_env())


def render_listing(listing: dict[str, Any]) -> str:
    lines = [
        f"host: {listing['used_bytes'] >> 10} KiB used of "
        f"{listing['capacity_bytes'] >> 10} KiB, {listing['ephemeral_pages']} ephemeral "
        f"pages, {listing['evictions']} evictions, shared_auth="
        f"{int(listing['shared_auth'])}, freeable {listing['freeable_mb']} MiB"
    ]
    return "\n".join(lines + guest_lines(listing))


def guest_lines(listing: dict[str, Any]) -> list[str]:
    """One line per guest (a client, a device, or both) in domid order, then its pools: a
    guest whose frontend has connected is listed before it makes its first pool."""
    devices = {d["domid"]: d for d in listing.get("devices", [])}
    clients = {c["domid"]: c for c in listing.get("clients", [])}
    lines = []
    for domid in sorted(set(devices) | set(clients)):
        device = devices.get(domid)
        state = device["state"] if device else "-"
        client = clients.get(domid)
        if client is None:
            lines.append(f"domain {domid}: device={state} (no tmem client yet: no pool made)")
            continue
        lines.append(
            f"domain {domid}: weight={client['weight']} "
            f"compress={int(client['compress'])} frozen={int(client['frozen'])} "
            f"device={state} "
            f"eph={client['ephemeral_pages']} pers={client['persistent_pages']}"
        )
        for pool in client["pools"]:
            kind = "persistent" if pool["persistent"] else "ephemeral"
            shared = " shared " + pool["uuid"] if pool["shared"] else ""
            lines.append(f"  pool {pool['pool_id']}: {kind}{shared} pages={pool['pages']} "
                         f"objects={pool['objects']}")
    return lines


def render_domids(result: dict[str, Any]) -> str:
    """What freeze/thaw did, then the guests as ``list`` shows them."""
    domids = " ".join(str(d) for d in result["domids"]) or "none"
    head = f"{'frozen' if result['frozen'] else 'thawed'}: {domids}"
    return "\n".join([head, *guest_lines(result)])


def render_set(result: dict[str, Any]) -> str:
    settings = []
    if result["weight"] is not None:
        settings.append(f"weight={result['weight']}")
    if result.get("cap_mb") is not None:
        settings.append(f"cap={result['cap_mb']}M")
    if result["compress"] is not None:
        settings.append(f"compress={int(result['compress'])}")
    return "\n".join(f"domain {d}: {' '.join(settings)}" for d in result["domids"])


def render_auth(result: dict[str, Any]) -> str:
    if "shared_auth" in result:
        return f"shared_auth={int(result['shared_auth'])}"
    return f"domain {result['domid']}: uuid {result['uuid']} auth={int(result['auth'])}"


@cli.command(name="list", epilog=SOCKET_EPILOG)
@click.argument("domid", required=False, default="all")
@json_option
@click.pass_obj
def list_cmd(app: App, domid: str, as_json: bool) -> None:
    """Pools and pages per guest (xl tmem-list -l); DOMID or 'all' (the default)."""
    emit(app.call("list", domid=target_of(domid)), as_json=as_json, render=render_listing)


@cli.command(epilog=SOCKET_EPILOG)
@click.argument("domid")
@json_option
@click.pass_obj
def freeze(app: App, domid: str, as_json: bool) -> None:
    """New puts fail with -EFROZEN (xl tmem-freeze); DOMID or 'all'."""
    emit(app.call("freeze", domid=target_of(domid)), as_json=as_json, render=render_domids)


@cli.command(epilog=SOCKET_EPILOG)
@click.argument("domid")
@json_option
@click.pass_obj
def thaw(app: App, domid: str, as_json: bool) -> None:
    """Undo freeze (xl tmem-thaw); DOMID or 'all'."""
    emit(app.call("thaw", domid=target_of(domid)), as_json=as_json, render=render_domids)


@cli.command(name="set", epilog=SOCKET_EPILOG)
@click.argument("domid")
@click.option("--weight", "-w", type=click.IntRange(0, MAX_WEIGHT), help="Eviction weight.")
@click.option("--cap", "-c", "cap_mb", type=click.IntRange(0, MAX_CAP_MB), metavar="MIB",
              help="Most MiB the guest may hold in tmem (0: no cap).")
@click.option("--compress/--no-compress", "-p", default=None, help="Compress stored pages.")
@json_option
@click.pass_obj
def set_cmd(app: App, domid: str, weight: int | None, cap_mb: int | None,
            compress: bool | None, as_json: bool) -> None:
    """Weight, cap and compression of a guest's client (xl tmem-set); DOMID or 'all'."""
    args: dict[str, Any] = {"domid": target_of(domid)}
    if weight is not None:
        args["weight"] = weight
    if cap_mb is not None:
        args["cap_mb"] = cap_mb
    if compress is not None:
        args["compress"] = compress
    if len(args) == 1:
        raise click.UsageError("give --weight, --cap and/or --compress/--no-compress")
    emit(app.call("set", **args), as_json=as_json, render=render_set)


@cli.command(name="shared-auth", epilog=SOCKET_EPILOG)
@click.argument("domid")
@click.option("--uuid", "-u", "pool_uuid", help="The shared pool's uuid.")
@click.option("--auth", "-A", type=click.IntRange(0, 1), required=True,
              help="1 = authorise, 0 = revoke (with 'all': switch the check on/off).")
@json_option
@click.pass_obj
def shared_auth(app: App, domid: str, pool_uuid: str | None, auth: int, as_json: bool) -> None:
    """Authorise a guest for a shared pool uuid (xl tmem-shared-auth)."""
    args: dict[str, Any] = {"domid": target_of(domid), "auth": bool(auth)}
    if pool_uuid is not None:
        args["uuid"] = pool_uuid
    emit(app.call("shared-auth", **args), as_json=as_json, render=render_auth)


@cli.command(epilog=SOCKET_EPILOG)
@json_option
@click.pass_obj
def freeable(app: App, as_json: bool) -> None:
    """MiB of tmem the host could take back at once (xl tmem-freeable)."""
    emit(app.call("freeable"), as_json=as_json, render=lambda r: str(r["freeable_mb"]))


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Where the sockets go.")
@click.option("--guest", "guests", type=click.IntRange(1, MAX_DOMID), multiple=True,
              help="Guest domid to create (repeatable; default: 1).")
@click.option("--flavour", type=click.Choice(["c-xenstored", "oxenstored"]),
              default="c-xenstored", show_default=True, help="Whose xenstore limits to apply.")
@click.option("--capacity", default=DEFAULT_CAPACITY, show_default=True,
              help=CAPACITY_HELP)
@click.option("--load", is_flag=True,
              help="Also start a guest daemon (xentmemd, xen backend) for the first guest "
                   "that swaps a few pages each second, so `list` shows pages moving.")
@click.option("--load-interval", type=Seconds(min=0.05), default=1.0,
              show_default=True, metavar="SECONDS", help="Seconds between two load rounds.")
@log_level_option
def demo(directory: Path, guests: tuple[int, ...], flavour: str, capacity: str,
         load: bool, load_interval: float, log_level: str) -> None:
    """A local mocked Xen host: the stand-in xenstored plus this service.

    It prints the sockets it made and what to type next; with --load a guest swaps through
    it (one log line per round), so the figures of `list` change.
    """
    from xentmem.hostd import demo as demo_mod  # the only user of the stand-in

    configure_logging(log_level)
    try:
        demo_mod.run(directory, guests or (1,), flavour=flavour,
                     capacity_bytes=capacity_of(capacity), program=program_path(),
                     load=load, log_level="warning" if log_level == "info" else log_level,
                     interval_s=load_interval)
    except ServiceError as exc:
        abort(str(exc))


def program_path() -> str:
    """How to type this script in a new shell: its name if PATH finds it, else its path."""
    mine = Path(sys.argv[0])
    if mine.name != "xentmem-hostd" or not mine.is_file():
        mine = Path(sys.executable).parent / "xentmem-hostd"  # a venv's, unresolved
    if not mine.is_file():
        return "xentmem-hostd"
    found = shutil.which("xentmem-hostd")
    if found is not None and os.path.samefile(found, mine):
        return "xentmem-hostd"
    return os.path.abspath(mine)


def main(argv: list[str] | None = None) -> Any:
    """The console script ``xentmem-hostd``."""
    return cli.main(args=argv, prog_name="xentmem-hostd")
