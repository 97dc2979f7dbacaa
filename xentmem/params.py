"""Module params and knobs, declared once with their type, default, range and help.

A backend (or the shim, or selfballoon) lists its params as a :class:`ParamSet`.  Values come
in as strings (``capacity=64M`` on a command line, ``options zcache ...`` in a config file) or
as typed values (the control socket); :meth:`ParamSet.validate` checks the whole set first and
either returns a complete, typed snapshot or raises :class:`ParamError` naming the param and
what it accepts, so a refused load changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable

from xentmem.errors import ParamError, UnknownParam

_TRUE_WORDS = frozenset({"1", "y", "yes", "true", "on"})
_FALSE_WORDS = frozenset({"0", "n", "no", "false", "off"})


def parse_bool(text: str) -> bool:
    """The kernel's bool param words (``kstrtobool``): 1/0, y/n, on/off, true/false."""
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean")


#: Whitespace ignored around a param's text (a sysfs write ends in a newline); ASCII only.
_SPACE = " \t\n\r\v\f"
_ASCII_DIGITS = "0123456789"


def split_number(text: str, *, signs: str = "+") -> tuple[int, str]:
    """The base-10 number a param's text starts with, and what follows it: ``"64M"`` ->
    ``(64, "M")``.  The one reading of a number for every param (knobs, module params, sizes).

    As ``kstrtoul(buf, 10)`` reads a sysfs write: whitespace around the whole text is ignored,
    then one of ``signs`` may lead (``"+"`` as kstrtoul, ``"+-"`` as kstrtoint, ``""`` as
    memparse), then ASCII digits 0-9.  Nothing is skipped between the number and a unit.
    ``str.isdigit`` and ``int`` also take other scripts' digits (Arabic-Indic, fullwidth):
    those are not numbers here.  ValueError names the text.
    """
    word = text.strip(_SPACE)
    start = 1 if word[:1] and word[:1] in signs else 0
    end = start
    while end < len(word) and word[end] in _ASCII_DIGITS:
        end += 1
    if end == start:
        raise ValueError(f"{text!r} is not a base-10 integer")
    number = int(word[start:end], 10)
    return (-number if word[:1] == "-" else number), word[end:]


def parse_float(text: str) -> float:
    """A whole text that is one finite decimal number in ASCII (``float`` alone would also
    take other scripts' digits, ``inf``, ``nan`` and underscores)."""
    word = text.strip(_SPACE)
    if not word or not word.isascii() or "_" in word or not all(
            c in _ASCII_DIGITS or c in "+-.eE" for c in word):
        raise ValueError(f"{text!r} is not a decimal number")
    return float(word)


def parse_int(text: str, *, signs: str = "+-") -> int:
    """A whole text that is one base-10 integer (:func:`split_number`), nothing after it."""
    number, rest = split_number(text, signs=signs)
    if rest:
        raise ValueError(f"{text!r} is not a base-10 integer")
    return number


@dataclass(frozen=True)
class Param:
    """One tunable: the kernel's name, a Python type, its default and how it may change.

    ``writable`` says whether it may change while loaded (sysfs 0644) or only at load
    (module param 0444).  ``parse`` converts a string for types with their own syntax
    (sizes such as ``64M`` or ``10%``); ``check`` adds a rule beyond min/max/choices.
    A param whose default is ``None`` (an automatic value, such as a knob's ``auto``)
    takes ``None`` too, so a value already read can be checked again.
    """

    name: str
    type: type
    default: Any
    doc: str
    writable: bool = False
    min: int | None = None
    max: int | None = None
    choices: tuple[Any, ...] | None = None
    unit: str = ""
    parse: Callable[[str], Any] | None = None
    accepts: str = ""

    def accepted(self) -> str:
        """Human text of the accepted values, used in every refusal."""
        if self.accepts:
            return self.accepts
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.type is bool:
            return "0 or 1"
        if self.type is int:
            low = "" if self.min is None else f">= {self.min}"
            high = "" if self.max is None else f"<= {self.max}"
            rng = " and ".join(p for p in (low, high) if p)
            return "an integer" + (f" {rng}" if rng else "")
        return f"a {self.type.__name__}"

    def coerce(self, value: Any) -> Any:
        """Turn ``value`` (a string or a typed value) into this param's type, or refuse it."""
        if value is None and self.default is None:
            return None
        try:
            if isinstance(value, str):
                if self.parse is not None:
                    typed = self.parse(value)
                elif self.type is bool:
                    typed = parse_bool(value)
                elif self.type is int:
                    typed = parse_int(value)
                elif self.type is float:
                    typed = parse_float(value)
                else:
                    typed = self.type(value)
            elif self.type is bool:
                if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                    typed = bool(value)
                else:
                    raise ValueError(f"{value!r} is not a boolean")
            elif self.type is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{value!r} is not an integer")
                typed = value
            elif self.type is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{value!r} is not a number")
                typed = float(value)
            elif self.parse is not None and not isinstance(value, self.type):
                typed = self.parse(str(value))
            elif isinstance(value, self.type):
                typed = value
            else:
                raise ValueError(f"{value!r} is not a {self.type.__name__}")
        except (ValueError, TypeError) as exc:
            raise ParamError(f"{self.name}: {exc}; accepted: {self.accepted()}") from None
        self._check_range(typed)
        return typed

    def _check_range(self, typed: Any) -> None:
        if self.choices is not None and typed not in self.choices:
            raise ParamError(f"{self.name}: {typed!r} is not accepted; accepted: {self.accepted()}")
        if isinstance(typed, (int, float)) and not isinstance(typed, bool):
            if self.min is not None and typed < self.min:
                raise ParamError(
                    f"{self.name}: {typed} is out of range; accepted: {self.accepted()}"
                )
            if self.max is not None and typed > self.max:
                raise ParamError(
                    f"{self.name}: {typed} is out of range; accepted: {self.accepted()}"
                )

    def describe(self) -> dict[str, Any]:
        """A plain dict for ``params list`` and the control socket."""
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "writable": self.writable,
            "accepted": self.accepted(),
            "unit": self.unit,
            "doc": self.doc,
        }


class ParamSet(Mapping[str, Param]):
    """An ordered, immutable set of :class:`Param` declarations."""

    def __init__(self, *params: Param) -> None:
        table: dict[str, Param] = {}
        for param in params:
            if param.name in table:
                raise ValueError(f"param {param.name!r} declared twice")
            table[param.name] = param
        self._params = table

    def __getitem__(self, name: str) -> Param:
        return self._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __add__(self, other: ParamSet) -> ParamSet:
        return ParamSet(*self._params.values(), *other._params.values())

    def defaults(self) -> dict[str, Any]:
        return {name: p.default for name, p in self._params.items()}

    def lookup(self, name: str, *, owner: str = "") -> Param:
        """The param called ``name``, or a ParamError listing the known names."""
        try:
            return self._params[name]
        except KeyError:
            where = f" for {owner}" if owner else ""
            known = ", ".join(self._params) or "none"
            raise UnknownParam(f"unknown param {name!r}{where}; known params: {known}") from None

    def validate(
        self,
        values: Mapping[str, Any],
        *,
        owner: str = "",
        base: Mapping[str, Any] | None = None,
    ) -> Mapping[str, Any]:
        """Check every value, then return ``base`` (or the defaults) with them laid over.

        All values are checked before anything is returned, so one bad value refuses the lot.
        """
        merged = dict(self.defaults() if base is None else base)
        for name, value in values.items():
            merged[name] = self.lookup(name, owner=owner).coerce(value)
        return MappingProxyType(merged)


def parse_assignments(words: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["capacity=64M", "cleancache=0"]`` -> ``{"capacity": "64M", "cleancache": "0"}``."""
    out: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ParamError(f"{word!r} is not of the form name=value")
        out[name.strip()] = value.strip()
    return out
