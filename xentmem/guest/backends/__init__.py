"""The tmem backends a guest can load: ``zcache`` (local) and ``xen`` (to dom0 over xenbus)."""
