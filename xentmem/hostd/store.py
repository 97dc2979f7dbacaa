"""The host's tmem store: one client of :class:`~xentmem.tmem.store.TmemStore` per guest domain.

The rules are the store's (``docs/tmem-semantics.md``, "The store"); this adapter adds what
only the host has: pages arrive and leave in their wire form (checked here, and an lz4 block a
guest sent is kept as it is), each client's compression setting, and the ``tmem-list``
listing.  The host service runs it from its one loop.
"""

from __future__ import annotations

import errno
from typing import Any

from xentmem.tmem.abi import PAGE_SIZE, Oid, PoolUuid
from xentmem.tmem.store import (
    MAX_AUTH_UUIDS,
    POOR_COMPRESSION_LIMIT,
    Client,
    TmemStore,
    pack_page,
)
from xentmem.xenbus.body import PageEncoding, WireError, decode_page

__all__ = ["MAX_AUTH_UUIDS", "HostStore"]


class HostStore:
    """Every guest's pools and pages, within one host-wide capacity in bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.tmem = TmemStore(capacity_bytes)

    # -- what the service and the control handlers read ---------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.tmem.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.tmem.used_bytes

    @property
    def clients(self) -> dict[int, Client]:
        """The guests that have a client (made by their first tmem op), by domid."""
        return self.tmem.clients

    @property
    def shared_auth(self) -> bool:
        return self.tmem.shared_auth

    @shared_auth.setter
    def shared_auth(self, on: bool) -> None:
        self.tmem.shared_auth = on

    def client(self, domid: int) -> Client:
        """The client of ``domid``, made on first use (as Xen's first tmem op does)."""
        return self.tmem.client(domid)

    def destroy_client(self, domid: int) -> int:
        """Drop every pool of ``domid`` (the guest closed its device or died); pools dropped."""
        return self.tmem.destroy_client(domid)

    # -- the tmem ops ---------------------------------------------------------------------------

    def new_pool(self, domid: int, uuid: PoolUuid, flags_word: int) -> int:
        return self.tmem.new_pool(domid, uuid, flags_word)

    def destroy_pool(self, domid: int, pool_id: int) -> int:
        return self.tmem.destroy_pool(domid, pool_id)

    def put_page(self, domid: int, pool_id: int, oid: Oid, index: int,
                 encoding: PageEncoding, untrusted_data: bytes) -> int:
        """PUT_PAGE of a page in its wire form: -EINVAL, and no older copy left, if it is not
        a page."""
        try:
            stored = self._stored_form(domid, encoding, untrusted_data)
        except WireError:
            return self.tmem.refuse_put(domid, pool_id, oid, index, -errno.EINVAL)
        return self.tmem.put_page(domid, pool_id, oid, index, stored)

    def get_page(self, domid: int, pool_id: int, oid: Oid, index: int) -> tuple[int, bytes | None]:
        rc, encoding, data = self.get_page_form(domid, pool_id, oid, index)
        return rc, None if encoding is None else decode_page(encoding, data)

    def get_page_form(self, domid: int, pool_id: int, oid: Oid,
                      index: int) -> tuple[int, PageEncoding | None, bytes]:
        """GET_PAGE, with the page in the form it is kept in, which is a wire form too: the
        host answers a get without decompressing and compressing the page again."""
        rc, stored = self.tmem.get_page(domid, pool_id, oid, index)
        if stored is None:
            return rc, None, b""
        return rc, _stored_encoding(stored), stored

    def flush_page(self, domid: int, pool_id: int, oid: Oid, index: int) -> int:
        return self.tmem.flush_page(domid, pool_id, oid, index)

    def flush_object(self, domid: int, pool_id: int, oid: Oid) -> int:
        return self.tmem.flush_object(domid, pool_id, oid)

    # -- control (xl tmem-*) --------------------------------------------------------------------

    def freeze(self, domid: int, frozen: bool = True) -> None:
        self.tmem.freeze(domid, frozen)

    def set_weight(self, domid: int, weight: int) -> None:
        self.tmem.set_weight(domid, weight)

    def set_cap(self, domid: int, cap_bytes: int) -> int:
        return self.tmem.set_cap(domid, cap_bytes)

    def set_compress(self, domid: int, compress: bool) -> None:
        """Affects pages put from now on (stored pages keep their form, as in Xen)."""
        self.tmem.set_compress(domid, compress)

    def authorise(self, domid: int, uuid: PoolUuid, allow: bool) -> int:
        """``tmem-shared-auth``: 1 done, -ENOSPC when the client's list is full."""
        return self.tmem.authorise(domid, uuid, allow)

    def freeable_mb(self) -> int:
        """``tmem-freeable``: MiB the host could take back at once (the ephemeral pages)."""
        return self.tmem.freeable_bytes() >> 20

    def describe(self, domid: int | None = None) -> dict[str, Any]:
        """What ``tmem-list -l`` shows, as a dict: the host, then each client and its pools."""
        tmem = self.tmem
        with tmem.lock:
            clients = sorted(
                (c for c in tmem.clients.values() if domid is None or c.cid == domid),
                key=lambda c: c.cid,
            )
            listing = {
                "capacity_bytes": tmem.capacity_bytes,
                "used_bytes": tmem.used_bytes,
                "ephemeral_pages": tmem.eph_pages,
                "evictions": tmem.evictions,
                "shared_auth": tmem.shared_auth,
                "shared_pools": [
                    {"uuid": str(u), "members": sorted(p.members), "pages": p.pages}
                    for u, p in tmem.shared_pools.items()
                ],
                "freeable_mb": tmem.eph_bytes >> 20,
            }
        listing["clients"] = [self._describe_client(c) for c in clients]
        return listing

    def _describe_client(self, client: Client) -> dict[str, Any]:
        counters = client.counters
        with self.tmem.lock:
            return {
                "domid": client.cid,
                "weight": client.weight,
                "cap_bytes": client.cap,
                "compress": client.compress,
                "frozen": client.frozen,
                "auth": sorted(str(u) for u in client.auth),
                "ephemeral_pages": client.eph_pages,
                "persistent_pages": client.pers_pages,
                "pools": self._pool_rows(client),
                "stats": {
                    "puts": counters.puts,
                    "succ_puts": counters.succ_puts,
                    "failed_puts": counters.failed_puts,
                    "gets": counters.gets,
                    "found_gets": counters.found_gets,
                    "flushes": counters.flushes,
                    "flobjs": counters.flobjs,
                    "evicted": counters.evicted,
                    "compressed_pages": counters.compressed_pages,
                    "zero_pages": counters.zero_puts,
                },
            }

    @staticmethod
    def _pool_rows(client: Client) -> list[dict[str, Any]]:
        return [
            {"pool_id": slot, "persistent": pool.persistent, "shared": pool.shared,
             "uuid": str(pool.uuid), "pages": pool.pages, "objects": len(pool.objects)}
            for slot, pool in enumerate(client.slots)
            if pool is not None
        ]

    # -- internals ------------------------------------------------------------------------------

    def _stored_form(self, domid: int, encoding: PageEncoding, untrusted_data: bytes) -> bytes:
        """Check the wire page, then keep it as this client's compression setting says."""
        page = decode_page(encoding, untrusted_data)
        client = self.tmem.clients.get(domid)
        if client is not None and not client.compress:
            return page
        if encoding == PageEncoding.LZ4 and len(untrusted_data) <= POOR_COMPRESSION_LIMIT:
            return bytes(untrusted_data)
        return pack_page(page)


def _stored_encoding(stored: bytes) -> PageEncoding:
    """What a stored form is: empty = zero page, 4096 bytes = raw, else an lz4 block (checked
    when it was put)."""
    if not stored:
        return PageEncoding.ZERO
    return PageEncoding.RAW if len(stored) == PAGE_SIZE else PageEncoding.LZ4
