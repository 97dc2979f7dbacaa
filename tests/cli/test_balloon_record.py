"""``xentmem balloon record``: every decision once, in order, bounded; never a sleep.

The recorder runs against :class:`fakes.balloon_history.FakeBalloonDaemon` on a fake clock
(hours of polling at once); one test records from a real daemon without waiting for a tick.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import click
import pytest
from fakes.balloon_history import FakeBalloonDaemon, simulated_records

from xentmem.clock import FakeClock
from xentmem_cli.app import App
from xentmem_cli.balloon import run_recording
from xentmem_cli.balloon_record import (
    Recorder,
    RecordingError,
    knob_values,
    parse_recording,
)

START = 1000.0  # the fake daemon's records start at this clock time


def record(tmp_path: Path, daemon: FakeBalloonDaemon, **kw: Any) -> list[dict[str, Any]]:
    out = tmp_path / "rec.jsonl"
    app = App("/nonexistent.sock", 1.0, client_factory=lambda path, timeout: daemon)
    options: dict[str, Any] = {"count": None, "duration": None, "poll": 1.0, "backlog": False}
    options.update(kw)
    run_recording(app, output=str(out), clock=daemon.clock, **options)
    return [json.loads(line) for line in out.read_text().splitlines()]


def decisions(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["kind"] not in ("knobs", "gap")]


def test_count_bounds_the_recording_and_every_decision_comes_once_in_order(
        tmp_path: Path) -> None:
    clock = FakeClock(START)
    daemon = FakeBalloonDaemon(clock)
    lines = record(tmp_path, daemon, count=40)
    assert lines[0]["kind"] == "knobs"
    assert lines[0]["knobs"]["selfballoon_interval"] == "5"
    got = decisions(lines)
    assert len(got) == 40
    seqs = [r["seq"] for r in got]
    assert seqs == list(range(seqs[0], seqs[0] + 40)), "each once, none skipped"
    assert got == daemon.records[:40], "the records as the daemon sent them"
    assert {"balloon", "pressure", "shrink", "target_kb"} <= set(got[0])
    assert clock.waits and all(w == 1.0 for w in clock.waits), "paced by the clock only"


def test_duration_bounds_the_recording(tmp_path: Path) -> None:
    clock = FakeClock(START)
    lines = record(tmp_path, FakeBalloonDaemon(clock), duration=30.0, poll=2.0)
    assert clock.monotonic() == pytest.approx(START + 30.0)
    got = decisions(lines)
    assert got and all(START < r["time"] <= START + 30.0 for r in got)


def test_count_and_duration_stop_at_whichever_comes_first(tmp_path: Path) -> None:
    clock = FakeClock(START)
    lines = record(tmp_path, FakeBalloonDaemon(clock), count=1000, duration=12.0)
    assert 0 < len(decisions(lines)) < 1000
    assert clock.monotonic() == pytest.approx(START + 12.0)


def test_records_made_before_the_start_only_with_backlog(tmp_path: Path) -> None:
    clock = FakeClock(START + 60.0)
    daemon = FakeBalloonDaemon(clock)
    before = daemon.visible()
    assert before
    plain = decisions(record(tmp_path, daemon, duration=0.0))
    assert plain == []
    with_backlog = decisions(record(tmp_path, daemon, duration=0.0, backlog=True))
    assert with_backlog == before


def test_records_the_daemon_dropped_unseen_are_a_gap_line(tmp_path: Path) -> None:
    clock = FakeClock(START)
    daemon = FakeBalloonDaemon(clock, keep=3)
    lines = record(tmp_path, daemon, duration=60.0, poll=20.0)
    gaps = [line for line in lines if line["kind"] == "gap"]
    assert gaps and all(g["missed"] > 0 for g in gaps)
    got = decisions(lines)
    made = [r for r in daemon.records if r["time"] <= START + 60.0]
    assert len(got) + sum(g["missed"] for g in gaps) == len(made), "every decision accounted"


def test_a_knob_change_is_recorded_where_it_happened(tmp_path: Path) -> None:
    clock = FakeClock(START)
    daemon = FakeBalloonDaemon(clock)
    out: list[str] = []
    recorder = Recorder(lambda: daemon.call("balloon", limit=10**6), out.append, clock,
                        count=None, duration_s=20.0, poll_s=5.0)

    class ChangeAfterTwoPolls:
        def __init__(self) -> None:
            self.polls = 0

        def wait(self, stop: threading.Event, timeout: float) -> bool:
            self.polls += 1
            if self.polls == 2:
                daemon.knobs["selfballoon_downhysteresis"] = "4"
            return clock.wait(stop, timeout)

        def monotonic(self) -> float:
            return clock.monotonic()

    recorder._clock = ChangeAfterTwoPolls()
    recorder.run(threading.Event())
    kinds = [json.loads(line)["kind"] for line in out]
    knob_lines = [json.loads(line) for line in out if json.loads(line)["kind"] == "knobs"]
    assert kinds.count("knobs") == 2
    assert knob_lines[1]["knobs"]["selfballoon_downhysteresis"] == "4"
    assert kinds[0] == "knobs" and kinds.index("knobs", 1) > 1, "after the first decisions"


def test_a_restarted_loop_numbering_again_from_1_loses_nothing(tmp_path: Path) -> None:
    records = list(simulated_records())[:10]
    again = [dict(r, time=r["time"] + 60.0) for r in records]  # seq 1.. again, later
    clock = FakeClock(START)
    daemon = FakeBalloonDaemon(clock, tuple(records + again))
    out: list[str] = []
    recorder = Recorder(lambda: daemon.call("balloon", limit=10**6), out.append, clock,
                        count=20, duration_s=None, poll_s=1.0)
    summary = recorder.run(threading.Event())
    assert summary.decisions == 20 and summary.restarts == 1 and summary.missed == 0


def test_a_recording_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="count or a duration"):
        Recorder(dict, print, FakeClock(), count=None, duration_s=None)


def test_the_command_refuses_no_bound(runner: Any, tmp_path: Path) -> None:
    from xentmem_cli.main import cli

    result = runner.invoke(cli, ["--socket", str(tmp_path / "x.sock"), "balloon", "record"])
    assert result.exit_code == 2
    assert "--count N and/or --duration SECONDS" in result.output


def test_an_unreachable_daemon_leaves_no_file(xentmem_at: Any, no_daemon_socket: Path,
                                              tmp_path: Path, assert_error: Any) -> None:
    out = tmp_path / "rec.jsonl"
    result = xentmem_at(no_daemon_socket)("balloon", "record", "-c", "3", "-o", str(out))
    assert_error(result, 3, "not running")
    assert not out.exists()


def test_records_from_a_real_daemon(xentmem: Any, tmp_path: Path) -> None:
    """The whole path, without waiting for a tick: what the daemon keeps (--backlog), now."""
    out = tmp_path / "rec.jsonl"
    result = xentmem("balloon", "record", "--duration", "0", "--backlog", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert "recorded" in result.stderr and str(out) in result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["kind"] == "knobs"
    assert lines[0]["knobs"]["selfballoon_interval"] == "5"
    assert all(line["kind"] in ("tick", "guard", "idle") for line in lines[1:])
    assert parse_recording(out.read_text().splitlines(), "rec").knobs == lines[0]["knobs"]


def test_reading_back_refuses_a_bad_line_by_number() -> None:
    good = json.dumps({"kind": "knobs", "knobs": {}})
    with pytest.raises(RecordingError, match=r"rec:2: not JSON"):
        parse_recording([good, "{oops"], "rec")
    with pytest.raises(RecordingError, match=r"rec:1: not a record"):
        parse_recording(["[1, 2]"], "rec")
    with pytest.raises(RecordingError, match=r"rec:1: a record without a numeric 'time'"):
        parse_recording([json.dumps({"kind": "tick", "seq": 1})], "rec")


def test_knobs_as_shown_become_knob_values() -> None:
    assert knob_values({"selfballoon_reserved_mb": "auto (204)", "selfballoon_interval": "5",
                        "x": None}) == {"selfballoon_reserved_mb": "auto",
                                        "selfballoon_interval": "5"}


def test_ctrl_c_ends_a_recording_with_whole_lines(tmp_path: Path, capsys: Any) -> None:
    clock = FakeClock(START)
    daemon = FakeBalloonDaemon(clock)

    class InterruptAt30s(FakeClock):
        def wait(self, stop: threading.Event, timeout: float) -> bool:
            if clock.monotonic() >= START + 30.0:
                raise KeyboardInterrupt
            return clock.wait(stop, timeout)

        def monotonic(self) -> float:
            return clock.monotonic()

    out = tmp_path / "rec.jsonl"
    app = App("/nonexistent.sock", 1.0, client_factory=lambda path, timeout: daemon)
    run_recording(app, count=None, duration=600.0, output=str(out), poll=1.0, backlog=False,
                  clock=InterruptAt30s())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(decisions(lines)) > 3
    err = capsys.readouterr().err
    assert "interrupted" in err and f"recorded {len(decisions(lines))} decision(s)" in err


def test_an_unwritable_output_is_one_error_line(tmp_path: Path) -> None:
    daemon = FakeBalloonDaemon(FakeClock(START))
    app = App("/nonexistent.sock", 1.0, client_factory=lambda path, timeout: daemon)
    with pytest.raises(click.exceptions.Exit) as exc:
        run_recording(app, count=1, duration=None, output=str(tmp_path / "no" / "rec.jsonl"),
                      poll=1.0, backlog=False, clock=daemon.clock)
    assert exc.value.exit_code == 1


def test_to_stdout_data_only_and_the_note_on_stderr(capsys: Any) -> None:
    daemon = FakeBalloonDaemon(FakeClock(START))
    app = App("/nonexistent.sock", 1.0, client_factory=lambda path, timeout: daemon)
    run_recording(app, count=5, duration=None, output="-", poll=1.0, backlog=False,
                  clock=daemon.clock)
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(decisions(lines)) == 5 and lines[0]["kind"] == "knobs"
    assert "recorded 5 decision(s) to stdout" in captured.err
