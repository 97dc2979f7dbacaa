"""The counters and balloon figures in the Prometheus text exposition format (0.0.4).

Served by the daemon's ``metrics`` op and, optionally, written as a node_exporter textfile
(``[daemon] metrics_textfile``) so dom0 and fleet dashboards can watch guests.  Every name
starts with ``xentmem_``; frontends and backends are labels, so a dashboard can sum or split.

:func:`collect` turns plain dicts (what the shim, the swap areas and the balloon service
already report) into :class:`Family` objects; :func:`render` writes them out; neither does I/O.
:func:`write_textfile` replaces the file atomically, as node_exporter requires (a reader never
sees half a file).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xentmem.files import write_atomically
from xentmem.tmem.abi import PAGE_SIZE

PREFIX = "xentmem_"
KIB = 1024

#: Cleancache debugfs counters (always increasing).
CLEANCACHE_EVENTS = ("succ_gets", "failed_gets", "puts", "invalidates", "failed_puts")
#: Frontswap counters (always increasing); ``curr_pages`` is a level and exported apart.
FRONTSWAP_EVENTS = ("loads", "succ_stores", "failed_stores", "invalidates", "failed_loads",
                    "repatriated", "backing_writes")
#: Balloon figures in pages, exported in bytes (Prometheus base units).
BALLOON_PAGE_FIGURES = {
    "cur_pages": ("current_bytes", "memory the guest has now (totalram), bytes"),
    "committed_pages": ("committed_bytes", "Committed_AS at the last tick, bytes"),
    "goal_pages": ("goal_bytes", "the balloon goal (committed + frontswap + reserve), bytes"),
    "floor_pages": ("floor_bytes", "the floor the balloon never goes below, bytes"),
    "target_pages": ("target_bytes", "the target of the last tick (totalram terms), bytes"),
}
BALLOON_COUNTERS = ("ticks", "guard_ticks", "errors", "publish_errors", "target_drifts")


@dataclass
class Family:
    """One metric name: its help, its type and its samples (labels -> value)."""

    name: str
    kind: str  # counter | gauge | untyped
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        self.samples.append((labels, value))
        return self


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _safe_name(text: str) -> str:
    """A label-free metric name part: letters, digits and underscores only."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)


def render(families: Iterable[Family]) -> str:
    """The text format: ``# HELP``, ``# TYPE`` and the samples of each family, in order."""
    lines: list[str] = []
    for family in families:
        if not family.samples:
            continue
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            if labels:
                body = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
                lines.append(f"{family.name}{{{body}}} {_number(value)}")
            else:
                lines.append(f"{family.name} {_number(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def collect(
    *,
    backend: str | None,
    stats: Mapping[str, Any],
    balloon: Mapping[str, Any],
    swap_areas: Iterable[Mapping[str, Any]] = (),
    uptime_s: float | None = None,
    nbd_exports: Iterable[Mapping[str, Any]] = (),
) -> list[Family]:
    """Families from the shim's ``stats()``, the balloon figures, the swap areas and the NBD
    exports' counters."""
    backend_label = backend or "none"
    families: list[Family] = []

    up = Family(PREFIX + "backend_loaded", "gauge",
                "1 while a backend is loaded, by backend name")
    up.add(1 if backend else 0, backend=backend_label)
    families.append(up)
    if uptime_s is not None:
        families.append(Family(PREFIX + "daemon_uptime_seconds", "gauge",
                               "seconds since xentmemd started").add(uptime_s))

    events = Family(PREFIX + "frontend_events_total", "counter",
                    "tmem frontend events since the daemon started (debugfs names)")
    for frontend, names in (("cleancache", CLEANCACHE_EVENTS), ("frontswap", FRONTSWAP_EVENTS)):
        counters = stats.get(frontend) or {}
        for event in names:
            if event in counters:
                events.add(counters[event], frontend=frontend, event=event)
    families.append(events)

    frontswap = stats.get("frontswap") or {}
    if "curr_pages" in frontswap:
        families.append(Family(PREFIX + "frontswap_tmem_pages", "gauge",
                               "swap pages held by tmem now (frontswap_curr_pages)")
                        .add(frontswap["curr_pages"], backend=backend_label))

    for key, detailed in (("backend", "0"), ("backend_detailed", "1")):
        values = stats.get(key) or {}
        if not values:
            continue
        family = Family(PREFIX + "backend_stat" + ("_detailed" if detailed == "1" else ""),
                        "untyped", "the backend's own "
                        + ("detailed " if detailed == "1" else "") + "counters and levels, "
                        "by the backend's names")
        texts = Family(PREFIX + "backend_text" + ("_detailed" if detailed == "1" else ""),
                       "gauge", "the backend's text figures (a RAMster node id) as the text "
                       "label; always 1")
        for name, value in sorted(values.items()):
            if isinstance(value, (int, float)):
                family.add(value, backend=backend_label, stat=_safe_name(name))
            elif isinstance(value, str):
                texts.add(1, backend=backend_label, stat=_safe_name(name), text=value)
        families.append(family)
        if texts.samples:
            families.append(texts)

    area_pages = Family(PREFIX + "swap_area_pages", "gauge",
                        "slots of each swap area made through the control socket")
    area_used = Family(PREFIX + "swap_area_used_pages", "gauge",
                       "slots of each swap area that hold a page in the backing store")
    area_tmem = Family(PREFIX + "swap_area_tmem_pages", "gauge",
                       "pages of each swap area held by tmem")
    for area in swap_areas:
        labels = {"type": str(area.get("type")), "backing": str(area.get("kind", ""))}
        area_pages.add(area.get("pages", 0), **labels)
        area_used.add(area.get("used", 0), **labels)
        area_tmem.add(area.get("tmem_pages", 0), **labels)
    families.extend((area_pages, area_used, area_tmem))

    nbd = Family(PREFIX + "nbd_events_total", "counter",
                 "each NBD export's requests, pages and errors since it was made "
                 "(write_errors: a page neither tmem nor the backing store took, an I/O "
                 "error for the kernel)")
    for export in nbd_exports:
        for event, value in sorted((export.get("counts") or {}).items()):
            nbd.add(value, export=str(export.get("name")), event=_safe_name(event))
    families.append(nbd)

    families.extend(_balloon_families(balloon))
    return families


def _balloon_families(balloon: Mapping[str, Any]) -> list[Family]:
    families = [
        Family(PREFIX + "balloon_running", "gauge",
               "1 while the self-balloon worker runs").add(1 if balloon.get("running") else 0)
    ]
    if balloon.get("report_only") is not None:
        families.append(Family(PREFIX + "balloon_report_only", "gauge",
                               "1 when there is no balloon driver: targets are only reported")
                        .add(1 if balloon.get("report_only") else 0))
    for key, (suffix, text) in BALLOON_PAGE_FIGURES.items():
        if isinstance(balloon.get(key), int):
            families.append(Family(PREFIX + "balloon_" + suffix, "gauge", text)
                            .add(balloon[key] * PAGE_SIZE))
    if isinstance(balloon.get("target_kb"), int):
        families.append(Family(PREFIX + "balloon_driver_target_bytes", "gauge",
                               "the balloon driver's target_kb of the last tick, bytes")
                        .add(balloon["target_kb"] * KIB))
    counters = balloon.get("counters") or {}
    loop = Family(PREFIX + "balloon_loop_events_total", "counter",
                  "self-balloon worker events (ticks, guard ticks, errors...)")
    for name in BALLOON_COUNTERS:
        if isinstance(counters.get(name), int):
            loop.add(counters[name], event=name)
    families.append(loop)
    return families


def write_textfile(path: Path, text: str) -> None:
    """Write a node_exporter textfile (``*.prom``); a reader never sees half of it."""
    write_atomically(path, text.encode("utf-8"), 0o644)
