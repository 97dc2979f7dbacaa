"""The one number reading of every param: ASCII digits only, the whole text or nothing."""

from __future__ import annotations

import click
import pytest

from xentmem.errors import ParamError
from xentmem.hostd.cli import target_of
from xentmem.params import Param, parse_float

RATIO = Param("ratio", float, 0.5, "a float param")


@pytest.mark.parametrize(("text", "value"), [("0.25", 0.25), (" 1e-3\n", 0.001), ("+2", 2.0)])
def test_a_float_param_reads_ascii_decimals(text: str, value: float) -> None:
    assert parse_float(text) == value
    assert RATIO.coerce(text) == value


@pytest.mark.parametrize("text", ["\u0661\u0660", "\uff15", "1_0", "inf", "nan", "", " ", "0x10",
                                  "1.5 M", "\u00b2"])
def test_a_float_param_refuses_what_float_alone_would_take(text: str) -> None:
    with pytest.raises(ParamError, match="ratio"):
        RATIO.coerce(text)


@pytest.mark.parametrize("text", ["\u0665", "\u00b2", "\uff17", "-1", "70000"])
def test_a_domid_argument_is_ascii_digits_in_range(text: str) -> None:
    with pytest.raises(click.BadParameter):
        target_of(text)
    assert target_of("7") == 7 and target_of("all") == "all"
