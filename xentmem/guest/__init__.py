"""The guest's tmem shim (runs in the domU): cleancache and frontswap, the backend plugins."""
