"""Decision stores: where bucket state lives. Both run the same GCRA arithmetic (see
``sluice_core/scripts/decide.lua``) and return the script's :class:`~sluice_core.gcra.Reply`, so callers
cannot tell them apart."""

from sluice_sidecar.stores.base import DecisionStore, StoreUnavailable

__all__ = ["DecisionStore", "StoreUnavailable"]
