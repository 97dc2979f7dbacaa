"""``xentmem-hostd``'s control ops -> calls on the service's store and devices.

Requests reach these handlers already checked against :data:`xentmem.hostd.control.OPS`
(known op, known arguments of the right kinds); what the table cannot say (a weight's range,
a uuid's form, a client that does not exist) is checked here, before anything changes, so a
refused request has changed nothing.
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

from xentmem import __version__
from xentmem.control import protocol
from xentmem.control.protocol import BAD_ARGS, NOT_FOUND, ControlError, Request
from xentmem.control.server import respond
from xentmem.hostd.control import MAX_CAP_MB, MAX_WEIGHT, OPS
from xentmem.tmem.abi import PoolUuid
from xentmem.tmem.capacity import MIB

if TYPE_CHECKING:
    from xentmem.hostd.service import HostService

Args = Mapping[str, Any]


def parse_pool_uuid(untrusted: str) -> PoolUuid:
    try:
        return PoolUuid.from_uuid(uuid_mod.UUID(untrusted))
    except ValueError:
        raise ControlError(BAD_ARGS, f"{untrusted[:40]!r} is not a uuid") from None


class HostControl:
    """The ops of one service; :meth:`handle_line` is what its control socket calls."""

    def __init__(self, service: HostService) -> None:
        self.service = service
        self._handlers: dict[str, Callable[[Args], Any]] = {
            "hello": self.hello,
            "list": self.list_clients,
            "freeze": lambda args: self.freeze(args, frozen=True),
            "thaw": lambda args: self.freeze(args, frozen=False),
            "set": self.set_client,
            "shared-auth": self.shared_auth,
            "freeable": lambda args: {"freeable_mb": self.service.store.freeable_mb()},
        }
        if set(self._handlers) != set(OPS):  # pragma: no cover - a declaration bug
            raise RuntimeError("hostd handlers and op table differ: "
                               + ", ".join(sorted(set(self._handlers) ^ set(OPS))))

    def handle_line(self, untrusted_line: bytes) -> bytes:
        return respond(untrusted_line, OPS, self.run)

    def run(self, request: Request) -> Any:
        return self._handlers[request.op](request.args)

    def _domids(self, domid: int | str) -> list[int]:
        """``all``: every guest the service knows; one domid: that guest, which must exist
        (a tmem client or a device), so that a typo is refused instead of making a client."""
        known = set(self.service.store.clients) | set(self.service.devices)
        if domid == "all":
            return sorted(known)
        if int(domid) not in known:
            raise ControlError(NOT_FOUND, self._not_a_guest(int(domid)))
        return [int(domid)]

    def _not_a_guest(self, domid: int) -> str:
        guests = sorted(set(self.service.store.clients) | set(self.service.devices))
        return (f"domain {domid} is not a guest of this service (guests: "
                f"{', '.join(map(str, guests)) or 'none'}); see `xentmem-hostd list`")

    def _listing(self, domids: list[int] | None) -> dict[str, Any]:
        """``list``'s answer for ``domids`` (None: every guest): the host, clients, devices."""
        store, devices = self.service.store, self.service.devices
        listing = store.describe()
        if domids is not None:
            listing["clients"] = [c for c in listing["clients"] if c["domid"] in domids]
        listing["devices"] = [device.describe() for key, device in sorted(devices.items())
                              if domids is None or key in domids]
        return listing

    def hello(self, args: Args) -> dict[str, Any]:
        return {"protocol": protocol.PROTOCOL_VERSION, "daemon_version": __version__,
                "ops": sorted(OPS), "service": "xentmem-hostd",
                "guests": sorted(self.service.devices)}

    def list_clients(self, args: Args) -> dict[str, Any]:
        domid = args.get("domid", "all")
        return self._listing(None if domid == "all" else self._domids(domid))

    def freeze(self, args: Args, *, frozen: bool) -> dict[str, Any]:
        """Freeze or thaw; the answer is ``list``'s for those guests, plus what was done."""
        domids = self._domids(args["domid"])
        for domid in domids:
            self.service.store.freeze(domid, frozen)
        return {"domids": domids, "frozen": frozen, **self._listing(domids)}

    def set_client(self, args: Args) -> dict[str, Any]:
        weight, cap_mb, compress = args.get("weight"), args.get("cap_mb"), args.get("compress")
        if weight is None and cap_mb is None and compress is None:
            raise ControlError(BAD_ARGS, "set needs weight, cap_mb and/or compress")
        if weight is not None and weight > MAX_WEIGHT:
            raise ControlError(BAD_ARGS, f"weight must be 0..{MAX_WEIGHT}, got {weight}")
        if cap_mb is not None and cap_mb > MAX_CAP_MB:
            raise ControlError(BAD_ARGS, f"cap_mb must be 0..{MAX_CAP_MB}, got {cap_mb}")
        domids = self._domids(args["domid"])
        store = self.service.store
        for domid in domids:
            if weight is not None:
                store.set_weight(domid, weight)
            if cap_mb is not None:
                store.set_cap(domid, cap_mb * MIB)
            if compress is not None:
                store.set_compress(domid, compress)
        return {"domids": domids, "weight": weight, "cap_mb": cap_mb, "compress": compress}

    def shared_auth(self, args: Args) -> dict[str, Any]:
        auth, store = args["auth"], self.service.store
        uuid = parse_pool_uuid(args["uuid"]) if "uuid" in args else None  # refused first,
        if args["domid"] == "all":  # as xc_tmem_auth parsed it even for every domain
            store.shared_auth = auth
            return {"shared_auth": auth}
        if "uuid" not in args:
            raise ControlError(BAD_ARGS, "shared-auth for one domain needs a uuid")
        assert uuid is not None
        (domid,) = self._domids(args["domid"])  # a guest the service knows, as every op's
        if store.authorise(domid, uuid, auth) < 0:
            raise ControlError(BAD_ARGS,
                               f"domain {domid} already has the most authorised uuids (16)")
        return {"domid": domid, "uuid": args["uuid"], "auth": auth}
