"""Xen plumbing shared by both ends of the split driver: the xenstore client, xenbus states
and the tmem messages carried over xenstore (runs in the domU and in dom0)."""
