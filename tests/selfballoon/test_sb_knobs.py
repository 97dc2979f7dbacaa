"""The nine kernel knobs (names, defaults, validation) plus auto values and the guard's."""

from __future__ import annotations

from typing import Any

import pytest

from xentmem.errors import ParamError
from xentmem_selfballoon.knobs import KERNEL_KNOBS, SELFBALLOON_PARAMS, KnobStore, knob_names

KERNEL_DEFAULTS = {
    "selfballooning": True,
    "selfballoon_interval": 5,
    "selfballoon_downhysteresis": 8,
    "selfballoon_uphysteresis": 1,
    "selfballoon_min_usable_mb": None,  # the kernel's 0: piecewise floor
    "selfballoon_reserved_mb": None,  # the kernel's 0: 10 % of RAM at init
    "frontswap_selfshrinking": True,
    "frontswap_hysteresis": 20,
    "frontswap_inertia": 3,
}


def test_kernel_names_and_defaults() -> None:
    assert tuple(KERNEL_DEFAULTS) == KERNEL_KNOBS
    values = KnobStore().snapshot().values()
    for name, default in KERNEL_DEFAULTS.items():
        assert values[name] == default, name


def test_guard_is_off_by_default_and_every_param_is_a_snapshot_field() -> None:
    store = KnobStore()
    assert store.get("pressure_guard") is False
    assert set(knob_names()) == set(SELFBALLOON_PARAMS)
    assert all(p.writable for p in SELFBALLOON_PARAMS.values())


@pytest.mark.parametrize(
    ("name", "text", "typed"),
    [
        ("selfballoon_interval", "10\n", 10),  # sysfs writes end in a newline
        ("selfballoon_interval", "+7", 7),  # kstrtoul takes a leading +
        ("selfballoon_downhysteresis", "1", 1),
        ("frontswap_inertia", str(2**32 - 1), 2**32 - 1),
        ("selfballooning", "0", False),
        ("selfballooning", "1\n", True),
        ("frontswap_selfshrinking", "+0", False),
        ("frontswap_selfshrinking", "0", False),
        ("selfballoon_min_usable_mb", "300", 300),
        ("selfballoon_min_usable_mb", "auto", None),
        ("selfballoon_reserved_mb", "AUTO\n", None),
        ("selfballoon_reserved_mb", None, None),  # auto as read from a config file
        ("pressure_guard", "1", True),
        ("pressure_guard_poll_ms", 250, 250),
        ("selfballoon_uphysteresis", 3, 3),
        ("selfballooning", False, False),
    ],
)
def test_accepted_values(name: str, text: Any, typed: Any) -> None:
    store = KnobStore()
    knobs = store.set(name, text)
    assert getattr(knobs, name) == typed
    assert store.get(name) == typed


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("selfballoon_interval", "0"),  # the kernel's stores reject 0
        ("selfballoon_downhysteresis", 0),
        ("selfballoon_uphysteresis", "-1"),
        ("frontswap_hysteresis", "abc"),
        ("frontswap_inertia", "1.5"),
        ("frontswap_inertia", ""),
        ("selfballoon_interval", str(2**32)),  # the kernel truncated; we refuse
        ("selfballoon_interval", "0x10"),  # base 10 only
        ("selfballoon_interval", "\u0661\u0660"),  # ASCII digits only
        ("selfballooning", "\uff11"),
        ("selfballoon_interval", "1 0"),
        ("selfballoon_interval", "auto"),  # only the two _mb knobs have an automatic value
        ("selfballoon_min_usable_mb", "0"),  # 0 is not "auto"; say auto
        ("selfballoon_reserved_mb", 0),
        ("selfballoon_interval", None),  # only a param whose default is None takes None
        ("selfballooning", "2"),  # switches take 0 or 1 only
        ("selfballooning", "yes"),
        ("selfballooning", "-0"),  # kstrtoul takes no "-", not even before 0
        ("pressure_guard", "-0"),
        ("frontswap_selfshrinking", 2),
        ("pressure_guard_stall_us_per_s", "0"),
        ("selfballoon_interval", True),
        ("no_such_knob", "1"),
    ],
)
def test_refused_values_change_nothing(name: str, value: Any) -> None:
    store = KnobStore()
    before = store.snapshot()
    with pytest.raises(ParamError) as info:
        store.set(name, value)
    assert name in str(info.value)
    assert store.snapshot() is before


def test_update_is_all_or_nothing() -> None:
    store = KnobStore()
    before = store.snapshot()
    with pytest.raises(ParamError, match="frontswap_inertia"):
        store.update({"selfballoon_interval": "9", "frontswap_inertia": "0"})
    assert store.snapshot() is before
    store.update({"selfballoon_interval": "9", "frontswap_inertia": "4"})
    assert (store.get("selfballoon_interval"), store.get("frontswap_inertia")) == (9, 4)


def test_snapshots_are_immutable_and_swapped() -> None:
    store = KnobStore()
    old = store.snapshot()
    new = store.set("selfballoon_interval", "2")
    assert old.selfballoon_interval == 5 and new.selfballoon_interval == 2
    with pytest.raises(AttributeError):
        new.selfballoon_interval = 3  # type: ignore[misc]


def test_auto_values_and_reset() -> None:
    store = KnobStore(auto_reserved_mb=198)
    assert store.snapshot().reserved_mb == 198
    assert store.show("selfballoon_reserved_mb") == "auto (198)"
    store.set("selfballoon_reserved_mb", "64")
    assert store.snapshot().reserved_mb == 64 and store.show("selfballoon_reserved_mb") == "64"
    store.set("selfballoon_reserved_mb", "auto")
    assert store.snapshot().reserved_mb == 198
    store.set("selfballoon_min_usable_mb", "300")
    store.reset("selfballoon_min_usable_mb")
    assert store.get("selfballoon_min_usable_mb") is None
    assert store.show("selfballoon_min_usable_mb") == "auto"
    store.set("selfballoon_interval", "30")
    store.reset("selfballoon_interval")
    assert store.get("selfballoon_interval") == 5
    assert store.show("selfballooning") == "1"


def test_describe_lists_every_knob_with_value_and_rule() -> None:
    rows = {row["name"]: row for row in KnobStore().describe()}
    assert rows["selfballoon_interval"]["accepted"].startswith("an integer >= 1")
    assert rows["selfballooning"]["accepted"] == "0 or 1"
    assert "auto" in rows["selfballoon_reserved_mb"]["accepted"]
    assert rows["frontswap_hysteresis"]["value"] == 20


def test_initial_values_are_validated_too() -> None:
    with pytest.raises(ParamError):
        KnobStore({"selfballoon_interval": "0"})


def test_kernel_knobs_are_their_own_declarations_not_a_slice_of_the_order() -> None:
    """Adding or moving a declaration must not move a knob between the kernel's and the
    guard's: a knob is the kernel's by the group it is declared in."""
    import xentmem_selfballoon.knobs as knobs_module

    kernel = knobs_module._KERNEL_DECLARATIONS
    guard = knobs_module._GUARD_DECLARATIONS
    assert tuple(p.name for p in kernel) == KERNEL_KNOBS
    assert tuple(SELFBALLOON_PARAMS.values()) == (*kernel, *guard)
    assert set(KERNEL_KNOBS) <= set(SELFBALLOON_PARAMS)
    assert not any(name.startswith("pressure_guard") for name in KERNEL_KNOBS)
    assert all(p.name.startswith("pressure_guard") for p in guard)


def test_the_snapshot_is_derived_from_the_declarations() -> None:
    """One declaration per knob: the snapshot's fields and defaults are the params'."""
    from dataclasses import fields

    from xentmem_selfballoon.knobs import Knobs

    declared = {f.name: f.default for f in fields(Knobs)
                if f.name not in ("auto_reserved_mb", "inertia_writes")}
    assert declared == SELFBALLOON_PARAMS.defaults()


def test_every_write_of_frontswap_inertia_is_counted_even_unchanged() -> None:
    store = KnobStore()
    assert store.snapshot().inertia_writes == 0
    store.set("frontswap_inertia", "3")  # the default, written: still a write
    store.update({"frontswap_inertia": 3, "frontswap_hysteresis": 20})
    store.reset("frontswap_inertia")
    store.set("frontswap_hysteresis", "4")  # another knob: not counted
    with pytest.raises(ParamError):
        store.set("frontswap_inertia", "0")  # refused: changed nothing, counted nothing
    assert store.snapshot().inertia_writes == 3
    assert "inertia_writes" not in store.snapshot().values()


def test_an_update_with_resets_is_one_change() -> None:
    """A reload sets some knobs and puts back those its file no longer names: one snapshot
    (never a mix of old and new), checked whole first, one write of frontswap_inertia."""
    store = KnobStore({"selfballoon_uphysteresis": 4, "frontswap_inertia": 7})
    before = store.snapshot()
    for values, reset in (({"selfballoon_interval": "0"}, ("frontswap_inertia",)),
                          ({"selfballoon_interval": "9"}, ("no_such_knob",))):
        with pytest.raises(ParamError):
            store.update(values, reset=reset)
        with pytest.raises(ParamError):
            store.check(values, reset=reset)
        assert store.snapshot() is before
    knobs = store.update({"selfballoon_downhysteresis": "16"},
                         reset=("selfballoon_uphysteresis", "frontswap_inertia"))
    assert store.snapshot() is knobs
    assert (knobs.selfballoon_downhysteresis, knobs.selfballoon_uphysteresis,
            knobs.frontswap_inertia, knobs.inertia_writes) == (16, 1, 3, 1)
