"""``xentmem swap add | remove | list``: xentmemd's NBD exports as the guest's swap.

``add`` asks the daemon for an export (a swap area: docs/nbd.md), attaches it to a free
``/dev/nbdN`` with ``nbd-client`` in swap mode, then ``mkswap`` and ``swapon``; a step that
fails undoes the ones before it, so a refused ``add`` leaves nothing behind.  ``remove``
runs ``swapoff`` (the kernel reads every page back), detaches the device, then deletes the
export.  ``list`` joins the daemon's view (pages in tmem, in the backing file) with the
kernel's (``/proc/swaps``).  They need root and the ``nbd`` kernel module.
"""

from __future__ import annotations

import os
import re
from typing import Any

import click

from xentmem.control.protocol import MAX_AREA_PAGES, SWAP_BACKINGS
from xentmem.roots import Roots
from xentmem_cli import render, swap_kernel
from xentmem_cli.app import App, json_option
from xentmem_cli.swap_kernel import Kernel, SwapStepFailed

PAGE = 4096
#: ASCII only: ``\d`` would take other scripts' digits (``٤G``), and IGNORECASE alone the
#: Kelvin sign for a K.
_SIZE = re.compile(r"([0-9]+)[ \t]*([KMGT]?)(i?B)?", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DEFAULT_SIZE = "1G"
#: The export ``swap start`` makes from the config.
START_NAME = "swap-at-start"
#: One connection per CPU (the export offers NBD_FLAG_CAN_MULTI_CONN), at most 8.
MAX_CONNECTIONS = 8
#: How long the kernel holds a device's I/O for the daemon to come back when its connection
#: dies (``dead_conn_timeout``): the service's restart (RestartSec=, then the start) fits.
DEFAULT_PERSIST_S = 120


def parse_size(ctx: click.Context, param: click.Parameter, text: str) -> int:
    """``512M``, ``2G``, ``1048576`` -> pages; a whole number of pages, at least one, and
    no more than the daemon's largest area: a usage error here, before ``swap add`` loads
    a kernel module for an export the daemon would refuse."""
    shown = text if len(text) <= 32 else text[:29] + "..."
    match = _SIZE.fullmatch(text.strip(" \t"))
    if match is None:
        raise click.BadParameter(f"{shown!r} is not a size such as 512M or 2G", ctx, param)
    largest = MAX_AREA_PAGES * PAGE
    too_large = click.BadParameter(f"{shown} is more than the largest swap area, "
                                   f"{largest >> 30} GiB", ctx, param)
    digits = match[1].lstrip("0") or "0"
    if len(digits) > len(str(largest)):  # and int() of thousands of digits is refused
        raise too_large
    size = int(digits) * _UNITS[match[2].upper()]
    if size < PAGE or size % PAGE:
        raise click.BadParameter(f"{shown} is not a whole number of 4 KiB pages", ctx, param)
    if size > largest:
        raise too_large
    return size // PAGE


def parse_backing(ctx: click.Context, param: click.Parameter, text: str
                  ) -> tuple[str, str | None]:
    """``--backing``: ``file`` (a file the daemon names), ``memory``, or a path (one with a
    ``/``: ``./NAME`` for this directory) -> the daemon's ``backing`` and ``path``."""
    if text in SWAP_BACKINGS:
        return text, None
    if "/" not in text:
        raise click.BadParameter(f"{text!r} is neither file, memory nor a path (write "
                                 f"./{text} for a file in this directory)", ctx, param)
    return "file", os.path.normpath(os.path.join(os.getcwd(), text))


def kernel() -> Kernel:
    """The kernel of ``XENTMEM_ROOT`` (``/``): its tools run by ``swap_kernel.run_tool``, its
    netlink by ``swap_kernel.kernel_reconfigure``, handshakes by ``swap_kernel.handshake``."""
    return Kernel(Roots.from_env(), run=swap_kernel.run_tool,
                  reconfigure=swap_kernel.kernel_reconfigure, connect=swap_kernel.handshake)


def _unix_socket(addresses: list[str]) -> str:
    for address in addresses:
        if address.startswith("unix:"):
            return address.removeprefix("unix:")
    raise SwapStepFailed("the daemon serves NBD on no Unix socket")


@click.group()
def swap() -> None:
    """The guest's swap on xentmemd's NBD exports (frontswap over tmem)."""


@swap.command()
@click.option("--size", "pages", default=DEFAULT_SIZE, show_default=True,
              callback=parse_size, metavar="SIZE",
              help=f"The swap area's size (K, M, G, T), at most {MAX_AREA_PAGES * PAGE >> 30}G.")
@click.option("--backing", default="file", show_default=True, callback=parse_backing,
              metavar="FILE|file|memory",
              help="Where pages go that tmem refuses: a new file at the path FILE (in a "
                   "directory only root can write), a file the daemon names in its state "
                   "directory (file), or its memory (memory: lost if it dies).")
@click.option("--priority", type=click.IntRange(-1, 32767), default=None,
              help="swapon's priority (default: the kernel's).")
@click.option("--name", default=None, help="The export's name (default: swapN).")
@click.option("--persist", "persist_s", type=click.IntRange(0, 86400),
              default=DEFAULT_PERSIST_S, show_default=True, metavar="SECONDS",
              help="If the daemon dies, the kernel holds the device's I/O this long for it "
                   "to restart and `swap start` to reconnect (0: fail it at once).")
@json_option
@click.pass_obj
def add(app: App, *, pages: int, backing: tuple[str, str | None], priority: int | None,
        name: str | None, persist_s: int, as_json: bool) -> None:
    """Create an export, attach it with nbd-client, mkswap and swapon it."""
    result = attach(app, pages, backing[0], priority, name, persist_s, path=backing[1])
    app.emit(result, as_json=as_json, render=render.tree)


def attach(app: App, pages: int, backing: str, priority: int | None,
           name: str | None, persist_s: int = DEFAULT_PERSIST_S,
           path: str | None = None) -> dict[str, Any]:
    """``swap add``'s work: the export, nbd-client, mkswap, swapon; undone if a step fails.
    ``path``: the backing file the daemon creates (default: one it names)."""
    k = kernel()
    try:
        k.load_module()
        taken = [e.get("device") for e in app.call("nbd.list")["exports"]]
        device = k.free_device([d for d in taken if d])
    except SwapStepFailed as exc:
        app.abort(f"swap add: {exc}")
    args: dict[str, Any] = {"pages": pages, "backing": backing, "device": device}
    if name is not None:
        args["name"] = name
    if path is not None:
        args["path"] = path
    export = app.call("nbd.add", **args)
    done: list[str] = []
    try:
        k.attach(_unix_socket(export["socket"]), export["name"], device,
                 min(os.cpu_count() or 1, MAX_CONNECTIONS))
        done.append("attach")
        k.throttle_off(device)
        if persist_s:
            k.persist(device, persist_s)
        k.mkswap(device, f"xentmem-{export['name']}")
        k.swapon(device, priority)
    except SwapStepFailed as exc:
        undo = []
        if "attach" in done:
            try:
                k.detach(device)
            except SwapStepFailed as again:
                undo.append(str(again))
        try:
            app.call("nbd.remove", name=export["name"])
        except Exception as again:  # the daemon's own error, shown with the first
            undo.append(str(again))
        app.abort(f"swap add: {exc}" + (f" (and undoing it: {'; '.join(undo)})" if undo
                                        else "; nothing was left behind"))
    return {"name": export["name"], "device": device, "pages": pages,
            "size": pages * PAGE, "backing": backing, "priority": priority,
            "persist_s": persist_s, "path": export["backing"].get("path")}


def reconnect(k: Kernel, listed: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Every export whose device the kernel still holds gets a new connection: after the
    daemon died, the device's connection is dead and its I/O waits (``--persist``) for one.
    The devices reconnected, and the errors."""
    done, errors = [], []
    sock = _unix_socket(listed.get("listening", []))
    for export in listed["exports"]:
        device = export.get("device")
        if not device or not k.connected(device):
            continue
        try:
            k.reconnect(sock, export["name"], device)
        except SwapStepFailed as exc:
            errors.append(str(exc))
            continue
        done.append(device)
    return done, errors


@swap.command()
@json_option
@click.pass_obj
def start(app: App, *, as_json: bool) -> None:
    """Reconnect the devices of the exports a restarted daemon took back, then attach the
    swap the daemon's config asks for (nbd_swap_mib, on nbd_swap_backing), unless it is on
    already.

    The service runs it after the daemon is ready (ExecStartPost=), after every start:
    after a crash, the kernel still holds the devices, their I/O waiting for the daemon.
    """
    listed = app.call("nbd.list")
    k = kernel()
    reconnected, errors = reconnect(k, listed) if listed["exports"] else ([], [])
    if errors:
        app.abort(f"swap start: {'; '.join(errors)}"
                  + (f" (reconnected: {', '.join(reconnected)})" if reconnected else ""))
    mib = int(listed.get("swap_at_start_mib") or 0)
    ours = next((e for e in listed["exports"] if e["name"] == START_NAME), None)
    retired = None
    if ours is not None and mib and not (ours.get("device") and k.holds(ours["device"])):
        # No device holds it: its swap was turned off (the daemon's stop keeps an export
        # whose disconnect it had not seen yet), so its pages are stale: a fresh one.
        retired = app.call("nbd.remove", name=START_NAME)["name"]
        ours = None
    if not mib:
        result: dict[str, Any] = {"started": False, "why": "nbd_swap_mib is 0"}
    elif ours is not None:
        result = {"started": False, "why": f"export {START_NAME} exists already"}
    else:
        backing = listed.get("swap_at_start_backing") or "file"
        kind, path = (backing, None) if backing in SWAP_BACKINGS else ("file", backing)
        result = {"started": True,
                  **attach(app, mib * (1 << 20) // PAGE, kind, None, START_NAME, path=path)}
    result["reconnected"] = reconnected
    if retired is not None:
        result["replaced"] = retired
    app.emit(result, as_json=as_json, render=render.tree)



@swap.command()
@json_option
@click.pass_obj
def stop(app: App, *, as_json: bool) -> None:
    """swapoff and detach every export's device; the exports stay (the daemon's stop ends
    them).  The service runs it before the daemon is told to stop (ExecStop=), so no swap
    device outlives its server."""
    app.expect_long_op()  # swapoff reads every page back
    k = kernel()
    stopped, errors = [], []
    for export in app.call("nbd.list")["exports"]:
        device = export.get("device")
        if not device:
            continue
        try:
            if device in k.swaps():
                k.swapoff(device)
            if k.connected(device):
                k.detach(device)
        except SwapStepFailed as exc:
            errors.append(str(exc))
            continue
        stopped.append(device)
    if errors:
        app.abort(f"swap stop: {'; '.join(errors)}"
                  + (f" (stopped: {', '.join(stopped)})" if stopped else ""))
    app.emit({"stopped": stopped}, as_json=as_json, render=render.tree)


@swap.command()
@click.argument("target", metavar="NAME|DEVICE")
@json_option
@click.pass_obj
def remove(app: App, *, target: str, as_json: bool) -> None:
    """swapoff (pages come back through the kernel), detach, delete the export."""
    exports = app.call("nbd.list")["exports"]
    found = [e for e in exports if target in (e["name"], e.get("device"))]
    if not found:
        app.abort(f"swap remove: no export or device {target!r} (xentmem swap list)")
    export = found[0]
    device = export.get("device")
    app.expect_long_op()  # swapoff reads every page back; the removal waits for it
    k = kernel()
    try:
        if device:
            if device in k.swaps():
                k.swapoff(device)
            if k.connected(device):
                k.detach(device)
    except SwapStepFailed as exc:
        app.abort(f"swap remove: {exc}; the export {export['name']} stays")
    result = app.call("nbd.remove", name=export["name"])
    app.emit(result, as_json=as_json, render=render.tree)


@swap.command(name="list")
@json_option
@click.pass_obj
def list_(app: App, *, as_json: bool) -> None:
    """Each export: its device, size, pages in tmem and in the backing file (and where
    that is), and the kernel's view of it (/proc/swaps)."""
    listed = app.call("nbd.list")
    swaps = kernel().swaps()
    rows = []
    for export in listed["exports"]:
        entry = swaps.get(export.get("device") or "")
        rows.append({
            "name": export["name"], "device": export.get("device") or "-",
            "size": export["size"], "tmem_pages": export["tmem_pages"],
            "file_pages": export["backing"].get("used", 0),
            "backing": export["backing"].get("path", "memory"),
            "connections": export["connections"],
            "swapon": entry is not None,
            "used_kib": entry.used_kib if entry else None,
            "priority": entry.priority if entry else None,
        })
    app.emit(rows, as_json=as_json, render=lambda r: render.table(r, (
        "name", "device", "size", "tmem_pages", "file_pages", "connections", "swapon",
        "used_kib", "priority", "backing")) if r else "no exports")
