"""Is this a Xen domain, and where is its xenstore: the one probe both ends use."""

from __future__ import annotations

import os
from pathlib import Path

from xentmem.roots import Roots

#: Where dom0's xenstored listens, and a domain's xenbus device.
DEFAULT_SOCKET = "/var/run/xenstored/socket"
DEFAULT_XENBUS = "/dev/xen/xenbus"


def running_on_xen(roots: Roots) -> str | None:
    """Why we believe this is a Xen domain (the evidence found), or None."""
    hv_type = roots.sys / "hypervisor" / "type"
    try:
        if hv_type.read_text().strip() == "xen":
            return f"{hv_type} says xen"
    except OSError:
        pass
    for path in (roots.proc / "xen" / "capabilities", roots.xenbus_dev):
        if path.exists():
            return f"{path} exists"
    return None


def default_xenstore_path() -> tuple[str, str]:
    """``("socket", path)`` or ``("device", path)``: where dom0 finds xenstore, as libxs
    looks (``XENSTORED_PATH``, ``XENSTORED_RUNDIR``, the usual sockets, the device)."""
    env = os.environ.get("XENSTORED_PATH")
    if env:
        return "socket", env
    rundir = os.environ.get("XENSTORED_RUNDIR")
    if rundir:
        return "socket", os.path.join(rundir, "socket")
    for candidate in (DEFAULT_SOCKET, "/run/xenstored/socket"):
        if Path(candidate).exists():
            return "socket", candidate
    return "device", DEFAULT_XENBUS
