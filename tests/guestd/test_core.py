"""The daemon core in process: backend choice, params by section, reload, shutdown order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.errors import (
    BackendError,
    BackendUnsupported,
    ConfigError,
    ParamError,
)
from xentmem.guest.backend import Backend
from xentmem.guestd.choice import choose_backend
from xentmem.guestd.core import UnknownName
from xentmem.guestd.swap import read_swap_area
from xentmem.params import Param, ParamSet
from xentmem.roots import Roots
from xentmem_selfballoon.knobs import KnobStore

PAGE = 4096


class FakeXen(RecordingBackend):
    """Stands in for the xen backend: its probe decides whether ``auto`` picks it."""

    name: ClassVar[str] = "xen"
    reachable = False

    @classmethod
    def probe(cls, roots: Roots) -> None:
        if not cls.reachable:
            raise BackendUnsupported("not a Xen guest (no /proc/xen)")


def test_auto_prefers_xen_when_its_probe_passes(tmp_path: Path) -> None:
    from xentmem.guest.backends.zcache import ZcacheBackend

    table: dict[str, type[Backend]] = {"xen": FakeXen, "zcache": ZcacheBackend}
    roots = Roots(root=tmp_path)
    FakeXen.reachable = False
    choice = choose_backend("auto", roots, table.__getitem__)
    assert choice.chosen == "zcache"
    assert "not a Xen guest" in choice.reason
    FakeXen.reachable = True
    try:
        choice = choose_backend("auto", roots, table.__getitem__)
    finally:
        FakeXen.reachable = False
    assert choice.chosen == "xen" and choice.backend_class is FakeXen
    assert choose_backend("zcache", roots, table.__getitem__, "/etc/x.conf:2").reason == \
        "named in /etc/x.conf:2"
    assert choose_backend("zcache", roots, table.__getitem__, "command line").reason == \
        "named in the command line"


def test_auto_with_nothing_usable_is_an_error(tmp_path: Path) -> None:
    def resolve(name: str) -> type[Backend]:
        if name == "xen":
            return FakeXen
        raise ParamError(f"unknown backend {name!r}")

    with pytest.raises(BackendError, match="auto: no backend can run here"):
        choose_backend("auto", Roots(root=tmp_path), resolve)


class Picky(RecordingBackend):
    """Two writable params; ``zeta=13`` passes validation but fails when applied."""

    name: ClassVar[str] = "picky"
    params = RecordingBackend.params + ParamSet(
        Param("alpha", int, 1, "applied first", writable=True, min=0),
        Param("zeta", int, 1, "applied second", writable=True, min=0),
    )

    def apply_param(self, name: str, value: Any) -> None:
        if name == "zeta" and value == 13:
            raise ParamError("zeta: 13 cannot be applied now")


def test_a_named_backend_that_cannot_run_is_refused_and_nothing_is_loaded(make_daemon) -> None:
    daemon = make_daemon(None, backends={"xen": FakeXen})
    with pytest.raises(BackendUnsupported, match="not a Xen guest"):
        daemon.load("xen")
    assert daemon.shim.backend is None and daemon.choice is None


def test_params_by_section(make_daemon) -> None:
    daemon = make_daemon(None, backends={"recording": RecordingBackend})
    with pytest.raises(UnknownName, match="no backend is loaded"):
        daemon.param_set("label", "x")
    daemon.load("recording", {"selfballooning_at_load": 0, "selfshrinking": 0})
    rows = {(r["section"], r["name"]): r for r in daemon.params_list()}
    assert rows[("tmem", "selfballooning_at_load")]["value"] is False
    assert rows[("tmem", "selfballooning_at_load")]["writable"] is False
    assert ("tmem", "selfballooning") not in rows  # one name for one thing
    assert rows[("backend", "label")]["writable"] is True
    assert rows[("selfballoon", "selfballooning")]["writable"] is True
    assert daemon.param_set("selfballooning", "0")["section"] == "selfballoon"
    with pytest.raises(ParamError, match="read-only"):
        daemon.param_set("selfballooning_at_load", 1)
    assert daemon.param_get("tmem.selfballooning_at_load")["value"] is False
    assert daemon.param_set("recording.label", "new") == {
        "name": "label", "section": "backend", "value": "new", "previous": "rec"}
    assert daemon.param_get("backend.label")["value"] == "new"
    with pytest.raises(ParamError, match="read-only once recording is loaded"):
        daemon.param_set("max_pools", 3)
    with pytest.raises(UnknownName, match="unknown param section"):
        daemon.param_get("zcache.capacity")
    # "tmem." names the shim's flags only: a backend param under it is unknown, unchanged
    # (it was once set on the backend, then answered as unknown).
    with pytest.raises(UnknownName, match=r"tmem\.label"):
        daemon.param_set("tmem.label", "other")
    assert daemon.param_get("label")["value"] == "new"


RELOAD_BEFORE = """\
[backend.picky]
alpha = 2
zeta = 2
max_pools = 8

[selfballoon]
selfballoon_interval = 6
frontswap_inertia = 4
"""


def test_reload_applies_changes_and_names_what_needs_a_reload(make_daemon, tmp_path: Path
                                                              ) -> None:
    settings: list[dict[str, Any]] = []
    daemon = make_daemon(RELOAD_BEFORE, backends={"picky": Picky})
    daemon.on_settings = lambda values: settings.append(dict(values))
    daemon.load("picky", {"selfballooning_at_load": 0, "selfshrinking": 0})
    daemon.param_set("label", "set-at-run-time")  # the file never names it: kept
    daemon.param_set("frontswap_hysteresis", 9)   # idem, a knob
    (tmp_path / "xentmem.toml").write_text(
        RELOAD_BEFORE.replace("alpha = 2", "alpha = 5").replace("max_pools = 8", "max_pools = 9")
        .replace("frontswap_inertia = 4\n", "") + "[daemon]\nlog_level = 'debug'\n")
    result = daemon.reload_config()
    assert sorted(result["applied"]) == ["daemon.log_level", "picky.alpha",
                                         "selfballoon.frontswap_inertia"]
    assert result["needs_reload"] == ["picky.max_pools"]
    values = daemon.shim.backend.values
    assert values["alpha"] == 5 and values["max_pools"] == 8 and values["zeta"] == 2
    assert values["label"] == "set-at-run-time"
    assert daemon.balloon.knobs.get("frontswap_inertia") == 3  # dropped: back to the default
    assert daemon.balloon.knobs.get("frontswap_hysteresis") == 9
    assert daemon.balloon.knobs.get("selfballoon_interval") == 6
    assert settings and settings[-1]["log_level"] == "debug"


def test_a_reload_that_drops_an_automatic_knob_makes_it_automatic_again(
        make_daemon, tmp_path: Path) -> None:
    """The two _mb knobs default to automatic: a file that no longer names one puts it back
    to automatic (the reload once failed on it, after applying the backend's changes)."""
    text = RELOAD_BEFORE + "selfballoon_reserved_mb = 100\n"
    daemon = make_daemon(text, backends={"picky": Picky})
    daemon.load("picky", {"selfballooning_at_load": 0, "selfshrinking": 0})
    assert daemon.balloon.knobs.get("selfballoon_reserved_mb") == 100
    (tmp_path / "xentmem.toml").write_text(RELOAD_BEFORE.replace("alpha = 2", "alpha = 5"))
    result = daemon.reload_config()
    assert sorted(result["applied"]) == ["picky.alpha", "selfballoon.selfballoon_reserved_mb"]
    assert daemon.balloon.knobs.get("selfballoon_reserved_mb") is None
    assert daemon.shim.backend.values["alpha"] == 5


def test_a_reload_to_auto_and_back(make_daemon, tmp_path: Path) -> None:
    """``"auto"`` in the file is read as None; the reload's check and update take it (the
    check once refused it: "None is not an integer")."""
    daemon = make_daemon(RELOAD_BEFORE + "selfballoon_reserved_mb = 64\n",
                         backends={"picky": Picky})
    knobs = daemon.balloon.knobs
    for text, value in (('selfballoon_reserved_mb = "auto"\n', None),
                        ("selfballoon_reserved_mb = 64\n", 64),
                        ("selfballoon_min_usable_mb = 'auto'\n", None)):
        (tmp_path / "xentmem.toml").write_text(RELOAD_BEFORE + text)
        daemon.reload_config()
        assert knobs.get("selfballoon_reserved_mb") == value
    assert knobs.get("selfballoon_min_usable_mb") is None


class PublishingKnobStore(KnobStore):
    """A knob store that keeps every snapshot it publishes (each one the balloon worker
    could read at a tick); it sees them where the store swaps them in, ``_knobs``."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.published: list[Any] = []
        super().__init__(*args, **kw)

    @property
    def _knobs(self) -> Any:
        return self.published[-1]

    @_knobs.setter
    def _knobs(self, knobs: Any) -> None:
        self.published.append(knobs)


def test_a_reload_changes_the_knobs_in_one_snapshot(make_daemon, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One knob changed and two dropped: the worker sees the old knobs or the new ones,
    never a mix (the reload once swapped in one snapshot per dropped knob)."""
    monkeypatch.setattr("xentmem.guestd.balloon.KnobStore", PublishingKnobStore)
    daemon = make_daemon("[selfballoon]\nselfballoon_downhysteresis = 2\n"
                         "selfballoon_uphysteresis = 4\nfrontswap_inertia = 7\n")
    knobs = daemon.balloon.knobs
    assert isinstance(knobs, PublishingKnobStore)
    seen = len(knobs.published)
    (tmp_path / "xentmem.toml").write_text("[selfballoon]\nselfballoon_downhysteresis = 16\n")
    assert daemon.reload_config()["applied"] == [
        "selfballoon.frontswap_inertia", "selfballoon.selfballoon_downhysteresis",
        "selfballoon.selfballoon_uphysteresis"]
    assert [(k.selfballoon_downhysteresis, k.selfballoon_uphysteresis, k.frontswap_inertia,
             k.inertia_writes) for k in knobs.published[seen:]] == [(16, 1, 3, 1)]


def test_a_bad_reload_changes_nothing(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(RELOAD_BEFORE, backends={"picky": Picky})
    daemon.load("picky", {"selfballooning_at_load": 0, "selfshrinking": 0})
    config = daemon.config
    for text, message in (
        (RELOAD_BEFORE + "bogus = 1\n", "unknown param 'bogus'"),
        (RELOAD_BEFORE.replace("selfballoon_interval = 6", "selfballoon_interval = -1"),
         "selfballoon_interval"),
        # Both parse; alpha applies, zeta fails when applied: alpha is rolled back.
        (RELOAD_BEFORE.replace("alpha = 2", "alpha = 7").replace("zeta = 2", "zeta = 13"),
         "zeta: 13 cannot be applied"),
        # Checked before anything applies (alpha once changed, and the reload said applied).
        (RELOAD_BEFORE.replace("alpha = 2", "alpha = 7")
         + "[daemon]\ncontrol_group = 'no-such-group-here'\n", "does not exist"),
    ):
        (tmp_path / "xentmem.toml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            daemon.reload_config()
        assert daemon.config is config
        assert daemon.shim.backend.values["alpha"] == 2
        assert daemon.shim.backend.values["zeta"] == 2
        assert daemon.balloon.knobs.get("selfballoon_interval") == 6


def test_shutdown_stops_the_loops_then_unloads_then_saves(make_daemon) -> None:
    events: list[str] = []

    class Listener:
        def backend_loaded(self, shim: Any) -> None:
            events.append("loaded")

        def backend_unloading(self, shim: Any) -> None:
            events.append("unloading")

    daemon = make_daemon(None, balloon_loops=False, backends={"recording": RecordingBackend})
    real_stop = daemon.balloon.stop
    daemon.balloon.stop = lambda timeout_s: events.append("loops stopped") or real_stop(timeout_s)
    daemon.shim.add_listener(Listener())
    daemon.load("recording")
    file_area = daemon.swap.create(32, "file")["type"]
    memory_area = daemon.swap.create(32, "memory")["type"]
    pages = {offset: bytes([offset]) * PAGE for offset in range(20)}
    for offset, data in pages.items():
        assert daemon.shim.frontswap.store(file_area, offset, data) == 0
        assert daemon.shim.frontswap.store(memory_area, offset, data) == 0
    summary = daemon.shutdown()
    assert events == ["loaded", "loops stopped", "unloading"]
    assert summary["repatriated"] == 40
    # The memory area's 20 pages die with the daemon: not clean, and counted.
    assert summary["clean"] is False and summary["lost_pages"] == 20
    assert summary["errors"] == ["pages lost: 20 swap page(s) had no file to go to "
                                 "(memory-backed areas, or left in tmem) and are dropped with "
                                 "the daemon"]
    assert daemon.state == "stopped"
    assert not daemon.begin(mutates=True)
    saved = json.loads((daemon.state_dir / "shutdown.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert read_swap_area(daemon.swap.path_of(file_area)) == pages
    by_type = {a["type"]: a for a in saved["areas"]}
    assert by_type[memory_area]["used"] == 20 and by_type[memory_area]["tmem_pages"] == 0


def test_shutdown_that_cannot_repatriate_says_so(make_daemon) -> None:
    daemon = make_daemon(None, balloon_loops=False, backends={"recording": RecordingBackend})
    daemon.load("recording")
    area = daemon.swap.create(8)["type"]
    daemon.shim.frontswap.store(area, 0, b"x" * PAGE)
    daemon.shim.backend.fail_gets = True
    summary = daemon.shutdown()
    assert summary["clean"] is False
    assert "could not be repatriated" in summary["error"]
    assert summary["frontswap_curr_pages"] == 1


def test_swap_area_types_are_unique_and_forgotten_areas_leave_no_file(make_daemon) -> None:
    daemon = make_daemon(None, balloon_loops=False)
    first = daemon.swap.create(8, "file")
    assert first["type"] == 0 and first["backing"]["kind"] == "FileBacking"
    assert daemon.swap.create(8, swap_type=5)["type"] == 5
    assert daemon.swap.create(8)["type"] == 1
    path = daemon.swap.path_of(0)
    assert path.exists()
    daemon.swap.forget(0)
    assert not path.exists()
    assert daemon.swap.create(8)["type"] == 0


def test_metrics_text_of_a_running_daemon(make_daemon) -> None:
    daemon = make_daemon(None, overrides=("selfballooning_at_load=0", "selfshrinking=0"))
    daemon.load("zcache", {"capacity": "16M"})
    area = daemon.swap.create(16)["type"]
    daemon.shim.frontswap.store(area, 3, b"m" * PAGE)
    text = daemon.metrics_text()
    assert f'xentmem_swap_area_tmem_pages{{type="{area}",backing="MemoryBacking"}} 1' in text
    assert 'xentmem_backend_stat{backend="zcache",stat="pers_pages"} 1' in text
    assert "xentmem_balloon_running 0" in text
