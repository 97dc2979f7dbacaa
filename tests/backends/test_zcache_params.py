"""zcache's module params: capacity in MiB or % of RAM, detailed_stats, max_pools.

Bad values are refused by ``ZcacheBackend.params.validate`` (what a load runs first) or, for
what depends on this machine, by the constructor and ``set_param``: always with a message
naming the param and what it accepts, and nothing changed.
"""

from __future__ import annotations

import random

import pytest

from xentmem.errors import ParamError
from xentmem.guest import registry
from xentmem.guest.backends.ramster.params import RAMSTER_PARAMS
from xentmem.guest.backends.zcache import (
    EPHEMERAL_PAGE_OVERHEAD,
    PERSISTENT_PAGE_OVERHEAD,
    ZcacheBackend,
)
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    PRIVATE_UUID,
    Oid,
)
from xentmem.tmem.capacity import capacity_bytes, parse_capacity

MIB = 1 << 20
GIB = 1 << 30


def noise_page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


def make_store(ram: int = GIB, **values: object) -> ZcacheBackend:
    return ZcacheBackend(values, total_ram=lambda: ram)


def test_found_through_its_entry_point() -> None:
    assert registry.backend_class("zcache") is ZcacheBackend
    assert "zcache" in registry.available()


def test_declared_params() -> None:
    described = {name: param.describe() for name, param in ZcacheBackend.params.items()}
    own = {"capacity", "detailed_stats", "max_pools", "allocator"}
    assert set(described) == own | set(RAMSTER_PARAMS)
    assert described["capacity"]["writable"] and described["detailed_stats"]["writable"]
    assert not described["max_pools"]["writable"] and not described["allocator"]["writable"]
    assert {k: v for k, v in ZcacheBackend.params.defaults().items() if k in own} == {
        "capacity": "10%",
        "detailed_stats": False,
        "max_pools": 1024,
        "allocator": "zsmalloc",
    }
    assert ZcacheBackend.params.defaults()["ramster"] is False


@pytest.mark.parametrize(
    ("given", "canonical", "expected_bytes"),
    [
        ("64", "64M", 64 * MIB),
        ("64M", "64M", 64 * MIB),
        (" 64mb ", "64M", 64 * MIB),
        ("64MiB", "64M", 64 * MIB),
        ("1G", "1024M", GIB),
        ("1GiB", "1024M", GIB),
        (64, "64M", 64 * MIB),
        ("10%", "10%", GIB // 10),
        ("100%", "100%", GIB),
        ("1%", "1%", GIB // 100),
    ],
)
def test_capacity_in_mib_or_share_of_ram(
    given: object, canonical: str, expected_bytes: int
) -> None:
    values = ZcacheBackend.params.validate({"capacity": given}, owner="zcache")
    assert values["capacity"] == canonical
    store = make_store(capacity=given)
    assert store.stats()["capacity_bytes"] == expected_bytes
    assert store.describe()["capacity"] == canonical
    assert store.describe()["total_ram_bytes"] == GIB


def test_default_capacity_is_a_tenth_of_ram() -> None:
    assert make_store(ram=8 * GIB).stats()["capacity_bytes"] == 8 * GIB // 10


def test_real_ram_is_read_when_none_is_injected() -> None:
    store = ZcacheBackend({"capacity": "1%"})
    assert store.describe()["total_ram_bytes"] > 0
    assert store.stats()["capacity_bytes"] == store.describe()["total_ram_bytes"] // 100


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "0",
        "0M",
        "-5",
        "+5",
        "12.5%",
        "0%",
        "101%",
        "%",
        "64K",
        "1 2M",
        "ten",
        "64Q",
        "17T",
        "9" * 40,
        # Regression: these were accepted; numbers are ASCII digits, the unit follows at once.
        "\u0661\u0660%",  # Arabic-Indic 10
        "\uff15\uff10%",  # fullwidth 50
        "\uff16\uff14M",
        "64 M",
        " 50 % ",
        "50\u3000%",
        "\u00a064M",  # only ASCII whitespace is ignored around the value
        0,
        -1,
        1.5,
        True,
    ],
)
def test_bad_capacities_are_refused_with_a_clear_message(bad: object) -> None:
    with pytest.raises(ParamError) as refused:
        ZcacheBackend.params.validate({"capacity": bad}, owner="zcache")
    message = str(refused.value)
    assert message.startswith("capacity: ")
    assert "accepted: a size in MiB" in message and "share of RAM" in message


def test_a_capacity_above_the_ram_is_refused_at_load() -> None:
    with pytest.raises(ParamError, match=r"capacity: 2048M is more than .* 1024 MiB of RAM"):
        make_store(capacity="2G")


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"detailed_stats": "maybe"}, ["detailed_stats", "0 or 1"]),
        ({"detailed_stats": 2}, ["detailed_stats", "0 or 1"]),
        ({"max_pools": 0}, ["max_pools", ">= 1"]),
        ({"max_pools": 70000}, ["max_pools", "<= 65536"]),
        ({"max_pools": "many"}, ["max_pools", "integer"]),
        ({"bogus": 1}, ["unknown param 'bogus'", "capacity, detailed_stats, max_pools"]),
    ],
)
def test_other_bad_params_are_refused(values: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ParamError) as refused:
        ZcacheBackend.params.validate(values, owner="zcache")
    for word in words:
        assert word in str(refused.value)
    with pytest.raises(ParamError):
        make_store(**values)


def test_max_pools_is_read_only_once_loaded() -> None:
    store = make_store(max_pools=4)
    with pytest.raises(ParamError, match="max_pools: read-only"):
        store.set_param("max_pools", 8)
    assert store.values["max_pools"] == 4


def test_refused_set_param_changes_nothing() -> None:
    store = make_store(capacity="64M")
    for bad in ("2G", "0", "lots"):
        with pytest.raises(ParamError, match="capacity"):
            store.set_param("capacity", bad)
    assert store.values["capacity"] == "64M"
    assert store.stats()["capacity_bytes"] == 64 * MIB


def test_shrinking_capacity_evicts_ephemeral_pages_at_once() -> None:
    store = make_store(capacity="4M")
    pool = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    for i in range(1200):
        store.put_page(pool, Oid(1), i, noise_page(i))
    held = store.stats()["eph_pages"]
    assert held == 4 * MIB // (PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD)
    assert store.set_param("capacity", "1M") == "1M"
    stats = store.stats()
    assert stats["eph_pages"] == MIB // (PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD)
    assert stats["used_bytes"] <= MIB
    assert stats["evictions"] == 1200 - stats["eph_pages"]
    # The newest pages survived.
    assert store.get_page(pool, Oid(1), 1199) == (1, noise_page(1199))


def test_persistent_pages_above_a_shrunk_capacity_stay_but_new_puts_fail() -> None:
    store = make_store(capacity="2M")
    pers = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    eph = store.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    count = 2 * MIB // (PAGE_SIZE + PERSISTENT_PAGE_OVERHEAD)
    for i in range(count):
        assert store.put_page(pers, Oid(1), i, noise_page(i)) == 1
    store.set_param("capacity", "1M")
    stats = store.stats()
    assert stats["pers_pages"] == count
    assert stats["used_bytes"] > stats["capacity_bytes"]
    assert store.put_page(pers, Oid(1), count, noise_page(0)) < 0
    assert store.put_page(eph, Oid(1), 0, noise_page(0)) < 0
    assert all(store.get_page(pers, Oid(1), i) == (1, noise_page(i)) for i in range(count))
    store.set_param("capacity", "3M")
    assert store.put_page(pers, Oid(1), count, noise_page(0)) == 1


def test_parse_capacity_directly() -> None:
    assert parse_capacity("2g") == "2048M"
    assert capacity_bytes("50%", 1000) == 500
    with pytest.raises(ValueError, match="is not a base-10 integer"):
        parse_capacity("x%")


@pytest.mark.parametrize("text", ["\u0661\u0660%", "\uff15\uff10%", "\u0666\u0664"])
def test_capacity_and_the_knobs_refuse_other_digits_with_one_message(text: str) -> None:
    from xentmem_selfballoon.knobs import KnobStore

    with pytest.raises(ParamError) as capacity:
        ZcacheBackend.params.validate({"capacity": text}, owner="zcache")
    with pytest.raises(ParamError) as knob:
        KnobStore().set("frontswap_inertia", text)
    said = f"{text!r} is not a base-10 integer"
    assert said in str(capacity.value) and said in str(knob.value)
