"""The old way to configure tmem: words on the kernel command line (deprecated, still honoured).

Built-in tmem was switched on by the word ``tmem`` and tuned with ``tmem.<param>=0|1``; older
kernels used ``nocleancache``, ``nofrontswap``, ``noselfballooning`` and ``noselfshrink``.
Each is honoured here with a warning naming the load param that replaces it
(``docs/tmem-semantics.md``, "The Linux shim").  Explicit load
params (and the daemon's config) win over anything read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: ``tmem.<name>=`` params that tmem.c declares (all bool).
TMEM_PARAMS = ("cleancache", "frontswap", "selfballooning", "selfshrinking")
#: tmem.c names that our shim spells apart (the balloon knob is ``selfballooning``).
FLAG_NAMES = {"selfballooning": "selfballooning_at_load"}
#: Old boot words and the param setting each stands for.
OLD_WORDS = {
    "nocleancache": ("cleancache", "0"),
    "nofrontswap": ("frontswap", "0"),
    "noselfballooning": ("selfballooning_at_load", "0"),
    "selfballooning": ("selfballooning_at_load", "1"),
    "noselfshrink": ("selfshrinking", "0"),
}
#: Misspellings the kernel's own docs taught (``tmem.selfshrink`` is not a real param).
ALIASES = {"selfshrink": "selfshrinking"}


@dataclass(frozen=True)
class BootParams:
    """What the kernel command line says about tmem."""

    enabled: bool = False
    params: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def parse_cmdline(text: str) -> BootParams:
    """Parse a kernel command line; later words win, as the kernel's parser does."""
    enabled = False
    params: dict[str, str] = {}
    warnings: list[str] = []
    for word in text.split():
        if word == "--":  # the kernel's parse_args stops there: the rest is init's
            break
        if word == "tmem":
            enabled = True
            warnings.append(
                "kernel command line word 'tmem' is deprecated; load a backend instead "
                "(xentmem load zcache|xen, or the daemon's config)"
            )
            continue
        if word.startswith("tmem."):
            name, sep, value = word[len("tmem."):].partition("=")
            real = ALIASES.get(name, name)
            if real not in TMEM_PARAMS:
                warnings.append(f"kernel command line {word!r}: unknown tmem param, ignored")
                continue
            value = value if sep else "1"
            real = FLAG_NAMES.get(real, real)
            params[real] = value
            warnings.append(f"kernel command line {word!r} is deprecated; use the load param "
                            f"{real}={value}")
            continue
        if word in OLD_WORDS:
            name, value = OLD_WORDS[word]
            params[name] = value
            warnings.append(f"kernel command line word {word!r} is deprecated; use the load param "
                            f"{name}={value}")
    return BootParams(enabled=enabled, params=params, warnings=tuple(warnings))


def read_cmdline(path: Path) -> BootParams:
    """Parse ``/proc/cmdline`` (or a fake one); a missing file means no boot params."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return BootParams()
    return parse_cmdline(text)
