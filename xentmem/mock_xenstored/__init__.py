"""A stand-in for Xen's xenstored, for tests and ``xentmem-hostd demo`` only: it speaks the
real wire protocol with per-domain identities, so a whole Xen host can be mocked on one
machine.  Production uses the real xenstored."""
