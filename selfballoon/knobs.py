"""The self-balloon knobs: the kernel's sysfs files, same names, defaults and validation.

Each knob is declared once, below; :data:`SELFBALLOON_PARAMS`, :data:`KERNEL_KNOBS` and the
:class:`Knobs` snapshot are derived from those declarations.  A :class:`KnobStore` swaps the
snapshot whole on every accepted change, so a tick never sees half of an update.  The rules
(``auto``, the pressure guard) are in docs/selfballoon.md.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping
from dataclasses import asdict, field, fields, make_dataclass, replace
from typing import Any, Optional

from xentmem.errors import ParamError
from xentmem.params import Param, ParamSet, parse_int

#: The kernel stores every knob in an ``unsigned int``; larger values were silently truncated.
#: We refuse them instead.
UINT_MAX = 2**32 - 1
AUTO = "auto"


def parse_switch(text: str) -> bool:
    """The kernel's switch stores: ``kstrtoul`` (no sign but ``+``: ``-0`` is refused), then
    exactly 0 or 1."""
    try:
        value = parse_int(text, signs="+")
    except ValueError:
        value = None
    if value not in (0, 1):
        raise ValueError(f"{text!r} is not 0 or 1")
    return value == 1


def parse_count(text: str) -> int:
    """``kstrtoul(buf, 10)``: every param's number reading, with an optional sign.

    A ``-`` is read too, so that a negative count reaches the range check ("out of range")
    instead of being called no number.
    """
    return parse_int(text, signs="+-")


def parse_count_or_auto(text: str) -> int | None:
    """A count, or the word ``auto`` (the automatic value, ``None``)."""
    if text.strip().lower() == AUTO:
        return None
    return parse_count(text)


def _switch(name: str, default: bool, doc: str) -> Param:
    return Param(name, bool, default, doc, writable=True, parse=parse_switch, accepts="0 or 1")


def _count(name: str, default: int, doc: str, unit: str = "") -> Param:
    return Param(
        name, int, default, doc, writable=True, min=1, max=UINT_MAX, unit=unit, parse=parse_count
    )


def _count_or_auto(name: str, doc: str) -> Param:
    return Param(
        name,
        int,
        None,
        doc,
        writable=True,
        min=1,
        max=UINT_MAX,
        unit="MiB",
        parse=parse_count_or_auto,
        accepts=f"an integer >= 1 and <= {UINT_MAX}, or '{AUTO}' for the automatic value",
    )


#: The nine files of ``xen_memory0/selfballoon/`` (``xen-selfballoon.c``), in its order.
_KERNEL_DECLARATIONS = (
    _switch("selfballooning", True,
            "self-ballooning on (1) or off (0); set from the tmem flag selfballooning_at_load at "
            "each load"),
    _count("selfballoon_interval", 5, "seconds between two ticks of the worker", unit="s"),
    _count("selfballoon_downhysteresis", 8,
           "divisor of the excess when shrinking: give back 1/N of it per tick"),
    _count("selfballoon_uphysteresis", 1,
           "divisor of the shortfall when growing: 1 jumps straight to the goal"),
    _count_or_auto("selfballoon_min_usable_mb",
                   "never balloon below totalreserve + this; auto = the kernel's piecewise floor"),
    _count_or_auto("selfballoon_reserved_mb",
                   "added to the goal (room for slab and caches); auto = 10% of RAM at the "
                   "first start"),
    _switch("frontswap_selfshrinking", True,
            "frontswap self-shrinking on (1) or off (0); set from the tmem flag selfshrinking "
            "at each load"),
    _count("frontswap_hysteresis", 20, "shrink frontswap by 1/N per shrink step"),
    _count("frontswap_inertia", 3,
           "ticks of calm frontswap before a shrink step; setting it restarts the countdown"),
)

#: The pressure guard's knobs (:mod:`.guard`): not the kernel's, off by default.
_GUARD_DECLARATIONS = (
    _switch("pressure_guard", False,
            "beyond the kernel: while PSI shows memory stalls, never shrink, grow to the goal"),
    _count("pressure_guard_stall_us_per_s", 10000,
           "stall time per second (PSI 'some') above which the guest counts as stalling",
           unit="us/s"),
    _count("pressure_guard_poll_ms", 1000,
           "how often the guard reads PSI between ticks", unit="ms"),
)

SELFBALLOON_PARAMS = ParamSet(*_KERNEL_DECLARATIONS, *_GUARD_DECLARATIONS)
#: The names the kernel had in sysfs; the group a knob is declared in decides, not its place.
KERNEL_KNOBS = tuple(param.name for param in _KERNEL_DECLARATIONS)


class _KnobsMethods:
    """What a :class:`Knobs` snapshot has beyond its fields."""

    auto_reserved_mb: int
    inertia_writes: int
    selfballoon_reserved_mb: int | None

    @property
    def reserved_mb(self) -> int:
        """The ``selfballoon_reserved_mb`` in force (the automatic value when ``None``)."""
        explicit = self.selfballoon_reserved_mb
        return self.auto_reserved_mb if explicit is None else explicit

    def values(self) -> dict[str, Any]:
        """The knob values by name (``None`` = automatic)."""
        data = asdict(self)  # type: ignore[call-overload]
        for extra in _NOT_KNOBS:
            del data[extra]
        return data


def _knob_field(param: Param) -> tuple[str, Any, Any]:
    # Optional[] and not ``X | None``: this runs at import, on Python 3.9 too.
    kind = param.type if param.default is not None else Optional[param.type]
    return (param.name, kind, field(default=param.default))


#: The snapshot's fields that are not knobs.
_NOT_KNOBS = ("auto_reserved_mb", "inertia_writes")

#: One field per declared knob (same name and default), plus two that are not knobs:
#: ``auto_reserved_mb``, ``reserved_mb``'s automatic value, measured at the first start;
#: ``inertia_writes``, how many times ``frontswap_inertia`` was written, for the loop to
#: restart the shrink countdown on each write as the kernel's store does, even unchanged.
Knobs = make_dataclass(
    "Knobs",
    [*(_knob_field(p) for p in SELFBALLOON_PARAMS.values()),
     ("auto_reserved_mb", int, field(default=0)),
     ("inertia_writes", int, field(default=0))],
    bases=(_KnobsMethods,),
    frozen=True,
    namespace={"__module__": __name__,
               "__doc__": "An immutable snapshot of every knob, as the policy sees it."},
)


def _snapshot(values: Mapping[str, Any], auto_reserved_mb: int, inertia_writes: int = 0) -> Knobs:
    return Knobs(**dict(values), auto_reserved_mb=auto_reserved_mb,
                 inertia_writes=inertia_writes)


def _writes(current: Knobs, written: Any) -> int:
    """``inertia_writes`` after a write of the knobs named in ``written``."""
    return current.inertia_writes + (1 if "frontswap_inertia" in written else 0)


class KnobStore:
    """The knobs in force: validated changes, swapped in whole, readable from any thread."""

    params = SELFBALLOON_PARAMS

    def __init__(self, values: Mapping[str, Any] | None = None, *, auto_reserved_mb: int = 0):
        checked = self.params.validate(dict(values or {}), owner="selfballoon")
        self._lock = threading.Lock()
        self._knobs = _snapshot(checked, auto_reserved_mb)

    def snapshot(self) -> Knobs:
        """The current snapshot; it never changes (a change makes a new one)."""
        return self._knobs

    def get(self, name: str) -> Any:
        """One knob's value (``None`` for automatic); unknown names are a ParamError."""
        self.params.lookup(name, owner="selfballoon")
        return getattr(self._knobs, name)

    def set(self, name: str, value: Any) -> Knobs:
        """Set one knob from a string (``"8"``, ``"auto"``) or a typed value."""
        return self.update({name: value})

    def check(self, values: Mapping[str, Any], *, reset: Collection[str] = ()) -> None:
        """What :meth:`update` would refuse (ParamError), changing nothing: a caller that
        changes other things with these checks them all before changing any."""
        self._merged(self._knobs, values, reset)

    def update(self, values: Mapping[str, Any], *, reset: Collection[str] = ()) -> Knobs:
        """Set several knobs and put those named in ``reset`` back to their default, as one
        change: all are checked first, a refusal changes nothing, and one snapshot is swapped
        in (a tick sees all of it or none).  A name in both is set."""
        with self._lock:
            current = self._knobs
            checked = self._merged(current, values, reset)
            self._knobs = _snapshot(checked, current.auto_reserved_mb,
                                    _writes(current, [*values, *reset]))
            return self._knobs

    def reset(self, name: str) -> Knobs:
        """Back to the default; for the two ``_mb`` knobs that is the automatic value."""
        return self.update({}, reset=(name,))

    def _merged(self, current: Knobs, values: Mapping[str, Any],
                reset: Collection[str]) -> Mapping[str, Any]:
        base = current.values()
        for name in reset:
            base[name] = self.params.lookup(name, owner="selfballoon").default
        return self.params.validate(dict(values), owner="selfballoon", base=base)

    def set_auto_reserved_mb(self, mb: int) -> Knobs:
        """Record ``reserved_mb``'s automatic value (the service does, at its first start)."""
        if mb < 0:
            raise ParamError(f"automatic reserved_mb must be >= 0, got {mb}")
        with self._lock:
            self._knobs = replace(self._knobs, auto_reserved_mb=mb)
            return self._knobs

    def show(self, name: str) -> str:
        """The value as text: the number, or ``auto (N)`` with the value in force."""
        value = self.get(name)
        knobs = self._knobs
        if value is None:
            if name == "selfballoon_reserved_mb":
                return f"{AUTO} ({knobs.auto_reserved_mb})"
            return AUTO
        if isinstance(value, bool):
            return str(int(value))
        return str(value)

    def describe(self) -> list[dict[str, Any]]:
        """Each knob's declaration plus its value, for ``params list`` and the control socket."""
        knobs = self._knobs
        out = []
        for name, param in self.params.items():
            row = param.describe()
            row["value"] = getattr(knobs, name)
            row["shown"] = self.show(name)
            out.append(row)
        return out


def knob_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Knobs) if f.name not in _NOT_KNOBS)
