"""Sluice policy core: the one contract between the operator and the sidecar.

It holds the ``RateLimitPolicy`` model, its validation and compilation, the Redis key
schema, the Lua scripts and the ``sluice`` command line. Neither the operator nor the
sidecar is imported from here; they import this package.
"""

from sluice_core.errors import PolicyError, PolicyErrors
from sluice_core.model import CompiledPolicy, Limit, Rule, Tier

__all__ = ["CompiledPolicy", "Limit", "PolicyError", "PolicyErrors", "Rule", "Tier"]
