"""The host's tmem store: one client of :class:`~xentmem.tmem.store.TmemStore` per guest domain.

The rules are the store's (``docs/tmem-semantics.md``, "The store"); this adapter adds what
only the host has: pages arrive and leave in their wire form (checked here, and an lz4 block a
guest sent is kept as it is), each client's compression setting, and the ``tmem-list``
listing.  The host service runs it from its one loop.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Set
from pathlib import Path
from typing import Any

from xentmem.errors import AbiError, ArenaError, XentmemError
from xentmem.hostd.runstate import Record, RunState, SessionFile
from xentmem.tmem.abi import MAX_POOLS_PER_DOMAIN, PAGE_SIZE, Oid, PoolUuid
from xentmem.tmem.store import (
    MAX_AUTH_UUIDS,
    POOR_COMPRESSION_LIMIT,
    Client,
    TmemStore,
    pack_page,
)
from xentmem.xenbus.body import PageEncoding, WireError, decode_page

__all__ = ["MAX_AUTH_UUIDS", "HostStore", "StoreError"]

log = logging.getLogger(__name__)


class StoreError(XentmemError):
    """The run directory's arena cannot be used (not ours, a newer version's, in use)."""


class HostStore:
    """Every guest's pools and pages, within one host-wide capacity in bytes.

    With a ``run_dir`` the pages live in an arena there and the pools, clients and guest
    sessions in files beside it (:mod:`xentmem.hostd.runstate`), so a crashed service
    started again finds them; without one (tests, the demo) everything is in memory.
    """

    def __init__(self, capacity_bytes: int, *, run_dir: str | Path | None = None,
                 allocator: str = "zsmalloc", max_pools: int = MAX_POOLS_PER_DOMAIN) -> None:
        self.run: RunState | None = None
        #: Sessions a restart found, waiting for their guest's device: domid -> session.
        self.resumable: dict[int, SessionFile] = {}
        #: What the start found in the run directory (``describe``, the log).
        self.restart: dict[str, Any] = {}
        self._pools_changed = False
        #: Records of messages that changed pools, kept in the state table (domid -> record).
        self._table_records: dict[int, Record] = {}
        if run_dir is None:
            self.tmem = TmemStore(capacity_bytes, max_pools=max_pools)
            return
        try:
            self.run = RunState(Path(run_dir), allocator=allocator)
        except (ArenaError, OSError) as exc:
            raise StoreError(f"xentmem-hostd: {exc}") from None
        self.tmem = TmemStore(capacity_bytes, pages=self.run.pages, max_pools=max_pools)
        try:
            self._rebuild()
        except BaseException:
            self.run.close()
            raise

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
        self._save_quietly()

    def client(self, domid: int) -> Client:
        """The client of ``domid``, made on first use (as Xen's first tmem op does)."""
        return self.tmem.client(domid)

    def destroy_client(self, domid: int) -> int:
        """Forget ``domid``: every pool, its session and what the administrator set (the
        domain is gone, or the service stops); answers the pools dropped.  The state table
        is rewritten whenever there was a client: a crash must not bring it back."""
        known = domid in self.tmem.clients
        dropped = self.tmem.destroy_client(domid)
        self.end_session(domid, changed=known)
        return dropped

    def drop_pools(self, domid: int) -> int:
        """Drop every pool of ``domid`` and its session (the guest closed its device or
        starts a new session): its weight, cap, freeze, compression and authorised uuids
        stay, so a guest cannot shed them by reloading its backend; the pools dropped.  The
        state table is rewritten if any went (a guest may hold pools with no record of its
        in the table, after a restart), or a crash would bring them back."""
        dropped = self.tmem.drop_pools(domid)
        self.end_session(domid, changed=dropped > 0)
        return dropped

    # -- the tmem ops ---------------------------------------------------------------------------

    def new_pool(self, domid: int, uuid: PoolUuid, flags_word: int) -> int:
        rc = self.tmem.new_pool(domid, uuid, flags_word)
        self._pools_changed = self._pools_changed or rc >= 0
        return rc

    def destroy_pool(self, domid: int, pool_id: int) -> int:
        rc = self.tmem.destroy_pool(domid, pool_id)
        self._pools_changed = self._pools_changed or rc > 0
        return rc

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
        self._save_quietly()

    def set_weight(self, domid: int, weight: int) -> None:
        self.tmem.set_weight(domid, weight)
        self._save_quietly()

    def set_cap(self, domid: int, cap_bytes: int) -> int:
        evicted = self.tmem.set_cap(domid, cap_bytes)
        self._save_quietly()
        return evicted

    def set_compress(self, domid: int, compress: bool) -> None:
        """Affects pages put from now on (stored pages keep their form, as in Xen)."""
        self.tmem.set_compress(domid, compress)
        self._save_quietly()

    def authorise(self, domid: int, uuid: PoolUuid, allow: bool) -> int:
        """``tmem-shared-auth``: 1 done, -ENOSPC when the client's list is full."""
        rc = self.tmem.authorise(domid, uuid, allow)
        self._save_quietly()
        return rc

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
            if self.run is not None:  # the arena's counters, checksum failures among them
                listing["storage"] = self.run.pages.counters()
        if self.restart:
            listing["restart"] = dict(self.restart)
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

    # -- the run directory: what a crash leaves for the next start -----------------------------

    def open_session(self, domid: int, key: Any, vm: str) -> None:
        """A guest's session connected: its session file, made new (a fresh key)."""
        if self.run is None:
            return
        self.end_session(domid)
        try:
            self.run.sessions[domid] = SessionFile.create(self.run.session_path(domid), domid,
                                                          key, vm)
        except OSError as exc:
            log.error("domain %d: session file %s not written (%s): its session will not "
                      "survive a crash of the service", domid, self.run.session_path(domid),
                      exc)

    def end_session(self, domid: int, *, changed: bool = False) -> None:
        """The guest's session ended (closed, a new one, gone): its file goes, and its
        record leaves the state table, rewritten then (or if the caller ``changed`` it)."""
        if self.run is None:
            return
        self.resumable.pop(domid, None)
        session = self.run.sessions.pop(domid, None)
        if session is not None:
            session.remove()
        else:
            self.run.session_path(domid).unlink(missing_ok=True)
        if self._table_records.pop(domid, None) is not None or changed:
            self._save_quietly()

    def commit(self, domid: int, seq: int, reply: bytes) -> None:
        """A message was run and this is its reply: record it before it is sent (with the
        pages its exclusive gets took, which are deleted only now), and the state table if
        its pools changed.  Without a run directory there is nothing to record."""
        run = self.run
        if run is None:
            return
        pages = run.pages
        record = Record(seq, reply, pages.taken())
        if self._pools_changed:
            self._pools_changed = False
            self._table_records[domid] = record
            self._save_quietly()
        session = run.sessions.get(domid)
        if session is not None:
            try:
                session.write(record)
            except ValueError as exc:
                log.error("domain %d message %d not recorded: %s", domid, seq, exc)
        pages.settle()

    def record_of(self, domid: int) -> Record:
        session = self.run.sessions.get(domid) if self.run is not None else None
        return session.record if session is not None else Record()

    def state_table(self) -> dict[str, Any]:
        """What the ``state`` file holds: pools, clients' settings, pool-changing records."""
        tmem = self.tmem
        with tmem.lock:
            clients = [{"cid": c.cid, "weight": c.weight, "cap": c.cap, "frozen": c.frozen,
                        "compress": c.compress,
                        "auth": sorted([u.lo, u.hi] for u in c.auth)}
                       for c in tmem.clients.values()]
        return {"shared_auth": tmem.shared_auth, "clients": clients, "pools": tmem.pool_table(),
                "records": {str(d): r.as_json() for d, r in self._table_records.items()}}

    def save_state(self) -> None:
        """The state table, rewritten atomically (OSError when it cannot be)."""
        if self.run is not None:
            self.run.table.write(self.state_table())

    def _save_quietly(self) -> None:
        try:
            self.save_state()
        except OSError as exc:
            log.error("state table %s not written: %s; a crash now would lose what the "
                      "pages mean", self.run.table.path if self.run else "?", exc)

    def close(self) -> None:
        """Let go of the run directory's files, keeping them (as a crash would)."""
        if self.run is not None:
            self.run.close()

    def discard(self) -> None:
        """A clean stop: every guest was told its pages are gone; the files go."""
        if self.run is not None:
            self._table_records.clear()
            self.resumable.clear()
            self.run.discard()
            self.run = None

    def _rebuild(self) -> None:
        """After a crash: pools, clients and pages back from the run directory, and the
        sessions that may resume (each guest's device decides when the service starts)."""
        run = self.run
        assert run is not None
        started = time.monotonic()
        report = run.report
        problem = ""
        table: Any = None
        try:
            table = run.read_state()
        except (OSError, ValueError) as exc:
            problem = str(exc)
        sessions = run.read_sessions()
        records: dict[int, Record] = {}
        if isinstance(table, dict):
            for domid, row in (table.get("records") or {}).items():
                try:
                    records[int(domid)] = Record.from_json(row)
                except (TypeError, ValueError) as exc:
                    problem = problem or f"{run.table.path}: {exc}"
        for domid, session in sessions.items():
            if records.get(domid, Record()).seq > session.record.seq:
                session.record = records[domid]
        # The pages the last messages' exclusive gets took, if a crash came before they went.
        for session in sessions.values():
            for key in session.record.taken:
                run.arena.delete(key)  # type: ignore[arg-type]
        found = {"pools": 0, "pages": 0, "orphans": 0}
        if table is not None and not problem:
            try:
                if not isinstance(table, dict):
                    raise ValueError("not a table of pools and clients")
                # Settings first: a cap set on a client holding nothing evicts nothing.
                self._restore_clients(table)
                found = self.tmem.restore(table.get("pools"))
            except (AbiError, KeyError, TypeError, ValueError) as exc:
                problem = f"{run.table.path}: {exc}"
                self.tmem = TmemStore(self.tmem.capacity_bytes, pages=run.pages,
                                      max_pools=self.tmem.max_pools)
        if problem or table is None:
            found = self.tmem.restore([]) if not self.tmem.clients else found
            for session in sessions.values():
                session.remove()
            sessions = {}
        if problem:
            log.error("xentmem-hostd: state table not usable, every page in %s is dropped: "
                      "%s", report.path, problem)
        run.sessions = dict(sessions)
        self.resumable = dict(sessions)
        self._table_records = {d: r for d, r in records.items() if d in sessions}
        self.restart = report.restart_summary(found, started=started, problem=problem)
        self.restart["sessions"] = sorted(sessions)
        if report.how != "created":
            log.info("xentmem-hostd: arena %s %s: %d page(s) in %d pool(s) kept, %d dropped, "
                     "%d checksum failure(s), sessions of domains %s may resume, %.2fs",
                     report.path, report.how, found["pages"], found["pools"], found["orphans"],
                     report.checksum_failures, sorted(sessions) or "none",
                     self.restart["seconds"])
        self.save_state()

    def _restore_clients(self, table: dict[str, Any]) -> None:
        """Each client's ``xl tmem-set`` settings and authorisations, checked."""
        tmem = self.tmem
        rows = table.get("clients", [])
        if not isinstance(rows, list):
            raise ValueError("clients is not a list")
        for row in rows:
            cid = row["cid"]
            if type(cid) is not int:
                raise ValueError(f"client {cid!r} is not a domid")
            tmem.set_weight(cid, int(row["weight"]))
            tmem.set_cap(cid, int(row["cap"]))
            tmem.freeze(cid, bool(row["frozen"]))
            tmem.set_compress(cid, bool(row["compress"]))
            for lo, hi in row["auth"]:
                tmem.authorise(cid, PoolUuid.checked(lo, hi), True)
        tmem.shared_auth = bool(table.get("shared_auth", True))

    def drop_unresumed(self, kept: set[int], present: set[int],
                       waiting: Set[int] = frozenset(), *, first: bool = True) -> None:
        """After the devices were set up: a client whose domain is no longer ``present``
        (it died while the service was down: no @releaseDomain will come) is forgotten with
        what the administrator set, so a domain given its domid later starts afresh; one
        whose session did not resume loses its pools (its guest is told the host lost them,
        as before), unless its resume failed on an error and is ``waiting`` to be tried
        again: its session stays resumable.  Not the ``first`` time, only the sessions
        still resumable are looked at."""
        for domid, client in list(self.tmem.clients.items()):
            if not first and domid not in self.resumable:
                continue
            if domid not in present:
                self.destroy_client(domid)
            elif domid in waiting and domid in self.resumable:
                continue
            elif domid not in kept and any(pool is not None for pool in client.slots):
                self.drop_pools(domid)
        self.resumable = {d: s for d, s in self.resumable.items()
                          if d in waiting and d in present}

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
