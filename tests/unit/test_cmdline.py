"""The deprecated kernel command line words are honoured, each with a warning."""

from __future__ import annotations

from pathlib import Path

from xentmem.guest.cmdline import parse_cmdline, read_cmdline


def test_modern_and_old_words() -> None:
    boot = parse_cmdline(
        "BOOT_IMAGE=/vmlinuz ro tmem tmem.cleancache=0 tmem.frontswap=1 nofrontswap "
        "noselfballooning tmem.selfshrink=0 quiet"
    )
    assert boot.enabled
    assert boot.params == {
        "cleancache": "0",
        "frontswap": "0",  # the later word wins, as in the kernel
        "selfballooning_at_load": "0",  # tmem.c's selfballooning, named apart from the knob
        "selfshrinking": "0",
    }
    assert any("'tmem' is deprecated" in w for w in boot.warnings)
    assert any("'nofrontswap' is deprecated; use the load param frontswap=0" in w
               for w in boot.warnings)
    assert any("tmem.selfshrink=0" in w and "selfshrinking=0" in w for w in boot.warnings)


def test_unrelated_cmdline_has_no_effect(tmp_path: Path) -> None:
    assert parse_cmdline("root=/dev/xvda1 ro console=hvc0").params == {}
    assert read_cmdline(tmp_path / "missing").enabled is False
    assert parse_cmdline("tmem.bogus=1").warnings == ("kernel command line 'tmem.bogus=1': "
                                                      "unknown tmem param, ignored",)


def test_words_after_a_double_dash_are_inits_not_the_kernels() -> None:
    """The kernel's parse_args stops at "--": what follows goes to init, so a tmem word
    there turns nothing off (it once did)."""
    boot = parse_cmdline("root=/dev/xvda1 ro tmem.cleancache=0 -- nofrontswap tmem.frontswap=0")
    assert boot.params == {"cleancache": "0"} and len(boot.warnings) == 1  # its deprecation
