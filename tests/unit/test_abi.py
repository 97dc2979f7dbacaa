"""The ABI's numbers, checked against the originals (Xen public/tmem.h, Linux tmem.c)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xentmem.errors import AbiError
from xentmem.tmem import abi
from xentmem.tmem.abi import Oid, PoolFlags, PoolUuid, TmemOp, XenbusState


def test_op_codes_and_special_errnos() -> None:
    assert [int(op) for op in TmemOp] == list(range(11))
    assert (TmemOp.CONTROL, TmemOp.NEW_POOL, TmemOp.FLUSH_OBJECT) == (0, 1, 7)
    assert (abi.EFROZEN, abi.EEMPTY, abi.TMEM_DONE, abi.TMEM_NOT_FOUND) == (1000, 1001, 1, 0)
    assert abi.rc_name(-1000) == "-EFROZEN" and abi.rc_name(-12) == "-ENOMEM"


def test_flag_words_for_4k_pages() -> None:
    assert abi.pool_flags(persistent=False) == 0x01000000
    assert abi.pool_flags(persistent=True) == 0x01000001
    assert abi.pool_flags(persistent=False, shared=True) == 0x01000002
    assert abi.pool_flags(persistent=False, page_size=8192) == 0x01000010
    with pytest.raises(AbiError):
        abi.pool_flags(persistent=False, page_size=3000)


@pytest.mark.parametrize(
    ("word", "refusal"),
    [
        (0x01000000, None),
        (0x01000001, None),
        (0x01000002, None),
        (0x00000000, "spec version 0"),
        (0x01000003, "shared-persistent"),
        (0x01000010, "page size 8192"),
        (0x01000004, "precompressed"),
        (0x01000100, "reserved bits"),
    ],
)
def test_new_pool_refusals(word: int, refusal: str | None) -> None:
    got = PoolFlags.decode(word).refusal()
    assert (got is None) if refusal is None else (refusal in got)


def test_oid_and_uuid_words() -> None:
    assert Oid.from_bytes(Oid(1, 2, 3).to_bytes()) == Oid(1, 2, 3)
    with pytest.raises(AbiError):
        Oid.checked(-1)
    with pytest.raises(AbiError):
        Oid.checked(1 << 64)
    uuid = PoolUuid.from_uuid("00112233-4455-6677-8899-aabbccddeeff")
    assert str(uuid) == "00112233-4455-6677-8899-aabbccddeeff"
    assert abi.PRIVATE_UUID.is_private and not uuid.is_private


@given(st.integers(0, abi.U32_MAX))
def test_any_u32_flag_word_decodes(word: int) -> None:
    flags = PoolFlags.decode(word)
    assert flags.persistent == bool(word & 1) and flags.shared == bool(word & 2)


def test_xenbus_states() -> None:
    assert XenbusState.CONNECTED == 4 and XenbusState.CLOSED == 6
    assert XenbusState.INIT_WAIT.strstate() == "InitWait"
