"""What ``xentmem-hostd`` leaves in its run directory for the next start after a crash.

A ``kill -9`` (an OOM kill, a crash) must not take the guests' pages with it, nor their
sessions: the next start rebuilds the store and each guest goes on where it was
(``docs/protocol.md``, "Restart of the host service").  Three kinds of file, all in the
unit's ``RuntimeDirectory=`` (kept across restarts by ``RuntimeDirectoryPreserve=yes``):

* ``arena``: every page (:class:`~xentmem.tmem.store.ArenaPages`, ``docs/page-arena.md``);
* ``state``: what the pages mean: the pool table, every client's ``xl tmem-set`` settings
  and authorisations, and the last session record of a guest whose message changed its
  pools (a :class:`~xentmem.tmem.store.table.TableFile`, rewritten atomically);
* ``session-<domid>``: one guest's session: its key and, in two alternating checksummed
  slots, the reply to its last message with the pages its exclusive gets took
  (:class:`SessionFile`).  Written before the reply goes out, so a reply lost with the
  process is answered again, never run twice.

A clean stop removes them all (the guests' devices are closed, as before).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from xentmem.tmem.store import ArenaPages, PageKey
from xentmem.tmem.store.table import TableFile
from xentmem.xenbus.session_key import SessionKey

log = logging.getLogger(__name__)

ARENA_FILE = "arena"
STATE_FILE = "state"
STATE_MAGIC = "xentmem-hostd-state 1"
SESSION_PREFIX = "session-"
#: The temporaries of this directory's own atomic writes: the state table's
#: (:func:`~xentmem.files.write_atomically`), a session file's header, the arena's header.
_LEFTOVER = re.compile(r"\.state\.[a-z0-9_]+\.tmp|\.session-[0-9]+\.tmp|\.arena\.new-[0-9]+")

_SESSION_MAGIC = b"XENTMEM-SESSION1"
#: magic, domid, key (32 bytes), vm path length, vm path (up to 256 bytes); then its xxh3.
_HEADER = struct.Struct("<16sI32sH256s")
_HEADER_SUM = struct.Struct("<Q")
#: One record: seq, reply length, taken keys, xxh3 of (the fields, the reply, the keys).
_RECORD = struct.Struct("<QII")
_RECORD_SUM = struct.Struct("<Q")
_TAKEN = struct.Struct("<IQQQI")
#: A record slot holds the largest reply (32 incompressible pages, ~132 KiB) and the
#: pages of 32 exclusive gets; the file is sparse, only what is written costs memory.
SLOT_BYTES = 192 << 10
MAX_TAKEN = 64
_SLOTS_AT = 4096
SESSION_BYTES = _SLOTS_AT + 2 * SLOT_BYTES


@dataclass
class Record:
    """The last message served in a session: its seq, its reply body, and the keys its
    exclusive gets took (deleted from the arena only once this record is written)."""

    seq: int = 0
    reply: bytes = b""
    taken: list[PageKey] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "reply": self.reply.hex(), "taken": [list(k) for k in self.taken]}

    @classmethod
    def from_json(cls, untrusted: Any) -> Record:
        """ValueError when it is not a record."""
        try:
            seq, reply = untrusted["seq"], bytes.fromhex(untrusted["reply"])
            taken = [tuple(int(w) for w in k) for k in untrusted["taken"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"session record: {exc}") from None
        if type(seq) is not int or seq < 0 or any(len(k) != 5 for k in taken):
            raise ValueError("session record: bad seq or keys")
        return cls(seq, reply, taken)  # type: ignore[arg-type]


class SessionFile:
    """``session-<domid>``: one guest's key and its last record, mapped and written in place.

    Made new (header once, by an atomic rename) when a session connects; each message's
    record goes, with its checksum, to the slot not holding the last one (not ``seq % 2``:
    seqs may skip), so a record torn by a kill fails its checksum and the other slot, the
    message before, is the one read back.
    """

    def __init__(self, path: Path, domid: int, key: SessionKey, vm: str,
                 record: Record | None = None) -> None:
        self.path = path
        self.domid = domid
        self.key = key
        self.vm = vm
        self.record = record or Record()
        #: The slot holding :attr:`record` (-1: none yet): the next record goes in the other,
        #: so a write torn by a crash always leaves the last whole one (seqs may skip).
        self.slot = -1
        self._map: mmap.mmap | None = None

    @classmethod
    def create(cls, path: Path, domid: int, key: SessionKey, vm: str) -> SessionFile:
        vm_bytes = vm.encode()[:256]
        header = _HEADER.pack(_SESSION_MAGIC, domid, bytes.fromhex(key.encode().decode()),
                              len(vm_bytes), vm_bytes)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, header + _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(header)))
            os.ftruncate(fd, SESSION_BYTES)
            os.replace(tmp, path)
            made = cls(path, domid, key, vm)
            made._map = mmap.mmap(fd, SESSION_BYTES)
        finally:
            os.close(fd)
        return made

    @classmethod
    def load(cls, path: Path) -> SessionFile:
        """A session file read back: ValueError naming the file and what is wrong."""
        with open(path, "rb") as handle:
            raw = handle.read(SESSION_BYTES + 1)
        if len(raw) != SESSION_BYTES:
            raise ValueError(f"{path}: {len(raw)} bytes, a session file has {SESSION_BYTES}")
        header = raw[:_HEADER.size]
        (want,) = _HEADER_SUM.unpack_from(raw, _HEADER.size)
        magic, domid, key, vm_len, vm = _HEADER.unpack(header)
        if magic != _SESSION_MAGIC:
            raise ValueError(f"{path}: not a xentmem-hostd session file")
        if xxhash.xxh3_64_intdigest(header) != want or vm_len > 256:
            raise ValueError(f"{path}: header checksum mismatch")
        best: Record | None = None
        best_slot = -1
        for slot in range(2):
            record = _read_record(raw, _SLOTS_AT + slot * SLOT_BYTES)
            if record is not None and (best is None or record.seq > best.seq):
                best, best_slot = record, slot
        found = cls(path, domid, SessionKey(key), vm[:vm_len].decode("utf-8", "replace"), best)
        found.slot = best_slot
        fd = os.open(path, os.O_RDWR)
        try:
            found._map = mmap.mmap(fd, SESSION_BYTES)
        finally:
            os.close(fd)
        return found

    def write(self, record: Record) -> None:
        """Record the message just served (before its reply is written)."""
        assert self._map is not None
        taken = record.taken[:MAX_TAKEN]
        head = _RECORD.pack(record.seq, len(record.reply), len(taken))
        body = head + record.reply + b"".join(_TAKEN.pack(*k) for k in taken)
        if len(body) + _RECORD_SUM.size > SLOT_BYTES:
            raise ValueError(f"session record of {len(body)} bytes does not fit a slot")
        slot = 0 if self.slot == 1 else 1 if self.slot == 0 else 0
        at = _SLOTS_AT + slot * SLOT_BYTES
        self._map[at:at + _RECORD_SUM.size] = b"\0" * _RECORD_SUM.size  # torn until summed
        self._map[at + _RECORD_SUM.size:at + _RECORD_SUM.size + len(body)] = body
        self._map[at:at + _RECORD_SUM.size] = _RECORD_SUM.pack(xxhash.xxh3_64_intdigest(body))
        self.record = Record(record.seq, record.reply, taken)
        self.slot = slot

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._map.close()
            self._map = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _read_record(raw: bytes, at: int) -> Record | None:
    (want,) = _RECORD_SUM.unpack_from(raw, at)
    if not want:
        return None
    start = at + _RECORD_SUM.size
    seq, length, count = _RECORD.unpack_from(raw, start)
    end = start + _RECORD.size + length + count * _TAKEN.size
    if count > MAX_TAKEN or end > at + SLOT_BYTES:
        return None
    if xxhash.xxh3_64_intdigest(raw[start:end]) != want:
        return None
    reply_at = start + _RECORD.size
    taken = [_TAKEN.unpack_from(raw, reply_at + length + i * _TAKEN.size) for i in range(count)]
    return Record(seq, raw[reply_at:reply_at + length], taken)  # type: ignore[arg-type]


class HeldPages:
    """The store's :class:`~xentmem.tmem.store.PageStorage` over the arena, whose exclusive
    gets' deletions wait for the session record: :meth:`take` (what the store calls for
    a page an exclusive get takes) only hides the page; :meth:`settle` deletes the hidden
    ones once the reply that carries them is recorded.  So a crash in between leaves the
    page in the arena, and the message, run again, finds it."""

    def __init__(self, arena: ArenaPages) -> None:
        self.arena = arena
        self.held: set[PageKey] = set()
        self.slack = arena.slack
        # Read at the start only, before any page is hidden.
        self.sized_keys = arena.sized_keys
        self.sized_objects = arena.sized_objects
        self.size_of = arena.size_of
        self.trim = arena.trim
        self.counters = arena.counters

    def put(self, key: PageKey, data: bytes) -> None:
        self.arena.put(key, data)
        self.held.discard(key)  # the put replaced the taken page in the arena

    def get(self, key: PageKey) -> bytes | None:
        if key in self.held:
            return None
        return self.arena.get(key)

    def delete(self, key: PageKey) -> None:
        self.held.discard(key)
        self.arena.delete(key)

    def take(self, key: PageKey) -> bytes | None:
        data = self.get(key)
        if data is not None:
            self.held.add(key)
        return data

    def keys(self) -> Iterator[PageKey]:
        """Every key the store holds: not the pages its exclusive gets took."""
        held = self.held
        return iter([key for key in self.arena.keys() if key not in held])  # noqa: SIM118

    def taken(self) -> list[PageKey]:
        return sorted(self.held)

    def settle(self) -> None:
        for key in self.held:
            self.arena.delete(key)
        self.held.clear()


class RunState:
    """The run directory's files: the arena, the state table and the session files."""

    def __init__(self, run_dir: Path, *, allocator: str = "zsmalloc") -> None:
        self.dir = run_dir
        run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.arena = ArenaPages.open(run_dir / ARENA_FILE, allocator=allocator)
        self.pages = HeldPages(self.arena)
        self.table = TableFile(run_dir / STATE_FILE, STATE_MAGIC)
        self.sessions: dict[int, SessionFile] = {}
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """A kill between a temporary's creation and its rename leaves it here, on tmpfs:
        memory lost at every crash.  Only our own names go, and only once the arena's lock
        is ours (no other instance is writing here)."""
        removed = 0
        for path in self.dir.iterdir():
            if _LEFTOVER.fullmatch(path.name):
                try:
                    path.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("leftover temporary file %s not removed: %s", path, exc)
        if removed:
            log.info("xentmem-hostd: removed %d temporary file(s) a crash left in %s",
                     removed, self.dir)

    @property
    def report(self) -> Any:
        return self.arena.arena.report

    def read_state(self) -> Any:
        """The state table, None when there is none (a first start, a clean stop); ValueError
        naming the file and what is wrong."""
        try:
            return self.table.read()
        except FileNotFoundError:
            return None

    def read_sessions(self) -> dict[int, SessionFile]:
        """Every session file that reads back; a bad one is logged (naming it) and removed."""
        found: dict[int, SessionFile] = {}
        for path in sorted(self.dir.glob(f"{SESSION_PREFIX}*")):
            try:
                session = SessionFile.load(path)
                if path.name != f"{SESSION_PREFIX}{session.domid}":
                    raise ValueError(f"{path}: holds domain {session.domid}'s session")
            except (OSError, ValueError) as exc:
                log.error("session file not usable, that guest's session is not resumed: %s",
                          exc)
                path.unlink(missing_ok=True)
                continue
            found[session.domid] = session
        return found

    def session_path(self, domid: int) -> Path:
        return self.dir / f"{SESSION_PREFIX}{domid}"

    def close(self) -> None:
        """Unmap everything; the files stay for the next start (a crash-like exit)."""
        for session in self.sessions.values():
            session.close()
        self.arena.close()

    def discard(self) -> None:
        """A clean stop: every guest was told its pages are gone; remove every file."""
        for session in self.sessions.values():
            session.remove()
        self.sessions.clear()
        for path in self.dir.glob(f"{SESSION_PREFIX}*"):
            path.unlink(missing_ok=True)
        self.table.remove()
        self.arena.discard()


__all__ = ["ARENA_FILE", "STATE_FILE", "HeldPages", "Record", "RunState", "SessionFile"]
