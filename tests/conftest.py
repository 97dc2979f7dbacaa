"""Shared pytest configuration.

Fixture modules live in ``tests/fakes`` (importable as ``fakes``).  The xenstore peers
(``xenstore_host``: ours, Debian's C xenstored, oxenstored; ``xs_server``: ours only) are
registered here once, so the real daemons start at most once per session.
"""

from fakes.xenstore_hosts import (  # noqa: F401  (fixtures, registered by import)
    c_xenstored_peer,
    make_xs_server,
    oxenstored_peer,
    pyxs_su,
    xenstore_host,
    xs_server,
)
from hypothesis import HealthCheck, settings

# No test may depend on how fast this machine is today: Hypothesis's per-example deadline
# (200 ms) and its "generation too slow" check fail a correct test on a busy CI machine.
settings.register_profile("no-timing", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("no-timing")
