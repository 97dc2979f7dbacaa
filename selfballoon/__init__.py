"""Guest self-ballooning and frontswap self-shrinking (``xen-selfballoon.c``) in user space.

Nothing is imported here, so importing a pure module (policy, shrink, guard) never pulls in
I/O.  The parts and the kernel's rules they follow: docs/selfballoon.md.
"""
