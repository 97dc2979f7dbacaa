"""Whose ephemeral page goes next: Xen's ``tmem_evict`` choice, fair by weight.

Every client keeps its own ephemeral pages oldest first, each stamped when it was put or last
got from a shared pool, so the host's oldest page is the oldest of the clients' first ones.
The choice (``docs/tmem-semantics.md``, "Page rules"):

1. a putter over its quota gives up its own oldest page (Xen's rule);
2. else, when weights are set, the client most over its quota (the most ephemeral bytes per
   unit of weight) gives up its oldest page, so a guest within its share is not made to pay
   for one beyond it;
3. else the host's oldest page goes, whoever holds it (Xen's global LRU).

A client's quota is its weight's share of the ephemeral bytes held: over quota means
``eph_bytes / total ephemeral bytes > weight / total weight``; weight 0 is never over quota.
"""

from __future__ import annotations

from collections.abc import Iterable

from xentmem.tmem.store.records import Client


def over_quota(client: Client, total_weight: int, eph_bytes: int) -> bool:
    """True when ``client`` holds more of the ephemeral bytes than its weight's share."""
    weight = client.weight
    return weight > 0 and client.eph_bytes * total_weight > eph_bytes * weight


def victim(putter: Client | None, clients: Iterable[Client], total_weight: int,
           eph_bytes: int) -> Client | None:
    """The client whose oldest ephemeral page goes next; None when no client holds one."""
    if total_weight:
        if putter is not None and putter.lru and over_quota(putter, total_weight, eph_bytes):
            return putter
        worst: Client | None = None
        for client in clients:
            if client.lru and over_quota(client, total_weight, eph_bytes) and (
                    worst is None or client.eph_bytes * worst.weight
                    > worst.eph_bytes * client.weight):
                worst = client
        if worst is not None:
            return worst
    oldest: Client | None = None
    oldest_stamp = 0
    for client in clients:
        lru = client.lru
        if lru:
            stamp = next(iter(lru.values()))
            if oldest is None or stamp < oldest_stamp:
                oldest, oldest_stamp = client, stamp
    return oldest


__all__ = ["over_quota", "victim"]
