"""``shutdown.json`` tells the truth: a run is marked ``running`` from its start (so a kill
shows as unclean), a failed start adds its facts on top of the earlier record instead of
replacing it, and ``lost_pages`` counts every page no one can read, also when neither the
areas nor the record can be saved."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.clock import FakeClock
from xentmem.console import EXIT_FAILURE
from xentmem.errors import BackendUnsupported
from xentmem.guestd.app import Application, serve
from xentmem.guestd.signals import SignalFlags
from xentmem.notify import Notifier
from xentmem.roots import Roots

PAGE = b"\x3c" * 4096


class OffXen(RecordingBackend):
    """A backend that cannot run here, as ``xen`` off Xen."""

    name: ClassVar[str] = "offxen"

    @classmethod
    def probe(cls, roots: Roots) -> None:
        raise BackendUnsupported("not a Xen guest (test)")


def application(tmp_path: Path, root: Path, backend: str = "recording") -> Application:
    config = tmp_path / "xentmem.conf"
    config.write_text(f"options xentmemd backend={backend}\n"
                      "options tmem selfballooning_at_load=0 selfshrinking=0\n")
    return Application(roots=Roots(root=root, run_dir=tmp_path / "run"), config_path=config,
                       config_missing_ok=False, clock=FakeClock(0.0), notifier=Notifier(None),
                       signals=SignalFlags(), state_dir=tmp_path / "state",
                       resolve={"recording": RecordingBackend, "offxen": OffXen}.__getitem__)


def record_of(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "state" / "shutdown.json").read_text())


def test_a_start_marks_the_record_running_and_a_clean_stop_clean(tmp_path: Path,
                                                                 fake_root: Path) -> None:
    app = application(tmp_path, fake_root)
    app.start()
    try:
        running = record_of(tmp_path)
        assert running["state"] == "running" and running["clean"] is False
        assert running["previous"] == []
    finally:
        assert app.shutdown() == 0
        app.signals.close()
    stopped = record_of(tmp_path)
    assert stopped["state"] == "stopped" and stopped["clean"] is True
    assert stopped["pid"] == running["pid"] and stopped["started"] == running["started"]


def test_a_killed_run_shows_as_crashed_at_the_next_start(
        tmp_path: Path, fake_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state").mkdir()
    killed = {"state": "running", "clean": False, "pid": 4242, "started": "then",
              "previous": [{"state": "stopped", "clean": True, "pid": 4000}]}
    (tmp_path / "state" / "shutdown.json").write_text(json.dumps(killed))
    app = application(tmp_path, fake_root)
    with caplog.at_level(logging.ERROR, logger="xentmem.guestd.core"):
        app.start()
    # Said before the backend loads: it must not claim that pages a backend keeps across a
    # restart (zcache's page arena) are gone.
    said = [r.getMessage() for r in caplog.records if "did not stop" in r.getMessage()]
    assert len(said) == 1 and "pid 4242" in said[0]
    assert "unless the backend kept them" in said[0]
    assert app.shutdown() == 0
    app.signals.close()
    record = record_of(tmp_path)
    assert record["clean"] is True
    assert [(r["state"], r["pid"]) for r in record["previous"]] == [("crashed", 4242),
                                                                     ("stopped", 4000)]


def test_a_failed_start_keeps_the_earlier_unclean_record(tmp_path: Path,
                                                         fake_root: Path) -> None:
    (tmp_path / "state").mkdir()
    unclean = {"state": "stopped", "clean": False, "lost_pages": 3, "pid": 4242,
               "errors": ["pages lost: 3"]}
    (tmp_path / "state" / "shutdown.json").write_text(json.dumps(unclean))
    app = application(tmp_path, fake_root, backend="offxen")
    assert serve(app) == EXIT_FAILURE
    app.signals.close()
    record = record_of(tmp_path)
    assert record["state"] == "start_failed" and record["clean"] is False
    assert any("not a Xen guest" in e for e in record["errors"])
    assert record["previous"] == [unclean]


def test_lost_counts_every_page_when_neither_areas_nor_record_can_be_saved(
        make_daemon: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = make_daemon(None, balloon_loops=False)
    daemon.load("recording")
    files = daemon.swap.create(8, "file")["type"]
    memory = daemon.swap.create(8)["type"]
    for offset in range(3):
        daemon.shim.frontswap.store(files, offset, PAGE)
    for offset in range(2):
        daemon.shim.frontswap.store(memory, offset, PAGE)
    store = daemon.swap._stores[files]
    real_sync = store.sync

    def sync() -> None:  # the disk goes once the pages are back in the file: no flush
        store.close()
        real_sync()

    monkeypatch.setattr(store, "sync", sync)
    (daemon.state_dir / "shutdown.json" / "x").mkdir(parents=True)  # nor the record saved
    caplog.set_level(logging.INFO)

    summary = daemon.shutdown()

    assert summary["repatriated"] == 5  # the unload went through: then the flush failed
    assert summary["lost_pages"] == 5 and summary["clean"] is False
    assert any(e.startswith("writing shutdown.json") for e in summary["errors"])
    logged = [r.getMessage() for r in caplog.records]
    saved = [m for m in logged if m.startswith("shutdown record not saved; it was: ")]
    assert len(saved) == 1 and json.loads(saved[0].split(": ", 1)[1])["lost_pages"] == 5
    assert any("5 lost" in m for m in logged)
