"""The balloon actuator: target_kb, report-only mode, the guest's xenstore area."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sb_fakes import FakeFrontswap, GuestTree, RecordingPublisher

from xentmem_selfballoon.actuator import (
    PUBLISH_DIR,
    ActuatorError,
    BalloonActuator,
    ShrinkActuator,
)
from xentmem_selfballoon.policy import BalloonInputs, next_target
from xentmem_selfballoon.shrink import ShrinkDecision, ShrinkState


def decision(**kw: int | None):  # type: ignore[no-untyped-def]
    base: dict = dict(committed_pages=262144, totalram_pages=507669, totalreserve_pages=4400,
                      max_pfn=524288, balloon_current_pages=524288, frontswap_pages=77)
    base.update(kw)
    return next_target(BalloonInputs(**base), downhysteresis=8, uphysteresis=1,
                       min_usable_mb=None, reserved_mb=198, include_frontswap=True)


def test_writes_target_kb_and_publishes_under_data(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    tree.set_target_kb(2097152)
    pub = RecordingPublisher()
    act = BalloonActuator(tree.roots, publisher=pub)
    d = decision()
    applied = act.apply(d)
    assert applied.written and applied.published and not act.report_only
    assert tree.target_path.read_text() == f"{d.target_kb}\n"
    assert act.last_written_kb == d.target_kb
    assert pub.latest() == {
        f"{PUBLISH_DIR}/goal_kb": str(d.goal_pages * 4),
        f"{PUBLISH_DIR}/target_kb": str(d.target_kb),
        f"{PUBLISH_DIR}/committed_kb": str(262144 * 4),
        f"{PUBLISH_DIR}/frontswap_pages": "77",
        f"{PUBLISH_DIR}/mode": "active",
    }
    assert all(path.startswith("data/") and not path.startswith("memory")
               for path, _ in pub.writes)


def test_report_only_writes_nothing_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = GuestTree(tmp_path, balloon=False)
    pub = RecordingPublisher()
    act = BalloonActuator(tree.roots, publisher=pub)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        applied = act.apply(decision(balloon_current_pages=None))
        assert not applied.written and applied.published
    assert act.report_only
    assert not tree.target_path.exists()
    assert not any(p.is_file() for p in tmp_path.rglob("*target*"))
    assert sum("report-only" in r.message for r in caplog.records) == 1
    assert pub.latest()[f"{PUBLISH_DIR}/mode"] == "report-only"


def test_never_creates_target_kb_if_the_driver_vanishes_mid_write(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    tree.set_target_kb(1)
    act = BalloonActuator(tree.roots)
    tree.target_path.unlink()
    # report_only is re-checked at every apply: no driver, nothing written, nothing created
    assert not act.apply(decision()).written
    assert not tree.target_path.exists()


def test_write_failure_is_an_actuator_error(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    tree.target_path.mkdir()  # a directory where the file should be: open() fails
    (tree.target_path / "x").write_text("")
    act = BalloonActuator(tree.roots)
    with pytest.raises(ActuatorError, match="target_kb"):
        act._write_target(5)


def test_publisher_failure_does_not_fail_the_write(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    tree.set_target_kb(1)
    act = BalloonActuator(tree.roots, publisher=RecordingPublisher(fail=True))
    applied = act.apply(decision())
    assert applied.written and not applied.published
    assert act.publish_errors == 1


def test_drift_is_noticed_and_overwritten(tmp_path: Path) -> None:
    tree = GuestTree(tmp_path)
    tree.set_target_kb(1)
    act = BalloonActuator(tree.roots)
    d = decision()
    act.apply(d)
    tree.set_target_kb(1048576)  # xl mem-set through memory/target
    act.apply(d)
    assert act.drifts == 1
    assert int(tree.target_path.read_text()) == d.target_kb


def test_shrink_actuator() -> None:
    fs = FakeFrontswap(1000)
    act = ShrinkActuator(fs)
    assert act.apply(ShrinkDecision(ShrinkState(), None, "inertia")) is None
    assert fs.shrinks == []
    assert act.apply(ShrinkDecision(ShrinkState(), 950, "shrink")) == 50
    assert fs.shrinks == [950] and fs.pages == 950
