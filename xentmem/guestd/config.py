"""The daemon's configuration: one file (TOML, or ``modprobe.d``-style lines), checked whole.

The file's extension picks the spelling (``*.toml``, else ``options <module> key=value``
lines); every value is checked against the real :class:`~xentmem.params.ParamSet` it sets,
and the first bad one refuses the whole file with a :class:`~xentmem.errors.ConfigError`
naming file, line, section and key.  :func:`layer` lays command-line ``-o`` overrides over
the file.  Spellings, sections and precedence: ``docs/configuration.md``.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from xentmem.control.protocol import MAX_AREA_PAGES, SWAP_BACKINGS
from xentmem.control.server import DEFAULT_IDLE_TIMEOUT_S
from xentmem.errors import AbiError, ConfigError, ParamError, XentmemError
from xentmem.guest.shim import SHIM_PARAMS
from xentmem.guestd.swap import check_path_text
from xentmem.params import Param, ParamSet, parse_assignments
from xentmem_selfballoon.service import LOAD_FLAGS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.9/3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "/etc/xentmem/xentmem.toml"
DAEMON_SECTION = "daemon"
DAEMON_MODULE = "xentmemd"  # the module name of the [daemon] section in modprobe form
TMEM_SECTION = "tmem"
KNOB_SECTION = "selfballoon"
#: ``Config.backend_params`` key for ``-o name=value`` that named no shim flag or knob: it is
#: meant for whichever backend gets loaded, and is checked against that backend at load.
ANY_BACKEND = "*"
LOG_LEVELS = ("debug", "info", "warning", "error")


#: Where a setting came from, as ``params list``, ``status`` and the log say it (besides
#: ``file:line``, which names the config file's line).
FROM_COMMAND_LINE = "command line"  # xentmemd's flags and -o words
FROM_KERNEL = "kernel command line"
FROM_DEFAULT = "default"
FROM_AUTO = "auto"  # the automatic value (a knob's "auto", or backend "auto")
FROM_LOAD = "load request"  # xentmem load NAME name=value
FROM_RUN_TIME = "params set"  # changed at run time over the socket


#: Permission bits for "others": the control socket serves the page API and params.set, so
#: it is owner-only, or owner and one group, never every local user.
WORLD_BITS = 0o007


def check_control_mode(mode: int) -> int:
    """``mode`` if it gives nothing to other users; ValueError otherwise."""
    if mode & WORLD_BITS:
        raise ValueError(f"{mode:04o} opens the control socket to every local user; use "
                         "owner and group bits only (0600, or 0660 with control_group)")
    return mode


def parse_mode(text: str) -> int:
    """A permission mode in octal text (``"0660"``, ``"660"``), without bits for others."""
    word = text.strip()
    if not word or any(c not in "01234567" for c in word):
        raise ValueError(f"{text!r} is not an octal mode")
    return check_control_mode(int(word, 8))


def parse_loopback(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``; port 0 picks a free one) on a loopback address;
    ValueError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if not loopback:
        raise ValueError(f"{host} is not a loopback address: NBD is served to this machine "
                         "only")
    return host, int(port)


DAEMON_PARAMS = ParamSet(
    Param("backend", str, "auto", "the backend to load at start: auto (xen when this is a Xen "
          "guest with a reachable tmem host, else zcache), or a backend's name"),
    Param("log_level", str, "info", "least severe level logged", choices=LOG_LEVELS,
          writable=True),
    Param("control_group", str, "", "group allowed on the control socket (mode 0660); empty: "
          "owner only", writable=True),
    Param("control_mode", int, 0, "the control socket's mode in octal; 0: 0600, or 0660 with a "
          "group", writable=True, min=0, max=0o777, parse=parse_mode,
          accepts="an octal mode such as 0600 or 0660, no bits for others (0: automatic)"),
    Param("control_idle_timeout", int, DEFAULT_IDLE_TIMEOUT_S, "seconds a control connection "
          "may stay silent between requests before the daemon closes it (clients reconnect by "
          "themselves)",
          writable=True, min=1, max=3600, unit="s"),
    Param("metrics_textfile", str, "", "node_exporter textfile to write the metrics to "
          "(atomically); empty: none", writable=True),
    Param("metrics_interval", int, 15, "seconds between two writes of the metrics textfile",
          writable=True, min=1, max=3600, unit="s"),
    Param("nbd_tcp", str, "", "also serve the NBD exports over TCP at HOST:PORT, a loopback "
          "address only (127.0.0.1:10809, [::1]:10809); empty: the Unix socket nbd.sock in "
          "the run directory only"),
    Param("nbd_swap_mib", int, 0, "swap to attach when the service starts (`xentmem swap "
          "start`, the unit's ExecStartPost=): an export of this many MiB, as swap; 0: none",
          min=0, max=MAX_AREA_PAGES * 4096 >> 20, unit="MiB"),
    Param("nbd_swap_backing", str, "file", "where that swap puts the pages tmem refuses, as "
          "`xentmem swap add --backing`: file (a file the daemon names in its state "
          "directory), memory, or the absolute path of a new file",
          accepts="file, memory, or an absolute path"),
)


def _check_daemon_value(key: str, typed: Any) -> None:
    """Rules a Param's range cannot say (a TOML integer bypasses ``parse_mode``)."""
    if key == "nbd_tcp" and typed:
        try:
            parse_loopback(typed)
        except ValueError as exc:
            raise ParamError(f"{key}: {exc}") from None
    if key == "nbd_swap_backing" and typed not in SWAP_BACKINGS:
        try:
            check_path_text(typed)
        except AbiError as exc:
            raise ParamError(f"{key}: {exc} (or one of {', '.join(SWAP_BACKINGS)})") \
                from None
    if key == "control_mode":
        try:
            check_control_mode(typed)
        except ValueError as exc:
            raise ParamError(f"{key}: {exc}") from None


@dataclass(frozen=True)
class Config:
    """A checked configuration: typed values by section, and where each came from."""

    path: Path | None = None
    daemon: Mapping[str, Any] = field(default_factory=DAEMON_PARAMS.defaults)
    #: Only the shim flags the file (or -o) names; the rest come from boot params/defaults.
    tmem: Mapping[str, Any] = field(default_factory=dict)
    #: Backend name -> the params named for it (typed), plus ANY_BACKEND -> raw -o values.
    backend_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Only the knobs named; unnamed knobs keep their defaults.
    knobs: Mapping[str, Any] = field(default_factory=dict)
    #: ``"section.key"`` -> ``"file:line"`` or :data:`FROM_COMMAND_LINE`.
    origins: Mapping[str, str] = field(default_factory=dict)
    #: What was accepted but deserves a word (a key set on two lines: both named).
    warnings: tuple[str, ...] = ()

    @property
    def backend(self) -> str:
        return str(self.daemon["backend"])

    def origin(self, section: str, key: str) -> str | None:
        """``file:line`` or :data:`FROM_COMMAND_LINE` for a key the file or a flag set, else
        None.  ``section`` is daemon, tmem, selfballoon or a backend's name (a flag meant
        for whichever backend loads counts for every backend)."""
        return self.origins.get(f"{section}.{key}") or (
            self.origins.get(f"{ANY_BACKEND}.{key}")
            if section not in (DAEMON_SECTION, TMEM_SECTION, KNOB_SECTION) else None)

    def load_params(self, backend_name: str) -> dict[str, Any]:
        """The explicit params of a load of ``backend_name``: shim flags + that backend's."""
        values: dict[str, Any] = dict(self.tmem)
        values.update(self.backend_params.get(backend_name, {}))
        values.update(self.backend_params.get(ANY_BACKEND, {}))
        return values


BackendParams = Callable[[str], ParamSet]
"""Name -> the backend's ParamSet; raises ParamError/BackendError for an unknown backend."""
BackendNames = Callable[[], Iterable[str]]
"""The names of the installed backends (the registry's entry points)."""


@dataclass
class _Entry:
    section: str  # daemon | tmem | selfballoon | backend name
    key: str
    value: Any
    where: str  # "file:line" or FROM_COMMAND_LINE


class ConfigSchema:
    """The ParamSets a config is checked against: daemon, shim, knobs and every backend.

    With ``backend_names``, an unqualified ``-o`` name that is no shim flag, knob or daemon
    setting (kept for "whichever backend gets loaded") is checked too: some backend that may
    be loaded (the named one, or with ``auto`` any installed one) must declare it and accept
    the value, so a typo is refused by ``--check-config`` and at start, not at load.
    """

    def __init__(self, knob_params: ParamSet, backend_params: BackendParams,
                 backend_names: BackendNames | None = None) -> None:
        self.knob_params = knob_params
        self._backend_params = backend_params
        self._backend_names = backend_names

    def section_params(self, section: str) -> ParamSet:
        if section == DAEMON_SECTION:
            return DAEMON_PARAMS
        if section == TMEM_SECTION:
            return SHIM_PARAMS
        if section == KNOB_SECTION:
            return self.knob_params
        try:
            return self._backend_params(section)
        except XentmemError as exc:
            raise ParamError(str(exc)) from None

    def check(self, entries: list[_Entry], path: Path | None) -> Config:
        daemon: dict[str, Any] = dict(DAEMON_PARAMS.defaults())
        tmem: dict[str, Any] = {}
        knobs: dict[str, Any] = {}
        backends: dict[str, dict[str, Any]] = {}
        origins: dict[str, str] = {}
        warnings: list[str] = []
        for entry in entries:
            try:
                if entry.section == ANY_BACKEND:
                    typed = entry.value  # checked against the backend chosen at load
                else:
                    params = self.section_params(entry.section)
                    typed = params.lookup(entry.key, owner=entry.section).coerce(entry.value)
                    if entry.section == DAEMON_SECTION:
                        _check_daemon_value(entry.key, typed)
                    if entry.section == KNOB_SECTION and entry.key in LOAD_FLAGS:
                        flag = LOAD_FLAGS[entry.key]
                        raise ParamError(
                            f"{entry.key}: takes the tmem flag {flag}'s value at each load; "
                            f"set that instead ([tmem] {flag}, options tmem {flag}=0, "
                            f"-o {flag}=0), or `xentmem params set {entry.key}` at run time")
            except ParamError as exc:
                # ParamError messages name the key already ("capacity: ...", "unknown param").
                raise ConfigError(f"{entry.where}: [{entry.section}] {exc}") from None
            if entry.section == DAEMON_SECTION:
                daemon[entry.key] = typed
            elif entry.section == TMEM_SECTION:
                tmem[entry.key] = typed
            elif entry.section == KNOB_SECTION:
                knobs[entry.key] = typed
            else:
                backends.setdefault(entry.section, {})[entry.key] = typed
            origin_key = f"{entry.section}.{entry.key}"
            if origin_key in origins and entry.where != FROM_COMMAND_LINE:
                warnings.append(_duplicate_warning(entry, origins[origin_key]))
            origins[origin_key] = entry.where
        if daemon["backend"] != "auto":
            try:
                self._backend_params(daemon["backend"])
            except XentmemError as exc:
                where = origins.get("daemon.backend", "config")
                raise ConfigError(f"{where}: [daemon] backend: {exc}") from None
        self._check_any_backend(backends.get(ANY_BACKEND, {}), daemon["backend"], origins)
        return Config(path=path, daemon=daemon, tmem=tmem, backend_params=backends, knobs=knobs,
                      origins=origins, warnings=tuple(warnings))


    def _check_any_backend(self, values: Mapping[str, Any], backend: str,
                           origins: Mapping[str, str]) -> None:
        """Refuse ``-o`` names meant for a backend that no backend that may load declares,
        or whose value every backend declaring it refuses."""
        if not values or self._backend_names is None:
            return
        candidates = [backend] if backend != "auto" else list(self._backend_names())
        sets: dict[str, ParamSet] = {}
        for name in candidates:
            try:
                sets[name] = self._backend_params(name)
            except (XentmemError, LookupError):  # not importable here: it cannot load either
                continue
        for key, value in values.items():
            where = origins.get(f"{ANY_BACKEND}.{key}", FROM_COMMAND_LINE)
            declaring = {name: params[key] for name, params in sets.items() if key in params}
            if not declaring:
                which = (f"the backend {backend!r}" if backend != "auto" else
                         "any installed backend (" + (", ".join(sets) or "none") + ")")
                raise ConfigError(f"{where}: {key}: unknown name: not a shim flag, knob or "
                                  f"daemon setting, nor a param of {which}")
            refusals = []
            for name, param in declaring.items():
                try:
                    param.coerce(value)
                except ParamError as exc:
                    refusals.append(f"[{name}] {exc}")
                else:
                    break
            else:
                raise ConfigError(f"{where}: " + "; ".join(refusals))


def _duplicate_warning(entry: _Entry, earlier: str) -> str:
    """Two lines set one key: the later wins, as modprobe's would; say both places."""
    module = DAEMON_MODULE if entry.section == DAEMON_SECTION else entry.section
    return (f"{entry.where}: [{module}] {entry.key} is set again (first at {earlier}); "
            f"the value at {entry.where} wins")


# -- reading files ------------------------------------------------------------------------------

def read_config(path: Path, schema: ConfigSchema, *, missing_ok: bool = False) -> Config:
    """Read and check one file.  A missing file is an error unless ``missing_ok``."""
    try:
        untrusted_text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return schema.check([], None)
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if path.suffix == ".toml":
        entries = toml_entries(untrusted_text, str(path))
    else:
        entries = modprobe_entries(untrusted_text, str(path))
    config = schema.check(entries, path)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    return config


def _toml_key_line(text: str, table: tuple[str, ...], key: str) -> int | None:
    """The line where ``key`` is set inside ``[table]`` (tomllib keeps no positions)."""
    current: tuple[str, ...] = ()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]") and not line.startswith("[["):
            current = tuple(p.strip().strip('"').strip("'") for p in line[1:-1].split("."))
            if current == (*table, key):  # the key names a table: its header line
                return number
            continue
        name, sep, _ = line.partition("=")
        if sep and current == table and name.strip().strip('"').strip("'") == key:
            return number
    return None


def toml_entries(untrusted_text: str, where: str) -> list[_Entry]:
    """The entries of a TOML config; ConfigError on a syntax error or a misplaced table."""
    try:
        untrusted = tomllib.loads(untrusted_text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None

    def at(table: tuple[str, ...], key: str) -> str:
        line = _toml_key_line(untrusted_text, table, key)
        return f"{where}:{line}" if line is not None else where

    entries: list[_Entry] = []
    for top, untrusted_table in untrusted.items():
        if top == "backend":
            if not isinstance(untrusted_table, dict):
                raise ConfigError(f"{at((), top)}: 'backend' must be a table of "
                                  "[backend.<name>] tables")
            for name, untrusted_params in untrusted_table.items():
                if not isinstance(untrusted_params, dict):
                    raise ConfigError(
                        f"{at(('backend',), name)}: [backend] {name}: expected a "
                        f"[backend.{name}] table of params (the backend to load is "
                        "[daemon] backend)")
                for key, value in untrusted_params.items():
                    entries.append(_Entry(name, key, _scalar(value, at(("backend", name), key),
                                                             f"backend.{name}", key),
                                          at(("backend", name), key)))
            continue
        if top not in (DAEMON_SECTION, TMEM_SECTION, KNOB_SECTION):
            raise ConfigError(f"{at((), top)}: unknown table or key {top!r}; known tables: "
                              "[daemon], [tmem], [backend.<name>], [selfballoon]")
        if not isinstance(untrusted_table, dict):
            raise ConfigError(f"{at((), top)}: {top!r} must be a table ([{top}])")
        for key, value in untrusted_table.items():
            entries.append(_Entry(top, key, _scalar(value, at((top,), key), top, key),
                                  at((top,), key)))
    return entries


def _scalar(untrusted: Any, where: str, section: str, key: str) -> Any:
    if isinstance(untrusted, (str, int, float, bool)):
        return untrusted
    raise ConfigError(f"{where}: [{section}] {key}: expected a string, number or boolean, "
                      f"got {type(untrusted).__name__}")


def modprobe_entries(untrusted_text: str, where: str) -> list[_Entry]:
    """The entries of ``options <module> key=value ...`` lines; other directives are refused."""
    entries: list[_Entry] = []
    pending = ""
    start = 0
    lines = untrusted_text.splitlines()
    for number, raw in enumerate(lines, start=1):
        if not pending:
            start = number
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            if number < len(lines):
                continue
            line = ""
        line = (pending + line).split("#", 1)[0].strip()
        pending = ""
        if not line:
            continue
        words = line.split()
        here = f"{where}:{start}"
        if words[0] != "options":
            raise ConfigError(f"{here}: {words[0]!r}: only 'options <module> key=value ...' "
                              "lines are understood")
        if len(words) < 2:
            raise ConfigError(f"{here}: 'options' needs a module name")
        module = words[1]
        section = DAEMON_SECTION if module == DAEMON_MODULE else module
        for word in words[2:]:  # one at a time: a key given twice on a line is seen twice
            try:
                assignments = parse_assignments([word])
            except ParamError as exc:
                raise ConfigError(f"{here}: [{module}] {exc}") from None
            for key, value in assignments.items():
                entries.append(_Entry(section, key, value, here))
    return entries


# -- command-line overrides ---------------------------------------------------------------------

def override_entries(words: list[str] | tuple[str, ...], knob_params: ParamSet) -> list[_Entry]:
    """``-o [section.]name=value`` words.  Unqualified names: a shim flag, a knob, else a param
    of whichever backend is loaded (checked at load)."""
    entries: list[_Entry] = []
    try:
        assignments = parse_assignments(words)
    except ParamError as exc:
        raise ConfigError(f"-o: {exc}") from None
    for name, value in assignments.items():
        section, dot, key = name.rpartition(".")
        if dot:
            section = DAEMON_SECTION if section == DAEMON_MODULE else section
        elif key in SHIM_PARAMS:
            section = TMEM_SECTION
        elif key in knob_params:
            section = KNOB_SECTION
        elif key in DAEMON_PARAMS:
            section = DAEMON_SECTION
        else:
            section = ANY_BACKEND
        entries.append(_Entry(section, key, value, FROM_COMMAND_LINE))
    return entries


def layer(base: Config, overrides: Config) -> Config:
    """``overrides`` (from -o) laid over ``base`` (from the file), section by section."""
    daemon = dict(base.daemon)
    daemon.update({k: v for k, v in overrides.daemon.items()
                   if f"{DAEMON_SECTION}.{k}" in overrides.origins})
    backends = {name: dict(values) for name, values in base.backend_params.items()}
    for name, values in overrides.backend_params.items():
        backends.setdefault(name, {}).update(values)
    return Config(
        path=base.path,
        daemon=daemon,
        tmem={**base.tmem, **overrides.tmem},
        backend_params=backends,
        knobs={**base.knobs, **overrides.knobs},
        origins={**base.origins, **overrides.origins},
        warnings=base.warnings + overrides.warnings,
    )


def load(path: Path, schema: ConfigSchema, overrides: list[str] | tuple[str, ...] = (),
         *, missing_ok: bool = False) -> Config:
    """Read the file and lay the ``-o`` overrides over it: the config the daemon runs with."""
    from_file = read_config(path, schema, missing_ok=missing_ok)
    from_flags = schema.check(override_entries(overrides, schema.knob_params), None)
    return layer(from_file, from_flags)
