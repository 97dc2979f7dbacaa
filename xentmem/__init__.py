"""xentmem: Xen transcendent memory and guest self-ballooning in user space."""

__version__ = "0.1.0"
