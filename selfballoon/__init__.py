"""Guest self-ballooning and frontswap self-shrinking (``xen-selfballoon.c``) in user space.

Pure policy (:mod:`.policy`, :mod:`.shrink`, :mod:`.guard`), the guest's inputs
(:mod:`.inputs`), the balloon actuator (:mod:`.actuator`), the knobs (:mod:`.knobs`), the
worker (:mod:`.loop`), its lazy start with the tmem shim (:mod:`.service`) and a simulator for
tests and benchmarks (:mod:`.simulate`).  Nothing is imported here, so importing a pure module
never pulls in I/O.
"""
