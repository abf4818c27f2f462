"""``sluice analytics``: the usage collector. Reads the usage windows sidecars append to Redis
(:mod:`sluice_core.usage`) and keeps them as SQL rollups (SQLite or PostgreSQL). Imports the
core only; the sidecar and the operator never import it."""
