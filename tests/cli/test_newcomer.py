"""What a newcomer types, answered in the words they typed: values as ``params list`` shows
them, hints that name commands (not socket methods), negative numbers that reach the range
check, and a metrics textfile written the way node_exporter needs it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def test_set_to_auto_prints_auto(xentmem: Any) -> None:
    assert xentmem("params", "set", "selfballoon_min_usable_mb", "128").exit_code == 0
    result = xentmem("params", "set", "selfballoon_min_usable_mb", "auto")
    assert result.exit_code == 0, result.output
    assert result.stdout == "selfballoon_min_usable_mb = auto (was 128)\n"
    result = xentmem("params", "set", "selfballoon_reserved_mb", "64")
    assert result.stdout.startswith("selfballoon_reserved_mb = 64 (was auto (")


def test_unknown_param_hint_names_the_command_to_type(xentmem: Any, assert_error: Any) -> None:
    result = xentmem("params", "set", "no_such_param", "1")
    message = assert_error(result, 1, "unknown param 'no_such_param'",
                           "see `xentmem params list`")
    assert "params.list" not in message


def test_read_only_flag_hint_names_the_commands(xentmem: Any, assert_error: Any) -> None:
    result = xentmem("params", "set", "tmem.frontswap", "0")
    assert_error(result, 1, "read-only", "`xentmem unload`", "`xentmem load BACKEND frontswap=")


def test_negative_value_reaches_the_range_check(xentmem: Any, assert_error: Any) -> None:
    for argv in (("params", "set", "selfballoon_interval", "-5"),
                 ("params", "set", "--", "selfballoon_interval", "-5")):
        result = xentmem(*argv)
        assert_error(result, 1, "selfballoon_interval: -5 is out of range")
    assert xentmem.json("params", "get", "selfballoon_interval")["value"] == 5


def test_metrics_textfile_is_replaced_atomically(xentmem: Any, tmp_path: Path) -> None:
    directory = tmp_path / "textfile"
    directory.mkdir()
    target = directory / "xentmem.prom"
    target.write_text("old\n")
    reader_view = tmp_path / "held-open.prom"
    os.link(target, reader_view)  # a reader's view of the old file: an in-place write shows
    result = xentmem("metrics", "--textfile", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"metrics written to {target}" in result.stderr
    text = target.read_text()
    assert "xentmem_" in text and text.endswith("\n")
    assert reader_view.read_text() == "old\n", "replaced by a rename, never rewritten in place"
    assert sorted(p.name for p in directory.iterdir()) == ["xentmem.prom"], "no temp file left"


def test_metrics_textfile_must_be_a_prom_file_in_an_existing_dir(
        xentmem: Any, tmp_path: Path, assert_error: Any) -> None:
    assert_error(xentmem("metrics", "--textfile", str(tmp_path / "xentmem.txt")), 2,
                 "only *.prom files")
    assert_error(xentmem("metrics", "--textfile", str(tmp_path / "no" / "xentmem.prom")), 1,
                 "no such directory")
    assert not (tmp_path / "xentmem.txt").exists()


def test_one_name_for_one_thing_and_the_knob_follows_the_flag_at_load(xentmem: Any) -> None:
    records = xentmem.json("params", "list")
    names = [record["name"] for record in records]
    assert len(names) == len(set(names)), "every param has a name of its own"
    assert xentmem.json("params", "set", "selfballooning", "0")["value"] is False
    assert xentmem("unload").exit_code == 0
    assert xentmem("load", "zcache").exit_code == 0
    flag = xentmem.json("params", "get", "selfballooning_at_load")
    knob = xentmem.json("params", "get", "selfballooning")
    assert (flag["section"], flag["value"]) == ("tmem", True)
    assert (knob["section"], knob["value"]) == ("selfballoon", True)
