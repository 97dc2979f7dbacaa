"""``xentmem balloon`` on a terminal: the last decisions as a small chart, a table otherwise."""

from __future__ import annotations

from typing import Any

import pytest
from fakes.balloon_history import simulated_records

from xentmem_cli import balloon
from xentmem_cli.balloon import balloon_text
from xentmem_cli.balloon_chart import chart


def decision(seq: int, time: float, *, goal: int, target: int, cur: int, floor: int,
             frontswap: int = 0) -> dict[str, Any]:
    return {"seq": seq, "time": time, "kind": "tick",
            "balloon": {"goal_pages": goal, "target_pages": target, "cur_pages": cur,
                        "floor_pages": floor, "frontswap_pages": frontswap}}


def test_each_series_sits_at_its_height_in_mib() -> None:
    mib = 256
    history = [decision(i, 5.0 * i, goal=600 * mib, target=1000 * mib, cur=1000 * mib,
                        floor=200 * mib) for i in range(1, 11)]
    lines = chart(history, height=9).splitlines()
    rows = lines[:9]
    assert rows[0].startswith("1000 ┤") and rows[-1].startswith("   0 ┤")
    # target (drawn over current) at the top, goal at 600, floor at 200, frontswap at 0
    assert rows[0].endswith("T" * 10)
    assert rows[9 - 1 - round(600 / 1000 * 8)].endswith("G" * 10)
    assert rows[9 - 1 - round(200 / 1000 * 8)].endswith("F" * 10)
    assert rows[-1].endswith("S" * 10)
    assert "seq 1..10, 45 s" in lines[-2]
    assert "T target" in lines[-1] and "C current" in lines[-1]


def test_a_wide_history_keeps_the_last_columns_and_skips_failed_ticks() -> None:
    history = [*simulated_records(), {"seq": 999, "time": 1e6, "kind": "tick", "balloon": None,
                                      "error": "boom"}]
    text = chart(history, width=20)
    body = text.splitlines()[0]
    assert len(body.split("┤", 1)[1]) <= 20
    last = [r for r in history if r.get("balloon")][-1]
    assert f"..{last['seq']}," in text


def test_no_decision_yet() -> None:
    assert chart([{"seq": 1, "time": 0.0, "kind": "idle", "balloon": None}]) == \
        "(no balloon decision yet)"


def test_colour_comes_from_the_style() -> None:
    history = list(simulated_records())[:5]
    text = chart(history, style=lambda s, colour: f"<{colour}>{s}")
    assert "<red>T" in text and "<blue>G" in text


def test_balloon_text_draws_the_chart_instead_of_the_table() -> None:
    data = {"running": True, "history": list(simulated_records())[:10]}
    as_chart = balloon_text(data, chart=True)
    as_table = balloon_text(data)
    assert "┤" in as_chart and "GOAL_PAGES" not in as_chart
    assert "GOAL_PAGES" in as_table and "┤" not in as_table


@pytest.mark.parametrize(("terminal", "flag", "want_chart"), [
    (True, None, True), (False, None, False), (True, "--table", False), (False, "--chart", True),
])
def test_the_chart_on_a_terminal_the_table_elsewhere(
        reader: Any, monkeypatch: pytest.MonkeyPatch, terminal: bool, flag: str | None,
        want_chart: bool) -> None:
    monkeypatch.setattr(balloon, "_stdout_is_terminal", lambda: terminal)
    seen: list[bool] = []
    real = balloon.balloon_text

    def spy(data: dict[str, Any], **kw: Any) -> str:
        seen.append(kw.get("chart", False))
        return real(data, **kw)

    monkeypatch.setattr(balloon, "balloon_text", spy)
    result = reader("balloon", *([flag] if flag else []))
    assert result.exit_code == 0, result.stderr
    assert seen == [want_chart]


def test_json_is_the_same_on_a_terminal(reader: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balloon, "_stdout_is_terminal", lambda: True)
    data = reader.json("balloon")
    assert "history" in data and "knobs" in data
