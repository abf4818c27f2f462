"""``sluice sidecar``: run the sidecar until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from sluice_core import settingsform
from sluice_core.sidecar_settings import SidecarSettings

from sluice_sidecar.settings import from_args

HELP = "run the enforcing reverse proxy in front of one app"  # one line in `sluice --help`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting of :class:`SidecarSettings` as a flag, also read from ``SLUICE_<FLAG>``."""
    settingsform.add_arguments(parser, SidecarSettings)


def setup_event_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(settings: SidecarSettings) -> int:
    from sluice_sidecar.server import Sidecar

    sidecar = Sidecar(settings)
    try:
        await sidecar.start()
    except BaseException:
        await sidecar.stop()  # release the ports and connections already opened
        raise
    # Everything made so far (modules, app, policies) lives as long as the process: frozen out
    # of the collector's reach, a full collection walks only what requests made since. Measured
    # (perf, usage on): the collector's share of CPU per request fell to a third. Here, not in
    # Sidecar.start: a process that starts sidecars in-process (the tests) keeps its own heap.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sidecar.drain()  # at once if the app's preStop hook (GET /drain) already drained it
    await sidecar.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    """Start-up errors are one line on stderr, ``sluice sidecar: <what>: <reason>``, and a
    non-zero exit: 2 for a refused flag value or flags that contradict each other, 1 for what
    cannot be started."""
    from sluice_sidecar.server import StartupError

    try:
        settings = from_args(args)  # every flag checked before anything starts, logging included
    except ValueError as exc:
        print(f"sluice sidecar: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup_event_loop()
    try:
        return asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"sluice sidecar: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"sluice sidecar: {exc}", file=sys.stderr)
        return 2
