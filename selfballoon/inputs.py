"""Reading the guest: /proc/meminfo, /proc/zoneinfo, PSI and the balloon driver's sysfs.

Each file has a parser that takes the text and returns a typed value or raises
:class:`InputError` saying what was wrong; the ``read_*`` functions add the path (under an
injectable :class:`~xentmem.roots.Roots`) and turn a missing file into the same error.  The
loop skips a tick on any InputError, so a malformed file never leads to a target being written.

psutil is not used: it has no Committed_AS, zone watermarks or balloon size, and it can only be
pointed at another /proc through a module-wide global, which would break the injected root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xentmem.errors import XentmemError
from xentmem.roots import Roots
from xentmem_selfballoon.policy import BalloonInputs, TickInputs, kb2pages

MEMINFO = "/proc/meminfo"
ZONEINFO = "/proc/zoneinfo"
PSI_MEMORY = "/proc/pressure/memory"
XEN_CAPABILITIES = "/proc/xen/capabilities"

#: Bound on any count we accept (pages or KiB): 2^48 KiB is 256 PiB, far beyond any guest.
_LIMIT = 2**48
#: Files we read are small; refuse anything absurd rather than read it whole.
_MAX_FILE_BYTES = 4 << 20


class InputError(XentmemError, ValueError):
    """A guest file is missing or says something we cannot use; the tick is skipped."""


def _count(untrusted_word: str, what: str) -> int:
    word = untrusted_word.strip()
    if not word.isascii() or not word.isdigit():
        raise InputError(f"{what}: {untrusted_word!r} is not a non-negative integer")
    value = int(word, 10)
    if value >= _LIMIT:
        raise InputError(f"{what}: {value} is implausibly large")
    return value


# -- /proc/meminfo -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemInfo:
    mem_total_kb: int
    committed_as_kb: int

    @property
    def totalram_pages(self) -> int:
        return kb2pages(self.mem_total_kb)

    @property
    def committed_pages(self) -> int:
        return kb2pages(self.committed_as_kb)


def parse_meminfo(untrusted_text: str) -> MemInfo:
    """MemTotal and Committed_AS (KiB) from /proc/meminfo; both must be there exactly once."""
    wanted = {"MemTotal": None, "Committed_AS": None}
    for lineno, line in enumerate(untrusted_text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        key = key.strip()
        if key not in wanted:
            continue
        if not sep:
            raise InputError(f"meminfo line {lineno}: no ':' after {key}")
        words = rest.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] != "kB"):
            raise InputError(f"meminfo line {lineno}: {key} should be '<n> kB', got {rest!r}")
        if wanted[key] is not None:
            raise InputError(f"meminfo: {key} appears twice")
        wanted[key] = _count(words[0], f"meminfo {key}")
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        raise InputError("meminfo: missing " + ", ".join(missing))
    total, committed = wanted["MemTotal"], wanted["Committed_AS"]
    assert total is not None and committed is not None
    if total == 0:
        raise InputError("meminfo: MemTotal is 0")
    return MemInfo(mem_total_kb=total, committed_as_kb=committed)


# -- /proc/zoneinfo ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zone:
    node: int
    name: str
    high: int
    managed: int
    spanned: int
    protection: tuple[int, ...]
    start_pfn: int | None

    @property
    def reserve_pages(self) -> int:
        """This zone's share of ``totalreserve_pages`` (``calculate_totalreserve_pages``).

        The high watermark plus the largest lowmem reserve against higher zones, capped at the
        zone's managed pages.  ``protection:`` lists ``lowmem_reserve[]`` for every zone index;
        entries up to this zone's own index are 0, so the maximum over all is the kernel's
        maximum over ``j >= i``.
        """
        return min(self.managed, self.high + max(self.protection, default=0))


@dataclass(frozen=True)
class ZoneSummary:
    zones: tuple[Zone, ...]

    @property
    def totalreserve_pages(self) -> int:
        return sum(z.reserve_pages for z in self.zones)

    @property
    def max_pfn(self) -> int:
        """The end of the highest zone: ``start_pfn + spanned``.

        The kernel's ``max_pfn`` is not exported; the zones' span is the closest thing in /proc.
        Kernels before 4.13 print no ``start_pfn:``; there the sum of the spans is used.
        """
        ends = [z.start_pfn + z.spanned for z in self.zones if z.start_pfn is not None]
        if ends and len(ends) == len(self.zones):
            return max(ends)
        return sum(z.spanned for z in self.zones)


def _zone_header(line: str) -> tuple[int, str] | None:
    """``Node 0, zone   Normal`` -> ``(0, "Normal")``."""
    if not line.startswith("Node "):
        return None
    head, sep, tail = line.partition(",")
    words = tail.split()
    if not sep or len(words) != 2 or words[0] != "zone":
        raise InputError(f"zoneinfo: bad zone header {line!r}")
    return _count(head[len("Node "):], "zoneinfo node"), words[1]


def _protection(untrusted: str, where: str) -> tuple[int, ...]:
    body = untrusted.strip()
    if not (body.startswith("(") and body.endswith(")")):
        raise InputError(f"zoneinfo {where}: protection should be '(a, b, ...)', got {body!r}")
    inner = body[1:-1].strip()
    if not inner:
        return ()
    return tuple(_count(word, f"zoneinfo {where} protection") for word in inner.split(","))


def parse_zoneinfo(untrusted_text: str) -> ZoneSummary:
    """Each zone's high watermark, managed, spanned, protection and start_pfn.

    Watermarks are lines of exactly two words (``high  49``); the per-cpu ``high:  0`` lines of
    the pagesets have a colon and are not confused with them.  A zone without ``managed``,
    ``high`` or ``protection:`` is an error (the reserve could not be computed right).
    """
    zones: list[Zone] = []
    current: dict[str, object] | None = None

    def finish() -> None:
        if current is None:
            return
        where = f"node {current['node']} zone {current['name']}"
        for key in ("high", "managed", "spanned", "protection"):
            if key not in current:
                raise InputError(f"zoneinfo {where}: no {key!r}")
        zones.append(
            Zone(
                node=current["node"],  # type: ignore[arg-type]
                name=current["name"],  # type: ignore[arg-type]
                high=current["high"],  # type: ignore[arg-type]
                managed=current["managed"],  # type: ignore[arg-type]
                spanned=current["spanned"],  # type: ignore[arg-type]
                protection=current["protection"],  # type: ignore[arg-type]
                start_pfn=current.get("start_pfn"),  # type: ignore[arg-type]
            )
        )

    for line in untrusted_text.splitlines():
        header = _zone_header(line)
        if header is not None:
            finish()
            current = {"node": header[0], "name": header[1]}
            continue
        if current is None:
            if line.strip():
                raise InputError(f"zoneinfo: {line.strip()!r} before the first zone header")
            continue
        where = f"node {current['node']} zone {current['name']}"
        stripped = line.strip()
        if stripped.startswith("protection:"):
            if "protection" in current:
                raise InputError(f"zoneinfo {where}: protection appears twice")
            current["protection"] = _protection(stripped[len("protection:"):], where)
            continue
        if stripped.startswith("start_pfn:"):
            current["start_pfn"] = _count(stripped[len("start_pfn:"):], f"zoneinfo {where}")
            continue
        words = stripped.split()
        if words[:2] == ["pages", "free"] and len(words) == 3:
            continue
        if len(words) == 2 and words[0] in ("high", "managed", "spanned"):
            if words[0] in current:
                raise InputError(f"zoneinfo {where}: {words[0]} appears twice")
            current[words[0]] = _count(words[1], f"zoneinfo {where} {words[0]}")
    finish()
    if not zones:
        raise InputError("zoneinfo: no zones")
    return ZoneSummary(tuple(zones))


# -- /proc/pressure/memory -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pressure:
    some_total_us: int
    full_total_us: int | None
    some_avg10: float


def parse_psi(untrusted_text: str) -> Pressure:
    """The ``some`` (and, if present, ``full``) line of a PSI file, by key, not by position."""
    lines: dict[str, dict[str, str]] = {}
    for line in untrusted_text.splitlines():
        words = line.split()
        if not words:
            continue
        kind = words[0]
        if kind not in ("some", "full"):
            raise InputError(f"psi: unexpected line {line.strip()!r}")
        pairs: dict[str, str] = {}
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep:
                raise InputError(f"psi: {word!r} is not key=value")
            pairs[key] = value
        lines[kind] = pairs
    if "some" not in lines:
        raise InputError("psi: no 'some' line")

    def total(kind: str) -> int:
        if "total" not in lines[kind]:
            raise InputError(f"psi: {kind} line has no total=")
        return _count(lines[kind]["total"], f"psi {kind} total")

    avg_text = lines["some"].get("avg10", "0")
    try:
        avg10 = float(avg_text)
    except ValueError:
        raise InputError(f"psi: avg10={avg_text!r} is not a number") from None
    if not 0.0 <= avg10 <= 100.0:
        raise InputError(f"psi: avg10={avg_text!r} is not a percentage")
    return Pressure(
        some_total_us=total("some"),
        full_total_us=total("full") if "full" in lines else None,
        some_avg10=avg10,
    )


# -- small files -----------------------------------------------------------------------------------


def parse_kb(untrusted_text: str, what: str) -> int:
    """A single number of KiB, as ``info/current_kb`` and ``target_kb`` show it."""
    return _count(untrusted_text, what)


def parse_control_domain(untrusted_text: str) -> bool:
    """``/proc/xen/capabilities`` lists ``control_d`` in dom0 (and only there)."""
    return "control_d" in untrusted_text.replace(",", " ").split()


# -- reading under a root ----------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A whole small file, or an InputError naming it."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise InputError(f"{path}: larger than {_MAX_FILE_BYTES} bytes")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not ASCII text") from None


def _parsed(path: Path, parse):  # type: ignore[no-untyped-def]
    text = read_text(path)
    try:
        return parse(text)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def read_meminfo(roots: Roots) -> MemInfo:
    return _parsed(roots.under(MEMINFO), parse_meminfo)


def read_zoneinfo(roots: Roots) -> ZoneSummary:
    return _parsed(roots.under(ZONEINFO), parse_zoneinfo)


def read_pressure(roots: Roots) -> Pressure:
    return _parsed(roots.under(PSI_MEMORY), parse_psi)


def balloon_current_path(roots: Roots) -> Path:
    return roots.balloon / "info" / "current_kb"


def balloon_target_path(roots: Roots) -> Path:
    return roots.balloon / "target_kb"


def has_balloon_driver(roots: Roots) -> bool:
    """The balloon driver's ``target_kb`` exists (it is the file we would write)."""
    return balloon_target_path(roots).is_file()


def read_balloon_current_kb(roots: Roots) -> int:
    path = balloon_current_path(roots)
    return _parsed(path, lambda text: parse_kb(text, "current_kb"))


def is_control_domain(roots: Roots) -> bool:
    """True in dom0.  No xenfs (no capabilities file) reads as "not dom0"."""
    path = roots.under(XEN_CAPABILITIES)
    try:
        return parse_control_domain(read_text(path))
    except InputError:
        if path.exists():
            raise
        return False


@dataclass(frozen=True)
class GuestReading:
    """One reading of everything the balloon step needs."""

    meminfo: MemInfo
    zones: ZoneSummary
    balloon_current_kb: int | None  # None: no balloon driver (report-only mode)

    def balloon_inputs(self, frontswap_pages: int) -> BalloonInputs:
        current = self.balloon_current_kb
        return BalloonInputs(
            committed_pages=self.meminfo.committed_pages,
            totalram_pages=self.meminfo.totalram_pages,
            totalreserve_pages=self.zones.totalreserve_pages,
            max_pfn=self.zones.max_pfn,
            balloon_current_pages=None if current is None else kb2pages(current),
            frontswap_pages=frontswap_pages,
        )


#: Tries at reading ``current_kb`` unchanged around /proc/meminfo before the last try is used.
STILL_READS = 5


def read_guest(roots: Roots) -> GuestReading:
    """meminfo, zoneinfo and, when the balloon driver is there, its current size.

    ``current_kb`` is read before and after /proc/meminfo until both agree: the offset
    current_kb - MemTotal that carries a target into balloon terms is only right when both
    describe the same balloon, and on a slow guest the driver moves pages between two reads
    (a target written from a skewed offset undershot the floor by 1012 kB in the real-Xen bed).
    """
    driver = has_balloon_driver(roots)
    for _ in range(STILL_READS):
        before = read_balloon_current_kb(roots) if driver else None
        meminfo = read_meminfo(roots)
        current = read_balloon_current_kb(roots) if driver else None
        if current == before:
            break
    zones = read_zoneinfo(roots)
    return GuestReading(meminfo=meminfo, zones=zones, balloon_current_kb=current)


def read_tick_inputs(
    roots: Roots, *, frontswap_pages: int, now: float, psi_some_total_us: int | None
) -> TickInputs:
    """Everything one tick decides on (PSI is read separately: it is optional)."""
    if frontswap_pages < 0:
        raise InputError(f"frontswap curr_pages is negative: {frontswap_pages}")
    reading = read_guest(roots)
    return TickInputs(
        balloon=reading.balloon_inputs(frontswap_pages),
        now=now,
        psi_some_total_us=psi_some_total_us,
    )
