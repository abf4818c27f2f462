"""kopf's start-up wait for its indexes, without a wake-up per object per object.

Until every object of every indexed resource kind has been indexed, kopf holds each object's
worker on one ``ToggleSet`` (a toggle per object not indexed yet, all on one
``asyncio.Condition``). Adding or dropping a toggle wakes every waiting worker, which then
takes the condition's lock in turn only to find that not all are indexed yet: N objects cost
about N² wake-ups. cProfile of a start-up at 1,000 policies in 1,000 namespaces (2,000 indexed
objects with the namespaces): 1.16 million wake-ups, more than half of the start-up's CPU, and
nothing reaches Redis until they are over.

Waking only when the set's state flips is the same behaviour: a ``ToggleSet``'s waiters wait
for its state (on or off), which adding an off toggle to an off set, or dropping one of
several off toggles, does not change; a single ``Toggle`` sharing the condition wakes the
waiters itself when it is turned (``Toggle.turn_to``), as before.

This replaces three methods of a kopf internal class: applied only to the kopf versions it
was checked against (``KOPF_VERSIONS``); with any other, kopf runs as it is, with a warning."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib import metadata
from typing import Any

log = logging.getLogger("sluice.operator")
KOPF_VERSIONS = ("1.45.",)
"""kopf versions whose ``aiotoggles.ToggleSet`` this was checked against (prefixes)."""


def quiet_index_wait() -> bool:
    """Make kopf's toggle sets wake their waiters only when their state flips; True if applied
    (idempotent)."""
    from kopf._cogs.aiokits import aiotoggles

    cls: Any = aiotoggles.ToggleSet
    if getattr(cls, "_sluice_quiet", False):
        return True
    version = metadata.version("kopf")
    if not version.startswith(KOPF_VERSIONS):
        log.warning("kopf %s: start-up index wait left as it is (checked for %s); start-up with "
                    "many objects is slower", version, ", ".join(KOPF_VERSIONS))
        return False

    async def make_toggle(self: Any, __val: bool = False, *, name: str | None = None) -> Any:
        toggle = aiotoggles.Toggle(__val, name=name, condition=self._condition)
        async with self._condition:
            before = self.is_on()
            self._toggles.add(toggle)
            if self.is_on() != before:
                self._condition.notify_all()
        return toggle

    async def drop_toggle(self: Any, toggle: Any) -> None:
        await drop_toggles(self, [toggle])

    async def drop_toggles(self: Any, toggles: Iterable[Any]) -> None:
        async with self._condition:
            before = self.is_on()
            self._toggles.difference_update(toggles)
            if self.is_on() != before:
                self._condition.notify_all()

    cls.make_toggle, cls.drop_toggle, cls.drop_toggles = make_toggle, drop_toggle, drop_toggles
    cls._sluice_quiet = True
    return True
