"""Which backend to load: a name as given, or ``auto`` (xen in a Xen guest with a tmem host,
else the local zcache store), with the reason, so the log and ``status`` can say why."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from xentmem.errors import BackendError, BackendUnsupported, ParamError, XentmemError
from xentmem.guest.backend import Backend
from xentmem.guestd.config import FROM_COMMAND_LINE, FROM_DEFAULT, FROM_LOAD
from xentmem.roots import Roots

log = logging.getLogger(__name__)

AUTO = "auto"
#: The order ``auto`` tries: the hypervisor when it is there, the local store otherwise.
AUTO_ORDER = ("xen", "zcache")

Resolve = Callable[[str], "type[Backend]"]


@dataclass(frozen=True)
class BackendChoice:
    requested: str
    chosen: str
    reason: str
    backend_class: type[Backend]
    #: Where ``requested`` came from: ``file:line``, command line, load request or default.
    origin: str = FROM_DEFAULT

    def describe(self) -> dict[str, Any]:
        return {"requested": self.requested, "chosen": self.chosen, "reason": self.reason,
                "from": self.origin}


def named_reason(origin: str) -> str:
    """Why a named backend: where it was named (``origin`` as :class:`BackendChoice` has it)."""
    if origin in (FROM_COMMAND_LINE, FROM_LOAD):
        return f"named in the {origin}"
    return f"named in {origin}"


def choose_backend(requested: str, roots: Roots, resolve: Resolve,
                   origin: str = FROM_DEFAULT) -> BackendChoice:
    """Resolve ``requested`` to a backend class; ``auto`` probes :data:`AUTO_ORDER` in turn.

    A named backend is not probed here (the shim probes it at load and its refusal is the
    error the user sees); ``auto`` skips a backend whose probe says it cannot run here.
    ``origin`` says where the request came from, for the reason shown.
    """
    if requested != AUTO:
        cls = resolve(requested)
        return BackendChoice(requested, cls.name or requested, named_reason(origin), cls,
                             origin)
    skipped: list[str] = []
    for name in AUTO_ORDER:
        try:
            cls = resolve(name)
        except (ParamError, BackendError) as exc:
            skipped.append(f"{name}: {exc}")
            continue
        try:
            cls.probe(roots)
        except BackendUnsupported as exc:
            skipped.append(f"{name}: {exc}")
            continue
        except (XentmemError, OSError) as exc:  # a probe that broke: say so, try the next
            log.warning("auto: probing %s failed: %s", name, exc)
            skipped.append(f"{name}: probe failed: {exc}")
            continue
        if name == "xen":
            reason = "a Xen guest with a reachable tmem host"
        else:
            reason = "no usable hypervisor tmem (" + "; ".join(skipped) + ")" if skipped \
                else "the first backend that can run here"
        return BackendChoice(AUTO, name, reason, cls, origin)
    raise BackendError("auto: no backend can run here (" + "; ".join(skipped) + ")")
