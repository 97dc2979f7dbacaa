"""The balloon policy, pinned to numbers worked out by hand from xen-selfballoon.c."""

from __future__ import annotations

import pytest

from xentmem_selfballoon.policy import (
    FLOOR_LARGE,
    FLOOR_MIN_USABLE,
    FLOOR_NOT_WORTH,
    FLOOR_UNDER_64MB,
    FLOOR_UNDER_512MB,
    BalloonInputs,
    auto_reserved_mb,
    balloon_terms,
    hysteresis_target,
    mb2pages,
    next_target,
    pages2mb,
    selfballoon_floor,
    selfballoon_goal,
)


def test_unit_conversions_are_the_kernel_macros() -> None:
    assert mb2pages(1) == 256
    assert mb2pages(99) == 25344
    assert pages2mb(255) == 0
    assert pages2mb(50766) == 198  # 50766 >> 8


def test_auto_reserved_mb_is_a_tenth_of_ram_in_whole_mib() -> None:
    # MemTotal 2030676 kB = 507669 pages; /10 = 50766; >> 8 = 198 MiB
    assert auto_reserved_mb(507669) == 198
    assert auto_reserved_mb(2559) == 0  # 255 pages is less than a MiB


@pytest.mark.parametrize(
    ("committed", "reserve", "reserved_mb", "frontswap", "goal"),
    [
        (262144, 4400, 198, 0, 262144 + 4400 + 50688),  # 317232
        (262144, 4400, 198, 1000, 318232),
        (0, 0, 0, 0, 0),
        (100, 7, 1, 3, 100 + 7 + 256 + 3),
    ],
)
def test_goal(committed: int, reserve: int, reserved_mb: int, frontswap: int, goal: int) -> None:
    assert selfballoon_goal(committed_pages=committed, totalreserve_pages=reserve,
                            reserved_mb=reserved_mb, frontswap_pages=frontswap) == goal


@pytest.mark.parametrize(
    ("cur", "goal", "down", "up", "expected", "case"),
    [
        (1000, 200, 8, 1, 900, "shrink by 1/8 of the excess: 1000 - 800//8"),
        (1000, 993, 8, 1, 1000, "excess 7 < 8: 7//8 = 0, no change (truncation)"),
        (1000, 200, 1, 1, 200, "downhysteresis 1: straight to the goal"),
        (1003, 1000, 2, 1, 1002, "1003 - 3//2"),
        (200, 1000, 8, 1, 1000, "uphysteresis 1: straight up to the goal"),
        (200, 1000, 8, 3, 466, "200 + 800//3"),
        (999, 1000, 8, 2, 999, "shortfall 1 < 2: no change"),
        (500, 500, 8, 1, 500, "equal: no change"),
        (507669, 317232, 8, 1, 483865, "507669 - 190437//8 = 507669 - 23804"),
    ],
)
def test_hysteresis(cur: int, goal: int, down: int, up: int, expected: int, case: str) -> None:
    assert hysteresis_target(cur, goal, downhysteresis=down, uphysteresis=up) == expected, case


def test_hysteresis_refuses_zero_divisors() -> None:
    with pytest.raises(ValueError):
        hysteresis_target(1, 2, downhysteresis=0, uphysteresis=1)


@pytest.mark.parametrize(
    ("max_pfn", "reserve", "min_usable", "pages", "rule"),
    [
        # min_usable_mb set: totalreserve + MB2PAGES(min_usable) = 4400 + 25600
        (524288, 4400, 100, 30000, FLOOR_MIN_USABLE),
        # useful = 3900 < 4096 (16 MiB): the whole of max_pfn
        (4000, 100, None, 4000, FLOOR_NOT_WORTH),
        (4196, 101, 0, 4196, FLOOR_NOT_WORTH),  # 0 = auto as in the kernel; useful 4095
        # useful = 9000 < 16384: 1000 + 4096 + (9000 - 4096) >> 1 = 1000 + 4096 + 2452
        (10000, 1000, None, 7548, FLOOR_UNDER_64MB),
        # useful exactly 16 MiB falls in the second branch: 0 + 4096 + 0
        (4096, 0, None, 4096, FLOOR_UNDER_64MB),
        # useful = 63536 < 131072: 2000 + 10240 + (63536 - 10240) >> 3 = 2000 + 10240 + 6662
        (65536, 2000, None, 18902, FLOOR_UNDER_512MB),
        # useful exactly 64 MiB: 10240 + (16384 - 10240) >> 3 = 10240 + 768
        (16384, 0, None, 11008, FLOOR_UNDER_512MB),
        # just under 512 MiB: 10240 + (131071 - 10240) >> 3 = 10240 + 15103
        (131071, 0, None, 25343, FLOOR_UNDER_512MB),
        # exactly 512 MiB jumps up (the kernel's discontinuity): 25344 + (105728 >> 5)
        (131072, 0, None, 28648, FLOOR_LARGE),
        # 1 GiB: 25344 + (262144 - 25344) >> 5 = 25344 + 7400 (~128 MiB, as the reference says)
        (262144, 0, None, 32744, FLOOR_LARGE),
        # 4 GiB: 25344 + 1023232 >> 5 = 25344 + 31976 (~224 MiB)
        (1048576, 0, None, 57320, FLOOR_LARGE),
        # the test guest: 4400 + 25344 + (519888 - 25344) >> 5 = 4400 + 25344 + 15454
        (524288, 4400, None, 45198, FLOOR_LARGE),
    ],
)
def test_floor_branches(
    max_pfn: int, reserve: int, min_usable: int | None, pages: int, rule: str
) -> None:
    floor = selfballoon_floor(max_pfn=max_pfn, totalreserve_pages=reserve,
                              min_usable_mb=min_usable)
    assert (floor.pages, floor.rule) == (pages, rule)


def test_balloon_terms_carries_the_offset() -> None:
    # 483865 + 524288 - 507669: the 16619 pages the balloon counts and totalram never did
    assert balloon_terms(483865, balloon_current_pages=524288, totalram_pages=507669) == 500484


def _inputs(**kw: int | None) -> BalloonInputs:
    base: dict = dict(committed_pages=262144, totalram_pages=507669, totalreserve_pages=4400,
                      max_pfn=524288, balloon_current_pages=524288, frontswap_pages=0)
    base.update(kw)
    return BalloonInputs(**base)


KERNEL = dict(downhysteresis=8, uphysteresis=1, min_usable_mb=None, reserved_mb=198,
              include_frontswap=False)


def test_next_target_one_full_step() -> None:
    d = next_target(_inputs(), **KERNEL)
    assert d.goal_pages == 317232
    assert d.stepped_pages == 483865
    assert (d.floor.pages, d.floor.rule) == (45198, FLOOR_LARGE)
    assert d.target_pages == 483865
    assert d.balloon_target_pages == 500484
    assert d.target_kb == 2001936
    assert not d.guarded


def test_next_target_floor_wins_over_a_low_goal() -> None:
    # goal = 1000 + 4400 + 256 = 5656; down 1 goes straight there; floor 45198 wins
    d = next_target(_inputs(committed_pages=1000),
                    **{**KERNEL, "downhysteresis": 1, "reserved_mb": 1})
    assert (d.goal_pages, d.stepped_pages, d.target_pages) == (5656, 5656, 45198)
    assert d.balloon_target_pages == 45198 + 16619


def test_next_target_counts_frontswap_only_when_self_shrinking() -> None:
    without = next_target(_inputs(frontswap_pages=5000), **KERNEL)
    with_fs = next_target(_inputs(frontswap_pages=5000), **{**KERNEL, "include_frontswap": True})
    assert without.goal_pages == 317232 and without.frontswap_pages == 0
    assert with_fs.goal_pages == 322232 and with_fs.frontswap_pages == 5000


def test_next_target_without_a_balloon_driver_reports_in_totalram_terms() -> None:
    d = next_target(_inputs(balloon_current_pages=None), **KERNEL)
    assert d.balloon_target_pages == d.target_pages == 483865


@pytest.mark.parametrize(
    ("totalram", "committed", "stepped", "case"),
    [
        (507669, 262144, 507669, "above the goal while stalling: hold, do not shrink"),
        # goal = 450000 + 4400 + 50688 = 505088; uphysteresis 4 would give a quarter of it
        (400000, 450000, 505088, "below the goal while stalling: the whole goal at once"),
    ],
)
def test_stalling_never_shrinks_and_grows_to_the_goal_at_once(
    totalram: int, committed: int, stepped: int, case: str
) -> None:
    d = next_target(_inputs(totalram_pages=totalram, committed_pages=committed),
                    **{**KERNEL, "uphysteresis": 4}, stalling=True)
    assert d.stepped_pages == stepped, case
    assert d.guarded
