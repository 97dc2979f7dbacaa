"""``xentmem-hostd``'s control interface: its op table, its socket and its client.

The ops are what ``xl tmem-*`` did, on the one JSON-lines envelope of
:mod:`xentmem.control.protocol`; ``docs/control-protocol.md`` describes them next to
``xentmemd``'s.  ``domid`` is a domain id or ``"all"`` (xl's ``-a``).
"""

from __future__ import annotations

import os
from typing import Any

from xentmem.control.client import ControlConnection
from xentmem.control.protocol import Arg, OpSpec
from xentmem.tmem.capacity import MAX_CAPACITY_MIB
from xentmem.tmem.store import MAX_WEIGHT as TMEM_MAX_WEIGHT

DEFAULT_SOCKET = "/run/xentmem-hostd/control.sock"
#: The heaviest eviction weight ``set`` accepts.
MAX_WEIGHT = TMEM_MAX_WEIGHT
#: The largest cap ``set`` accepts, in MiB (16 TiB, as a capacity).
MAX_CAP_MB = MAX_CAPACITY_MIB

_DOMID = Arg("domid", "domid", 'a domain id, or "all"')

OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("hello", "protocol version, service version, the ops it serves and the guests "
               "it has a device for", returns="{protocol, daemon_version, ops, service, guests}"),
        OpSpec("list", "pools and pages per guest, the host's totals and the devices "
               "(xl tmem-list -l)",
               (Arg("domid", "domid", 'one guest, or "all" (the default)', required=False),),
               returns="{capacity_bytes, used_bytes, ..., clients: [...], devices: [...]}"),
        OpSpec("freeze", "new puts fail with -EFROZEN (xl tmem-freeze)", (_DOMID,),
               returns="{domids, frozen, ...list's answer for them}", mutates=True),
        OpSpec("thaw", "undo freeze (xl tmem-thaw)", (_DOMID,),
               returns="{domids, frozen, ...list's answer for them}", mutates=True),
        OpSpec("set", "eviction weight, cap and compression of a guest's client (xl tmem-set)",
               (_DOMID,
                Arg("weight", "uint", f"eviction weight, 0..{MAX_WEIGHT}", required=False),
                Arg("cap_mb", "uint", f"most MiB the guest may hold, 0..{MAX_CAP_MB} "
                    "(0: no cap)", required=False),
                Arg("compress", "flag", "compress stored pages", required=False)),
               returns="{domids, weight, cap_mb, compress}", mutates=True),
        OpSpec("shared-auth", "authorise a guest for a shared pool's uuid; for \"all\", switch "
               "the host-wide check (xl tmem-shared-auth)",
               (_DOMID,
                Arg("auth", "flag", "authorise (true) or revoke (false)"),
                Arg("uuid", "str", "the shared pool's uuid (needed for one domain)",
                    required=False)),
               returns="{domid, uuid, auth} or {shared_auth}", mutates=True),
        OpSpec("freeable", "MiB of tmem the host could take back at once (xl tmem-freeable)",
               returns="{freeable_mb}"),
    )
}


def default_socket_path() -> str:
    """``$XENTMEM_HOSTD_SOCKET`` if set, else ``/run/xentmem-hostd/control.sock``."""
    return os.environ.get("XENTMEM_HOSTD_SOCKET") or DEFAULT_SOCKET


class HostControlClient(ControlConnection):
    """A client of ``xentmem-hostd``: its ops as methods (``call`` takes any op by name)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float = 5.0) -> None:
        super().__init__(socket_path or default_socket_path(), timeout, ops=OPS,
                         daemon="xentmem-hostd")

    def hello(self) -> dict[str, Any]:
        return self.call("hello")

    def list_clients(self, domid: int | str = "all") -> dict[str, Any]:
        return self.call("list", domid=domid)

    def freeze(self, domid: int | str) -> dict[str, Any]:
        return self.call("freeze", domid=domid)

    def thaw(self, domid: int | str) -> dict[str, Any]:
        return self.call("thaw", domid=domid)

    def set_client(self, domid: int | str, *, weight: int | None = None,
                   compress: bool | None = None, cap_mb: int | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"domid": domid}
        if weight is not None:
            args["weight"] = weight
        if cap_mb is not None:
            args["cap_mb"] = cap_mb
        if compress is not None:
            args["compress"] = compress
        return self.call("set", **args)

    def shared_auth(self, domid: int | str, auth: bool, uuid: str | None = None
                    ) -> dict[str, Any]:
        args: dict[str, Any] = {"domid": domid, "auth": auth}
        if uuid is not None:
            args["uuid"] = uuid
        return self.call("shared-auth", **args)

    def freeable(self) -> int:
        return self.call("freeable")["freeable_mb"]
