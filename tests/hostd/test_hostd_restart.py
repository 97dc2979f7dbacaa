"""The host's store across a crash: what ``xentmem-hostd`` leaves in its run directory and what
the next start takes back (``docs/protocol.md`` §10, ``docs/page-arena.md``).

A crash is :meth:`HostStore.close` without the clean stop's :meth:`HostStore.discard` (the
files stay as a ``kill -9`` leaves them); the real kill is in ``test_hostd_killed.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from xentmem.hostd.runstate import (
    _SLOTS_AT,
    ARENA_FILE,
    SLOT_BYTES,
    STATE_FILE,
    Record,
    SessionFile,
)
from xentmem.hostd.store import HostStore, StoreError
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    POOL_SHARED_EPHEMERAL,
    PRIVATE_UUID,
    Oid,
    PoolUuid,
)
from xentmem.xenbus.body import PageEncoding, decode_page, encode_page
from xentmem.xenbus.session_key import SessionKey

TEXT = (b"int tmem_put(struct tmem_pool *pool, struct oid *oid, u32 index);\n" * 70)[:4096]
UUID = PoolUuid.from_uuid("a1b2c3d4-0000-1111-2222-333344445555")


def page(n: int) -> bytes:
    return (b"%08d" % n + TEXT)[:PAGE_SIZE] if n % 3 else os.urandom(PAGE_SIZE)


def put(store: HostStore, domid: int, pool: int, oid: int, index: int, data: bytes) -> int:
    encoding, wire = encode_page(data)
    return store.put_page(domid, pool, Oid(oid), index, encoding, wire)


def get(store: HostStore, domid: int, pool: int, oid: int, index: int) -> bytes | None:
    rc, data = store.get_page(domid, pool, Oid(oid), index)
    assert rc in (0, 1)
    return data


def crash_and_restart(store: HostStore, run: Path) -> HostStore:
    store.close()
    return HostStore(64 << 20, run_dir=run)


def test_persistent_pages_pools_and_settings_come_back_exactly(tmp_path: Path) -> None:
    store = HostStore(64 << 20, run_dir=tmp_path)
    store.authorise(1, UUID, True)
    store.authorise(2, UUID, True)
    store.set_weight(1, 7)
    store.set_cap(2, 32 << 20)
    store.freeze(3)
    store.set_compress(2, False)
    assert store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == 0
    assert store.new_pool(1, UUID, POOL_SHARED_EPHEMERAL) == 1
    assert store.new_pool(2, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL) == 0
    assert store.new_pool(2, UUID, POOL_SHARED_EPHEMERAL) == 1
    store.commit(1, 1, b"")  # the state table is written with the message that made pools
    pages = {(1, 0, n % 5, n): page(n) for n in range(60)}
    pages.update({(1, 1, 9, n): page(n + 100) for n in range(10)})
    pages.update({(2, 0, 4, n): page(n + 200) for n in range(10)})
    for (domid, pool, oid, index), data in pages.items():
        assert put(store, domid, pool, oid, index, data) == 1
    listing = store.describe()

    again = crash_and_restart(store, tmp_path)
    assert again.restart["pages_restored"] == 80 and again.restart["arena_how"] == "reopened"
    after = again.describe()
    for (domid, pool, oid, index), data in pages.items():
        assert get(again, domid, pool, oid, index) == data, (domid, pool, oid, index)
    for field in ("shared_pools", "shared_auth"):
        assert after[field] == listing[field]
    for before, now in zip(listing["clients"], after["clients"], strict=True):
        for field in ("domid", "weight", "cap_bytes", "compress", "frozen", "auth",
                      "persistent_pages", "pools"):
            assert now[field] == before[field], field
    again.close()


def test_a_clean_stop_leaves_nothing(tmp_path: Path) -> None:
    store = HostStore(64 << 20, run_dir=tmp_path)
    store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    store.open_session(1, SessionKey.new(), "")
    put(store, 1, 0, 1, 1, page(1))
    store.commit(1, 1, b"reply")
    store.destroy_client(1)
    store.discard()
    assert sorted(os.listdir(tmp_path)) == []
    fresh = HostStore(64 << 20, run_dir=tmp_path)
    assert fresh.restart["arena_how"] == "created" and not fresh.clients
    fresh.discard()


def test_an_exclusive_get_whose_reply_was_recorded_does_not_come_back(tmp_path: Path) -> None:
    """The get took the page and its reply (with the page) was recorded, then the process
    died before the arena's copy was deleted: the restart deletes it (never stale)."""
    store = HostStore(64 << 20, run_dir=tmp_path)
    key = SessionKey.new()
    store.open_session(4, key, "/vm/x")
    assert store.new_pool(4, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL) == 0
    store.commit(4, 1, b"r1")
    assert put(store, 4, 0, 1, 1, page(1)) == 1
    assert put(store, 4, 0, 1, 2, page(2)) == 1
    store.commit(4, 2, b"r2")
    assert get(store, 4, 0, 1, 1) == page(1)  # exclusive: the page is taken
    # the reply is recorded, then the kill comes before the arena's copy is deleted
    assert store.run is not None
    session = store.run.sessions[4]
    session.write(Record(3, b"r3", store.run.pages.taken()))
    assert store.run.arena.get((0, 1, 0, 0, 1)) is not None

    again = crash_and_restart(store, tmp_path)
    assert again.resumable[4].record.seq == 3 and again.resumable[4].record.reply == b"r3"
    assert again.resumable[4].key.encode() == key.encode()
    assert get(again, 4, 0, 1, 1) is None
    assert get(again, 4, 0, 1, 2) == page(2)
    again.close()


def test_an_exclusive_get_cut_short_before_its_record_finds_its_page_again(
        tmp_path: Path) -> None:
    """Killed after the get ran but before its reply was recorded: the message will run
    again, so the page must still be there."""
    store = HostStore(64 << 20, run_dir=tmp_path)
    store.open_session(4, SessionKey.new(), "")
    store.new_pool(4, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    store.commit(4, 1, b"r1")
    put(store, 4, 0, 1, 1, page(1))
    store.commit(4, 2, b"r2")
    assert get(store, 4, 0, 1, 1) == page(1)
    again = crash_and_restart(store, tmp_path)
    assert again.resumable[4].record.seq == 2
    assert get(again, 4, 0, 1, 1) == page(1)
    again.close()


def test_a_torn_session_record_reads_as_the_one_before(tmp_path: Path) -> None:
    made = SessionFile.create(tmp_path / "session-3", 3, SessionKey.new(), "")
    made.write(Record(7, b"seven", []))
    made.write(Record(8, b"eight", [(1, 2, 3, 4, 5)]))
    assert made._map is not None
    made._map[_SLOTS_AT + made.slot * SLOT_BYTES + 20] ^= 0xFF  # record 8 torn by a kill
    made.close()
    found = SessionFile.load(tmp_path / "session-3")
    assert (found.record.seq, found.record.reply) == (7, b"seven")


def test_a_record_torn_after_a_skipped_seq_still_leaves_the_last_whole_one(
        tmp_path: Path) -> None:
    """Seqs skip (a message dropped as not authentic, one the guest gave up on): each record
    still goes to the slot not holding the last one, so a kill tearing the next leaves the
    last (records once went to slot seq % 2: 12 over 10, and a torn 12 fell back to 9)."""
    made = SessionFile.create(tmp_path / "session-3", 3, SessionKey.new(), "")
    for seq in (9, 10, 12, 13, 15):
        made.write(Record(seq, b"%d" % seq, []))
        found = SessionFile.load(tmp_path / "session-3")
        assert found.record.seq == seq
        found.write(Record(seq + 5, b"torn", []))  # the next one, torn by a kill
        assert found._map is not None
        found._map[_SLOTS_AT + found.slot * SLOT_BYTES + 20] ^= 0xFF
        found.close()
        assert SessionFile.load(tmp_path / "session-3").record.seq == seq
        made.close()
        made = SessionFile.load(tmp_path / "session-3")


def test_a_pool_change_whose_message_was_recorded_only_in_the_table(tmp_path: Path) -> None:
    """The state table was written with the message that made a pool; the kill came before
    the session file's record: the table's record is the newer one."""
    store = HostStore(64 << 20, run_dir=tmp_path)
    store.open_session(2, SessionKey.new(), "")
    store.commit(2, 1, b"r1")
    assert store.new_pool(2, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == 0
    store._pools_changed = False
    store._table_records[2] = Record(2, b"r2", [])
    store.save_state()
    again = crash_and_restart(store, tmp_path)
    assert again.resumable[2].record.seq == 2 and again.resumable[2].record.reply == b"r2"
    assert again.describe()["clients"][0]["pools"][0]["persistent"]
    again.close()


def test_a_damaged_page_is_dropped_counted_and_never_served(tmp_path: Path) -> None:
    store = HostStore(64 << 20, run_dir=tmp_path)
    store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    store.commit(1, 1, b"")
    data = [page(n * 3) for n in range(4)]  # random, kept raw: easy to find in the file
    for n, one in enumerate(data):
        put(store, 1, 0, 1, n, one)
    assert store.run is not None
    arena = store.run.arena.arena
    _, rec, _ = arena._index.find_page(arena._object((0, 1, 0, 0), False), 2)
    at = arena._data + rec[2] * 16
    store.close()
    with open(tmp_path / ARENA_FILE, "r+b") as handle:
        handle.seek(at + 100)
        byte = handle.read(1)
        handle.seek(at + 100)
        handle.write(bytes([byte[0] ^ 0x55]))
    again = HostStore(64 << 20, run_dir=tmp_path)
    assert again.restart["checksum_failures"] == 1
    assert again.describe()["restart"]["checksum_failures"] == 1  # `xentmem-hostd list`
    assert [get(again, 1, 0, 1, n) for n in range(4)] == [data[0], data[1], None, data[3]]
    again.close()


def test_an_arena_that_is_not_ours_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / ARENA_FILE).write_bytes(b"somebody's data" * 1000)
    with pytest.raises(StoreError, match=str(tmp_path / ARENA_FILE)):
        HostStore(64 << 20, run_dir=tmp_path)
    assert (tmp_path / ARENA_FILE).read_bytes() == b"somebody's data" * 1000  # untouched


def test_a_damaged_state_table_drops_the_pages_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = HostStore(64 << 20, run_dir=tmp_path)
    store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    store.open_session(1, SessionKey.new(), "")
    store.commit(1, 1, b"")
    put(store, 1, 0, 1, 1, page(1))
    store.close()
    state = tmp_path / STATE_FILE
    state.write_bytes(state.read_bytes().replace(b'"flags"', b'"flogs"'))
    with caplog.at_level(logging.ERROR):
        again = HostStore(64 << 20, run_dir=tmp_path)
    assert str(state) in caplog.text and "checksum mismatch" in caplog.text
    assert again.restart["pages_restored"] == 0 and not again.resumable
    assert again.get_page(1, 0, Oid(1), 1) == (-19, None)  # no pool: -ENODEV
    assert again.run is not None and len(again.run.arena.arena) == 0
    again.close()


def test_pages_come_back_in_their_wire_form(tmp_path: Path) -> None:
    store = HostStore(64 << 20, run_dir=tmp_path)
    store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    store.commit(1, 1, b"")
    put(store, 1, 0, 1, 1, bytes(PAGE_SIZE))
    put(store, 1, 0, 1, 2, TEXT)
    again = crash_and_restart(store, tmp_path)
    rc, encoding, data = again.get_page_form(1, 0, Oid(1), 1)
    assert (rc, encoding, data) == (1, PageEncoding.ZERO, b"")
    rc, encoding, data = again.get_page_form(1, 0, Oid(1), 2)
    assert rc == 1 and encoding == PageEncoding.LZ4 and decode_page(encoding, data) == TEXT
    again.close()


def test_the_service_refuses_to_start_over_a_foreign_arena_naming_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / ARENA_FILE).write_bytes(b"not an arena\n" * 1000)
    result = subprocess.run(
        [sys.executable, "-m", "xentmem.hostd", "--control", str(tmp_path / "c.sock"), "run",
         "--run-dir", str(tmp_path), "--xenstore", str(tmp_path / "no-xenstored")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert str(tmp_path / ARENA_FILE) in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / ARENA_FILE).read_bytes() == b"not an arena\n" * 1000


def test_pools_dropped_without_a_pool_record_stay_dropped_after_the_next_crash(
        tmp_path: Path) -> None:
    """A guest whose session did not come back (its file lost) has its pools dropped at the
    first scan, with no record of its in the table to end: the table must be rewritten
    then, or a second crash brings the pools back, empty, into the guest's next session
    (pool slots it does not know it holds)."""
    store = HostStore(64 << 20, run_dir=tmp_path)
    assert store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == 0
    store.commit(1, 1, b"")  # no session file: open_session could not write it
    put(store, 1, 0, 1, 1, page(1))
    again = crash_and_restart(store, tmp_path)
    assert not again.resumable and again.describe()["clients"][0]["pools"]
    again.drop_unresumed(set(), {1})  # the first scan: domain 1 is there, no session
    assert again.describe()["clients"][0]["pools"] == []
    again.open_session(1, SessionKey.new(), "")  # the guest connects again, makes no pool
    again.commit(1, 1, b"r1")
    third = crash_and_restart(again, tmp_path)
    assert 1 in third.resumable
    assert third.describe()["clients"][0]["pools"] == []
    third.close()


def test_a_client_forgotten_with_its_settings_stays_forgotten_after_a_crash(
        tmp_path: Path) -> None:
    """A domain gone takes its client's settings with it; the table must say so at once,
    or a crash brings them back for whichever domain is next given that domid."""
    store = HostStore(64 << 20, run_dir=tmp_path)
    store.set_weight(5, 7)  # saved: a control command
    assert store.destroy_client(5) == 0  # no pool, no session, no record
    again = crash_and_restart(store, tmp_path)
    assert 5 not in again.clients
    again.close()


def test_temporaries_a_crash_left_mid_write_are_removed_at_the_start_others_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A kill between a temporary's creation and its rename leaves it in the run directory,
    on tmpfs: memory lost across every crash unless the next start removes it."""
    store = HostStore(64 << 20, run_dir=tmp_path)
    store.new_pool(1, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    store.commit(1, 1, b"")
    store.close()
    ours = [".state.k3x_9q2a.tmp", ".session-4.tmp", ".arena.new-4242"]
    others = ["notes.tmp", ".state.tmp", ".session-x.tmp", ".arena.new-", "state.1.tmp"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x" * 4096)
    with caplog.at_level(logging.INFO):
        again = HostStore(64 << 20, run_dir=tmp_path)
    assert sorted(n for n in os.listdir(tmp_path) if n in ours + others) == sorted(others)
    assert "3 temporary file(s)" in caplog.text
    assert again.describe()["clients"][0]["pools"]  # the real files untouched
    again.close()
