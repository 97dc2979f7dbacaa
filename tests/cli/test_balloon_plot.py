"""``xentmem balloon plot``: the image read back (size, not blank, every series' colour),
the title's knob values, and the refusals (no matplotlib, a bad recording, a bad knob).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from fakes.balloon_history import KNOBS, short_trace, simulated_records

from xentmem_cli import balloon_plot, balloon_sim
from xentmem_cli.balloon_record import parse_recording
from xentmem_cli.main import cli

image = pytest.importorskip("matplotlib.image", reason="the plot extra is not installed")

#: More pixels of a colour than a legend's sample line has (about 20 x 2): a drawn series.
SERIES_PIXELS = 150


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "rec.jsonl"
    lines = [{"kind": "knobs", "knobs": KNOBS}, *simulated_records()]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def plot(runner: Any, *args: str) -> Any:
    return runner.invoke(cli, ["balloon", "plot", *args], catch_exceptions=False)


def pixels(path: Path) -> Any:
    """The PNG as rows of RGB bytes (0..255)."""
    data = image.imread(str(path))
    assert data.dtype.kind == "f", "PNGs decode to floats in 0..1"
    return (data[:, :, :3] * 255).round().astype(int)


def count_colour(rgb: Any, hex_colour: str) -> int:
    want = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return int(((rgb == want).all(axis=2)).sum())


def test_a_recording_drawn_as_png_holds_every_series(runner: Any, recording: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "rec.png"
    result = plot(runner, str(recording), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and result.stdout == ""
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = pixels(out)
    height, width, _ = rgb.shape
    assert (width, height) == (700, 660), "one column: 7 x 6.6 inches at 100 dpi"
    white = count_colour(rgb, "#ffffff")
    assert white < 0.95 * width * height, "not blank"
    for name in ("committed", "goal", "target", "current", "floor", "stall"):
        assert count_colour(rgb, balloon_plot.COLOURS[name]) > SERIES_PIXELS, name


def test_a_series_that_is_absent_is_not_found(runner: Any, tmp_path: Path) -> None:
    """The check above can fail: without decisions of the guard, no stall line is drawn."""
    records = [dict(r, pressure=None) for r in simulated_records()]
    path = tmp_path / "nopsi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "nopsi.png"
    assert plot(runner, str(path), "-o", str(out)).exit_code == 0
    rgb = pixels(out)
    assert count_colour(rgb, balloon_plot.COLOURS["stall"]) < SERIES_PIXELS
    assert count_colour(rgb, balloon_plot.COLOURS["goal"]) > SERIES_PIXELS


def test_the_title_names_the_knobs() -> None:
    recorded = parse_recording(
        [json.dumps({"kind": "knobs", "knobs": KNOBS}),
         *(json.dumps(r) for r in simulated_records())], "rec")
    fig = balloon_plot.draw([balloon_plot.Panel("one", recorded.records)], "T", recorded.knobs)
    title = fig.get_suptitle().replace("\u00a0", " ")
    for text in ("interval=5s", "downhysteresis=8", "uphysteresis=1", "min_usable_mb=auto",
                 "reserved_mb=auto (204)", "guard stall=10000 us/s"):
        assert text in title, text
    memory, stall = fig.axes[:2]
    assert memory.get_ylabel() == "MiB" and stall.get_xlabel() == "time (s)"
    assert {"goal", "target", "current", "floor", "frontswap", "committed"} <= set(
        memory.get_legend_handles_labels()[1])


def test_a_simulation_of_a_recording_puts_the_two_policies_side_by_side(
        runner: Any, recording: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim.png"
    result = plot(runner, str(recording), "--simulate", "--knob",
                  "selfballoon_downhysteresis=4", "-o", str(out))
    assert result.exit_code == 0, result.output
    rgb = pixels(out)
    height, width, _ = rgb.shape
    assert (width, height) == (1340, 660)
    left, right = rgb[:, : width // 2], rgb[:, width // 2:]
    for name in ("goal", "target", "current", "floor", "committed"):
        assert count_colour(left, balloon_plot.COLOURS[name]) > SERIES_PIXELS, name
        assert count_colour(right, balloon_plot.COLOURS[name]) > SERIES_PIXELS, name


def test_the_simulated_columns_differ_where_the_guard_acts() -> None:
    panels = balloon_sim.simulate(short_trace(), {"selfballoon_downhysteresis": "8"})
    kernel, guard = panels
    assert kernel.title.startswith("kernel policy: ") and "stall" in kernel.title
    assert guard.title.startswith("pressure guard: ")
    assert not any(r["balloon"] and r["balloon"]["guarded"] for r in kernel.records)
    assert any(r["kind"] == "guard" for r in guard.records)
    assert kernel.model is not None and kernel.model.times


def test_a_synthetic_trace_as_svg(runner: Any, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(balloon_sim.TRACES, "ramp", short_trace)  # the real one takes seconds
    out = tmp_path / "ramp.svg"
    result = plot(runner, "--trace", "ramp", "-o", str(out))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("<?xml") and "<svg" in text
    assert balloon_plot.COLOURS["target"] in text


def test_the_trace_names_are_the_simulators() -> None:
    plot_command = cli.commands["balloon"].commands["plot"]  # type: ignore[attr-defined]
    trace = next(p for p in plot_command.params if p.name == "trace")
    assert list(trace.type.choices) == list(balloon_sim.TRACES)


def test_without_matplotlib_one_clear_line_and_no_file(runner: Any, recording: Path,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "rec.png"
    result = plot(runner, str(recording), "-o", str(out))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "needs matplotlib" in result.stderr and "pip install 'xentmem[plot]'" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(("args", "fragment"), [
    ([], "give a RECORDING or --trace NAME"),
    (["--trace", "ramp", "REC"], "give a RECORDING or --trace NAME"),
    (["REC", "--knob", "selfballoon_interval=3"], "--knob applies to a simulation"),
    (["--trace", "ramp", "--knob", "selfballoon_interval"], "is not NAME=VALUE"),
    (["--trace", "ramp", "--knob", "selfballoon_interval=-5"], "selfballoon_interval"),
    (["--trace", "ramp", "--knob", "no_such_knob=1"], "no_such_knob"),
    (["REC", "--output-name", "x.gif"], "cannot tell the image format"),
])
def test_usage_errors_change_nothing(runner: Any, recording: Path, tmp_path: Path,
                                     args: list[str], fragment: str) -> None:
    out = tmp_path / "out.png"
    if "--output-name" in args:
        out = tmp_path / args[-1]
        args = args[:-2]
    args = [str(recording) if a == "REC" else a for a in args]
    result = plot(runner, *args, "-o", str(out))
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr
    assert not out.exists()


def test_a_bad_recording_is_refused_by_line(runner: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"kind": "knobs", "knobs": {}}) + "\n{not json\n")
    out = tmp_path / "bad.png"
    result = plot(runner, str(bad), "-o", str(out))
    assert result.exit_code == 1
    assert f"{bad}:2: not JSON" in result.stderr
    assert not out.exists()


def test_a_recording_without_decisions_is_refused(runner: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"kind": "knobs", "knobs": KNOBS}) + "\n")
    out = tmp_path / "empty.png"
    result = plot(runner, str(empty), "-o", str(out))
    assert result.exit_code == 1 and "no balloon decision" in result.stderr
    result = plot(runner, str(empty), "--simulate", "-o", str(out))
    assert result.exit_code == 1 and "a trace needs at least 2" in result.stderr
    assert not out.exists()


def test_the_cli_loads_neither_matplotlib_nor_the_simulator_until_it_plots() -> None:
    import subprocess

    code = ("import sys, xentmem_cli.main\n"
            "print(sorted(m for m in sys.modules\n"
            "             if m.split('.')[0] in ('matplotlib', 'xentmem_selfballoon')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_a_recording_piped_in(runner: Any, recording: Path, tmp_path: Path) -> None:
    out = tmp_path / "piped.png"
    result = runner.invoke(cli, ["balloon", "plot", "-", "-o", str(out)],
                           input=recording.read_text(), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert count_colour(pixels(out), balloon_plot.COLOURS["target"]) > SERIES_PIXELS


def test_a_recorded_trace_starts_at_0_s_and_a_larger_guest_grows_the_model() -> None:
    records = [dict(r, time=r["time"] + 500.0) for r in simulated_records()]
    recorded = parse_recording([json.dumps(r) for r in records], "rec")
    trace = balloon_sim.trace_of(recorded)
    assert trace.points[0] == (0.0, records[0]["balloon"]["committed_pages"])
    assert trace.duration_s == pytest.approx(records[-1]["time"] - records[0]["time"])
    assert balloon_sim.spec_for(recorded) == balloon_sim.GuestSpec()  # 2 GiB: the default
    big = [dict(r, balloon=dict(r["balloon"], cur_pages=4 << 18)) for r in records]
    spec = balloon_sim.spec_for(parse_recording([json.dumps(r) for r in big], "big"))
    assert spec.static_max_pages == (4 << 18) + spec.kernel_reserved_pages
