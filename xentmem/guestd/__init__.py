"""The guest daemon ``xentmemd``: the shim, its control socket, selfballoon, swap areas
(runs in the domU)."""
