"""RAMster's record format and params, without a cluster."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from xentmem.errors import ParamError
from xentmem.guest.backends.ramster import pending, record
from xentmem.guest.backends.ramster.params import RAMSTER_PARAMS, parse_nodes, resolve_node_id
from xentmem.guest.backends.ramster.record import RecordError, RemoteKey
from xentmem.roots import Roots
from xentmem.tmem.abi import Oid

KEY = RemoteKey("dom5", 2, Oid(1, 2, 3), 0x41)


def test_a_record_round_trips_and_names_its_key() -> None:
    value = record.encode(KEY, b"page", persistent=True)
    assert KEY.name() == "xentmem:{dom5:2:1.2.3}:41"
    assert KEY.name().encode() in value
    assert record.decode(KEY, value) == b"page"


@pytest.mark.parametrize("cut", range(0, 30, 3))
def test_every_truncation_and_every_flipped_byte_is_refused(cut: int) -> None:
    value = record.encode(KEY, b"page data" * 10, persistent=False)
    with pytest.raises(RecordError):
        record.decode(KEY, value[:cut])
    for at in range(len(value)):
        damaged = bytearray(value)
        damaged[at] ^= 0x40
        if at == 5:  # the flags byte is not covered: it says nothing about the data
            continue
        with pytest.raises(RecordError):
            record.decode(KEY, bytes(damaged))


def test_another_keys_record_is_refused() -> None:
    other = RemoteKey("dom5", 2, Oid(1, 2, 3), 0x42)
    with pytest.raises(RecordError, match="'s"):
        record.decode(KEY, record.encode(other, b"page", persistent=True))


def test_an_objects_pages_share_one_hash_tag_and_owners_stay_apart() -> None:
    tags = {RemoteKey("dom5", 2, Oid(1, 2, 3), i).object_tag() for i in range(50)}
    assert len(tags) == 1
    assert record.key_pattern("dom5") == "xentmem:{dom5:*"
    assert not KEY.name().startswith(record.key_pattern("dom55")[:-1])
    assert record.owner_of_shared("ab" * 16) == "shared:" + "ab" * 16
    for bad in ["", "a*b", "a{b", "x" * 65, "-lead", "sp ace", "\u0661", "shared"]:
        with pytest.raises(ValueError):
            record.check_node_id(bad)


def test_a_pending_flush_of_an_object_is_told_from_a_key_name() -> None:
    tag = record.object_tag(record.owner_of_shared("0123456789abcdef0123456789abcdef"), 0,
                            Oid(7, 0, 0))
    mark = record.object_mark(tag)
    assert mark == "xentmem:{shared:0123456789abcdef0123456789abcdef:0:7.0.0}:*"
    assert record.marked_object(mark) == tag
    assert record.marked_object(KEY.name()) is None  # a key name is no mark
    for other in ("*:*", "xentmem:{dom5:2:1.2.3:*", "xentmem:{dom5:2:01.2.3}:*", ":*"):
        assert record.marked_object(other) is None, other  # not a tag this module writes


def test_nodes_and_node_ids_are_validated_as_params() -> None:
    assert parse_nodes("10.0.0.1:7000, redis-a ,[::1]:7001, [fe80::2]") == (
        ("10.0.0.1", 7000), ("redis-a", 6379), ("::1", 7001), ("fe80::2", 6379))
    for bad in ["h:0", "h:65536", "h:\uff11", "h:1,h:1", "h x:1", "h:", "::1", "fe80::1:6379",
                "[::1", "[::1]7000", "[]:7000", "[[::1]]:7000"]:
        with pytest.raises(ParamError, match="ramster_nodes"):
            RAMSTER_PARAMS["ramster_nodes"].coerce(bad)
    with pytest.raises(ParamError, match="ramster_replicas"):
        RAMSTER_PARAMS["ramster_replicas"].coerce("-1")
    with pytest.raises(ParamError, match="ramster_ephemeral"):
        RAMSTER_PARAMS["ramster_ephemeral"].coerce("keep")


def test_the_node_id_defaults_to_the_domains_uuid_then_the_machine_id(tmp_path: Path) -> None:
    roots = Roots(root=tmp_path)
    with pytest.raises(ValueError, match="machine-id"):
        resolve_node_id("", roots)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    assert resolve_node_id("", roots) == "0123456789abcdef0123456789abcdef"
    uuid = tmp_path / "sys" / "hypervisor" / "uuid"
    uuid.parent.mkdir(parents=True)
    uuid.write_text("6d2f1c3a-0000-4000-8000-00000000abcd\n")
    assert resolve_node_id("", roots) == "6d2f1c3a-0000-4000-8000-00000000abcd"
    assert resolve_node_id("dom5", roots) == "dom5"
    uuid.write_text("not a {node}\n")
    with pytest.raises(ValueError, match="hypervisor/uuid"):
        resolve_node_id("", roots)


def test_pending_deletes_saved_by_two_threads_at_once_keep_every_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails before: each save wrote its own snapshot of the names through one temporary
    path, unlocked; a save that took its snapshot first and wrote last replaced the file
    with the older set, so a name another thread had just saved was not in it (and a kill
    then let the restart's SCAN adopt that flushed page).  Thread A's write is held until
    B's update returned (or, once saves are serialised, for a bound: B then waits for A)."""
    path = tmp_path / "ramster.deletes"
    kept = pending.PendingDeletes(path)
    b_done = threading.Event()
    first = threading.Event()
    real_text, real_atomic = Path.write_text, getattr(pending, "write_atomically", None)

    def hold_first() -> None:
        if not first.is_set():
            first.set()
            b_done.wait(2.0)  # a bound only: serialised saves pass either way

    def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
        hold_first()
        return real_text(self, *args, **kwargs)

    def write_atomically(*args: Any, **kwargs: Any) -> None:
        hold_first()
        assert real_atomic is not None
        real_atomic(*args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    if real_atomic is not None:
        monkeypatch.setattr(pending, "write_atomically", write_atomically)
    a = threading.Thread(target=kept.update, args=(["xentmem:{n:1:1.0.0}:a"],))
    a.start()
    assert first.wait(60)

    def b() -> None:
        kept.update(["xentmem:{n:1:1.0.0}:b"])
        b_done.set()

    other = threading.Thread(target=b)
    other.start()
    a.join(60)
    other.join(60)
    assert set(path.read_text().split()) == {"xentmem:{n:1:1.0.0}:a", "xentmem:{n:1:1.0.0}:b"}
    assert set(pending.PendingDeletes(path)) == set(kept)
